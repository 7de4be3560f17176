"""gateway/openapi.json: a valid OpenAPI 3.1 description, and what the code answers conforms
to it (the history's records, and every answer of the pure decision modules)."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from gateway import answers
from gateway.answers import Answer, Outcome, PublishCancel, PublishRequest
from gateway.app import ACCEPTED_FIELDS, BadBody, parse_charge_body
from gateway.clients import AuthFailure
from gateway.history import PUBLIC_FIELDS, STATUSES, RequestHistory
from gateway.openapi import description
from gateway.ratelimit import RateLimiter
from smartgrid import contract
from smartgrid.power import MAX_CAR_KW, MIN_CAR_KW
from smartgrid.power_request import MAX_ENERGY_KWH, POWER_FIELDS, PRIORITY_NAMES, FieldError
from tests.test_history import SCENARIOS, feed

SPEC = description()
NOW = 1_000_000.0


def schema_validator(schema: dict) -> OAS31Validator:
    return OAS31Validator({**schema, "components": SPEC["components"]})


def resolve(node: dict) -> dict:
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = SPEC["components"][kind][name]
    return node


def documented_response(path: str, method: str, status: int) -> dict:
    responses = SPEC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not document {status}"
    return resolve(responses[str(status)])


def assert_conforms(path: str, method: str, answer: Answer) -> None:
    response = documented_response(path, method, answer.status)
    schema = response["content"]["application/json"]["schema"]
    schema_validator(schema).validate(answer.body)
    undocumented = set(answer.headers) - set(response.get("headers", {}))
    assert not undocumented, f"{answer.status} sends undocumented headers {undocumented}"


# ------------------------------------------------------------------------------ the document
def test_the_description_is_valid_openapi_3_1():
    assert SPEC["openapi"].startswith("3.1.")
    validate(SPEC)


def test_the_validator_would_notice_a_broken_description():
    broken = copy.deepcopy(SPEC)
    broken["paths"]["/charge"]["post"]["responses"]["202"] = {"content": {}}  # no description
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_every_operation_is_documented():
    operations = {(p, m) for p, item in SPEC["paths"].items() for m in item if m != "parameters"}
    assert operations == {
        ("/charge", "post"),
        ("/charge/{request_id}", "get"),
        ("/charge/{request_id}", "delete"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    }


def test_health_metrics_and_the_description_stay_open_and_charge_calls_may_need_a_token():
    for path in ("/health", "/metrics", "/openapi.json"):
        assert SPEC["paths"][path]["get"]["security"] == []
    for method in ("get", "delete"):
        assert SPEC["paths"]["/charge/{request_id}"][method]["security"] == [{"bearer": []}, {}]
    assert SPEC["paths"]["/charge"]["post"]["security"] == [{"bearer": []}, {}]


def test_the_vocabulary_is_the_codes():
    schemas = SPEC["components"]["schemas"]
    assert tuple(schemas["Status"]["enum"]) == STATUSES
    assert tuple(schemas["ChargeStatus"]["properties"]) == PUBLIC_FIELDS
    assert schemas["EvId"]["pattern"] == f"^{contract.EV_ID_PATTERN.pattern}$"
    assert schemas["RequestId"]["pattern"] == f"^{contract.REQUEST_ID_PATTERN.pattern}$"
    assert schemas["SubstationId"]["pattern"] == f"^{contract.SUBSTATION_ID_PATTERN.pattern}$"


def test_the_request_body_takes_an_ev_id_and_refuses_unknown_fields():
    validator = schema_validator(SPEC["components"]["schemas"]["ChargeRequestBody"])
    assert validator.is_valid({"ev_id": "EV1234"})
    assert not validator.is_valid({"ev_id": "EV1234", "colour": "red"})
    assert not validator.is_valid({"ev_id": "bad id"})
    assert not validator.is_valid({})


# ------------------------------------------------------------------------------ the code
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_record_the_history_shows_conforms(name):
    items, _final = SCENARIOS[name]
    validator = schema_validator(SPEC["components"]["schemas"]["ChargeStatus"])
    for length in range(1, len(items) + 1):
        for prefix in itertools.permutations(items, length):
            history = RequestHistory(clock=lambda: NOW)
            feed(history, prefix)
            validator.validate(history.get(items[0].request_id))


def every_post_answer() -> list[Answer]:
    history = RequestHistory(clock=lambda: NOW)
    ids = iter(f"{n:032x}" for n in range(100))

    def post(ev="EV1", key=None, client="fleet-1", body=None):
        return answers.plan_charge(
            history,
            client=client,
            key=key,
            fields=body or {"ev_id": ev},
            now=NOW,
            new_request_id=lambda: next(ids),
        )

    found = []
    first = post(key="k1")
    assert isinstance(first, PublishRequest)
    for outcome in Outcome:
        found.append(answers.after_publish(first, outcome, record=None, retry_after=5)[0])
    history.accepted(first.request)
    record = history.lookup(first.request.request_id)
    found.append(answers.after_publish(first, Outcome.CONFIRMED, record=record, retry_after=5)[0])
    repeat = post(key="k1")
    found.append(answers.after_publish(repeat, Outcome.CONFIRMED, record=record, retry_after=5)[0])
    found.append(post(key="k1", body={"ev_id": "EV2"}))  # 422
    found.append(post())  # 409 naming it
    found.append(post(client="fleet-2"))  # 409 not naming it
    history.apply(
        contract.RequestRouted(
            at=NOW, request_id=first.request.request_id, ev_id="EV1", substation="s1", balancer="b"
        )
    )
    found.append(post(key="k1"))  # replayed from the history
    found.append(answers.error(400, "invalid_idempotency_key", "words"))
    found.append(AuthFailure("no token").answer())
    found.append(AuthFailure("bad", code="invalid_token").answer())
    found.append(RateLimiter(rate=1).answer(0.3))
    return found


def test_every_answer_to_post_conforms():
    found = every_post_answer()
    assert {a.status for a in found} == {202, 400, 401, 409, 422, 429, 503}
    for answer in found:
        assert_conforms("/charge", "post", answer)


def _answer(plan: Answer | PublishCancel) -> Answer:
    """A cancel plan that is an answer already (nothing to publish)."""
    assert isinstance(plan, Answer), plan
    return plan


def test_every_answer_to_get_and_delete_conforms() -> None:
    history = RequestHistory(clock=lambda: NOW)
    rid = "a" * 32
    history.accepted(contract.ChargeRequest(request_id=rid, ev_id="EV1", accepted_at=NOW))
    found: list[Answer] = [_answer(answers.plan_cancel(history, "b" * 32, client=None, now=NOW))]
    plan = answers.plan_cancel(history, rid, client=None, now=NOW)
    assert isinstance(plan, PublishCancel)
    for outcome in Outcome:
        found.append(answers.after_cancel(plan, outcome, record=None, retry_after=5))
    history.apply(plan.event)
    record = history.lookup(rid)
    found.append(answers.after_cancel(plan, Outcome.CONFIRMED, record=record, retry_after=5))
    history.apply(contract.RequestCancelled(at=NOW, request_id=rid, ev_id="EV1", source="b"))
    found.append(_answer(answers.plan_cancel(history, rid, client=None, now=NOW)))  # cancelled
    other = "c" * 32
    history.accepted(contract.ChargeRequest(request_id=other, ev_id="EV2", accepted_at=NOW))
    history.apply(
        contract.SessionCompleted(
            at=NOW, request_id=other, ev_id="EV2", substation="s1", instance="i", started_at=NOW
        )
    )
    found.append(_answer(answers.plan_cancel(history, other, client=None, now=NOW)))  # 409
    found.append(AuthFailure("no token").answer())
    found.append(RateLimiter(rate=1).answer(2))
    assert {a.status for a in found} == {202, 401, 404, 409, 429, 503}
    for answer in found:
        assert_conforms("/charge/{request_id}", "delete", answer)
    shown = history.get(rid)
    assert shown is not None
    assert_conforms("/charge/{request_id}", "get", Answer(200, shown))


# ------------------------------------------------------------------------------ power fields
def test_the_request_body_documents_exactly_the_fields_the_gateway_accepts():
    body = SPEC["components"]["schemas"]["ChargeRequestBody"]
    assert set(body["properties"]) == ACCEPTED_FIELDS
    assert body["required"] == ["ev_id"]
    props = body["properties"]
    assert (props["max_kw"]["minimum"], props["max_kw"]["maximum"]) == (MIN_CAR_KW, MAX_CAR_KW)
    assert (props["min_kw"]["minimum"], props["min_kw"]["maximum"]) == (MIN_CAR_KW, MAX_CAR_KW)
    assert props["energy_kwh"]["maximum"] == MAX_ENERGY_KWH
    assert tuple(props["priority"]["enum"]) == PRIORITY_NAMES


def test_every_field_error_code_is_documented():
    enum = documented_response("/charge", "post", 422)["content"]["application/json"]["schema"]
    codes = set(enum["allOf"][1]["properties"]["error"]["enum"])
    assert {FieldError(field, "").code for field in POWER_FIELDS} <= codes


_FIELD_VALUES = {
    "energy_kwh": st.one_of(st.floats(-10, 300), st.integers(-5, 250), st.text(max_size=3)),
    "max_kw": st.one_of(st.floats(0, 400), st.integers(0, 400), st.booleans(), st.none()),
    "min_kw": st.one_of(st.floats(0, 400), st.integers(0, 20), st.lists(st.integers(), max_size=1)),
    "priority": st.one_of(st.sampled_from([*PRIORITY_NAMES, "Fleet", "vip", ""]), st.integers()),
}


@given(st.fixed_dictionaries({}, optional=_FIELD_VALUES))
def test_the_gateway_and_the_description_agree_on_every_body(fields: dict):
    """What the code accepts the description allows; what the description refuses the code
    refuses (the one rule it cannot say, min_kw <= max_kw, the code adds)."""
    body = {"ev_id": "EV1"} | fields
    documented = schema_validator(SPEC["components"]["schemas"]["ChargeRequestBody"]).is_valid(body)
    try:
        parse_charge_body(json.dumps(body).encode())
        accepted = True
    except BadBody as bad:
        accepted = False
        assert bad.status == 422 and bad.error.startswith("invalid_")
    assert documented or not accepted
    if documented and fields.get("min_kw", 0) <= fields.get("max_kw", 11):
        assert accepted
