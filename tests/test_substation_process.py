"""A real substation process against the real broker: sessions, capacity, duplicates, signals."""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time

from smartgrid import contract
from stack.local import StackSettings, substation_process
from stack.processes import ServiceProcess
from tests.helpers import BrokerClient, eventually, health_url, kill, metric, present

SUBSTATION = "substation-1"


def _start(
    settings: StackSettings, *, capacity: int, session_seconds: float
) -> tuple[ServiceProcess, str]:
    settings.capacity = capacity
    settings.session_seconds = session_seconds
    service = substation_process(settings, 0)
    service.env = {**service.env, "SHUTDOWN_GRACE": "0.5"}
    service.start().wait_healthy()
    metrics_url = health_url(service)
    eventually(lambda: metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION) is not None)
    return service, metrics_url


def _start_second(settings: StackSettings, tmp_path) -> tuple[ServiceProcess, str]:
    """A second process with the same SUBSTATION_ID (on a port and log of its own), started
    after :func:`_start`'s first; it finds the queue consumed and waits as a standby."""
    settings.substation_ports = (settings.substation_ports[1],)
    settings.log_dir = tmp_path / "second"
    second = substation_process(settings, 0)
    second.env = {**second.env, "SHUTDOWN_GRACE": "0.5"}
    second.start().wait_healthy()
    return second, health_url(second)


def _consuming(metrics_url: str, substation: str) -> bool:
    return metric(metrics_url, contract.CONSUMING_METRIC, substation=substation) == 1


def _pair(
    settings: StackSettings,
    *,
    first_via: str | None = None,
    envs: tuple[dict[str, str], dict[str, str]] = ({}, {}),
) -> list[ServiceProcess]:
    """substation-1 and substation-2 (not started), each with its ``envs``; substation-1
    reaches the broker at ``first_via`` (a proxy) if given.

    Each stays on the other's roster (whose lookups and answers it trusts) for 3 ×
    ANNOUNCE_INTERVAL after its last announcement: 30 s here, so that a substation cut off
    for a test's seconds, and back after its reconnect backoff (up to 10 s between tries), is
    still trusted when it answers, before it announces itself again."""
    settings.substations = 2
    services = [substation_process(settings, i) for i in range(2)]
    first_env = envs[0] if first_via is None else {**envs[0], "AMQP_URL": first_via}
    for service, env in zip(services, (first_env, envs[1]), strict=True):
        service.env = {**service.env, "ANNOUNCE_INTERVAL": "10", **env}
    return services


def _start_pair(services: list[ServiceProcess]) -> list[str]:
    """Start :func:`_pair`'s two: consuming, each having heard the other announce itself (it
    trusts its lookups from then on). Their metrics URLs."""
    for service in services:
        service.start().wait_healthy()
    urls = [health_url(s) for s in services]
    for url, name in zip(urls, ("substation-1", "substation-2"), strict=True):
        eventually(functools.partial(_consuming, url, name))
    time.sleep(1)
    return urls


def _started(broker: BrokerClient, starts: str) -> list[tuple[str, str]]:
    """(request, substation) of each session.started on ``starts`` since the last read."""
    return [(e.request_id, e.substation) for e in broker.events_of(starts, contract.SessionStarted)]


def _duplicates(metrics_url: str, substation: str) -> float | None:
    """Copies of requests it charged or knew were charged, acknowledged without a session."""
    return metric(metrics_url, "substation_duplicate_requests_total", substation=substation)


def _completed_by_a_killed_process(
    broker: BrokerClient, request_id: str, ev_id: str, instance: str
) -> None:
    """What a process that ended the session of ``request_id`` and was killed before its ack
    leaves behind: its session.completed in the history."""
    started_at = time.time()
    broker.publish_event(
        contract.SessionCompleted(
            at=started_at + 1,
            request_id=request_id,
            ev_id=ev_id,
            substation=SUBSTATION,
            instance=instance,
            started_at=started_at,
        )
    )


