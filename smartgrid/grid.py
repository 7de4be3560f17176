"""The grid as a tree of kW limits, and what a request would do to each node on its path.

Substations sit under feeders, feeders under transformers or sites, to any depth; every node
has a limit. The tree is written in one TOML file named by ``GRID_TOPOLOGY_FILE``::

    # Every node: a unique id, its limit in kW, and its parent unless it is a root.
    [[node]]
    id = "site"
    limit_kw = 400

    [[node]]
    id = "feeder-a"
    parent = "site"
    limit_kw = 150

    [[node]]
    id = "s1"            # a substation: its SUBSTATION_ID
    parent = "feeder-a"
    limit_kw = 60

TOML because Python reads it without a dependency (``tomllib``), its numbers and strings
cannot be confused (YAML reads ``no`` as false and ``1e3`` as a string), and it allows
comments. An array of ``[[node]]`` tables rather than one table per id, so that a duplicate id
gets our error naming both entries instead of the parser's "cannot overwrite a value".

A substation missing from the file may name its parent when it announces itself; without
either it is a tree of its own, bounded by its own limit. Every problem in a file is reported
at once (unknown keys, bad ids, limits that are not positive, duplicate ids, unknown parents,
cycles), so an operator fixes a file in one pass.

:class:`GridState` is a snapshot for one routing decision: the limit in force at every node,
and every node's load (the sum over the substations under it). Loads are kept per priority
class, because a request may count on power held only by lower classes: a substation pauses
them for it.
"""

from __future__ import annotations

import math
import operator
import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from smartgrid import contract
from smartgrid.power import CLASS_ORDER, Priority, watts

TOPOLOGY_ENV = "GRID_TOPOLOGY_FILE"
_NODE_KEYS = {"id", "parent", "limit_kw"}


