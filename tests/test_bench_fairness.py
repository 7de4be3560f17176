"""bench.fairness: the literal fleet-wide index and the index per bottleneck, on hand-made
instants and, as a property, on the allocator's own division of random sessions."""

from __future__ import annotations

import random
from collections import defaultdict

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from balancer.strategies import Candidate
from bench.fairness import (
    AT_MINIMUM,
    UNBOUND,
    FairnessSeries,
    SessionAt,
    binding_node,
    by_bottleneck,
    fleet_wide,
    per_bottleneck,
)
from bench.power_balance import ev_site
from bench.power_fairness import Division, best_fit, best_placement
from loadgen import evmix
from smartgrid.grid import Need, parse_topology
from smartgrid.leases import Demand, target_shares
from smartgrid.power import CLASS_ORDER, SessionDemand, allocate, kilowatts, watts

SITE = parse_topology(
    {
        "node": [
            {"id": "site", "limit_kw": 300},
            {"id": "feeder-a", "parent": "site", "limit_kw": 180},
            {"id": "feeder-b", "parent": "site", "limit_kw": 180},
            {"id": "s1", "parent": "feeder-a", "limit_kw": 120},
            {"id": "s2", "parent": "feeder-a", "limit_kw": 120},
            {"id": "s3", "parent": "feeder-b", "limit_kw": 150},
            {"id": "s4", "parent": "feeder-b", "limit_kw": 90},
        ]
    }
)
POINTS = {"s1": 6, "s2": 6, "s3": 4, "s4": 8}
PATHS = {s: SITE.path(s) for s in POINTS}
LIMITS = {n: node.limit_w / 1000 for n, node in SITE.nodes.items()}


def test_the_nearest_node_at_its_limit_binds():
    path = ["s4", "feeder-b", "site"]
    limits = {"s4": 90.0, "feeder-b": 180.0, "site": 300.0}
    assert binding_node(path, {"s4": 90.0, "feeder-b": 180.0, "site": 300.0}, limits) == "s4"
    assert binding_node(path, {"s4": 60.0, "feeder-b": 180.0, "site": 300.0}, limits) == "feeder-b"
    assert binding_node(path, {"s4": 60.0, "feeder-b": 150.0, "site": 299.0}, limits) == "site"
    assert binding_node(path, {"s4": 60.0, "feeder-b": 150.0, "site": 250.0}, limits) is None


def test_sessions_held_back_by_different_limits_are_fair_per_bottleneck_not_fleet_wide():
    # s4 full of 22 kW cars at its 90 kW (11.25 each); at s3 two 50 kW cars share its 150 kW.
    # Neither feeder nor the site binds: each substation's own limit holds its cars back.
    sessions = [SessionAt("s4", "standard", 11.25, 22.0) for _ in range(8)] + [
        SessionAt("s3", "standard", 75.0, 150.0) for _ in range(2)
    ]
    literal = fleet_wide(sessions)["standard"]
    assert literal < 0.6
    groups = by_bottleneck(sessions, PATHS, LIMITS)
    assert groups == {("standard", "s4"): (8, 1.0), ("standard", "s3"): (2, 1.0)}
    assert per_bottleneck(groups) == {"standard": 1.0}


def test_unequal_sessions_under_one_limit_are_unfair_per_bottleneck():
    sessions = [
        SessionAt("s1", "standard", 30.0, 50.0),
        SessionAt("s1", "standard", 10.0, 50.0),
        SessionAt("s1", "standard", 80.0, 150.0),
    ]
    (count, index) = by_bottleneck(sessions, PATHS, LIMITS)[("standard", "s1")]
    assert count == 3
    assert index is not None and index < 0.8


def test_cars_at_their_maximum_count_nowhere_and_at_their_minimum_in_no_index():
    sessions = [
        SessionAt("s4", "standard", 3.7, 3.7),  # at its maximum: held back by itself
        SessionAt("s4", "standard", 1.4, 11.0, 1.4),  # a class above took the rest
        SessionAt("s4", "standard", 5.0, 50.0, 5.0),
        SessionAt("s4", "fleet", 79.9, 150.0, 15.0),
    ]
    groups = by_bottleneck(sessions, PATHS, LIMITS)
    assert groups == {("standard", AT_MINIMUM): (2, None), ("fleet", "s4"): (1, None)}
    assert per_bottleneck(groups) == {}
    # The literal index counts them: 1.4 and 5 kW.
    assert fleet_wide(sessions)["standard"] < 0.8


def test_sessions_below_their_maximum_with_no_node_at_its_limit_are_unbound():
    sessions = [SessionAt("s1", "standard", 5.0, 11.0), SessionAt("s3", "standard", 5.0, 22.0)]
    groups = by_bottleneck(sessions, PATHS, LIMITS)
    assert groups == {("standard", UNBOUND): (2, 1.0)}


