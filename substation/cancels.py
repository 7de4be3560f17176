"""What a substation does with ``request.cancel_requested``: stop a session, drop a request
before it starts, or remember the cancel for a request still on its way.

Every substation hears every cancel (they are rare); only the one that holds the request acts.
A request waits in a substation's queue beyond its prefetch, where the substation cannot see
it, so a cancel for a request not here yet is remembered (bounded) and obeyed on delivery. A
substation that restarts replays the recent cancels from the history stream into its book.
Whatever it does, it publishes ``request.cancelled`` once, and acknowledges the delivery after
that event is confirmed, as it does for ``session.completed``.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable

from smartgrid import contract


class CancelAction(enum.Enum):
    #: Charging here: cancel its timer, free its point (within the second), publish
    #: request.cancelled with started_at, acknowledge once confirmed.
    STOP_SESSION = "stop_session"
    #: A possible duplicate being checked with the other substations: cancel the check, publish
    #: request.cancelled (never started), acknowledge once confirmed.
    DROP_CHECK = "drop_check"
    #: Not delivered here (yet): cancel it if it is.
    REMEMBER = "remember"
    #: It completed here already: too late, nothing to do.
    IGNORE = "ignore"


#: Events after which a remembered cancel has nothing left to do.
_ENDINGS = (
    contract.RequestCancelled,
    contract.SessionCompleted,
    contract.RequestRejected,
    contract.RequestDeadLettered,
)


#: A cancel requested this long before a delivered request was accepted was for an earlier
#: attempt of its id (a key used again after IDEMPOTENCY_TTL), not for this one. Attempts of
#: one id are a TTL apart; the margin only covers the gateways' clocks disagreeing.
STALE_MARGIN = 300.0


class CancelBook:
    """Cancels heard and not yet obeyed; I/O thread only."""

    def __init__(self, *, remember: int = 50_000):
        self._remember = remember
        #: Request id -> when its cancel was requested (None: not known).
        self._pending: collections.OrderedDict[str, float | None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def on_cancel_requested(
        self,
        request_id: str,
        *,
        charging: bool,
        checking: bool,
        completed: bool,
        at: float | None = None,
    ) -> CancelAction:
        """What to do with a cancel requested ``at`` for a request that is ``charging`` here,
        being ``checking``-ed as a possible duplicate, or ``completed`` here already."""
        if charging:
            return CancelAction.STOP_SESSION
        if checking:
            return CancelAction.DROP_CHECK
        if completed:
            return CancelAction.IGNORE
        self._pending[request_id] = at
        self._pending.move_to_end(request_id)
        if len(self._pending) > self._remember:
            self._pending.popitem(last=False)
        return CancelAction.REMEMBER

    def on_delivery(self, request_id: str, accepted_at: float | None = None) -> bool:
        """Whether a delivered request (accepted at ``accepted_at``) was cancelled before it
        started (then: do not charge it; publish request.cancelled and acknowledge it). A
        cancel requested well before the request was accepted was for an earlier attempt."""
        if request_id not in self._pending:
            return False
        at = self._pending.pop(request_id)
        return at is None or accepted_at is None or at >= accepted_at - STALE_MARGIN

    def replay(self, events: Iterable[contract.Event]) -> None:
        """Recent events from the history stream, at start: cancels not yet obeyed anywhere."""
        for event in events:
            if isinstance(event, contract.CancelRequested):
                self.on_cancel_requested(
                    event.request_id, charging=False, checking=False, completed=False, at=event.at
                )
            elif isinstance(event, _ENDINGS) and event.request_id is not None:
                self._pending.pop(event.request_id, None)


def cancelled(
    request: contract.RoutedRequest,
    *,
    instance: str,
    now: float,
    started_at: float | None = None,
) -> contract.RequestCancelled:
    """The event a substation publishes for a request it cancelled (started or not)."""
    return contract.RequestCancelled(
        at=now,
        request_id=request.request_id,
        ev_id=request.ev_id,
        source=request.substation,
        substation=request.substation,
        instance=instance,
        started_at=started_at,
    )
