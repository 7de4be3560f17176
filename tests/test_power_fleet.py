"""The balancer's power view without a broker: reported demand corrected by what was routed and
what completed since, in any order of events and reports; limits and the tree."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.power_fleet import PowerView
from balancer.strategies import Candidate
from smartgrid import contract
from smartgrid.grid import Load, Node, Topology
from smartgrid.limits import LimitOverride, LimitOverrides
from smartgrid.power import MAX_CAR_KW, Priority, watts
from smartgrid.power_request import PowerFields

S = "s1"
CAR = PowerFields(max_kw=22.0, min_kw=6.0, priority=Priority.STANDARD)
FLEET_CAR = PowerFields(max_kw=11.0, min_kw=1.4, priority=Priority.FLEET)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(at: float, *sessions: PowerFields, instance="i1", substation=S, **kw):
    fields: dict = {
        "at": at,
        "substation": substation,
        "instance": instance,
        "limit_kw": kw.pop("limit_kw", 100.0),
        "failsafe_kw": 0.0,
        "limit_in_force_kw": 100.0,
        "power_kw": kw.pop("power_kw", 0.0),
        **kw,
    }
    for session in sessions:
        name = session.priority.value
        fields[f"sessions_{name}"] = fields.get(f"sessions_{name}", 0) + 1
        fields[f"floor_kw_{name}"] = fields.get(f"floor_kw_{name}", 0.0) + session.min_kw
        fields[f"want_kw_{name}"] = fields.get(f"want_kw_{name}", 0.0) + session.max_kw
    return contract.PowerDemand(**fields)


def started(request_id: str, at: float, power: PowerFields = CAR, instance="i1", substation=S):
    return contract.SessionStarted(
        at=at,
        request_id=request_id,
        ev_id="EV" + request_id,
        substation=substation,
        instance=instance,
        accepted_at=at - 1,
        expected_end=at + 60,
        max_kw=power.max_kw,
        min_kw=power.min_kw,
        priority=power.priority.value,
        power_kw=power.max_kw,
    )


def completed(request_id: str, at: float, instance="i1", substation=S):
    return contract.SessionCompleted(
        at=at,
        request_id=request_id,
        ev_id="EV" + request_id,
        substation=substation,
        instance=instance,
        started_at=at - 60,
    )


def cars(*powers: PowerFields) -> Load:
    total = Load()
    for p in powers:
        total = total + Load.of(p.max_w, p.min_w, p.priority)
    return total


def test_what_was_routed_since_the_report_counts_until_a_report_counts_it():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(report(10.0))
    view.routed(S, "r1", CAR)
    assert view.load(S) == cars(CAR)
    view.apply(started("r1", 10.5))
    assert view.load(S) == cars(CAR)  # started after the report: still not in it
    view.apply(report(11.0, CAR))
    assert view.load(S) == cars(CAR)  # now in the report, and counted once


def test_a_report_taken_after_a_start_whose_event_comes_late_is_not_counted_twice_for_long():
    view = PowerView(Topology(), wall_clock=Clock())
    view.routed(S, "r1", CAR)
    view.apply(report(11.0, CAR))  # the report saw the session ...
    assert view.load(S) == cars(CAR, CAR)  # ... the balancer not yet: counted twice, safe side
    view.apply(started("r1", 10.5))
    assert view.load(S) == cars(CAR)


def test_a_completion_after_the_report_is_taken_off_until_the_next_report():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(started("r1", 9.0))
    view.apply(started("r2", 9.0, FLEET_CAR))
    view.apply(report(10.0, CAR, FLEET_CAR))
    view.apply(completed("r1", 10.5))
    assert view.load(S) == cars(FLEET_CAR)
    view.apply(report(11.0, FLEET_CAR))
    assert view.load(S) == cars(FLEET_CAR)


def test_a_session_counted_by_a_report_that_ends_stays_off_until_a_report_after_its_end():
    """A session the reports count as running costs nothing to keep at each report; once it
    ends, a report taken before its end (which still counts it) must not bring it back."""
    view = PowerView(Topology(), wall_clock=Clock())
    view.routed(S, "r1", CAR)
    view.apply(started("r1", 9.0))
    view.apply(report(10.0, CAR))
    view.apply(report(10.5, CAR))
    assert view.load(S) == cars(CAR)
    view.apply(completed("r1", 11.5))
    assert view.load(S) == Load()
    view.apply(report(11.0, CAR))  # taken before the end arrived: it still counts r1
    assert view.load(S) == Load()
    view.apply(report(12.0))
    assert view.load(S) == Load()


def test_a_session_that_started_and_ended_between_two_reports_never_counts():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(report(10.0))
    view.routed(S, "r1", CAR)
    view.apply(started("r1", 10.2))
    view.apply(completed("r1", 10.4))
    assert view.load(S) == Load()
    view.apply(report(11.0))
    assert view.load(S) == Load()


def test_an_older_report_overtaken_by_a_newer_one_is_ignored():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(report(11.0, CAR))
    view.apply(report(10.0))
    assert view.load(S) == cars(CAR)


def test_sessions_of_a_restarted_substation_count_as_routed_until_started_again():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(started("r1", 9.0, instance="old"))
    view.apply(report(10.0, CAR, instance="old"))
    view.apply(report(20.0, instance="new"))  # restarted: its queue gives r1 back to it
    assert view.load(S) == cars(CAR)
    view.apply(started("r1", 20.5, instance="new"))
    view.apply(report(21.0, CAR, instance="new"))
    assert view.load(S) == cars(CAR)


def test_a_request_that_never_starts_is_forgotten_and_a_failed_forward_at_once():
    clock = Clock()
    view = PowerView(Topology(), wall_clock=clock, forget_after=60)
    view.routed(S, "lost", CAR)
    view.routed(S, "failed", FLEET_CAR)
    view.unrouted(S, "failed")
    assert view.load(S) == cars(CAR)
    clock.now += 61
    view.apply(report(10.0))
    assert view.load(S) == Load()


# ------------------------------------------------------------------------------ any order
@settings(deadline=None)
@given(
    position=st.integers(0, 3),
    report_at=st.sampled_from([10.1, 10.5, 10.7, 11.0]),
)
def test_the_load_does_not_depend_on_when_the_report_arrives_among_the_events(
    position: int, report_at: float
) -> None:
    """r1 runs 10.2-10.8, r2 from 10.6. Whenever the report (taken at ``report_at``) arrives
    among the events, once all are in the load is the truth: r2's car."""
    view = PowerView(Topology(), wall_clock=Clock())
    view.routed(S, "r1", CAR)
    view.routed(S, "r2", CAR)
    running = [CAR] * sum(
        1 for start, end in ((10.2, 10.8), (10.6, None)) if start <= report_at < (end or 99)
    )
    steps: list = [started("r1", 10.2), started("r2", 10.6), completed("r1", 10.8)]
    steps.insert(position, report(report_at, *running))
    for event in steps:
        view.apply(event)
    assert view.load(S) == cars(CAR)


