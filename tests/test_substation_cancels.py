"""A substation's part in cancellation: stop, drop before start, or remember."""

from __future__ import annotations

import pytest

from smartgrid import contract
from substation.cancels import CancelAction, CancelBook, cancelled

RID = "0123456789abcdef0123456789abcdef"


def routed_request() -> contract.RoutedRequest:
    return contract.RoutedRequest(
        request_id=RID, ev_id="EV1", accepted_at=1.0, substation="s1", routed_at=2.0, balancer="b"
    )


@pytest.mark.parametrize(
    "state, action",
    [
        ({"charging": True}, CancelAction.STOP_SESSION),
        ({"checking": True}, CancelAction.DROP_CHECK),
        ({"completed": True}, CancelAction.IGNORE),
        ({}, CancelAction.REMEMBER),
    ],
)
def test_what_a_cancel_does_depends_on_where_the_request_is(state, action):
    flags = {"charging": False, "checking": False, "completed": False} | state
    book = CancelBook()
    assert book.on_cancel_requested(RID, **flags) is action
    assert len(book) == (1 if action is CancelAction.REMEMBER else 0)


def test_a_remembered_cancel_stops_the_request_when_it_is_delivered_once():
    book = CancelBook()
    book.on_cancel_requested(RID, charging=False, checking=False, completed=False)
    assert book.on_delivery(RID) is True
    assert book.on_delivery(RID) is False  # a redelivery later is an ordinary duplicate
    assert book.on_delivery("f" * 32) is False


def test_the_book_is_bounded_oldest_first():
    book = CancelBook(remember=2)
    ids = [f"{n:032x}" for n in range(3)]
    for rid in ids:
        book.on_cancel_requested(rid, charging=False, checking=False, completed=False)
    assert len(book) == 2
    assert [book.on_delivery(rid) for rid in ids] == [False, True, True]


def test_a_restarted_substation_remembers_the_cancels_not_yet_obeyed():
    other = "f" * 32
    book = CancelBook()
    book.replay(
        [
            contract.CancelRequested(at=1.0, request_id=RID, ev_id="EV1"),
            contract.CancelRequested(at=1.0, request_id=other, ev_id="EV2"),
            contract.RequestCancelled(at=1.1, request_id=other, ev_id="EV2", source="b"),
            contract.BalancerStarted(at=1.2, balancer="b"),
        ]
    )
    assert book.on_delivery(RID) is True and book.on_delivery(other) is False


def test_the_cancelled_event_of_a_stopped_session_says_where_and_since_when():
    event = cancelled(routed_request(), instance="i-1", now=10.0, started_at=5.0)
    assert event == contract.RequestCancelled(
        at=10.0,
        request_id=RID,
        ev_id="EV1",
        source="s1",
        substation="s1",
        instance="i-1",
        started_at=5.0,
    )
    assert contract.decode_event(event.kind, event.to_body()) == event


def test_the_cancelled_event_of_a_request_that_never_started_has_no_start():
    assert cancelled(routed_request(), instance="i-1", now=10.0).started_at is None


def test_a_cancel_requested_long_before_an_attempt_was_accepted_was_for_an_earlier_one():
    # A key used again after the TTL derives the same request id: the old cancel is not
    # this attempt's.
    book = CancelBook()
    book.on_cancel_requested(RID, charging=False, checking=False, completed=False, at=1_000.0)
    assert book.on_delivery(RID, accepted_at=1_000.0 + 86_400) is False
    assert len(book) == 0
    book.on_cancel_requested(RID, charging=False, checking=False, completed=False, at=1_000.0)
    assert book.on_delivery(RID, accepted_at=999.0) is True
