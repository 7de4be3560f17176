"""Balance quality: the same arrival trace through the real stack, one strategy at a time.

Scenarios (all with sessions of fixed length and polls every 0.5 s):

* ``seed``: the original case compressed ten times (one EV every 0.2 s for 30 s, 3 s sessions,
  three substations of 10 points);
* ``poisson-90``: Poisson arrivals at 90% of total capacity (three substations of 4 points);
* ``heterogeneous``: Poisson at 90% of capacity with substations of 2, 4 and 8 points;
* ``two-balancers``: the seed case with two balancer replicas consuming the pending queue.

For each it runs ``stale-min`` (the original rule), ``corrected-min`` (the default), ``p2c``,
``round-robin`` and ``random``, and reports spread, peak-to-average, Jain's index and
wait-to-start percentiles in one table, with one plot per scenario. For the Poisson scenarios it
also simulates, on the very same arrival times, join-the-shortest-queue with perfect, current
information (each substation queueing its own requests): the ideal the issue asks to compare with;
and one queue shared by every charging point, whose mean wait no strategy can go below.

    .venv/bin/python -m bench.balance [--scenarios seed,poisson-90] [--strategies ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS, bench_settings, markdown_table, private_vhost, save  # noqa: E402
from loadgen.report import LoadTimeline, percentile  # noqa: E402
from loadgen.run import LoadResult, LoadSettings, run_load  # noqa: E402
from stack.local import balancer_process, start_stack  # noqa: E402

STRATEGIES = ["stale-min", "corrected-min", "p2c", "round-robin", "random"]


@dataclass(frozen=True)
class Scenario:
    name: str
    capacities: tuple[int, ...]
    session_seconds: float
    arrivals: str  # constant or poisson
    interval: float
    duration: float
    poll_interval: float = 0.5
    balancers: int = 1

    @property
    def total_capacity(self) -> int:
        return sum(self.capacities)


def _poisson_interval(capacities: tuple[int, ...], session: float, load: float) -> float:
    return 1 / (load * sum(capacities) / session)


SCENARIOS = {
    "seed": Scenario("seed", (10, 10, 10), 3.0, "constant", 0.2, 30.0),
    "poisson-90": Scenario(
        "poisson-90", (4, 4, 4), 3.0, "poisson", _poisson_interval((4, 4, 4), 3.0, 0.9), 60.0
    ),
    "heterogeneous": Scenario(
        "heterogeneous", (2, 4, 8), 3.0, "poisson", _poisson_interval((2, 4, 8), 3.0, 0.9), 60.0
    ),
    "two-balancers": Scenario(
        "two-balancers", (10, 10, 10), 3.0, "constant", 0.2, 30.0, balancers=2
    ),
}


def run_one(scenario: Scenario, strategy: str, log_dir: Path) -> LoadResult:
    with private_vhost("bench-balance") as url:
        settings = bench_settings(
            url,
            log_dir / f"{scenario.name}-{strategy}",
            substations=len(scenario.capacities),
            capacities=scenario.capacities,
            session_seconds=scenario.session_seconds,
            poll_interval=scenario.poll_interval,
            strategy=strategy,
            gateway_workers=1,
        )
        group = start_stack(settings)
        try:
            for replica in range(2, scenario.balancers + 1):
                group.add(
                    balancer_process(
                        settings,
                        name=f"balancer-{replica}",
                        port=settings.balancer_port + 50 + replica,
                    )
                ).wait_healthy()
            return run_load(
                LoadSettings(
                    gateway_url=settings.gateway_url,
                    amqp_url=settings.amqp_url,
                    interval=scenario.interval,
                    arrivals=scenario.arrivals,
                    duration=scenario.duration,
                    settle_timeout=scenario.session_seconds * 20 + 60,
                    seed=1,  # the same trace for every strategy
                    scenario=f"{scenario.name} / {strategy}",
                )
            )
        finally:
            group.stop()


def simulate_jsq(arrivals: list[float], capacities: tuple[int, ...], session: float) -> list[float]:
    """Waits under join-the-shortest-queue with exact, current knowledge: each arrival joins
    the substation with the lowest (sessions + queued + 1) / capacity and waits there, FIFO."""
    running: list[list[float]] = [[] for _ in capacities]  # end times (heaps)
    queued: list[list[float]] = [[] for _ in capacities]  # arrival times waiting, FIFO
    waits: list[float] = []

    def advance(i: int, now: float) -> None:
        # Let substation i run its queue up to time ``now``.
        while running[i] and running[i][0] <= now:
            freed = heapq.heappop(running[i])
            if queued[i]:
                arrived = queued[i].pop(0)
                waits.append(freed - arrived)
                heapq.heappush(running[i], freed + session)

    for at in arrivals:
        for i in range(len(capacities)):
            advance(i, at)
        best = min(
            range(len(capacities)),
            key=lambda i: ((len(running[i]) + len(queued[i]) + 1) / capacities[i], i),
        )
        if len(running[best]) < capacities[best]:
            waits.append(0.0)
            heapq.heappush(running[best], at + session)
        else:
            queued[best].append(at)
    for i in range(len(capacities)):
        advance(i, float("inf"))
    return waits


def simulate_one_queue(
    arrivals: list[float], capacities: tuple[int, ...], session: float
) -> list[float]:
    """Waits when every charging point of every substation serves one shared FIFO queue: each
    arrival takes the first point to free anywhere. With sessions of equal length no dispatcher
    can start requests sooner on the same trace, so its mean wait is the floor for any strategy
    (and its tail the practical one)."""
    free_at = [0.0] * sum(capacities)  # a heap of the times each point frees up
    waits = []
    for at in arrivals:
        start = max(heapq.heappop(free_at), at)
        waits.append(start - at)
        heapq.heappush(free_at, start + session)
    return waits


def _waits(result: LoadResult) -> list[float]:
    waits = []
    for fate in result.fates.values():
        if fate.started:
            first = min(fate.started, key=lambda e: e.at)
            waits.append(max(0.0, first.at - first.accepted_at))
    return waits


def _row(scenario: Scenario, strategy: str, result: LoadResult) -> dict:
    report = result.report
    waits = _waits(result)
    b = report.balance
    return {
        "scenario": scenario.name,
        "strategy": strategy,
        "accepted": report.accepted,
        "completed_once": report.completed_once,
        "spread_within_1": b.spread_within_1,
        "spread_mean": b.spread_mean,
        "spread_max": b.spread_max,
        "utilisation_spread_mean": getattr(b, "utilisation_spread_mean", None),
        "peak_to_average": b.peak_to_average,
        "jain": b.jain_mean,
        "jain_over_run": b.jain_over_run,
        "wait_mean": statistics.fmean(waits) if waits else None,
        "wait_p50": percentile(waits, 50),
        "wait_p95": percentile(waits, 95),
        "wait_p99": percentile(waits, 99),
        "per_substation": report.requests_per_substation,
    }


def _plot(scenario: Scenario, results: dict[str, LoadResult], path: Path) -> None:
    figure, axes = plt.subplots(
        len(results), 1, figsize=(10, 2.2 * len(results)), sharex=True, squeeze=False
    )
    for ax, (strategy, result) in zip(axes[:, 0], results.items(), strict=True):
        substations = sorted({s.substation for f in result.fates.values() for s in f.started})
        timeline = LoadTimeline.from_fates(result.fates, set(substations))
        span = timeline.span
        if span is None:
            continue
        for substation in timeline.substations:
            times = [t - span[0] for t in timeline.times[substation]]
            ax.step(times, timeline.levels[substation], where="post", label=substation, linewidth=1)
        b = result.report.balance
        ax.set_title(
            f"{strategy}: spread <= 1 in {b.spread_within_1:.0%} of samples, worst {b.spread_max}, "
            f"peak {b.peak_load}, Jain {b.jain_mean:.3f} (samples) {b.jain_over_run:.3f} (run)",
            fontsize=9,
        )
        ax.set_ylabel("sessions")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    figure.suptitle(f"Active sessions per substation: {scenario.name}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.balance", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="smartgrid-balance-"))
    rows, ideals = [], {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.scenarios.split(","):
        scenario = SCENARIOS[name]
        results: dict[str, LoadResult] = {}
        for strategy in args.strategies.split(","):
            result = run_one(scenario, strategy, log_dir)
            results[strategy] = result
            rows.append(_row(scenario, strategy, result))
            row = rows[-1]
            print(
                f"{name:14s} {strategy:14s} spread<=1 {row['spread_within_1']:.1%}  mean "
                f"{row['spread_mean']:.2f}  "
                f"Jain {row['jain']:.3f}  wait p99 {row['wait_p99']}",
                flush=True,
            )
        if scenario.arrivals == "poisson":
            any_result = next(iter(results.values()))
            sent = sorted(o.sent_at for o in any_result.outcomes)
            offsets = [t - sent[0] for t in sent]
            jsq = simulate_jsq(offsets, scenario.capacities, scenario.session_seconds)
            one_queue = simulate_one_queue(offsets, scenario.capacities, scenario.session_seconds)
            ideals[name] = {
                "wait_mean": statistics.fmean(jsq),
                "wait_p99": percentile(jsq, 99),
                "one_queue_wait_mean": statistics.fmean(one_queue),
                "one_queue_wait_p99": percentile(one_queue, 99),
            }
        _plot(scenario, results, RESULTS / f"balance-{name}.png")

    save(
        "balance",
        {
            "rows": rows,
            "jsq_ideal": ideals,
            "scenarios": {k: dataclasses.asdict(v) for k, v in SCENARIOS.items()},
        },
    )
    headers = [
        "scenario",
        "strategy",
        "spread <= 1",
        "mean spread",
        "worst",
        "utilisation spread",
        "peak/avg",
        "Jain (samples)",
        "Jain (run)",
        "wait mean (s)",
        "wait p50",
        "wait p95",
        "wait p99",
    ]
    table = [
        [
            r["scenario"],
            r["strategy"],
            f"{r['spread_within_1']:.1%}",
            r["spread_mean"],
            r["spread_max"],
            r["utilisation_spread_mean"],
            r["peak_to_average"],
            f"{r['jain']:.3f}",
            f"{r['jain_over_run']:.3f}",
            r["wait_mean"],
            r["wait_p50"],
            r["wait_p95"],
            r["wait_p99"],
        ]
        for r in rows
    ]
    print()
    print(markdown_table(headers, table))
    if ideals:
        print()
        print(
            markdown_table(
                [
                    "scenario",
                    "JSQ ideal wait mean (s)",
                    "JSQ ideal wait p99 (s)",
                    "one queue wait mean (s)",
                    "one queue wait p99 (s)",
                ],
                [
                    [
                        k,
                        v["wait_mean"],
                        v["wait_p99"],
                        v["one_queue_wait_mean"],
                        v["one_queue_wait_p99"],
                    ]
                    for k, v in ideals.items()
                ],
            )
        )


if __name__ == "__main__":
    main()
