"""Cancellation at a real substation process on the real broker: a charging session stopped by
``request.cancel_requested`` frees its point, and a request cancelled while it waited in the
substation's queue (or before the substation started) is never charged."""

from __future__ import annotations

import time

import pytest

from smartgrid import contract
from stack.local import StackSettings, balancer_process, substation_process
from stack.processes import ServiceProcess
from tests.helpers import BrokerClient, eventually, health_url, metric

SUBSTATION = "substation-1"


def _start(settings: StackSettings, *, capacity: int) -> tuple[ServiceProcess, str]:
    settings.capacity = capacity
    settings.session_seconds = 120.0  # sessions end only by a cancel here
    service = substation_process(settings, 0)
    service.env = {**service.env, "SHUTDOWN_GRACE": "0"}
    service.start().wait_healthy()
    metrics_url = health_url(service)
    eventually(lambda: metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION) is not None)
    return service, metrics_url


def _load(metrics_url: str) -> float | None:
    return metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION)


def _counter(metrics_url: str, name: str) -> float | None:
    return metric(metrics_url, name + "_total", substation=SUBSTATION)


def _cancel(broker: BrokerClient, request_id: str, ev_id: str = "EV1") -> None:
    broker.publish_event(
        contract.CancelRequested(at=time.time(), request_id=request_id, ev_id=ev_id, client="c")
    )


def test_a_charging_session_cancelled_frees_its_point_and_says_so_once(stack_settings, broker):
    service, metrics_url = _start(stack_settings, capacity=1)
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind,
            contract.SessionCompleted.kind,
            contract.RequestCancelled.kind,
        )
        request_id = broker.send_to_substation(SUBSTATION)
        eventually(lambda: _load(metrics_url) == 1, what="the session started")
        _cancel(broker, request_id)
        eventually(lambda: _load(metrics_url) == 0, what="the point freed")
        # A repeat of the cancel is harmless: nothing more is published.
        _cancel(broker, request_id)
        eventually(lambda: _counter(metrics_url, "substation_sessions_cancelled") == 1)
        # The point is free for the next request, and the cancelled one was acknowledged.
        broker.send_to_substation(SUBSTATION, ev_id="EV2")
        eventually(lambda: _load(metrics_url) == 1, what="the next session started")
        assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0
        assert _counter(metrics_url, contract.COMPLETED_METRIC) == 1

        # started, cancelled, the next started
        seen = broker.events_until(events, lambda seen: len(seen) >= 3)
        cancels = [e for e in seen if isinstance(e, contract.RequestCancelled)]
        (started,) = [
            e for e in seen if isinstance(e, contract.SessionStarted) and e.ev_id == "EV1"
        ]
        assert [(c.request_id, c.substation, c.instance, c.started_at) for c in cancels] == [
            (request_id, SUBSTATION, started.instance, pytest.approx(started.at))
        ]
        assert not [e for e in seen if isinstance(e, contract.SessionCompleted)]
    finally:
        assert service.stop() == 0


def test_a_request_cancelled_while_it_waits_in_the_queue_never_starts(stack_settings, broker):
    service, metrics_url = _start(stack_settings, capacity=1)
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind, contract.RequestCancelled.kind
        )
        charging = broker.send_to_substation(SUBSTATION, ev_id="EV1")
        eventually(lambda: _load(metrics_url) == 1, what="the first session started")
        waiting = broker.send_to_substation(SUBSTATION, ev_id="EV2")  # beyond the prefetch
        _cancel(broker, waiting, "EV2")
        # Only now can it be delivered: the first session's point frees.
        _cancel(broker, charging, "EV1")
        eventually(
            lambda: _counter(metrics_url, "substation_requests_cancelled_before_start") == 1,
            what="the waiting request cancelled on delivery",
        )
        eventually(lambda: broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0)
        assert _load(metrics_url) == 0
        seen = broker.events_until(events, lambda seen: len(seen) >= 3)
        assert [e.request_id for e in seen if isinstance(e, contract.SessionStarted)] == [charging]
        cancels = {e.request_id: e for e in seen if isinstance(e, contract.RequestCancelled)}
        assert set(cancels) == {charging, waiting}
        assert cancels[waiting].started_at is None and cancels[waiting].source == SUBSTATION
    finally:
        assert service.stop() == 0
    # Both acknowledged: nothing went back to the queue with the connection.
    assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0


