"""The history stream on the real broker: one publish puts a request in the pending queue and
in the stream, the request events land beside it, other chatter does not, and a history rebuilt
by reading the stream from its start answers as the live one."""

from __future__ import annotations

import time
import uuid

import pika
import pytest

from gateway.history import RequestHistory
from smartgrid import contract
from tests.helpers import BrokerClient


def declare_history(client: BrokerClient) -> None:
    for declaration in contract.history_topology(max_age_seconds=3600, max_bytes=50_000_000):
        if isinstance(declaration, contract.Queue):
            client.channel.queue_declare(
                declaration.name, durable=True, arguments=declaration.arguments
            )
        else:
            assert isinstance(declaration, contract.Binding)
            client.channel.queue_bind(
                declaration.queue, declaration.exchange, declaration.routing_key
            )


def read_stream(url: str, expected: int, timeout: float = 15) -> list[tuple[str, bytes]]:
    """Everything in the history stream from its first message (a consumer with an offset, as
    a gateway replays it at start)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)  # streams require a prefetch and manual acks
        messages = []
        deadline = time.monotonic() + timeout
        for method, _properties, body in channel.consume(
            contract.HISTORY_STREAM,
            arguments={"x-stream-offset": "first"},
            inactivity_timeout=0.5,
        ):
            if method is not None:
                messages.append((method.routing_key, body))
                channel.basic_ack(method.delivery_tag)
            if len(messages) >= expected or time.monotonic() > deadline:
                break
        channel.cancel()
        return messages
    finally:
        connection.close()


def test_a_history_rebuilt_from_the_stream_answers_as_the_live_one(amqp_url: str):
    client = BrokerClient(amqp_url)
    try:
        declare_history(client)
        rid = uuid.uuid4().hex
        request = contract.ChargeRequest(
            request_id=rid,
            ev_id="EV1",
            accepted_at=time.time(),
            client="fleet-1",
            body_fingerprint="0" * 32,
        )
        client.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, request.to_body())
        # One publish, confirmed: the request is in the pending queue as well.
        assert client.message_count(contract.PENDING_QUEUE) == 1
        events = [
            contract.RequestRouted(
                at=time.time(), request_id=rid, ev_id="EV1", substation="s1", balancer="b"
            ),
            contract.SessionStarted(
                at=time.time(),
                request_id=rid,
                ev_id="EV1",
                substation="s1",
                instance="i",
                accepted_at=request.accepted_at,
                expected_end=time.time() + 30,
            ),
            contract.CancelRequested(at=time.time(), request_id=rid, ev_id="EV1", client="fleet-1"),
            contract.RequestCancelled(
                at=time.time(),
                request_id=rid,
                ev_id="EV1",
                source="s1",
                substation="s1",
                started_at=time.time(),
            ),
        ]
        chatter = contract.SubstationAnnounced(
            at=time.time(),
            substation="s1",
            instance="i",
            capacity=4,
            metrics_url="http://h:1/metrics",
            session_seconds=30,
        )
        # Nothing else is bound in this vhost: chatter is unroutable, so not in the stream.
        with pytest.raises(pika.exceptions.UnroutableError):
            client.publish(contract.EVENTS_EXCHANGE, chatter.kind, chatter.to_body())
        for event in events:
            client.publish(contract.EVENTS_EXCHANGE, event.kind, contract.encode_events([event]))
    finally:
        client.close()

    messages = read_stream(amqp_url, expected=1 + len(events))
    kinds = [routing_key for routing_key, _body in messages]
    assert kinds == [contract.REQUEST_ROUTING_KEY] + [e.kind for e in events]

    live = RequestHistory()
    live.accepted(request)
    for event in events:
        live.apply(event)
    rebuilt = RequestHistory()
    assert rebuilt.replay(messages) == []
    record = rebuilt.get(rid, "fleet-1")
    assert record is not None and record == live.get(rid, "fleet-1")
    assert record["status"] == "cancelled"
    assert rebuilt.get(rid, "fleet-2") is None
    found = rebuilt.lookup(rid)
    assert found is not None and found.body_fingerprint == "0" * 32