class TopologyError(ValueError):
    """A topology that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


@dataclass(frozen=True)
class Node:
    id: str
    limit_w: int
    parent: str | None = None


@dataclass(frozen=True)
class Topology:
    """A forest of nodes; a substation it does not name is a root of its own."""

    nodes: Mapping[str, Node] = field(default_factory=dict)
    #: Each path once walked (a topology is never changed: a new node makes a new one), for
    #: the routing decision asks for every substation's path several times per request.
    _paths: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def parent(self, node: str) -> str | None:
        known = self.nodes.get(node)
        return known.parent if known is not None else None

    def path(self, node: str) -> tuple[str, ...]:
        """``node`` and every node above it, nearest first."""
        known = self._paths.get(node)
        if known is not None:
            return known
        path = [node]
        parent = self.parent(node)
        while parent is not None:
            path.append(parent)
            parent = self.parent(parent)
        self._paths[node] = walked = tuple(path)
        return walked

    def children(self, node: str) -> list[str]:
        return sorted(n.id for n in self.nodes.values() if n.parent == node)

    def tree(self) -> Iterator[tuple[str, int]]:
        """Every node with its depth, depth first: the roots in id order, each followed by the
        nodes under it (as an operator reads the tree)."""

        def below(node: str, depth: int) -> Iterator[tuple[str, int]]:
            yield node, depth
            for child in self.children(node):
                yield from below(child, depth + 1)

        for root in sorted(n.id for n in self.nodes.values() if n.parent is None):
            yield from below(root, 0)

    def limit_w(self, node: str) -> int | None:
        known = self.nodes.get(node)
        return known.limit_w if known is not None else None

    def with_announced(self, substation: str, parent: str | None, limit_w: int) -> Topology:
        """The tree once ``substation`` has announced itself under ``parent`` (or none).

        The file wins over an announcement: a substation it places elsewhere is an error for
        the caller to log (the tree stays as the file says). A new substation is added under
        its parent with the limit it announced.
        """
        known = self.nodes.get(substation)
        if known is not None:
            if parent is not None and parent != known.parent:
                raise TopologyError(
                    f"announcement of {substation!r}",
                    [
                        f"it names parent {parent!r}, but the topology puts it under "
                        f"{known.parent!r}"
                    ],
                )
            return self
        if parent is None:
            return self
        if parent not in self.nodes:
            raise TopologyError(
                f"announcement of {substation!r}",
                [f"it names parent {parent!r}, which the topology does not define"],
            )
        return Topology({**self.nodes, substation: Node(substation, limit_w, parent)})


# ------------------------------------------------------------------------------ reading a file
def parse_topology(data: object, source: str = "topology") -> Topology:
    """A topology from the parsed TOML document ``data``, or TopologyError with every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise TopologyError(source, ["expected a table of [[node]] entries"])
    for key in sorted(set(data) - {"node"}):
        problems.append(f"unknown top-level key {key!r} (only [[node]] entries are read)")
    entries = data.get("node", [])
    if not isinstance(entries, list):
        raise TopologyError(source, [*problems, "'node' must be an array of [[node]] tables"])

    nodes: dict[str, Node] = {}
    first_seen: dict[str, int] = {}
    for number, entry in enumerate(entries, start=1):
        where = f"node {number}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a table")
            continue
        node_id = entry.get("id")
        if not contract.is_valid_substation_id(node_id):
            problems.append(f"{where}: 'id' must be {contract.SUBSTATION_ID_RULE}, got {node_id!r}")
            continue
        where = f"node {number} ({node_id!r})"
        for key in sorted(set(entry) - _NODE_KEYS):
            problems.append(f"{where}: unknown key {key!r} (expected id, parent, limit_kw)")
        parent = entry.get("parent")
        if parent is not None and not isinstance(parent, str):
            problems.append(f"{where}: 'parent' must be a node id, got {parent!r}")
            parent = None
        limit = entry.get("limit_kw")
        if limit is None:
            problems.append(f"{where}: 'limit_kw' is missing")
            continue
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
        ):
            problems.append(f"{where}: 'limit_kw' must be a number, got {limit!r}")
            continue
        if watts(limit) <= 0:
            problems.append(f"{where}: 'limit_kw' must be above 0, got {limit!r}")
            continue
        if node_id in first_seen:
            problems.append(f"{where}: id {node_id!r} is already node {first_seen[node_id]}")
            continue
        first_seen[node_id] = number
        nodes[node_id] = Node(node_id, watts(limit), parent)

    for node in nodes.values():
        if node.parent is not None and node.parent not in nodes:
            problems.append(f"node {node.id!r}: parent {node.parent!r} is not defined")
    problems.extend(_cycles(nodes))
    if problems:
        raise TopologyError(source, problems)
    return Topology(nodes)


def _cycles(nodes: Mapping[str, Node]) -> list[str]:
    """One message per cycle, written from its smallest id so it is reported once."""
    found: set[tuple[str, ...]] = set()
    for start in nodes:
        seen: list[str] = []
        current: str | None = start
        while current is not None and current in nodes and current not in seen:
            seen.append(current)
            current = nodes[current].parent
        if current is not None and current in seen:
            cycle = seen[seen.index(current) :]
            smallest = cycle.index(min(cycle))
            found.add(tuple(cycle[smallest:] + cycle[:smallest]))
    return [
        "cycle: " + " -> ".join((*cycle, cycle[0])) + " (each node names the next as its parent)"
        for cycle in sorted(found)
    ]


