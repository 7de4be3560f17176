"""loadgen's EV mix and its power report, on synthetic events (no broker): every figure is
worked out by hand."""

from __future__ import annotations

import dataclasses
import random

import pytest

from loadgen import evmix
from loadgen.power import PowerReport, PowerTimeline, power_report, render_power
from loadgen.run import LoadSettings, run_load
from smartgrid import contract
from smartgrid.grid import parse_topology
from smartgrid.power_request import parse_power_fields
from stack.local import StackSettings, start_stack

TOPOLOGY = parse_topology(
    {
        "node": [
            {"id": "feeder-a", "limit_kw": 40},
            {"id": "s1", "parent": "feeder-a", "limit_kw": 20},
            {"id": "s2", "parent": "feeder-a", "limit_kw": 22},
        ]
    }
)
IDS = {name: f"{n:032x}" for n, name in enumerate("ABC", start=1)}


def started(name, at, substation, max_kw, power_kw, accepted_at, priority="standard"):
    return contract.SessionStarted(
        at=at,
        request_id=IDS[name],
        ev_id=f"EV-{name}",
        substation=substation,
        instance="i",
        accepted_at=accepted_at,
        expected_end=None,
        max_kw=max_kw,
        min_kw=1.4,
        priority=priority,
        power_kw=power_kw,
    )


def power(name, at, substation, kw):
    return contract.SessionPower(
        at=at, request_id=IDS[name], substation=substation, instance="i", power_kw=kw
    )


def completed(name, at, substation, energy):
    return contract.SessionCompleted(
        at=at,
        request_id=IDS[name],
        ev_id=f"EV-{name}",
        substation=substation,
        instance="i",
        started_at=0,
        energy_kwh=energy,
    )


def demand(substation, at, limit):
    return contract.PowerDemand(
        at=at,
        substation=substation,
        instance="i",
        limit_kw=limit,
        failsafe_kw=0,
        limit_in_force_kw=limit,
        power_kw=0,
    )


EVENTS = [
    started("A", 0, "s1", 11, 11, accepted_at=-1),
    started("C", 0, "s2", 22, 22, accepted_at=0, priority="fleet"),
    demand("s1", 0, 20),
    demand("s2", 0, 22),
    started("B", 1, "s1", 11, 9, accepted_at=0.5),
    power("A", 1, "s1", 9),
    # The operator cuts the feeder from 40 to 30 kW for 1.5 s; nothing follows (a bug to see).
    contract.GridLimit(at=2, node="feeder-a", limit_kw=30, valid_until=3.5),
    power("A", 3, "s1", 10),
    power("B", 3, "s1", 0),  # paused
    completed("A", 4, "s1", 10.0),
    completed("B", 4, "s1", 2.0),
    completed("C", 4, "s2", 20.0),
]


@pytest.fixture
def report() -> PowerReport:
    # Out of order on purpose: the timeline sorts by time.
    timeline = PowerTimeline.from_events(reversed(EVENTS), TOPOLOGY)
    return power_report(timeline, interval=0.5)


def test_power_per_substation_and_node_against_their_limits(report):
    s1, s2 = report.substations["s1"], report.substations["s2"]
    assert (s1.peak_kw, s1.samples, s1.over) == (18, 9, 0)
    assert (s2.peak_kw, s2.over) == (22, 0)
    feeder = report.nodes["feeder-a"]
    # 40 kW from t=1 on: at its limit until the cut, over it at 2, 2.5 and 3 (30 kW), and
    # within again once the override expired at 3.5 (A 10 + C 22 = 32 <= 40).
    assert (feeder.peak_kw, feeder.samples, feeder.over) == (40, 9, 3)
    assert feeder.worst_over_kw == pytest.approx(10)
    assert report.samples_over_limit == 3


def test_energy_pauses_and_waits_per_class(report):
    assert report.energy_kwh == 32.0 and report.sessions == 3
    assert (report.paused_sessions, report.paused_seconds_total) == (1, 1.0)
    assert report.waits_by_class["standard"]["max"] == 1
    assert report.waits_by_class["standard"]["count"] == 2
    assert report.waits_by_class["fleet"]["max"] == 0


def test_fairness_counts_only_sessions_below_their_own_maximum(report):
    # Standard: A and B at 9 kW each from 1 to 3 (4 samples, Jain 1), then A 10 and B paused
    # (2 samples, Jain 0.5); at 0 and 0.5 A alone. Fleet: C is at its own maximum throughout.
    assert report.jain_by_class["standard"] == pytest.approx((4 * 1 + 2 * 0.5) / 6)
    assert "fleet" not in report.jain_by_class


