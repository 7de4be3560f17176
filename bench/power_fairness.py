"""Where the fleet-wide unfairness of issue 15's EV site comes from, simulated (no broker).

Issue 15 asks for Jain's index >= 0.95 over the power of same-class sessions below their own
maximum, fleet-wide. On bench/ev-site.toml the real stack measures 0.85-0.90, and the
allocator's own division of the same sessions at the same instants 0.87-0.95 (docs/benchmarks.md
section 5). This plays loadgen's days through ``bench.power_sim`` (the real routing, priorities,
division and sharing, no report, grant or lease in between) and reads, every 100 ms:

- **fleet-wide**: the issue's index, as loadgen and ``bench.power_stack`` read it;
- **per bottleneck**: the index among the sessions held back by the same limit
  (``bench.fairness``), which is what max-min fairness promises;
- **the division with failsafes**: the same placement divided as the real allocator does, each
  substation's failsafe (10 kW) reserved first (the simulation's own division reserves none);
- **the best placement**: the highest fleet-wide index any placement of the same sessions on
  the site's charging points gets from the same division, found by local search (moves to a
  free point and swaps, from the real placement and from random ones): what routing could
  reach if it could also move cars that are already charging;
- **routing's choice**: how many free substations each routing decision had.

And the same days routed by ``best-fit`` (an experiment, not in the balancer): a car goes to
the substation with the least kW per charging point that still covers its maximum (the fastest
cars, which nothing covers, to the most kW per point), power-min's order among those. Its idea:
leave the points with much power for the cars that can use it. ``best-fit-covered`` does so
only for the cars some point covers, and routes the others by power-min alone.

And (``--release``) the same days with held requests matched to what freed instead of released
oldest first within a class (``bench.release_matching``, an experiment): a slow car to a slow
point while a fast car waits for a roomier one, no request overtaken more than a bound, and
optionally a fast car held back from a much slower point for a while; fleet-wide and per
bottleneck index, waits per class, sessions' length and energy delivered within the day for
each variant (:data:`RELEASE_VARIANTS`).

    .venv/bin/python -m bench.power_fairness --days 20 > docs/bench/power-fairness.txt
    .venv/bin/python -m bench.power_fairness --stack-raw out/power-stack.pickle   # a real run's
    .venv/bin/python -m bench.power_fairness --steady   # steady loads of one or two car classes
    .venv/bin/python -m bench.power_fairness --release --days 20   # matching held requests
"""

from __future__ import annotations

import argparse
import bisect
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from balancer.power_routing import fits, power_min
from balancer.strategies import Candidate
from bench.fairness import FairnessSeries, SessionAt, fleet_wide
from bench.power_balance import ev_site
from bench.power_sim import (
    DayResult,
    DaySimulation,
    Matching,
    Outcome,
    Site,
    _need,
    loadgen_trace,
    summarise,
)
from smartgrid.leases import Demand, target_shares
from smartgrid.power import Priority, SessionDemand, allocate, kilowatts, watts

ROUTINGS = ("power-min", "best-fit", "best-fit-covered")
FAILSAFE_KW = 10.0  # bench.power_stack's SUBSTATION_FAILSAFE_KW
SAMPLE_SECONDS = 0.1
STANDARD = Priority.STANDARD.value

#: One instant: (substation, session, power W) of every running session.
Snapshot = list[tuple[str, SessionDemand, int]]


def best_fit(
    candidates: Sequence[Candidate], limits_w: Mapping[str, int], need, *, strict: bool = True
) -> list:
    """The candidates with the least kW per point that still covers ``need.max_w``; without
    one, those with the most kW per point (``strict``) or all of them."""
    per_point = {c.substation: limits_w[c.substation] / c.capacity for c in candidates}
    covering = [c for c in candidates if per_point[c.substation] >= need.max_w]
    if covering:
        least = min(per_point[c.substation] for c in covering)
        return [c for c in covering if per_point[c.substation] <= least]
    if not strict:
        return list(candidates)
    most = max(per_point.values())
    return [c for c in candidates if per_point[c.substation] >= most]


