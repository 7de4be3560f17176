"""A load run: send requests, follow their events until they settle, build the report."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from loadgen.observer import EventObserver, RequestFate
from loadgen.report import Report, build_report
from loadgen.traffic import Outcome, constant_arrivals, drive, poisson_arrivals

log = logging.getLogger(__name__)

#: The original tester's case: one EV every 2 s for 5 minutes (sessions of 30 s on the
#: substations, metrics polled every 5 s).
SEED_SCENARIO = {"interval": 2.0, "duration": 300.0}


@dataclass
class LoadSettings:
    gateway_url: str = "http://localhost:8000"
    amqp_url: str | None = None  # None: do not follow events
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


@dataclass
class LoadResult:
    report: Report
    outcomes: list[Outcome]
    #: What the lifecycle events said of each accepted request (empty when not observed).
    fates: dict[str, RequestFate] = field(default_factory=dict)


def run_load(settings: LoadSettings) -> LoadResult:
    observer = None
    if settings.amqp_url:
        observer = EventObserver(settings.amqp_url)
        observer.start()
    try:
        if settings.arrivals == "poisson":
            arrivals = poisson_arrivals(1 / settings.interval, random.Random(settings.seed))
        else:
            arrivals = constant_arrivals(settings.interval)
        outcomes = asyncio.run(
            drive(
                settings.gateway_url.rstrip("/"),
                arrivals,
                count=settings.count,
                duration=settings.duration,
                concurrency=settings.concurrency,
                timeout=settings.timeout,
                ev_prefix=settings.ev_prefix,
            )
        )
        fates = None
        if observer is not None:
            accepted = [o.request_id for o in outcomes if o.accepted]
            deadline = time.monotonic() + settings.settle_timeout
            while observer.settled(accepted) < len(accepted) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)  # late duplicates, if any, show up in the report too
            fates = observer.fates(accepted)
        report = build_report(outcomes, fates, sample_interval=settings.sample_interval)
        return LoadResult(report, outcomes, fates or {})
    finally:
        if observer is not None:
            observer.stop()
