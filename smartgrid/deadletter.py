"""Setting aside a message a consumer cannot process, with the reason, without losing it."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future

from smartgrid import contract
from smartgrid.amqp import Delivery, Link

log = logging.getLogger(__name__)


def _identity(body: bytes) -> tuple[str | None, str | None]:
    """The request and EV ids of a message, where they are readable and valid."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    request_id = data.get("request_id")
    ev_id = data.get("ev_id")
    valid_request_id = isinstance(request_id, str) and contract.REQUEST_ID_PATTERN.fullmatch(
        request_id
    )
    return (request_id if valid_request_id else None), (
        ev_id if contract.is_valid_ev_id(ev_id) else None
    )


def dead_letter(link: Link, delivery: Delivery, *, reason: str, source: str) -> None:
    """Move ``delivery`` to the dead-letter queue with ``reason``; call on the I/O thread.

    The original is acknowledged only once the dead-letter queue has confirmed the copy; if
    that fails the original is rejected back to its queue, whose delivery limit dead-letters it
    through the broker in the end.
    """
    log.warning("dead-lettering a message from %s: %s", source, reason)
    headers = {
        contract.REASON_HEADER: reason[:1000],
        contract.SOURCE_HEADER: source,
        "x-original-exchange": delivery.exchange,
        "x-original-routing-key": delivery.routing_key,
    }
    copy = link.publish(contract.DEAD_LETTER_EXCHANGE, "", delivery.body, headers=headers)

    def settle(result: Future) -> None:
        if result.exception() is not None:
            log.error("could not dead-letter (%s); returning it to %s", result.exception(), source)
            link.reject(delivery, requeue=True)
            return
        link.ack(delivery)
        request_id, ev_id = _identity(delivery.body)
        event = contract.RequestDeadLettered(
            at=time.time(), reason=reason[:1000], source=source, request_id=request_id, ev_id=ev_id
        )
        link.publish(
            contract.EVENTS_EXCHANGE, event.kind, event.to_body(), mandatory=False, reliable=True
        )

    copy.add_done_callback(settle)


def dead_letter_poison(link: Link, delivery: Delivery, error: Exception, *, source: str) -> None:
    """Dead-letter a message its consumer kept failing on (a ``ConsumerSpec.on_poison`` hook)."""
    deliveries = int(delivery.headers.get("x-delivery-count", 0)) + 1
    dead_letter(
        link,
        delivery,
        reason=f"the consumer failed on it {deliveries} times: {type(error).__name__}: {error}",
        source=source,
    )
