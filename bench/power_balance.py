"""Waits under variable session lengths: every strategy on the same simulated days of the EV mix.

Each day is the trace ``loadgen --ev-mix --arrivals poisson --seed N`` sends (seed 1 is the day
a run of the real stack uses), through the site of ``bench/ev-site.toml`` (four substations of
4 to 8 charging points under two feeders and a 300 kW connection), simulated by
``bench/power_sim.py`` with the strategies' own decision functions. It reports the wait from
arrival to a charging point and to power (mean, p95, p99, in simulated minutes) per strategy
and per class, at one load and over a sweep of loads, and on how many days the default's p99
beats round robin's and stale-min's.

    .venv/bin/python -m bench.power_balance [--peak 16] [--days 20] [--sweep 10,13,16,19,22]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.power_sim import (  # noqa: E402
    POWER_MIN_FIFO,
    STRATEGIES,
    DayResult,
    Site,
    loadgen_trace,
    percentile,
    simulate_day,
    summarise,
)
from smartgrid.grid import load_topology  # noqa: E402

SITE_FILE = Path(__file__).with_name("ev-site.toml")
SITE_POINTS = {"substation-1": 6, "substation-2": 6, "substation-3": 4, "substation-4": 8}
#: The strategies compared with power-min on every day (the issue's "round robin and stale-min").
BASELINES = ("round-robin", "stale-min")


def ev_site() -> Site:
    return Site.from_topology(load_topology(SITE_FILE), SITE_POINTS)


def run_days(
    site: Site,
    strategies: list[str],
    *,
    peak_per_hour: float,
    days: int,
    hour_seconds: float,
    poll_interval: float,
) -> dict[str, list[DayResult]]:
    """Every strategy on days 1..``days`` (day N: loadgen's trace of seed N)."""
    traces = [
        loadgen_trace(peak_rate=peak_per_hour / hour_seconds, hour_seconds=hour_seconds, seed=day)
        for day in range(1, days + 1)
    ]
    return {
        strategy: [
            simulate_day(
                site,
                trace,
                strategy,
                hour_seconds=hour_seconds,
                poll_interval=poll_interval,
                seed=day,
            )
            for day, trace in enumerate(traces, start=1)
        ]
        for strategy in strategies
    }


def day_p99(result: DayResult) -> float:
    waits = [o.wait_to_charge for o in result.outcomes if o.wait_to_charge is not None]
    value = percentile(waits, 99)
    return 0.0 if value is None else value * 60 / result.hour_seconds


def days_below(results: dict[str, list[DayResult]], strategy: str, baseline: str) -> int:
    """Days on which ``strategy``'s p99 wait to power is strictly below ``baseline``'s."""
    return sum(
        day_p99(a) < day_p99(b) for a, b in zip(results[strategy], results[baseline], strict=True)
    )


def _plot(
    sweep: dict[float, dict[str, dict]],
    main: dict[str, list[DayResult]],
    peak: float,
    site: Site,
    path: Path,
) -> None:
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8))
    peaks = sorted(sweep)
    for strategy in next(iter(sweep.values())):
        left.plot(
            peaks,
            [sweep[p][strategy]["to_charge"]["p99"] for p in peaks],
            marker="o",
            label=strategy,
            linestyle="--" if strategy == POWER_MIN_FIFO else "-",
        )
    left.set_xlabel("peak arrivals per simulated hour")
    left.set_ylabel("p99 wait to power (simulated minutes)")
    left.set_title("p99 wait against load", fontsize=10)
    left.legend(fontsize=8)
    for strategy, results in main.items():
        waits = sorted(
            o.wait_to_charge * 60 / r.hour_seconds
            for r in results
            for o in r.outcomes
            if o.wait_to_charge is not None
        )
        shares = [1 - (i + 1) / len(waits) for i in range(len(waits))]
        middle.step(waits, shares, where="post", label=strategy)
    middle.set_yscale("log")
    middle.set_ylim(1e-3, 1)
    middle.set_xlabel("wait to power (simulated minutes)")
    middle.set_ylabel("share of requests waiting longer")
    middle.set_title(f"Waits at a peak of {peak:g}/h, every day pooled", fontsize=10)
    middle.legend(fontsize=8)
    day = main["power-min"][0] if "power-min" in main else next(iter(main.values()))[0]
    _plot_power(day, site, right)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_power(day: DayResult, site: Site, ax) -> None:
    """Power per feeder and at the site over day 1, against the limits (one strategy)."""
    limits = site.limits_w()
    changes = sorted({t for series in day.power.values() for t, _, _ in series})
    drawn: dict[str, list[float]] = {}
    for node in ("site", *sorted(n for n in site.topology.nodes if n.startswith("feeder"))):
        drawn[node] = []
    index = dict.fromkeys(day.power, 0)
    current = dict.fromkeys(day.power, 0)
    for t in changes:
        for substation, series in day.power.items():
            while index[substation] < len(series) and series[index[substation]][0] <= t:
                current[substation] = series[index[substation]][1]
                index[substation] += 1
        for node in drawn:
            drawn[node].append(
                sum(w for s, w in current.items() if node in site.topology.path(s)) / 1000
            )
    hours = [t / day.hour_seconds for t in changes]
    for node, values in drawn.items():
        line = ax.step(hours, values, where="post", label=f"{node}", linewidth=1)[0]
        ax.axhline(limits[node] / 1000, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("simulated hour")
    ax.set_ylabel("kW (dotted: limit)")
    ax.set_title(f"Day 1 with {day.strategy}: power against the limits", fontsize=10)
    ax.legend(fontsize=8)


def _row(strategy: str, s: dict, results: dict[str, list[DayResult]]) -> list[object]:
    beats = [
        f"{days_below(results, strategy, b)}/{len(results[strategy])}"
        if strategy != b and b in results
        else "—"
        for b in BASELINES
    ]
    c = s["to_charge"]
    by_class = s["by_class"]
    return [
        strategy,
        round(s["to_start"]["p99"], 1),
        round(c["mean"], 1),
        round(c["p95"], 1),
        round(c["p99"], 1),
        *(round(by_class[k]["to_charge"]["p99"], 1) for k in ("emergency", "fleet", "standard")),
        *beats,
        round(s["stretch_mean"], 2),
        s["paused_sessions"],
        s["violations"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.power_balance", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--peak", type=float, default=16.0, help="arrivals per simulated hour at the evening peak"
    )
    parser.add_argument(
        "--sweep",
        default="10,13,16,19,22",
        help="peak rates for the p99-against-load curve (comma-separated; empty: none)",
    )
    parser.add_argument("--days", type=int, default=20, help="days (trace seeds 1..N) per load")
    parser.add_argument(
        "--simulated-hour",
        type=float,
        default=3.6,
        help="real seconds per simulated hour, as the real stack's run would use (default 3.6: "
        "a day in 86 s)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds between the balancer's polls (what stale-min sees; default 0.5, as "
        "bench.balance)",
    )
    parser.add_argument(
        "--strategies",
        default=",".join([*STRATEGIES, POWER_MIN_FIFO]),
        help=f"comma-separated, of {', '.join(STRATEGIES)} and {POWER_MIN_FIFO} (power-min's "
        "routing with held requests released in arrival order)",
    )
    parser.add_argument("--out", default="power-balance", help="name of the JSON and PNG written")
    args = parser.parse_args()

    from bench.common import RESULTS, markdown_table, save

    site = ev_site()
    strategies = args.strategies.split(",")
    common = dict(
        days=args.days, hour_seconds=args.simulated_hour, poll_interval=args.poll_interval
    )
    main_results = run_days(site, strategies, peak_per_hour=args.peak, **common)
    main_summary = {s: summarise(r) for s, r in main_results.items()}
    sweep: dict[float, dict[str, dict]] = {}
    for peak in [float(p) for p in args.sweep.split(",") if p]:
        results = (
            main_results
            if peak == args.peak
            else run_days(site, strategies, peak_per_hour=peak, **common)
        )
        sweep[peak] = {s: summarise(r) for s, r in results.items()}
        print(
            f"peak {peak:g}/h: "
            + ", ".join(f"{s} p99 {v['to_charge']['p99']:.0f}" for s, v in sweep[peak].items()),
            flush=True,
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot(
        sweep or {args.peak: main_summary},
        main_results,
        args.peak,
        site,
        RESULTS / f"{args.out}.png",
    )
    day_p99s = {s: [round(day_p99(r), 2) for r in rs] for s, rs in main_results.items()}
    save(
        args.out,
        {
            "settings": {**vars(args), "site": SITE_FILE.name, "points": SITE_POINTS},
            "requests_per_day": [len(r.outcomes) for r in next(iter(main_results.values()))],
            "summary": main_summary,
            "day_p99_to_charge_minutes": day_p99s,
            "sweep": {str(k): v for k, v in sweep.items()},
        },
    )
    headers = [
        "strategy",
        "to a point p99",
        "to power mean",
        "p95",
        "p99",
        "p99 emergency",
        "p99 fleet",
        "p99 standard",
        *(f"days p99 < {b}" for b in BASELINES),
        "stretch",
        "paused",
        "over a limit",
    ]
    print()
    print(markdown_table(headers, [_row(s, v, main_results) for s, v in main_summary.items()]))
    if sweep:
        print()
        print(
            markdown_table(
                ["peak/h", *strategies],
                [
                    [f"{peak:g}", *(round(v[s]["to_charge"]["p99"], 1) for s in strategies)]
                    for peak, v in sweep.items()
                ],
            )
        )


if __name__ == "__main__":
    main()
