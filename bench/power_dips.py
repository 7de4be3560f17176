"""Where a node's delivered power dips below 95% of what it could deliver, and why (issue 15).

``bench.power_stack`` samples delivered / deliverable power every 100 ms while a node's cars ask
at least 1.2 times its limit; a sample below 95% says nothing of how long the dip lasted nor
what started it. This reads the same run's raw measurements (``--raw``), where every session's
power is an exact step function stamped by its substation, and finds each dip exactly: from the
change that took the node below 95% to the one that brought it back. For each: how long it
lasted, how deep it went, what started it and what ended it, and, for a dip started by a session
that ended, the chain that followed: the freeing substation's report, its acknowledgement of the
lower share (its next report with a lower limit in force), and the raise elsewhere.

With the services' DEBUG logs of the same run (``bench.power_stack --trace --logs DIR``,
``--logs DIR`` here), each car arrival's dip is also taken apart into its hops
(``bench.share_trace``): the wait for the substation's report, the report's way to the
allocator, the allocator's turn, the lowering grant's way, the lowered substation's
acknowledgement and its way, the allocator's turn again, and the raise's way.

    .venv/bin/python -m bench.power_dips out/power-stack.pickle
    .venv/bin/python -m bench.power_dips out/power-stack-trace.pickle --logs out/trace-logs
"""

from __future__ import annotations

import argparse
import bisect
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench import power_stack, share_trace
from bench.power_stack import TOPOLOGY_FILE, deliverable, load_raw
from loadgen.power import PowerTimeline, SessionPower
from loadgen.report import percentile
from smartgrid.grid import Topology, load_topology
from smartgrid.power import kilowatts

THRESHOLD = 0.95
#: A step is "at" a dip's start or end when its substation stamped it this close.
SAME_INSTANT = 1e-4
_AFTER = 1e-6
#: A lower limit reported this long after the dip is another change, not its acknowledgement.
LATE = 0.5


@dataclass
class Dip:
    start: float
    end: float
    worst: float
    #: What changed at the start: "session ended", "car arrived", "share lowered".
    cause: str
    where: str
    #: What changed at the end (the substation whose power rose, or "demand fell").
    ended_by: str
    #: For a session that ended: seconds from the end to its substation's first report, to its
    #: acknowledgement of a lower share, and to the raise that ended the dip.
    chain: dict[str, float] = field(default_factory=dict)
    #: For a car's arrival, with the services' logs: seconds in each hop (share_trace.hops).
    hops: dict[str, float] | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


class _Site:
    def __init__(self, timeline: PowerTimeline, topology: Topology) -> None:
        self.timeline, self.topology = timeline, topology
        self.runs = timeline.runs()
        self.own = {n: kilowatts(node.limit_w) for n, node in topology.nodes.items()}
        changes = set()
        for run in self.runs:
            changes.add(run.started_at)
            if run.ended_at < math.inf:
                changes.add(run.ended_at)
            changes.update(t for t, _ in run.steps)
        self.changes = sorted(changes)

    def ratio(self, node: str, t: float) -> float | None:
        """Delivered / deliverable at ``t`` if the node's cars ask >= 1.2 x its limit."""
        power: dict[str, float] = defaultdict(float)
        wants: dict[str, float] = defaultdict(float)
        for run in self.runs:
            if run.started_at <= t < run.ended_at:
                for n in self.topology.path(run.substation):
                    power[n] += run.power_at(t)
                    wants[n] += run.max_kw
        if node not in wants:
            return None
        limits = {**self.own, **self.timeline.node_limits(t)}
        can = deliverable(self.topology, limits, wants)
        if wants[node] >= 1.2 * limits[node] and can[node] > 0:
            return power[node] / can[node]
        return None

    def low(self, node: str, t: float) -> bool:
        ratio = self.ratio(node, t)
        return ratio is not None and ratio < THRESHOLD - 1e-9

    def at(self, t: float) -> list[tuple[str, SessionPower, float, float]]:
        """What changed at ``t``: (kind, run, kW before, kW after)."""
        found = []
        for run in self.runs:
            if abs(run.started_at - t) < SAME_INSTANT:
                found.append(("start", run, 0.0, run.power_at(run.started_at)))
            elif abs(run.ended_at - t) < SAME_INSTANT:
                found.append(("end", run, run.power_at(run.ended_at - _AFTER), 0.0))
            else:
                for (_, before), (when, after) in zip(run.steps, run.steps[1:], strict=False):
                    if abs(when - t) < SAME_INSTANT and after != before:
                        found.append(("power", run, before, after))
        return found


