"""A real balancer process with real substations: eligibility, holding, dead letters."""

from __future__ import annotations

import signal

import pytest

from smartgrid import contract
from stack.local import StackSettings, balancer_process, substation_process
from tests.helpers import BrokerClient, eventually, metric


@pytest.fixture
def broker(amqp_url: str):
    client = BrokerClient(amqp_url)
    yield client
    client.close()


def _balancer(settings: StackSettings, **env: str):
    service = balancer_process(settings)
    service.env = {**service.env, **env}
    service.start().wait_healthy()
    return service


def _up(settings: StackSettings, substation: str) -> float | None:
    return metric(
        f"http://{settings.host}:{settings.balancer_port}/metrics",
        "balancer_substation_up",
        substation=substation,
    )


def _routed(settings: StackSettings, substation: str) -> float:
    value = metric(
        f"http://{settings.host}:{settings.balancer_port}/metrics",
        "balancer_routed_requests_total",
        substation=substation,
    )
    return value or 0.0


def test_requests_wait_in_the_pending_queue_until_a_substation_is_known(stack_settings, broker):
    stack_settings.poll_interval = 0.3
    stack_settings.session_seconds = 0.3
    balancer = _balancer(stack_settings)
    substation = None
    try:
        events = broker.subscribe_events(contract.SessionCompleted.kind)
        ids = [broker.send_request(ev_id=f"EV{i}") for i in range(5)]
        # Held, not routed, not dropped: unacknowledged and still the pending queue's.
        eventually(lambda: metric(balancer.health_url, "balancer_held_requests") == 5)
        assert _routed(stack_settings, "substation-1") == 0

        substation = substation_process(stack_settings, 0).start()
        substation.wait_healthy()
        completed = eventually(
            lambda: len(found := broker.events(events)) >= 5 and found,
            what="five completions",
            timeout=30,
        )
        assert sorted(e.request_id for e in completed) == sorted(ids)
        assert metric(balancer.health_url, "balancer_held_requests") == 0
        assert broker.message_count(contract.PENDING_QUEUE) == 0
    finally:
        assert balancer.stop() == 0
        if substation is not None:
            assert substation.stop() == 0


def test_a_dead_substation_stops_receiving_requests_once_its_metrics_are_stale(
    stack_settings, broker
):
    stack_settings.poll_interval = 0.3
    stack_settings.session_seconds = 0.2
    stack_settings.substations = 2
    substations = [substation_process(stack_settings, i).start() for i in range(2)]
    for s in substations:
        s.wait_healthy()
    balancer = _balancer(stack_settings, STALE_AFTER="1.0")
    try:
        eventually(
            lambda: (
                _up(stack_settings, "substation-1") == 1
                and _up(stack_settings, "substation-2") == 1
            )
        )
        substations[0].signal(signal.SIGKILL)
        substations[0].process.wait(10)
        eventually(
            lambda: _up(stack_settings, "substation-1") == 0,
            what="substation-1 marked down",
            timeout=10,
        )

        before = _routed(stack_settings, "substation-1")
        for i in range(10):
            broker.send_request(ev_id=f"EV{i}")
        eventually(
            lambda: _routed(stack_settings, "substation-2") >= 10,
            what="all ten routed to the live one",
        )
        assert _routed(stack_settings, "substation-1") == before
    finally:
        assert balancer.stop() == 0
        for s in substations:
            s.stop()


def test_an_invalid_pending_message_is_dead_lettered_and_routing_carries_on(stack_settings, broker):
    stack_settings.poll_interval = 0.3
    stack_settings.session_seconds = 0.2
    substation = substation_process(stack_settings, 0).start()
    substation.wait_healthy()
    balancer = _balancer(stack_settings)
    try:
        broker.publish(
            contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b'{"ev_id": "EV1"}'
        )
        dead = eventually(lambda: broker.get_all(contract.DEAD_LETTER_QUEUE), what="a dead letter")
        assert "request_id" in dead[0][0].headers[contract.REASON_HEADER]
        assert dead[0][0].headers[contract.SOURCE_HEADER] == contract.PENDING_QUEUE

        eventually(lambda: _up(stack_settings, "substation-1") == 1)
        broker.send_request()
        eventually(lambda: _routed(stack_settings, "substation-1") == 1)
    finally:
        assert balancer.stop() == 0
        assert substation.stop() == 0