def _count(events: list[contract.Event], kind: type[contract.Event]) -> int:
    return sum(isinstance(e, kind) for e in events)


def test_sessions_never_exceed_capacity_and_the_load_returns_to_zero(stack_settings, broker):
    service, metrics_url = _start(stack_settings, capacity=2, session_seconds=0.5)
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind, contract.SessionCompleted.kind
        )
        ids = [broker.send_to_substation(SUBSTATION, ev_id=f"EV{i}") for i in range(6)]

        seen_loads = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                seen_loads.append(metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        eventually(
            lambda: (
                metric(metrics_url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION)
                == 6
            ),
            what="six sessions completed",
        )
        stop.set()
        sampler.join()

        # It did run sessions in parallel, but never more than 2 (and every sample was read).
        assert max(present(load) for load in seen_loads) == 2
        assert metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION) == 0
        received = broker.events_until(events, lambda seen: len(seen) >= 12)
        started = [e for e in received if isinstance(e, contract.SessionStarted)]
        completed = [e for e in received if isinstance(e, contract.SessionCompleted)]
        assert sorted(e.request_id for e in started) == sorted(ids)
        assert sorted(e.request_id for e in completed) == sorted(ids)
        assert {e.ev_id for e in started} == {f"EV{i}" for i in range(6)}
        assert all(e.expected_end is not None and e.expected_end >= e.at for e in started)
        assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0
    finally:
        assert service.stop() == 0


def test_a_request_delivered_twice_is_charged_once(stack_settings, broker):
    service, metrics_url = _start(stack_settings, capacity=4, session_seconds=0.5)
    try:
        events = broker.subscribe_events(contract.SessionStarted.kind)
        request_id = broker.send_to_substation(SUBSTATION)
        broker.send_to_substation(SUBSTATION, request_id=request_id)
        eventually(lambda: _duplicates(metrics_url, SUBSTATION) == 1)
        eventually(
            lambda: (
                metric(metrics_url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION)
                == 1
            )
        )
        # A duplicate arriving after completion is recognised too.
        broker.send_to_substation(SUBSTATION, request_id=request_id)
        eventually(lambda: _duplicates(metrics_url, SUBSTATION) == 2)
        time.sleep(0.7)
        assert metric(metrics_url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION) == 1
        assert [e.request_id for e in broker.events(events)] == [request_id]
        assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0
    finally:
        assert service.stop() == 0


def test_a_malformed_message_is_dead_lettered_with_its_reason_and_the_substation_carries_on(
    stack_settings, broker
):
    service, metrics_url = _start(stack_settings, capacity=2, session_seconds=0.2)
    try:
        events = broker.subscribe_events(contract.RequestDeadLettered.kind)
        broker.publish(contract.DISPATCH_EXCHANGE, SUBSTATION, b'{"request_id": 42}')
        dead = eventually(lambda: broker.get_all(contract.DEAD_LETTER_QUEUE), what="a dead letter")
        properties, body = dead[0]
        assert body == b'{"request_id": 42}'
        assert "request_id" in properties.headers[contract.REASON_HEADER]
        assert properties.headers[contract.SOURCE_HEADER] == contract.substation_queue_name(
            SUBSTATION
        )
        notice = eventually(lambda: broker.events(events))
        assert isinstance(notice[0], contract.RequestDeadLettered)

        broker.send_to_substation(SUBSTATION)
        eventually(
            lambda: (
                metric(metrics_url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION)
                == 1
            )
        )
        assert service.alive()
    finally:
        assert service.stop() == 0


def test_sigterm_returns_unfinished_sessions_to_the_queue_and_exits_zero(stack_settings, broker):
    service, metrics_url = _start(stack_settings, capacity=3, session_seconds=30)
    queue = contract.substation_queue_name(SUBSTATION)
    for _ in range(3):
        broker.send_to_substation(SUBSTATION)
    eventually(lambda: metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION) == 3)
    assert broker.message_count(queue) == 0

    started = time.monotonic()
    assert service.stop(timeout=15) == 0
    assert time.monotonic() - started < 10  # bounded: grace 0.5 s + closing

    eventually(
        lambda: broker.message_count(queue) == 3, what="the three requests back in the queue"
    )


