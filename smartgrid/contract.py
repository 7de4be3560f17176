"""The message contract: every exchange, queue, message and metric the services share.

This module is the only place the topology and the message formats are written down. Every
service declares the broker entities from here (so no two services can disagree on a queue's
arguments), and every consumer decodes what it receives with the functions here, which reject
anything malformed with a reason.

Flow of a charge request::

    gateway --(charge.request)--> [smartgrid.requests] --> smartgrid.pending.v2
    balancer <-- smartgrid.pending.v2 (one balancer at a time: single active consumer)
    balancer --(<substation id>)--> [smartgrid.dispatch] --> smartgrid.substation.<id>
    substation <-- smartgrid.substation.<id>

Every service publishes lifecycle events to the topic exchange ``smartgrid.events`` with the
event kind as routing key (``request.routed``, ``session.started``, ``session.completed``,
``request.dead_lettered``, ``substation.announced``, ``substation.leaving``,
``balancer.started``, and between substations ``session.lookup`` and ``session.lookup_reply``).
``request.accepted`` is no longer published: the request itself says it was accepted, and the
accepting gateway records it; it is still understood, from gateways of earlier versions.

The busy kinds travel in batches: a publisher may put several events of one kind in a single
message, whose body is then a JSON array of event objects instead of one object (the services
do so for events that arise together, which under load is most of them). Consumers decode both
shapes with :func:`decode_events`. Batching is what keeps each request's three events from
costing every subscriber three deliveries: deliveries, not bytes, are what the broker and pika
spend their time on.

The history stream (``smartgrid.history``, see :func:`history_topology`) keeps every charge
request and every event about a request, in order, for a retention window: gateways and the
balancer replay it at start to rebuild request statuses, idempotency records and which EV is
busy. It is the one queue that is not a quorum queue.

All work queues are durable quorum queues with every argument explicit, so the declarations mean the
same on RabbitMQ 3.10 and 4.x (4.x changed the default delivery limit and refuses transient
non-exclusive queues). Messages are persistent JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeGuard

import msgspec

from smartgrid.numbers import NotANumber, finite_number
from smartgrid.power import CLASS_ORDER, MAX_CAR_KW, watts
from smartgrid.power_request import FieldError, PowerFields, parse_power_fields

SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------
REQUESTS_EXCHANGE = "smartgrid.requests"
REQUEST_ROUTING_KEY = "charge.request"
#: A copy of an accepted request for the history stream alone (not the pending queue): a
#: gateway sends one when its request did not show up in the stream (gateway/doubts.py).
REQUEST_COPY_ROUTING_KEY = "charge.request.copy"
#: A request for the pending queue alone (not the history stream): a gateway's retry after a
#: negative confirm of its first publish, which says that one of the two queues refused, not
#: which (gateway/broker.py ``accept``).
REQUEST_PENDING_ROUTING_KEY = "charge.request.pending"
#: The routing keys under which the history stream holds charge requests.
HISTORY_REQUEST_KEYS = (REQUEST_ROUTING_KEY, REQUEST_COPY_ROUTING_KEY)
#: One balancer at a time consumes it (single active consumer), so one decides for every
#: request which holds its EV; a full queue refuses publishes (backpressure). Queue arguments
#: cannot change in place, so these came with a new name: the earlier version's queue,
#: :data:`LEGACY_PENDING_QUEUE`, is moved into this one and deleted by the balancers
#: (balancer/legacy_pending.py).
PENDING_QUEUE = "smartgrid.pending.v2"
LEGACY_PENDING_QUEUE = "smartgrid.pending"
#: The most requests waiting in the pending queue; beyond it, publishes are refused
#: (``x-overflow: reject-publish``, a ``basic.nack``) and the gateway answers 503. A request
#: waiting in a queue this long is waiting for minutes at the least (a busy gateway accepts
#: about 1,100/s, and the substations drain far fewer), and each costs the broker about 1 kB of
#: memory (issue 12: 250,000 took 230 MB), so 100,000 keeps the broker's memory under 100 MB
#: and a driver gets a prompt 503 instead of a place in a queue hours long. Every service
#: declares the queue with the same arguments, so this is not a per-service setting (a
#: different value would make the declarations conflict, and a change would need a new
#: queue). An operator lowers it in place with a policy, and the lower of the two applies:
#: ``rabbitmqctl set_policy --apply-to queues pending-limit '^smartgrid\.pending\.v2$'
#: '{"max-length": 5000}'`` (README, Backpressure).
PENDING_MAX_LENGTH = 100_000
DISPATCH_EXCHANGE = "smartgrid.dispatch"
SUBSTATION_QUEUE_PREFIX = "smartgrid.substation."
EVENTS_EXCHANGE = "smartgrid.events"
DEAD_LETTER_EXCHANGE = "smartgrid.dead-letter"
DEAD_LETTER_QUEUE = "smartgrid.dead-letters"

#: A message delivered this many times without being acknowledged (its consumer crashed or
#: rejected it each time) is dead-lettered instead of crashing consumers forever. Explicit
#: because RabbitMQ 3.x has no default and 4.x defaults to 20.
DELIVERY_LIMIT = 5

#: Dead letters are kept for inspection and replay; they are never redelivered automatically,
#: so their own delivery limit only guards against a consumer that crashes on them.
DEAD_LETTER_DELIVERY_LIMIT = 1000

#: Headers a consumer sets when it dead-letters a message itself, saying why.
REASON_HEADER = "x-smartgrid-reason"
SOURCE_HEADER = "x-smartgrid-source"


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    durable: bool = True
    #: Only check that it exists (a passive declare, which needs no permission at all); a
    #: missing one closes the channel with 404 NOT_FOUND.
    passive: bool = False


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any]
    durable: bool = True
    #: Private to the connection that declares it, and deleted with it.
    exclusive: bool = False
    auto_delete: bool = False
    #: Only check that it exists (see :attr:`Exchange.passive`).
    passive: bool = False


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


Declaration = Exchange | Queue | Binding


def _quorum_arguments(*, dead_letter: bool = True, delivery_limit: int = DELIVERY_LIMIT) -> dict:
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
    }
    if dead_letter:
        arguments |= {
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            # at-least-once dead-lettering keeps a message until the dead-letter queue has
            # confirmed it; it requires reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return arguments


def core_topology() -> list[Declaration]:
    """The broker entities every service may rely on; declaring them is idempotent."""
    return [
        Exchange(REQUESTS_EXCHANGE, "direct"),
        Exchange(DISPATCH_EXCHANGE, "direct"),
        Exchange(EVENTS_EXCHANGE, "topic"),
        Exchange(DEAD_LETTER_EXCHANGE, "fanout"),
        Queue(
            DEAD_LETTER_QUEUE,
            _quorum_arguments(dead_letter=False, delivery_limit=DEAD_LETTER_DELIVERY_LIMIT),
        ),
        Binding(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, ""),
        Queue(PENDING_QUEUE, pending_arguments()),
        Binding(PENDING_QUEUE, REQUESTS_EXCHANGE, REQUEST_ROUTING_KEY),
        Binding(PENDING_QUEUE, REQUESTS_EXCHANGE, REQUEST_PENDING_ROUTING_KEY),
    ]


def pending_arguments() -> dict[str, Any]:
    """The pending queue's arguments. RabbitMQ 3.10 and 4.x both support single active
    consumer, ``x-max-length`` and ``reject-publish`` on quorum queues; with reject-publish a
    quorum queue refuses publishes once it holds more than the limit (so it may hold one more)."""
    return _quorum_arguments() | {
        "x-single-active-consumer": True,
        "x-max-length": PENDING_MAX_LENGTH,
    }


def passively(declarations: list[Declaration]) -> list[Declaration]:
    """The same entities, checked rather than declared: for a service whose broker user may
    not declare them (``python -m smartgrid.definitions --admin-declares-topology``; an
    identical redeclare needs the configure permission, re-binding the write permission).
    Bindings are left out: AMQP cannot check one without making it."""
    return [
        dataclasses.replace(d, passive=True)
        for d in declarations
        if isinstance(d, (Exchange, Queue))
    ]


def topology(declarations: list[Declaration], *, declare: bool) -> list[Declaration]:
    """``declarations`` as they are (``declare``), or :func:`passively`."""
    return declarations if declare else passively(declarations)


# --------------------------------------------------------------------------------------------
# Power (issue 15): demand reports, shares with leases, operators' limit changes
# --------------------------------------------------------------------------------------------
#: Shares of a parent's limit, from the active allocator to one substation (routing key: its id).
POWER_EXCHANGE = "smartgrid.power"
#: Every substation's ``power.demand`` reports, for the allocator. Single active consumer: the
#: broker delivers to one balancer's allocator at a time, and to the next when its connection
#: closes, which is the allocator's failover.
POWER_REPORTS_QUEUE = "smartgrid.power.reports"
#: Only the newest report of each substation matters, and one older than a few leases is
#: stale: nothing is kept long enough to build a backlog while no allocator runs.
POWER_REPORTS_TTL_MS = 10_000
POWER_REPORTS_MAX_LENGTH = 100_000
#: The operators' limit overrides (``grid.limit``), kept for a week so that every balancer
#: replays all of them from the start of the stream and agrees on the limits in force.
GRID_LIMITS_STREAM = "smartgrid.grid.limits"
GRID_LIMITS_MAX_AGE = "7D"
POWER_SHARE_QUEUE_PREFIX = "smartgrid.power-share."


def power_topology() -> list[Declaration]:
    """The broker entities of power sharing, declared by whoever publishes to or consumes
    them (balancers, substations, the operator's command), after the core topology (whose
    events exchange it binds to). Apart from the core topology: the bindings to the events
    exchange need topic permission to bind ``power.demand`` and ``grid.limit``, which the
    gateway has no business holding."""
    return [
        Exchange(POWER_EXCHANGE, "direct"),
        Queue(
            POWER_REPORTS_QUEUE,
            {
                "x-queue-type": "quorum",
                "x-single-active-consumer": True,
                "x-message-ttl": POWER_REPORTS_TTL_MS,
                "x-max-length": POWER_REPORTS_MAX_LENGTH,
                "x-overflow": "drop-head",
            },
        ),
        Binding(POWER_REPORTS_QUEUE, EVENTS_EXCHANGE, "power.demand"),
        Queue(GRID_LIMITS_STREAM, {"x-queue-type": "stream", "x-max-age": GRID_LIMITS_MAX_AGE}),
        Binding(GRID_LIMITS_STREAM, EVENTS_EXCHANGE, "grid.limit"),
    ]


def power_topology_with_events() -> list[Declaration]:
    """The events exchange and :func:`power_topology`: what a connection that uses nothing
    else of the core topology declares (the allocator's, the operator's command)."""
    events = [d for d in core_topology() if isinstance(d, Exchange) and d.name == EVENTS_EXCHANGE]
    return events + power_topology()


def power_share_queue_name(substation_id: str) -> str:
    return POWER_SHARE_QUEUE_PREFIX + substation_id


def power_share_topology(substation_id: str) -> list[Declaration]:
    """A substation's queue of shares: its own (exclusive) and holding only the newest share,
    because an older one is replaced by it and must never wait in a backlog. Shares are also
    published with a per-message expiration of their lease. A substation that is down has no
    queue, and the shares meant for it are dropped: it would refuse them after a restart."""
    queue = power_share_queue_name(substation_id)
    return [
        Exchange(POWER_EXCHANGE, "direct"),
        Queue(
            queue,
            {"x-max-length": 1, "x-overflow": "drop-head"},
            durable=False,
            exclusive=True,
            auto_delete=True,
        ),
        Binding(queue, POWER_EXCHANGE, substation_id),
    ]


#: The log of requests and their lifecycle (an append-only stream, replayed at start).
HISTORY_STREAM = "smartgrid.history"
#: The defaults of IDEMPOTENCY_TTL, HISTORY_MAX_AGE and HISTORY_MAX_BYTES
#: (docs/driver-contract.md, "Sizing"). Every declarer of the stream (each service, and the
#: admin's definitions) must give it the same arguments, or the broker refuses the redeclare.
IDEMPOTENCY_TTL_SECONDS = 86_400
HISTORY_MAX_AGE_SECONDS = IDEMPOTENCY_TTL_SECONDS + 3_600
HISTORY_MAX_BYTES = 100_000_000


def history_topology(*, max_age_seconds: int, max_bytes: int) -> list[Declaration]:
    """The history stream, bound to the requests exchange (so a request reaches the stream and
    the pending queue in one publish, confirmed once both have it) and to every event kind that
    changes a request's status (:data:`HISTORY_EVENTS`). Retention drops whole segments older
    than ``max_age_seconds`` or beyond ``max_bytes``, whichever comes first."""
    if max_age_seconds <= 0 or max_bytes <= 0:
        raise ValueError("a history stream needs a positive age and size limit")
    # The exchanges are those of core_topology(), declared with it.
    declarations: list[Declaration] = [
        Queue(
            HISTORY_STREAM,
            {
                "x-queue-type": "stream",
                "x-max-age": f"{int(max_age_seconds)}s",
                "x-max-length-bytes": int(max_bytes),
                # Retention works per segment: keep segments small next to the limit, so that
                # what is dropped at once is a small part of what is kept.
                "x-stream-max-segment-size-bytes": max(
                    1_000_000, min(int(max_bytes) // 20, 500_000_000)
                ),
            },
        ),
        Binding(HISTORY_STREAM, REQUESTS_EXCHANGE, REQUEST_ROUTING_KEY),
        Binding(HISTORY_STREAM, REQUESTS_EXCHANGE, REQUEST_COPY_ROUTING_KEY),
    ]
    declarations += [Binding(HISTORY_STREAM, EVENTS_EXCHANGE, cls.kind) for cls in HISTORY_EVENTS]
    return declarations


def substation_queue_name(substation_id: str) -> str:
    return SUBSTATION_QUEUE_PREFIX + substation_id


def substation_topology(substation_id: str) -> list[Declaration]:
    """A substation's own queue, bound to the dispatch exchange by its id. One consumer at a
    time gets its messages (single active consumer): a second process started with the same
    id waits as a standby and never charges beside the first."""
    queue = substation_queue_name(substation_id)
    return [
        Queue(queue, _quorum_arguments() | {"x-single-active-consumer": True}),
        Binding(queue, DISPATCH_EXCHANGE, substation_id),
    ]


# --------------------------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------------------------
EV_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
SUBSTATION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
REQUEST_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
CLIENT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A fingerprint of a request body: 128 bits of SHA-256, as hex.
FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{32}")

EV_ID_RULE = "1 to 64 characters: letters, digits and . _ : - (starting with a letter or digit)"
CLIENT_RULE = "1 to 64 characters: letters, digits and . _ - (starting with a letter or digit)"
SUBSTATION_ID_RULE = (
    "1 to 63 characters: letters, digits, _ and - (starting with a letter or digit)"
)


def is_valid_ev_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and EV_ID_PATTERN.fullmatch(value) is not None


def is_valid_substation_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and SUBSTATION_ID_PATTERN.fullmatch(value) is not None


def is_valid_request_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value) is not None


def request_identity(body: bytes) -> tuple[str | None, str | None]:
    """The request and EV ids of any message body, where they are readable and valid: what
    can be said of a message that may break the contract (a dead letter, say)."""
    try:
        data = _load_json(body)
    except InvalidMessage:
        return None, None
    if not isinstance(data, dict):
        return None, None
    request_id, ev_id = data.get("request_id"), data.get("ev_id")
    return (
        request_id if is_valid_request_id(request_id) else None,
        ev_id if is_valid_ev_id(ev_id) else None,
    )


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
class InvalidMessage(ValueError):
    """A message that does not follow the contract; ``str(exc)`` is the reason."""


_ID_CHECKS = {
    "request_id": (REQUEST_ID_PATTERN, "32 lowercase hex digits"),
    "ev_id": (EV_ID_PATTERN, EV_ID_RULE),
    "substation": (SUBSTATION_ID_PATTERN, SUBSTATION_ID_RULE),
    "active_request_id": (REQUEST_ID_PATTERN, "32 lowercase hex digits"),
    "client": (CLIENT_PATTERN, CLIENT_RULE),
    "body_fingerprint": (FINGERPRINT_PATTERN, "32 lowercase hex digits"),
    # Grid nodes (feeders, sites) are named like substations, which are nodes too.
    "parent": (SUBSTATION_ID_PATTERN, SUBSTATION_ID_RULE),
    "node": (SUBSTATION_ID_PATTERN, SUBSTATION_ID_RULE),
}


#: The one field type beyond plain values: a JSON array of finite numbers.
NUMBERS = tuple[float, ...]


_FLOAT_ONLY = frozenset({float})


def _check_value(name: str, base: type, optional: bool, value: Any) -> Any:
    if value is None and optional:
        return None
    if base is NUMBERS:
        if not isinstance(value, list | tuple):
            raise InvalidMessage(f"field {name!r} must be an array of numbers")
        # At C speed, the common case: every item a float (as a float is written) and their
        # sum finite, so every item is. A report's arrays hold every running session's bounds,
        # thousands of them; anything else (an integer, an infinite sum) is checked item by
        # item below, which decides.
        if set(map(type, value)) <= _FLOAT_ONLY and math.isfinite(sum(value)):
            return tuple(value)
        try:
            return tuple(float(finite_number(v)) for v in value)
        except NotANumber as exc:
            raise InvalidMessage(f"field {name!r}: every item {exc}") from None
    if base is bool:
        if not isinstance(value, bool):
            raise InvalidMessage(f"field {name!r} must be true or false")
        return value
    if base is str:
        if not isinstance(value, str) or not value:
            raise InvalidMessage(f"field {name!r} must be a non-empty string")
        if name in _ID_CHECKS:
            pattern, rule = _ID_CHECKS[name]
            if pattern.fullmatch(value) is None:
                raise InvalidMessage(f"field {name!r} must be {rule}, got {value[:80]!r}")
        return value
    try:
        as_float = finite_number(value)
    except NotANumber as exc:
        raise InvalidMessage(f"field {name!r} {exc}") from None
    if base is int and not as_float.is_integer():
        raise InvalidMessage(f"field {name!r} must be an integer")
    return base(value)


#: Per message class: (name, base type, optional, required) of each field, worked out once,
#: because every consumer decodes thousands of messages a second at full load.
_SCHEMAS: dict[type, tuple[tuple[str, type, bool, bool], ...]] = {}


def _schema(cls: type) -> tuple[tuple[str, type, bool, bool], ...]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        entries = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            annotation = hints[f.name]
            args = typing.get_args(annotation)
            optional = type(None) in args
            base = next(a for a in args if a is not type(None)) if optional else annotation
            if base == NUMBERS:
                base = NUMBERS  # the one object, so that ``base is NUMBERS`` tells
            elif base not in (str, int, float, bool):
                raise TypeError(f"unsupported field type {annotation!r}")  # pragma: no cover
            entries.append((f.name, base, optional, f.default is dataclasses.MISSING))
        schema = _SCHEMAS[cls] = tuple(entries)
    return schema


def _field_check(name: str, base: type, optional: bool) -> Callable[[Any], Any]:
    """:func:`_check_value` for one field, with a shortcut for a value of exactly the field's
    type that passes (the type JSON gives, nearly always); anything else takes the full check,
    which decides and says why."""
    full = functools.partial(_check_value, name, base, optional)
    if base is NUMBERS:
        return full
    if base is str:
        id_check = _ID_CHECKS.get(name)
        if id_check is None:
            return lambda value: value if value.__class__ is str and value else full(value)
        fullmatch = id_check[0].fullmatch
        return lambda value: (
            value if value.__class__ is str and fullmatch(value) is not None else full(value)
        )
    if base is float:
        # x - x is 0.0 exactly when x is finite (NaN and the infinities give NaN).
        return lambda value: (
            value if value.__class__ is float and value - value == 0.0 else full(value)
        )
    if base is int:
        return lambda value: (
            value if value.__class__ is int and -_FLOAT_MAX < value < _FLOAT_MAX else full(value)
        )
    return full


_FLOAT_MAX = 1.7e308
_ABSENT = object()
_CHECKS: dict[type, tuple[tuple[str, Callable[[Any], Any], bool], ...]] = {}


def _decode_fields(cls: type, data: dict) -> dict[str, Any]:
    checks = _CHECKS.get(cls)
    if checks is None:
        checks = _CHECKS[cls] = tuple(
            (name, _field_check(name, base, optional), required)
            for name, base, optional, required in _schema(cls)
        )
    kwargs = {}
    for name, check, required in checks:
        value = data.get(name, _ABSENT)
        if value is _ABSENT:
            if required:
                raise InvalidMessage(f"missing field {name!r}")
            continue
        kwargs[name] = check(value)
    return kwargs


def _load_object(body: bytes) -> dict:
    return _checked_object(_load_json(body))


#: msgspec's JSON parser: 5 to 20 times as fast as Python's on these messages (a dozen
#: fields), and every service parses every message it receives. It accepts only standard JSON,
#: so whatever it refuses goes to Python's parser, which decides: the same values (NaN,
#: Infinity, a number beyond a double, a lone surrogate, UTF-16), the same reasons.
_parse_json = msgspec.json.Decoder().decode
_write_json = msgspec.json.Encoder().encode


def _load_json(body: bytes) -> Any:
    try:
        return _parse_json(body)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidMessage("body is nested too deeply") from None


def _checked_object(data: Any) -> dict:
    if not isinstance(data, dict):
        raise InvalidMessage("body is not a JSON object")
    version = data.get("v", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidMessage(f"unsupported schema version {version!r}")
    return data


_compact = json.JSONEncoder(separators=(",", ":")).encode


def _dump(obj: Any, **extra: Any) -> bytes:
    # Every field is a plain value (_schema allows no other), so reading them beats
    # dataclasses.asdict's deep copy two to four times over: a substation encodes two events
    # per request.
    payload = {"v": SCHEMA_VERSION}
    finite = True
    for name, base, _optional, _required in _schema(type(obj)):
        value = payload[name] = getattr(obj, name)
        if base is float:
            if value.__class__ is float and not math.isfinite(value):
                finite = False
        elif base is NUMBERS and value is not None and not all(map(math.isfinite, value)):
            finite = False
    payload.update(extra)
    if finite:
        return _write_json(payload)
    # msgspec writes NaN and Infinity as null, which an optional field would read as "not
    # given"; Python's NaN (not JSON) makes every consumer refuse the message, as it should.
    return _compact(payload).encode()


def _check_power_fields(message: Any) -> None:
    """A message's power fields follow the rules of the request's (those of POST /charge): a
    message may leave any of them out (it then means the default), never break them."""
    fields = (
        message.max_kw,
        message.min_kw,
        message.priority,
        getattr(message, "energy_kwh", None),
    )
    if fields == (None, None, None, None):
        return  # the commonest case, decoded thousands of times a second
    try:
        _power_of(message)
    except FieldError as exc:
        raise InvalidMessage(f"field {exc}") from None


def _power_of(message: Any) -> PowerFields:
    energy_kwh = getattr(message, "energy_kwh", None)
    # By type and value: True == 1 and 11 == 11.0, but a bool is no number here, and the
    # defaults' fields are what nearly every message carries.
    typed = (
        (message.max_kw.__class__, message.max_kw),
        (message.min_kw.__class__, message.min_kw),
        (message.priority.__class__, message.priority),
        (energy_kwh.__class__, energy_kwh),
    )
    try:
        return _parsed_power(typed)
    except TypeError:  # a value that cannot be a key is no valid field either: say which
        return _parsed_power.__wrapped__(typed)


@functools.lru_cache(maxsize=4096)
def _parsed_power(typed: tuple[tuple[type, Any], ...]) -> PowerFields:
    """parse_power_fields of each distinct set of values (a PowerFields is immutable)."""
    (_, max_kw), (_, min_kw), (_, priority), (_, energy_kwh) = typed
    return parse_power_fields(
        {"max_kw": max_kw, "min_kw": min_kw, "priority": priority, "energy_kwh": energy_kwh}
    )


def _check_at_least(message: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        if value is not None and value < low:
            raise InvalidMessage(f"field {name!r} must be at least {low:g}, got {value:g}")


class _CarriesPower:
    """What a message carrying a request's power fields (max_kw, min_kw, energy_kwh, priority)
    does with them: checks them when made or decoded, and gives them with the defaults."""

    def __post_init__(self) -> None:
        _check_power_fields(self)

    def power(self) -> PowerFields:
        """The request's power fields, defaults applied."""
        return _power_of(self)


