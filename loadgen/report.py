"""The numbers of a load run: answers, latencies, fates, and how evenly load was spread."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field

from loadgen.observer import RequestFate
from loadgen.traffic import Outcome


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def jain_index(loads: list[float]) -> float | None:
    """Jain's fairness index: 1 when all equal, 1/n when one has everything."""
    squares = sum(x * x for x in loads)
    if squares == 0:
        return None
    return sum(loads) ** 2 / (len(loads) * squares)


@dataclass
class LoadTimeline:
    """Active sessions per substation over time, rebuilt from session events."""

    substations: list[str]
    times: dict[str, list[float]]
    levels: dict[str, list[int]]

    @classmethod
    def from_fates(cls, fates: dict[str, RequestFate], substations: set[str]) -> LoadTimeline:
        changes: dict[str, list[tuple[float, int]]] = {s: [] for s in substations}
        for fate in fates.values():
            for started in fate.started:
                changes.setdefault(started.substation, []).append((started.at, +1))
            for completed in fate.completed:
                changes.setdefault(completed.substation, []).append((completed.at, -1))
        times: dict[str, list[float]] = {}
        levels: dict[str, list[int]] = {}
        for substation, steps in changes.items():
            steps.sort()
            level = 0
            times[substation], levels[substation] = [], []
            for at, delta in steps:
                level += delta
                times[substation].append(at)
                levels[substation].append(level)
        return cls(sorted(changes), times, levels)

    @property
    def span(self) -> tuple[float, float] | None:
        starts = [t[0] for t in self.times.values() if t]
        ends = [t[-1] for t in self.times.values() if t]
        return (min(starts), max(ends)) if starts else None

    def load_at(self, substation: str, at: float) -> int:
        index = bisect.bisect_right(self.times[substation], at) - 1
        return self.levels[substation][index] if index >= 0 else 0

    def samples(self, interval: float) -> list[tuple[float, list[int]]]:
        span = self.span
        if span is None:
            return []
        start, end = span
        count = int((end - start) / interval) + 1
        return [
            (start + i * interval, [self.load_at(s, start + i * interval) for s in self.substations])
            for i in range(count)
        ]


@dataclass
class Balance:
    samples: int = 0
    interval: float = 0.1
    spread_within_1: float | None = None  # share of samples with max - min <= 1
    spread_mean: float | None = None
    spread_max: int | None = None
    peak_load: int | None = None
    peak_to_average: float | None = None
    jain_mean: float | None = None
    cov_mean: float | None = None


def balance_of(timeline: LoadTimeline, interval: float) -> Balance:
    samples = timeline.samples(interval)
    if not samples:
        return Balance(interval=interval)
    spreads = [max(loads) - min(loads) for _, loads in samples]
    busy = [loads for _, loads in samples if sum(loads) > 0]
    jains = [j for loads in busy if (j := jain_index(loads)) is not None]
    covs = [statistics.pstdev(loads) / statistics.fmean(loads) for loads in busy]
    ratios = [max(loads) / statistics.fmean(loads) for loads in busy]
    return Balance(
        samples=len(samples),
        interval=interval,
        spread_within_1=sum(1 for s in spreads if s <= 1) / len(spreads),
        spread_mean=statistics.fmean(spreads),
        spread_max=max(spreads),
        peak_load=max(max(loads) for _, loads in samples),
        peak_to_average=statistics.fmean(ratios) if ratios else None,
        jain_mean=statistics.fmean(jains) if jains else None,
        cov_mean=statistics.fmean(covs) if covs else None,
    )


@dataclass
class Report:
    sent: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by HTTP status
    errors: dict[str, int] = field(default_factory=dict)  # by kind (connection, timeout, ...)
    accept_latency_ms: dict[str, float | None] = field(default_factory=dict)
    wait_to_start_s: dict[str, float | None] = field(default_factory=dict)
    requests_per_substation: dict[str, int] = field(default_factory=dict)
    routed_in_reply: int = 0
    completed_once: int = 0
    completed_more_than_once: int = 0
    started_more_than_once: int = 0
    dead_lettered: int = 0
    unfinished: int = 0
    balance: Balance = field(default_factory=Balance)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def every_accepted_completed_once(self) -> bool:
        return self.accepted > 0 and self.completed_once == self.accepted and self.started_more_than_once == 0