class RecordedDay(DaySimulation):
    """A simulated day that keeps every session's power at every change, and how many
    substations each routing decision could choose from."""

    def __init__(
        self, site: Site, trace: Sequence, *, routing: str = "power-min", **kwargs
    ) -> None:
        super().__init__(site, trace, "power-min", **kwargs)
        self.routing = routing
        self.snapshots: list[tuple[float, Snapshot]] = []
        self.choices: Counter[int] = Counter()
        #: Cars routed to a substation whose kW per point is below their maximum: "chosen" when
        #: a substation with more kW per point was open too, "forced" when none was.
        self.squeezed: Counter[str] = Counter()
        #: Cars released before an older one of their class that was still held.
        self.overtakes = 0

    def _choice(self, outcome: Outcome, now: float) -> Candidate | None:
        candidates = self._candidates(now)
        grid = self._grid()
        need = _need(outcome.request)
        open_ = [c for c in candidates if fits(c, grid, need)]
        self.choices[len(open_)] += 1
        choosing = open_
        if self.routing.startswith("best-fit") and open_:
            choosing = best_fit(open_, self.limits_w, need, strict=self.routing == "best-fit")
        return power_min(choosing, grid, need, self.rng)

    def _route(self, outcome: Outcome, choice: Candidate, now: float) -> None:
        # Counted here, once a car: the release asks where each class's candidates would go
        # before it admits one of them.
        grid = self._grid()
        need = _need(outcome.request)
        per_point = {
            c.substation: self.limits_w[c.substation] / c.capacity
            for c in self._candidates(now)
            if fits(c, grid, need)
        }
        if per_point[choice.substation] < need.max_w:
            roomier = any(p > per_point[choice.substation] for p in per_point.values())
            self.squeezed["chosen" if roomier else "forced"] += 1
        held = self._held_by_class[Priority(outcome.request.priority)]
        self.overtakes += any(o.index < outcome.index for o in held)
        super()._route(outcome, choice, now)

    def _reshare(self, now: float) -> None:
        super()._reshare(now)
        snapshot = [
            (sid, s.demand, s.energy.power_w)
            for sid, st in self.stations.items()
            for s in st.running.values()
        ]
        if self.snapshots and self.snapshots[-1][0] == now:
            self.snapshots[-1] = (now, snapshot)
        else:
            self.snapshots.append((now, snapshot))


def sampled(snapshots: list[tuple[float, Snapshot]], interval: float = SAMPLE_SECONDS):
    """The snapshot in force every ``interval`` seconds."""
    times = [t for t, _ in snapshots]
    t = 0.0
    while snapshots and t < times[-1]:
        index = bisect.bisect_right(times, t) - 1
        if index >= 0:
            yield t, snapshots[index][1]
        t += interval


def sessions_at(snapshot: Snapshot) -> list[SessionAt]:
    return [
        SessionAt(sid, d.priority.value, kilowatts(w), kilowatts(d.max_w), kilowatts(d.min_w))
        for sid, d, w in snapshot
    ]


class Division:
    """The allocator's division and the substations' sharing of one placement, as
    ``bench.power_stack.jain_of_the_division`` computes it."""

    def __init__(self, site: Site, failsafe_kw: float) -> None:
        self.site = site
        self.limits_w = site.limits_w()
        self.failsafe_w = watts(failsafe_kw)

    def power(self, placement: Mapping[str, list[SessionDemand]]) -> dict[str, int]:
        demands = {
            s: Demand.of_sessions(((d.priority, d.min_w, d.max_w) for d in ds), self.failsafe_w)
            for s, ds in placement.items()
        }
        shares = target_shares(self.site.topology, self.limits_w, demands).shares_w
        power: dict[str, int] = {}
        for s, ds in placement.items():
            limit = min(self.limits_w[s], shares.get(s, self.limits_w[s]))
            power.update(allocate(limit, ds).power_w)
        return power

    def standard_index(
        self, sessions: Sequence[SessionDemand], where: Sequence[str]
    ) -> tuple[float, int]:
        """The fleet-wide standard index of ``sessions`` placed at ``where`` (1 with fewer than
        two below their maximum: nobody is held back unequally), and the watts they draw."""
        placement: dict[str, list[SessionDemand]] = defaultdict(list)
        for d, s in zip(sessions, where, strict=True):
            placement[s].append(d)
        power = self.power(placement)
        found = fleet_wide(
            [
                SessionAt(s, d.priority.value, kilowatts(power[d.session]), kilowatts(d.max_w))
                for d, s in zip(sessions, where, strict=True)
            ]
        )
        return found.get(STANDARD, 1.0), sum(power.values())


