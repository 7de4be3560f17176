"""Setting aside a message a consumer cannot process, with the reason, without losing it."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from smartgrid import contract
from smartgrid.amqp import Delivery, Link
from smartgrid.events import EventPublisher

log = logging.getLogger(__name__)


class DeadLetterer:
    """Moves messages to the dead-letter queue and says so with a ``request.dead_lettered``
    event (I/O thread only)."""

    def __init__(self, link: Link, events: EventPublisher) -> None:
        self._link = link
        self._events = events

    def dead_letter(self, delivery: Delivery, *, reason: str, source: str) -> Future:
        """Move ``delivery`` to the dead-letter queue with ``reason``.

        The original is acknowledged only once the dead-letter queue has confirmed the copy;
        if that fails the original is rejected back to its queue, whose delivery limit
        dead-letters it through the broker in the end. The copy's confirmation is returned:
        once it is done (and its callbacks have run) the original is settled.
        """
        log.warning("dead-lettering a message from %s: %s", source, reason)
        headers = {
            contract.REASON_HEADER: reason[:1000],
            contract.SOURCE_HEADER: source,
            "x-original-exchange": delivery.exchange,
            "x-original-routing-key": delivery.routing_key,
        }
        copy = self._link.publish(contract.DEAD_LETTER_EXCHANGE, "", delivery.body, headers=headers)

        def settle(result: Future) -> None:
            if result.exception() is not None:
                log.error(
                    "could not dead-letter (%s); returning it to %s", result.exception(), source
                )
                self._link.reject(delivery, requeue=True)
                return
            self._link.ack(delivery)
            request_id, ev_id = contract.request_identity(delivery.body)
            self._events.publish(
                contract.RequestDeadLettered(
                    at=time.time(),
                    reason=reason[:1000],
                    source=source,
                    request_id=request_id,
                    ev_id=ev_id,
                )
            )

        copy.add_done_callback(settle)
        return copy

    def poisoned(self, delivery: Delivery, error: Exception, *, source: str) -> None:
        """Dead-letter a message its consumer kept failing on (a ``ConsumerSpec.on_poison``
        hook)."""
        deliveries = int(delivery.headers.get("x-delivery-count", 0)) + 1
        self.dead_letter(
            delivery,
            reason=f"the consumer failed on it {deliveries} times: {type(error).__name__}: {error}",
            source=source,
        )