def test_a_substation_killed_mid_session_charges_the_request_again_after_restart(
    stack_settings, broker
):
    service, metrics_url = _start(stack_settings, capacity=2, session_seconds=30)
    broker.send_to_substation(SUBSTATION, ev_id="EV-KILLED")
    eventually(lambda: metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION) == 1)
    kill(service)

    restarted, metrics_url = _start(stack_settings, capacity=2, session_seconds=0.3)
    try:
        eventually(
            lambda: (
                metric(metrics_url, contract.COMPLETED_METRIC + "_total", substation=SUBSTATION)
                == 1
            ),
            what="the unacknowledged request charged by the restarted substation",
        )
        assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0
    finally:
        assert restarted.stop() == 0


def test_a_request_forwarded_to_two_substations_is_charged_at_only_one(stack_settings, broker):
    """What a balancer that died between forwarding and acknowledging leaves behind: the
    first copy is charging at one substation, the redelivered one is flagged and goes to another."""
    stack_settings.capacity = 2
    stack_settings.session_seconds = 3
    stack_settings.substations = 2
    services = [substation_process(stack_settings, i).start() for i in range(2)]
    try:
        for service in services:
            service.wait_healthy()
        first, second = (health_url(s) for s in services)
        count = contract.COMPLETED_METRIC + "_total"

        # The first copy is already charging at substation-1 when the flagged copy reaches
        # substation-2, which holds it until substation-1 says it has completed it.
        request_id = broker.send_to_substation("substation-1")
        eventually(lambda: metric(first, contract.LOAD_METRIC, substation="substation-1") == 1)
        broker.send_to_substation("substation-2", request_id=request_id, maybe_duplicate=True)
        eventually(lambda: _duplicates(second, "substation-2") == 1)
        assert metric(second, contract.LOAD_METRIC, substation="substation-2") == 0

        # The flagged copy arrives first, nobody knows it: substation-2 charges it after asking,
        # and the unflagged first copy, reaching substation-1 later, is recognised as claimed.
        other = broker.send_to_substation("substation-2", maybe_duplicate=True)
        eventually(
            lambda: metric(second, contract.LOAD_METRIC, substation="substation-2") == 1, timeout=10
        )
        broker.send_to_substation("substation-1", request_id=other)
        eventually(lambda: _duplicates(first, "substation-1") == 1)

        eventually(lambda: metric(first, count, substation="substation-1") == 1, timeout=15)
        eventually(lambda: metric(second, count, substation="substation-2") == 1, timeout=15)
        for queue in ("substation-1", "substation-2"):
            assert broker.message_count(contract.substation_queue_name(queue)) == 0
    finally:
        for service in services:
            assert service.stop() == 0


def test_two_substations_asking_about_one_request_at_once_charge_it_once(stack_settings, broker):
    """A copy at each of two substations, both checked at once (a flagged copy at one, the
    first copy at the other, which a lookup had already made it ask about): each asked the
    other, each answered "unknown" while it was only asking, and both charged it. Here both
    copies are flagged: the same state, reached at once."""
    stack_settings.capacity = 2
    stack_settings.session_seconds = 1
    check = {"DUPLICATE_CHECK_SECONDS": "2"}
    services = _pair(stack_settings, envs=(check, check))
    try:
        urls = _start_pair(services)
        starts = broker.subscribe_events(contract.SessionStarted.kind)
        request_id = broker.send_to_substation("substation-1", maybe_duplicate=True)
        broker.send_to_substation("substation-2", request_id=request_id, maybe_duplicate=True)

        eventually(lambda: _duplicates(urls[1], "substation-2") == 1, timeout=20)
        count = contract.COMPLETED_METRIC + "_total"
        eventually(lambda: metric(urls[0], count, substation="substation-1") == 1)
        assert metric(urls[1], count, substation="substation-2") == 0
        assert _started(broker, starts) == [(request_id, "substation-1")]
        for name in ("substation-1", "substation-2"):
            assert broker.message_count(contract.substation_queue_name(name)) == 0
    finally:
        for service in services:
            assert service.stop() == 0


