"""Shares of a parent's limit for the substations under it, handed out with leases.

A feeder's limit binds several substations, so one process, the *allocator* (one active at a
time), divides every node's limit among the nodes under it, down to each substation, from what
the substations report they need. Each substation receives its share as a :class:`Grant` with a
lease, and never lets its sessions draw more than the lower of its own limit and its share.
A substation whose lease runs out falls back to its failsafe (``SUBSTATION_FAILSAFE_KW``).

**Dividing a limit** (:func:`divide`, :func:`target_shares`). Top-down from each root: a node's
budget is shared among its children by the same rules a substation uses for its sessions, over
the sessions under them: first each child's failsafe (so that a lease running out can never
overload the parent), then the minimums class by class, then the rest class by class, each
step water-filled over the sessions (a common *level*; each session takes what it can of it,
within its own minimum and maximum), so that a session under one substation gets what one under
another gets, and a substation whose cars are at their maximum gets no more for them. A child
takes what its sessions take at the level, never more than its own limit, nor than the nodes
under it can pass on. Substations report each session's minimum and maximum; a report without
them (an older substation) counts its sessions as alike.

**Leases, and why the sum of the shares in force never exceeds a limit.** A grant is in force
at its substation from arrival until ``issued_at + lease_seconds`` on the substation's clock, or
until a newer grant (by ``(term, seq)``) replaces it; older grants are refused. Clocks may differ
by up to ``skew_seconds``. The allocator keeps, per substation, the most power it may be using:
its *commitment*, the highest of its failsafe and every grant that might still be in force
there (issued, not yet known replaced, and younger than ``lease + skew``). It grants a share
only as far as, with everyone else's commitment, every node on the path stays within its limit.
Substations echo the grant they hold in their demand reports, which retires the grants it
replaced. So the commitments always bound what the substations draw, and every grant fits
beside all of them: raising A's share waits until B's lowered share has been acknowledged (or
B's old lease has run out), which B therefore does at once (:func:`acknowledge_at_once`).

**Releasing power without waiting for a lower share.** A substation whose sessions leave part of
its share unused (one ended, the others at their maximum) caps itself at what they want (at
least its failsafe) at once, before it reports, and says so in the report (``released_w``): it
draws no more than that under the grant it holds or any older one, until it takes a newer
grant. The allocator then counts those grants at the released power, and gives the rest to
others in the same run instead of lowering B's share and waiting for the acknowledgement (one
round trip through the allocator less while a node's limit is unused). Grants newer than the
report's ``last_key`` still count in full: taking one ends the cap.

**Failover.** A new allocator takes a higher ``term`` (its activation time in ms), so its grants
replace any of its predecessor's. Until a substation has acknowledged a grant of the new term,
or until ``lease + 2 x skew`` has passed since activation (by then every earlier grant has run
out, whatever the clocks say), the new allocator assumes that substation may draw its whole own
limit: its first shares are small (0 under a full feeder) and grow as the acknowledgements come
in, within a report interval. A restarted substation refuses grants issued before it started
(they may have been replaced already). A lost grant is repaired by the next renewal
(``renew_after``, a third of the lease by default).

Every class here is a pure state machine: times are arguments, nothing reads a clock.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smartgrid import contract
from smartgrid.grid import Topology, TopologyError
from smartgrid.power import CLASS_ORDER, Priority, kilowatts, watts

#: How far apart the clocks of the allocator and the substations may be, at most (both sides
#: must assume the same): a substation refuses grants issued before its start plus this.
CLOCK_SKEW_SECONDS = 0.5

_CLASSES = len(CLASS_ORDER)
_ZEROS = (0,) * _CLASSES


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Demand:
    """What the sessions under a node ask for, per class in CLASS_ORDER: how many, the sums of
    their minimums and maxima, and (from a substation that reports them) each session's
    ``(min_w, max_w)``, sorted, so that a limit is divided over the sessions themselves."""

    sessions: tuple[int, ...] = _ZEROS
    floors_w: tuple[int, ...] = _ZEROS
    wants_w: tuple[int, ...] = _ZEROS
    failsafe_w: int = 0
    #: Per class, each session's (min_w, max_w); None from a report without them (an older
    #: substation): its sessions then count as alike (:meth:`bounds`).
    sessions_w: tuple[tuple[tuple[int, int], ...], ...] | None = None

    @classmethod
    def of_sessions(
        cls, sessions: Iterable[tuple[Priority, int, int]], failsafe_w: int = 0
    ) -> Demand:
        """The demand of sessions given as (class, min_w, max_w)."""
        per_class: list[list[tuple[int, int]]] = [[] for _ in CLASS_ORDER]
        for priority, min_w, max_w in sessions:
            per_class[priority.rank].append((min_w, max_w))
        bounds = tuple(tuple(sorted(b)) for b in per_class)
        return cls(
            tuple(len(b) for b in bounds),
            tuple(sum(lo for lo, _ in b) for b in bounds),
            tuple(sum(hi for _, hi in b) for b in bounds),
            failsafe_w,
            bounds,
        )

    def bounds(self, rank: int) -> tuple[tuple[int, int], ...]:
        """Each session's (min_w, max_w) in class ``rank``; without the sessions' own, the
        class's sums spread evenly over its sessions (to the watt: the first ones take the
        remainders), as alike sessions."""
        if self.sessions_w is not None:
            return self.sessions_w[rank]
        count, floor, want = self.sessions[rank], self.floors_w[rank], self.wants_w[rank]
        if count == 0:
            return () if want == 0 else ((floor, want),)
        return tuple(
            (floor // count + (i < floor % count), want // count + (i < want % count))
            for i in range(count)
        )

    def __add__(self, other: Demand) -> Demand:
        sessions_w = None
        if self.sessions_w is not None and other.sessions_w is not None:
            sessions_w = tuple(
                tuple(sorted(a + b)) for a, b in zip(self.sessions_w, other.sessions_w, strict=True)
            )
        return Demand(
            _add(self.sessions, other.sessions),
            _add(self.floors_w, other.floors_w),
            _add(self.wants_w, other.wants_w),
            self.failsafe_w + other.failsafe_w,
            sessions_w,
        )


# ------------------------------------------------------------------------------ dividing
#: A *level* orders every way of giving power to a node's sessions: (phase, watts). Phases
#: 0..K-1 give class k its minimums (each session min(level, its min_w)), phases K..2K-1 the
#: rest of class k (each session clamp(level, min_w, max_w)); earlier phases are complete.
_PHASES = 2 * _CLASSES


def _sum_min(values: Sequence[int], prefix: Sequence[int], level: int) -> int:
    """sum(min(level, v) for v in values), ``values`` sorted and ``prefix`` their running sums."""
    below = bisect.bisect_left(values, level)
    return prefix[below] + level * (len(values) - below)


def _prefix(values: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(values)]


class _Sessions:
    """What a substation's sessions take at every level, in O(log n) per question."""

    def __init__(self, demand: Demand) -> None:
        per_class = [demand.bounds(k) for k in range(_CLASSES)]
        self._mins = [sorted(low for low, _ in bounds) for bounds in per_class]
        self._maxes = [sorted(high for _, high in bounds) for bounds in per_class]
        self._min_prefix = [_prefix(values) for values in self._mins]
        self._max_prefix = [_prefix(values) for values in self._maxes]
        self._top = [max(v, default=0) for v in self._mins + self._maxes]
        # What the phases before each one have given: every minimum, class by class, then
        # every rest, class by class.
        steps = [m[-1] for m in self._min_prefix] + [
            high[-1] - low[-1] for high, low in zip(self._max_prefix, self._min_prefix, strict=True)
        ]
        self._before = [0, *itertools.accumulate(steps)][:-1]

    def top(self, phase: int) -> int:
        """The level from which this phase gives these sessions nothing more."""
        return self._top[phase]

    def at(self, phase: int, level: int) -> int:
        if phase < _CLASSES:
            k = phase
            return self._before[phase] + _sum_min(self._mins[k], self._min_prefix[k], level)
        k = phase - _CLASSES
        return (
            self._before[phase]
            + _sum_min(self._maxes[k], self._max_prefix[k], level)
            - _sum_min(self._mins[k], self._min_prefix[k], level)
        )


