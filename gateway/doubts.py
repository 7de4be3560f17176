"""What a gateway doubts in the history, and when it asks again: pure, no I/O.

The history stream is what every gateway answers from, and a RabbitMQ stream can lose messages
it has confirmed when the node of its leader fails (rabbitmq-server#9457; seen here with a
cluster node killed mid-load: requests answered 404 by one worker, others left "routed" or
"charging" for good). The pending and substation queues (quorum queues) lose nothing, and the
balancer and the substations remember what they published, so the history is repaired from
them, on doubt:

* **A request this worker accepted that its reader never read back** (:meth:`Doubts.accepted`,
  :meth:`Doubts.copy_read`): after ``copy_after`` seconds the request is sent again to the
  stream alone (``contract.REQUEST_COPY_ROUTING_KEY``), until a copy is read.
* **An active request that stands still**: no word of it for ``check_after`` seconds (counted
  from its expected end while it charges) makes the gateway publish ``request.status_requested``;
  whoever decided or ran it publishes its events again (the same events: readers take them as
  copies). Asked again at doubling intervals up to ``max_interval`` while nothing moves; a
  request queued for a long time (held for power) costs one small message per interval.

Each worker of each gateway doubts on its own; the first ask of each is spread over half an
interval, so that they do not all ask at once.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from smartgrid import contract

#: Seconds after its accept that a request not read back from the stream is sent again.
COPY_AFTER = 15.0
#: Seconds without a word of an active request (after its expected end, while charging)
#: before its status is asked for; then twice as long each time, up to MAX_INTERVAL.
CHECK_AFTER = 30.0
MAX_INTERVAL = 600.0


@dataclass(frozen=True)
class Due:
    """What to publish now: copies of requests, and status requests (by request id)."""

    copies: list[contract.ChargeRequest]
    status_requests: list[str]


class Doubts:
    """Thread-safe: HTTP threads report accepts, the I/O thread the rest."""

    def __init__(
        self,
        *,
        copy_after: float = COPY_AFTER,
        check_after: float = CHECK_AFTER,
        max_interval: float = MAX_INTERVAL,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.copy_after = copy_after
        self.check_after = check_after
        self.max_interval = max_interval
        self._rng = rng
        self._lock = threading.Lock()
        #: Accepted here, not read back yet: request id -> (request, when to send it again,
        #: the interval after that).
        self._unread: dict[str, tuple[contract.ChargeRequest, float, float]] = {}
        #: Active requests: id -> (when to ask, the interval after that). A dict assignment
        #: per move, and a scan of the active ones per look (:meth:`due`, every few seconds):
        #: cheaper than keeping them in order, for the many moves of every request.
        self._active: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ copies
    def accepted(self, request: contract.ChargeRequest, now: float) -> None:
        """``request`` was confirmed by the broker for this worker."""
        with self._lock:
            self._unread[request.request_id] = (request, now + self.copy_after, self.copy_after)

    def copy_read(self, request_id: str) -> None:
        """The reader read a copy of ``request_id`` from the stream."""
        with self._lock:
            self._unread.pop(request_id, None)

    # ------------------------------------------------------------------ standing still
    def moved(self, request_id: str, *, active: bool, now: float, quiet_from: float) -> None:
        """Word of ``request_id``: it is ``active`` (or final: no more doubts); it is expected
        to be quiet until ``quiet_from`` (its expected end while it charges, else ``now``)."""
        with self._lock:
            if not active:
                self._active.pop(request_id, None)
                return
            interval = self.check_after
            due = max(now, quiet_from) + interval * (1 + 0.5 * self._rng())
            self._active[request_id] = (due, interval)

    def forget(self, request_id: str) -> None:
        """The history no longer holds it (evicted)."""
        with self._lock:
            self._active.pop(request_id, None)
            self._unread.pop(request_id, None)

    # ------------------------------------------------------------------ what is due
    def due(self, now: float) -> Due:
        with self._lock:
            copies = []
            for request_id, (request, at, interval) in list(self._unread.items()):
                if at <= now:
                    copies.append(request)
                    self._unread[request_id] = (request, *self._again(now, interval))
            asks = [request_id for request_id, (due, _) in self._active.items() if due <= now]
            for request_id in asks:
                self._active[request_id] = self._again(now, self._active[request_id][1])
            return Due(copies, asks)

    def _again(self, now: float, interval: float) -> tuple[float, float]:
        """When to look again after ``interval`` ran out at ``now``: twice as long, at most
        ``max_interval``; that time and the new interval."""
        longer = min(2 * interval, self.max_interval)
        return now + longer, longer

    def __len__(self) -> int:
        with self._lock:
            return len(self._active) + len(self._unread)
