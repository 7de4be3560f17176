"""Shares of a parent's limit and their leases: the division, both sides of the lease protocol,
and a hypothesis state machine that delivers, loses and reorders messages, skews clocks, fails
the allocator over and restarts substations, checking at every step that no node's limit can
be exceeded. Pure: every clock is a number the test moves."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from smartgrid.grid import Node, Topology, limits_in_force
from smartgrid.leases import (
    Demand,
    DemandReport,
    Grant,
    LeaseHolder,
    ShareAllocator,
    acknowledge_at_once,
    divide,
    sum_by_node,
    target_shares,
)
from smartgrid.power import CLASS_ORDER, Priority, SessionDemand, allocate
from tests.helpers import present

no_deadline = settings(deadline=None)


def demand(
    *, standard: int = 0, fleet: int = 0, emergency: int = 0, max_w=11_000, min_w=1_400, failsafe=0
) -> Demand:
    counts = (emergency, fleet, standard)
    return Demand(
        sessions=counts,
        floors_w=tuple(n * min_w for n in counts),
        wants_w=tuple(n * max_w for n in counts),
        failsafe_w=failsafe,
    )


# ------------------------------------------------------------------------------ dividing
def test_a_feeder_is_shared_by_session_count_so_every_car_gets_the_same():
    shares, over = divide(60_000, [(demand(standard=6), 60_000), (demand(standard=2), 60_000)])
    assert shares == [45_000, 15_000]  # 7.5 kW per car on both
    assert not over


def test_a_child_never_gets_more_than_its_own_limit_and_the_rest_goes_to_the_others():
    shares, _ = divide(100_000, [(demand(standard=6), 60_000), (demand(standard=2), 60_000)])
    assert shares == [60_000, 22_000]


def test_emergency_sessions_under_one_substation_come_before_standard_ones_under_another():
    shares, _ = divide(
        60_000, [(demand(standard=6), 60_000), (demand(emergency=1, max_w=50_000), 60_000)]
    )
    assert shares == [10_000, 50_000]


def test_failsafes_are_reserved_first_even_for_a_child_without_sessions():
    shares, over = divide(
        60_000, [(demand(failsafe=5_000), 60_000), (demand(standard=10, failsafe=5_000), 60_000)]
    )
    assert shares == [5_000, 55_000]
    assert not over


def test_failsafes_that_do_not_fit_are_flagged_and_ignored():
    shares, over = divide(
        60_000,
        [
            (demand(standard=2, failsafe=40_000), 60_000),
            (demand(standard=2, failsafe=40_000), 60_000),
        ],
    )
    assert over
    assert shares == [22_000, 22_000]


@st.composite
def children(draw):
    result = []
    for _ in range(draw(st.integers(0, 6))):
        counts = [draw(st.integers(0, 5)) for _ in range(3)]
        floors = [n * draw(st.integers(0, 10_000)) for n in counts]
        wants = [f + n * draw(st.integers(0, 40_000)) for f, n in zip(floors, counts, strict=True)]
        result.append(
            (
                Demand(tuple(counts), tuple(floors), tuple(wants), draw(st.integers(0, 10_000))),
                draw(st.integers(0, 150_000)),
            )
        )
    return result


@no_deadline
@given(budget=st.integers(0, 300_000), kids=children())
def test_a_division_never_exceeds_the_budget_or_any_childs_limit(budget, kids):
    shares, over = divide(budget, kids)
    assert sum(shares) <= budget
    for share, (d, cap) in zip(shares, kids, strict=True):
        assert 0 <= share <= cap
        if not over:
            assert share >= min(d.failsafe_w, cap)


@no_deadline
@given(budget=st.integers(0, 300_000), kids=children())
def test_when_everything_fits_every_child_gets_all_it_wants(budget, kids):
    needs = [min(cap, max(d.failsafe_w, sum(d.wants_w))) for d, cap in kids]
    if sum(needs) <= budget:
        shares, _ = divide(budget, kids)
        assert shares == needs or all(s >= n for s, n in zip(shares, needs, strict=True))


def cars(*bounds_kw: tuple[float, float], priority=Priority.STANDARD) -> list:
    return [(priority, round(lo * 1000), round(hi * 1000)) for lo, hi in bounds_kw]


def test_a_feeder_is_shared_over_the_sessions_so_cars_at_their_maximum_need_no_more():
    # Counted by sessions, the first substation's four cars would weigh 4 against 2 and take
    # 40 kW, though three of them cannot draw more than 3.7 kW. Over the sessions, every car
    # below its maximum gets the same: (60 - 3 x 3.7) / 3 = 16.3 kW.
    slow = Demand.of_sessions(cars((1.4, 3.7), (1.4, 3.7), (1.4, 3.7), (1.4, 50)))
    fast = Demand.of_sessions(cars((1.4, 50), (1.4, 50)))
    shares, _ = divide(60_000, [(slow, 60_000), (fast, 60_000)])
    assert shares == [3 * 3_700 + 16_300, 2 * 16_300]
    powers = [
        allocate(share, _sessions(d)).power_w for share, d in zip(shares, (slow, fast), strict=True)
    ]
    below_max = [p for alloc in powers for p in alloc.values() if p > 3_700]
    assert max(below_max) - min(below_max) <= 1


def test_a_dc_cars_minimum_is_counted_as_its_own_not_as_an_average():
    # A 150 kW car that needs 15 kW beside 11 kW cars: at 10 kW a car the DC car takes its
    # minimum, and the level of the others is what is left.
    dc = Demand.of_sessions(cars((15, 150)))
    ac = Demand.of_sessions(cars((1.4, 11), (1.4, 11)))
    shares, _ = divide(35_000, [(dc, 200_000), (ac, 200_000)])
    assert shares == [15_000, 20_000]


def test_a_demand_without_its_sessions_counts_them_as_alike():
    # An older substation reports sums only: its sessions are taken as alike.
    old = Demand((0, 0, 3), (0, 0, 4_200), (0, 0, 33_000))
    assert old.bounds(2) == ((1_400, 11_000),) * 3
    assert Demand((0, 0, 2), (0, 0, 3), (0, 0, 7)).bounds(2) == ((2, 4), (1, 3))
    new = Demand.of_sessions(cars((1.4, 11), (1.4, 11), (1.4, 11)))
    shares, _ = divide(30_000, [(old, 60_000), (new, 60_000)])
    assert shares == [15_000, 15_000]
    assert (old + new).sessions_w is None and (new + new).sessions_w is not None


def _sessions(demand: Demand) -> list[SessionDemand]:
    """A substation's sessions from its demand (the inverse of Demand.of_sessions)."""
    return [
        SessionDemand(f"{priority.value}-{i}", low, high, priority, i)
        for priority in CLASS_ORDER
        for i, (low, high) in enumerate(demand.bounds(priority.rank))
    ]


