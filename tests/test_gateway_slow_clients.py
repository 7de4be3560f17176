"""The gateway's HTTP server against slow and oversized clients, over real sockets on loopback,
against a real gateway process (granian, two workers) and the real broker.

Slow clients must not hold what other clients need: 200 connections that stall in their headers
or in their body leave /health and POST /charge answering. The timeouts are long in that test
so that the slow connections stay open while the others are served; the test of the timeouts
themselves makes them short. Under the previous server (gunicorn gthread, 2 x 16 threads) the
first test fails: every probe waits until the slow clients give up.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from stack.local import StackSettings, gateway_process
from stack.processes import ServiceProcess
from tests.helpers import eventually, metric

SLOW = {
    "headers": b"POST /charge HTTP/1.1\r\nHost: gateway\r\n",
    "body": b"POST /charge HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"ev_id"',
}
#: Generous: an answer takes milliseconds; a server whose threads are all held never answers.
PROBE_TIMEOUT = 5.0
JSON = {"Content-Type": "application/json"}


@contextlib.contextmanager
def running_gateway(settings: StackSettings, **env: str) -> Iterator[ServiceProcess]:
    settings = replace(settings, gateway_workers=2, extra_env={**settings.extra_env, **env})
    service = gateway_process(settings).start()
    try:
        service.wait_healthy(30)
        yield service
    finally:
        service.stop()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,  # an iterable: sent chunked
    headers: dict | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


def post_charge(port: int, ev_id: str) -> int:
    return request(port, "POST", "/charge", json.dumps({"ev_id": ev_id}).encode(), JSON)[0]


def still_open(sock: socket.socket) -> bool:
    """Neither answered nor closed by the server."""
    sock.setblocking(False)
    try:
        return not sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def open_slow(port: int, phase: str, count: int) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT)
        sock.sendall(SLOW[phase])
        connections.append(sock)
    return connections


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


def json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers.get("content-type") == "application/json"
    document = json.loads(body)
    assert set(document) == {"error", "detail"} and document["detail"]
    return document


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_200_slow_connections_do_not_delay_health_or_charge_requests(
    stack_settings: StackSettings, phase: str
):
    with running_gateway(stack_settings, HEADER_TIMEOUT="120", BODY_TIMEOUT="120"):
        port = stack_settings.gateway_port
        slow = open_slow(port, phase, 200)
        try:
            for i in range(5):
                assert request(port, "GET", "/health")[0] == 200
                assert post_charge(port, f"EV-PATIENT-{i}") == 202
            # They were served while every slow client still held its connection.
            assert all(still_open(sock) for sock in slow)
        finally:
            for sock in slow:
                sock.close()


def test_slow_headers_are_cut_off_and_slow_bodies_answered_408(stack_settings: StackSettings):
    with running_gateway(stack_settings, HEADER_TIMEOUT="1", BODY_TIMEOUT="1"):
        port = stack_settings.gateway_port
        # A connection that never completes its headers is closed without an answer.
        assert raw_exchange(port, SLOW["headers"]) == b""
        answer = raw_exchange(port, SLOW["body"])
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(body)["error"] == "request_timeout"
        # An idle connection is closed too, and the gateway still serves.
        assert raw_exchange(port, b"") == b""
        assert post_charge(port, "EV-AFTER") == 202


def test_oversized_requests_get_json_413_414_and_431(stack_settings: StackSettings):
    with running_gateway(stack_settings, MAX_BODY_BYTES="4096", MAX_HEADER_BYTES="16384"):
        port = stack_settings.gateway_port
        big = b'{"ev_id": "' + b"x" * 5000 + b'"}'
        json_error(*request(port, "POST", "/charge", big, JSON), 413)
        # A chunked body carries no length: it is counted as it arrives, and refused the same.
        chunks = (big[i : i + 1000] for i in range(0, len(big), 1000))
        json_error(*request(port, "POST", "/charge", chunks, JSON), 413)
        # A declared length far over the limit is refused at once, its body never awaited.
        answer = raw_exchange(
            port, b"POST /charge HTTP/1.1\r\nHost: gateway\r\nContent-Length: 10000000\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        json_error(*request(port, "GET", "/health", headers={"X-Big": "b" * 20_000}), 431)
        json_error(*request(port, "GET", "/charge/" + "a" * 20_000), 414)
        # Within the limits, a chunked body reaches the app whole.
        chunked = (part for part in (b'{"ev_id": ', b'"EV-CHUNKED"}'))
        status, _, body = request(port, "POST", "/charge", chunked, JSON)
        assert status == 202 and json.loads(body)["ev_id"] == "EV-CHUNKED"


def test_sigterm_answers_the_requests_in_flight_then_stops_the_workers(
    stack_settings: StackSettings,
):
    # With no balancer, a POST waits ROUTED_WAIT for a routing decision that never comes: a
    # request that is still in flight when the signal arrives.
    with running_gateway(stack_settings, ROUTED_WAIT="3") as gateway:
        port = stack_settings.gateway_port
        answers: list[int] = []
        in_flight = threading.Thread(target=lambda: answers.append(post_charge(port, "EV-LATE")))
        in_flight.start()
        eventually(
            lambda: metric(
                f"{stack_settings.gateway_url}/metrics", "gateway_publish_seconds_count"
            ),
            what="the request to be published",
        )
        gateway.signal(signal.SIGTERM)
        eventually(lambda: not gateway.alive(), timeout=15, what="the gateway to exit")
        in_flight.join()
        assert answers == [202]
        assert gateway.process is not None and gateway.process.returncode == 0
        log = gateway.log_path.read_text()
        assert len(re.findall(r"worker \d+ stopped", log)) == 2 and "Traceback" not in log, log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1)


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_worker_is_replaced_and_leaves_the_live_gauges(
    stack_settings: StackSettings, tmp_path: Path
):
    metrics_dir = tmp_path / "metrics"
    with running_gateway(stack_settings, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)) as gateway:
        port = stack_settings.gateway_port
        url = f"{stack_settings.gateway_url}/metrics"
        for i in range(4):
            assert post_charge(port, f"EV-COUNTED-{i}") == 202
        workers = _children(gateway.pid)
        assert len(workers) == 2
        victim = workers[0]
        assert (metrics_dir / f"gauge_livemin_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)

        eventually(
            lambda: len(set(_children(gateway.pid)) - {victim}) == 2,
            what="a new worker in the killed one's place",
        )
        eventually(
            lambda: not (metrics_dir / f"gauge_livemin_{victim}.db").exists(),
            what="the killed worker's live gauges to be dropped",
        )
        eventually(lambda: metric(url, "gateway_broker_connected") == 1, what="all connected")
        # Its counters still count.
        assert metric(url, "gateway_charge_requests_total", outcome="accepted") == 4
        for i in range(4):
            assert post_charge(port, f"EV-AFTER-{i}") == 202
