"""Polls every substation's /metrics on a thread of its own and hands the readings over.

The HTTP requests run here, never on the AMQP I/O thread and never under a lock; the finished
batch is passed to the I/O thread in one call, which swaps it into the fleet.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from balancer.readings import InvalidReading, parse_reading
from smartgrid import contract

log = logging.getLogger(__name__)

#: (substation, reading or None, error message or None)
PollResult = tuple[str, contract.SubstationReading | None, str | None]


def fetch_reading(substation: str, url: str, timeout: float) -> PollResult:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(4 * 1024 * 1024).decode("utf-8", errors="replace")
        return substation, parse_reading(text, substation), None
    except InvalidReading as exc:
        return substation, None, str(exc)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return substation, None, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


class Poller:
    def __init__(
        self,
        *,
        targets: Callable[[], tuple[tuple[str, str], ...]],
        deliver: Callable[[list[PollResult]], None],
        interval: float,
        timeout: float,
        max_parallel: int = 16,
    ) -> None:
        self._targets = targets
        self._deliver = deliver
        self._interval = interval
        self._timeout = timeout
        self._wake = threading.Event()
        self._stopping = False
        self._soon = False
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="poll")
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poll_soon(self) -> None:
        """Poll shortly (a new substation announced itself) instead of at the next tick.

        The short delay gathers a burst of announcements (a fleet starting) into one poll,
        so that the first readings arrive together rather than one substation at a time.
        """
        self._soon = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(self._timeout + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def poll_once(self) -> list[PollResult]:
        targets = self._targets()
        futures = [self._pool.submit(fetch_reading, s, url, self._timeout) for s, url in targets]
        return [f.result() for f in futures]

    def _run(self) -> None:
        next_poll = time.monotonic()
        while not self._stopping:
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            if self._stopping:
                break
            if self._soon:
                self._soon = False
                time.sleep(0.1)
            next_poll = time.monotonic() + self._interval
            try:
                results = self.poll_once()
            except Exception:  # pragma: no cover - keep polling whatever happens
                log.exception("poll failed")
                continue
            if results:
                self._deliver(results)
