"""GatewayBroker.accept: confirmed, or a clear failure by the deadline, never a hang."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from gateway.broker import GatewayBroker
from gateway.tracker import RequestTracker
from smartgrid import contract
from smartgrid.amqp import LinkError
from tests.helpers import BrokerClient

UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def _request() -> contract.ChargeRequest:
    return contract.ChargeRequest(uuid.uuid4().hex, "EV1", time.time())


def test_an_accepted_request_is_in_the_pending_queue_when_accept_returns(amqp_url):
    broker = GatewayBroker(amqp_url, name="test-accept", tracker=RequestTracker(10))
    broker.start()
    client = BrokerClient(amqp_url)
    try:
        assert broker.wait_ready(10)
        request = _request()
        broker.accept(request, deadline=time.monotonic() + 5)
        (body,) = [body for _properties, body in client.get_all(contract.PENDING_QUEUE)]
        assert contract.ChargeRequest.from_body(body) == request
    finally:
        broker.stop()
        client.close()


def test_without_a_broker_accept_fails_by_its_deadline_instead_of_hanging():
    broker = GatewayBroker(UNREACHABLE_URL, name="test-nowhere", tracker=RequestTracker(10))
    broker.start()
    try:
        assert not broker.wait_ready(0.1)
        with pytest.raises((LinkError, FutureTimeout)):
            broker.accept(_request(), deadline=time.monotonic() + 1.0)
    finally:
        broker.stop()