def find_dips(
    timeline: PowerTimeline,
    topology: Topology,
    since: float,
    until: float,
    node: str = "site",
    excluded: list[tuple[float, float]] | None = None,
) -> tuple[list[Dip], float]:
    """Every dip of ``node`` below 95% between ``since`` and ``until``, exactly, and the time the
    node's cars asked at least 1.2 x its limit (what the dips are a share of)."""
    site = _Site(timeline, topology)
    changes = [t for t in site.changes if since <= t < until]
    excluded = excluded or []
    dips: list[Dip] = []
    asked = 0.0
    for t, following in zip(changes, [*changes[1:], until], strict=True):
        if any(a <= t < b for a, b in excluded):
            continue
        ratio = site.ratio(node, t + _AFTER)
        if ratio is None:
            continue
        asked += following - t
        if ratio >= THRESHOLD - 1e-9:
            continue
        if dips and dips[-1].end == t:
            dips[-1].end = following
            dips[-1].worst = min(dips[-1].worst, ratio)
        else:
            dips.append(Dip(t, following, ratio, "", "", ""))
    for dip in dips:
        _explain(site, dip)
    return dips, asked


def _explain(site: _Site, dip: Dip) -> None:
    started = site.at(dip.start)
    ends = [(r, before) for kind, r, before, _ in started if kind == "end" and before > 0]
    arrivals = [r for kind, r, _, _ in started if kind == "start"]
    lowered = [r for kind, r, before, after in started if kind == "power" and after < before]
    if ends:
        run = ends[0][0]
        dip.cause, dip.where = "session ended", run.substation
        dip.chain = _chain_after_end(site, run.substation, dip.start, dip.end)
    elif arrivals:
        dip.cause, dip.where = "car arrived", arrivals[0].substation
    elif lowered:
        dip.cause, dip.where = "share lowered", lowered[0].substation
    else:
        dip.cause, dip.where = "other", ""
    raised = [
        r.substation
        for kind, r, before, after in site.at(dip.end)
        if kind in ("power", "start") and after > before
    ]
    dip.ended_by = raised[0] if raised else "demand fell"


def _chain_after_end(site: _Site, substation: str, ended: float, dip_end: float) -> dict:
    reports = site.timeline._limits.get(substation, [])
    times = [t for t, _ in reports]
    first = bisect.bisect_left(times, ended)
    chain: dict[str, float] = {}
    if first < len(reports):
        chain["report"] = reports[first][0] - ended
        before = reports[first - 1][1] if first > 0 else math.inf
        limit = reports[first][1]
        if limit < before - 1e-6:
            # It gave the unused part of its share back in that report (leases.release).
            chain["released in the report"] = chain["report"]
        else:
            for when, later in reports[first + 1 :]:
                if when > dip_end + LATE:
                    break
                if later < limit - 1e-6:
                    chain["lowering acknowledged"] = when - ended
                    break
    chain["raised elsewhere"] = dip_end - ended
    return chain


def summary(dips: list[Dip], asked: float) -> dict:
    by_cause: dict[str, list[Dip]] = defaultdict(list)
    for dip in dips:
        by_cause[dip.cause].append(dip)
    below = sum(d.seconds for d in dips)
    return {
        "seconds_asked": asked,
        "seconds_below": below,
        "share_of_time_below": below / asked if asked else None,
        "dips": len(dips),
        "by_cause": {
            cause: {
                "dips": len(found),
                "seconds": sum(d.seconds for d in found),
                **_spread([d.seconds for d in found]),
                **_chain_medians(found),
            }
            for cause, found in sorted(by_cause.items())
        },
        "arrival_hops": _hop_spreads([d for d in dips if d.hops]),
    }


def _spread(seconds: list[float]) -> dict:
    p99 = percentile(seconds, 99)
    assert p99 is not None, "a spread of no dips"
    return {
        "median_ms": 1000 * statistics.median(seconds),
        "p99_ms": 1000 * p99,
        "max_ms": 1000 * max(seconds),
    }


