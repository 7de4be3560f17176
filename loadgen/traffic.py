"""Sending charge requests to the gateway on a schedule, and recording every answer."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp


class GatewayUnreachable(ConnectionError):
    pass


@dataclass
class Outcome:
    """One request's answer: an HTTP status, or an error kind when there was no answer."""

    ev_id: str
    sent_at: float
    latency: float
    status: int | None = None
    error: str | None = None  # "connection", "timeout", "other"
    request_id: str | None = None
    routed_to: str | None = None
    detail: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 202 and self.request_id is not None


def constant_arrivals(interval: float) -> Iterator[float]:
    """Offsets (seconds from the start) of one arrival every ``interval`` seconds."""
    # index x interval, not a running sum: a sum drifts and adds an arrival at the very end.
    index = 0
    while True:
        yield index * interval
        index += 1


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)


async def check_gateway(session: aiohttp.ClientSession, base_url: str) -> None:
    try:
        async with session.get(f"{base_url}/health", timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                body = await response.text()
                raise GatewayUnreachable(f"gateway at {base_url} is not ready: {response.status} {body.strip()[:200]}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise GatewayUnreachable(f"cannot reach the gateway at {base_url}: {exc or type(exc).__name__}") from None


async def _send_one(
    session: aiohttp.ClientSession, base_url: str, ev_id: str, timeout: float
) -> Outcome:
    sent_at = time.time()
    started = time.perf_counter()
    try:
        async with session.post(
            f"{base_url}/charge", json={"ev_id": ev_id}, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            try:
                body = await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {}
            outcome = Outcome(ev_id, sent_at, time.perf_counter() - started, status=response.status)
            if isinstance(body, dict):
                outcome.request_id = body.get("request_id")
                outcome.routed_to = body.get("routed_to")
                outcome.detail = body.get("error")
            return outcome
    except TimeoutError:
        return Outcome(ev_id, sent_at, time.perf_counter() - started, error="timeout")
    except (aiohttp.ClientConnectionError, OSError) as exc:
        return Outcome(ev_id, sent_at, time.perf_counter() - started, error="connection", detail=str(exc))
    except aiohttp.ClientError as exc:
        return Outcome(ev_id, sent_at, time.perf_counter() - started, error="other", detail=str(exc))


async def drive(
    base_url: str,
    arrivals: Iterator[float],
    *,
    count: int | None,
    duration: float | None,
    concurrency: int,
    timeout: float,
    ev_prefix: str,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send requests at the arrival offsets until ``count`` or ``duration`` is reached."""
    outcomes: list[Outcome] = []
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await check_gateway(session, base_url)
        start = time.monotonic()
        tasks: list[asyncio.Task] = []

        async def one(ev_id: str) -> None:
            try:
                outcome = await _send_one(session, base_url, ev_id, timeout)
            finally:
                limit.release()
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

        for index, offset in enumerate(arrivals):
            if count is not None and index >= count:
                break
            if duration is not None and offset >= duration:
                break
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await limit.acquire()  # beyond the concurrency limit, arrivals wait (and run late)
            tasks.append(asyncio.create_task(one(f"{ev_prefix}{index + 1:06d}")))
        if tasks:
            await asyncio.gather(*tasks)
    return outcomes