@dataclass
class _Child:
    """One child of a node: what it (and everything under it) takes at each level, up to its
    limit and at least its failsafe."""

    demand: _Sessions | list[_Child]
    cap_w: int
    failsafe_w: int
    #: Its failsafe, once its parent has checked that the failsafes fit.
    base_w: int = 0

    def __post_init__(self) -> None:
        self.cap_w = max(0, self.cap_w)
        self.base_w = min(self.failsafe_w, self.cap_w)

    def top(self, phase: int) -> int:
        if isinstance(self.demand, _Sessions):
            return self.demand.top(phase)
        return max((c.top(phase) for c in self.demand), default=0)

    def wants(self, phase: int, level: int) -> int:
        if isinstance(self.demand, _Sessions):
            return self.demand.at(phase, level)
        return sum(c.takes(phase, level) for c in self.demand)

    def takes(self, phase: int, level: int) -> int:
        return min(self.cap_w, max(self.base_w, self.wants(phase, level)))

    def without_failsafes(self) -> None:
        """Reserve no failsafe here or anywhere under it (they do not fit above)."""
        self.base_w = 0
        if not isinstance(self.demand, _Sessions):
            for c in self.demand:
                c.without_failsafes()


def _divide(budget_w: int, children: Sequence[_Child]) -> tuple[list[int], bool]:
    """Share ``budget_w`` among ``children``: every child its failsafe first (if they all fit:
    else none, and True), then the highest level that fits, each child what it takes at that
    level; the watts left over (fewer than one more watt per session on the level) go to the
    first children that would take more one watt higher."""
    overcommitted = sum(min(c.failsafe_w, c.cap_w) for c in children) > budget_w
    for c in children:
        c.base_w = 0 if overcommitted else min(c.failsafe_w, c.cap_w)

    def total(phase: int, level: int) -> int:
        return sum(c.takes(phase, level) for c in children)

    if total(0, 0) > budget_w:  # the failsafes of the nodes further down do not fit either
        overcommitted = True
        for c in children:
            c.without_failsafes()

    tops = [max((c.top(p) for c in children), default=0) for p in range(_PHASES)]
    phase = next((p for p in range(_PHASES) if total(p, tops[p]) > budget_w), None)
    if phase is None:  # everyone takes all they want
        return [c.takes(_PHASES - 1, tops[-1]) for c in children], overcommitted
    low, high = 0, tops[phase]  # total(low) <= budget < total(high)
    while high - low > 1:
        middle = (low + high) // 2
        if total(phase, middle) <= budget_w:
            low = middle
        else:
            high = middle
    shares = [c.takes(phase, low) for c in children]
    left = budget_w - sum(shares)
    for i, c in enumerate(children):
        if left <= 0:
            break
        more = min(left, c.takes(phase, low + 1) - shares[i])
        shares[i] += more
        left -= more
    return shares, overcommitted


