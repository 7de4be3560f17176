"""What one gateway worker's broker side costs per accepted request, HTTP aside.

A ``GatewayBroker`` on a private vhost (its Link, and its reading of the history stream, which
reads back every request it publishes) accepts ``--requests`` charge requests from
``--threads`` threads at once, as a worker's HTTP threads do: each publish waits for its
confirm. Prints this process's CPU time per accepted request, and the rate.

To compare revisions, run it from each one's tree in turn (``git archive <rev> | tar -x``),
alternating the order.

    .venv/bin/python -m bench.accept_cpu [--requests 6000] [--threads 16]
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
import uuid

from bench.common import private_vhost
from gateway.broker import GatewayBroker
from gateway.history import RequestHistory
from smartgrid import contract


def accept_many(url: str, requests: int, threads: int) -> dict:
    broker = GatewayBroker(url, name="accept-cpu", history=RequestHistory(), canary_interval=0)
    broker.start()
    try:
        if not (broker.wait_ready(30) and broker.wait_caught_up(30)):
            raise SystemExit("no broker")
        outcomes: list[str] = []

        def accept(count: int) -> None:
            for _ in range(count):
                request = contract.ChargeRequest(
                    uuid.uuid4().hex, f"EV{uuid.uuid4().hex[:8]}", time.time()
                )
                outcome = broker.accept(request, deadline=time.monotonic() + 10)
                outcomes.append(outcome.value)

        workers = [
            threading.Thread(target=accept, args=(requests // threads,)) for _ in range(threads)
        ]
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        broker.stop()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "cpu_us_per_request": cpu / len(outcomes) * 1e6,
        "per_second": len(outcomes) / wall,
        "outcomes": sorted(set(outcomes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=6_000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    with private_vhost("bench-accept") as url:
        result = accept_many(url, args.requests, args.threads)
    print(
        f"{result['cpu_us_per_request']:.0f} µs of CPU per accepted request, "
        f"{result['per_second']:,.0f}/s, outcomes {', '.join(result['outcomes'])}"
    )


if __name__ == "__main__":
    main()
