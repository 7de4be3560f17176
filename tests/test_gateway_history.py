"""Durable status: real gateway processes read the history stream at start, so a restarted
gateway (every worker of it) still answers for earlier requests, and an Idempotency-Key
repeat after the restart gets the same request id without a second request."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
import uuid
from email.message import Message

import pika
from pika.adapters.blocking_connection import BlockingChannel

from smartgrid import contract
from stack.local import StackSettings, gateway_process
from tests.helpers import BrokerClient, eventually


def _call(
    url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None
) -> tuple[int, dict, Message]:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_a_restarted_gateway_still_knows_earlier_requests_and_their_keys(
    stack_settings: StackSettings,
):
    settings = dataclasses.replace(stack_settings, gateway_workers=2)
    base = settings.gateway_url
    key, ev_id, other_ev = uuid.uuid4().hex, "EV-DURABLE", "EV-ROUTED"
    gateway = gateway_process(settings).start()
    observer = BrokerClient(settings.amqp_url)
    try:
        gateway.wait_healthy(60)
        status, first, _ = _call(
            f"{base}/charge", "POST", {"ev_id": ev_id}, {"Idempotency-Key": key}
        )
        assert status == 202, first
        request_id = first["request_id"]
        status, routed, _ = _call(f"{base}/charge", "POST", {"ev_id": other_ev})
        assert status == 202
        # A balancer's decision, as the services' user (the gateway trusts its own user).
        observer.publish_event(
            contract.RequestRouted(time.time(), routed["request_id"], other_ev, "S7", "b1")
        )
        eventually(
            lambda: _call(f"{base}/charge/{routed['request_id']}")[1].get("status") == "routed",
            what="the routing in the history",
        )
        assert gateway.stop() == 0
        observer.get_all(contract.PENDING_QUEUE)  # what the first gateway published

        gateway = gateway_process(settings).start()
        gateway.wait_healthy(60)
        # Every worker read the history: ask several times, over new connections.
        for _ in range(6):
            status, record, _ = _call(f"{base}/charge/{routed['request_id']}")
            assert status == 200 and record["status"] == "routed"
            assert record["substation"] == "S7"
            status, record, _ = _call(f"{base}/charge/{request_id}")
            assert status == 200 and record["status"] == "queued"

        status, again, headers = _call(
            f"{base}/charge", "POST", {"ev_id": ev_id}, {"Idempotency-Key": key}
        )
        assert status == 202, again
        assert again["request_id"] == request_id
        assert headers["Idempotent-Replayed"] == "true"
        # Still queued as far as the history knows, so the very request went out again (the
        # balancer drops the copy): the same id and acceptance, not a new request.
        (copy,) = [
            contract.ChargeRequest.from_body(body)
            for _, body in observer.get_all(contract.PENDING_QUEUE)
        ]
        assert (copy.request_id, copy.accepted_at) == (request_id, first_accepted(observer, key))
        # And the EV is still busy with it.
        status, busy, _ = _call(f"{base}/charge", "POST", {"ev_id": ev_id})
        assert (status, busy["error"], busy["request_id"]) == (409, "ev_busy", request_id)
    finally:
        observer.close()
        gateway.stop()


def first_accepted(observer: BrokerClient, key: str) -> float:
    """When the history stream says the request was first accepted."""
    connection = observer.connection
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    found: list[float] = []

    def on_message(
        ch: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        ch.basic_ack(method.delivery_tag)
        if method.routing_key == contract.REQUEST_ROUTING_KEY and not found:
            found.append(contract.ChargeRequest.from_body(body).accepted_at)

    channel.basic_consume(
        contract.HISTORY_STREAM, on_message, arguments={"x-stream-offset": "first"}
    )
    deadline = time.monotonic() + 10
    while not found and time.monotonic() < deadline:
        connection.process_data_events(0.1)
    channel.close()
    assert found, "no request in the history stream"
    return found[0]
