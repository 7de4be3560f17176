"""Issue 14's API through the gateway's app on the real broker: Idempotency-Key repeats, one
active request per EV, DELETE, Bearer tokens, the rate limit and /openapi.json.

Nothing consumes the pending queue in these vhosts, so an accepted request stays ``queued``
until a test publishes its lifecycle events itself (as the services' user: the gateway, in
single-user mode, trusts events sent as its own user).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.broker import GatewayBroker
from gateway.clients import TokensFileError, token_line
from gateway.config import GatewayConfig
from gateway.openapi import description
from smartgrid import contract
from tests.helpers import BrokerClient, eventually, rabbitmqctl

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"


def _app(config: GatewayConfig) -> Flask:
    app = create_app(config, registry=CollectorRegistry())
    broker: GatewayBroker = app.extensions["smartgrid.broker"]
    assert broker.wait_ready(10) and broker.wait_caught_up(10)
    return app


def _stop(app: Flask) -> None:
    broker: GatewayBroker = app.extensions["smartgrid.broker"]
    broker.stop()


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# test clients\n{token_line('alice', ALICE)}\n{token_line('bob', BOB)}\n")
    return path


@pytest.fixture(scope="module")
def app(module_amqp_url: str, tokens_file: Path) -> Iterator[Flask]:
    app = _app(GatewayConfig(amqp_url=module_amqp_url, tokens_file=str(tokens_file)))
    yield app
    _stop(app)


@pytest.fixture(scope="module")
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _auth(token: str = ALICE, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def _ev() -> str:
    return f"EV-{uuid.uuid4().hex[:10]}"


def _post(client: FlaskClient, body: dict, token: str = ALICE, key: str | None = None):
    return client.post("/charge", json=body, headers=_auth(token, key))


# ------------------------------------------------------------------------------ tokens
def test_charge_without_a_token_is_401_with_a_bearer_challenge(client: FlaskClient):
    for method, path in (("POST", "/charge"), ("GET", "/charge/" + "0" * 32)):
        answer = client.open(path, method=method, json={"ev_id": _ev()})
        assert answer.status_code == 401
        assert answer.get_json()["error"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="smartgrid"'


def test_a_wrong_token_is_401_invalid_token(client: FlaskClient):
    answer = _post(client, {"ev_id": _ev()}, token="not-a-token")
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]


def test_health_metrics_and_the_description_stay_open(client: FlaskClient):
    assert client.get("/health").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert b"gateway_history_oldest_seconds" in metrics.data
    served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.get_json() == description()


def test_a_request_is_visible_to_its_own_client_only(client: FlaskClient):
    accepted = _post(client, {"ev_id": _ev()})
    assert accepted.status_code == 202
    location = accepted.headers["Location"]
    assert client.get(location, headers=_auth(ALICE)).status_code == 200
    assert client.get(location, headers=_auth(BOB)).get_json()["error"] == "not_found"
    assert client.delete(location, headers=_auth(BOB)).status_code == 404


def test_a_tokens_file_that_cannot_be_used_stops_the_app(module_amqp_url: str, tmp_path: Path):
    bad = tmp_path / "tokens"
    bad.write_text("alice not-a-hash\n")
    with pytest.raises(TokensFileError, match="line 1"):
        create_app(GatewayConfig(amqp_url=module_amqp_url, tokens_file=str(bad)))


# ------------------------------------------------------------------------------ Idempotency-Key
def test_a_repeat_of_a_key_gets_the_same_request_id_and_publishes_the_same_request(
    client: FlaskClient, module_amqp_url: str
):
    observer = BrokerClient(module_amqp_url)
    try:
        observer.get_all(contract.PENDING_QUEUE)
        body, key = {"ev_id": _ev(), "max_kw": 22}, uuid.uuid4().hex
        first = _post(client, body, key=key)
        assert first.status_code == 202
        assert "Idempotent-Replayed" not in first.headers
        # The same body, written differently: 22.0 is 22.
        again = _post(client, {"max_kw": 22.0, "ev_id": body["ev_id"]}, key=key)
        assert again.status_code == 202
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.get_json()["request_id"] == first.get_json()["request_id"]
        copies = [
            contract.ChargeRequest.from_body(raw)
            for _, raw in observer.get_all(contract.PENDING_QUEUE)
        ]
        # Queued: published again (the balancer drops the copy), as the same attempt.
        assert len(copies) == 2 and copies[0] == copies[1]
        assert copies[0].client == "alice" and copies[0].body_fingerprint
    finally:
        observer.close()


def test_the_same_key_from_another_client_is_another_request(client: FlaskClient):
    key = uuid.uuid4().hex
    mine = _post(client, {"ev_id": _ev()}, key=key).get_json()["request_id"]
    theirs = _post(client, {"ev_id": _ev()}, token=BOB, key=key).get_json()["request_id"]
    assert mine != theirs


def test_a_key_reused_with_another_body_is_422(client: FlaskClient):
    key, ev_id = uuid.uuid4().hex, _ev()
    assert _post(client, {"ev_id": ev_id}, key=key).status_code == 202
    reused = _post(client, {"ev_id": ev_id, "priority": "fleet"}, key=key)
    assert reused.status_code == 422
    assert reused.get_json()["error"] == "idempotency_key_reused"


@pytest.mark.parametrize("key", ["", " ", "ключ", "x" * 256, '"unterminated'])
def test_an_invalid_key_is_400(client: FlaskClient, key: str):
    answer = client.post(
        "/charge",
        json={"ev_id": _ev()},
        headers={"Authorization": f"Bearer {ALICE}", "Idempotency-Key": key},
    )
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "invalid_idempotency_key"


def test_a_repeat_of_a_finished_request_replays_its_status_and_publishes_nothing(
    client: FlaskClient, module_amqp_url: str
):
    observer = BrokerClient(module_amqp_url)
    try:
        body, key = {"ev_id": _ev()}, uuid.uuid4().hex
        first = _post(client, body, key=key).get_json()
        observer.get_all(contract.PENDING_QUEUE)
        now = time.time()
        observer.publish_event(
            contract.SessionCompleted(
                now, first["request_id"], body["ev_id"], "S1", "i1", started_at=now - 1
            )
        )
        location = f"/charge/{first['request_id']}"
        eventually(
            lambda: client.get(location, headers=_auth()).get_json()["status"] == "completed",
            what="the completion in the history",
        )
        again = _post(client, body, key=key)
        assert again.status_code == 202
        assert again.get_json()["status"] == "completed"
        assert again.headers["Idempotent-Replayed"] == "true"
        assert observer.get_all(contract.PENDING_QUEUE) == []
        # A finished request frees its EV; a completed one cannot be cancelled.
        assert _post(client, body).status_code == 202
        refused = client.delete(location, headers=_auth())
        assert refused.status_code == 409
        assert refused.get_json()["error"] == "already_completed"
    finally:
        observer.close()


# ------------------------------------------------------------------------------ one EV, one request
def test_a_second_request_for_a_busy_ev_is_409_naming_the_active_one_to_its_client(
    client: FlaskClient,
):
    ev_id = _ev()
    first = _post(client, {"ev_id": ev_id}).get_json()["request_id"]
    busy = _post(client, {"ev_id": ev_id})
    assert busy.status_code == 409
    assert busy.get_json()["error"] == "ev_busy"
    assert busy.get_json()["request_id"] == first
    assert busy.headers["Location"] == f"/charge/{first}"
    # Another client learns only that the EV is busy.
    theirs = _post(client, {"ev_id": ev_id}, token=BOB)
    assert theirs.status_code == 409
    assert "request_id" not in theirs.get_json() and "Location" not in theirs.headers


# ------------------------------------------------------------------------------ DELETE
def test_cancelling_a_queued_request_publishes_the_command_and_a_repeat_is_harmless(
    client: FlaskClient, module_amqp_url: str
):
    observer = BrokerClient(module_amqp_url)
    try:
        commands = observer.subscribe_events(contract.CancelRequested.kind)
        ev_id = _ev()
        request_id = _post(client, {"ev_id": ev_id}).get_json()["request_id"]
        answer = client.delete(f"/charge/{request_id}", headers=_auth())
        assert answer.status_code == 202
        record = answer.get_json()
        assert record["status"] == "queued" and record["cancel_requested_at"] > 0
        (command,) = eventually(lambda: observer.events(commands), what="the cancel command")
        assert isinstance(command, contract.CancelRequested)
        assert (command.request_id, command.ev_id, command.client) == (request_id, ev_id, "alice")
        assert client.delete(f"/charge/{request_id}", headers=_auth()).status_code == 202

        # Whoever held it obeys; then a DELETE publishes nothing more.
        observer.publish_event(contract.RequestCancelled(time.time(), request_id, ev_id, "b1"))
        eventually(
            lambda: (
                client.get(f"/charge/{request_id}", headers=_auth()).get_json()["status"]
                == "cancelled"
            ),
            what="the cancellation in the history",
        )
        observer.events(commands)
        cancelled = client.delete(f"/charge/{request_id}", headers=_auth())
        assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"
        time.sleep(0.3)
        assert observer.events(commands) == []
        # The EV is free again.
        assert _post(client, {"ev_id": ev_id}).status_code == 202
    finally:
        observer.close()


def test_cancelling_an_unknown_request_is_404_and_a_malformed_id_400(client: FlaskClient):
    assert client.delete("/charge/" + "0" * 32, headers=_auth()).status_code == 404
    assert client.delete("/charge/nope", headers=_auth()).status_code == 400


# ------------------------------------------------------------------------------ rate limit
def test_a_client_over_its_rate_is_429_with_retry_after(module_amqp_url: str, tokens_file: Path):
    app = _app(
        GatewayConfig(
            amqp_url=module_amqp_url,
            tokens_file=str(tokens_file),
            rate_limit=0.5,
            rate_burst=2,
            workers=1,
        )
    )
    try:
        client = app.test_client()
        answers = [client.get("/charge/" + "0" * 32, headers=_auth()) for _ in range(3)]
        assert [a.status_code for a in answers] == [404, 404, 429]
        assert answers[2].get_json()["error"] == "rate_limited"
        assert int(answers[2].headers["Retry-After"]) >= 1
        # Each client has its own bucket.
        assert client.get("/charge/" + "0" * 32, headers=_auth(BOB)).status_code == 404
    finally:
        _stop(app)


def test_without_a_tokens_file_the_api_is_open(module_amqp_url: str):
    app = _app(GatewayConfig(amqp_url=module_amqp_url))
    try:
        client = app.test_client()
        accepted = client.post("/charge", json={"ev_id": _ev()})
        assert accepted.status_code == 202
        assert client.get(accepted.headers["Location"]).status_code == 200
    finally:
        _stop(app)


# ------------------------------------------------------------------------------ refused
def test_a_request_the_broker_refuses_is_busy_and_rejected_provisionally(
    amqp_url: str,
):
    # A full pending queue that refuses more (as backpressure does): every publish is nacked.
    vhost = unquote(amqp_url.rsplit("/", 1)[1])
    rabbitmqctl(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "full-pending",
        f"^{contract.PENDING_QUEUE}$",
        '{"max-length": 1, "overflow": "reject-publish"}',
    )
    app = _app(GatewayConfig(amqp_url=amqp_url, publish_timeout=1))
    try:
        client = app.test_client()
        # A quorum queue refuses only once it is over its limit.
        for _ in range(2):
            assert client.post("/charge", json={"ev_id": _ev()}).status_code == 202
        ev_id, key = _ev(), uuid.uuid4().hex
        refused = client.post("/charge", json={"ev_id": ev_id}, headers={"Idempotency-Key": key})
        assert refused.status_code == 503
        body = refused.get_json()
        assert body["error"] == "busy" and refused.headers["Retry-After"]
        assert refused.headers["Location"] == f"/charge/{body['request_id']}"
        # Its copy in the history does not hold the EV: it is rejected, provisionally.
        record = client.get(refused.headers["Location"]).get_json()
        assert (record["status"], record["reason"]) == ("rejected", "not_enqueued")
        # Room again (RabbitMQ 3.10's quorum queue keeps refusing if the policy is cleared
        # instead, until it is drained under a limit).
        observer = BrokerClient(amqp_url)
        assert len(observer.get_all(contract.PENDING_QUEUE)) == 2
        observer.close()
        # A repeat of the key is a new attempt of the same request, and now it is accepted.
        again = client.post("/charge", json={"ev_id": ev_id}, headers={"Idempotency-Key": key})
        assert again.status_code == 202, again.get_json()
        assert again.get_json()["request_id"] == body["request_id"]
        assert client.get(refused.headers["Location"]).get_json()["status"] == "queued"
    finally:
        _stop(app)
