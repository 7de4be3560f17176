"""A charge request's power fields: every bad value named for a 422, defaults that reproduce the
count-only behaviour, and energy delivered in simulated time. Pure functions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgrid.power import Priority
from smartgrid.power_request import (
    FieldError,
    PowerFields,
    RequestDefaults,
    SessionEnergy,
    energy_kwh,
    parse_power_fields,
)

#: The machine is shared: a slow example is not a failure.
no_deadline = settings(deadline=None)


def test_a_bare_request_gets_the_defaults():
    fields = parse_power_fields({"ev_id": "EV1"})
    assert fields == PowerFields(max_kw=11.0, min_kw=1.4, priority=Priority.STANDARD)
    assert (fields.max_w, fields.min_w) == (11_000, 1_400)


def test_every_field_is_read():
    fields = parse_power_fields(
        {"energy_kwh": 30, "max_kw": 150, "min_kw": 7.4, "priority": "emergency"}
    )
    assert fields == PowerFields(150.0, 7.4, Priority.EMERGENCY, 30.0)
    assert type(fields.energy_kwh) is float


def test_null_means_the_default():
    assert parse_power_fields({"max_kw": None, "priority": None}) == parse_power_fields({})


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"energy_kwh": 0}, "energy_kwh", "above 0"),
        ({"energy_kwh": -5}, "energy_kwh", "above 0"),
        ({"energy_kwh": 200.01}, "energy_kwh", "at most 200"),
        ({"energy_kwh": "30"}, "energy_kwh", "a number"),
        ({"energy_kwh": True}, "energy_kwh", "a number"),
        ({"energy_kwh": math.nan}, "energy_kwh", "finite"),
        ({"max_kw": 1.3}, "max_kw", "between 1.4 and 350"),
        ({"max_kw": 351}, "max_kw", "between 1.4 and 350"),
        ({"max_kw": math.inf}, "max_kw", "finite"),
        ({"max_kw": 10**400}, "max_kw", "out of range"),
        ({"max_kw": [11]}, "max_kw", "a number"),
        ({"min_kw": 1}, "min_kw", "between 1.4 and 350"),
        ({"min_kw": 22}, "min_kw", "must not exceed max_kw (11, the default)"),
        ({"min_kw": 22, "max_kw": 11}, "min_kw", "must not exceed max_kw (11)"),
        ({"priority": "urgent"}, "priority", "standard, fleet, emergency"),
        ({"priority": 1}, "priority", "one of"),
        ({"priority": ["fleet"]}, "priority", "one of"),
        ({"priority": "Fleet"}, "priority", "one of"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(body, field, words):
    with pytest.raises(FieldError) as caught:
        parse_power_fields(body)
    assert caught.value.field == field
    assert caught.value.code == f"invalid_{field}"
    assert str(caught.value).startswith(f"'{field}'")
    assert words in str(caught.value)


def test_the_bounds_themselves_are_accepted():
    assert parse_power_fields({"energy_kwh": 200, "max_kw": 350, "min_kw": 350}).min_kw == 350
    assert parse_power_fields({"max_kw": 1.4}).min_kw == 1.4


def test_a_default_minimum_above_the_cars_maximum_is_lowered_not_refused():
    defaults = RequestDefaults(min_kw=4.0)
    assert parse_power_fields({"max_kw": 3.7}, defaults).min_kw == 3.7
    assert parse_power_fields({}, defaults).min_kw == 4.0


@pytest.mark.parametrize("kwargs", [{"max_kw": 400}, {"min_kw": 0.5}])
def test_defaults_obey_the_same_ranges_as_requests(kwargs):
    with pytest.raises(FieldError):
        RequestDefaults(**kwargs)


@no_deadline
@given(
    body=st.dictionaries(
        st.sampled_from(["energy_kwh", "max_kw", "min_kw", "priority"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    )
)
def test_any_body_either_parses_within_the_ranges_or_names_a_power_field(body):
    try:
        fields = parse_power_fields(body)
    except FieldError as exc:
        assert exc.field in body
        return
    assert 1.4 <= fields.min_kw <= fields.max_kw <= 350
    assert fields.energy_kwh is None or 0 < fields.energy_kwh <= 200


# ------------------------------------------------------------------------------ energy and time
def test_without_energy_a_session_lasts_session_seconds_at_full_power():
    fields = parse_power_fields({"max_kw": 22})
    energy = energy_kwh(fields, session_seconds=30, hour_seconds=3600)
    assert energy == pytest.approx(22 * 30 / 3600)
    meter = SessionEnergy(energy, hour_seconds=3600, now=100.0)
    meter.set_power(fields.max_w, 100.0)
    assert meter.expected_end(100.0) == pytest.approx(130.0)


def test_requested_energy_is_delivered_in_simulated_hours():
    # 30 kWh at 11 kW is 2.727 h; with an hour of 3.6 s that is 9.82 s.
    meter = SessionEnergy(30, hour_seconds=3.6, now=0.0)
    meter.set_power(11_000, 0.0)
    assert meter.expected_end(0.0) == pytest.approx(30 / 11 * 3.6)
    assert meter.delivered_kwh(3.6) == pytest.approx(11)


def test_a_curtailed_session_lasts_longer_and_a_paused_one_never_ends():
    meter = SessionEnergy(10, hour_seconds=3600, now=0.0)
    meter.set_power(10_000, 0.0)
    meter.set_power(5_000, 1800.0)  # 5 kWh delivered at full power, the rest at half
    assert meter.delivered_kwh(1800.0) == pytest.approx(5)
    assert meter.expected_end(1800.0) == pytest.approx(1800 + 3600)
    meter.set_power(0, 3600.0)
    assert meter.delivered_kwh(7200.0) == pytest.approx(7.5)
    assert meter.expected_end(7200.0) == math.inf


def test_energy_never_exceeds_what_was_requested():
    meter = SessionEnergy(1, hour_seconds=3600, now=0.0)
    meter.set_power(50_000, 0.0)
    assert meter.delivered_kwh(10_000.0) == 1
    assert meter.expected_end(10_000.0) == 10_000.0


@no_deadline
@given(
    steps=st.lists(st.tuples(st.floats(0, 100), st.integers(0, 350_000)), min_size=1, max_size=20),
    hour=st.floats(0.1, 3600),
)
def test_energy_delivered_is_the_integral_of_power_over_simulated_time(steps, hour):
    meter = SessionEnergy(200, hour_seconds=hour, now=0.0)
    now, expected = 0.0, 0.0
    for gap, power in steps:
        expected += meter.power_w / 1000 * gap / hour
        now += gap
        meter.set_power(power, now)
    assert meter.delivered_kwh(now) == pytest.approx(min(expected, 200), rel=1e-9, abs=1e-9)
