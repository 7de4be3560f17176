"""The power model on the real stack (issue 15): real processes over a real broker, the grid of
bench/ev-site.toml, the EV mix of ``loadgen --ev-mix``, time compressed (3.6 s a simulated hour).

The stack: the gateway, one balancer (its allocator hands out shares with 3 s leases) and the
site's four substations (6, 6, 4 and 8 points; limits from the topology file, which they read
for their own entry), ``SUBSTATION_FAILSAFE_KW`` 10. Every substation's /metrics is sampled
every 100 ms (power drawn, limit in force, its cars' unconstrained demand, lease left); a grid
node's power is the sum of the substations under it in the same sample.

Two phases:

1. **A day** (``--rate``, peak arrivals a real second; loadgen's own trace of ``--seed``), and in
   it, with ``--faults`` (the default): the only balancer frozen (SIGSTOP) for lease + 2 s so
   that every substation's lease lapses, an operator's limit cut at the evening peak
   (``python -m smartgrid.grid set feeder-a KW --for S``, to half of what the feeder draws),
   and one substation killed with SIGKILL and restarted 2 s later.
2. **Overload** (``--overload``: the energy asked per hour that many times what the site's
   connection can deliver, at a constant rate for ``--overload-seconds``; 0: none): how held
   requests are released by class.

Reported: samples over any limit (substation or node), a cut obeyed within how long, a lapsed
lease at the failsafe within how long, delivered power against min(limit, the cars' maxima) on
every node while demand is at least 1.2 times the limit, Jain's index over same-class sessions
below their own maximum, waits per class, the share of releases each class got while it had
requests waiting, and the share of requested energy delivered by the departures bench.acn
imposes (its "smartgrid, real stack" row).

    .venv/bin/python -m bench.power_stack --overload 0 --name power-stack-faults
    .venv/bin/python -m bench.power_stack --no-faults            # the clean day, then overload
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.config import BalancerConfig
from bench.acn import energy_until
from bench.common import (
    ROOT,
    bench_settings,
    machine,
    markdown_table,
    private_vhost,
    save,
    scrape,
)
from bench.fairness import FairnessSeries, SessionAt
from loadgen import evmix
from loadgen.power import PowerTimeline, SessionPower, power_report, render_power
from loadgen.report import jain_index, percentile
from loadgen.report import render as render_report
from loadgen.run import LoadResult, LoadSettings, run_load
from loadgen.schedules import RateProfile
from smartgrid import contract
from smartgrid.config import default_of
from smartgrid.grid import Topology, load_topology
from smartgrid.leases import Demand, target_shares
from smartgrid.limits import override_from_event
from smartgrid.power import MIN_CAR_KW, Priority, SessionDemand, allocate, kilowatts, watts
from stack.local import StackSettings, balancer_process, gateway_process, substation_process
from stack.processes import ServiceProcess

TOPOLOGY_FILE = ROOT / "bench" / "ev-site.toml"
CUT_WHEN_KW = 60.0
CAPACITIES = (6, 6, 4, 8)  # bench.power_balance's EV_SITE
HOUR = 3.6
FAILSAFE_KW = 10.0
LEASE = 3.0
GUARANTEED = {"fleet": 0.10, "standard": 0.10}  # balancer.priorities' defaults
RELEASE_WINDOW = 20
STAY_FACTORS = (1.25, 1.5, 2.0)
_WATT = 1e-3


@dataclass
class Sample:
    t: float
    #: substation -> (power kW, limit in force kW, demand kW, lease left s or None), all
    #: from one scrape of its /metrics (one process, one instant).
    substations: dict[str, tuple[float, float, float, float | None]]


class Sampler:
    """Every substation's /metrics every ``interval``, all at once (one thread each, so that a
    sample's substations are read within milliseconds of each other); a killed one is
    missing."""

    def __init__(self, urls: dict[str, str], interval: float = 0.1) -> None:
        self.urls, self.interval = urls, interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(len(urls))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read(substation: str, url: str) -> tuple[float, float, float, float | None] | None:
        try:
            values = scrape(url)
        except (OSError, urllib.error.URLError):
            return None
        key = (("substation", substation),)
        power = values.get((contract.POWER_METRIC, key))
        limit = values.get((contract.POWER_LIMIT_METRIC, key))
        demand = values.get((contract.POWER_DEMAND_METRIC, key))
        if power is None or limit is None or demand is None:
            return None
        return power, limit, demand, values.get((contract.LEASE_METRIC, key))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            at = time.time()
            futures = {s: self._pool.submit(self._read, s, url) for s, url in self.urls.items()}
            found = {s: r for s, f in futures.items() if (r := f.result()) is not None}
            self.samples.append(Sample(at, found))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown()
        return self.samples


@dataclass
class Cut:
    node: str
    limit_kw: float
    hold: float
    #: When the operator's command was started (before its imports and connection).
    command_at: float
    #: What the node drew (/metrics) when the cut was decided.
    drawn_kw: float = 0.0


@dataclass
class Stack:
    """The processes, started one by one so that a substation can be killed and restarted."""

    settings: StackSettings
    substations: list[ServiceProcess] = field(default_factory=list)
    balancer: ServiceProcess | None = None
    gateway: ServiceProcess | None = None

    def start(self) -> None:
        self.substations = [
            substation_process(self.settings, i).start() for i in range(len(CAPACITIES))
        ]
        for service in self.substations:
            service.wait_healthy()
        self.balancer = balancer_process(self.settings).start()
        self.balancer.wait_healthy()
        self.gateway = gateway_process(self.settings).start()
        self.gateway.wait_healthy()

    def restart_substation(self, index: int) -> None:
        self.substations[index] = substation_process(self.settings, index).start()

    def stop(self) -> dict[str, int]:
        services = [self.gateway, self.balancer, *self.substations]
        return {s.name: s.stop() for s in services if s is not None}


# ---------------------------------------------------------------- the events' exact timeline
def override_of(timeline: PowerTimeline, cut: Cut) -> contract.GridLimit | None:
    """The cut's ``grid.limit`` event, stamped when the operator's command issued it."""
    return next(
        (
            o
            for o in timeline.overrides
            if o.node == cut.node and o.limit_kw == cut.limit_kw and o.at >= cut.command_at
        ),
        None,
    )


def obeyed_after(timeline: PowerTimeline, topology: Topology, cut: Cut, step: float = 0.01):
    """From the override's issue to the moment the node's power went within the cut for
    good (until the cut's end), on the sessions' exact power steps; (issued, obeyed)."""
    override = override_of(timeline, cut)
    if override is None or override.valid_until is None:
        return None
    t, last_over = override.at, None
    while t < override.valid_until:
        power = timeline.node_power(timeline.substation_power(t)).get(cut.node, 0.0)
        if power > cut.limit_kw + _WATT:
            last_over = t
        t += step
    return override.at, (override.at if last_over is None else last_over + step)


def node_checks(
    timeline: PowerTimeline, topology: Topology, graces: list[tuple[str, float, float]]
) -> dict:
    """Every 100 ms of the run, every grid node's power (the sum of its sessions' exact
    power) against its limit in force (an operator's cut from its issue): samples over, and
    those within a cut's grace (from its issue until obeyed; the issue allows 2 s)."""
    span = timeline.span
    over: dict[str, int] = defaultdict(int)
    in_grace: dict[str, int] = defaultdict(int)
    worst: dict[str, float] = defaultdict(float)
    count = 0
    if span is None:
        return {}
    for k in range(math.floor((span[1] - span[0]) / 0.1) + 1):
        t = span[0] + k * 0.1  # not a running sum: no drift from the instants of the events
        count += 1
        limits = timeline.node_limits(t)
        for node, kw in timeline.node_power(timeline.substation_power(t)).items():
            if kw > limits[node] + _WATT:
                if any(n == node and a <= t < b for n, a, b in graces):
                    in_grace[node] += 1
                else:
                    over[node] += 1
                    worst[node] = max(worst[node], kw - limits[node])
    return {
        "samples": count,
        "over": dict(over),
        "worst_over_kw": dict(worst),
        "over_in_cut_grace": dict(in_grace),
    }


def deliverable(
    topology: Topology, limits: dict[str, float], wants: dict[str, float]
) -> dict[str, float]:
    """What each node could deliver: min(its limit, the sum of its children's), a
    substation's being min(its limit, its cars' maxima)."""
    found: dict[str, float] = {}

    def can(node: str) -> float:
        if node not in found:
            children = [c for c in topology.children(node) if c in wants]
            below = sum(can(c) for c in children) if children else wants[node]
            found[node] = min(limits.get(node, math.inf), below)
        return found[node]

    for node in wants:
        can(node)
    return found


#: How long a power meter integrates the energy of one reading (each sample's).
METER_SECONDS = 0.1
#: Per row of :func:`efficiency` at one instant: (delivered kW, what it could deliver, whether
#: its cars ask at least 1.2 times its limit).
Rows = dict[str, tuple[float, float, bool]]


def efficiency(
    timeline: PowerTimeline,
    topology: Topology,
    excluded: list[tuple[float, float]],
    since: float,
    until: float,
) -> dict:
    """Every 100 ms, on every node whose cars ask at least 1.2 times its limit in force:
    delivered kW against what could be delivered, min(limit, the sum over its children of
    the same), a substation's being min(its own limit, its cars' maxima). The issue's
    min(limit, the cars' maxima) counts cars behind a child's full limit as deliverable at
    the parent; they are not. Excluded: while leases lapse (everyone is on the failsafe, on
    purpose) and while a killed substation is away.

    Two readings of each sample: the instantaneous one (the power at that instant), and a
    meter's (``meter``: the energy delivered in the 100 ms up to it divided by 0.1 s, against
    what could be delivered averaged over the same 100 ms), which is how a power meter samples:
    a share moving within a few milliseconds costs its few milliseconds, not a whole sample.
    The same samples either way (where the cars ask enough at the instant), but for a reading
    whose 100 ms had nothing to deliver (the node's first cars arrived at the instant)."""
    instant: dict[str, list[float]] = defaultdict(list)
    meter: dict[str, list[float]] = defaultdict(list)
    runs = timeline.runs()
    own = {n: kilowatts(node.limit_w) for n, node in topology.nodes.items()}
    changes = sorted(_changes(timeline, runs))
    # The previous sample instant's rows: the start of this sample's meter window (t - 0.1 is
    # the previous t, to the bit but for a few instants in an hour).
    previous: dict[float, Rows] = {}
    t = since
    while t < until:
        if not any(a <= t < b for a, b in excluded):
            rows = _delivered(timeline, topology, own, runs, t)
            window = _meter_reading(timeline, topology, own, runs, changes, t, previous)
            previous = {t: rows}
            for row, (delivered, deliverable_kw, asks_enough) in rows.items():
                if asks_enough and deliverable_kw > 0:
                    instant[row].append(delivered / deliverable_kw)
                    energy, could = window[row]
                    if could > 0:
                        meter[row].append(energy / could)
        t += 0.1
    found = _ratios(instant)
    for row, figures in _ratios(meter).items():
        found[row]["meter"] = figures
    return found


def _changes(timeline: PowerTimeline, runs: list[SessionPower]) -> set[float]:
    """Every instant at which a node's power or limit may change."""
    found: set[float] = set()
    for run in runs:
        found.add(run.started_at)
        if run.ended_at < math.inf:
            found.add(run.ended_at)
        found.update(when for when, _ in run.steps)
    for event in timeline.overrides:
        override = override_from_event(event)
        found.add(event.at)
        if override.valid_until is not None:
            found.add(override.valid_until)
    return found


def _delivered(
    timeline: PowerTimeline,
    topology: Topology,
    own: dict[str, float],
    runs: list[SessionPower],
    t: float,
) -> Rows:
    """At ``t``, each grid node's row (and its "within" row): (delivered kW, what it could
    deliver, whether its cars ask at least 1.2 times its limit)."""
    power: dict[str, float] = defaultdict(float)
    wants: dict[str, float] = defaultdict(float)
    for run in runs:
        if run.started_at <= t < run.ended_at:
            for node in topology.path(run.substation):
                power[node] += run.power_at(t)
                wants[node] += run.max_kw
    limits = timeline.node_limits(t)
    can = deliverable(topology, {**own, **limits}, wants)
    left = _left_by_parents(topology, {**own, **limits}, power, wants)
    rows: Rows = {}
    for node, asked in wants.items():
        if not topology.children(node):
            continue  # a substation: substation_efficiency
        limit = limits.get(node, own.get(node, math.inf))
        rows[node] = (power[node], can[node], asked >= 1.2 * limit)
        parent = topology.parent(node)
        if parent is not None:
            # Against what its parent's limit left it beside its siblings' draw.
            within = min(left[node], can[node])
            rows[f"{node} within {parent}"] = (
                power[node],
                max(0.0, within),
                asked >= 1.2 * left[node] and left[node] > 0,
            )
    return rows


def _meter_reading(
    timeline: PowerTimeline,
    topology: Topology,
    own: dict[str, float],
    runs: list[SessionPower],
    changes: list[float],
    t: float,
    known: Mapping[float, Rows],
) -> dict[str, tuple[float, float]]:
    """Per row, the energy delivered and what could have been over the METER_SECONDS up to
    ``t`` (kW x s), exactly: both are step functions that change only at ``changes``.
    ``known``: :func:`_delivered`'s rows at instants already worked out."""
    begin = t - METER_SECONDS
    cuts = [begin, *changes[bisect.bisect_right(changes, begin) : bisect.bisect_left(changes, t)]]
    found: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for a, b in zip(cuts, [*cuts[1:], t], strict=True):
        rows = known.get(a)
        if rows is None:
            rows = _delivered(timeline, topology, own, runs, a)
        for row, (delivered, could, _) in rows.items():
            energy, possible = found[row]
            found[row] = (energy + delivered * (b - a), possible + could * (b - a))
    return found


def _left_by_parents(
    topology: Topology,
    limits: dict[str, float],
    power: dict[str, float],
    wants: dict[str, float],
) -> dict[str, float]:
    """What each node could draw at most, top-down: its limit, and no more than what its
    parent could beside what its siblings draw. A feeder under a full site cannot deliver its
    own limit, whatever its cars ask; how much of the site it gets is the division's choice,
    so this holds it only to the power nobody else used."""
    found: dict[str, float] = {}

    def left(node: str) -> float:
        if node not in found:
            limit = limits.get(node, math.inf)
            parent = topology.parent(node)
            if parent is not None and parent in wants:
                siblings = sum(
                    power[c] for c in topology.children(parent) if c != node and c in wants
                )
                limit = min(limit, left(parent) - siblings)
            found[node] = limit
        return found[node]

    for node in wants:
        left(node)
    return found


# ---------------------------------------------------------------- /metrics samples
def substation_efficiency(
    samples: list[Sample], excluded: list[tuple[float, float]], since: float, until: float
) -> dict:
    """A substation's row of :func:`efficiency`, from its /metrics: delivered kW against
    min(the limit in force, its cars' maxima), read together, while they ask at least 1.2
    times that limit (the share it holds: its parents decide the share)."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        if not since <= sample.t < until or any(a <= sample.t < b for a, b in excluded):
            continue
        for substation, (kw, limit, want, _lease) in sample.substations.items():
            if limit > 0 and want >= 1.2 * limit:
                ratios[substation].append(kw / min(limit, want))
    return _ratios(ratios)


def _ratios(ratios: dict[str, list[float]]) -> dict:
    return {
        node: {
            "samples": len(values),
            "mean": statistics.fmean(values),
            "share_at_least_95": sum(v >= 0.95 - 1e-9 for v in values) / len(values),
            "p01": percentile(values, 1),
        }
        for node, values in sorted(ratios.items())
        if values
    }


def substation_checks(samples: list[Sample]) -> dict:
    """Every sample, every substation: power against its limit in force, read together."""
    counted: dict[str, int] = defaultdict(int)
    over: dict[str, int] = defaultdict(int)
    for sample in samples:
        for substation, (kw, limit, _want, _lease) in sample.substations.items():
            counted[substation] += 1
            over[substation] += kw > limit + _WATT
    return {"samples": len(samples), "checked": dict(sorted(counted.items())), "over": dict(over)}


def metrics_node_sums(topology: Topology, samples: list[Sample], graces) -> dict:
    """The nodes' power as the sum of their substations' /metrics in one sample: read within
    milliseconds of each other, not at one instant, so a share moved from one substation to
    another (lowered there, then raised here once the lowering is acknowledged) can show as
    both at once. The events' timeline is exact; this is its outside check."""
    over: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        power: dict[str, float] = defaultdict(float)
        for substation, (kw, *_rest) in sample.substations.items():
            for node in topology.path(substation)[1:]:
                power[node] += kw
        for node, kw in power.items():
            limit = kilowatts(topology.nodes[node].limit_w)
            for n, issued, obeyed, cut_kw, until in graces:
                if n == node and issued <= sample.t < obeyed:
                    limit = math.inf  # the cut's own delay
                elif n == node and obeyed <= sample.t < until:
                    limit = min(limit, cut_kw)
            if kw > limit + _WATT:
                over[node].append(sample.t)
    return {"over": {n: len(v) for n, v in over.items()}, "at": dict(over)}


def grid_command(settings: StackSettings, *args: str) -> float:
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "smartgrid.grid",
            "--amqp-url",
            settings.amqp_url,
            "--topology",
            str(TOPOLOGY_FILE),
            *args,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return started


class Scenario(threading.Thread):
    """The day's events, at offsets from the start of sending: the freeze, the cut, the kill.

    The thread lives until :meth:`release`: the restarted substation is its child, and
    PR_SET_PDEATHSIG (stack.processes) signals a child when the *thread* that started it
    ends, not the process."""

    def __init__(self, stack: Stack, sampler: Sampler, args) -> None:
        super().__init__(daemon=True)
        self.stack, self.sampler, self.args = stack, sampler, args
        self.topology = load_topology(TOPOLOGY_FILE)
        self.started_at = time.time()
        self.cuts: list[Cut] = []
        self.frozen: tuple[float, float] | None = None
        self.killed: tuple[str, float, float] | None = None
        self.errors: list[str] = []
        self.done = threading.Event()
        self._released = threading.Event()

    def _at(self, hour: float) -> None:
        time.sleep(max(0.0, self.started_at + hour * HOUR - time.time()))

    def feeder_kw(self, node: str) -> float:
        last = self.sampler.last()
        if last is None:
            return 0.0
        return sum(
            kw for s, (kw, *_rest) in last.substations.items() if node in self.topology.path(s)
        )

    def release(self) -> None:
        self._released.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported with the results
            self.errors.append(repr(exc))
        self.done.set()
        self._released.wait()

    def _run(self) -> None:
        args, stack = self.args, self.stack
        assert stack.balancer is not None
        if not args.faults:
            return
        self._at(args.freeze_at)
        stack.balancer.signal(signal.SIGSTOP)
        frozen_at = time.time()
        time.sleep(LEASE + 2)
        stack.balancer.signal(signal.SIGCONT)
        self.frozen = (frozen_at, time.time())

        self._at(args.cut_at)
        # Cut the feeder to half of what it draws, once it draws enough for that to bind.
        node, drawn = "feeder-a", 0.0
        deadline = time.time() + 10 * HOUR
        while time.time() < deadline:
            drawn = self.feeder_kw(node)
            if drawn >= CUT_WHEN_KW:
                break
            time.sleep(0.1)
        cut_kw = max(10.0, math.floor(drawn / 2))
        command_at = grid_command(
            stack.settings, "set", node, f"{cut_kw:g}", "--for", f"{args.cut_seconds:g}"
        )
        self.cuts.append(Cut(node, cut_kw, args.cut_seconds, command_at, drawn))

        self._at(args.kill_at)
        index = 1
        victim = stack.substations[index]
        victim.signal(signal.SIGKILL)
        killed_at = time.time()
        if victim.process is not None:
            victim.process.wait()
        time.sleep(2.0)
        stack.restart_substation(index)
        self.killed = (victim.name, killed_at, time.time())


def lapses(samples: list[Sample], frozen: tuple[float, float]) -> dict:
    """Per substation: from its lease's end (as it showed the time left) to its first sample
    at the failsafe."""
    frozen_at, thawed_at = frozen
    found = {}
    names = {s for sample in samples for s in sample.substations}
    for name in sorted(names):
        ends = [
            sample.t + lease
            for sample in samples
            if frozen_at <= sample.t < thawed_at
            and name in sample.substations
            and (lease := sample.substations[name][3]) is not None
            and lease > 0
        ]
        at_failsafe = [
            sample.t
            for sample in samples
            if frozen_at <= sample.t <= thawed_at + 1
            and name in sample.substations
            and abs(sample.substations[name][1] - FAILSAFE_KW) < _WATT
        ]
        above = [
            sample.t
            for sample in samples
            if at_failsafe
            and at_failsafe[0] <= sample.t < thawed_at
            and name in sample.substations
            and sample.substations[name][0] > FAILSAFE_KW + _WATT
        ]
        found[name] = {
            "lease_end": max(ends) if ends else None,
            "at_failsafe": at_failsafe[0] if at_failsafe else None,
            "after_lease_end_s": (at_failsafe[0] - max(ends)) if ends and at_failsafe else None,
            "samples_above_failsafe_after": len(above),
        }
    return found


def _trace_by_request(
    result: LoadResult, trace: list[evmix.EvRequest]
) -> dict[str, evmix.EvRequest]:
    """Each accepted request's entry of the trace (loadgen sends the trace in order)."""
    ordered = sorted(result.outcomes, key=lambda o: o.sent_at)
    return {
        o.request_id: r for o, r in zip(ordered, trace, strict=False) if o.accepted and o.request_id
    }


def demand_met(result: LoadResult, trace: list[evmix.EvRequest]) -> dict:
    """bench.acn's departures imposed on the real stack's sessions: a car stays ``factor``
    times its time at full power from the start of its session; what it had received by
    then, against everything the day's cars asked for."""
    timeline = result.power_timeline
    assert timeline is not None
    asked = sum(r.energy_kwh for r in trace)
    by_request = _trace_by_request(result, trace)
    mismatched = sum(
        1
        for rid, session in timeline.sessions.items()
        if rid in by_request and abs(session.max_kw - by_request[rid].max_kw) > 1e-9
    )
    rows = {}
    for factor in STAY_FACTORS:
        delivered = 0.0
        full = 0
        per_class: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for rid, request in by_request.items():
            session = timeline.sessions.get(rid)
            got = 0.0
            if session is not None:
                leaves = session.started_at + factor * request.hours_at_full_power() * HOUR
                got = min(request.energy_kwh, energy_until(session, leaves, HOUR))
            delivered += got
            full += got >= request.energy_kwh - 0.01
            per_class[request.priority][0] += got
            per_class[request.priority][1] += request.energy_kwh
        rows[str(factor)] = {
            "delivered_kwh": delivered,
            "demand_met": delivered / asked if asked else None,
            "cars_fully_served": full / len(trace) if trace else None,
            "met_by_class": {p: got / want for p, (got, want) in sorted(per_class.items()) if want},
        }
    return {"asked_kwh": asked, "cars": len(trace), "mismatched": mismatched, "by_stay": rows}


def releases(result: LoadResult, samples: list[Sample], window: int = RELEASE_WINDOW) -> dict:
    """The share of releases (sessions started) each class got, over the last ``window``
    releases at every 100 ms sample, where the class had requests waiting at every one of
    them: the guarantee (10% each for fleet and standard) holds to within two releases."""
    timeline = result.power_timeline
    assert timeline is not None
    sessions = sorted(timeline.sessions.values(), key=lambda s: s.started_at)
    waiting_spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in sessions:
        waiting_spans[s.priority].append((s.accepted_at, s.started_at))

    def waiting(priority: str, t: float) -> bool:
        return any(a <= t < b for a, b in waiting_spans[priority])

    starts = [(s.started_at, s.priority) for s in sessions]
    found: dict[str, dict] = {}
    for priority, guaranteed in GUARANTEED.items():
        shares = []
        for sample in samples:
            done = [x for x in starts if x[0] <= sample.t][-window:]
            if len(done) < window or not all(waiting(priority, t) for t, _ in done):
                continue
            shares.append(sum(p == priority for _, p in done) / window)
        found[priority] = {
            "guaranteed": guaranteed,
            "samples": len(shares),
            "at_least_guaranteed": (
                sum(s >= guaranteed - 1e-9 for s in shares) / len(shares) if shares else None
            ),
            "within_two_releases": (
                sum(s >= guaranteed - 2 / window - 1e-9 for s in shares) / len(shares)
                if shares
                else None
            ),
            "min_share": min(shares) if shares else None,
            "mean_share": statistics.fmean(shares) if shares else None,
        }
    return found


def power_by_class(result: LoadResult, since: float, until: float, interval: float = 0.1) -> dict:
    timeline = result.power_timeline
    assert timeline is not None
    totals: dict[str, float] = defaultdict(float)
    t = since
    while t < until:
        for s in timeline.sessions.values():
            totals[s.priority] += s.power_at(t)
        t += interval
    whole = sum(totals.values())
    return {p: kw / whole for p, kw in sorted(totals.items())} if whole else {}


def waits(result: LoadResult) -> dict:
    timeline = result.power_timeline
    assert timeline is not None
    found: dict[str, list[float]] = defaultdict(list)
    first = timeline.first_starts()  # a session run again after a SIGKILL waited once
    for s in timeline.sessions.values():
        found[s.priority].append(first[s.request_id] - s.accepted_at)
    return {
        p: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v)}
        for p, v in sorted(found.items())
    }


