"""Accept latency against offered load: where the p99 target stops holding, and why.

One stack (the throughput benchmark's: 50 ms sessions, 5,000-point substations, so nothing waits
for a charging point) is driven by loadgen at each of ``--rates`` in turn, for ``--duration``
seconds each. For every rate it reports the accepted rate, loadgen's accept latency
percentiles, the CPU time every process spent per request (``/proc``, as ``bench.cpu``) and how
many of the machine's cores the whole run kept busy; then the highest rate whose p99 stayed
within ``--target-ms``. The plot (``docs/bench/latency.png``) shows the latency curve above the
CPU per request, stacked by process.

    .venv/bin/python -m bench.latency [--rates 100,200,...] [--duration 20] [--target-ms 50]
    .venv/bin/python -m bench.latency --server gunicorn   # the previous HTTP server, as baseline
    .venv/bin/python -m bench.latency --revs main,HEAD --rounds 2 --rates 200,400,600,800

With ``--server`` other than granian (the gateway's own), results go to latency-<server>.json
and .png beside the others. ``--revs`` sweeps the stack run from each git revision in turn
(``bench.cpu``'s), ``--rounds`` times, on ``--broker`` (shared, private or private:<Erlang VM
arguments>, as ``bench.cpu --brokers``); the result then goes to ``--name`` (a JSON file
only), with each sweep and a summary of the median p99 per revision and rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import (  # noqa: E402
    GATEWAY_SERVERS,
    RESULTS,
    bench_settings,
    markdown_table,
    private_vhost,
    save,
    source_tree,
)
from bench.cpu import Broker, cpu_during, service_roots  # noqa: E402
from bench.throughput import CAPACITY, SESSION_SECONDS  # noqa: E402
from loadgen.run import LoadSettings, run_load  # noqa: E402
from stack.local import start_stack  # noqa: E402

DEFAULT_RATES = "100,200,300,400,500,600,800,1000"
#: Plot and table order: the stack's services first, then the client.
PROCESS_ORDER = ("gateway", "rabbitmq", "substations", "balancer", "load generator (loadgen)")


def measure_rate(
    gateway_url: str, roots: dict[str, list[int]], rate: float, duration: float
) -> dict:
    settings = LoadSettings(
        gateway_url=gateway_url,
        amqp_url=None,
        interval=1 / rate,
        duration=duration,
        concurrency=2048,
    )
    result, cpu, elapsed = cpu_during(roots, "loadgen", lambda: run_load(settings))
    report = result.report
    accepted = max(report.accepted, 1)
    return {
        "offered_per_s": rate,
        "accepted": report.accepted,
        "accepted_per_s": report.accepted_per_s,
        "failed": report.sent - report.accepted,
        "accept_latency_ms": report.accept_latency_ms,
        "cpu_us_per_request": {name: seconds / accepted * 1e6 for name, seconds in cpu.items()},
        # Wall time includes waiting for the last answers: a slight underestimate of the
        # cores busy while sending, the same for every rate.
        "cores_busy": sum(cpu.values()) / elapsed,
    }


def highest_within(rows: list[dict], target_ms: float) -> float | None:
    """The highest offered rate, below which every rate kept p99 within the target."""
    best = None
    for row in sorted(rows, key=lambda r: r["offered_per_s"]):
        p99 = row["accept_latency_ms"].get("p99")
        if p99 is None or p99 > target_ms or row["failed"]:
            break
        best = row["offered_per_s"]
    return best


def _plot(rows: list[dict], target_ms: float, path: Path) -> None:
    rates = [r["offered_per_s"] for r in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for key, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^")):
        top.plot(
            rates, [r["accept_latency_ms"].get(key) for r in rows], style, label=key, markersize=4
        )
    top.axhline(
        target_ms, color="red", linestyle="--", linewidth=1, label=f"target p99 {target_ms:g} ms"
    )
    top.set_yscale("log")
    top.set_ylabel("accept latency (ms)")
    top.legend(fontsize=8)
    top.set_title("POST /charge accept latency against offered load (loadgen, same host)")
    names = [n for n in PROCESS_ORDER if n in rows[0]["cpu_us_per_request"]]
    bottom.stackplot(
        rates, *[[r["cpu_us_per_request"][n] / 1000 for r in rows] for n in names], labels=names
    )
    bottom.set_ylabel("CPU per request (ms)")
    bottom.set_xlabel("offered requests/s")
    cores = bottom.twinx()
    cores.plot(rates, [r["cores_busy"] for r in rows], "k--", label="cores busy (right axis)")
    cores.set_ylim(0, os.cpu_count() or 2)
    cores.set_ylabel("cores busy")
    handles, labels = bottom.get_legend_handles_labels()
    extra_handles, extra_labels = cores.get_legend_handles_labels()
    bottom.legend(handles + extra_handles, labels + extra_labels, fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def sweep(
    server: str,
    rates: list[float],
    duration: float,
    revision: tuple[str, dict[str, str]] | None = None,
    broker: Broker | None = None,
) -> list[dict]:
    """One stack (from ``revision``, on ``broker``), driven at each rate in turn."""
    rows = []
    with broker.vhost() if broker else private_vhost("bench-latency") as url:
        settings = bench_settings(
            url,
            Path(tempfile.mkdtemp(prefix="smartgrid-latency-")),
            capacity=CAPACITY,
            session_seconds=SESSION_SECONDS,
            poll_interval=1.0,
            gateway_module=GATEWAY_SERVERS[server],
            extra_env=revision[1] if revision else {},
        )
        group = start_stack(settings)
        try:
            roots = service_roots(group, broker.pids if broker else None)
            for rate in rates:
                time.sleep(2)  # what the previous rate left in flight settles first
                load = os.getloadavg()[0]
                row = measure_rate(settings.gateway_url, roots, rate, duration)
                row["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                rows.append(row)
                latency = row["accept_latency_ms"]
                print(
                    f"{revision[0] + ': ' if revision else ''}"
                    f"{rate:,.0f}/s offered: {row['accepted_per_s'] or 0:,.0f}/s accepted, "
                    f"p50 {latency.get('p50') or 0:,.1f} ms, "
                    f"p99 {latency.get('p99') or 0:,.1f} ms, "
                    f"{sum(row['cpu_us_per_request'].values()) / 1000:.2f} ms CPU per request, "
                    f"{row['cores_busy']:.2f} cores busy (load average {load:.1f})",
                    flush=True,
                )
        finally:
            group.stop()
    return rows


def compare_revisions(args: argparse.Namespace, rates: list[float]) -> None:
    """Sweeps of each revision, interleaved; the medians of each rate's p99 and CPU."""
    revisions = [source_tree(rev) for rev in args.revs.split(",") if rev]
    sweeps: list[dict] = []
    with contextlib.ExitStack() as stack:
        broker = None
        if args.broker != "shared":
            broker = Broker(args.broker)
            stack.callback(broker.stop)
        for _ in range(args.rounds):
            for revision in revisions:
                rows = sweep(args.server, rates, args.duration, revision, broker)
                sweeps.append({"revision": revision[0], "broker": args.broker, "rates": rows})
    table = []
    for label, _ in revisions:
        for rate in rates:
            rows = [
                r
                for s in sweeps
                if s["revision"] == label
                for r in s["rates"]
                if r["offered_per_s"] == rate
            ]
            p99 = [r["accept_latency_ms"].get("p99") or 0 for r in rows]
            cpu = [sum(r["cpu_us_per_request"].values()) / 1000 for r in rows]
            table.append(
                [
                    label,
                    f"{rate:,.0f}",
                    f"{statistics.median(r['accepted_per_s'] or 0 for r in rows):,.0f}",
                    f"{statistics.median(p99):,.1f} ({min(p99):,.0f}–{max(p99):,.0f})",
                    f"{statistics.median(cpu):.2f} ({min(cpu):.2f}–{max(cpu):.2f})",
                ]
            )
    print()
    print(
        markdown_table(
            ["revision", "offered/s", "accepted/s", "p99 ms (range)", "CPU ms per request"],
            table,
        )
    )
    path = save(args.name, {"duration_per_rate": args.duration, "sweeps": sweeps})
    print(f"written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rates", default=DEFAULT_RATES, help="offered requests/s, comma-separated, in order"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per rate")
    parser.add_argument(
        "--target-ms", type=float, default=50.0, help="the p99 accept latency to stay within"
    )
    parser.add_argument(
        "--server",
        choices=sorted(GATEWAY_SERVERS),
        default="granian",
        help="the HTTP server to put the gateway under",
    )
    parser.add_argument(
        "--revs", default="", help="git revisions to run the services from, in turn"
    )
    parser.add_argument("--rounds", type=int, default=1, help="sweeps of each revision")
    parser.add_argument(
        "--broker", default="shared", help="shared, private or private:<Erlang VM arguments>"
    )
    parser.add_argument("--name", default="latency-revs", help="results file with --revs")
    args = parser.parse_args()
    name = "latency" if args.server == "granian" else f"latency-{args.server}"
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not rates or min(rates) <= 0:
        parser.error("--rates must be positive")

    if args.revs:
        compare_revisions(args, rates)
        return
    rows = sweep(args.server, rates, args.duration)
    best = highest_within(rows, args.target_ms)
    plot = RESULTS / f"{name}.png"
    _plot(rows, args.target_ms, plot)
    path = save(
        name,
        {
            "server": args.server,
            "duration_per_rate": args.duration,
            "target_p99_ms": args.target_ms,
            "highest_rate_within_target": best,
            "rates": rows,
        },
    )
    names = [n for n in PROCESS_ORDER if n in rows[0]["cpu_us_per_request"]]
    table = [
        [
            f"{r['offered_per_s']:,.0f}",
            f"{r['accepted_per_s'] or 0:,.0f}",
            *(f"{r['accept_latency_ms'].get(k) or 0:,.1f}" for k in ("p50", "p95", "p99")),
            *(f"{r['cpu_us_per_request'][n]:,.0f}" for n in names),
            f"{sum(r['cpu_us_per_request'].values()):,.0f}",
            f"{r['cores_busy']:.2f}",
        ]
        for r in rows
    ]
    headers = [
        "offered/s",
        "accepted/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        *(f"{n} µs" for n in names),
        "total µs",
        "cores busy",
    ]
    print()
    print(markdown_table(headers, table))
    print(
        f"\nhighest rate with p99 ≤ {args.target_ms:g} ms: "
        f"{f'{best:,.0f}/s' if best else 'none of those run'}"
    )
    print(f"written to {path} and {plot}")


if __name__ == "__main__":
    main()