@st.composite
def substation_sessions(draw, floor_kw=(1_400, 15_000)):
    bounds = []
    for _ in range(draw(st.integers(0, 6))):
        high = draw(st.sampled_from([3_700, 7_400, 11_000, 22_000, 50_000, 150_000]))
        low = draw(st.integers(min(floor_kw[0], high), min(floor_kw[1], high)))
        bounds.append((draw(st.sampled_from(CLASS_ORDER)), low, high))
    return Demand.of_sessions(bounds)


TREE = Topology(
    {
        "site": Node("site", 100_000),
        "fa": Node("fa", 60_000, "site"),
        "fb": Node("fb", 60_000, "site"),
        "a1": Node("a1", 50_000, "fa"),
        "a2": Node("a2", 50_000, "fa"),
        "b1": Node("b1", 50_000, "fb"),
    }
)
SUBSTATIONS = ("a1", "a2", "b1")


@no_deadline
@given(
    demands=st.fixed_dictionaries(
        {
            s: st.builds(demand, standard=st.integers(0, 8), fleet=st.integers(0, 3))
            for s in SUBSTATIONS
        }
    ),
    overrides=st.dictionaries(st.sampled_from(["site", "fa", "fb", "a1"]), st.integers(1, 90_000)),
)
def test_shares_down_a_tree_fit_every_node_on_the_way(demands, overrides):
    limits = limits_in_force(TREE, {}, overrides)
    division = target_shares(TREE, limits, demands)
    assert set(division.shares_w) == set(SUBSTATIONS)
    for node, total in sum_by_node(TREE, division.shares_w).items():
        assert total <= limits[node]
    for s, share in division.shares_w.items():
        assert share <= limits[s]


