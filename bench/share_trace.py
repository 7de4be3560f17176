"""The hops of a share on the move, from the services' DEBUG logs (``bench.power_stack --trace``).

The events say when a car started and when a substation's power changed; what happened in
between is in the logs: when the allocator received each ``power.demand`` report (and when
its substation sent it), when it issued each grant, and when each substation received it. All
processes run on one machine, so their ``time.time()`` stamps are on one clock.

:func:`hops` walks back from the grant that ended a dip: the report that made the allocator
issue it, and, when that report was another substation's acknowledgement of a lowered share,
the lowering and the report that made the allocator issue that one; what came before that
report, since the car's substation first reported, was earlier rounds.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from smartgrid import share_stamps
from smartgrid.log_lines import pattern

_REPORT = pattern(share_stamps.REPORT_RECEIVED)
_GRANT = pattern(share_stamps.GRANT_ISSUED)
_SHARE = pattern(share_stamps.SHARE_RECEIVED)
#: Stamps are printed to the microsecond; a session's power step is stamped with its grant's
#: receipt time.
SAME = 2e-6


@dataclass(frozen=True)
class Report:
    substation: str
    sent: float
    received: float


@dataclass(frozen=True)
class Grant:
    substation: str
    share_kw: float
    issued: float
    received: float | None  # None: the substation's log has no receipt (lost or refused)


@dataclass
class Trace:
    #: In the order the allocator received them.
    reports: list[Report] = field(default_factory=list)
    #: Per substation, in issue order.
    grants: dict[str, list[Grant]] = field(default_factory=lambda: defaultdict(list))

    def report_before(self, t: float) -> Report | None:
        """The last report the allocator received at or before ``t``."""
        i = bisect.bisect_right(self.reports, t + SAME, key=lambda r: r.received)
        return self.reports[i - 1] if i else None

    def first_report_after(self, substation: str, t: float) -> Report | None:
        """The first report ``substation`` sent at or after ``t``."""
        sent = [r for r in self.reports if r.substation == substation and r.sent >= t - SAME]
        return min(sent, key=lambda r: r.sent) if sent else None

    def grant_received_at(self, substation: str, t: float) -> Grant | None:
        for grant in self.grants.get(substation, []):
            if grant.received is not None and abs(grant.received - t) <= SAME:
                return grant
        return None

    def grant_before(self, substation: str, t: float) -> Grant | None:
        """The last grant to ``substation`` that it received at or before ``t``."""
        found = None
        for grant in self.grants.get(substation, []):
            if grant.received is not None and grant.received <= t + SAME:
                found = grant
        return found


def read(logs: Path) -> Trace:
    trace = Trace()
    received: dict[tuple[str, float], float] = {}
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if m := _REPORT.search(line):
                trace.reports.append(Report(m[1], float(m[2]), float(m[3])))
            elif m := _SHARE.search(line):
                received[(path.stem, float(m[2]))] = float(m[3])
            elif m := _GRANT.search(line):
                trace.grants[m[1]].append(Grant(m[1], float(m[2]), float(m[3]), None))
    trace.reports.sort(key=lambda r: r.received)
    for substation, grants in trace.grants.items():
        trace.grants[substation] = sorted(
            (
                Grant(g.substation, g.share_kw, g.issued, received.get((substation, g.issued)))
                for g in grants
            ),
            key=lambda g: g.issued,
        )
    return trace


def hops(trace: Trace, substation: str, started: float, ended: float) -> dict[str, float] | None:
    """Seconds spent in each hop between a car's arrival at ``substation`` (``started``) and
    the raise there that ended its dip (received at ``ended``); None if the dip did not end
    with a grant to it, or the chain does not lead back to its report after the arrival.

    "earlier rounds": from its first report after the arrival to the report the last round
    answered (a raise that was not yet all the car needed, then another report), 0 when one
    round did it."""
    first = trace.first_report_after(substation, started)
    raise_ = trace.grant_received_at(substation, ended)
    if first is None or raise_ is None or raise_.received is None:
        return None
    trigger = trace.report_before(raise_.issued)
    if trigger is None:
        return None
    steps = {"report wait": first.sent - started}
    if trigger.substation != substation:
        # An acknowledgement: the substation that took a lowered share says it has.
        lowered = trace.grant_before(trigger.substation, trigger.sent)
        if lowered is None or lowered.received is None:
            return None
        origin = trace.report_before(lowered.issued)
        if origin is None or origin.substation != substation or origin.sent < first.sent - SAME:
            return None
        steps["earlier rounds"] = origin.sent - first.sent
        steps["report hop"] = origin.received - origin.sent
        steps["allocator (lower)"] = lowered.issued - origin.received
        steps["lowering grant hop"] = lowered.received - lowered.issued
        steps["lowered substation applies and acknowledges"] = trigger.sent - lowered.received
        steps["acknowledgement hop"] = trigger.received - trigger.sent
        steps["allocator (raise)"] = raise_.issued - trigger.received
    else:
        if trigger.sent < first.sent - SAME:
            return None
        steps["earlier rounds"] = trigger.sent - first.sent
        steps["report hop"] = trigger.received - trigger.sent
        steps["allocator (raise)"] = raise_.issued - trigger.received
    steps["raise grant hop"] = raise_.received - raise_.issued
    return steps