def divide(budget_w: int, children: Sequence[tuple[Demand, int]]) -> tuple[list[int], bool]:
    """Share ``budget_w`` among ``children`` given as (demand, own limit); return the shares and
    whether the budget could not even cover every child's failsafe (then failsafes are ignored,
    and a lease running out may overload this node: an alert, not a crash)."""
    return _divide(budget_w, [_Child(_Sessions(d), limit, d.failsafe_w) for d, limit in children])


@dataclass(frozen=True)
class Division:
    #: The target share of every substation with a parent.
    shares_w: Mapping[str, int]
    #: Nodes whose limit cannot cover the failsafes of the substations under them.
    overcommitted: frozenset[str] = frozenset()


def target_shares(
    topology: Topology, limits_w: Mapping[str, int], demands: Mapping[str, Demand]
) -> Division:
    """Divide every root's limit down the tree among the substations in ``demands``: at every
    node over the sessions under it, each child standing for what its own sessions take at a
    level within the limits of every node between (so power is never given to a child that
    cannot pass it on)."""
    children: dict[str, set[str]] = {}
    roots: set[str] = set()
    for substation in demands:
        path = topology.path(substation)
        roots.add(path[-1])
        for child, parent in zip(path, path[1:], strict=False):
            children.setdefault(parent, set()).add(child)

    def build(node: str) -> _Child:
        under = sorted(children.get(node, ()))
        if under:
            kids = [build(c) for c in under]
            failsafe = sum(k.failsafe_w for k in kids)
            return _Child(kids, limits_w[node], failsafe)
        demand = demands.get(node, Demand())
        return _Child(_Sessions(demand), limits_w[node], demand.failsafe_w)

    shares: dict[str, int] = {}
    overcommitted: set[str] = set()

    def descend(node: str, tree: _Child, budget: int) -> None:
        if isinstance(tree.demand, _Sessions):
            if node in demands and topology.parent(node) is not None:
                shares[node] = budget
            return
        under = sorted(children.get(node, ()))
        split, over = _divide(budget, tree.demand)
        if over:
            overcommitted.add(node)
        for child, kid, share in zip(under, tree.demand, split, strict=True):
            descend(child, kid, share)

    for root in sorted(roots):
        descend(root, build(root), limits_w[root])
    return Division(shares, frozenset(overcommitted))


