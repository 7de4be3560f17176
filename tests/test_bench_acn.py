"""The ACN-Sim harness (bench/acn.py) on days small enough to work out by hand: the site as
ACN-Sim's constraints, cars given their points and waiting for one, smartgrid's allocator and
ACN-Sim's algorithms in the same simulator, and the real stack's energy by a departure."""

from __future__ import annotations

import pytest

from bench.acn import (
    Plug,
    energy_until,
    figures,
    network_of,
    plan_plugs,
    run_acn,
    station_id,
)
from bench.power_sim import Site, SubstationSpec
from loadgen.evmix import EvRequest
from loadgen.power import SessionPower
from smartgrid.grid import Node, Topology


def car(at: float, energy: float, max_kw: float = 10.0, priority: str = "standard"):
    return EvRequest(at, "test", max_kw, 1.4, energy, priority)


def one_substation(points: int, limit_kw: float) -> Site:
    return Site((SubstationSpec("s1", points, limit_kw),))


def test_every_node_is_a_current_constraint_over_the_points_under_it():
    topology = Topology(
        {
            "feeder": Node("feeder", 50_000),
            "s1": Node("s1", 30_000, "feeder"),
            "s2": Node("s2", 40_000, "feeder"),
        }
    )
    site = Site.from_topology(topology, {"s1": 2, "s2": 1})
    network = network_of(site)
    assert network.station_ids == ["s1/0", "s1/1", "s2/0"]
    limits = dict(zip(network.constraint_index, network.magnitudes, strict=True))
    assert limits == {"feeder": 50.0, "s1": 30.0, "s2": 40.0}  # amperes at 1000 V: kW
    rows = dict(zip(network.constraint_index, network.constraint_matrix.tolist(), strict=True))
    assert rows == {"feeder": [1, 1, 1], "s1": [1, 1, 0], "s2": [0, 0, 1]}


def test_a_car_that_finds_every_point_taken_waits_for_the_first_to_free():
    # One point, 1-minute periods, an hour a simulated 60 real seconds. The first car needs
    # 1 h at full power and stays twice that: 120 periods; the second, arriving at minute 30,
    # plugs in when it leaves and stays its own 60 minutes from then.
    plugs = plan_plugs(
        one_substation(1, 100),
        [car(0.0, 10), car(30.0, 5)],
        hour_seconds=60.0,
        stay_factor=2.0,
        period_minutes=1.0,
    )
    first, second = plugs
    assert (first.station, first.arrival, first.departure) == ("s1/0", 0, 120)
    assert (second.station, second.arrival, second.departure) == ("s1/0", 120, 180)


def test_cars_go_to_a_free_point_of_the_least_loaded_substation():
    site = Site((SubstationSpec("s1", 2, 100), SubstationSpec("s2", 2, 100)))
    plugs = plan_plugs(
        site,
        [car(0.0, 10), car(0.0, 10), car(0.0, 10)],
        hour_seconds=60.0,
        stay_factor=2.0,
        period_minutes=1.0,
    )
    stations = sorted(p.station for p in plugs)
    assert len(set(stations)) == 3
    assert {s.split("/")[0] for s in stations} == {"s1", "s2"}


# Two cars on a 10 kW substation. A asks 7.5 kWh and leaves after an hour; B asks 10 kWh and
# stays four hours.
def deadline_day() -> list[Plug]:
    a, b = car(0.0, 7.5), car(0.0, 10)
    return [
        Plug(0, a, "s1", station_id("s1", 0), 0, 60),
        Plug(1, b, "s1", station_id("s1", 1), 0, 240),
    ]


def test_smartgrid_shares_equally_without_looking_at_departures():
    # 5 kW each for A's hour: A leaves with 5 of its 7.5 kWh; then B alone finishes.
    run = run_acn(one_substation(2, 10), deadline_day(), "smartgrid", period_minutes=1.0)
    assert run.delivered_kwh[0] == pytest.approx(5.0)
    assert run.delivered_kwh[1] == pytest.approx(10.0)
    found = figures(run, deadline_day())
    assert found["met"] == pytest.approx(15 / 17.5)
    assert found["cars_fully_served"] == 0.5
    assert found["periods_over_limit"] == 0
    assert found["peak_kw"]["s1"] == pytest.approx(10.0)


def test_earliest_deadline_first_serves_the_car_that_leaves_first_and_meets_both():
    run = run_acn(one_substation(2, 10), deadline_day(), "edf", period_minutes=1.0)
    assert run.delivered_kwh[0] == pytest.approx(7.5, abs=0.01)
    assert run.delivered_kwh[1] == pytest.approx(10.0, abs=0.01)
    assert run.over_limit == {"s1": 0}


def test_uncontrolled_charging_breaks_the_limit_and_it_is_counted():
    # Both at 10 kW on a 10 kW substation: 20 kW for the 45 minutes A needs.
    run = run_acn(one_substation(2, 10), deadline_day(), "uncontrolled", period_minutes=1.0)
    assert run.over_limit["s1"] == 45
    assert run.peak_kw["s1"] == pytest.approx(20.0)
    assert figures(run, deadline_day())["met"] == pytest.approx(1.0)


def test_the_real_stacks_energy_by_a_departure_integrates_its_power_steps():
    # 10 kW for one simulated hour (2 s here), then 5 kW until it ended at 6 s.
    session = SessionPower(
        "r1",
        "s1",
        "standard",
        10.0,
        accepted_at=0.0,
        started_at=0.0,
        ended_at=6.0,
        steps=[(0.0, 10.0), (2.0, 5.0)],
    )
    assert energy_until(session, 4.0, hour_seconds=2.0) == pytest.approx(10 + 5)
    assert energy_until(session, 100.0, hour_seconds=2.0) == pytest.approx(10 + 10)
    assert energy_until(session, 0.0, hour_seconds=2.0) == 0.0
