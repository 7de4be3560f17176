"""A load run: send requests, follow their events until they settle, build the report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from loadgen import evmix
from loadgen.observer import EventObserver, RequestFate
from loadgen.power import PowerReport, PowerTimeline, power_report
from loadgen.report import LoadTimeline, Report, build_report, timeline_of
from loadgen.schedules import (
    RateProfile,
    burst_arrivals,
    constant_arrivals,
    poisson_arrivals,
    profile_arrivals,
)
from loadgen.traffic import Outcome, SendStats, drive
from smartgrid.grid import load_topology
from smartgrid.senders import DEFAULT_EVENT_SENDERS

log = logging.getLogger(__name__)


@dataclass
class LoadSettings:
    """What to send, in wall-clock seconds (a time scale is applied before, by the caller)."""

    gateway_url: str = "http://localhost:8000"
    #: The client token sent as ``Authorization: Bearer`` (None: an open gateway).
    token: str | None = None
    amqp_url: str | None = None  # None: do not follow events
    #: As the services' DECLARE_TOPOLOGY and EVENT_SENDERS (the observer's broker user).
    declare_topology: bool = True
    event_senders: tuple[str, ...] = DEFAULT_EVENT_SENDERS
    interval: float = 2.0
    arrivals: str = "constant"  # or "poisson"
    duration: float | None = 300.0
    count: int | None = None
    concurrency: int = 256
    timeout: float = 10.0
    settle_timeout: float = 60.0
    sample_interval: float = 0.1
    seed: int = 1
    ev_prefix: str = "EV"
    #: ``burst`` requests at once every ``burst_every`` seconds (instead of ``interval``).
    burst: int | None = None
    burst_every: float | None = None
    #: A rate changing over time (instead of ``interval``); ``arrivals`` still chooses even
    #: or Poisson spacing.
    profile: RateProfile | None = None
    scenario: str = ""  # a name for the report, the live view and the plot
    live: bool = False  # show the live view (rich) on the terminal while running
    #: Stop sending once the gateway has refused connections for this long (it went away).
    give_up_after: float | None = None
    #: Ctrl-C stops sending (and waiting) and still reports, instead of raising.
    interruptible: bool = False
    #: Send the EV mix (loadgen.evmix): each request with its power fields, arriving like a
    #: day (unless ``profile`` says otherwise) of ``hour_seconds`` real seconds per hour, and
    #: report power (against the limits of ``topology_file``'s grid nodes, if any).
    ev_mix: bool = False
    hour_seconds: float = 3600.0
    topology_file: str | None = None


@dataclass
class LoadResult:
    report: Report
    outcomes: list[Outcome]
    #: What the lifecycle events said of each accepted request (empty when not observed).
    fates: dict[str, RequestFate] = field(default_factory=dict)
    #: Active sessions per substation over time (None when not observed).
    timeline: LoadTimeline | None = None
    #: Power over the run, against the limits (with the EV mix, when observed).
    power: PowerReport | None = None
    #: Every session's power over time, which ``power`` sums up (for further analysis).
    power_timeline: PowerTimeline | None = None


def arrivals_for(settings: LoadSettings) -> Iterator[float]:
    """The send offsets ``settings`` ask for (a pure generator, see loadgen.schedules)."""
    rng = evmix.arrival_rng(settings.seed)
    poisson = settings.arrivals == "poisson"
    if settings.burst:
        return burst_arrivals(settings.burst, settings.burst_every or settings.interval)
    if settings.profile is not None:
        return profile_arrivals(settings.profile, poisson=poisson, rng=rng)
    if settings.ev_mix:
        hours = min(24.0, (settings.duration or 24 * settings.hour_seconds) / settings.hour_seconds)
        day = evmix.daily_profile(1 / settings.interval, settings.hour_seconds, hours)
        return profile_arrivals(day, poisson=poisson, rng=rng)
    if poisson:
        return poisson_arrivals(1 / settings.interval, rng)
    return constant_arrivals(settings.interval)


def describe(settings: LoadSettings) -> dict:
    """The settings for the JSON report (without the broker URL, which holds a password, nor
    the token)."""
    described = asdict(settings)
    described.pop("amqp_url")
    described["token"] = settings.token is not None
    described["observed"] = settings.amqp_url is not None
    if settings.profile is not None:
        described["profile"] = {
            "name": settings.profile.name,
            "points": [list(p) for p in settings.profile.points],
        }
    return described


def run_load(settings: LoadSettings) -> LoadResult:
    observer = None
    if settings.amqp_url:
        observer = EventObserver(
            settings.amqp_url,
            declare_topology=settings.declare_topology,
            event_senders=settings.event_senders,
        )
        observer.start()
    stats = SendStats()
    view = None
    if settings.live:
        from loadgen.live import LiveView

        view = LiveView(
            stats,
            duration=settings.duration,
            count=settings.count,
            scenario=settings.scenario,
            observer=observer,
        )
    try:
        with view if view is not None else contextlib.nullcontext():
            outcomes = asyncio.run(
                drive(
                    settings.gateway_url.rstrip("/"),
                    arrivals_for(settings),
                    count=settings.count,
                    duration=settings.duration,
                    concurrency=settings.concurrency,
                    timeout=settings.timeout,
                    ev_prefix=settings.ev_prefix,
                    stats=stats,
                    give_up_after=settings.give_up_after,
                    interruptible=settings.interruptible,
                    body_for=evmix.mix_bodies(settings.seed) if settings.ev_mix else None,
                    token=settings.token,
                )
            )
            fates = None
            if observer is not None:
                accepted = [o.request_id for o in outcomes if o.accepted and o.request_id]
                fates = _settle(observer, accepted, settings, stats, view)
        capacities = observer.capacities() if observer is not None else None
        report = build_report(
            outcomes,
            fates,
            sample_interval=settings.sample_interval,
            capacities=capacities,
            send_seconds=stats.send_seconds,
        )
        report.scenario = settings.scenario
        report.started_at = stats.started_at
        report.stopped_early = stats.stopped_early
        report.settings = describe(settings)
        timeline = timeline_of(outcomes, fates, capacities or ()) if fates is not None else None
        power = power_timeline = None
        if settings.ev_mix and observer is not None and fates is not None:
            power_timeline = _power_timeline(fates, observer.power_events(), settings)
            power = power_report(power_timeline, settings.sample_interval)
        return LoadResult(report, outcomes, fates or {}, timeline, power, power_timeline)
    finally:
        if observer is not None:
            observer.stop()


def _power_timeline(
    fates: dict[str, RequestFate], power_events: list, settings: LoadSettings
) -> PowerTimeline:
    topology = load_topology(settings.topology_file) if settings.topology_file else None
    events = [e for fate in fates.values() for e in (*fate.started, *fate.completed)]
    return PowerTimeline.from_events([*events, *power_events], topology)


def _settle(
    observer: EventObserver, accepted: list[str], settings: LoadSettings, stats: SendStats, view
) -> dict[str, RequestFate]:
    """Wait until every accepted request has completed or been dead-lettered (or the settle
    timeout), then take their fates."""
    deadline = time.monotonic() + settings.settle_timeout
    try:
        if stats.stopped_early != "interrupted":
            while True:
                settled = observer.settled(accepted)
                if view is not None:
                    view.settling(settled, len(accepted))
                if settled >= len(accepted) or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        time.sleep(0.5)  # late duplicates, if any, show up in the report too
    except KeyboardInterrupt:
        if not settings.interruptible:
            raise
        stats.stopped_early = stats.stopped_early or "interrupted"
    return observer.fates(accepted)
