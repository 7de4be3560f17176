"""What one gateway worker's reading of the history stream costs, per request.

Fills the history stream of a private vhost with ``--requests`` charge requests (each
published as a gateway publishes it) and their ``request.routed``, ``session.started`` and
``session.completed`` events, in batches of ``--batch`` per message as a loaded balancer and
substations send them; then has a fresh gateway broker (``gateway.broker.GatewayBroker``: its
Link, StreamReader and RequestHistory) replay the stream, and divides the CPU time of this
process over the replay by the requests read. A replay reads message by message as a
following worker does (one delivery each), so it is the per-request cost of reading the tail
under load, without the HTTP layer or the other services.

Each worker of a gateway host pays this (GATEWAY_WORKERS: each reads the whole stream). To
compare revisions, run it from each one's tree in turn (``git archive <rev> | tar -x``).

    .venv/bin/python -m bench.history_read [--requests 20000] [--batch 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import uuid

from bench.common import private_vhost
from gateway.broker import GatewayBroker
from gateway.history import RequestHistory
from smartgrid import contract


def _events(request: contract.ChargeRequest, now: float) -> list[contract.Event]:
    rid, ev = request.request_id, request.ev_id
    return [
        contract.RequestRouted(at=now, request_id=rid, ev_id=ev, substation="s-1", balancer="b"),
        contract.SessionStarted(
            at=now,
            request_id=rid,
            ev_id=ev,
            substation="s-1",
            instance="i-1",
            accepted_at=request.accepted_at,
            expected_end=now + 0.05,
            max_kw=11.0,
            min_kw=1.4,
            priority="standard",
            power_kw=11.0,
        ),
        contract.SessionCompleted(
            at=now,
            request_id=rid,
            ev_id=ev,
            substation="s-1",
            instance="i-1",
            started_at=now,
            energy_kwh=0.0002,
            paused_seconds=0.0,
        ),
    ]


def fill(url: str, requests: int, batch: int) -> list[contract.ChargeRequest]:
    """The stream filled as gateways, a balancer and substations would: the requests."""
    filler = GatewayBroker(url, name="history-fill", history=RequestHistory(), canary_interval=0)
    filler.start()
    if not filler.wait_ready(30):
        raise SystemExit("no broker")
    now = time.time()
    made = [
        contract.ChargeRequest(
            uuid.uuid4().hex, f"EV{n}", now, max_kw=11.0, min_kw=1.4, priority="standard"
        )
        for n in range(requests)
    ]
    for start in range(0, requests, batch):
        group = made[start : start + batch]
        futures = [filler.publish_request(request) for request in group]
        for kind_index in range(3):
            events = [_events(request, now)[kind_index] for request in group]
            futures.append(
                filler.link.publish(
                    contract.EVENTS_EXCHANGE,
                    events[0].kind,
                    contract.encode_events(events),
                    mandatory=False,
                )
            )
        for future in futures:
            future.result(timeout=30)
    filler.stop()
    return made


def read(url: str, made: list[contract.ChargeRequest], messages: int) -> dict:
    reader = GatewayBroker(
        url, name="history-read", history=RequestHistory(capacity=len(made) + 1), canary_interval=0
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic()
    reader.start()
    try:
        # Caught up is the end mark read; the rest of the last chunk comes in the same go.
        deadline = time.monotonic() + 300
        while reader.reader.messages_read < messages and time.monotonic() < deadline:
            time.sleep(0.01)
        wall = time.monotonic() - wall
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        held = len(reader.history)
    finally:
        reader.stop()
    if held != len(made):
        raise SystemExit(f"the reader holds {held} of {len(made)} requests")
    return {"cpu_us_per_request": cpu / len(made) * 1e6, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=10, help="events per event message")
    parser.add_argument("--rounds", type=int, default=3, help="replays of the same stream")
    args = parser.parse_args()
    with private_vhost("bench-history") as url:
        made = fill(url, args.requests, args.batch)
        messages = args.requests + 3 * -(-args.requests // args.batch)
        print(
            f"{args.requests:,} requests, their events in batches of {args.batch}: "
            f"{messages:,} messages"
        )
        figures = []
        for round_number in range(args.rounds):
            result = read(url, made, messages)
            figures.append(result["cpu_us_per_request"])
            print(
                f"round {round_number + 1}: {result['cpu_us_per_request']:.1f} µs per request "
                f"({result['wall_s']:.1f} s)"
            )
    print(
        f"median {statistics.median(figures):.1f} µs per request "
        f"({min(figures):.1f}–{max(figures):.1f})"
    )


if __name__ == "__main__":
    main()
