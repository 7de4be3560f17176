"""The request history: statuses from out-of-order events, ownership, the EV index, attempts,
retention, and rebuilding it all by replaying the stream."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.history import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    PUBLIC_FIELDS,
    STATUSES,
    RequestHistory,
    read_stream_message,
)
from smartgrid import contract
from tests.helpers import present

RID = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
NOW = 1_000_000.0
T0 = NOW - 60  # accepted a minute ago


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def history(**kwargs) -> RequestHistory:
    kwargs.setdefault("clock", Clock())
    return RequestHistory(**kwargs)


def request(rid=RID, ev="EV1", at=T0, client="fleet-1", fp=None, rerouted_from=None):
    return contract.ChargeRequest(
        request_id=rid,
        ev_id=ev,
        accepted_at=at,
        client=client,
        body_fingerprint=fp,
        rerouted_from=rerouted_from,
    )


def routed(rid=RID, ev="EV1", substation="s1", at=T0 + 1):
    return contract.RequestRouted(
        at=at, request_id=rid, ev_id=ev, substation=substation, balancer="b"
    )


def started(rid=RID, ev="EV1", at=T0 + 2):
    return contract.SessionStarted(
        at=at,
        request_id=rid,
        ev_id=ev,
        substation="s1",
        instance="i",
        accepted_at=T0,
        expected_end=at + 30,
    )


def completed(rid=RID, ev="EV1", at=T0 + 32):
    return contract.SessionCompleted(
        at=at, request_id=rid, ev_id=ev, substation="s1", instance="i", started_at=T0 + 2
    )


def dead_lettered(rid=RID, at=T0 + 3):
    return contract.RequestDeadLettered(
        at=at, reason="delivery limit", source="smartgrid.substation.s1", request_id=rid
    )


def rejected(rid=RID, ev="EV1", reason=contract.REJECTED_EV_BUSY, accepted_at=T0, at=T0 + 1):
    return contract.RequestRejected(
        at=at,
        request_id=rid,
        ev_id=ev,
        reason=reason,
        detail="words for the driver",
        source="b",
        accepted_at=accepted_at,
        active_request_id=OTHER if reason == contract.REJECTED_EV_BUSY else None,
    )


def cancel_requested(rid=RID, ev="EV1", at=T0 + 5):
    return contract.CancelRequested(at=at, request_id=rid, ev_id=ev, client="fleet-1")


def cancelled(rid=RID, ev="EV1", at=T0 + 5.2, started_at=None):
    return contract.RequestCancelled(
        at=at,
        request_id=rid,
        ev_id=ev,
        source="s1" if started_at else "b",
        substation="s1" if started_at else None,
        started_at=started_at,
    )


def feed(h: RequestHistory, items) -> None:
    for item in items:
        if isinstance(item, contract.ChargeRequest):
            h.accepted(item)
        else:
            h.apply(item)


# Every way a request's life can go, as the events that record it (in causal order), and the
# status it must end in whatever order they arrive.
SCENARIOS = {
    "completed": ([request(), routed(), started(), completed()], "completed"),
    "cancelled_while_queued": ([request(), cancel_requested(), cancelled()], "cancelled"),
    "cancelled_while_charging": (
        [request(), routed(), started(), cancel_requested(), cancelled(started_at=T0 + 2)],
        "cancelled",
    ),
    "cancel_too_late": (
        [request(), routed(), started(), completed(), cancel_requested()],
        "completed",
    ),
    "lost_a_race_for_the_ev": ([request(), rejected()], "rejected"),
    "not_enqueued": ([request(), rejected(reason=contract.REJECTED_NOT_ENQUEUED)], "rejected"),
    "not_enqueued_but_it_was": (
        [
            request(),
            rejected(reason=contract.REJECTED_NOT_ENQUEUED),
            routed(),
            started(),
            completed(),
        ],
        "completed",
    ),
    "dead_lettered_at_the_substation": ([request(), routed(), dead_lettered()], "dead_lettered"),
    "rerouted_off_a_dead_substation": (
        [
            request(),
            routed(substation="s2"),
            request(rerouted_from="s2", client=None),
            routed(at=T0 + 40),
        ],
        "routed",
    ),
}


# ------------------------------------------------------------------------------ statuses
def test_the_status_vocabulary():
    assert STATUSES == (
        "queued",
        "routed",
        "charging",
        "completed",
        "cancelled",
        "rejected",
        "dead_lettered",
    )
    assert set(ACTIVE_STATUSES) | set(FINAL_STATUSES) == set(STATUSES)


def test_an_accepted_request_is_queued_with_its_ev_id():
    h = history()
    h.accepted(request())
    assert h.get(RID) == {"request_id": RID, "ev_id": "EV1", "status": "queued", "accepted_at": T0}


def test_the_age_of_the_oldest_request_held_shows_what_is_covered():
    h = history()
    assert h.oldest_age() == 0.0
    h.accepted(request())
    h.accepted(request(rid=OTHER, ev="EV2", at=NOW - 5))
    assert h.oldest_age() == 60.0


def test_an_unknown_request_has_no_record():
    assert history().get(RID) is None


def test_events_in_order_move_the_status_through_every_step():
    h = history()
    h.accepted(request())
    seen = []
    for event in (routed(), started(), completed()):
        h.apply(event)
        seen.append(present(h.get(RID))["status"])
    assert seen == ["routed", "charging", "completed"]
    record = present(h.get(RID))
    assert (record["substation"], record["routed_at"], record["started_at"]) == (
        "s1",
        T0 + 1,
        T0 + 2,
    )
    assert (record["expected_end"], record["completed_at"]) == (T0 + 32, T0 + 32)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_order_of_a_scenarios_events_ends_in_the_same_record(name: str):
    items, final = SCENARIOS[name]
    records = set()
    for order in itertools.permutations(items):
        h = history()
        feed(h, order)
        record = present(h.get(RID))
        assert record["status"] == final, order
        records.add(tuple(sorted(record.items())))
    assert len(records) == 1, records


@settings(max_examples=300)
@given(st.sampled_from(list(SCENARIOS)), st.randoms(use_true_random=False))
def test_a_status_never_moves_back(name: str, rnd):
    items, _final = SCENARIOS[name]
    order = list(items)
    rnd.shuffle(order)
    h = history()
    previous = None
    for item in order:
        feed(h, [item])
        record = present(h.get(RID))
        status = record["status"]
        if previous in ACTIVE_STATUSES and status in ACTIVE_STATUSES:
            assert ACTIVE_STATUSES.index(status) >= ACTIVE_STATUSES.index(previous)
        if previous in FINAL_STATUSES and status != previous:
            # Only the gateway's provisional rejection gives way, to evidence of progress.
            assert name == "not_enqueued_but_it_was" and previous == "rejected"
        previous = status


@pytest.mark.parametrize("later", [routed, started, completed, cancelled, rejected])
def test_dead_lettered_is_final(later):
    h = history()
    feed(h, [request(), dead_lettered(), later()])
    record = present(h.get(RID))
    assert record["status"] == "dead_lettered" and record["reason"] == "delivery limit"


def test_a_rejection_says_why_and_names_the_request_that_holds_the_ev():
    h = history()
    feed(h, [request(), rejected()])
    record = present(h.get(RID))
    assert record["status"] == "rejected"
    assert record["reason"] == "ev_busy" and record["detail"] == "words for the driver"
    assert record["active_request_id"] == OTHER and record["rejected_at"] == T0 + 1


def test_a_cancel_request_shows_until_the_cancellation_and_after():
    h = history()
    feed(h, [request(), routed(), started(), cancel_requested()])
    assert present(h.get(RID))["status"] == "charging"
    assert present(h.get(RID))["cancel_requested_at"] == T0 + 5
    h.apply(cancelled(started_at=T0 + 2))
    record = present(h.get(RID))
    assert record["status"] == "cancelled" and record["cancelled_at"] == T0 + 5.2
    assert record["cancel_requested_at"] == T0 + 5 and record["started_at"] == T0 + 2


def test_a_late_accepted_event_keeps_the_status():
    h = history()
    h.apply(routed())
    h.apply(contract.RequestAccepted(at=T0, request_id=RID, ev_id="EV1"))
    record = present(h.get(RID))
    assert record["status"] == "routed" and record["accepted_at"] == T0


def test_an_event_without_a_request_id_is_ignored():
    h = history()
    h.apply(contract.RequestDeadLettered(at=T0, reason="unparsable", source="smartgrid.pending"))
    h.apply(contract.BalancerStarted(at=T0, balancer="b"))
    assert len(h) == 0


def test_the_public_record_never_shows_the_client_or_the_fingerprint():
    h = history()
    h.accepted(request(fp="a" * 32))
    record = present(h.get(RID))
    assert set(record) <= set(PUBLIC_FIELDS)
    assert "client" not in record and "body_fingerprint" not in record
    assert present(h.lookup(RID)).body_fingerprint == "a" * 32


# ------------------------------------------------------------------------------ ownership
def test_a_request_is_seen_by_its_own_client_only():
    h = history()
    h.accepted(request(client="fleet-1"))
    assert present(h.get(RID, "fleet-1"))["status"] == "queued"
    assert h.get(RID, "fleet-2") is None
    assert h.lookup(RID, "fleet-2") is None


def test_the_open_api_sees_every_request():
    h = history()
    h.accepted(request(client="fleet-1"))
    assert h.get(RID, None) is not None


def test_a_request_known_only_from_events_is_not_shown_to_a_named_client_until_its_copy_arrives():
    h = history()
    h.apply(routed())  # overtook the request's own copy in the stream
    assert h.get(RID, "fleet-1") is None
    h.accepted(request(client="fleet-1"))
    assert present(h.get(RID, "fleet-1"))["status"] == "routed"


def test_a_rerouted_copy_without_a_client_keeps_the_owner():
    h = history()
    feed(h, [request(client="fleet-1"), routed(), request(rerouted_from="s1", client=None)])
    assert present(h.lookup(RID)).client == "fleet-1"


# ------------------------------------------------------------------------------ the EV index
def test_an_active_request_holds_its_ev_until_it_ends():
    h = history()
    h.accepted(request())
    assert h.active_for("EV1") == (RID, "fleet-1")
    for event in (routed(), started()):
        h.apply(event)
        assert h.active_for("EV1") == (RID, "fleet-1")
    h.apply(completed())
    assert h.active_for("EV1") is None


@pytest.mark.parametrize(
    "ending",
    [completed, cancelled, rejected, dead_lettered, lambda: rejected(reason="not_enqueued")],
)
def test_every_final_status_frees_the_ev(ending):
    h = history()
    feed(h, [request(), ending()])
    assert h.active_for("EV1") is None


def test_while_a_race_is_decided_the_earliest_accepted_request_holds_the_ev():
    h = history()
    h.accepted(request(OTHER, at=T0 + 1, client="fleet-2"))
    h.accepted(request(RID, at=T0))
    assert h.active_for("EV1") == (RID, "fleet-1")
    h.apply(rejected(RID))  # the balancer took the other one
    assert h.active_for("EV1") == (OTHER, "fleet-2")


def test_an_ev_learned_late_is_indexed():
    h = history()
    h.apply(contract.RequestDeadLettered(at=T0, reason="x", source="q", request_id=RID))
    h.apply(routed())  # dead-lettered is final; nothing active
    assert h.active_for("EV1") is None
    h2 = history()
    h2.apply(cancel_requested())
    assert h2.active_for("EV1") == (RID, None)


def test_the_ev_index_never_names_a_finished_or_evicted_request():
    h = history(capacity=2)
    for n in range(5):
        h.accepted(request(f"{n:032x}", ev=f"EV{n}"))
    assert [h.active_for(f"EV{n}") for n in range(3)] == [None, None, None]
    assert h.active_for("EV4") == (f"{4:032x}", "fleet-1")


# ------------------------------------------------------------------------------ attempts
def test_a_repeat_after_a_provisional_rejection_is_a_new_attempt():
    h = history()
    feed(h, [request(fp="a" * 32), rejected(reason=contract.REJECTED_NOT_ENQUEUED)])
    assert present(h.get(RID))["status"] == "rejected" and h.active_for("EV1") is None
    h.accepted(request(at=T0 + 10, fp="a" * 32))
    record = present(h.get(RID))
    assert record["status"] == "queued" and record["accepted_at"] == T0 + 10
    assert "reason" not in record
    assert h.active_for("EV1") == (RID, "fleet-1")
    # A late rejection of the first attempt does not touch the second.
    h.apply(rejected(reason=contract.REJECTED_NOT_ENQUEUED, accepted_at=T0))
    assert present(h.get(RID))["status"] == "queued"


def test_a_copy_of_the_same_attempt_changes_nothing():
    h = history()
    feed(h, [request(), routed(), started(), request()])
    assert present(h.get(RID))["status"] == "charging"


def test_a_later_accept_of_a_finished_request_within_the_ttl_is_the_same_request():
    h = history(idempotency_ttl=3600)
    feed(h, [request(), rejected()])
    h.accepted(request(at=T0 + 30))  # a retry racing its own history: not a new attempt
    record = present(h.get(RID))
    assert record["status"] == "rejected" and record["accepted_at"] == T0


def test_a_key_used_again_after_the_ttl_starts_a_new_attempt():
    clock = Clock(NOW)
    h = history(idempotency_ttl=3600, max_age=7200, clock=clock)
    feed(h, [request(at=NOW - 3700), routed(at=NOW - 3699), completed(at=NOW - 3600)])
    record = present(h.lookup(RID))
    assert h.idempotency_expired(record)
    h.accepted(request(at=NOW))
    record = present(h.lookup(RID))
    assert (record.status, record.accepted_at, record.completed_at) == ("queued", NOW, None)
    assert not h.idempotency_expired(record)


# ------------------------------------------------------------------------------ retention
def test_the_number_of_records_is_bounded_and_the_oldest_go_first():
    h = history(capacity=3)
    ids = [f"{n:032x}" for n in range(5)]
    for n, request_id in enumerate(ids):
        h.accepted(request(request_id, at=T0 + n))
    assert len(h) == 3
    assert h.get(ids[0]) is None and h.get(ids[1]) is None
    assert [present(h.get(i))["request_id"] for i in ids[2:]] == ids[2:]


def test_records_older_than_the_retention_window_are_dropped():
    clock = Clock(NOW)
    h = history(max_age=100, clock=clock)
    h.accepted(request(RID, at=NOW - 50))
    h.accepted(request(OTHER, ev="EV2", at=NOW - 10))
    clock.now = NOW + 60
    h.apply(routed(OTHER, ev="EV2", at=NOW + 60))  # any change sweeps the oldest
    assert h.get(RID) is None and h.get(OTHER) is not None
    assert h.active_for("EV1") is None


def test_a_replayed_request_older_than_the_window_is_not_kept():
    h = history(max_age=100)
    h.accepted(request(at=NOW - 101))
    h.apply(routed(at=NOW - 100.5))
    assert len(h) == 0


def test_updating_a_kept_record_does_not_evict_anything():
    h = history(capacity=2)
    h.accepted(request("a" * 32))
    h.accepted(request("b" * 32, ev="EV2"))
    h.apply(routed("a" * 32))
    h.apply(started("b" * 32, ev="EV2"))
    assert len(h) == 2
    assert (present(h.get("a" * 32))["status"], present(h.get("b" * 32))["status"]) == (
        "routed",
        "charging",
    )


@given(st.integers(1, 20), st.lists(st.integers(0, 40), max_size=200))
def test_memory_stays_within_the_capacity_and_the_index_within_the_records(capacity, ns):
    h = history(capacity=capacity)
    for n in ns:
        rid = f"{n:032x}"
        h.accepted(request(rid, ev=f"EV{n % 7}", at=T0 + n))
        if n % 3 == 0:
            h.apply(completed(rid, ev=f"EV{n % 7}"))
        assert len(h) <= capacity
        for ev in range(7):
            holder = h.active_for(f"EV{ev}")
            if holder is not None:
                assert present(h.get(holder[0]))["status"] in ACTIVE_STATUSES


# ------------------------------------------------------------------------------ waiters
def test_the_waiter_is_set_by_the_routed_event_or_anything_that_ends_the_wait():
    for event in (routed(), started(), dead_lettered(), rejected(), cancelled()):
        h = history()
        waiter = h.expect(RID)
        h.accepted(request())
        assert not waiter.is_set()
        h.apply(event)
        assert waiter.is_set(), event


def test_a_forgotten_waiter_is_not_set():
    h = history()
    waiter = h.expect(RID)
    h.forget_waiter(RID)
    h.apply(routed())
    assert not waiter.is_set()
    h.forget_waiter(RID)


# ------------------------------------------------------------------------------ the stream
def as_stream(items) -> list[tuple[str, bytes]]:
    messages = []
    for item in items:
        if isinstance(item, contract.ChargeRequest):
            messages.append((contract.REQUEST_ROUTING_KEY, item.to_body()))
        else:
            messages.append((item.kind, contract.encode_events([item])))
    return messages


def test_a_stream_message_is_a_charge_request_or_a_batch_of_events():
    assert read_stream_message(contract.REQUEST_ROUTING_KEY, request().to_body()) == [request()]
    batch = contract.encode_events([routed(), routed(OTHER)])
    assert read_stream_message("request.routed", batch) == [routed(), routed(OTHER)]
    with pytest.raises(contract.InvalidMessage):
        read_stream_message("substation.unknown", b"{}")


def test_replaying_the_stream_skips_invalid_messages_and_says_why():
    h = history()
    skipped = h.replay(
        [
            (contract.REQUEST_ROUTING_KEY, b"not json"),
            *as_stream([request(), routed()]),
            ("request.routed", b'{"v": 1, "at": 1}'),
        ]
    )
    assert len(skipped) == 2 and "charge.request" in skipped[0]
    assert present(h.get(RID))["status"] == "routed"


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(st.sampled_from(list(SCENARIOS)), st.integers(0, 5)), min_size=1, max_size=12
    )
)
def test_a_gateway_that_replays_the_stream_answers_as_one_that_lived_through_it(lives):
    """Several requests' events interleaved as the stream holds them; a live gateway and one
    rebuilt by replay (after its restart) must answer the same for each."""
    items = []
    for index, (name, ev) in enumerate(lives):
        rid = f"{index:032x}"
        for item in SCENARIOS[name][0]:
            changes = {"request_id": rid, "ev_id": f"EV{ev}"}
            items.append(item.__class__(**{**item.__dict__, **changes}))
    live = history()
    feed(live, items)
    rebuilt = history()
    assert rebuilt.replay(as_stream(items)) == []
    for index, (_name, ev) in enumerate(lives):
        rid = f"{index:032x}"
        assert rebuilt.get(rid, "fleet-1") == live.get(rid, "fleet-1")
        assert rebuilt.active_for(f"EV{ev}") == live.active_for(f"EV{ev}")
