"""The end-of-run summary as rich tables (on a terminal; elsewhere
:func:`loadgen.report.render`)."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from loadgen.report import Report, fmt, percent, rejected_example, status_class
from loadgen.traffic import ERROR_KINDS

MIN_WIDTH = 72  # so that no table's title wraps


def _quantiles(values: dict[str, float | None], keys: tuple[str, ...], digits: int) -> str:
    return "  ".join(f"{k} {fmt(values.get(k), digits)}" for k in keys if k in values) or "-"


def summary(report: Report) -> RenderableType:
    title = f"load run: {report.scenario}" if report.scenario else "load run"
    run = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_header=False,
        title_justify="left",
        title_style="bold",
        min_width=MIN_WIDTH,
    )
    run.add_column(style="dim", justify="right")
    run.add_column()
    rate = (
        f"  ({fmt(report.send_rate, 2)}/s over {fmt(report.send_seconds)} s)"
        if report.send_seconds
        else ""
    )
    run.add_row("sent", f"{report.sent}{rate}")
    accepted_rate = f"  ({fmt(report.accepted_per_s, 2)}/s)" if report.send_seconds else ""
    run.add_row("accepted", Text(f"{report.accepted}{accepted_rate}", style="green"))
    classes: dict[str, dict[str, int]] = {}
    for status, n in sorted(report.rejected.items()):
        classes.setdefault(status_class(status), {})[status] = n
    if not classes:
        run.add_row("rejected", "0")
    for cls, by_status in sorted(classes.items()):
        detail = ", ".join(f"{status}: {n}" for status, n in by_status.items())
        run.add_row(
            f"rejected {cls}", Text(f"{sum(by_status.values())}  ({detail})", style="yellow")
        )
        for status in by_status:
            if status in report.rejected_examples:
                line = rejected_example(status, report.rejected_examples[status])
                run.add_row("", Text(line, style="dim"))
    if not report.errors:
        run.add_row("errors", "0")
    for kind, n in sorted(report.errors.items()):
        example = report.error_examples.get(kind)
        run.add_row(
            f"error: {ERROR_KINDS.get(kind, kind)}",
            Text(f"{n}" + (f"  (e.g. {example})" if example else ""), style="red"),
        )
    if report.stopped_early:
        run.add_row("stopped early", Text(report.stopped_early, style="bold yellow"))
    run.add_row(
        "accept latency (ms)", _quantiles(report.accept_latency_ms, ("p50", "p95", "p99", "max"), 1)
    )
    if report.routed_in_reply:  # only a gateway with ROUTED_WAIT > 0 waits for the decision
        run.add_row("routed in the 202 reply", f"{report.routed_in_reply}/{report.accepted}")
    if report.wait_to_start_s:
        run.add_row(
            "wait to start (s)", _quantiles(report.wait_to_start_s, ("p50", "p95", "p99"), 3)
        )
        fates = (
            f"completed once {report.completed_once}, more than once "
            f"{report.completed_more_than_once}, "
            f"started more than once {report.started_more_than_once}, dead-lettered "
            f"{report.dead_lettered}, "
            f"unfinished {report.unfinished}"
        )
        healthy = report.every_accepted_completed_once
        run.add_row("fates", Text(fates, style="green" if healthy else "bold red"))
    parts: list[RenderableType] = [run]

    b = report.balance
    names = sorted(set(report.requests_per_substation) | set(b.mean_utilisation))
    if names:
        per = Table(
            title="per substation",
            box=box.SIMPLE_HEAD,
            title_justify="left",
            title_style="bold",
            min_width=MIN_WIDTH,
        )
        per.add_column("substation", style="cyan")
        per.add_column("requests", justify="right")
        per.add_column("capacity", justify="right")
        per.add_column("mean utilisation", justify="right")
        for name in names:
            utilisation = b.mean_utilisation.get(name)
            per.add_row(
                name,
                str(report.requests_per_substation.get(name, 0)),
                str(report.capacities.get(name, "?")),
                "-" if utilisation is None else f"{utilisation * 100:.0f}%",
            )
        parts.append(per)

    if b.samples:
        bal = Table(
            title=f"load spread between substations ({b.samples} samples every "
            f"{b.interval * 1000:.0f} ms)",
            box=box.SIMPLE_HEAD,
            show_header=False,
            title_justify="left",
            title_style="bold",
            min_width=MIN_WIDTH,
        )
        bal.add_column(style="dim", justify="right")
        bal.add_column()
        bal.add_row("max - min <= 1", f"{fmt(percent(b.spread_within_1))}% of samples")
        bal.add_row("spread mean / worst", f"{fmt(b.spread_mean, 2)} / {b.spread_max}")
        bal.add_row("peak on one substation", str(b.peak_load))
        bal.add_row("peak-to-average", fmt(b.peak_to_average, 2))
        bal.add_row(
            "Jain's index (samples / run)", f"{fmt(b.jain_mean, 3)} / {fmt(b.jain_over_run, 3)}"
        )
        bal.add_row("coefficient of variation", fmt(b.cov_mean, 3))
        if b.utilisation_spread_mean is not None:
            label = "utilisation spread mean / worst" + (
                " (capacities differ)" if b.capacities_differ else ""
            )
            bal.add_row(
                label,
                f"{fmt(percent(b.utilisation_spread_mean))}% / "
                f"{fmt(percent(b.utilisation_spread_max))}%",
            )
        parts.append(bal)
    return Group(*parts)
