"""How fast a real substation obeys a cut share, and falls to its failsafe when a lease runs out.

One substation process under a feeder (``SUBSTATION_PARENT``), eight cars charging (22 kW max,
11 kW min, energy enough for the whole run); the benchmark plays the share allocator, as the
balancer's will (``power.share`` to the substation's share queue, with the lease as the
message's expiration):

- **cuts**: ``--cuts`` shares in turn, each held until the substation's /metrics show it. The
  latency of a cut is from the grant's issue to the last ``session.power`` it caused (stamped
  by the substation when it re-shared), and, as an outsider sees it, to the first /metrics
  sample at or below the new share (sampled every ``--sample-ms``).
- **lease expiries**: ``--expiries`` grants of a short lease nobody renews; the latency is from
  the lease's end to the last ``session.power`` of the fall to the failsafe.
- every /metrics sample of the run: drawn power against the limit in force (none may be above).

This measures the substation's leg of issue 15's "a cut obeyed within 2 s" and "an expired
lease at the failsafe within lease + 1 s"; the operator's command and the allocator add theirs.

    .venv/bin/python -m bench.substation_power [--cuts 40] [--expiries 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pika

from bench.common import bench_settings, markdown_table, private_vhost, save, scrape
from smartgrid import contract, leases
from stack.local import substation_process

SUBSTATION = "substation-1"
CARS = 8
CAR_MAX_KW, CAR_MIN_KW = 22.0, 11.0
FAILSAFE_KW = 12.0
#: Shares that move every car: some run at their maximum, some share, some pause.
SHARES_KW = (176.0, 40.0, 120.0, 25.0, 90.0, 11.0, 150.0, 60.0)


class Samples:
    """/metrics every ``interval``: (time, power kW, limit kW)."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.rows: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        key = (("substation", SUBSTATION),)
        while not self._stop.wait(self.interval):
            values = scrape(self.url)
            power = values.get((contract.POWER_METRIC, key))
            limit = values.get((contract.POWER_LIMIT_METRIC, key))
            if power is not None and limit is not None:
                self.rows.append((time.time(), power, limit))

    def first_within(self, since: float, share_kw: float, timeout: float) -> float | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for at, power, limit in list(self.rows):
                if at >= since and limit <= share_kw and power <= share_kw:
                    return at
            time.sleep(self.interval / 2)
        return None

    def stop(self) -> list[tuple[float, float, float]]:
        self._stop.set()
        self._thread.join()
        return self.rows


