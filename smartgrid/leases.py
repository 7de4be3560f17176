"""Shares of a parent's limit for the substations under it, handed out with leases.

A feeder's limit binds several substations, so one process, the *allocator* (one active at a
time), divides every node's limit among the nodes under it, down to each substation, from what
the substations report they need. Each substation receives its share as a :class:`Grant` with a
lease, and never lets its sessions draw more than the lower of its own limit and its share.
A substation whose lease runs out falls back to its failsafe (``SUBSTATION_FAILSAFE_KW``).

**Dividing a limit** (:func:`divide`, :func:`target_shares`). Top-down from each root: a node's
budget is shared among its children by the same rules a substation uses for its sessions, with
each child standing for all the sessions under it: first each child's failsafe (so that a lease
running out can never overload the parent), then the minimums class by class, then the rest
class by class, each step water-filled with the child's number of sessions as its weight, so
that sessions under different substations get about the same power. No child gets more than its
own limit.

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

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smartgrid import contract
from smartgrid.grid import Topology, TopologyError
from smartgrid.power import CLASS_ORDER, kilowatts, water_fill, watts

#: How far apart the clocks of the allocator and the substations may be, at most (both sides
#: must assume the same): a substation refuses grants issued before its start plus this.
CLOCK_SKEW_SECONDS = 0.5

_CLASSES = len(CLASS_ORDER)
_ZEROS = (0,) * _CLASSES


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Demand:
    """What the sessions under a node ask for, per class in CLASS_ORDER."""

    sessions: tuple[int, ...] = _ZEROS
    floors_w: tuple[int, ...] = _ZEROS
    wants_w: tuple[int, ...] = _ZEROS
    failsafe_w: int = 0

    def __add__(self, other: Demand) -> Demand:
        return Demand(
            _add(self.sessions, other.sessions),
            _add(self.floors_w, other.floors_w),
            _add(self.wants_w, other.wants_w),
            self.failsafe_w + other.failsafe_w,
        )


# ------------------------------------------------------------------------------ dividing
def divide(budget_w: int, children: Sequence[tuple[Demand, int]]) -> tuple[list[int], bool]:
    """Share ``budget_w`` among ``children`` given as (demand, own limit); return the shares and
    whether the budget could not even cover every child's failsafe (then failsafes are ignored,
    and a lease running out may overload this node: an alert, not a crash)."""
    count = len(children)
    caps = [max(0, limit) for _, limit in children]
    base = [min(d.failsafe_w, cap) for (d, _), cap in zip(children, caps, strict=True)]
    overcommitted = sum(base) > budget_w
    if overcommitted:
        base = [0] * count
    remaining = budget_w - sum(base)
    # What the failsafe already covers is taken off each child's demand: minimums first, in
    # class order, then the rest.
    floors = [list(d.floors_w) for d, _ in children]
    extras = [[w - f for w, f in zip(d.wants_w, d.floors_w, strict=True)] for d, _ in children]
    for index in range(count):
        covered = base[index]
        for needs in (floors[index], extras[index]):
            for k in range(_CLASSES):
                take = min(covered, needs[k])
                needs[k] -= take
                covered -= take
    given = [[0] * _CLASSES for _ in range(count)]

    def room(index: int) -> int:
        return caps[index] - base[index] - sum(given[index])

    def weight(index: int, k: int) -> int:
        return max(1, children[index][0].sessions[k])

    for k in range(_CLASSES):  # minimums
        shares = water_fill(
            remaining, [(0, min(floors[i][k], room(i)), weight(i, k)) for i in range(count)]
        )
        for i, share in enumerate(shares):
            given[i][k] += share
        remaining -= sum(shares)
    for k in range(_CLASSES):  # the rest
        current = [given[i][k] for i in range(count)]
        shares = water_fill(
            remaining + sum(current),
            [
                (current[i], current[i] + min(extras[i][k], room(i)), weight(i, k))
                for i in range(count)
            ],
        )
        for i, share in enumerate(shares):
            given[i][k] = share
        remaining -= sum(shares) - sum(current)
    return [base[i] + sum(given[i]) for i in range(count)], overcommitted


@dataclass(frozen=True)
class Division:
    #: The target share of every substation with a parent.
    shares_w: Mapping[str, int]
    #: Nodes whose limit cannot cover the failsafes of the substations under them.
    overcommitted: frozenset[str] = frozenset()


def target_shares(
    topology: Topology, limits_w: Mapping[str, int], demands: Mapping[str, Demand]
) -> Division:
    """Divide every root's limit down the tree among the substations in ``demands``."""
    below: dict[str, Demand] = {}
    children: dict[str, set[str]] = {}
    roots: set[str] = set()
    for substation, demand in demands.items():
        path = topology.path(substation)
        roots.add(path[-1])
        for node in path:
            below[node] = below.get(node, Demand()) + demand
        for child, parent in zip(path, path[1:], strict=False):
            children.setdefault(parent, set()).add(child)
    shares: dict[str, int] = {}
    overcommitted: set[str] = set()

    def descend(node: str, budget: int) -> None:
        under = sorted(children.get(node, ()))
        if not under:
            if node in demands and topology.parent(node) is not None:
                shares[node] = budget
            return
        split, over = divide(budget, [(below[c], limits_w[c]) for c in under])
        if over:
            overcommitted.add(node)
        for child, share in zip(under, split, strict=True):
            descend(child, share)

    for root in sorted(roots):
        descend(root, limits_w[root])
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

    def offer(self, grant: Grant, now: float) -> bool:
        """Take ``grant`` if it is newer than any taken and its lease has not run out; it may
        not predate this process (a grant from before a restart may have been replaced)."""
        if grant.until <= now or grant.issued_at <= self._refuse_before:
            return False
        if self.last_key is not None and grant.key <= self.last_key:
            return False
        self._grant = grant
        self.last_key = grant.key
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
        return min(self.own_limit_w, grant.share_w if grant else self.failsafe_w)

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
        live = [g.share_w for g in known.outstanding if now < g.until + self.skew_seconds]
        if report is None:
            live.append(self.failsafe_w)
        else:
            live.append(report.demand.failsafe_w)
            if report.holding is not None and now < report.holding.until + self.skew_seconds:
                live.append(report.holding.share_w)
        return min(limits_w[substation], max(live))

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
                and latest.share_w == share
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
    last_key = None
    if event.last_term is not None and event.last_seq is not None:
        last_key = (event.last_term, event.last_seq)
    return DemandReport(
        substation=event.substation,
        at=event.at,
        limit_w=watts(event.limit_kw),
        demand=Demand(
            sessions=per_class("sessions"),
            floors_w=per_class("floor_kw"),
            wants_w=per_class("want_kw"),
            failsafe_w=watts(event.failsafe_kw),
        ),
        parent=event.parent,
        holding=holding,
        last_key=last_key,
    )
