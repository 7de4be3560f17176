"""python -m smartgrid.tools.deadletters: list and replay dead-lettered messages.

A message lands in ``smartgrid.dead-letters`` either because a consumer set it aside (the
reason is in ``x-smartgrid-reason``) or because the broker gave up on it after the queue's
delivery limit (the reason is in ``x-death``). Listing leaves every message where it is;
replaying sends the chosen ones back to be routed again (a charge request goes back to the
pending queue, even if it had already been routed to a substation) and removes them from the
dead-letter queue only once the broker has confirmed the copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import pika
import pika.exceptions

from smartgrid import contract
from smartgrid.amqp import parse_urls
from smartgrid.config import DEFAULT_AMQP_URL, amqp_url_from_env


@dataclass
class DeadLetter:
    position: int
    request_id: str | None
    ev_id: str | None
    reason: str
    source: str
    dead_lettered_at: float | None
    body: str

    @classmethod
    def from_message(
        cls, position: int, properties: pika.BasicProperties, body: bytes
    ) -> DeadLetter:
        headers = properties.headers or {}
        reason = _text(headers.get(contract.REASON_HEADER))
        source = _text(headers.get(contract.SOURCE_HEADER))
        deaths = headers.get("x-death") or []
        if deaths:
            death = deaths[0]
            reason = reason or f"broker: {_text(death.get('reason'))} (count {death.get('count')})"
            source = source or _text(death.get("queue"))
        request_id, ev_id = contract.request_identity(body)
        return cls(
            position=position,
            request_id=request_id,
            ev_id=ev_id,
            reason=reason or "unknown",
            source=source or "unknown",
            dead_lettered_at=float(properties.timestamp) if properties.timestamp else None,
            body=body.decode("utf-8", errors="replace")[:2000],
        )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _replay_target(body: bytes, headers: dict) -> tuple[str, str, bytes]:
    """Where a dead letter goes when replayed: (exchange, routing key, body)."""
    for decode in (contract.RoutedRequest.from_body, contract.ChargeRequest.from_body):
        try:
            message = decode(body)
        except contract.InvalidMessage:
            continue
        request = (
            message.back_to_pending() if isinstance(message, contract.RoutedRequest) else message
        )
        return contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, request.to_body()
    exchange = _text(headers.get("x-original-exchange"))
    routing_key = _text(headers.get("x-original-routing-key"))
    deaths = headers.get("x-death") or []
    if not exchange and deaths:
        exchange = _text(deaths[0].get("exchange"))
        keys = deaths[0].get("routing-keys") or [""]
        routing_key = _text(keys[0])
    return exchange, routing_key, body


def _connect(url: str) -> tuple[pika.BlockingConnection, Any]:
    parameters = [pika.URLParameters(u) for u in parse_urls(url)]
    connection = pika.BlockingConnection(parameters)
    return connection, connection.channel()


def list_dead_letters(url: str, limit: int) -> list[DeadLetter]:
    connection, channel = _connect(url)
    try:
        found = []
        for position in range(1, limit + 1):
            method, properties, body = channel.basic_get(contract.DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                break
            found.append(DeadLetter.from_message(position, properties, body))
        return found
    finally:
        connection.close()  # everything taken without an ack goes back, in place


def replay_dead_letters(url: str, *, request_ids: set[str] | None, limit: int) -> list[DeadLetter]:
    """Replay the dead letters of ``request_ids`` (all when None); return those replayed."""
    connection, channel = _connect(url)
    channel.confirm_delivery()
    replayed = []
    try:
        for position in range(1, limit + 1):
            method, properties, body = channel.basic_get(contract.DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                break
            letter = DeadLetter.from_message(position, properties, body)
            if request_ids is not None and letter.request_id not in request_ids:
                continue  # left unacknowledged: back in the queue when we close
            exchange, routing_key, payload = _replay_target(body, properties.headers or {})
            channel.basic_publish(
                exchange,
                routing_key,
                payload,
                pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    timestamp=int(time.time()),
                    headers={"x-smartgrid-replayed": True},
                ),
                mandatory=True,
            )  # raises if unroutable or refused: the original then stays dead-lettered
            channel.basic_ack(method.delivery_tag)
            replayed.append(letter)
        return replayed
    finally:
        if connection.is_open:
            connection.close()


def _print_table(letters: list[DeadLetter]) -> None:
    if not letters:
        print("no dead letters")
        return
    for letter in letters:
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.dead_lettered_at))
            if letter.dead_lettered_at
            else "?"
        )
        print(
            f"{letter.position:>4}  {when}  request {letter.request_id or '-'}  ev "
            f"{letter.ev_id or '-'}  from {letter.source}"
        )
        print(f"      reason: {letter.reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smartgrid.tools.deadletters",
        description="List or replay the messages in the dead-letter queue "
        "(smartgrid.dead-letters).",
        epilog=f"environment variables:\n  AMQP_URL   the broker (default {DEFAULT_AMQP_URL})\n"
        "  AMQP_PASSWORD_FILE   a file holding its password (quoted into AMQP_URL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--amqp-url", default=amqp_url_from_env())
    parser.add_argument(
        "--limit", type=int, default=1000, help="look at most at this many messages"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="show dead letters and why (leaves them in place)")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    replay = sub.add_parser("replay", help="send dead letters back to be routed again")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument(
        "--request-id", action="append", dest="request_ids", help="this request (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            letters = list_dead_letters(args.amqp_url, args.limit)
            if args.json:
                print(json.dumps([asdict(letter) for letter in letters], indent=2))
            else:
                _print_table(letters)
        else:
            ids = None if args.all else set(args.request_ids)
            replayed = replay_dead_letters(args.amqp_url, request_ids=ids, limit=args.limit)
            print(f"replayed {len(replayed)} dead letter(s)")
            for letter in replayed:
                print(f"  request {letter.request_id or '-'} ({letter.reason})")
    except pika.exceptions.AMQPError as exc:
        print(f"deadletters: broker error: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
