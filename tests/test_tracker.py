"""The gateway's record of where each request stands, built from out-of-order events."""

from __future__ import annotations

import itertools

import pytest

from gateway.tracker import RequestTracker
from smartgrid import contract

RID = "0123456789abcdef0123456789abcdef"


def accepted(request_id: str = RID) -> contract.ChargeRequest:
    return contract.ChargeRequest(request_id=request_id, ev_id="EV1", accepted_at=100.0)


def routed(request_id: str = RID, substation: str = "s1") -> contract.RequestRouted:
    return contract.RequestRouted(
        at=101.0, request_id=request_id, ev_id="EV1", substation=substation, balancer="b"
    )


def session_started(request_id: str = RID) -> contract.SessionStarted:
    return contract.SessionStarted(
        at=102.0,
        request_id=request_id,
        ev_id="EV1",
        substation="s1",
        instance="i",
        accepted_at=100.0,
        expected_end=132.0,
    )


def session_completed(request_id: str = RID) -> contract.SessionCompleted:
    return contract.SessionCompleted(
        at=132.0,
        request_id=request_id,
        ev_id="EV1",
        substation="s1",
        instance="i",
        started_at=102.0,
    )


def dead_lettered(request_id: str = RID) -> contract.RequestDeadLettered:
    return contract.RequestDeadLettered(
        at=103.0, reason="delivery limit", source="smartgrid.substation.s1", request_id=request_id
    )


FORWARD = {"routed": routed, "charging": session_started, "completed": session_completed}


def test_an_accepted_request_is_queued_with_its_ev_id():
    tracker = RequestTracker()
    tracker.accepted(accepted())
    assert tracker.get(RID) == {
        "request_id": RID,
        "ev_id": "EV1",
        "status": "queued",
        "accepted_at": 100.0,
    }


def test_an_unknown_request_has_no_record():
    assert RequestTracker().get(RID) is None


def test_events_in_order_move_the_status_through_every_step():
    tracker = RequestTracker()
    tracker.accepted(accepted())
    seen = []
    for make in (routed, session_started, session_completed):
        tracker.apply(make())
        seen.append(tracker.get(RID)["status"])
    assert seen == ["routed", "charging", "completed"]
    record = tracker.get(RID)
    assert (
        record["substation"],
        record["routed_at"],
        record["started_at"],
        record["completed_at"],
    ) == (
        "s1",
        101.0,
        102.0,
        132.0,
    )
    assert record["expected_end"] == 132.0


@pytest.mark.parametrize("order", list(itertools.permutations(FORWARD)), ids="-".join)
def test_the_status_only_moves_forward_whatever_order_the_events_arrive_in(order: tuple[str, ...]):
    tracker = RequestTracker()
    rank = {"queued": 0, "routed": 1, "charging": 2, "completed": 3}
    previous = "queued"
    for status in order:
        tracker.apply(FORWARD[status]())
        now = tracker.get(RID)["status"]
        assert rank[now] >= rank[previous]
        previous = now
    assert tracker.get(RID)["status"] == "completed"


def test_a_late_routed_event_does_not_move_a_charging_request_back():
    tracker = RequestTracker()
    tracker.apply(session_started())
    tracker.apply(routed())
    assert tracker.get(RID)["status"] == "charging"


def test_a_late_accepted_event_keeps_the_status():
    tracker = RequestTracker()
    tracker.apply(routed())
    tracker.apply(contract.RequestAccepted(at=100.0, request_id=RID, ev_id="EV1"))
    record = tracker.get(RID)
    assert record["status"] == "routed" and record["accepted_at"] == 100.0


@pytest.mark.parametrize("later", list(FORWARD))
def test_dead_lettered_is_terminal(later: str):
    tracker = RequestTracker()
    tracker.accepted(accepted())
    tracker.apply(dead_lettered())
    tracker.apply(FORWARD[later]())
    record = tracker.get(RID)
    assert record["status"] == "dead_lettered"
    assert record["reason"] == "delivery limit"


def test_an_event_without_a_request_id_is_ignored():
    tracker = RequestTracker()
    tracker.apply(
        contract.RequestDeadLettered(at=1.0, reason="unparsable", source="smartgrid.pending")
    )
    tracker.apply(contract.BalancerStarted(at=1.0, balancer="b"))
    assert len(tracker) == 0


def test_the_waiter_is_set_by_the_routed_event():
    tracker = RequestTracker()
    waiter = tracker.expect(RID)
    tracker.apply(contract.RequestAccepted(at=100.0, request_id=RID, ev_id="EV1"))
    assert not waiter.is_set()
    tracker.apply(routed())
    assert waiter.is_set()


def test_the_waiter_is_set_by_a_session_start_that_overtook_the_routed_event():
    tracker = RequestTracker()
    waiter = tracker.expect(RID)
    tracker.apply(session_started())
    assert waiter.is_set()


def test_the_waiter_is_set_when_the_request_is_dead_lettered():
    tracker = RequestTracker()
    waiter = tracker.expect(RID)
    tracker.apply(dead_lettered())
    assert waiter.is_set()


def test_a_waiter_is_only_set_by_events_for_its_own_request():
    tracker = RequestTracker()
    waiter = tracker.expect(RID)
    tracker.apply(routed("f" * 32))
    assert not waiter.is_set()


def test_a_forgotten_waiter_is_not_set():
    tracker = RequestTracker()
    waiter = tracker.expect(RID)
    tracker.forget_waiter(RID)
    tracker.apply(routed())
    assert not waiter.is_set()
    tracker.forget_waiter(RID)  # forgetting twice is harmless


def test_the_number_of_records_is_bounded_and_the_oldest_is_evicted_first():
    tracker = RequestTracker(capacity=3)
    ids = [f"{n:032x}" for n in range(5)]
    for request_id in ids:
        tracker.accepted(accepted(request_id))
    assert len(tracker) == 3
    assert tracker.get(ids[0]) is None and tracker.get(ids[1]) is None
    assert [tracker.get(i)["request_id"] for i in ids[2:]] == ids[2:]


def test_updating_a_kept_record_does_not_evict_anything():
    tracker = RequestTracker(capacity=2)
    tracker.accepted(accepted("a" * 32))
    tracker.accepted(accepted("b" * 32))
    tracker.apply(routed("a" * 32))
    tracker.apply(session_started("b" * 32))
    assert len(tracker) == 2
    assert tracker.get("a" * 32)["status"] == "routed"
    assert tracker.get("b" * 32)["status"] == "charging"


def test_an_event_for_an_evicted_request_starts_a_fresh_record():
    tracker = RequestTracker(capacity=1)
    tracker.accepted(accepted("a" * 32))
    tracker.accepted(accepted("b" * 32))
    tracker.apply(session_completed("a" * 32))
    assert tracker.get("b" * 32) is None
    record = tracker.get("a" * 32)
    assert record["status"] == "completed" and record["ev_id"] == "EV1"
