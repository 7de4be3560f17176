"""Slow clients against a running gateway: /health and POST /charge latency beside N slow
connections that send a partial header, or full headers and a partial body, then nothing.

    python -m bench.slowloris --port 8000 --connections 200      # a gateway already running
    python -m bench.slowloris --server granian                   # start one (or gunicorn)

Prints, for each phase (idle, slow headers, slow bodies), the median and worst latency of
``--probes`` sequential GET /health and POST /charge requests (each given up after 10 s), and
how many of the slow connections the server has closed or answered 6.5 s later.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import GATEWAY_SERVERS, bench_settings, private_vhost
from stack.local import gateway_process

SLOW = {
    "header": b"POST /charge HTTP/1.1\r\nHost: gateway\r\n",
    "body": b"POST /charge HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"ev_id"',
}


def _timed(host: str, port: int, method: str, path: str, body: bytes | None) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        headers = {"Content-Type": "application/json"} if body else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        connection.close()
        outcome = str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        outcome = type(exc).__name__
    return time.perf_counter() - started, outcome


def probe(host: str, port: int, label: str, probes: int) -> None:
    rows: dict[str, list[tuple[float, str]]] = {"health": [], "post": []}
    for i in range(probes):
        rows["health"].append(_timed(host, port, "GET", "/health", None))
        body = json.dumps({"ev_id": f"EV-SLOWLORIS-{i}"}).encode()
        rows["post"].append(_timed(host, port, "POST", "/charge", body))
    for kind, results in rows.items():
        times = sorted(t for t, _ in results)
        outcomes: dict[str, int] = {}
        for _, outcome in results:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        print(
            f"{label:26s} {kind:6s} p50 {statistics.median(times) * 1000:8.1f} ms"
            f"  max {times[-1] * 1000:8.1f} ms  {outcomes}"
        )


def _ended(sock: socket.socket) -> bool:
    """Whether the server has answered or closed this connection."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def gateway_alone(server: str) -> Iterator[tuple[str, int]]:
    """The gateway under ``server``, alone on a private vhost (POST needs only the broker)."""
    with private_vhost("bench-slowloris") as url:
        settings = bench_settings(url, Path(tempfile.mkdtemp(prefix="smartgrid-slowloris-")))
        settings.gateway_module = GATEWAY_SERVERS[server]
        service = gateway_process(settings).start()
        try:
            service.wait_healthy(30)
            yield settings.host, settings.gateway_port
        finally:
            service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slowloris",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--server",
        choices=sorted(GATEWAY_SERVERS),
        help="start the gateway under this server on a private vhost and measure it, instead of"
        " the one at --host and --port",
    )
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--phases", default="header,body", help="slow phases to run, in order")
    args = parser.parse_args(argv)
    if args.server is None:
        run(args.host, args.port, args)
    else:
        with gateway_alone(args.server) as (host, port):
            print(f"gateway under {args.server} on {host}:{port}")
            run(host, port, args)
    return 0


def run(host: str, port: int, args: argparse.Namespace) -> None:
    probe(host, port, "idle", args.probes)
    for phase in args.phases.split(","):
        slow = []
        for _ in range(args.connections):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(SLOW[phase])
            slow.append(sock)
        time.sleep(0.5)
        probe(host, port, f"{args.connections} slow {phase} conns", args.probes)
        time.sleep(6)
        ended = sum(_ended(sock) for sock in slow)
        print(
            f"  slow {phase} conns answered or closed by the server after 6.5 s: {ended} of "
            f"{len(slow)}"
        )
        for sock in slow:
            sock.close()


if __name__ == "__main__":
    raise SystemExit(main())
