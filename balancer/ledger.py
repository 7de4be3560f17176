"""Which request holds each EV, decided where every request passes: the balancer.

The gateways check for a busy EV too, from their history, but two gateways can accept requests
for one EV within the same millisecond. The balancer is the single active consumer of the
pending queue (``x-single-active-consumer``), so it sees every request in one order, and this
ledger decides for each: route it, reject it (``ev_busy``: another request holds the EV; the
first to arrive wins), drop it as a copy of one already handled, or cancel it (a cancel was
requested before it was forwarded).

Every decision is published (``request.routed``, ``request.rejected``, ``request.cancelled``)
and confirmed before the pending message is acknowledged; the ledger of a balancer that takes
over is rebuilt from those events in the history stream before it consumes, so no decision is
made twice, or differently.

A request id seen again within ``idempotency_ttl`` of its acceptance is the same request (a
repeat of an Idempotency-Key, a redelivery); later, the client used its key again (a new one).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from smartgrid import contract


class Verdict(enum.Enum):
    #: Hand it to the strategy: it holds its EV from now on.
    ROUTE = "route"
    #: Publish ``request.rejected`` (ev_busy), then acknowledge it.
    REJECT = "reject"
    #: Publish ``request.cancelled`` (never started), then acknowledge it.
    CANCEL = "cancel"
    #: A copy of a request already held, forwarded or settled: acknowledge it, say nothing.
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    #: For REJECT: the request that holds the EV.
    active_request_id: str | None = None
    #: For DUPLICATE: why (for the log).
    why: str = ""


HELD, FORWARDED, STARTED = "held", "forwarded", "started"


@dataclass
class _Entry:
    ev_id: str
    accepted_at: float
    state: str


class EvLedger:
    """Balancer state; I/O thread only."""

    def __init__(self, *, idempotency_ttl: float = 24 * 3600.0, remember: int = 100_000):
        self.idempotency_ttl = idempotency_ttl
        self._remember = remember
        self._entries: dict[str, _Entry] = {}
        self._holder: dict[str, str] = {}  # ev_id -> request_id
        #: Requests that ended, and when they were accepted (bounded, oldest forgotten first).
        self._settled: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: Cancels heard for requests not held here (yet): the request may still come.
        self._cancels: collections.OrderedDict[str, None] = collections.OrderedDict()

    def holder(self, ev_id: str) -> str | None:
        return self._holder.get(ev_id)

    def state(self, request_id: str) -> str | None:
        entry = self._entries.get(request_id)
        return None if entry is None else entry.state

    # ------------------------------------------------------------------ pending requests
    def decide(self, request: contract.ChargeRequest) -> Decision:
        rid, ev = request.request_id, request.ev_id
        settled_at = self._settled.get(rid)
        if settled_at is not None and request.accepted_at < settled_at + self.idempotency_ttl:
            return Decision(Verdict.DUPLICATE, why="it has ended already")
        if rid in self._cancels:
            self._cancels.pop(rid)
            self._settle(rid, request.accepted_at)
            return Decision(Verdict.CANCEL)
        entry = self._entries.get(rid)
        if entry is not None:
            if entry.state == HELD:
                return Decision(Verdict.DUPLICATE, why="it is held here already")
            if request.rerouted_from is None:
                return Decision(Verdict.DUPLICATE, why=f"it was {entry.state} already")
            # Off a substation presumed dead: route it again, keeping its EV.
            entry.state = HELD
            return Decision(Verdict.ROUTE)
        holder = self._holder.get(ev)
        if holder is not None:
            self._settle(rid, request.accepted_at)
            return Decision(Verdict.REJECT, active_request_id=holder)
        self._entries[rid] = _Entry(ev, request.accepted_at, HELD)
        self._holder[ev] = rid
        return Decision(Verdict.ROUTE)

    def forwarded(self, request_id: str) -> None:
        """The forward to a substation was confirmed."""
        entry = self._entries.get(request_id)
        if entry is not None and entry.state == HELD:
            entry.state = FORWARDED

    def forward_failed(self, request_id: str) -> None:
        """The forward failed and the request is held again (it keeps its EV)."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.state = HELD

    def forget_held(self) -> None:
        """The channel that held them is gone: the broker returns them to the pending queue,
        to this balancer or to the one that takes over, which will decide again."""
        for rid in [rid for rid, entry in self._entries.items() if entry.state == HELD]:
            self._release(rid)

    def cancelled_here(self, request_id: str) -> None:
        """A held request was cancelled by this balancer (see :meth:`cancel_requested`)."""
        entry = self._entries.get(request_id)
        self._settle(request_id, entry.accepted_at if entry is not None else 0.0)

    # ------------------------------------------------------------------ events
    def cancel_requested(self, event: contract.CancelRequested) -> bool:
        """Whether the request is held here, so that this balancer must cancel it now (take it
        out of the held ones, publish ``request.cancelled``, acknowledge it, then call
        :meth:`cancelled_here`). A forwarded one is the substation's to cancel; one not seen
        yet is cancelled when it arrives."""
        rid = event.request_id
        entry = self._entries.get(rid)
        if entry is not None:
            return entry.state == HELD
        if rid not in self._settled:
            self._cancels[rid] = None
            if len(self._cancels) > self._remember:
                self._cancels.popitem(last=False)
        return False

    def apply(self, event: contract.Event) -> None:
        """Learn from an event, live or replayed from the history stream."""
        if isinstance(event, contract.RequestRouted):
            self._progress(event.request_id, event.ev_id, event.at, FORWARDED)
        elif isinstance(event, contract.SessionStarted):
            self._progress(event.request_id, event.ev_id, event.accepted_at, STARTED)
        elif isinstance(event, contract.CancelRequested):
            self.cancel_requested(event)
        elif isinstance(event, contract.SessionCompleted | contract.RequestCancelled):
            self._end(event.request_id, event.at)
        elif isinstance(event, contract.RequestRejected):
            # The gateway's provisional not_enqueued does not bind: if the request is in the
            # pending queue after all, it is a valid request.
            if event.reason != contract.REJECTED_NOT_ENQUEUED:
                self._end(event.request_id, event.accepted_at)
        elif isinstance(event, contract.RequestDeadLettered) and event.request_id is not None:
            self._end(event.request_id, event.at)

    def _progress(self, rid: str, ev: str, accepted_at: float, state: str) -> None:
        if rid in self._settled:
            return  # a late event about a request that ended
        entry = self._entries.get(rid)
        if entry is None:
            # Routed by a balancer before a takeover, or learned from the stream.
            entry = self._entries[rid] = _Entry(ev, accepted_at, state)
            self._holder.setdefault(ev, rid)
        elif state == STARTED or entry.state == HELD:
            entry.state = state

    def _end(self, rid: str, accepted_at: float) -> None:
        entry = self._entries.get(rid)
        self._settle(rid, entry.accepted_at if entry is not None else accepted_at)
        self._cancels.pop(rid, None)

    # ------------------------------------------------------------------ bookkeeping
    def _release(self, rid: str) -> _Entry | None:
        entry = self._entries.pop(rid, None)
        if entry is not None and self._holder.get(entry.ev_id) == rid:
            del self._holder[entry.ev_id]
        return entry

    def _settle(self, rid: str, accepted_at: float) -> None:
        self._release(rid)
        self._settled[rid] = accepted_at
        self._settled.move_to_end(rid)
        if len(self._settled) > self._remember:
            self._settled.popitem(last=False)
