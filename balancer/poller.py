"""Polls every substation's /metrics on its own schedule, so no target can stall the others.

A metrics URL comes from a substation's announcement, which anyone who may publish it could
forge; and a target may be slow, hung or hostile. So:

* only ``http``/``https`` URLs on hosts the configuration allows (``METRICS_HOSTS``), with a
  path ending in ``/metrics`` and no query, are fetched; redirects are not followed;
* each fetch has one deadline, from connecting to the last byte, however the target trickles
  its answer (a read timeout alone bounds each read, so one byte a second would keep a fetch
  alive forever); only the name lookup is not bounded by it;
* a page larger than :data:`MAX_PAGE_BYTES` is refused;
* each target is polled on a schedule of its own (every ``interval``), on a pool of threads:
  a target that runs into its deadline is late by that deadline only, and only itself.

The HTTP requests run here, never on the AMQP I/O thread and never under a lock; finished
readings are handed to ``deliver`` in batches, from this thread. :meth:`Poller.lag` says how
far behind its schedule polling is, for the balancer's metrics and health.
"""

from __future__ import annotations

import fnmatch
import functools
import http.client
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from prometheus_client.core import GaugeMetricFamily

from balancer.readings import InvalidReading, parse_reading
from smartgrid import contract

log = logging.getLogger(__name__)

#: (substation, reading or None, error message or None)
PollResult = tuple[str, contract.SubstationReading | None, str | None]

#: A substation's page is a few kilobytes; anything much larger is not one.
MAX_PAGE_BYTES = 1024 * 1024

#: Hosts a metrics URL may name by default: this machine (``make run``, the tests), the
#: compose stack's named substations, and its scale-out ones, which advertise their container's
#: host name (Docker's are 12 hex digits).
DEFAULT_METRICS_HOSTS = ("localhost", "127.0.0.1", "::1", "substation-*", "[0-9a-f]" * 12)

#: New targets wait this long before their first poll, so that a fleet announcing itself at
#: once is read in one batch rather than one substation at a time.
GATHER = 0.1


class TargetRefused(ValueError):
    """A metrics URL the balancer will not fetch."""


class FetchFailed(Exception):
    """A fetch that did not produce a page."""


def check_target(url: str, allowed_hosts: Sequence[str]) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, path) of a metrics URL the balancer may fetch; else TargetRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"unparsable metrics URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused(f"metrics URL scheme {parts.scheme!r} is not http or https")
    host = (parts.hostname or "").lower()
    if not host:
        raise TargetRefused("metrics URL has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("metrics URL carries credentials")
    if parts.query or parts.fragment:
        raise TargetRefused("metrics URL has a query or a fragment")
    if not parts.path.endswith("/metrics"):
        raise TargetRefused(f"metrics URL path {parts.path[:80]!r} does not end in /metrics")
    if not any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allowed_hosts):
        raise TargetRefused(f"metrics host {host!r} is not in METRICS_HOSTS")
    return parts.scheme, host, port, parts.path