def best_placement(
    division: Division,
    sessions: Sequence[SessionDemand],
    where: Sequence[str],
    points: Mapping[str, int],
    rng: random.Random,
    restarts: int = 3,
    budget: int = 4000,
) -> tuple[float, list[str]]:
    """The highest standard index found for ``sessions`` on ``points`` (local search) among
    the placements that deliver the most power: the index alone would rather hold every car at
    the same low power (a fast car on a slow substation, the others at their minimum) than let
    one charge faster. Returns the index and the placement."""

    def score(place: Sequence[str]) -> tuple[int, float]:
        index, total_w = division.standard_index(sessions, place)
        return total_w, index

    def climb(start: list[str]) -> tuple[tuple[int, float], list[str]]:
        best = score(start)
        place = start
        evaluations = 1
        improved = True
        while improved and evaluations < budget:
            improved = False
            used = Counter(place)
            moves = [
                (i, s, None)
                for i in range(len(sessions))
                for s in points
                if s != place[i] and used[s] < points[s]
            ] + [
                (i, None, k)
                for i in range(len(sessions))
                for k in range(i + 1, len(sessions))
                if place[i] != place[k] and _kind(sessions[i]) != _kind(sessions[k])
            ]
            rng.shuffle(moves)
            for i, s, k in moves:
                new = list(place)
                if k is None:
                    new[i] = s  # type: ignore[assignment]
                else:
                    new[i], new[k] = new[k], new[i]
                found = score(new)
                evaluations += 1
                if found[0] > best[0] or (found[0] == best[0] and found[1] > best[1] + 1e-9):
                    best, place, improved = found, new, True
                    break
        return best, place

    found = [climb(list(where))]
    free = [s for s, n in points.items() for _ in range(n)]
    for _ in range(restarts):
        rng.shuffle(free)
        found.append(climb(free[: len(sessions)]))
    (_, index), place = max(found, key=lambda f: f[0])
    return index, place


def _kind(d: SessionDemand) -> tuple:
    return (d.priority, d.min_w, d.max_w)


def study_stack_run(
    site: Site, raw_path: str, *, restarts: int = 3, budget: int = 4000
) -> dict[str, dict]:
    """For a run of the real stack (``bench.power_stack --raw``): per phase, at the instants
    with two or more standard sessions below their maximum, the fleet-wide index of the
    division of the real placement (failsafes reserved, as the allocator does) and of the best
    placement found for the same sessions."""
    from bench.power_stack import car_min_kw, every_sample, load_raw

    raw = load_raw(raw_path)
    points = {s.id: s.points for s in site.substations}
    division = Division(site, FAILSAFE_KW)
    found: dict[str, dict] = {}
    for phase in ("day", "overload"):
        timeline = raw[phase].power_timeline if phase in raw else None
        if timeline is None or timeline.span is None:
            continue
        rng = random.Random(1)
        searched: dict[tuple, float] = {}
        real: list[float] = []
        best: list[float] = []
        for t, live in every_sample(timeline, SAMPLE_SECONDS):
            sessions = [SessionAt(r.substation, r.priority, r.power_at(t), r.max_kw) for r in live]
            if STANDARD in fleet_wide(sessions):
                demands = [
                    SessionDemand(
                        r.request_id,
                        watts(car_min_kw(r)),
                        watts(r.max_kw),
                        Priority(r.priority),
                        order,
                    )
                    for order, r in enumerate(live)
                ]
                where = [r.substation for r in live]
                real.append(division.standard_index(demands, where)[0])
                key = tuple(sorted(zip((r.request_id for r in live), where, strict=True)))
                if key not in searched:
                    searched[key] = best_placement(
                        division, demands, where, points, rng, restarts, budget
                    )[0]
                best.append(searched[key])
        found[phase] = {"instants": len(real), "division": real, "best_placement": best}
    return found


