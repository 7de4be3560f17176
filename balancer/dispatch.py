"""The balancer's dispatch policy: which pending requests wait, in what order, and what
follows a forward that the broker did not confirm. Pure: no broker, no clock.

Requests are placed in arrival order within their priority class. When the strategy places
none (no eligible substation, all full, or no path with power for its minimum), the request
and every later one of its class are held, unacknowledged, until something changes (a poll, a
power report, a completed session, an announcement, a limit); held requests are then released
by class, emergency first, then fleet and standard by weight, each with a guaranteed share
(balancer/priorities.py). The consumer's prefetch bounds how many are held, and the rest wait
in the pending queue.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from typing import Generic, TypeVar

from balancer.priorities import ReleaseScheduler, release
from smartgrid import contract
from smartgrid.amqp.errors import Unroutable
from smartgrid.power import CLASS_ORDER, Priority

#: Whatever the transport needs to settle a request later (the balancer's AMQP delivery).
Token = TypeVar("Token")
#: Where the strategy places a request (the chosen candidate).
Choice = TypeVar("Choice")

#: Pause before forwarding again a request whose copy the broker refused (a negative confirm).
RETRY_REFUSED_AFTER = 0.5


class HeldRequests(Generic[Token]):
    """Pending requests not yet forwarded: one queue per priority class, each in the order
    its requests are to be placed, released by class (:mod:`balancer.priorities`)."""

    def __init__(self, scheduler: ReleaseScheduler | None = None) -> None:
        self._scheduler = scheduler or ReleaseScheduler()
        self._held: dict[Priority, collections.deque[tuple[Token, contract.ChargeRequest]]] = {
            priority: collections.deque() for priority in CLASS_ORDER
        }

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._held.values())

    def count(self, priority: Priority) -> int:
        return len(self._held[priority])

    def arrived(self, token: Token, request: contract.ChargeRequest) -> None:
        """A new request takes its turn behind those of its class already held."""
        self._held[request.power().priority].append((token, request))

    def forward_failed(self, token: Token, request: contract.ChargeRequest) -> None:
        """A request whose forward failed goes first in its class: it has waited longest."""
        self._held[request.power().priority].appendleft((token, request))

    def place(
        self,
        choose: Callable[[contract.ChargeRequest], Choice | None],
        forward: Callable[[Token, contract.ChargeRequest, Choice], None],
    ) -> None:
        """Release held requests while some class's oldest one has a place: ``choose`` says
        where (None: nowhere now), ``forward`` sends it there. The class released next is the
        scheduler's pick among those whose oldest request has a place, so a request that fits
        nowhere holds back only the requests of its own class behind it."""
        chosen: dict[int, Choice] = {}

        def fits(item: tuple[Token, contract.ChargeRequest]) -> bool:
            choice = choose(item[1])
            if choice is None:
                return False
            chosen[id(item)] = choice
            return True

        def admit(item: tuple[Token, contract.ChargeRequest]) -> None:
            choice = chosen.pop(id(item))
            chosen.clear()  # made for the grid before this one: chosen again next round
            forward(item[0], item[1], choice)

        release(self._scheduler, self._held, fits, admit)

    def take(self, request_id: str) -> tuple[Token, contract.ChargeRequest] | None:
        """Take a held request out of turn (it was cancelled), if it is held."""
        for queue in self._held.values():
            for index, (token, request) in enumerate(queue):
                if request.request_id == request_id:
                    del queue[index]
                    return token, request
        return None

    def clear(self) -> None:
        """The connection the requests came on is gone; the broker requeues them itself."""
        for queue in self._held.values():
            queue.clear()


class AfterFailedForward(enum.Enum):
    #: The substation has no queue (deleted, or never declared): stop routing there until it
    #: is polled again, and place the request elsewhere now.
    ROUTE_ELSEWHERE = "route elsewhere"
    #: The connection is lost: the broker returns the pending request to its queue by itself.
    LET_THE_BROKER_REQUEUE = "let the broker requeue"
    #: The broker refused the copy (a substation queue without a leader for a moment, an
    #: internal error). That is no fault of the request: hold it and try again after
    #: RETRY_REFUSED_AFTER. Rejecting it would have it redelivered at once and, within
    #: milliseconds, burn the delivery limit that is meant for poison messages.
    RETRY_LATER = "retry later"


def after_failed_forward(error: BaseException, *, still_settleable: bool) -> AfterFailedForward:
    """What to do with a request whose forward failed with ``error``; ``still_settleable``:
    its delivery came on the channel that is open now."""
    if isinstance(error, Unroutable):
        return AfterFailedForward.ROUTE_ELSEWHERE
    if not still_settleable:
        return AfterFailedForward.LET_THE_BROKER_REQUEUE
    return AfterFailedForward.RETRY_LATER