@no_deadline
@given(
    demands=st.fixed_dictionaries({s: substation_sessions() for s in SUBSTATIONS}),
    limits=st.fixed_dictionaries(
        {n: st.integers(0, 120_000) for n in ("site", "fa", "fb", *SUBSTATIONS)}
    ),
    failsafes=st.fixed_dictionaries({s: st.integers(0, 10_000) for s in SUBSTATIONS}),
)
def test_a_division_over_sessions_never_exceeds_any_limit(demands, limits, failsafes):
    demands = {s: _with_failsafe(d, failsafes[s]) for s, d in demands.items()}
    division = target_shares(TREE, limits, demands)
    for node, total in sum_by_node(TREE, division.shares_w, TREE.nodes).items():
        assert total <= limits[node]
    for s, share in division.shares_w.items():
        assert 0 <= share <= limits[s]
        overcommitted = any(node in division.overcommitted for node in TREE.path(s)[1:])
        if not overcommitted:
            assert share >= min(failsafes[s], limits[s])


def _with_failsafe(d: Demand, failsafe_w: int) -> Demand:
    return Demand(d.sessions, d.floors_w, d.wants_w, failsafe_w, d.sessions_w)


@no_deadline
@given(
    demands=st.fixed_dictionaries({s: substation_sessions() for s in SUBSTATIONS}),
    limits=st.fixed_dictionaries(
        {n: st.integers(20_000, 150_000) for n in ("site", "fa", "fb", *SUBSTATIONS)}
    ),
)
def test_a_division_over_sessions_is_max_min_fair_over_the_sessions(demands, limits):
    """Each substation shares its share as it does (smartgrid.power.allocate); then a session
    of a class below another's power, and below its own maximum, is held back by a limit on
    its way that is full (the other's power cannot move to it) or the other is at its own
    minimum. Given that every minimum fits (else minimums pause sessions first come first
    served, by the substation's rule, not the allocator's)."""
    floors = {s: sum(d.floors_w) for s, d in demands.items()}
    for node in TREE.nodes:
        assume(sum(floors[s] for s in SUBSTATIONS if node in TREE.path(s)) <= limits[node])
    division = target_shares(TREE, limits, demands)
    drawn = sum_by_node(TREE, division.shares_w, TREE.nodes) | dict(division.shares_w)
    power = {}
    for s, share in division.shares_w.items():
        allocation = allocate(share, _sessions(demands[s]))
        assert not allocation.paused
        for session in _sessions(demands[s]):
            power[(s, session.session)] = (session, allocation.power_w[session.session])
    slack = 2 * len(power) + 2  # the watts of rounding: at most one per session and node

    def full(node: str) -> bool:
        return drawn[node] >= limits[node] - slack

    for (s, _), (low, low_w) in power.items():
        if low_w >= low.max_w - 2:
            continue  # at its own maximum
        for (t, _), (high, high_w) in power.items():
            if high.priority is not low.priority or high_w <= low_w + 2 or high_w <= high.min_w:
                continue
            held_back = [n for n in TREE.path(s) if n not in TREE.path(t) and full(n)]
            assert held_back, (s, low, low_w, t, high, high_w, division.shares_w)
    # And a class gets power above its minimums only once every class before it is served.
    for (s, _), (low, low_w) in power.items():
        for (t, _), (high, high_w) in power.items():
            above_min = high_w > high.min_w + 2
            if high.priority.rank > low.priority.rank and above_min and low_w < low.max_w - 2:
                assert [n for n in TREE.path(s) if n not in TREE.path(t) and full(n)]


def test_a_substation_outside_the_tree_gets_no_share_it_has_only_its_own_limit():
    division = target_shares(
        TREE, limits_in_force(TREE, {"lone": 30_000}), {"lone": demand(standard=1)}
    )
    assert division.shares_w == {}


# ------------------------------------------------------------------------------ the holder
def grant(share_w=20_000, issued_at=100.0, term=1, seq=1, lease=3.0, substation="a1") -> Grant:
    return Grant(substation, share_w, issued_at, lease, term, seq)


def holder(**kw: Any) -> LeaseHolder:
    args: dict[str, Any] = dict(
        own_limit_w=50_000, failsafe_w=5_000, managed=True, started_at=0.0, skew_seconds=0.5
    )
    args.update(kw)
    return LeaseHolder(**args)


