"""How one node shares its limit among its sessions: worked examples and hypothesis properties.
Pure functions, no broker."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgrid.power import (
    CLASS_ORDER,
    Priority,
    SessionDemand,
    allocate,
    kilowatts,
    water_fill,
    watts,
)

E, F, S = Priority.EMERGENCY, Priority.FLEET, Priority.STANDARD

#: The machine is shared: a slow example is not a failure.
no_deadline = settings(deadline=None)


def session(name: str, min_kw: float, max_kw: float, priority=S, seniority: int = 0):
    return SessionDemand(name, watts(min_kw), watts(max_kw), priority, seniority)


# ------------------------------------------------------------------------------ examples
def test_units_are_whole_watts_and_round_trip():
    assert watts(7.4) == 7400
    assert watts(4.35) == 4350  # 4.35 * 1000 is 4349.999... as a float
    assert kilowatts(11000) == 11.0


def test_water_filling_gives_the_small_car_all_it_wants_and_shares_the_rest_equally():
    # 30 kW among cars of 5, 22 and 50 kW: 5, then 12.5 each for the other two.
    assert water_fill(30_000, [(0, 5_000, 1), (0, 22_000, 1), (0, 50_000, 1)]) == [
        5_000,
        12_500,
        12_500,
    ]


def test_water_filling_respects_a_floor_above_the_level():
    # The 10 kW minimum is above the common level of the other two.
    assert water_fill(16_000, [(10_000, 20_000, 1), (0, 20_000, 1), (0, 20_000, 1)]) == [
        10_000,
        3_000,
        3_000,
    ]


def test_weighted_water_filling_is_per_unit_of_weight():
    # A substation with 3 sessions gets three times the level of one with 1.
    assert water_fill(40_000, [(0, 100_000, 3), (0, 100_000, 1)]) == [30_000, 10_000]


def test_water_filling_hands_the_watts_lost_to_rounding_to_the_first_items_on_the_level():
    assert water_fill(10_000, [(0, 10_000, 1)] * 3) == [3_334, 3_333, 3_333]
    assert water_fill(10_001, [(0, 2_000, 1), (0, 10_000, 1), (0, 10_000, 1)]) == [
        2_000,
        4_001,
        4_000,
    ]


def test_water_filling_refuses_minimums_above_the_budget():
    with pytest.raises(ValueError, match="exceed the budget"):
        water_fill(1_000, [(600, 900, 1), (600, 900, 1)])


def test_a_limit_that_never_binds_gives_every_session_its_full_power():
    sessions = [session(f"s{i}", 1.4, 11) for i in range(10)]
    result = allocate(watts(10 * 350), sessions)
    assert set(result.power_w.values()) == {11_000}
    assert result.paused == ()


def test_a_cut_pauses_the_youngest_session_that_does_not_fit():
    sessions = [session("old", 6, 11, seniority=1), session("young", 6, 11, seniority=2)]
    result = allocate(10_000, sessions)
    assert result.power_w == {"old": 10_000, "young": 0}
    assert result.paused == ("young",)
    assert result.paused_by_class == {E: 0, F: 0, S: 1}


def test_an_older_paused_session_resumes_before_a_younger_one_even_if_that_one_was_running():
    # x (oldest) 3.7 kW, big 11 kW minimum, small 3.7: at 12 kW big cannot fit next to x.
    sessions = [
        session("x", 3.7, 3.7, seniority=1),
        session("big", 11, 11, seniority=2),
        session("small", 3.7, 22, seniority=3),
    ]
    before = allocate(12_000, sessions)
    assert before.paused == ("big",)
    assert before.power_w["small"] == 12_000 - 3_700
    # x ends: big is older than small, so big gets its minimum first and small waits.
    after = allocate(12_000, sessions[1:])
    assert after.power_w == {"big": 11_000, "small": 0}
    assert after.paused == ("small",)


def test_first_fit_lets_a_younger_small_session_use_power_an_older_large_one_cannot():
    sessions = [session("large", 11, 22, seniority=1), session("small", 1.4, 22, seniority=2)]
    result = allocate(7_000, sessions)
    assert result.power_w == {"large": 0, "small": 7_000}


def test_classes_get_their_minimums_before_any_lower_class_and_extras_in_class_order():
    sessions = [
        session("std", 1.4, 22, S, seniority=1),
        session("fleet", 1.4, 22, F, seniority=2),
        session("ambulance", 1.4, 22, E, seniority=3),
    ]
    result = allocate(30_000, sessions)
    assert result.power_w == {"ambulance": 22_000, "fleet": 6_600, "std": 1_400}


def test_emergency_minimums_pause_standard_sessions():
    sessions = [session("std", 6, 11, S, seniority=1), session("ambulance", 6, 11, E, seniority=2)]
    assert allocate(10_000, sessions).power_w == {"ambulance": 10_000, "std": 0}


def test_a_guaranteed_share_keeps_a_class_above_its_minimum_under_a_higher_one():
    sessions = [
        session("std", 1.4, 22, S, seniority=1),
        session("ambulance", 1.4, 50, E, seniority=2),
    ]
    plain = allocate(30_000, sessions)
    assert plain.power_w == {"ambulance": 28_600, "std": 1_400}
    shared = allocate(30_000, sessions, guaranteed={S: Fraction(1, 5)})
    assert shared.power_w == {"ambulance": 24_000, "std": 6_000}


def test_an_unused_guarantee_goes_back_to_everyone():
    sessions = [session("ambulance", 1.4, 50, E)]
    assert allocate(30_000, sessions, guaranteed={S: 0.5}).power_w == {"ambulance": 30_000}


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, []), "limit"),
        ((1000, [SessionDemand("a", 1, 1), SessionDemand("a", 1, 1)]), "distinct"),
        ((1000, [], {S: 0.7, F: 0.4}), "at most 1"),
    ],
)
def test_allocate_rejects_impossible_input(args, message):
    with pytest.raises(ValueError, match=message):
        allocate(*args)


def test_a_session_needs_its_minimum_below_its_maximum():
    with pytest.raises(ValueError, match="min_w <= max_w"):
        SessionDemand("a", 5_000, 4_000)


# ------------------------------------------------------------------------------ properties
@st.composite
def demands(draw, max_size: int = 12) -> list[SessionDemand]:
    count = draw(st.integers(0, max_size))
    result = []
    for index in range(count):
        low = draw(st.integers(0, 50_000))
        high = draw(st.integers(low, 150_000))
        result.append(
            SessionDemand(
                f"s{index}",
                low,
                high,
                draw(st.sampled_from(CLASS_ORDER)),
                draw(st.integers(0, 5)),  # ties in seniority on purpose
            )
        )
    return result


limits = st.integers(0, 400_000)
guarantees: st.SearchStrategy[dict[Priority, Fraction]] = st.one_of(
    st.just({}),
    st.fixed_dictionaries({F: st.fractions(0, Fraction(1, 2)), S: st.fractions(0, Fraction(1, 2))}),
)


@no_deadline
@given(sessions=demands(), limit=limits, guaranteed=guarantees)
def test_never_exceeds_the_limit_and_every_session_runs_between_its_bounds_or_pauses(
    sessions, limit, guaranteed
):
    result = allocate(limit, sessions, guaranteed)
    assert result.total_w <= limit
    for s in sessions:
        power = result.power_w[s.session]
        if s.session in result.paused:
            assert power == 0
        else:
            assert s.min_w <= power <= s.max_w
    assert sum(result.paused_by_class.values()) == len(result.paused)


@no_deadline
@given(sessions=demands(), limit=limits)
def test_a_session_is_paused_only_when_its_minimum_does_not_fit_after_those_ahead_of_it(
    sessions, limit
):
    result = allocate(limit, sessions)
    ahead = 0
    for s in sorted(sessions, key=lambda s: s.order):
        if s.session in result.paused:
            assert limit - ahead < s.min_w
        else:
            ahead += s.min_w


@no_deadline
@given(sessions=demands(), limit=limits)
def test_paused_sessions_are_listed_in_the_order_they_resume(sessions, limit):
    result = allocate(limit, sessions)
    order = {s.session: s.order for s in sessions}
    assert list(result.paused) == sorted(result.paused, key=order.__getitem__)


@no_deadline
@given(sessions=demands(), limit=limits)
def test_water_filling_is_max_min_fair_within_a_class(sessions, limit):
    result = allocate(limit, sessions)
    power = result.power_w
    running = [s for s in sessions if s.session not in result.paused]
    for a in running:
        for b in running:
            # a could use more, b holds more than its own floor: then b is not above a (but
            # for a watt of rounding).
            if (
                a.priority is b.priority
                and power[a.session] < a.max_w
                and power[b.session] > b.min_w
            ):
                assert power[b.session] <= power[a.session] + 1


@no_deadline
@given(sessions=demands(), limit=limits)
def test_a_lower_class_gets_extra_power_only_when_every_higher_one_is_at_its_maximum(
    sessions, limit
):
    result = allocate(limit, sessions)
    power = result.power_w
    running = [s for s in sessions if s.session not in result.paused]
    for low in running:
        if power[low.session] > low.min_w:
            for high in running:
                if high.priority.rank < low.priority.rank:
                    assert power[high.session] == high.max_w


@no_deadline
@given(sessions=demands(), limit=limits, guaranteed=guarantees)
def test_the_whole_limit_is_used_unless_every_running_car_is_at_its_maximum(
    sessions, limit, guaranteed
):
    result = allocate(limit, sessions, guaranteed)
    running = [s for s in sessions if s.session not in result.paused]
    if any(result.power_w[s.session] < s.max_w for s in running):
        assert result.total_w == limit


@no_deadline
@given(sessions=demands(), limit=limits, guaranteed=guarantees, seed=st.integers(0, 2**32))
def test_the_result_does_not_depend_on_the_order_of_the_input(sessions, limit, guaranteed, seed):
    shuffled = list(sessions)
    random.Random(seed).shuffle(shuffled)
    assert allocate(limit, sessions, guaranteed) == allocate(limit, shuffled, guaranteed)


@no_deadline
@given(sessions=demands(), limit=limits, extra=st.integers(0, 100_000))
def test_more_power_never_lowers_the_total_drawn(sessions, limit, extra):
    assert allocate(limit + extra, sessions).total_w >= allocate(limit, sessions).total_w


@no_deadline
@given(sessions=demands(), limit=limits, extra=st.integers(0, 100_000))
def test_more_power_never_lowers_a_session_while_the_same_sessions_run(sessions, limit, extra):
    lower, higher = allocate(limit, sessions), allocate(limit + extra, sessions)
    if lower.paused == higher.paused:
        for s in sessions:
            assert higher.power_w[s.session] >= lower.power_w[s.session]


@no_deadline
@given(sessions=demands(), limit=limits, extra=st.integers(0, 100_000))
def test_more_power_never_pauses_a_session_ahead_of_every_paused_one(sessions, limit, extra):
    """The sessions served before the first pause (in resume order) stay served."""
    order = sorted(sessions, key=lambda s: s.order)
    lower, higher = allocate(limit, sessions), allocate(limit + extra, sessions)

    def served_prefix(result) -> int:
        return next((i for i, s in enumerate(order) if s.session in result.paused), len(order))

    assert served_prefix(higher) >= served_prefix(lower)


@no_deadline
@given(
    count=st.integers(0, 40),
    capacity_extra=st.integers(0, 20),
    max_kw=st.floats(1.4, 350),
)
def test_count_only_default_limit_gives_every_session_full_power(count, capacity_extra, max_kw):
    """The default substation limit is capacity x the highest car power: it never binds."""
    capacity = count + capacity_extra or 1
    sessions = [SessionDemand(f"s{i}", watts(1.4), watts(max_kw)) for i in range(count)]
    result = allocate(capacity * watts(350), sessions)
    assert result.paused == ()
    assert all(p == watts(max_kw) for p in result.power_w.values())


@st.composite
def fill_inputs(draw):
    count = draw(st.integers(1, 10))
    bounds = []
    for _ in range(count):
        low = draw(st.integers(0, 20_000))
        bounds.append((low, draw(st.integers(low, 60_000)), draw(st.integers(1, 8))))
    budget = draw(st.integers(sum(b[0] for b in bounds), 300_000))
    return budget, bounds


@no_deadline
@given(fill_inputs())
def test_weighted_water_filling_fits_and_is_fair_per_unit_of_weight(case):
    budget, bounds = case
    shares = water_fill(budget, bounds)
    assert sum(shares) <= budget
    for share, (low, high, _) in zip(shares, bounds, strict=True):
        assert low <= share <= high
    if sum(high for _, high, _ in bounds) > budget:
        assert sum(shares) == budget
    for share_a, (_, high_a, w_a) in zip(shares, bounds, strict=True):
        for share_b, (low_b, _, w_b) in zip(shares, bounds, strict=True):
            if share_a < high_a and share_b > low_b:
                # b's level is at most a's, up to a watt of rounding on each side.
                assert Fraction(share_b - 1, w_b) <= Fraction(share_a + 1, w_a)


@no_deadline
@given(fill_inputs(), st.integers(0, 50_000))
def test_water_filling_is_monotone_in_the_budget(case, extra):
    budget, bounds = case
    for before, after in zip(
        water_fill(budget, bounds), water_fill(budget + extra, bounds), strict=True
    ):
        assert after >= before