# ------------------------------------------------------------------------------ grants
@dataclass(frozen=True)
class Grant:
    substation: str
    share_w: int
    issued_at: float
    lease_seconds: float
    term: int
    seq: int

    @property
    def until(self) -> float:
        return self.issued_at + self.lease_seconds

    @property
    def key(self) -> tuple[int, int]:
        return (self.term, self.seq)


def acknowledge_at_once(previous: Grant | None, taken: Grant) -> bool:
    """Whether a substation that has just taken ``taken`` (after ``previous``) should report at
    once rather than at its next report: when the allocator may still be counting it at more
    than ``taken`` (a lower share than the previous one, or the first of an allocator's term,
    which counts it at its whole limit until acknowledged). Until that acknowledgement arrives
    the power it gave up is held back from everyone else, so every report interval of delay
    is power lost under a busy node; a raise or a renewal changes no commitment and waits."""
    return previous is None or taken.term != previous.term or taken.share_w < previous.share_w


@dataclass(frozen=True)
class DemandReport:
    """What a substation tells the allocator, on every change and every second."""

    substation: str
    at: float
    limit_w: int
    demand: Demand
    parent: str | None = None
    #: The grant it holds now, if any (its lease not yet run out).
    holding: Grant | None = None
    #: The newest grant it has accepted, in force or not: older ones it will refuse.
    last_key: tuple[int, int] | None = None
    #: The most it draws under any grant up to ``last_key`` (:meth:`LeaseHolder.release`);
    #: None: each grant's whole share.
    released_w: int | None = None


class LeaseHolder:
    """A substation's side: the grant it holds and the limit its sessions may draw."""

    def __init__(
        self,
        own_limit_w: int,
        failsafe_w: int,
        *,
        managed: bool,
        started_at: float,
        skew_seconds: float,
    ) -> None:
        self.own_limit_w = own_limit_w
        self.failsafe_w = failsafe_w
        #: Whether it sits under a node in the tree (else no share applies, only its own limit).
        self.managed = managed
        self._refuse_before = started_at + skew_seconds
        self._grant: Grant | None = None
        self.last_key: tuple[int, int] | None = None
        #: The cap it put on itself under the grants taken so far (:meth:`release`).
        self.released_w: int | None = None

    def offer(self, grant: Grant, now: float) -> bool:
        """Take ``grant`` if it is newer than any taken and its lease has not run out; it may
        not predate this process (a grant from before a restart may have been replaced)."""
        if grant.until <= now or grant.issued_at <= self._refuse_before:
            return False
        if self.last_key is not None and grant.key <= self.last_key:
            return False
        self._grant = grant
        self.last_key = grant.key
        self.released_w = None  # the allocator counts a newer grant in full
        return True

    def release(self, keep_w: int, now: float) -> bool:
        """Draw at most ``keep_w`` (at least the failsafe) under the grant held and any older
        one, until a newer grant is taken, so that the allocator may give the rest elsewhere
        as soon as a report says so (``DemandReport.released_w``). Only ever lowers the limit;
        True if it did."""
        grant = self.holding(now)
        if not self.managed or grant is None:
            return False
        keep = max(keep_w, self.failsafe_w)
        if keep >= self.limit_w(now):
            return False
        self.released_w = keep
        return True

    @property
    def last_grant(self) -> Grant | None:
        """The newest grant taken, whether its lease has run out or not."""
        return self._grant

    def holding(self, now: float) -> Grant | None:
        grant = self._grant
        return grant if grant is not None and now < grant.until else None

    def limit_w(self, now: float) -> int:
        """What this substation's sessions may draw in total at ``now``."""
        if not self.managed:
            return self.own_limit_w
        grant = self.holding(now)
        if grant is None:
            return min(self.own_limit_w, self.failsafe_w)
        if self.released_w is not None:
            return min(self.own_limit_w, grant.share_w, self.released_w)
        return min(self.own_limit_w, grant.share_w)

    def expires_at(self, now: float) -> float | None:
        """When the lease in force runs out (re-share the sessions then), if one is."""
        grant = self.holding(now)
        return grant.until if grant is not None else None


