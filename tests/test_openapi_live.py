"""schemathesis against a live gateway (issue 14, point 7): every answer to generated input,
valid and invalid, is documented by gateway/openapi.json (status, content type, headers,
body), and no input produces a 5xx.

The gateway is a real process on the real broker, with client tokens on; the requests it
accepts wait in the test's own vhost (no balancer runs: whether they charge is not the API's
business). Most calls carry the driver's token, the others none or one schemathesis made up;
generated ids are unknown (404), so one request of the test's own is also followed through
GET and DELETE. Run with ``-s`` to see the statuses each operation got.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.result import Err, Result
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from stack.local import StackSettings, gateway_process
from stack.tokens import Client, ensure_tokens
from tests.ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SPEC = Path(__file__).resolve().parent.parent / "gateway" / "openapi.json"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SCHEMA = schemathesis.openapi.from_path(SPEC)


def _read_operation(result: Result[APIOperation, InvalidSchema]) -> APIOperation:
    """An operation of the spec; a spec schemathesis cannot read fails the module loudly."""
    if isinstance(result, Err):
        raise result.err()
    return result.ok()


OPERATIONS = [_read_operation(result) for result in SCHEMA.get_all_operations()]
EXAMPLES = 60


class LiveGateway:
    def __init__(self, url: str, token: str):
        self.url = url
        self.token = token
        self.session = requests.Session()

    def headers(self, *, authorized: bool = True) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if authorized else {}


@pytest.fixture(scope="module")
def live_gateway(module_amqp_url: str, tmp_path_factory) -> Iterator[LiveGateway]:
    directory = tmp_path_factory.mktemp("openapi-live")
    tokens = ensure_tokens(directory / "tokens", [Client("driver")])
    (port,) = free_ports(1)
    stack = StackSettings(
        amqp_url=module_amqp_url,
        gateway_port=port,
        gateway_workers=1,
        log_dir=directory / "logs",
        tokens_file=directory / "tokens" / "gateway-tokens",
    )
    service = gateway_process(stack)
    service.start()
    try:
        service.wait_healthy(60)
        yield LiveGateway(stack.gateway_url, tokens["driver"])
    finally:
        service.stop()


def _label(operation) -> str:
    return f"{operation.method.upper()} {operation.path}"


def _has_input(operation) -> bool:
    return bool(list(operation.iter_parameters())) or bool(len(operation.body))


# Invalid input only where an operation takes some (GET /health has nothing to make invalid).
CASES = [
    pytest.param(operation, mode, id=f"{_label(operation)}-{mode.value}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _has_input(operation)
]


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_every_answer_is_documented_and_none_is_a_5xx(
    live_gateway: LiveGateway, operation, mode: GenerationMode
):
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    # Mostly with the driver's token; otherwise with none, or a random one schemathesis made up.
    @given(case=operation.as_strategy(generation_mode=mode), authorized=st.integers(0, 3))
    def run(case, authorized: int) -> None:
        headers = live_gateway.headers(authorized=authorized < 3)
        response = case.call_and_validate(
            base_url=live_gateway.url,
            session=live_gateway.session,
            headers=headers,
            checks=CHECKS,
            timeout=30,
        )
        statuses[response.status_code] += 1

    run()
    print(f"{_label(operation)} {mode.value}: {dict(sorted(statuses.items()))}")
    assert statuses


def _operation(method: str, path: str):
    return next(o for o in OPERATIONS if (o.method, o.path) == (method, path))


def test_a_request_of_its_own_is_answered_as_documented_through_its_life(
    live_gateway: LiveGateway,
):
    """Generated ids are unknown (404): this one exists, so GET answers 200 and DELETE 202."""
    post = _operation("post", "/charge").Case(
        body={"ev_id": "EV-openapi-live"}, headers={"Idempotency-Key": "openapi-live-1"}
    )
    answers = []
    for _ in range(2):  # the second is a replay of the first
        response = post.call_and_validate(
            base_url=live_gateway.url, headers=live_gateway.headers(), checks=CHECKS
        )
        answers.append(response)
    assert [r.status_code for r in answers] == [202, 202]
    request_id = answers[0].json()["request_id"]
    assert answers[1].json()["request_id"] == request_id
    assert answers[1].headers.get("idempotent-replayed") == ["true"]
    for method, expected in (("get", 200), ("delete", 202), ("delete", 202), ("get", 200)):
        case = _operation(method, "/charge/{request_id}").Case(
            path_parameters={"request_id": request_id}
        )
        response = case.call_and_validate(
            base_url=live_gateway.url, headers=live_gateway.headers(), checks=CHECKS
        )
        assert response.status_code == expected, (method, response.text)
