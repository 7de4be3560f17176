"""Which dead substations' queues the balancer drains back into the pending queue, and when it
deletes one. Pure.

A substation presumed dead (it said it is leaving, or has had no good reading for
DRAIN_AFTER) stays dead, and drained, until it is eligible again, even after the fleet has
forgotten it: requests may still wait in its queue.

Once the fleet has forgotten it, its queue is retired: the drain is cancelled and the queue
checked; empty, consumed by nobody, and with none of its requests still being moved, it is
deleted. Scaled-out substations take a new id whenever they are recreated, so without this
every recreate would leave a queue behind. The check and the delete are two steps: quorum
queues refuse ``queue.delete``'s ``if-empty`` and ``if-unused`` (540 NOT_IMPLEMENTED, which
closes the connection). Nothing is routed to a forgotten substation, and one that comes back
consumes its queue before it announces itself, so a consumer on the queue is a reason to leave
it alone.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

#: Whatever stops a drain (the balancer's consumer tag).
Handle = TypeVar("Handle")


class Retirement(enum.Enum):
    """What to do with a forgotten substation's queue, once checked."""

    #: Empty, consumed by nobody, nothing of it being moved: delete it.
    DELETE = "delete"
    #: Requests are still in it, or still being moved: drain it again and check later.
    DRAIN_AGAIN = "drain again"
    #: Someone consumes it (the substation is back, or another balancer drains it), or it is no
    #: longer being retired: not this balancer's to delete.
    LEAVE = "leave"


@dataclass
class DrainChanges(Generic[Handle]):
    #: Presumed dead since the last update.
    newly_dead: list[str] = field(default_factory=list)
    #: Alive again: stop draining these (substation -> the handle of its drain).
    revived: dict[str, Handle] = field(default_factory=dict)
    #: Dead and not drained yet (or no longer, after a reconnect): start draining these.
    to_drain: list[str] = field(default_factory=list)
    #: Forgotten, drained, and none of their requests being moved: stop the drain (its
    #: handle), then check the queue and tell :meth:`Draining.checked` what it holds.
    to_retire: dict[str, Handle] = field(default_factory=dict)


class Draining(Generic[Handle]):
    def __init__(self) -> None:
        self.dead: set[str] = set()
        self._drains: dict[str, Handle] = {}
        #: Dead substations the fleet has forgotten: their queues are to be retired.
        self._forgotten: set[str] = set()
        #: Retiring: the drain stopped, the queue's check not answered yet.
        self._checking: set[str] = set()
        #: Deliveries taken off each dead substation's queue and not settled yet.
        self._moving: dict[str, set[Hashable]] = {}

    def update(self, presumed_dead: set[str], alive: set[str]) -> DrainChanges[Handle]:
        changes: DrainChanges[Handle] = DrainChanges(newly_dead=sorted(presumed_dead - self.dead))
        self.dead = (self.dead | presumed_dead) - alive
        self._forgotten &= self.dead
        self._checking &= self.dead
        for substation in [s for s in self._drains if s not in self.dead]:
            changes.revived[substation] = self._drains.pop(substation)
        for substation in sorted(self._forgotten & self._drains.keys()):
            if not self._moving.get(substation):
                changes.to_retire[substation] = self._drains.pop(substation)
                self._checking.add(substation)
        changes.to_drain = sorted(self.dead - self._drains.keys() - self._checking)
        return changes

    def draining(self, substation: str, handle: Handle) -> None:
        """A drain of ``substation``'s queue has started."""
        self._drains[substation] = handle

    def forgotten(self, substation: str) -> None:
        """The fleet has forgotten ``substation``; if it is dead, its queue is to be retired
        (one never presumed dead was never drained, and is left alone)."""
        if substation in self.dead:
            self._forgotten.add(substation)

    def moving(self, substation: str, delivery: Hashable) -> None:
        """A delivery off ``substation``'s queue is being moved (or dead-lettered)."""
        self._moving.setdefault(substation, set()).add(delivery)

    def settled(self, substation: str, delivery: Hashable) -> None:
        """That delivery has been acknowledged or given back to the queue."""
        moving = self._moving.get(substation)
        if moving is not None:
            moving.discard(delivery)
            if not moving:
                del self._moving[substation]

    def checked(self, substation: str, messages: int, consumers: int) -> Retirement:
        """What the check of a retiring substation's queue found (ready messages, consumers):
        what to do with it. Deleted or left to its consumer, the substation is no longer
        tracked; an answer no longer awaited changes nothing."""
        if substation not in self._checking:
            return Retirement.LEAVE  # alive again, or the connection was lost meanwhile
        self._checking.discard(substation)
        if consumers == 0 and (messages > 0 or self._moving.get(substation)):
            return Retirement.DRAIN_AGAIN
        self.dead.discard(substation)
        self._forgotten.discard(substation)
        return Retirement.DELETE if consumers == 0 else Retirement.LEAVE

    def connection_lost(self) -> None:
        """The drains went with the connection, the checks' answers and the deliveries being
        moved too (the broker gives those back to their queues); the next update starts the
        drains again."""
        self._drains.clear()
        self._checking.clear()
        self._moving.clear()
