"""Arrival schedules: pure generators of send offsets (seconds from the start of a run).

Nothing here sends anything or looks at a clock, so every pattern can be checked on its own:
the sender (:func:`loadgen.traffic.drive`) just waits for each offset in turn.

* :func:`constant_arrivals`: one every ``interval`` seconds.
* :func:`poisson_arrivals`: exponential gaps at a mean ``rate`` (seeded).
* :func:`burst_arrivals`: ``size`` at once every ``every`` seconds.
* :func:`profile_arrivals`: a rate that changes over time (:class:`RateProfile`), with
  evenly spaced or Poisson arrivals; the named profiles (``seed``, ``rush-hour``, ``spike``)
  are built by :func:`named_profile`.

Time scale: :meth:`RateProfile.scaled` (and multiplying intervals) compresses a schedule;
a schedule scaled by ``s`` has its offsets multiplied by ``s``, Poisson ones included (same
seed, same draws).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SeedScenario:
    """The original tester's case: one EV every 2 s for 5 minutes, against substations whose
    sessions last 30 s and whose metrics the balancer polls every 5 s."""

    interval: float = 2.0
    duration: float = 300.0
    session_seconds: float = 30.0
    poll_interval: float = 5.0


SEED = SeedScenario()

PROFILES = ("seed", "rush-hour", "spike")
#: Default rates (per second) of the named profiles when --rate is not given: rush-hour's peak
#: is what the default stack can just take (3 substations x 10 points / 30 s sessions = 1/s),
#: spike's base is the seed scenario's rate.
DEFAULT_PROFILE_RATE = {"seed": 1 / SEED.interval, "rush-hour": 1.0, "spike": 1 / SEED.interval}
DEFAULT_PROFILE_DURATION = SEED.duration
#: rush-hour: off-peak rate as a share of the peak; ramp up over the first quarter, hold for
#: half, ramp down over the last quarter.
RUSH_HOUR_OFF_PEAK = 0.2
RUSH_HOUR_RAMP = 0.25
#: spike: the spike starts half-way through and lasts 5% of the duration.
SPIKE_AT = 0.5
SPIKE_LENGTH = 0.05
SPIKE_FACTOR = 10.0


def constant_arrivals(interval: float) -> Iterator[float]:
    """Offsets of one arrival every ``interval`` seconds, from 0, without end."""
    # index x interval, not a running sum: a sum drifts and adds an arrival at the very end.
    index = 0
    while True:
        yield index * interval
        index += 1


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Offsets of a Poisson process of ``rate`` per second (the first at 0), without end."""
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)


def burst_arrivals(size: int, every: float) -> Iterator[float]:
    """``size`` arrivals at once at 0, ``every``, 2 x ``every``, ... without end."""
    if size < 1 or every <= 0:
        raise ValueError("a burst needs size >= 1 and every > 0")
    index = 0
    while True:
        at = index * every
        for _ in range(size):
            yield at
        index += 1


