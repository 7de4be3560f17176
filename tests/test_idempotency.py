"""Idempotency keys: the header rule, the derived request id and the body fingerprint."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.idempotency import (
    MAX_KEY_LENGTH,
    InvalidKey,
    body_fingerprint,
    derive_request_id,
    parse_key,
)
from smartgrid import contract

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
KEYS = st.text(PRINTABLE, min_size=1, max_size=MAX_KEY_LENGTH).filter(
    lambda k: k.strip(" \t") == k and not k.startswith('"')
)


def sf_string(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------ the header
@pytest.mark.parametrize(
    "raw, key",
    [
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("  padded\t", "padded"),
        ("a", "a"),
        ("with inner space", "with inner space"),
        ('"quoted \\"inner\\" and \\\\"', 'quoted "inner" and \\'),
        ("k" * MAX_KEY_LENGTH, "k" * MAX_KEY_LENGTH),
        ('"' + "k" * MAX_KEY_LENGTH + '"', "k" * MAX_KEY_LENGTH),
    ],
)
def test_a_key_is_read_bare_or_as_a_quoted_string(raw: str, key: str):
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    "raw, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ('""', "empty"),
        ("k" * (MAX_KEY_LENGTH + 1), "at most 255"),
        ('"' + "k" * (MAX_KEY_LENGTH + 1) + '"', "at most 255"),
        ("clé", "other characters"),
        ("tab\tinside", "other characters"),
        ("nul\x00", "other characters"),
        ('"unterminated', "no closing quote"),
        ('"early" end', "closing quote"),
        ('"bad \\n escape"', "backslash"),
        ('"trailing backslash\\"', "no closing quote"),
    ],
)
def test_a_key_that_breaks_the_rule_is_refused_saying_why(raw: str, words: str):
    with pytest.raises(InvalidKey, match=words):
        parse_key(raw)


@given(KEYS)
def test_any_key_of_the_rule_reads_back_bare_or_quoted(key: str):
    assert parse_key(key) == key
    assert parse_key(sf_string(key)) == key


@given(st.text(max_size=300))
def test_any_header_value_gives_a_key_of_the_rule_or_a_clear_refusal(raw: str):
    try:
        key = parse_key(raw)
    except InvalidKey as exc:
        assert str(exc)
    else:
        assert 1 <= len(key) <= MAX_KEY_LENGTH
        assert all(" " <= ch <= "~" for ch in key)


# ------------------------------------------------------------------------------ request ids
def test_the_request_id_is_derived_from_the_client_and_the_key_in_the_contract_format():
    request_id = derive_request_id("fleet-1", "key-1")
    assert contract.REQUEST_ID_PATTERN.fullmatch(request_id)
    assert derive_request_id("fleet-1", "key-1") == request_id  # any replica, any restart


def test_the_same_key_from_two_clients_or_the_open_api_gives_different_ids():
    ids = {derive_request_id(c, "key-1") for c in ("fleet-1", "fleet-2", None)}
    assert len(ids) == 3


def test_client_and_key_cannot_be_shifted_into_one_another():
    assert derive_request_id("ab", "c") != derive_request_id("a", "bc")


def test_a_client_name_outside_the_rule_is_a_programming_error():
    with pytest.raises(ValueError):
        derive_request_id("no spaces", "k")


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", None]), KEYS), min_size=2, max_size=30, unique=True
    )
)
def test_distinct_client_key_pairs_give_distinct_ids(pairs):
    assert len({derive_request_id(c, k) for c, k in pairs}) == len(pairs)


# ------------------------------------------------------------------------------ fingerprints
def test_bodies_differing_only_in_form_share_a_fingerprint():
    first = json.loads('{"ev_id": "EV1", "max_kw": 22}')
    second = json.loads('{ "max_kw":22.0,"ev_id":"EV1" }')
    assert body_fingerprint(first) == body_fingerprint(second)
    assert contract.FINGERPRINT_PATTERN.fullmatch(body_fingerprint(first))


@pytest.mark.parametrize(
    "other",
    [
        {"ev_id": "EV2"},
        {"ev_id": "EV1", "max_kw": 22.5},
        {"ev_id": "EV1", "priority": "fleet"},
        {"ev_id": "ev1"},
    ],
)
def test_bodies_differing_in_any_value_have_different_fingerprints(other: dict):
    assert body_fingerprint({"ev_id": "EV1"}) != body_fingerprint(other)


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        max_size=5,
    )
)
def test_the_fingerprint_does_not_depend_on_key_order(fields: dict):
    reordered = dict(reversed(list(fields.items())))
    assert body_fingerprint(fields) == body_fingerprint(reordered)
