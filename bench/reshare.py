"""A substation's power sharing alone: CPU per session start and end against the sessions running.

No broker, no other process: substation/sharing.py's PowerSharing driven as the substation
service drives it, for each new session ``add`` and ``reshare``, then the oldest session's
``remove`` and ``reshare``, with ``--running`` sessions running meanwhile, under the default
limit (every point at a car's maximum: it never binds, as in a count-only deployment); with
``--report-every N``, also the ``power.demand`` report (``report`` and the event made of it, as
the service publishes it) after every N of them. What
bench.cpu cannot separate from the rest of the stack on a shared machine, this measures alone:
the same work, one process, best of ``--repeat``.

    .venv/bin/python -m bench.reshare --revs a2bd13f,HEAD --running 10,100,1000 \\
        --name issue16/reshare-start-end

``--revs`` imports the substation of each git revision in turn (bench.common.source_tree); the
driver is this file's, run by path in a child process, so it is the same for every revision.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _measure(running: int, sessions: int, report_every: int) -> dict[str, float]:
    """In the child: microseconds per session started and ended, ``running`` running (its
    share of the reports included), and per report."""
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
    now = 0.0
    for n in range(running):
        now += 1e-4
        sharing.add(f"warm-{n}", car, now)
        sharing.reshare(now)
    oldest = [f"warm-{n}" for n in range(running)]
    reporting = 0.0
    reports = 0
    began = time.perf_counter()
    for n in range(sessions):
        now += 1e-3
        sharing.add(f"r{n}", car, now)
        sharing.reshare(now)
        oldest.append(f"r{n}")
        sharing.remove(oldest.pop(0), now)
        sharing.reshare(now)
        if report_every and n % report_every == 0:
            report_began = time.perf_counter()
            report, limit_in_force_w, power_w = sharing.report(now)
            report_to_event(
                report, instance="i1", limit_in_force_w=limit_in_force_w, power_w=power_w
            )
            reporting += time.perf_counter() - report_began
            reports += 1
    return {
        "us_per_session": (time.perf_counter() - began) / sessions * 1e6,
        "us_per_report": reporting / reports * 1e6 if reports else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reshare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--revs", default="", help="git revisions, in turn (default: this one)")
    parser.add_argument("--running", default="10,100,1000", help="sessions running")
    parser.add_argument("--sessions", type=int, default=5000, help="sessions started and ended")
    parser.add_argument(
        "--report-every", type=int, default=0, help="a report after every this many (0: none)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--name", default="", help="results file: docs/bench/<name>.json")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # the child: one measurement, as JSON
        print(json.dumps(_measure(args.measure, args.sessions, args.report_every)))
        return

    from bench.common import best_in_children, markdown_table, save

    results = best_in_children(
        __file__,
        args.revs,
        args.running,
        args.repeat,
        "--sessions",
        str(args.sessions),
        "--report-every",
        str(args.report_every),
    )
    header = ["revision", "sessions running", "µs per start and end"]
    rows = [[r["revision"], r["running"], f"{r['us_per_session']:,.1f}"] for r in results]
    if args.report_every:
        header.append(f"µs per report (one per {args.report_every})")
        for row, r in zip(rows, results, strict=True):
            row.append(f"{r['us_per_report']:,.1f}")
    print(markdown_table(header, rows))
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.name:
        save(args.name, {"runs": results})


if __name__ == "__main__":
    main()
