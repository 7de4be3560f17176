"""Sending charge requests to the gateway on a schedule, and recording every answer."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import aiohttp
import yarl

from loadgen.schedules import constant_arrivals, poisson_arrivals
from smartgrid.config import ConfigError

__all__ = [
    "ERROR_KINDS",
    "GatewayUnreachable",
    "Outcome",
    "TokenRefused",
    "SendStats",
    "check_gateway",
    "constant_arrivals",
    "drive",
    "poisson_arrivals",
]

#: Outcome.error kinds, with what the summaries call them.
ERROR_KINDS = {
    "refused": "connection refused",
    "disconnected": "connection closed without an answer",
    "connection": "connection failed",
    "timeout": "timeout",
    "other": "other client error",
}
#: Kinds that mean nothing listens at the gateway's address (any more).
UNREACHABLE_KINDS = frozenset({"refused", "connection"})


class GatewayUnreachable(ConnectionError):
    pass


class TokenRefused(GatewayUnreachable):
    """The gateway answered 401 to loadgen's token, or to its lack of one."""


#: loadgen's client token for the gateway (``Authorization: Bearer``), or a file holding it.
TOKEN_ENV = "LOADGEN_TOKEN"
TOKEN_FILE_ENV = "LOADGEN_TOKEN_FILE"


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """LOADGEN_TOKEN, else the token in LOADGEN_TOKEN_FILE, else None (an open gateway)."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV].strip()
    path = environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise ConfigError(f"{TOKEN_FILE_ENV}={path!r}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{TOKEN_FILE_ENV}={path!r}: the file is empty")
    return token


@dataclass
class Outcome:
    """One request's answer: an HTTP status, or an error kind when there was no answer."""

    ev_id: str
    sent_at: float
    latency: float
    status: int | None = None
    error: str | None = None  # one of ERROR_KINDS: "refused", "disconnected", "timeout", ...
    request_id: str | None = None
    routed_to: str | None = None
    #: The answer's "error" code and its words ("ev_busy: ..."), or what went wrong.
    detail: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 202 and self.request_id is not None


@dataclass
class SendStats:
    """Running counters of a send, updated by the sender and read at any time from another
    thread (the live view) through :meth:`snapshot`."""

    started_at: float | None = None  # wall clock at offset 0
    started_mono: float | None = None
    sent: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # by HTTP status
    errors: Counter = field(default_factory=Counter)  # by kind
    latencies_ms: list[float] = field(default_factory=list)  # of accepted requests
    #: Seconds the schedule took: from offset 0 to the last send, or to where the schedule
    #: (its duration, or the next arrival after --count) would have had the next one.
    send_seconds: float | None = None
    sending_done: bool = False
    stopped_early: str | None = None
    last_answer_mono: float | None = None
    unreachable_in_row: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            if outcome.accepted:
                self.accepted += 1
                self.latencies_ms.append(outcome.latency * 1000)
            elif outcome.status is not None:
                self.rejected[outcome.status] += 1
            if outcome.error is not None:
                self.errors[outcome.error] += 1
            if outcome.error in UNREACHABLE_KINDS:
                self.unreachable_in_row += 1
            else:
                self.unreachable_in_row = 0
                self.last_answer_mono = time.monotonic()

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "sent": self.sent,
                "accepted": self.accepted,
                "rejected": dict(self.rejected),
                "errors": dict(self.errors),
                "latencies_ms": list(self.latencies_ms),
                "started_mono": self.started_mono,
                "sending_done": self.sending_done,
                "stopped_early": self.stopped_early,
            }


