"""A picture of a run (matplotlib, Agg): load per substation over time, and the spread.

Top: active sessions per substation as steps, rebuilt exactly from the session events (like
the original Grafana graph of ``substation_current_load``), with each substation's capacity
dashed when known. Bottom: max - min active sessions across substations over time (and, when
capacities differ, the spread of utilisation). The title names the scenario and the headline
numbers.
"""

from __future__ import annotations

from pathlib import Path

from loadgen.power import PowerReport
from loadgen.report import (
    LoadTimeline,
    Report,
    capacities_for,
    fmt,
    percent,
    utilisation_spreads,
)


def headline(report: Report) -> str:
    parts = [f"sent {report.sent}, accepted {report.accepted}"]
    if report.accepted_per_s is not None:
        parts[0] += f" ({report.accepted_per_s:.2f}/s)"
    p99 = report.accept_latency_ms.get("p99")
    if p99 is not None:
        parts.append(f"accept p99 {p99:.1f} ms")
    b = report.balance
    if b.samples:
        parts.append(f"spread <= 1 in {fmt(percent(b.spread_within_1))}% (worst {b.spread_max})")
        if b.jain_mean is not None:
            parts.append(f"Jain {b.jain_mean:.3f}")
    if report.rejected or report.errors:
        parts.append(
            f"rejected {sum(report.rejected.values())}, errors {sum(report.errors.values())}"
        )
    return "; ".join(parts)


def write_plot(report: Report, timeline: LoadTimeline | None, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    figure.suptitle(f"{report.scenario or 'load run'}\n{headline(report)}", fontsize=11)

    span = timeline.span if timeline is not None else None
    if timeline is None or span is None:
        for ax in (top, bottom):
            ax.text(
                0.5,
                0.5,
                "no session events observed",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
    else:
        origin = report.started_at if report.started_at is not None else span[0]
        end = span[1] - origin
        for substation in timeline.substations:
            times = [0.0] + [t - origin for t in timeline.times[substation]] + [end]
            levels = [0] + timeline.levels[substation]
            levels.append(levels[-1])
            (line,) = top.step(times, levels, where="post", label=substation, linewidth=1.2)
            capacity = report.capacities.get(substation)
            if capacity:
                top.axhline(
                    capacity, color=line.get_color(), linestyle="--", linewidth=0.8, alpha=0.6
                )
        top.set_ylabel("active sessions")
        top.legend(loc="upper left", fontsize="small", ncols=min(len(timeline.substations), 5))
        top.grid(True, alpha=0.3)

        interval = report.balance.interval or 0.1
        samples = timeline.samples(interval)
        times = [at - origin for at, _ in samples]
        spreads = [max(loads) - min(loads) for _, loads in samples]
        (spread_line,) = bottom.step(
            times, spreads, where="post", color="tab:red", linewidth=1.0, label="max - min sessions"
        )
        bottom.axhline(1, color="grey", linestyle=":", linewidth=0.8)
        bottom.set_ylabel("max - min")
        bottom.set_ylim(bottom=0, top=max(spreads + [2]) + 0.5)
        bottom.grid(True, alpha=0.3)
        if report.balance.capacities_differ:
            caps = capacities_for(timeline.substations, report.capacities)
            if caps is not None:
                twin = bottom.twinx()
                shares = [s * 100 for s in utilisation_spreads(samples, caps)]
                (share_line,) = twin.step(
                    times,
                    shares,
                    where="post",
                    color="tab:blue",
                    linewidth=0.8,
                    alpha=0.7,
                    label="utilisation spread %",
                )
                twin.set_ylabel("utilisation spread %", color="tab:blue")
                twin.set_ylim(bottom=0)
                bottom.legend(
                    handles=[spread_line, share_line], loc="upper right", fontsize="small"
                )
    bottom.set_xlabel("seconds since the first request")
    figure.savefig(path)
    return path


def power_plot_path(path: str | Path) -> Path:
    """Where ``--plot FILE.png`` puts the power picture: FILE-power.png."""
    path = Path(path)
    return path.with_name(f"{path.stem}-power{path.suffix or '.png'}")


def write_power_plot(power: PowerReport, path: str | Path, title: str = "") -> Path:
    """Power per substation (top) and per grid node (bottom) against their limits (dashed),
    sampled as the report was."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    over = power.samples_over_limit
    figure.suptitle(
        f"{title or 'load run'}: power against limits\n{power.energy_kwh:.1f} kWh delivered;"
        f" {over} sample(s) over a limit",
        fontsize=11,
    )
    if not power.series:
        top.text(0.5, 0.5, "no sessions observed", ha="center", transform=top.transAxes)
    else:
        start = power.series[0].t
        times = [s.t - start for s in power.series]
        for ax, names, at in (
            (top, sorted(power.substations), lambda s: (s.substations, s.substation_limits)),
            (bottom, sorted(power.nodes), lambda s: (s.nodes, s.node_limits)),
        ):
            for name in names:
                drawn = ax.step(
                    times,
                    [at(s)[0].get(name, 0.0) for s in power.series],
                    where="post",
                    label=name,
                )
                limits = [at(s)[1].get(name) for s in power.series]
                if any(v is not None for v in limits):
                    ax.step(
                        times,
                        [float("nan") if v is None else v for v in limits],
                        where="post",
                        linestyle="--",
                        linewidth=1,
                        color=drawn[0].get_color(),
                    )
            ax.set_ylabel("kW")
            ax.set_ylim(bottom=0)
            if names:
                ax.legend(loc="upper right", fontsize=8)
        top.set_title("per substation (dashed: limit in force)", fontsize=9)
        bottom.set_title("per grid node (dashed: limit, overrides included)", fontsize=9)
        bottom.set_xlabel("seconds since the first session")
    figure.savefig(path)
    return path
