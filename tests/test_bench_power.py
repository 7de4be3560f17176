"""The power benchmarks' simulation (bench/power_sim.py) on small traces worked out by hand:
session lengths from energy and allotted power, sharing a limit, queueing, holding, releasing
by class, pauses, the units of the figures. Pure functions, no stack."""

from __future__ import annotations

import pytest

from bench.power_balance import ev_site
from bench.power_sim import (
    POWER_MIN_FIFO,
    STRATEGIES,
    Site,
    SubstationSpec,
    loadgen_trace,
    simulate_day,
    summarise,
)
from loadgen.evmix import EvRequest
from loadgen.run import LoadSettings, arrivals_for
from smartgrid.grid import Node, Topology
from smartgrid.power_request import parse_power_fields

HOUR = 1.0  # one real second per simulated hour: times below are in hours


def car(at: float, energy: float, max_kw: float = 10.0, min_kw: float = 1.4, priority="standard"):
    return EvRequest(at, "test", max_kw, min_kw, energy, priority)


def one_substation(points: int, limit_kw: float) -> Site:
    return Site((SubstationSpec("s1", points, limit_kw),))


def run(site: Site, trace: list[EvRequest], strategy: str = "corrected-min"):
    result = simulate_day(site, trace, strategy, hour_seconds=HOUR, poll_interval=0.25)
    return result.outcomes


def test_a_session_lasts_its_energy_over_its_power_and_the_next_waits_for_its_point():
    # 10 kWh at 10 kW: one hour. The second car arrives half-way and waits for the point.
    first, second = run(one_substation(1, 100), [car(0.0, 10), car(0.5, 5)])
    assert first.started_at == 0.0 and first.ended_at == pytest.approx(1.0)
    assert second.started_at == pytest.approx(1.0)
    assert second.wait_to_start == pytest.approx(0.5)
    assert second.ended_at == pytest.approx(1.5)


def test_a_shared_limit_lengthens_sessions_and_freed_power_shortens_the_rest():
    # A 10 kW limit for two 10 kW cars: 5 kW each. The 2.5 kWh car ends at 0.5 h; the other has
    # 2.5 kWh left and takes the whole 10 kW: 0.25 h more.
    short, long = run(one_substation(2, 10), [car(0.0, 2.5), car(0.0, 5)])
    assert short.ended_at == pytest.approx(0.5)
    assert long.ended_at == pytest.approx(0.75)


def test_a_feeder_is_shared_between_its_substations():
    # Two substations of 100 kW under a 10 kW feeder, one 10 kW car at each: 5 kW each, so
    # 5 kWh takes an hour.
    topology = Topology(
        {
            "feeder": Node("feeder", 10_000),
            "s1": Node("s1", 100_000, "feeder"),
            "s2": Node("s2", 100_000, "feeder"),
        }
    )
    site = Site.from_topology(topology, {"s1": 1, "s2": 1})
    a, b = run(site, [car(0.0, 5), car(0.0, 5)])
    assert {a.substation, b.substation} == {"s1", "s2"}
    assert a.ended_at == pytest.approx(1.0) and b.ended_at == pytest.approx(1.0)


def two_single_points() -> Site:
    return Site((SubstationSpec("s1", 1, 100), SubstationSpec("s2", 1, 100)))


# A long session (2 h), a short one (0.5 h), and a third car while both points are taken.
LONG_THEN_SHORT = [car(0.0, 20), car(0.1, 5), car(0.2, 5)]


def test_round_robin_queues_behind_a_long_session_while_the_other_point_frees_first():
    long, short, third = run(two_single_points(), LONG_THEN_SHORT, "round-robin")
    assert long.substation != short.substation
    # Round robin alternates: the third goes where the long one runs, free at 2.0.
    assert third.substation == long.substation
    assert third.wait_to_start == pytest.approx(1.8)