def build_report(
    outcomes: list[Outcome], fates: dict[str, RequestFate] | None, *, sample_interval: float = 0.1
) -> Report:
    report = Report(sent=len(outcomes))
    accepted = [o for o in outcomes if o.accepted]
    report.accepted = len(accepted)
    report.rejected = dict(Counter(str(o.status) for o in outcomes if o.status is not None and not o.accepted))
    report.errors = dict(Counter(o.error for o in outcomes if o.error is not None))
    latencies = [o.latency * 1000 for o in accepted]
    report.accept_latency_ms = {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies) if latencies else None,
    }
    report.routed_in_reply = sum(1 for o in accepted if o.routed_to)
    if fates is None:
        report.requests_per_substation = dict(Counter(o.routed_to for o in accepted if o.routed_to))
        return report

    waits: list[float] = []
    per_substation: Counter[str] = Counter()
    substations: set[str] = set()
    for outcome in accepted:
        fate = fates.get(outcome.request_id) or RequestFate()
        substations.update(fate.routed_to)
        if fate.started:
            first = min(fate.started, key=lambda e: e.at)
            waits.append(first.at - first.accepted_at)
            per_substation[first.substation] += 1
        if len(fate.started) > 1:
            report.started_more_than_once += 1
        if len(fate.completed) == 1:
            report.completed_once += 1
        elif len(fate.completed) > 1:
            report.completed_more_than_once += 1
        elif fate.dead_lettered:
            report.dead_lettered += 1
        else:
            report.unfinished += 1
    report.wait_to_start_s = {
        "p50": percentile(waits, 50),
        "p95": percentile(waits, 95),
        "p99": percentile(waits, 99),
        "max": max(waits) if waits else None,
    }
    report.requests_per_substation = dict(sorted(per_substation.items()))
    timeline = LoadTimeline.from_fates(
        {o.request_id: fates[o.request_id] for o in accepted if o.request_id in fates},
        substations | set(per_substation),
    )
    report.balance = balance_of(timeline, sample_interval)
    return report


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _counts(by_kind: dict[str, int]) -> str:
    total = sum(by_kind.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{kind}: {n}" for kind, n in sorted(by_kind.items())) + ")"


def render(report: Report) -> str:
    """A plain-text summary (what ``make run`` prints)."""
    lines = [
        "== load run ==",
        f"sent {report.sent}, accepted {report.accepted}, "
        f"rejected {_counts(report.rejected)}, errors {_counts(report.errors)}",
        "accept latency (ms): "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in report.accept_latency_ms.items()),
        f"routing decision in the 202 reply: {report.routed_in_reply}/{report.accepted}",
    ]
    if report.wait_to_start_s:
        lines.append(
            "wait to session start (s): "
            + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in report.wait_to_start_s.items())
        )
        lines.append(
            f"fates: completed once {report.completed_once}, completed more than once "
            f"{report.completed_more_than_once}, started more than once {report.started_more_than_once}, "
            f"dead-lettered {report.dead_lettered}, unfinished {report.unfinished}"
        )
    lines.append(
        "requests per substation: "
        + (", ".join(f"{s} {n}" for s, n in report.requests_per_substation.items()) or "-")
    )
    b = report.balance
    if b.samples:
        lines += [
            f"== load spread between substations ({b.samples} samples every {b.interval * 1000:.0f} ms) ==",
            f"max - min active sessions <= 1 in {_fmt(b.spread_within_1 * 100)}% of samples; "
            f"mean {_fmt(b.spread_mean, 2)}, worst {b.spread_max}",
            f"peak load on one substation {b.peak_load}; peak-to-average {_fmt(b.peak_to_average, 2)}; "
            f"Jain's index {_fmt(b.jain_mean, 3)}; coefficient of variation {_fmt(b.cov_mean, 3)}",
        ]
    return "\n".join(lines)
