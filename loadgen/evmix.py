"""A realistic EV mix: what cars ask for, and when they arrive over a day, in simulated time.

Each request draws:

- a **car class** (:data:`CAR_CLASSES`): the power it charges at, from a 3.7 kW single-phase
  charger to a 150 kW DC fast charger, with the shares of a mixed public site (AC most of all,
  a fifth DC);
- an **energy** (kWh) from a log-normal distribution (median 18 kWh, sigma 0.7), clipped to 5
  to 80 kWh: most sessions top up 10 to 30 kWh, a few fill a large battery (ACN-Data's
  workplace sessions and the EVI-Pro profiles have this shape: a long right tail);
- a **minimum power**: 1.4 kW for AC (6 A on one phase, IEC 61851), a tenth of the car's
  power for DC;
- a **priority**: mostly standard, some fleet, a few emergency (:data:`PRIORITY_SHARES`).

Arrivals follow a day (:data:`DAILY_SHAPE`): night trickle, a morning ramp to the workplace
peak, a midday lull, the evening peak, then down, as rates relative to the peak. Time is
compressed: ``hour_seconds`` real seconds (``SIMULATED_HOUR_SECONDS``) make one simulated
hour, so a day takes 86.4 s when an hour is 3.6 s, and a session's length is its energy over
its power in simulated hours.

Everything here is pure and seeded: the same seed gives the same trace, for loadgen, the
balance simulation and the ACN-Sim comparison alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from loadgen.schedules import RateProfile, profile_arrivals
from smartgrid.power import MIN_CAR_KW


@dataclass(frozen=True)
class CarClass:
    name: str
    max_kw: float
    share: float
    dc: bool = False

    @property
    def min_kw(self) -> float:
        return round(max(MIN_CAR_KW, self.max_kw / 10), 1) if self.dc else MIN_CAR_KW


CAR_CLASSES: tuple[CarClass, ...] = (
    CarClass("ac-3.7", 3.7, 0.10),
    CarClass("ac-7.4", 7.4, 0.25),
    CarClass("ac-11", 11.0, 0.30),
    CarClass("ac-22", 22.0, 0.15),
    CarClass("dc-50", 50.0, 0.12, dc=True),
    CarClass("dc-150", 150.0, 0.08, dc=True),
)
PRIORITY_SHARES: tuple[tuple[str, float], ...] = (
    ("standard", 0.80),
    ("fleet", 0.17),
    ("emergency", 0.03),
)
ENERGY_MEDIAN_KWH = 18.0
ENERGY_SIGMA = 0.7
ENERGY_RANGE_KWH = (5.0, 80.0)

#: (hour of the day, arrival rate relative to the peak).
DAILY_SHAPE: tuple[tuple[float, float], ...] = (
    (0, 0.05),
    (6, 0.10),
    (8, 0.80),
    (10, 0.60),
    (13, 0.45),
    (17, 1.00),
    (19, 0.70),
    (22, 0.15),
    (24, 0.05),
)


@dataclass(frozen=True)
class EvRequest:
    """One request of the mix: its offset from the start of the run, and its body's fields."""

    at: float
    car: str
    max_kw: float
    min_kw: float
    energy_kwh: float
    priority: str

    def body(self, ev_id: str) -> dict:
        return {
            "ev_id": ev_id,
            "energy_kwh": self.energy_kwh,
            "max_kw": self.max_kw,
            "min_kw": self.min_kw,
            "priority": self.priority,
        }

    def hours_at_full_power(self) -> float:
        return self.energy_kwh / self.max_kw


def draw_energy(rng: random.Random) -> float:
    low, high = ENERGY_RANGE_KWH
    value = rng.lognormvariate(math.log(ENERGY_MEDIAN_KWH), ENERGY_SIGMA)
    return round(min(high, max(low, value)), 2)


def draw(rng: random.Random, at: float = 0.0) -> EvRequest:
    car = rng.choices(CAR_CLASSES, weights=[c.share for c in CAR_CLASSES])[0]
    names, weights = zip(*PRIORITY_SHARES, strict=True)
    priority = rng.choices(names, weights=weights)[0]
    return EvRequest(at, car.name, car.max_kw, car.min_kw, draw_energy(rng), priority)


def daily_profile(peak_rate: float, hour_seconds: float, hours: float = 24.0) -> RateProfile:
    """Arrivals per real second over ``hours`` simulated hours of a day, peaking at
    ``peak_rate``."""
    if peak_rate <= 0 or hour_seconds <= 0 or not 0 < hours <= 24:
        raise ValueError("need a positive peak rate and hour, and 0 < hours <= 24")
    points = []
    for (h0, r0), (h1, r1) in zip(DAILY_SHAPE, DAILY_SHAPE[1:], strict=False):
        if h0 >= hours:
            break
        points.append((h0 * hour_seconds, r0 * peak_rate))
        if h1 >= hours:
            r_end = r0 + (r1 - r0) * (hours - h0) / (h1 - h0)
            points.append((hours * hour_seconds, r_end * peak_rate))
            break
    else:
        points.append((DAILY_SHAPE[-1][0] * hour_seconds, DAILY_SHAPE[-1][1] * peak_rate))
    return RateProfile(tuple(points), "ev-day")


def arrival_rng(seed: int) -> random.Random:
    """The generator of a trace's arrival times (loadgen's ``--seed``)."""
    return random.Random(seed)


def mix_bodies(seed: int) -> Callable[[int, str], dict]:
    """POST bodies of the mix for loadgen, drawn in order from the trace's own generator."""
    rng = random.Random(seed + 7)

    def body(_index: int, ev_id: str) -> dict:
        return draw(rng).body(ev_id)

    return body


def ev_trace(
    *, peak_rate: float, hour_seconds: float, hours: float = 24.0, seed: int = 1
) -> list[EvRequest]:
    """The whole trace: Poisson arrivals following the day, each with its draws; exactly
    what ``loadgen --ev-mix --arrivals poisson --seed SEED`` sends, in the same order."""
    rng = random.Random(seed + 7)
    arrivals: Iterator[float] = profile_arrivals(
        daily_profile(peak_rate, hour_seconds, hours), poisson=True, rng=arrival_rng(seed)
    )
    return [draw(rng, at) for at in arrivals]


def describe_mix(trace: Sequence[EvRequest]) -> dict:
    """What a trace holds, for reports."""
    if not trace:
        return {"requests": 0}
    energies = sorted(r.energy_kwh for r in trace)
    return {
        "requests": len(trace),
        "energy_kwh_total": round(sum(energies), 1),
        "energy_kwh_median": energies[len(energies) // 2],
        "by_car": {c.name: sum(r.car == c.name for r in trace) for c in CAR_CLASSES},
        "by_priority": {p: sum(r.priority == p for r in trace) for p, _ in PRIORITY_SHARES},
    }