#: Steady loads of one or two car classes (max kW, min kW), Poisson arrivals a real second,
#: 30 kWh each: the site binds, a few points stay free.
STEADY_MIXES: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = (
    ("all 22 kW", ((22.0, 1.4),)),
    ("all 50 kW", ((50.0, 5.0),)),
    ("11 and 50 kW", ((11.0, 1.4), (50.0, 5.0))),
)


def study_steady(site: Site, mix: Sequence[tuple[float, float]], routing: str) -> dict:
    """Whether a routing equalises each session's power between substations of different kW
    per point under a steady load (2.6 arrivals a second for 1,500 arrivals; the first 30 s
    left out): the fleet-wide index, and each substation's mean power a session and sessions."""
    from loadgen.evmix import EvRequest

    rng = random.Random(1)
    trace = []
    at = 0.0
    for _ in range(1500):
        at += rng.expovariate(2.6)
        max_kw, min_kw = rng.choice(mix)
        trace.append(EvRequest(at, "steady", max_kw, min_kw, 30.0, STANDARD))
    sim = RecordedDay(site, trace, routing=routing, hour_seconds=3.6, poll_interval=5.0, seed=1)
    sim.run()
    paths = {s.id: site.topology.path(s.id) for s in site.substations}
    limits = {n: kilowatts(w) for n, w in site.limits_w().items()}
    series = FairnessSeries.empty()
    power: dict[str, list[float]] = defaultdict(list)
    count: dict[str, list[int]] = defaultdict(list)
    for t, snapshot in sampled(sim.snapshots):
        if t < 30:
            continue
        sessions = sessions_at(snapshot)
        series.add(sessions, paths, limits)
        here: dict[str, list[float]] = defaultdict(list)
        for one in sessions:
            here[one.substation].append(one.power_kw)
        for substation, values in here.items():
            power[substation].append(statistics.fmean(values))
            count[substation].append(len(values))
    return {
        "summary": series.summary(),
        "per_substation": {
            sub: (statistics.fmean(power[sub]), statistics.fmean(count[sub]))
            for sub in sorted(power)
        },
    }


def study_day(
    site: Site,
    day: int,
    peak: float,
    routing: str,
    *,
    search: bool,
    restarts: int = 3,
    budget: int = 4000,
) -> dict:
    hour = 3.6
    trace = loadgen_trace(peak_rate=peak / hour, hour_seconds=hour, seed=day)
    sim = RecordedDay(site, trace, routing=routing, hour_seconds=hour, poll_interval=5.0, seed=day)
    result = sim.run()
    paths = {s.id: site.topology.path(s.id) for s in site.substations}
    limits = {n: kilowatts(w) for n, w in site.limits_w().items()}
    points = {s.id: s.points for s in site.substations}
    series = FairnessSeries.empty()
    with_failsafes = Division(site, FAILSAFE_KW)
    divided: list[float] = []
    best: list[float] = []
    searched: dict[tuple, float] = {}
    rng = random.Random(day)
    for _t, snapshot in sampled(sim.snapshots):
        sessions = sessions_at(snapshot)
        series.add(sessions, paths, limits)
        if STANDARD not in fleet_wide(sessions):
            continue
        demands = [d for _, d, _ in snapshot]
        where = [s for s, _, _ in snapshot]
        divided.append(with_failsafes.standard_index(demands, where)[0])
        if search:
            key = tuple(sorted(zip((d.session for d in demands), where, strict=True)))
            if key not in searched:
                searched[key] = best_placement(Division(site, 0.0), demands, where, points, rng)[0]
            best.append(searched[key])
    stretch = [
        (o.ended_at - o.started_at) / hour / o.request.hours_at_full_power()
        for o in result.outcomes
        if o.ended_at is not None and o.started_at is not None
    ]
    waits = sorted(o.wait_to_charge * 60 / hour for o in result.outcomes if o.wait_to_charge)
    return {
        "series": series,
        "divided_with_failsafes": divided,
        "best_placement": best,
        "choices": sim.choices,
        "squeezed": sim.squeezed,
        "stretch": statistics.fmean(stretch),
        "wait_p99_min": waits[int(0.99 * (len(waits) - 1))] if waits else 0.0,
        "violations": result.violations,
    }


