"""The gateway's HTTP API (Flask).

``POST /charge`` answers 202 only once the broker has confirmed the request is in the pending
queue, never a promise that cannot be kept. Its 503s are honest (gateway/answers.py):
``broker_unavailable`` means nothing was published (no connection, or the broker blocks
publishers during an alarm); ``not_confirmed`` means it was published and may yet be accepted,
so it carries the request's id and ``Location``. Every error is a JSON object
``{"error": ..., "detail": ...}`` with a 4xx status (5xx only for the broker being
unavailable); nothing the client sends can produce a 500.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

from flask import Flask, Response, g, jsonify, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from werkzeug.exceptions import HTTPException

from gateway import answers, openapi
from gateway.answers import Answer, Outcome, PublishRequest
from gateway.broker import READY_WAIT, GatewayBroker
from gateway.clients import AuthFailure, Clients
from gateway.config import GatewayConfig
from gateway.doubts import Doubts
from gateway.history import RequestHistory
from gateway.idempotency import HEADER, InvalidKey, parse_key
from gateway.ratelimit import RateLimiter, per_worker
from gateway.relay import FALLBACK_CAUSES, READING_MODES, reading_mode
from smartgrid import contract
from smartgrid.power_request import (
    POWER_FIELDS,
    FieldError,
    PowerFields,
    RequestDefaults,
    parse_power_fields,
)

log = logging.getLogger(__name__)

ACCEPTED_FIELDS = {"ev_id"} | POWER_FIELDS
#: The ``outcome`` label of ``gateway_charge_requests``.
OUTCOMES = (
    "accepted",
    "replayed",
    "invalid",
    "ev_busy",
    "unavailable",
    "not_confirmed",
    "busy",
    "unauthorized",
    "rate_limited",
)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None):
        self.requests = Counter(
            "gateway_charge_requests",
            "POST /charge answers by outcome",
            ["outcome"],
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "gateway_publish_seconds",
            "From publishing a request to the broker's confirmation",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.accept_seconds = Histogram(
            "gateway_accept_seconds",
            "Time to answer POST /charge with 202, including the wait for the routing decision",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        # With several gunicorn workers, the least connected one is what matters.
        self.broker_connected = Gauge(
            "gateway_broker_connected",
            "1 while every gateway worker is connected to the broker",
            registry=registry,
            multiprocess_mode="livemin",
        )
        # What Idempotency-Key repeats, GET and the one request per EV rule can see: the
        # retention that binds first (age or size) shows here.
        self.history_oldest = Gauge(
            "gateway_history_oldest_seconds",
            "Age of the oldest request the least covered gateway worker's history holds",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.history_requests = Gauge(
            "gateway_history_requests",
            "Requests each gateway worker's history holds (the least of them)",
            registry=registry,
            multiprocess_mode="livemin",
        )
        # A host's workers: one reads the history stream and relays it (relay), the others
        # are fed (relayed); a worker on "stream" beside a relay is not being relayed to (it
        # is replaying, beyond the relay's window, or fell back and asks again shortly).
        self.history_reading = Gauge(
            "gateway_history_reading",
            "Gateway workers by how they read the history: the stream for themselves (stream),"
            " the stream for the host's other workers too (relay), or fed by the relay (relayed)",
            ["mode"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.relay_fallbacks = Counter(
            "gateway_history_relay_fallbacks",
            "Times a gateway worker fed by the history relay read the stream itself again, by"
            " cause (other_stream: a worker of another stream refused the relay)",
            ["cause"],
            registry=registry,
        )
        for cause in FALLBACK_CAUSES:
            self.relay_fallbacks.labels(cause)

    def reading(self, mode: str) -> None:
        """This worker reads the history as ``mode`` (one of gateway.relay.READING_MODES)."""
        for each in READING_MODES:
            self.history_reading.labels(each).set(1 if each == mode else 0)


#: Seconds between updates of the history gauges.
HISTORY_GAUGE_INTERVAL = 5.0


def _error(status: int, error: str, detail: str, **headers: str) -> Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _answer(answer: Answer) -> Response:
    response = jsonify(answer.body)
    response.status_code = answer.status
    response.headers.update(answer.headers)
    return response


#: The metrics' outcome label of each broker outcome.
_OUTCOME_LABELS = {
    Outcome.CONFIRMED: "accepted",
    Outcome.NOT_SENT: "unavailable",
    Outcome.UNCONFIRMED: "not_confirmed",
    Outcome.REFUSED: "busy",
}


def _label_of(answer: Answer) -> str:
    """The metrics' outcome of an answer decided without publishing."""
    if answer.status == 202:
        return "replayed"
    if answer.body.get("error") == "ev_busy":
        return "ev_busy"
    return "invalid"