def test_the_report_renders_and_serialises(report):
    text = render_power(report)
    assert "node feeder-a: peak 40.0 kW" in text and "3 of 9 samples over its limit" in text
    assert report.to_json()["samples_over_limit"] == 3


def test_sessions_of_substations_without_power_run_at_their_maximum():
    event = contract.SessionStarted(
        at=0,
        request_id=IDS["A"],
        ev_id="EV-A",
        substation="s1",
        instance="i",
        accepted_at=0,
        expected_end=30,
    )
    timeline = PowerTimeline.from_events([event])
    assert timeline.substation_power(1) == {"s1": parse_power_fields({}).max_kw}


def _in(instance, event):
    return dataclasses.replace(event, instance=instance)


def test_a_restarted_substations_sessions_end_with_its_old_process_and_run_again():
    # s1's process "i" runs A and B at 9 kW; it dies; its new process "j" reports at 5 and
    # runs A again from 6 (B went to s2 at 7). Nothing of "i" draws after 5.
    events = [
        _in("i", started("A", 0, "s1", 11, 9, accepted_at=0)),
        _in("i", started("B", 0, "s1", 11, 9, accepted_at=0)),
        _in("j", demand("s1", 5, 20)),
        _in("j", started("A", 6, "s1", 11, 11, accepted_at=0)),
        started("B", 7, "s2", 11, 11, accepted_at=0),
    ]
    timeline = PowerTimeline.from_events(events, TOPOLOGY)
    assert timeline.substation_power(4) == {"s1": 18, "s2": 0}
    assert timeline.substation_power(5.5) == {"s1": 0, "s2": 0}
    assert timeline.substation_power(6.5) == {"s1": 11, "s2": 0}
    assert timeline.substation_power(7.5) == {"s1": 11, "s2": 11}
    assert len(timeline.sessions) == 2 and len(timeline.runs()) == 4
    # Each waited once, until its first start.
    assert power_report(timeline).waits_by_class["standard"]["max"] == 0


def test_a_limit_reported_just_after_a_change_counts_from_the_change():
    # The share rose from 10 to 20 kW at 1.0: the session's power is stamped then, the report
    # that says so goes out 0.1 s later (DEMAND_MIN_INTERVAL). Not an overload; a power above
    # the limit for longer than a report's delay is.
    events = [
        demand("s1", 0, 10),
        started("A", 0, "s1", 22, 10, accepted_at=0),
        power("A", 1.0, "s1", 20),
        demand("s1", 1.1, 20),
        power("A", 2.0, "s1", 22),
    ]
    report = power_report(PowerTimeline.from_events(events, TOPOLOGY), interval=0.05)
    over = report.substations["s1"]
    assert over.worst_over_kw == pytest.approx(2)
    assert over.over == len([s for s in report.series if s.t >= 2.0])