#: The release variants ``--release`` compares on the same days: first come, first served
#: (the balancer's), matching within a window under a bound on passes, and matching with fast
#: cars held back from much slower points for a while.
RELEASE_VARIANTS: tuple[Matching, ...] = (
    Matching(),
    Matching(window=4, max_passes=4),
    Matching(window=8, max_passes=8),
    Matching(window=16, max_passes=16),
    Matching(window=8, max_passes=8, hold_below=0.5, hold_minutes=5),
    Matching(window=8, max_passes=8, hold_below=0.5, hold_minutes=10),
    Matching(window=8, max_passes=8, hold_below=0.5, hold_minutes=15),
    Matching(window=8, max_passes=8, hold_below=0.5, hold_minutes=30),
    Matching(window=8, max_passes=8, hold_below=0.3, hold_minutes=15),
    Matching(window=8, max_passes=8, hold_below=0.7, hold_minutes=15),
    Matching(window=1, max_passes=0, hold_below=0.5, hold_minutes=15),
    # Bounds, not candidates: any request in the queue, never due; every car that a point
    # would not give its maximum held for up to an hour.
    Matching(window=1000, max_passes=1000),
    Matching(window=1000, max_passes=1000, hold_below=1.0, hold_minutes=60),
)


def delivered_kwh(result: DayResult, until: float) -> float:
    """The energy the site delivered before ``until`` seconds (simulated kWh)."""
    total = 0.0
    for series in result.power.values():
        for (t, w, _), (t_next, _, _) in zip(series, [*series[1:], (until, 0, 0)], strict=True):
            if t >= until:
                break
            total += w * (min(t_next, until) - t)
    return total / 1000 / result.hour_seconds


def study_release(site: Site, day: int, peak: float, matching: Matching) -> dict:
    """One day at ``peak`` EV a simulated hour with held requests released by ``matching``."""
    hour = 3.6
    trace = loadgen_trace(peak_rate=peak / hour, hour_seconds=hour, seed=day)
    sim = RecordedDay(
        site, trace, hour_seconds=hour, poll_interval=5.0, seed=day, matching=matching
    )
    result = sim.run()
    paths = {s.id: site.topology.path(s.id) for s in site.substations}
    limits = {n: kilowatts(w) for n, w in site.limits_w().items()}
    series = FairnessSeries.empty()
    for _t, snapshot in sampled(sim.snapshots):
        series.add(sessions_at(snapshot), paths, limits)
    return {
        "series": series,
        "result": result,
        "squeezed": sim.squeezed,
        "overtakes": sim.overtakes,
        "delivered_kwh": delivered_kwh(result, 24 * hour),
        "asked_kwh": sum(o.request.energy_kwh for o in result.outcomes),
    }


