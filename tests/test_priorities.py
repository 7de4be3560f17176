"""The release order of requests waiting for power: emergency first, fleet and standard by
weight, a guaranteed share for each. Pure, seeded, no broker."""

from __future__ import annotations

import collections
from collections import deque
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.priorities import ReleasePolicy, ReleaseScheduler, release
from smartgrid.power import CLASS_ORDER, Priority

E, F, S = Priority.EMERGENCY, Priority.FLEET, Priority.STANDARD
no_deadline = settings(deadline=None)


def picks(scheduler: ReleaseScheduler, ready, count: int) -> collections.Counter:
    return collections.Counter(scheduler.pick(ready) for _ in range(count))


def test_with_everyone_waiting_emergency_gets_all_but_the_guaranteed_shares():
    assert picks(ReleaseScheduler(), {E, F, S}, 100) == {E: 80, F: 10, S: 10}


def test_without_emergencies_fleet_and_standard_share_by_weight_above_their_guarantees():
    # 10% each guaranteed; the other 80% split 3:1.
    assert picks(ReleaseScheduler(), {F, S}, 100) == {F: 70, S: 30}


def test_a_class_with_nothing_waiting_leaves_its_slots_to_the_others():
    assert picks(ReleaseScheduler(), {S}, 50) == {S: 50}
    assert picks(ReleaseScheduler(), {E}, 50) == {E: 50}


def test_nothing_to_release_picks_nothing():
    assert ReleaseScheduler().pick(set()) is None


def test_guaranteed_slots_are_spread_out_not_bunched():
    scheduler = ReleaseScheduler()
    sequence = [scheduler.pick({E, F, S}) for _ in range(40)]
    standard = [i for i, c in enumerate(sequence) if c is S]
    assert len(standard) == 4
    assert [b - a for a, b in zip(standard, standard[1:], strict=False)] == [10, 10, 10]


def test_a_policy_may_guarantee_emergency_a_share_too_and_strict_priority_is_no_guarantees():
    strict = ReleaseScheduler(ReleasePolicy(guaranteed={}))
    assert picks(strict, {E, F, S}, 30) == {E: 30}
    assert picks(strict, {F, S}, 40) == {F: 30, S: 10}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"weights": {F: 0, S: 1}}, "positive integer"),
        ({"weights": {S: 1}}, "positive integer"),
        ({"guaranteed": {F: Fraction(3, 4), S: Fraction(1, 2)}}, "at most 1"),
        ({"guaranteed": {F: Fraction(-1, 4)}}, ">= 0"),
    ],
)
def test_impossible_policies_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ReleasePolicy(**kwargs)


# ------------------------------------------------------------------------------ release
def queues(**by_class) -> dict[Priority, deque]:
    return {Priority(name): deque(items) for name, items in by_class.items()}


def test_release_admits_in_order_while_power_lasts():
    budget = [25]
    admitted = []

    def admit(kw):
        budget[0] -= kw
        admitted.append(kw)

    waiting = queues(emergency=[10], fleet=[5, 5], standard=[7, 3])
    released = release(ReleaseScheduler(), waiting, lambda kw: kw <= budget[0], admit)
    assert released == admitted
    assert sum(released) <= 25
    assert released[0] == 10  # emergency first
    assert budget[0] < min(q[0] for q in waiting.values() if q)  # nothing left that fits


def test_a_large_request_at_the_head_is_not_overtaken_in_its_class_but_others_go_on():
    budget = [12]

    def admit(kw):
        budget[0] -= kw

    waiting = queues(standard=[20, 2, 2], fleet=[4, 4])
    released = release(ReleaseScheduler(), waiting, lambda kw: kw <= budget[0], admit)
    assert released == [4, 4]
    assert list(waiting[S]) == [20, 2, 2]


# ------------------------------------------------------------------------------ properties
policies = st.builds(
    lambda wf, ws, gf, gs, ge: ReleasePolicy(
        weights={F: wf, S: ws}, guaranteed={E: ge, F: gf, S: gs}
    ),
    st.integers(1, 5),
    st.integers(1, 5),
    st.fractions(0, Fraction(1, 3), max_denominator=20),
    st.fractions(0, Fraction(1, 3), max_denominator=20),
    st.fractions(0, Fraction(1, 3), max_denominator=20),
)
ready_sets = st.sets(st.sampled_from(CLASS_ORDER))


@no_deadline
@given(policy=policies, steps=st.lists(ready_sets, max_size=300))
def test_a_pick_is_always_a_ready_class_and_there_is_one_whenever_a_class_is_ready(policy, steps):
    scheduler = ReleaseScheduler(policy)
    for ready in steps:
        chosen = scheduler.pick(ready)
        assert (chosen in ready) if ready else chosen is None


@no_deadline
@given(policy=policies, steps=st.lists(ready_sets, min_size=1, max_size=300), data=st.data())
def test_a_class_ready_throughout_a_stretch_gets_its_guaranteed_share_of_it(policy, steps, data):
    scheduler = ReleaseScheduler(policy)
    history = [(ready, scheduler.pick(ready)) for ready in steps]
    start = data.draw(st.integers(0, len(history) - 1))
    end = data.draw(st.integers(start + 1, len(history)))
    stretch = history[start:end]
    for c in CLASS_ORDER:
        if all(c in ready for ready, _ in stretch):
            got = sum(1 for _, chosen in stretch if chosen is c)
            share = Fraction(policy.guaranteed.get(c, 0))
            if c is E:  # emergency also owns everything nobody is guaranteed
                share = 1 - policy.guaranteed.get(F, 0) - policy.guaranteed.get(S, 0)
            assert got >= share * len(stretch) - 2, (c, got, len(stretch))


@no_deadline
@given(policy=policies, count=st.integers(1, 400))
def test_no_class_starves_under_a_flood_of_the_others(policy, count):
    scheduler = ReleaseScheduler(policy)
    got = picks(scheduler, {E, F, S}, count)
    for c in (F, S):
        assert got[c] >= Fraction(policy.guaranteed[c]) * count - 2
