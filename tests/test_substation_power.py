"""A real substation process sharing its power (issue 15), against the real broker.

The test plays the allocator: it publishes ``power.share`` grants to the substation's share
queue as the balancer's allocator will, and reads the substation's /metrics and events.
Simulated time runs fast (SIMULATED_HOUR_SECONDS), so energy-based sessions take seconds.
"""

from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest

from smartgrid import contract, leases
from stack.local import StackSettings, substation_process
from stack.processes import ServiceProcess
from tests.helpers import BrokerClient, eventually, health_url, metric, scrape

SUBSTATION = "substation-1"
HOUR = 3.6  # seconds per simulated hour: 1 kWh at 1 kW takes 3.6 s


def _start(settings: StackSettings, **env: str) -> tuple[ServiceProcess, str]:
    settings.capacity = 4
    service = substation_process(settings, 0)
    service.env = {**service.env, "SHUTDOWN_GRACE": "0", **env}
    service.start().wait_healthy()
    url = health_url(service)
    eventually(lambda: metric(url, contract.POWER_METRIC, substation=SUBSTATION) is not None)
    return service, url


def _send(broker: BrokerClient, **power) -> str:
    request_id = uuid.uuid4().hex
    now = time.time()
    routed = contract.RoutedRequest(
        request_id, f"EV-{request_id[:6]}", now, SUBSTATION, now, "test", **power
    )
    broker.publish(contract.DISPATCH_EXCHANGE, SUBSTATION, routed.to_body())
    return request_id


_seq = iter(range(1, 1_000_000))


def _grant(broker: BrokerClient, share_kw: float, *, lease: float) -> leases.Grant:
    """Publish a share as the allocator does: to the power exchange, expiring with its lease."""
    grant = leases.Grant(SUBSTATION, round(share_kw * 1000), time.time(), lease, 1, next(_seq))
    broker.channel.basic_publish(
        contract.POWER_EXCHANGE,
        SUBSTATION,
        leases.grant_to_message(grant).to_body(),
        pika.BasicProperties(expiration=str(int(lease * 1000))),
        mandatory=True,  # the substation's share queue is there
    )
    return grant


def _count(events: list[contract.Event], kind: type[contract.Event]) -> int:
    return sum(isinstance(event, kind) for event in events)


def _power(url: str) -> tuple[float | None, float | None]:
    values = scrape(url)
    key = (("substation", SUBSTATION),)
    return values.get((contract.POWER_METRIC, key)), values.get((contract.POWER_LIMIT_METRIC, key))


