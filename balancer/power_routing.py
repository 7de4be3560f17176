"""The balancing decision with power: which substation gets a request, along the whole path.

A request fits a substation when the substation has a free charging point and every node on
its path (the substation, its feeder, and so on up) keeps room for the request's minimum once
the minimums already promised there are counted. A request counts only the minimums of its own
class and higher: a substation pauses lower classes to make room for it.

Among the substations it fits, it goes where the path is least utilised after admission. A
path's utilisation is read from its tightest node down: at each node, demand (the cars' maxima,
this request's included) over the limit in force, and at the substation the higher of that and
the share of its charging points in use. Paths compare by their tightest node, then their next
tightest, and so on; then the substation whose next session ends soonest wins; only then is the
choice random. When nothing fits, the request is held.

This is ``corrected-min`` (balancer/strategies.py) with power as one more limit: with the
default power and limits (11 kW cars, a substation limit of its points x 350 kW, no tree) power
never binds and power utilisation never exceeds the share of points in use, so each path's
utilisation is exactly ``(estimate + 1) / capacity`` and the choice, random draws included, is
the same one (tests/test_power_routing.py checks this against corrected_min itself).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from balancer.strategies import STRATEGIES, Candidate
from smartgrid.grid import GridState, Need

#: Utilisations closer than this are equal (as in strategies.py).
_TOLERANCE = 1e-9

POWER_MIN = "power-min"
#: The balancer's strategies: power-min, and the count-only ones (balancer/strategies.py) for
#: comparison.
STRATEGY_NAMES = (POWER_MIN, *STRATEGIES)
DEFAULT_STRATEGY = POWER_MIN


def path_utilisation(candidate: Candidate, grid: GridState, need: Need) -> tuple[float, ...]:
    """The path's utilisation after admission, tightest node first."""
    nodes = list(grid.utilisation_after(candidate.substation, need))
    nodes[0] = max(nodes[0], candidate.utilisation_after)
    return tuple(sorted(nodes, reverse=True))


def fits(candidate: Candidate, grid: GridState, need: Need) -> bool:
    return candidate.has_free_point and grid.fits(candidate.substation, need)


def power_min(
    candidates: Sequence[Candidate], grid: GridState, need: Need, rng: random.Random
) -> Candidate | None:
    open_ = [c for c in candidates if fits(c, grid, need)]
    if not open_:
        return None
    keys = {c.substation: path_utilisation(c, grid, need) for c in open_}
    depth = max(len(key) for key in keys.values())
    tied = open_
    for position in range(depth):
        if len(tied) == 1:
            break

        def at(c: Candidate, position: int = position) -> float:
            key = keys[c.substation]
            # A shorter path has no node there: nothing to constrain it.
            return key[position] if position < len(key) else 0.0

        best = min(at(c) for c in tied)
        tied = [c for c in tied if at(c) - best <= _TOLERANCE]
    if len(tied) > 1:
        soonest = min(c.next_end for c in tied)
        tied = [c for c in tied if c.next_end == soonest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)