def print_release(site: Site, days: int, peak: float, variants: Sequence[Matching]) -> None:
    print(f"== peak {peak:g} EV/h, {days} days (trace seeds 1..{days}), routing power-min ==")
    for matching in variants:
        found = [study_release(site, day, peak, matching) for day in range(1, days + 1)]
        pooled = FairnessSeries.empty()
        for one in found:
            for name in ("literal", "bottleneck"):
                for p, v in getattr(one["series"], name).items():
                    getattr(pooled, name)[p].extend(v)
        literal = pooled.literal.get(STANDARD, [])
        bottleneck = pooled.bottleneck.get(STANDARD, [])
        per_day = [
            statistics.fmean(d["series"].literal[STANDARD])
            for d in found
            if d["series"].literal.get(STANDARD)
        ]
        summary = summarise([d["result"] for d in found])
        squeezed: Counter[str] = sum((d["squeezed"] for d in found), Counter())
        delivered = sum(d["delivered_kwh"] for d in found)
        asked = sum(d["asked_kwh"] for d in found)
        print(f"-- {matching} --")
        print(
            f"  standard, fleet-wide: {_mean(literal)} over {len(literal)} samples"
            f" ({sum(1 for v in per_day if v >= 0.95)} of {len(per_day)} days >= 0.95);"
            f" per bottleneck: {_mean(bottleneck)} over {len(bottleneck)} samples"
        )
        for priority, waits in summary["by_class"].items():
            w = waits["to_charge"]
            if w["count"]:
                print(
                    f"  {priority}: wait to power p50 {w['p50']:.1f}, p99 {w['p99']:.1f},"
                    f" max {w['max']:.1f} simulated min ({w['count']} requests)"
                )
        print(
            f"  sessions' length / at full power: {summary['stretch_mean']:.3f};"
            f" delivered within the day {delivered:.0f} kWh of {asked:.0f} asked"
            f" ({delivered / asked:.1%}); cars on fewer kW per point than their maximum:"
            f" {squeezed['chosen']} with a roomier one open, {squeezed['forced']} forced;"
            f" released before an older one of their class {sum(d['overtakes'] for d in found)};"
            f" violations {summary['violations']}"
        )
    print()