def every_sample(
    timeline: PowerTimeline, interval: float = 0.1
) -> Iterator[tuple[float, list[SessionPower]]]:
    """Each sampling instant of the timeline's span, ``interval`` apart, with the sessions
    running then (each session's power rebuilt from its events)."""
    span = timeline.span
    if span is None:
        return
    runs = timeline.runs()
    t = span[0]
    while t < span[1]:
        yield t, [r for r in runs if r.started_at <= t < r.ended_at]
        t += interval


def car_min_kw(run: SessionPower) -> float:
    """The car's minimum, by its maximum (the trace's car classes)."""
    return min(run.max_kw, _MIN_KW.get(run.max_kw, MIN_CAR_KW))


def jain_per_substation(timeline: PowerTimeline, interval: float = 0.1) -> dict:
    """Jain's index over the sessions of one class at one substation that run below their
    own maximum (two or more), every 100 ms, averaged per class: the sharing at a
    substation, where the fleet-wide index also counts the substations' different limits."""
    found: dict[str, list[float]] = defaultdict(list)
    for t, live in every_sample(timeline, interval):
        groups: dict[tuple[str, str], list[float]] = defaultdict(list)
        for run in live:
            kw = run.power_at(t)
            if kw < run.max_kw - _WATT:
                groups[(run.substation, run.priority)].append(kw)
        for (_substation, priority), values in groups.items():
            index = jain_index(values) if len(values) >= 2 else None
            if index is not None:
                found[priority].append(index)
    return {p: {"samples": len(v), "mean": statistics.fmean(v)} for p, v in sorted(found.items())}


