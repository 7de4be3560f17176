"""Where each request stands, learned from the lifecycle events, for ``GET /charge/<id>``.

Every gateway process subscribes to the events itself, so any replica can answer for any
request, whichever one accepted it. Events from different services can arrive out of order
(a session may start before the balancer's ``request.routed`` arrives), so a record only ever
moves forward. Records are kept for the most recent requests only (a bounded LRU).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import asdict, dataclass

from smartgrid import contract

#: Status order: a record never moves back.
STATUSES = ("queued", "routed", "charging", "completed")
TERMINAL = "dead_lettered"


@dataclass
class RequestRecord:
    request_id: str
    ev_id: str | None = None
    status: str = "queued"
    substation: str | None = None
    accepted_at: float | None = None
    routed_at: float | None = None
    started_at: float | None = None
    expected_end: float | None = None
    completed_at: float | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def advance(self, status: str) -> None:
        if self.status == TERMINAL:
            return
        if status == TERMINAL or STATUSES.index(status) > STATUSES.index(self.status):
            self.status = status


class RequestTracker:
    def __init__(self, capacity: int = 100_000):
        self._capacity = capacity
        self._records: collections.OrderedDict[str, RequestRecord] = collections.OrderedDict()
        self._routed_waiters: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def _record(self, request_id: str) -> RequestRecord:
        record = self._records.get(request_id)
        if record is None:
            record = self._records[request_id] = RequestRecord(request_id)
            if len(self._records) > self._capacity:
                self._records.popitem(last=False)
        return record

    def get(self, request_id: str) -> dict | None:
        with self._lock:
            record = self._records.get(request_id)
            return None if record is None else record.to_json()

    def expect(self, request_id: str) -> threading.Event:
        """Register interest in the routing decision before publishing, so it cannot be missed."""
        event = threading.Event()
        with self._lock:
            self._routed_waiters[request_id] = event
        return event

    def forget_waiter(self, request_id: str) -> None:
        with self._lock:
            self._routed_waiters.pop(request_id, None)

    def accepted(self, request: contract.ChargeRequest) -> None:
        with self._lock:
            record = self._record(request.request_id)
            record.ev_id = request.ev_id
            record.accepted_at = request.accepted_at

    def apply(self, event: contract.Event) -> None:
        request_id = getattr(event, "request_id", None)
        if request_id is None:
            return
        with self._lock:
            record = self._record(request_id)
            record.ev_id = record.ev_id or getattr(event, "ev_id", None)
            if isinstance(event, contract.RequestAccepted):
                record.accepted_at = event.at
            elif isinstance(event, contract.RequestRouted):
                record.substation = event.substation
                record.routed_at = event.at
                record.advance("routed")
            elif isinstance(event, contract.SessionStarted):
                record.substation = event.substation
                record.started_at = event.at
                record.expected_end = event.expected_end
                record.advance("charging")
            elif isinstance(event, contract.SessionCompleted):
                record.substation = event.substation
                record.completed_at = event.at
                record.advance("completed")
            elif isinstance(event, contract.RequestDeadLettered):
                record.reason = event.reason
                record.advance(TERMINAL)
            if record.substation is not None or record.status == TERMINAL:
                waiter = self._routed_waiters.pop(request_id, None)
                if waiter is not None:
                    waiter.set()