def _mean(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.power_fairness", description=__doc__)
    parser.add_argument("--days", type=int, default=20, help="days (trace seeds 1..N)")
    parser.add_argument("--peaks", default="13,16", help="peak EV a simulated hour")
    parser.add_argument("--routings", default=",".join(ROUTINGS))
    parser.add_argument(
        "--no-search", action="store_true", help="skip the best placement's local search"
    )
    parser.add_argument(
        "--restarts", type=int, default=3, help="the search's random starting placements"
    )
    parser.add_argument(
        "--budget", type=int, default=4000, help="placements the search tries from each start"
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="instead: steady loads of one or two car classes (does the routing equalise each "
        "session's power between substations of different kW per point?)",
    )
    parser.add_argument(
        "--release",
        action="store_true",
        help="instead: held requests released first come, first served against matched to "
        "what freed (RELEASE_VARIANTS), on the same days",
    )
    parser.add_argument(
        "--stack-raw",
        help="instead: the best placement at the instants of a bench.power_stack run (--raw)",
    )
    args = parser.parse_args(argv)
    site = ev_site()
    if args.steady:
        for name, mix in STEADY_MIXES:
            for routing in args.routings.split(","):
                steady = study_steady(site, mix, routing)
                literal = steady["summary"]["fleet_wide"].get(STANDARD, {}).get("mean")
                bottleneck = steady["summary"]["per_bottleneck"].get(STANDARD, {}).get("mean")
                print(
                    f"{name}, {routing}: fleet-wide {_mean([literal] if literal else [])},"
                    f" per bottleneck {_mean([bottleneck] if bottleneck else [])};"
                    " kW a session / sessions: "
                    + ", ".join(
                        f"{sub} {kw:.1f} / {n:.1f}"
                        for sub, (kw, n) in steady["per_substation"].items()
                    )
                )
        return 0
    if args.release:
        for peak in (float(p) for p in args.peaks.split(",")):
            print_release(site, args.days, peak, RELEASE_VARIANTS)
        return 0
    if args.stack_raw:
        stack_run = study_stack_run(
            site, args.stack_raw, restarts=args.restarts, budget=args.budget
        )
        for phase, found in stack_run.items():
            best = found["best_placement"]
            print(
                f"{phase}: {found['instants']} instants with two or more standard sessions below"
                f" their maximum; standard, fleet-wide: the division of the real placement"
                f" {_mean(found['division'])}, the best placement found {_mean(best)}"
                f" (below 0.95 at {sum(1 for v in best if v < 0.95)})"
            )
        return 0
    for peak in (float(p) for p in args.peaks.split(",")):
        for routing in args.routings.split(","):
            search = routing == "power-min" and not args.no_search
            days = [
                study_day(
                    site,
                    day,
                    peak,
                    routing,
                    search=search,
                    restarts=args.restarts,
                    budget=args.budget,
                )
                for day in range(1, args.days + 1)
            ]
            pooled = FairnessSeries.empty()
            for found in days:
                for name in ("literal", "bottleneck"):
                    for p, v in getattr(found["series"], name).items():
                        getattr(pooled, name)[p].extend(v)
                for key, (count, indices) in found["series"].nodes.items():
                    held, known = pooled.nodes.get(key, (0, []))
                    pooled.nodes[key] = (held + count, known + indices)
            summary = pooled.summary()
            literal = summary["fleet_wide"].get(STANDARD, {})
            per_day = [
                statistics.fmean(d["series"].literal[STANDARD])
                for d in days
                if d["series"].literal.get(STANDARD)
            ]
            choices: Counter[int] = sum((d["choices"] for d in days), Counter())
            decisions = sum(choices.values())
            print(f"== peak {peak:g} EV/h, {args.days} days, routing {routing} ==")
            fleet_wide_of = {p: v["mean"] for p, v in summary["fleet_wide"].items()}
            print(
                f"standard, fleet-wide (the issue's index): {literal.get('mean', float('nan')):.3f}"
                f" over {literal.get('samples', 0)} samples; days at >= 0.95:"
                f" {sum(1 for v in per_day if v >= 0.95)} of {len(per_day)}"
                f" (day means {min(per_day):.3f}-{max(per_day):.3f})"
            )
            for p, found in summary["per_bottleneck"].items():
                print(
                    f"{p}, per bottleneck: {found['mean']:.3f} over {found['samples']} samples"
                    f" (fleet-wide {fleet_wide_of.get(p, float('nan')):.3f})"
                )
            print(
                "standard, the same placement divided with 10 kW failsafes reserved (as the real"
                f" allocator): {_mean([v for d in days for v in d['divided_with_failsafes']])}"
            )
            if search:
                best = [v for d in days for v in d["best_placement"]]
                print(
                    "standard, the best placement found of the same sessions at the same"
                    f" instants: {_mean(best)}; instants below 0.95:"
                    f" {sum(1 for v in best if v < 0.95)} of {len(best)}"
                )
            print("standard sessions below their maximum, by the node holding them back:")
            for node, found in summary["by_node"].get(STANDARD, {}).items():
                mean = "n/a" if found["mean"] is None else f"{found['mean']:.3f}"
                print(
                    f"  {node}: {found['share_of_held']:.1%} of them; index among them {mean}"
                    f" ({found['samples']} samples with two or more)"
                )
            print(
                "routing decisions by substations open: "
                + ", ".join(f"{n}: {choices[n] / decisions:.1%}" for n in sorted(choices))
                + f" ({decisions} decisions)"
            )
            squeezed: Counter[str] = sum((d["squeezed"] for d in days), Counter())
            print(
                "cars routed to a substation with less kW per point than their maximum:"
                f" {squeezed['chosen']} with a substation of more kW per point open,"
                f" {squeezed['forced']} forced (none open)"
            )
            print(
                f"sessions' length / at full power: {_mean([d['stretch'] for d in days])};"
                f" p99 wait to power (simulated minutes, day mean):"
                f" {statistics.fmean(d['wait_p99_min'] for d in days):.0f};"
                f" violations {sum(d['violations'] for d in days)}"
            )
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
