"""The balancer's poller against real HTTP servers on loopback, some of them hostile.

Good targets serve a real substation page. The others answer with headers and then one byte
a second, send the status line one byte a second, accept and never answer, redirect to
``file://``, or serve a page of many megabytes. A fetch ends by its deadline whatever the
target does, only allowed URLs are fetched, and the good targets stay fresh beside the bad.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from balancer.poller import (
    DEFAULT_METRICS_HOSTS,
    MAX_PAGE_BYTES,
    FetchFailed,
    Poller,
    PollerCollector,
    PollResult,
    TargetRefused,
    check_target,
    fetch_page,
    fetch_reading,
)
from substation.charging import ChargingPoints, ChargingPointsCollector

ALLOWED = ("127.0.0.1", "localhost")


def substation_page(substation: str) -> bytes:
    registry = CollectorRegistry()
    registry.register(ChargingPointsCollector(ChargingPoints(substation, 4, "inst-1")))
    return generate_latest(registry)


Behaviour = Callable[[socket.socket, str], None]


def _read_request(conn: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    first = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return first.split(" ")[1] if " " in first else ""


def serve_page(conn: socket.socket, substation: str) -> None:
    body = substation_page(substation)
    conn.sendall(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


def trickle_body(conn: socket.socket, substation: str) -> None:
    body = substation_page(substation)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    for byte in body:
        conn.sendall(bytes([byte]))
        time.sleep(1)


def trickle_headers(conn: socket.socket, _substation: str) -> None:
    for byte in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"a" * 1000:
        conn.sendall(bytes([byte]))
        time.sleep(1)


def hang(conn: socket.socket, _substation: str) -> None:
    time.sleep(60)


def redirect_to_file(conn: socket.socket, _substation: str) -> None:
    conn.sendall(b"HTTP/1.0 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n")


def huge_page(conn: socket.socket, _substation: str) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")  # no length: read to the end
    block = b"# " + b"x" * 65_533 + b"\n"
    try:
        for _ in range(4 * MAX_PAGE_BYTES // len(block)):
            conn.sendall(block)
    except OSError:
        pass


class Target:
    """A loopback HTTP server with one behaviour, each connection on a thread of its own."""

    def __init__(self, behaviour: Behaviour, substation: str = "s1") -> None:
        self.behaviour = behaviour
        self.substation = substation
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                _read_request(conn)
                self.behaviour(conn, self.substation)
            except OSError:
                pass  # the poller gave up and closed: what these targets are for

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture
def targets() -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(behaviour: Behaviour, substation: str = "s1") -> Target:
        started.append(Target(behaviour, substation))
        return started[-1]

    yield start
    for target in started:
        target.close()


# ------------------------------------------------------------------------------ one fetch
def test_a_good_target_is_read(targets):
    target = targets(serve_page, "s1")
    substation, reading, error = fetch_reading("s1", target.url, 2.0, ALLOWED)
    assert error is None and reading is not None and reading.capacity == 4


@pytest.mark.parametrize("behaviour", [trickle_body, trickle_headers, hang])
def test_a_fetch_ends_by_its_deadline_however_the_target_trickles(targets, behaviour):
    target = targets(behaviour)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="no complete answer within 1s"):
        fetch_page(target.url, timeout=1.0, allowed_hosts=ALLOWED)
    # The trickling targets would take minutes; the deadline is one second.
    assert time.monotonic() - started < 5


def test_a_redirect_is_not_followed(targets):
    target = targets(redirect_to_file)
    with pytest.raises(FetchFailed, match="HTTP 302"):
        fetch_page(target.url, timeout=2.0, allowed_hosts=ALLOWED)


def test_a_huge_page_is_refused(targets):
    target = targets(huge_page)
    with pytest.raises(FetchFailed, match="larger than"):
        fetch_page(target.url, timeout=10.0, allowed_hosts=ALLOWED)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("data:text/plain,substation_capacity 1000", "scheme 'data'"),
        ("ftp://127.0.0.1/metrics", "scheme 'ftp'"),
        ("http://127.0.0.1:9999/internal-admin", "does not end in /metrics"),
        ("http://127.0.0.1:9999/metrics?x=1", "query"),
        ("http://user:pw@127.0.0.1/metrics", "credentials"),
        ("http://169.254.169.254/metrics", "not in METRICS_HOSTS"),
        ("http://rabbitmq:15672/metrics", "not in METRICS_HOSTS"),
        ("http://127.0.0.1:notaport/metrics", "unparsable"),
        ("http:///metrics", "no host"),
    ],
)
def test_only_allowed_urls_are_fetched(url, reason):
    with pytest.raises(TargetRefused, match=reason):
        check_target(url, ALLOWED)
    _substation, reading, error = fetch_reading("s1", url, 1.0, ALLOWED)
    assert reading is None and error is not None and reason in error


def test_host_patterns_match_as_configured():
    assert check_target("https://substation-12:9401/metrics", ("substation-*",))[1:3] == (
        "substation-12",
        9401,
    )
    assert check_target("http://SUBSTATION-1/x/metrics", ("substation-*",))[1] == "substation-1"
    with pytest.raises(TargetRefused):
        check_target("http://substation.evil/metrics", ("substation-*",))
    assert check_target("http://0123456789ab:9401/metrics", DEFAULT_METRICS_HOSTS)
    for refused in ("http://0123456789abc:9401/metrics", "http://rabbitmq:15672/metrics"):
        with pytest.raises(TargetRefused):
            check_target(refused, DEFAULT_METRICS_HOSTS)


# ------------------------------------------------------------------------------ the poller
Readings = dict[str, list[float]]
Failures = dict[str, list[tuple[float, str]]]


def _run_poller(
    targets_list: list[tuple[str, str]],
    *,
    interval: float,
    timeout: float,
    seconds: float,
    max_parallel: int = 16,
    until: Callable[[Readings, Failures], bool] | None = None,
) -> tuple[Readings, dict[str, list[str]], list[bool], Failures]:
    """Poll for ``seconds``, or until ``until(readings, errors)`` holds (checked as results
    come in). Readings are their arrival times; errors are (arrival time, message)."""
    readings: Readings = defaultdict(list)
    failures: Failures = defaultdict(list)
    lock = threading.Lock()
    done = threading.Event()

    def deliver(results: list[PollResult]) -> None:
        with lock:
            for substation, reading, error in results:
                if reading is not None:
                    readings[substation].append(time.monotonic())
                else:
                    assert error is not None, substation  # no reading: it says why
                    failures[substation].append((time.monotonic(), error))
            if until is not None and until(readings, failures):
                done.set()

    poller = Poller(
        targets=lambda: tuple(targets_list),
        deliver=deliver,
        interval=interval,
        timeout=timeout,
        allowed_hosts=ALLOWED,
        max_parallel=max_parallel,
    )
    poller.start()
    lags: list[bool] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not done.is_set():
            time.sleep(0.1)
            lags.append(poller.keeping_up())
    finally:
        poller.stop()
    errors = {s: [message for _, message in f] for s, f in failures.items()}
    return readings, defaultdict(list, errors), lags, failures


def test_slow_and_hostile_targets_make_only_themselves_stale(targets):
    good = [targets(serve_page, f"good{i}") for i in range(3)]
    bad = {
        "trickle": targets(trickle_body, "trickle"),
        "headers": targets(trickle_headers, "headers"),
        "hang": targets(hang, "hang"),
        "redirect": targets(redirect_to_file, "redirect"),
        "huge": targets(huge_page, "huge"),
    }
    listed = [(t.substation, t.url) for t in good] + [(s, t.url) for s, t in bad.items()]
    listed.append(("phantom", "data:text/plain,substation_capacity 1000"))
    stalling = ("trickle", "headers", "hang")
    # Each stalling target holds its poll for the whole deadline, long next to a good answer
    # (milliseconds); the good ones must be read again and again meanwhile. No timing is
    # asserted: only what happened before the first stalled poll gave up (bench/ times it).
    readings, errors, _, failures = _run_poller(
        listed,
        interval=0.2,
        timeout=4.0,
        seconds=120,
        until=lambda r, f: (
            all(f[s] for s in [*bad, "phantom"]) and all(len(r[t.substation]) >= 3 for t in good)
        ),
    )
    first_stall_over = min(failures[s][0][0] for s in stalling)
    for target in good:
        before = [t for t in readings[target.substation] if t < first_stall_over]
        assert len(before) >= 2, (target.substation, readings[target.substation])
        assert not errors[target.substation]
    for substation in [*bad, "phantom"]:
        assert not readings[substation], substation
        assert errors[substation], substation
    assert any("no complete answer" in e for e in errors["trickle"] + errors["hang"])
    assert all("not http or https" in e for e in errors["phantom"])


def test_the_poller_says_when_it_cannot_keep_up(targets):
    hanging = [targets(hang, f"hang{i}") for i in range(4)]
    listed = [(t.substation, t.url) for t in hanging]
    # One thread for four targets that each take the whole one-second deadline, every 0.2 s.
    readings, errors, keeping_up, _ = _run_poller(
        listed, interval=0.2, timeout=1.0, seconds=4, max_parallel=1
    )
    assert not any(keeping_up[-10:]), keeping_up


def test_the_lag_is_a_metric(targets):
    target = targets(serve_page, "s1")
    poller = Poller(
        targets=lambda: (("s1", target.url),),
        deliver=lambda results: None,
        # An interval long next to any scheduling delay: "keeping up" must not depend on
        # how busy the machine is.
        interval=5.0,
        timeout=0.5,
        allowed_hosts=ALLOWED,
    )
    registry = CollectorRegistry()
    registry.register(PollerCollector(poller))
    poller.start()
    try:
        time.sleep(0.5)
        page = generate_latest(registry).decode()
    finally:
        poller.stop()
    assert "balancer_polling_keeping_up 1.0" in page
    assert "balancer_poll_lag_seconds " in page