def test_a_copy_delivered_while_its_flagged_twin_is_asked_about_is_not_charged_beside_it(
    stack_settings, broker
):
    """A balancer whose forward went unconfirmed (its connection lost) forwards the request
    again, flagged, and may choose the same substation: the flagged copy is held while the
    fleet is asked, and the first copy, delivered meanwhile, must not start a second session."""
    stack_settings.capacity = 4
    stack_settings.session_seconds = 0.5
    service = substation_process(stack_settings, 0)
    service.env = {**service.env, "SHUTDOWN_GRACE": "0.5", "DUPLICATE_CHECK_SECONDS": "2"}
    service.start().wait_healthy()
    metrics_url = health_url(service)
    try:
        starts = broker.subscribe_events(contract.SessionStarted.kind)
        lookups = broker.subscribe_events(contract.SessionLookup.kind)
        request_id = broker.send_to_substation(SUBSTATION, maybe_duplicate=True)
        held = broker.events_of_until(lookups, contract.SessionLookup, 1)
        assert [lookup.request_id for lookup in held] == [request_id]
        broker.send_to_substation(SUBSTATION, request_id=request_id)
        eventually(lambda: _duplicates(metrics_url, SUBSTATION) == 1)
        completed = contract.COMPLETED_METRIC + "_total"
        eventually(lambda: metric(metrics_url, completed, substation=SUBSTATION) == 1, timeout=10)
        time.sleep(1)  # a second session would have started with the first, or after the check
        assert metric(metrics_url, completed, substation=SUBSTATION) == 1
        assert [e.request_id for e in broker.events_of(starts, contract.SessionStarted)] == [
            request_id
        ]
        assert broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0
    finally:
        assert service.stop() == 0


def test_a_lookup_made_while_a_substation_was_cut_off_stops_it_charging_the_first_copy(
    stack_settings, broker
):
    """The double charge a broker outage caused (CI, stop 23): a balancer's forward to
    substation-1 went unconfirmed, so it forwarded the request again, flagged, to substation-2,
    which asked the fleet while substation-1 was still reconnecting, heard nothing, and charged
    it. The lookup must wait for substation-1, so that the first copy, delivered to it once it is
    back, is recognised as charging elsewhere."""
    from tests.proxy import CuttableProxy

    stack_settings.capacity = 2
    stack_settings.session_seconds = 3
    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    services = _pair(stack_settings, first_via=proxy.url(stack_settings.amqp_url))
    try:
        first, second = _start_pair(services)
        lookups = broker.subscribe_events(contract.SessionLookup.kind)
        starts = broker.subscribe_events(contract.SessionStarted.kind)

        proxy.cut()
        eventually(
            lambda: metric(first, "substation_broker_connected", substation="substation-1") == 0
        )
        request_id = broker.send_to_substation("substation-2", maybe_duplicate=True)
        broker.events_of_until(lookups, contract.SessionLookup, 1)
        eventually(lambda: metric(second, contract.LOAD_METRIC, substation="substation-2") == 1)
        broker.send_to_substation("substation-1", request_id=request_id)  # the first copy
        proxy.start()

        eventually(
            lambda: _duplicates(first, "substation-1") == 1,
            timeout=20,
        )
        count = contract.COMPLETED_METRIC + "_total"
        eventually(lambda: metric(second, count, substation="substation-2") == 1, timeout=15)
        assert metric(first, count, substation="substation-1") == 0
        assert _started(broker, starts) == [(request_id, "substation-2")]
        assert broker.message_count(contract.substation_queue_name("substation-1")) == 0
    finally:
        for service in services:
            assert service.stop() == 0
        proxy.cut()


