"""Power over a run, rebuilt exactly from the lifecycle events, against the limits in force.

Every session's power is a step function: it starts at ``session.started``'s ``power_kw`` (a
substation without power wiring, whose limit never binds, gives every car its ``max_kw``),
changes at each ``session.power`` and drops to 0 at ``session.completed``. A substation's
power is the sum over its sessions; a grid node's the sum over the substations under it. The
limit in force at a substation is what its last ``power.demand`` report said
(``limit_in_force_kw``); at a grid node the topology file's limit, lowered by any operator's
``grid.limit`` override in force at the time. So the report counts, at every sample, which
node drew more than its limit, with the same numbers the services used: no scraping, no
sampling error between two series.

A substation process that dies takes its sessions with it: when a substation is heard from
with a new ``instance`` (it restarted), the sessions of its old instance end then (at the
latest; the process died a little earlier), and a request that starts again (there or
elsewhere) keeps its earlier run, ended at the new start at the latest, for the power sums.

From the same events: energy delivered, time paused (0 kW while running), the wait from
acceptance to the session's start per priority class, and fairness: Jain's index over the
power of the sessions of one class that are running below their own maximum (a car at its own
maximum is held back by itself, not by the sharing), over the whole fleet, at each sample.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from loadgen.report import jain_index, percentile
from smartgrid import contract
from smartgrid.grid import Topology
from smartgrid.limits import LimitOverrides, override_from_event
from smartgrid.power import kilowatts

#: How late a substation's ``power.demand`` may report a change of its limit: its
#: DEMAND_MIN_INTERVAL (0.1 s) and an I/O-loop turn on a busy machine.
REPORT_LAG_SECONDS = 0.25
_EPSILON_KW = 1e-6  # kW are whole watts / 1000: anything above this is a real watt over


@dataclass
class SessionPower:
    request_id: str
    substation: str
    priority: str
    max_kw: float
    accepted_at: float
    started_at: float
    ended_at: float = math.inf
    #: (time, kW) steps, in time order.
    steps: list[tuple[float, float]] = field(default_factory=list)
    energy_kwh: float | None = None
    #: The substation process that ran it (a restart starts a new one).
    instance: str = ""

    def power_at(self, t: float) -> float:
        if not self.started_at <= t < self.ended_at or not self.steps:
            return 0.0
        index = bisect.bisect_right(self.steps, (t, math.inf)) - 1
        return self.steps[index][1] if index >= 0 else 0.0

    def paused_seconds(self, until: float) -> float:
        end = min(self.ended_at, until)
        paused = 0.0
        for (t0, kw), (t1, _) in zip(self.steps, [*self.steps[1:], (end, 0.0)], strict=True):
            if kw <= 0 and t1 > t0:
                paused += min(t1, end) - t0
        return paused


class PowerTimeline:
    """Sessions' power, substations' limits and operators' overrides, from the events."""

    def __init__(self, topology: Topology | None = None) -> None:
        self.topology = topology or Topology()
        self.sessions: dict[str, SessionPower] = {}
        self._limits: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._overrides: list[contract.GridLimit] = []
        #: Earlier runs of requests that started again (after their substation died).
        self.earlier_runs: list[SessionPower] = []
        #: Each substation's latest process, as its events say.
        self._instances: dict[str, str] = {}

    @classmethod
    def from_events(
        cls, events: Iterable[contract.Event], topology: Topology | None = None
    ) -> PowerTimeline:
        timeline = cls(topology)
        ordered = sorted(events, key=lambda e: e.at)
        for event in ordered:
            timeline.apply(event)
        return timeline

    def apply(self, event: contract.Event) -> None:
        """Take one event; in time order (:meth:`from_events` sorts them)."""
        instance = getattr(event, "instance", None)
        substation = getattr(event, "substation", None)
        if isinstance(instance, str) and isinstance(substation, str):
            self._heard(substation, instance, event.at)
        if isinstance(event, contract.SessionStarted):
            fields = event.power()
            power = fields.max_kw if event.power_kw is None else event.power_kw
            earlier = self.sessions.get(event.request_id)
            if earlier is not None:
                earlier.ended_at = min(earlier.ended_at, event.at)
                self.earlier_runs.append(earlier)
            self.sessions[event.request_id] = SessionPower(
                event.request_id,
                event.substation,
                fields.priority.value,
                fields.max_kw,
                event.accepted_at,
                event.at,
                steps=[(event.at, power)],
                instance=event.instance,
            )
        elif isinstance(event, contract.SessionPower):
            session = self.sessions.get(event.request_id)
            if session is not None and event.at >= session.started_at:
                session.steps.append((event.at, event.power_kw))
        elif isinstance(event, contract.SessionCompleted):
            session = self.sessions.get(event.request_id)
            if session is not None:
                session.ended_at = event.at
                session.energy_kwh = event.energy_kwh
        elif isinstance(event, contract.PowerDemand):
            self._limits[event.substation].append((event.at, event.limit_in_force_kw))
        elif isinstance(event, contract.GridLimit):
            self._overrides.append(event)

    def first_starts(self) -> dict[str, float]:
        """When each request first started (a wait ends there, whatever ran again later)."""
        first = {rid: s.started_at for rid, s in self.sessions.items()}
        for run in self.earlier_runs:
            first[run.request_id] = min(first[run.request_id], run.started_at)
        return first

    def _heard(self, substation: str, instance: str, at: float) -> None:
        """A new process of ``substation``: the sessions of the old one died with it."""
        known = self._instances.get(substation)
        self._instances[substation] = instance
        if known is None or known == instance:
            return
        for session in self.sessions.values():
            if session.substation == substation and session.instance == known:
                session.ended_at = min(session.ended_at, at)

    @property
    def overrides(self) -> list[contract.GridLimit]:
        """The operators' limit changes seen, in time order."""
        return list(self._overrides)

    # ------------------------------------------------------------------ at one instant
    def runs(self) -> list[SessionPower]:
        """Every session's every run: the current ones and those cut short by a restart."""
        return [*self.sessions.values(), *self.earlier_runs]

    def substation_power(self, t: float) -> dict[str, float]:
        power: dict[str, float] = defaultdict(float)
        for session in self.runs():
            power[session.substation] += session.power_at(t)
        return dict(power)

    def substation_limit(
        self, substation: str, t: float, within_lag: Callable[..., float] = max
    ) -> float | None:
        """The limit in force at ``t``, as far as the reports tell: a report goes out up to
        DEMAND_MIN_INTERVAL after the change it reports (the sessions' new power is stamped
        at once), so a limit reported within ``REPORT_LAG_SECONDS`` after ``t`` may already
        have been in force; the higher of the two counts (``within_lag=min``: the lower)."""
        steps = self._limits.get(substation)
        if not steps:
            return None
        index = bisect.bisect_right(steps, (t, math.inf)) - 1
        known = [steps[index][1]] if index >= 0 else []
        known += [kw for at, kw in steps[index + 1 :][:3] if at <= t + REPORT_LAG_SECONDS]
        return within_lag(known) if known else None

    def node_limits(self, t: float) -> dict[str, float]:
        store = LimitOverrides()
        for event in self._overrides:
            if event.at <= t:
                store.apply(override_from_event(event))
        overrides = store.in_force(t)
        limits = {}
        for node in self.topology.nodes.values():
            limit = node.limit_w
            if node.id in overrides:
                limit = min(limit, overrides[node.id])
            limits[node.id] = kilowatts(limit)
        return limits

    def node_power(self, substation_power: Mapping[str, float]) -> dict[str, float]:
        power: dict[str, float] = defaultdict(float)
        for substation, kw in substation_power.items():
            for node in self.topology.path(substation)[1:]:
                power[node] += kw
        return dict(power)

    @property
    def span(self) -> tuple[float, float] | None:
        if not self.sessions:
            return None
        start = min(s.started_at for s in self.runs())
        end = max(s.ended_at if s.ended_at < math.inf else s.steps[-1][0] for s in self.runs())
        return start, end


