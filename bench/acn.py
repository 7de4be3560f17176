"""A peer side by side: Caltech's ACN-Sim (PyPI ``acnportal``) runs its own algorithms on the
same EV day, the same site and the same limits, and smartgrid's allocator runs in the same
simulator beside them.

How the day becomes ACN-Sim's input:

- **Sessions**: loadgen's trace (``bench.power_sim.loadgen_trace``, the seed of the real run).
  ACN-Sim's cars leave at a departure time, which our requests do not have: each car stays
  ``stay_factor`` times as long as it would need at its own maximum power (1.25, 1.5, 2). A car
  is an ``EV`` with an ideal ``Battery`` (capacity = its energy, maximum = its ``max_kw``).
- **Charging points**: every point of every substation is an EVSE. ACN-Sim does not route: a
  car arrives at its station. So the harness gives each car its station once, the same for
  every algorithm: ``power_min``'s choice among substations with a point free (cars hold
  their point until they leave, full or not, as in ACN-Sim). A car that finds every point
  taken waits for the first to free, as the balancer would hold it, and its stay starts then:
  ACN-Sim has no queue, and turning cars away would count the site's points, not the
  algorithms.
- **Limits**: every node of ``bench/ev-site.toml`` (substations, feeders, site) is a current
  constraint over the EVSEs under it, at 1000 V so that 1 A is 1 kW.
- **Algorithms**: ACN-Sim's own round robin (equal share in steps of 1 kW, first come first
  served), earliest deadline first and least laxity first (each car in turn gets the most that
  stays feasible), and uncontrolled charging (everyone at the maximum, limits ignored); and
  smartgrid's allocator (``SmartgridAllocator``): each period, ``leases.target_shares`` down
  the tree and ``power.allocate`` at each substation, as the real substations do. All of them
  recompute every period and see each car's maximum (``CarAwareInterface``: ACN-Sim's own
  interface reports only the station's, a car's maximum would otherwise be learned).

Reported per algorithm: energy delivered, the share of the energy asked for that was
delivered (of all cars, and of the cars that got a point), the share of cars that got all they
asked, the same per priority class, and the periods in which a node drew more than its limit.

    .venv/bin/python -m bench.acn [--peak 13] [--stay-factors 1.25,1.5,2] [--period 1]
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from acnportal.acnsim import Simulator
from acnportal.acnsim.events import EventQueue, PluginEvent
from acnportal.acnsim.interface import Interface, SessionInfo
from acnportal.acnsim.models import EV, EVSE, Battery
from acnportal.acnsim.network import ChargingNetwork, Current
from acnportal.algorithms import (
    BaseAlgorithm,
    RoundRobin,
    SortedSchedulingAlgo,
    UncontrolledCharging,
    earliest_deadline_first,
    first_come_first_served,
    least_laxity_first,
)

from balancer.power_routing import power_min
from balancer.strategies import Candidate
from bench.power_sim import Site, demand_of, loadgen_trace
from loadgen.evmix import EvRequest
from loadgen.power import SessionPower
from smartgrid.grid import GridState, Load, Need
from smartgrid.leases import target_shares
from smartgrid.power import MAX_CAR_KW, Priority, SessionDemand, allocate, watts

#: Volts at every EVSE: ACN-Sim counts current, and at 1000 V one ampere is one kilowatt.
VOLTAGE = 1000.0
#: Above a limit by less than this (kW) is rounding, not a violation (ACN-Sim's own tolerance
#: is 1e-5 A).
_TOLERANCE_KW = 1e-3
ALGORITHMS = ("smartgrid", "round-robin", "edf", "llf", "uncontrolled")


# ------------------------------------------------------------------------------ the day
@dataclass(frozen=True)
class Plug:
    """One car of the trace at one charging point, in ACN-Sim's periods."""

    index: int
    request: EvRequest
    substation: str
    station: str
    arrival: int
    departure: int

    @property
    def session_id(self) -> str:
        return f"ev-{self.index + 1:06d}"


def station_id(substation: str, point: int) -> str:
    return f"{substation}/{point}"


def stay_periods(request: EvRequest, stay_factor: float, period_minutes: float) -> int:
    """How many periods a car stays: ``stay_factor`` times its time at its own maximum."""
    return max(1, math.ceil(stay_factor * request.hours_at_full_power() * 60 / period_minutes))