def test_a_substation_that_said_running_and_then_misses_a_round_is_asked_again_not_overruled(
    stack_settings, broker
):
    """substation-1 charges a request, substation-2 holds a flagged copy and hears "running".
    substation-1 completes it, then is cut off from the broker for two of substation-2's rounds
    of questions: silence from a substation still on the roster is no answer, so substation-2
    asks again until substation-1, back, says completed. It used to charge the copy at the
    first silent round."""
    from tests.proxy import CuttableProxy

    stack_settings.capacity = 2
    stack_settings.session_seconds = 2
    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    services = _pair(
        stack_settings,
        first_via=proxy.url(stack_settings.amqp_url),
        envs=({}, {"DUPLICATE_CHECK_SECONDS": "3"}),
    )
    try:
        first, second = _start_pair(services)
        starts = broker.subscribe_events(contract.SessionStarted.kind)
        replies = broker.subscribe_events(contract.SessionLookupReply.kind)
        completions = broker.subscribe_events(contract.SessionCompleted.kind)

        request_id = broker.send_to_substation("substation-1")
        eventually(lambda: metric(first, contract.LOAD_METRIC, substation="substation-1") == 1)
        broker.send_to_substation("substation-2", request_id=request_id, maybe_duplicate=True)
        broker.events_until(
            replies,
            lambda seen: any(
                isinstance(r, contract.SessionLookupReply) and r.status == "running" for r in seen
            ),
        )
        (completed,) = broker.events_of_until(completions, contract.SessionCompleted, 1)
        proxy.cut()
        assert completed.substation == "substation-1"
        time.sleep(7)  # two of substation-2's rounds without an answer
        assert metric(second, contract.LOAD_METRIC, substation="substation-2") == 0
        proxy.start()

        eventually(lambda: _duplicates(second, "substation-2") == 1, timeout=30)
        count = contract.COMPLETED_METRIC + "_total"
        assert metric(second, count, substation="substation-2") == 0
        assert _started(broker, starts) == [(request_id, "substation-1")]
    finally:
        for service in services:
            assert service.stop() == 0
        proxy.cut()


def test_a_substation_asked_by_a_lower_id_while_it_checks_leaves_the_request_to_it(
    stack_settings, broker
):
    """substation-2 holds a flagged copy and asks; substation-1, not holding one yet, answers
    "unknown". Then substation-1 gets a copy too and asks, while substation-2 still waits for
    its answers: substation-2 (the higher id) answers "unknown" and must leave the request to
    substation-1 rather than charge it at the end of its round, as both did."""
    stack_settings.capacity = 2
    stack_settings.session_seconds = 1
    services = _pair(
        stack_settings, envs=({"DUPLICATE_CHECK_SECONDS": "1"}, {"DUPLICATE_CHECK_SECONDS": "3"})
    )
    try:
        first, second = _start_pair(services)
        starts = broker.subscribe_events(contract.SessionStarted.kind)
        lookups = broker.subscribe_events(contract.SessionLookup.kind)
        request_id = broker.send_to_substation("substation-2", maybe_duplicate=True)
        (asked,) = broker.events_of_until(lookups, contract.SessionLookup, 1)
        assert asked.substation == "substation-2"
        broker.send_to_substation("substation-1", request_id=request_id, maybe_duplicate=True)

        eventually(lambda: _duplicates(second, "substation-2") == 1, timeout=20)
        count = contract.COMPLETED_METRIC + "_total"
        assert metric(first, count, substation="substation-1") == 1
        assert metric(second, count, substation="substation-2") == 0
        assert _started(broker, starts) == [(request_id, "substation-1")]
    finally:
        for service in services:
            assert service.stop() == 0