def test_a_substation_draws_its_share_until_the_lease_ends_then_its_failsafe():
    h = holder()
    assert h.limit_w(50.0) == 5_000  # no lease yet: failsafe
    assert h.offer(grant(), 100.1)
    assert h.limit_w(100.1) == 20_000
    assert h.expires_at(100.1) == 103.0
    assert h.limit_w(102.99) == 20_000
    assert h.limit_w(103.0) == 5_000
    assert h.expires_at(103.0) is None


def test_never_more_than_the_lower_of_its_own_limit_and_its_share():
    h = holder(own_limit_w=15_000)
    h.offer(grant(share_w=20_000), 100.0)
    assert h.limit_w(100.0) == 15_000
    assert holder(own_limit_w=3_000).limit_w(0.0) == 3_000  # below the failsafe too


def test_older_grants_and_grants_expired_on_arrival_are_refused():
    h = holder()
    assert h.offer(grant(seq=2), 100.0)
    assert not h.offer(grant(seq=1, share_w=40_000), 100.0)
    assert not h.offer(grant(seq=2, share_w=40_000), 100.0)
    assert h.offer(grant(term=2, seq=1, share_w=10_000), 100.0)  # a new allocator's term wins
    assert not h.offer(grant(term=1, seq=9), 100.0)
    assert not h.offer(grant(term=3, issued_at=90.0), 100.0)  # its lease ended at 93
    assert h.limit_w(100.0) == 10_000


def test_a_restarted_substation_refuses_grants_issued_before_it_started():
    h = holder(started_at=100.0)
    assert not h.offer(grant(issued_at=100.4), 100.6)  # within the clock skew of the start
    assert h.offer(grant(issued_at=100.6), 100.7)


def test_a_lower_share_or_a_new_terms_first_is_acknowledged_at_once_a_raise_or_renewal_is_not():
    previous = grant(share_w=20_000, term=1, seq=4)
    assert acknowledge_at_once(None, previous)  # the allocator counts it at more until it knows
    assert acknowledge_at_once(previous, grant(share_w=19_999, term=1, seq=5))
    assert acknowledge_at_once(previous, grant(share_w=40_000, term=2, seq=1))
    assert not acknowledge_at_once(previous, grant(share_w=20_000, term=1, seq=5))
    assert not acknowledge_at_once(previous, grant(share_w=30_000, term=1, seq=5))


def test_a_substation_outside_the_tree_ignores_leases():
    h = holder(managed=False)
    assert h.limit_w(0.0) == 50_000
    assert not h.release(0, 0.0) and h.limit_w(0.0) == 50_000


def test_a_released_share_caps_the_substation_until_it_takes_a_newer_grant():
    h = holder()
    assert not h.release(1_000, 100.0)  # nothing held: the failsafe is all it draws anyway
    h.offer(grant(share_w=20_000, seq=1), 100.0)
    assert h.release(12_000, 100.1) and h.limit_w(100.1) == 12_000
    assert h.released_w == 12_000
    assert not h.release(15_000, 100.2) and h.limit_w(100.2) == 12_000  # never raised by itself
    assert h.release(1_000, 100.3) and h.limit_w(100.3) == 5_000  # never below its failsafe
    assert not h.offer(grant(share_w=40_000, seq=1), 100.4)  # refused: the cap stands
    assert h.limit_w(103.0) == 5_000  # the lease ran out: the failsafe, as always
    assert h.offer(grant(share_w=30_000, seq=2, issued_at=103.0), 103.1)
    assert h.limit_w(103.1) == 30_000 and h.released_w is None  # a newer grant ends it


# ------------------------------------------------------------------------------ the allocator
LIMITS = limits_in_force(TREE, {})


def report(h: LeaseHolder, s: str, at: float, d: Demand) -> DemandReport:
    return DemandReport(
        s, at, 50_000, d, holding=h.holding(at), last_key=h.last_key, released_w=h.released_w
    )


def exchange(allocator: ShareAllocator, holders, demands, now, limits=LIMITS):
    """One round on a perfect network: everyone reports, the allocator grants, grants arrive."""
    for s, h in holders.items():
        allocator.report(report(h, s, now, demands[s]))
    grants = allocator.allocate(limits, now)
    for g in grants:
        holders[g.substation].offer(g, now)
    return grants


