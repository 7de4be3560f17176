"""The balancer's dispatch policy, without a broker: held requests and failed forwards."""

from __future__ import annotations

import pytest

from balancer.dispatch import AfterFailedForward, HeldRequests, after_failed_forward
from smartgrid import contract
from smartgrid.amqp.errors import (
    ConnectionLost,
    LinkClosed,
    NotConnected,
    PublishRejected,
    Unroutable,
)


def request(n: int) -> contract.ChargeRequest:
    return contract.ChargeRequest(f"{n:032x}", f"EV{n}", float(n))


def placing(capacity: int, placed: list[str]):
    """A strategy stand-in that places ``capacity`` requests, then holds."""

    def place(token: str, _request: contract.ChargeRequest) -> bool:
        if len(placed) >= capacity:
            return False
        placed.append(token)
        return True

    return place


def test_requests_are_placed_in_arrival_order_until_one_is_held():
    held: HeldRequests[str] = HeldRequests()
    for n in range(5):
        held.arrived(f"d{n}", request(n))
    placed: list[str] = []
    held.place(placing(3, placed))
    assert placed == ["d0", "d1", "d2"]
    assert len(held) == 2


def test_a_held_request_is_offered_again_first_and_later_arrivals_wait_behind_it():
    held: HeldRequests[str] = HeldRequests()
    held.arrived("d0", request(0))
    held.place(placing(0, []))  # all full: d0 is held
    held.arrived("d1", request(1))
    placed: list[str] = []
    held.place(placing(10, placed))
    assert placed == ["d0", "d1"] and len(held) == 0


def test_a_request_whose_forward_failed_goes_before_those_still_waiting():
    held: HeldRequests[str] = HeldRequests()
    held.arrived("later", request(1))
    held.forward_failed("failed", request(0))
    placed: list[str] = []
    held.place(placing(10, placed))
    assert placed == ["failed", "later"]


def test_the_held_requests_are_forgotten_with_their_connection():
    held: HeldRequests[str] = HeldRequests()
    held.arrived("d0", request(0))
    held.clear()
    placed: list[str] = []
    held.place(placing(10, placed))
    assert placed == [] and len(held) == 0


@pytest.mark.parametrize("settleable", [True, False])
def test_a_substation_without_a_queue_means_route_the_request_elsewhere(settleable):
    assert (
        after_failed_forward(Unroutable("no queue"), still_settleable=settleable)
        is AfterFailedForward.ROUTE_ELSEWHERE
    )


@pytest.mark.parametrize("error", [ConnectionLost("x"), NotConnected("x"), LinkClosed("x")])
def test_a_forward_lost_with_its_connection_is_left_to_the_broker_to_requeue(error):
    assert (
        after_failed_forward(error, still_settleable=False)
        is AfterFailedForward.LET_THE_BROKER_REQUEUE
    )


@pytest.mark.parametrize("error", [PublishRejected("nack"), NotConnected("x")])
def test_a_refused_forward_on_a_live_channel_is_retried_later_not_rejected(error):
    assert after_failed_forward(error, still_settleable=True) is AfterFailedForward.RETRY_LATER