def plan_plugs(
    site: Site,
    trace: Sequence[EvRequest],
    *,
    hour_seconds: float,
    stay_factor: float,
    period_minutes: float,
    seed: int = 1,
) -> list[Plug]:
    """Each car's station and periods: ``power_min``'s choice among the substations with a
    point free. A car that finds every point taken waits, first come first served, for the
    first to free (as the balancer holds it), and stays its time from then on."""
    rng = random.Random(seed)
    points = {s.id: s.points for s in site.substations}
    limits = site.limits_w()
    # Per substation: (departure, point, request) of the cars plugged in.
    plugged: dict[str, list[tuple[int, int, EvRequest]]] = {s: [] for s in points}
    plugs: list[Plug] = []
    now = 0
    for index, request in enumerate(trace):
        now = max(now, math.floor(request.at / hour_seconds * 60 / period_minutes))
        if all(len(plugged[s]) >= points[s] for s in points):
            now = max(now, min(cars[0][0] for cars in plugged.values()))
        for cars in plugged.values():  # ACN-Sim unplugs before it plugs in, in one period
            cars[:] = [c for c in cars if c[0] > now]
        candidates = [
            Candidate(
                s,
                points[s],
                estimate=len(cars),
                polled_load=len(cars),
                next_end=cars[0][0] if cars else math.inf,
            )
            for s, cars in plugged.items()
        ]
        loads = {
            s: sum((Load.of(watts(r.max_kw), 0, Priority(r.priority)) for _, _, r in cars), Load())
            for s, cars in plugged.items()
        }
        grid = GridState.build(site.topology, loads, limits)
        # No minimum: ACN-Sim has no pausing, so a car needs only a free point.
        need = Need(watts(request.max_kw), 0, Priority(request.priority))
        choice = power_min(candidates, grid, need, rng)
        if choice is None:
            raise AssertionError("a point was free, yet nothing fits")
        taken = {point for _, point, _ in plugged[choice.substation]}
        point = min(set(range(points[choice.substation])) - taken)
        departure = now + stay_periods(request, stay_factor, period_minutes)
        bisect.insort(plugged[choice.substation], (departure, point, request))
        plugs.append(
            Plug(
                index,
                request,
                choice.substation,
                station_id(choice.substation, point),
                now,
                departure,
            )
        )
    return plugs


def network_of(site: Site) -> ChargingNetwork:
    """Every charging point an EVSE; every node's limit a current constraint over the EVSEs
    under it."""
    network = ChargingNetwork()
    under: dict[str, list[str]] = defaultdict(list)
    for spec in site.substations:
        for point in range(spec.points):
            station = station_id(spec.id, point)
            network.register_evse(EVSE(station, max_rate=MAX_CAR_KW), VOLTAGE, 0)
            for node in site.topology.path(spec.id):
                under[node].append(station)
    limits = site.limits_w()
    for node, stations in sorted(under.items()):
        network.add_constraint(Current(stations), limits[node] / VOLTAGE, name=node)
    return network


# ------------------------------------------------------------------------------ algorithms
class CarAwareInterface(Interface):
    """ACN-Sim's interface, telling the algorithms each car's own maximum (our requests carry
    ``max_kw``; ACN-Sim's sessions otherwise know only the station's)."""

    def _active_sessions(self) -> list[SessionInfo]:
        return [
            SessionInfo(
                ev.station_id,
                ev.session_id,
                ev.requested_energy,
                ev.energy_delivered,
                ev.arrival,
                ev.departure,
                ev.estimated_departure,
                self.current_time,
                min_rates=0,
                max_rates=ev.maximum_charging_power * 1000 / VOLTAGE,
            )
            for ev in self._active_evs
        ]


