"""The balancer's ledger: one active request per EV end to end, whoever accepted them."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from balancer.ledger import EvLedger, Verdict
from smartgrid import contract

A, B, C = "a" * 32, "b" * 32, "c" * 32
T0 = 1_000_000.0


def req(rid=A, ev="EV1", at=T0, rerouted_from=None):
    return contract.ChargeRequest(
        request_id=rid, ev_id=ev, accepted_at=at, rerouted_from=rerouted_from
    )


def routed(rid=A, ev="EV1", at=T0 + 1):
    return contract.RequestRouted(at=at, request_id=rid, ev_id=ev, substation="s1", balancer="b")


def started(rid=A, ev="EV1"):
    return contract.SessionStarted(
        at=T0 + 2,
        request_id=rid,
        ev_id=ev,
        substation="s1",
        instance="i",
        accepted_at=T0,
        expected_end=T0 + 32,
    )


def completed(rid=A, ev="EV1"):
    return contract.SessionCompleted(
        at=T0 + 32, request_id=rid, ev_id=ev, substation="s1", instance="i", started_at=T0 + 2
    )


def cancel_requested(rid=A, ev="EV1"):
    return contract.CancelRequested(at=T0 + 3, request_id=rid, ev_id=ev)


def rejected(rid=B, reason=contract.REJECTED_EV_BUSY):
    return contract.RequestRejected(
        at=T0 + 1,
        request_id=rid,
        ev_id="EV1",
        reason=reason,
        detail="d",
        source="b",
        accepted_at=T0,
    )


# ------------------------------------------------------------------------------ the race
def test_two_requests_for_one_ev_the_first_to_arrive_wins_the_other_is_rejected_naming_it():
    ledger = EvLedger()
    assert ledger.decide(req(A)).verdict is Verdict.ROUTE
    decision = ledger.decide(req(B, at=T0 - 1))  # accepted earlier elsewhere, arrived later
    assert decision.verdict is Verdict.REJECT and decision.active_request_id == A
    assert ledger.holder("EV1") == A


def test_requests_for_different_evs_do_not_interfere():
    ledger = EvLedger()
    assert ledger.decide(req(A, "EV1")).verdict is Verdict.ROUTE
    assert ledger.decide(req(B, "EV2")).verdict is Verdict.ROUTE


@pytest.mark.parametrize(
    "ending",
    [completed, lambda: contract.RequestCancelled(at=T0, request_id=A, ev_id="EV1", source="s1")],
)
def test_the_ev_is_free_once_its_request_ended(ending):
    ledger = EvLedger()
    ledger.decide(req(A))
    ledger.forwarded(A)
    ledger.apply(ending())
    assert ledger.holder("EV1") is None
    assert ledger.decide(req(B, at=T0 + 40)).verdict is Verdict.ROUTE


def test_a_dead_lettered_request_frees_its_ev():
    ledger = EvLedger()
    ledger.decide(req(A))
    ledger.apply(contract.RequestDeadLettered(at=T0, reason="x", source="q", request_id=A))
    assert ledger.holder("EV1") is None


# ------------------------------------------------------------------------------ copies
def test_a_second_copy_of_a_held_request_is_a_duplicate():
    ledger = EvLedger()
    ledger.decide(req(A))
    assert ledger.decide(req(A)).verdict is Verdict.DUPLICATE


def test_a_redelivered_request_that_was_forwarded_before_is_a_duplicate():
    ledger = EvLedger()
    ledger.apply(routed(A))  # the balancer forwarded it, and died before acknowledging
    assert ledger.decide(req(A)).verdict is Verdict.DUPLICATE


def test_a_request_rerouted_off_a_dead_substation_is_routed_again_and_keeps_its_ev():
    ledger = EvLedger()
    ledger.decide(req(A))
    ledger.forwarded(A)
    assert ledger.decide(req(A, rerouted_from="s1")).verdict is Verdict.ROUTE
    assert ledger.holder("EV1") == A
    assert ledger.decide(req(B)).verdict is Verdict.REJECT


def test_a_copy_of_an_ended_request_within_the_ttl_is_a_duplicate_and_after_it_a_new_request():
    ledger = EvLedger(idempotency_ttl=3600)
    ledger.decide(req(A))
    ledger.forwarded(A)
    ledger.apply(completed(A))
    assert ledger.decide(req(A, at=T0 + 100)).verdict is Verdict.DUPLICATE
    assert ledger.decide(req(A, at=T0 + 3600)).verdict is Verdict.ROUTE  # the key used again


def test_a_redelivered_loser_is_a_duplicate_not_rejected_twice():
    ledger = EvLedger()
    ledger.decide(req(A))
    assert ledger.decide(req(B)).verdict is Verdict.REJECT
    assert ledger.decide(req(B)).verdict is Verdict.DUPLICATE


def test_held_requests_are_forgotten_with_their_channel_and_decided_again():
    ledger = EvLedger()
    ledger.decide(req(A))
    ledger.decide(req(C, "EV2"))
    ledger.forwarded(C)
    ledger.forget_held()
    assert ledger.holder("EV1") is None and ledger.holder("EV2") == C
    assert ledger.decide(req(A)).verdict is Verdict.ROUTE


def test_a_failed_forward_keeps_the_ev():
    ledger = EvLedger()
    ledger.decide(req(A))
    ledger.forward_failed(A)
    assert ledger.state(A) == "held" and ledger.holder("EV1") == A


def test_the_gateways_provisional_rejection_does_not_bind_the_balancer():
    ledger = EvLedger()
    ledger.apply(rejected(A, reason=contract.REJECTED_NOT_ENQUEUED))
    assert ledger.decide(req(A)).verdict is Verdict.ROUTE


# ------------------------------------------------------------------------------ cancellation
def test_a_cancel_for_a_held_request_is_the_balancers_to_obey():
    ledger = EvLedger()
    ledger.decide(req(A))
    assert ledger.cancel_requested(cancel_requested(A)) is True
    ledger.cancelled_here(A)
    assert ledger.holder("EV1") is None
    assert ledger.decide(req(A)).verdict is Verdict.DUPLICATE


def test_a_cancel_for_a_request_still_in_the_pending_queue_cancels_it_on_arrival():
    ledger = EvLedger()
    assert ledger.cancel_requested(cancel_requested(A)) is False
    assert ledger.decide(req(A)).verdict is Verdict.CANCEL
    assert ledger.holder("EV1") is None
    assert ledger.decide(req(A)).verdict is Verdict.DUPLICATE


@pytest.mark.parametrize("progress", [routed, started])
def test_a_cancel_for_a_forwarded_request_is_the_substations(progress):
    ledger = EvLedger()
    ledger.decide(req(A))
    ledger.apply(progress(A))
    assert ledger.cancel_requested(cancel_requested(A)) is False
    assert ledger.holder("EV1") == A  # until the substation says request.cancelled


def test_a_cancel_for_an_ended_request_is_ignored():
    ledger = EvLedger()
    ledger.apply(completed(A))
    assert ledger.cancel_requested(cancel_requested(A)) is False
    assert ledger.decide(req(A)).verdict is Verdict.DUPLICATE


def test_remembered_cancels_are_bounded():
    ledger = EvLedger(remember=2)
    for rid in (A, B, C):
        ledger.cancel_requested(cancel_requested(rid))
    assert ledger.decide(req(A)).verdict is Verdict.ROUTE  # the oldest was forgotten
    assert ledger.decide(req(C, "EV3")).verdict is Verdict.CANCEL


# ------------------------------------------------------------------------------ properties
RIDS = [f"{n:032x}" for n in range(6)]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(RIDS)),
        st.tuples(st.just("confirm"), st.sampled_from(RIDS)),
        st.tuples(st.just("complete"), st.sampled_from(RIDS)),
        st.tuples(st.just("cancel"), st.sampled_from(RIDS)),
        st.tuples(st.just("reroute"), st.sampled_from(RIDS)),
        st.tuples(st.just("channel_lost"), st.just("")),
        st.tuples(st.just("takeover"), st.just("")),
    ),
    max_size=60,
)


def ev_of(rid: str) -> str:
    return f"EV{int(rid, 16) % 2}"  # six requests, two cars: plenty of races


@settings(max_examples=400)
@example([("arrive", RIDS[0]), ("confirm", RIDS[0]), ("arrive", RIDS[2]), ("takeover", ""),
          ("arrive", RIDS[0]), ("arrive", RIDS[2]), ("reroute", RIDS[0]), ("confirm", RIDS[0]),
          ("cancel", RIDS[0]), ("arrive", RIDS[0])])  # fmt: skip
@given(OPS)
def test_whatever_arrives_in_whatever_order_no_ev_ever_charges_twice_at_once(
    ops: list[tuple[str, str]],
) -> None:
    """A model of the balancer around the ledger: copies arrive from the pending queue (two
    gateways, repeats, redeliveries), forwards are confirmed, sessions start and end, cancels
    come, the channel goes, another balancer takes over by replaying the stream. At no point
    may one EV have two sessions, and no request runs twice."""
    ledger = EvLedger()
    stream: list[contract.Event] = []  # what the history stream holds
    held: set[str] = set()
    sessions: dict[str, str] = {}  # rid -> ev, running now
    ran: list[str] = []
    lost: set[str] = set()

    def publish(event):
        stream.append(event)
        ledger.apply(event)

    for op, rid in ops:
        if op in ("arrive", "reroute"):
            if op == "reroute" and rid not in sessions:
                continue
            if op == "reroute":  # the substation died with it: the session is gone
                del sessions[rid]
                lost.add(rid)
            decision = ledger.decide(
                req(rid, ev_of(rid), rerouted_from="s" if op == "reroute" else None)
            )
            if decision.verdict is Verdict.ROUTE:
                held.add(rid)
            elif decision.verdict is Verdict.REJECT:
                assert decision.active_request_id != rid
                publish(
                    contract.RequestRejected(
                        at=T0, request_id=rid, ev_id=ev_of(rid), reason="ev_busy", detail="",
                        source="b", accepted_at=T0, active_request_id=decision.active_request_id,
                    )
                )  # fmt: skip
            elif decision.verdict is Verdict.CANCEL:
                publish(
                    contract.RequestCancelled(at=T0, request_id=rid, ev_id=ev_of(rid), source="b")
                )
        elif op == "confirm" and rid in held:
            held.discard(rid)
            ledger.forwarded(rid)
            publish(routed(rid, ev_of(rid)))
            sessions[rid] = ev_of(rid)
            ran.append(rid)
            publish(started(rid, ev_of(rid)))
        elif op == "complete" and rid in sessions:
            del sessions[rid]
            publish(completed(rid, ev_of(rid)))
        elif op == "cancel":
            event = cancel_requested(rid, ev_of(rid))
            stream.append(event)
            if ledger.cancel_requested(event):
                held.discard(rid)
                ledger.cancelled_here(rid)
                publish(
                    contract.RequestCancelled(at=T0, request_id=rid, ev_id=ev_of(rid), source="b")
                )
            elif rid in sessions:  # the substation obeys
                del sessions[rid]
                publish(
                    contract.RequestCancelled(
                        at=T0, request_id=rid, ev_id=ev_of(rid), source="s1", started_at=T0
                    )
                )
        elif op == "channel_lost":
            held.clear()
            ledger.forget_held()
        elif op == "takeover":
            held.clear()
            ledger = EvLedger()
            for event in stream:
                ledger.apply(event)
        evs = list(sessions.values()) + [ev_of(r) for r in held]
        assert len(evs) == len(set(evs)), (sessions, held)
    # A request runs again only when the substation running it died (rerouted).
    assert {r for r in ran if ran.count(r) > 1} <= lost, ran