@dataclass
class _Known:
    report: DemandReport | None = None
    outstanding: list[Grant] = field(default_factory=list)


class ShareAllocator:
    """The allocator's side: who may be drawing what, and the grants to issue."""

    def __init__(
        self,
        topology: Topology,
        *,
        term: int,
        activated_at: float,
        lease_seconds: float,
        skew_seconds: float,
        failsafe_w: int = 0,
        renew_after: float | None = None,
    ) -> None:
        if not 0 < skew_seconds < lease_seconds:
            raise ValueError("need 0 < skew < lease")
        self.topology = topology
        self.term = term
        self.lease_seconds = lease_seconds
        self.skew_seconds = skew_seconds
        self.renew_after = lease_seconds / 3 if renew_after is None else renew_after
        #: SUBSTATION_FAILSAFE_KW, for substations not heard from yet.
        self.failsafe_w = failsafe_w
        # A predecessor's grant was issued before activation (give or take the skew between
        # the two allocators' clocks) and is held until its lease ends on the substation's.
        self._blind_until = activated_at + lease_seconds + 2 * skew_seconds
        self._seq = 0
        self._known: dict[str, _Known] = {
            node: _Known() for node in topology.nodes if not topology.children(node)
        }
        self.overcommitted: frozenset[str] = frozenset()

    # -------------------------------------------------------------------------- reports
    def report(self, report: DemandReport) -> None:
        known = self._known.setdefault(report.substation, _Known())
        if known.report is not None and known.report.at > report.at:
            return  # an older report overtaken by a newer one
        if report.parent is not None:
            try:
                self.topology = self.topology.with_announced(
                    report.substation, report.parent, report.limit_w
                )
            except TopologyError:
                pass  # the file wins; the caller logs the conflict
        known.report = report
        if report.last_key is not None:
            # It refuses anything not newer than last_key; what it holds is the only one left.
            holding = report.holding.key if report.holding is not None else None
            known.outstanding = [
                g for g in known.outstanding if g.key > report.last_key or g.key == holding
            ]

    # -------------------------------------------------------------------------- commitments
    def _acknowledged_this_term(self, known: _Known) -> bool:
        report = known.report
        return (
            report is not None and report.last_key is not None and report.last_key[0] == self.term
        )

    def committed_w(self, substation: str, limits_w: Mapping[str, int], now: float) -> int:
        """The most ``substation`` may be drawing now, as far as this allocator can tell."""
        known = self._known.get(substation, _Known())
        if now < self._blind_until and not self._acknowledged_this_term(known):
            return limits_w[substation]  # a predecessor's grant may be in force there
        report = known.report
        live = [
            self._counted(known, g) for g in known.outstanding if now < g.until + self.skew_seconds
        ]
        if report is None:
            live.append(self.failsafe_w)
        else:
            live.append(report.demand.failsafe_w)
            if report.holding is not None and now < report.holding.until + self.skew_seconds:
                live.append(self._counted(known, report.holding))
        return min(limits_w[substation], max(live))

    @staticmethod
    def _counted(known: _Known, grant: Grant) -> int:
        """What ``grant`` lets its substation draw: its share, or what the substation released
        under it (a grant up to the report's ``last_key``; a newer one ends the release)."""
        report = known.report
        if (
            report is not None
            and report.released_w is not None
            and report.last_key is not None
            and grant.key <= report.last_key
        ):
            return min(grant.share_w, report.released_w)
        return grant.share_w

    # -------------------------------------------------------------------------- allocation
    def managed(self, overridden: Collection[str] = ()) -> list[str]:
        """The substations that get shares: every one under a node of the tree, and a root
        that is bound by shares all the same: one whose own limit an operator overrides (a
        substation learns of that only as a share), one that names a parent the tree does not
        define (it fails closed until it receives a share), and one that has taken a share
        before (it is managed for the rest of its life)."""
        return sorted(
            s
            for s, known in self._known.items()
            # A leaf of the file that substations have since announced themselves under is a
            # node, not a substation.
            if not self.topology.children(s)
            and (
                self.topology.parent(s) is not None
                or s in overridden
                or (
                    known.report is not None
                    and (known.report.parent is not None or known.report.last_key is not None)
                )
            )
        )

    def allocate(
        self, limits_w: Mapping[str, int], now: float, *, overridden: Collection[str] = ()
    ) -> list[Grant]:
        """The grants to send now: changed shares, and renewals of leases past ``renew_after``.
        ``limits_w`` is the limit in force of every node and substation; ``overridden``, the
        nodes whose limit an operator's override sets now."""
        managed = self.managed(overridden)
        demands = {
            s: known.report.demand
            if known.report is not None
            else Demand(failsafe_w=self.failsafe_w)
            for s, known in self._known.items()
            if s in managed
        }
        division = target_shares(self.topology, limits_w, demands)
        # A root's share is its whole limit in force: nothing above it to divide.
        targets = {
            s: division.shares_w[s] if self.topology.parent(s) is not None else limits_w[s]
            for s in managed
        }
        self.overcommitted = division.overcommitted
        committed = {s: self.committed_w(s, limits_w, now) for s in managed}
        under: dict[str, list[str]] = {}
        for s in managed:
            for node in self.topology.path(s)[1:]:
                under.setdefault(node, []).append(s)

        grants = []
        # A fixed order (lowering first), so the same state always gives the same grants.
        for s in sorted(managed, key=lambda s: (targets[s] - committed[s], s)):
            # Even a share below the commitment needs room: the commitment may be a worst case
            # (after a failover) far above what the substation really draws.
            room = min(
                (
                    limits_w[node] - sum(committed[t] for t in under[node] if t != s)
                    for node in self.topology.path(s)[1:]
                ),
                default=limits_w[s],
            )
            share = max(0, min(targets[s], room, limits_w[s]))
            latest = self._latest(s)
            if (
                latest is not None
                # As the substation draws under it: a released share is not what it was.
                and self._counted(self._known[s], latest) == share
                and now - latest.issued_at < self.renew_after
                and now < latest.until
            ):
                continue
            self._seq += 1
            grant = Grant(s, share, now, self.lease_seconds, self.term, self._seq)
            self._known[s].outstanding.append(grant)
            committed[s] = max(committed[s], share)
            grants.append(grant)
        return grants

    def _latest(self, substation: str) -> Grant | None:
        outstanding = self._known[substation].outstanding
        return max(outstanding, key=lambda g: g.key, default=None)