def _hop_spreads(dips: list[Dip]) -> dict:
    """Per hop, over the dips taken apart: its spread, and how often it was the longest."""
    per_hop: dict[str, list[float]] = defaultdict(list)
    longest: dict[str, int] = defaultdict(int)
    for dip in dips:
        assert dip.hops is not None
        for hop, seconds in dip.hops.items():
            per_hop[hop].append(seconds)
        longest[max(dip.hops, key=lambda h: dip.hops[h])] += 1  # type: ignore[index]
    return {
        hop: {**_spread(seconds), "n": len(seconds), "longest_in": longest[hop]}
        for hop, seconds in per_hop.items()
    }


def _chain_medians(dips: list[Dip]) -> dict:
    steps: dict[str, list[float]] = defaultdict(list)
    for dip in dips:
        for step, seconds in dip.chain.items():
            steps[step].append(seconds)
    return {f"{step} median_ms": 1000 * statistics.median(v) for step, v in steps.items()}


def analyse(raw: dict, node: str = "site", trace: share_trace.Trace | None = None) -> dict:
    topology = load_topology(TOPOLOGY_FILE)
    found = {}
    for phase in ("day", "overload"):
        if phase not in raw:
            continue
        since, until = raw[f"{phase}_span"]
        excluded = []
        if phase == "day" and raw.get("frozen"):
            excluded.append((raw["frozen"][0], raw["frozen"][1] + power_stack.LEASE + 1))
        if phase == "day" and raw.get("killed"):
            excluded.append((raw["killed"][1], raw["killed"][2] + power_stack.LEASE + 2))
        dips, asked = find_dips(raw[phase].power_timeline, topology, since, until, node, excluded)
        if trace is not None:
            for dip in dips:
                if dip.cause == "car arrived" and dip.ended_by == dip.where:
                    dip.hops = share_trace.hops(trace, dip.where, dip.start, dip.end)
        found[phase] = {"summary": summary(dips, asked), "dips": dips, "since": since}
    return found


def render(found: dict, node: str) -> str:
    lines = []
    for phase, result in found.items():
        s = result["summary"]
        share = s["share_of_time_below"]
        lines.append(
            f"== {phase}, {node}: {s['dips']} dips below {THRESHOLD:.0%}, "
            f"{s['seconds_below']:.3f} s of {s['seconds_asked']:.1f} s asked "
            f"({share:.2%} of the time)"
            if share is not None
            else f"== {phase}, {node}: never asked 1.2 x its limit"
        )
        for cause, c in s["by_cause"].items():
            chain = ", ".join(
                f"{k.removesuffix(' median_ms')} {v:.1f}"
                for k, v in c.items()
                if k.endswith("median_ms") and k != "median_ms"
            )
            after = f"; after the end (median ms): {chain}" if chain else ""
            lines.append(
                f"  {cause}: {c['dips']} dips, {c['seconds']:.3f} s; median "
                f"{c['median_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, max {c['max_ms']:.1f} ms"
                f"{after}"
            )
        if s["arrival_hops"]:
            lines.append("  a car's arrival, hop by hop (ms: median, p99, max; longest in n dips):")
            for hop, h in s["arrival_hops"].items():
                lines.append(
                    f"    {hop:45} {h['median_ms']:6.1f} {h['p99_ms']:6.1f} {h['max_ms']:6.1f}"
                    f"  (of {h['n']}, longest in {h['longest_in']})"
                )
        for dip in result["dips"]:
            chain = ", ".join(
                f"{k} {1000 * v:.1f} ms" for k, v in {**dip.chain, **(dip.hops or {})}.items()
            )
            lines.append(
                f"  {dip.start - result['since']:8.3f} s  {1000 * dip.seconds:7.1f} ms  worst "
                f"{dip.worst:.3f}  {dip.cause} at {dip.where or '-'}, ended by "
                f"{dip.ended_by}" + (f" ({chain})" if chain else "")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.power_dips", description=__doc__)
    parser.add_argument("raw", help="a bench.power_stack run's raw measurements (--raw)")
    parser.add_argument("--node", default="site")
    parser.add_argument(
        "--logs", help="the same run's services' logs (bench.power_stack --trace --logs DIR)"
    )
    args = parser.parse_args(argv)
    trace = share_trace.read(Path(args.logs)) if args.logs else None
    print(render(analyse(load_raw(args.raw), args.node, trace), args.node))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
