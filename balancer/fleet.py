"""What the balancer knows about each substation, and its estimate of each one's load now.

The polled load is seconds old. Between polls the balancer corrects it with what it has seen
since, using the substation's own counters from the same poll so that no event is counted
twice or missed however events and polls interleave::

    estimate = polled load
             + (routed there in total - the substation's received total at the poll)
             - (completions seen in total - the substation's completed total at the poll)

The first bracket is every request routed there that the poll did not yet see (in transit, or
waiting in the substation's queue); the second is every session that ended since the poll. The
totals on the two sides start at different times (a balancer restarts, a substation restarts),
so each side carries an offset fixed at the first reading of a substation instance, assuming
nothing was in flight then. A bracket can go negative for a few milliseconds (the substation
counted something whose event is still on its way): it is clamped at zero meanwhile, and only a
gap that persists over a whole poll interval (an event that was lost) moves the offset.

Counted events cannot be trusted to be exact: an outbox may send one twice, and a user that may
publish them may forge them. So each request is counted once per substation (by request id),
events about a substation the balancer does not know, or from an instance it has not seen, are
ignored, and a poll corrects drift in both directions: the completed count against the
substation's own counter, and the routed count against what its queue holds
(:meth:`TrackedSubstation.apply_queue_depth`). Only a gap that persists over two samples moves
an offset, so an event still on its way is not written off.

A substation is eligible only while its last reading is younger than ``stale_after`` and it
has not said it is leaving. Unknown or stale means ineligible, never "load 0". A leaving that
the substation's own page contradicts (it still consumes its queue, two polls later) is
ignored: it was not the substation's.

Everything here runs on the balancer's AMQP I/O thread; the poller hands readings over to it.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from balancer.strategies import Candidate
from smartgrid import contract

#: Request ids remembered per substation, to count each once.
_REMEMBER_IDS = 50_000

#: Expected session ends this far in the past are dropped even if no completion was seen
#: (a lost event must not make a substation look "about to free a point" forever).
_FORGET_ENDS_AFTER = 60.0


@dataclass
class TrackedSubstation:
    substation: str
    metrics_url: str | None = None
    static: bool = False
    announced_capacity: int | None = None
    announced_instance: str | None = None
    announced_at: float | None = None
    leaving_instance: str | None = None
    #: Readings since the leaving event: the second one was surely taken after it.
    readings_since_leaving: int = 0
    refuted_leavings: int = 0

    reading: contract.SubstationReading | None = None
    reading_at: float | None = None
    #: When the last good reading arrived; unlike reading_at it survives mark_unknown().
    last_good_at: float | None = None
    last_error: str | None = None
    errors: int = 0

    routed: int = 0
    routed_offset: float = 0.0
    event_instance: str | None = None
    completed_seen: int = 0
    completed_offset: float = 0.0
    _routed_gap_before: float = 0.0
    _completed_gap_before: float = 0.0
    _depth_gap_before: float = 0.0
    #: Request ids counted in ``routed`` and ``completed_seen``, to count each once.
    routed_ids: dict[str, None] = field(default_factory=dict)
    completed_ids: dict[str, None] = field(default_factory=dict)
    running_ends: dict[str, float] = field(default_factory=dict)
    _ends_heap: list[tuple[float, str]] = field(default_factory=list)

    # -------------------------------------------------------------------------- estimates
    def in_flight(self) -> float:
        if self.reading is None:
            return 0.0
        return max(0.0, self.routed + self.routed_offset - self.reading.received)

    def completed_since_reading(self) -> float:
        if self.reading is None:
            return 0.0
        return max(0.0, self.completed_seen + self.completed_offset - self.reading.completed)

    def estimate(self) -> float:
        if self.reading is None:
            return math.nan
        return max(0.0, self.reading.load + self.in_flight() - self.completed_since_reading())

    @property
    def capacity(self) -> int | None:
        return self.reading.capacity if self.reading is not None else self.announced_capacity

    def next_end(self, wall_now: float) -> float:
        heap = self._ends_heap
        while heap:
            end, request_id = heap[0]
            if self.running_ends.get(request_id) == end and end > wall_now - _FORGET_ENDS_AFTER:
                return end
            heapq.heappop(heap)
            if self.running_ends.get(request_id) == end:
                del self.running_ends[request_id]
        return math.inf

    # -------------------------------------------------------------------------- updates
    def _switch_event_instance(self, instance: str) -> None:
        if self.event_instance != instance:
            self.event_instance = instance
            self.completed_seen = 0
            self.completed_offset = 0.0
            self.running_ends.clear()
            self._ends_heap.clear()
            self.completed_ids.clear()

    def known_instance(self, instance: str) -> bool:
        """Whether events from ``instance`` describe this substation as the balancer knows it
        (polled, or announced): not a forgery with a made-up instance, nor a stale one."""
        return instance in (
            self.reading.instance if self.reading is not None else None,
            self.announced_instance,
        )

    def count_routed(self, request_id: str | None, count: int = 1) -> None:
        if request_id is not None:
            if request_id in self.routed_ids:
                return
            _remember(self.routed_ids, request_id)
        self.routed += count

    def count_unrouted(self, request_id: str | None) -> None:
        if request_id is not None and self.routed_ids.pop(request_id, False) is False:
            return  # not counted, or uncounted already
        self.routed -= 1

    def apply_queue_depth(self, queued: int, forwarding: int) -> None:
        """The substation's queue held ``queued`` ready messages just after the last reading,
        and ``forwarding`` forwards of this balancer to it await their confirm: what
        :meth:`in_flight` should be. A gap in either direction that persists over two
        samples is drift (a forged or lost request.routed) and is written off."""
        if self.reading is None:
            return
        gap = (self.routed + self.routed_offset - self.reading.received) - (queued + forwarding)
        before = self._depth_gap_before
        if gap > 0 and before > 0:
            self.routed_offset -= min(gap, before)
        elif gap < 0 and before < 0:
            self.routed_offset += min(-gap, -before)
        self._depth_gap_before = (
            self.routed + self.routed_offset - self.reading.received - queued - forwarding
        )

    def apply_reading(self, reading: contract.SubstationReading, at: float) -> None:
        new_instance = self.reading is None or self.reading.instance != reading.instance
        if new_instance:
            if self.event_instance != reading.instance:
                self._switch_event_instance(reading.instance)
            # A substation seen for the first time: assume nothing is in flight to it.
            self.routed_offset = reading.received - self.routed
            self.completed_offset = reading.completed - self.completed_seen
            self._routed_gap_before = self._completed_gap_before = 0.0
        self.reading = reading
        self.reading_at = at
        self.last_good_at = at
        self.last_error = None
        # The substation may count a request or a completion before the balancer sees its
        # event (a few milliseconds). Such a gap closes by itself, and the clamps in
        # in_flight() and completed_since_reading() cover it meanwhile; only a gap that has
        # outlived a whole poll interval is an event that will never come (lost, or from a
        # balancer we did not hear), and only that much is written off into the offset.
        routed_gap = reading.received - (self.routed + self.routed_offset)
        lost = min(routed_gap, self._routed_gap_before)
        if lost > 0:
            self.routed_offset += lost
            routed_gap -= lost
        self._routed_gap_before = max(0.0, routed_gap)
        # Completions: lost events (the counter is ahead) and forged or repeated ones (the
        # events are ahead) alike, once the gap has lasted a poll interval.
        completed_gap = reading.completed - (self.completed_seen + self.completed_offset)
        before = self._completed_gap_before
        if completed_gap > 0 and before > 0:
            self.completed_offset += min(completed_gap, before)
        elif completed_gap < 0 and before < 0:
            self.completed_offset -= min(-completed_gap, -before)
        self._completed_gap_before = reading.completed - (
            self.completed_seen + self.completed_offset
        )
        if self.leaving_instance is not None:
            if self.leaving_instance != reading.instance:
                self.leaving_instance = None
            else:
                self.readings_since_leaving += 1
                if self.readings_since_leaving >= 2 and reading.consuming:
                    # Its own page says it still takes requests: not its leaving.
                    self.leaving_instance = None
                    self.refuted_leavings += 1

    def session_started(self, event: contract.SessionStarted) -> None:
        self._switch_event_instance(event.instance)
        # A session that starts paused has no end in sight until power frees.
        end = math.inf if event.expected_end is None else event.expected_end
        self.running_ends[event.request_id] = end
        heapq.heappush(self._ends_heap, (end, event.request_id))

    def session_completed(
        self, event: contract.SessionCompleted | contract.RequestCancelled
    ) -> None:
        """A session ended here: completed, or stopped by a cancel (its point is free either
        way, and the substation counts both as completed). Counted once per request."""
        assert event.instance is not None
        self._switch_event_instance(event.instance)
        self.running_ends.pop(event.request_id, None)
        if event.request_id in self.completed_ids:
            return
        _remember(self.completed_ids, event.request_id)
        self.completed_seen += 1


def _remember(ids: dict[str, None], request_id: str) -> None:
    ids[request_id] = None
    if len(ids) > _REMEMBER_IDS:
        del ids[next(iter(ids))]


class Fleet:
    """Every substation the balancer knows of, from the static list and announcements."""

    def __init__(
        self,
        *,
        stale_after: float,
        forget_after: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.stale_after = stale_after
        self.forget_after = forget_after
        self._clock = clock
        self._wall_clock = wall_clock
        self.substations: dict[str, TrackedSubstation] = {}
        #: (substation, metrics URL) pairs to poll; replaced, never mutated, so the poller
        #: thread can read it without a lock.
        self.poll_targets: tuple[tuple[str, str], ...] = ()
        #: Candidates as of the last change of each substation, with the time until which each
        #: stays eligible: a decision then costs a scan of ready-made entries, not a rebuild of
        #: every substation's estimate (which grew with the fleet). Entries of substations
        #: whose state changed are rebuilt on the next call.
        self._ready: dict[str, tuple[float, Candidate]] = {}
        self._changed: set[str] = set()

    def _track(self, substation: str) -> TrackedSubstation:
        tracked = self.substations.get(substation)
        if tracked is None:
            tracked = self.substations[substation] = TrackedSubstation(substation)
        self._changed.add(substation)
        return tracked

    def _refresh_targets(self) -> None:
        self.poll_targets = tuple(
            (t.substation, t.metrics_url) for t in self.substations.values() if t.metrics_url
        )

    # -------------------------------------------------------------------------- membership
    def add_static(self, substation: str, metrics_url: str) -> None:
        tracked = self._track(substation)
        tracked.metrics_url = metrics_url
        tracked.static = True
        self._refresh_targets()

    def announced(self, event: contract.SubstationAnnounced) -> bool:
        """Record an announcement; True if the poll targets changed."""
        tracked = self._track(event.substation)
        tracked.announced_capacity = event.capacity
        tracked.announced_instance = event.instance
        tracked.announced_at = self._clock()
        if tracked.leaving_instance is not None and tracked.leaving_instance != event.instance:
            tracked.leaving_instance = None
        if tracked.metrics_url != event.metrics_url and not tracked.static:
            tracked.metrics_url = event.metrics_url
            self._refresh_targets()
            return True
        return False

    def leaving(self, event: contract.SubstationLeaving) -> None:
        tracked = self.substations.get(event.substation)
        if tracked is not None and tracked.known_instance(event.instance):
            tracked.leaving_instance = event.instance
            tracked.readings_since_leaving = 0
            self._changed.add(event.substation)

    def forget_silent(self) -> list[str]:
        """Drop announced (not static) substations silent for ``forget_after``."""
        now = self._clock()
        gone = [
            t.substation
            for t in self.substations.values()
            if not t.static
            and now - max(t.announced_at or 0.0, t.reading_at or 0.0) > self.forget_after
        ]
        for substation in gone:
            del self.substations[substation]
            self._changed.add(substation)
        if gone:
            self._refresh_targets()
        return gone

    # -------------------------------------------------------------------------- observations
    def reading(self, substation: str, reading: contract.SubstationReading) -> None:
        tracked = self.substations.get(substation)
        if tracked is not None:
            tracked.apply_reading(reading, self._clock())
            self._changed.add(substation)

    def reading_failed(self, substation: str, error: str) -> None:
        tracked = self.substations.get(substation)
        if tracked is not None:
            tracked.last_error = error
            tracked.errors += 1

    def mark_unknown(self, substation: str) -> None:
        """Forget the last reading: the substation is ineligible until it is polled again."""
        tracked = self.substations.get(substation)
        if tracked is not None:
            tracked.reading = None
            tracked.reading_at = None
            self._changed.add(substation)

    def routed(self, substation: str, count: int = 1, *, request_id: str | None = None) -> None:
        """Requests were forwarded there (by this balancer, or another one's event says so);
        with ``request_id``, one request, counted once however often it is reported."""
        self._track(substation).count_routed(request_id, count)

    def unrouted(self, substation: str, *, request_id: str | None = None) -> None:
        """A request counted by :meth:`routed` did not stay there: its forward failed, or it
        was moved back off the queue of a substation presumed dead."""
        self._track(substation).count_unrouted(request_id)

    def knows(self, substation: str, instance: str | None = None) -> bool:
        """Whether events about ``substation`` (from ``instance``) are worth counting."""
        tracked = self.substations.get(substation)
        return tracked is not None and (instance is None or tracked.known_instance(instance))

    def queue_depth(self, substation: str, queued: int, forwarding: int) -> None:
        tracked = self.substations.get(substation)
        if tracked is not None:
            tracked.apply_queue_depth(queued, forwarding)
            self._changed.add(substation)

    def session_started(self, event: contract.SessionStarted) -> None:
        if self.knows(event.substation, event.instance):
            self._track(event.substation).session_started(event)

    def session_completed(self, event: contract.SessionCompleted) -> None:
        if self.knows(event.substation, event.instance):
            self._track(event.substation).session_completed(event)

    def request_cancelled(self, event: contract.RequestCancelled) -> None:
        """A cancel that stopped a session (it names its substation, instance and start) frees
        its point as a completion does. One that stopped a request before it started changes
        nothing here: the substation counted it received, and it never ran."""
        if event.substation is None or event.started_at is None or event.instance is None:
            return
        if self.knows(event.substation, event.instance):
            self._track(event.substation).session_completed(event)

    # -------------------------------------------------------------------------- decisions
    def is_eligible(self, tracked: TrackedSubstation, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return (
            tracked.reading is not None
            and tracked.reading_at is not None
            and now - tracked.reading_at <= self.stale_after
            and tracked.leaving_instance != tracked.reading.instance
        )

    def presumed_dead(self, drain_after: float) -> list[str]:
        """Substations whose queues should be emptied back into the pending queue: those that
        said they are leaving, and those without a good reading for ``drain_after``."""
        now = self._clock()
        dead = []
        for t in self.substations.values():
            if t.last_good_at is None:
                continue  # never seen alive: nothing was routed there
            # Said it is leaving, and its page agrees: it no longer consumes its queue.
            leaving = (
                t.reading is not None
                and t.leaving_instance == t.reading.instance
                and not t.reading.consuming
            )
            if leaving or now - t.last_good_at > drain_after:
                dead.append(t.substation)
        return dead

    def candidates(self) -> list[Candidate]:
        if self._changed:
            wall_now = self._wall_clock()
            for substation in self._changed:
                t = self.substations.get(substation)
                if (
                    t is None
                    or t.reading is None
                    or t.reading_at is None
                    or t.leaving_instance == t.reading.instance
                ):
                    self._ready.pop(substation, None)
                    continue
                self._ready[substation] = (
                    t.reading_at + self.stale_after,
                    Candidate(
                        substation=t.substation,
                        capacity=t.reading.capacity,
                        estimate=t.estimate(),
                        polled_load=t.reading.load,
                        next_end=t.next_end(wall_now),
                    ),
                )
            self._changed.clear()
        now = self._clock()
        return [
            candidate for eligible_until, candidate in self._ready.values() if now <= eligible_until
        ]

    def reading_age(self, tracked: TrackedSubstation) -> float:
        return math.inf if tracked.reading_at is None else self._clock() - tracked.reading_at
