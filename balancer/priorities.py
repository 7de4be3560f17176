"""The order in which requests waiting for power are released, by class.

Emergency first, then fleet and standard by weight, with a guaranteed minimum share for each
class so that none starves, not even under a flood of emergencies.

Releases are dealt in *slots* by smooth weighted round robin (the nginx scheme, as
``RoundRobin`` in strategies.py): each class with a guaranteed share ``g`` owns a slot of
weight ``g``, and the rest, ``1 - sum(g)``, is a *priority* slot. A class's own slot goes to
that class when it has a request to release, and otherwise falls to the priority slot. The
priority slot goes to emergency if it can release, else to fleet and standard by their weights
(a second smooth round robin), else to whichever can. Smooth round robin hands out every slot
in proportion to its weight over any stretch of releases, to within about one slot, so while a
class has requests to release it gets at least its guaranteed share of releases, and emergency
gets at least everything that is not guaranteed to someone else.

Only a class that *can* release takes part in a pick: one whose oldest waiting request fits
somewhere (:func:`release`). Within a class the order is first come, first served: a large
request at the head is not overtaken by smaller ones behind it (it would starve), so its class
waits until it fits while the other classes go on.

Everything here is pure: the caller says which classes can release, and admits what it is
given.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TypeVar

from smartgrid.power import CLASS_ORDER, Priority

T = TypeVar("T")
_PRIORITY_SLOT = "priority"


def _default_weights() -> dict[Priority, int]:
    return {Priority.FLEET: 3, Priority.STANDARD: 1}


def _default_guarantees() -> dict[Priority, Fraction]:
    return {Priority.FLEET: Fraction(1, 10), Priority.STANDARD: Fraction(1, 10)}


@dataclass(frozen=True)
class ReleasePolicy:
    #: How fleet and standard share what emergency leaves (positive integers).
    weights: Mapping[Priority, int] = field(default_factory=_default_weights)
    #: Each class's guaranteed share of releases while it has requests waiting.
    guaranteed: Mapping[Priority, Fraction] = field(default_factory=_default_guarantees)

    def __post_init__(self) -> None:
        if set(self.weights) != {Priority.FLEET, Priority.STANDARD} or any(
            w < 1 for w in self.weights.values()
        ):
            raise ValueError("weights: a positive integer for fleet and for standard")
        shares = [Fraction(g) for g in self.guaranteed.values()]
        if any(g < 0 for g in shares) or sum(shares) > 1:
            raise ValueError("guaranteed shares must be >= 0 and add up to at most 1")


class _SmoothRoundRobin:
    """Smooth weighted round robin over fixed keys with integer weights."""

    def __init__(self, weights: Mapping[str, int]) -> None:
        self._weights = {key: w for key, w in weights.items() if w > 0}
        self._total = sum(self._weights.values())
        self._current = dict.fromkeys(self._weights, 0)

    def next(self, allowed: Collection[str] | None = None) -> str | None:
        """The next key; with ``allowed``, only those keys take part in this pick."""
        keys = [k for k in self._weights if allowed is None or k in allowed]
        if not keys:
            return None
        total = sum(self._weights[k] for k in keys)
        for key in keys:
            self._current[key] += self._weights[key]
        chosen = max(keys, key=lambda k: (self._current[k], -list(self._weights).index(k)))
        self._current[chosen] -= total
        return chosen


class ReleaseScheduler:
    """Which class releases next; keeps the round robins' state between picks."""

    def __init__(self, policy: ReleasePolicy | None = None) -> None:
        policy = policy or ReleasePolicy()
        self.policy = policy
        shares = {c.value: Fraction(policy.guaranteed.get(c, 0)) for c in CLASS_ORDER}
        shares[_PRIORITY_SLOT] = 1 - sum(shares.values(), Fraction(0))
        scale = math.lcm(*(s.denominator for s in shares.values()))
        self._slots = _SmoothRoundRobin({k: int(s * scale) for k, s in shares.items()})
        self._by_weight = _SmoothRoundRobin({c.value: w for c, w in policy.weights.items()})

    def pick(self, ready: Collection[Priority]) -> Priority | None:
        """The class to release next among those that can (None when none can)."""
        if not ready:
            return None
        slot = self._slots.next()
        if slot != _PRIORITY_SLOT and Priority(slot) in ready:
            return Priority(slot)
        if Priority.EMERGENCY in ready:
            return Priority.EMERGENCY
        weighted = self._by_weight.next({c.value for c in ready})
        return Priority(weighted) if weighted is not None else next(iter(ready))


def release(
    scheduler: ReleaseScheduler,
    waiting: MutableMapping[Priority, deque[T]],
    fits: Callable[[T], bool],
    admit: Callable[[T], None],
) -> list[T]:
    """Take requests off the per-class queues, oldest first within a class, in the scheduler's
    order, as long as some class's oldest request ``fits``; return them in release order.

    Each released request is passed to ``admit`` (the caller routes it and counts its power)
    before the next is chosen, so ``fits`` always sees the grid with the earlier ones in it.
    Call it whenever power frees.
    """
    released: list[T] = []
    while True:
        ready = [c for c in CLASS_ORDER if waiting.get(c) and fits(waiting[c][0])]
        chosen = scheduler.pick(ready)
        if chosen is None:
            return released
        item = waiting[chosen].popleft()
        admit(item)
        released.append(item)