def fresh(now=0.0, term=1) -> tuple[ShareAllocator, dict[str, LeaseHolder]]:
    allocator = ShareAllocator(
        TREE, term=term, activated_at=now, lease_seconds=3.0, skew_seconds=0.5, failsafe_w=5_000
    )
    holders = {s: holder(started_at=now - 10) for s in SUBSTATIONS}
    return allocator, holders


def draws(holders, now) -> dict[str, int]:
    return {s: h.limit_w(now) for s, h in holders.items()}


def test_shares_converge_to_the_targets_in_a_few_rounds_starting_cautiously():
    allocator, holders = fresh()
    demands = {"a1": demand(standard=6), "a2": demand(standard=2), "b1": demand(standard=1)}
    exchange(allocator, holders, demands, 0.1)
    # Freshly activated, it must assume a predecessor granted everyone their whole limit
    # (50 + 50 + 50 kW under a 100 kW site): its first grants are 0, which fences that off.
    assert draws(holders, 0.1) == {"a1": 0, "a2": 0, "b1": 0}
    exchange(allocator, holders, demands, 0.2)  # acknowledged: now it knows
    assert draws(holders, 0.2) == {"a1": 45_000, "a2": 15_000, "b1": 11_000}


def test_leases_are_renewed_before_they_run_out_and_lapse_to_the_failsafe_without_renewal():
    allocator, holders = fresh()
    demands = {s: demand(standard=1) for s in SUBSTATIONS}
    for step in range(1, 40):
        exchange(allocator, holders, demands, step * 0.25)
    assert draws(holders, 9.75) == {s: 11_000 for s in SUBSTATIONS}
    # The allocator dies: nothing is renewed; 3 s later every substation is at its failsafe.
    assert draws(holders, 9.75 + 3.0) == {s: 5_000 for s in SUBSTATIONS}


def test_a_cut_is_obeyed_as_soon_as_any_grant_lands_and_shares_regrow_as_they_are_acknowledged():
    allocator, holders = fresh()
    demands = {"a1": demand(standard=4), "a2": demand(standard=4), "b1": demand(standard=1)}
    for now in (0.1, 0.2, 0.3, 0.4):
        exchange(allocator, holders, demands, now)
    assert draws(holders, 0.4) == {"a1": 30_000, "a2": 30_000, "b1": 11_000}
    cut = limits_in_force(TREE, {}, {"fa": 30_000})
    grants = {g.substation: g for g in allocator.allocate(cut, 0.5)}
    # Each gets what fits beside the other's old 30 kW: nothing, for one round trip.
    assert {s: g.share_w for s, g in grants.items()} == {"a1": 0, "a2": 0}
    holders["a1"].offer(grants["a1"], 0.5)
    assert sum_by_node(TREE, draws(holders, 0.5))["fa"] <= 30_000  # a2's has not landed yet
    # While a2 has not acknowledged, a1 cannot be raised: a2 may still draw 30 kW.
    allocator.report(report(holders["a1"], "a1", 0.6, demands["a1"]))
    later = allocator.allocate(cut, 0.6)
    assert all(g.share_w == 0 for g in later if g.substation == "a1")
    for g in [grants["a2"], *later]:
        holders[g.substation].offer(g, 0.7)
        assert sum_by_node(TREE, draws(holders, 0.7))["fa"] <= 30_000
    for now in (0.8, 0.9):
        exchange(allocator, holders, demands, now, cut)
    assert draws(holders, 0.9) == {"a1": 15_000, "a2": 15_000, "b1": 11_000}


def slow(cars: int) -> Demand:
    return demand(standard=cars, max_w=7_500)


def _both_busy() -> tuple[ShareAllocator, dict[str, LeaseHolder], dict[str, Demand]]:
    """Under fa's 60 kW, a1's four 22 kW cars and a2's four 7.5 kW cars: 30 kW each, a2's
    cars at their maximum."""
    allocator, holders = fresh()
    demands = {"a1": demand(standard=4, max_w=22_000), "a2": slow(4), "b1": demand()}
    for now in (0.1, 0.2, 0.3, 0.4):
        exchange(allocator, holders, demands, now)
    assert draws(holders, 0.4)["a1"] == draws(holders, 0.4)["a2"] == 30_000
    return allocator, holders, demands