def test_the_series_averages_over_instants_with_a_figure_and_shares_by_node():
    series = FairnessSeries.empty()
    unfair = [SessionAt("s4", "standard", 11.25, 22.0) for _ in range(8)] + [
        SessionAt("s3", "standard", 75.0, 150.0) for _ in range(2)
    ]
    series.add(unfair, PATHS, LIMITS)
    series.add([SessionAt("s1", "standard", 11.0, 11.0)], PATHS, LIMITS)  # no figure
    summary = series.summary()
    assert summary["fleet_wide"]["standard"]["samples"] == 1
    assert summary["per_bottleneck"]["standard"] == {"samples": 1, "mean": 1.0}
    assert summary["by_node"]["standard"]["s4"]["share_of_held"] == 0.8
    assert summary["by_node"]["standard"]["s3"]["share_of_held"] == 0.2


CARS = [(watts(c.min_kw), watts(c.max_kw)) for c in evmix.CAR_CLASSES]


@st.composite
def placements(
    draw: st.DrawFn,
) -> tuple[dict[str, list[SessionDemand]], dict[str, int]]:
    placed: dict[str, list[SessionDemand]] = defaultdict(list)
    seniority = 0
    for substation, points in POINTS.items():
        for _ in range(draw(st.integers(0, points))):
            min_w, max_w = draw(st.sampled_from(CARS))
            priority = draw(st.sampled_from(CLASS_ORDER))
            seniority += 1
            placed[substation].append(
                SessionDemand(f"ev-{seniority}", min_w, max_w, priority, seniority)
            )
    cut = draw(st.sampled_from([None, "feeder-a", "feeder-b", "site", "s3"]))
    limits = {n: node.limit_w for n, node in SITE.nodes.items()}
    if cut is not None:
        limits[cut] = draw(st.integers(limits[cut] // 10, limits[cut]))
    return placed, limits


@settings(max_examples=300, deadline=None)
@given(placements())
def test_the_division_is_fair_per_bottleneck(case):
    """The allocator's division down the tree (no failsafe reserved) and each substation's
    sharing give the sessions held back by the same limit the same power, to the watt: the
    index per bottleneck is 1 wherever two or more share one, whatever the placement, as long
    as no session is paused (then the watts of a minimum that did not fit may be left unused
    under a node, and no node is at its limit to name)."""
    placed, limits_w = case
    demands = {
        s: Demand.of_sessions((d.priority, d.min_w, d.max_w) for d in ds)
        for s, ds in placed.items()
    }
    shares = target_shares(SITE, limits_w, demands).shares_w
    sessions = []
    for substation, ds in placed.items():
        allocation = allocate(min(limits_w[substation], shares[substation]), ds)
        assume(not allocation.paused)
        power = allocation.power_w
        sessions += [
            SessionAt(
                substation,
                d.priority.value,
                kilowatts(power[d.session]),
                kilowatts(d.max_w),
                kilowatts(d.min_w),
            )
            for d in ds
        ]
    limits_kw = {n: kilowatts(w) for n, w in limits_w.items()}
    for (_priority, node), (_count, index) in by_bottleneck(sessions, PATHS, limits_kw).items():
        assert node != UNBOUND
        if index is not None:
            assert index > 0.9999, node


def test_the_best_placement_moves_fast_cars_off_a_slow_substation():
    site = ev_site()
    points = {s.id: s.points for s in site.substations}
    cars = [(11.0, 1.4)] * 6 + [(50.0, 5.0)] * 2 + [(150.0, 15.0)]
    sessions = [
        SessionDemand(f"ev-{i}", watts(low), watts(high), seniority=i)
        for i, (high, low) in enumerate(cars)
    ]
    # Both 50 kW cars at substation-4 (12 kW each beside six 11 kW cars), the 150 kW car alone
    # at substation-1 (its 120 kW): held back by two limits, at 12 and 120 kW.
    where = ["substation-4"] * 8 + ["substation-1"]
    division = Division(site, 0.0)
    index, drawn_w = division.standard_index(sessions, where)
    assert index < 0.5
    best, place = best_placement(division, sessions, where, points, random.Random(1))
    assert best > 0.99
    assert division.standard_index(sessions, place)[1] > drawn_w
    assert place[-1] == "substation-3"  # the only substation that lets it draw 150 kW


def test_best_fit_sends_a_car_to_the_fewest_kw_per_point_that_cover_it():
    candidates = [Candidate(s, POINTS[s], 0, 0) for s in ("s1", "s3", "s4")]
    limits = {"s1": watts(120), "s3": watts(150), "s4": watts(90)}  # 20, 37.5, 11.25 a point

    def picked(max_kw: float, strict: bool = True) -> list[str]:
        need = Need(watts(max_kw), watts(1.4))
        return [c.substation for c in best_fit(candidates, limits, need, strict=strict)]

    assert picked(11) == ["s4"]
    assert picked(22) == ["s3"]
    assert picked(50) == ["s3"]
    assert picked(50, strict=False) == ["s1", "s3", "s4"]
