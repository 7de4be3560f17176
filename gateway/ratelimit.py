"""A token bucket per client: ``GATEWAY_RATE_LIMIT`` requests a second, with a burst.

Each client's bucket holds up to ``burst`` tokens and refills at ``rate`` a second; a request
takes one, or gets 429 with ``Retry-After`` (whole seconds, rounded up, as HTTP wants) saying
when the next token will be there.

Several worker processes (gunicorn's, or several replicas) do not share buckets. The gateway
divides the limit among its workers (:func:`per_worker`): each enforces ``rate / workers``, so a
client never gets more than the configured rate from one gateway, whichever worker its
connections land on. A client with a single keep-alive connection reaches one worker, and so at
most its share: set the limit with that in mind, or run one worker with more threads. A limit
shared exactly across processes or replicas would need shared state (a shared-memory table, or
the broker); the balancer is not the place, as the limit must answer before anything is
published.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from gateway.answers import Answer, error


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._clock = clock
        self._max_clients = max_clients
        #: client -> (tokens, when they were counted)
        self._buckets: dict[str | None, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many clients have a bucket now."""
        return len(self._buckets)

    def take(self, client: str | None) -> float:
        """Take a token for ``client``: 0.0 if it may go ahead, else the seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if len(self._buckets) > self._max_clients:
                self._forget_full(now)
            return wait

    def _forget_full(self, now: float) -> None:
        # A full bucket is the same as no bucket; clients come from the tokens file, so this
        # only matters for a very long list.
        for client, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self._buckets[client]

    def answer(self, wait: float) -> Answer:
        seconds = max(1, math.ceil(wait))
        return error(
            429,
            "rate_limited",
            f"more than {self.rate:g} requests a second; try again in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


def per_worker(rate: float, burst: float | None, workers: int) -> tuple[float, float | None]:
    """Each worker's share of a gateway-wide limit."""
    workers = max(1, workers)
    return rate / workers, None if burst is None else max(1.0, burst / workers)
