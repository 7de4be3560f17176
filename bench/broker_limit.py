"""The broker's own limit on this machine, through pika: the ceiling for the project's figures.

Publishes persistent messages with publisher confirms (asynchronous, a bounded window of
unconfirmed messages) to a durable quorum queue, then consumes them with manual acks, from one
pika connection driven by the same I/O loop the services use (``smartgrid.amqp.Link``).

    .venv/bin/python -m bench.broker_limit [--messages 30000]
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import Future, wait

from bench.common import private_vhost
from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link

BODY = contract.ChargeRequest("0" * 32, "EV000001", 1.0).to_body()


def publish_rate(url: str, messages: int, window: int = 1000) -> float:
    link = Link(url, name="bench-publisher", topology=contract.core_topology()).start()
    assert link.wait_ready(10)
    try:
        futures: list[Future] = []
        started = time.perf_counter()
        sent = 0
        while sent < messages:
            batch = min(window, messages - sent)
            ready = threading.Event()

            def publish_batch(n: int = batch, done: threading.Event = ready) -> None:
                for _ in range(n):
                    futures.append(
                        link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, BODY)
                    )
                done.set()

            link.call_soon(publish_batch)  # publish from the I/O thread, as the services do
            ready.wait()
            sent += batch
            wait(futures[-batch:])
        for future in futures:
            future.result()
        return messages / (time.perf_counter() - started)
    finally:
        link.stop()


def consume_rate(url: str, messages: int, prefetch: int = 200) -> float:
    received = 0
    done = threading.Event()
    first: list[float] = []
    link: Link  # assigned below, before any message can arrive

    def on_message(delivery: Delivery) -> None:
        nonlocal received
        if not first:
            first.append(time.perf_counter())
        link.ack(delivery)
        received += 1
        if received >= messages:
            done.set()

    link = Link(
        url,
        name="bench-consumer",
        topology=contract.core_topology(),
        consumers=[ConsumerSpec(contract.PENDING_QUEUE, on_message, prefetch=prefetch)],
    ).start()
    try:
        assert done.wait(300), f"consumed only {received} of {messages}"
        return messages / (time.perf_counter() - first[0])
    finally:
        link.stop()


def measure(messages: int) -> dict:
    with private_vhost("bench-broker") as url:
        publish = publish_rate(url, messages)
        consume = consume_rate(url, messages)
    return {"messages": messages, "publish_per_s": publish, "consume_per_s": consume}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.broker_limit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--messages", type=int, default=30_000)
    args = parser.parse_args()
    result = measure(args.messages)
    print(
        f"persistent, confirmed publishes to a quorum queue: {result['publish_per_s']:,.0f}/s; "
        f"consumed with acks: {result['consume_per_s']:,.0f}/s ({args.messages:,} messages)"
    )


if __name__ == "__main__":
    main()