@dataclass
class NodeFigures:
    peak_kw: float = 0.0
    #: Samples with a known limit, and those above it.
    samples: int = 0
    over: int = 0
    worst_over_kw: float = 0.0
    #: Mean of power / limit over the samples with a known limit.
    utilisation_mean: float | None = None


@dataclass(frozen=True)
class PowerSample:
    t: float
    substations: Mapping[str, float]
    substation_limits: Mapping[str, float | None]
    nodes: Mapping[str, float]
    node_limits: Mapping[str, float]


@dataclass
class PowerReport:
    interval: float
    substations: dict[str, NodeFigures] = field(default_factory=dict)
    nodes: dict[str, NodeFigures] = field(default_factory=dict)
    energy_kwh: float = 0.0
    sessions: int = 0
    paused_sessions: int = 0
    paused_seconds_total: float = 0.0
    waits_by_class: dict[str, dict[str, float | None]] = field(default_factory=dict)
    #: Per class: mean over the samples with two or more sessions below their maximum.
    jain_by_class: dict[str, float | None] = field(default_factory=dict)
    series: list[PowerSample] = field(default_factory=list, repr=False)

    @property
    def samples_over_limit(self) -> int:
        return sum(f.over for f in [*self.substations.values(), *self.nodes.values()])

    def to_json(self) -> dict:
        def figures(found: Mapping[str, NodeFigures]) -> dict:
            return {name: vars(f) for name, f in sorted(found.items())}

        return {
            "interval": self.interval,
            "substations": figures(self.substations),
            "nodes": figures(self.nodes),
            "samples_over_limit": self.samples_over_limit,
            "energy_kwh": self.energy_kwh,
            "sessions": self.sessions,
            "paused_sessions": self.paused_sessions,
            "paused_seconds_total": self.paused_seconds_total,
            "waits_by_class": self.waits_by_class,
            "jain_by_class": self.jain_by_class,
        }


