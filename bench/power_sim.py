"""A day of the EV mix through one balancing strategy, simulated: the strategies' own decision
functions, substations that share their kW limits as the real ones do, in simulated time.

Sessions of the EV mix differ: a 150 kW car tops up 18 kWh in seven simulated minutes, a 3.7 kW
car takes five hours for the same energy. So a substation may be full of long sessions while
another frees a point every few minutes, which is what a load-aware balancer should see and a
round robin cannot (with fixed-length sessions round robin is already perfect).

The model, piece by piece, and what it takes from the real code:

- **Trace**: what ``loadgen --ev-mix --arrivals poisson`` sends (:func:`loadgen_trace`): the
  same arrivals and bodies for the same seed, so a run of the real stack is comparable.
- **Balancer**: each arrival joins the requests held by the balancer, which then routes as many
  held requests as it can. The choice is the strategy's own function from
  ``balancer/strategies.py`` (``corrected-min``, ``p2c``, ``round-robin``, ``stale-min``,
  ``random``) or ``balancer/power_routing.power_min`` (``power-min``), over candidates built as
  ``balancer/fleet.py`` builds them: the estimate is the sessions running there plus the
  requests routed there and not started (exact: events take no time here); the polled load is
  the number of sessions at the last poll (every ``poll_interval`` seconds, at a random phase),
  which only ``stale-min`` reads; the next end is the soonest expected end of a session there.
  Held requests leave in arrival order (count strategies hold only while every point is
  taken), or, with ``power-min``, by class through ``balancer/priorities.release``, as the
  wiring plan in docs/power.md has it; or, as an experiment (:class:`Matching`), matched
  to what freed within a class (``bench.release_matching``).
- **Substation**: as many sessions as it has charging points; requests routed to a full one
  wait in its queue, first come first served (the broker's queue beyond the prefetch). On every
  start and end it shares the lower of its own limit and its share of the feeders above it
  among its sessions with ``smartgrid.power.allocate``. Shares come from
  ``smartgrid.leases.target_shares`` at once: an ideal allocator, no report interval, no lease.
- **Time**: a session ends when its energy has been delivered at the power it was allotted
  (``smartgrid.power_request.SessionEnergy``), ``hour_seconds`` real seconds per simulated hour.

Everything is pure and seeded; nothing reads a clock.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from balancer.power_routing import power_min
from balancer.priorities import ReleaseScheduler, release
from balancer.strategies import Candidate, make_strategy
from bench.release_matching import Matcher, matched_release
from loadgen import evmix
from loadgen.evmix import EvRequest
from smartgrid.grid import GridState, Load, Need, Topology, limits_in_force
from smartgrid.leases import Demand, target_shares
from smartgrid.power import CLASS_ORDER, Priority, SessionDemand, allocate, watts
from smartgrid.power_request import SessionEnergy

STRATEGIES = ("power-min", "corrected-min", "p2c", "round-robin", "stale-min", "random")
#: ``power-min``'s routing with held requests released in arrival order, not by class: what the
#: routing alone does to waits, apart from the priorities.
POWER_MIN_FIFO = "power-min-fifo"
#: A session whose energy is delivered within this many seconds of now has ended (float sums).
_END_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Matching:
    """How held requests are matched to what freed (``power-min`` only; an experiment of
    ``bench.power_fairness --release``). Within a class, among the oldest ``window`` waiting,
    the one whose placement suits it best goes first (:func:`suits`), none overtaken more than
    ``max_passes`` times (``bench.release_matching``). With ``hold_below`` > 0, a request
    whose placement suits it less than that waits for a better one, up to ``hold_minutes``
    simulated minutes from its arrival."""

    window: int = 1
    max_passes: int = 0
    hold_below: float = 0.0
    hold_minutes: float = 0.0

    @property
    def first_come_first_served(self) -> bool:
        return self.window == 1 and not self.hold_below

    def __str__(self) -> str:
        if self.first_come_first_served:
            return "first come, first served (the balancer's)"
        name = f"window {self.window}, passes {self.max_passes}"
        if self.hold_below:
            name += f", hold below {self.hold_below:g} up to {self.hold_minutes:g} min"
        return name


def suits(limit_w: int, points: int, max_w: int) -> float:
    """How well a substation suits a car: its kW per charging point over the car's maximum,
    at most 1 (a point gives the car all it can draw)."""
    return min(1.0, limit_w / points / max_w)


# ------------------------------------------------------------------------------ the site
@dataclass(frozen=True)
class SubstationSpec:
    id: str
    points: int
    limit_kw: float


@dataclass(frozen=True)
class Site:
    """Substations (charging points, own kW limit) and the tree of limits above them."""

    substations: tuple[SubstationSpec, ...]
    topology: Topology = field(default_factory=Topology)

    def limits_w(self) -> dict[str, int]:
        """The limit in force at every node and substation."""
        own = {s.id: watts(s.limit_kw) for s in self.substations}
        return limits_in_force(self.topology, own)

    @property
    def points(self) -> int:
        return sum(s.points for s in self.substations)

    @classmethod
    def from_topology(cls, topology: Topology, points: Mapping[str, int]) -> Site:
        """The substations named in ``points``, each with the limit ``topology`` gives it."""
        specs = []
        for substation, count in points.items():
            limit_w = topology.limit_w(substation)
            if limit_w is None:
                raise ValueError(f"the topology has no limit for {substation!r}")
            specs.append(SubstationSpec(substation, count, limit_w / 1000))
        return cls(tuple(specs), topology)


# ------------------------------------------------------------------------------ the trace
def loadgen_trace(
    *,
    peak_rate: float,
    hour_seconds: float,
    hours: float = 24.0,
    seed: int = 1,
    poisson: bool = True,
) -> list[EvRequest]:
    """Exactly the requests ``loadgen --ev-mix --rate PEAK --simulated-hour H --seed S`` sends
    (``--arrivals poisson`` unless ``poisson`` is false, ``--duration`` = ``hours`` x H): its
    arrival offsets and, in the same order, its bodies."""
    from loadgen.run import LoadSettings, arrivals_for

    duration = hours * hour_seconds
    settings = LoadSettings(
        gateway_url="",
        interval=1 / peak_rate,
        arrivals="poisson" if poisson else "constant",
        duration=duration,
        seed=seed,
        ev_mix=True,
        hour_seconds=hour_seconds,
    )
    body_for = evmix.mix_bodies(seed)
    cars = {(c.max_kw, c.min_kw): c.name for c in evmix.CAR_CLASSES}
    trace = []
    for index, at in enumerate(arrivals_for(settings)):
        if at >= duration:
            break
        body = body_for(index, f"ev-{index + 1:06d}")
        trace.append(
            EvRequest(
                at,
                cars[(body["max_kw"], body["min_kw"])],
                body["max_kw"],
                body["min_kw"],
                body["energy_kwh"],
                body["priority"],
            )
        )
    return trace


# ------------------------------------------------------------------------------ results
@dataclass
class Outcome:
    """What became of one request; times are seconds from the start of the trace."""

    index: int
    request: EvRequest
    substation: str | None = None
    routed_at: float | None = None
    #: Given a charging point (``session.started``), perhaps paused at 0 kW.
    started_at: float | None = None
    #: First given power (> 0 W).
    charging_at: float | None = None
    ended_at: float | None = None
    #: Seconds at 0 kW between start and end.
    paused_seconds: float = 0.0

    @property
    def wait_to_start(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.request.at

    @property
    def wait_to_charge(self) -> float | None:
        return None if self.charging_at is None else self.charging_at - self.request.at


@dataclass
class DayResult:
    strategy: str
    hour_seconds: float
    outcomes: list[Outcome]
    #: Per substation: (time, W drawn) at every change, and the limit in force then.
    power: dict[str, list[tuple[float, int, int]]]
    #: Changes at which some node drew more than its limit in force (should stay 0).
    violations: int = 0


# ------------------------------------------------------------------------------ the model
@dataclass
class _Session:
    outcome: Outcome
    demand: SessionDemand
    energy: SessionEnergy
    power_since: float

    def set_power(self, power_w: int, now: float) -> None:
        if power_w == self.energy.power_w:
            return
        if self.energy.power_w == 0:
            self.outcome.paused_seconds += now - self.power_since
        self.energy.set_power(power_w, now)
        self.power_since = now
        if power_w > 0 and self.outcome.charging_at is None:
            self.outcome.charging_at = now


@dataclass
class _Station:
    spec: SubstationSpec
    running: dict[str, _Session] = field(default_factory=dict)
    queued: deque[Outcome] = field(default_factory=deque)
    polled_load: int = 0

    def next_end(self, now: float) -> float:
        return min((s.energy.expected_end(now) for s in self.running.values()), default=math.inf)


def _need(request: EvRequest) -> Need:
    return Need(watts(request.max_kw), watts(request.min_kw), Priority(request.priority))


def _load(requests: Iterable[EvRequest]) -> Load:
    total = Load()
    for r in requests:
        need = _need(r)
        total = total + Load.of(need.max_w, need.min_w, need.priority)
    return total


def demand_of(sessions: Iterable[SessionDemand]) -> Demand:
    """What a substation's sessions ask of the allocator, per class and per session (as
    ``substation.sharing`` reports it)."""
    return Demand.of_sessions((s.priority, s.min_w, s.max_w) for s in sessions)


class DaySimulation:
    """One strategy over one trace (see the module's docstring for the model)."""

    def __init__(
        self,
        site: Site,
        trace: Sequence[EvRequest],
        strategy: str,
        *,
        hour_seconds: float,
        poll_interval: float,
        seed: int = 1,
        matching: Matching | None = None,
    ) -> None:
        if strategy not in (*STRATEGIES, POWER_MIN_FIFO):
            raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        self.site = site
        self.trace = sorted(trace, key=lambda r: r.at)
        self.strategy = strategy
        self.hour_seconds = hour_seconds
        self.poll_interval = poll_interval
        self.rng = random.Random(seed)
        self.limits_w = site.limits_w()
        self.stations = {s.id: _Station(s) for s in site.substations}
        self.outcomes = [Outcome(i, r) for i, r in enumerate(self.trace)]
        self.power: dict[str, list[tuple[float, int, int]]] = {s: [] for s in self.stations}
        self.violations = 0
        self._choose: Callable[[Sequence[Candidate], random.Random], Candidate | None] | None = (
            None if strategy.startswith("power-min") else make_strategy(strategy)
        )
        self._by_class = strategy == "power-min"
        self._held: deque[Outcome] = deque()
        self._held_by_class: dict[Priority, deque[Outcome]] = {c: deque() for c in CLASS_ORDER}
        self._scheduler = ReleaseScheduler()
        self._matching = matching or Matching()
        self._matcher: Matcher[Outcome] = Matcher(
            lambda o: o.index, self._matching.window, self._matching.max_passes
        )
        self._seniority = 0

    # -------------------------------------------------------------------------- balancer
    def _candidates(self, now: float) -> list[Candidate]:
        return [
            Candidate(
                st.spec.id,
                st.spec.points,
                estimate=len(st.running) + len(st.queued),
                polled_load=st.polled_load,
                next_end=st.next_end(now),
            )
            for st in self.stations.values()
        ]

    def _grid(self) -> GridState:
        loads = {
            st.spec.id: _load(
                [s.outcome.request for s in st.running.values()] + [o.request for o in st.queued]
            )
            for st in self.stations.values()
        }
        return GridState.build(self.site.topology, loads, self.limits_w)

    def _choice(self, outcome: Outcome, now: float) -> Candidate | None:
        candidates = self._candidates(now)
        if self._choose is not None:
            return self._choose(candidates, self.rng)
        return power_min(candidates, self._grid(), _need(outcome.request), self.rng)

    def _route(self, outcome: Outcome, choice: Candidate, now: float) -> None:
        station = self.stations[choice.substation]
        outcome.substation = station.spec.id
        outcome.routed_at = now
        if len(station.running) < station.spec.points:
            self._start(station, outcome, now)
        else:
            station.queued.append(outcome)

    def _release(self, now: float) -> None:
        if not self._by_class:
            while self._held:
                choice = self._choice(self._held[0], now)
                if choice is None:
                    return
                self._route(self._held.popleft(), choice, now)
            return
        chosen: dict[int, Candidate] = {}
        matching = self._matching

        def how_well(outcome: Outcome) -> float:
            station = self.stations[chosen[outcome.index].substation].spec
            return suits(self.limits_w[station.id], station.points, watts(outcome.request.max_kw))

        def fits(outcome: Outcome) -> bool:
            choice = self._choice(outcome, now)
            if choice is None:
                return False
            chosen[outcome.index] = choice
            waited_minutes = (now - outcome.request.at) * 60 / self.hour_seconds
            return not (
                how_well(outcome) < matching.hold_below and waited_minutes < matching.hold_minutes
            )

        def admit(outcome: Outcome) -> None:
            self._route(outcome, chosen.pop(outcome.index), now)

        if matching.first_come_first_served:
            release(self._scheduler, self._held_by_class, fits, admit)
        else:
            matched_release(
                self._scheduler, self._held_by_class, fits, admit, self._matcher, how_well
            )

    def _hold(self, outcome: Outcome) -> None:
        if not self._by_class:
            self._held.append(outcome)
        else:
            self._held_by_class[Priority(outcome.request.priority)].append(outcome)

    @property
    def _holding(self) -> bool:
        return bool(self._held) or any(self._held_by_class.values())

    # -------------------------------------------------------------------------- substations
    def _start(self, station: _Station, outcome: Outcome, now: float) -> None:
        request = outcome.request
        need = _need(request)
        self._seniority += 1
        session = _Session(
            outcome,
            SessionDemand(
                str(outcome.index), need.min_w, need.max_w, need.priority, self._seniority
            ),
            SessionEnergy(request.energy_kwh, hour_seconds=self.hour_seconds, now=now),
            now,
        )
        station.running[session.demand.session] = session
        outcome.started_at = now

    def _end_sessions(self, now: float) -> None:
        for station in self.stations.values():
            done = [
                key
                for key, s in station.running.items()
                if s.energy.expected_end(now) <= now + _END_TOLERANCE
            ]
            for key in done:
                session = station.running.pop(key)
                session.set_power(0, now)
                session.outcome.ended_at = now
            while station.queued and len(station.running) < station.spec.points:
                self._start(station, station.queued.popleft(), now)

    def _reshare(self, now: float) -> None:
        demands = {
            sid: demand_of(s.demand for s in st.running.values())
            for sid, st in self.stations.items()
        }
        shares = target_shares(self.site.topology, self.limits_w, demands).shares_w
        drawn_by_node: dict[str, int] = {}
        for sid, station in self.stations.items():
            limit = min(self.limits_w[sid], shares.get(sid, self.limits_w[sid]))
            allocation = allocate(limit, [s.demand for s in station.running.values()])
            for key, session in station.running.items():
                session.set_power(allocation.power_w[key], now)
            drawn = allocation.total_w
            series = self.power[sid]
            if not series or series[-1][1:] != (drawn, limit):
                series.append((now, drawn, limit))
            for node in self.site.topology.path(sid):
                drawn_by_node[node] = drawn_by_node.get(node, 0) + drawn
        self.violations += sum(1 for n, w in drawn_by_node.items() if w > self.limits_w[n])

    # -------------------------------------------------------------------------- the loop
    def _next_end(self, now: float) -> float:
        return min((st.next_end(now) for st in self.stations.values()), default=math.inf)

    def run(self) -> DayResult:
        arrivals = deque(self.outcomes)
        next_poll = self.rng.uniform(0, self.poll_interval)
        now = 0.0
        while True:
            next_arrival = arrivals[0].request.at if arrivals else math.inf
            next_end = self._next_end(now)
            polling = bool(arrivals) or self._holding
            upcoming_poll = next_poll if polling else math.inf
            now = min(next_arrival, next_end, upcoming_poll)
            if now == math.inf:
                break
            if next_end <= now:
                self._end_sessions(now)
            if upcoming_poll <= now:
                for station in self.stations.values():
                    station.polled_load = len(station.running)
                next_poll += self.poll_interval
            while arrivals and arrivals[0].request.at <= now:
                self._hold(arrivals.popleft())
            self._release(now)
            self._reshare(now)
        stuck = [o.index for o in self.outcomes if o.ended_at is None]
        if stuck:
            raise RuntimeError(f"{self.strategy}: requests never completed: {stuck[:10]}")
        return DayResult(
            self.strategy, self.hour_seconds, self.outcomes, self.power, self.violations
        )


def simulate_day(
    site: Site,
    trace: Sequence[EvRequest],
    strategy: str,
    *,
    hour_seconds: float,
    poll_interval: float,
    seed: int = 1,
) -> DayResult:
    return DaySimulation(
        site, trace, strategy, hour_seconds=hour_seconds, poll_interval=poll_interval, seed=seed
    ).run()


# ------------------------------------------------------------------------------ figures
def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (as loadgen.report's), or None without values."""
    from loadgen.report import percentile as nearest_rank

    return nearest_rank(list(values), q)


def wait_figures(waits: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """Count, mean, p50/p95/p99 and max of ``waits`` times ``scale``."""
    scaled = [w * scale for w in waits]
    return {
        "count": len(scaled),
        "mean": sum(scaled) / len(scaled) if scaled else None,
        "p50": percentile(scaled, 50),
        "p95": percentile(scaled, 95),
        "p99": percentile(scaled, 99),
        "max": max(scaled) if scaled else None,
    }


def summarise(results: Sequence[DayResult]) -> dict:
    """Waits in simulated minutes over every day of ``results`` (one strategy), overall and per
    class, to a point and to power; paused time; violations."""
    outcomes = [o for r in results for o in r.outcomes]
    minutes = {r.hour_seconds for r in results}
    if len(minutes) != 1:
        raise ValueError("days simulated with different hours cannot be pooled")
    to_minutes = 60 / minutes.pop()

    def waits(kind: str, priority: str | None = None) -> list[float]:
        found = []
        for o in outcomes:
            if priority is None or o.request.priority == priority:
                value = getattr(o, kind)
                if value is not None:
                    found.append(value)
        return found

    # How much longer than at the car's own maximum a session took (1: never curtailed).
    stretch = [
        (o.ended_at - o.started_at) * to_minutes / 60 / o.request.hours_at_full_power()
        for o in outcomes
        if o.ended_at is not None and o.started_at is not None
    ]
    by_class: Mapping[str, dict] = {
        p.value: {
            "to_start": wait_figures(waits("wait_to_start", p.value), to_minutes),
            "to_charge": wait_figures(waits("wait_to_charge", p.value), to_minutes),
        }
        for p in CLASS_ORDER
    }
    return {
        "requests": len(outcomes),
        "to_start": wait_figures(waits("wait_to_start"), to_minutes),
        "to_charge": wait_figures(waits("wait_to_charge"), to_minutes),
        "by_class": by_class,
        "stretch_mean": sum(stretch) / len(stretch) if stretch else None,
        "paused_sessions": sum(1 for o in outcomes if o.paused_seconds > 0),
        "paused_minutes_total": sum(o.paused_seconds for o in outcomes) * to_minutes,
        "violations": sum(r.violations for r in results),
    }
