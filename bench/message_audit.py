"""What RabbitMQ carries per request: messages published, stored and delivered, from its counters.

Runs bench.cpu's stack (50 ms sessions, 5,000-point substations, POLL_INTERVAL=1, 2 gateway
workers) on a private node of its own with the management plugin (statistics every second),
first at rest for ``--idle`` seconds, then under ``--rate`` requests/s from loadgen for
``--duration`` seconds, and reads the broker's own cumulative counters (management HTTP API,
``message_stats``) at each phase's end. What a phase added is divided by its seconds (at rest)
or, less what the rest rate accounts for over the same time, by the requests accepted (under
load): per request and per second, apart.

    .venv/bin/python -m bench.message_audit [--rate 200] [--duration 15] [--idle 20] [--revs main]

It prints, for each queue (grouped: each subscriber's own queues count as one row), its type and
the messages stored in it (``publish``) and delivered from it (``deliver_get``) and acked; for
each exchange what came in and what it routed out; for each service's connections what they
published, had confirmed, received and acked (channels that closed meanwhile, such as the
stream readers' end probes, are not counted there); and, from a tap bound to the events
exchange with ``#`` (a classic exclusive queue of its own, left out of every table but its own),
the event messages published by kind and the events they carried (a batch is one message).
The broker's CPU is given only for reference: the management plugin's collection adds to it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pika

from bench.common import bench_settings, markdown_table, source_tree
from bench.cpu import Broker, cpu_by_service, service_roots
from bench.throughput import CAPACITY, SESSION_SECONDS
from loadgen.run import LoadSettings, run_load
from smartgrid import contract
from stack.local import start_stack

#: How often the node's management statistics are collected (ms): a snapshot is at most this old.
STATS_INTERVAL_MS = 500
#: Seconds to wait before reading the counters, for them to catch up.
CATCH_UP = 3.0
#: Queues named by a prefix and a suffix of their owner's: one row per prefix.
QUEUE_FAMILIES = tuple(
    sorted(
        {
            contract.SUBSTATION_QUEUE_PREFIX,
            contract.POWER_SHARE_QUEUE_PREFIX,
            *(
                f"{subscription.prefix}."
                for subscription in (
                    contract.GATEWAY_EVENTS,
                    contract.BALANCER_EVENTS,
                    contract.SUBSTATION_EVENTS,
                    contract.LOADGEN_EVENTS,
                )
            ),
        },
        key=len,
        reverse=True,
    )
)
TAP_PREFIX = "audit-tap."
QUEUE_COUNTERS = ("publish", "deliver_get", "ack", "redeliver")
CHANNEL_COUNTERS = ("publish", "confirm", "deliver_get", "ack", "drop_unroutable")


def family(queue: str) -> str:
    for prefix in QUEUE_FAMILIES:
        if queue.startswith(prefix):
            return prefix + "*"
    return queue


def service_of(connection_name: str) -> str:
    """The service a connection belongs to, by its ``connection_name`` (each service's link is
    named after it: ``gateway-<pid>``, ``balancer-<host>-<id>`` and its ``...-allocator``,
    ``substation-<id>``)."""
    if not connection_name:
        return "?"
    service = connection_name.split("-")[0]
    return f"{service} allocator" if connection_name.endswith("-allocator") else service


class Management:
    def __init__(self, port: int, vhost: str) -> None:
        self.base = f"http://127.0.0.1:{port}/api"
        self.vhost = urllib.parse.quote(vhost, safe="")
        self.auth = "Basic " + base64.b64encode(b"guest:guest").decode()

    def get(self, path: str) -> list | dict:
        request = urllib.request.Request(self.base + path, headers={"Authorization": self.auth})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def snapshot(self) -> dict:
        """The cumulative counters now: per queue family, exchange and service."""
        queues: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        kinds: dict[str, str] = {}
        members: collections.Counter = collections.Counter()
        for queue in self.get(f"/queues/{self.vhost}"):
            assert isinstance(queue, dict)
            name = family(queue["name"])
            kinds[name] = queue.get("type", "?")
            members[name] += 1
            stats = queue.get("message_stats", {})
            for counter in QUEUE_COUNTERS:
                queues[name][counter] += stats.get(counter, 0)
        exchanges: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for exchange in self.get(f"/exchanges/{self.vhost}"):
            assert isinstance(exchange, dict)
            stats = exchange.get("message_stats", {})
            for counter in ("publish_in", "publish_out"):
                exchanges[exchange["name"] or "(default)"][counter] += stats.get(counter, 0)
        names = {
            c["name"]: c.get("client_properties", {}).get("connection_name", "")
            for c in self.get(f"/vhosts/{self.vhost}/connections")
            if isinstance(c, dict)
        }
        services: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for channel in self.get(f"/vhosts/{self.vhost}/channels"):
            assert isinstance(channel, dict)
            connection = channel.get("connection_details", {}).get("name", "")
            service = service_of(names.get(connection, ""))
            stats = channel.get("message_stats", {})
            services[service]["channels"] += 1
            for counter in CHANNEL_COUNTERS:
                services[service][counter] += stats.get(counter, 0)
        return {
            "at": time.monotonic(),
            "queues": queues,
            "queue_types": kinds,
            "queue_members": members,
            "exchanges": exchanges,
            "services": services,
        }


class EventTap:
    """Every message published to the events exchange, counted by routing key: messages and
    the events they carry (a JSON array is a batch)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: collections.Counter = collections.Counter()
        self.events: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the event tap did not start")

    def counts(self) -> tuple[collections.Counter, collections.Counter]:
        with self._lock:
            return collections.Counter(self.messages), collections.Counter(self.events)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        queue = TAP_PREFIX + str(time.time_ns())
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        channel.queue_bind(queue, contract.EVENTS_EXCHANGE, "#")

        def counted(_channel, method, _properties, body: bytes) -> None:
            try:
                carried = json.loads(body)
                n = len(carried) if isinstance(carried, list) else 1
            except ValueError:
                n = 1
            with self._lock:
                self.messages[method.routing_key] += 1
                self.events[method.routing_key] += n

        channel.basic_consume(queue, counted, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            connection.process_data_events(time_limit=0.2)
        connection.close()


def difference(after: dict, before: dict) -> dict:
    def minus(a: dict, b: dict) -> dict:
        return {name: {k: a[name][k] - b.get(name, {}).get(k, 0) for k in a[name]} for name in a}

    return {
        "seconds": after["at"] - before["at"],
        "queues": minus(after["queues"], before["queues"]),
        "exchanges": minus(after["exchanges"], before["exchanges"]),
        "services": minus(after["services"], before["services"]),
        "event_messages": dict(after["tap"][0] - before["tap"][0]),
        "events": dict(after["tap"][1] - before["tap"][1]),
    }


def audit(args: argparse.Namespace, broker: Broker, revision: tuple[str, dict] | None) -> dict:
    node = broker.cluster.nodes[0]
    with broker.vhost() as url:
        vhost = urllib.parse.unquote(url.rpartition("/")[2])
        management = Management(node.management_port, vhost)
        log_dir = Path(tempfile.mkdtemp(prefix="smartgrid-audit-"))
        settings = bench_settings(
            url,
            log_dir,
            capacity=CAPACITY,
            session_seconds=SESSION_SECONDS,
            poll_interval=1.0,
            extra_env=revision[1] if revision else {},
        )
        group = start_stack(settings)
        tap = EventTap(url)
        try:
            roots = service_roots(group, broker.pids)
            tap.start()
            time.sleep(args.settle)

            def snapshot() -> dict:
                # The counters caught up: each queue and channel emits its own every interval,
                # later on a busy machine (the pending queue's stored count per accepted
                # request, 1 exactly, shows how well they did).
                time.sleep(CATCH_UP)
                found = management.snapshot()
                found["tap"] = tap.counts()
                found["cpu"] = cpu_by_service(roots)
                return found

            rest_start = snapshot()
            time.sleep(args.idle)
            rest_end = snapshot()
            result = run_load(
                LoadSettings(
                    gateway_url=settings.gateway_url,
                    amqp_url=None,
                    interval=1 / args.rate,
                    duration=args.duration,
                    concurrency=512,
                    timeout=10,
                )
            )
            time.sleep(args.drain)
            load_end = snapshot()
        finally:
            tap.stop()
            group.stop()
    rest = difference(rest_end, rest_start)
    load = difference(load_end, rest_end)
    cpu = {
        "rest": {k: rest_end["cpu"][k] - rest_start["cpu"][k] for k in rest_start["cpu"]},
        "load": {k: load_end["cpu"][k] - rest_end["cpu"][k] for k in rest_end["cpu"]},
    }
    return {
        "revision": revision[0] if revision else None,
        "rate": args.rate,
        "accepted": result.report.accepted,
        "queue_types": dict(load_end["queue_types"]),
        "queue_members": dict(load_end["queue_members"]),
        "channels": {name: c["channels"] for name, c in load_end["services"].items()},
        "rest": rest,
        "load": load,
        "cpu_seconds": cpu,
    }


def per_request(audit: dict, table: str, name: str, counter: str) -> float:
    """What ``counter`` added per accepted request under load, less the rest rate's share."""
    load, rest = audit["load"], audit["rest"]
    added = load[table].get(name, {}).get(counter, 0)
    resting = rest[table].get(name, {}).get(counter, 0) / rest["seconds"]
    return (added - resting * load["seconds"]) / audit["accepted"]


def per_second(audit: dict, table: str, name: str, counter: str) -> float:
    rest = audit["rest"]
    return rest[table].get(name, {}).get(counter, 0) / rest["seconds"]


def _f(value: float) -> str:
    return f"{value:.2f}"


def report(audit: dict) -> str:
    load, rest = audit["load"], audit["rest"]
    lines = [
        f"revision: {audit['revision'] or 'this checkout'}; at rest {rest['seconds']:.1f} s, "
        f"then {audit['rate']:g}/s: {audit['accepted']:,} requests accepted in "
        f"{load['seconds']:.1f} s (drain included); the pending queue stored "
        f"{per_request(audit, 'queues', contract.PENDING_QUEUE, 'publish'):.3f} per accepted "
        "request (1 when the counters have caught up)",
        "",
        "Queues (per request: under load less the rest rate; per s: at rest)",
    ]
    rows = []
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * 5)
    for name in sorted(load["queues"], key=lambda n: (audit["queue_types"].get(n, ""), n)):
        if name.startswith(TAP_PREFIX):
            continue
        kind = audit["queue_types"].get(name, "?")
        figures = [
            per_request(audit, "queues", name, "publish"),
            per_request(audit, "queues", name, "deliver_get"),
            per_request(audit, "queues", name, "ack"),
            per_second(audit, "queues", name, "publish"),
            per_second(audit, "queues", name, "deliver_get"),
        ]
        if not any(abs(f) >= 0.005 for f in figures):
            continue
        for i, value in enumerate(figures):
            totals[kind][i] += value
        rows.append([name, kind, audit["queue_members"].get(name, 0), *map(_f, figures)])
    for kind, figures in sorted(totals.items()):
        rows.append([f"**all {kind}**", kind, "", *map(_f, figures)])
    rows.append(
        ["**all queues**", "", "", *(_f(sum(f[i] for f in totals.values())) for i in range(5))]
    )
    headers = ["queue", "type", "queues", "stored/req", "delivered/req", "acked/req"]
    lines.append(markdown_table([*headers, "stored/s at rest", "delivered/s at rest"], rows))
    lines += ["", "Exchanges"]
    rows = []
    for name in sorted(load["exchanges"]):
        figures = [
            per_request(audit, "exchanges", name, "publish_in"),
            per_request(audit, "exchanges", name, "publish_out"),
            per_second(audit, "exchanges", name, "publish_in"),
            per_second(audit, "exchanges", name, "publish_out"),
        ]
        if any(abs(f) >= 0.005 for f in figures):
            rows.append([name, *map(_f, figures)])
    lines.append(
        markdown_table(
            ["exchange", "in/req", "routed out/req", "in/s at rest", "out/s at rest"], rows
        )
    )
    lines += [
        "",
        "Channels by service, by connection name (channels open at the end: one closed meanwhile "
        "takes its counts with it; ? is the tap and anything unnamed)",
    ]
    rows = []
    for name in sorted(load["services"]):
        rows.append(
            [name, audit["channels"].get(name, 0)]
            + [_f(per_request(audit, "services", name, c)) for c in CHANNEL_COUNTERS]
            + [_f(per_second(audit, "services", name, c)) for c in ("publish", "deliver_get")]
        )
    lines.append(
        markdown_table(
            [
                "service",
                "channels",
                *(f"{c}/req" for c in CHANNEL_COUNTERS),
                "publish/s rest",
                "deliver/s rest",
            ],
            rows,
        )
    )
    lines += ["", "Events exchange by routing key (from the tap)"]
    rows = []
    for key in sorted(set(load["event_messages"]) | set(rest["event_messages"])):
        seconds = load["seconds"]
        rest_messages = rest["event_messages"].get(key, 0) / rest["seconds"]
        rest_events = rest["events"].get(key, 0) / rest["seconds"]
        messages = (load["event_messages"].get(key, 0) - rest_messages * seconds) / audit[
            "accepted"
        ]
        events = (load["events"].get(key, 0) - rest_events * seconds) / audit["accepted"]
        rows.append([key, _f(messages), _f(events), _f(rest_messages), _f(rest_events)])
    lines.append(
        markdown_table(
            ["routing key", "messages/req", "events/req", "messages/s rest", "events/s rest"], rows
        )
    )
    cpu = audit["cpu_seconds"]

    def under_load(name: str) -> str:
        resting = cpu["rest"][name] / rest["seconds"] * load["seconds"]
        return f"{(cpu['load'][name] - resting) / audit['accepted'] * 1e6:,.0f}"

    lines += [
        "",
        "CPU (reference only: the management plugin's collection is in RabbitMQ's)",
        markdown_table(
            ["process", "ms/s at rest", "µs/req under load"],
            [
                [
                    name,
                    f"{cpu['rest'][name] / rest['seconds'] * 1000:.1f}",
                    under_load(name),
                ]
                for name in cpu["load"]
            ],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.message_audit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s sent by loadgen")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds under load")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds at rest, measured first")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds after the start, not counted"
    )
    parser.add_argument("--drain", type=float, default=3.0, help="seconds after the load, counted")
    parser.add_argument(
        "--revs", default="", help="git revisions to audit, in turn (default: this checkout)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw counts here")
    args = parser.parse_args()
    revisions: list[tuple[str, dict] | None] = [
        source_tree(rev) for rev in args.revs.split(",") if rev
    ] or [None]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    broker = Broker(
        f"private:-rabbit collect_statistics_interval {STATS_INTERVAL_MS}",
        plugins=("rabbitmq_management",),
    )
    audits = []
    try:
        for revision in revisions:
            audits.append(audit(args, broker, revision))
            print(report(audits[-1]) + "\n", flush=True)
    finally:
        broker.stop()
    if args.json:
        args.json.write_text(json.dumps(audits, indent=2, default=dict) + "\n")


if __name__ == "__main__":
    main()
