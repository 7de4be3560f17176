"""A substation's ``power.demand`` report alone: CPU to make one and to decode one, against the
sessions running.

A report carries every running session's minimum and maximum, so with long sessions it is the
largest message of the stack: each substation makes one up to ten times a second, and each
balancer decodes each one (for its power view and its allocator). No broker, no other process:
``PowerSharing.report``, ``report_to_event`` and the body as the substation makes them, then
``contract.decode_events`` of the body as a balancer's consumer does, one process, best of
``--repeat``.

    .venv/bin/python -m bench.power_report --revs main,HEAD --running 50,500,1650 \\
        --name issue16/power-report

``--revs`` imports the code of each git revision in turn (bench.common.source_tree); the driver
is this file's, run by path in a child process, so it is the same for every revision.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _measure(running: int, reports: int) -> dict[str, float]:
    """In the child: microseconds to make a report and to decode it, ``running`` running."""
    from smartgrid import contract
    from smartgrid.leases import report_to_event
    from smartgrid.power import Priority, watts
    from smartgrid.power_request import PowerFields
    from substation.sharing import PowerSharing, default_limit_kw

    car = PowerFields(max_kw=11.0, min_kw=1.4, priority=Priority.STANDARD)
    sharing = PowerSharing(
        "s1",
        limit_w=watts(default_limit_kw(running + 1)),
        failsafe_w=0,
        parent=None,
        session_seconds=5.0,
        hour_seconds=3600.0,
        started_at=0.0,
        skew_seconds=0.5,
    )
    for n in range(running):
        sharing.add(f"r{n}", car, 1.0)
    sharing.reshare(1.0)

    def make(at: float) -> bytes:
        report, limit_in_force_w, power_w = sharing.report(at)
        event = report_to_event(
            report, instance="i1", limit_in_force_w=limit_in_force_w, power_w=power_w
        )
        return event.to_body()

    began = time.perf_counter()
    bodies = [make(2.0 + n) for n in range(reports)]
    made = time.perf_counter() - began
    began = time.perf_counter()
    for body in bodies:
        contract.decode_events(contract.PowerDemand.kind, body)
    decoded = time.perf_counter() - began
    return {
        "bytes": len(bodies[0]),
        "us_to_make": made / reports * 1e6,
        "us_to_decode": decoded / reports * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.power_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--revs", default="", help="git revisions, in turn (default: this one)")
    parser.add_argument("--running", default="50,500,1650", help="sessions running")
    parser.add_argument("--reports", type=int, default=200, help="reports made and decoded")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    parser.add_argument("--name", default="", help="results file: docs/bench/<name>.json")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # the child: one measurement, as JSON
        print(json.dumps(_measure(args.measure, args.reports)))
        return

    from bench.common import best_in_children, markdown_table, save

    results = best_in_children(
        __file__, args.revs, args.running, args.repeat, "--reports", str(args.reports)
    )
    rows = [
        [
            r["revision"],
            r["running"],
            f"{r['bytes']:,}",
            f"{r['us_to_make']:,.0f}",
            f"{r['us_to_decode']:,.0f}",
        ]
        for r in results
    ]
    print(
        markdown_table(
            ["revision", "sessions running", "body bytes", "µs to make", "µs to decode"], rows
        )
    )
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.name:
        save(args.name, {"runs": results})


if __name__ == "__main__":
    main()
