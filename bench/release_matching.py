"""Held requests matched to what freed, instead of released oldest first within a class: an
experiment of ``bench.power_fairness --release`` (issue 15's fleet-wide fairness), not the
balancer's policy (balancer/priorities.py releases first come, first served within a class).

The idea: a car placed where a charging point gives it less than it can draw is held back by
that substation while cars elsewhere are not, which is what keeps the fleet-wide index below
0.95. When a point frees, release among a class's oldest ``window`` held requests the one whose
placement suits it best (a slow car to a slow point), the oldest on a tie, so that a fast car
waits for a roomier point. A request overtaken ``max_passes`` times is due: nothing younger of
its class goes before it. The classes take turns exactly as in ``balancer.priorities.release``
(the same scheduler, asked among the classes with a request that fits); with a window of 1 this
is that function.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, MutableMapping
from itertools import islice
from typing import Generic, TypeVar

from balancer.priorities import ReleaseScheduler
from smartgrid.power import CLASS_ORDER, Priority

T = TypeVar("T")


class Matcher(Generic[T]):
    """Which of a class's held requests may go next; counts how often each was overtaken.
    ``key`` names a request while it is held."""

    def __init__(self, key: Callable[[T], Hashable], window: int = 1, max_passes: int = 0) -> None:
        if window < 1 or max_passes < 0:
            raise ValueError("window: at least 1; max_passes: at least 0")
        self.key = key
        self.window = window
        self.max_passes = max_passes
        self._passes: dict[Hashable, int] = {}

    def passes(self, item: T) -> int:
        return self._passes.get(self.key(item), 0)

    def eligible(self, queue: deque[T]) -> list[T]:
        """The oldest ``window`` of ``queue``, up to the first that is due."""
        found = []
        for item in islice(queue, self.window):
            found.append(item)
            if self.passes(item) >= self.max_passes:
                break
        return found

    def take(self, queue: deque[T], item: T) -> None:
        """``item`` leaves ``queue``; each request held before it was overtaken once more."""
        for index, earlier in enumerate(queue):
            if earlier is item:
                del queue[index]
                break
            key = self.key(earlier)
            self._passes[key] = self._passes.get(key, 0) + 1
        self._passes.pop(self.key(item), None)


def matched_release(
    scheduler: ReleaseScheduler,
    waiting: MutableMapping[Priority, deque[T]],
    fits: Callable[[T], bool],
    admit: Callable[[T], None],
    matcher: Matcher[T],
    how_well: Callable[[T], float],
) -> list[T]:
    """``balancer.priorities.release`` with ``matcher`` choosing within a class: among the
    requests it allows that ``fits``, the one ``how_well`` rates highest (asked after ``fits``
    said yes), the oldest on a tie."""
    released: list[T] = []
    while True:
        fitting: dict[Priority, list[T]] = {}
        for c in CLASS_ORDER:
            queue = waiting.get(c)
            if queue:
                found = [item for item in matcher.eligible(queue) if fits(item)]
                if found:
                    fitting[c] = found
        chosen = scheduler.pick(list(fitting))
        if chosen is None:
            return released
        candidates = fitting[chosen]
        scores = [how_well(item) for item in candidates]
        item = candidates[scores.index(max(scores))]
        matcher.take(waiting[chosen], item)
        admit(item)
        released.append(item)
