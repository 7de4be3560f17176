"""The balancer's view of power: each substation's load in kW, the grid tree and its limits.

Counts have their correction (``fleet.py``); this is the same correction for power, in watts.
Each substation reports its demand (``power.demand``, per class: sessions, the sum of their
minimums and of their maxima) every second, and on every change once it is managed (the
allocator's input; the corrections below keep the view exact without them). Between reports
the balancer adds what it routed there since and takes off what completed since::

    load = the last report's demand
         + requests routed there that the report did not count (in flight, waiting in the
           substation's queue, or started after the report)
         - sessions the report counted that have completed since

Whether a report counted a session is decided exactly, whatever order events and reports
arrive in: the report's ``at``, ``session.started``'s ``at`` and ``session.completed``'s ``at``
all come from the substation's own clock, and a session is in a report of the same instance
exactly when it started at or before the report's ``at``. A session started by a predecessor
instance (the substation restarted) is in none of the new instance's reports: it counts as
routed until the new instance starts it again.

This view is for routing, which only has to be good: what keeps every node within its limit
is the substations sharing their limit in force and the allocator's leases (smartgrid/leases.py).
So a request routed here whose session never starts (its event lost, or it waits long in a
queue) is forgotten after ``forget_after`` seconds rather than counted forever.

The tree is the topology file's (``GRID_TOPOLOGY_FILE``) with the parents substations announce
(``SUBSTATION_PARENT``; the file wins on a conflict, which is logged once). Without a file
every substation is its own root, bounded by its own limit: the one it announces or reports,
else its charging points at the highest car power (which never binds, so that routing with
the default power is exactly corrected-min's, balancer/power_routing.py).

Everything here runs on the balancer's I/O thread; the limit overrides come from the
allocator's thread as a new snapshot (:meth:`PowerView.set_overrides`), never mutated after.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from balancer.strategies import Candidate
from smartgrid import contract
from smartgrid.grid import GridState, Load, Need, Topology, TopologyError, limits_in_force
from smartgrid.leases import sum_by_node
from smartgrid.limits import LimitOverrides
from smartgrid.power import CLASS_ORDER, MAX_CAR_KW, watts
from smartgrid.power_request import PowerFields

log = logging.getLogger(__name__)

#: A routed request whose session has not started after this long is no longer counted.
FORGET_UNSTARTED_AFTER = 300.0


def need_of(power: PowerFields) -> Need:
    return Need(power.max_w, power.min_w, power.priority)


@dataclass
class _Request:
    """A request the balancer knows to be at a substation, as far as its load goes."""

    need: Need
    #: What it asks of the substation, as a load (made once: it is added and taken off often).
    load: Load
    #: When it was routed (this balancer's wall clock), for forgetting one that never starts.
    routed_at: float
    #: Substation clock times, and the instance that started it.
    started_at: float | None = None
    instance: str | None = None
    completed_at: float | None = None


@dataclass
class _Substation:
    """One substation's report and the requests that correct it.

    The correction (the sum in the module's formula) is kept as it changes: each request adds
    its :meth:`effect` when it is tracked, and a change of its state replaces its effect, so a
    routing decision reads the load without going over the requests. A new report may change
    whether it counts each request, so it counts the correction again (:meth:`rebase`), but
    only over the requests not *settled*: a session a report counted as running is counted by
    every later report of the same instance until it ends, its effect 0 meanwhile, so only
    its end (or a start again) brings it back into the count. A report then costs what
    changed since the last one, not every session running there.
    """

    report: contract.PowerDemand | None = None
    reported: Load = field(default_factory=Load)
    announced_limit_w: int | None = None
    announced_parent: str | None = None
    requests: dict[str, _Request] = field(default_factory=dict)
    #: The requests but the settled sessions: those a report may count otherwise.
    unsettled: dict[str, _Request] = field(default_factory=dict)
    #: The sum of every request's effect on the report, kept with every change.
    correction: Load = field(default_factory=Load)
    load: Load | None = None  # cached until the next change

    @property
    def own_limit_w(self) -> int | None:
        if self.report is not None:
            return watts(self.report.limit_kw)
        return self.announced_limit_w

    def counted_by_report(self, request: _Request) -> bool:
        """Whether the last report counted this session as running."""
        report = self.report
        return (
            report is not None
            and request.started_at is not None
            and request.instance == report.instance
            and request.started_at <= report.at
            and (request.completed_at is None or request.completed_at > report.at)
        )

    def effect(self, request: _Request) -> int:
        """How the request corrects the last report: +1 if it draws (or will) and the report
        did not count it, -1 if the report counted a session that has ended since, else 0."""
        counted = self.counted_by_report(request)
        if request.completed_at is None:
            return 0 if counted else 1
        return -1 if counted else 0

    def _correct(self, load: Load, effect: int) -> None:
        if effect:
            self.correction = _corrected(self.correction, load, effect)
            self.load = None

    def track(self, request_id: str, request: _Request) -> None:
        self.requests[request_id] = self.unsettled[request_id] = request
        self._correct(request.load, self.effect(request))

    def untrack(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        self.unsettled.pop(request_id, None)
        if request is not None:
            self._correct(request.load, -self.effect(request))

    def started(self, request_id: str, request: _Request, at: float, instance: str) -> None:
        self._correct(request.load, -self.effect(request))
        request.started_at = at
        request.instance = instance
        request.completed_at = None
        self.unsettled[request_id] = request
        self._correct(request.load, self.effect(request))

    def ended(self, request_id: str, request: _Request, at: float) -> None:
        self._correct(request.load, -self.effect(request))
        request.completed_at = at
        self.unsettled[request_id] = request
        self._correct(request.load, self.effect(request))

    def recount(self) -> Load:
        """The correction counted over every request (what :attr:`correction` keeps)."""
        correction = Load()
        for request in self.requests.values():
            correction = _corrected(correction, request.load, self.effect(request))
        return correction

    def rebase(self, report: contract.PowerDemand, now: float, forget_after: float) -> None:
        """A new report (of this instance, not older than the last; or of another instance)."""
        previous = self.report
        self.report = report
        self.reported = _reported_load(report)
        if previous is None or previous.instance != report.instance:
            # Sessions settled by the predecessor's reports are in none of this one's.
            self.unsettled = dict(self.requests)
        self._settle(now, forget_after)
        self.load = None

    def _settle(self, now: float, forget_after: float) -> None:
        """Count the correction again over the unsettled requests, settle the sessions the
        report counts as running, and drop what no longer changes the load: sessions that
        ended before the report was taken (no later report counts them; older ones are
        ignored), and requests the reports have not counted for ``forget_after`` (never
        started, started by a predecessor instance and never again, or a completion no report
        ever follows: reports come every second, so a session running here is in them)."""
        report_at = self.report.at if self.report is not None else None
        correction = Load()
        for request_id, request in list(self.unsettled.items()):
            ended_before = (
                request.completed_at is not None
                and report_at is not None
                and request.completed_at <= report_at
            )
            counted = self.counted_by_report(request)
            if ended_before or (not counted and now - request.routed_at > forget_after):
                del self.requests[request_id]
                del self.unsettled[request_id]
            elif request.completed_at is None:
                if counted:
                    del self.unsettled[request_id]  # settled: its effect is 0
                else:
                    correction = correction + request.load
            elif counted:
                correction = correction - request.load
        self.correction = correction

    def compute_load(self) -> Load:
        if self.load is None:
            self.load = (self.reported + self.correction).clamped()
        return self.load


def _corrected(correction: Load, load: Load, effect: int) -> Load:
    """``correction`` with ``load`` added (effect +1), taken off (-1), or as it is (0)."""
    if effect > 0:
        return correction + load
    if effect < 0:
        return correction - load
    return correction


@dataclass(frozen=True)
class _LimitsInForce:
    """The limits of every node for the capacities they were worked out with, good until
    an override in force runs out."""

    capacities: dict[str, int]
    limits_w: dict[str, int]
    until: float


def _new_request(need: Need, routed_at: float) -> _Request:
    return _Request(need, Load.of(need.max_w, need.min_w, need.priority), routed_at)


def _reported_load(report: contract.PowerDemand) -> Load:
    floors = tuple(watts(getattr(report, f"floor_kw_{c.value}")) for c in CLASS_ORDER)
    wants = sum(watts(getattr(report, f"want_kw_{c.value}")) for c in CLASS_ORDER)
    return Load(wants, floors)


class PowerView:
    """Per substation: reported demand corrected by routed and completed requests; the tree
    (file plus announcements); the operators' overrides; the limit in force at every node."""

    def __init__(
        self,
        topology: Topology,
        *,
        forget_after: float = FORGET_UNSTARTED_AFTER,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.file_topology = topology
        self.topology = topology
        self.forget_after = forget_after
        self._clock = wall_clock
        self._substations: dict[str, _Substation] = {}
        self.overrides = LimitOverrides()
        self._conflicts_logged: set[tuple[str, str]] = set()
        #: The limits in force, worked out again only when what they depend on changes (a
        #: report, an announcement, the tree, the overrides, the candidates' capacities, an
        #: override running out) rather than for every routing decision.
        self._limits: _LimitsInForce | None = None

    def _track(self, substation: str) -> _Substation:
        tracked = self._substations.get(substation)
        if tracked is None:
            tracked = self._substations[substation] = _Substation()
        return tracked

    # -------------------------------------------------------------------------- observations
    def apply(self, event: contract.Event) -> bool:
        """Take in an event (trusted already); True if it may have freed power."""
        if isinstance(event, contract.PowerDemand):
            return self.reported(event)
        if isinstance(event, contract.SessionStarted):
            self.session_started(event)
        elif isinstance(event, contract.SessionCompleted):
            self.session_ended(event.substation, event.request_id, event.at)
            return True
        elif isinstance(event, contract.RequestCancelled) and event.substation is not None:
            # Stopped by a cancel, or cancelled at the substation before it started: either
            # way it no longer draws (nor will) there.
            self.session_ended(event.substation, event.request_id, event.at)
            return True
        elif isinstance(event, contract.SubstationAnnounced):
            self.announced(event)
        return False

    def reported(self, report: contract.PowerDemand) -> bool:
        tracked = self._track(report.substation)
        current = tracked.report
        if current is not None and current.instance == report.instance and current.at > report.at:
            return False  # overtaken by a newer one
        tracked.rebase(report, self._clock(), self.forget_after)
        self._limits = None  # its own limit may have changed
        self._place(report.substation, report.parent)
        return True

    def announced(self, event: contract.SubstationAnnounced) -> None:
        tracked = self._track(event.substation)
        if event.limit_kw is not None:
            tracked.announced_limit_w = watts(event.limit_kw)
        tracked.announced_parent = event.parent
        self._limits = None
        self._place(event.substation, event.parent)

    def _place(self, substation: str, parent: str | None) -> None:
        """Put an announced parent into the tree (the file wins)."""
        own_limit_w = self._substations[substation].own_limit_w
        if parent is None or own_limit_w is None or self.topology.parent(substation) == parent:
            return
        try:
            self.topology = self.topology.with_announced(substation, parent, own_limit_w)
            self._limits = None
        except TopologyError as exc:
            if (substation, parent) not in self._conflicts_logged:
                self._conflicts_logged.add((substation, parent))
                log.warning("%s; it is placed as the topology file says", exc)

    def routed(self, substation: str, request_id: str, power: PowerFields) -> None:
        tracked = self._track(substation)
        if request_id not in tracked.requests:
            tracked.track(request_id, _new_request(need_of(power), self._clock()))

    def unrouted(self, substation: str, request_id: str) -> None:
        tracked = self._substations.get(substation)
        if tracked is not None:
            tracked.untrack(request_id)

    def session_started(self, event: contract.SessionStarted) -> None:
        tracked = self._track(event.substation)
        request = tracked.requests.get(event.request_id)
        if request is None:
            # Routed by another balancer (or before this one started): its event carries its
            # power fields.
            request = _new_request(need_of(event.power()), self._clock())
            tracked.track(event.request_id, request)
        tracked.started(event.request_id, request, event.at, event.instance)

    def session_ended(self, substation: str, request_id: str, at: float) -> None:
        """Its session completed (or was cancelled) at ``at``, on the substation's clock."""
        tracked = self._substations.get(substation)
        if tracked is None:
            return
        request = tracked.requests.get(request_id)
        if request is None:
            return
        # Kept until a report taken after the end arrives: one taken before it may still come.
        tracked.ended(request_id, request, at)

    def set_overrides(self, overrides: LimitOverrides) -> None:
        self.overrides = overrides
        self._limits = None

    # -------------------------------------------------------------------------- questions
    def load(self, substation: str) -> Load:
        tracked = self._substations.get(substation)
        return tracked.compute_load() if tracked is not None else Load()

    def recounted_load(self, substation: str) -> Load:
        """:meth:`load` counted over every request tracked there (what it keeps as it goes)."""
        tracked = self._substations.get(substation)
        return (tracked.reported + tracked.recount()).clamped() if tracked else Load()

    def own_limits_w(self, capacities: Mapping[str, int] | None = None) -> dict[str, int]:
        """Each substation's own limit: as it reports or announces it, else its points at the
        highest car power (never binding)."""
        limits = {
            s: t.own_limit_w for s, t in self._substations.items() if t.own_limit_w is not None
        }
        for substation, capacity in (capacities or {}).items():
            limits.setdefault(substation, capacity * watts(MAX_CAR_KW))
        return limits

    def limits_w(self, capacities: Mapping[str, int] | None = None) -> dict[str, int]:
        """The limit in force at every node and substation now (not to be changed: the next
        call may return it again)."""
        now = self._clock()
        capacities = dict(capacities or {})
        known = self._limits
        if known is not None and known.capacities == capacities and now < known.until:
            return known.limits_w
        limits = limits_in_force(
            self.topology, self.own_limits_w(capacities), self.overrides.in_force(now)
        )
        until = self.overrides.next_change(now)
        self._limits = _LimitsInForce(capacities, limits, math.inf if until is None else until)
        return limits

    def grid(self, candidates: Iterable[Candidate]) -> GridState:
        """A snapshot for one routing decision: every substation's load (not only the
        candidates': an ineligible substation still draws power under its feeder)."""
        capacities = {c.substation: c.capacity for c in candidates}
        loads = {s: t.compute_load() for s, t in self._substations.items()}
        return GridState.build(self.topology, loads, self.limits_w(capacities))

    def node_power_kw(self) -> dict[str, float]:
        """What every substation draws now (its last report) and every node above it."""
        drawn = {
            s: watts(t.report.power_kw)
            for s, t in self._substations.items()
            if t.report is not None
        }
        totals = sum_by_node(self.topology, drawn, self.topology.nodes)
        return {node: w / 1000 for node, w in {**totals, **drawn}.items()}

    def forget(self, substation: str) -> None:
        self._substations.pop(substation, None)
        self._limits = None
