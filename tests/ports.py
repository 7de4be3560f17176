"""Free TCP ports for the servers the tests start, chosen so that nothing else takes them first.

Binding port 0 asks the kernel for a port from its ephemeral range, the same range it draws
from for every outgoing connection (pika, Prometheus scrapes, HTTP clients). Between the test
closing its probe socket and the service binding the port, an outgoing connection may take it:
"Address already in use". Ports below that range are only ever bound on purpose, so drawing
from there, at random and never the same twice in a session, avoids the race.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _below_ephemeral() -> range:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12_000), low)


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    pool = _below_ephemeral()
    for port in random.sample(pool, len(pool)):
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports below the ephemeral range")


def free_port() -> int:
    return free_ports(1)[0]
