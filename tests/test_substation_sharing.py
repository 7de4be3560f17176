"""A substation's power over time (substation/sharing.py), without a broker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgrid.config import ConfigError, from_env
from smartgrid.leases import Demand, Grant, report_from_event, report_to_event
from smartgrid.power import Priority, watts
from smartgrid.power_request import PowerFields
from substation.config import SubstationConfig
from substation.sharing import Change, PowerSharing, default_limit_kw
from tests.helpers import present

T0 = 1_000.0
SKEW = 0.5
HOUR = 3.6  # a simulated hour in 3.6 s: 1 kWh at 1 kW takes 3.6 s


def _sharing(
    *, limit_kw: float | None = None, failsafe_kw: float = 0, parent: str | None = None
) -> PowerSharing:
    return PowerSharing(
        "s1",
        limit_w=watts(default_limit_kw(4) if limit_kw is None else limit_kw),
        failsafe_w=watts(failsafe_kw),
        parent=parent,
        session_seconds=30.0,
        hour_seconds=HOUR,
        started_at=T0,
        skew_seconds=SKEW,
    )


def _car(
    max_kw: float = 11.0,
    min_kw: float = 1.4,
    energy_kwh: float | None = None,
    priority: Priority = Priority.STANDARD,
) -> PowerFields:
    return PowerFields(max_kw=max_kw, min_kw=min_kw, priority=priority, energy_kwh=energy_kwh)


def _grant(share_kw: float, *, at: float, lease: float = 3.0, seq: int = 1) -> Grant:
    return Grant("s1", watts(share_kw), at, lease, term=7, seq=seq)


def test_with_the_defaults_every_session_runs_at_full_power_for_session_seconds():
    sharing = _sharing()
    changes = []
    for i in range(4):
        sharing.add(f"r{i}", _car(max_kw=350 if i == 0 else 11), T0 + i)
        changes += sharing.reshare(T0 + i)
    # Each session appears once, when it starts; nobody else's power ever changes.
    assert [(c.request_id, c.started) for c in changes] == [(f"r{i}", True) for i in range(4)]
    assert changes[0].power_w == watts(350)
    for i, change in enumerate(changes):
        assert change.expected_end == pytest.approx(T0 + i + 30.0)
    assert sharing.due("r1", T0 + 31.0 - 0.001) is None  # delivered, give or take a timer's slip
    assert sharing.due("r1", T0 + 20) == pytest.approx(T0 + 31.0)


def test_a_binding_limit_curtails_and_the_session_lasts_longer():
    sharing = _sharing(limit_kw=20)
    sharing.add("a", _car(max_kw=11, energy_kwh=11), T0)
    (a,) = sharing.reshare(T0)
    assert (a.request_id, a.power_w, a.started) == ("a", watts(11), True)
    assert a.expected_end == pytest.approx(T0 + HOUR)
    sharing.add("b", _car(max_kw=11, energy_kwh=11), T0 + 1)
    changes = sharing.reshare(T0 + 1)
    # Water-filled: 10 kW each; a is told (session.power), b starts.
    assert [(c.request_id, c.power_w, c.started) for c in changes] == [
        ("a", 10_000, False),
        ("b", 10_000, True),
    ]
    # a delivered 11 kW for 1 s (11/3.6 kWh) and needs the rest at 10 kW.
    left_kwh = 11 - 11 * 1 / HOUR
    assert changes[0].expected_end == pytest.approx(T0 + 1 + left_kwh / 10 * HOUR)
    assert changes[1].expected_end == pytest.approx(T0 + 1 + 11 / 10 * HOUR)
    a_ends = present(changes[0].expected_end)
    ended = sharing.remove("a", a_ends)
    assert ended is not None and ended.energy_kwh == pytest.approx(11)
    assert ended.paused_seconds == 0
    (b,) = sharing.reshare(a_ends)
    assert b.power_w == watts(11) and not b.started


def test_a_session_whose_minimum_does_not_fit_is_paused_and_resumes_first():
    sharing = _sharing(limit_kw=10)
    sharing.add("old", _car(max_kw=11, min_kw=6, energy_kwh=5), T0)
    sharing.reshare(T0)
    sharing.add("young", _car(max_kw=11, min_kw=6, energy_kwh=5), T0 + 1)
    (young,) = sharing.reshare(T0 + 1)
    assert young == Change("young", 0, None, started=True)  # paused from the start
    assert sharing.due("young", T0 + 1) == float("inf")
    reading = sharing.reading(T0 + 2)
    assert reading.paused[Priority.STANDARD] == 1 and reading.power_w == 10_000
    assert reading.limit_w == 10_000 and reading.demand_w == 22_000
    # An emergency car takes the minimum first: the old one is paused, the young stays so.
    sharing.add("sos", _car(max_kw=11, min_kw=6, priority=Priority.EMERGENCY), T0 + 2)
    changes = sharing.reshare(T0 + 2)
    assert [(c.request_id, c.power_w) for c in changes] == [("sos", 10_000), ("old", 0)]
    sharing.remove("sos", T0 + 3)
    changes = sharing.reshare(T0 + 3)
    assert [(c.request_id, c.power_w) for c in changes] == [("old", 10_000)]  # older first
    ended = sharing.remove("young", T0 + 4)
    assert ended is not None and ended.energy_kwh == 0 and ended.paused_seconds == 3.0


def test_a_substation_with_a_parent_fails_closed_until_a_share_arrives_and_after_it_ran_out():
    sharing = _sharing(limit_kw=40, failsafe_kw=3, parent="feeder")
    sharing.add("a", _car(max_kw=11), T0 + 1)
    assert [c.power_w for c in sharing.reshare(T0 + 1)] == [3_000]
    assert sharing.lease_expires_at(T0 + 1) is None
    assert sharing.reading(T0 + 1).lease_expires_in == 0
    # Issued before the process started (plus the clocks' skew): maybe replaced already.
    assert not sharing.offer(_grant(30, at=T0 + SKEW), T0 + 1)
    assert sharing.offer(_grant(30, at=T0 + 1), T0 + 1)
    assert [c.power_w for c in sharing.reshare(T0 + 1)] == [11_000]
    assert sharing.lease_expires_at(T0 + 2) == T0 + 4
    assert sharing.reading(T0 + 2).lease_expires_in == 2
    assert not sharing.offer(_grant(30, at=T0 + 1.5, seq=1), T0 + 2)  # not newer
    assert sharing.offer(_grant(5, at=T0 + 2, seq=2), T0 + 2)
    assert [c.power_w for c in sharing.reshare(T0 + 2)] == [5_000]
    # The lease runs out at T0 + 5: the failsafe, the very instant.
    assert sharing.reshare(T0 + 5 - 1e-6) == []
    assert [c.power_w for c in sharing.reshare(T0 + 5)] == [3_000]
    assert sharing.reading(T0 + 6).lease_expires_in == -1
    assert sharing.reading(T0 + 6).limit_w == 3_000


def test_a_share_never_raises_the_substations_own_limit():
    sharing = _sharing(limit_kw=8, parent="feeder")
    assert sharing.offer(_grant(100, at=T0 + 1), T0 + 1)
    sharing.add("a", _car(max_kw=11), T0 + 1)
    assert [c.power_w for c in sharing.reshare(T0 + 1)] == [8_000]


def test_without_a_parent_it_is_its_own_until_it_receives_a_share():
    sharing = _sharing(limit_kw=40, failsafe_kw=2)
    sharing.add("a", _car(max_kw=11), T0 + 1)
    assert [c.power_w for c in sharing.reshare(T0 + 1)] == [11_000]
    assert sharing.reading(T0 + 1).lease_expires_in is None  # no lease metric
    assert sharing.reshare(T0 + 100) == []  # no lease to run out
    assert not sharing.offer(Grant("s2", 5_000, T0 + 100, 3, 1, 1), T0 + 100)  # not its own
    assert sharing.offer(_grant(5, at=T0 + 100), T0 + 100)
    assert [c.power_w for c in sharing.reshare(T0 + 100)] == [5_000]
    assert [c.power_w for c in sharing.reshare(T0 + 103)] == [2_000]  # managed from now on


def test_the_report_says_what_each_class_asks_for_and_which_share_it_holds():
    sharing = _sharing(limit_kw=40, failsafe_kw=3, parent="feeder")
    sharing.add("a", _car(max_kw=11, min_kw=2), T0 + 1)
    sharing.add("b", _car(max_kw=22, min_kw=4, priority=Priority.FLEET), T0 + 1)
    sharing.add("c", _car(max_kw=7, min_kw=1.4), T0 + 1)
    sharing.offer(_grant(30, at=T0 + 1), T0 + 1)
    sharing.reshare(T0 + 1)
    report, limit_in_force_w, power_w = sharing.report(T0 + 2)
    assert report.demand.sessions == (0, 1, 2)
    assert report.demand.floors_w == (0, 4_000, 3_400)
    assert report.demand.wants_w == (0, 22_000, 18_000)
    assert report.demand.failsafe_w == 3_000
    assert report.limit_w == 40_000 and report.parent == "feeder"
    assert report.holding == _grant(30, at=T0 + 1) and report.last_key == (7, 1)
    assert limit_in_force_w == power_w == 30_000
    event = report_to_event(
        report, instance="i", limit_in_force_w=limit_in_force_w, power_w=power_w
    )
    assert report_from_event(event) == report
    later, _, _ = sharing.report(T0 + 5)
    assert later.holding is None and later.last_key == (7, 1)  # ran out, still refuses older


def test_the_energy_counter_counts_running_and_ended_sessions_and_never_goes_back():
    sharing = _sharing(limit_kw=10)
    sharing.add("a", _car(max_kw=10, energy_kwh=1), T0)
    sharing.add("b", _car(max_kw=10, energy_kwh=100), T0)
    sharing.reshare(T0)  # 5 kW each
    assert sharing.reading(T0 + HOUR / 10).energy_kwh == pytest.approx(1.0)
    sharing.remove("a", T0 + HOUR / 10)
    assert sharing.reading(T0 + HOUR / 10).energy_kwh == pytest.approx(1.0)
    sharing.reshare(T0 + HOUR / 10)  # b alone at 10 kW
    assert sharing.reading(T0 + HOUR / 5).energy_kwh == pytest.approx(2.0)


def test_a_session_cannot_start_twice_and_an_unknown_one_ends_as_nothing():
    sharing = _sharing()
    sharing.add("a", _car(), T0)
    with pytest.raises(ValueError):
        sharing.add("a", _car(), T0)
    assert sharing.remove("zzz", T0) is None
    assert sharing.due("zzz", T0) is None


_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(14, 300),  # kW x 10
            st.integers(14, 60),
            st.sampled_from(list(Priority)),
        ),
        st.tuples(st.just("end"), st.integers(0, 20)),
        st.tuples(st.just("grant"), st.integers(0, 80), st.floats(0.5, 5)),
        st.tuples(st.just("wait"), st.floats(0, 4)),
    ),
    max_size=40,
)


class _Player:
    """Plays :data:`_steps` on one or more substations alike: the same starts, ends, shares
    (unless ``grants`` is False) and waits, one step at a time."""

    def __init__(self, *sharings: PowerSharing, grants: bool = True):
        self.sharings = sharings
        self.grants = grants
        self.now = T0 + 1
        self.running: list[str] = []
        self._played = 0
        self._seq = 0

    def play(self, step: tuple) -> None:
        request_id = f"r{self._played}"
        self._played += 1
        if step[0] == "add":
            _, max_tenths, min_tenths, priority = step
            max_kw = max_tenths / 10
            car = _car(max_kw, min(min_tenths / 10, max_kw), 20, priority)
            for sharing in self.sharings:
                sharing.add(request_id, car, self.now)
            self.running.append(request_id)
        elif step[0] == "end" and self.running:
            ended = self.running.pop(step[1] % len(self.running))
            for sharing in self.sharings:
                sharing.remove(ended, self.now)
        elif step[0] == "grant" and self.grants:
            self._seq += 1
            grant = Grant("s1", step[1] * 1000, self.now, step[2], 1, self._seq)
            for sharing in self.sharings:
                sharing.offer(grant, self.now)
        elif step[0] == "wait":
            self.now += step[1]


@settings(max_examples=150, deadline=None)
@given(steps=_steps, parent=st.booleans())
def test_the_sessions_never_draw_more_than_the_limit_in_force_and_energy_only_grows(steps, parent):
    sharing = _sharing(limit_kw=50, failsafe_kw=4, parent="feeder" if parent else None)
    player = _Player(sharing)
    energy = 0.0
    for step in steps:
        player.play(step)
        now = player.now
        sharing.reshare(now)
        reading = sharing.reading(now)
        assert reading.power_w <= reading.limit_w <= 50_000
        if parent:
            holding = sharing.lease.holding(now)
            assert reading.limit_w <= (holding.share_w if holding else 4_000)
        assert reading.energy_kwh >= energy - 1e-9
        energy = reading.energy_kwh


@settings(max_examples=150, deadline=None)
@given(steps=_steps, limit_kw=st.sampled_from([50, 400, 5_000]))
def test_each_session_draws_what_allocate_gives_it_whatever_the_limit(steps, limit_kw):
    # reshare takes a shortcut while the limit covers every session's maximum; the power of
    # each session must be allocate's all the same, and so must every change it reports.
    from smartgrid.power import allocate

    sharing = _sharing(limit_kw=limit_kw)
    player = _Player(sharing, grants=False)  # the limit stays limit_kw
    for step in steps:
        player.play(step)
        now = player.now
        before = {r: s.energy.power_w for r, s in sharing._sessions.items() if s.started}
        changes = sharing.reshare(now)
        sessions = sharing._sessions.values()
        expected = allocate(watts(limit_kw), [s.demand for s in sessions]).power_w
        assert {r: s.energy.power_w for r, s in sharing._sessions.items()} == expected
        assert [c.request_id for c in changes] == [
            s.demand.session
            for s in sorted(sessions, key=lambda s: s.demand.order)
            if before.get(s.demand.session) != expected[s.demand.session]
        ]


@settings(max_examples=200, deadline=None)
@given(
    steps=_steps,
    limit_kw=st.sampled_from([50, 400, 5_000]),
    parent=st.booleans(),
    guaranteed=st.sampled_from([None, {Priority.STANDARD: 0.25}]),
)
def test_the_shortcut_reshares_exactly_as_the_full_allocation_does(
    steps, limit_kw, parent, guaranteed
):
    # Two substations live through the same starts, ends, shares and lease expiries: one takes
    # the shortcut (only the sessions below their maximum are visited while the limit covers
    # every maximum), the other runs allocate over every session each time. Every re-share must
    # report the same changes and leave every session at the same power.
    def substation(incremental: bool) -> PowerSharing:
        sharing = PowerSharing(
            "s1",
            limit_w=watts(limit_kw),
            failsafe_w=watts(4),
            parent="feeder" if parent else None,
            session_seconds=30.0,
            hour_seconds=HOUR,
            started_at=T0,
            skew_seconds=SKEW,
            guaranteed=guaranteed,
        )
        sharing.incremental = incremental
        return sharing

    fast, full = substation(True), substation(False)
    player = _Player(fast, full)
    for step in steps:
        player.play(step)
        now = player.now
        assert fast.reshare(now) == full.reshare(now)
        powers = {r: s.energy.power_w for r, s in fast._sessions.items()}
        assert powers == {r: s.energy.power_w for r, s in full._sessions.items()}
        assert set(fast._below_max) == {
            r for r, s in fast._sessions.items() if powers[r] != s.demand.max_w
        }


def _counted_over_every_session(sharing: PowerSharing) -> tuple[Demand, int]:
    """What a report says, counted afresh over every session (what report keeps as it goes)."""
    sessions = sharing._sessions.values()
    demand = Demand.of_sessions(
        ((s.demand.priority, s.demand.min_w, s.demand.max_w) for s in sessions),
        sharing.lease.failsafe_w,
    )
    return demand, sum(s.energy.power_w for s in sessions)


@settings(max_examples=200, deadline=None)
@given(steps=_steps, limit_kw=st.sampled_from([50, 400, 5_000]), parent=st.booleans())
def test_the_report_kept_as_sessions_change_is_the_one_counted_over_every_session(
    steps, limit_kw, parent
):
    # Also between a start and its re-share (the new session draws nothing yet), and with
    # sessions of equal bounds ending in any order.
    sharing = _sharing(limit_kw=limit_kw, failsafe_kw=4, parent="feeder" if parent else None)
    player = _Player(sharing)
    for step in steps:
        player.play(step)
        now = player.now
        for _ in range(2):
            report, _, power_w = sharing.report(now)
            assert (report.demand, power_w) == _counted_over_every_session(sharing)
            sharing.reshare(now)


# ------------------------------------------------------------------------------ configuration
def _config(**env: str) -> SubstationConfig:
    return from_env(SubstationConfig, {"SUBSTATION_ID": "s1", **env})


def test_the_default_limit_never_binds_and_a_substation_alone_has_no_parent():
    config = _config(SUBSTATION_CAPACITY="4")
    assert config.limit_kw == 4 * 350 and config.parent == "" and config.failsafe_kw == 0
    assert _config(SUBSTATION_POWER_LIMIT_KW="22").limit_kw == 22


def test_the_topology_file_places_the_substation_and_lowers_its_limit(tmp_path):
    topology = tmp_path / "grid.toml"
    topology.write_text(
        '[[node]]\nid = "feeder"\nlimit_kw = 100\n\n'
        '[[node]]\nid = "s1"\nparent = "feeder"\nlimit_kw = 60\n'
    )
    config = _config(GRID_TOPOLOGY_FILE=str(topology), SUBSTATION_PARENT="other")
    assert config.parent == "feeder" and config.limit_kw == 60  # the file wins
    config = _config(GRID_TOPOLOGY_FILE=str(topology), SUBSTATION_POWER_LIMIT_KW="40")
    assert config.limit_kw == 40  # the lower holds
    # A substation the file does not name keeps its own settings.
    config = from_env(
        SubstationConfig,
        {"SUBSTATION_ID": "s2", "GRID_TOPOLOGY_FILE": str(topology), "SUBSTATION_PARENT": "f"},
    )
    assert config.parent == "f"
    topology.write_text('[[node]]\nid = "s1"\nlimit_kw = -1\n')
    with pytest.raises(ConfigError, match="limit"):
        _config(GRID_TOPOLOGY_FILE=str(topology))
    with pytest.raises(ConfigError, match="SUBSTATION_PARENT"):
        _config(SUBSTATION_PARENT="no spaces")


def test_a_binding_share_or_one_left_unused_is_reported_at_once():
    sharing = _sharing(parent="feeder-a", failsafe_kw=5)
    sharing.reshare(T0)
    sharing.report(T0)
    assert not sharing.report_at_once()  # nothing running, nothing held: no hurry
    assert sharing.offer(_grant(30, at=T0 + 1), T0 + 1)
    for i in range(3):
        sharing.add(f"r{i}", _car(max_kw=11), T0 + 1)
    sharing.reshare(T0 + 1)
    assert sharing.report_at_once()  # 33 kW of cars on 30 kW: the share binds
    sharing.report(T0 + 1)
    assert sharing.report_at_once()  # and goes on binding, every change
    sharing.remove("r0", T0 + 2)
    sharing.reshare(T0 + 2)
    assert sharing.report_at_once()  # 8 kW of the share given back
    sharing.report(T0 + 2)
    assert not sharing.report_at_once()  # told


def test_a_managed_substation_whose_cars_leave_part_of_its_share_unused_gives_it_back():
    sharing = _sharing(parent="feeder-a", failsafe_kw=5)
    assert sharing.offer(_grant(30, at=T0 + 1), T0 + 1)
    for i in range(3):
        sharing.add(f"r{i}", _car(max_kw=11), T0 + 1)
    sharing.reshare(T0 + 1)
    assert sharing.reading(T0 + 1).limit_w == 30_000
    sharing.remove("r0", T0 + 2)
    assert {c.power_w for c in sharing.reshare(T0 + 2)} == {11_000}  # the two left: at most
    assert sharing.reading(T0 + 2).limit_w == 22_000
    report, limit_in_force_w, power_w = sharing.report(T0 + 2)
    assert (report.released_w, report.last_key) == (22_000, (7, 1))
    assert (limit_in_force_w, power_w) == (22_000, 22_000)
    # Back through the message, as the allocator reads it.
    event = report_to_event(report, instance="i", limit_in_force_w=22_000, power_w=22_000)
    assert report_from_event(event).released_w == 22_000
    # A car that comes now shares what is left until the allocator grants more.
    sharing.add("r3", _car(max_kw=11), T0 + 3)
    changes = sharing.reshare(T0 + 3)
    assert sum(c.power_w for c in changes) <= 22_000 and sharing.report_at_once()
    assert sharing.offer(_grant(33, at=T0 + 3, seq=2), T0 + 3)
    sharing.reshare(T0 + 3)
    assert sharing.reading(T0 + 3).limit_w == 33_000  # a newer grant ends the cap
    for i in (1, 2, 3):
        sharing.remove(f"r{i}", T0 + 4)
    sharing.reshare(T0 + 4)
    assert sharing.reading(T0 + 4).limit_w == 5_000  # never below its failsafe


def test_a_root_or_a_substation_without_a_share_gives_nothing_back():
    root = _sharing(failsafe_kw=5)  # no parent: a share from an override is its whole limit
    assert root.offer(_grant(30, at=T0 + 1), T0 + 1)
    root.add("r0", _car(max_kw=11), T0 + 1)
    root.reshare(T0 + 1)
    assert root.reading(T0 + 1).limit_w == 30_000
    assert root.report(T0 + 1)[0].released_w is None
    waiting = _sharing(parent="feeder-a", failsafe_kw=5)
    waiting.add("r0", _car(max_kw=3.7), T0)
    waiting.reshare(T0)
    assert waiting.reading(T0).limit_w == 5_000  # its failsafe until the first share
    assert waiting.report(T0)[0].released_w is None


def test_a_substation_without_a_parent_keeps_the_report_interval():
    sharing = _sharing(limit_kw=30)
    for i in range(4):
        sharing.add(f"r{i}", _car(max_kw=11), T0)
    sharing.reshare(T0)
    assert not sharing.report_at_once()  # binding, but no share: nobody to tell
    sharing.report(T0)
    sharing.remove("r0", T0 + 1)
    sharing.reshare(T0 + 1)
    assert not sharing.report_at_once()