class _Received:
    """What :class:`http.client.HTTPResponse` reads a response from: bytes already received."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, _mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def fetch_page(url: str, *, timeout: float, allowed_hosts: Sequence[str]) -> str:
    """The page at ``url``, read within ``timeout`` seconds in all; FetchFailed otherwise.

    The whole answer is received first, every wait bounded by the time left, and parsed once
    complete: http.client reading from the socket itself bounds each read only, and reads a
    header line up to 64 KiB one trickled byte after another.
    """
    scheme, host, port, path = check_target(url, allowed_hosts)
    deadline = time.monotonic() + timeout

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed(f"no complete answer within {timeout:g}s")
        return left

    default_port = 443 if scheme == "https" else 80
    authority = host if port in (None, default_port) else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal
        authority = f"[{host}]" if port in (None, default_port) else f"[{host}]:{port}"
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\n"
        "User-Agent: smartgrid-balancer\r\n\r\n"
    ).encode()
    received = bytearray()
    try:
        sock = socket.create_connection((host, port or default_port), timeout=time_left())
        try:
            if scheme == "https":
                # Each call on a socket with a timeout is bounded by it as a whole (handshake
                # included), so each step below waits at most the time left.
                sock.settimeout(time_left())
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.settimeout(time_left())
            sock.sendall(request)
            # HTTP/1.0: the answer ends when the target closes the connection.
            while True:
                sock.settimeout(time_left())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if len(received) > MAX_PAGE_BYTES + 65536:
                    raise FetchFailed(f"page is larger than {MAX_PAGE_BYTES} bytes")
        finally:
            sock.close()
    except TimeoutError:
        raise FetchFailed(f"no complete answer within {timeout:g}s") from None
    except OSError as exc:
        raise FetchFailed(f"{type(exc).__name__}: {exc}") from None
    response = http.client.HTTPResponse(_Received(bytes(received)))  # type: ignore[arg-type]
    try:
        response.begin()
        if response.status != 200:
            raise FetchFailed(f"HTTP {response.status} {response.reason[:80]}")
        body = response.read()
    except http.client.HTTPException as exc:
        raise FetchFailed(f"invalid HTTP answer: {type(exc).__name__}: {exc}"[:200]) from None
    if len(body) > MAX_PAGE_BYTES:
        raise FetchFailed(f"page is larger than {MAX_PAGE_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


def fetch_reading(
    substation: str,
    url: str,
    timeout: float,
    allowed_hosts: Sequence[str] = DEFAULT_METRICS_HOSTS,
) -> PollResult:
    try:
        text = fetch_page(url, timeout=timeout, allowed_hosts=allowed_hosts)
        return substation, parse_reading(text, substation), None
    except (TargetRefused, FetchFailed, InvalidReading) as exc:
        return substation, None, str(exc)


class Poller:
    """Polls each target every ``interval`` seconds, each on its own schedule."""

    def __init__(
        self,
        *,
        targets: Callable[[], tuple[tuple[str, str], ...]],
        deliver: Callable[[list[PollResult]], None],
        interval: float,
        timeout: float,
        allowed_hosts: Iterable[str] = DEFAULT_METRICS_HOSTS,
        max_parallel: int = 16,
    ) -> None:
        self._targets = targets
        self._deliver = deliver
        self._interval = interval
        self._timeout = timeout
        self._allowed_hosts = tuple(allowed_hosts)
        self._wake = threading.Event()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="poll")
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._lock = threading.Lock()
        # Under the lock: shared with the pool's threads and with lag() callers.
        self._finished: list[PollResult] = []
        self._due: dict[str, float] = {}  # target -> when its next poll should start
        self._busy: dict[str, float] = {}  # target -> when its poll in flight started
        self._loop_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def poll_soon(self) -> None:
        """Look for new targets now (a substation announced itself), not at the next tick."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(self._timeout + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def poll_once(self) -> list[PollResult]:
        """Poll every target now and wait for all of them (within the deadline of each)."""
        futures = [
            self._pool.submit(fetch_reading, s, url, self._timeout, self._allowed_hosts)
            for s, url in self._targets()
        ]
        return [f.result() for f in futures]

    def lag(self) -> float:
        """Seconds by which polling is behind its schedule: how long the most overdue target
        has waited past its due time for a poll to start, or the poller's own loop for its
        next turn. 0 while every target is polled on time."""
        now = time.monotonic()
        with self._lock:
            overdue = [now - due for s, due in self._due.items() if s not in self._busy]
            # A poll in flight beyond its deadline (the watchdog failed to end it) is lag too.
            overdue += [now - started - self._timeout for started in self._busy.values()]
            loop_late = now - self._loop_at - max(self._interval, GATHER)
        return max([0.0, loop_late, *overdue])

    def keeping_up(self) -> bool:
        """Whether every target is polled within one interval of its schedule."""
        return self._thread.is_alive() and self.lag() < self._interval

    # ------------------------------------------------------------------ poller thread
    def _run(self) -> None:
        while not self._stopping:
            try:
                next_due = self._turn()
            except Exception:  # pragma: no cover - keep polling whatever happens
                log.exception("poll scheduling failed")
                next_due = time.monotonic() + self._interval
            self._wake.wait(
                max(0.0, min(next_due, time.monotonic() + self._interval) - time.monotonic())
            )
            self._wake.clear()

    def _turn(self) -> float:
        """Deliver what finished, start what is due; returns when the next poll is due."""
        now = time.monotonic()
        targets = dict(self._targets())
        with self._lock:
            self._loop_at = now
            finished, self._finished = self._finished, []
            for gone in self._due.keys() - targets.keys():
                del self._due[gone]
            for new in targets.keys() - self._due.keys():
                self._due[new] = now + GATHER
            starting = [s for s, due in self._due.items() if due <= now and s not in self._busy]
            for substation in starting:
                self._busy[substation] = now
                # On schedule rather than "interval after the last one": a slow answer does
                # not push every later poll back.
                self._due[substation] = max(self._due[substation] + self._interval, now)
            next_due = min(
                (due for s, due in self._due.items() if s not in self._busy),
                default=now + self._interval,
            )
        for substation in starting:
            future = self._pool.submit(
                fetch_reading, substation, targets[substation], self._timeout, self._allowed_hosts
            )
            future.add_done_callback(functools.partial(self._done, substation))
        # Only readings of targets still polled: one removed meanwhile is no longer wanted.
        finished = [r for r in finished if r[0] in targets]
        if finished:
            self._deliver(finished)
        return next_due

    def _done(self, substation: str, future) -> None:
        if future.cancelled():
            return
        error = future.exception()  # fetch_reading returns its errors; this is a bug
        result = future.result() if error is None else (substation, None, f"poll failed: {error}")
        with self._lock:
            self._busy.pop(substation, None)
            self._finished.append(result)
        self._wake.set()


class PollerCollector:
    """``balancer_poll_lag_seconds`` and ``balancer_polling_keeping_up`` for a registry."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller

    def collect(self):
        yield GaugeMetricFamily(
            "balancer_poll_lag_seconds",
            "How far polling of substations' /metrics is behind its schedule",
            value=self._poller.lag(),
        )
        yield GaugeMetricFamily(
            "balancer_polling_keeping_up",
            "1 while every substation is polled within one interval of its schedule",
            value=1 if self._poller.keeping_up() else 0,
        )
