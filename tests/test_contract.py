"""The message contract: round trips, rejections with a reason, and the declared topology."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import TypedDict

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smartgrid import contract, definitions, leases, limits, power, power_request

REQUEST_ID = "0123456789abcdef0123456789abcdef"


def charge_request_dict(**overrides: object) -> dict:
    data = {"v": 1, "request_id": REQUEST_ID, "ev_id": "EV1234", "accepted_at": 1700000000.5}
    data.update(overrides)
    return data


def encode(data: object) -> bytes:
    return json.dumps(data).encode()


def reason_for(body: bytes, decoder=contract.ChargeRequest.from_body) -> str:
    with pytest.raises(contract.InvalidMessage) as caught:
        decoder(body)
    return str(caught.value)


ONE_OF_EACH_EVENT: list[contract.Event] = [
    contract.RequestAccepted(at=1.5, request_id=REQUEST_ID, ev_id="EV1"),
    contract.RequestRouted(
        at=2.0, request_id=REQUEST_ID, ev_id="EV1", substation="s1", balancer="b-1"
    ),
    contract.SessionStarted(
        at=3.0,
        request_id=REQUEST_ID,
        ev_id="EV1",
        substation="s1",
        instance="inst-1",
        accepted_at=1.5,
        expected_end=33.0,
    ),
    contract.SessionCompleted(
        at=33.0,
        request_id=REQUEST_ID,
        ev_id="EV1",
        substation="s1",
        instance="inst-1",
        started_at=3.0,
    ),
    contract.RequestDeadLettered(
        at=4.0,
        reason="invalid charge request",
        source="smartgrid.pending",
        request_id=REQUEST_ID,
        ev_id="EV1",
    ),
    contract.RequestDeadLettered(at=4.0, reason="unparsable", source="smartgrid.pending"),
    contract.SubstationAnnounced(
        at=5.0,
        substation="s1",
        instance="inst-1",
        capacity=4,
        metrics_url="http://h:9101/metrics",
        session_seconds=30.0,
    ),
    contract.SubstationLeaving(at=6.0, substation="s1", instance="inst-1"),
    contract.BalancerStarted(at=7.0, balancer="b-1"),
    contract.SessionLookup(at=8.0, request_id=REQUEST_ID, substation="s2"),
    contract.SessionLookupReply(
        at=8.1, request_id=REQUEST_ID, asker="s2", substation="s1", status="running"
    ),
    contract.RequestRejected(
        at=9.0,
        request_id=REQUEST_ID,
        ev_id="EV1",
        reason=contract.REJECTED_EV_BUSY,
        detail="EV1 has an active request",
        source="b-1",
        accepted_at=1.5,
        active_request_id="f" * 32,
    ),
    contract.SessionStarted(
        at=3.0,
        request_id=REQUEST_ID,
        ev_id="EV1",
        substation="s1",
        instance="inst-1",
        accepted_at=1.5,
        expected_end=None,
        max_kw=50.0,
        min_kw=6.0,
        priority="fleet",
        power_kw=0.0,
    ),
    contract.SessionCompleted(
        at=33.0,
        request_id=REQUEST_ID,
        ev_id="EV1",
        substation="s1",
        instance="inst-1",
        started_at=3.0,
        energy_kwh=12.5,
        paused_seconds=4.25,
    ),
    contract.SessionPower(
        at=4.0,
        request_id=REQUEST_ID,
        substation="s1",
        instance="inst-1",
        power_kw=7.5,
        expected_end=40.0,
    ),
    contract.SessionPower(
        at=4.0, request_id=REQUEST_ID, substation="s1", instance="inst-1", power_kw=0.0
    ),
    contract.SubstationAnnounced(
        at=5.0,
        substation="s1",
        instance="inst-1",
        capacity=4,
        metrics_url="http://h:9101/metrics",
        session_seconds=30.0,
        limit_kw=60.0,
        failsafe_kw=0.0,
        parent="feeder-a",
    ),
    contract.PowerDemand(
        at=5.5,
        substation="s1",
        instance="inst-1",
        limit_kw=60.0,
        failsafe_kw=5.0,
        limit_in_force_kw=40.0,
        power_kw=39.999,
        sessions_fleet=2,
        floor_kw_fleet=2.8,
        want_kw_fleet=22.0,
        sessions_standard=3,
        floor_kw_standard=4.2,
        want_kw_standard=150.0,
        session_min_kw_emergency=(),
        session_max_kw_emergency=(),
        session_min_kw_fleet=(1.4, 1.4),
        session_max_kw_fleet=(11.0, 11.0),
        session_min_kw_standard=(1.4, 1.4, 1.4),
        session_max_kw_standard=(3.7, 46.3, 100.0),
        parent="feeder-a",
        holding_share_kw=40.0,
        holding_issued_at=5.0,
        holding_lease_seconds=3.0,
        holding_term=1700000000000,
        holding_seq=7,
        last_term=1700000000000,
        last_seq=7,
    ),
    contract.PowerDemand(
        at=5.5,
        substation="s2",
        instance="i",
        limit_kw=1.0,
        failsafe_kw=0.0,
        limit_in_force_kw=1.0,
        power_kw=0.0,
    ),
    contract.GridLimit(at=6.0, node="feeder-a", limit_kw=80.0, valid_until=606.0, issued_by="op"),
    contract.GridLimit(at=6.0, node="feeder-a"),
    contract.CancelRequested(at=10.0, request_id=REQUEST_ID, ev_id="EV1", client="fleet-1"),
    contract.CancelRequested(at=10.0, request_id=REQUEST_ID, ev_id="EV1"),
    contract.StatusRequested(at=10.2, request_id=REQUEST_ID),
    contract.RequestCancelled(at=10.5, request_id=REQUEST_ID, ev_id="EV1", source="b-1"),
    contract.RequestCancelled(
        at=10.5,
        request_id=REQUEST_ID,
        ev_id="EV1",
        source="s1",
        substation="s1",
        instance="inst-1",
        started_at=3.0,
    ),
]


# ------------------------------------------------------------------------------ round trips
def test_a_charge_request_survives_a_round_trip_through_its_body():
    request = contract.ChargeRequest(
        request_id=REQUEST_ID, ev_id="EV-1.a:b_c", accepted_at=1700000000.25
    )
    assert contract.ChargeRequest.from_body(request.to_body()) == request


def test_a_charge_request_body_carries_the_schema_version():
    body = json.loads(contract.ChargeRequest(REQUEST_ID, "EV1", 1.0).to_body())
    assert body["v"] == contract.SCHEMA_VERSION


def test_a_routed_request_survives_a_round_trip_and_keeps_the_original_request_fields():
    request = contract.ChargeRequest(request_id=REQUEST_ID, ev_id="EV1", accepted_at=10.0)
    routed = contract.RoutedRequest.from_request(
        request, substation="sub-2", routed_at=11.0, balancer="bal-1"
    )
    decoded = contract.RoutedRequest.from_body(routed.to_body())
    assert decoded == routed
    assert (decoded.request_id, decoded.ev_id, decoded.accepted_at) == (REQUEST_ID, "EV1", 10.0)


def test_the_event_list_used_here_covers_every_event_kind():
    assert {type(e).kind for e in ONE_OF_EACH_EVENT} == set(contract.EVENT_TYPES)


@pytest.mark.parametrize("event", ONE_OF_EACH_EVENT, ids=lambda e: type(e).__name__)
def test_every_event_type_survives_a_round_trip_through_decode_event(event: contract.Event):
    decoded = contract.decode_event(event.kind, event.to_body())
    assert decoded == event
    assert type(decoded) is type(event)


@pytest.mark.parametrize("event", ONE_OF_EACH_EVENT, ids=lambda e: type(e).__name__)
def test_every_event_body_names_its_kind(event: contract.Event):
    assert json.loads(event.to_body())["kind"] == event.kind


def test_an_integer_field_sent_as_a_whole_float_decodes_as_an_int():
    body = encode(
        {
            "at": 1,
            "substation": "s1",
            "instance": "i",
            "capacity": 4.0,
            "metrics_url": "u",
            "session_seconds": 3,
        }
    )
    event = contract.decode_event(contract.SubstationAnnounced.kind, body)
    assert isinstance(event, contract.SubstationAnnounced)
    assert event.capacity == 4 and type(event.capacity) is int
    assert type(event.session_seconds) is float


def test_a_body_without_a_version_is_read_as_the_current_version():
    data = charge_request_dict()
    del data["v"]
    assert contract.ChargeRequest.from_body(encode(data)).ev_id == "EV1234"


# ------------------------------------------------------------------------------ rejections
@pytest.mark.parametrize("body", [b"", b"not json", b"{", b'{"ev_id": }', b"\xff\xfe\x00garbage"])
def test_a_body_that_is_not_json_is_rejected_with_a_reason(body: bytes):
    assert "not JSON" in reason_for(body)


@pytest.mark.parametrize("value", [[], [1, 2], "text", 3, None, True])
def test_a_json_body_that_is_not_an_object_is_rejected(value: object):
    assert "not a JSON object" in reason_for(encode(value))


@pytest.mark.parametrize("field", ["request_id", "ev_id", "accepted_at"])
def test_a_charge_request_missing_a_field_is_rejected_naming_the_field(field: str):
    data = charge_request_dict()
    del data[field]
    reason = reason_for(encode(data))
    assert "missing" in reason and field in reason


def test_a_routed_request_missing_its_substation_is_rejected():
    routed = contract.RoutedRequest(REQUEST_ID, "EV1", 1.0, "s1", 2.0, "b")
    data = json.loads(routed.to_body())
    del data["substation"]
    assert "'substation'" in reason_for(encode(data), contract.RoutedRequest.from_body)


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_accepted_as_a_number(value: bool):
    assert "must be a number" in reason_for(encode(charge_request_dict(accepted_at=value)))


@pytest.mark.parametrize("value", ["1700000000", None, [1], {"t": 1}])
def test_a_number_field_of_another_type_is_rejected(value: object):
    assert "'accepted_at' must be a number" in reason_for(
        encode(charge_request_dict(accepted_at=value))
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_number_that_is_not_finite_is_rejected(value: float):
    # json.dumps writes NaN / Infinity, which Python's json (and so a consumer) parses back.
    assert "must be finite" in reason_for(encode(charge_request_dict(accepted_at=value)))


def test_an_integer_field_with_a_fraction_is_rejected():
    body = encode(
        {
            "at": 1,
            "substation": "s1",
            "instance": "i",
            "capacity": 2.5,
            "metrics_url": "u",
            "session_seconds": 3,
        }
    )
    reason = reason_for(body, lambda b: contract.decode_event(contract.SubstationAnnounced.kind, b))
    assert "'capacity' must be an integer" in reason


@pytest.mark.parametrize("value", [1234, None, True, ["EV1"]])
def test_a_string_field_of_another_type_is_rejected(value: object):
    assert "'ev_id' must be a non-empty string" in reason_for(
        encode(charge_request_dict(ev_id=value))
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef",
        REQUEST_ID + "0",
        "g" * 32,
        " " + REQUEST_ID[1:],
    ],
)
def test_a_malformed_request_id_is_rejected(value: str):
    assert "request_id" in reason_for(encode(charge_request_dict(request_id=value)))


@pytest.mark.parametrize("value", ["", "-EV1", ".EV", "EV 1", "EV/1", "E" * 65, "EV1\n", "ÉV1"])
def test_a_malformed_ev_id_is_rejected(value: str):
    assert "ev_id" in reason_for(encode(charge_request_dict(ev_id=value)))


@pytest.mark.parametrize("value", ["E", "E" * 64, "ev.1:2_3-4", "0"])
def test_ev_ids_at_the_edges_of_the_rule_are_accepted(value: str):
    assert contract.ChargeRequest.from_body(encode(charge_request_dict(ev_id=value))).ev_id == value


@pytest.mark.parametrize("value", ["", "s.1", "s:1", "-s1", "s" * 64, "s 1", "s1/x"])
def test_a_malformed_substation_id_is_rejected(value: str):
    routed = contract.RoutedRequest(REQUEST_ID, "EV1", 1.0, "s1", 2.0, "b")
    data = json.loads(routed.to_body()) | {"substation": value}
    assert "substation" in reason_for(encode(data), contract.RoutedRequest.from_body)


def test_a_malformed_substation_id_in_an_event_is_rejected():
    event = contract.SubstationLeaving(at=1.0, substation="s1", instance="i")
    data = json.loads(event.to_body()) | {"substation": "no.dots"}
    with pytest.raises(contract.InvalidMessage, match="substation"):
        contract.decode_event(event.kind, encode(data))


def test_an_unknown_event_kind_is_rejected():
    event = contract.BalancerStarted(at=1.0, balancer="b")
    with pytest.raises(contract.InvalidMessage, match="unknown event kind 'balancer.exploded'"):
        contract.decode_event("balancer.exploded", event.to_body())


def test_an_event_whose_kind_differs_from_its_routing_key_is_rejected():
    event = contract.SubstationLeaving(at=1.0, substation="s1", instance="i")
    with pytest.raises(contract.InvalidMessage, match="does not match"):
        contract.decode_event(contract.SubstationAnnounced.kind, event.to_body())


def test_an_event_with_the_wrong_kind_in_its_body_is_rejected_even_if_its_fields_fit():
    event = contract.RequestAccepted(at=1.0, request_id=REQUEST_ID, ev_id="EV1")
    data = json.loads(event.to_body()) | {"kind": "request.routed"}
    with pytest.raises(contract.InvalidMessage, match="does not match"):
        contract.decode_event(contract.RequestAccepted.kind, encode(data))


@pytest.mark.parametrize("version", [0, 2, "1", None, [1]])
def test_a_body_of_another_schema_version_is_rejected(version: object):
    assert "unsupported schema version" in reason_for(encode(charge_request_dict(v=version)))


def test_an_event_of_another_schema_version_is_rejected():
    event = contract.BalancerStarted(at=1.0, balancer="b")
    data = json.loads(event.to_body()) | {"v": 2}
    with pytest.raises(contract.InvalidMessage, match="schema version"):
        contract.decode_event(event.kind, encode(data))


def test_a_boolean_schema_version_is_rejected():
    reason_for(encode(charge_request_dict(v=True)))


def test_a_number_too_large_for_a_float_is_rejected_as_invalid():
    body = charge_request_dict()
    text = json.dumps(body).replace("1700000000.5", "1" + "0" * 400)
    reason_for(text.encode())


def test_deeply_nested_json_is_rejected_as_invalid():
    reason_for(b"[" * 100_000 + b"]" * 100_000)


# ------------------------------------------------------------------------------ property
_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)
_FIELD_VALUES = (
    _JSON_VALUES
    | st.just(REQUEST_ID)
    | st.from_regex(contract.EV_ID_PATTERN, fullmatch=True)
    | st.floats(allow_nan=True, allow_infinity=True)
)
_CHARGE_REQUEST_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None, 1.0]),
        "request_id": _FIELD_VALUES,
        "ev_id": _FIELD_VALUES,
        "accepted_at": _FIELD_VALUES,
        "extra": _JSON_VALUES,
    },
)


@given(value=_JSON_VALUES | _CHARGE_REQUEST_LIKE)
def test_any_json_value_either_decodes_as_a_charge_request_or_is_rejected_as_invalid(value: object):
    body = json.dumps(value).encode()
    try:
        request = contract.ChargeRequest.from_body(body)
    except contract.InvalidMessage as exc:
        assert str(exc)
    else:
        assert contract.REQUEST_ID_PATTERN.fullmatch(request.request_id)
        assert contract.is_valid_ev_id(request.ev_id)
        assert type(request.accepted_at) is float and math.isfinite(request.accepted_at)


@given(body=st.binary(max_size=200))
def test_any_bytes_either_decode_as_a_charge_request_or_are_rejected_as_invalid(body: bytes):
    try:
        contract.ChargeRequest.from_body(body)
    except contract.InvalidMessage as exc:
        assert str(exc)


_JSON_TEXT = st.one_of(
    st.binary(max_size=200),
    _JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.text(max_size=60).map(str.encode),
    st.sampled_from([b"NaN", b"-Infinity", b"1e400", b'"\\ud800"', b"\xef\xbb\xbf{}", b"[" * 3000]),
)


@given(body=_JSON_TEXT)
def test_the_contract_reads_json_exactly_as_pythons_parser_does(body: bytes):
    # The fast parser refuses whatever is not standard JSON and Python's then decides, so a
    # message means the same, and is refused for the same reason, as with Python's alone.
    try:
        expected = repr(json.loads(body))
    except RecursionError:
        expected = "InvalidMessage('body is nested too deeply')"
    except (ValueError, UnicodeDecodeError) as exc:
        expected = repr(contract.InvalidMessage(f"body is not JSON: {exc}"))
    try:
        found = repr(contract._load_json(body))
    except contract.InvalidMessage as exc:
        found = repr(exc)
    assert found == expected


@given(
    accepted_at=st.floats(allow_nan=True, allow_infinity=True) | st.integers(),
    max_kw=st.none() | st.floats(min_value=1.4, max_value=350),
)
def test_a_message_is_written_as_pythons_json_reads_it(accepted_at: float, max_kw: float | None):
    request = contract.ChargeRequest(REQUEST_ID, "EV1", accepted_at, max_kw=max_kw)
    body = request.to_body()
    stdlib = json.dumps(contract.dataclasses.asdict(request) | {"v": 1}, separators=(",", ":"))
    # The same fields and values (NaN too: compared as written), in any order.
    assert repr(sorted(json.loads(body).items())) == repr(sorted(json.loads(stdlib).items()))
    if not math.isfinite(accepted_at):
        # Not JSON, so every consumer refuses it: never a null that means "not given".
        assert "must be finite" in reason_for(body)


def test_power_fields_are_checked_by_type_as_well_as_value() -> None:
    # 1 == True and 11 == 11.0: the checked power fields of one must not pass for the other.
    contract.ChargeRequest(REQUEST_ID, "EV1", 1.0, max_kw=11, min_kw=1.4)
    with pytest.raises(contract.InvalidMessage, match="'max_kw' must be a number"):
        contract.ChargeRequest(REQUEST_ID, "EV1", 1.0, max_kw=True, min_kw=1.4)
    with pytest.raises(contract.InvalidMessage, match="'max_kw'"):
        # A wrong type on purpose: the check the contract makes at run time.
        contract.ChargeRequest(REQUEST_ID, "EV1", 1.0, max_kw=[11], min_kw=1.4)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ topology
def _all_topology() -> list[contract.Declaration]:
    return (
        contract.core_topology()
        + contract.substation_topology("s1")
        + contract.substation_topology("s-2")
    )


def test_every_queue_is_a_durable_quorum_queue_with_an_explicit_delivery_limit():
    queues = [d for d in _all_topology() if isinstance(d, contract.Queue)]
    assert len(queues) == 4
    for queue in queues:
        assert queue.durable, queue.name
        assert queue.arguments["x-queue-type"] == "quorum", queue.name
        limit = queue.arguments["x-delivery-limit"]
        assert isinstance(limit, int) and not isinstance(limit, bool) and limit > 0, queue.name


def test_every_work_queue_dead_letters_at_least_once_to_the_dead_letter_exchange():
    queues = [
        d
        for d in _all_topology()
        if isinstance(d, contract.Queue) and d.name != contract.DEAD_LETTER_QUEUE
    ]
    assert {q.name for q in queues} == {
        contract.PENDING_QUEUE,
        contract.substation_queue_name("s1"),
        contract.substation_queue_name("s-2"),
    }
    for queue in queues:
        assert queue.arguments["x-dead-letter-exchange"] == contract.DEAD_LETTER_EXCHANGE
        assert queue.arguments["x-dead-letter-strategy"] == "at-least-once"
        # at-least-once dead-lettering only works with reject-publish overflow
        assert queue.arguments["x-overflow"] == "reject-publish"
        assert queue.arguments["x-delivery-limit"] == contract.DELIVERY_LIMIT


def test_the_dead_letter_queue_does_not_dead_letter_into_itself_and_keeps_messages_long():
    (dlq,) = [
        d
        for d in contract.core_topology()
        if isinstance(d, contract.Queue) and d.name == contract.DEAD_LETTER_QUEUE
    ]
    assert "x-dead-letter-exchange" not in dlq.arguments
    assert dlq.arguments["x-delivery-limit"] == contract.DEAD_LETTER_DELIVERY_LIMIT
    assert (
        contract.Binding(contract.DEAD_LETTER_QUEUE, contract.DEAD_LETTER_EXCHANGE, "")
        in contract.core_topology()
    )


def test_queue_arguments_are_not_shared_between_declarations():
    first, second = contract.substation_topology("a")[0], contract.substation_topology("b")[0]
    assert isinstance(first, contract.Queue) and isinstance(second, contract.Queue)
    assert first.arguments == second.arguments
    assert first.arguments is not second.arguments


def test_declared_names_are_unique():
    declarations = _all_topology()
    exchanges = [d.name for d in declarations if isinstance(d, contract.Exchange)]
    queues = [d.name for d in declarations if isinstance(d, contract.Queue)]
    bindings = [dataclasses.astuple(d) for d in declarations if isinstance(d, contract.Binding)]
    assert len(exchanges) == len(set(exchanges)) == 4
    assert len(queues) == len(set(queues))
    assert len(bindings) == len(set(bindings))
    assert not set(exchanges) & set(queues)


def test_every_binding_joins_a_declared_queue_to_a_declared_exchange():
    declarations = _all_topology()
    exchanges = {d.name for d in declarations if isinstance(d, contract.Exchange)}
    queues = {d.name for d in declarations if isinstance(d, contract.Queue)}
    for binding in (d for d in declarations if isinstance(d, contract.Binding)):
        assert binding.exchange in exchanges and binding.queue in queues, binding


def test_a_substation_queue_is_bound_to_the_dispatch_exchange_by_the_substation_id():
    queue, binding = contract.substation_topology("north-7")
    assert isinstance(queue, contract.Queue)
    assert queue.name == "smartgrid.substation.north-7"
    assert binding == contract.Binding(
        "smartgrid.substation.north-7", contract.DISPATCH_EXCHANGE, "north-7"
    )


def test_the_pending_queue_receives_charge_requests_from_the_requests_exchange():
    assert (
        contract.Binding(
            contract.PENDING_QUEUE, contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY
        )
        in contract.core_topology()
    )


def _started(n: int) -> contract.SessionStarted:
    return contract.SessionStarted(
        at=100.0 + n,
        request_id=f"{n:032x}",
        ev_id=f"EV{n}",
        substation="substation-1",
        instance="i1",
        accepted_at=99.0,
        expected_end=130.0 + n,
    )


def test_a_batch_of_events_round_trips_in_order_and_a_single_event_stays_a_plain_object():
    batch = [_started(n) for n in range(5)]
    assert (
        contract.decode_events(contract.SessionStarted.kind, contract.encode_events(batch)) == batch
    )
    single = contract.encode_events(batch[:1])
    assert single == batch[0].to_body()
    assert contract.decode_event(contract.SessionStarted.kind, single) == batch[0]
    assert contract.decode_events(contract.SessionStarted.kind, single) == batch[:1]


def test_a_batch_with_one_malformed_event_is_rejected_naming_that_event():
    data = [json.loads(_started(n).to_body()) for n in range(3)]
    data[1]["ev_id"] = "no spaces allowed"
    with pytest.raises(contract.InvalidMessage, match="event 1 of the batch: .*ev_id"):
        contract.decode_events(contract.SessionStarted.kind, encode(data))


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"[]", "batch of events is empty"),
        (b"[1, 2]", "event 0 of the batch: body is not a JSON object"),
        (b"[[]]", "event 0 of the batch: body is not a JSON object"),
        (b'"session.started"', "body is not a JSON object"),
    ],
)
def test_a_batch_that_is_not_a_list_of_event_objects_is_rejected(body, reason):
    with pytest.raises(contract.InvalidMessage, match=reason):
        contract.decode_events(contract.SessionStarted.kind, body)


def test_a_batch_of_another_kind_than_its_routing_key_is_rejected():
    body = contract.encode_events([_started(1), _started(2)])
    with pytest.raises(
        contract.InvalidMessage,
        match="event 0 of the batch: event kind 'session.started' does not match",
    ):
        contract.decode_events(contract.SessionCompleted.kind, body)


def test_a_message_carries_events_of_one_kind_only():
    leaving = contract.SubstationLeaving(at=1.0, substation="s1", instance="i")
    with pytest.raises(ValueError, match="one kind"):
        contract.encode_events([_started(1), leaving])
    with pytest.raises(ValueError, match="one kind"):
        contract.encode_events([])


# ------------------------------------------------------------------------------ issue 14 fields
def test_a_charge_request_with_a_client_and_a_body_fingerprint_round_trips():
    request = contract.ChargeRequest(
        request_id=REQUEST_ID,
        ev_id="EV1",
        accepted_at=1.5,
        client="fleet-1",
        body_fingerprint="0" * 32,
    )
    assert contract.ChargeRequest.from_body(request.to_body()) == request


def test_a_charge_request_of_an_earlier_version_has_no_client_and_no_fingerprint():
    request = contract.ChargeRequest.from_body(encode(charge_request_dict()))
    assert request.client is None and request.body_fingerprint is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("client", "has space"),
        ("client", ""),
        ("client", "x" * 65),
        ("body_fingerprint", "abc"),
        ("body_fingerprint", "G" * 32),
    ],
)
def test_a_malformed_client_or_fingerprint_is_rejected_naming_the_field(field: str, value: str):
    assert field in reason_for(encode(charge_request_dict(**{field: value})))


def test_a_rejection_naming_a_malformed_active_request_is_rejected():
    rejected = next(e for e in ONE_OF_EACH_EVENT if isinstance(e, contract.RequestRejected))
    event = dataclasses.replace(rejected, active_request_id="nope")
    assert isinstance(event, contract.RequestRejected)
    with pytest.raises(contract.InvalidMessage, match="active_request_id"):
        contract.decode_event(event.kind, event.to_body())


def test_the_history_stream_is_a_stream_with_retention_by_age_and_size():
    queue, *declarations = contract.history_topology(
        max_age_seconds=90_000, max_bytes=2_000_000_000
    )
    assert isinstance(queue, contract.Queue)
    bindings = [d for d in declarations if isinstance(d, contract.Binding)]
    assert bindings == declarations
    assert queue.name == contract.HISTORY_STREAM and queue.durable
    assert queue.arguments["x-queue-type"] == "stream"
    assert queue.arguments["x-max-age"] == "90000s"
    assert queue.arguments["x-max-length-bytes"] == 2_000_000_000
    assert 0 < queue.arguments["x-stream-max-segment-size-bytes"] <= 2_000_000_000 // 20
    assert (
        contract.Binding(
            contract.HISTORY_STREAM, contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY
        )
        in bindings
    )
    kinds = {b.routing_key for b in bindings if b.exchange == contract.EVENTS_EXCHANGE}
    assert kinds == {cls.kind for cls in contract.HISTORY_EVENTS}
    # Chatter that changes no request's status stays out of the history.
    assert not kinds & {"substation.announced", "session.lookup", "balancer.started"}


@pytest.mark.parametrize("age, size", [(0, 1), (1, 0), (-5, 10)])
def test_a_history_stream_without_limits_is_refused(age: int, size: int):
    with pytest.raises(ValueError):
        contract.history_topology(max_age_seconds=age, max_bytes=size)


#: The services' event subscriptions (the gateway follows the history stream instead).
SUBSCRIPTIONS = [
    contract.BALANCER_EVENTS,
    contract.SUBSTATION_EVENTS,
    contract.LOADGEN_EVENTS,
]


@pytest.mark.parametrize("subscription", SUBSCRIPTIONS, ids=lambda s: s.service)
def test_an_event_subscription_is_a_bounded_queue_bound_to_each_kind_it_follows(subscription):
    queue, *bindings = subscription.declarations("abc123")
    assert queue.name == f"smartgrid.{subscription.service}-events.abc123"
    assert queue.arguments["x-max-length"] == subscription.max_length
    assert queue.arguments["x-overflow"] == "drop-head"
    assert bindings == [
        contract.Binding(queue.name, contract.EVENTS_EXCHANGE, event.kind)
        for event in subscription.events
    ]
    if subscription.durable:
        assert queue.durable and not queue.exclusive
        assert queue.arguments["x-queue-type"] == "quorum"
        assert queue.arguments["x-expires"] == contract.SUBSCRIPTION_EXPIRES_MS
    else:
        assert queue.exclusive and queue.auto_delete and not queue.durable


@pytest.mark.parametrize("subscription", SUBSCRIPTIONS, ids=lambda s: s.service)
def test_every_service_may_declare_read_and_bind_its_own_event_subscription(subscription):
    resource, topic = definitions.role_permissions(definitions.ROLES[subscription.service])
    name = subscription.queue_name("1.abc123")
    for access in ("configure", "write", "read"):
        assert re.fullmatch(resource[access], name), (access, name)
    assert re.fullmatch(resource["read"], contract.EVENTS_EXCHANGE)
    for event in subscription.events:
        assert re.fullmatch(topic["read"], event.kind), event.kind


@pytest.mark.parametrize(
    ("body", "identity"),
    [
        (b'{"request_id": "%s", "ev_id": "EV1"}' % (b"a" * 32), ("a" * 32, "EV1")),
        (b'{"request_id": "not-an-id", "ev_id": "EV 1"}', (None, None)),
        (b'{"request_id": 7}', (None, None)),
        (b"[1, 2]", (None, None)),
        (b"\xff\xfe", (None, None)),
        (b"[" * 100_000, (None, None)),
        (b"", (None, None)),
    ],
)
def test_the_identity_of_any_body_is_what_is_readable_and_valid_in_it(body, identity):
    assert contract.request_identity(body) == identity


# ------------------------------------------------------------------------------ power (issue 15)
class PowerFields(TypedDict):
    max_kw: float
    min_kw: float
    energy_kwh: float
    priority: str


POWER: PowerFields = {"max_kw": 50.0, "min_kw": 6.0, "energy_kwh": 30.0, "priority": "fleet"}


def test_a_charge_request_with_power_fields_round_trips_and_says_its_power():
    request = contract.ChargeRequest(REQUEST_ID, "EV1", 1.0, **POWER)
    decoded = contract.ChargeRequest.from_body(request.to_body())
    assert decoded == request
    power = decoded.power()
    assert (power.max_kw, power.min_kw, power.energy_kwh, power.priority.value) == (
        50.0,
        6.0,
        30.0,
        "fleet",
    )


def test_a_charge_request_of_an_earlier_version_means_the_defaults():
    request = contract.ChargeRequest.from_body(encode(charge_request_dict()))
    assert (request.max_kw, request.min_kw, request.energy_kwh, request.priority) == (None,) * 4
    assert request.power() == power_request.parse_power_fields({})


def test_the_power_fields_travel_with_a_request_to_its_substation_and_back_to_pending():
    request = contract.ChargeRequest(REQUEST_ID, "EV1", 1.0, **POWER)
    routed = contract.RoutedRequest.from_request(
        request, substation="s1", routed_at=2.0, balancer="b"
    )
    assert contract.RoutedRequest.from_body(routed.to_body()).power() == request.power()
    back = routed.back_to_pending()
    assert (back.max_kw, back.min_kw, back.energy_kwh, back.priority) == tuple(POWER.values())


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_kw": 1.0}, "'max_kw'"),
        ({"max_kw": 351}, "'max_kw'"),
        ({"max_kw": "11"}, "'max_kw'"),
        ({"max_kw": True}, "'max_kw'"),
        ({"min_kw": 20.0, "max_kw": 11.0}, "'min_kw'"),
        ({"min_kw": 12.0}, "'min_kw'"),  # above the default maximum
        ({"energy_kwh": 0}, "'energy_kwh'"),
        ({"energy_kwh": 200.5}, "'energy_kwh'"),
        ({"energy_kwh": math.nan}, "'energy_kwh'"),
        ({"priority": "vip"}, "'priority'"),
        ({"priority": 1}, "'priority'"),
    ],
)
def test_a_request_message_breaking_the_power_rules_is_rejected_naming_the_field(fields, named):
    reason = reason_for(encode(charge_request_dict(**fields)))
    assert named in reason
    routed = json.loads(contract.RoutedRequest(REQUEST_ID, "EV1", 1.0, "s1", 2.0, "b").to_body())
    assert named in reason_for(encode(routed | fields), contract.RoutedRequest.from_body)


@pytest.mark.parametrize(
    ("kind", "fields", "named"),
    [
        ("session.started", {"priority": "vip"}, "'priority'"),
        ("session.started", {"power_kw": -1}, "'power_kw'"),
        ("session.power", {"power_kw": 400}, "'power_kw'"),
        ("session.completed", {"energy_kwh": -0.5}, "'energy_kwh'"),
        ("substation.announced", {"parent": "no.dots"}, "'parent'"),
        ("substation.announced", {"limit_kw": -1}, "'limit_kw'"),
        ("power.demand", {"power_kw": -0.001}, "'power_kw'"),
        ("power.demand", {"sessions_fleet": 1.5}, "'sessions_fleet'"),
        ("power.demand", {"holding_term": None}, "holding_"),
        ("power.demand", {"last_seq": None}, "last_term"),
        ("power.demand", {"last_seq": None, "last_term": None, "released_kw": 5.0}, "released_kw"),
        ("power.demand", {"released_kw": -1.0}, "'released_kw'"),
        ("power.demand", {"session_max_kw_fleet": [11.0]}, "sessions_fleet"),
        ("power.demand", {"session_max_kw_fleet": None}, "session_max_kw_fleet"),
        ("power.demand", {"session_min_kw_fleet": [1.4, 12.0]}, "'session_min_kw_fleet'"),
        ("power.demand", {"session_min_kw_fleet": [1.4, -1]}, "'session_min_kw_fleet'"),
        ("power.demand", {"session_max_kw_fleet": [11.0, "11"]}, "'session_max_kw_fleet'"),
        ("power.demand", {"session_max_kw_fleet": 11.0}, "'session_max_kw_fleet'"),
        ("power.demand", {"session_max_kw_fleet": [11.0, math.inf]}, "'session_max_kw_fleet'"),
        ("grid.limit", {"limit_kw": 0}, "'limit_kw'"),
        ("grid.limit", {"valid_until": 6.0}, "'valid_until'"),
        ("grid.limit", {"node": "a b"}, "'node'"),
    ],
)
def test_a_power_event_breaking_its_rules_is_rejected_naming_the_field(kind, fields, named):
    # The one of its kind with the most fields set: every rule applies to it.
    event = max(
        (e for e in ONE_OF_EACH_EVENT if e.kind == kind),
        key=lambda e: sum(v is not None for v in dataclasses.asdict(e).values()),
    )
    data = json.loads(event.to_body()) | fields
    with pytest.raises(contract.InvalidMessage, match=re.escape(named)):
        contract.decode_event(kind, encode(data))


def test_a_share_round_trips_and_is_validated():
    share = contract.PowerShare("s1", 12.5, 100.0, 3.0, term=5, seq=9)
    assert contract.PowerShare.from_body(share.to_body()) == share
    data = json.loads(share.to_body())
    for field, value in [("lease_seconds", 0), ("share_kw", -1), ("substation", "a.b")]:
        with pytest.raises(contract.InvalidMessage, match=field):
            contract.PowerShare.from_body(encode(data | {field: value}))


@given(
    sessions=st.tuples(*[st.integers(0, 50)] * 3),
    floors=st.tuples(*[st.integers(0, 10**7)] * 3),
    wants=st.tuples(*[st.integers(0, 10**7)] * 3),
    failsafe=st.integers(0, 10**6),
    limit=st.integers(1, 10**8),
    parent=st.none() | st.sampled_from(["feeder-a", "site"]),
    holding=st.booleans(),
    last=st.none() | st.tuples(st.integers(0, 2**53), st.integers(0, 2**31)),
    released=st.none() | st.integers(0, 10**8),
)
def test_a_demand_report_survives_the_trip_through_its_event_to_the_watt(
    sessions, floors, wants, failsafe, limit, parent, holding, last, released
):
    grant = leases.Grant("s1", limit // 2, 100.25, 3.0, 17, 4) if holding else None
    report = leases.DemandReport(
        "s1",
        101.5,
        limit,
        leases.Demand(sessions, floors, wants, failsafe),
        parent,
        grant,
        last,
        released if last is not None else None,
    )
    event = leases.report_to_event(report, instance="i", limit_in_force_w=limit, power_w=limit)
    decoded = contract.decode_event(event.kind, event.to_body())
    assert isinstance(decoded, contract.PowerDemand)
    assert leases.report_from_event(decoded) == report


@given(
    sessions=st.lists(
        st.tuples(
            st.sampled_from(power.CLASS_ORDER),
            st.integers(0, 20_000),
            st.integers(0, 350_000),
        ).map(lambda s: (s[0], min(s[1], s[2]), s[2])),
        max_size=12,
    ),
    failsafe=st.integers(0, 10**6),
)
def test_a_demand_over_sessions_survives_the_trip_through_its_event_to_the_watt(sessions, failsafe):
    demand = leases.Demand.of_sessions(sessions, failsafe)
    report = leases.DemandReport("s1", 101.5, 50_000, demand)
    event = leases.report_to_event(report, instance="i", limit_in_force_w=1, power_w=0)
    decoded = contract.decode_event(event.kind, event.to_body())
    assert isinstance(decoded, contract.PowerDemand)
    assert leases.report_from_event(decoded) == report


def test_a_demand_of_an_older_substation_without_its_sessions_is_accepted():
    # A rolling upgrade: the allocator takes its sessions as alike.
    data = json.loads(
        contract.PowerDemand(
            at=1.0,
            substation="s1",
            instance="i",
            limit_kw=60.0,
            failsafe_kw=0.0,
            limit_in_force_kw=60.0,
            power_kw=0.0,
            sessions_standard=2,
            floor_kw_standard=2.8,
            want_kw_standard=22.0,
        ).to_body()
    )
    older = {k: v for k, v in data.items() if not k.startswith("session_")}  # never sent them
    decoded = contract.decode_event("power.demand", encode(older))
    assert isinstance(decoded, contract.PowerDemand)
    demand = leases.report_from_event(decoded).demand
    assert demand.sessions_w is None
    assert demand.bounds(2) == ((1_400, 11_000), (1_400, 11_000))


def test_a_grant_and_an_override_survive_the_trip_through_their_messages():
    grant = leases.Grant("s1", 33_333, 100.0, 3.0, 1700000000123, 42)
    message = contract.PowerShare.from_body(leases.grant_to_message(grant).to_body())
    assert leases.grant_from_message(message) == grant
    for override in (
        limits.LimitOverride("feeder-a", 80_000, 10.0, 70.0),
        limits.LimitOverride("feeder-a", None, 11.0),
    ):
        event = limits.override_to_event(override, issued_by="op@host")
        decoded = contract.decode_event(event.kind, event.to_body())
        assert isinstance(decoded, contract.GridLimit)
        assert limits.override_from_event(decoded) == override


def test_the_report_classes_are_the_priority_classes_in_their_order():
    assert tuple(p.value for p in power.CLASS_ORDER) == contract.POWER_CLASSES
    names = {f.name for f in dataclasses.fields(contract.PowerDemand)}
    for prefix in ("sessions", "floor_kw", "want_kw"):
        assert {f"{prefix}_{c}" for c in contract.POWER_CLASSES} <= names


def test_the_power_topology_hands_reports_to_one_allocator_and_keeps_limit_changes():
    declarations = contract.power_topology()
    queues = {d.name: d for d in declarations if isinstance(d, contract.Queue)}
    reports = queues[contract.POWER_REPORTS_QUEUE]
    assert reports.arguments["x-queue-type"] == "quorum"
    assert reports.arguments["x-single-active-consumer"] is True
    assert reports.arguments["x-overflow"] == "drop-head"
    limits_stream = queues[contract.GRID_LIMITS_STREAM]
    assert limits_stream.arguments["x-queue-type"] == "stream" and limits_stream.durable
    bindings = {(d.queue, d.routing_key) for d in declarations if isinstance(d, contract.Binding)}
    assert bindings == {
        (contract.POWER_REPORTS_QUEUE, contract.PowerDemand.kind),
        (contract.GRID_LIMITS_STREAM, contract.GridLimit.kind),
    }


def test_the_power_topology_binds_only_what_it_or_the_core_declares():
    declarations = (
        contract.core_topology() + contract.power_topology() + contract.power_share_topology("s1")
    )
    names = [d.name for d in declarations if not isinstance(d, contract.Binding)]
    exchanges = {d.name for d in declarations if isinstance(d, contract.Exchange)}
    queues = {d.name for d in declarations if isinstance(d, contract.Queue)}
    assert len(set(names) - exchanges) == len(queues)  # no queue named like an exchange
    for binding in (d for d in declarations if isinstance(d, contract.Binding)):
        assert binding.exchange in exchanges and binding.queue in queues


def test_a_substations_share_queue_is_its_own_and_keeps_only_the_newest_share():
    exchange, queue, binding = contract.power_share_topology("north-7")
    assert isinstance(exchange, contract.Exchange) and exchange.name == contract.POWER_EXCHANGE
    assert isinstance(queue, contract.Queue) and queue.exclusive and not queue.durable
    assert queue.arguments == {"x-max-length": 1, "x-overflow": "drop-head"}
    assert binding == contract.Binding(queue.name, contract.POWER_EXCHANGE, "north-7")
    # A substation id has no dot, so no share queue is named like the reports queue.
    assert not contract.is_valid_substation_id("reports.x")
    assert contract.power_share_queue_name("reports") != contract.POWER_REPORTS_QUEUE


# ------------------------------------------------------------ arrays of numbers, at C speed
_array_items = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e308),
    st.integers(-(10**400), 10**400),
    st.booleans(),
    st.text(max_size=2),
    st.none(),
)


def _item_by_item(value: list) -> tuple[float, ...] | str:
    """What an array of numbers decodes to when each item is checked on its own."""
    from smartgrid.numbers import NotANumber, finite_number

    try:
        return tuple(float(finite_number(v)) for v in value)
    except NotANumber:
        return "refused"


@given(st.lists(_array_items, max_size=6) | st.lists(st.floats(0, 400), max_size=50))
@example([1.0, math.inf])
@example([math.nan, 2.0])
@example([-math.inf, math.inf])
@example([1e308, 1e308])  # finite items whose sum is not
@example([11, 1.4])
def test_an_array_of_numbers_decodes_as_its_items_checked_one_by_one_would(value: list) -> None:
    # _check_value takes every-float arrays with a finite sum at once; the result (or the
    # refusal) must be the item-by-item check's, whatever the array holds.
    try:
        got: tuple[float, ...] | str = contract._check_value(
            "session_min_kw_standard", contract.NUMBERS, True, value
        )
    except contract.InvalidMessage:
        got = "refused"
    expected = _item_by_item(value)
    assert got == expected
    if isinstance(got, tuple):
        assert [type(v) for v in got] == [float] * len(got)


@given(
    st.lists(
        st.tuples(st.floats(-5, 50, allow_nan=False), st.floats(-5, 50, allow_nan=False)),
        max_size=8,
    )
)
def test_a_report_takes_session_bounds_exactly_when_each_minimum_is_within_0_and_its_maximum(
    bounds: list[tuple[float, float]],
):
    def demand() -> contract.PowerDemand:
        return contract.PowerDemand(
            at=1.0,
            substation="s1",
            instance="i1",
            limit_kw=100.0,
            failsafe_kw=0.0,
            limit_in_force_kw=100.0,
            power_kw=0.0,
            sessions_standard=len(bounds),
            session_min_kw_standard=tuple(low for low, _ in bounds),
            session_max_kw_standard=tuple(high for _, high in bounds),
            session_min_kw_emergency=(),
            session_max_kw_emergency=(),
            session_min_kw_fleet=(),
            session_max_kw_fleet=(),
        )

    valid = all(0 <= low <= high for low, high in bounds)
    if valid:
        demand()
    else:
        with pytest.raises(contract.InvalidMessage, match="session_min_kw_standard"):
            demand()