# ------------------------------------------------------------------------------ the EV mix
def test_the_mix_draws_valid_requests_in_the_stated_shares():
    rng = random.Random(7)
    draws = [evmix.draw(rng) for _ in range(20_000)]
    for request in draws[:500]:
        parse_power_fields(request.body("EV1"))  # what the gateway accepts
    low, high = evmix.ENERGY_RANGE_KWH
    assert all(low <= r.energy_kwh <= high for r in draws)
    assert {r.max_kw for r in draws} == {c.max_kw for c in evmix.CAR_CLASSES}
    assert min(r.max_kw for r in draws) == 3.7 and max(r.max_kw for r in draws) == 150
    for name, share in evmix.PRIORITY_SHARES:
        assert sum(r.priority == name for r in draws) / len(draws) == pytest.approx(share, abs=0.01)
    energies = sorted(r.energy_kwh for r in draws)
    assert energies[len(energies) // 2] == pytest.approx(evmix.ENERGY_MEDIAN_KWH, rel=0.05)
    assert energies[int(0.95 * len(energies))] > 2 * evmix.ENERGY_MEDIAN_KWH  # a long tail


def test_arrivals_ramp_like_a_day_compressed_in_simulated_time():
    profile = evmix.daily_profile(peak_rate=10, hour_seconds=3.6)
    assert profile.duration == pytest.approx(24 * 3.6)
    assert profile.rate_at(17 * 3.6) == 10  # the evening peak
    assert profile.rate_at(3 * 3.6) < profile.rate_at(8 * 3.6) > profile.rate_at(12 * 3.6)
    morning = evmix.daily_profile(peak_rate=10, hour_seconds=3.6, hours=9)
    assert morning.duration == pytest.approx(9 * 3.6)
    assert morning.rate_at(8.99 * 3.6) == pytest.approx(profile.rate_at(8.99 * 3.6))


def test_a_trace_is_the_same_for_the_same_seed():
    one = evmix.ev_trace(peak_rate=5, hour_seconds=1, seed=3)
    assert one == evmix.ev_trace(peak_rate=5, hour_seconds=1, seed=3)
    assert one != evmix.ev_trace(peak_rate=5, hour_seconds=1, seed=4)
    assert [r.at for r in one] == sorted(r.at for r in one)
    assert evmix.describe_mix(one)["requests"] == len(one) > 30


@pytest.mark.parametrize("hours", [6, 8, 24])
def test_a_day_cut_at_one_of_its_own_breakpoints_still_spans_the_whole_cut(hours):
    profile = evmix.daily_profile(peak_rate=10, hour_seconds=1, hours=hours)
    assert profile.duration == pytest.approx(hours)
    assert len(profile.points) >= 2


def test_the_trace_is_exactly_what_loadgen_sends():
    from bench.power_sim import loadgen_trace

    trace = evmix.ev_trace(peak_rate=5, hour_seconds=1, hours=12, seed=3)
    sent = loadgen_trace(peak_rate=5, hour_seconds=1, hours=12, seed=3)
    assert [(r.at, r.max_kw, r.energy_kwh, r.priority) for r in trace] == [
        (r.at, r.max_kw, r.energy_kwh, r.priority) for r in sent
    ]


def test_the_power_plot_draws_every_node_against_its_limit(report, tmp_path):
    from loadgen.plot import power_plot_path, write_power_plot

    path = write_power_plot(report, power_plot_path(tmp_path / "run.png"), "synthetic")
    assert path.name == "run-power.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ------------------------------------------------------------------------------ the real stack
def test_the_ev_mix_runs_through_the_real_stack_and_reports_power(
    stack_settings: StackSettings, tmp_path
):
    """The substations' limits and the grid's never bind here, so every car charges at its own
    maximum until its energy is delivered in simulated time: the power report must say
    exactly that, from the real events."""
    topology = tmp_path / "grid.toml"
    topology.write_text(
        '[[node]]\nid = "site"\nlimit_kw = 5000\n'
        + "".join(
            f'\n[[node]]\nid = "{s}"\nparent = "site"\nlimit_kw = 3500\n'
            for s in stack_settings.substation_ids()
        )
    )
    stack_settings.session_seconds = 1
    stack_settings.simulated_hour_seconds = 0.36
    group = start_stack(stack_settings)
    try:
        result = run_load(
            LoadSettings(
                gateway_url=stack_settings.gateway_url,
                amqp_url=stack_settings.amqp_url,
                interval=0.1,  # the peak: 10 a second
                arrivals="poisson",
                duration=8.64,  # a day of 0.36 s hours
                settle_timeout=60,
                ev_prefix="EV-MIX-",
                ev_mix=True,
                hour_seconds=0.36,
                topology_file=str(topology),
            )
        )
    finally:
        exits = group.stop()
    assert exits == {name: 0 for name in exits}, exits
    report, power = result.report, result.power
    assert report.accepted == report.sent > 20, (report.rejected, report.errors)
    assert report.every_accepted_completed_once
    assert power is not None and power.sessions == report.accepted
    # session.started carries each request's power, so the report sees the mix.
    started = [fate.started[0] for fate in result.fates.values()]
    assert {s.priority for s in started} == set(power.waits_by_class) >= {"standard", "fleet"}
    assert all(s.power_kw == s.max_kw for s in started)  # nothing binds
    assert power.nodes["site"].peak_kw > 0 and power.samples_over_limit == 0
    assert power.paused_sessions == 0
    assert power.jain_by_class == {}  # every session at its own maximum
    for fate in result.fates.values():
        (start,), (end,) = fate.started, fate.completed
        # At full power, in 0.36 s hours: it ends once its energy is delivered, not before.
        assert end.energy_kwh is not None and end.energy_kwh >= evmix.ENERGY_RANGE_KWH[0] - 0.01
        assert start.max_kw is not None
        assert end.at - start.at >= end.energy_kwh / start.max_kw * 0.36 - 0.01
    assert power.energy_kwh > 0
