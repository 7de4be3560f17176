"""Where the CPU goes: CPU time per request of every process of the stack, under steady load.

Starts the throughput benchmark's stack (50 ms sessions, 5,000-point substations), sends
``--rate`` requests/s for ``--duration`` seconds, and divides each process's CPU time over that
window (``/proc/<pid>/stat``: user + system, children of a service counted with it, so the
gateway's worker processes are the gateway's) by the requests accepted. RabbitMQ is the local
broker's ``beam.smp``; the load generator is this process (loadgen) or a ``wrk`` child
(``--client wrk``, a C client whose own cost stays small, posting as fast as ``--connections``
allow, each request for an EV of its own; ``make bench-tools`` installs it). Only requests
answered 2xx (202: accepted) count.

    .venv/bin/python -m bench.cpu [--rate 400] [--duration 20] [--client loadgen|wrk]
    .venv/bin/python -m bench.cpu --client wrk --servers gunicorn,granian --rounds 2
    .venv/bin/python -m bench.cpu --client wrk --revs main,HEAD --rounds 3
    .venv/bin/python -m bench.cpu --client wrk --revs aeffa06:BALANCER_STRATEGY=corrected-min,main

``--servers`` puts the gateway under each HTTP server in turn (the same app, settings and
broker; ``gunicorn`` is the previous server, bench/gunicorn_gateway.py); ``--revs`` runs the
stack's services from each git revision in turn (``bench.common.source_tree``; ``rev:NAME=VALUE``
sets a variable for that revision's services alone), so a change is measured against its
baseline in the same run. Every side is measured ``--rounds`` times,
interleaved, since this machine's speed drifts within minutes and other work shares it; the
summary gives each side's median and range, and its ratio to the first side's median.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from bench.common import (
    GATEWAY_SERVERS,
    bench_settings,
    markdown_table,
    private_vhost,
    save,
    scrape,
    source_tree,
    total,
)
from bench.throughput import CAPACITY, SESSION_SECONDS
from loadgen.run import LoadSettings, run_load
from stack.local import start_stack

T = TypeVar("T")
#: The stack's own processes (not the broker, not the client).
SERVICES = ("gateway", "balancer", "substations")
TICKS = os.sysconf("SC_CLK_TCK")
#: wrk's script: a POST per request, each for an EV of its own (one EV's requests would be
#: refused ev_busy while its first one is active, since issue 14, and measure 409s instead).
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local prefix = "{prefix}-"
local sent = 0
request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, '{{"ev_id": "' .. prefix .. sent .. '"}}')
end
"""


def _processes() -> dict[int, tuple[int, float]]:
    """Every process: pid -> (parent pid, CPU seconds so far)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        found[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def _beam_pids() -> set[int]:
    pids = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/comm") as comm:
                if comm.read().strip() == "beam.smp":
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


def service_roots(group, broker_pids: list[int] | None = None) -> dict[str, list[int]]:
    """The processes whose CPU is counted, by service: the broker's beam.smp (``broker_pids``,
    or every one on the machine) and each stack service's own process (its children are
    found under it when counting)."""
    roots: dict[str, list[int]] = {"rabbitmq": broker_pids or sorted(_beam_pids())}
    for service in group.services:
        # By name: the gateway is "gateway" under any HTTP server (bench.gunicorn_gateway too).
        kind = "substations" if service.module == "substation" else service.name
        roots.setdefault(kind, []).append(service.pid)
    return roots


def cpu_by_service(roots: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds of each service: its processes and all their descendants."""
    processes = _processes()
    owner: dict[int, str] = {pid: name for name, pids in roots.items() for pid in pids}
    totals = dict.fromkeys(roots, 0.0)
    for pid, (_parent, cpu) in processes.items():
        seen, walk = [], pid
        while walk not in owner and walk in processes and walk > 1 and walk not in seen:
            seen.append(walk)
            walk = processes[walk][0]
        if walk in owner:
            totals[owner[walk]] += cpu
    return totals


