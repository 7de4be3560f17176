"""The gateway during a broker outage: 503 with Retry-After, never a 202 it cannot keep."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.broker import GatewayBroker
from gateway.config import GatewayConfig
from gateway.history import RequestHistory
from smartgrid import contract
from tests.helpers import BrokerClient, eventually
from tests.proxy import CuttableProxy


def test_while_the_broker_is_unreachable_the_gateway_answers_503_and_recovers_by_itself(amqp_url):
    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    url = proxy.url(amqp_url)
    broker = GatewayBroker(url, name="gateway-outage-test", history=RequestHistory())
    broker.link._max_backoff = 0.5
    broker.start()
    app = create_app(
        GatewayConfig(amqp_url=url, routed_wait=0), broker=broker, registry=CollectorRegistry()
    )
    client = app.test_client()
    observer = BrokerClient(amqp_url)
    try:
        assert broker.link.wait_ready(10) and broker.wait_caught_up(10)
        assert client.post("/charge", json={"ev_id": "EV-BEFORE"}).status_code == 202

        proxy.cut()
        eventually(
            lambda: client.get("/health").status_code == 503,
            timeout=30,
            what="health reporting the outage",
        )
        answer = client.post("/charge", json={"ev_id": "EV-DURING"})
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "5"
        assert answer.get_json()["error"] == "broker_unavailable"

        proxy.start()
        eventually(
            lambda: client.get("/health").status_code == 200, timeout=30, what="health back to ok"
        )
        assert client.post("/charge", json={"ev_id": "EV-AFTER"}).status_code == 202

        pending = [
            contract.ChargeRequest.from_body(body).ev_id
            for _, body in observer.get_all(contract.PENDING_QUEUE)
        ]
        assert pending == [
            "EV-BEFORE",
            "EV-AFTER",
        ]  # nothing accepted is missing, nothing refused slipped in
    finally:
        observer.close()
        broker.stop()
        proxy.cut()