_IDS = st.sampled_from(["r1", "r2", "r3"])
_SUBSTATIONS = st.sampled_from([S, S, "s2"])
_INSTANCES = st.sampled_from(["i1", "i1", "i2"])  # mostly the reports' own
# Substation clock times: sessions start and end between reports, or at their times.
_STARTS = st.sampled_from([9.0, 10.5, 11.0])
_ENDS = st.sampled_from([10.5, 11.5, 10.0])
_REPORTS = st.sampled_from([10.0, 11.0, 12.0])
_POWER = st.sampled_from([CAR, FLEET_CAR])
_STEP = st.one_of(
    st.tuples(st.just("routed"), _SUBSTATIONS, _IDS, _POWER),
    st.tuples(st.just("unrouted"), _SUBSTATIONS, _IDS),
    st.builds(
        lambda i, at, p, inst, sub: ("event", started(i, at, p, inst, sub)),
        _IDS,
        _STARTS,
        _POWER,
        _INSTANCES,
        _SUBSTATIONS,
    ),
    st.builds(
        lambda i, at, inst, sub: ("event", completed(i, at, inst, sub)),
        _IDS,
        _ENDS,
        _INSTANCES,
        _SUBSTATIONS,
    ),
    st.builds(
        lambda i, at, began, sub: ("event", cancelled(i, at, started_at=began, substation=sub)),
        _IDS,
        _ENDS,
        st.none() | _STARTS,
        _SUBSTATIONS,
    ),
    # Each report counts at least as many cars of each class as there are ids, so that no
    # correction reaches below zero, where the clamp would hide a wrong one.
    st.builds(
        lambda at, sessions, inst, sub: (
            "event",
            report(at, *[CAR, FLEET_CAR] * 3, *sessions, instance=inst, substation=sub),
        ),
        _REPORTS,
        st.lists(_POWER, max_size=3),
        _INSTANCES,
        _SUBSTATIONS,
    ),
    st.tuples(st.just("later"), st.sampled_from([1.0, 200.0])),
)


