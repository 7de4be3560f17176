"""The history of requests: where each stands, whose it is, which EV it holds.

Fed by the history stream (``contract.HISTORY_STREAM``: every charge request and every event
that changes a request's status, in order) and by the gateway's own accepts, so that every
replica, started at any time, answers the same for any request still in the retention window:
``GET /charge/<id>``, the one-active-request-per-EV check, and what a repeat of an
Idempotency-Key gets (the request record *is* the idempotency record: its id is derived from
(client, key), and it keeps the body fingerprint).

A record only ever moves forward, whatever order the events arrive in: queued, routed,
charging, then one final status (completed, cancelled, rejected, dead_lettered), and the first
final status wins. One exception: a rejection ``not_enqueued`` (the gateway's own, after the
broker refused to confirm the request) is provisional. Evidence that the request was enqueued
after all (it was routed, it started) overrides it, and a repeat of its Idempotency-Key starts
a new attempt (a later ``accepted_at``) of the same request id.

Memory is bounded by count (``capacity``) and by age (``max_age``), oldest first.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.doubts import Doubts
from smartgrid import contract

QUEUED, ROUTED, CHARGING = "queued", "routed", "charging"
COMPLETED, CANCELLED, REJECTED, DEAD_LETTERED = (
    "completed",
    "cancelled",
    "rejected",
    "dead_lettered",
)
ACTIVE_STATUSES = (QUEUED, ROUTED, CHARGING)
FINAL_STATUSES = (COMPLETED, CANCELLED, REJECTED, DEAD_LETTERED)
STATUSES = ACTIVE_STATUSES + FINAL_STATUSES
_RANK = {status: rank for rank, status in enumerate(ACTIVE_STATUSES)}

#: What ``GET /charge/<id>`` shows of a record, in this order (None values are left out).
PUBLIC_FIELDS = (
    "request_id",
    "ev_id",
    "status",
    "substation",
    "accepted_at",
    "routed_at",
    "started_at",
    "expected_end",
    "completed_at",
    "cancel_requested_at",
    "cancelled_at",
    "rejected_at",
    "reason",
    "detail",
    "active_request_id",
)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    #: When the request was accepted (or first heard of): what retention by age counts from.
    born_at: float
    ev_id: str | None = None
    status: str = QUEUED
    #: Whose request it is (None: accepted by an open API, or not yet known).
    client: str | None = None
    #: Set for requests made with an Idempotency-Key.
    body_fingerprint: str | None = None
    substation: str | None = None
    accepted_at: float | None = None
    routed_at: float | None = None
    started_at: float | None = None
    expected_end: float | None = None
    completed_at: float | None = None
    cancel_requested_at: float | None = None
    cancelled_at: float | None = None
    rejected_at: float | None = None
    #: Why it was rejected (a code of contract.REJECTION_REASONS) or dead-lettered (words).
    reason: str | None = None
    detail: str | None = None
    #: For a rejection ev_busy: the request that held the EV.
    active_request_id: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def provisionally_rejected(self) -> bool:
        return self.status == REJECTED and self.reason == contract.REJECTED_NOT_ENQUEUED

    def to_json(self) -> dict:
        values = ((name, getattr(self, name)) for name in PUBLIC_FIELDS)
        return {name: value for name, value in values if value is not None}

    def advance(self, status: str) -> bool:
        """Move to ``status`` if that is forward; say whether it moved."""
        if status == self.status:
            return False
        if self.provisionally_rejected:
            # Any later word about the request overrides the gateway's provisional rejection,
            # except being queued (the request copy in the stream says nothing new).
            if status == QUEUED:
                return False
            self.reason = self.detail = None
            self.rejected_at = None
            self.status = status
            return True
        if not self.active:
            return False
        if status in FINAL_STATUSES or _RANK[status] > _RANK[self.status]:
            self.status = status
            return True
        return False


class RequestHistory:
    """Thread-safe: HTTP handler threads read, the broker's I/O thread writes."""

    def __init__(
        self,
        *,
        capacity: int = 100_000,
        max_age: float = 25 * 3600.0,
        idempotency_ttl: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
        doubts: Doubts | None = None,
    ):
        if capacity <= 0 or max_age <= 0 or idempotency_ttl <= 0:
            raise ValueError("capacity, max_age and idempotency_ttl must be positive")
        self.capacity = capacity
        self.max_age = max_age
        self.idempotency_ttl = idempotency_ttl
        self._clock = clock
        #: Told of every record that moves (gateway/doubts.py).
        self.doubts = doubts
        self._records: collections.OrderedDict[str, RequestRecord] = collections.OrderedDict()
        #: EV -> its active requests (normally one; more only while a race is being decided).
        self._active_by_ev: dict[str, dict[str, float]] = {}
        self._routed_waiters: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------------ answering
    def get(self, request_id: str, client: str | None = None) -> dict | None:
        """The record as ``GET /charge/<id>`` shows it, if ``client`` may see it.

        ``client`` None is the open API (no tokens file), which shows every request. With
        tokens, a request is seen by its own client only: anyone else gets the same answer as
        for an unknown id, so that ids cannot be probed.
        """
        with self._lock:
            record = self._visible(request_id, client)
            return None if record is None else record.to_json()

    def lookup(self, request_id: str, client: str | None = None) -> RequestRecord | None:
        """A copy of the whole record (idempotency and cancellation decide from it)."""
        with self._lock:
            record = self._visible(request_id, client)
            return None if record is None else dataclasses.replace(record)

    def _visible(self, request_id: str, client: str | None) -> RequestRecord | None:
        record = self._records.get(request_id)
        if record is None or (client is not None and record.client != client):
            return None
        return record

    def active_for(self, ev_id: str) -> tuple[str, str | None] | None:
        """The request that holds ``ev_id`` (the earliest accepted of its active ones) and its
        client, or None when the EV is free as far as this history knows."""
        with self._lock:
            active = self._active_by_ev.get(ev_id)
            if not active:
                return None
            request_id = min(active, key=lambda rid: (active[rid], rid))
            return request_id, self._records[request_id].client

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds since the oldest request held was accepted (0 when none is held)."""
        with self._lock:
            if not self._records:
                return 0.0
            oldest = next(iter(self._records.values()))
            return max(0.0, (self._clock() if now is None else now) - oldest.born_at)

    def idempotency_expired(self, record: RequestRecord, now: float | None = None) -> bool:
        """Whether a repeat of the key that made ``record`` is now a new use of the key."""
        accepted = record.accepted_at if record.accepted_at is not None else record.born_at
        return (self._clock() if now is None else now) >= accepted + self.idempotency_ttl

    # ------------------------------------------------------------------ ROUTED_WAIT
    def expect(self, request_id: str) -> threading.Event:
        """Register interest in the routing decision before publishing, so it cannot be missed."""
        event = threading.Event()
        with self._lock:
            self._routed_waiters[request_id] = event
        return event

    def forget_waiter(self, request_id: str) -> None:
        with self._lock:
            self._routed_waiters.pop(request_id, None)

    # ------------------------------------------------------------------ learning
    def accepted(self, request: contract.ChargeRequest) -> None:
        """A charge request: accepted here (once confirmed), or read from the stream."""
        with self._lock:
            self._learn(request.request_id, request.accepted_at, lambda r: self._accept(r, request))

    def apply(self, event: contract.Event) -> None:
        request_id = getattr(event, "request_id", None)
        if request_id is None:
            return
        with self._lock:
            self._learn(request_id, event.at, lambda r: self._apply(r, event))

    def read(self, routing_key: str, body: bytes) -> None:
        """Apply one message of the history stream (a charge request, or a batch of events).
        Raises ``contract.InvalidMessage`` for a message that breaks the contract."""
        for item in read_stream_message(routing_key, body):
            if isinstance(item, contract.ChargeRequest):
                self.accepted(item)
            else:
                self.apply(item)

    def replay(self, messages: Iterable[tuple[str, bytes]]) -> list[str]:
        """Apply the stream from its start; the reasons for any messages skipped as invalid
        (a log cannot dead-letter, and one bad message must not stop a gateway starting)."""
        skipped = []
        for routing_key, body in messages:
            try:
                self.read(routing_key, body)
            except contract.InvalidMessage as exc:
                skipped.append(f"{routing_key}: {exc}")
        return skipped

    def _learn(self, request_id: str, born_at: float, change: Callable[[RequestRecord], None]):
        now = self._clock()
        record = self._records.get(request_id)
        if record is None:
            if born_at < now - self.max_age:
                return  # older than the retention window (a replay of an old stream segment)
            record = self._records[request_id] = RequestRecord(request_id, born_at=born_at)
            progress_before = None
        else:
            progress_before = _progress(record)
        before = (record.ev_id, record.active)
        change(record)
        self._reindex(record, *before)
        if self.doubts is not None and _progress(record) != progress_before:
            # Counted from when the word was said, not read: a gateway replaying the history
            # at start would otherwise ask about every active request at once, 30 s later.
            said_at = min(born_at, now)
            self.doubts.moved(
                request_id,
                active=record.active,
                now=said_at,
                quiet_from=record.expected_end or said_at,
            )
        if record.substation is not None or not record.active:
            waiter = self._routed_waiters.pop(request_id, None)
            if waiter is not None:
                waiter.set()
        self._evict(now)

    def _accept(self, record: RequestRecord, request: contract.ChargeRequest) -> None:
        if record.accepted_at is not None and request.accepted_at > record.accepted_at:
            new_attempt = record.provisionally_rejected or (
                request.accepted_at >= record.accepted_at + self.idempotency_ttl
            )
            if new_attempt:
                self._reindex_removed(record)
                fresh = RequestRecord(record.request_id, born_at=request.accepted_at)
                for field in dataclasses.fields(RequestRecord):
                    setattr(record, field.name, getattr(fresh, field.name))
                self._records.move_to_end(record.request_id)
        if record.accepted_at is None:
            record.accepted_at = request.accepted_at
            record.born_at = min(record.born_at, request.accepted_at)
        record.ev_id = record.ev_id or request.ev_id
        record.client = record.client or request.client
        record.body_fingerprint = record.body_fingerprint or request.body_fingerprint

    def _apply(self, record: RequestRecord, event: contract.Event) -> None:
        record.ev_id = record.ev_id or getattr(event, "ev_id", None)
        if isinstance(event, contract.RequestAccepted):
            record.accepted_at = record.accepted_at or event.at
        elif isinstance(event, contract.RequestRouted):
            # A request rerouted off a dead substation is routed twice: the later one counts.
            if record.routed_at is None or event.at >= record.routed_at:
                record.routed_at = event.at
                if record.started_at is None:
                    record.substation = event.substation
            record.advance(ROUTED)
        elif isinstance(event, contract.SessionStarted):
            record.substation = event.substation
            record.started_at = event.at
            record.expected_end = event.expected_end
            record.accepted_at = record.accepted_at or event.accepted_at
            record.advance(CHARGING)
        elif isinstance(event, contract.SessionCompleted):
            record.substation = event.substation
            record.started_at = record.started_at or event.started_at
            if record.advance(COMPLETED):
                record.completed_at = event.at
        elif isinstance(event, contract.RequestDeadLettered):
            if record.advance(DEAD_LETTERED):
                record.reason = event.reason
        elif isinstance(event, contract.RequestRejected):
            self._reject(record, event)
        elif isinstance(event, contract.CancelRequested):
            # Kept even when the request finished first: it says the cancel came too late.
            record.cancel_requested_at = record.cancel_requested_at or event.at
        elif isinstance(event, contract.RequestCancelled) and record.advance(CANCELLED):
            record.cancelled_at = event.at
            record.substation = event.substation or record.substation
            record.started_at = event.started_at or record.started_at

    @staticmethod
    def _reject(record: RequestRecord, event: contract.RequestRejected) -> None:
        if record.accepted_at is not None and event.accepted_at != record.accepted_at:
            return  # it rejects an earlier attempt of this request id
        if event.reason == contract.REJECTED_NOT_ENQUEUED and record.status != QUEUED:
            return  # routed or further: it was enqueued after all
        if record.advance(REJECTED):
            record.rejected_at = event.at
            record.reason = event.reason
            record.detail = event.detail
            record.active_request_id = event.active_request_id

    # ------------------------------------------------------------------ indexes
    def _reindex(self, record: RequestRecord, ev_before: str | None, active_before: bool) -> None:
        if (ev_before, active_before) == (record.ev_id, record.active):
            return
        if active_before and ev_before is not None:
            self._unindex(ev_before, record.request_id)
        if record.active and record.ev_id is not None:
            accepted = record.accepted_at if record.accepted_at is not None else record.born_at
            self._active_by_ev.setdefault(record.ev_id, {})[record.request_id] = accepted

    def _reindex_removed(self, record: RequestRecord) -> None:
        if record.active and record.ev_id is not None:
            self._unindex(record.ev_id, record.request_id)

    def _unindex(self, ev_id: str, request_id: str) -> None:
        active = self._active_by_ev.get(ev_id)
        if active is not None:
            active.pop(request_id, None)
            if not active:
                del self._active_by_ev[ev_id]

    def _evict(self, now: float) -> None:
        records = self._records
        while records:
            oldest = next(iter(records.values()))
            if len(records) <= self.capacity and oldest.born_at >= now - self.max_age:
                return
            records.popitem(last=False)
            self._reindex_removed(oldest)
            if self.doubts is not None:
                self.doubts.forget(oldest.request_id)


def _progress(record: RequestRecord) -> tuple:
    """What says a record moved (a copy of an event it had already read says nothing new)."""
    return (record.status, record.substation, record.started_at, record.expected_end)


def read_stream_message(
    routing_key: str, body: bytes
) -> list[contract.ChargeRequest] | list[contract.Event]:
    """Decode a message of the history stream: a charge request (routing key
    ``charge.request``) or a lifecycle event message (one event or a batch)."""
    if routing_key in contract.HISTORY_REQUEST_KEYS:
        return [contract.ChargeRequest.from_body(body)]
    return contract.decode_events(routing_key, body)
