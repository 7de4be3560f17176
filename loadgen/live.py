"""The live view of a run (rich): progress, send rate, answers so far, latency, and a bar per
substation of its active sessions.

It never runs on the sender's event loop: rich's refresh thread calls :meth:`LiveView.render`
once a second, and that reads the sender's counters (:class:`loadgen.traffic.SendStats`,
under its lock, copied) and the observer's. The sender only increments counters.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from loadgen.report import percentile, status_class
from loadgen.traffic import ERROR_KINDS, SendStats


class SessionCounts(Protocol):
    """What the live view reads of an observer (loadgen.observer.EventObserver)."""

    def active_sessions(self) -> dict[str, int]: ...

    def capacities(self) -> dict[str, int]: ...


#: Seconds of history behind "current send rate".
RATE_WINDOW = 5.0


def _bar(total: float, done: float, text: str) -> Table:
    row = Table.grid(padding=(0, 1))
    row.add_row(ProgressBar(total=total, completed=done, width=40), Text(text))
    return row


class LiveView:
    def __init__(
        self,
        stats: SendStats,
        *,
        duration: float | None = None,
        count: int | None = None,
        scenario: str = "",
        observer: SessionCounts | None = None,
        console: Console | None = None,
        refresh_per_second: float = 1.0,
    ):
        self.stats = stats
        self.duration = duration
        self.count = count
        self.scenario = scenario
        self.observer = observer
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self._history: collections.deque[tuple[float, int]] = collections.deque()
        self._settling: tuple[int, int] | None = None
        self._peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None

    # -------------------------------------------------------------------- lifecycle
    def __enter__(self) -> LiveView:
        self._live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=self.refresh_per_second,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def settling(self, settled: int, total: int) -> None:
        """Sending is over; ``settled`` of ``total`` accepted requests have finished."""
        with self._lock:
            self._settling = (settled, total)

    # -------------------------------------------------------------------- rendering
    def current_rate(self, sent: int, now: float) -> float | None:
        """Requests per second over the last RATE_WINDOW seconds of calls."""
        with self._lock:
            self._history.append((now, sent))
            while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW:
                self._history.popleft()
            (t0, n0), (t1, n1) = self._history[0], self._history[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def render(self) -> RenderableType:
        snap = self.stats.snapshot()
        now = time.monotonic()
        started = snap["started_mono"]
        title = Text(self.scenario or "load run", style="bold")
        if started is None:
            return Group(title, Text("checking the gateway..."))
        elapsed = now - started
        with self._lock:
            settling = self._settling

        rows = Table.grid(padding=(0, 2))
        rows.add_column(justify="right", style="dim")
        rows.add_column()
        if not snap["sending_done"]:
            if self.duration:
                done, total, what = (
                    min(elapsed, self.duration),
                    self.duration,
                    f"{elapsed:.1f} / {self.duration:g} s",
                )
            elif self.count:
                done, total, what = snap["sent"], self.count, f"{snap['sent']} / {self.count} sent"
            else:
                done, total, what = 0, 1, f"{elapsed:.1f} s"
            rows.add_row("sending", _bar(total, done, what))
        elif settling is not None:
            settled, total = settling
            rows.add_row(
                "settling",
                _bar(
                    max(total, 1),
                    settled,
                    f"{settled} / {total} accepted requests finished ({elapsed:.1f} s)",
                ),
            )
        else:
            rows.add_row("waiting", Text(f"for the last answers ({elapsed:.1f} s)"))
        if snap["stopped_early"]:
            rows.add_row("stopped", Text(snap["stopped_early"], style="yellow"))

        rate = self.current_rate(snap["sent"], now)
        now_rate = (
            "" if snap["sending_done"] else f"  ({'-' if rate is None else f'{rate:.1f}'}/s now)"
        )
        rows.add_row("sent", Text(f"{snap['sent']}{now_rate}"))
        rows.add_row("accepted", Text(str(snap["accepted"]), style="green"))
        rejected = snap["rejected"]
        by_class: dict[str, int] = {}
        for status, n in rejected.items():
            by_class[status_class(status)] = by_class.get(status_class(status), 0) + n
        rows.add_row(
            "rejected",
            Text(
                f"{sum(rejected.values())}"
                + (
                    " (" + ", ".join(f"{c} {n}" for c, n in sorted(by_class.items())) + ")"
                    if rejected
                    else ""
                ),
                style="yellow" if rejected else "",
            ),
        )
        errors = snap["errors"]
        rows.add_row(
            "errors",
            Text(
                f"{sum(errors.values())}"
                + (
                    " ("
                    + ", ".join(f"{ERROR_KINDS.get(k, k)} {n}" for k, n in sorted(errors.items()))
                    + ")"
                    if errors
                    else ""
                ),
                style="red" if errors else "",
            ),
        )
        latencies = snap["latencies_ms"]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        rows.add_row(
            "accept latency",
            Text("-" if p50 is None else f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"),
        )
        parts: list[RenderableType] = [title, rows]
        if self.observer is not None:
            parts.append(self._substations())
        return Group(*parts)

    def _substations(self) -> RenderableType:
        active = self.observer.active_sessions() if self.observer else {}
        capacities = self.observer.capacities() if self.observer else {}
        names = sorted(set(active) | set(capacities))
        if not names:
            return Text("active sessions: none seen yet", style="dim")
        table = Table.grid(padding=(0, 2))
        table.add_column(style="cyan")
        table.add_column()
        table.add_column(justify="right")
        for name in names:
            self._peak[name] = max(self._peak.get(name, 0), active.get(name, 0))
        # a substation that has not announced its capacity yet is drawn on the common scale
        scale = max(max(capacities.values(), default=0), max(self._peak.values(), default=0), 1)
        for name in names:
            load = active.get(name, 0)
            total = capacities.get(name) or scale
            table.add_row(
                name,
                ProgressBar(total=total, completed=min(load, total), width=30),
                f"{load}/{capacities[name]}" if name in capacities else str(load),
            )
        return Group(Text("active sessions", style="dim"), table)
