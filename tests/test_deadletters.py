"""Dead letters: set aside with a reason, listed without being consumed, replayed on demand."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pika

from smartgrid import contract
from tests.helpers import BrokerClient, eventually


def _cli(amqp_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smartgrid.tools.deadletters", "--amqp-url", amqp_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _dead_letter_by_hand(broker: BrokerClient, body: bytes, reason: str) -> None:
    broker.channel.basic_publish(
        contract.DEAD_LETTER_EXCHANGE,
        "",
        body,
        pika.BasicProperties(
            delivery_mode=2,
            timestamp=int(time.time()),
            headers={
                contract.REASON_HEADER: reason,
                contract.SOURCE_HEADER: contract.PENDING_QUEUE,
            },
        ),
        mandatory=True,
    )


def _poison_through_the_delivery_limit(broker: BrokerClient) -> str:
    """A request that every consumer rejects: the broker dead-letters it at the limit."""
    request_id = broker.send_request(ev_id="EV-POISON")
    for _ in range(contract.DELIVERY_LIMIT + 1):
        method = eventually(
            lambda: broker.get_one(contract.PENDING_QUEUE),
            what="the request back in pending",
        )
        broker.channel.basic_reject(method.delivery_tag, requeue=True)
    return request_id


def test_listing_shows_reasons_and_leaves_the_dead_letters_in_place(amqp_url, broker):
    request = contract.ChargeRequest(uuid.uuid4().hex, "EV-BAD", time.time())
    _dead_letter_by_hand(broker, request.to_body(), "invalid charge request: made up for the test")
    poisoned = _poison_through_the_delivery_limit(broker)
    eventually(lambda: broker.message_count(contract.DEAD_LETTER_QUEUE) == 2)

    result = _cli(amqp_url, "list", "--json")
    assert result.returncode == 0, result.stderr
    letters = {letter["request_id"]: letter for letter in json.loads(result.stdout)}
    assert letters[request.request_id]["reason"] == "invalid charge request: made up for the test"
    assert letters[request.request_id]["ev_id"] == "EV-BAD"
    assert "delivery_limit" in letters[poisoned]["reason"]
    assert letters[poisoned]["source"] == contract.PENDING_QUEUE

    table = _cli(amqp_url, "list")
    assert "made up for the test" in table.stdout
    assert broker.message_count(contract.DEAD_LETTER_QUEUE) == 2


def test_replay_sends_chosen_dead_letters_back_to_pending_and_keeps_the_rest(amqp_url, broker):
    first = contract.ChargeRequest(uuid.uuid4().hex, "EV-1", time.time())
    routed = contract.RoutedRequest(
        uuid.uuid4().hex, "EV-2", time.time(), "substation-9", time.time(), "b"
    )
    _dead_letter_by_hand(broker, first.to_body(), "fixed since")
    _dead_letter_by_hand(broker, routed.to_body(), "fixed since")
    eventually(lambda: broker.message_count(contract.DEAD_LETTER_QUEUE) == 2)

    result = _cli(amqp_url, "replay", "--request-id", routed.request_id)
    assert result.returncode == 0, result.stderr
    assert "replayed 1" in result.stdout
    eventually(lambda: broker.message_count(contract.DEAD_LETTER_QUEUE) == 1)
    pending = broker.get_all(contract.PENDING_QUEUE)
    assert len(pending) == 1
    back = contract.ChargeRequest.from_body(pending[0][1])
    assert (back.request_id, back.ev_id, back.rerouted_from) == (
        routed.request_id,
        "EV-2",
        "substation-9",
    )

    result = _cli(amqp_url, "replay", "--all")
    assert "replayed 1" in result.stdout
    assert broker.message_count(contract.DEAD_LETTER_QUEUE) == 0
    assert [
        contract.ChargeRequest.from_body(b).request_id
        for _, b in broker.get_all(contract.PENDING_QUEUE)
    ] == [first.request_id]


def test_the_command_reports_an_unreachable_broker_clearly():
    result = _cli("amqp://guest:guest@127.0.0.1:1/%2F", "list")
    assert result.returncode == 1
    assert "broker error" in result.stderr