def test_a_cancel_made_while_the_substation_was_down_is_obeyed_when_it_starts(
    stack_settings, broker
):
    broker.declare(
        contract.history_topology(
            max_age_seconds=contract.HISTORY_MAX_AGE_SECONDS, max_bytes=contract.HISTORY_MAX_BYTES
        )
        + contract.substation_topology(SUBSTATION),
    )
    events = broker.subscribe_events(contract.SessionStarted.kind, contract.RequestCancelled.kind)
    cancelled = broker.send_to_substation(SUBSTATION, ev_id="EV1")
    _cancel(broker, cancelled, "EV1")
    kept = broker.send_to_substation(SUBSTATION, ev_id="EV2")
    service, metrics_url = _start(stack_settings, capacity=2)
    try:
        eventually(lambda: _load(metrics_url) == 1, what="the other request charging")
        eventually(lambda: broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0)
        # Counted once the broker confirms request.cancelled: a loop turn after the delivery.
        eventually(lambda: _counter(metrics_url, "substation_requests_cancelled_before_start") == 1)
        seen = broker.events_until(events, lambda seen: len(seen) >= 2)
        assert [e.request_id for e in seen if isinstance(e, contract.SessionStarted)] == [kept]
        assert [e.request_id for e in seen if isinstance(e, contract.RequestCancelled)] == [
            cancelled
        ]
    finally:
        assert service.stop() == 0


def test_a_possible_duplicate_cancelled_while_it_is_checked_never_starts(stack_settings, broker):
    stack_settings.capacity = 1
    stack_settings.session_seconds = 120.0
    service = substation_process(stack_settings, 0)
    # The other substations are asked for longer than this test lasts: only a cancel ends it.
    service.env = {**service.env, "SHUTDOWN_GRACE": "0", "DUPLICATE_CHECK_SECONDS": "300"}
    service.start().wait_healthy()
    metrics_url = health_url(service)
    try:
        events = broker.subscribe_events(
            contract.SessionLookup.kind, contract.RequestCancelled.kind
        )
        request_id = broker.send_to_substation(SUBSTATION, maybe_duplicate=True)
        broker.events_until(events, lambda seen: len(seen) >= 1)  # its lookup: it is being checked
        _cancel(broker, request_id)
        seen = broker.events_until(events, lambda seen: len(seen) >= 1)
        (cancel,) = [e for e in seen if isinstance(e, contract.RequestCancelled)]
        assert (cancel.request_id, cancel.started_at) == (request_id, None)
        eventually(lambda: broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0)
        eventually(lambda: _counter(metrics_url, "substation_requests_cancelled_before_start") == 1)
        assert _load(metrics_url) == 0
    finally:
        assert service.stop() == 0
    # Acknowledged: nothing went back to the queue with the connection.
    assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0


def test_the_balancer_counts_a_cancelled_session_as_a_free_point(stack_settings, broker):
    """Between two polls only events move the balancer's estimate: a full substation whose
    session was cancelled takes the next request at once, not after the next poll."""
    stack_settings.substations = 1
    stack_settings.poll_interval = 120.0  # no poll after the first within the test
    stack_settings.extra_env = {**stack_settings.extra_env, "STALE_AFTER": "600"}
    service, metrics_url = _start(stack_settings, capacity=1)
    balancer = balancer_process(stack_settings)
    try:
        balancer.start().wait_healthy()
        eventually(
            lambda: (
                metric(health_url(balancer), "balancer_substation_up", substation=SUBSTATION) == 1
            ),
            what="the balancer's first poll",
        )
        first = broker.send_request(ev_id="EV1")
        eventually(lambda: _load(metrics_url) == 1, what="the first session started")
        _cancel(broker, first, ev_id="EV1")
        eventually(lambda: _load(metrics_url) == 0, what="the point freed")
        broker.send_request(ev_id="EV2")
        # Without the cancel counted, the balancer sees the substation full until its next
        # poll (two minutes away) and holds the request.
        eventually(lambda: _load(metrics_url) == 1, what="the next request routed and started")
        assert metric(health_url(balancer), contract.HELD_METRIC, priority="standard") == 0
    finally:
        assert balancer.stop() == 0
        assert service.stop() == 0
