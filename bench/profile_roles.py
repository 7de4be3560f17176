"""A service's py-spy samples by role: what its threads were doing, in a few lines.

Each earlier reading of a profile sorted the samples by hand into "the history stream", "the
HTTP layer", "pika's frames and poll" and so on; this is that sorting, once. A sample counts for
the first role, in the order listed, one of whose markers is a frame of its stack (a substring
of the frame's ``name (path:line)``), so a role listed early takes what it calls: a stream
message's decoding counts as the history stream, not as pika. What matches no role is "other".
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path

#: Per service (the name's prefix: substation-2 is a substation): its roles, first match wins.
ROLES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "gateway": (
        ("AMQP thread: the history stream, the gateway's handling", ("GatewayBroker._on_history",)),
        ("AMQP thread: the history relay (to and from the other workers)", ("HistoryRelay.",)),
        ("AMQP thread: stream deliveries and the reader", ("StreamReader.",)),
        ("AMQP thread: confirms", ("Link._on_confirm",)),
        (
            "AMQP thread: publishing (hand-offs from the request threads, sends)",
            ("Link._send", "Link.publish", "Link.call_soon"),
        ),
        ("AMQP thread: timers (canary, doubts, probes)", ("process_timeouts",)),
        ("AMQP thread: the rest (pika's frames and poll)", ("Link._run",)),
        ("request threads: Flask and the app", ("run_wsgi",)),
        ("HTTP event loop (granian: the body, the hand-off, the answer)", ("_spawn_rsgi_worker",)),
    ),
    "balancer": (
        ("routing held requests (the decision and the forward)", ("HeldRequests.place",)),
        ("events", ("BalancerService._on_event",)),
        ("confirms", ("Link._on_confirm",)),
        ("polling the substations", ("balancer/poller.py", "balancer/readings.py")),
        ("the allocator", ("balancer/allocator",)),
        ("timers", ("process_timeouts",)),
        ("pika's frames and poll, the rest of a request", ("Link._run",)),
    ),
    "substation": (
        ("a request received and its session begun", ("SubstationService._on_request",)),
        ("confirms", ("Link._on_confirm",)),
        ("timers (session ends, reports, probes)", ("process_timeouts",)),
        ("serving /metrics", ("http/server.py", "socketserver.py")),
        ("pika's frames and poll", ("Link._run",)),
    ),
}

OTHER = "other"


def roles_of(service: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    for prefix, roles in ROLES.items():
        if service.startswith(prefix):
            return roles
    return ()


def by_role(service: str, lines: Iterable[str]) -> list[tuple[str, float]]:
    """The share of ``service``'s samples in each role, largest first, from py-spy's collapsed
    stacks (``frame;frame;... count`` a line)."""
    roles = roles_of(service)
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        role = next(
            (
                name
                for name, markers in roles
                if any(marker in frame for frame in frames for marker in markers)
            ),
            OTHER,
        )
        counts[role] += count
    return [(role, n / total) for role, n in counts.most_common()] if total else []


def by_role_of_file(service: str, collapsed: Path) -> list[tuple[str, float]]:
    return by_role(service, collapsed.read_text().splitlines())