@settings(deadline=None, max_examples=300)
@given(steps=st.lists(_STEP, min_size=5, max_size=40))
def test_the_load_kept_as_it_goes_is_the_load_counted_over_every_request(steps):
    """Whatever happens in whatever order, the load a decision reads (kept by adding and taking
    off each change) is the one counted afresh over every request tracked."""
    clock = Clock()
    view = PowerView(Topology(), wall_clock=clock, forget_after=300.0)
    for step in steps:
        if step[0] == "routed":
            view.routed(step[1], step[2], step[3])
        elif step[0] == "unrouted":
            view.unrouted(step[1], step[2])
        elif step[0] == "later":
            clock.now += step[1]
        else:
            view.apply(step[1])
        for substation in (S, "s2"):
            assert view.load(substation) == view.recounted_load(substation)


# ------------------------------------------------------------------------------ limits and tree
def candidate(name: str, capacity: int = 4) -> Candidate:
    return Candidate(name, capacity, 0.0, 0.0)


def test_without_anything_known_a_substation_gets_a_limit_that_never_binds():
    view = PowerView(Topology())
    assert view.limits_w({"s9": 4}) == {"s9": 4 * watts(MAX_CAR_KW)}


def test_limits_come_from_reports_the_file_and_overrides_the_lowest_winning():
    clock = Clock()
    tree = Topology({"feeder": Node("feeder", 100_000), S: Node(S, 80_000, "feeder")})
    view = PowerView(tree, wall_clock=clock)
    view.apply(report(10.0, limit_kw=60.0))
    assert view.limits_w() == {"feeder": 100_000, S: 60_000}
    overrides = LimitOverrides()
    overrides.apply(LimitOverride("feeder", 30_000, clock.now - 1, clock.now + 10))
    view.set_overrides(overrides)
    assert view.limits_w()["feeder"] == 30_000
    clock.now += 11  # the override ran out
    assert view.limits_w()["feeder"] == 100_000


