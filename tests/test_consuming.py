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
