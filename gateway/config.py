from __future__ import annotations

from dataclasses import dataclass

from gateway import doubts, relay_protocol
from smartgrid import contract
from smartgrid.config import (
    DEFAULT_AMQP_URL,
    declare_topology_setting,
    non_negative,
    positive,
    setting,
)
from smartgrid.power import MAX_CAR_KW, MIN_CAR_KW, Priority
from smartgrid.power_request import (
    DEFAULT_MAX_KW,
    DEFAULT_MIN_KW,
    PRIORITY_NAMES,
    RequestDefaults,
)
from smartgrid.senders import event_senders_setting


def _car_kw(value: float) -> bool:
    return MIN_CAR_KW <= value <= MAX_CAR_KW


_CAR_KW = f"kW from {MIN_CAR_KW:g} to {MAX_CAR_KW:g}"


@dataclass(frozen=True)
class GatewayConfig:
    amqp_url: str = setting(
        "AMQP_URL", DEFAULT_AMQP_URL, "Broker URL; several, comma-separated, for a cluster"
    )
    port: int = setting("GATEWAY_PORT", 8000, "HTTP port", check=positive, expect="a TCP port")
    bind: str = setting("GATEWAY_BIND", "0.0.0.0", "HTTP listen address")
    workers: int = setting(
        "GATEWAY_WORKERS", 2, "HTTP worker processes", check=positive, expect="an integer > 0"
    )
    threads: int = setting(
        "GATEWAY_THREADS",
        16,
        "Threads per worker that run requests (once a request has arrived whole)",
        check=positive,
        expect="an integer > 0",
    )
    # The slow-client limits (gateway/rsgi.py, gateway/server.py).
    header_timeout: float = setting(
        "HEADER_TIMEOUT",
        5.0,
        "How long a connection may take to send a request's headers, or stay idle between"
        " requests, before it is closed",
        check=positive,
        expect="seconds > 0",
    )
    body_timeout: float = setting(
        "BODY_TIMEOUT",
        5.0,
        "How long a request's body may take to arrive, after its headers, before 408",
        check=positive,
        expect="seconds > 0",
    )
    max_connections: int = setting(
        "MAX_CONNECTIONS",
        4096,
        "Connections each worker serves at once, slow ones included until their timeout (more"
        " wait to be accepted)",
        check=positive,
        expect="an integer > 0",
    )
    max_header: int = setting(
        "MAX_HEADER_BYTES",
        16384,
        "Largest request line and headers answered (JSON 431 beyond; over about 400 KiB or 100"
        " header fields the HTTP server answers 431 itself, without a body)",
        check=positive,
        expect="bytes > 0",
    )
    routed_wait: float = setting(
        "ROUTED_WAIT",
        0.0,
        "How long POST /charge may wait for the routing decision, to include routed_to in the 202"
        " (0: answer once the broker has the request; each waiting request holds a server thread)",
        check=non_negative,
        expect="seconds >= 0",
    )
    publish_timeout: float = setting(
        "PUBLISH_TIMEOUT",
        5.0,
        "How long to wait for the broker's confirmation before answering 503",
        check=positive,
        expect="seconds > 0",
    )
    max_body: int = setting(
        "MAX_BODY_BYTES", 4096, "Largest request body accepted", check=positive, expect="bytes > 0"
    )
    tracked_requests: int = setting(
        "TRACKED_REQUESTS",
        100_000,
        "Requests the history keeps in memory, newest first: what GET /charge/<id>, the one"
        " request per EV rule and Idempotency-Key repeats can see",
        check=positive,
        expect="an integer > 0",
    )
    idempotency_ttl: int = setting(
        "IDEMPOTENCY_TTL",
        contract.IDEMPOTENCY_TTL_SECONDS,
        "Seconds an Idempotency-Key means the same request; a repeat after that is a new one",
        check=positive,
        expect="seconds > 0",
    )
    history_max_age: int = setting(
        "HISTORY_MAX_AGE",
        contract.HISTORY_MAX_AGE_SECONDS,
        "Seconds the history stream and each gateway's history keep a request (at least"
        " IDEMPOTENCY_TTL, or repeats of an older key are new requests)",
        check=positive,
        expect="seconds > 0",
    )
    history_max_bytes: int = setting(
        "HISTORY_MAX_BYTES",
        contract.HISTORY_MAX_BYTES,
        "Size limit of the history stream (about 700 bytes a request); whichever of it and"
        " HISTORY_MAX_AGE binds first drops the oldest",
        check=positive,
        expect="bytes > 0",
    )
    history_copy_after: float = setting(
        "HISTORY_COPY_AFTER",
        doubts.COPY_AFTER,
        "Seconds after its accept that a request this gateway did not read back from the"
        " history stream is sent to the stream again (a stream may lose what it confirmed when"
        " a cluster node fails)",
        check=positive,
        expect="seconds > 0",
    )
    status_check_after: float = setting(
        "STATUS_CHECK_AFTER",
        doubts.CHECK_AFTER,
        "Seconds an active request may stand still in the history (counted from its expected"
        " end while it charges) before the gateway asks the balancer and the substations to"
        " publish its events again; then twice as long each time, up to 10 minutes",
        check=positive,
        expect="seconds > 0",
    )
    history_relay_dir: str = setting(
        "HISTORY_RELAY_DIR",
        "",
        "Directory private to this gateway where its workers elect the one that reads the"
        " history stream for the others (a lock file) and relay it (a Unix socket); empty: a"
        " temporary directory made at start and removed at exit. Unused with one worker",
        check=relay_protocol.socket_path_fits,
        expect="a directory path short enough for a Unix socket in it (about 85 characters)",
    )
    history_relay_window: int = setting(
        "HISTORY_RELAY_WINDOW",
        relay_protocol.WINDOW,
        "Messages the worker that reads the history stream for the others keeps for a worker"
        " that asks to follow on from a little behind; one further behind reads the stream"
        " itself. Unused with one worker",
        check=positive,
        expect="an integer > 0",
    )
    tokens_file: str = setting(
        "GATEWAY_TOKENS_FILE",
        "",
        "Clients and the SHA-256 of their tokens, one 'client-name sha256-hex' a line (python -m"
        " gateway.clients add FILE NAME); /charge then needs Authorization: Bearer <token>."
        " Empty: the API is open to anyone (a warning is logged)",
    )
    rate_limit: float = setting(
        "GATEWAY_RATE_LIMIT",
        0.0,
        "Requests a second each client may make to /charge (a token bucket; 429 beyond),"
        " shared out among GATEWAY_WORKERS; 0: no limit",
        check=non_negative,
        expect="requests/s >= 0",
    )
    rate_burst: float = setting(
        "GATEWAY_RATE_BURST",
        0.0,
        "Requests a client may make at once above GATEWAY_RATE_LIMIT (0: one second's worth)",
        check=non_negative,
        expect="requests >= 0",
    )
    retry_after: int = setting(
        "RETRY_AFTER",
        5,
        "Seconds a client is told to wait (Retry-After) when the broker is unavailable",
        check=positive,
        expect="seconds > 0",
    )
    default_max_kw: float = setting(
        "REQUEST_DEFAULT_MAX_KW",
        DEFAULT_MAX_KW,
        "A request's max_kw when it sends none (a three-phase 16 A wallbox)",
        check=_car_kw,
        expect=_CAR_KW,
    )
    default_min_kw: float = setting(
        "REQUEST_DEFAULT_MIN_KW",
        DEFAULT_MIN_KW,
        "A request's min_kw when it sends none (lowered to the request's max_kw if above it)",
        check=_car_kw,
        expect=_CAR_KW,
    )
    default_priority: str = setting(
        "REQUEST_DEFAULT_PRIORITY",
        PRIORITY_NAMES[0],
        "A request's priority when it sends none",
        check=lambda value: value in PRIORITY_NAMES,
        expect=" or ".join(PRIORITY_NAMES),
    )
    declare_topology: bool = declare_topology_setting()
    event_senders: tuple[str, ...] = event_senders_setting()
    log_level: str = setting("LOG_LEVEL", "INFO", "Logging level")

    @property
    def relays_history(self) -> bool:
        """Whether the workers elect one to read the history stream for the others
        (gateway/relay.py): with more than one. A single worker reads it itself;
        HISTORY_RELAY_DIR and HISTORY_RELAY_WINDOW are then unused."""
        return self.workers > 1

    @property
    def request_defaults(self) -> RequestDefaults:
        return RequestDefaults(
            max_kw=self.default_max_kw,
            min_kw=self.default_min_kw,
            priority=Priority(self.default_priority),
        )
