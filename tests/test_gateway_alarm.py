"""The gateway during a broker resource alarm (``connection.blocked``), on a node of its own.

A memory alarm (``set_vm_memory_high_watermark 0.0001``) and a disk alarm (a free disk limit
far above the free space) block publishers. The gateway must then refuse at once with 503
``broker_unavailable`` and publish nothing; /health says why. A request that was published
before the gateway learnt of the alarm is ``not_confirmed``, with its id and Location: once the
alarm clears it is enqueued after all, and the answer never claimed otherwise.
Never on the shared broker: an alarm there would stall every other test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.broker import GatewayBroker
from gateway.config import GatewayConfig
from gateway.history import RequestHistory
from smartgrid import contract
from tests.cluster import Node, RabbitCluster
from tests.helpers import BrokerClient, eventually


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[RabbitCluster, Node, str]]:
    with RabbitCluster(1) as cluster:
        (url,) = cluster.add_vhost("gateway-alarm")
        yield cluster, cluster.nodes[0], url


def _gateway(url: str, *, canary_interval: float) -> tuple[GatewayBroker, Flask]:
    broker = GatewayBroker(
        url,
        name="gateway-alarm-test",
        history=RequestHistory(capacity=100),
        canary_interval=canary_interval,
    )
    broker.start()
    app = create_app(
        GatewayConfig(amqp_url=url, publish_timeout=5, retry_after=3),
        broker=broker,
        registry=CollectorRegistry(),
    )
    assert broker.wait_ready(10) and broker.wait_caught_up(10)
    return broker, app


def _pending_ev_ids(url: str) -> list[str]:
    observer = BrokerClient(url)
    try:
        return [
            contract.ChargeRequest.from_body(body).ev_id
            for _, body in observer.get_all(contract.PENDING_QUEUE)
        ]
    finally:
        observer.close()


ALARMS = {
    "memory": (("set_vm_memory_high_watermark", "0.0001"), ("set_vm_memory_high_watermark", "0.4")),
    "disk": (("set_disk_free_limit", "100000GB"), ("set_disk_free_limit", "50MB")),
}


@pytest.mark.parametrize("alarm", sorted(ALARMS))
def test_while_the_broker_blocks_publishers_the_gateway_refuses_at_once_and_publishes_nothing(
    node: tuple[RabbitCluster, Node, str], alarm: str
):
    cluster, rabbit, url = node
    raise_alarm, clear_alarm = ALARMS[alarm]
    _pending_ev_ids(url)  # what an earlier test left
    broker, app = _gateway(url, canary_interval=0.2)
    client = app.test_client()
    try:
        assert client.post("/charge", json={"ev_id": f"EV-BEFORE-{alarm}"}).status_code == 202

        cluster.ctl(rabbit, *raise_alarm)
        try:
            eventually(
                lambda: client.get("/health").status_code == 503, timeout=30, what="health 503"
            )
            health = client.get("/health")
            assert health.headers["Retry-After"] == "3"
            assert alarm in health.get_json()["reason"]  # "low on memory", "low on disk"
            assert health.get_json()["broker_connected"] is True

            answer = client.post("/charge", json={"ev_id": f"EV-DURING-{alarm}"})
            assert answer.status_code == 503
            assert answer.get_json()["error"] == "broker_unavailable"
            assert "request_id" not in answer.get_json()
            assert answer.headers["Retry-After"] == "3"
        finally:
            cluster.ctl(rabbit, *clear_alarm)

        eventually(lambda: client.get("/health").status_code == 200, timeout=30, what="health ok")
        assert client.post("/charge", json={"ev_id": f"EV-AFTER-{alarm}"}).status_code == 202
        # Nothing refused slipped in once the alarm cleared.
        assert _pending_ev_ids(url) == [f"EV-BEFORE-{alarm}", f"EV-AFTER-{alarm}"]
    finally:
        broker.stop()


def test_a_request_published_into_an_alarm_is_not_confirmed_with_its_location_and_lands_later(
    node: tuple[RabbitCluster, Node, str],
):
    cluster, rabbit, url = node
    _pending_ev_ids(url)
    # No canary: the request itself is the first publish the broker blocks.
    broker, app = _gateway(url, canary_interval=0)
    client = app.test_client()
    try:
        cluster.ctl(rabbit, "set_vm_memory_high_watermark", "0.0001")
        try:
            eventually(
                lambda: (
                    "memory" in cluster.ctl(rabbit, "eval", "rabbit_alarm:get_alarms().").stdout
                ),
                timeout=30,
                what="the alarm in force",
            )
            answer = client.post("/charge", json={"ev_id": "EV-CAUGHT"})
            assert answer.status_code == 503
            body = answer.get_json()
            assert body["error"] == "not_confirmed"
            assert answer.headers["Location"] == f"/charge/{body['request_id']}"
            assert "Retry-After" in answer.headers
            # Now the gateway knows: the next one is refused at once.
            assert client.get("/health").status_code == 503
            refused = client.post("/charge", json={"ev_id": "EV-REFUSED"})
            assert refused.get_json()["error"] == "broker_unavailable"
        finally:
            cluster.ctl(rabbit, "set_vm_memory_high_watermark", "0.4")
        eventually(lambda: client.get("/health").status_code == 200, timeout=30, what="health ok")
        assert _pending_ev_ids(url) == ["EV-CAUGHT"]
    finally:
        broker.stop()