#: A car's minimum by its maximum (the trace's car classes: one maximum each).
_MIN_KW = {car.max_kw: car.min_kw for car in evmix.CAR_CLASSES}


def jain_of_the_division(
    timeline: PowerTimeline, topology: Topology, interval: float = 0.1
) -> dict:
    """The fleet-wide Jain's index the allocator's division itself gives the sessions running
    at each 100 ms (``leases.target_shares`` down the tree from their classes, minimums and
    maxima, then ``power.allocate`` at each substation, with no report, grant or lease in
    between), averaged as the measured index: what the site's limits allow, so what the
    measured index is read against."""
    found: dict[str, list[float]] = defaultdict(list)
    own = {n: node.limit_w for n, node in topology.nodes.items()}
    for t, live in every_sample(timeline, interval):
        by_substation: dict[str, list[SessionDemand]] = defaultdict(list)
        for order, run in enumerate(live):
            by_substation[run.substation].append(
                SessionDemand(
                    run.request_id,
                    watts(car_min_kw(run)),
                    watts(run.max_kw),
                    Priority(run.priority),
                    order,
                )
            )
        limits = own | {n: watts(kw) for n, kw in timeline.node_limits(t).items()}
        demands = {
            s: Demand.of_sessions(
                ((d.priority, d.min_w, d.max_w) for d in sessions), watts(FAILSAFE_KW)
            )
            for s, sessions in by_substation.items()
        }
        shares = target_shares(topology, limits, demands).shares_w
        groups: dict[str, list[float]] = defaultdict(list)
        for substation, sessions in by_substation.items():
            limit = min(limits[substation], shares.get(substation, limits[substation]))
            power = allocate(limit, sessions).power_w
            for d in sessions:
                if power[d.session] < d.max_w - 1:
                    groups[d.priority.value].append(power[d.session] / 1000)
        for priority, values in groups.items():
            index = jain_index(values) if len(values) >= 2 else None
            if index is not None:
                found[priority].append(index)
    return {p: {"samples": len(v), "mean": statistics.fmean(v)} for p, v in sorted(found.items())}