def test_power_released_by_a_substation_goes_to_another_in_the_same_run():
    allocator, holders, demands = _both_busy()
    demands["a2"] = slow(2)  # two of a2's cars leave: 15 kW wanted of its 30
    assert holders["a2"].release(15_000, 0.5)
    allocator.report(report(holders["a2"], "a2", 0.5, demands["a2"]))
    grants = allocator.allocate(LIMITS, 0.5)
    # a1 at once 45 kW, and a2 needs no lower share (its own cap is what it would get).
    assert [(g.substation, g.share_w) for g in grants] == [("a1", 45_000)]
    holders["a1"].offer(grants[0], 0.5)
    assert sum_by_node(TREE, draws(holders, 0.5))["fa"] <= 60_000


def test_without_a_release_the_raise_waits_for_the_lower_share_to_be_acknowledged():
    allocator, holders, demands = _both_busy()
    demands["a2"] = slow(2)
    allocator.report(report(holders["a2"], "a2", 0.5, demands["a2"]))
    shares = {g.substation: g.share_w for g in allocator.allocate(LIMITS, 0.5)}
    assert shares == {"a2": 15_000}  # a1 cannot have a2's 15 kW yet: a2 may still draw 30
    holders["a2"].offer(present(allocator._latest("a2")), 0.51)
    allocator.report(report(holders["a2"], "a2", 0.52, demands["a2"]))
    assert _settled(allocator, LIMITS, 0.52) == {"a1": 45_000}  # one round trip later


def test_a_grant_issued_before_the_release_report_still_counts_in_full():
    allocator, holders, demands = _both_busy()
    in_flight = allocator.allocate(LIMITS, 1.5)  # renewals, not yet at the substations
    assert {g.substation for g in in_flight} >= {"a2"}
    demands["a2"] = slow(2)
    holders["a2"].release(15_000, 1.5)
    allocator.report(report(holders["a2"], "a2", 1.5, demands["a2"]))
    # a2 will take the 30 kW renewal in flight (it ends the cap): no raise for a1 until then.
    assert allocator.committed_w("a2", LIMITS, 1.5) == 30_000
    assert all(g.share_w <= 30_000 for g in allocator.allocate(LIMITS, 1.5) if g.substation == "a1")


def test_a_share_released_then_wanted_again_is_granted_again():
    allocator, holders, demands = _both_busy()
    holders["a2"].release(15_000, 0.5)
    allocator.report(report(holders["a2"], "a2", 0.5, slow(2)))
    # Its cars come back before anything else moved: the target is its old 30 kW again,
    # which it cannot draw under the released grant, so a new grant must go out.
    allocator.report(report(holders["a2"], "a2", 0.6, demands["a2"]))
    assert _settled(allocator, LIMITS, 0.6) == {"a2": 30_000}


def test_a_new_allocator_fences_off_its_predecessors_grants():
    old, holders = fresh()
    demands = {s: demand(standard=3) for s in SUBSTATIONS}
    for now in (0.1, 0.2, 0.3, 0.4):
        exchange(old, holders, demands, now)
    late = old.allocate(LIMITS, 1.0)  # issued, then the old allocator dies before they arrive
    new = ShareAllocator(
        TREE, term=2, activated_at=1.1, lease_seconds=3.0, skew_seconds=0.5, failsafe_w=5_000
    )
    for now in (1.2, 1.3, 1.4):
        exchange(new, holders, demands, now)
    for g in late:
        assert not holders[g.substation].offer(g, 1.5)
    assert draws(holders, 1.5) == {s: 30_000 if s != "b1" else 33_000 for s in SUBSTATIONS}


def test_a_report_that_crossed_a_grant_in_flight_does_not_retire_it():
    allocator, holders = fresh()
    demands = {"a1": demand(standard=1), "a2": demand(standard=1), "b1": demand()}
    for now in (0.1, 0.2):
        exchange(allocator, holders, demands, now)
    demands["a1"] = demand(standard=5)
    allocator.report(report(holders["a1"], "a1", 0.3, demands["a1"]))
    (raised,) = [g for g in allocator.allocate(LIMITS, 0.3) if g.substation == "a1"]
    assert raised.share_w > 11_000
    # a1 reports again before the grant reaches it: its report does not know the grant yet.
    allocator.report(report(holders["a1"], "a1", 0.35, demands["a1"]))
    assert allocator.committed_w("a1", LIMITS, 0.4) >= raised.share_w
    holders["a1"].offer(raised, 0.4)
    assert holders["a1"].limit_w(0.4) <= allocator.committed_w("a1", LIMITS, 0.4)


