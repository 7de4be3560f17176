"""A substation's charging points: which sessions run, and the counters behind /metrics.

The I/O thread changes this state and the HTTP thread serving /metrics reads it; both go
through one lock so that a scrape sees load, received and completed from the same instant.
The balancer subtracts these numbers from each other, so a torn read would skew its estimate.

Pure: each request comes with an opaque token (the service's AMQP delivery) that the session
hands back when it ends, so that the service can acknowledge it.

A session lives only as long as the connection its delivery came on: when that is lost, the
broker hands the request to someone else, so the service drops every session in progress
(:meth:`ChargingPoints.drop_all`) and never reports their completion. A completion is
*reported* once the broker has confirmed its event; one whose confirm never came (the
connection died in between) is *uncertain*: if the request comes back here, the same event is
reported again (consumers take an identical event once), and a lookup gets "running" (the
asker keeps its copy until this one says "completed", or leaves).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from smartgrid import contract

#: What settles a request once its session ends (the substation's AMQP delivery).
Token = TypeVar("Token")


@dataclass
class Session(Generic[Token]):
    request: contract.RoutedRequest
    token: Token
    started_at: float
    expected_end: float
    #: When it ended and its completion was published.
    completed_at: float | None = None
    #: What it delivered, and how long it was paused in all (substation/sharing.py).
    energy_kwh: float | None = None
    paused_seconds: float | None = None
    #: It was stopped by a cancel (its end is reported as request.cancelled).
    cancelled: bool = False


@dataclass(frozen=True)
class _Ended:
    """A request that ended here (completed, or cancelled) and whose end was reported: which
    attempt it was, and when it ended."""

    accepted_at: float
    ended_at: float
    #: False: learned from the history stream, which does not say which attempt ended, only
    #: when its session started: ``accepted_at`` is then that start, and any attempt accepted
    #: by then is the one that ended (a later one is a new attempt of the same key).
    exact: bool = True

    def same_attempt(self, accepted_at: float) -> bool:
        if self.exact:
            return _same_attempt(self.accepted_at, accepted_at)
        return accepted_at < self.accepted_at + _SAME_ATTEMPT


#: Two acceptance times closer than this are the same attempt (a copy or a reroute keeps
#: ``accepted_at``; a key used again after the TTL has a later one).
_SAME_ATTEMPT = 0.001


def _same_attempt(a: float, b: float) -> bool:
    return abs(a - b) < _SAME_ATTEMPT


class Admission(Enum):
    STARTED = "started"
    #: Already charging here (this copy's twin is held on the same channel), or its completion
    #: here is reported: nothing to do but acknowledge.
    DUPLICATE = "duplicate"
    #: Completed here, but the report was not confirmed: report it again, then acknowledge.
    REPORT = "report"
    #: A possible duplicate unknown here, or one another live substation asked about: ask the
    #: other substations before charging it.
    CHECK = "check"


class ChargingPoints(Generic[Token]):
    def __init__(
        self,
        substation_id: str,
        capacity: int,
        instance: str,
        *,
        remember: int = 50_000,
    ):
        self.substation_id = substation_id
        self.capacity = capacity
        self.instance = instance
        self._lock = threading.Lock()
        self._active: dict[str, Session[Token]] = {}
        #: Ended here and reported, by request id: which attempt, and when it ended.
        self._recently_completed: collections.OrderedDict[str, _Ended] = collections.OrderedDict()
        #: Completed here, report unconfirmed (see the module's docstring).
        self._uncertain: collections.OrderedDict[str, Session[Token]] = collections.OrderedDict()
        self._remember = remember
        self.received = 0
        self.completed = 0
        self.duplicates = 0
        #: Sessions stopped by a cancel (counted in ``completed`` too: a point freed either
        #: way), and requests cancelled here before they started.
        self.sessions_cancelled = 0
        self.cancelled_before_start = 0
        #: Requests other live substations asked about (session.lookup) and so may be
        #: charging: a request forwarded twice (a balancer that died between forwarding and
        #: acknowledging) must not be charged at two substations.
        self._claims: collections.OrderedDict[str, str] = collections.OrderedDict()

    @property
    def load(self) -> int:
        return len(self._active)

    def admit(
        self,
        request: contract.RoutedRequest,
        token: Token,
        now: float,
        duration: float,
        *,
        redelivered: bool = False,
    ) -> tuple[Admission, Session[Token] | None]:
        with self._lock:
            if not redelivered:
                # A redelivery was counted when it first arrived; counting it again would make
                # the balancer believe fewer requests are still on their way here.
                self.received += 1
            if request.request_id in self._active or self._ended_here(request):
                self.duplicates += 1
                return Admission.DUPLICATE, None
            uncertain = self._uncertain.get(request.request_id)
            if uncertain is not None and _same_attempt(
                uncertain.request.accepted_at, request.accepted_at
            ):
                # A copy of a request completed here, its report unconfirmed yet (or lost):
                # a duplicate delivery too, whose answer is the report sent again.
                self.duplicates += 1
                uncertain.token = token
                return Admission.REPORT, uncertain
            claimant = self._claims.get(request.request_id)
            if claimant is not None and claimant != request.rerouted_from:
                # Another live substation asked about it and may be charging it: ask first.
                return Admission.CHECK, None
            if request.maybe_duplicate:
                return Admission.CHECK, None
            return Admission.STARTED, self._start(request, token, now, duration)

    def start_checked(
        self, request: contract.RoutedRequest, token: Token, now: float, duration: float
    ) -> Session[Token]:
        """Start a possible duplicate that no other substation turned out to know."""
        with self._lock:
            return self._start(request, token, now, duration)

    def _start(
        self, request: contract.RoutedRequest, token: Token, now: float, duration: float
    ) -> Session[Token]:
        session = Session(request, token, started_at=now, expected_end=now + duration)
        self._active[request.request_id] = session
        return session

    def _ended_here(self, request: contract.RoutedRequest) -> bool:
        """This attempt of the request ended here (a key used again after the TTL gives the
        same request id to a new attempt, with a later ``accepted_at``)."""
        ended = self._recently_completed.get(request.request_id)
        return ended is not None and ended.same_attempt(request.accepted_at)

    def holds(self, request: contract.RoutedRequest) -> bool:
        """This attempt of the request is charging or ended here (its delivery is a copy)."""
        with self._lock:
            if request.request_id in self._active or self._ended_here(request):
                return True
            uncertain = self._uncertain.get(request.request_id)
            return uncertain is not None and _same_attempt(
                uncertain.request.accepted_at, request.accepted_at
            )

    def ended_at(self, request_id: str) -> float | None:
        """When a session of ``request_id`` ended here (reported or not); None if none did."""
        with self._lock:
            uncertain = self._uncertain.get(request_id)
            if uncertain is not None:
                return uncertain.completed_at
            ended = self._recently_completed.get(request_id)
            return ended.ended_at if ended is not None else None

    def count_received(self, *, redelivered: bool = False) -> None:
        """A delivered request that is not admitted (cancelled before it started) still
        counts as received: the balancer's estimate subtracts it from those on their way."""
        with self._lock:
            if not redelivered:
                self.received += 1

    def count_duplicate(self) -> None:
        with self._lock:
            self.duplicates += 1

    def claimed_by(self, request_id: str, substation: str, *, checking: bool = False) -> str:
        """Another substation asked about ``request_id``; remember it and say what we know.
        ``checking``: this one holds a copy too, asking the others before it charges it."""
        with self._lock:
            self._claims[request_id] = substation
            if len(self._claims) > self._remember:
                self._claims.popitem(last=False)
            if request_id in self._active or request_id in self._uncertain:
                # Uncertain: its completion may never have reached anyone, so not "completed";
                # but it is reported again when the request comes back here, so the asker
                # must not charge its copy meanwhile.
                return "running"
            if checking and self.substation_id < substation:
                # Both hold a copy and ask: each answering "unknown", both would charge it. The
                # lower id charges it; the other keeps its copy until this one says completed.
                return "running"
            if request_id in self._recently_completed:
                return "completed"
            return "unknown"

    def _remember_completed(
        self, request_id: str, accepted_at: float, ended_at: float, *, exact: bool = True
    ) -> None:
        self._recently_completed[request_id] = _Ended(accepted_at, ended_at, exact)
        self._recently_completed.move_to_end(request_id)
        if len(self._recently_completed) > self._remember:
            self._recently_completed.popitem(last=False)

    def session(self, request_id: str) -> Session[Token] | None:
        with self._lock:
            return self._active.get(request_id)

    def finish(self, request_id: str, now: float) -> Session[Token] | None:
        """The session ended at ``now``; its completion is being reported."""
        with self._lock:
            session = self._active.pop(request_id, None)
            if session is None:
                return None
            self.completed += 1
            session.completed_at = now
            self._uncertain[request_id] = session
            return session

    def stop(self, request_id: str, now: float) -> Session[Token] | None:
        """A cancel stopped the session at ``now``: its point is free, and its end is being
        reported (as :meth:`finish`, and counted as completed too: the balancer's estimate
        counts points freed, whatever freed them)."""
        session = self.finish(request_id, now)
        if session is not None:
            with self._lock:
                session.cancelled = True
                self.sessions_cancelled += 1
        return session

    def cancelled_unstarted(self, request: contract.RoutedRequest, now: float) -> None:
        """The broker confirmed request.cancelled for a request that never started here: a
        redelivery of it is a duplicate."""
        with self._lock:
            self.cancelled_before_start += 1
            self._remember_completed(request.request_id, request.accepted_at, now)

    def ended_before(self, request_id: str, started_by: float, ended_at: float) -> None:
        """The history stream says a session of ``request_id`` ended here, in an earlier
        process of this substation (killed before it acknowledged the request), and started by
        ``started_by``: a redelivery of the attempt it served is a duplicate, not a second
        session. What this process knows itself is not overwritten."""
        with self._lock:
            if request_id in self._active or request_id in self._uncertain:
                return
            if request_id in self._recently_completed:
                return
            self._remember_completed(request_id, started_by, ended_at, exact=False)

    def reported(self, request_id: str) -> None:
        """The broker confirmed the completion of ``request_id``."""
        with self._lock:
            session = self._uncertain.pop(request_id, None)
            if session is not None:
                assert session.completed_at is not None
                self._remember_completed(
                    request_id, session.request.accepted_at, session.completed_at
                )

    def report_failed(self, request_id: str) -> None:
        """The completion of ``request_id`` was not confirmed; it stays uncertain."""
        with self._lock:
            if len(self._uncertain) > self._remember:
                self._uncertain.popitem(last=False)

    def drop(self, request_id: str) -> Session[Token] | None:
        """Stop a session without completing it (its delivery's connection is gone)."""
        with self._lock:
            return self._active.pop(request_id, None)

    def drop_all(self) -> list[Session[Token]]:
        """Stop every session in progress without completing it: the connection their
        deliveries came on is lost, and the broker hands those requests to others."""
        with self._lock:
            dropped, self._active = list(self._active.values()), {}
            return dropped

    def cancel_counts(self) -> tuple[int, int]:
        with self._lock:
            return self.sessions_cancelled, self.cancelled_before_start

    def snapshot(self) -> tuple[int, int, int, int]:
        with self._lock:
            return len(self._active), self.received, self.completed, self.duplicates