def _update(figures: NodeFigures, kw: float, limit: float | None, ratios: list[float]) -> None:
    figures.peak_kw = max(figures.peak_kw, kw)
    if limit is None:
        return
    figures.samples += 1
    if kw > limit + _EPSILON_KW:
        figures.over += 1
        figures.worst_over_kw = max(figures.worst_over_kw, kw - limit)
    if limit > 0:
        ratios.append(kw / limit)


def power_report(timeline: PowerTimeline, interval: float = 0.1) -> PowerReport:
    """Sample the timeline every ``interval`` seconds (the issue's 100 ms) and sum it up."""
    report = PowerReport(interval)
    span = timeline.span
    sessions = list(timeline.sessions.values())
    runs = timeline.runs()
    if span is None:
        return report
    start, end = span
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    jain: dict[str, list[float]] = defaultdict(list)
    steps = max(1, math.ceil((end - start) / interval))
    for k in range(steps + 1):
        t = start + k * interval
        power = timeline.substation_power(t)
        limits = {s: timeline.substation_limit(s, t) for s in power}
        for substation, kw in power.items():
            figures = report.substations.setdefault(substation, NodeFigures())
            _update(figures, kw, limits[substation], ratios[("s", substation)])
        node_power = timeline.node_power(power)
        node_limits = timeline.node_limits(t)
        for node, kw in node_power.items():
            figures = report.nodes.setdefault(node, NodeFigures())
            _update(figures, kw, node_limits.get(node), ratios[("n", node)])
        by_class: dict[str, list[float]] = defaultdict(list)
        for session in runs:
            if session.started_at <= t < session.ended_at:
                kw = session.power_at(t)
                if kw < session.max_kw - _EPSILON_KW:
                    by_class[session.priority].append(kw)
        for priority, values in by_class.items():
            index = jain_index(values) if len(values) >= 2 else None
            if index is not None:
                jain[priority].append(index)
        report.series.append(PowerSample(t, power, limits, node_power, node_limits))
    for (kind, name), values in ratios.items():
        found = report.substations if kind == "s" else report.nodes
        found[name].utilisation_mean = sum(values) / len(values) if values else None
    report.sessions = len(sessions)
    report.energy_kwh = sum(s.energy_kwh or 0.0 for s in sessions)
    paused = [s.paused_seconds(end) for s in sessions]
    report.paused_sessions = sum(1 for p in paused if p > 0)
    report.paused_seconds_total = sum(paused)
    waits: dict[str, list[float]] = defaultdict(list)
    first = timeline.first_starts()
    for session in sessions:
        waits[session.priority].append(max(0.0, first[session.request_id] - session.accepted_at))
    report.waits_by_class = {
        priority: {
            "count": len(values),
            "p50": percentile(values, 50),
            "p99": percentile(values, 99),
            "max": max(values),
        }
        for priority, values in sorted(waits.items())
    }
    report.jain_by_class = {
        priority: (sum(values) / len(values) if values else None)
        for priority, values in sorted(jain.items())
    }
    return report


def render_power(report: PowerReport) -> str:
    """The power part of the text report."""
    lines = [f"power (sampled every {report.interval:g} s, from the session events):"]

    def rows(title: str, found: Mapping[str, NodeFigures]) -> None:
        for name, f in sorted(found.items()):
            util = "" if f.utilisation_mean is None else f", mean {f.utilisation_mean:.0%} of limit"
            over = f"; {f.over} of {f.samples} samples over its limit" if f.samples else ""
            if f.over:
                over += f" (worst by {f.worst_over_kw:.3f} kW)"
            lines.append(f"  {title} {name}: peak {f.peak_kw:.1f} kW{util}{over}")

    rows("substation", report.substations)
    rows("node", report.nodes)
    lines.append(
        f"  energy delivered {report.energy_kwh:.1f} kWh over {report.sessions} sessions;"
        f" {report.paused_sessions} paused at some point, {report.paused_seconds_total:.1f} s"
        " in all"
    )
    for priority, w in report.waits_by_class.items():
        lines.append(
            f"  wait to start, {priority}: p50 {_s(w['p50'])}, p99 {_s(w['p99'])},"
            f" max {_s(w['max'])} ({w['count']} sessions)"
        )
    for priority, index in report.jain_by_class.items():
        shown = "n/a" if index is None else f"{index:.3f}"
        lines.append(f"  fairness (Jain, {priority} sessions below their own maximum): {shown}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"
