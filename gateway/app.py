"""The gateway's HTTP API (Flask).

``POST /charge`` answers 202 only once the broker has confirmed the request is in the pending
queue; a request that cannot be confirmed gets 503 with ``Retry-After``, never a promise that
cannot be kept. Every error is a JSON object ``{"error": ..., "detail": ...}`` with a 4xx status
(5xx only for the broker being unavailable); nothing the client sends can produce a 500.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
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

from gateway.broker import GatewayBroker
from gateway.config import GatewayConfig
from gateway.tracker import RequestTracker
from smartgrid import contract
from smartgrid.amqp import LinkError
from smartgrid.power_request import (
    POWER_FIELDS,
    FieldError,
    PowerFields,
    RequestDefaults,
    parse_power_fields,
)

log = logging.getLogger(__name__)

ACCEPTED_FIELDS = {"ev_id"} | POWER_FIELDS


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
        for outcome in ("accepted", "invalid", "unavailable"):
            self.requests.labels(outcome)
        # With several gunicorn workers, the least connected one is what matters.
        self.broker_connected = Gauge(
            "gateway_broker_connected",
            "1 while every gateway worker is connected to the broker",
            registry=registry,
            multiprocess_mode="livemin",
        )


def _error(status: int, error: str, detail: str, **headers: str) -> Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _is_json_content_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


@dataclass(frozen=True)
class ChargeBody:
    """A valid POST /charge body, the gateway's defaults applied to what it left out."""

    ev_id: str
    power: PowerFields

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
    return ChargeBody(ev_id, power)


#: How long POST /charge waits for a broker connection that is being re-established.
READY_WAIT = 1.0


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
    ) -> None:
        self.config = config
        self.broker = broker
        self.tracker = broker.tracker
        self.metrics = metrics
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir

    def _unavailable(self, detail: str) -> Response:
        self.metrics.requests.labels("unavailable").inc()
        return _error(503, "broker_unavailable", detail, Retry_After=str(self.config.retry_after))

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
        # A reconnect (a broker restart, a cluster node failing over) takes well under a second:
        # worth waiting for, rather than refusing the driver.
        if not self.broker.wait_ready(min(self.config.publish_timeout, READY_WAIT)):
            return self._unavailable(
                "the message broker is not reachable; the request was not accepted"
            )

        ev_id = charge.ev_id
        charge_request = contract.ChargeRequest(
            request_id=uuid.uuid4().hex, accepted_at=time.time(), **charge.request_fields()
        )
        request_id = charge_request.request_id
        routed = self.tracker.expect(request_id) if self.config.routed_wait > 0 else None
        publish_started = time.perf_counter()
        try:
            self.broker.accept(
                charge_request, deadline=time.monotonic() + self.config.publish_timeout
            )
        except (LinkError, FutureTimeout) as exc:
            self.tracker.forget_waiter(request_id)
            log.warning("request for %s not accepted: %s", ev_id, exc or "confirmation timed out")
            return self._unavailable(
                "the message broker did not confirm the request; it was not accepted"
            )
        self.metrics.publish_seconds.observe(time.perf_counter() - publish_started)
        self.tracker.accepted(charge_request)

        if routed is not None:
            routed.wait(self.config.routed_wait)
            self.tracker.forget_waiter(request_id)
        record = self.tracker.get(request_id) or {}
        body = {"request_id": request_id, "ev_id": ev_id, "status": record.get("status", "queued")}
        if record.get("substation"):
            body["routed_to"] = record["substation"]
        self.metrics.requests.labels("accepted").inc()
        self.metrics.accept_seconds.observe(time.perf_counter() - started)
        response = jsonify(body)
        response.status_code = 202
        response.headers["Location"] = f"/charge/{request_id}"
        return response

    def charge_status(self, request_id: str) -> Response:
        if not contract.is_valid_request_id(request_id):
            return _error(400, "invalid_request_id", "a request id is 32 lowercase hex digits")
        record = self.tracker.get(request_id)
        if record is None:
            return _error(
                404, "not_found", "no such request is known to this gateway (or it is too old)"
            )
        return jsonify(record)

    def health(self) -> Response:
        ready = self.broker.ready
        response = jsonify({"status": "ok" if ready else "unavailable", "broker_connected": ready})
        response.status_code = 200 if ready else 503
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


def create_app(
    config: GatewayConfig,
    *,
    broker: GatewayBroker | None = None,
    registry: CollectorRegistry | None = None,
) -> Flask:
    """Build the app. Without ``broker`` it makes and starts its own (one per process)."""
    multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if registry is None and not multiprocess_dir:
        registry = CollectorRegistry()
    metrics = GatewayMetrics(None if multiprocess_dir else registry)
    own_broker = broker is None
    if broker is None:
        broker = GatewayBroker(
            config.amqp_url,
            name=f"gateway-{os.getpid()}",
            tracker=RequestTracker(config.tracked_requests),
            declare_topology=config.declare_topology,
            event_senders=config.event_senders,
        )
    broker.on_connection_change = lambda up: metrics.broker_connected.set(1 if up else 0)
    if own_broker:
        broker.start()
    metrics.broker_connected.set(1 if broker.ready else 0)

    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.json.sort_keys = False  # type: ignore[attr-defined]  # the default provider has it
    app.extensions["smartgrid.broker"] = broker
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    endpoints = _Endpoints(config, broker, metrics, registry, multiprocess_dir)
    app.add_url_rule("/charge", view_func=endpoints.charge, methods=["POST"])
    app.add_url_rule("/charge/<request_id>", view_func=endpoints.charge_status, methods=["GET"])
    app.add_url_rule("/health", view_func=endpoints.health, methods=["GET"])
    app.add_url_rule("/metrics", view_func=endpoints.metrics_page, methods=["GET"])
    return app
