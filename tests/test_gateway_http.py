"""The gateway's HTTP API through Flask's test client, publishing to the real broker.

The app makes its own broker link to a private vhost; nothing consumes the pending queue
there, so what POST /charge accepted can be read back from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.app import create_app, parse_charge_body
from gateway.broker import GatewayBroker
from gateway.config import GatewayConfig
from gateway.history import RequestHistory
from smartgrid import contract
from smartgrid.config import ConfigError, from_env
from smartgrid.power_request import DEFAULT_MAX_KW, DEFAULT_MIN_KW
from tests.helpers import BrokerClient

JSON = "application/json"
UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


@pytest.fixture(scope="module")
def app(module_amqp_url: str) -> Iterator[Flask]:
    app = create_app(
        GatewayConfig(amqp_url=module_amqp_url, routed_wait=0.05), registry=CollectorRegistry()
    )
    broker: GatewayBroker = app.extensions["smartgrid.broker"]
    try:
        assert broker.link.wait_ready(10), "the gateway's broker link did not become ready"
        assert broker.wait_caught_up(10), "the gateway did not read the history"
        yield app
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post_charge(client: FlaskClient, body: object, content_type: str = JSON):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/charge", data=data, content_type=content_type)


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == JSON
    body = response.get_json()
    assert isinstance(body, dict) and body["error"] and isinstance(body["error"], str)
    return body


def pending_requests(url: str) -> list[contract.ChargeRequest]:
    """Take every message in the pending queue of the vhost (nothing else consumes it)."""
    client = BrokerClient(url)
    try:
        return [
            contract.ChargeRequest.from_body(body)
            for _properties, body in client.get_all(contract.PENDING_QUEUE)
        ]
    finally:
        client.close()


# ------------------------------------------------------------------------------ accepted
def test_a_valid_charge_request_is_accepted_with_an_id_and_a_location(client: FlaskClient):
    response = post_charge(client, {"ev_id": "EV1234"})
    assert response.status_code == 202
    body = response.get_json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert body["ev_id"] == "EV1234"
    assert body["status"] == "queued"  # nothing routes in this vhost
    assert response.headers["Location"] == f"/charge/{body['request_id']}"


def test_an_accepted_request_really_is_in_the_pending_queue(
    client: FlaskClient, module_amqp_url: str
):
    response = post_charge(client, {"ev_id": "EV-PENDING"})
    assert response.status_code == 202
    request_id = response.get_json()["request_id"]
    matching = [r for r in pending_requests(module_amqp_url) if r.request_id == request_id]
    assert len(matching) == 1
    assert matching[0].ev_id == "EV-PENDING"
    assert matching[0].accepted_at > 0


def test_a_json_content_type_with_a_charset_or_a_json_suffix_is_accepted(client: FlaskClient):
    for n, content_type in enumerate(
        ("application/json; charset=utf-8", "application/vnd.smartgrid+json")
    ):
        assert post_charge(client, {"ev_id": f"EV-7{n}"}, content_type).status_code == 202


def test_an_accepted_request_can_be_looked_up(client: FlaskClient):
    request_id = post_charge(client, {"ev_id": "EV-LOOKUP"}).get_json()["request_id"]
    response = client.get(f"/charge/{request_id}")
    assert response.status_code == 200
    record = response.get_json()
    assert record["request_id"] == request_id
    assert record["ev_id"] == "EV-LOOKUP"
    assert record["status"] == "queued"


def test_looking_up_an_unknown_request_is_a_json_404(client: FlaskClient):
    assert_json_error(client.get("/charge/" + "0" * 32), 404)


@pytest.mark.parametrize("request_id", ["abc", "0" * 31, "0" * 33, "A" * 32, "z" * 32])
def test_looking_up_a_malformed_request_id_is_a_json_400(client: FlaskClient, request_id: str):
    assert_json_error(client.get(f"/charge/{request_id}"), 400)


# ------------------------------------------------------------------------------ rejected
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", ""]
)
def test_a_body_that_is_not_declared_as_json_is_a_415(client: FlaskClient, content_type: str):
    assert_json_error(post_charge(client, {"ev_id": "EV1234"}, content_type), 415)


@pytest.mark.parametrize("body", [b"", b"{", b"ev_id=EV1", b'{"ev_id": "EV1",}', b"\xff\xfe{}"])
def test_a_body_that_is_not_json_is_a_400(client: FlaskClient, body: bytes):
    assert_json_error(post_charge(client, body), 400)


@pytest.mark.parametrize("body", [[], ["EV1"], "EV1", 3, None, True])
def test_a_json_body_that_is_not_an_object_is_a_422(client: FlaskClient, body: object):
    assert_json_error(post_charge(client, body), 422)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ev_id": ""},
        {"ev_id": "E" * 65},
        {"ev_id": "EV 12"},
        {"ev_id": "EV/12"},
        {"ev_id": "-EV"},
        {"ev_id": "ÉV1"},
        {"ev_id": 1234},
        {"ev_id": None},
        {"ev_id": ["EV1"]},
        {"ev_id": True},
    ],
    ids=lambda b: json.dumps(b)[:30],
)
def test_a_missing_or_invalid_ev_id_is_a_422(client: FlaskClient, body: dict):
    error = assert_json_error(post_charge(client, body), 422)
    assert "ev_id" in error["detail"]


def test_unknown_fields_are_a_422_naming_them(client: FlaskClient):
    error = assert_json_error(post_charge(client, {"ev_id": "EV1", "priority": "high"}), 422)
    assert "priority" in error["detail"]


def test_the_power_fields_are_accepted_and_travel_with_the_request(
    client: FlaskClient, module_amqp_url: str
):
    pending_requests(module_amqp_url)  # what earlier tests left
    body = {"ev_id": "EV-P1", "energy_kwh": 42.5, "max_kw": 150, "min_kw": 7, "priority": "fleet"}
    assert post_charge(client, body).status_code == 202
    (request,) = pending_requests(module_amqp_url)
    assert (request.energy_kwh, request.max_kw, request.min_kw, request.priority) == (
        42.5,
        150.0,
        7.0,
        "fleet",
    )


def test_a_request_without_power_fields_carries_the_defaults_but_no_energy(
    client: FlaskClient, module_amqp_url: str
):
    pending_requests(module_amqp_url)
    assert post_charge(client, {"ev_id": "EV-P2"}).status_code == 202
    (request,) = pending_requests(module_amqp_url)
    assert (request.energy_kwh, request.max_kw, request.min_kw, request.priority) == (
        None,  # the session lasts SESSION_SECONDS at full power, as before
        DEFAULT_MAX_KW,
        DEFAULT_MIN_KW,
        "standard",
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"energy_kwh": 0}, "energy_kwh"),
        ({"energy_kwh": -5}, "energy_kwh"),
        ({"energy_kwh": 200.01}, "energy_kwh"),
        ({"energy_kwh": "30"}, "energy_kwh"),
        ({"energy_kwh": None}, "energy_kwh"),
        ({"max_kw": 1.39}, "max_kw"),
        ({"max_kw": 350.5}, "max_kw"),
        ({"max_kw": True}, "max_kw"),
        ({"max_kw": [11]}, "max_kw"),
        ({"min_kw": 1}, "min_kw"),
        ({"min_kw": 22, "max_kw": 11}, "min_kw"),
        ({"min_kw": 12}, "min_kw"),  # above the default max_kw
        ({"min_kw": {"kw": 2}}, "min_kw"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": "Fleet"}, "priority"),
        ({"priority": 2}, "priority"),
        ({"priority": None}, "priority"),
    ],
)
def test_an_out_of_range_or_wrong_typed_power_field_is_a_422_naming_it(
    client: FlaskClient, fields: dict, field: str
):
    body = assert_json_error(post_charge(client, {"ev_id": "EV1"} | fields), 422)
    assert body["error"] == f"invalid_{field}"
    assert f"'{field}'" in body["detail"]


def test_json_numbers_the_parser_reads_as_infinite_are_a_422(client: FlaskClient):
    for raw in (b'{"ev_id": "EV1", "max_kw": NaN}', b'{"ev_id": "EV1", "max_kw": 1e999}'):
        body = assert_json_error(post_charge(client, raw), 422)
        assert body["error"] == "invalid_max_kw"


def test_the_defaults_are_the_gateways_configuration(module_amqp_url: str):
    config = GatewayConfig(
        amqp_url=module_amqp_url, default_max_kw=22, default_min_kw=4, default_priority="fleet"
    )
    charge = parse_charge_body(b'{"ev_id": "EV1"}', config.request_defaults)
    assert (charge.power.max_kw, charge.power.min_kw, charge.power.priority.value) == (
        22,
        4,
        "fleet",
    )
    # A default minimum above a car's stated maximum is lowered to it: the client never sent it.
    low = parse_charge_body(b'{"ev_id": "EV1", "max_kw": 3.7}', config.request_defaults)
    assert low.power.min_kw == 3.7


def test_the_defaults_are_read_from_the_environment_and_checked():
    config = from_env(
        GatewayConfig,
        {"REQUEST_DEFAULT_MAX_KW": "7.4", "REQUEST_DEFAULT_PRIORITY": "emergency"},
    )
    assert (config.default_max_kw, config.default_priority) == (7.4, "emergency")
    for env in (
        {"REQUEST_DEFAULT_MAX_KW": "400"},
        {"REQUEST_DEFAULT_MIN_KW": "0.5"},
        {"REQUEST_DEFAULT_PRIORITY": "vip"},
    ):
        with pytest.raises(ConfigError, match=next(iter(env))):
            from_env(GatewayConfig, env)


def test_a_body_over_the_size_limit_is_a_json_413(client: FlaskClient):
    body = json.dumps({"ev_id": "EV1", "padding": "x" * GatewayConfig().max_body}).encode()
    assert len(body) > GatewayConfig().max_body == 4096
    assert_json_error(post_charge(client, body), 413)


@pytest.mark.parametrize("opening, closing", [("[", "]"), ('{"a":', "}")])
def test_deeply_nested_json_is_a_client_error(client: FlaskClient, opening: str, closing: str):
    depth = 4000 // (len(opening) + len(closing))
    response = post_charge(client, (opening * depth + "1" + closing * depth).encode())
    assert 400 <= response.status_code < 500
    assert response.get_json()["error"]


def test_an_unknown_route_is_a_json_404(client: FlaskClient):
    assert_json_error(client.get("/no/such/thing"), 404)


def test_the_wrong_method_is_a_json_405(client: FlaskClient):
    assert_json_error(client.get("/charge"), 405)


def test_rejected_requests_are_not_published(client: FlaskClient, module_amqp_url: str):
    pending_requests(module_amqp_url)  # empty the queue
    post_charge(client, {"ev_id": "bad id"})
    post_charge(client, b"{", JSON)
    post_charge(client, {"ev_id": "EV1"}, "text/plain")
    assert pending_requests(module_amqp_url) == []


# ------------------------------------------------------------------------------ health, metrics
def test_health_is_ok_while_the_broker_is_connected(client: FlaskClient):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_metrics_count_charge_requests_by_outcome(client: FlaskClient):
    post_charge(client, {"ev_id": "EV1"})
    post_charge(client, {"ev_id": ""})
    response = client.get("/metrics")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert "gateway_charge_requests_total" in text
    accepted = re.search(r'gateway_charge_requests_total\{outcome="accepted"\} (\S+)', text)
    invalid = re.search(r'gateway_charge_requests_total\{outcome="invalid"\} (\S+)', text)
    assert accepted and float(accepted.group(1)) >= 1
    assert invalid and float(invalid.group(1)) >= 1


# ------------------------------------------------------------------------------ fuzz
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_BODIES = st.one_of(
    _JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"ev_id": _JSON_VALUES | st.from_regex(contract.EV_ID_PATTERN, fullmatch=True)}
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(3900, 6000).map(lambda n: b'{"ev_id":"' + b"x" * n + b'"}'),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
_CONTENT_TYPES = st.one_of(
    st.just(JSON),
    st.sampled_from(
        ["application/json; charset=utf-8", "application/json; charset=latin-1", "APPLICATION/JSON"]
    ),
    st.sampled_from(
        [
            "application/problem+json",
            "application/+json",
            "application/json;;",
            "application/json; x",
        ]
    ),
    st.sampled_from(
        [
            "text/plain",
            "text/json",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            "",
            ";;;",
        ]
    ),
    st.from_regex(r"[a-z]{1,8}/[a-z+.-]{1,12}(; ?[a-z]{1,8}=[a-z0-9-]{0,8})?", fullmatch=True),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_BODIES, content_type=_CONTENT_TYPES)
def test_no_request_body_or_content_type_makes_the_gateway_fail(
    client: FlaskClient, body: bytes, content_type: str
):
    response = client.post("/charge", data=body, content_type=content_type)
    event(f"status {response.status_code}")
    assert response.status_code == 202 or 400 <= response.status_code < 500, response.status_code
    payload = response.get_json(silent=True)
    assert isinstance(payload, dict)
    if response.status_code == 202:
        assert contract.REQUEST_ID_PATTERN.fullmatch(payload["request_id"])
    else:
        assert isinstance(payload["error"], str) and payload["error"]


# ------------------------------------------------------------------------------ broker down
@pytest.fixture
def unreachable_app() -> Iterator[Flask]:
    broker = GatewayBroker(
        UNREACHABLE_URL, name="gateway-test-unreachable", history=RequestHistory(capacity=100)
    )
    broker.start()
    try:
        yield create_app(
            GatewayConfig(amqp_url=UNREACHABLE_URL, retry_after=7),
            broker=broker,
            registry=CollectorRegistry(),
        )
    finally:
        broker.stop()


def test_a_charge_request_is_refused_with_503_and_retry_after_when_the_broker_is_unreachable(
    unreachable_app: Flask,
):
    client = unreachable_app.test_client()
    response = post_charge(client, {"ev_id": "EV1234"})
    error = assert_json_error(response, 503)
    assert response.headers["Retry-After"] == "7"
    assert error["error"] == "broker_unavailable"
    assert "request_id" not in error


def test_health_is_503_when_the_broker_is_unreachable(unreachable_app: Flask):
    response = unreachable_app.test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json()["status"] == "unavailable"


def test_invalid_input_is_still_a_4xx_while_the_broker_is_unreachable(unreachable_app: Flask):
    assert_json_error(post_charge(unreachable_app.test_client(), {"ev_id": ""}), 422)