@dataclass(frozen=True)
class ChargeRequest(_CarriesPower):
    """A driver's request to charge, as accepted by the gateway."""

    request_id: str
    ev_id: str
    accepted_at: float
    #: Set when a balancer moved the request out of the queue of a substation that died: it
    #: may have started there, and must run again elsewhere rather than count as a duplicate.
    rerouted_from: str | None = None
    #: The client (named in the gateway's tokens file) the request belongs to; None when the
    #: API is open. Kept in the history stream, so ownership survives a gateway restart.
    client: str | None = None
    #: Set when the request came with an ``Idempotency-Key`` (the request id is then derived
    #: from the client and the key): the fingerprint of the body, so that a repeat of the key
    #: with another body is told apart, by any gateway, after any restart.
    body_fingerprint: str | None = None
    #: The power fields (issue 15; see smartgrid/power_request.py). Absent (None) means the
    #: built-in default, so a message of an earlier version means what it meant then. The
    #: gateway writes max_kw, min_kw and priority with its configured defaults applied, and
    #: energy_kwh only when the driver asked for an amount (else the session lasts
    #: SESSION_SECONDS at full power, as before).
    max_kw: float | None = None
    min_kw: float | None = None
    energy_kwh: float | None = None
    priority: str | None = None

    def to_body(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_body(cls, body: bytes) -> ChargeRequest:
        return cls(**_decode_fields(cls, _load_object(body)))


@dataclass(frozen=True)
class RoutedRequest(_CarriesPower):
    """A charge request the balancer sent to one substation's queue."""

    request_id: str
    ev_id: str
    accepted_at: float
    substation: str
    routed_at: float
    balancer: str
    rerouted_from: str | None = None
    #: The balancer cannot rule out that this request was forwarded before (its pending
    #: message was redelivered, or it comes off a substation presumed dead): the substation
    #: asks the others (``session.lookup``) before charging it.
    maybe_duplicate: bool = False
    #: The request's power fields, as it carried them.
    max_kw: float | None = None
    min_kw: float | None = None
    energy_kwh: float | None = None
    priority: str | None = None

    @classmethod
    def from_request(
        cls,
        request: ChargeRequest,
        *,
        substation: str,
        routed_at: float,
        balancer: str,
        maybe_duplicate: bool = False,
    ) -> RoutedRequest:
        return cls(
            request_id=request.request_id,
            ev_id=request.ev_id,
            accepted_at=request.accepted_at,
            substation=substation,
            routed_at=routed_at,
            balancer=balancer,
            rerouted_from=request.rerouted_from,
            maybe_duplicate=maybe_duplicate or request.rerouted_from is not None,
            max_kw=request.max_kw,
            min_kw=request.min_kw,
            energy_kwh=request.energy_kwh,
            priority=request.priority,
        )

    def back_to_pending(self) -> ChargeRequest:
        """The request as it goes back to the pending queue, off a substation that died."""
        return ChargeRequest(
            self.request_id,
            self.ev_id,
            self.accepted_at,
            rerouted_from=self.substation,
            max_kw=self.max_kw,
            min_kw=self.min_kw,
            energy_kwh=self.energy_kwh,
            priority=self.priority,
        )

    def to_body(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_body(cls, body: bytes) -> RoutedRequest:
        return cls(**_decode_fields(cls, _load_object(body)))


@dataclass(frozen=True)
class PowerShare:
    """A substation's share of its parent's limit, from the active allocator
    (``leases.Grant``; ``leases.grant_to_message`` / ``grant_from_message``): in force at the
    substation until ``issued_at + lease_seconds``, unless a newer ``(term, seq)`` replaces it.
    Published to ``smartgrid.power`` with the substation id as routing key."""

    substation: str
    share_kw: float
    issued_at: float
    lease_seconds: float
    term: int
    seq: int

    def __post_init__(self) -> None:
        _check_at_least(self, 0, "share_kw", "term", "seq")
        if self.lease_seconds <= 0:
            raise InvalidMessage("field 'lease_seconds' must be above 0")

    def to_body(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_body(cls, body: bytes) -> PowerShare:
        return cls(**_decode_fields(cls, _load_object(body)))


# --------------------------------------------------------------------------------------------
# Lifecycle events (routing key = kind)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""
    at: float

    def to_body(self) -> bytes:
        return _dump(self, kind=self.kind)


@dataclass(frozen=True)
class RequestAccepted(Event):
    kind: ClassVar[str] = "request.accepted"
    request_id: str
    ev_id: str


@dataclass(frozen=True)
class RequestRouted(Event):
    kind: ClassVar[str] = "request.routed"
    request_id: str
    ev_id: str
    substation: str
    balancer: str


@dataclass(frozen=True)
class SessionStarted(Event):
    kind: ClassVar[str] = "session.started"
    request_id: str
    ev_id: str
    substation: str
    instance: str
    accepted_at: float
    #: When the substation expects the session to end; the balancer prefers, among equally
    #: loaded substations, the one whose next session ends soonest. None: the session starts
    #: paused (0 kW, no end in sight; JSON has no infinity) until power frees.
    expected_end: float | None
    #: The request's power fields (the balancer's power bookkeeping, as it counts sessions)
    #: and the power the session starts with. Absent from substations of earlier versions.
    max_kw: float | None = None
    min_kw: float | None = None
    priority: str | None = None
    power_kw: float | None = None

    def __post_init__(self) -> None:
        _check_power_fields(self)
        _check_power_kw(self, "power_kw")

    def power(self) -> PowerFields:
        """The session's request's power fields, defaults applied (no energy: the session
        started, it is its substation's to track)."""
        return _power_of(self)


@dataclass(frozen=True)
class SessionCompleted(Event):
    kind: ClassVar[str] = "session.completed"
    request_id: str
    ev_id: str
    substation: str
    instance: str
    started_at: float
    #: What the session delivered, and how long it was paused (0 kW) in all.
    energy_kwh: float | None = None
    paused_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_at_least(self, 0, "energy_kwh", "paused_seconds")


def _check_power_kw(message: Any, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        if value is not None and not 0 <= value <= MAX_CAR_KW:
            raise InvalidMessage(f"field {name!r} must be between 0 and {MAX_CAR_KW:g}")


@dataclass(frozen=True)
class SessionPower(Event):
    """A running session's power changed (the substation re-shared its limit: a session
    started or ended, its share or limit changed). Not published when the limit never binds
    (the power a session starts with, in ``session.started``, then holds to its end), so
    deployments that balance sessions only pay nothing for it."""

    kind: ClassVar[str] = "session.power"
    request_id: str
    substation: str
    instance: str
    #: 0: paused.
    power_kw: float
    #: At this power; None while paused.
    expected_end: float | None = None

    def __post_init__(self) -> None:
        _check_power_kw(self, "power_kw")


@dataclass(frozen=True)
class SessionLookup(Event):
    """A substation asks the others whether they charge or charged a request it was handed
    as a possible duplicate. Every substation remembers who asked: the asker may charge it."""

    kind: ClassVar[str] = "session.lookup"
    request_id: str
    substation: str


@dataclass(frozen=True)
class SessionLookupReply(Event):
    kind: ClassVar[str] = "session.lookup_reply"
    request_id: str
    asker: str
    substation: str
    #: "running", "completed" or "unknown" at the replying substation.
    status: str


@dataclass(frozen=True)
class RequestDeadLettered(Event):
    kind: ClassVar[str] = "request.dead_lettered"
    reason: str
    source: str
    request_id: str | None = None
    ev_id: str | None = None


@dataclass(frozen=True)
class SubstationAnnounced(Event):
    kind: ClassVar[str] = "substation.announced"
    substation: str
    instance: str
    capacity: int
    metrics_url: str
    session_seconds: float
    #: Its power limit (SUBSTATION_POWER_LIMIT_KW), failsafe (SUBSTATION_FAILSAFE_KW) and the
    #: grid node it names as its parent (SUBSTATION_PARENT; the topology file wins).
    limit_kw: float | None = None
    failsafe_kw: float | None = None
    parent: str | None = None

    def __post_init__(self) -> None:
        _check_at_least(self, 0, "limit_kw", "failsafe_kw")


@dataclass(frozen=True)
class SubstationLeaving(Event):
    kind: ClassVar[str] = "substation.leaving"
    substation: str
    instance: str


@dataclass(frozen=True)
class BalancerStarted(Event):
    """Asks every substation to announce itself now rather than at its next interval."""

    kind: ClassVar[str] = "balancer.started"
    balancer: str


#: Why a request was rejected after it was accepted (``RequestRejected.reason``).
#: ev_busy: another request for the same EV was active; the balancer, the one consumer of the
#: pending queue, decided (two gateways raced on one EV).
REJECTED_EV_BUSY = "ev_busy"
#: not_enqueued: the broker refused the request (a negative confirm) when it was published; the
#: gateway answered 503, and a repeat of the same Idempotency-Key may try again.
REJECTED_NOT_ENQUEUED = "not_enqueued"
REJECTION_REASONS = (REJECTED_EV_BUSY, REJECTED_NOT_ENQUEUED)


@dataclass(frozen=True)
class RequestRejected(Event):
    """An accepted request that will never run, and why (one of :data:`REJECTION_REASONS`)."""

    kind: ClassVar[str] = "request.rejected"
    request_id: str
    ev_id: str
    reason: str
    #: Words for the driver, shown by ``GET /charge/<id>``.
    detail: str
    #: Who decided: a balancer or gateway id.
    source: str
    #: Which acceptance of the request this rejects (a repeat after ``not_enqueued`` is a new
    #: acceptance of the same request id, with a later ``accepted_at``).
    accepted_at: float
    #: For ev_busy: the request that holds the EV.
    active_request_id: str | None = None


@dataclass(frozen=True)
class CancelRequested(Event):
    """A command to everyone who may hold the request: the balancer obeys for a request not yet
    forwarded (held, or still in the pending queue), the substation for one delivered to it
    (waiting in its queue, or charging). Whoever obeys publishes :class:`RequestCancelled`."""

    kind: ClassVar[str] = "request.cancel_requested"
    request_id: str
    ev_id: str
    client: str | None = None


@dataclass(frozen=True)
class StatusRequested(Event):
    """A gateway doubts what the history says of an active request (it has not moved for a
    while, docs/driver-contract.md): whoever decided or ran it publishes its events about it
    again, the same events, which every reader takes as the copies they are. A stream can
    lose confirmed messages when its leader's node fails (rabbitmq-server#9457); quorum queues
    and the services' own memory do not, so the history is repaired from them."""

    kind: ClassVar[str] = "request.status_requested"
    request_id: str


@dataclass(frozen=True)
class RequestCancelled(Event):
    """A request that was cancelled: it never started (``started_at`` is None) or its session
    was stopped at ``substation`` and its charging point freed."""

    kind: ClassVar[str] = "request.cancelled"
    request_id: str
    ev_id: str
    #: Who obeyed: a balancer id or a substation id.
    source: str
    substation: str | None = None
    instance: str | None = None
    started_at: float | None = None


#: A report's figures per priority class, as flat fields ``<name>_<class>``.
POWER_CLASSES = tuple(priority.value for priority in CLASS_ORDER)


@dataclass(frozen=True)
class PowerDemand(Event):
    """What one substation needs and draws, after DEMAND_INTERVAL without one and, while it is
    managed (a parent, or a share taken), on every change: the allocator's input
    (``leases.DemandReport``, converted by ``leases.report_from_event``), the balancers' view
    of power per substation, and loadgen's record of the limit in force. Per class
    (emergency, fleet, standard): the running sessions, the sum of their minimums
    and of their maxima."""

    kind: ClassVar[str] = "power.demand"
    substation: str
    instance: str
    #: Its own limit (SUBSTATION_POWER_LIMIT_KW) and failsafe.
    limit_kw: float
    failsafe_kw: float
    #: What its sessions may draw now (the lower of its limit and its share, or the failsafe
    #: once the lease ran out), and what they draw.
    limit_in_force_kw: float
    power_kw: float
    sessions_emergency: int = 0
    sessions_fleet: int = 0
    sessions_standard: int = 0
    floor_kw_emergency: float = 0.0
    floor_kw_fleet: float = 0.0
    floor_kw_standard: float = 0.0
    want_kw_emergency: float = 0.0
    want_kw_fleet: float = 0.0
    want_kw_standard: float = 0.0
    #: Each running session's minimum and maximum (in the same order) per class, so that the
    #: allocator divides a feeder over the sessions, not the substations (a substation whose
    #: sessions are at their own maximum needs no more). Absent from older substations: the
    #: allocator then takes their sessions as alike (the class's sums spread evenly).
    session_min_kw_emergency: NUMBERS | None = None
    session_max_kw_emergency: NUMBERS | None = None
    session_min_kw_fleet: NUMBERS | None = None
    session_max_kw_fleet: NUMBERS | None = None
    session_min_kw_standard: NUMBERS | None = None
    session_max_kw_standard: NUMBERS | None = None
    parent: str | None = None
    #: The share it holds (its lease not run out), as the grant said: all or none.
    holding_share_kw: float | None = None
    holding_issued_at: float | None = None
    holding_lease_seconds: float | None = None
    holding_term: int | None = None
    holding_seq: int | None = None
    #: The newest grant it accepted (in force or not): it refuses any not newer.
    last_term: int | None = None
    last_seq: int | None = None
    #: The most it draws under that grant and any older one, until it takes a newer one: the
    #: part of its share its sessions left unused, given back without waiting for a lower
    #: share (``leases.LeaseHolder.release``). Absent: each grant's whole share.
    released_kw: float | None = None

    def __post_init__(self) -> None:
        numbers = (n for n, base, _, _ in _schema(type(self)) if base in (int, float) and n != "at")
        _check_at_least(self, 0, *numbers)
        for name in POWER_CLASSES:
            lows = getattr(self, f"session_min_kw_{name}")
            highs = getattr(self, f"session_max_kw_{name}")
            if lows is None and highs is None:
                continue
            sessions = getattr(self, f"sessions_{name}")
            if lows is None or highs is None or not len(lows) == len(highs) == sessions:
                raise InvalidMessage(
                    f"the session_min_kw_{name} and session_max_kw_{name} fields come together, "
                    f"one item for each of the sessions_{name} ({sessions})"
                )
            # 0 <= low <= high for each session, by map rather than a generator: one pair for
            # each session running at the substation.
            if lows and (min(lows) < 0 or not all(map(operator.le, lows, highs))):
                raise InvalidMessage(
                    f"field 'session_min_kw_{name}': each session's minimum must be at least 0 "
                    f"and at most its maximum in 'session_max_kw_{name}'"
                )
        holding = [getattr(self, f"holding_{n}") for n in _HOLDING]
        if any(v is None for v in holding) and any(v is not None for v in holding):
            raise InvalidMessage("the holding_* fields come all together or not at all")
        if (self.last_term is None) != (self.last_seq is None):
            raise InvalidMessage("last_term and last_seq come together or not at all")
        if self.released_kw is not None and self.last_term is None:
            raise InvalidMessage("released_kw applies to the grant in last_term and last_seq")


_HOLDING = ("share_kw", "issued_at", "lease_seconds", "term", "seq")


@dataclass(frozen=True)
class GridLimit(Event):
    """An operator's change of a grid node's limit (``python -m smartgrid.grid``), issued
    ``at``: ``limit_kw`` until ``valid_until`` (None: until changed), or, with ``limit_kw``
    None, the end of the node's override. Kept in the stream ``smartgrid.grid.limits``;
    ``limits.override_from_event`` makes it a ``LimitOverride``."""

    kind: ClassVar[str] = "grid.limit"
    node: str
    limit_kw: float | None = None
    valid_until: float | None = None
    #: Who issued it (free text for the log: the operator's user and host).
    issued_by: str | None = None

    def __post_init__(self) -> None:
        if self.limit_kw is not None and watts(self.limit_kw) <= 0:
            raise InvalidMessage(f"field 'limit_kw' must be above 0, got {self.limit_kw:g}")
        if self.valid_until is not None and self.valid_until <= self.at:
            raise InvalidMessage("field 'valid_until' must be after 'at'")


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RequestAccepted,
        RequestRouted,
        SessionStarted,
        SessionCompleted,
        SessionPower,
        SessionLookup,
        SessionLookupReply,
        RequestDeadLettered,
        RequestRejected,
        CancelRequested,
        StatusRequested,
        RequestCancelled,
        SubstationAnnounced,
        SubstationLeaving,
        BalancerStarted,
        PowerDemand,
        GridLimit,
    )
}

#: The events that change a request's status, kept in the history stream.
HISTORY_EVENTS: tuple[type[Event], ...] = (
    RequestAccepted,
    RequestRouted,
    SessionStarted,
    SessionCompleted,
    RequestDeadLettered,
    RequestRejected,
    CancelRequested,
    RequestCancelled,
)


#: A durable event subscription that nobody consumes (its process died) is deleted after this.
SUBSCRIPTION_EXPIRES_MS = 600_000
#: A subscription keeps at most this many events; a slow subscriber loses the oldest first, so
#: it cannot fill the broker's memory.
SUBSCRIPTION_MAX_LENGTH = 100_000


@dataclass(frozen=True)
class EventSubscription:
    """A service's own queue of lifecycle events, bound to the events exchange by kind.

    Each subscriber (each process, even of one service) has its own queue, named
    ``smartgrid.<service>-events.<suffix>`` with a suffix the subscriber makes unique. By
    default the queue is exclusive and vanishes with the connection. ``durable`` keeps it in a
    quorum queue that outlives a connection (and a cluster node), so that events published
    while the subscriber reconnects are not missed; its subscriber deletes it when it stops,
    and it expires by itself if the subscriber dies.
    """

    service: str
    events: tuple[type[Event], ...]
    durable: bool = False
    max_length: int = SUBSCRIPTION_MAX_LENGTH

    @property
    def prefix(self) -> str:
        return f"smartgrid.{self.service}-events"

    def queue_name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    @property
    def bindings(self) -> tuple[tuple[str, str], ...]:
        """(exchange, routing key) of each kind of event subscribed to."""
        return tuple((EVENTS_EXCHANGE, event.kind) for event in self.events)

    def declarations(self, suffix: str) -> list[Declaration]:
        name = self.queue_name(suffix)
        # drop-head: a slow subscriber keeps the newest events, the ones that matter now.
        limit = {"x-max-length": self.max_length, "x-overflow": "drop-head"}
        if self.durable:
            queue = Queue(
                name,
                {"x-queue-type": "quorum", "x-expires": SUBSCRIPTION_EXPIRES_MS, **limit},
            )
        else:
            queue = Queue(name, limit, durable=False, exclusive=True, auto_delete=True)
        return [queue, *(Binding(name, exchange, key) for exchange, key in self.bindings)]


#: What each service follows of the lifecycle events.
GATEWAY_EVENTS = EventSubscription(
    "gateway",
    (RequestAccepted, RequestRouted, SessionStarted, SessionCompleted, RequestDeadLettered),
)
BALANCER_EVENTS = EventSubscription(
    "balancer",
    (
        RequestRouted,
        SessionStarted,
        SessionCompleted,
        # A session a cancel stopped frees its point as a completion does (balancer/fleet.py).
        RequestCancelled,
        SubstationAnnounced,
        SubstationLeaving,
        # Its power view (balancer/power_fleet.py); the allocator reads them from its own
        # queue, POWER_REPORTS_QUEUE.
        PowerDemand,
        # Its ledger (balancer/ledger.py): cancels to obey, and requests that ended.
        CancelRequested,
        RequestCancelled,
        RequestRejected,
        RequestDeadLettered,
        # A gateway's doubt about a request: its decision is published again.
        StatusRequested,
    ),
)
#: Only rare events: a substation's cost must not grow with the fleet's traffic. The
#: announcements tell it which other substations are live, whose lookups it trusts.
#: Durable: a lookup made while this substation reconnects is what tells it, once back, that
#: another substation charges a request whose first copy waits in its queue. Exclusive, the
#: lookup was lost with the connection, and that copy was charged a second time.
SUBSTATION_EVENTS = EventSubscription(
    "substation",
    (
        BalancerStarted,
        SessionLookup,
        SessionLookupReply,
        SubstationAnnounced,
        SubstationLeaving,
        # A driver's cancel (rare): it may be for a request here (docs/driver-contract.md).
        CancelRequested,
        # A gateway's doubt about a request (rare): its session's events are published again.
        StatusRequested,
    ),
    durable=True,
)
#: The load generator's ledger must not miss an event because it reconnected, nor the oldest
#: of a long run's events because the run is long.
LOADGEN_EVENTS = EventSubscription(
    "loadgen",
    (
        RequestRouted,
        SessionStarted,
        SessionCompleted,
        RequestDeadLettered,
        SubstationAnnounced,
        # Power over the run (loadgen.power): the sessions' power, the substations' limits in
        # force, and the operators' limit changes.
        SessionPower,
        PowerDemand,
        GridLimit,
    ),
    durable=True,
    max_length=1_000_000,
)


def decode_event(routing_key: str, body: bytes) -> Event:
    """Decode a message holding one lifecycle event; the routing key names its kind."""
    return _event_from(_event_type(routing_key), routing_key, _load_object(body))


def decode_events(routing_key: str, body: bytes) -> list[Event]:
    """Decode a lifecycle event message: one event, or a batch (a JSON array) of that kind.

    A batch with any malformed event is rejected whole, naming the event: its publisher is
    broken, and half of its batch is no better evidence than none.
    """
    cls = _event_type(routing_key)
    data = _load_json(body)
    if not isinstance(data, list):
        return [_event_from(cls, routing_key, _checked_object(data))]
    if not data:
        raise InvalidMessage("the batch of events is empty")
    events = []
    for index, item in enumerate(data):
        try:
            events.append(_event_from(cls, routing_key, _checked_object(item)))
        except InvalidMessage as exc:
            raise InvalidMessage(f"event {index} of the batch: {exc}") from None
    return events


def encode_events(events: Sequence[Event]) -> bytes:
    """The body of a message carrying ``events`` (all of one kind): one object, or an array."""
    if len({event.kind for event in events}) != 1:
        raise ValueError("a message carries events of exactly one kind")
    if len(events) == 1:
        return events[0].to_body()
    return b"[" + b",".join(event.to_body() for event in events) + b"]"


def _event_type(routing_key: str) -> type[Event]:
    cls = EVENT_TYPES.get(routing_key)
    if cls is None:
        raise InvalidMessage(f"unknown event kind {routing_key!r}")
    return cls


def _event_from(cls: type[Event], routing_key: str, data: dict) -> Event:
    if data.get("kind", routing_key) != routing_key:
        raise InvalidMessage(f"event kind {data.get('kind')!r} does not match {routing_key!r}")
    return cls(**_decode_fields(cls, data))


# --------------------------------------------------------------------------------------------
# What a substation exposes on /metrics and the balancer reads
# --------------------------------------------------------------------------------------------
LOAD_METRIC = "substation_current_load"
CAPACITY_METRIC = "substation_capacity"
RECEIVED_METRIC = "substation_requests_received"  # counter: exposed as ..._total
COMPLETED_METRIC = "substation_sessions_completed"  # counter: exposed as ..._total
#: Gauge: 1 while the substation consumes its queue (a standby, or one leaving, shows 0).
CONSUMING_METRIC = "substation_consuming"
INFO_METRIC = "substation_info"  # labels: substation, instance_id
#: Power (issue 15). A substation's power in kW: drawn now, the limit in force now (its own,
#: its share, or the failsafe once its lease ran out), and what its sessions would draw
#: unconstrained; the energy it delivered (a counter); its paused sessions per class; how long
#: its lease has to run (only on a substation under a grid node: below 0 it is at its
#: failsafe); and how long requests waited from acceptance to their session's start, per class.
POWER_METRIC = "substation_power_kw"
POWER_LIMIT_METRIC = "substation_power_limit_kw"
POWER_DEMAND_METRIC = "substation_power_demand_kw"
ENERGY_METRIC = "substation_energy_delivered_kwh"  # counter: exposed as ..._total
PAUSED_METRIC = "substation_paused_sessions"  # label: priority
LEASE_METRIC = "substation_lease_expires_in_seconds"
#: Existing metrics that gain a ``priority`` label (wave 3): the wait histogram and the
#: balancer's held requests.
WAIT_METRIC = "substation_wait_seconds"  # histogram
HELD_METRIC = "balancer_held_requests"
PRIORITY_LABEL = "priority"
#: The balancer's view of the grid: per node (substation or feeder), the power drawn under it
#: (from the reports) and its limit in force; 1 where the limit cannot cover the failsafes
#: under it; 1 in the one balancer whose allocator is active (hands out shares).
NODE_POWER_METRIC = "grid_node_power_kw"  # label: node
NODE_LIMIT_METRIC = "grid_node_limit_kw"  # label: node
NODE_OVERCOMMITTED_METRIC = "grid_node_overcommitted"  # label: node
NODE_LABEL = "node"
ALLOCATOR_ACTIVE_METRIC = "allocator_active"
#: Not "instance": Prometheus owns that label (the scrape target) and would store ours as
#: exported_instance.
INFO_INSTANCE_LABEL = "instance_id"


@dataclass(frozen=True)
class SubstationReading:
    """One poll of a substation's /metrics: what the balancer needs, read at one instant."""

    substation: str
    instance: str
    load: float
    capacity: int
    received: float
    completed: float
    #: Whether it consumes its queue (0 once it stops for good); absent on older builds.
    consuming: bool = True