def measure(
    rate: float,
    duration: float,
    client: str,
    connections: int,
    log_dir: Path,
    server: str = "granian",
    revision: tuple[str, dict[str, str]] | None = None,
    broker: Broker | None = None,
    syscalls: bool = False,
    gateway_workers: int | None = None,
    session_seconds: float = SESSION_SECONDS,
) -> dict:
    load_before = os.getloadavg()
    counted: dict[str, dict[str, float]] = {}
    with broker.vhost() if broker else private_vhost("bench-cpu") as url:
        settings = bench_settings(
            url,
            log_dir,
            capacity=CAPACITY,
            session_seconds=session_seconds,
            poll_interval=1.0,
            gateway_module=GATEWAY_SERVERS[server],
            extra_env=revision[1] if revision else {},
        )
        if gateway_workers is not None:
            settings.gateway_workers = gateway_workers
        group = start_stack(settings)
        try:
            roots = service_roots(group, broker.pids if broker else None)
            time.sleep(2)
            routed_before = _routed(settings)
            with count_syscalls(roots, log_dir, counted) if syscalls else contextlib.nullcontext():
                accepted, cpu, elapsed = cpu_during(
                    roots,
                    client,
                    lambda: _drive(
                        client, settings.gateway_url, rate, duration, connections, log_dir
                    ),
                )
            # A service that falls behind leaves work for after the window (the balancer
            # routing a backlog): the CPU per accepted request is then the others' share.
            routed = _routed(settings) - routed_before
        finally:
            group.stop()
    return {
        "server": server,
        "revision": revision[0] if revision else None,
        "broker": broker.spec if broker else "shared",
        "gateway_workers": settings.gateway_workers,
        "session_seconds": session_seconds,
        # The machine is shared: other work's load, at the start and at the end.
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "client": client,
        "rate": rate if client == "loadgen" else None,
        "connections": connections if client == "wrk" else None,
        "duration": elapsed,
        "accepted": accepted,
        "accepted_per_s": accepted / elapsed,
        "routed": routed,
        "routed_per_s": routed / elapsed,
        "cpu_seconds": cpu,
        "cpu_us_per_request": {name: seconds / accepted * 1e6 for name, seconds in cpu.items()},
        # perf's counts (--syscalls): system calls and context switches per request.
        "per_request": {
            name: {event: n / accepted for event, n in counts.items()}
            for name, counts in counted.items()
        },
    }


def _routed(settings) -> float:
    """Requests the balancer has forwarded, confirmed, so far."""
    page = scrape(f"http://{settings.host}:{settings.balancer_port}/metrics")
    return total(page, "balancer_routed_requests_total")


PERF_EVENTS = ("raw_syscalls:sys_enter", "context-switches")