def _invalid_request_id() -> Response:
    return _error(400, "invalid_request_id", "a request id is 32 lowercase hex digits")


def _not_found() -> Response:
    return _error(404, "not_found", "no such request is known (or it is too old)")


def _is_json_content_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


@dataclass(frozen=True)
class ChargeBody:
    """A valid POST /charge body, the gateway's defaults applied to what it left out."""

    ev_id: str
    power: PowerFields
    #: The body as sent (validated): what an Idempotency-Key's fingerprint is taken of.
    fields: dict = dataclasses.field(default_factory=dict)

    def request_fields(self) -> dict:
        """The fields of the ChargeRequest it becomes (beside its id and acceptance time)."""
        return {"ev_id": self.ev_id, **self.power.message_fields()}


BUILT_IN_DEFAULTS = RequestDefaults()


def parse_charge_body(raw: bytes, defaults: RequestDefaults = BUILT_IN_DEFAULTS) -> ChargeBody:
    """A POST /charge body, checked; :class:`BadBody` says what is wrong with it."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadBody(400, "invalid_json", "the body is not UTF-8") from None
    except RecursionError:
        raise BadBody(400, "invalid_json", "the body is nested too deeply") from None
    except ValueError as exc:
        raise BadBody(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadBody(
            422, "invalid_request", 'the body must be a JSON object like {"ev_id": "EV1234"}'
        )
    unknown = sorted(set(data) - ACCEPTED_FIELDS)
    if unknown:
        raise BadBody(422, "invalid_request", f"unknown field(s): {', '.join(unknown)[:200]}")
    if "ev_id" not in data:
        raise BadBody(422, "invalid_request", "missing field 'ev_id'")
    ev_id = data["ev_id"]
    if not contract.is_valid_ev_id(ev_id):
        raise BadBody(422, "invalid_ev_id", f"'ev_id' must be a string of {contract.EV_ID_RULE}")
    for field in sorted(POWER_FIELDS & data.keys()):
        if data[field] is None:  # the API has no null: a field left out takes the default
            raise BadBody(422, f"invalid_{field}", f"{field!r} must not be null; leave it out")
    try:
        power = parse_power_fields(data, defaults)
    except FieldError as exc:
        raise BadBody(422, exc.code, str(exc)) from None
    return ChargeBody(ev_id, power, data)


class BadBody(Exception):
    """A POST /charge body the gateway cannot accept: the status and error to answer with."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class _Endpoints:
    """The HTTP endpoints of one gateway process."""

    def __init__(
        self,
        config: GatewayConfig,
        broker: GatewayBroker,
        metrics: GatewayMetrics,
        registry: CollectorRegistry | None,
        multiprocess_dir: str | None,
        clients: Clients | None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.history = broker.history
        self.metrics = metrics
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir
        self.clients = clients
        self.limiter = None
        if config.rate_limit > 0:
            rate, burst = per_worker(config.rate_limit, config.rate_burst or None, config.workers)
            self.limiter = RateLimiter(rate, burst)

    def admit(self) -> Response | None:
        """Before any /charge endpoint: who the client is (``g.client``), then its rate limit.
        An answer refuses the request; None lets it through."""
        g.client = None
        refusal: Answer | None = None
        label = ""
        if self.clients is not None:
            found = self.clients.authenticate(request.headers.get("Authorization"))
            if isinstance(found, AuthFailure):
                refusal, label = found.answer(), "unauthorized"
            else:
                g.client = found
        if refusal is None and self.limiter is not None:
            wait = self.limiter.take(g.client)
            if wait > 0:
                refusal, label = self.limiter.answer(wait), "rate_limited"
        if refusal is None:
            return None
        if request.method == "POST" and request.path == "/charge":
            self.metrics.requests.labels(label).inc()
        return _answer(refusal)

    def _replaying(self) -> Response | None:
        """503 while the history is being read up to the stream's end after a (re)connect:
        until then, an Idempotency-Key repeat or a busy EV could be taken for new."""
        if not self.broker.ready or self.broker.caught_up:
            return None  # not connected: publishing says so itself
        if self.broker.wait_caught_up(READY_WAIT):
            return None
        return _error(
            503,
            "broker_unavailable",
            "this gateway is still reading the request history; nothing was done, try again",
            Retry_After=str(self.config.retry_after),
        )

    def charge(self) -> Response:
        started = time.perf_counter()
        if not _is_json_content_type(request.mimetype):
            self.metrics.requests.labels("invalid").inc()
            return _error(
                415, "unsupported_media_type", "send the body as Content-Type: application/json"
            )
        try:
            charge = parse_charge_body(request.get_data(cache=False), self.config.request_defaults)
        except BadBody as bad:
            self.metrics.requests.labels("invalid").inc()
            return _error(bad.status, bad.error, bad.detail)
        replaying = self._replaying()
        if replaying is not None:
            self.metrics.requests.labels("unavailable").inc()
            return replaying
        key = None
        raw_key = request.headers.get(HEADER)
        if raw_key is not None:
            try:
                key = parse_key(raw_key)
            except InvalidKey as bad_key:
                self.metrics.requests.labels("invalid").inc()
                return _error(400, "invalid_idempotency_key", str(bad_key))
        plan = answers.plan_charge(
            self.history,
            client=g.client,
            key=key,
            fields=charge.fields,
            now=time.time(),
            new_request_id=lambda: uuid.uuid4().hex,
            power=charge.power,
        )
        if isinstance(plan, Answer):
            self.metrics.requests.labels(_label_of(plan)).inc()
            return _answer(plan)
        return self._publish(plan, started)

    def _publish(self, plan: PublishRequest, started: float) -> Response:
        request_id = plan.request.request_id
        routed = self.history.expect(request_id) if self.config.routed_wait > 0 else None
        publish_started = time.perf_counter()
        outcome = self.broker.accept(
            plan.request, deadline=time.monotonic() + self.config.publish_timeout
        )
        if outcome is Outcome.CONFIRMED:
            self.metrics.publish_seconds.observe(time.perf_counter() - publish_started)
            # At once, so that this worker reads its own write (GET, a repeat of the key).
            self.history.accepted(plan.request)
            if routed is not None:
                routed.wait(self.config.routed_wait)
        else:
            log.warning("request %s not accepted: %s", request_id, outcome.value)
        self.history.forget_waiter(request_id)
        answer, event = answers.after_publish(
            plan,
            outcome,
            record=self.history.lookup(request_id),
            retry_after=self.config.retry_after,
            source=self.broker.link.name,
        )
        if event is not None:
            # Reliable: it waits in the outbox if need be. Applied here at once as well.
            self.broker.publish_event(event)
            self.history.apply(event)
        label = _OUTCOME_LABELS[outcome]
        if outcome is Outcome.CONFIRMED and plan.repeat:
            label = "replayed"
        self.metrics.requests.labels(label).inc()
        if outcome is Outcome.CONFIRMED:
            self.metrics.accept_seconds.observe(time.perf_counter() - started)
        return _answer(answer)

    def charge_status(self, request_id: str) -> Response:
        if not contract.is_valid_request_id(request_id):
            return _invalid_request_id()
        record = self.history.get(request_id, g.client)
        if record is None:
            return _not_found()
        return jsonify(record)

    def cancel(self, request_id: str) -> Response:
        if not contract.is_valid_request_id(request_id):
            return _invalid_request_id()
        replaying = self._replaying()
        if replaying is not None:
            return replaying
        plan = answers.plan_cancel(self.history, request_id, client=g.client, now=time.time())
        if isinstance(plan, Answer):
            return _answer(plan)
        outcome = self.broker.command(
            plan.event, deadline=time.monotonic() + self.config.publish_timeout
        )
        if outcome is Outcome.CONFIRMED:
            self.history.apply(plan.event)
        else:
            log.warning("cancel of %s not taken: %s", request_id, outcome.value)
        return _answer(
            answers.after_cancel(
                plan,
                outcome,
                record=self.history.lookup(request_id, g.client),
                retry_after=self.config.retry_after,
            )
        )

    def openapi_document(self) -> Response:
        return jsonify(openapi.description())

    def health(self) -> Response:
        reason = self.broker.unavailable_reason
        body: dict = {
            "status": "ok" if reason is None else "unavailable",
            "broker_connected": self.broker.ready,
            # Which worker answers is the kernel's choice: this one's part in the relay.
            "history_reading": reading_mode(self.broker.relay),
        }
        if reason is not None:
            body["reason"] = reason
        response = jsonify(body)
        if reason is not None:
            response.status_code = 503
            response.headers["Retry-After"] = str(self.config.retry_after)
        return response

    def metrics_page(self) -> Response:
        if self.multiprocess_dir:
            exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(exposition)
        else:
            assert self.registry is not None  # made by create_app when not multiprocess
            exposition = self.registry
        return Response(generate_latest(exposition), mimetype=CONTENT_TYPE_LATEST)


def _http_error(exc: HTTPException) -> Response:
    return _error(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or exc.name)


def _unexpected_error(exc: Exception) -> Response:  # pragma: no cover - a bug, not input
    log.exception("unexpected error")
    return _error(500, "internal_error", "an unexpected error occurred; it has been logged")


def load_clients(config: GatewayConfig) -> Clients | None:
    """The clients of ``GATEWAY_TOKENS_FILE``; None (an open API, with a warning) without it."""
    if not config.tokens_file:
        log.warning("GATEWAY_TOKENS_FILE is not set: the API is open to anyone who can reach it")
        return None
    return Clients.load(config.tokens_file)


def create_app(
    config: GatewayConfig,
    *,
    broker: GatewayBroker | None = None,
    registry: CollectorRegistry | None = None,
) -> Flask:
    """Build the app. Without ``broker`` it makes and starts its own (one per process).
    Raises :class:`~gateway.clients.TokensFileError` for a tokens file it cannot use."""
    clients = load_clients(config)
    multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if registry is None and not multiprocess_dir:
        registry = CollectorRegistry()
    metrics = GatewayMetrics(None if multiprocess_dir else registry)
    own_broker = broker is None
    if broker is None:
        broker = GatewayBroker(
            config.amqp_url,
            name=f"gateway-{os.getpid()}",
            history=RequestHistory(
                capacity=config.tracked_requests,
                max_age=config.history_max_age,
                idempotency_ttl=config.idempotency_ttl,
                doubts=Doubts(
                    copy_after=config.history_copy_after,
                    check_after=config.status_check_after,
                ),
            ),
            history_max_age=config.history_max_age,
            history_max_bytes=config.history_max_bytes,
            declare_topology=config.declare_topology,
            event_senders=config.event_senders,
            history_relay_dir=(config.history_relay_dir or None) if config.relays_history else None,
            history_relay_window=config.history_relay_window,
        )
    broker.on_connection_change = lambda up: metrics.broker_connected.set(1 if up else 0)
    if broker.relay is not None:
        broker.relay.on_fallback = lambda cause: metrics.relay_fallbacks.labels(cause).inc()
    if own_broker:
        broker.start()
    metrics.broker_connected.set(1 if broker.ready else 0)

    def measure_history() -> None:  # on the broker's I/O thread, which feeds the history
        assert broker is not None
        metrics.history_oldest.set(broker.history.oldest_age())
        metrics.history_requests.set(len(broker.history))
        metrics.reading(reading_mode(broker.relay))
        broker.link.call_later(HISTORY_GAUGE_INTERVAL, measure_history)

    broker.link.call_soon(measure_history)

    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.json.sort_keys = False  # type: ignore[attr-defined]  # the default provider has it
    app.extensions["smartgrid.broker"] = broker
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    endpoints = _Endpoints(config, broker, metrics, registry, multiprocess_dir, clients)

    @app.before_request
    def admit() -> Response | None:
        # /health, /metrics and /openapi.json stay open.
        if request.path == "/charge" or request.path.startswith("/charge/"):
            return endpoints.admit()
        g.client = None
        return None

    app.add_url_rule("/charge", view_func=endpoints.charge, methods=["POST"])
    app.add_url_rule("/charge/<request_id>", view_func=endpoints.charge_status, methods=["GET"])
    app.add_url_rule("/charge/<request_id>", view_func=endpoints.cancel, methods=["DELETE"])
    app.add_url_rule("/openapi.json", view_func=endpoints.openapi_document, methods=["GET"])
    app.add_url_rule("/health", view_func=endpoints.health, methods=["GET"])
    app.add_url_rule("/metrics", view_func=endpoints.metrics_page, methods=["GET"])
    return app