def test_a_standby_does_not_answer_for_its_substation(stack_settings, broker, tmp_path):
    """substation-1 charges a request and has a standby (a second process with its id);
    substation-2 holds a flagged copy and asks every second. Only the process that holds the
    queue answers: the standby's "unknown", heard after the active one's "running", told
    substation-2 the session had ended, and it charged its copy."""
    stack_settings.capacity = 2
    stack_settings.session_seconds = 5
    services = _pair(stack_settings)
    standby = substation_process(
        dataclasses.replace(
            stack_settings,
            substation_ports=(stack_settings.substation_ports[2],),
            log_dir=tmp_path / "standby",
        ),
        0,
    )
    standby.env = {**standby.env, "ANNOUNCE_INTERVAL": "10"}
    try:
        # The standby starts between the two: it hears substation-2 announce itself, so it
        # would trust (and answer) its lookups.
        services[0].start().wait_healthy()
        first = health_url(services[0])
        eventually(lambda: _consuming(first, "substation-1"))
        standby.start().wait_healthy()
        assert metric(health_url(standby), contract.CONSUMING_METRIC, substation=SUBSTATION) == 0
        services[1].start().wait_healthy()
        second = health_url(services[1])
        eventually(lambda: _consuming(second, "substation-2"))
        time.sleep(1)
        starts = broker.subscribe_events(contract.SessionStarted.kind)
        replies = broker.subscribe_events(contract.SessionLookupReply.kind)

        request_id = broker.send_to_substation("substation-1")
        eventually(lambda: metric(first, contract.LOAD_METRIC, substation="substation-1") == 1)
        broker.send_to_substation("substation-2", request_id=request_id, maybe_duplicate=True)

        eventually(lambda: _duplicates(second, "substation-2") == 1, timeout=20)
        count = contract.COMPLETED_METRIC + "_total"
        assert metric(second, count, substation="substation-2") == 0
        assert _started(broker, starts) == [(request_id, "substation-1")]
        answers = broker.events_of(replies, contract.SessionLookupReply)
        assert len(answers) >= 3  # asked every second while the 5 s session ran
        assert {a.status for a in answers} == {"running", "completed"}
    finally:
        assert standby.stop() == 0
        for service in services:
            assert service.stop() == 0


def test_a_second_process_with_the_same_id_waits_as_a_standby_and_never_charges_beside_it(
    stack_settings, broker, tmp_path
):
    """Two processes started with one SUBSTATION_ID: the second finds the queue consumed and
    waits (and the queue's single active consumer would keep it idle anyway); it takes over
    only once the first is gone. At no moment do more sessions run than one has points, and no
    request the first completed runs again."""
    first, first_url = _start(stack_settings, capacity=2, session_seconds=1.0)
    second, second_url = _start_second(stack_settings, tmp_path)
    try:
        events = broker.subscribe_events(
            contract.SessionStarted.kind, contract.SessionCompleted.kind
        )
        ids = [broker.send_to_substation(SUBSTATION, ev_id=f"EV{i}") for i in range(4)]
        loads = []
        for _ in range(40):  # four sessions of one second on two points: two rounds
            loads.append(
                sum(
                    metric(url, contract.LOAD_METRIC, substation=SUBSTATION) or 0
                    for url in (first_url, second_url)
                )
            )
            time.sleep(0.05)
        completed = contract.COMPLETED_METRIC + "_total"
        eventually(lambda: metric(first_url, completed, substation=SUBSTATION) == 4)
        assert max(loads) <= 2
        assert metric(second_url, completed, substation=SUBSTATION) == 0
        assert "waiting as a standby" in second.log_tail(50)
        # Its completions on the bus (so in the history) before it dies, its acks maybe not: a
        # completion a killed process never published is known to nobody, and its request runs
        # again, as after a kill mid-session.
        seen = broker.events_until(
            events, lambda new: _count(new, contract.SessionCompleted) >= len(ids)
        )

        kill(first)
        more = [broker.send_to_substation(SUBSTATION, ev_id=f"EV{i}") for i in range(4, 6)]
        eventually(
            lambda: metric(second_url, completed, substation=SUBSTATION) == 2,
            timeout=30,
            what="the standby taking over once the first is gone",
        )
        seen += broker.events_until(
            events, lambda new: _count(seen + new, contract.SessionStarted) >= len(ids + more)
        )
        started = [e.request_id for e in seen if isinstance(e, contract.SessionStarted)]
        assert sorted(started) == sorted(ids + more)
    finally:
        first.stop()
        assert second.stop() == 0