@contextlib.contextmanager
def count_syscalls(
    roots: dict[str, list[int]], log_dir: Path, counted: dict[str, dict[str, float]]
) -> Iterator[None]:
    """Count each service's system calls and context switches meanwhile (``perf stat``, its
    processes and their children as they are now, every thread); into ``counted``."""
    processes = _processes()
    runs = {}
    for name, pids in roots.items():
        family = set(pids)
        for pid in processes:  # descendants, e.g. the gateway's workers
            walk = pid
            while walk in processes and walk > 1 and walk not in family:
                walk = processes[walk][0]
            if walk in family:
                family.add(pid)
        output = log_dir / f"perf-{name}.csv"
        runs[name] = (
            subprocess.Popen(
                ["perf", "stat", "-x", ",", "-o", str(output), "-e", ",".join(PERF_EVENTS)]
                + ["-p", ",".join(map(str, sorted(family)))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            output,
        )
    try:
        yield
    finally:
        for name, (process, output) in runs.items():
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
            counts = {}
            for line in output.read_text().splitlines():
                fields = line.split(",")
                if len(fields) > 2 and fields[2] in PERF_EVENTS and fields[0].isdigit():
                    counts[fields[2]] = float(fields[0])
            counted[name] = counts


def cpu_during(
    roots: dict[str, list[int]], client: str, work: Callable[[], T]
) -> tuple[T, dict[str, float], float]:
    """Run ``work`` (which drives the load); return what it returned, the CPU seconds each
    service of ``roots`` and the load generator (``client``) spent meanwhile, and the wall time."""
    before, client_before = cpu_by_service(roots), own_cpu(client)
    started = time.monotonic()
    result = work()
    elapsed = time.monotonic() - started
    after, client_after = cpu_by_service(roots), own_cpu(client)
    cpu = {name: after[name] - before[name] for name in roots}
    cpu[f"load generator ({client})"] = client_after - client_before
    return result, cpu, elapsed


def own_cpu(client: str) -> float:
    who = resource.RUSAGE_SELF if client == "loadgen" else resource.RUSAGE_CHILDREN
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _drive(
    client: str, gateway_url: str, rate: float, duration: float, connections: int, log_dir: Path
) -> int:
    if client == "loadgen":
        result = run_load(
            LoadSettings(
                gateway_url=gateway_url,
                amqp_url=None,
                interval=1 / rate,
                duration=duration,
                concurrency=512,
                timeout=10,
            )
        )
        return result.report.accepted
    script = log_dir / "post.lua"
    script.write_text(WRK_SCRIPT.format(prefix=f"W{uuid.uuid4().hex[:8]}"))
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:.0f}s",
            "-s",
            str(script),
            f"{gateway_url}/charge",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return wrk_accepted(out)


def wrk_accepted(out: str) -> int:
    """The requests wrk got a 2xx (202) for: its count, less its non-2xx or 3xx answers."""
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return int(found.group(1)) - (int(refused.group(1)) if refused else 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rate", type=float, default=400.0, help="requests/s sent by loadgen")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--client", choices=("loadgen", "wrk"), default="loadgen")
    parser.add_argument("--connections", type=int, default=64, help="wrk's connections")
    parser.add_argument(
        "--servers",
        default="granian",
        help=f"HTTP servers to put the gateway under, in turn: {', '.join(GATEWAY_SERVERS)}",
    )
    parser.add_argument(
        "--revs",
        default="",
        help="git revisions to run the services from, in turn (default: this checkout)",
    )
    parser.add_argument(
        "--brokers",
        default="shared",
        help="brokers to run on, in turn: shared (the machine's), private (a node of the "
        "run's own), private:<Erlang VM arguments> (e.g. 'private:+sbwt none')",
    )
    parser.add_argument(
        "--gateway-workers",
        default="",
        help="the gateway's worker processes, in turn (default: GATEWAY_WORKERS' default); "
        "each worker reads the whole history stream",
    )
    parser.add_argument("--rounds", type=int, default=1, help="times to measure each side")
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="also count each service's system calls and context switches (perf stat)",
    )
    parser.add_argument(
        "--session-seconds",
        type=float,
        default=SESSION_SECONDS,
        help=f"each session's length (default {SESSION_SECONDS:g}): longer ones keep more "
        "sessions running, which the balancer and substations track",
    )
    parser.add_argument(
        "--name", default="cpu", help="results file: docs/bench/<name>.json (default cpu)"
    )
    args = parser.parse_args()
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("wrk is not installed (make bench-tools)")
    servers = args.servers.split(",")
    unknown = set(servers) - set(GATEWAY_SERVERS)
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    revisions: list[tuple[str, dict[str, str]] | None] = [
        source_tree(rev) for rev in args.revs.split(",") if rev
    ] or [None]
    worker_counts: list[int | None] = [int(n) for n in args.gateway_workers.split(",") if n] or [
        None
    ]
    # A stop (SIGTERM) unwinds like an error, so that the private nodes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    specs = args.brokers.split(",")
    if any(spec != "shared" and spec.partition(":")[0] != "private" for spec in specs):
        parser.error("--brokers takes shared, private and private:<arguments>")
    brokers: list[Broker | None] = []
    results = []
    try:
        for spec in specs:
            brokers.append(None if spec == "shared" else Broker(spec))
        for _ in range(args.rounds):
            for server, revision, broker, workers in itertools.product(
                servers, revisions, brokers, worker_counts
            ):
                log_dir = Path(tempfile.mkdtemp(prefix=f"smartgrid-cpu-{server}-"))
                result = measure(
                    args.rate,
                    args.duration,
                    args.client,
                    args.connections,
                    log_dir,
                    server,
                    revision,
                    broker,
                    args.syscalls,
                    workers,
                    args.session_seconds,
                )
                results.append(result)
                report(result)
    finally:
        for broker in brokers:
            if broker is not None:
                broker.stop()
    if len(results) > 1:
        print("\n" + summary(results))
    save(args.name, results[0] if len(results) == 1 else {"runs": results})


def _figure(value: float) -> str:
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def side(result: dict) -> str:
    broker = result.get("broker", "shared")
    workers = result.get("gateway_workers")
    return " ".join(
        filter(
            None,
            (
                result["server"],
                result.get("revision"),
                None if broker == "shared" else broker,
                None if workers is None else f"{workers} worker{'s' if workers != 1 else ''}",
            ),
        )
    )


