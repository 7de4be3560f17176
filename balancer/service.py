"""The balancer: takes pending requests, picks a substation, forwards, then acknowledges.

Consume-transform-republish in RabbitMQ Shovel's ``on-confirm`` mode: a pending request is
acknowledged only after the substation's queue has confirmed the forwarded copy and the
history has confirmed ``request.routed``, so a crash at any point leaves it in the pending
queue (at worst it is forwarded twice; substations deduplicate by request id). Confirms are
asynchronous, so many requests are in flight at once.

One balancer at a time consumes the pending queue (single active consumer), after replaying
the history stream into its ledger (balancer.ledger): it decides, per request, whether it takes
its car (route it), finds the car held by another (``request.rejected`` ev_busy), was cancelled
before it was forwarded (``request.cancelled``), or is a copy of one already decided
(acknowledged, nothing said). Each decision's event is confirmed before the request is
acknowledged, so a balancer that takes over reads it in the history.

This module is the wiring; the decisions are elsewhere and pure: which substation
(balancer.power_routing over balancer.fleet's estimates and balancer.power_fleet's power view,
or a count-only strategy of balancer.strategies), which requests wait, the order held ones are
released in and what follows a failed forward (balancer.dispatch, balancer.priorities), which
dead substations are drained and when a forgotten one's queue is deleted (balancer.draining).
The share allocator runs beside it on a connection of its own (balancer.allocator).
"""

from __future__ import annotations

import collections
import functools
import logging
import random
import socket
import time
import uuid
from concurrent.futures import Future
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from balancer.allocator import Allocator
from balancer.config import BalancerConfig, parse_static_substations
from balancer.decoded_once import DecodedOnce
from balancer.dispatch import (
    RETRY_REFUSED_AFTER,
    AfterFailedForward,
    HeldRequests,
    after_failed_forward,
)
from balancer.draining import Draining, Retirement
from balancer.fleet import Fleet
from balancer.ledger import EvLedger, Verdict
from balancer.legacy_pending import LegacyPendingMover
from balancer.poller import Poller, PollerCollector, PollResult
from balancer.power_fleet import PowerView, need_of
from balancer.power_routing import POWER_MIN, power_min
from balancer.strategies import Candidate, make_strategy
from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.amqp.streams import StreamReader
from smartgrid.dead_lettering import DeadLetterer
from smartgrid.events import EventPublisher, events_in
from smartgrid.limits import LimitOverrides
from smartgrid.power import CLASS_ORDER
from smartgrid.senders import Senders
from smartgrid.told import Told

log = logging.getLogger(__name__)

#: Silence that tells the history replay the stream is empty (see smartgrid/amqp/streams.py).
HISTORY_QUIET = 1.0
#: What the ledger reads of the history: the events about requests (not the requests).
HISTORY_KINDS = frozenset(cls.kind for cls in contract.HISTORY_EVENTS)


