"""The numbers of a load run: answers, latencies, fates, and how evenly load was spread."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from loadgen.observer import RequestFate
from loadgen.traffic import CLIENT_REFUSALS, ERROR_KINDS, Outcome


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def jain_index(loads: Sequence[float]) -> float | None:
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

    def spread_series(self, interval: float) -> list[tuple[float, int]]:
        """(time, max - min active sessions) every ``interval`` seconds over the span."""
        return [(at, max(loads) - min(loads)) for at, loads in self.samples(interval)]

    def samples(self, interval: float) -> list[tuple[float, list[int]]]:
        span = self.span
        if span is None:
            return []
        start, end = span
        count = int((end - start) / interval) + 1
        return [
            (
                start + i * interval,
                [self.load_at(s, start + i * interval) for s in self.substations],
            )
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
    #: Mean of each sample's Jain index: how even the load is moment by moment. With few
    #: sessions per substation it is capped by whole numbers (5, 5, 4 already scores 0.990).
    jain_mean: float | None = None
    #: Jain's index of each substation's load averaged over the run (utilisation when
    #: capacities differ): did every substation carry its share of the work.
    jain_over_run: float | None = None
    cov_mean: float | None = None
    #: Utilisation (active sessions / charging points) spread, max - min per sample, as a
    #: share of capacity: what "even" means when substations differ in size. None when no
    #: capacity is known (then they are assumed equal and the spread above says it all).
    utilisation_spread_mean: float | None = None
    utilisation_spread_max: float | None = None
    capacities_differ: bool = False
    #: Time-averaged utilisation of each substation over the samples.
    mean_utilisation: dict[str, float] = field(default_factory=dict)


def capacities_for(substations: list[str], known: dict[str, int] | None) -> list[float] | None:
    """Capacity of each substation; one not heard of is assumed equal to the others (the
    median of the known ones). None when none is known."""
    known = {s: c for s, c in (known or {}).items() if c and c > 0}
    if not known:
        return None
    default = statistics.median(known.values())
    return [float(known.get(s, default)) for s in substations]


def utilisation_spreads(
    samples: list[tuple[float, list[int]]], capacities: list[float]
) -> list[float]:
    """Per sample, max - min of load / capacity across substations."""
    spreads = []
    for _, loads in samples:
        shares = [load / cap for load, cap in zip(loads, capacities, strict=True)]
        spreads.append(max(shares) - min(shares))
    return spreads


def balance_of(
    timeline: LoadTimeline, interval: float, capacities: dict[str, int] | None = None
) -> Balance:
    samples = timeline.samples(interval)
    if not samples:
        return Balance(interval=interval)
    spreads = [max(loads) - min(loads) for _, loads in samples]
    busy = [loads for _, loads in samples if sum(loads) > 0]
    jains = [j for loads in busy if (j := jain_index(loads)) is not None]
    covs = [statistics.pstdev(loads) / statistics.fmean(loads) for loads in busy]
    ratios = [max(loads) / statistics.fmean(loads) for loads in busy]
    caps = capacities_for(timeline.substations, capacities)
    averages = [
        statistics.fmean(loads[i] for _, loads in samples) for i in range(len(timeline.substations))
    ]
    shares = averages if caps is None else [a / c for a, c in zip(averages, caps, strict=True)]
    balance = Balance(
        samples=len(samples),
        interval=interval,
        spread_within_1=sum(1 for s in spreads if s <= 1) / len(spreads),
        spread_mean=statistics.fmean(spreads),
        spread_max=max(spreads),
        peak_load=max(max(loads) for _, loads in samples),
        peak_to_average=statistics.fmean(ratios) if ratios else None,
        jain_mean=statistics.fmean(jains) if jains else None,
        jain_over_run=jain_index(shares),
        cov_mean=statistics.fmean(covs) if covs else None,
    )
    if caps is not None:
        spreads_of_use = utilisation_spreads(samples, caps)
        balance.utilisation_spread_mean = statistics.fmean(spreads_of_use)
        balance.utilisation_spread_max = max(spreads_of_use)
        balance.capacities_differ = len(set(caps)) > 1
        balance.mean_utilisation = dict(zip(timeline.substations, shares, strict=True))
    return balance


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
    scenario: str = ""
    started_at: float | None = None  # wall clock of the first arrival's offset 0
    #: How long the schedule took (offset 0 to its end), and the rates achieved over it.
    send_seconds: float | None = None
    send_rate: float | None = None  # requests sent per second
    accepted_per_s: float | None = None
    rejected_by_class: dict[str, int] = field(default_factory=dict)  # "4xx", "5xx", "other"
    capacities: dict[str, int] = field(default_factory=dict)  # charging points, as announced
    stopped_early: str | None = None  # why sending stopped before the schedule's end
    #: The first message seen for each error kind, and each rejecting status's "error" field.
    error_examples: dict[str, str] = field(default_factory=dict)
    rejected_examples: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # what was asked for

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def every_accepted_completed_once(self) -> bool:
        return (
            self.accepted > 0
            and self.completed_once == self.accepted
            and self.started_more_than_once == 0
        )


def rejected_example(status: str, example: str) -> str:
    """``409 (the EV already has an active request ...), e.g.: ev_busy: ...``."""
    meaning = CLIENT_REFUSALS.get(int(status)) if status.isdigit() else None
    return f"{status} ({meaning}), e.g.: {example}" if meaning else f"{status}, e.g.: {example}"


def status_class(status: str | int) -> str:
    text = str(status)
    return f"{text[0]}xx" if len(text) == 3 and text[0] in "45" else "other"


def timeline_of(
    outcomes: list[Outcome], fates: dict[str, RequestFate], known: Iterable[str] = ()
) -> LoadTimeline:
    """The load timeline of the accepted requests among ``outcomes``, over every substation
    that took one and every one ``known`` to exist (announced): one that received nothing
    is in the spread at 0, or all traffic on one of three would look perfectly even."""
    followed = {
        o.request_id: fates[o.request_id]
        for o in outcomes
        if o.accepted and o.request_id is not None and o.request_id in fates
    }
    substations: set[str] = set(known)
    for fate in followed.values():
        substations.update(fate.routed_to)
        substations.update(e.substation for e in fate.started)
    return LoadTimeline.from_fates(followed, substations)


def build_report(
    outcomes: list[Outcome],
    fates: dict[str, RequestFate] | None,
    *,
    sample_interval: float = 0.1,
    capacities: dict[str, int] | None = None,
    send_seconds: float | None = None,
) -> Report:
    report = Report(sent=len(outcomes))
    accepted = [o for o in outcomes if o.accepted]
    report.accepted = len(accepted)
    report.rejected = dict(
        Counter(str(o.status) for o in outcomes if o.status is not None and not o.accepted)
    )
    by_class: Counter[str] = Counter()
    for status, n in report.rejected.items():
        by_class[status_class(status)] += n
    report.rejected_by_class = dict(sorted(by_class.items()))
    report.errors = dict(Counter(o.error for o in outcomes if o.error is not None))
    for o in outcomes:
        if o.error is not None and o.detail:
            report.error_examples.setdefault(o.error, o.detail[:300])
        elif o.status is not None and not o.accepted and o.detail:
            report.rejected_examples.setdefault(str(o.status), str(o.detail)[:300])
    report.capacities = dict(sorted((capacities or {}).items()))
    if send_seconds:
        report.send_seconds = send_seconds
        report.send_rate = report.sent / send_seconds
        report.accepted_per_s = report.accepted / send_seconds
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
    for outcome in accepted:
        fate = (fates.get(outcome.request_id) if outcome.request_id else None) or RequestFate()
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
    for substation in capacities or {}:
        per_substation.setdefault(substation, 0)
    report.requests_per_substation = dict(sorted(per_substation.items()))
    report.balance = balance_of(
        timeline_of(outcomes, fates, (capacities or {}).keys()), sample_interval, capacities
    )
    return report


def fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    """A number for the report, or "-" where there is none."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def percent(share: float | None) -> float | None:
    return None if share is None else share * 100