class Broker:
    """A RabbitMQ node of the benchmark's own (``private``, or ``private:<Erlang VM
    arguments>``), booted once for the whole run: its CPU is the run's alone, where the
    machine's shared broker also serves whatever else runs (other vhosts' test suites)."""

    def __init__(self, spec: str, plugins: tuple[str, ...] = ()) -> None:
        # The tests' throw-away nodes (tests/cluster.py; imported by name: the tests are not
        # type-checked). No plugin by default: the management plugin's statistics cost CPU
        # (bench.message_audit enables it to read the broker's counters).
        cluster = importlib.import_module("tests.cluster")
        self.spec = spec
        self.cluster = cluster.RabbitCluster(1, plugins=plugins, erl_args=spec.partition(":")[2])
        self.cluster.start()

    @property
    def pids(self) -> list[int]:
        pid = self.cluster.nodes[0].os_pid
        assert pid is not None
        return [pid]

    @contextlib.contextmanager
    def vhost(self) -> Iterator[str]:
        name = f"bench-cpu-{uuid.uuid4().hex[:8]}"
        url = self.cluster.add_vhost(name)[0]
        try:
            yield url
        finally:
            self.cluster.ctl(self.cluster.nodes[0], "delete_vhost", name)

    def stop(self) -> None:
        self.cluster.stop()


def summary(results: list[dict]) -> str:
    """Per side: median and range of requests/s, of each process's and the total CPU per
    request, and the medians' ratio to the first side's."""
    sides: dict[str, list[dict]] = {}
    for result in results:
        sides.setdefault(side(result), []).append(result)
    names = sorted(
        results[0]["cpu_us_per_request"], key=lambda n: -results[0]["cpu_us_per_request"][n]
    )

    def figures(runs: list[dict]) -> dict[str, list[float]]:
        found = {"requests/s": [r["accepted_per_s"] for r in runs]}
        if all("routed_per_s" in r for r in runs):
            found["routed/s"] = [r["routed_per_s"] for r in runs]
        for name in names:
            found[f"{name} µs"] = [r["cpu_us_per_request"][name] for r in runs]
        # The broker may serve other work on a shared machine (other vhosts' tests): the
        # services' own sum is the figure that only this run can move.
        found["services µs"] = [
            sum(v for k, v in r["cpu_us_per_request"].items() if k in SERVICES) for r in runs
        ]
        found["total µs"] = [sum(r["cpu_us_per_request"].values()) for r in runs]
        for name in names:
            for event in PERF_EVENTS:
                values = [r.get("per_request", {}).get(name, {}).get(event) for r in runs]
                if all(v is not None for v in values):
                    found[f"{name} {event.split(':')[-1]}"] = values
        return found

    baseline = {k: statistics.median(v) for k, v in figures(next(iter(sides.values()))).items()}
    rows = []
    for name, runs in sides.items():
        for key, values in figures(runs).items():
            median = statistics.median(values)
            rows.append(
                [
                    name,
                    key,
                    _figure(median),
                    f"{_figure(min(values))}–{_figure(max(values))}",
                    f"×{median / baseline[key]:.2f}" if baseline[key] else "",
                ]
            )
    loads = [a for r in results for a in r["load_average"]]
    return (
        markdown_table(["side", "figure", "median", "range", "vs first side"], rows)
        + f"\nload average during the run: {min(loads):.1f}–{max(loads):.1f}"
    )


def report(result: dict) -> None:
    per_request = result["cpu_us_per_request"]
    print(
        f"\n{side(result)}: {result['accepted']:,} requests accepted, "
        f"{result['accepted_per_s']:,.0f}/s, {result['routed_per_s']:,.0f}/s routed meanwhile "
        f"(load average {result['load_average'][0]:.1f}, "
        f"then {result['load_average'][1]:.1f})\n"
    )
    rows = [
        [name, result["cpu_seconds"][name], f"{us:,.0f}"]
        for name, us in sorted(per_request.items(), key=lambda kv: -kv[1])
    ]
    rows.append(["total", sum(result["cpu_seconds"].values()), f"{sum(per_request.values()):,.0f}"])
    print(markdown_table(["process", "CPU (s)", "CPU per request (µs)"], rows), flush=True)


if __name__ == "__main__":
    main()