def jain_per_bottleneck(timeline: PowerTimeline, topology: Topology, interval: float = 0.1) -> dict:
    """Every 100 ms, the fleet-wide index (as loadgen reads it) and beside it the index per
    bottleneck (``bench.fairness``): among the sessions of one class held back by the same
    limit, the nearest node of their path drawing its whole limit in force, which is what
    max-min fairness promises; and which nodes held the sessions below their maximum back."""
    if timeline.span is None:
        return {}
    series = FairnessSeries.empty()
    paths = {r.substation: topology.path(r.substation) for r in timeline.runs()}
    for t, live in every_sample(timeline, interval):
        sessions = [
            SessionAt(r.substation, r.priority, r.power_at(t), r.max_kw, car_min_kw(r))
            for r in live
        ]
        series.add(sessions, paths, timeline.node_limits(t))
    return series.summary()


def fates(result: LoadResult) -> dict:
    report = result.report
    return {
        "accepted": report.accepted,
        "completed_once": report.completed_once,
        "completed_more_than_once": report.completed_more_than_once,
        "started_more_than_once": report.started_more_than_once,
        "dead_lettered": report.dead_lettered,
        "unfinished": report.unfinished,
    }


def load_settings(gateway_url: str, amqp_url: str, **fields) -> LoadSettings:
    return LoadSettings(
        gateway_url=gateway_url,
        amqp_url=amqp_url,
        arrivals="poisson",
        concurrency=64,
        settle_timeout=240.0,
        sample_interval=0.1,
        ev_mix=True,
        hour_seconds=HOUR,
        topology_file=str(TOPOLOGY_FILE),
        **fields,
    )


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args) -> dict:
    """Run both phases; everything measured, raw (analysed by :func:`analyse`)."""
    raw: dict = {"loadavg_before": loadavg(), "machine": machine()}
    with private_vhost("bench-power-stack") as amqp_url, tempfile.TemporaryDirectory() as logs:
        settings = bench_settings(
            amqp_url,
            Path(args.logs or logs),
            substations=len(CAPACITIES),
            capacities=CAPACITIES,
            simulated_hour_seconds=HOUR,
            gateway_workers=1,
            strategy=args.strategy,
            **({"log_level": "DEBUG"} if args.trace else {}),
            extra_env={
                "GRID_TOPOLOGY_FILE": str(TOPOLOGY_FILE),
                "SUBSTATION_FAILSAFE_KW": str(FAILSAFE_KW),
                "LEASE_SECONDS": str(LEASE),
                "SHUTDOWN_GRACE": "0",
            },
        )
        raw["poll_interval"] = settings.poll_interval
        stack = Stack(settings)
        scenario = sampler = None
        try:
            stack.start()
            urls = {
                s: f"http://{settings.host}:{settings.substation_port(i)}/metrics"
                for i, s in enumerate(settings.substation_ids())
            }
            sampler = Sampler(urls)
            _wait_for_shares(sampler)
            if args.day:
                scenario = Scenario(stack, sampler, args)
                _run_day(raw, args, settings, amqp_url, scenario)
            if not args.overload:
                return raw
            # Phase 2: overload, at a constant rate.
            rate = overload_rate(args.overload)
            overload_start = time.time()
            with _priority_shares(args.overload_priorities):
                raw["overload"] = run_load(
                    load_settings(
                        settings.gateway_url,
                        amqp_url,
                        interval=1 / rate,
                        duration=args.overload_seconds,
                        seed=args.seed + 1,
                        profile=RateProfile(
                            ((0.0, rate), (args.overload_seconds, rate)), "overload"
                        ),
                        scenario=f"{args.overload:g}x overload",
                    )
                )
            raw["overload_span"] = (overload_start, overload_start + args.overload_seconds)
            raw["loadavg_overload"] = loadavg()
        finally:
            raw["samples"] = sampler.stop() if sampler is not None else []
            raw["exit_codes"] = stack.stop()
            if scenario is not None:
                scenario.release()
    return raw


