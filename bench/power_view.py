"""The balancer's power-min routing on its own: CPU per request against the sessions running.

No broker, no other process: the balancer's power view (balancer/power_fleet.py) and its
decision (balancer/power_routing.py) driven as the service drives them, for each request a
decision, its route, its session's start and an older session's end, and a substation's
``power.demand`` report every ``--report-every`` requests (3 substations, each reporting 10
times a second at 1,000 requests/s: one report per 33 requests). Sessions running per
substation: ``--running``. What bench.cpu cannot separate from the rest of the stack on a
shared machine, this measures alone: the same work, one process, best of ``--repeat``.

    .venv/bin/python -m bench.power_view --revs cd3c941,HEAD --running 50,500,2000

``--revs`` imports the balancer of each git revision in turn (bench.common.source_tree); the
driver is this file's, run by path in a child process, so it is the same for every revision.
"""

from __future__ import annotations

import argparse
import json
import os
import time

SUBSTATIONS = ("s1", "s2", "s3")


def _measure(running: int, requests: int, report_every: int) -> dict[str, float]:
    """In the child: microseconds per request (decision, route, start, end, its share of the
    reports) and per report, with ``running`` sessions on each substation."""
    import random

    from balancer.power_fleet import PowerView, need_of
    from balancer.power_routing import power_min
    from balancer.strategies import Candidate
    from smartgrid import contract
    from smartgrid.grid import Topology
    from smartgrid.power import Priority
    from smartgrid.power_request import PowerFields

    car = PowerFields(max_kw=11.0, min_kw=1.4, priority=Priority.STANDARD)
    clock = [0.0]  # the substations' clock and the balancer's alike
    view = PowerView(Topology(), wall_clock=lambda: clock[0])
    running_at: dict[str, list[tuple[str, float]]] = {s: [] for s in SUBSTATIONS}

    def report(substation: str) -> None:
        sessions = running_at[substation]
        view.apply(
            contract.PowerDemand(
                at=clock[0],
                substation=substation,
                instance="i",
                limit_kw=1e6,
                failsafe_kw=0.0,
                limit_in_force_kw=1e6,
                power_kw=11.0 * len(sessions),
                sessions_standard=len(sessions),
                floor_kw_standard=1.4 * len(sessions),
                want_kw_standard=11.0 * len(sessions),
            )
        )

    def start(substation: str, request_id: str) -> None:
        view.routed(substation, request_id, car)
        view.apply(
            contract.SessionStarted(
                at=clock[0],
                request_id=request_id,
                ev_id="EV1",
                substation=substation,
                instance="i",
                accepted_at=clock[0],
                expected_end=clock[0] + 5,
                max_kw=car.max_kw,
                min_kw=car.min_kw,
                priority=car.priority.value,
                power_kw=car.max_kw,
            )
        )
        running_at[substation].append((request_id, clock[0]))

    def end_oldest(substation: str) -> None:
        request_id, started_at = running_at[substation].pop(0)
        view.apply(
            contract.SessionCompleted(
                at=clock[0],
                request_id=request_id,
                ev_id="EV1",
                substation=substation,
                instance="i",
                started_at=started_at,
            )
        )

    for substation in SUBSTATIONS:
        for n in range(running):
            clock[0] += 1e-4
            start(substation, f"{substation}-{n}")
        report(substation)
    candidates = [
        Candidate(s, 10 * running + 1000, float(running), float(running)) for s in SUBSTATIONS
    ]
    rng = random.Random(1)
    need = need_of(car)
    reports = 0
    report_seconds = 0.0
    began = time.perf_counter()
    for n in range(requests):
        clock[0] += 1e-3
        choice = power_min(candidates, view.grid(candidates), need, rng)
        assert choice is not None
        start(choice.substation, f"r{n}")
        end_oldest(choice.substation)
        if n % report_every == 0:
            substation = SUBSTATIONS[reports % len(SUBSTATIONS)]
            reports += 1
            at = time.perf_counter()
            report(substation)
            report_seconds += time.perf_counter() - at
    total = time.perf_counter() - began
    return {
        "us_per_request": total / requests * 1e6,
        "us_per_report": report_seconds / reports * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.power_view", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--revs", default="", help="git revisions, in turn (default: this one)")
    parser.add_argument("--running", default="50,500,2000", help="sessions per substation")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--report-every", type=int, default=33)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--name", default="", help="results file: docs/bench/<name>.json")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # the child: one measurement, as JSON
        print(json.dumps(_measure(args.measure, args.requests, args.report_every)))
        return

    from bench.common import best_in_children, markdown_table, save

    results = best_in_children(
        __file__,
        args.revs,
        args.running,
        args.repeat,
        "--requests",
        str(args.requests),
        "--report-every",
        str(args.report_every),
    )
    rows = [
        [r["revision"], r["running"], f"{r['us_per_request']:,.1f}", f"{r['us_per_report']:,.0f}"]
        for r in results
    ]
    print(
        markdown_table(
            ["revision", "sessions per substation", "µs per request", "µs per report"], rows
        )
    )
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.name:
        save(args.name, {"runs": results})


if __name__ == "__main__":
    main()