class Sampler:
    """Samples the substation's power and limit every 20 ms, from one scrape each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            power, limit = _power(self.url)
            if power is not None and limit is not None:
                self.samples.append((time.time(), power, limit))
            time.sleep(0.02)

    def stop(self) -> list[tuple[float, float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def _paused(url: str) -> float | None:
    return metric(url, contract.PAUSED_METRIC, substation=SUBSTATION, priority="standard")


def test_a_cut_share_is_obeyed_at_once_and_an_expired_lease_falls_to_the_failsafe(
    stack_settings, broker
):
    service, url = _start(stack_settings, SUBSTATION_PARENT="feeder-a", SUBSTATION_FAILSAFE_KW="12")
    sampler = Sampler(url)
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind, contract.SessionPower.kind, contract.PowerDemand.kind
        )
        # Under a feeder, and no share yet: the failsafe, and a lease metric at 0.
        assert _power(url) == (0.0, 12.0)
        assert metric(url, contract.LEASE_METRIC, substation=SUBSTATION) == 0
        cars = [_send(broker, max_kw=22, min_kw=11, energy_kwh=200) for _ in range(4)]
        # The oldest runs on the failsafe (above its minimum), the others wait paused.
        eventually(lambda: _paused(url) == 3, what="three cars paused on a 12 kW failsafe")
        assert _power(url) == (12.0, 12.0)

        time.sleep(leases.CLOCK_SKEW_SECONDS)  # it refuses shares issued before its start
        _grant(broker, 100, lease=30)
        # Every car at its maximum, and the 12 kW of the share they leave unused given back
        # at once (leases.LeaseHolder.release): the limit in force is what they want.
        eventually(lambda: _power(url) == (88.0, 88.0), what="every car at its maximum")

        # The cut: 30 kW. Two cars keep their 11 kW minimum and share the rest; two pause.
        cut = _grant(broker, 30, lease=30)
        eventually(lambda: _power(url) == (30.0, 30.0), what="the cut obeyed")
        assert _paused(url) == 2
        seen = broker.events_until(
            events,
            lambda seen: (
                sum(isinstance(e, contract.SessionPower) and e.at >= cut.issued_at for e in seen)
                >= 4
            ),
        )
        obeyed = [e for e in seen if isinstance(e, contract.SessionPower) and e.at >= cut.issued_at]
        assert sorted(e.power_kw for e in obeyed) == [0, 0, 15, 15]
        # The substation re-shared on the grant's arrival: within 2 s on its own clock.
        assert max(e.at for e in obeyed) - cut.issued_at < 2.0
        reports = [e for e in seen if isinstance(e, contract.PowerDemand)]

        def cut_reported() -> bool:
            # Reports follow changes by up to DEMAND_MIN_INTERVAL (0.1 s).
            reports.extend(e for e in broker.events(events) if isinstance(e, contract.PowerDemand))
            return reports[-1].limit_in_force_kw == 30 and reports[-1].power_kw == 30

        eventually(cut_reported, what="a report of the cut")
        assert reports[-1].holding_share_kw == 30 and reports[-1].parent == "feeder-a"
        assert reports[-1].sessions_standard == 4 and reports[-1].want_kw_standard == 88

        # Back up, with a short lease that nobody renews: the failsafe when it runs out.
        short = _grant(broker, 100, lease=2)
        eventually(lambda: _power(url) == (88.0, 88.0), what="the raise obeyed")
        eventually(lambda: _power(url) == (12.0, 12.0), what="the failsafe")
        lease_left = metric(url, contract.LEASE_METRIC, substation=SUBSTATION)
        assert lease_left is not None and lease_left <= 0
        failsafe = [
            e
            for e in broker.events(events)
            if isinstance(e, contract.SessionPower) and e.at >= short.until
        ]
        assert sorted(e.power_kw for e in failsafe) == [0, 0, 0, 12]
        assert max(e.at for e in failsafe) <= short.until + 1.0  # lease + 1 s, its own clock
        assert all(c in {e.request_id for e in failsafe} for c in cars[1:])
    finally:
        samples = sampler.stop()
        assert service.stop() == 0
    # Never above the limit in force, in any sample.
    assert samples and all(power <= limit for _, power, limit in samples)


def test_energy_based_sessions_end_when_their_energy_is_delivered_in_simulated_time(
    stack_settings, broker
):
    stack_settings.session_seconds = 30.0
    service, url = _start(
        stack_settings, SUBSTATION_POWER_LIMIT_KW="11", SIMULATED_HOUR_SECONDS=str(HOUR)
    )
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind,
            contract.SessionPower.kind,
            contract.SessionCompleted.kind,
        )
        # One car alone: 1.1 kWh at 11 kW is 0.1 simulated hours, 0.36 s.
        alone = _send(broker, max_kw=11, energy_kwh=1.1)
        eventually(
            lambda: metric(url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION) == 1
        )
        # Two cars share 11 kW: 5.5 kW each, so 5.5 kWh takes an hour, 3.6 s.
        first = _send(broker, max_kw=11, energy_kwh=5.5)
        eventually(lambda: _power(url) == (11.0, 11.0))
        second = _send(broker, max_kw=11, energy_kwh=5.5)
        eventually(
            lambda: metric(url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION) == 3,
            timeout=30,
        )
        seen = broker.events_until(
            events, lambda seen: _count(seen, contract.SessionCompleted) == 3
        )
        started = {e.request_id: e for e in seen if isinstance(e, contract.SessionStarted)}
        completed = {e.request_id: e for e in seen if isinstance(e, contract.SessionCompleted)}
        power = [e for e in seen if isinstance(e, contract.SessionPower)]
        assert started[alone].power_kw == 11 and started[alone].max_kw == 11
        assert started[second].power_kw == 5.5
        # first slows down when second starts; second speeds up when first ends (first).
        assert [(e.request_id, e.power_kw) for e in power] == [(first, 5.5), (second, 11.0)]
        for request_id, kwh in ((alone, 1.1), (first, 5.5), (second, 5.5)):
            assert completed[request_id].energy_kwh == pytest.approx(kwh, rel=0.01)
            assert completed[request_id].paused_seconds == 0
        # alone: 0.36 s. first: full power until second started, then half; second: half
        # power until first ended, then full. None ends before its energy is delivered.
        assert completed[alone].at - completed[alone].started_at >= 0.36 - 0.02
        both = completed[second].at - started[first].at
        assert both >= 2 * 5.5 / 11 * HOUR - 0.02  # 11 kWh at 11 kW in all
        assert completed[second].at - started[second].at > 0.5 * HOUR
        assert metric(url, contract.ENERGY_METRIC + "_total", substation=SUBSTATION) == (
            pytest.approx(12.1, rel=0.01)
        )
        assert _power(url) == (0.0, 11.0)
    finally:
        assert service.stop() == 0


def test_with_the_defaults_a_bare_request_runs_session_seconds_at_full_power_unnoticed(
    stack_settings, broker
):
    stack_settings.session_seconds = 1.0
    service, url = _start(stack_settings)
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind, contract.SessionPower.kind, contract.SessionCompleted.kind
        )
        ids = [broker.send_to_substation(SUBSTATION, ev_id=f"EV{i}") for i in range(6)]
        eventually(
            lambda: metric(url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION) == 6
        )
        seen = broker.events_until(
            events, lambda seen: _count(seen, contract.SessionCompleted) == 6
        )
        assert not [e for e in seen if isinstance(e, contract.SessionPower)]
        started = {e.request_id: e for e in seen if isinstance(e, contract.SessionStarted)}
        completed = {e.request_id: e for e in seen if isinstance(e, contract.SessionCompleted)}
        for request_id in ids:
            assert started[request_id].power_kw == 11  # the default car, uncurtailed
            assert started[request_id].expected_end == pytest.approx(started[request_id].at + 1)
            assert completed[request_id].at - completed[request_id].started_at >= 1.0 - 0.02
            # 11 kW for a second of real time (SIMULATED_HOUR_SECONDS=3600).
            assert completed[request_id].energy_kwh == pytest.approx(11 / 3600, rel=0.01)
        assert _power(url) == (0.0, 4 * 350.0)
        assert metric(url, contract.LEASE_METRIC, substation=SUBSTATION) is None
    finally:
        assert service.stop() == 0


def test_a_lower_share_is_acknowledged_at_once_not_at_the_next_report(
    stack_settings: StackSettings, broker: BrokerClient
) -> None:
    # Reports at most every 30 s: any acknowledgement seen sooner was sent for the grant.
    service, url = _start(
        stack_settings,
        SUBSTATION_PARENT="feeder-a",
        SUBSTATION_FAILSAFE_KW="12",
        DEMAND_MIN_INTERVAL="30",
        DEMAND_INTERVAL="60",
    )
    try:
        events = broker.subscribe_events(contract.PowerDemand.kind)
        _send(broker, max_kw=22, min_kw=11, energy_kwh=200)
        # Charging: its share queue is there. It refuses shares issued before its start.
        eventually(lambda: _power(url) == (12.0, 12.0), what="the car on the failsafe")
        time.sleep(leases.CLOCK_SKEW_SECONDS)
        reports: list[contract.PowerDemand] = []

        def acknowledged(grant: leases.Grant) -> bool:
            reports.extend(e for e in broker.events(events) if isinstance(e, contract.PowerDemand))
            return any((e.last_term, e.last_seq) == grant.key for e in reports)

        # The first share of a term, then a lower one: each acknowledged at once, since the
        # allocator counts the substation at more until it knows.
        first = _grant(broker, 100, lease=60)
        eventually(lambda: acknowledged(first), what="the first share acknowledged")
        lower = _grant(broker, 30, lease=60)
        eventually(lambda: acknowledged(lower), what="the lower share acknowledged")
        assert reports[-1].holding_share_kw == 30
        # The 8 kW its car leaves unused are given back in the same report.
        assert reports[-1].limit_in_force_kw == reports[-1].released_kw == 22
        assert _power(url) == (22.0, 22.0)
    finally:
        assert service.stop() == 0


def test_a_substation_with_nothing_changing_still_reports_every_demand_interval(
    stack_settings: StackSettings, broker
) -> None:
    # The allocator stands a substation down after a lease without a report, and the
    # periodic report is the only one a substation with no changes sends (issue 16 made it
    # wait for DEMAND_INTERVAL without a report instead of a fixed cadence).
    service, _ = _start(stack_settings, SUBSTATION_PARENT="feeder-a", DEMAND_INTERVAL="0.2")
    try:
        events = broker.subscribe_events(contract.PowerDemand.kind)
        reports: list[contract.PowerDemand] = []

        def reported(count: int) -> bool:
            reports.extend(
                e
                for e in broker.events(events)
                if isinstance(e, contract.PowerDemand) and e.substation == SUBSTATION
            )
            return len(reports) >= count

        eventually(lambda: reported(5), what="five reports from an idle substation")
        assert all(report.power_kw == 0 for report in reports)
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize("parent", ["", "feeder-a"])
def test_only_a_managed_substation_reports_its_changes(
    stack_settings: StackSettings, broker, parent: str
) -> None:
    # The periodic report out of the way (DEMAND_INTERVAL=60): what remains is what the
    # sessions' starts and ends send. A substation nobody hands shares to reports none of
    # them (issue 16: the router follows each session from its events; a count-only
    # deployment pays nothing per request for power); one under a grid node reports them.
    service, url = _start(
        stack_settings,
        SUBSTATION_PARENT=parent,
        SUBSTATION_FAILSAFE_KW="50",
        DEMAND_INTERVAL="60",
        DEMAND_MIN_INTERVAL="0",
        SESSION_SECONDS="0.3",
    )
    try:
        events = broker.subscribe_events(contract.PowerDemand.kind)
        time.sleep(0.5)
        broker.events(events)  # the report it sends when it starts
        for i in range(3):
            broker.send_to_substation(SUBSTATION, ev_id=f"EV{i}")
        eventually(
            lambda: metric(url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION) == 3
        )
        time.sleep(0.3)
        reports = [e for e in broker.events(events) if isinstance(e, contract.PowerDemand)]
        if parent:
            assert reports and reports[-1].power_kw == 0
        else:
            assert reports == []
    finally:
        assert service.stop() == 0