@contextlib.contextmanager
def _priority_shares(shares: dict[str, float] | None) -> Iterator[None]:
    """The EV mix with other priority shares (loadgen.evmix draws from its module's table)."""
    if not shares:
        yield
        return
    saved = evmix.PRIORITY_SHARES
    evmix.PRIORITY_SHARES = tuple(shares.items())
    try:
        yield
    finally:
        evmix.PRIORITY_SHARES = saved


def _run_day(raw: dict, args, settings: StackSettings, amqp_url: str, scenario) -> None:
    """Phase 1: the day, with a freeze, a cut and a kill (--faults)."""
    scenario.start()
    raw["day"] = run_load(
        load_settings(
            settings.gateway_url,
            amqp_url,
            interval=1 / args.rate,
            duration=24 * HOUR,
            seed=args.seed,
            scenario="ev day",
        )
    )
    scenario.done.wait()
    raw["day_span"] = (scenario.started_at, time.time())
    raw["cuts"] = scenario.cuts
    raw["frozen"] = scenario.frozen
    raw["killed"] = scenario.killed
    raw["scenario_errors"] = scenario.errors
    raw["loadavg_day"] = loadavg()


def overload_rate(factor: float) -> float:
    """Requests a real second whose energy asks ``factor`` times what the site can deliver."""
    topology = load_topology(TOPOLOGY_FILE)
    mean_kwh = statistics.fmean(
        r.energy_kwh for r in evmix.ev_trace(peak_rate=50, hour_seconds=HOUR, seed=99)
    )
    site_kw = max(kilowatts(n.limit_w) for n in topology.nodes.values() if n.parent is None)
    return factor * site_kw / mean_kwh / HOUR