def sum_by_node(
    topology: Topology, values: Mapping[str, int], nodes: Iterable[str] | None = None
) -> dict[str, int]:
    """Sum per-substation ``values`` into every node above each substation (for checks and
    metrics: kW drawn per feeder)."""
    totals: dict[str, int] = {}
    for substation, value in values.items():
        for node in topology.path(substation)[1:]:
            totals[node] = totals.get(node, 0) + value
    if nodes is not None:
        for node in nodes:
            totals.setdefault(node, 0)
    return totals


# ------------------------------------------------------------------------------ messages
def grant_to_message(grant: Grant) -> contract.PowerShare:
    return contract.PowerShare(
        substation=grant.substation,
        share_kw=kilowatts(grant.share_w),
        issued_at=grant.issued_at,
        lease_seconds=grant.lease_seconds,
        term=grant.term,
        seq=grant.seq,
    )


def grant_from_message(message: contract.PowerShare) -> Grant:
    return Grant(
        message.substation,
        watts(message.share_kw),
        message.issued_at,
        message.lease_seconds,
        message.term,
        message.seq,
    )


def report_to_event(
    report: DemandReport, *, instance: str, limit_in_force_w: int, power_w: int
) -> contract.PowerDemand:
    """The ``power.demand`` event of ``report``, with what the substation may draw and draws
    now (for the balancers' and loadgen's view)."""
    demand = report.demand
    fields: dict[str, Any] = {
        "at": report.at,
        "substation": report.substation,
        "instance": instance,
        "limit_kw": kilowatts(report.limit_w),
        "failsafe_kw": kilowatts(demand.failsafe_w),
        "limit_in_force_kw": kilowatts(limit_in_force_w),
        "power_kw": kilowatts(power_w),
        "parent": report.parent,
    }
    for name, sessions, floor, want in zip(
        contract.POWER_CLASSES, demand.sessions, demand.floors_w, demand.wants_w, strict=True
    ):
        fields[f"sessions_{name}"] = sessions
        fields[f"floor_kw_{name}"] = kilowatts(floor)
        fields[f"want_kw_{name}"] = kilowatts(want)
    if demand.sessions_w is not None:
        for name, bounds in zip(contract.POWER_CLASSES, demand.sessions_w, strict=True):
            # kilowatts() written out: a substation's report converts every running session's
            # bounds, and a call apiece was most of the report's cost (docs/benchmarks.md §4).
            fields[f"session_min_kw_{name}"] = tuple([low / 1000 for low, _ in bounds])
            fields[f"session_max_kw_{name}"] = tuple([high / 1000 for _, high in bounds])
    if report.holding is not None:
        grant = report.holding
        fields |= {
            "holding_share_kw": kilowatts(grant.share_w),
            "holding_issued_at": grant.issued_at,
            "holding_lease_seconds": grant.lease_seconds,
            "holding_term": grant.term,
            "holding_seq": grant.seq,
        }
    if report.last_key is not None:
        fields["last_term"], fields["last_seq"] = report.last_key
        if report.released_w is not None:
            fields["released_kw"] = kilowatts(report.released_w)
    return contract.PowerDemand(**fields)


