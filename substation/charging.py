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
reported again (consumers take an identical event once), and a lookup gets "unknown".
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
        self._recently_completed: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Completed here, report unconfirmed (see the module's docstring).
        self._uncertain: collections.OrderedDict[str, Session[Token]] = collections.OrderedDict()
        self._remember = remember
        self.received = 0
        self.completed = 0
        self.duplicates = 0
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
            if request.request_id in self._active or request.request_id in self._recently_completed:
                self.duplicates += 1
                return Admission.DUPLICATE, None
            uncertain = self._uncertain.get(request.request_id)
            if uncertain is not None:
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

    def count_duplicate(self) -> None:
        with self._lock:
            self.duplicates += 1

    def claimed_by(self, request_id: str, substation: str) -> str:
        """Another substation asked about ``request_id``; remember it and say what we know."""
        with self._lock:
            self._claims[request_id] = substation
            if len(self._claims) > self._remember:
                self._claims.popitem(last=False)
            if request_id in self._active:
                return "running"
            if request_id in self._recently_completed:
                return "completed"
            # An uncertain completion may never have reached anyone: not "completed".
            return "unknown"

    def _remember_completed(self, request_id: str) -> None:
        self._recently_completed[request_id] = None
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

    def reported(self, request_id: str) -> None:
        """The broker confirmed the completion of ``request_id``."""
        with self._lock:
            if self._uncertain.pop(request_id, None) is not None:
                self._remember_completed(request_id)

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

        counter = CounterMetricFamily(
            "substation_duplicate_requests",
            "Deliveries of a request already charging or completed here (acknowledged, not "
            "charged twice)",
            labels=labels,
        )
        counter.add_metric(values, duplicates)
        yield counter
