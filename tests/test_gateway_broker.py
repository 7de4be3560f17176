"""GatewayBroker.accept: an honest outcome by the deadline, never a hang."""

from __future__ import annotations

import time
import uuid

from gateway.answers import Outcome
from gateway.broker import GatewayBroker
from gateway.history import RequestHistory
from smartgrid import contract
from tests.helpers import BrokerClient

UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def _request() -> contract.ChargeRequest:
    return contract.ChargeRequest(uuid.uuid4().hex, "EV1", time.time())


def test_an_accepted_request_is_in_the_pending_queue_when_accept_returns(amqp_url):
    broker = GatewayBroker(amqp_url, name="test-accept", history=RequestHistory(capacity=10))
    broker.start()
    client = BrokerClient(amqp_url)
    try:
        assert broker.wait_ready(10)
        request = _request()
        assert broker.accept(request, deadline=time.monotonic() + 5) is Outcome.CONFIRMED
        (body,) = [body for _properties, body in client.get_all(contract.PENDING_QUEUE)]
        assert contract.ChargeRequest.from_body(body) == request
    finally:
        broker.stop()
        client.close()


def test_without_a_broker_nothing_is_sent_and_accept_says_so_by_its_deadline():
    broker = GatewayBroker(
        UNREACHABLE_URL, name="test-nowhere", history=RequestHistory(capacity=10)
    )
    broker.start()
    try:
        assert not broker.wait_ready(0.1)
        assert broker.accept(_request(), deadline=time.monotonic() + 1.0) is Outcome.NOT_SENT
        assert broker.unavailable_reason == "not connected to the message broker"
    finally:
        broker.stop()


def test_the_idle_canary_reaches_no_queue(amqp_url):
    broker = GatewayBroker(
        amqp_url, name="test-canary", history=RequestHistory(capacity=10), canary_interval=0.05
    )
    broker.start()
    client = BrokerClient(amqp_url)
    try:
        assert broker.wait_ready(10) and broker.wait_caught_up(10)
        time.sleep(0.3)  # several canaries
        assert client.get_all(contract.PENDING_QUEUE) == []
        assert broker.unavailable_reason is None
    finally:
        broker.stop()
        client.close()
