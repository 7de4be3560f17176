"""A real balancer process with real substations: eligibility, holding, dead letters."""

from __future__ import annotations

import pika
import pika.exceptions

from smartgrid import contract
from stack.local import StackSettings, balancer_process, substation_process
from tests.helpers import BrokerClient, eventually, health_url, kill, metric, scrape


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
        eventually(
            lambda: metric(balancer.health_url, "balancer_held_requests", priority="standard") == 5
        )
        assert _routed(stack_settings, "substation-1") == 0

        substation = substation_process(stack_settings, 0).start()
        substation.wait_healthy()
        completed = broker.events_until(events, lambda seen: len(seen) >= 5, timeout=30)
        assert sorted(e.request_id for e in completed) == sorted(ids)
        assert metric(balancer.health_url, "balancer_held_requests", priority="standard") == 0
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
        kill(substations[0])
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


def _instance(metrics_url: str, substation: str) -> str:
    from tests.helpers import scrape

    for (name, labels), value in scrape(metrics_url).items():
        if name == contract.INFO_METRIC and value == 1 and dict(labels)["substation"] == substation:
            return dict(labels)[contract.INFO_INSTANCE_LABEL]
    raise AssertionError(f"no instance for {substation}")


def test_forged_counts_and_a_forged_leaving_do_not_pin_the_balancers_view(
    stack_settings: StackSettings, broker: BrokerClient
) -> None:
    """Issue 12, finding 5, with events a user who may publish them forges (the local stack's
    one user here): 100 request.routed for one substation, 100 session.completed for the
    other, a substation.leaving for a live one, announcements and completions from a phantom.
    Polls undo the counts (each in its direction), the leaving is refuted by the substation's
    own page, the phantom is never polled or routed to, and requests keep flowing."""
    import time
    import uuid

    stack_settings.poll_interval = 0.5
    stack_settings.session_seconds = 60
    stack_settings.capacity = 3
    stack_settings.extra_env = {"SHUTDOWN_GRACE": "0.2"}
    substations = [substation_process(stack_settings, i).start() for i in range(2)]
    for service in substations:
        service.wait_healthy()
    balancer = _balancer(stack_settings)
    balancer_url = health_url(balancer)

    def estimate(substation: str) -> float | None:
        return metric(balancer_url, "balancer_estimated_load", substation=substation)

    try:
        eventually(lambda: _up(stack_settings, "substation-1") == 1)
        eventually(lambda: _up(stack_settings, "substation-2") == 1)
        two = _instance(health_url(substations[1]), "substation-2")
        # Two sessions run at substation-2 (sent straight to its queue): its true load is 2.
        for i in range(2):
            # Cars of their own: a car that is charging holds back any other request for it.
            broker.send_to_substation("substation-2", ev_id=f"EV-there-{i}")
        eventually(lambda: estimate("substation-2") == 2)
        now = time.time()
        for _ in range(100):
            request_id = uuid.uuid4().hex
            broker.publish_event(
                contract.RequestRouted(now, request_id, "EVX", "substation-1", "forger")
            )
            broker.publish_event(
                contract.SessionCompleted(now, request_id, "EVX", "substation-2", two, now)
            )
        # A genuine duplicate (an outbox resend) of one routed event counts once.
        duplicate = contract.RequestRouted(now, uuid.uuid4().hex, "EVY", "substation-1", "b2")
        broker.publish_event(duplicate)
        broker.publish_event(duplicate)
        broker.publish_event(contract.SubstationLeaving(now, "substation-2", two))
        broker.publish_event(
            contract.SubstationAnnounced(
                now, "phantom", "p1", 1000, "http://127.0.0.1:9/metrics", 1.0
            )
        )
        broker.publish_event(
            contract.SessionCompleted(now, uuid.uuid4().hex, "E", "phantom", "p1", now)
        )
        eventually(lambda: (estimate("substation-1") or 0) >= 90, what="the forged routed counted")

        # A few polls later both estimates are the truth again, and the substation the forged
        # leaving named is eligible again.
        eventually(
            lambda: estimate("substation-1") == 0 and estimate("substation-2") == 2,
            timeout=30,
            what="the polls undoing the forged counts",
        )
        eventually(lambda: _up(stack_settings, "substation-2") == 1, timeout=30)
        assert _up(stack_settings, "phantom") == 0  # announced, never read: never eligible
        events = broker.subscribe_events(contract.SessionStarted.kind)
        ids = [broker.send_request(ev_id=f"EV{i}") for i in range(4)]
        started = broker.events_of_until(events, contract.SessionStarted, 4)
        assert sorted(e.request_id for e in started) == sorted(ids)
        # Balanced on the true loads (0 of 3 and 2 of 3): three there, one here.
        by_substation = [e.substation for e in started]
        assert by_substation.count("substation-1") == 3, by_substation
        assert _routed(stack_settings, "phantom") == 0
    finally:
        assert balancer.stop() == 0
        for service in substations:
            assert service.stop() == 0


def _queue_exists(url: str, queue: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_a_forgotten_dead_substations_queue_is_drained_then_deleted(
    stack_settings: StackSettings, broker: BrokerClient, amqp_url: str
) -> None:
    """Issue 11, defect 4: a substation killed for good (as a scaled-out replica is when it is
    recreated under a new id) has its queue drained, and once it is forgotten, deleted; its
    series leave the balancer's page. The live one keeps its queue and its series."""
    stack_settings.poll_interval = 0.5
    stack_settings.session_seconds = 0.2
    stack_settings.substations = 2
    substations = [substation_process(stack_settings, i).start() for i in range(2)]
    for s in substations:
        s.wait_healthy()
    balancer = _balancer(stack_settings, STALE_AFTER="2", DRAIN_AFTER="3", FORGET_AFTER="6")
    dead_queue = contract.substation_queue_name("substation-1")
    live_queue = contract.substation_queue_name("substation-2")
    completions = broker.subscribe_events(contract.SessionCompleted.kind)
    completed: set[str] = set()

    def all_completed(requests: set[str]) -> bool:
        completed.update(
            e.request_id for e in broker.events_of(completions, contract.SessionCompleted)
        )
        return requests <= completed

    try:
        eventually(lambda: _up(stack_settings, "substation-1") == 1)
        eventually(lambda: _up(stack_settings, "substation-2") == 1)
        kill(substations[0])
        # Routed there before its death was noticed: waiting in its queue.
        stranded = {broker.send_to_substation("substation-1", ev_id=f"EV{i}") for i in range(5)}
        eventually(
            lambda: all_completed(stranded),
            what="the stranded requests completed elsewhere",
            timeout=60,
        )
        eventually(
            lambda: not _queue_exists(amqp_url, dead_queue),
            what="the dead substation's queue deleted",
            timeout=60,
        )
        page = scrape(balancer.health_url)
        left = [series for series in page if "substation-1" in dict(series[1]).values()]
        assert not left, left
        assert _queue_exists(amqp_url, live_queue)
        eventually(lambda: _up(stack_settings, "substation-2") == 1)
        # It stays deleted: the balancer does not declare it again, and routing goes on.
        later = {broker.send_request()}
        eventually(lambda: all_completed(later), what="a later request completed", timeout=30)
        assert not _queue_exists(amqp_url, dead_queue)
    finally:
        assert balancer.stop() == 0
        for s in substations:
            s.stop()
