"""Which dead substations' queues the balancer drains back into the pending queue. Pure.

A substation presumed dead (it said it is leaving, or has had no good reading for
DRAIN_AFTER) stays dead, and drained, until it is eligible again, even after the fleet has
forgotten it: requests may still wait in its queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

#: Whatever stops a drain (the balancer's consumer tag).
Handle = TypeVar("Handle")


@dataclass
class DrainChanges(Generic[Handle]):
    #: Presumed dead since the last update.
    newly_dead: list[str] = field(default_factory=list)
    #: Alive again: stop draining these (substation -> the handle of its drain).
    revived: dict[str, Handle] = field(default_factory=dict)
    #: Dead and not drained yet (or no longer, after a reconnect): start draining these.
    to_drain: list[str] = field(default_factory=list)


class Draining(Generic[Handle]):
    def __init__(self) -> None:
        self.dead: set[str] = set()
        self._drains: dict[str, Handle] = {}

    def update(self, presumed_dead: set[str], alive: set[str]) -> DrainChanges[Handle]:
        changes: DrainChanges[Handle] = DrainChanges(newly_dead=sorted(presumed_dead - self.dead))
        self.dead = (self.dead | presumed_dead) - alive
        for substation in [s for s in self._drains if s not in self.dead]:
            changes.revived[substation] = self._drains.pop(substation)
        changes.to_drain = sorted(self.dead - self._drains.keys())
        return changes

    def draining(self, substation: str, handle: Handle) -> None:
        """A drain of ``substation``'s queue has started."""
        self._drains[substation] = handle

    def connection_lost(self) -> None:
        """The drains went with the connection; the next update starts them again."""
        self._drains.clear()
