"""Power: its units, the priority classes, and how one node shares its limit among its sessions.

Power is counted in whole watts (``int``) inside every decision and converted to kW only at the
edges (messages, metrics, configuration). Sums of integers are exact, so "the sessions never
draw more than the limit" holds to the watt instead of up to a rounding error: a float sum of
kW could exceed its limit by 1e-12 and count as a violation in every sample. Converting a sum
in watts to kW for display keeps the comparison, because dividing both sides by 1000 rounds
monotonically.

A node (a substation) shares its limit among its sessions in three steps, whenever a session
starts or ends or the limit changes:

1. **Guaranteed shares** (optional, none by default): a class may have a guaranteed fraction of
   the limit. Its sessions get their minimum and then water-fill within that reservation first,
   so no class is squeezed to nothing by a higher one.
2. **Minimums, by class then seniority**: each remaining session gets its ``min_w`` if that
   still fits, in the order emergency, fleet, standard, and within a class the order in which
   the substation admitted them (its ``seniority``), first fit. A session whose minimum does
   not fit is *paused*: it gets 0 W and keeps its charging point.
3. **The rest, max-min fair by class**: what is left goes to the running sessions of each class
   in turn, water-filled (every session below its own maximum sits at one common level) up to
   each car's ``max_w``.

"Resumes first" falls out of the order: the allocation is a pure function of the sessions and
the limit, so when power frees, every paused session is reconsidered in (class, seniority)
order, and an older paused session gets its minimum before any younger session of its class
does (even one that was running: it is paused again to make room). First fit means a younger
session may use power an older one cannot (its minimum is larger than what is left), but never
at the older one's expense. A tie in seniority falls back to the session id, so the outcome
never depends on the order of the input.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

#: The bounds of a car's charging power (kW), as the request contract accepts them.
MIN_CAR_KW = 1.4
MAX_CAR_KW = 350.0


def watts(kw: float) -> int:
    """kW to whole watts (power below a watt is noise for a charging session)."""
    return round(kw * 1000)


def kilowatts(w: int) -> float:
    return w / 1000


class Priority(enum.Enum):
    """The request classes, in the order they are served."""

    EMERGENCY = "emergency"
    FLEET = "fleet"
    STANDARD = "standard"

    @property
    def rank(self) -> int:
        return _RANK[self]


CLASS_ORDER: tuple[Priority, ...] = (Priority.EMERGENCY, Priority.FLEET, Priority.STANDARD)
_RANK = {priority: rank for rank, priority in enumerate(CLASS_ORDER)}


@dataclass(frozen=True)
class SessionDemand:
    """What one running session asks of its node."""

    session: str
    min_w: int
    max_w: int
    priority: Priority = Priority.STANDARD
    #: The substation's admission order (lower is older): decides who gets a minimum first.
    seniority: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_w <= self.max_w:
            raise ValueError(
                f"session {self.session!r}: need 0 <= min_w <= max_w, got {self.min_w}, "
                f"{self.max_w}"
            )

    @property
    def order(self) -> tuple[int, int, str]:
        return (self.priority.rank, self.seniority, self.session)


@dataclass(frozen=True)
class Allocation:
    limit_w: int
    #: Watts per session; 0 for a paused session.
    power_w: Mapping[str, int]
    #: Paused sessions, in the order they resume when power frees.
    paused: tuple[str, ...] = ()
    paused_by_class: Mapping[Priority, int] = field(default_factory=dict)

    @property
    def total_w(self) -> int:
        return sum(self.power_w.values())


# ------------------------------------------------------------------------------ water-filling
def water_fill(budget: int, bounds: Sequence[tuple[int, int, int]]) -> list[int]:
    """Share ``budget`` watts max-min fairly among items bounded by ``(low, high, weight)``.

    Each item gets ``clamp(weight * level, low, high)`` at the highest common ``level`` whose
    total fits the budget: items whose bounds do not hold them sit at the same level per unit
    of weight, and nobody gets more by taking from someone with less. Shares are whole watts:
    each is rounded down, and the watts that rounding left over go one each to the first items
    on the level (in the caller's order), so the whole budget is used unless every item is at
    its ``high``, and no two items on the level differ by more than one watt per unit of weight.
    Requires ``sum(low) <= budget``, ``0 <= low <= high`` and ``weight >= 1``.
    """
    if not bounds:
        return []
    lows = sum(low for low, _, _ in bounds)
    if lows > budget:
        raise ValueError(f"the minimums ({lows} W) exceed the budget ({budget} W)")
    if sum(high for _, high, _ in bounds) <= budget:
        return [high for _, high, _ in bounds]
    # The total F(level) = constant + slope * level between consecutive breakpoints, where an
    # item joins the slope at low/weight and leaves it (fixed at high) at high/weight.
    breakpoints = sorted(
        (Fraction(edge, weight), leaves, index)
        for index, (low, high, weight) in enumerate(bounds)
        for edge, leaves in ((low, 0), (high, 1))
    )
    constant, slope = lows, 0
    level = Fraction(0)
    for at, leaves, index in breakpoints:
        if slope and constant + slope * at > budget:
            break
        low, high, weight = bounds[index]
        if leaves:
            constant, slope = constant + high, slope - weight
        else:
            constant, slope = constant - low, slope + weight
    level = Fraction(budget - constant, slope)
    shares = []
    on_level = []
    for index, (low, high, weight) in enumerate(bounds):
        exact = weight * level
        shares.append(min(high, max(low, math.floor(exact))))
        if low < exact < high:
            on_level.append(index)
    # The fractions rounded away add up to fewer watts than there are items on the level.
    for index in on_level[: budget - sum(shares)]:
        shares[index] += 1
    return shares


# ------------------------------------------------------------------------------ one node
def allocate(
    limit_w: int,
    sessions: Iterable[SessionDemand],
    guaranteed: Mapping[Priority, Fraction | float] | None = None,
) -> Allocation:
    """Share ``limit_w`` among ``sessions`` (see the module's docstring for the rules).

    ``guaranteed`` maps a class to the fraction of the limit reserved for it first (the
    fractions may add up to at most 1); a reservation its sessions do not use goes back to
    everyone.
    """
    if limit_w < 0:
        raise ValueError(f"the limit must be >= 0 W, got {limit_w}")
    ordered = sorted(sessions, key=lambda s: s.order)
    if len({s.session for s in ordered}) != len(ordered):
        raise ValueError("session ids must be distinct")
    guaranteed = guaranteed or {}
    if any(share < 0 for share in guaranteed.values()) or sum(guaranteed.values()) > 1:
        raise ValueError("guaranteed shares must be >= 0 and add up to at most 1")

    power = {s.session: 0 for s in ordered}
    running: set[str] = set()
    pool = limit_w

    def grant_minimums(candidates: Iterable[SessionDemand], budget: int) -> int:
        for s in candidates:
            if s.session not in running and s.min_w <= budget:
                running.add(s.session)
                power[s.session] = s.min_w
                budget -= s.min_w
        return budget

    def fill(members: list[SessionDemand], budget: int) -> int:
        """Water-fill the running ``members`` from where they are; return what is left."""
        members = [s for s in members if s.session in running]
        if not members:
            return budget
        current = sum(power[s.session] for s in members)
        shares = water_fill(budget + current, [(power[s.session], s.max_w, 1) for s in members])
        for s, share in zip(members, shares, strict=True):
            power[s.session] = share
        return budget + current - sum(shares)

    by_class = {c: [s for s in ordered if s.priority is c] for c in CLASS_ORDER}
    for c in CLASS_ORDER:
        share = guaranteed.get(c, 0)
        if share and by_class[c]:
            reserved = math.floor(Fraction(share) * limit_w)
            left = fill(by_class[c], grant_minimums(by_class[c], reserved))
            pool -= reserved - left
    pool = grant_minimums(ordered, pool)
    for c in CLASS_ORDER:
        pool = fill(by_class[c], pool)

    paused = tuple(s.session for s in ordered if s.session not in running)
    paused_by_class = {
        c: sum(1 for s in by_class[c] if s.session not in running) for c in CLASS_ORDER
    }
    return Allocation(limit_w, power, paused, paused_by_class)
