"""Scale: the throughput runs with 3, 10 and 30 substations.

For each fleet size: the balancer alone draining a pre-filled pending queue (its routing
throughput), an end-to-end run at a fixed rate, the balancer's decision latency (p99 of
``balancer_decision_seconds``, a bucket bound) and its resident memory.

The balancer-alone drains are repeated in rounds, each round every size in turn, and the
median per size is reported with the range: the development machine's speed drifts by up to
a factor of two over minutes, which a single short drain per size mistakes for an effect of size.

    .venv/bin/python -m bench.scale [--sizes 3,10,30] [--rounds 3] [--rate 500] [--duration 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.common import markdown_table, save
from bench.throughput import balancer_drain, end_to_end


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="3,10,30")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="balancer-alone drains per size, interleaved"
    )
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="smartgrid-scale-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    drains: dict[int, list[dict]] = {size: [] for size in sizes}
    for round_number in range(1, args.rounds + 1):
        for size in sizes:
            drain = balancer_drain(args.backlog, size, log_dir)
            drains[size].append(drain)
            print(
                f"round {round_number}, {size:>3} substations: balancer alone "
                f"{drain['routed_per_s']:,.0f} routed/s",
                flush=True,
            )
    rows: list[dict[str, Any]] = []
    for size in sizes:
        runs = sorted(drains[size], key=lambda d: d["routed_per_s"])
        drain = {**runs[len(runs) // 2], "rounds": [d["routed_per_s"] for d in drains[size]]}
        e2e = end_to_end(args.rate, args.duration, size, log_dir)
        rows.append({"substations": size, "balancer_alone": drain, "end_to_end": e2e})
        print(
            f"{size:>3} substations: "
            f"balancer alone {drain['routed_per_s']:,.0f} routed/s (median), "
            f"end to end {e2e['accepted_per_s']:,.0f} accepted/s, "
            f"decision p99 <= {drain['decision_p99_s']} s, "
            f"balancer RSS {drain['balancer_rss_mb']:.0f} MB",
            flush=True,
        )
    save(
        "scale", {"rate": args.rate, "duration": args.duration, "rounds": args.rounds, "rows": rows}
    )
    base = rows[0]["balancer_alone"]["routed_per_s"]
    print()
    print(
        markdown_table(
            [
                "substations",
                "balancer alone (routed/s, median)",
                "range",
                "vs first",
                "end to end (accepted/s)",
                "accept p99 (ms)",
                "decision p99 (s, bucket)",
                "balancer RSS (MB)",
            ],
            [
                [
                    r["substations"],
                    r["balancer_alone"]["routed_per_s"],
                    f"{min(r['balancer_alone']['rounds']):,.0f}–{max(r['balancer_alone']['rounds']):,.0f}",
                    f"{r['balancer_alone']['routed_per_s'] / base:.0%}",
                    r["end_to_end"]["accepted_per_s"],
                    r["end_to_end"]["accept_latency_ms"]["p99"],
                    r["balancer_alone"]["decision_p99_s"],
                    r["balancer_alone"]["balancer_rss_mb"],
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
