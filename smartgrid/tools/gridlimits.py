"""python -m smartgrid.grid: check the grid topology file, and change a node's limit at run time.

``check`` reads the file named by ``--topology`` (default ``GRID_TOPOLOGY_FILE``), reports
every problem at once and prints the tree. ``set NODE KW [--for SECONDS]`` publishes a
``grid.limit`` message: the node's limit is ``KW`` until it expires (or until changed);
``clear NODE`` ends the node's override. The message is persistent, goes to the stream
``smartgrid.grid.limits`` (which every balancer replays from its start, so a restarted one
knows every limit in force), and the command returns only once the broker has confirmed it.
``show`` replays that stream to its end, as a balancer does, and prints the overrides in force
(with a topology, the tree with each node's rating and limit in force); ``--json`` for scripts.

An override never raises a node above its rating (the file's limit, a substation's own): the
lowest is in force. Raising a rating is a change of the file.

When a topology is given, ``set`` and ``clear`` first check the file and that it names the
node; ``--unlisted`` allows a node it does not name (a substation that names its parent when
it announces itself). Exit status: 0 done, 1 the broker did not confirm (or, for ``show``,
the stream was not read to its end in time), 2 a usage or topology error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import socket
import sys
import time

from smartgrid import contract
from smartgrid.amqp import Delivery, Link, LinkError
from smartgrid.amqp.streams import StreamReader
from smartgrid.config import DEFAULT_AMQP_URL
from smartgrid.grid import TOPOLOGY_ENV, Topology, TopologyError, load_topology
from smartgrid.limits import LimitOverride, LimitOverrides, override_from_event, override_to_event
from smartgrid.power import kilowatts, watts

PROG = "python -m smartgrid.grid"


def describe(topology: Topology) -> str:
    """The tree as indented lines, roots first, each node with its limit."""
    lines = []
    for node, depth in topology.tree():
        limit = topology.limit_w(node)
        assert limit is not None
        lines.append(f"{'  ' * depth}{node}  {kilowatts(limit):g} kW")
    return "\n".join(lines)


def _positive_kw(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of kW: {raw!r}") from None
    if not value < float("inf") or watts(value) <= 0:
        raise argparse.ArgumentTypeError(f"a limit must be above 0 kW, got {raw!r}")
    return value


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0 seconds, got {raw!r}")
    return value


def _node_id(raw: str) -> str:
    if not contract.is_valid_substation_id(raw):
        raise argparse.ArgumentTypeError(f"a node id is {contract.SUBSTATION_ID_RULE}")
    return raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check the grid topology file, or change a grid node's kW limit at run "
        "time (a durable grid.limit message every balancer follows).",
        epilog="environment variables:\n"
        f"  AMQP_URL            the broker, as an administrator (default {DEFAULT_AMQP_URL})\n"
        f"  {TOPOLOGY_ENV:<19} the topology file (TOML, see docs/power.md)\n\n"
        "examples:\n"
        f"  {PROG} check --topology grid.toml\n"
        f"  {PROG} set feeder-a 80 --for 900     # 80 kW for 15 minutes\n"
        f"  {PROG} clear feeder-a\n"
        f"  {PROG} show --topology grid.toml        # the limits in force now",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument(
        "--topology",
        default=os.environ.get(TOPOLOGY_ENV, ""),
        metavar="FILE",
        help=f"the topology file (default: ${TOPOLOGY_ENV}; none: nodes are not checked)",
    )
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, help="seconds to wait for the broker"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check the topology file and print the tree")
    change = sub.add_parser("set", help="set a node's limit (kW), optionally for a while")
    change.add_argument("node", type=_node_id)
    change.add_argument("limit_kw", type=_positive_kw, metavar="KW")
    change.add_argument(
        "--for", dest="seconds", type=_positive_seconds, help="expires after this many seconds"
    )
    clear = sub.add_parser("clear", help="end a node's override (its rating applies again)")
    clear.add_argument("node", type=_node_id)
    show = sub.add_parser(
        "show", help="the overrides in force now (read from the limits stream, as balancers do)"
    )
    show.add_argument("--json", action="store_true", help="print them as JSON")
    for command in (change, clear):
        command.add_argument(
            "--unlisted",
            action="store_true",
            help="allow a node the topology file does not name (a substation announcing "
            "its parent)",
        )
    return parser


def read_limits(
    url: str, *, timeout: float
) -> tuple[LimitOverrides, dict[str, contract.GridLimit]]:
    """Every override in the limits stream, replayed to its end mark as a balancer's allocator
    does (TimeoutError otherwise), and, per node, the message that set its latest one."""
    overrides = LimitOverrides()
    latest: dict[str, contract.GridLimit] = {}

    def on_message(delivery: Delivery) -> None:
        try:
            events = contract.decode_events(delivery.routing_key, delivery.body)
            found = [
                (e, override_from_event(e)) for e in events if isinstance(e, contract.GridLimit)
            ]
        except (contract.InvalidMessage, ValueError) as exc:
            logging.getLogger(__name__).warning("skipping an unusable limit override: %s", exc)
            return
        for event, override in found:
            if overrides.apply(override):
                latest[event.node] = event

    reader: StreamReader | None = None
    link = Link(
        url,
        name=f"grid-show-{os.getpid()}",
        topology=contract.power_topology_with_events(),
        on_ready=lambda: reader.on_ready() if reader else None,
        on_lost=lambda: reader.on_lost() if reader else None,
    )
    reader = StreamReader(
        link, contract.GRID_LIMITS_STREAM, on_message, start="first", follow=False, quiet=0.5
    )
    link.start()
    try:
        if not link.wait_ready(timeout):
            raise TimeoutError("the broker is not reachable")
        if not reader.wait_caught_up(timeout):
            raise TimeoutError("the limits stream was not read to its end in time")
    finally:
        link.stop()
    return overrides, latest


def _when(at: float | None) -> str | None:
    return None if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def describe_limits(
    topology: Topology,
    overrides: LimitOverrides,
    latest: dict[str, contract.GridLimit],
    now: float,
) -> list[dict]:
    """One row per node with an override in force, or named by the topology: its rating (the
    file's), the override, and the limit in force (the lower; a substation's own limit, which
    only it reports, aside). Tree order, overridden nodes the file does not name last."""
    in_force = overrides.in_force(now)

    def row(node: str, depth: int) -> dict:
        rating = topology.limit_w(node)
        override = in_force.get(node)
        event = latest.get(node) if override is not None else None
        limits = [w for w in (rating, override) if w is not None]
        return {
            "node": node,
            "depth": depth,
            "rating_kw": None if rating is None else kilowatts(rating),
            "override_kw": None if override is None else kilowatts(override),
            "until": None if event is None else event.valid_until,
            "issued_at": None if event is None else event.at,
            "issued_by": None if event is None else event.issued_by,
            "in_force_kw": kilowatts(min(limits)) if limits else None,
        }

    return [row(node, depth) for node, depth in topology.tree()] + [
        row(node, 0) for node in sorted(set(in_force) - set(topology.nodes))
    ]


def _print_limits(rows: list[dict], now: float) -> None:
    overridden = sum(1 for r in rows if r["override_kw"] is not None)
    print(f"limits at {_when(now)}: {overridden} override(s) in force")
    for r in rows:
        parts = [f"{'  ' * r['depth']}{r['node']}"]
        if r["in_force_kw"] is not None:
            parts.append(f"{r['in_force_kw']:g} kW")
        if r["override_kw"] is not None:
            until = f" until {_when(r['until'])}" if r["until"] is not None else ""
            rating = f", rating {r['rating_kw']:g} kW" if r["rating_kw"] is not None else ""
            issued = f" by {r['issued_by']}" if r["issued_by"] else ""
            parts.append(
                f"(override {r['override_kw']:g} kW{until}{rating}; "
                f"issued {_when(r['issued_at'])}{issued})"
            )
        print("  ".join(parts))


def publish_limit(url: str, event: contract.GridLimit, *, timeout: float) -> None:
    """Publish ``event`` persistently and wait for the broker's confirmation (LinkError or
    TimeoutError otherwise). The stream and its binding are declared first, as every service
    declares what it uses, so the message has somewhere durable to go."""
    link = Link(
        url, name=f"grid-limit-{os.getpid()}", topology=contract.power_topology_with_events()
    )
    link.start()
    try:
        if not link.wait_ready(timeout):
            raise TimeoutError("the broker is not reachable")
        # mandatory: a message no queue takes fails instead of vanishing.
        link.publish(contract.EVENTS_EXCHANGE, event.kind, event.to_body(), mandatory=True).result(
            timeout
        )
    finally:
        link.stop()


def _issuer() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    topology = Topology()
    if args.topology:
        try:
            topology = load_topology(args.topology)
        except TopologyError as exc:
            print(f"{PROG}: {exc.source}: {len(exc.problems)} problem(s):", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
    if args.command == "check":
        if not args.topology:
            parser.error(f"check needs a topology file (--topology or {TOPOLOGY_ENV})")
        print(f"{args.topology}: {len(topology.nodes)} node(s), no problems")
        print(describe(topology))
        return 0
    if args.command == "show":
        try:
            overrides, latest = read_limits(args.amqp_url, timeout=args.timeout)
        except (LinkError, TimeoutError) as exc:
            print(f"{PROG}: could not read the limits: {exc or 'timed out'}", file=sys.stderr)
            return 1
        now = time.time()
        rows = describe_limits(topology, overrides, latest, now)
        if args.json:
            print(json.dumps({"at": now, "nodes": rows}, indent=2))
        else:
            _print_limits(rows, now)
        return 0

    if args.topology and args.node not in topology.nodes and not args.unlisted:
        parser.error(
            f"{args.topology} names no node {args.node!r} (--unlisted for a substation that "
            "announces its parent)"
        )
    now = time.time()
    limit_w = watts(args.limit_kw) if args.command == "set" else None
    seconds = getattr(args, "seconds", None)
    override = LimitOverride(args.node, limit_w, now, now + seconds if seconds else None)
    rating = topology.limit_w(args.node)
    if limit_w is not None and rating is not None and limit_w > rating:
        print(
            f"{PROG}: note: {args.node}'s rating in the file is {kilowatts(rating):g} kW; an "
            "override never raises a limit above it",
            file=sys.stderr,
        )
    event = override_to_event(override, issued_by=_issuer())
    try:
        publish_limit(args.amqp_url, event, timeout=args.timeout)
    except (LinkError, TimeoutError) as exc:
        print(
            f"{PROG}: the broker did not confirm the change: {exc or 'timed out'}", file=sys.stderr
        )
        return 1
    what = f"{args.limit_kw:g} kW" if limit_w is not None else "its rating (override cleared)"
    until = (
        f" until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now + seconds))}"
        if seconds
        else ""
    )
    print(f"{args.node}: {what}{until}; confirmed by the broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
