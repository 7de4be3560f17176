"""The share allocator's wiring: one balancer at a time hands out shares of the grid's limits.

The decisions are in :class:`smartgrid.leases.ShareAllocator` (pure); this module gives it its
inputs and sends its grants (docs/power.md §6-7):

- **Who is active.** Every balancer consumes ``smartgrid.power.reports``, a queue with a single
  active consumer: the broker delivers the substations' ``power.demand`` reports to one of them,
  and to the next when that one's connection closes. A balancer considers its allocator active
  while reports reach it; at the first report after a silence it takes a new term (the time in
  ms) and assumes, until the substations acknowledge, that a predecessor's grants are in force.
  The allocator has a connection of its own with a short heartbeat, so that a frozen or cut-off
  balancer loses the reports within seconds, whatever its router's connection does.
- **Limits.** The operators' overrides (``grid.limit``) are read from the stream
  ``smartgrid.grid.limits`` from its first message, then followed (resumed after a reconnect
  just after the last one read), by a :class:`~smartgrid.amqp.streams.StreamReader`; the
  reports are consumed only once it has read the stream to its end mark, so that no share is
  computed without an override already issued, however slowly a loaded broker sends it. Every
  change is handed to the router too (``on_overrides``), which routes against the same limits.
- **Grants.** On every report (one run per I/O-loop turn however many arrive) and every
  ``TICK`` (renewals, overrides running out), the allocator's grants go to the power exchange
  with the substation's id as routing key. A grant lost on the way is repaired by the next
  renewal; its commitment is counted either way.

Thread-safety: everything here runs on the allocator's own I/O thread; ``on_overrides``
receives a fresh :class:`LimitOverrides` that nobody changes afterwards.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge

from balancer.config import BalancerConfig
from smartgrid import contract, leases, share_stamps
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.amqp.streams import StreamReader
from smartgrid.events import events_in
from smartgrid.grid import Topology, limits_in_force
from smartgrid.limits import LimitOverride, LimitOverrides, override_from_event
from smartgrid.power import watts
from smartgrid.senders import Senders

log = logging.getLogger(__name__)

#: Seconds between runs without reports (renewals are due every third of a lease).
TICK = 0.25
#: Seconds of silence that end the limits stream's replay when there is no end mark to read
#: (an empty stream); with one, the reader waits for it (smartgrid.amqp.streams).
STREAM_QUIET = 0.3
#: Stream consumers need a prefetch (and acknowledge what they read).
STREAM_PREFETCH = 100


def with_heartbeat(urls: str, seconds: int) -> str:
    """``AMQP_URL`` (one URL or several, comma-separated) with ``heartbeat`` set on each one
    that does not set it itself."""

    def one(url: str) -> str:
        parts = urllib.parse.urlsplit(url.strip())
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(key == "heartbeat" for key, _ in query):
            return url.strip()
        query.append(("heartbeat", str(seconds)))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    return ",".join(one(url) for url in urls.split(",") if url.strip())


class AllocatorMetrics:
    def __init__(self, registry=REGISTRY) -> None:
        self.active = Gauge(
            contract.ALLOCATOR_ACTIVE_METRIC,
            "1 while this balancer's allocator hands out shares of the grid's limits",
            registry=registry,
        )
        self.overcommitted = Gauge(
            contract.NODE_OVERCOMMITTED_METRIC,
            "1 where a node's limit cannot cover the failsafes of the substations under it "
            "(a lapsed lease there could overload it); as the active allocator sees it",
            [contract.NODE_LABEL],
            registry=registry,
        )
        self.grants = Counter(
            "allocator_grants",
            "Shares handed out by this balancer's allocator (new shares and renewals)",
            registry=registry,
        )


class Allocator:
    """This balancer's share allocator: its connection, the limits it reads, its grants."""

    def __init__(
        self,
        config: BalancerConfig,
        topology: Topology,
        *,
        name: str,
        on_overrides: Callable[[LimitOverrides], None],
        decode: Callable[[str, bytes], list[contract.Event]] = contract.decode_events,
        registry=REGISTRY,
    ) -> None:
        self.config = config
        #: ALLOCATOR=0: read the limits for the router, never hand out shares.
        self.hands_out_shares = config.allocator
        self.topology = topology
        self.on_overrides = on_overrides
        #: How a report's body is decoded (the router may have decoded it already).
        self._decode = decode
        self.metrics = AllocatorMetrics(registry)
        for node in topology.nodes:
            self.metrics.overcommitted.labels(node).set(0)
        self.link = Link(
            with_heartbeat(config.amqp_url, config.allocator_heartbeat),
            name=f"{name}-allocator",
            topology=contract.topology(
                contract.power_topology_with_events(), declare=config.declare_topology
            ),
            on_ready=self._on_ready,
            on_lost=self._on_lost,
        )
        self.senders = Senders(config.event_senders, own_user=self.link.user)
        self.overrides = LimitOverrides()
        #: Each substation's own limit, as it reports it.
        self._own_limits: dict[str, int] = {}
        self.allocator: leases.ShareAllocator | None = None
        self._last_report = 0.0
        self._run_scheduled = False
        self._reports_tag: str | None = None
        self.limits = StreamReader(
            self.link,
            contract.GRID_LIMITS_STREAM,
            self._on_limit,
            start="first",
            on_caught_up=self._read_to_the_end,
            prefetch=STREAM_PREFETCH,
            quiet=STREAM_QUIET,
        )

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self) -> None:
        self.link.start()
        self.link.call_soon(self._tick)

    def stop(self) -> None:
        self.link.stop(timeout=5)

    @property
    def active(self) -> bool:
        return self.allocator is not None

    # ------------------------------------------------------------------ connection (I/O thread)
    def _on_ready(self) -> None:
        self._reports_tag = None
        self.limits.on_ready()

    def _on_lost(self) -> None:
        # The broker hands the reports to a standby now; this one's grants stop.
        self._reports_tag = None
        self.limits.on_lost()
        self._deactivate("its connection was lost")

    def _read_to_the_end(self) -> None:
        if self._reports_tag is None and self.hands_out_shares:
            self._reports_tag = self.link.add_consumer(
                ConsumerSpec(contract.POWER_REPORTS_QUEUE, self._on_report, auto_ack=True)
            )
            log.info(
                "allocator: limits read (%d override(s) known); standing by for power reports",
                len(self.overrides.in_force(time.time())),
            )

    # ------------------------------------------------------------------ limits (I/O thread)
    def _on_limit(self, delivery: Delivery) -> None:
        # Never raise here (the reader logs what does and goes on).
        try:
            # Only an administrator may publish grid.limit (no service role owns it), so the
            # broker's permissions vouch for these; no sender check applies.
            events = contract.decode_events(delivery.routing_key, delivery.body)
            overrides = [
                override_from_event(e) for e in events if isinstance(e, contract.GridLimit)
            ]
        except (contract.InvalidMessage, ValueError) as exc:
            log.warning("skipping an unusable limit override: %s", exc)
            return
        self._apply_overrides(overrides)

    def _apply_overrides(self, overrides: list[LimitOverride]) -> None:
        changed = False
        for override in overrides:
            if self.overrides.apply(override):
                changed = True
                limit = "cleared" if override.limit_w is None else f"{override.limit_w / 1000:g} kW"
                log.info("limit of %s: %s", override.node, limit)
        if changed:
            self.on_overrides(self.overrides.copy())
            self._run_soon()

    # ------------------------------------------------------------------ reports (I/O thread)
    def _on_report(self, delivery: Delivery) -> None:
        reports = [
            e
            for e in events_in(delivery, self.senders, self._decode)
            if isinstance(e, contract.PowerDemand)
        ]
        if not reports:
            return
        now = time.time()
        if self.allocator is None:
            self._activate(now)
        assert self.allocator is not None
        for event in reports:
            # bench.power_dips --logs reads these to time each hop of a share on the move.
            log.debug(share_stamps.REPORT_RECEIVED, event.substation, event.at, now)
            self._own_limits[event.substation] = watts(event.limit_kw)
            self.allocator.report(leases.report_from_event(event))
        self._last_report = time.monotonic()
        self._run_soon()

    def _activate(self, now: float) -> None:
        term = int(now * 1000)
        self.allocator = leases.ShareAllocator(
            self.topology,
            term=term,
            activated_at=now,
            lease_seconds=self.config.lease_seconds,
            skew_seconds=leases.CLOCK_SKEW_SECONDS,
            failsafe_w=watts(self.config.failsafe_kw),
        )
        self.metrics.active.set(1)
        log.info(
            "allocator active (term %d): handing out shares, leases of %gs",
            term,
            self.config.lease_seconds,
        )

    def _deactivate(self, why: str) -> None:
        if self.allocator is not None:
            log.info("allocator standing by: %s", why)
        self.allocator = None
        self.metrics.active.set(0)

    # ------------------------------------------------------------------ grants (I/O thread)
    def _run_soon(self) -> None:
        if not self._run_scheduled:
            self._run_scheduled = True
            self.link.call_later(0, self._run)

    def _tick(self) -> None:
        if self.allocator is not None:
            # Substations report every second; a longer silence means the broker now hands
            # the reports to another balancer (or there is nobody to share with).
            if time.monotonic() - self._last_report > self.config.lease_seconds:
                self._deactivate("no power reports for a lease")
            else:
                self._run()
        self.link.call_later(TICK, self._tick)

    def _run(self) -> None:
        self._run_scheduled = False
        allocator = self.allocator
        if allocator is None or not self.link.ready:
            return
        now = time.time()
        in_force = self.overrides.in_force(now)
        limits = limits_in_force(allocator.topology, self._own_limits, in_force)
        for grant in allocator.allocate(limits, now, overridden=in_force.keys()):
            message = leases.grant_to_message(grant)
            log.debug(
                share_stamps.GRANT_ISSUED,
                grant.substation,
                message.share_kw,
                grant.issued_at,
            )
            # Not persistent, not mandatory: a substation that is down has no share queue, and
            # would refuse a grant from before its restart anyway.
            self.link.publish(
                contract.POWER_EXCHANGE,
                grant.substation,
                message.to_body(),
                persistent=False,
                mandatory=False,
            )
            self.metrics.grants.inc()
        for node in limits:
            self.metrics.overcommitted.labels(node).set(1 if node in allocator.overcommitted else 0)
