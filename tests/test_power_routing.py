"""Routing with power along the path, and its reduction to corrected-min when power never binds.
No I/O: seeded randomness and hand-built grid snapshots."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.power_routing import path_utilisation, power_min
from balancer.strategies import Candidate, corrected_min
from smartgrid.grid import GridState, Load, Need, Node, Topology, limits_in_force
from smartgrid.power import MAX_CAR_KW, Priority, watts
from smartgrid.power_request import DEFAULT_MAX_KW, DEFAULT_MIN_KW
from tests.helpers import present

E, S = Priority.EMERGENCY, Priority.STANDARD
no_deadline = settings(deadline=None)
DEFAULT_NEED = Need(watts(DEFAULT_MAX_KW), watts(DEFAULT_MIN_KW))


def candidate(name: str, capacity: int = 10, estimate: float = 0, **kw) -> Candidate:
    return Candidate(name, capacity, estimate, polled_load=estimate, **kw)


def default_grid(candidates: list[Candidate]) -> GridState:
    """Count-only deployment: every session at the default power, each substation at its
    default limit (its points x the highest car power)."""
    loads = {
        c.substation: Load(
            round(c.estimate * watts(DEFAULT_MAX_KW)),
            (0, 0, round(c.estimate * watts(DEFAULT_MIN_KW))),
        )
        for c in candidates
    }
    own = {c.substation: c.capacity * watts(MAX_CAR_KW) for c in candidates}
    return GridState.build(Topology(), loads, limits_in_force(Topology(), own))


FEEDERS = Topology(
    {
        "site": Node("site", 200_000),
        "feeder-a": Node("feeder-a", 100_000, "site"),
        "feeder-b": Node("feeder-b", 100_000, "site"),
        "a1": Node("a1", 60_000, "feeder-a"),
        "a2": Node("a2", 60_000, "feeder-a"),
        "b1": Node("b1", 60_000, "feeder-b"),
    }
)


def grid_of(loads: dict[str, Load], topology: Topology = FEEDERS, overrides=None) -> GridState:
    return GridState.build(topology, loads, limits_in_force(topology, {}, overrides))


# ------------------------------------------------------------------------------ examples
def test_the_request_goes_where_its_feeder_has_the_most_room_not_just_its_substation():
    # a1 is emptier than b1, but feeder-a is much busier than feeder-b.
    loads = {
        "a1": Load.of(11_000, 1_400, S, 1),
        "a2": Load.of(11_000, 1_400, S, 7),
        "b1": Load.of(11_000, 1_400, S, 3),
    }
    options = [
        candidate("a1", estimate=1),
        candidate("a2", estimate=7),
        candidate("b1", estimate=3),
    ]
    choice = power_min(options, grid_of(loads), DEFAULT_NEED, random.Random(0))
    assert present(choice).substation == "b1"


def test_paths_tied_at_their_tightest_node_are_decided_by_the_next_one():
    # Both under feeder-a (the tightest node, shared); a2's own utilisation is lower.
    loads = {"a1": Load.of(11_000, 1_400, S, 4), "a2": Load.of(11_000, 1_400, S, 2)}
    options = [candidate("a1", estimate=4), candidate("a2", estimate=2)]
    tight = grid_of(loads, overrides={"feeder-a": 80_000})
    assert (
        path_utilisation(options[0], tight, DEFAULT_NEED)[0]
        == path_utilisation(options[1], tight, DEFAULT_NEED)[0]
    )
    for seed in range(20):
        assert (
            present(power_min(options, tight, DEFAULT_NEED, random.Random(seed))).substation == "a2"
        )


def test_ties_go_to_the_soonest_session_end():
    loads = {"a1": Load.of(11_000, 1_400, S, 2), "a2": Load.of(11_000, 1_400, S, 2)}
    options = [
        candidate("a1", estimate=2, next_end=50.0),
        candidate("a2", estimate=2, next_end=9.0),
    ]
    for seed in range(20):
        assert (
            present(
                power_min(options, grid_of(loads), DEFAULT_NEED, random.Random(seed))
            ).substation
            == "a2"
        )


def test_the_request_is_held_when_no_path_has_room_for_its_minimum():
    loads = {"a1": Load.of(11_000, 7_000, S, 8), "b1": Load.of(11_000, 7_000, S, 8)}
    options = [candidate("a1", estimate=8), candidate("b1", estimate=8)]
    grid = grid_of(loads)  # 60 - 56 = 4 kW left under each substation
    assert power_min(options, grid, Need(11_000, 4_000), random.Random(0)) is not None
    assert power_min(options, grid, Need(11_000, 4_001), random.Random(0)) is None


def test_a_held_standard_request_still_fits_as_an_emergency():
    loads = {"a1": Load.of(11_000, 7_000, S, 8)}
    options = [candidate("a1", estimate=8)]
    assert power_min(options, grid_of(loads), Need(11_000, 7_000), random.Random(0)) is None
    chosen = power_min(options, grid_of(loads), Need(11_000, 7_000, E), random.Random(0))
    assert present(chosen).substation == "a1"


def test_a_full_substation_is_skipped_however_much_power_it_has():
    options = [candidate("a1", capacity=2, estimate=2), candidate("b1", capacity=2, estimate=1)]
    assert (
        present(power_min(options, grid_of({}), DEFAULT_NEED, random.Random(0))).substation == "b1"
    )


def test_power_can_outweigh_points_a_substation_with_big_cars_is_avoided():
    loads = {"a1": Load.of(50_000, 1_400, S, 1), "b1": Load.of(7_000, 1_400, S, 2)}
    options = [candidate("a1", estimate=1), candidate("b1", estimate=2)]
    # By points a1 (2/10) beats b1 (3/10); by power a1 is at 61/60 after admission.
    assert present(corrected_min(options, random.Random(0))).substation == "a1"
    assert (
        present(power_min(options, grid_of(loads), DEFAULT_NEED, random.Random(0))).substation
        == "b1"
    )


# ------------------------------------------------------------------------------ properties
@st.composite
def count_only_candidates(draw) -> list[Candidate]:
    count = draw(st.integers(0, 8))
    result = []
    for index in range(count):
        capacity = draw(st.integers(1, 12))
        estimate = draw(
            st.integers(0, capacity + 2) | st.sampled_from([0.5, capacity - 0.5, capacity / 3])
        )
        next_end = draw(st.sampled_from([math.inf, 10.0, 20.0, 30.0]))
        result.append(candidate(f"s{index}", capacity, max(0.0, estimate), next_end=next_end))
    return result


@no_deadline
@given(options=count_only_candidates(), seed=st.integers(0, 2**32 - 1))
def test_with_default_power_and_limits_the_choice_is_exactly_corrected_min(options, seed):
    """The count-only deployment is the special case: same pick, same random draws."""
    ours, theirs = random.Random(seed), random.Random(seed)
    expected = corrected_min(options, theirs)
    assert power_min(options, default_grid(options), DEFAULT_NEED, ours) is expected
    assert ours.getstate() == theirs.getstate()


@st.composite
def power_scenarios(draw):
    options, loads = [], {}
    for name in ("a1", "a2", "b1"):
        capacity = draw(st.integers(1, 10))
        estimate = draw(st.integers(0, capacity))
        options.append(
            candidate(name, capacity, estimate, next_end=draw(st.sampled_from([5.0, 9.0])))
        )
        load = Load()
        for _ in range(estimate):
            load = load + Load.of(
                draw(st.integers(1_400, 50_000)), 1_400, draw(st.sampled_from(list(Priority)))
            )
        loads[name] = load
    overrides = draw(
        st.dictionaries(
            st.sampled_from(["site", "feeder-a", "feeder-b", "a1"]), st.integers(1, 200_000)
        )
    )
    need_min = draw(st.integers(1_400, 30_000))
    need = Need(
        draw(st.integers(need_min, 150_000)), need_min, draw(st.sampled_from(list(Priority)))
    )
    return options, grid_of(loads, overrides=overrides), need


@no_deadline
@given(power_scenarios(), st.integers(0, 1000))
def test_the_choice_fits_and_no_fitting_path_has_a_lower_tightest_node(scenario, seed):
    options, grid, need = scenario
    chosen = power_min(options, grid, need, random.Random(seed))
    fitting = [c for c in options if c.has_free_point and grid.fits(c.substation, need)]
    if chosen is None:
        assert fitting == []
        return
    assert chosen in fitting
    for c in grid.topology.path(chosen.substation):
        assert grid.headroom_w(c, need.priority) >= need.min_w
    best = path_utilisation(chosen, grid, need)[0]
    assert all(best <= path_utilisation(c, grid, need)[0] + 1e-9 for c in fitting)