def report_from_event(event: contract.PowerDemand) -> DemandReport:
    def per_class(name: str) -> tuple[int, ...]:
        values = (getattr(event, f"{name}_{c}") for c in contract.POWER_CLASSES)
        return tuple(v if name == "sessions" else watts(v) for v in values)

    holding = None
    if event.holding_share_kw is not None:
        assert event.holding_issued_at is not None and event.holding_lease_seconds is not None
        assert event.holding_term is not None and event.holding_seq is not None
        holding = Grant(
            event.substation,
            watts(event.holding_share_kw),
            event.holding_issued_at,
            event.holding_lease_seconds,
            event.holding_term,
            event.holding_seq,
        )
    sessions_w = None
    if all(getattr(event, f"session_min_kw_{c}") is not None for c in contract.POWER_CLASSES):
        sessions_w = tuple(
            tuple(
                sorted(
                    (watts(low), watts(high))
                    for low, high in zip(
                        getattr(event, f"session_min_kw_{c}"),
                        getattr(event, f"session_max_kw_{c}"),
                        strict=True,
                    )
                )
            )
            for c in contract.POWER_CLASSES
        )
    last_key = None
    released_w = None
    if event.last_term is not None and event.last_seq is not None:
        last_key = (event.last_term, event.last_seq)
        if event.released_kw is not None:
            released_w = watts(event.released_kw)
    return DemandReport(
        substation=event.substation,
        at=event.at,
        limit_w=watts(event.limit_kw),
        demand=Demand(
            sessions=per_class("sessions"),
            floors_w=per_class("floor_kw"),
            wants_w=per_class("want_kw"),
            failsafe_w=watts(event.failsafe_kw),
            sessions_w=sessions_w,
        ),
        parent=event.parent,
        holding=holding,
        last_key=last_key,
        released_w=released_w,
    )
