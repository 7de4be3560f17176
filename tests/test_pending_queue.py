"""The pending queue on the real broker: backpressure (issue 12, item 8) and the move from an
earlier version's queue, whose arguments could not change in place."""

from __future__ import annotations

import urllib.parse
import uuid
from email.message import Message

import pika
import pika.exceptions
import pytest

from balancer.legacy_pending import move_legacy_pending
from smartgrid import contract
from stack.local import StackSettings, balancer_process, gateway_process, substation_process
from stack.processes import ProcessGroup
from tests.helpers import BrokerClient, eventually, http_json, rabbitmqctl


def _vhost(amqp_url: str) -> str:
    return urllib.parse.unquote(amqp_url.rsplit("/", 1)[1])


def _post(settings: StackSettings, ev_id: str) -> tuple[int, Message, dict]:
    return http_json(f"{settings.gateway_url}/charge", "POST", {"ev_id": ev_id})


def test_the_pending_queue_has_one_active_consumer_and_a_length_limit(broker):
    arguments = broker.channel.queue_declare(
        contract.PENDING_QUEUE, durable=True, arguments=contract.pending_arguments()
    )
    assert arguments.method.queue == contract.PENDING_QUEUE
    declared = next(
        d
        for d in contract.core_topology()
        if isinstance(d, contract.Queue) and d.name == contract.PENDING_QUEUE
    )
    assert declared.arguments["x-single-active-consumer"] is True
    assert declared.arguments["x-max-length"] == contract.PENDING_MAX_LENGTH
    assert declared.arguments["x-overflow"] == "reject-publish"


def test_a_full_pending_queue_gets_503_and_nothing_accepted_is_lost(
    stack_settings: StackSettings, broker: BrokerClient
) -> None:
    """The operator's policy lowers the limit in place to 3 (the lower of it and the queue's
    argument applies); the gateway answers 503 with Retry-After once the queue is full, and
    once a balancer and a substation run, every 202 completes once and no 503 ever starts."""
    policy = rabbitmqctl(
        "set_policy",
        "-p",
        _vhost(stack_settings.amqp_url),
        "--apply-to",
        "queues",
        "pending-limit",
        "^smartgrid\\.pending\\.v2$",
        '{"max-length": 3}',
    )
    assert policy.returncode == 0, policy.stderr
    stack_settings.session_seconds = 0.3
    stack_settings.poll_interval = 0.3
    stack_settings.extra_env = {"PUBLISH_TIMEOUT": "1"}
    events = broker.subscribe_events(contract.SessionStarted.kind, contract.SessionCompleted.kind)
    group = ProcessGroup()
    try:
        group.add(gateway_process(stack_settings)).wait_healthy()
        accepted: list[str] = []
        refused: list[str] = []
        for i in range(8):
            ev_id = f"EV-{i}"
            status, headers, body = _post(stack_settings, ev_id)
            if status == 202:
                assert not refused, "accepted after a refusal while nothing was consumed"
                accepted.append(ev_id)
            else:
                # The broker refused it (a negative confirm): the gateway's REFUSED outcome.
                assert (status, body["error"]) == (503, "busy"), (status, body)
                assert int(headers["Retry-After"]) > 0
                refused.append(ev_id)
        # A quorum queue with reject-publish refuses once it holds more than the limit.
        assert 3 <= len(accepted) <= 4 and refused, (accepted, refused)
        assert broker.message_count(contract.PENDING_QUEUE) == len(accepted)

        group.add(substation_process(stack_settings, 0)).wait_healthy()
        group.add(balancer_process(stack_settings)).wait_healthy()
        # Every accepted request started and completed.
        seen = broker.events_until(events, lambda seen: len(seen) >= 2 * len(accepted))
        # Nothing more comes: the refused requests were never enqueued.
        assert broker.message_count(contract.PENDING_QUEUE) == 0
        seen += broker.events(events)
        completions = [e.ev_id for e in seen if isinstance(e, contract.SessionCompleted)]
        starts = [e.ev_id for e in seen if isinstance(e, contract.SessionStarted)]
        assert sorted(completions) == sorted(accepted)
        assert not set(starts) & set(refused)

        # Room again: accepted at once.
        status, _headers, _body = _post(stack_settings, "EV-after")
        assert status == 202
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits


