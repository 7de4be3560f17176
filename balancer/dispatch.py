"""The balancer's dispatch policy: which pending requests wait, in what order, and what
follows a forward that the broker did not confirm. Pure: no broker, no clock.

Requests are placed in arrival order. When the strategy places none (no eligible substation,
or all full), the request and every later one are held, unacknowledged, until something
changes (a poll, a completed session, an announcement); the consumer's prefetch bounds how
many are held, and the rest wait in the pending queue.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from typing import Generic, TypeVar

from smartgrid import contract
from smartgrid.amqp.errors import Unroutable

#: Whatever the transport needs to settle a request later (the balancer's AMQP delivery).
Token = TypeVar("Token")

#: Pause before forwarding again a request whose copy the broker refused (a negative confirm).
RETRY_REFUSED_AFTER = 0.5


class HeldRequests(Generic[Token]):
    """Pending requests not yet forwarded, in the order they are to be placed."""

    def __init__(self) -> None:
        self._held: collections.deque[tuple[Token, contract.ChargeRequest]] = collections.deque()

    def __len__(self) -> int:
        return len(self._held)

    def arrived(self, token: Token, request: contract.ChargeRequest) -> None:
        """A new request takes its turn behind those already held."""
        self._held.append((token, request))

    def forward_failed(self, token: Token, request: contract.ChargeRequest) -> None:
        """A request whose forward failed goes first: it has waited longest."""
        self._held.appendleft((token, request))

    def place(self, place: Callable[[Token, contract.ChargeRequest], bool]) -> None:
        """Offer the held requests to ``place`` in order, until it holds one (returns False)."""
        while self._held:
            token, request = self._held[0]
            if not place(token, request):
                return
            self._held.popleft()

    def clear(self) -> None:
        """The connection the requests came on is gone; the broker requeues them itself."""
        self._held.clear()


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
