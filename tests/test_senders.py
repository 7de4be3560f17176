"""Who may send which event (smartgrid.senders), without a broker."""

from __future__ import annotations

import pytest

from smartgrid import contract
from smartgrid.senders import DEFAULT_EVENT_SENDERS, Senders, parse_event_senders

LOOKUP = contract.SessionLookup(at=1.0, request_id="a" * 32, substation="s2")
ROUTED = contract.RequestRouted(
    at=1.0, request_id="a" * 32, ev_id="EV1", substation="s2", balancer="b"
)
ANNOUNCED = contract.SubstationAnnounced(
    at=1.0,
    substation="s2",
    instance="i",
    capacity=5,
    metrics_url="http://localhost:1/metrics",
    session_seconds=1.0,
)


@pytest.fixture
def senders() -> Senders:
    return Senders(DEFAULT_EVENT_SENDERS, own_user="balancer")


def test_each_kind_is_trusted_only_from_a_user_of_a_role_that_sends_it(senders: Senders):
    assert not senders.single_user
    assert senders.refusal(ROUTED, "balancer") is None
    assert senders.refusal(LOOKUP, "substation") is None
    for forger in ("gateway", "loadgen", "guest", "substation"):
        if forger != "substation":
            assert senders.refusal(LOOKUP, forger) is not None
        assert senders.refusal(ROUTED, forger) is not None
    assert senders.refusal(ROUTED, None) == "it carries no user_id"


def test_a_substations_own_user_speaks_for_that_substation_only(senders: Senders):
    assert senders.refusal(LOOKUP, "substation-s2") is None
    assert senders.refusal(ANNOUNCED, "substation-s2") is None
    assert "not 's2'" in (senders.refusal(LOOKUP, "substation-s1") or "")
    assert senders.refusal(ANNOUNCED, "substation-s1") is not None
    # The shared user cannot be told apart: it speaks for any substation.
    assert senders.refusal(ANNOUNCED, "substation") is None


def test_one_user_for_everything_trusts_only_that_user(senders: Senders):
    local = Senders(DEFAULT_EVENT_SENDERS, own_user="guest")
    assert local.single_user
    assert local.refusal(ROUTED, "guest") is None
    assert local.refusal(LOOKUP, "guest") is None
    assert local.refusal(ROUTED, "balancer") is not None
    assert local.refusal(ROUTED, None) is not None


def test_trusted_keeps_the_events_from_their_owners_and_counts_the_rest(senders: Senders):
    assert senders.trusted([LOOKUP, ANNOUNCED], "substation-s2") == [LOOKUP, ANNOUNCED]
    assert senders.trusted([LOOKUP, ANNOUNCED], "substation-s1") == []
    assert senders.refused == 2


def test_the_mapping_is_configurable_and_checked():
    assert parse_event_senders(["substation=a|b-{id}", "balancer=x"]) == {
        "substation": ("a", "b-{id}"),
        "balancer": ("x",),
    }
    for bad in (["nobody=x"], ["balancer="], ["balancer"]):
        with pytest.raises(ValueError):
            parse_event_senders(bad)
    custom = Senders(["substation=sub-{id}-x", "balancer=b"], own_user="b")
    assert custom.refusal(LOOKUP, "sub-s2-x") is None
    assert custom.refusal(LOOKUP, "sub-s1-x") is not None


def test_issue_14s_events_are_trusted_from_the_roles_that_send_them(senders: Senders):
    rid = "a" * 32
    cancel = contract.CancelRequested(at=1.0, request_id=rid, ev_id="EV1", client="driver")
    rejected = contract.RequestRejected(
        at=1.0,
        request_id=rid,
        ev_id="EV1",
        reason=contract.REJECTED_EV_BUSY,
        detail="busy",
        source="b",
        accepted_at=1.0,
    )
    by_balancer = contract.RequestCancelled(at=1.0, request_id=rid, ev_id="EV1", source="b")
    in_queue = contract.RequestCancelled(at=1.0, request_id=rid, ev_id="EV1", source="s2")
    charging = contract.RequestCancelled(
        at=1.0, request_id=rid, ev_id="EV1", source="s2", substation="s2", started_at=0.5
    )
    trusted = {
        cancel: {"gateway"},
        rejected: {"gateway", "balancer"},
        by_balancer: {"balancer", "substation"},
        in_queue: {"balancer", "substation", "substation-s2"},
        charging: {"balancer", "substation", "substation-s2"},
    }
    for event, users in trusted.items():
        for user in ("gateway", "balancer", "substation", "substation-s2", "loadgen"):
            assert (senders.refusal(event, user) is None) == (user in users), (event, user)
    # A substation's own user speaks for its own cancels only, started or not.
    assert senders.refusal(in_queue, "substation-s1") is not None
    assert senders.refusal(charging, "substation-s1") is not None