def load_topology(path: str | os.PathLike) -> Topology:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise TopologyError(str(path), [f"cannot read it: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_topology(data, str(path))


def topology_from_env(environ: Mapping[str, str] | None = None) -> Topology:
    """The tree named by ``GRID_TOPOLOGY_FILE``, or an empty one (every substation alone)."""
    environ = os.environ if environ is None else environ
    path = environ.get(TOPOLOGY_ENV, "")
    return load_topology(path) if path else Topology()


# ------------------------------------------------------------------------------ loads
@dataclass(frozen=True)
class Load:
    """The power asked of a node by the sessions under it (in flight ones included)."""

    #: What they would draw unconstrained: the sum of the cars' maxima.
    demand_w: int = 0
    #: The sum of their minimums, per class in CLASS_ORDER.
    floors_w: tuple[int, ...] = (0,) * len(CLASS_ORDER)

    # map over the two tuples rather than a generator: the balancer adds and takes off a
    # request's load on every route, start and end (both tuples are one per class).
    def __add__(self, other: Load) -> Load:
        return Load(
            self.demand_w + other.demand_w, tuple(map(operator.add, self.floors_w, other.floors_w))
        )

    def __sub__(self, other: Load) -> Load:
        return Load(
            self.demand_w - other.demand_w, tuple(map(operator.sub, self.floors_w, other.floors_w))
        )

    def clamped(self) -> Load:
        """No part below zero (a correction taken off a report that already left it out)."""
        return Load(max(0, self.demand_w), tuple(max(0, f) for f in self.floors_w))

    def floor_at_or_above(self, priority: Priority) -> int:
        """The minimums a request of ``priority`` cannot take from: its class and higher."""
        return sum(self.floors_w[: priority.rank + 1])

    @classmethod
    def of(cls, max_w: int, min_w: int, priority: Priority, count: int = 1) -> Load:
        floors = [0] * len(CLASS_ORDER)
        floors[priority.rank] = min_w * count
        return cls(max_w * count, tuple(floors))


@dataclass(frozen=True)
class Need:
    """What a request asks of every node on its path."""

    max_w: int
    min_w: int
    priority: Priority = Priority.STANDARD


@dataclass(frozen=True)
class GridState:
    """Limits in force and loads of every node, for one decision."""

    topology: Topology
    limits_w: Mapping[str, int]
    loads: Mapping[str, Load]

    @classmethod
    def build(
        cls,
        topology: Topology,
        substation_loads: Mapping[str, Load],
        limits_w: Mapping[str, int],
    ) -> GridState:
        """Sum each substation's load into every node on its path. ``limits_w`` must give the
        limit in force of every node on those paths (see :func:`limits_in_force`)."""
        loads: dict[str, Load] = {}
        for substation, load in substation_loads.items():
            for node in topology.path(substation):
                below = loads.get(node)
                loads[node] = load if below is None else below + load
        return cls(topology, limits_w, loads)

    def load(self, node: str) -> Load:
        return self.loads.get(node, Load())

    def headroom_w(self, node: str, priority: Priority = Priority.STANDARD) -> int:
        return self.limits_w[node] - self.load(node).floor_at_or_above(priority)

    def fits(self, substation: str, need: Need) -> bool:
        """Whether every node on the path still has room for the request's minimum."""
        return all(
            self.headroom_w(node, need.priority) >= need.min_w
            for node in self.topology.path(substation)
        )

    def utilisation_after(self, substation: str, need: Need) -> tuple[float, ...]:
        """Demand over limit at each node of the path once the request is admitted, nearest
        first."""
        return tuple(
            (self.load(node).demand_w + need.max_w) / self.limits_w[node]
            for node in self.topology.path(substation)
        )


def limits_in_force(
    topology: Topology,
    substations: Mapping[str, int],
    overrides: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """The limit of every node and substation: the lowest of the file's, the substation's own
    (``substations``: as each announced it) and an operator's override."""
    overrides = overrides or {}
    limits: dict[str, int] = {}
    for node in _all_ids(topology, substations):
        candidates = [
            limit
            for limit in (topology.limit_w(node), substations.get(node), overrides.get(node))
            if limit is not None
        ]
        limits[node] = min(candidates)
    return limits


def _all_ids(topology: Topology, substations: Iterable[str]) -> set[str]:
    return set(topology.nodes) | set(substations)


if __name__ == "__main__":  # python -m smartgrid.grid: the operator's command, apart from the model
    import sys

    from smartgrid.tools.gridlimits import main

    sys.exit(main())
