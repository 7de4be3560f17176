"""What a service published about each request, to publish again when a gateway asks.

A gateway that doubts the history (gateway/doubts.py) publishes ``request.status_requested``;
the balancer and the substations answer from a :class:`Told`: the very events they published
about that request, so that every reader takes them as the copies they are (the loadgen ledger
and the history compare them whole). A request that has ended is told by its end alone: its
start again would tell a balancer that a finished session draws power. Pure; bounded by count.
"""

from __future__ import annotations

import collections

from smartgrid import contract

#: Events that end a request: once one is told, only it is told again.
ENDINGS = (
    contract.SessionCompleted,
    contract.RequestCancelled,
    contract.RequestRejected,
    contract.RequestDeadLettered,
)

#: A request is told again at most this often, however many gateway workers ask.
RETELL_INTERVAL = 5.0

#: Requests whose events are kept: about 9 MB in a substation (measured with tracemalloc, a
#: completion each), minutes of traffic at a substation's rates, where a gateway's doubt comes
#: 30 to 45 s after a request stood still.
REMEMBER = 20_000


class Told:
    """I/O thread only."""

    def __init__(self, *, remember: int = REMEMBER, retell_interval: float = RETELL_INTERVAL):
        self.remember = remember
        self.retell_interval = retell_interval
        #: request id -> the events told of it, oldest first.
        self._events: collections.OrderedDict[str, list[contract.Event]] = collections.OrderedDict()
        self._retold_at: dict[str, float] = {}

    def told(self, event: contract.Event) -> None:
        request_id: str | None = getattr(event, "request_id", None)
        if request_id is None:
            return
        events = self._events.setdefault(request_id, [])
        if isinstance(event, ENDINGS):
            events[:] = [event]
        elif event not in events:
            events.append(event)
        self._events.move_to_end(request_id)
        while len(self._events) > self.remember:
            oldest, _ = self._events.popitem(last=False)
            self._retold_at.pop(oldest, None)

    def again(self, request_id: str, now: float) -> list[contract.Event]:
        """What to publish again for a gateway that asked about ``request_id`` (nothing if it
        was told again less than ``retell_interval`` ago, or is not known here)."""
        events = self._events.get(request_id)
        if not events or now - self._retold_at.get(request_id, -1e18) < self.retell_interval:
            return []
        self._retold_at[request_id] = now
        if len(self._retold_at) > self.remember:
            self._retold_at.pop(next(iter(self._retold_at)))
        return list(events)

    def __len__(self) -> int:
        return len(self._events)