_limit_steps = st.lists(
    st.one_of(
        # A report (its own limit in kW, a parent or none), an announcement, an override of a
        # node (kW or a clear, lasting some seconds or for good), time passing, a substation
        # forgotten; and a question with some capacities.
        st.tuples(
            st.just("report"),
            st.sampled_from(["s1", "s2", "s3"]),
            st.integers(10, 200),
            st.sampled_from([None, "feeder", "site"]),
        ),
        st.tuples(
            st.just("announce"),
            st.sampled_from(["s1", "s2", "s4"]),
            st.one_of(st.none(), st.integers(10, 200)),
            st.sampled_from([None, "feeder"]),
        ),
        st.tuples(
            st.just("override"),
            st.sampled_from(["feeder", "site", "s1", "s2"]),
            st.one_of(st.none(), st.integers(5, 300)),
            st.one_of(st.none(), st.floats(0.5, 20)),
        ),
        st.tuples(st.just("wait"), st.floats(0, 15)),
        st.tuples(st.just("forget"), st.sampled_from(["s1", "s2", "s4"])),
        st.tuples(
            st.just("ask"),
            st.dictionaries(st.sampled_from(["s1", "s2", "s3", "s5"]), st.integers(1, 50)),
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=_limit_steps)
def test_the_limits_kept_between_changes_are_the_ones_worked_out_afresh(
    steps: list[tuple],
) -> None:
    # limits_w works the limits out again only when something they depend on changed; after
    # any sequence of reports, announcements, overrides, their expiry, forgetting and changing
    # capacities they must be what limits_in_force says from scratch.
    from smartgrid.grid import limits_in_force

    clock = Clock()
    tree = Topology({"site": Node("site", 500_000), "feeder": Node("feeder", 100_000, "site")})
    view = PowerView(tree, wall_clock=clock)
    overrides = LimitOverrides()
    at = 10.0
    capacities: dict[str, int] = {}
    for step in steps:
        if step[0] == "report":
            at += 1
            view.apply(report(at, substation=step[1], limit_kw=float(step[2]), parent=step[3]))
        elif step[0] == "announce":
            view.apply(
                contract.SubstationAnnounced(
                    at=at,
                    substation=step[1],
                    instance="i1",
                    capacity=4,
                    metrics_url="http://127.0.0.1:1/metrics",
                    session_seconds=30.0,
                    limit_kw=None if step[2] is None else float(step[2]),
                    parent=step[3],
                )
            )
        elif step[0] == "override":
            limit_w = None if step[2] is None else step[2] * 1000
            until = None if step[3] is None else clock.now + step[3]
            overrides.apply(LimitOverride(step[1], limit_w, clock.now, until))
            view.set_overrides(overrides.copy())
            clock.now += 0.001  # the next override is issued later
        elif step[0] == "wait":
            clock.now += step[1]
        elif step[0] == "forget":
            view.forget(step[1])
        else:
            capacities = step[1]
        expected = limits_in_force(
            view.topology, view.own_limits_w(capacities), overrides.in_force(clock.now)
        )
        assert view.limits_w(capacities) == expected


def test_an_announced_parent_joins_the_tree_and_one_the_file_contradicts_is_ignored(caplog):
    tree = Topology({"feeder": Node("feeder", 100_000), "other": Node("other", 50_000)})
    view = PowerView(tree)
    view.apply(report(10.0, substation="s1", parent="feeder"))
    assert view.topology.path("s1") == ("s1", "feeder")
    view.apply(report(10.0, substation="s2", parent="nowhere"))
    assert view.topology.path("s2") == ("s2",)
    with caplog.at_level(logging.WARNING):
        for at in (11.0, 12.0):  # logged once
            view.apply(report(at, substation="s2", parent="nowhere"))
    assert view.topology.path("s2") == ("s2",)


def test_the_grid_counts_every_substation_under_a_feeder_not_only_the_candidates():
    tree = Topology({"feeder": Node("feeder", 50_000)})
    view = PowerView(tree)
    view.apply(report(10.0, CAR, CAR, substation="busy", parent="feeder"))
    view.apply(report(10.0, substation="idle", parent="feeder"))
    grid = view.grid([candidate("idle")])  # busy is not eligible just now
    assert grid.load("feeder") == cars(CAR, CAR)
    assert grid.headroom_w("feeder") == 50_000 - 2 * CAR.min_w


def test_power_per_node_sums_the_substations_reports_up_the_tree():
    tree = Topology({"site": Node("site", 500_000), "feeder": Node("feeder", 100_000, "site")})
    view = PowerView(tree)
    for name, kw in zip(("a", "b"), (12.5, 30.0), strict=True):
        view.apply(report(10.0, substation=name, parent="feeder", power_kw=kw))
    assert view.node_power_kw() == pytest.approx(
        {"a": 12.5, "b": 30.0, "feeder": 42.5, "site": 42.5}
    )


def test_counts_of_each_class_are_kept_apart():
    view = PowerView(Topology())
    for n, car in zip(itertools.count(), (CAR, FLEET_CAR, FLEET_CAR)):
        view.routed(S, f"r{n}", car)
    load = view.load(S)
    assert load.floors_w == (0, 2 * FLEET_CAR.min_w, CAR.min_w)
    assert load.floor_at_or_above(Priority.FLEET) == 2 * FLEET_CAR.min_w


def cancelled(request_id: str, at: float, *, started_at: float | None, substation=S):
    return contract.RequestCancelled(
        at=at,
        request_id=request_id,
        ev_id="EV" + request_id,
        source=substation,
        substation=substation,
        instance="i1",
        started_at=started_at,
    )


def test_a_session_stopped_by_a_cancel_is_taken_off_as_a_completion_is():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(started("r1", 9.0))
    view.apply(started("r2", 9.0, FLEET_CAR))
    view.apply(report(10.0, CAR, FLEET_CAR))
    assert view.apply(cancelled("r1", 10.5, started_at=9.0)) is True
    assert view.load(S) == cars(FLEET_CAR)
    view.apply(report(11.0, FLEET_CAR))
    assert view.load(S) == cars(FLEET_CAR)


def test_a_request_cancelled_at_the_substation_before_it_started_no_longer_counts_as_routed():
    view = PowerView(Topology(), wall_clock=Clock())
    view.apply(report(10.0))
    view.routed(S, "r1", CAR)
    assert view.load(S) == cars(CAR)
    view.apply(cancelled("r1", 10.5, started_at=None))
    assert view.load(S) == Load()
    # A balancer's cancel names no substation: nothing to take off.
    view.routed(S, "r2", CAR)
    balancer_cancel = contract.RequestCancelled(at=10.6, request_id="r2", ev_id="EV", source="b")
    assert view.apply(balancer_cancel) is False
    assert view.load(S) == cars(CAR)
