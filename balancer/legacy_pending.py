"""Emptying the pending queue of an earlier version into today's, then deleting it.

A queue's arguments cannot change in place (a redeclare with others fails with
PRECONDITION_FAILED), so the pending queue's single active consumer and length limit came with
a new name (``contract.PENDING_QUEUE``). Requests accepted by an earlier version may still wait
in ``contract.LEGACY_PENDING_QUEUE``. Each balancer, from start and then every ``interval``
(a service of an earlier version still running may declare and bind it again), checks for it
passively and, if it is there:

1. unbinds it from the requests exchange, so that new requests go to today's queue alone (once
   today's is there: a request must not become unroutable);
2. moves each request into today's queue, through the requests exchange, acknowledging it only
   once the broker has confirmed the copy, so a crash leaves it in the old queue or in both
   (the ledger takes a copy for what it is);
3. deletes the old queue once it is empty, has no consumer (a balancer of the earlier version
   holding requests from it), and is still so ``SETTLE`` seconds later (quorum queues do not
   support ``if_empty``). What is left is a narrow window: a service of the earlier version
   that binds it again and publishes to it in the moment before the delete.

Several balancers may do this at once: a request is moved by the one that got it. A copy the
broker refuses (today's queue is full) goes back to the old queue for the next round.

It runs on a thread and connection of its own, so that the passive check (a missing queue
closes its channel) costs the balancer's own channel nothing. Where the admin alone declares
the topology (``DECLARE_TOPOLOGY=0``), balancers may not unbind or delete it, and the admin
runs one round by hand::

    python -m balancer.legacy_pending amqp://admin:...@rabbitmq:5672/smartgrid
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

import pika
import pika.exceptions

from smartgrid import contract
from smartgrid.amqp.link import connection_parameters, parse_urls

log = logging.getLogger(__name__)

NOT_FOUND = 404

#: Seconds between checks for an old pending queue.
CHECK_INTERVAL = 60.0
#: Seconds the old queue must stay empty and unused before it is deleted.
SETTLE = 5.0


def _empty_and_unused(channel: pika.adapters.blocking_connection.BlockingChannel) -> bool:
    state = channel.queue_declare(contract.LEGACY_PENDING_QUEUE, passive=True).method
    return state.message_count == 0 and state.consumer_count == 0


def move_legacy_pending(url: str, *, name: str, settle: float = SETTLE) -> int | None:
    """One round on the broker at ``url``: the requests moved, or None if there was no old
    queue (or it has been deleted now that it is empty, after moving them)."""
    parameters = connection_parameters(url, name=name)
    user = parameters.credentials.username
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        try:
            channel.queue_declare(contract.LEGACY_PENDING_QUEUE, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == NOT_FOUND:
                return None
            raise
        # Today's queue must be there before the old one stops receiving requests (a missing
        # one closes the channel: the next round tries again).
        channel.queue_declare(contract.PENDING_QUEUE, passive=True)
        channel.queue_unbind(
            contract.LEGACY_PENDING_QUEUE,
            contract.REQUESTS_EXCHANGE,
            contract.REQUEST_ROUTING_KEY,
        )
        channel.confirm_delivery()
        moved = 0
        while True:
            method, _properties, body = channel.basic_get(contract.LEGACY_PENDING_QUEUE)
            if method is None:
                break
            try:
                channel.basic_publish(
                    contract.REQUESTS_EXCHANGE,
                    contract.REQUEST_ROUTING_KEY,
                    body,
                    pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=pika.DeliveryMode.Persistent,
                        user_id=user,
                    ),
                    mandatory=True,
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                log.warning("moving a request out of %s: %s", contract.LEGACY_PENDING_QUEUE, exc)
                channel.basic_nack(method.delivery_tag, requeue=True)
                return moved
            channel.basic_ack(method.delivery_tag)
            moved += 1
        # Quorum queues cannot be deleted "if empty", so: empty, unused (no earlier version's
        # balancer holds requests from it), and still so once another mover's copy in flight
        # has had time to be confirmed (or refused and put back).
        if not _empty_and_unused(channel):
            return moved
        connection.sleep(settle)
        if not _empty_and_unused(channel):
            return moved
        channel.queue_delete(contract.LEGACY_PENDING_QUEUE)
        log.warning(
            "moved %d request(s) from %s (an earlier version's pending queue) to %s, and "
            "deleted it",
            moved,
            contract.LEGACY_PENDING_QUEUE,
            contract.PENDING_QUEUE,
        )
        return None
    finally:
        if connection.is_open:
            connection.close()


class LegacyPendingMover:
    """Runs :func:`move_legacy_pending` at start and every ``interval``, on a thread."""

    def __init__(self, amqp_url: str, *, name: str, interval: float = CHECK_INTERVAL) -> None:
        self._urls = parse_urls(amqp_url)
        self._name = name
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-legacy", daemon=True)
        #: Requests moved so far (for tests and the log).
        self.moved = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            url = self._urls[attempt % len(self._urls)]
            attempt += 1
            delay = self._interval
            try:
                moved = move_legacy_pending(url, name=f"{self._name}-legacy")
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("checking for %s failed: %s", contract.LEGACY_PENDING_QUEUE, exc)
                delay = min(self._interval, 5.0)
            else:
                if moved is not None:
                    self.moved += moved
                    delay = min(self._interval, 1.0)  # not gone yet: again soon
            self._stopping.wait(delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m balancer.legacy_pending",
        description=f"Move the requests of {contract.LEGACY_PENDING_QUEUE} (an earlier "
        f"version's pending queue) into {contract.PENDING_QUEUE}, then delete it.",
    )
    parser.add_argument("amqp_url", help="a broker URL whose user may do so (the admin's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    moved = move_legacy_pending(args.amqp_url, name="legacy-pending")
    if moved is not None:
        print(f"moved {moved}; {contract.LEGACY_PENDING_QUEUE} is not empty and unused yet")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
