"""The substation: takes requests from its own queue and runs one timed session for each.

The queue's prefetch equals the number of charging points, so the broker never hands the
substation more requests than it can charge at once; the rest wait in the queue. Sessions are
timers on the AMQP I/O loop, never sleeps, so heartbeats keep flowing however long they last.
A request is acknowledged only when its session has completed and the ``session.completed``
event is confirmed: a substation that dies mid-session gets the request back on restart.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Histogram, start_http_server

from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.dead_lettering import DeadLetterer
from smartgrid.events import EventPublisher, events_in
from substation.charging import Admission, ChargingPoints, ChargingPointsCollector, Session
from substation.config import SubstationConfig

log = logging.getLogger(__name__)

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class _Check:
    request: contract.RoutedRequest
    delivery: Delivery
    timer: object


class SubstationService:
    def __init__(self, config: SubstationConfig, *, registry=REGISTRY):
        self.config = config
        self.instance = uuid.uuid4().hex[:12]
        self.points: ChargingPoints[Delivery] = ChargingPoints(
            config.substation_id,
            config.capacity,
            self.instance,
            settleable=lambda delivery: self.link.is_current(delivery),
        )
        self._registry = registry
        self._wait = Histogram(
            "substation_wait_seconds",
            "From acceptance at the gateway to the start of the charging session",
            ["substation"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        ).labels(config.substation_id)
        self.queue = contract.substation_queue_name(config.substation_id)
        self.link = Link(
            config.amqp_url,
            name=f"substation-{config.substation_id}",
            topology=contract.core_topology() + contract.substation_topology(config.substation_id),
            consumers=[
                ConsumerSpec(
                    self.queue,
                    self._on_request,
                    prefetch=config.capacity,
                    on_poison=lambda d, e: self.dead_letters.poisoned(d, e, source=self.queue),
                ),
                ConsumerSpec(contract.SUBSTATION_EVENTS, self._on_event, auto_ack=True),
            ],
            on_ready=self._announce,
        )
        self.events = EventPublisher(self.link)
        self.dead_letters = DeadLetterer(self.link, self.events)
        registry.register(ChargingPointsCollector(self.points, lambda: self.link.ready))
        #: Possible duplicates waiting for the other substations' answers, by request id.
        self._checks: dict[str, _Check] = {}
        self._http: WSGIServer | None = None
        self._draining = False
        self._announce_timer: object | None = None

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self) -> None:
        self._http, _ = start_http_server(
            self.config.metrics_port, addr=self.config.metrics_bind, registry=self._registry
        )
        self.link.start()
        self.link.call_soon(self._schedule_announcements)
        log.info(
            "substation %s (instance %s): %d charging points, %.1fs sessions, metrics on :%d",
            self.config.substation_id,
            self.instance,
            self.config.capacity,
            self.config.session_seconds,
            self.config.metrics_port,
        )

    def stop(self) -> None:
        """Stop taking requests, let sessions that end within the grace period finish, then
        close; the broker returns the unfinished ones to the queue for a live substation."""
        drained = threading.Event()
        deadline = time.monotonic() + self.config.shutdown_grace
        self.link.call_soon(lambda: self._begin_drain(deadline, drained))
        drained.wait(self.config.shutdown_grace + 2)
        self.link.stop(timeout=5)
        if self._http is not None:
            self._http.shutdown()
        left = self.points.load
        if left:
            log.info("%d unfinished session(s) returned to the queue", left)

    # ------------------------------------------------------------------ I/O thread
    def _on_request(self, delivery: Delivery) -> None:
        try:
            request = contract.RoutedRequest.from_body(delivery.body)
        except contract.InvalidMessage as exc:
            self.dead_letters.dead_letter(
                delivery, reason=f"invalid routed request: {exc}", source=self.queue
            )
            return
        if request.substation != self.config.substation_id:
            self.dead_letters.dead_letter(
                delivery,
                reason=f"routed to {request.substation!r} but delivered to "
                f"{self.config.substation_id!r}",
                source=self.queue,
            )
            return
        now = time.time()
        admission, session = self.points.admit(
            request, delivery, now, self.config.session_seconds, redelivered=delivery.redelivered
        )
        if admission is Admission.DUPLICATE:
            log.info(
                "request %s is already charging or done here; acknowledging the duplicate",
                request.request_id,
            )
            self.link.ack(delivery)
            return
        if admission is Admission.ADOPTED:
            return  # the running session will acknowledge the new delivery when it ends
        if admission is Admission.CHECK:
            self._ask_the_fleet(request, delivery)
            return
        assert session is not None
        self._begin_session(request, session, now)

    def _begin_session(
        self, request: contract.RoutedRequest, session: Session[Delivery], now: float
    ) -> None:
        self._wait.observe(max(0.0, now - request.accepted_at))
        started = contract.SessionStarted(
            at=now,
            request_id=request.request_id,
            ev_id=request.ev_id,
            substation=request.substation,
            instance=self.instance,
            accepted_at=request.accepted_at,
            expected_end=session.expected_end,
        )
        self.events.publish(started)
        self.link.call_later(
            self.config.session_seconds, lambda: self._complete(request.request_id)
        )

    def _on_event(self, delivery: Delivery) -> None:
        for event in events_in(delivery):
            self._apply(event)

    def _apply(self, event: contract.Event) -> None:
        me = self.config.substation_id
        if isinstance(event, contract.BalancerStarted):
            self._announce()
        elif isinstance(event, contract.SessionLookup) and event.substation != me:
            reply = contract.SessionLookupReply(
                at=time.time(),
                request_id=event.request_id,
                asker=event.substation,
                substation=me,
                status=self.points.claimed_by(event.request_id, event.substation),
            )
            self.events.publish(reply)
        elif isinstance(event, contract.SessionLookupReply) and event.asker == me:
            check = self._checks.get(event.request_id)
            if check is not None and event.status in ("running", "completed"):
                log.info(
                    "request %s is %s at %s; acknowledging the duplicate",
                    event.request_id,
                    event.status,
                    event.substation,
                )
                self.link.cancel_timer(check.timer)
                del self._checks[event.request_id]
                self.points.count_duplicate()
                self.link.ack(check.delivery)

    def _ask_the_fleet(self, request: contract.RoutedRequest, delivery: Delivery) -> None:
        """A possible duplicate: ask whether another substation charges or charged it, and
        charge it only if none says so within DUPLICATE_CHECK_SECONDS."""
        if request.request_id in self._checks:
            self.points.count_duplicate()
            self.link.ack(delivery)  # a second copy while the first is being checked
            return
        lookup = contract.SessionLookup(
            at=time.time(), request_id=request.request_id, substation=self.config.substation_id
        )
        self.events.publish(lookup)
        timer = self.link.call_later(
            self.config.duplicate_check_seconds, lambda: self._nobody_has_it(request.request_id)
        )
        self._checks[request.request_id] = _Check(request, delivery, timer)

    def _nobody_has_it(self, request_id: str) -> None:
        check = self._checks.pop(request_id, None)
        if check is None:
            return
        now = time.time()
        session = self.points.start_checked(
            check.request, check.delivery, now, self.config.session_seconds
        )
        self._begin_session(check.request, session, now)

    def _complete(self, request_id: str) -> None:
        session = self.points.finish(request_id)
        if session is None:
            return
        request = session.request
        completed = contract.SessionCompleted(
            at=time.time(),
            request_id=request.request_id,
            ev_id=request.ev_id,
            substation=request.substation,
            instance=self.instance,
            started_at=session.started_at,
        )
        confirmation = self.events.publish(completed)
        # Acknowledge after the event is confirmed: if we die in between, the request comes
        # back, and the completed-set (or, after a restart, a repeat session) settles it.
        confirmation.add_done_callback(lambda _f: self._acknowledge(session))

    def _acknowledge(self, session: Session[Delivery]) -> None:
        if not self.link.ack(session.token):
            log.info(
                "request %s completed but its delivery's channel is gone; the redelivery will be "
                "acknowledged as a duplicate",
                session.request.request_id,
            )

    def _announce(self) -> None:
        if self._draining:
            return
        announcement = contract.SubstationAnnounced(
            at=time.time(),
            substation=self.config.substation_id,
            instance=self.instance,
            capacity=self.config.capacity,
            metrics_url=self.config.advertised_metrics_url,
            session_seconds=self.config.session_seconds,
        )
        self.events.publish(announcement, reliable=False)

    def _schedule_announcements(self) -> None:
        if self.link.ready:
            self._announce()
        if not self._draining:
            self._announce_timer = self.link.call_later(
                self.config.announce_interval, self._schedule_announcements
            )

    def _begin_drain(self, deadline: float, drained: threading.Event) -> None:
        self._draining = True
        if self._announce_timer is not None:
            self.link.cancel_timer(self._announce_timer)
        self.link.cancel_consumers()
        leaving = contract.SubstationLeaving(
            at=time.time(), substation=self.config.substation_id, instance=self.instance
        )
        self.events.publish(leaving, reliable=False)
        self._wait_for_sessions(deadline, drained)

    def _wait_for_sessions(self, deadline: float, drained: threading.Event) -> None:
        if self.points.load == 0 or time.monotonic() >= deadline:
            drained.set()
            return
        self.link.call_later(0.05, lambda: self._wait_for_sessions(deadline, drained))