class BalancerMetrics:
    def __init__(self, registry=REGISTRY):
        self.routed = Counter(
            "balancer_routed_requests",
            "Requests forwarded to a substation (confirmed)",
            ["substation"],
            registry=registry,
        )
        self.estimated_load = Gauge(
            "balancer_estimated_load",
            "The balancer's current estimate of each substation's load",
            ["substation"],
            registry=registry,
        )
        self.up = Gauge(
            "balancer_substation_up",
            "1 if the substation is eligible (fresh metrics, not leaving)",
            ["substation"],
            registry=registry,
        )
        self.metrics_age = Gauge(
            "balancer_substation_metrics_age_seconds",
            "Age of the last good reading of the substation",
            ["substation"],
            registry=registry,
        )
        self.poll_errors = Counter(
            "balancer_poll_errors",
            "Failed polls of a substation's /metrics",
            ["substation"],
            registry=registry,
        )
        self.decision = Histogram(
            "balancer_decision_seconds",
            "Time to choose a substation for one request",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
            registry=registry,
        )
        self.held = Gauge(
            contract.HELD_METRIC,
            "Requests held because no substation is eligible, all are full, or no path has "
            "power for the request's minimum, per priority class",
            [contract.PRIORITY_LABEL],
            registry=registry,
        )
        for priority in CLASS_ORDER:
            self.held.labels(priority.value)
        self.node_power = Gauge(
            contract.NODE_POWER_METRIC,
            "Power drawn under each grid node (substation or feeder), from the substations' "
            "last power reports",
            [contract.NODE_LABEL],
            registry=registry,
        )
        self.node_limit = Gauge(
            contract.NODE_LIMIT_METRIC,
            "The limit in force at each grid node (the lowest of the topology file's, the "
            "substation's own and an operator's override)",
            [contract.NODE_LABEL],
            registry=registry,
        )
        self.dispatch_failures = Counter(
            "balancer_dispatch_failures",
            "Forwards that the broker did not confirm",
            ["reason"],
            registry=registry,
        )
        self.broker_connected = Gauge(
            "balancer_broker_connected",
            "1 while connected to the broker and consuming",
            registry=registry,
        )
        self.rerouted = Counter(
            "balancer_rerouted_requests",
            "Requests moved back to the pending queue from a substation presumed dead",
            ["substation"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "balancer_dead_lettered_requests",
            "Pending messages set aside as invalid",
            registry=registry,
        )


class BalancerService:
    def __init__(self, config: BalancerConfig, *, registry=REGISTRY):
        self.config = config
        self.balancer_id = (
            config.balancer_id or f"balancer-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        )
        self.rng = random.Random(config.seed or None)
        #: None: power-min, which needs the power view besides the candidates.
        self.strategy = None if config.strategy == POWER_MIN else make_strategy(config.strategy)
        self.power = PowerView(config.topology)
        self.fleet = Fleet(
            stale_after=config.effective_stale_after, forget_after=config.effective_forget_after
        )
        for substation, url in parse_static_substations(config.substations).items():
            self.fleet.add_static(substation, url)
        self.metrics = BalancerMetrics(registry)
        self.metrics.broker_connected.set_function(lambda: 1 if self.link.ready else 0)
        for reason in (
            "Unroutable",
            "ConnectionLost",
            "NotConnected",
            "PublishRejected",
            "LinkClosed",
        ):
            self.metrics.dispatch_failures.labels(reason)
        self._registry = registry
        self._held: HeldRequests[Delivery] = HeldRequests()
        #: Substations presumed dead, whose queues are drained by a consumer (its tag).
        self._draining: Draining[str] = Draining()
        #: Which request holds each EV, and what became of each request (balancer/ledger.py).
        self.ledger = EvLedger(idempotency_ttl=config.idempotency_ttl)
        #: Confirms awaited of the events that say a request's fate (routed, rejected,
        #: cancelled), by request id: a copy of the request is acknowledged only after it.
        self._deciding: dict[str, Future] = {}
        #: Its decisions, told again when a gateway doubts the history (smartgrid/told.py).
        self.told = Told()
        self.link: Link = Link(
            config.amqp_url,
            name=self.balancer_id,
            topology=contract.topology(contract.core_topology(), declare=config.declare_topology)
            # Declared with the default retention, as every service that declares it must.
            + contract.topology(
                contract.history_topology(
                    max_age_seconds=contract.HISTORY_MAX_AGE_SECONDS,
                    max_bytes=contract.HISTORY_MAX_BYTES,
                ),
                declare=config.declare_topology,
            ),
            # The pending queue is consumed once the history is replayed (_history_read).
            consumers=[ConsumerSpec(contract.BALANCER_EVENTS, self._on_event, auto_ack=True)],
            on_ready=self._on_ready,
            on_lost=self._on_connection_lost,
            min_turn_interval=config.min_turn_interval,
        )
        self._pending = ConsumerSpec(
            contract.PENDING_QUEUE,
            self._on_request,
            prefetch=config.prefetch,
            on_poison=lambda d, e: self.dead_letters.poisoned(d, e, source=contract.PENDING_QUEUE),
        )
        # The event subscription hears what comes after the replay (it exists before the
        # replay starts, so nothing falls between them); the replay, the history before it.
        self.history = StreamReader(
            self.link,
            contract.HISTORY_STREAM,
            self._on_history,
            start="first",
            on_caught_up=self._history_read,
            follow=False,
            quiet=HISTORY_QUIET,
        )
        self.senders = Senders(config.event_senders, own_user=self.link.user)
        self.events = EventPublisher(self.link)
        self.dead_letters = DeadLetterer(self.link, self.events)
        #: The power reports reach the router and the allocator each: decoded once for both.
        self.reports_decoded = DecodedOnce(contract.PowerDemand.kind)
        self.poller = Poller(
            targets=lambda: self.fleet.poll_targets,
            deliver=lambda results: self.link.call_soon(lambda: self._on_readings(results)),
            interval=config.poll_interval,
            timeout=config.effective_poll_timeout,
            allowed_hosts=config.metrics_hosts,
        )
        registry.register(PollerCollector(self.poller))
        self.allocator = Allocator(
            config,
            config.topology,
            name=self.balancer_id,
            on_overrides=lambda overrides: self.link.call_soon(
                lambda: self._limits_changed(overrides)
            ),
            decode=self.reports_decoded.decode_events,
            registry=registry,
        )
        self.legacy_pending = LegacyPendingMover(config.amqp_url, name=self.balancer_id)
        #: This balancer's forwards awaiting their confirm, by substation.
        self._forwarding: collections.Counter[str] = collections.Counter()
        self._http: WSGIServer | None = None
        self._legacy_started = False

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self) -> None:
        self._http, _ = start_http_server(
            self.config.metrics_port, addr=self.config.metrics_bind, registry=self._registry
        )
        self.link.start()
        self.allocator.start()
        self.poller.start()
        self.link.call_soon(self._housekeeping)
        log.info(
            "%s: strategy %s, polling every %.2fs, stale after %.2fs, %d static substation(s), "
            "%d grid node(s) in the topology, metrics on :%d",
            self.balancer_id,
            self.config.strategy,
            self.config.poll_interval,
            self.config.effective_stale_after,
            len(self.config.substations),
            len(self.config.topology.nodes),
            self.config.metrics_port,
        )

    def stop(self) -> None:
        """Stop consuming; forwards in flight get their confirms; held requests go back."""
        self.poller.stop()
        self.allocator.stop()
        if self._legacy_started:
            self.legacy_pending.stop()
        self.link.stop(timeout=10)
        if self._http is not None:
            self._http.shutdown()

    # ------------------------------------------------------------------ requests (I/O thread)
    def _on_request(self, delivery: Delivery) -> None:
        try:
            request = contract.ChargeRequest.from_body(delivery.body)
        except contract.InvalidMessage as exc:
            self.metrics.dead_lettered.inc()
            self.dead_letters.dead_letter(
                delivery,
                reason=f"invalid charge request: {exc}",
                source=contract.PENDING_QUEUE,
            )
            return
        decision = self.ledger.decide(request)
        if decision.verdict is Verdict.ROUTE:
            self._held.arrived(delivery, request)
            self._route_held()
        elif decision.verdict is Verdict.DUPLICATE:
            log.debug("dropping a copy of %s: %s", request.request_id, decision.why)
            self._ack_once_decided(delivery, request.request_id)
        elif decision.verdict is Verdict.REJECT:
            log.info(
                "rejecting %s: EV %s is held by %s",
                request.request_id,
                request.ev_id,
                decision.active_request_id,
            )
            self._decided(
                delivery,
                contract.RequestRejected(
                    at=time.time(),
                    request_id=request.request_id,
                    ev_id=request.ev_id,
                    reason=contract.REJECTED_EV_BUSY,
                    detail="another request for this EV came first and is still active",
                    source=self.balancer_id,
                    accepted_at=request.accepted_at,
                    active_request_id=decision.active_request_id,
                ),
            )
        else:
            self._cancelled_before_forward(delivery, request)

    def _cancelled_before_forward(
        self, delivery: Delivery, request: contract.ChargeRequest
    ) -> None:
        log.info("%s was cancelled before it was forwarded", request.request_id)
        self._decided(
            delivery,
            contract.RequestCancelled(
                at=time.time(),
                request_id=request.request_id,
                ev_id=request.ev_id,
                source=self.balancer_id,
            ),
        )

    def _decided(self, delivery: Delivery, event: contract.Event) -> None:
        """Publish the event that says what became of a pending request, and acknowledge the
        request once the event is confirmed: the decision is in the history before the request
        leaves the pending queue. Reliable: the outbox sends it again after a reconnect, and
        the redelivered request, a copy now to the ledger, waits for it (_ack_once_decided)."""
        request_id = event.request_id  # type: ignore[attr-defined]
        confirmation = self.events.publish(event)
        self._deciding[request_id] = confirmation
        self.told.told(event)

        def confirmed(result: Future) -> None:
            if self._deciding.get(request_id) is result:
                del self._deciding[request_id]
            if result.exception() is None:
                self.link.ack(delivery)
            else:
                log.warning(
                    "%s for %s not published: %s", event.kind, request_id, result.exception()
                )

        confirmation.add_done_callback(confirmed)

    def _ack_once_decided(self, delivery: Delivery, request_id: str) -> None:
        deciding = self._deciding.get(request_id)
        if deciding is None:
            self.link.ack(delivery)
        else:
            deciding.add_done_callback(
                lambda result: result.exception() is None and self.link.ack(delivery)
            )

    def _route_held(self) -> None:
        self._held.place(self._choose, self._forward)
        self._publish_held()

    def _publish_held(self) -> None:
        for priority in CLASS_ORDER:
            self.metrics.held.labels(priority.value).set(self._held.count(priority))

    def _choose(self, request: contract.ChargeRequest) -> Candidate | None:
        started = time.perf_counter()
        candidates = self.fleet.candidates()
        if self.strategy is None:
            need = need_of(request.power())
            choice = power_min(candidates, self.power.grid(candidates), need, self.rng)
        else:
            choice = self.strategy(candidates, self.rng)
        self.metrics.decision.observe(time.perf_counter() - started)
        return choice

    def _forward(
        self, delivery: Delivery, request: contract.ChargeRequest, choice: Candidate
    ) -> None:
        substation = choice.substation
        self.fleet.routed(substation, request_id=request.request_id)
        self.power.routed(substation, request.request_id, request.power())
        self._forwarding[substation] += 1
        self.metrics.estimated_load.labels(substation).set(choice.estimate + 1)
        routed = contract.RoutedRequest.from_request(
            request,
            substation=substation,
            routed_at=time.time(),
            balancer=self.balancer_id,
            # Redelivered: a balancer may have forwarded it already and died before its ack.
            maybe_duplicate=delivery.redelivered,
        )
        confirmation = self.link.publish(
            contract.DISPATCH_EXCHANGE, substation, routed.to_body(), mandatory=True
        )
        confirmation.add_done_callback(lambda f: self._after_forward(f, delivery, request, routed))

    def _after_forward(
        self,
        confirmation: Future,
        delivery: Delivery,
        request: contract.ChargeRequest,
        routed: contract.RoutedRequest,
    ) -> None:
        error = confirmation.exception()
        self._forwarding[routed.substation] -= 1
        if error is None:
            self.ledger.forwarded(routed.request_id)
            self.metrics.routed.labels(routed.substation).inc()
            event = contract.RequestRouted(
                at=routed.routed_at,
                request_id=routed.request_id,
                ev_id=routed.ev_id,
                substation=routed.substation,
                balancer=self.balancer_id,
            )
            self._decided(delivery, event)
            return
        self.fleet.unrouted(routed.substation, request_id=routed.request_id)
        self.power.unrouted(routed.substation, routed.request_id)
        self.metrics.dispatch_failures.labels(type(error).__name__).inc()
        next_step = after_failed_forward(error, still_settleable=self.link.is_current(delivery))
        if next_step is not AfterFailedForward.LET_THE_BROKER_REQUEUE:
            self.ledger.forward_failed(routed.request_id)  # held again, keeping its EV
        if next_step is AfterFailedForward.ROUTE_ELSEWHERE:
            log.warning(
                "substation %s has no queue (%s); not routing there", routed.substation, error
            )
            self.fleet.mark_unknown(routed.substation)
            self._hold_again(delivery, request)
        elif next_step is AfterFailedForward.LET_THE_BROKER_REQUEUE:
            log.warning(
                "forward of %s to %s failed: %s", routed.request_id, routed.substation, error
            )
        else:
            log.warning(
                "forward of %s to %s failed: %s; trying again in %.1fs",
                routed.request_id,
                routed.substation,
                error,
                RETRY_REFUSED_AFTER,
            )
            self.link.call_later(RETRY_REFUSED_AFTER, lambda: self._hold_again(delivery, request))

    def _hold_again(self, delivery: Delivery, request: contract.ChargeRequest) -> None:
        """Put a request whose forward failed back at the head of the held ones and route."""
        if not self.link.is_current(delivery):
            return  # its channel is gone; the broker has returned it to the pending queue
        self._held.forward_failed(delivery, request)
        self._route_held()

    def _on_ready(self) -> None:
        self._say_hello()
        # The pending queue is consumed once the history is replayed (_history_read).
        self.history.on_ready()

    def _history_read(self) -> None:
        log.info(
            "history replayed (%d message(s) read); consuming %s (one balancer at a time: "
            "this one may stand by)",
            self.history.messages_read,
            contract.PENDING_QUEUE,
        )
        self.link.add_consumer(self._pending)

    def _on_history(self, delivery: Delivery) -> None:
        if delivery.routing_key not in HISTORY_KINDS:
            return  # the requests themselves: this balancer learns of them from pending
        for event in events_in(delivery, self.senders):
            self.ledger.apply(event)

    def _say_hello(self) -> None:
        if not self._legacy_started and self.config.declare_topology:
            # Once today's pending queue is declared: requests are moved into it. Where the
            # admin alone declares the topology, the admin does this too.
            self._legacy_started = True
            self.legacy_pending.start()
        hello = contract.BalancerStarted(at=time.time(), balancer=self.balancer_id)
        self.events.publish(hello, reliable=False)

    def _on_connection_lost(self) -> None:
        # Held deliveries belonged to the dead channel; the broker requeues them. Drain
        # consumers went with it; housekeeping starts them again.
        self._held.clear()
        self._publish_held()
        self._draining.connection_lost()
        # Decided again when the broker delivers them again, here or to a standby.
        self.ledger.forget_held()
        self.history.on_lost()

    # ---------------------------------------------------------- dead substations (I/O thread)
    def _update_draining(self) -> None:
        changes = self._draining.update(
            presumed_dead=set(self.fleet.presumed_dead(self.config.effective_drain_after)),
            alive={s for s, t in self.fleet.substations.items() if self.fleet.is_eligible(t)},
        )
        for substation in changes.newly_dead:
            log.warning(
                "substation %s presumed dead; moving the requests in its queue back to pending",
                substation,
            )
        for substation, drain in changes.revived.items():
            log.info("substation %s is back; no longer draining its queue", substation)
            self.link.cancel_consumer(drain)
        for substation in changes.to_drain:
            # Declared from the contract first, so that consuming cannot fail on a queue that
            # was never created (a static substation that never started).
            if not self.link.declare(contract.substation_topology(substation)):
                return
            tag = self.link.add_consumer(
                ConsumerSpec(
                    contract.substation_queue_name(substation),
                    functools.partial(self._reroute, substation),
                    prefetch=50,
                )
            )
            if tag is not None:
                self._draining.draining(substation, tag)
        for substation, drain in changes.to_retire.items():
            self._retire(substation, drain)

    def _retire(self, substation: str, drain: str) -> None:
        """Stop draining a forgotten substation's queue, and check it for deletion."""
        self.link.cancel_consumer(drain)
        # Declared again first: a check of a queue that is gone would close the channel.
        self.link.declare(contract.substation_topology(substation))
        self.link.inspect_queue(
            contract.substation_queue_name(substation),
            functools.partial(self._retirement_checked, substation),
        )

    def _retirement_checked(self, substation: str, messages: int, consumers: int) -> None:
        if self._draining.checked(substation, messages, consumers) is Retirement.DELETE:
            log.info("substation %s was forgotten and its queue is empty; deleting it", substation)
            self.link.delete_queue(contract.substation_queue_name(substation))
            self.metrics.rerouted.remove(substation)

    def _reroute(self, substation: str, delivery: Delivery) -> None:
        # Its queue is deleted only once every delivery taken off it is settled.
        moving = (delivery.generation, delivery.delivery_tag)
        settled = functools.partial(self._draining.settled, substation, moving)
        try:
            routed = contract.RoutedRequest.from_body(delivery.body)
        except contract.InvalidMessage as exc:
            self._draining.moving(substation, moving)
            self.dead_letters.dead_letter(
                delivery,
                reason=f"invalid routed request: {exc}",
                source=contract.substation_queue_name(substation),
            ).add_done_callback(lambda _: settled())
            return
        request = routed.back_to_pending()
        self._draining.moving(substation, moving)
        confirmation = self.link.publish(
            contract.REQUESTS_EXCHANGE,
            contract.REQUEST_ROUTING_KEY,
            request.to_body(),
            mandatory=True,
        )

        def settle(result: Future) -> None:
            if result.exception() is None:
                self.link.ack(delivery)
                settled()
                self.fleet.unrouted(substation, request_id=routed.request_id)
                self.power.unrouted(substation, routed.request_id)
                self.metrics.rerouted.labels(substation).inc()
            else:
                # Not the message's fault (see _after_forward): give it back after a pause,
                # so that the drain consumer's next attempt is not an immediate loop.
                def give_back() -> None:
                    self.link.reject(delivery, requeue=True)
                    settled()

                self.link.call_later(RETRY_REFUSED_AFTER, give_back)

        confirmation.add_done_callback(settle)

    # ------------------------------------------------------------------ events (I/O thread)
    def _on_event(self, delivery: Delivery) -> None:
        events = events_in(delivery, self.senders, self.reports_decoded.decode_events)
        freed = False
        for event in events:
            freed |= self.power.apply(event)
            self._apply(event)
            if isinstance(event, contract.CancelRequested):
                self._cancel_requested(event)
            elif isinstance(event, contract.StatusRequested):
                for told in self.told.again(event.request_id, time.time()):
                    log.info(
                        "%s of %s published again: a gateway asked", told.kind, event.request_id
                    )
                    self.events.publish(told)
            else:
                self.ledger.apply(event)
        if self._held and freed:
            self._route_held()

    def _cancel_requested(self, event: contract.CancelRequested) -> None:
        """A request held here is cancelled now; one not here yet, when it comes (the ledger
        remembers); one forwarded is its substation's to cancel."""
        if not self.ledger.cancel_requested(event):
            return
        held = self._held.take(event.request_id)
        if held is None:
            return  # its forward is on its way: the substation hears the cancel too
        delivery, request = held
        self._publish_held()
        self.ledger.cancelled_here(request.request_id)
        self._cancelled_before_forward(delivery, request)

    def _limits_changed(self, overrides: LimitOverrides) -> None:
        self.power.set_overrides(overrides)
        if self._held:
            self._route_held()

    def _apply(self, event: contract.Event) -> None:
        if isinstance(event, contract.SessionCompleted):
            self.fleet.session_completed(event)
        elif isinstance(event, contract.SessionStarted):
            self.fleet.session_started(event)
        elif isinstance(event, contract.RequestCancelled):
            # A cancel that stopped a session frees its point as a completion does.
            self.fleet.request_cancelled(event)
        elif isinstance(event, contract.RequestRouted):
            # Another balancer's decision; one about a substation nobody polls cannot count.
            if event.balancer != self.balancer_id and self.fleet.knows(event.substation):
                self.fleet.routed(event.substation, request_id=event.request_id)
        elif isinstance(event, contract.SubstationAnnounced):
            if self.fleet.announced(event):
                log.info(
                    "substation %s announced itself at %s", event.substation, event.metrics_url
                )
                self.poller.poll_soon()
        elif isinstance(event, contract.SubstationLeaving):
            log.info("substation %s is leaving", event.substation)
            self.fleet.leaving(event)

    # ------------------------------------------------------------------ polls (I/O thread)
    def _on_readings(self, results: list[PollResult]) -> None:
        for substation, reading, error in results:
            if reading is not None:
                self.fleet.reading(substation, reading)
                # What its queue holds now corrects the routed count (fleet.py).
                self.link.inspect_queue(
                    contract.substation_queue_name(substation),
                    functools.partial(self._queue_depth, substation),
                )
            else:
                self.fleet.reading_failed(substation, error or "unknown error")
                self.metrics.poll_errors.labels(substation).inc()
                log.debug("poll of %s failed: %s", substation, error)
        self._publish_fleet_metrics()
        if self._held:
            self._route_held()

    def _queue_depth(self, substation: str, messages: int, _consumers: int) -> None:
        self.fleet.queue_depth(substation, messages, self._forwarding[substation])

    def _housekeeping(self) -> None:
        for substation in self.fleet.forget_silent():
            log.warning(
                "substation %s has been silent for %.0fs; forgotten",
                substation,
                self.config.effective_forget_after,
            )
            for series in (
                self.metrics.estimated_load,
                self.metrics.up,
                self.metrics.metrics_age,
                self.metrics.routed,
                self.metrics.poll_errors,
                # As a grid node (a node of the topology file is set again at once).
                self.metrics.node_power,
                self.metrics.node_limit,
            ):
                series.remove(substation)
            self.power.forget(substation)
            if self.config.delete_forgotten_queues:
                self._draining.forgotten(substation)
        self._update_draining()
        self._publish_fleet_metrics()
        self._publish_power_metrics()
        # A substation can go stale between polls; held requests may also need a retry.
        if self._held:
            self._route_held()
        self.link.call_later(1.0, self._housekeeping)

    def _publish_power_metrics(self) -> None:
        for node, kw in self.power.node_power_kw().items():
            self.metrics.node_power.labels(node).set(kw)
        capacities = {t.substation: t.capacity for t in self.fleet.substations.values()}
        limits = self.power.limits_w({s: c for s, c in capacities.items() if c is not None})
        for node, limit_w in limits.items():
            self.metrics.node_limit.labels(node).set(limit_w / 1000)

    def _publish_fleet_metrics(self) -> None:
        now = time.monotonic()
        for tracked in self.fleet.substations.values():
            substation = tracked.substation
            # Touching the labelled counters creates their series at 0, so that rate() sees
            # the first increase and a dashboard shows 0 rather than "no data".
            self.metrics.routed.labels(substation)
            self.metrics.poll_errors.labels(substation)
            eligible = self.fleet.is_eligible(tracked, now)
            self.metrics.up.labels(substation).set(1 if eligible else 0)
            if tracked.reading is not None:
                self.metrics.estimated_load.labels(substation).set(tracked.estimate())
                self.metrics.metrics_age.labels(substation).set(self.fleet.reading_age(tracked))