_CLOSED_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def _connection_kind(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None) or exc
    code = getattr(os_error, "errno", None)
    if isinstance(os_error, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return "refused"
    if (
        isinstance(exc, aiohttp.ServerDisconnectedError)
        or isinstance(os_error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError)
        or code in _CLOSED_ERRNOS
    ):
        return "disconnected"
    return "connection"


#: A request id nobody has: asking for it tells whether the gateway takes loadgen's token
#: (404, or 401 if it does not) without sending a charge request.
_PROBE_ID = "0" * 32


async def check_gateway(
    session: aiohttp.ClientSession, base_url: str, headers: Mapping[str, str] | None = None
) -> None:
    """The gateway is up (``/health``) and takes loadgen's credentials in ``headers``."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with session.get(f"{base_url}/health", timeout=timeout) as response:
            if response.status != 200:
                body = await response.text()
                raise GatewayUnreachable(
                    f"gateway at {base_url} is not ready: {response.status} {body.strip()[:200]}"
                )
        async with session.get(
            f"{base_url}/charge/{_PROBE_ID}", headers=headers, timeout=timeout
        ) as response:
            if response.status == 401:
                raise TokenRefused(_token_refusal(base_url, headers, await response.text()))
    except GatewayUnreachable:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise GatewayUnreachable(
            f"cannot reach the gateway at {base_url}: {exc or type(exc).__name__}"
        ) from None


def _token_refusal(base_url: str, headers: Mapping[str, str] | None, body: str) -> str:
    try:
        said = json.loads(body).get("detail") or body
    except (ValueError, AttributeError):
        said = body
    said = str(said).strip()[:200]
    if headers is None or "Authorization" not in headers:
        return (
            f"the gateway at {base_url} wants a client token (401: {said}); set {TOKEN_ENV}, "
            f"or {TOKEN_FILE_ENV} to a file holding it"
        )
    return (
        f"the gateway at {base_url} refused loadgen's token (401: {said}); check {TOKEN_ENV} "
        f"or {TOKEN_FILE_ENV} against the gateway's GATEWAY_TOKENS_FILE"
    )


def request_headers(token: str | None) -> dict[str, str]:
    """What every POST carries but its Idempotency-Key: built once, since at a thousand
    requests a second loadgen shares the machine with the stack it measures, and each object
    aiohttp need not build is CPU left to it."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def idempotency_keys(run: str | None = None) -> Callable[[int], str]:
    """The Idempotency-Key of request ``index`` of one run: unique to the run (loadgen does
    not retry, so no key is ever sent twice), at most 255 printable characters."""
    prefix = f"loadgen-{run or uuid.uuid4().hex}-"
    return lambda index: f"{prefix}{index + 1:06d}"


#: The answers a client gets for who it is and how much it sends, as the reports explain them.
CLIENT_REFUSALS = {
    401: "no client token, or a wrong one",
    409: "the EV already has an active request (one car, one session)",
    429: "over the client's rate limit (GATEWAY_RATE_LIMIT)",
}


async def _send_one(
    session: aiohttp.ClientSession,
    charge_url: yarl.URL,
    ev_id: str,
    timeout: aiohttp.ClientTimeout,
    body: dict | None = None,
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    sent_at = time.time()
    started = time.perf_counter()
    try:
        async with session.post(
            charge_url,
            data=json.dumps(body or {"ev_id": ev_id}).encode(),
            headers=headers or request_headers(None),
            timeout=timeout,
        ) as response:
            try:
                body = await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {}
            outcome = Outcome(ev_id, sent_at, time.perf_counter() - started, status=response.status)
            if isinstance(body, dict):
                outcome.request_id = body.get("request_id")
                outcome.routed_to = body.get("routed_to")
                code, words = body.get("error"), body.get("detail")
                if code and words:
                    outcome.detail = f"{code}: {words}"
                else:
                    outcome.detail = code or words
            return outcome
    except TimeoutError:
        return Outcome(
            ev_id,
            sent_at,
            time.perf_counter() - started,
            error="timeout",
            detail=f"no answer within {timeout.total:g} s",
        )
    except (aiohttp.ClientConnectionError, OSError) as exc:
        kind = _connection_kind(exc)
        return Outcome(
            ev_id,
            sent_at,
            time.perf_counter() - started,
            error=kind,
            detail=str(exc) or type(exc).__name__,
        )
    except aiohttp.ClientError as exc:
        return Outcome(
            ev_id,
            sent_at,
            time.perf_counter() - started,
            error="other",
            detail=str(exc) or type(exc).__name__,
        )


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
    stats: SendStats | None = None,
    give_up_after: float | None = None,
    interruptible: bool = False,
    body_for: Callable[[int, str], dict] | None = None,
    token: str | None = None,
    idempotency_key: Callable[[int], str] | None = None,
) -> list[Outcome]:
    """Send requests at the arrival offsets until ``count`` or ``duration`` is reached.

    Every answer, and every failure to get one, becomes an :class:`Outcome`; nothing raises
    once the gateway has answered its health check. With ``give_up_after``, sending stops
    early when the gateway has refused connections for that many seconds (it went away), and
    ``stats.stopped_early`` says so. With ``interruptible``, cancelling the task (Ctrl-C under
    ``asyncio.run``) stops sending too, and returns what was answered so far. ``body_for``
    gives the body of the request with that index and EV id (default: the EV id alone).
    Every request carries ``token`` as ``Authorization: Bearer`` (if given) and an
    ``Idempotency-Key`` of its own (:func:`idempotency_keys`, unless ``idempotency_key``).
    A 401 to the token at the start raises :class:`TokenRefused`.
    """
    stats = stats if stats is not None else SendStats()
    outcomes: list[Outcome] = []
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    charge_url = yarl.URL(f"{base_url}/charge")
    request_timeout = aiohttp.ClientTimeout(total=timeout)
    headers = request_headers(token)
    key_of = idempotency_key or idempotency_keys()
    # No cookies to keep (the gateway sets none), and every URL is already well formed.
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), requote_redirect_url=False
    ) as session:
        await check_gateway(session, base_url, headers)
        start = time.monotonic()
        stats.started_at, stats.started_mono = time.time(), start
        stats.last_answer_mono = start
        tasks: set[asyncio.Task] = set()

        async def one(ev_id: str, body: dict | None, key: str) -> None:
            try:
                outcome = await _send_one(
                    session,
                    charge_url,
                    ev_id,
                    request_timeout,
                    body,
                    {**headers, "Idempotency-Key": key},
                )
            finally:
                limit.release()
            outcomes.append(outcome)
            stats.record(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

        def gone() -> bool:
            return (
                give_up_after is not None
                and stats.unreachable_in_row > 0
                and time.monotonic() - (stats.last_answer_mono or start) >= give_up_after
            )

        nominal_end = 0.0  # where the schedule ends: its duration, or the next arrival's offset
        last_send = 0.0  # when the last request really went (later than its offset if behind)
        try:
            for index, offset in enumerate(arrivals):
                if count is not None and index >= count:
                    nominal_end = offset if duration is None else min(offset, duration)
                    break
                if duration is not None and offset >= duration:
                    nominal_end = duration
                    break
                delay = start + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await limit.acquire()  # beyond the concurrency limit, arrivals wait (and run late)
                if gone():
                    limit.release()
                    stats.stopped_early = f"the gateway refused connections for {give_up_after:g} s"
                    break
                ev_id = f"{ev_prefix}{index + 1:06d}"
                task = asyncio.create_task(
                    one(
                        ev_id,
                        body_for(index, ev_id) if body_for is not None else None,
                        key_of(index),
                    )
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                with stats.lock:
                    stats.sent += 1
                nominal_end = offset
                last_send = time.monotonic() - start
            else:  # the schedule ran out by itself
                nominal_end = duration if duration is not None else nominal_end
            if stats.stopped_early:
                stats.send_seconds = time.monotonic() - start
            else:
                stats.send_seconds = max(nominal_end, last_send)
            stats.sending_done = True
            if tasks:
                await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            stats.stopped_early = stats.stopped_early or "interrupted"
            if not stats.sending_done:
                stats.send_seconds = time.monotonic() - start
            stats.sending_done = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not interruptible:
                raise
    return outcomes
