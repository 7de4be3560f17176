"""bench.power_dips: the dips of a node's delivered power, found exactly and explained."""

from __future__ import annotations

from bench.power_dips import find_dips, summary
from loadgen.power import PowerTimeline, SessionPower
from smartgrid.grid import Node, Topology

SITE = Topology(
    {
        "site": Node("site", 100_000),
        "s1": Node("s1", 60_000, "site"),
        "s2": Node("s2", 60_000, "site"),
    }
)


def _car(
    rid: str, substation: str, steps, ended_at: float = 100.0, max_kw: float = 40.0
) -> SessionPower:
    return SessionPower(
        rid, substation, "standard", max_kw, 0.0, steps[0][0], ended_at, steps=list(steps)
    )


def _timeline(*cars: SessionPower) -> PowerTimeline:
    timeline = PowerTimeline(SITE)
    timeline.sessions = {c.request_id: c for c in cars}
    return timeline


def test_a_session_that_ends_leaves_a_dip_until_its_power_is_raised_elsewhere():
    timeline = _timeline(
        _car("a", "s1", [(1.0, 25.0), (10.02, 30.0)]),
        _car("b", "s1", [(1.0, 25.0), (10.02, 30.0)]),
        _car("c", "s2", [(1.0, 25.0), (10.0, 40.0)]),
        _car("d", "s2", [(1.0, 25.0)], ended_at=10.0),
    )
    # s2's report of the end, then its acknowledgement of the lower share.
    timeline._limits["s2"] = [(9.0, 50.0), (10.0001, 50.0), (10.01, 40.0)]
    dips, asked = find_dips(timeline, SITE, 0.0, 20.0)
    assert asked == 19.0  # from the first car on, four 40 kW cars on 100 kW
    (dip,) = dips
    assert (dip.start, dip.end) == (10.0, 10.02) and round(dip.worst, 3) == 0.9
    assert (dip.cause, dip.where, dip.ended_by) == ("session ended", "s2", "s1")
    assert round(dip.chain["report"], 4) == 0.0001
    assert round(dip.chain["lowering acknowledged"], 3) == 0.01
    assert round(dip.chain["raised elsewhere"], 3) == 0.02
    found = summary(dips, asked)
    assert found["dips"] == 1 and round(found["share_of_time_below"], 5) == round(0.02 / 19, 5)


def test_a_car_that_arrives_where_the_share_binds_dips_until_power_moves_to_it():
    timeline = _timeline(
        *[_car(rid, "s1", [(1.0, 20.0)]) for rid in "abe"],  # s1 full at its own 60 kW
        _car("c", "s2", [(1.0, 30.0), (5.0, 15.0), (5.01, 20.0)], max_kw=30.0),
        # Its share was what c wanted: d shares it until the allocator raises s2.
        _car("d", "s2", [(5.0, 15.0), (5.01, 20.0)]),
    )
    dips, _ = find_dips(timeline, SITE, 0.0, 20.0)
    assert [(d.cause, d.where, d.ended_by) for d in dips] == [("car arrived", "s2", "s2")]
    assert (dips[0].start, dips[0].end) == (5.0, 5.01) and round(dips[0].worst, 3) == 0.9
    assert dips[0].chain == {}


def test_no_dip_while_the_cars_ask_less_than_1_2_times_the_limit():
    timeline = _timeline(_car("a", "s1", [(1.0, 10.0)]), _car("b", "s2", [(1.0, 10.0)]))
    assert find_dips(timeline, SITE, 0.0, 20.0) == ([], 0.0)


def test_a_share_given_back_in_the_report_of_the_end_is_told_apart():
    timeline = _timeline(
        _car("a", "s1", [(1.0, 25.0), (10.005, 30.0)]),
        _car("b", "s1", [(1.0, 25.0), (10.005, 30.0)]),
        _car("c", "s2", [(1.0, 25.0), (10.0, 40.0)]),
        _car("d", "s2", [(1.0, 25.0)], ended_at=10.0),
    )
    timeline._limits["s2"] = [(9.0, 50.0), (10.0001, 40.0), (12.0, 30.0)]
    (dip,) = find_dips(timeline, SITE, 0.0, 20.0)[0]
    assert set(dip.chain) == {"report", "released in the report", "raised elsewhere"}
