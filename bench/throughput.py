"""Throughput: the pipeline itself as the bottleneck, against the broker's own limit.

Sessions are short (50 ms) and substations large (5,000 points), so nothing ever waits for a
charging point: what is measured is gateway -> broker -> balancer -> broker -> substation.

1. The broker's raw limit here (pika, persistent + confirms to a quorum queue; acks).
2. End to end: loadgen sends at a constant rate for ``--duration`` seconds; reported: accepted
   requests/s at the gateway, routed/s at the balancer, accept latency percentiles (loadgen),
   accept -> session start percentiles (the substations' histograms), and requests lost
   (accepted minus completed).
3. The balancer alone: a pending queue pre-filled with ``--backlog`` requests is drained by
   a freshly started balancer into the substations' queues (stub substations serve /metrics
   and consume nothing, so the balancer does not share the two cores with them).

    .venv/bin/python -m bench.throughput [--rate 1000] [--duration 60] [--substations 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from bench.broker_limit import measure as broker_limit
from bench.broker_limit import publish_rate
from bench.common import (
    bench_settings,
    histogram_quantile,
    markdown_table,
    private_vhost,
    save,
    scrape,
    total,
)
from loadgen.run import LoadSettings, run_load
from smartgrid import contract
from smartgrid.amqp import Link
from stack.local import balancer_process, start_stack
from stack.processes import ProcessGroup
from substation.charging import ChargingPoints, ChargingPointsCollector

SESSION_SECONDS = 0.05
CAPACITY = 5000


def _substation_metrics(settings) -> list[dict]:
    return [
        scrape(f"http://{settings.host}:{settings.substation_port(i)}/metrics")
        for i in range(settings.substations)
    ]


def _merged(pages: list[dict]) -> dict:
    merged: dict = {}
    for page in pages:
        for key, value in page.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def end_to_end(rate: float, duration: float, substations: int, log_dir: Path) -> dict:
    with private_vhost("bench-e2e") as url:
        settings = bench_settings(
            url,
            log_dir,
            substations=substations,
            capacity=CAPACITY,
            session_seconds=SESSION_SECONDS,
            poll_interval=1.0,
        )
        group = start_stack(settings)
        try:
            balancer_url = f"http://{settings.host}:{settings.balancer_port}/metrics"
            routed_before = total(scrape(balancer_url), "balancer_routed_requests_total")
            started = time.monotonic()
            result = run_load(
                LoadSettings(
                    gateway_url=settings.gateway_url,
                    amqp_url=None,  # no event observer: it would compete for the same two cores
                    interval=1 / rate,
                    duration=duration,
                    concurrency=512,
                    timeout=10,
                )
            )
            sending = time.monotonic() - started
            time.sleep(2 + SESSION_SECONDS)
            balancer = scrape(balancer_url)
            stations = _merged(_substation_metrics(settings))
        finally:
            group.stop()
    report = result.report
    completed = total(stations, "substation_sessions_completed_total")
    return {
        "target_rate": rate,
        "duration": duration,
        "substations": substations,
        "sent": report.sent,
        "accepted": report.accepted,
        "accepted_per_s": report.accepted / sending,
        "routed_per_s": (total(balancer, "balancer_routed_requests_total") - routed_before)
        / sending,
        "accept_latency_ms": report.accept_latency_ms,
        "rejected": report.rejected,
        "errors": report.errors,
        "accept_to_start_s": {
            q: histogram_quantile(stations, "substation_wait_seconds", q / 100)
            for q in (50, 95, 99)
        },
        "completed": completed,
        "lost": report.accepted - completed,
        "decision_p99_s": histogram_quantile(balancer, "balancer_decision_seconds", 0.99),
        "balancer_rss_mb": total(balancer, "process_resident_memory_bytes") / 2**20,
    }


class StubSubstations:
    """/metrics pages for ``count`` substations that never consume: the balancer alone is
    measured, not the substations sharing its two cores. Each page says "idle, huge capacity"."""

    def __init__(self, count: int):
        self.ids = [f"substation-{i}" for i in range(1, count + 1)]
        pages = {}
        for substation in self.ids:
            registry = CollectorRegistry()
            registry.register(ChargingPointsCollector(ChargingPoints(substation, 10**9, "stub")))
            pages[f"/{substation}/metrics"] = generate_latest(registry)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                body = pages.get(self.path)
                self.send_response(200 if body else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def static_list(self) -> str:
        port = self.server.server_address[1]
        return ",".join(f"{s}=http://127.0.0.1:{port}/{s}/metrics" for s in self.ids)

    def stop(self) -> None:
        self.server.shutdown()


def balancer_drain(backlog: int, substations: int, log_dir: Path) -> dict:
    """The balancer alone, routing a backlog to ``substations`` queues nobody consumes."""
    stubs = StubSubstations(substations)
    with private_vhost("bench-drain") as url:
        settings = bench_settings(
            url, log_dir, poll_interval=1.0, extra_env={"SUBSTATIONS": stubs.static_list()}
        )
        topology = contract.core_topology()
        for substation in stubs.ids:
            topology += contract.substation_topology(substation)
        declarer = Link(url, name="bench-declare", topology=topology).start()
        declarer.wait_ready(10)
        declarer.stop()
        group = ProcessGroup()
        try:
            publish_rate(url, backlog)  # the backlog, waiting in the pending queue
            balancer = group.add(balancer_process(settings))
            balancer.wait_healthy()
            url_metrics = balancer.health_url
            assert url_metrics is not None  # balancer_process always sets one
            first = last = None
            routed = 0.0
            deadline = time.monotonic() + 600
            while routed < backlog and time.monotonic() < deadline:
                routed = total(scrape(url_metrics), "balancer_routed_requests_total")
                now = time.monotonic()
                if routed > 0 and first is None:
                    first = (now, routed)
                last = (now, routed)
                time.sleep(0.1)
            page = scrape(url_metrics)
        finally:
            group.stop()
            stubs.stop()
    assert first is not None and last is not None
    span = last[0] - first[0]
    return {
        "backlog": backlog,
        "substations": substations,
        "routed": last[1],
        "routed_per_s": (last[1] - first[1]) / span if span > 0 else None,
        "decision_p99_s": histogram_quantile(page, "balancer_decision_seconds", 0.99),
        "balancer_rss_mb": total(page, "process_resident_memory_bytes") / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second sent")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--substations", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=30_000)
    parser.add_argument("--broker-messages", type=int, default=30_000)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="smartgrid-bench-"))

    broker = broker_limit(args.broker_messages)
    print(
        f"broker: {broker['publish_per_s']:,.0f} publishes/s, {broker['consume_per_s']:,.0f} "
        "consumes/s",
        flush=True,
    )
    e2e = end_to_end(args.rate, args.duration, args.substations, log_dir)
    print(
        f"end to end: {e2e['accepted_per_s']:,.0f} accepted/s, {e2e['routed_per_s']:,.0f} routed/s",
        flush=True,
    )
    drain = balancer_drain(args.backlog, args.substations, log_dir)
    print(f"balancer alone: {drain['routed_per_s']:,.0f} routed/s", flush=True)

    path = save("throughput", {"broker": broker, "end_to_end": e2e, "balancer_alone": drain})
    latency = e2e["accept_latency_ms"]
    waits = e2e["accept_to_start_s"]
    print()
    print(
        markdown_table(
            ["measure", "figure", "share of the broker's limit"],
            [
                ["broker: confirmed persistent publishes/s (pika)", broker["publish_per_s"], "1"],
                ["broker: consumed and acked/s (pika)", broker["consume_per_s"], "1"],
                [
                    "gateway: accepted requests/s",
                    e2e["accepted_per_s"],
                    f"{e2e['accepted_per_s'] / broker['publish_per_s']:.1%}",
                ],
                [
                    "balancer: routed requests/s (end to end)",
                    e2e["routed_per_s"],
                    f"{e2e['routed_per_s'] / broker['consume_per_s']:.1%}",
                ],
                [
                    "balancer alone: routed requests/s (draining a backlog)",
                    drain["routed_per_s"],
                    f"{drain['routed_per_s'] / broker['consume_per_s']:.1%}",
                ],
                [
                    "accept latency p50 / p99 / max (ms)",
                    f"{latency['p50']:.1f} / {latency['p99']:.1f} / {latency['max']:.1f}",
                    "",
                ],
                [
                    "accept -> session start p50 / p99 (s, bucket bound)",
                    f"{waits[50]} / {waits[99]}",
                    "",
                ],
                ["accepted but not completed (lost)", e2e["lost"], ""],
            ],
        )
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