def analyse(raw: dict, args) -> dict:
    topology = load_topology(TOPOLOGY_FILE)
    samples: list[Sample] = raw["samples"]
    found = {
        "args": vars(args),
        "site": {"capacities": CAPACITIES, "failsafe_kw": FAILSAFE_KW, "lease_s": LEASE},
        "loadavg": {"before": raw["loadavg_before"], "after_day": raw.get("loadavg_day")},
        "exit_codes": raw["exit_codes"],
        "substations_metrics": substation_checks(samples),
    }
    graces: list = []
    if "day" in raw:
        found["day"], graces = analyse_day(raw, args, topology)
    found["nodes_metrics_sums"] = metrics_node_sums(topology, samples, graces)
    if "overload" in raw:
        found["overload"] = analyse_overload(raw, args, topology)
    return found


def analyse_day(raw: dict, args, topology: Topology) -> tuple[dict, list]:
    samples: list[Sample] = raw["samples"]
    day: LoadResult = raw["day"]
    assert day.power_timeline is not None
    trace = evmix.ev_trace(peak_rate=args.rate, hour_seconds=HOUR, seed=args.seed)
    day_start, day_end = raw["day_span"]
    cuts = []
    graces = []
    for cut in raw["cuts"]:
        window = obeyed_after(day.power_timeline, topology, cut)
        described = {**vars(cut), "obeyed_after_issue_s": None, "obeyed_after_command_s": None}
        if window is not None:
            issued, obeyed = window
            described |= {
                "issued_at": issued,
                "obeyed_at": obeyed,
                "obeyed_after_issue_s": obeyed - issued,
                "obeyed_after_command_s": obeyed - cut.command_at,
            }
            graces.append((cut.node, issued, obeyed, cut.limit_kw, issued + cut.hold))
        cuts.append(described)
    excluded = []
    if raw["frozen"]:
        excluded.append((raw["frozen"][0], raw["frozen"][1] + LEASE + 1))
    if raw["killed"]:
        excluded.append((raw["killed"][1], raw["killed"][2] + LEASE + 2))
    node_graces = [(n, a, b) for n, a, b, _kw, _until in graces]
    # From a cut's issue until it is obeyed the cut node draws above its new limit, which no
    # ratio of delivered to deliverable power means anything against.
    excluded += [(a, b) for _n, a, b in node_graces]
    return (
        {
            "trace": evmix.describe_mix(trace),
            "fates": fates(day),
            "nodes": node_checks(day.power_timeline, topology, node_graces),
            "events_power": day.power.to_json() if day.power else None,
            "waits": waits(day),
            "demand_met": demand_met(day, trace),
            "cuts": cuts,
            "frozen": raw["frozen"],
            "killed": raw["killed"],
            "scenario_errors": raw["scenario_errors"],
            "efficiency": efficiency(day.power_timeline, topology, excluded, day_start, day_end)
            | substation_efficiency(samples, excluded, day_start, day_end),
            "jain_per_substation": jain_per_substation(day.power_timeline),
            "jain_of_the_division": jain_of_the_division(day.power_timeline, topology),
            "jain_per_bottleneck": jain_per_bottleneck(day.power_timeline, topology),
            "lapses": lapses(samples, raw["frozen"]) if raw["frozen"] else None,
        },
        graces,
    )