def test_a_grant_overtaken_by_a_newer_one_is_retired_only_because_the_substation_refuses_it():
    allocator, holders = fresh()
    demands = {"a1": demand(standard=1), "a2": demand(standard=1), "b1": demand()}
    for now in (0.1, 0.2):
        exchange(allocator, holders, demands, now)

    def grant_for_a1(standard: int, now: float) -> Grant:
        demands["a1"] = demand(standard=standard)
        allocator.report(report(holders["a1"], "a1", now, demands["a1"]))
        (issued,) = [g for g in allocator.allocate(LIMITS, now) if g.substation == "a1"]
        return issued

    high = grant_for_a1(5, 0.3)  # still in flight when...
    low = grant_for_a1(1, 0.35)  # ...the next one overtakes it
    assert high.share_w > low.share_w
    assert holders["a1"].offer(low, 0.4)
    allocator.report(report(holders["a1"], "a1", 0.45, demands["a1"]))
    assert allocator.committed_w("a1", LIMITS, 0.5) < high.share_w  # retired by the report
    assert not holders["a1"].offer(high, 0.5)  # sound only because the substation refuses it


def _settled(allocator: ShareAllocator, limits, now: float, **kw) -> dict[str, int]:
    """The shares of one allocation, by substation, after the blind period."""
    return {g.substation: g.share_w for g in allocator.allocate(limits, now, **kw)}


def test_a_root_gets_a_share_when_an_operator_overrides_it_and_keeps_getting_them():
    allocator = ShareAllocator(
        Topology(), term=1, activated_at=0.0, lease_seconds=3.0, skew_seconds=0.5
    )
    lone = DemandReport("lone", 10.0, 30_000, demand(standard=2))
    allocator.report(lone)
    own = limits_in_force(Topology(), {"lone": 30_000})
    assert _settled(allocator, own, 10.0) == {}  # a root of its own: its limit, no share
    cut = limits_in_force(Topology(), {"lone": 30_000}, {"lone": 12_000})
    assert _settled(allocator, cut, 10.1, overridden={"lone"}) == {"lone": 12_000}
    # It took the share, so it is managed from now on: the override cleared, it is still
    # granted (its whole own limit), or its lease would lapse to the failsafe.
    allocator.report(DemandReport("lone", 10.2, 30_000, demand(standard=2), last_key=(1, 1)))
    assert _settled(allocator, own, 10.3) == {"lone": 30_000}


def test_a_substation_naming_a_parent_the_tree_does_not_define_is_granted_its_own_limit():
    allocator = ShareAllocator(TREE, term=1, activated_at=0.0, lease_seconds=3.0, skew_seconds=0.5)
    allocator.report(DemandReport("x9", 10.0, 40_000, demand(standard=1), parent="nowhere"))
    limits = limits_in_force(TREE, {"x9": 40_000})
    assert _settled(allocator, limits, 10.0)["x9"] == 40_000


def test_a_leaf_of_the_file_that_substations_announce_themselves_under_is_not_granted():
    tree = Topology({**TREE.nodes, "fc": Node("fc", 20_000, "site")})
    allocator = ShareAllocator(tree, term=1, activated_at=0.0, lease_seconds=3.0, skew_seconds=0.5)
    allocator.report(DemandReport("c1", 10.0, 50_000, demand(standard=3), parent="fc"))
    limits = limits_in_force(allocator.topology, {"c1": 50_000})
    shares = _settled(allocator, limits, 10.0)
    assert "fc" not in shares and shares["c1"] <= 20_000


# ------------------------------------------------------------------------------ the state machine
LEASE, SKEW = 3.0, 0.5
OWN_LIMIT, FAILSAFE = 50_000, 5_000
#: Each party's clock is off the true time by at most SKEW / 2, so any two differ by <= SKEW.
OFFSETS = {"a1": 0.25, "a2": -0.25, "b1": 0.1, "allocator": -0.1}