def test_a_refusal_by_the_other_queue_alone_gets_202_and_the_request_runs_once(
    stack_settings: StackSettings, broker: BrokerClient
) -> None:
    """A request goes to the pending queue and the history stream in one publish, and one
    negative confirm covers both: it does not say which refused. When the other queue refused
    (as a stream electing a leader does) the pending queue took the request, which will run, so
    a 503 would be a lie. Here a queue that refuses everything, bound beside the pending queue,
    stands in for that stream: the gateway's next try goes to the pending queue alone, is
    confirmed, and the answer is 202; the two copies in the pending queue make one session."""
    refuser = "test.refuses-everything"
    broker.channel.queue_declare(
        refuser, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    broker.channel.queue_bind(refuser, contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY)
    stack_settings.session_seconds = 0.3
    stack_settings.poll_interval = 0.3
    events = broker.subscribe_events(contract.SessionStarted.kind, contract.SessionCompleted.kind)
    group = ProcessGroup()
    try:
        group.add(gateway_process(stack_settings)).wait_healthy()
        status, headers, body = _post(stack_settings, "EV-1")
        assert status == 202, (status, body)
        request_id = body["request_id"]
        # The first publish's copy, and the try for the pending queue alone.
        assert broker.message_count(contract.PENDING_QUEUE) == 2
        assert broker.message_count(refuser) == 0

        group.add(substation_process(stack_settings, 0)).wait_healthy()
        group.add(balancer_process(stack_settings)).wait_healthy()
        seen = broker.events_until(
            events, lambda seen: any(isinstance(e, contract.SessionCompleted) for e in seen)
        )
        assert broker.message_count(contract.PENDING_QUEUE) == 0
        seen += broker.events(events)
        assert [(type(e), getattr(e, "request_id", None)) for e in seen] == [
            (contract.SessionStarted, request_id),
            (contract.SessionCompleted, request_id),
        ]
        eventually(
            lambda: (
                http_json(f"{stack_settings.gateway_url}{headers['Location']}")[2].get("status")
                == "completed"
            )
        )
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits


def _old_version_queue(channel, bodies: list[bytes]) -> None:
    """The pending queue as the earlier version declared and bound it, with requests in it."""
    channel.queue_declare(
        contract.LEGACY_PENDING_QUEUE,
        durable=True,
        arguments={k: v for k, v in contract.pending_arguments().items() if k in OLD_ARGUMENTS},
    )
    channel.queue_bind(
        contract.LEGACY_PENDING_QUEUE, contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY
    )
    for body in bodies:
        channel.basic_publish(
            "",
            contract.LEGACY_PENDING_QUEUE,
            body,
            pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )


OLD_ARGUMENTS = (
    "x-queue-type",
    "x-delivery-limit",
    "x-dead-letter-exchange",
    "x-dead-letter-strategy",
    "x-overflow",
)


def _requests(count: int) -> list[contract.ChargeRequest]:
    return [
        contract.ChargeRequest(uuid.uuid4().hex, f"EV-old-{i}", 1000.0 + i) for i in range(count)
    ]


def test_an_earlier_versions_pending_queue_is_moved_into_todays_and_deleted(amqp_url, broker):
    assert move_legacy_pending(amqp_url, name="test") is None  # none: nothing to do
    requests = _requests(5)
    _old_version_queue(broker.channel, [r.to_body() for r in requests])

    assert move_legacy_pending(amqp_url, name="test", settle=0.2) is None
    moved = [contract.ChargeRequest.from_body(b) for _, b in broker.get_all(contract.PENDING_QUEUE)]
    assert sorted(moved, key=lambda r: r.ev_id) == requests
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as gone:
        broker.channel.queue_declare(contract.LEGACY_PENDING_QUEUE, passive=True)
    assert gone.value.reply_code == 404


def test_a_request_accepted_before_the_upgrade_runs_once(
    stack_settings: StackSettings, broker: BrokerClient
) -> None:
    stack_settings.session_seconds = 0.3
    stack_settings.poll_interval = 0.3
    requests = _requests(3)
    _old_version_queue(broker.channel, [r.to_body() for r in requests])
    events = broker.subscribe_events(contract.SessionCompleted.kind)
    group = ProcessGroup()
    try:
        group.add(substation_process(stack_settings, 0)).wait_healthy()
        group.add(balancer_process(stack_settings)).wait_healthy()
        completed = broker.events_of_until(events, contract.SessionCompleted, 3)
        assert sorted(e.request_id for e in completed) == sorted(r.request_id for r in requests)
        # A request published now goes to today's queue alone.
        broker.send_request(ev_id="EV-new")
        eventually(lambda: broker.events(events), what="the new request completed")
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits


def test_the_old_queue_stays_while_a_balancer_of_the_earlier_version_consumes_it(amqp_url, broker):
    _old_version_queue(broker.channel, [r.to_body() for r in _requests(2)])
    old_balancer = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = old_balancer.channel()
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(contract.LEGACY_PENDING_QUEUE, lambda *_: None)  # holds one
        old_balancer.process_data_events(0.3)
        # The other one is moved; the held one stays, and so does the queue.
        assert move_legacy_pending(amqp_url, name="test", settle=0.2) == 1
        assert broker.message_count(contract.PENDING_QUEUE) == 1
    finally:
        old_balancer.close()  # the held request goes back to the old queue
    assert move_legacy_pending(amqp_url, name="test", settle=0.2) is None
    assert broker.message_count(contract.PENDING_QUEUE) == 2
