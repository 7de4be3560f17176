"""Publishing lifecycle events (every service's, through one :class:`EventPublisher`),
batched per kind when they arise together.

Every subscriber pays per delivery, not per byte: under load, a request's ``request.routed``,
``session.started`` and ``session.completed`` would otherwise cost each subscriber (the
gateways, the balancers, a loadgen observer) three deliveries, and the broker a publish and a
confirm apiece. Events published during one turn of the I/O loop (say, for the dozen
deliveries one socket read brought in) go out as one message per kind at the end of that turn,
so batching adds no delay: a lone event still leaves at once, as a plain single-event message.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable

from smartgrid import contract
from smartgrid.amqp import Delivery, Link
from smartgrid.senders import Senders

log = logging.getLogger(__name__)

#: A batch is closed at this many events even within one turn, so a message stays small.
MAX_BATCH = 256


class EventPublisher:
    """Publishing of lifecycle events over a :class:`Link` (I/O thread only).

    Each event's future succeeds when the broker has confirmed the message that carried it.
    Events are "reliable" publishes by default: batched, and while the broker is away they wait
    in the Link's outbox. An event that is only worth something now (an announcement, a
    greeting) is published with ``reliable=False``: at once, on its own, or not at all.

    An event about a delivery (a session's end) is bound to the connection the delivery came
    on, ``generation``: it goes out on that connection or not at all, never from the outbox
    on a later one, because once that connection is lost the broker has handed the delivery
    to someone else.
    """

    def __init__(self, link: Link, *, max_batch: int = MAX_BATCH) -> None:
        self._link = link
        self._max_batch = max_batch
        #: By (kind, generation the events are bound to, or None).
        self._waiting: dict[
            tuple[str, int | None], list[tuple[contract.Event, concurrent.futures.Future]]
        ] = {}
        self._flush_scheduled = False
        # What waits for the end of the turn must not be left behind by a stop.
        link.on_stop(self.flush)

    def publish(
        self, event: contract.Event, *, reliable: bool = True, generation: int | None = None
    ) -> concurrent.futures.Future:
        if not reliable:
            return self._link.publish(
                contract.EVENTS_EXCHANGE,
                event.kind,
                event.to_body(),
                mandatory=False,
                generation=generation,
            )
        future: concurrent.futures.Future = concurrent.futures.Future()
        key = (event.kind, generation)
        batch = self._waiting.setdefault(key, [])
        batch.append((event, future))
        if len(batch) >= self._max_batch:
            self._send(key)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            # A zero-delay timer runs once the loop has handled everything the current
            # socket read brought in: the end of this turn.
            self._link.call_later(0, self.flush)
        return future

    def flush(self) -> None:
        """Send every waiting event now."""
        self._flush_scheduled = False
        for key in list(self._waiting):
            self._send(key)

    def _send(self, key: tuple[str, int | None]) -> None:
        batch = self._waiting.pop(key, None)
        if not batch:
            return
        kind, generation = key
        body = contract.encode_events([event for event, _ in batch])
        confirmation = self._link.publish(
            contract.EVENTS_EXCHANGE,
            kind,
            body,
            mandatory=False,
            reliable=generation is None,
            generation=generation,
        )
        confirmation.add_done_callback(_settle([future for _, future in batch]))


def events_in(
    delivery: Delivery,
    senders: Senders,
    decode: Callable[[str, bytes], list[contract.Event]] = contract.decode_events,
) -> list[contract.Event]:
    """The lifecycle events a delivery carries (one, or a batch) that come from their owners
    (``senders``, by the delivery's ``user_id``); none if it breaks the contract. What is left
    out is logged: an event is information, so a bad one is dropped, not retried. ``decode``:
    :func:`smartgrid.contract.decode_events` or one that gives what it would."""
    try:
        events = decode(delivery.routing_key, delivery.body)
    except contract.InvalidMessage as exc:
        log.warning("ignoring an invalid %s event: %s", delivery.routing_key, exc)
        return []
    return senders.trusted(events, delivery.properties.user_id)


def _settle(
    futures: list[concurrent.futures.Future],
) -> Callable[[concurrent.futures.Future], None]:
    def settle(confirmation: concurrent.futures.Future) -> None:
        error = confirmation.exception()
        for future in futures:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    return settle
