"""Nothing accepted is lost: the ledger under real faults, one fault per test.

Each test drives a steady load through the running stack (real processes, the real broker in a
private vhost), causes one fault for real in the middle of it, and then checks the ledger built
from the lifecycle events: every request that got a 202 completed exactly once (or was
dead-lettered with a reason), none completed twice, none was lost.

A session cut short by a killed substation runs again from the start (its request was never
acknowledged), so a request may *start* twice; it must still *complete* once.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from loadgen.observer import RequestFate
from loadgen.run import LoadResult, LoadSettings, run_load
from smartgrid import contract
from stack.local import StackSettings, start_stack
from stack.processes import ProcessGroup, ServiceProcess
from tests.helpers import eventually, health_url, kill, metric

pytestmark = pytest.mark.slow

INTERVAL = 0.1  # ten requests a second
DURATION = 12.0
FAULT_AT = 4.0
SESSION_SECONDS = 1.5


@dataclass
class FaultRun:
    result: LoadResult
    group: ProcessGroup
    in_flight_at_fault: int
    recovery_seconds: float | None


def _service(group: ProcessGroup, name: str) -> ServiceProcess:
    return next(s for s in group.services if s.name == name)


def _active_sessions(settings: StackSettings) -> int:
    total = 0
    for i, substation in enumerate(settings.substation_ids()):
        try:
            value = metric(
                f"http://{settings.host}:{settings.substation_port(i)}/metrics",
                contract.LOAD_METRIC,
                substation=substation,
            )
        except OSError:
            continue  # a killed one
        total += int(value or 0)
    return total


def _run_with_fault(
    settings: StackSettings, fault: Callable[[ProcessGroup], Callable[[], bool] | None]
) -> FaultRun:
    """Run the load; at FAULT_AT call ``fault``, which may return a recovery check."""
    settings.session_seconds = SESSION_SECONDS
    settings.poll_interval = 0.5
    settings.log_level = "INFO"
    group = start_stack(settings)
    outcome: dict[str, LoadResult] = {}

    def drive() -> None:
        outcome["result"] = run_load(
            LoadSettings(
                gateway_url=settings.gateway_url,
                amqp_url=settings.amqp_url,
                interval=INTERVAL,
                duration=DURATION,
                settle_timeout=90,
                timeout=15,
            )
        )

    driver = threading.Thread(target=drive, daemon=True)
    try:
        driver.start()
        time.sleep(FAULT_AT)
        in_flight = _active_sessions(settings)
        faulted_at = time.monotonic()
        recovered = fault(group)
        recovery = None
        if recovered is not None:
            eventually(recovered, timeout=60, interval=0.05, what="recovery after the fault")
            recovery = time.monotonic() - faulted_at
        driver.join(timeout=DURATION + 120)
        assert not driver.is_alive(), "the load run did not finish"
    finally:
        exits = group.stop()
    run = FaultRun(outcome["result"], group, in_flight, recovery)
    report = run.result.report
    print(
        f"\nin flight at the fault: {in_flight} sessions; accepted {report.accepted}/{report.sent} "
        f"(rejected {report.rejected}, errors {report.errors}); completed once "
        f"{report.completed_once}, "
        f"started more than once {report.started_more_than_once}, dead-lettered "
        f"{report.dead_lettered}, "
        f"unfinished {report.unfinished}; redelivered: {_redelivered(run.result)}; "
        f"recovery {recovery if recovery is None else round(recovery, 2)} s; exits {exits}"
    )
    return run


def _redelivered(result: LoadResult) -> str:
    """What came back from a dead consumer: requests routed more than once (pending
    redelivered to a balancer) and sessions started again (a substation's queue redelivered)."""
    routed_again = sum(1 for fate in result.fates.values() if len(fate.routed_to) > 1)
    restarted = sum(1 for fate in result.fates.values() if len(fate.started) > 1)
    return f"{routed_again} routed again, {restarted} sessions started again"


def _describe(request_id: str, fate: RequestFate) -> str:
    started = [(s.substation, s.instance, round(s.at, 2)) for s in fate.started]
    completed = [(c.substation, c.instance, round(c.at, 2)) for c in fate.completed]
    return f"{request_id}: routed to {fate.routed_to}, started {started}, completed {completed}"


def _logged_about(group: ProcessGroup, request_id: str) -> str:
    lines = []
    for service in group.services:
        with open(service.log_path, errors="replace") as log:
            lines += [f"{service.name}: {line.rstrip()}" for line in log if request_id in line]
    return "\n".join(lines) or "(nothing)"


def _assert_ledger(run: FaultRun, *, allow_503: bool = False) -> None:
    report = run.result.report
    assert report.accepted > 0
    lost = [
        rid
        for rid, fate in run.result.fates.items()
        if len(fate.completed) != 1 and not fate.dead_lettered
    ]
    assert not lost, (
        f"{len(lost)} accepted requests did not complete exactly once: "
        + "; ".join(_describe(rid, run.result.fates[rid]) for rid in lost[:5])
        + "\nwhat the services logged about the first:\n"
        + _logged_about(run.group, lost[0])
    )
    assert report.completed_more_than_once == 0
    assert report.completed_once + report.dead_lettered == report.accepted
    # A request never charges at two substations at once.
    for rid, fate in run.result.fates.items():
        substations = {s.substation for s in fate.started}
        if len(substations) > 1:
            first_end = min(c.at for c in fate.completed)
            starts = sorted(s.at for s in fate.started)
            assert starts[-1] >= first_end or len(fate.completed) == 1, rid
    unexpected = {
        status: n for status, n in report.rejected.items() if not (allow_503 and status == "503")
    }
    assert not unexpected, report.rejected
    assert not report.errors, report.errors


def test_a_substation_killed_and_restarted_loses_nothing(stack_settings: StackSettings):
    def fault(group: ProcessGroup) -> Callable[[], bool]:
        victim = _service(group, "substation-1")
        kill(victim)
        time.sleep(1.0)
        victim.start()
        url = health_url(victim)
        return lambda: metric(url, "substation_broker_connected", substation="substation-1") == 1

    run = _run_with_fault(stack_settings, fault)
    _assert_ledger(run)


def test_a_balancer_killed_and_restarted_loses_nothing(stack_settings: StackSettings):
    def fault(group: ProcessGroup) -> Callable[[], bool]:
        balancer = _service(group, "balancer")
        kill(balancer)
        time.sleep(1.0)
        balancer.start()
        return lambda: metric(health_url(balancer), "balancer_broker_connected") == 1

    run = _run_with_fault(stack_settings, fault)
    _assert_ledger(run)


def test_forcibly_closed_broker_connections_lose_nothing(stack_settings: StackSettings):
    vhost = stack_settings.amqp_url.rsplit("/", 1)[1]

    def fault(group: ProcessGroup) -> Callable[[], bool]:
        result = subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "fault test"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        balancer = _service(group, "balancer")
        gateway = _service(group, "gateway")

        def reconnected() -> bool:
            import urllib.request

            with urllib.request.urlopen(health_url(gateway), timeout=2) as response:
                healthy = response.status == 200
            return healthy and metric(health_url(balancer), "balancer_broker_connected") == 1

        return reconnected

    run = _run_with_fault(stack_settings, fault)
    # While the gateway reconnects it may answer 503 (never a 202 it cannot keep).
    _assert_ledger(run, allow_503=True)


def test_a_frozen_substation_drops_what_was_handed_on_and_nothing_completes_twice(
    stack_settings: StackSettings,
):
    """SIGSTOP a substation mid-load for longer than the broker waits for its heartbeats: the
    broker closes its connection and gives its requests back, and the balancer moves them to
    live substations, which charge them. On SIGCONT its overdue session timers fire, but the
    sessions were bound to the lost connection: they are dropped, or their completions (sent
    into the dead socket before pika noticed) are never confirmed and never sent again."""
    stack_settings.amqp_url += "?heartbeat=2"  # the broker gives up after ~2 missed beats
    stack_settings.extra_env = {"DRAIN_AFTER": "2", "STALE_AFTER": "1"}
    frozen_for = 10.0

    def fault(group: ProcessGroup) -> Callable[[], bool]:
        victim = _service(group, "substation-1")
        victim.signal(signal.SIGSTOP)
        time.sleep(frozen_for)
        victim.signal(signal.SIGCONT)
        url = health_url(victim)
        return lambda: metric(url, "substation_broker_connected", substation="substation-1") == 1

    run = _run_with_fault(stack_settings, fault)
    _assert_ledger(run)
    moved = [f for f in run.result.fates.values() if len({s.substation for s in f.started}) > 1]
    assert moved, "the freeze moved nothing: it proves nothing"
    victim = _service(run.group, "substation-1")
    with open(victim.log_path, errors="replace") as log:
        logged = log.read()
    # The fencing did happen (one way or the other), so the ledger above tested it.
    assert "dropped" in logged or "not confirmed" in logged


def test_a_substation_that_dies_for_good_has_its_requests_moved_to_live_ones(
    stack_settings: StackSettings,
):
    stack_settings.extra_env = {"DRAIN_AFTER": "2", "STALE_AFTER": "1"}

    def fault(group: ProcessGroup) -> Callable[[], bool]:
        victim = _service(group, "substation-1")
        kill(victim)
        balancer = _service(group, "balancer")
        return lambda: (
            metric(health_url(balancer), "balancer_substation_up", substation="substation-1") == 0
        )

    run = _run_with_fault(stack_settings, fault)
    _assert_ledger(run)
    # Everything that was charging at the dead substation completed somewhere else.
    moved = [f for f in run.result.fates.values() if len({s.substation for s in f.started}) > 1]
    assert all(f.completed[0].substation != "substation-1" for f in moved)