def test_a_session_completed_by_a_killed_process_is_not_charged_again_by_the_next(
    stack_settings, broker
):
    """A substation killed after its session.completed reached the broker and before its ack:
    the request goes back to the queue, and the next process of the substation reads the
    completion in the history before it takes the queue, so the redelivery is a duplicate."""
    broker.declare(
        contract.history_topology(
            max_age_seconds=contract.HISTORY_MAX_AGE_SECONDS, max_bytes=contract.HISTORY_MAX_BYTES
        )
        + contract.substation_topology(SUBSTATION)
    )
    done = broker.send_to_substation(SUBSTATION, ev_id="EV1")
    _completed_by_a_killed_process(broker, done, "EV1", "killed-process")
    other = broker.send_to_substation(SUBSTATION, ev_id="EV2")
    events = broker.subscribe_events(contract.SessionStarted.kind)
    service, metrics_url = _start(stack_settings, capacity=2, session_seconds=60.0)
    try:
        eventually(lambda: broker.message_count(contract.substation_queue_name(SUBSTATION)) == 0)
        eventually(lambda: _duplicates(metrics_url, SUBSTATION) == 1)
        (started,) = broker.events_until(events, lambda seen: len(seen) >= 1)
        assert isinstance(started, contract.SessionStarted) and started.request_id == other
        assert metric(metrics_url, contract.LOAD_METRIC, substation=SUBSTATION) == 1
    finally:
        assert service.stop() == 0


def test_a_standby_reads_what_the_process_it_replaces_ended_before_it_takes_the_queue(
    stack_settings, broker, tmp_path
):
    """Two processes of one substation: the first holds the queue and a request, ends its
    session (its session.completed reaches the history) and is killed before its ack. The
    second, standing by since long after its own replay, reads the history again once the
    queue is free and before it takes it, so the redelivered request is a duplicate, not a
    second session."""
    first, _first_url = _start(stack_settings, capacity=2, session_seconds=60.0)
    second, second_url = _start_second(stack_settings, tmp_path)
    queue = contract.substation_queue_name(SUBSTATION)
    try:
        eventually(lambda: "waiting as a standby" in second.log_tail(50))
        # Its replay over (its reader's channel closed), it hears of no completion until then.
        eventually(lambda: f"{contract.HISTORY_STREAM}: replay done" in second.log_tail(50))
        # Frozen, the first process holds what the broker hands it, unacknowledged.
        first.signal(signal.SIGSTOP)
        events = broker.subscribe_events(contract.SessionStarted.kind)
        done = broker.send_to_substation(SUBSTATION, ev_id="EV1")
        eventually(lambda: broker.message_count(queue) == 0, what="delivered to the first")
        _completed_by_a_killed_process(broker, done, "EV1", "the-first-process")
        kill(first)
        eventually(
            lambda: _duplicates(second_url, SUBSTATION) == 1,
            timeout=30,
            what="the redelivery taken for the duplicate it is",
        )
        other = broker.send_to_substation(SUBSTATION, ev_id="EV2")
        (started,) = broker.events_until(events, lambda seen: len(seen) >= 1)
        assert isinstance(started, contract.SessionStarted) and started.request_id == other
        assert metric(second_url, contract.LOAD_METRIC, substation=SUBSTATION) == 1
    finally:
        first.signal(signal.SIGCONT)
        first.stop()
        assert second.stop() == 0
