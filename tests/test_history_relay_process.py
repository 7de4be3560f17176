"""One reader of the history stream per gateway host, as processes: a gateway of two workers
elects one to read the stream and relay it to the other; when that one is killed (SIGKILL:
no clean-up), the other reads the stream at once, takes over the relay, and every worker
goes on answering GET with what happened meanwhile."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
from pathlib import Path

from gateway.relay import READING_MODES, READS_FOR_OTHERS, RELAYED_FROM
from smartgrid import contract
from smartgrid.log_lines import pattern
from stack.local import StackSettings, gateway_process
from tests.helpers import BrokerClient, eventually, metric, sample_key, scrape
from tests.test_gateway_history import _call

#: The first group of each is the worker's pid.
_READS = pattern(READS_FOR_OTHERS)
_RELAYED = pattern(RELAYED_FROM)


def _pids(log: Path, line: re.Pattern[str]) -> set[int]:
    """The workers that logged ``line`` (a worker that fell back from the relay on a loaded
    machine and was relayed to again logs it twice)."""
    text = log.read_text() if log.exists() else ""
    return {int(found.group(1)) for found in line.finditer(text)}


def _workers_reading(base: str) -> dict[str, float | None]:
    """How many of the gateway's workers read the history each way (/metrics)."""
    samples = scrape(f"{base}/metrics")
    return {
        mode: samples.get(sample_key("gateway_history_reading", mode=mode))
        for mode in READING_MODES
    }


def _post(base: str, ev_id: str) -> str:
    """A request accepted by whichever worker answers (one that is still replaying the
    history after a restart answers 503)."""
    found: list[str] = []

    def accepted() -> bool:
        status, answer, _ = _call(f"{base}/charge", "POST", {"ev_id": ev_id})
        if status == 202:
            found.append(answer["request_id"])
        return bool(found)

    eventually(accepted, timeout=30, what=f"a 202 for {ev_id}")
    return found[0]


def _every_worker_says(base: str, request_id: str, status: str) -> None:
    """Asked over new connections, so that both workers answer (granian's workers share the
    listening socket), until eight answers in a row say ``status``. A worker that does not say
    it yet is asked again: what changed it is still on its way to that worker (read from the
    stream, or relayed), or the worker is still replaying (503). Only a worker that never
    says it fails, with its last answer."""
    last: list[tuple[int, dict]] = []

    def answers() -> bool:
        for _ in range(8):
            code, record, _ = _call(f"{base}/charge/{request_id}")
            if (code, record.get("status")) != (200, status):
                last[:] = [(code, record)]
                return False
        return True

    try:
        eventually(answers, timeout=30, what=f"{request_id} {status} at every worker")
    except AssertionError as failure:
        raise AssertionError(f"{failure}; the last answer: {last}") from None


def test_the_reader_killed_another_worker_reads_on_and_get_keeps_answering(
    stack_settings: StackSettings,
):
    settings = dataclasses.replace(stack_settings, gateway_workers=2)
    base = settings.gateway_url
    log = settings.log_dir / "gateway.log"
    gateway = gateway_process(settings).start()
    observer = BrokerClient(settings.amqp_url)
    try:
        gateway.wait_healthy(60)
        eventually(
            lambda: _pids(log, _READS) and _pids(log, _RELAYED),
            timeout=20,
            what="one worker reading the history, the other relayed to",
        )
        (reader,) = _pids(log, _READS)
        (relayed,) = _pids(log, _RELAYED)
        assert reader != relayed
        one_reads_for_the_other = {"stream": 0.0, "relay": 1.0, "relayed": 1.0}
        eventually(
            lambda: _workers_reading(base) == one_reads_for_the_other,
            what="/metrics showing one worker reading for the other",
        )

        before = _post(base, "EV-BEFORE")
        observer.publish_event(contract.RequestRouted(time.time(), before, "EV-BEFORE", "S1", "b"))
        _every_worker_says(base, before, "routed")

        os.kill(reader, signal.SIGKILL)
        # What happens meanwhile: a routing of a request accepted before, a new request.
        meanwhile = _post(base, "EV-MEANWHILE")
        routed_later = _post(base, "EV-ROUTED-LATER")
        observer.publish_event(
            contract.RequestRouted(time.time(), routed_later, "EV-ROUTED-LATER", "S2", "b")
        )
        eventually(
            lambda: relayed in _pids(log, _READS),
            timeout=20,
            what="the relayed worker reading the history for the others",
        )
        _every_worker_says(base, meanwhile, "queued")
        _every_worker_says(base, routed_later, "routed")
        _every_worker_says(base, before, "routed")
        # The worker started in the killed one's place replays, then is relayed to.
        eventually(
            lambda: _pids(log, _RELAYED) - {reader, relayed},
            timeout=30,
            what="the restarted worker relayed to",
        )
        # The killed worker's gauge is gone; the survivor's fallback is counted.
        eventually(
            lambda: _workers_reading(base) == one_reads_for_the_other,
            what="/metrics showing the new reader and the restarted worker",
        )
        fallbacks = metric(
            f"{base}/metrics", "gateway_history_relay_fallbacks_total", cause="relay_connection"
        )
        assert fallbacks is not None and fallbacks >= 1
    finally:
        observer.close()
        gateway.stop()