def analyse_overload(raw: dict, args, topology: Topology) -> dict:
    samples: list[Sample] = raw["samples"]
    overload: LoadResult = raw["overload"]
    assert overload.power_timeline is not None
    overload_start, sending_end = raw["overload_span"]
    return {
        "rate_per_second": overload_rate(args.overload),
        "fates": fates(overload),
        "nodes": node_checks(overload.power_timeline, topology, []),
        "events_power": overload.power.to_json() if overload.power else None,
        "waits": waits(overload),
        "poll_interval": raw["poll_interval"],
        "releases": releases(overload, [s for s in samples if overload_start <= s.t < sending_end]),
        "power_share_by_class": power_by_class(overload, overload_start + 5, sending_end),
        "jain_per_substation": jain_per_substation(overload.power_timeline),
        "jain_of_the_division": jain_of_the_division(overload.power_timeline, topology),
        "jain_per_bottleneck": jain_per_bottleneck(overload.power_timeline, topology),
        "efficiency": efficiency(overload.power_timeline, topology, [], overload_start, sending_end)
        | substation_efficiency(samples, [], overload_start, sending_end),
        "loadavg_after": raw["loadavg_overload"],
    }


def _wait_for_shares(sampler: Sampler, timeout: float = 30.0) -> None:
    """Until every substation holds a share: before, each is at its failsafe."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = sampler.last()
        if (
            last
            and len(last.substations) == len(CAPACITIES)
            and all((lease or 0) > 0 for *_x, lease in last.substations.values())
        ):
            return
        time.sleep(0.2)
    raise TimeoutError("the substations got no shares")


def _render_day_events(day: dict) -> list[str]:
    lines = []
    for cut in day["cuts"]:
        lines.append(
            f"limit cut {cut['node']} (drawing {cut['drawn_kw']:.1f} kW) to {cut['limit_kw']:g} kW"
            f" for {cut['hold']:g} s: obeyed"
            f" {_f(cut['obeyed_after_issue_s'])} s after the command issued it"
            f" ({_f(cut['obeyed_after_command_s'])} s after the command started)"
        )
    if day["lapses"]:
        frozen_at, thawed_at = day["frozen"]
        lines.append(
            f"balancer frozen (SIGSTOP) {thawed_at - frozen_at:.1f} s; each lease's end to the"
            f" failsafe ({FAILSAFE_KW:g} kW):"
        )
        rows = [
            [name, _f(v["after_lease_end_s"]), v["samples_above_failsafe_after"]]
            for name, v in day["lapses"].items()
        ]
        lines.append(markdown_table(["substation", "s after lease end", "above failsafe"], rows))
    if day["killed"]:
        name, killed_at, restarted = day["killed"]
        lines.append(f"{name} killed (SIGKILL), restarted {restarted - killed_at:.1f} s later")
    return lines


def render(result: dict) -> str:
    day = result.get("day")
    phases = [p for p in ("day", "overload") if p in result]
    subs, sums = result["substations_metrics"], result["nodes_metrics_sums"]
    lines = [
        f"substations, /metrics every 100 ms ({subs['samples']} samples; power and limit in force"
        f" read together): over the limit in force {sum(subs['over'].values())}"
        f" ({', '.join(f'{n} {c}' for n, c in subs['checked'].items())} checked)",
    ]
    for phase in phases:
        nodes = result[phase]["nodes"]
        lines.append(
            f"grid nodes, {phase}, the sessions' exact power every 100 ms ({nodes['samples']}"
            f" samples): over a limit {sum(nodes['over'].values())} {nodes['over'] or ''},"
            f" within a cut's grace {nodes['over_in_cut_grace'] or 0}"
        )
    lines.append(
        f"grid nodes as sums of one /metrics sample each: over a limit {sums['over'] or 0}"
        " (not one instant: see metrics_node_sums)"
    )
    if day is not None:
        lines += _render_day_events(day)
    for phase in phases:
        rows = [
            [
                n,
                v["samples"],
                f"{v['mean']:.3f}",
                f"{v['share_at_least_95']:.1%}",
                _f(v["p01"]),
                *(
                    [f"{m['mean']:.3f}", f"{m['share_at_least_95']:.1%}", _f(m["p01"])]
                    if (m := v.get("meter"))
                    else ["-", "-", "-"]
                ),
            ]
            for n, v in result[phase]["efficiency"].items()
        ]
        lines.append(
            f"{phase}: delivered / deliverable while the cars ask >= 1.2 x the limit in force;"
            " instantaneous: the power at each 100 ms instant; meter: the energy of the 100 ms"
            " up to it / 0.1 s, against the deliverable averaged over the same 100 ms"
            " (substations: /metrics, instantaneous only)"
        )
        lines.append(
            markdown_table(
                [
                    "node",
                    "samples",
                    "instantaneous mean",
                    ">= 95%",
                    "p1",
                    "meter mean",
                    ">= 95%",
                    "p1",
                ],
                rows,
            )
        )
    for phase in phases:
        found = result[phase]
        jain = (found["events_power"] or {}).get("jain_by_class") or {}
        local = found["jain_per_substation"]
        lines.append(f"{phase} fates: {found['fates']}")
        lines.append(
            f"{phase} Jain's index by class, fleet-wide: "
            + ", ".join(f"{p} {_f(v)}" for p, v in jain.items())
            + "; at one substation: "
            + ", ".join(f"{p} {_f(v['mean'])}" for p, v in local.items())
            + "; the division itself on the same sessions: "
            + ", ".join(
                f"{p} {_f(v['mean'])}" for p, v in found.get("jain_of_the_division", {}).items()
            )
        )
        lines += _render_bottlenecks(phase, found.get("jain_per_bottleneck") or {})
        lines.append(
            f"{phase} wait to start (s): "
            + "; ".join(
                f"{p} p50 {_f(w['p50'])} p99 {_f(w['p99'])} max {_f(w['max'])} (n {w['n']})"
                for p, w in found["waits"].items()
            )
        )
    if day is not None:
        met = day["demand_met"]
        lines.append(
            f"demand met (bench.acn's departures; {met['cars']} cars ask"
            f" {met['asked_kwh']:.0f} kWh; {met['mismatched']} sessions unlike their trace entry):"
        )
        for factor, row in met["by_stay"].items():
            by_class = ", ".join(f"{p} {v:.2%}" for p, v in row["met_by_class"].items())
            lines.append(
                f"  stay x{factor}: {row['delivered_kwh']:.0f} kWh, {row['demand_met']:.2%} of"
                f" demand, fully served {row['cars_fully_served']:.1%}; {by_class}"
            )
    if "overload" not in result:
        lines.append(f"load average (1, 5, 15 min): {result['loadavg']}")
        return "\n".join(lines)
    overload = result["overload"]
    lines.append(
        f"overload {overload['rate_per_second']:.2f} requests/s; releases over every"
        f" {RELEASE_WINDOW} in which the class had requests waiting:"
    )
    for p, r in overload["releases"].items():
        lines.append(
            f"  {p}: guaranteed {r['guaranteed']:.0%}; {r['samples']} samples; at least that in"
            f" {_pct(r['at_least_guaranteed'])}; min {_pct(r['min_share'])},"
            f" mean {_pct(r['mean_share'])}"
        )
    shares = ", ".join(f"{p} {v:.1%}" for p, v in overload["power_share_by_class"].items())
    lines.append(f"  power by class: {shares}")
    lines.append(
        f"load average (1, 5, 15 min): {result['loadavg']}, after the overload"
        f" {overload['loadavg_after']}"
    )
    return "\n".join(lines)


def _render_bottlenecks(phase: str, found: dict) -> list[str]:
    if not found:
        return []
    lines = [
        f"{phase} Jain's index by class per bottleneck (sessions held back by the same limit): "
        + ", ".join(
            f"{p} {_f(v['mean'])} ({v['samples']} samples)"
            for p, v in found["per_bottleneck"].items()
        )
        + "; fleet-wide on the same samples: "
        + ", ".join(
            f"{p} {_f(v['mean'])} ({v['samples']} samples)" for p, v in found["fleet_wide"].items()
        )
    ]
    for p, nodes in found["by_node"].items():
        lines.append(
            f"{phase} {p} sessions below their maximum, by the node holding them back: "
            + "; ".join(
                f"{node} {v['share_of_held']:.1%}"
                + ("" if v["mean"] is None else f" (index {v['mean']:.3f}, {v['samples']} samples)")
                for node, v in nodes.items()
            )
        )
    return lines


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _shares(raw: str) -> dict[str, float]:
    try:
        shares = {k: float(v) for k, v in (part.split("=") for part in raw.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not CLASS=SHARE,...: {raw!r}") from None
    if not set(shares) <= {"emergency", "fleet", "standard"} or min(shares.values()) < 0:
        raise argparse.ArgumentTypeError(f"classes are emergency, fleet, standard: {raw!r}")
    return shares


def load_raw(path: Path | str) -> dict:
    """A run's raw measurements as ``--raw`` kept them. The run was ``python -m
    bench.power_stack``, so this module's classes were pickled under ``__main__``: they are
    looked up here, whichever module loads them (bench.power_dips, bench.power_fairness)."""
    this = sys.modules[__name__]

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__main__":
                return getattr(this, name)
            return super().find_class(module, name)

    with open(path, "rb") as file:
        return _Unpickler(file).load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.power_stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=13 / HOUR,
        help="peak arrivals a real second of the day (13 EV a simulated hour: bench.acn's day)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--strategy",
        default=default_of(BalancerConfig, "strategy"),
        help="BALANCER_STRATEGY (default: the balancer's)",
    )
    parser.add_argument("--freeze-at", type=float, default=9.0, help="simulated hour of the freeze")
    parser.add_argument("--cut-at", type=float, default=17.0, help="simulated hour of the cut")
    parser.add_argument("--cut-seconds", type=float, default=15.0)
    parser.add_argument("--kill-at", type=float, default=20.0, help="simulated hour of the SIGKILL")
    parser.add_argument(
        "--faults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="in the day: freeze the balancer, cut a feeder, kill a substation (default yes)",
    )
    parser.add_argument(
        "--day",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the day (default yes; --no-day: the overload alone)",
    )
    parser.add_argument(
        "--overload", type=float, default=2.0, help="the overload phase's factor (0: none)"
    )
    parser.add_argument(
        "--overload-priorities",
        type=_shares,
        metavar="CLASS=SHARE,...",
        help="the overload's priority mix instead of loadgen's (e.g. emergency=0.6,fleet=0.2,"
        "standard=0.2: emergency requests flood, and fleet and standard live on their guarantee)",
    )
    parser.add_argument("--overload-seconds", type=float, default=40.0)
    parser.add_argument("--name", default="power-stack", help="results in docs/bench/<name>.json")
    parser.add_argument(
        "--raw",
        default=None,
        help="where the run's raw measurements are kept (to analyse again: --analyse-only)",
    )
    parser.add_argument("--analyse-only", action="store_true", help="analyse --raw, run nothing")
    parser.add_argument("--logs", help="keep the services' logs in this directory")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="the services log at DEBUG: with --logs, each report's and grant's timestamps, "
        "which bench.power_dips --logs reads to time a share's hops",
    )
    args = parser.parse_args(argv)
    raw_path = Path(args.raw or f"out/{args.name}.pickle")
    if args.analyse_only:
        raw = load_raw(raw_path)
        for phase in ("day", "overload"):
            if phase in raw and raw[phase].power_timeline is not None:
                # With this checkout's loadgen.power, as the figures below.
                raw[phase].power = power_report(raw[phase].power_timeline, 0.1)
    else:
        raw = run(args)
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_bytes(pickle.dumps(raw))
    for phase in ("day", "overload"):
        if phase not in raw:
            continue
        found: LoadResult = raw[phase]
        print(f"== {phase}: loadgen's report ==")
        print(render_report(found.report))
        if found.power is not None:
            print(render_power(found.power))
    result = analyse(raw, args)
    if "machine" in raw:
        result["machine"] = raw["machine"]  # the run's, not the analysis's
    print("== figures ==")
    path = save(args.name, result)
    print(render(result))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