def test_corrected_min_holds_the_request_and_sends_it_to_the_first_point_to_free():
    long, short, third = run(two_single_points(), LONG_THEN_SHORT, "corrected-min")
    assert third.substation == short.substation
    assert third.started_at == pytest.approx(0.6)  # the short session ends at 0.1 + 0.5
    assert third.wait_to_start == pytest.approx(0.4)


def test_power_min_releases_a_held_emergency_before_an_older_standard_request():
    trace = [car(0.0, 10), car(0.1, 5), car(0.2, 5, priority="emergency")]
    first, standard, emergency = run(one_substation(1, 100), trace, "power-min")
    assert emergency.started_at == pytest.approx(1.0)
    assert standard.started_at == pytest.approx(1.5)
    # Released in arrival order instead, the standard request goes first.
    first, standard, emergency = run(one_substation(1, 100), trace, POWER_MIN_FIFO)
    assert standard.started_at == pytest.approx(1.0)
    assert emergency.started_at == pytest.approx(1.5)


def test_a_session_whose_minimum_does_not_fit_is_paused_and_resumes_when_power_frees():
    # 10 kW for two cars of minimum 6 kW. The standard car runs alone at 10 kW for 0.25 h
    # (2.5 kWh), then an emergency car arrives: it takes its minimum first, the standard car
    # is paused (4 kW left < 6) and the emergency car gets the whole 10 kW, 5 kWh in 0.5 h.
    # At 0.75 the standard car resumes at 10 kW for its last 2.5 kWh: it ends at 1.0.
    trace = [car(0.0, 5, min_kw=6), car(0.25, 5, min_kw=6, priority="emergency")]
    standard, emergency = run(one_substation(2, 10), trace)
    assert emergency.wait_to_charge == 0.0 and emergency.ended_at == pytest.approx(0.75)
    assert standard.paused_seconds == pytest.approx(0.5)
    assert standard.ended_at == pytest.approx(1.0)


def test_waits_are_reported_in_simulated_minutes_per_class():
    trace = [car(0.0, 10), car(0.5, 5), car(0.6, 5, priority="fleet")]
    result = simulate_day(
        one_substation(1, 100), trace, "corrected-min", hour_seconds=2.0, poll_interval=1.0
    )
    # Two real seconds per hour: the first session lasts 2 s, the second (arrived at 0.5 s)
    # starts at 2.0 s, the third (0.6 s) at 3.0 s: waits of 45 and 72 simulated minutes.
    figures = summarise([result])
    assert figures["to_start"]["max"] == pytest.approx(72.0)
    assert figures["by_class"]["standard"]["to_start"]["max"] == pytest.approx(45.0)
    assert figures["by_class"]["fleet"]["to_charge"]["p99"] == pytest.approx(72.0)
    assert figures["stretch_mean"] == pytest.approx(1.0)  # nothing was curtailed
    assert figures["violations"] == 0


def test_the_trace_is_what_loadgen_sends_and_every_strategy_serves_all_of_it():
    trace = loadgen_trace(peak_rate=10 / 3.6, hour_seconds=3.6, hours=7, seed=3)
    duration = 7 * 3.6
    settings = LoadSettings(
        gateway_url="",
        interval=3.6 / 10,
        arrivals="poisson",
        duration=duration,
        seed=3,
        ev_mix=True,
        hour_seconds=3.6,
    )
    expected = [at for at in arrivals_for(settings) if at < duration]
    assert [r.at for r in trace] == expected
    for r in trace:  # every body is one the gateway accepts
        parse_power_fields(
            {
                "max_kw": r.max_kw,
                "min_kw": r.min_kw,
                "energy_kwh": r.energy_kwh,
                "priority": r.priority,
            }
        )
    assert loadgen_trace(peak_rate=10 / 3.6, hour_seconds=3.6, hours=7, seed=3) == trace
    for strategy in (*STRATEGIES, POWER_MIN_FIFO):
        result = simulate_day(ev_site(), trace, strategy, hour_seconds=3.6, poll_interval=0.5)
        assert all(o.ended_at is not None for o in result.outcomes)
        assert result.violations == 0
