"""Consumers: what a Link consumes, and what it does with a message its consumer fails on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika

from smartgrid.contract import EventSubscription

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """A message handed to a consumer, tied to the channel it arrived on."""

    generation: int
    delivery_tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    properties: pika.BasicProperties
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        return self.properties.headers or {}

    @classmethod
    def received(
        cls, generation: int, method: Any, properties: pika.BasicProperties, body: bytes
    ) -> Delivery:
        """What pika handed a ``basic.deliver`` callback, on connection ``generation``."""
        return cls(
            generation=generation,
            delivery_tag=method.delivery_tag,
            exchange=method.exchange,
            routing_key=method.routing_key,
            redelivered=method.redelivered,
            properties=properties,
            body=body,
        )


@dataclass(frozen=True)
class ConsumerSpec:
    """What a Link consumes once connected, and how: a specification, not a consumer.

    ``queue`` is a queue of the contract, or a service's :class:`EventSubscription`, which the
    Link declares on each connection under a name of its own.
    """

    queue: str | EventSubscription
    on_message: Callable[[Delivery], None]
    prefetch: int = 100
    auto_ack: bool = False
    #: Called instead of requeueing when ``on_message`` has raised on the same message this
    #: many times (quorum queues count deliveries in ``x-delivery-count``), so the consumer can
    #: dead-letter it with the reason before the broker's delivery limit drops the reason.
    on_poison: Callable[[Delivery, Exception], None] | None = None
    poison_after: int = 5
    #: ``basic.consume`` arguments, asked for each time the consumer starts (a stream
    #: consumer's ``x-stream-offset`` moves on as it reads).
    arguments: Callable[[], dict[str, Any]] | None = None
    #: A stream consumer, never cancelled (not even by ``Link.cancel_consumers`` on stop): a
    #: stream sends whole chunks, pika rejects what reaches a cancelled consumer, and a stream
    #: answers a reject by closing the channel, publisher confirms still due with it. It ends
    #: with its channel.
    stream: bool = False
    #: Acknowledged by the Link once ``on_message`` has returned, or raised (logged, and not
    #: tried again): each message reaches the handler at least once, where ``auto_ack`` loses
    #: what is on its way when the connection goes. A durable event subscription takes this
    #: (it exists to miss nothing across a reconnect), and the subscriber takes an event
    #: delivered again as it takes one published again.
    ack_when_handled: bool = False

    def __post_init__(self) -> None:
        if self.auto_ack and (
            self.ack_when_handled
            or (isinstance(self.queue, EventSubscription) and self.queue.durable)
        ):
            raise ValueError(
                f"{self.description}: auto_ack would lose what is in flight at a reconnect; "
                "a durable subscription is consumed with ack_when_handled"
            )

    @property
    def description(self) -> str:
        return self.queue.prefix if isinstance(self.queue, EventSubscription) else self.queue


def message_handler(
    spec: ConsumerSpec,
    *,
    generation: int,
    requeue: Callable[[Delivery], object],
    link_name: str,
    ack: Callable[[Delivery], object] = lambda _delivery: None,
) -> Callable[[Any, Any, Any, bytes], None]:
    """The ``basic_consume`` callback for ``spec`` on the channel of ``generation``.

    A consumer that raises gets the message back in its queue (``requeue``) for another try,
    and the queue's delivery limit dead-letters it if it keeps failing; with ``on_poison`` the
    consumer sets it aside itself first, with the reason. With ``ack_when_handled`` the message
    is acknowledged (``ack``) once handled, whether the consumer returned or raised.
    """

    def on_message(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        delivery = Delivery.received(generation, method, properties, body)
        try:
            spec.on_message(delivery)
        except Exception as exc:
            log.exception("%s: consumer of %s failed on a message", link_name, spec.description)
            if spec.ack_when_handled:
                ack(delivery)
                return
            if spec.auto_ack:
                return
            deliveries = int(delivery.headers.get("x-delivery-count", 0)) + 1
            if spec.on_poison is not None and deliveries >= spec.poison_after:
                spec.on_poison(delivery, exc)
            else:
                requeue(delivery)
            return
        if spec.ack_when_handled:
            ack(delivery)

    return on_message
