"""Operators' limit overrides: a node's limit lowered (or restored) at run time, with an expiry.

An override arrives as a durable message (``python -m smartgrid.grid set <node> <kW> [--for
<seconds>]`` in the wiring phase); every balancer and the allocator keep the same store. The
store is a pure model: it is told about overrides and asked what is in force at a given
instant, so expiry needs no timer of its own (the caller re-reads at :meth:`next_change`).

- A newer override of a node replaces the older one; newer is the later ``issued_at`` (the
  operator's clock), and an override redelivered after a newer one changed nothing.
  Two overrides issued at the same instant resolve to the lower limit (then the longer one),
  the safe side, whatever order they arrive in.
- ``limit_w = None`` clears a node's override (it is itself an override, so ordering holds).
- An override never raises a node above its rating (the topology file, the substation's own
  limit): :func:`smartgrid.grid.limits_in_force` takes the lowest. Raising a rating is a change
  of the file, on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smartgrid import contract
from smartgrid.power import kilowatts, watts


@dataclass(frozen=True)
class LimitOverride:
    node: str
    #: The limit in force until ``valid_until``; None clears the node's override.
    limit_w: int | None
    issued_at: float
    valid_until: float | None = None

    def __post_init__(self) -> None:
        if self.limit_w is not None and self.limit_w <= 0:
            raise ValueError(f"an override's limit must be above 0 W, got {self.limit_w}")
        if self.valid_until is not None and self.valid_until <= self.issued_at:
            raise ValueError("an override must be valid for some time after it is issued")

    def _precedence(self) -> tuple[float, float, float]:
        # Later first; at the same instant the lower limit (a clear counts as no limit), then
        # the one that holds longer: the safe side either way.
        return (
            self.issued_at,
            -(math.inf if self.limit_w is None else self.limit_w),
            math.inf if self.valid_until is None else self.valid_until,
        )


class LimitOverrides:
    def __init__(self) -> None:
        self._latest: dict[str, LimitOverride] = {}

    def apply(self, override: LimitOverride) -> bool:
        """Record ``override``; False if an override that takes precedence is already known."""
        current = self._latest.get(override.node)
        if current is not None and current._precedence() >= override._precedence():
            return False
        self._latest[override.node] = override
        return True

    def copy(self) -> LimitOverrides:
        """An independent copy (to hand to another thread)."""
        copied = LimitOverrides()
        copied._latest = dict(self._latest)
        return copied

    def in_force(self, now: float) -> dict[str, int]:
        """The overriding limit of every node that has one at ``now``."""
        return {
            node: o.limit_w
            for node, o in self._latest.items()
            if o.limit_w is not None and (o.valid_until is None or now < o.valid_until)
        }

    def next_change(self, now: float) -> float | None:
        """The next instant an override in force expires (when to recompute), if any."""
        ends = [
            o.valid_until
            for o in self._latest.values()
            if o.limit_w is not None and o.valid_until is not None and o.valid_until > now
        ]
        return min(ends, default=None)


def override_from_event(event: contract.GridLimit) -> LimitOverride:
    limit_w = None if event.limit_kw is None else watts(event.limit_kw)
    return LimitOverride(event.node, limit_w, event.at, event.valid_until)


def override_to_event(override: LimitOverride, issued_by: str | None = None) -> contract.GridLimit:
    return contract.GridLimit(
        at=override.issued_at,
        node=override.node,
        limit_kw=None if override.limit_w is None else kilowatts(override.limit_w),
        valid_until=override.valid_until,
        issued_by=issued_by,
    )
