"""The substation: takes requests from its own queue and runs one timed session for each.

The queue's prefetch equals the number of charging points, so the broker never hands the
substation more requests than it can charge at once; the rest wait in the queue. Sessions are
timers on the AMQP I/O loop, never sleeps, so heartbeats keep flowing however long they last.
A request is acknowledged only when its session has completed and the ``session.completed``
event is confirmed: a substation that dies mid-session gets the request back on restart.

Fencing: a session lives as long as the broker connection its delivery came on. When that
connection is lost (the broker gives the request to another consumer: this substation when it
is back, or the balancer moving it elsewhere), every session in progress is dropped, and its
completion, bound to that connection, is never sent on a later one. The queue has a single
active consumer, and a process that finds its queue consumed already waits as a standby.

Power (issue 15, ``substation/sharing.py``): every start and end of a session, every share
from the allocator (``power.share``, on the substation's own share queue) and the running out
of a share's lease re-shares the limit in force among the sessions, publishes
``session.power`` for each session whose power changed, and re-arms each changed session's
end timer: a session ends when its energy has been delivered. ``power.demand`` goes out after
DEMAND_INTERVAL without one and, once the substation is managed (it knows a parent or took a
share: the allocator divides power by these reports), on every change (at most once per
DEMAND_MIN_INTERVAL), at once when it takes a lower share (the allocator holds the power given
up until it is acknowledged), and on every change while its share binds or its sessions leave
more of it unused than it last reported, or when it gives part of its share back
(``PowerSharing.report_at_once``: power lost or unfairly shared until the allocator knows),
from the process that consumes the queue.

Cancellation (docs/driver-contract.md): ``request.cancel_requested`` reaches every substation
(its event subscription). The one that charges the request stops the session (its point is
free at once, and its power goes to the others), one that holds it as a possible duplicate
drops it, and any other remembers the cancel in its :class:`CancelBook`, for a request still
waiting in its queue: on delivery it is not charged. Either way it publishes
``request.cancelled`` and acknowledges the request once that is confirmed. At start, before it
consumes its queue, it replays the last CANCEL_LOOKBACK seconds of the history stream into the
book, so that a cancel made while it was down is obeyed too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Histogram, start_http_server

from smartgrid import contract, leases, share_stamps
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.amqp.streams import StreamReader, since
from smartgrid.dead_lettering import DeadLetterer
from smartgrid.events import EventPublisher, events_in
from smartgrid.power import CLASS_ORDER, kilowatts, watts
from smartgrid.senders import Senders
from smartgrid.told import Told
from substation.cancels import CancelAction, CancelBook, cancelled
from substation.charging import Admission, ChargingPoints, ChargingPointsCollector, Session
from substation.config import SubstationConfig
from substation.power_metrics import PowerCollector
from substation.roster import Roster
from substation.sharing import Change, Ended, PowerSharing

log = logging.getLogger(__name__)

#: How often a standby looks whether its queue is free.
STANDBY_RETRY = 2.0

#: The history's events that matter to the cancel book: the cancels, and the ends of requests
#: (after which a cancel has nothing left to do).
HISTORY_KINDS = frozenset(
    cls.kind
    for cls in (
        contract.CancelRequested,
        contract.RequestCancelled,
        contract.SessionCompleted,
        contract.RequestRejected,
        contract.RequestDeadLettered,
    )
)

#: A cancel that arrives this long after a session of its request ended here is for a later
#: attempt of the id (a key used again after the TTL), so it is remembered, not ignored.
CANCEL_AFTER_END = 300.0

#: Silence that tells the history replay the stream is empty (see smartgrid/amqp/streams.py).
HISTORY_QUIET = 1.0

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class _Check:
    """A possible duplicate, held while the other substations are asked about it."""

    request: contract.RoutedRequest
    delivery: Delivery
    timer: object
    #: The substation that last said it is charging the request. A round it misses (its
    #: connection blinked; the lookup waits in its durable subscription) is no reason to
    #: charge: only its "unknown", or its leaving the roster, is.
    running_at: str | None = None


class SubstationService:
    def __init__(self, config: SubstationConfig, *, registry=REGISTRY):
        self.config = config
        self.instance = uuid.uuid4().hex[:12]
        self.points: ChargingPoints[Delivery] = ChargingPoints(
            config.substation_id, config.capacity, self.instance
        )
        #: Its sessions' events, told again when a gateway doubts the history (smartgrid/told.py).
        self.told = Told()
        #: Other substations that announced themselves lately: whose lookups are trusted.
        self.roster = Roster(live_for=3 * config.announce_interval)
        self.sharing = PowerSharing(
            config.substation_id,
            limit_w=watts(config.limit_kw),
            failsafe_w=watts(config.failsafe_kw),
            parent=config.parent or None,
            session_seconds=config.session_seconds,
            hour_seconds=config.simulated_hour_seconds,
            started_at=time.time(),
            skew_seconds=leases.CLOCK_SKEW_SECONDS,
        )
        self._registry = registry
        self._wait = Histogram(
            contract.WAIT_METRIC,
            "From acceptance at the gateway to the start of the charging session",
            ["substation", contract.PRIORITY_LABEL],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        for priority in CLASS_ORDER:  # every series from the start, zero until it has data
            self._wait.labels(config.substation_id, priority.value)
        self.queue = contract.substation_queue_name(config.substation_id)
        history = contract.history_topology(
            max_age_seconds=contract.HISTORY_MAX_AGE_SECONDS, max_bytes=contract.HISTORY_MAX_BYTES
        )
        self.link = Link(
            config.amqp_url,
            name=f"substation-{config.substation_id}",
            topology=contract.topology(contract.core_topology(), declare=config.declare_topology)
            # Checked here where the broker's definitions declare it; else the history reader
            # declares it if it is missing (the gateways' retention settings win).
            + ([] if config.declare_topology else contract.topology(history, declare=False))
            + contract.topology(
                contract.substation_topology(config.substation_id), declare=config.declare_queue
            ),
            # Its own queue is consumed once the history is replayed and nobody else consumes
            # it (_take_the_queue).
            consumers=[
                ConsumerSpec(contract.SUBSTATION_EVENTS, self._on_event, ack_when_handled=True)
            ],
            on_ready=self._on_ready,
            on_lost=self._connection_lost,
            min_turn_interval=config.min_turn_interval,
            # A managed substation's turns carry power on the move between substations (its
            # reports, its acknowledgements, the shares it takes): the cars wait for each hop.
            pace_while=lambda: not self.sharing.lease.managed,
        )
        #: Cancels for requests not delivered here (yet).
        self.cancels = CancelBook()
        # Its event subscription hears the cancels from now on; the replay covers the time
        # before it existed.
        self.history = StreamReader(
            self.link,
            contract.HISTORY_STREAM,
            self._on_history,
            start=since(config.cancel_lookback),
            on_caught_up=self._take_the_queue,
            follow=False,
            quiet=HISTORY_QUIET,
            declare_if_missing=history if config.declare_topology else (),
        )
        self._requests = ConsumerSpec(
            self.queue,
            self._on_request,
            prefetch=config.capacity,
            on_poison=lambda d, e: self.dead_letters.poisoned(d, e, source=self.queue),
        )
        # Its share queue is exclusive to the connection that consumes it, so it is declared
        # with the consumer, by the process that holds the substation's queue (a standby's
        # declaration would be refused).
        self._shares_topology = contract.topology(
            [contract.Exchange(contract.POWER_EXCHANGE, "direct")],
            declare=config.declare_topology,
        ) + [
            d
            for d in contract.power_share_topology(config.substation_id)
            if not isinstance(d, contract.Exchange)
        ]
        self._shares = ConsumerSpec(
            contract.power_share_queue_name(config.substation_id), self._on_share, auto_ack=True
        )
        self._consuming = False
        self._standby_logged = False
        #: A standby found the queue free and reads the history again before it consumes.
        self._reread_for_takeover = False
        self.senders = Senders(config.event_senders, own_user=self.link.user)
        self.events = EventPublisher(self.link)
        self.dead_letters = DeadLetterer(self.link, self.events)
        registry.register(
            ChargingPointsCollector(
                self.points, lambda: self.link.ready, lambda: self._consuming and self.link.ready
            )
        )
        #: Possible duplicates waiting for the other substations' answers, by request id.
        self._checks: dict[str, _Check] = {}
        #: The timer that ends each session in progress, by request id (re-armed whenever
        #: its power changes).
        self._timers: dict[str, object] = {}
        registry.register(PowerCollector(self.sharing))
        self._lease_timer: object | None = None
        self._lease_timer_at: float | None = None
        self._report_timer: object | None = None
        #: When the pending report goes out (time.monotonic), if one is pending.
        self._report_due = 0.0
        self._last_report = float("-inf")
        #: The report that goes out when DEMAND_INTERVAL has passed without one.
        self._quiet_timer: object | None = None
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
        self.link.call_soon(self._report_soon)
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
        if not self.points.holds(request) and self.cancels.on_delivery(
            request.request_id, request.accepted_at
        ):
            log.info("request %s was cancelled before it started", request.request_id)
            self.points.count_received(redelivered=delivery.redelivered)
            self._cancel_unstarted(request, delivery)
            return
        if request.request_id in self._checks:
            # A copy of it is held here while the fleet is asked: that one is charged, or
            # acknowledged as a duplicate, for both. Admitted, this one charged beside it.
            self.points.count_received(redelivered=delivery.redelivered)
            self.points.count_duplicate()
            self.link.ack(delivery)
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
        if admission is Admission.REPORT:
            assert session is not None
            log.info("request %s completed here; reporting it again", request.request_id)
            self._report(session)
            return
        if admission is Admission.CHECK:
            self._ask_the_fleet(request, delivery)
            return
        assert session is not None
        self._begin_session(request, session, now)

    def _begin_session(
        self, request: contract.RoutedRequest, session: Session[Delivery], now: float
    ) -> None:
        power = request.power()
        self._wait.labels(self.config.substation_id, power.priority.value).observe(
            max(0.0, now - request.accepted_at)
        )
        self.sharing.add(request.request_id, power, now)
        self._reshare(now, starting=request)

    def _started(self, request: contract.RoutedRequest, change: Change, now: float) -> None:
        power = request.power()
        started = contract.SessionStarted(
            at=now,
            request_id=request.request_id,
            ev_id=request.ev_id,
            substation=request.substation,
            instance=self.instance,
            accepted_at=request.accepted_at,
            expected_end=change.expected_end,
            max_kw=power.max_kw,
            min_kw=power.min_kw,
            priority=power.priority.value,
            power_kw=kilowatts(change.power_w),
        )
        self.events.publish(started)
        self.told.told(started)

    # ------------------------------------------------------------------ power (I/O thread)
    def _reshare(self, now: float, starting: contract.RoutedRequest | None = None) -> None:
        """Share the limit in force among the sessions; tell who changed; re-arm the timers.
        Called on every start and end of a session, grant, and lease running out."""
        for change in self.sharing.reshare(now):
            if change.started:
                assert starting is not None and starting.request_id == change.request_id
                self._started(starting, change, now)
            else:
                self.events.publish(
                    contract.SessionPower(
                        at=now,
                        request_id=change.request_id,
                        substation=self.config.substation_id,
                        instance=self.instance,
                        power_kw=kilowatts(change.power_w),
                        expected_end=change.expected_end,
                    )
                )
            self._arm_end_timer(change.request_id, change.expected_end, now)
        self._arm_lease_timer(now)
        if not self.sharing.lease.managed:
            # Nobody hands it shares: a change's report would tell the allocator nothing, and
            # the router's view follows each session from its events (balancer/power_fleet.py),
            # so the periodic report is enough (issue 16: a count-only deployment pays nothing
            # per request for power). A first share makes it managed for good.
            return
        # While the share binds or is left unused, power is lost or unfairly shared until the
        # allocator knows: no waiting for DEMAND_MIN_INTERVAL then.
        self._report_soon(at_once=self.sharing.report_at_once())

    def _arm_end_timer(self, request_id: str, end: float | None, now: float) -> None:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            self.link.cancel_timer(timer)
        if end is not None:  # None: paused, it ends only once it has power again
            self._timers[request_id] = self.link.call_later(
                max(0.0, end - now), lambda: self._energy_delivered(request_id)
            )

    def _energy_delivered(self, request_id: str) -> None:
        self._timers.pop(request_id, None)
        now = time.time()
        due = self.sharing.due(request_id, now)
        if due is not None:  # the wall clock and the timer disagree by more than a little
            self._arm_end_timer(request_id, due, now)
            return
        self._complete(request_id)

    def _session_over(self, request_id: str, now: float, *, reshare: bool = True) -> Ended | None:
        """A session ends here, whatever the reason (its energy delivered, cancelled, its
        connection lost): its timer goes, its power goes to the others (unless the caller
        re-shares once for several). What it delivered."""
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            self.link.cancel_timer(timer)
        ended = self.sharing.remove(request_id, now)
        if ended is not None and reshare:
            self._reshare(now)
        return ended

    def _arm_lease_timer(self, now: float) -> None:
        """Re-share when the share in force runs out: the failsafe applies from then on."""
        expires_at = self.sharing.lease_expires_at(now)
        if expires_at == self._lease_timer_at:
            return
        if self._lease_timer is not None:
            self.link.cancel_timer(self._lease_timer)
            self._lease_timer = None
        self._lease_timer_at = expires_at
        if expires_at is not None:
            # A little late rather than early: the lease holds until expires_at exactly.
            self._lease_timer = self.link.call_later(
                max(0.0, expires_at - now) + 0.001, self._lease_ran_out
            )

    def _lease_ran_out(self) -> None:
        self._lease_timer = None
        self._lease_timer_at = None
        self._reshare(time.time())  # re-arms itself if the wall clock says not quite yet

    def _consume_shares(self) -> None:
        """This substation's share queue, on the connection that consumes its requests (the
        queue is exclusive to it, and only the newest share in it matters)."""
        self.link.declare(self._shares_topology)
        self.link.add_consumer(self._shares)

    def _on_share(self, delivery: Delivery) -> None:
        try:
            grant = leases.grant_from_message(contract.PowerShare.from_body(delivery.body))
        except contract.InvalidMessage as exc:
            log.warning("ignoring an invalid power share: %s", exc)
            return
        now = time.time()
        log.debug(
            share_stamps.SHARE_RECEIVED,
            kilowatts(grant.share_w),
            grant.issued_at,
            now,
        )
        managed = self.sharing.lease.managed
        previous = self.sharing.lease.last_grant
        if not self.sharing.offer(grant, now):
            log.debug("power share %s refused (stale, expired, or from before a restart)", grant)
            return
        if not managed:
            log.warning(
                "receiving shares of a parent's limit, but no parent configured: "
                "set SUBSTATION_PARENT (or GRID_TOPOLOGY_FILE) so that it draws only its "
                "failsafe until the first share arrives"
            )
        self._reshare(now)
        if leases.acknowledge_at_once(previous, grant):
            # The allocator holds back the power this share gave up until it hears that it
            # was taken: waiting for the next report would waste it meanwhile.
            self._report_soon(at_once=True)

    def _report_soon(self, *, at_once: bool = False) -> None:
        """A ``power.demand`` report at the end of this I/O-loop turn (one for all the changes
        of the turn), or, within DEMAND_MIN_INTERVAL of the last one, at its end (one for all
        the changes until then): under load every turn changes something, and each report is
        a quorum-queue message and two deliveries to each balancer. ``at_once``: at the end
        of this turn whatever the interval says."""
        now = time.monotonic()
        due = now if at_once else self._last_report + self.config.demand_min_interval
        if self._report_timer is not None:
            if self._report_due <= due:
                return  # one is coming as soon
            self.link.cancel_timer(self._report_timer)
        self._report_due = max(now, due)
        self._report_timer = self.link.call_later(self._report_due - now, self._publish_report)

    def _publish_report(self) -> None:
        self._report_timer = None
        self._last_report = time.monotonic()
        self._report_when_quiet()
        if not self._consuming or not self.link.ready:
            # Only the process that holds the queue (and its share queue) speaks for the
            # substation: a standby's empty report would mislead the allocator.
            return
        report, limit_in_force_w, power_w = self.sharing.report(time.time())
        event = leases.report_to_event(
            report, instance=self.instance, limit_in_force_w=limit_in_force_w, power_w=power_w
        )
        self.events.publish(event, reliable=False)  # only worth something now

    def _report_when_quiet(self) -> None:
        """The next report DEMAND_INTERVAL after this one, unless a change sends one sooner.
        The allocator needs to hear from each substation well within a lease (a longer
        silence stands it down), not on a fixed cadence: while sessions start and end, the
        changes report already, and a periodic report beside them was a quorum-queue message
        and two deliveries to each balancer that said nothing new (issue 16)."""
        if self._quiet_timer is not None:
            self.link.cancel_timer(self._quiet_timer)
        self._quiet_timer = self.link.call_later(self.config.demand_interval, self._quiet)

    def _quiet(self) -> None:
        self._quiet_timer = None
        self._report_soon()

    def _on_event(self, delivery: Delivery) -> None:
        for event in events_in(delivery, self.senders):
            self._apply(event)

    def _on_history(self, delivery: Delivery) -> None:
        if delivery.routing_key not in HISTORY_KINDS:
            return  # the requests themselves, and events that do not end one
        for event in events_in(delivery, self.senders):
            if isinstance(event, contract.CancelRequested):
                self._cancel_requested(event)
                continue
            self.cancels.replay([event])
            if (
                isinstance(event, contract.SessionCompleted | contract.RequestCancelled)
                and event.substation == self.config.substation_id
            ):
                # Ended here, by a process of this substation killed before its ack: the
                # request is redelivered to this one, and must not charge a second time.
                started = event.started_at if event.started_at is not None else event.at
                self.points.ended_before(event.request_id, started, event.at)

    def _apply(self, event: contract.Event) -> None:
        me = self.config.substation_id
        now = time.time()
        if isinstance(event, contract.CancelRequested):
            self._cancel_requested(event)
        elif isinstance(event, contract.StatusRequested):
            for told in self.told.again(event.request_id, now):
                log.info("%s of %s published again: a gateway asked", told.kind, event.request_id)
                self.events.publish(told)
        elif isinstance(event, contract.BalancerStarted):
            self._announce()
        elif isinstance(event, contract.SubstationAnnounced):
            if self.roster.announced(event, now) and event.substation != me:
                # A newcomer knows no one yet: tell it of this one now, not at the next round.
                self._announce()
        elif isinstance(event, contract.SubstationLeaving):
            self.roster.leaving(event)
        elif isinstance(event, contract.SessionLookup) and event.substation != me:
            if not self._from_live(event, now):
                return
            check = self._checks.get(event.request_id)
            status = self.points.claimed_by(
                event.request_id, event.substation, checking=check is not None
            )
            if check is not None and status == "unknown":
                # The asker holds a copy too, and its id is the lower: it charges it (it
                # answers this one "running"). This copy waits for its "completed".
                check.running_at = event.substation
            if not self._consuming:
                # The claim is remembered, but only the process that holds the queue speaks
                # for the substation: a standby's (or a reconnecting one's) "unknown" would
                # tell the asker that a session running here had ended.
                return
            reply = contract.SessionLookupReply(
                at=time.time(),
                request_id=event.request_id,
                asker=event.substation,
                substation=me,
                status=status,
            )
            self.events.publish(reply)
        elif isinstance(event, contract.SessionLookupReply) and event.asker == me:
            check = self._checks.get(event.request_id)
            if check is None or not self._from_live(event, now):
                return
            if event.status == "running":
                # Acknowledged only once a session has completed somewhere: keep it, and
                # ask again later (charging it once that substation says it no longer charges
                # it, or leaves the roster).
                check.running_at = event.substation
                return
            if event.status != "completed":
                if check.running_at == event.substation:
                    check.running_at = None  # its session was dropped (its connection lost)
                return
            log.info(
                "request %s was completed at %s; acknowledging the duplicate",
                event.request_id,
                event.substation,
            )
            self.link.cancel_timer(check.timer)
            del self._checks[event.request_id]
            self.points.count_duplicate()
            self.link.ack(check.delivery)

    # ------------------------------------------------------------------ cancels (I/O thread)
    def _cancel_requested(self, event: contract.CancelRequested) -> None:
        request_id = event.request_id
        ended_at = self.points.ended_at(request_id)
        action = self.cancels.on_cancel_requested(
            request_id,
            charging=self.points.session(request_id) is not None,
            checking=request_id in self._checks,
            completed=ended_at is not None and ended_at + CANCEL_AFTER_END >= event.at,
            at=event.at,
        )
        if action is CancelAction.STOP_SESSION:
            self._stop_session(request_id, event)
        elif action is CancelAction.DROP_CHECK:
            check = self._checks.pop(request_id)
            if check.timer is not None:
                self.link.cancel_timer(check.timer)
            log.info("request %s cancelled while checked as a possible duplicate", request_id)
            self._cancel_unstarted(check.request, check.delivery)
        elif action is CancelAction.IGNORE:
            log.info("cancel of %s ignored: it ended here already", request_id)

    def _stop_session(self, request_id: str, event: contract.CancelRequested) -> None:
        """Stop a session in progress: its point is free now, its power goes to the others,
        and the delivery is acknowledged once request.cancelled is confirmed."""
        session = self.points.session(request_id)
        assert session is not None
        now = time.time()
        if not self.link.is_current(session.token):
            # Its connection is gone (the loss not yet handled): when the request comes back,
            # the cancel stops it before it starts.
            self.points.drop(request_id)
            self._session_over(request_id, now)
            self.cancels.on_cancel_requested(
                request_id, charging=False, checking=False, completed=False, at=event.at
            )
            return
        stopped = self.points.stop(request_id, now)
        assert stopped is not None
        ended = self._session_over(request_id, now)
        if ended is not None:
            stopped.energy_kwh, stopped.paused_seconds = ended.energy_kwh, ended.paused_seconds
        log.info("session of %s stopped by a cancel", request_id)
        self._report(stopped)

    def _cancel_unstarted(self, request: contract.RoutedRequest, delivery: Delivery) -> None:
        """Publish request.cancelled for a request that never started here, then acknowledge
        it (on its own channel); unconfirmed, the cancel is remembered for its redelivery."""
        now = time.time()
        event = cancelled(request, instance=self.instance, now=now)
        confirmation = self.events.publish(event, generation=delivery.generation)

        def settle(confirmation: Future) -> None:
            if confirmation.exception() is not None:
                log.warning(
                    "cancel of %s not confirmed (%s); obeyed again when it comes back",
                    request.request_id,
                    confirmation.exception(),
                )
                self.cancels.on_cancel_requested(
                    request.request_id, charging=False, checking=False, completed=False
                )
                return
            self.points.cancelled_unstarted(request, now)
            self.told.told(event)
            self.link.ack(delivery)

        confirmation.add_done_callback(settle)

    def _from_live(
        self, event: contract.SessionLookup | contract.SessionLookupReply, now: float
    ) -> bool:
        """Whether ``event`` comes from a substation on the roster (else it is logged)."""
        if self.roster.is_live(event.substation, now):
            return True
        log.warning(
            "ignoring a %s about %s from %s, which is not a live substation",
            event.kind,
            event.request_id,
            event.substation,
        )
        return False

    def _ask_the_fleet(self, request: contract.RoutedRequest, delivery: Delivery) -> None:
        """A possible duplicate: ask whether another substation charges or charged it. It is
        acknowledged when one says it completed it, and charged here when none says it is
        charging it within DUPLICATE_CHECK_SECONDS of a question (one that said so earlier:
        once it says it no longer does, or leaves the roster)."""
        self._checks[request.request_id] = _Check(request, delivery, timer=None)
        self._ask(request.request_id)

    def _ask(self, request_id: str) -> None:
        check = self._checks.get(request_id)
        if check is None:
            return
        lookup = contract.SessionLookup(
            at=time.time(), request_id=request_id, substation=self.config.substation_id
        )
        self.events.publish(lookup)
        check.timer = self.link.call_later(
            self.config.duplicate_check_seconds, lambda: self._answers_in(request_id)
        )

    def _answers_in(self, request_id: str) -> None:
        check = self._checks.get(request_id)
        if check is None:
            return
        if check.running_at is not None and self.roster.is_live(check.running_at, time.time()):
            check.timer = self.link.call_later(
                max(self.config.duplicate_check_seconds, self.config.session_seconds / 4),
                lambda: self._ask(request_id),
            )
            return
        del self._checks[request_id]
        now = time.time()
        session = self.points.start_checked(
            check.request, check.delivery, now, self.config.session_seconds
        )
        self._begin_session(check.request, session, now)

    def _complete(self, request_id: str) -> None:
        self._timers.pop(request_id, None)
        session = self.points.session(request_id)
        if session is None:
            return
        now = time.time()
        if not self.link.is_current(session.token):
            # Its connection is gone (the loss not yet handled): the request is someone
            # else's now.
            self.points.drop(request_id)
            self._session_over(request_id, now)
            log.warning("session of %s dropped: its connection is gone", request_id)
            return
        session = self.points.finish(request_id, now)
        assert session is not None
        ended = self._session_over(request_id, now)
        if ended is not None:
            session.energy_kwh, session.paused_seconds = ended.energy_kwh, ended.paused_seconds
        self._report(session)

    def _report(self, session: Session[Delivery]) -> None:
        """Publish the session's completion on its delivery's connection; acknowledge the
        delivery once the broker has confirmed it, on that same channel."""
        request = session.request
        assert session.completed_at is not None
        end: contract.SessionCompleted | contract.RequestCancelled
        if session.cancelled:
            end = cancelled(
                request,
                instance=self.instance,
                now=session.completed_at,
                started_at=session.started_at,
            )
        else:
            end = self._completed_event(session)
        delivery = session.token
        confirmation = self.events.publish(end, generation=delivery.generation)
        confirmation.add_done_callback(lambda f: self._reported(f, end, delivery))

    def _completed_event(self, session: Session[Delivery]) -> contract.SessionCompleted:
        request = session.request
        assert session.completed_at is not None
        return contract.SessionCompleted(
            at=session.completed_at,
            request_id=request.request_id,
            ev_id=request.ev_id,
            substation=request.substation,
            instance=self.instance,
            started_at=session.started_at,
            energy_kwh=session.energy_kwh,
            paused_seconds=session.paused_seconds,
        )

    def _reported(
        self,
        confirmation: Future,
        end: contract.SessionCompleted | contract.RequestCancelled,
        delivery: Delivery,
    ) -> None:
        request_id = end.request_id
        if confirmation.exception() is not None:
            self.points.report_failed(request_id)
            log.warning(
                "completion of %s not confirmed (%s); reported again if it comes back here",
                request_id,
                confirmation.exception(),
            )
            return
        self.points.reported(request_id)
        self.told.told(end)
        if not self.link.ack(delivery):
            log.info(
                "request %s completed but its delivery's channel is gone; the redelivery will be "
                "acknowledged as a duplicate",
                request_id,
            )

    def _on_ready(self) -> None:
        # The queue is taken once the history is replayed (on_caught_up).
        self.history.on_ready()

    def _connection_lost(self) -> None:
        """Fencing: the broker hands this connection's deliveries to others now."""
        self.history.on_lost()
        self._consuming = False
        self._reread_for_takeover = False
        dropped = self.points.drop_all()
        now = time.time()
        for session in dropped:
            self._session_over(session.request.request_id, now, reshare=False)
        self._reshare(now)
        for check in self._checks.values():
            if check.timer is not None:
                self.link.cancel_timer(check.timer)
        held = len(self._checks)
        self._checks.clear()
        if dropped or held:
            log.warning(
                "broker connection lost: dropped %d session(s) in progress and %d held "
                "request(s); the broker hands them to others",
                len(dropped),
                held,
            )

    def _take_the_queue(self) -> None:
        """Consume the queue once nobody else does: another process with this id, or the
        balancer moving its requests elsewhere, makes this one wait as a standby."""
        if self._draining or self._consuming or not self.history.caught_up:
            return
        if not self.link.inspect_queue(self.queue, self._queue_inspected):
            return

    def _queue_inspected(self, _messages: int, consumers: int) -> None:
        if self._draining or self._consuming or not self.link.ready:
            return
        if consumers:
            self._reread_for_takeover = False
            if not self._standby_logged:
                log.warning(
                    "%s already has a consumer (another process with SUBSTATION_ID=%s, or the "
                    "balancer moving its requests elsewhere): waiting as a standby",
                    self.queue,
                    self.config.substation_id,
                )
                self._standby_logged = True
            self.link.call_later(STANDBY_RETRY, self._take_the_queue)
            return
        if self._standby_logged and not self._reread_for_takeover:
            # Another process of this substation held the queue while this one stood by: what
            # it ended (then killed before its ack, its request comes back here) is in the
            # history since this one's replay. Read that first (_on_history), then take it.
            self._reread_for_takeover = True
            self.history.read_again()
            return
        if self.link.add_consumer(self._requests) is None:
            return
        self._consuming = True
        self._reread_for_takeover = False
        self._consume_shares()
        if self._standby_logged:
            log.info("%s is free: consuming it", self.queue)
            self._standby_logged = False
        self._announce()

    def _announce(self) -> None:
        if self._draining or not self._consuming:
            return
        announcement = contract.SubstationAnnounced(
            at=time.time(),
            substation=self.config.substation_id,
            instance=self.instance,
            capacity=self.config.capacity,
            metrics_url=self.config.advertised_metrics_url,
            session_seconds=self.config.session_seconds,
            limit_kw=self.config.limit_kw,
            failsafe_kw=self.config.failsafe_kw,
            parent=self.config.parent or None,
        )
        self.events.publish(announcement, reliable=False)

    def _schedule_announcements(self) -> None:
        self.roster.forget_silent(time.time())
        if self.link.ready:
            self._announce()
        if not self._draining:
            self._announce_timer = self.link.call_later(
                self.config.announce_interval, self._schedule_announcements
            )

    def _begin_drain(self, deadline: float, drained: threading.Event) -> None:
        self._draining = True
        self._consuming = False
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
