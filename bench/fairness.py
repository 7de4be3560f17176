"""Jain's index over sessions' power, fleet-wide and per bottleneck (issue 15's fairness target).

The issue's target reads Jain's index over the power of same-class sessions below their own
maximum, fleet-wide. Max-min fairness, which the division and each substation's sharing
implement, promises less: sessions held back by the *same* limit get the same power; sessions
held back by different limits (a full substation of 11 kW a point and a site whose other
substations have room) may get different power, and neither could get more without taking from
someone with less. So beside the literal index this module reads the index per bottleneck: each
session below its own maximum is grouped with the others of its class held back by the same
node, the nearest node on its path (the substation first, then up the tree) that draws its
whole limit in force.

Max-min fairness with minimums puts a session at its own minimum off the common level (held
up by it when the level is lower, or everyone of its class held at their minimums when a class
above takes the rest), and a paused one (its minimum did not fit): such sessions are counted
under :data:`AT_MINIMUM`, apart, and in no index per bottleneck. A session below its maximum
whose path has no node at its limit is held back by nothing a limit explains (a share on its
way: the allocator has not moved power to its substation yet); it is grouped under
:data:`UNBOUND`, whose index is read like any other.

Pure functions of one instant: the callers (``bench.power_stack`` on the sessions' events,
``bench.power_fairness`` in simulation) sample them every 100 ms.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from loadgen.report import jain_index

#: A node draws its whole limit when within this fraction of it (shares are whole watts, and a
#: feeder whose share is moving between two substations draws a little less for milliseconds).
AT_LIMIT = 0.01
#: Below its own maximum by more than this (kW): a car at its maximum is held back by itself.
BELOW_MAX_KW = 1e-3
#: The group of sessions below their maximum with no node of their path at its limit.
UNBOUND = "(none at its limit)"
#: The sessions below their maximum at their own minimum or paused (no index over them).
AT_MINIMUM = "(at its own minimum, or paused)"


@dataclass(frozen=True)
class SessionAt:
    """One session at one instant."""

    substation: str
    priority: str
    power_kw: float
    max_kw: float
    min_kw: float = 0.0

    @property
    def below_max(self) -> bool:
        return self.power_kw < self.max_kw - BELOW_MAX_KW

    @property
    def at_minimum(self) -> bool:
        """At its own minimum, or paused below it."""
        # A watt above: the watts water-filling leaves over go one each to some sessions.
        return self.min_kw > 0 and self.power_kw <= self.min_kw + 2 * BELOW_MAX_KW


def binding_node(
    path: Sequence[str], drawn_kw: Mapping[str, float], limits_kw: Mapping[str, float]
) -> str | None:
    """The nearest node of ``path`` (a substation's, itself first) drawing its whole limit."""
    for node in path:
        limit = limits_kw.get(node)
        if limit is not None and drawn_kw.get(node, 0.0) >= limit * (1 - AT_LIMIT):
            return node
    return None


def drawn_by_node(sessions: Iterable[SessionAt], paths: Mapping[str, Sequence[str]]) -> dict:
    """The power drawn under every node (a substation's own included)."""
    drawn: dict[str, float] = defaultdict(float)
    for s in sessions:
        for node in paths[s.substation]:
            drawn[node] += s.power_kw
    return dict(drawn)


def fleet_wide(sessions: Sequence[SessionAt]) -> dict[str, float]:
    """Per class, the literal index: over every session of the class below its own maximum
    (two or more), wherever it is."""
    values: dict[str, list[float]] = defaultdict(list)
    for s in sessions:
        if s.below_max:
            values[s.priority].append(s.power_kw)
    found = {}
    for priority, powers in values.items():
        index = jain_index(powers) if len(powers) >= 2 else None
        if index is not None:
            found[priority] = index
    return found


def by_bottleneck(
    sessions: Sequence[SessionAt],
    paths: Mapping[str, Sequence[str]],
    limits_kw: Mapping[str, float],
) -> dict[tuple[str, str], tuple[int, float | None]]:
    """Per (class, binding node), how many sessions below their maximum it holds back and their
    index (None for one session, for sessions all paused, and for :data:`AT_MINIMUM`)."""
    drawn = drawn_by_node(sessions, paths)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in sessions:
        if s.below_max:
            if s.at_minimum:
                node = AT_MINIMUM
            else:
                node = binding_node(paths[s.substation], drawn, limits_kw) or UNBOUND
            groups[(s.priority, node)].append(s.power_kw)
    return {
        (p, node): (
            len(powers),
            jain_index(powers) if len(powers) >= 2 and node != AT_MINIMUM else None,
        )
        for (p, node), powers in groups.items()
    }


def per_bottleneck(groups: Mapping[tuple[str, str], tuple[int, float | None]]) -> dict:
    """Per class, the index per bottleneck at one instant: the groups of two or more sessions,
    each weighted by its sessions (None for a class without such a group)."""
    weighted: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (priority, _node), (count, index) in groups.items():
        if index is not None:
            weighted[priority].append((count, index))
    return {
        p: sum(n * i for n, i in found) / sum(n for n, _ in found) for p, found in weighted.items()
    }


@dataclass
class FairnessSeries:
    """The instants' figures, gathered over a run."""

    literal: dict[str, list[float]]
    bottleneck: dict[str, list[float]]
    #: Per (class, node): the sessions below their maximum it held back, summed over instants,
    #: and its index at the instants with two or more.
    nodes: dict[tuple[str, str], tuple[int, list[float]]]

    @classmethod
    def empty(cls) -> FairnessSeries:
        return cls(defaultdict(list), defaultdict(list), {})

    def add(
        self,
        sessions: Sequence[SessionAt],
        paths: Mapping[str, Sequence[str]],
        limits_kw: Mapping[str, float],
    ) -> None:
        for p, index in fleet_wide(sessions).items():
            self.literal[p].append(index)
        groups = by_bottleneck(sessions, paths, limits_kw)
        for p, index in per_bottleneck(groups).items():
            self.bottleneck[p].append(index)
        for key, (count, found) in groups.items():
            held, indices = self.nodes.get(key, (0, []))
            self.nodes[key] = (held + count, indices + ([] if found is None else [found]))

    def summary(self) -> dict:
        """Means over the instants that had a figure (as loadgen's fleet-wide index), and per
        class and node the share of held-back sessions it held and its mean index."""

        def means(series: Mapping[str, list[float]]) -> dict:
            return {
                p: {"samples": len(v), "mean": statistics.fmean(v)}
                for p, v in sorted(series.items())
                if v
            }

        held: dict[str, int] = defaultdict(int)
        for (p, _node), (count, _) in self.nodes.items():
            held[p] += count
        nodes = {
            p: {
                node: {
                    "share_of_held": count / held[p],
                    "samples": len(indices),
                    "mean": statistics.fmean(indices) if indices else None,
                }
                for (q, node), (count, indices) in sorted(self.nodes.items())
                if q == p
            }
            for p in sorted(held)
        }
        return {"fleet_wide": means(self.literal), "per_bottleneck": means(self.bottleneck)} | {
            "by_node": nodes
        }
