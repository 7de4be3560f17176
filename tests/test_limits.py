"""Operators' limit overrides: newest wins, expiry, clearing. Pure, times passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgrid.limits import LimitOverride, LimitOverrides

no_deadline = settings(deadline=None)


def test_an_override_holds_until_it_expires():
    store = LimitOverrides()
    assert store.apply(LimitOverride("feeder-a", 80_000, issued_at=100.0, valid_until=160.0))
    assert store.in_force(100.0) == {"feeder-a": 80_000}
    assert store.next_change(100.0) == 160.0
    assert store.in_force(160.0) == {}
    assert store.next_change(160.0) is None


def test_a_newer_override_replaces_an_older_one_and_a_late_old_one_changes_nothing():
    store = LimitOverrides()
    store.apply(LimitOverride("f", 80_000, issued_at=100.0))
    assert store.apply(LimitOverride("f", 50_000, issued_at=101.0))
    assert not store.apply(LimitOverride("f", 90_000, issued_at=100.5))  # redelivered late
    assert store.in_force(200.0) == {"f": 50_000}


def test_clearing_is_an_override_too():
    store = LimitOverrides()
    store.apply(LimitOverride("f", 80_000, issued_at=100.0))
    store.apply(LimitOverride("f", None, issued_at=101.0))
    assert store.in_force(102.0) == {}
    assert not store.apply(LimitOverride("f", 80_000, issued_at=100.0))


def test_two_overrides_issued_at_once_resolve_to_the_lower_limit_whatever_their_order():
    for order in ([70_000, 60_000], [60_000, 70_000]):
        store = LimitOverrides()
        for limit in order:
            store.apply(LimitOverride("f", limit, issued_at=5.0))
        assert store.in_force(5.0) == {"f": 60_000}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"limit_w": 0}, "above 0"),
        ({"limit_w": 1000, "valid_until": 10.0}, "valid for some time"),
    ],
)
def test_impossible_overrides_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LimitOverride("f", issued_at=10.0, **kwargs)


overrides = st.builds(
    LimitOverride,
    node=st.sampled_from(["a", "b"]),
    limit_w=st.none() | st.integers(1, 100),
    issued_at=st.integers(0, 20).map(float),
    valid_until=st.none() | st.integers(21, 30).map(float),
)


@no_deadline
@given(st.lists(overrides, max_size=12), st.randoms())
def test_the_outcome_does_not_depend_on_the_order_of_delivery(messages, rng):
    first, second = LimitOverrides(), LimitOverrides()
    for message in messages:
        first.apply(message)
    shuffled = list(messages)
    rng.shuffle(shuffled)
    for message in shuffled:
        second.apply(message)
    for now in (0.0, 25.0, 100.0):
        assert first.in_force(now) == second.in_force(now)
        assert first.next_change(now) == second.next_change(now)