class SmartgridAllocator(BaseAlgorithm):
    """smartgrid's sharing as an ACN-Sim algorithm: shares of every node's limit down the tree
    (``leases.target_shares``, an ideal allocator: no report interval, no lease), then each
    substation's share among its sessions (``power.allocate``: classes first, minimums, the
    rest water-filled). It does not look at departures. A session is offered at most what
    finishes it within the period, as a real substation ends a session the moment its energy is
    delivered and re-shares its power."""

    def __init__(self, site: Site, plugs: Mapping[str, Plug]) -> None:
        super().__init__()
        self.max_recompute = 1
        self.site = site
        self.plugs = plugs
        self.limits_w = site.limits_w()

    def schedule(self, active_sessions: list[SessionInfo]) -> dict[str, list[float]]:
        period_hours = self.interface.period / 60
        by_substation: dict[str, list[SessionDemand]] = defaultdict(list)
        for session in active_sessions:
            plug = self.plugs[session.session_id]
            finishing_w = math.ceil(session.remaining_demand / period_hours * 1000)
            max_w = min(watts(plug.request.max_kw), finishing_w)
            if max_w <= 0:
                continue
            by_substation[plug.substation].append(
                SessionDemand(
                    session.session_id,
                    min(watts(plug.request.min_kw), max_w),
                    max_w,
                    Priority(plug.request.priority),
                    seniority=plug.index,
                )
            )
        shares = target_shares(
            self.site.topology,
            self.limits_w,
            {s: demand_of(sessions) for s, sessions in by_substation.items()},
        ).shares_w
        schedule: dict[str, list[float]] = {}
        for substation, sessions in by_substation.items():
            limit = min(self.limits_w[substation], shares.get(substation, math.inf))
            allocation = allocate(int(limit), sessions)
            for s in sessions:
                schedule[self.plugs[s.session].station] = [allocation.power_w[s.session] / VOLTAGE]
        return schedule


def make_algorithm(name: str, site: Site, plugs: Mapping[str, Plug]) -> BaseAlgorithm:
    if name == "smartgrid":
        return SmartgridAllocator(site, plugs)
    if name == "round-robin":
        return RoundRobin(first_come_first_served, continuous_inc=1.0)
    if name == "edf":
        return SortedSchedulingAlgo(earliest_deadline_first)
    if name == "llf":
        return SortedSchedulingAlgo(least_laxity_first)
    if name == "uncontrolled":
        return UncontrolledCharging()
    raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")


# ------------------------------------------------------------------------------ a run
@dataclass
class AcnRun:
    algorithm: str
    #: kWh delivered per car that got a point, by trace index.
    delivered_kwh: dict[int, float]
    #: Per node: periods above its limit, and the highest draw (kW).
    over_limit: dict[str, int]
    peak_kw: dict[str, float]


def run_acn(site: Site, plugs: Sequence[Plug], algorithm: str, *, period_minutes: float) -> AcnRun:
    by_session = {p.session_id: p for p in plugs}
    events = EventQueue(
        [
            PluginEvent(
                p.arrival,
                EV(
                    p.arrival,
                    p.departure,
                    p.request.energy_kwh,
                    p.station,
                    p.session_id,
                    Battery(p.request.energy_kwh, 0, p.request.max_kw),
                ),
            )
            for p in plugs
        ]
    )
    network = network_of(site)
    simulator = Simulator(
        network,
        make_algorithm(algorithm, site, by_session),
        events,
        start=None,
        period=period_minutes,
        verbose=False,
        interface_type=CarAwareInterface,
    )
    with warnings.catch_warnings():
        # Uncontrolled charging breaks the limits on purpose; its warnings are the point.
        warnings.simplefilter("ignore")
        simulator.run()
    kw = simulator.charging_rates * VOLTAGE / 1000  # stations x periods
    over, peak = {}, {}
    limits = site.limits_w()
    for node, current in zip(network.constraint_index, network.constraint_matrix, strict=True):
        drawn = current @ kw
        over[node] = int(np.sum(drawn > limits[node] / 1000 + _TOLERANCE_KW))
        peak[node] = float(drawn.max()) if drawn.size else 0.0
    delivered = {
        by_session[ev.session_id].index: ev.energy_delivered for ev in simulator.ev_history.values()
    }
    return AcnRun(algorithm, delivered, over, peak)


#: A car is fully served when less than this is missing (kWh): ACN-Sim's own threshold
#: (``analysis.proportion_of_demands_met``); its round robin moves in steps of 1 kW, so a car
#: may end a few watt-hours short.
FULLY_SERVED_KWH = 0.1


def figures(run: AcnRun, plugs: Sequence[Plug]) -> dict:
    """Energy delivered and the share of the demand met, overall and per class."""

    def shares(chosen: Sequence[Plug]) -> dict:
        asked = sum(p.request.energy_kwh for p in chosen)
        got = sum(run.delivered_kwh.get(p.index, 0.0) for p in chosen)
        full = sum(
            1
            for p in chosen
            if run.delivered_kwh.get(p.index, 0.0) >= p.request.energy_kwh - FULLY_SERVED_KWH
        )
        return {
            "cars": len(chosen),
            "asked_kwh": asked,
            "delivered_kwh": got,
            "met": got / asked if asked else None,
            "cars_fully_served": full / len(chosen) if chosen else None,
        }

    return {
        "algorithm": run.algorithm,
        **shares(plugs),
        "by_class": {
            p.value: shares([plug for plug in plugs if plug.request.priority == p.value])
            for p in Priority
        },
        "periods_over_limit": sum(run.over_limit.values()),
        "over_limit": run.over_limit,
        "peak_kw": run.peak_kw,
    }