class Allocator:
    """The benchmark's stand-in for the share allocator, and its view of session.power."""

    def __init__(self, amqp_url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.events = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.events, contract.EVENTS_EXCHANGE, contract.SessionPower.kind)
        self.seq = 0
        self.term = int(time.time() * 1000)
        self.power: list[contract.SessionPower] = []

    def grant(self, share_kw: float, lease: float) -> leases.Grant:
        self.seq += 1
        grant = leases.Grant(
            SUBSTATION, round(share_kw * 1000), time.time(), lease, self.term, self.seq
        )
        self.channel.basic_publish(
            contract.POWER_EXCHANGE,
            SUBSTATION,
            leases.grant_to_message(grant).to_body(),
            pika.BasicProperties(expiration=str(int(lease * 1000))),
            mandatory=True,
        )
        return grant

    def send_car(self) -> None:
        request_id = uuid.uuid4().hex
        now = time.time()
        routed = contract.RoutedRequest(
            request_id,
            f"EV-{request_id[:8]}",
            now,
            SUBSTATION,
            now,
            "bench",
            max_kw=CAR_MAX_KW,
            min_kw=CAR_MIN_KW,
            energy_kwh=200.0,
        )
        self.channel.basic_publish(
            contract.DISPATCH_EXCHANGE, SUBSTATION, routed.to_body(), mandatory=True
        )

    def collect(self) -> list[contract.SessionPower]:
        self.connection.process_data_events(0)
        while True:
            method, _properties, body = self.channel.basic_get(self.events, auto_ack=True)
            if method is None:
                return self.power
            for event in contract.decode_events(method.routing_key, body):
                assert isinstance(event, contract.SessionPower)
                self.power.append(event)

    def caused(self, since: float, until: float) -> list[contract.SessionPower]:
        self.collect()
        return [e for e in self.power if since <= e.at < until]


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def run(cuts: int, expiries: int, sample_ms: float, expiry_lease: float) -> dict:
    with private_vhost("bench-power") as amqp_url, tempfile.TemporaryDirectory() as logs:
        settings = bench_settings(amqp_url, Path(logs), capacity=CARS)
        service = substation_process(settings, 0)
        service.env = {
            **service.env,
            "SUBSTATION_PARENT": "feeder",
            "SUBSTATION_FAILSAFE_KW": str(FAILSAFE_KW),
            "SIMULATED_HOUR_SECONDS": "3.6",
            "SHUTDOWN_GRACE": "0",
        }
        service.start().wait_healthy()
        assert service.health_url is not None
        allocator = Allocator(amqp_url)
        samples = Samples(service.health_url, sample_ms / 1000)
        try:
            for _ in range(CARS):
                allocator.send_car()
            time.sleep(1.0)  # beyond the clock skew: grants from before its start are refused
            cut_events, cut_metrics = [], []
            for i in range(cuts):
                share = SHARES_KW[i % len(SHARES_KW)]
                grant = allocator.grant(share, lease=60.0)
                seen = samples.first_within(grant.issued_at, share, timeout=10)
                if seen is not None:
                    cut_metrics.append(seen - grant.issued_at)
                time.sleep(0.3)
                caused = allocator.caused(grant.issued_at, time.time())
                if caused:
                    cut_events.append(max(e.at for e in caused) - grant.issued_at)
            expiry_events = []
            for _ in range(expiries):
                allocator.grant(176.0, lease=60.0)
                time.sleep(0.5)
                grant = allocator.grant(150.0, lease=expiry_lease)
                samples.first_within(grant.until, FAILSAFE_KW, timeout=expiry_lease + 10)
                time.sleep(0.3)
                caused = allocator.caused(grant.until, time.time())
                if caused:
                    expiry_events.append(max(e.at for e in caused) - grant.until)
        finally:
            rows = samples.stop()
            allocator.connection.close()
            service.stop()
    over = [(at, power, limit) for at, power, limit in rows if power > limit]
    return {
        "cars": CARS,
        "car_kw": [CAR_MIN_KW, CAR_MAX_KW],
        "failsafe_kw": FAILSAFE_KW,
        "shares_kw": list(SHARES_KW),
        "expiry_lease_seconds": expiry_lease,
        "sample_ms": sample_ms,
        "cut_to_last_session_power": _summary(cut_events),
        "cut_to_first_metrics_sample": _summary(cut_metrics),
        "lease_end_to_failsafe": _summary(expiry_events),
        "samples": len(rows),
        "samples_over_limit": len(over),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.substation_power", description=__doc__)
    parser.add_argument("--cuts", type=int, default=40)
    parser.add_argument("--expiries", type=int, default=10)
    parser.add_argument("--sample-ms", type=float, default=20.0)
    parser.add_argument("--expiry-lease", type=float, default=1.5)
    args = parser.parse_args(argv)
    result = run(args.cuts, args.expiries, args.sample_ms, args.expiry_lease)
    path = save("substation-power", result)
    rows = [
        [name, s["n"], s.get("median_ms"), s.get("p95_ms"), s.get("max_ms")]
        for name, s in (
            ("cut → last session.power", result["cut_to_last_session_power"]),
            ("cut → first /metrics sample within it", result["cut_to_first_metrics_sample"]),
            ("lease end → last session.power (failsafe)", result["lease_end_to_failsafe"]),
        )
    ]
    print(markdown_table(["latency", "n", "median ms", "p95 ms", "max ms"], rows))
    print(f"{result['samples_over_limit']} of {result['samples']} samples above the limit")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