class LeaseProtocol(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.true = 1000.0
        self.term = 1
        self.demands = {s: Demand(failsafe_w=FAILSAFE) for s in SUBSTATIONS}
        self.holders = {s: self._new_holder(s) for s in SUBSTATIONS}
        self.allocator = self._new_allocator()
        #: Reports and grants sent and not yet delivered.
        self.network: list[DemandReport | Grant] = []

    def clock(self, who: str) -> float:
        return self.true + OFFSETS[who]

    def _new_holder(self, s):
        return LeaseHolder(
            OWN_LIMIT, FAILSAFE, managed=True, started_at=self.clock(s), skew_seconds=SKEW
        )

    def _new_allocator(self):
        return ShareAllocator(
            TREE,
            term=self.term,
            activated_at=self.clock("allocator"),
            lease_seconds=LEASE,
            skew_seconds=SKEW,
            failsafe_w=FAILSAFE,
        )

    @rule(dt=st.floats(0, 2.0))
    def time_passes(self, dt):
        self.true += dt

    @rule()
    def a_round_goes_well(self):
        """Everyone reports, the allocator runs, every grant arrives: shares grow to their
        targets, so the other rules have something to break."""
        for s in SUBSTATIONS:
            self.substation_reports(s)
        while self.network:
            self._deliver(0)
        self.allocator_runs()
        while self.network:
            self._deliver(0)

    @rule(
        s=st.sampled_from(SUBSTATIONS),
        d=st.builds(
            demand,
            standard=st.integers(0, 8),
            fleet=st.integers(0, 2),
            emergency=st.integers(0, 1),
            max_w=st.sampled_from([3_700, 11_000, 22_000, 50_000]),
        ),
    )
    def demand_changes(self, s, d):
        self.demands[s] = Demand(d.sessions, d.floors_w, d.wants_w, FAILSAFE)

    @rule(s=st.sampled_from(SUBSTATIONS))
    def substation_reports(self, s):
        h, now = self.holders[s], self.clock(s)
        self.network.append(
            DemandReport(
                s,
                now,
                OWN_LIMIT,
                self.demands[s],
                "fa" if s != "b1" else "fb",
                h.holding(now),
                h.last_key,
                h.released_w,
            )
        )

    @rule(s=st.sampled_from(SUBSTATIONS), keep_w=st.integers(0, OWN_LIMIT))
    def a_substation_releases_part_of_its_share(self, s, keep_w):
        self.holders[s].release(keep_w, self.clock(s))

    @rule()
    def allocator_runs(self):
        for g in self.allocator.allocate(LIMITS, self.clock("allocator")):
            self.network.append(g)

    @precondition(lambda self: self.network)
    @rule(data=st.data())
    def a_message_arrives(self, data):
        self._deliver(data.draw(st.integers(0, len(self.network) - 1)))

    def _deliver(self, index: int) -> None:
        message = self.network.pop(index)
        if isinstance(message, DemandReport):
            self.allocator.report(message)
        else:
            s = message.substation
            self.holders[s].offer(message, self.clock(s))

    @precondition(lambda self: self.network)
    @rule(data=st.data())
    def a_message_is_lost(self, data):
        self.network.pop(data.draw(st.integers(0, len(self.network) - 1)))

    @rule()
    def the_allocator_fails_over(self):
        self.term += 1
        self.allocator = self._new_allocator()

    @rule(s=st.sampled_from(SUBSTATIONS))
    def a_substation_restarts(self, s):
        self.holders[s] = self._new_holder(s)

    @invariant()
    def no_node_can_be_overloaded(self):
        drawn = {s: h.limit_w(self.clock(s)) for s, h in self.holders.items()}
        for node, total in sum_by_node(TREE, drawn).items():
            assert total <= LIMITS[node], (node, drawn)
        assert all(d <= OWN_LIMIT for d in drawn.values())

    @invariant()
    def the_allocator_knows_an_upper_bound_of_every_draw(self):
        now = self.clock("allocator")
        for s, h in self.holders.items():
            assert h.limit_w(self.clock(s)) <= self.allocator.committed_w(s, LIMITS, now)


LeaseProtocol.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_the_lease_protocol_never_lets_a_node_be_overloaded = LeaseProtocol.TestCase


@pytest.mark.parametrize("kwargs", [{"skew_seconds": 0}, {"skew_seconds": 3.0}])
def test_the_allocator_needs_a_skew_shorter_than_the_lease(kwargs):
    with pytest.raises(ValueError, match="skew"):
        ShareAllocator(TREE, term=1, activated_at=0, lease_seconds=3.0, **kwargs)
