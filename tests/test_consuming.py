"""What the Link does with a message its consumer fails on: no broker, a real handler."""

from __future__ import annotations

from types import SimpleNamespace

import pika
import pytest

from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery
from smartgrid.amqp.consuming import message_handler


def deliver(handler, *, delivery_count: int | None = None, tag: int = 7) -> None:
    headers = {} if delivery_count is None else {"x-delivery-count": delivery_count}
    method = SimpleNamespace(
        delivery_tag=tag, exchange="ex", routing_key="key", redelivered=bool(delivery_count)
    )
    handler(None, method, pika.BasicProperties(headers=headers), b"{}")


def failing(_delivery: Delivery) -> None:
    raise RuntimeError("cannot handle this")


def test_a_delivery_carries_the_generation_of_its_channel() -> None:
    received: list[Delivery] = []
    spec = ConsumerSpec("q", received.append)
    deliver(message_handler(spec, generation=3, requeue=lambda d: None, link_name="t"), tag=9)
    (delivery,) = received
    assert (delivery.generation, delivery.delivery_tag, delivery.routing_key) == (3, 9, "key")


@pytest.mark.parametrize("delivery_count", [None, 0, 3])
def test_a_failure_before_the_poison_limit_requeues_the_message(delivery_count: int | None) -> None:
    requeued: list[Delivery] = []
    poisoned: list[tuple[Delivery, Exception]] = []
    spec = ConsumerSpec(
        "q", failing, on_poison=lambda d, e: poisoned.append((d, e)), poison_after=5
    )
    handler = message_handler(spec, generation=1, requeue=requeued.append, link_name="t")
    deliver(handler, delivery_count=delivery_count)
    assert len(requeued) == 1 and poisoned == []


def test_the_failure_at_the_poison_limit_goes_to_on_poison_with_the_error() -> None:
    requeued: list[Delivery] = []
    poisoned: list[tuple[Delivery, Exception]] = []
    spec = ConsumerSpec(
        "q", failing, on_poison=lambda d, e: poisoned.append((d, e)), poison_after=5
    )
    handler = message_handler(spec, generation=1, requeue=requeued.append, link_name="t")
    deliver(handler, delivery_count=4)  # the fifth delivery
    assert requeued == []
    ((_delivery, error),) = poisoned
    assert str(error) == "cannot handle this"


def test_without_on_poison_a_failing_message_is_always_requeued_for_the_delivery_limit() -> None:
    requeued: list[Delivery] = []
    spec = ConsumerSpec("q", failing)
    handler = message_handler(spec, generation=1, requeue=requeued.append, link_name="t")
    deliver(handler, delivery_count=40)
    assert len(requeued) == 1


def test_an_auto_acked_message_is_neither_requeued_nor_poisoned() -> None:
    requeued: list[Delivery] = []
    spec = ConsumerSpec(
        contract.GATEWAY_EVENTS, failing, auto_ack=True, on_poison=lambda d, e: None
    )
    handler = message_handler(spec, generation=1, requeue=requeued.append, link_name="t")
    deliver(handler, delivery_count=10)
    assert requeued == []


def test_ack_when_handled_acknowledges_once_the_consumer_returns_or_raises() -> None:
    acked: list[Delivery] = []
    requeued: list[Delivery] = []
    received: list[Delivery] = []
    for on_message, expected in ((received.append, 1), (failing, 2)):
        spec = ConsumerSpec("q", on_message, ack_when_handled=True)
        handler = message_handler(
            spec, generation=1, requeue=requeued.append, link_name="t", ack=acked.append
        )
        deliver(handler, delivery_count=0)
        assert len(acked) == expected
    assert len(received) == 1 and requeued == []  # a failing event is not tried again


def test_a_consumer_without_ack_when_handled_is_not_acknowledged_by_the_handler() -> None:
    acked: list[Delivery] = []
    spec = ConsumerSpec("q", lambda d: None)
    deliver(
        message_handler(spec, generation=1, requeue=lambda d: None, link_name="t", ack=acked.append)
    )
    assert acked == []


def test_a_durable_subscription_is_refused_auto_ack_which_would_lose_what_is_in_flight() -> None:
    durable = contract.EventSubscription("x", (contract.RequestAccepted,), durable=True)
    with pytest.raises(ValueError, match="ack_when_handled"):
        ConsumerSpec(durable, lambda d: None, auto_ack=True)
    assert ConsumerSpec(durable, lambda d: None, ack_when_handled=True).ack_when_handled
    exclusive = contract.EventSubscription("x", (contract.RequestAccepted,))
    assert ConsumerSpec(exclusive, lambda d: None, auto_ack=True).auto_ack  # gone with it anyway


def test_auto_ack_and_ack_when_handled_together_are_refused() -> None:
    with pytest.raises(ValueError):
        ConsumerSpec("q", lambda d: None, auto_ack=True, ack_when_handled=True)