class ChargingPointsCollector(Collector):
    """Exposes :class:`ChargingPoints` in the names the balancer reads (the contract)."""

    def __init__(
        self,
        points: ChargingPoints[Any],
        broker_connected: Callable[[], bool] = lambda: True,
        consuming: Callable[[], bool] = lambda: True,
    ):
        self._points = points
        self._broker_connected = broker_connected
        self._consuming = consuming

    def collect(self) -> Iterator:
        points = self._points
        connected = GaugeMetricFamily(
            "substation_broker_connected",
            "1 while connected to the broker with the queue declared and consumed",
            labels=["substation"],
        )
        connected.add_metric([points.substation_id], 1 if self._broker_connected() else 0)
        yield connected
        consuming = GaugeMetricFamily(
            contract.CONSUMING_METRIC,
            "1 while it consumes its queue (0 as a standby, or once it is leaving)",
            labels=["substation"],
        )
        consuming.add_metric([points.substation_id], 1 if self._consuming() else 0)
        yield consuming
        load, received, completed, duplicates = points.snapshot()
        labels = ["substation"]
        values = [points.substation_id]

        gauge = GaugeMetricFamily(
            contract.LOAD_METRIC, "Charging sessions running now", labels=labels
        )
        gauge.add_metric(values, load)
        yield gauge

        gauge = GaugeMetricFamily(
            contract.CAPACITY_METRIC,
            "Charging points (sessions that can run at once)",
            labels=labels,
        )
        gauge.add_metric(values, points.capacity)
        yield gauge

        info = GaugeMetricFamily(
            contract.INFO_METRIC,
            "Always 1; the instance_id label changes each time the substation process starts",
            labels=["substation", contract.INFO_INSTANCE_LABEL],
        )
        info.add_metric([points.substation_id, points.instance], 1)
        yield info

        counter = CounterMetricFamily(
            contract.RECEIVED_METRIC,
            "Requests delivered from this substation's queue",
            labels=labels,
        )
        counter.add_metric(values, received)
        yield counter

        counter = CounterMetricFamily(
            contract.COMPLETED_METRIC, "Charging sessions completed", labels=labels
        )
        counter.add_metric(values, completed)
        yield counter

        stopped, before_start = points.cancel_counts()
        counter = CounterMetricFamily(
            "substation_sessions_cancelled",
            "Charging sessions stopped by a cancel (counted in the completed sessions too)",
            labels=labels,
        )
        counter.add_metric(values, stopped)
        yield counter

        counter = CounterMetricFamily(
            "substation_requests_cancelled_before_start",
            "Requests delivered here that were cancelled before they started",
            labels=labels,
        )
        counter.add_metric(values, before_start)
        yield counter

        counter = CounterMetricFamily(
            "substation_duplicate_requests",
            "Deliveries of a request already charging or completed here (acknowledged, not "
            "charged twice)",
            labels=labels,
        )
        counter.add_metric(values, duplicates)
        yield counter
