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
from smartgrid.power import CLASS_ORDER, Priority


def request(n: int, priority: str | None = None) -> contract.ChargeRequest:
    return contract.ChargeRequest(f"{n:032x}", f"EV{n}", float(n), priority=priority)


class Placing:
    """A strategy stand-in with ``capacity`` places (or one per class in ``per_class``)."""

    def __init__(self, capacity: int = 10, per_class: dict[str, int] | None = None) -> None:
        self.capacity = capacity
        self.per_class = per_class
        self.placed: list[str] = []
        self._by_class: dict[str, int] = {}

    def choose(self, request: contract.ChargeRequest) -> str | None:
        priority = request.power().priority.value
        if self.per_class is not None:
            return (
                "s1" if self._by_class.get(priority, 0) < self.per_class.get(priority, 0) else None
            )
        return "s1" if len(self.placed) < self.capacity else None

    def forward(self, token: str, request: contract.ChargeRequest, choice: str) -> None:
        assert choice == "s1"
        priority = request.power().priority.value
        self._by_class[priority] = self._by_class.get(priority, 0) + 1
        self.placed.append(token)


def place(held: HeldRequests[str], placing: Placing) -> list[str]:
    held.place(placing.choose, placing.forward)
    return placing.placed


def test_requests_are_placed_in_arrival_order_until_one_is_held() -> None:
    held: HeldRequests[str] = HeldRequests()
    for n in range(5):
        held.arrived(f"d{n}", request(n))
    assert place(held, Placing(3)) == ["d0", "d1", "d2"]
    assert len(held) == 2


def test_a_held_request_is_offered_again_first_and_later_arrivals_wait_behind_it() -> None:
    held: HeldRequests[str] = HeldRequests()
    held.arrived("d0", request(0))
    assert place(held, Placing(0)) == []  # all full: d0 is held
    held.arrived("d1", request(1))
    assert place(held, Placing(10)) == ["d0", "d1"] and len(held) == 0


def test_a_request_whose_forward_failed_goes_before_those_still_waiting() -> None:
    held: HeldRequests[str] = HeldRequests()
    held.arrived("later", request(1))
    held.forward_failed("failed", request(0))
    assert place(held, Placing(10)) == ["failed", "later"]


def test_the_held_requests_are_forgotten_with_their_connection() -> None:
    held: HeldRequests[str] = HeldRequests()
    held.arrived("d0", request(0))
    held.clear()
    assert place(held, Placing(10)) == [] and len(held) == 0


def test_held_requests_are_released_emergency_first_then_fleet_before_standard() -> None:
    held: HeldRequests[str] = HeldRequests()
    for n, priority in enumerate(["standard", "fleet", "standard", "emergency", "fleet"]):
        held.arrived(f"{priority}-{n}", request(n, priority))
    assert [held.count(p) for p in CLASS_ORDER] == [1, 2, 2]
    placed = place(held, Placing(3))
    assert placed[0] == "emergency-3"
    assert set(placed[1:]) <= {"fleet-1", "fleet-4", "standard-0"}
    assert len(held) == 2


def test_a_request_that_fits_nowhere_holds_back_only_its_own_class() -> None:
    held: HeldRequests[str] = HeldRequests()
    held.arrived("big-standard", request(0, "standard"))
    held.arrived("small-standard", request(1, "standard"))
    held.arrived("fleet", request(2, "fleet"))
    # Standard requests have no place (their head waits for power); fleet goes on.
    assert place(held, Placing(per_class={"fleet": 1})) == ["fleet"]
    assert held.count(Priority.STANDARD) == 2


def test_a_held_request_can_be_taken_out_of_turn() -> None:
    held: HeldRequests[str] = HeldRequests()
    held.arrived("a", request(0, "fleet"))
    held.arrived("b", request(1))
    taken = held.take(request(1).request_id)
    assert taken is not None and taken[0] == "b"
    assert held.take("nobody") is None and len(held) == 1


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