def waits_for_a_point(plugs: Sequence[Plug], hour_seconds: float, period_minutes: float) -> dict:
    """Minutes the cars waited for a point in the harness (the same for every algorithm)."""
    waits = sorted(
        max(0.0, p.arrival * period_minutes - p.request.at / hour_seconds * 60) for p in plugs
    )
    return {
        "waited": sum(1 for w in waits if w >= period_minutes),
        "mean_minutes": sum(waits) / len(waits) if waits else None,
        "max_minutes": waits[-1] if waits else None,
    }


# ------------------------------------------------------------------------------ the real stack
def energy_until(session: SessionPower, until: float, hour_seconds: float) -> float:
    """kWh a session of the real stack had received by ``until`` (seconds on loadgen's clock,
    as its events): the integral of its power steps, in simulated hours. For the real-stack
    figures: the same departures imposed on the sessions loadgen rebuilt from the events."""
    end = min(until, session.ended_at)
    if end <= session.started_at or not session.steps:
        return 0.0
    total = 0.0
    for (t0, kw), (t1, _) in zip(session.steps, [*session.steps[1:], (math.inf, 0.0)], strict=True):
        lo, hi = max(t0, session.started_at), min(t1, end)
        if hi > lo:
            total += kw * (hi - lo) / hour_seconds
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.acn", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--peak",
        type=float,
        default=13.0,
        help="arrivals per simulated hour at the evening peak (default 13: at "
        "bench.power_balance's 16, cars that hold their point until they leave wait hours)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the trace's seed (loadgen's --seed)")
    parser.add_argument(
        "--stay-factors",
        default="1.25,1.5,2",
        help="comma-separated: each car stays this many times its time at full power (default "
        "1.25,1.5,2)",
    )
    parser.add_argument(
        "--period", type=float, default=1.0, help="ACN-Sim's period in minutes (default 1)"
    )
    parser.add_argument(
        "--simulated-hour",
        type=float,
        default=3.6,
        help="real seconds per simulated hour of the trace (as bench.power_balance; it only "
        "scales the arrival offsets)",
    )
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    args = parser.parse_args()

    from bench.common import markdown_table, save
    from bench.power_balance import SITE_FILE, SITE_POINTS, ev_site

    site = ev_site()
    trace = loadgen_trace(
        peak_rate=args.peak / args.simulated_hour,
        hour_seconds=args.simulated_hour,
        seed=args.seed,
    )
    results: dict[str, list[dict]] = {}
    waits: dict[str, dict] = {}
    rows = []
    for factor in [float(f) for f in args.stay_factors.split(",")]:
        plugs = plan_plugs(
            site,
            trace,
            hour_seconds=args.simulated_hour,
            stay_factor=factor,
            period_minutes=args.period,
            seed=args.seed,
        )
        waits[str(factor)] = waits_for_a_point(plugs, args.simulated_hour, args.period)
        for algorithm in args.algorithms.split(","):
            run = run_acn(site, plugs, algorithm, period_minutes=args.period)
            found = figures(run, plugs)
            results.setdefault(str(factor), []).append(found)
            by_class = found["by_class"]
            rows.append(
                [
                    f"{factor:g}",
                    algorithm,
                    round(found["delivered_kwh"], 1),
                    f"{found['met']:.2%}",
                    f"{found['cars_fully_served']:.1%}",
                    *(f"{by_class[c]['met']:.2%}" for c in ("emergency", "fleet", "standard")),
                    found["periods_over_limit"],
                    round(found["peak_kw"]["site"], 1),
                ]
            )
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    save(
        "acn",
        {
            "settings": {**vars(args), "site": SITE_FILE.name, "points": SITE_POINTS},
            "requests": len(trace),
            "asked_kwh": sum(r.energy_kwh for r in trace),
            "waits_for_a_point": waits,
            "results": results,
        },
    )
    print()
    print(
        markdown_table(
            [
                "stay factor",
                "algorithm",
                "delivered kWh",
                "demand met",
                "cars fully served",
                "met emergency",
                "met fleet",
                "met standard",
                "periods over a limit",
                "site peak kW",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