@dataclass(frozen=True)
class RateProfile:
    """A rate (per second) over time: linear between ``points`` ``(offset, rate)``, ending
    at the last point's offset. Two points at the same offset make a step."""

    points: tuple[tuple[float, float], ...]
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            raise ValueError("a rate profile needs at least two points")
        offsets = [t for t, _ in self.points]
        if offsets[0] != 0 or offsets != sorted(offsets):
            raise ValueError("a rate profile's offsets start at 0 and never decrease")
        if any(r < 0 for _, r in self.points):
            raise ValueError("a rate cannot be negative")

    @property
    def duration(self) -> float:
        return self.points[-1][0]

    def rate_at(self, t: float) -> float:
        """The rate at offset ``t`` (right-continuous at a step; 0 outside the profile)."""
        if t < 0 or t >= self.duration:
            return 0.0
        offsets = [p[0] for p in self.points]
        i = bisect.bisect_right(offsets, t) - 1
        (t0, r0), (t1, r1) = self.points[i], self.points[i + 1]
        return r0 if t1 == t0 else r0 + (r1 - r0) * (t - t0) / (t1 - t0)

    def expected(self, until: float | None = None) -> float:
        """Arrivals expected up to ``until`` (the whole profile by default): the rate's integral."""
        until = self.duration if until is None else min(until, self.duration)
        total = 0.0
        for (t0, r0), (t1, r1) in zip(self.points, self.points[1:], strict=False):
            if until <= t0:
                break
            end = min(t1, until)
            if end > t0:
                r_end = r0 + (r1 - r0) * (end - t0) / (t1 - t0)
                total += (r0 + r_end) / 2 * (end - t0)
        return total

    def time_for(self, work: float) -> float | None:
        """The offset at which ``work`` arrivals are expected (inverse of :meth:`expected`);
        None when the profile ends first."""
        done = 0.0
        for (t0, r0), (t1, r1) in zip(self.points, self.points[1:], strict=False):
            length = t1 - t0
            if length <= 0:
                continue
            area = (r0 + r1) / 2 * length
            if done + area >= work and area > 0:
                need = max(work - done, 0.0)
                slope = (r1 - r0) / length
                # r0 x + slope x^2 / 2 = need: the root within the segment, in the form that
                # stays exact when the slope is 0 (no cancellation).
                root = r0 + math.sqrt(max(r0 * r0 + 2 * slope * need, 0.0))
                x = 2 * need / root if root > 0 else 0.0
                return t0 + min(x, length)
            done += area
        return None

    def scaled(self, factor: float) -> RateProfile:
        """The same profile with time multiplied by ``factor`` (rates divided by it)."""
        return RateProfile(tuple((t * factor, r / factor) for t, r in self.points), self.name)


def profile_arrivals(
    profile: RateProfile, *, poisson: bool = False, rng: random.Random | None = None
) -> Iterator[float]:
    """Offsets following ``profile``: the n-th arrival where ``n`` arrivals are expected
    (evenly spaced), or at exponential gaps in expected-arrivals (a Poisson process whose rate
    follows the profile). Ends with the profile."""
    if poisson and rng is None:
        raise ValueError("poisson arrivals need a random generator")
    work = 0.0
    while True:
        at = profile.time_for(work)
        if at is None or at >= profile.duration:
            return
        yield at
        work += rng.expovariate(1.0) if rng is not None and poisson else 1.0


def rush_hour(peak: float, duration: float = DEFAULT_PROFILE_DURATION) -> RateProfile:
    """Off-peak (a fifth of ``peak``) ramping up to ``peak`` over the first quarter, holding
    for half the duration, ramping down over the last quarter."""
    low = peak * RUSH_HOUR_OFF_PEAK
    ramp = duration * RUSH_HOUR_RAMP
    return RateProfile(
        ((0.0, low), (ramp, peak), (duration - ramp, peak), (duration, low)), "rush-hour"
    )


def spike(
    base: float, duration: float = DEFAULT_PROFILE_DURATION, factor: float = SPIKE_FACTOR
) -> RateProfile:
    """``base`` throughout, except ``factor`` x ``base`` for 5% of the duration half-way."""
    start = duration * SPIKE_AT
    end = start + duration * SPIKE_LENGTH
    high = base * factor
    return RateProfile(
        ((0.0, base), (start, base), (start, high), (end, high), (end, base), (duration, base)),
        "spike",
    )


def named_profile(
    name: str,
    *,
    rate: float | None = None,
    duration: float | None = None,
    spike_factor: float = SPIKE_FACTOR,
) -> RateProfile:
    """A named profile, unscaled: ``seed`` (constant ``rate``, by default one every 2 s, for
    300 s), ``rush-hour`` (``rate`` is the peak) or ``spike`` (``rate`` is the base)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} (one of {', '.join(PROFILES)})")
    rate = rate or DEFAULT_PROFILE_RATE[name]
    duration = duration or DEFAULT_PROFILE_DURATION
    if name == "rush-hour":
        return rush_hour(rate, duration)
    if name == "spike":
        return spike(rate, duration, spike_factor)
    return RateProfile(((0.0, rate), (duration, rate)), "seed")