def rejected_text(rejected: dict[str, int]) -> str:
    """``13 (4xx: 3 [422: 3]; 5xx: 10 [503: 10])``: by class, then by status."""
    total = sum(rejected.values())
    if not total:
        return "0"
    classes: dict[str, dict[str, int]] = {}
    for status, n in sorted(rejected.items()):
        classes.setdefault(status_class(status), {})[status] = n
    parts = [
        f"{cls}: {sum(by_status.values())} ["
        + ", ".join(f"{st}: {n}" for st, n in by_status.items())
        + "]"
        for cls, by_status in sorted(classes.items())
    ]
    return f"{total} (" + "; ".join(parts) + ")"


def errors_text(errors: dict[str, int]) -> str:
    """``5 (connection refused: 3, timeout: 2)``."""
    total = sum(errors.values())
    if not total:
        return "0"
    return (
        f"{total} ("
        + ", ".join(f"{ERROR_KINDS.get(kind, kind)}: {n}" for kind, n in sorted(errors.items()))
        + ")"
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}/s"


def render(report: Report) -> str:
    """A plain-text summary (what ``make run`` prints, and loadgen when not on a terminal)."""
    lines = [
        f"== load run: {report.scenario} ==" if report.scenario else "== load run ==",
        f"sent {report.sent}, accepted {report.accepted}, "
        f"rejected {rejected_text(report.rejected)}, errors {errors_text(report.errors)}",
    ]
    if report.send_seconds:
        lines.append(
            f"send rate {_rate(report.send_rate)} over {report.send_seconds:.1f} s; accepted "
            f"{_rate(report.accepted_per_s)}"
        )
    for kind, example in sorted(report.error_examples.items()):
        lines.append(f"  {ERROR_KINDS.get(kind, kind)}, e.g.: {example}")
    for status, example in sorted(report.rejected_examples.items()):
        lines.append(f"  {rejected_example(status, example)}")
    if report.stopped_early:
        lines.append(f"stopped early: {report.stopped_early}")
    lines += [
        "accept latency (ms): "
        + ", ".join(f"{k} {fmt(v)}" for k, v in report.accept_latency_ms.items()),
    ]
    if report.routed_in_reply:  # only a gateway with ROUTED_WAIT > 0 waits for the decision
        lines.append(
            f"routing decision in the 202 reply: {report.routed_in_reply}/{report.accepted}"
        )
    if report.wait_to_start_s:
        lines.append(
            "wait to session start (s): "
            + ", ".join(f"{k} {fmt(v, 3)}" for k, v in report.wait_to_start_s.items())
        )
        lines.append(
            f"fates: completed once {report.completed_once}, completed more than once "
            f"{report.completed_more_than_once}, started more than once "
            f"{report.started_more_than_once}, "
            f"dead-lettered {report.dead_lettered}, unfinished {report.unfinished}"
        )
    lines.append(
        "requests per substation: "
        + (", ".join(f"{s} {n}" for s, n in report.requests_per_substation.items()) or "-")
    )
    b = report.balance
    if b.samples:
        lines += [
            f"== load spread between substations ({b.samples} samples every "
            f"{b.interval * 1000:.0f} ms) ==",
            f"max - min active sessions <= 1 in {fmt(percent(b.spread_within_1))}% of samples; "
            f"mean {fmt(b.spread_mean, 2)}, worst {b.spread_max}",
            f"peak load on one substation {b.peak_load}; peak-to-average "
            f"{fmt(b.peak_to_average, 2)}; "
            f"Jain's index {fmt(b.jain_mean, 3)} (mean of samples), {fmt(b.jain_over_run, 3)} "
            "over the run; "
            f"coefficient of variation {fmt(b.cov_mean, 3)}",
        ]
        if b.capacities_differ:
            lines.append(
                "capacities differ ("
                + ", ".join(f"{s} {c}" for s, c in report.capacities.items())
                + f"): utilisation spread mean {fmt(percent(b.utilisation_spread_mean))}%, "
                f"worst {fmt(percent(b.utilisation_spread_max))}%; mean utilisation "
                + ", ".join(f"{s} {u * 100:.0f}%" for s, u in b.mean_utilisation.items())
            )
    return "\n".join(lines)
