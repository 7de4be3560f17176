"""bench.power_dips: the dips of a node's delivered power, found exactly and explained."""

from __future__ import annotations

from bench import share_trace
from bench.power_dips import find_dips, summary
from loadgen.power import PowerTimeline, SessionPower
from smartgrid.grid import Node, Topology
from smartgrid.share_stamps import GRANT_ISSUED, REPORT_RECEIVED, SHARE_RECEIVED

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


def _logs(tmp_path, balancer: list[str], **substations: list[str]):
    prefix = "2026-11-30 11:00:00,000 DEBUG   "
    (tmp_path / "balancer.log").write_text("".join(f"{prefix}{line}\n" for line in balancer))
    for name, lines in substations.items():
        (tmp_path / f"{name}.log").write_text("".join(f"{prefix}{line}\n" for line in lines))
    return share_trace.read(tmp_path)


def test_a_car_arrivals_dip_is_taken_apart_into_its_hops(tmp_path):
    trace = _logs(
        tmp_path,
        [
            REPORT_RECEIVED % ("s1", 9.0, 9.003),
            REPORT_RECEIVED % ("s2", 10.0005, 10.004),  # the new car's
            GRANT_ISSUED % ("s1", 40.0, 10.005),  # the lowering
            REPORT_RECEIVED % ("s1", 10.009, 10.012),  # its acknowledgement
            GRANT_ISSUED % ("s2", 60.0, 10.013),  # the raise
        ],
        s1=[SHARE_RECEIVED % (40.0, 10.005, 10.008)],
        s2=[SHARE_RECEIVED % (60.0, 10.013, 10.016)],
    )
    steps = share_trace.hops(trace, "s2", 10.0, 10.016)
    assert steps is not None
    assert {k: round(1000 * v, 3) for k, v in steps.items()} == {
        "report wait": 0.5,
        "earlier rounds": 0.0,
        "report hop": 3.5,
        "allocator (lower)": 1.0,
        "lowering grant hop": 3.0,
        "lowered substation applies and acknowledges": 1.0,
        "acknowledgement hop": 3.0,
        "allocator (raise)": 1.0,
        "raise grant hop": 3.0,
    }
    assert round(sum(steps.values()), 6) == 0.016  # the whole dip
    # Not ended by a grant to s2, or led back to a report from before the car: no hops.
    assert share_trace.hops(trace, "s2", 10.0, 10.02) is None
    assert share_trace.hops(trace, "s2", 10.001, 10.016) is None


def test_a_raise_without_a_lowering_is_one_round_through_the_allocator(tmp_path):
    trace = _logs(
        tmp_path,
        [
            REPORT_RECEIVED % ("s2", 10.001, 10.003),
            GRANT_ISSUED % ("s2", 60.0, 10.004),
        ],
        s2=[SHARE_RECEIVED % (60.0, 10.004, 10.006)],
    )
    steps = share_trace.hops(trace, "s2", 10.0, 10.006)
    assert steps is not None and list(steps) == [
        "report wait",
        "earlier rounds",
        "report hop",
        "allocator (raise)",
        "raise grant hop",
    ]


def test_a_raise_in_two_rounds_is_not_taken_for_a_wait_before_the_report(tmp_path):
    trace = _logs(
        tmp_path,
        [
            REPORT_RECEIVED % ("s2", 10.001, 10.003),
            GRANT_ISSUED % ("s2", 50.0, 10.004),  # not yet all the car needs
            REPORT_RECEIVED % ("s2", 10.007, 10.009),
            GRANT_ISSUED % ("s2", 60.0, 10.01),
        ],
        s2=[
            SHARE_RECEIVED % (50.0, 10.004, 10.006),
            SHARE_RECEIVED % (60.0, 10.01, 10.012),
        ],
    )
    steps = share_trace.hops(trace, "s2", 10.0, 10.012)
    assert steps is not None
    assert round(1000 * steps["report wait"], 3) == 1.0
    assert round(1000 * steps["earlier rounds"], 3) == 6.0
    assert round(sum(steps.values()), 6) == 0.012
