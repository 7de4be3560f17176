"""The balancer's ledger in a live balancer (issue 14): one car, one session, end to end; cancels
obeyed before a request is forwarded; decisions that survive a restart through the history."""

from __future__ import annotations

import time
import uuid
from typing import TypeVar

import pytest

from smartgrid import contract
from stack.local import StackSettings, balancer_process, substation_process
from stack.processes import ProcessGroup, ServiceProcess
from tests.helpers import BrokerClient, eventually, health_url, metric

E = TypeVar("E", bound=contract.Event)

SESSION_KINDS = (
    contract.SessionStarted.kind,
    contract.SessionCompleted.kind,
    contract.RequestRejected.kind,
    contract.RequestCancelled.kind,
)


class Events:
    """Every lifecycle event of the kinds above, as they come."""

    def __init__(self, broker: BrokerClient):
        self.broker = broker
        self.queue = broker.subscribe_events(*SESSION_KINDS)
        self.seen: list[contract.Event] = []

    def of(self, cls: type[E], **fields: object) -> list[E]:
        self.seen.extend(self.broker.events(self.queue))
        return [
            e
            for e in self.seen
            if isinstance(e, cls) and all(getattr(e, k) == v for k, v in fields.items())
        ]

    def wait(self, cls: type[E], count: int = 1, **fields: object) -> list[E]:
        def enough() -> list[E]:
            found = self.of(cls, **fields)
            return found if len(found) >= count else []

        return eventually(enough, what=f"{count} {cls.kind} {fields}")


def _request(ev_id: str) -> contract.ChargeRequest:
    return contract.ChargeRequest(uuid.uuid4().hex, ev_id, time.time())


def _publish(broker: BrokerClient, request: contract.ChargeRequest) -> None:
    """As a gateway does: into the pending queue and the history stream at once."""
    broker.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, request.to_body())


def _held(balancer: ServiceProcess) -> float | None:
    return metric(health_url(balancer), contract.HELD_METRIC, priority="standard")


@pytest.fixture
def settings(stack_settings: StackSettings) -> StackSettings:
    stack_settings.poll_interval = 0.3
    stack_settings.session_seconds = 1.0
    return stack_settings


def _start(group: ProcessGroup, service: ServiceProcess) -> ServiceProcess:
    group.add(service).wait_healthy()
    return service


def test_two_requests_racing_for_one_car_end_in_one_session_and_the_loser_is_rejected(
    settings, broker
):
    """Two gateways accept a request for the same EV within the same millisecond (published
    straight to the requests exchange, as they would): the first to reach the balancer runs,
    the other gets request.rejected ev_busy naming it, and never starts. Once the session is
    over, the car is free again."""
    events = Events(broker)
    group = ProcessGroup()
    try:
        _start(group, substation_process(settings, 0))
        _start(group, balancer_process(settings))
        first, second = _request("EV-race"), _request("EV-race")
        _publish(broker, first)
        _publish(broker, second)

        (rejected,) = events.wait(contract.RequestRejected, request_id=second.request_id)
        assert rejected.reason == contract.REJECTED_EV_BUSY
        assert rejected.active_request_id == first.request_id
        assert rejected.accepted_at == second.accepted_at
        events.wait(contract.SessionCompleted, request_id=first.request_id)
        assert [e.request_id for e in events.of(contract.SessionStarted)] == [first.request_id]

        # A copy of the loser (a gateway's idempotent repeat) is dropped, not rejected again.
        _publish(broker, second)
        # The car is free once its session is over.
        later = _request("EV-race")
        _publish(broker, later)
        events.wait(contract.SessionCompleted, request_id=later.request_id)
        assert [e.request_id for e in events.of(contract.SessionStarted)] == [
            first.request_id,
            later.request_id,
        ]
        assert len(events.of(contract.RequestRejected)) == 1
        assert broker.message_count(contract.PENDING_QUEUE) == 0
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits


def test_a_cancel_of_a_held_or_not_yet_delivered_request_means_it_never_starts(settings, broker):
    events = Events(broker)
    group = ProcessGroup()
    try:
        # No substation yet: the balancer holds what it takes.
        balancer = _start(group, balancer_process(settings))
        held = _request("EV-held")
        _publish(broker, held)
        eventually(lambda: _held(balancer) == 1, what="the request held")
        broker.publish_event(
            contract.CancelRequested(time.time(), held.request_id, held.ev_id, client=None)
        )
        (cancelled,) = events.wait(contract.RequestCancelled, request_id=held.request_id)
        assert cancelled.started_at is None and cancelled.substation is None
        eventually(lambda: _held(balancer) == 0, what="the cancelled request no longer held")

        # A cancel that comes before its request: obeyed when the request arrives.
        early = _request("EV-early")
        broker.publish_event(contract.CancelRequested(time.time(), early.request_id, early.ev_id))
        time.sleep(0.5)  # the cancel reaches the balancer first (an order, not a timing)
        _publish(broker, early)
        events.wait(contract.RequestCancelled, request_id=early.request_id)

        # Both left the pending queue; a substation now runs only what was not cancelled, and
        # the cancelled requests' cars are free.
        eventually(lambda: broker.message_count(contract.PENDING_QUEUE) == 0)
        _start(group, substation_process(settings, 0))
        after = [_request("EV-held"), _request("EV-early")]
        for request in after:
            _publish(broker, request)
        for request in after:
            events.wait(contract.SessionCompleted, request_id=request.request_id)
        started = {e.request_id for e in events.of(contract.SessionStarted)}
        assert started == {r.request_id for r in after}
        assert not events.of(contract.RequestRejected)
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits


def test_a_balancer_that_takes_over_knows_from_the_history_what_was_decided(settings, broker):
    """A restarted (or standby) balancer replays the history before it consumes: a copy of a
    request routed before it started is dropped, and a car still charging stays busy."""
    events = Events(broker)
    settings.session_seconds = 30.0
    group = ProcessGroup()
    try:
        _start(group, substation_process(settings, 0))
        first = _start(group, balancer_process(settings))
        charging = _request("EV-long")
        _publish(broker, charging)
        events.wait(contract.SessionStarted, request_id=charging.request_id)
        assert first.stop() == 0
        group.services.remove(first)

        _start(group, balancer_process(settings, "balancer-2"))
        _publish(broker, charging)  # a copy (a gateway's repeat): dropped
        rival = _request("EV-long")  # the car is charging: rejected
        _publish(broker, rival)
        (rejected,) = events.wait(contract.RequestRejected, request_id=rival.request_id)
        assert rejected.active_request_id == charging.request_id
        eventually(lambda: broker.message_count(contract.PENDING_QUEUE) == 0)
        assert [e.request_id for e in events.of(contract.SessionStarted)] == [charging.request_id]
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits
