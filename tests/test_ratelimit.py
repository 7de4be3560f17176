"""The per-client token bucket, on an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ratelimit import RateLimiter, per_worker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_through_then_the_rate_holds():
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0


def test_clients_have_buckets_of_their_own():
    limiter = RateLimiter(rate=1, burst=1, clock=Clock())
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    assert limiter.take("b") == 0.0
    assert limiter.take(None) == 0.0  # the open API is one client


def test_a_refused_request_does_not_use_up_a_token():
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, clock=clock)
    limiter.take("a")
    for _ in range(10):
        limiter.take("a")
    clock.now += 1.0
    assert limiter.take("a") == 0.0


def test_the_429_says_when_to_come_back_in_whole_seconds():
    limiter = RateLimiter(rate=4, clock=Clock())
    answer = limiter.answer(0.25)
    assert answer.status == 429 and answer.body["error"] == "rate_limited"
    assert answer.headers == {"Retry-After": "1"}
    assert limiter.answer(2.01).headers == {"Retry-After": "3"}


def test_the_burst_defaults_to_one_second_of_rate_and_is_at_least_one():
    assert RateLimiter(rate=5).burst == 5
    assert RateLimiter(rate=0.2).burst == 1
    with pytest.raises(ValueError):
        RateLimiter(rate=0)


def test_a_gateways_limit_is_divided_among_its_workers():
    assert per_worker(10, None, 2) == (5, None)
    assert per_worker(10, 20, 4) == (2.5, 5)
    assert per_worker(3, 1, 4) == (0.75, 1.0)
    assert per_worker(10, None, 0) == (10, None)


def test_buckets_of_idle_clients_are_forgotten_beyond_the_bound():
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, clock=clock, max_clients=2)
    limiter.take("a")
    limiter.take("b")
    clock.now += 5
    limiter.take("c")
    assert len(limiter) <= 2


@given(
    rate=st.floats(0.5, 50),
    burst=st.floats(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_over_any_stretch_no_more_than_the_burst_plus_the_rate_get_through(rate, burst, gaps):
    clock = Clock()
    limiter = RateLimiter(rate=rate, burst=burst, clock=clock)
    start = clock.now
    admitted = []
    for gap in gaps:
        clock.now += gap
        wait = limiter.take("a")
        assert wait >= 0
        if wait == 0:
            admitted.append(clock.now)
    # Any window [t0, t1] admits at most burst + rate * (t1 - t0) (plus rounding).
    for i, t0 in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= limiter.burst + rate * (admitted[j] - t0) + 1e-6
    assert clock.now >= start


@given(rate=st.floats(0.5, 50), waits=st.lists(st.floats(0, 3), max_size=50))
def test_a_client_that_waits_as_told_is_let_through(rate, waits):
    clock = Clock()
    limiter = RateLimiter(rate=rate, burst=1, clock=clock)
    for extra in waits:
        wait = limiter.take("a")
        if wait:
            clock.now += wait + 1e-9
            assert limiter.take("a") == 0.0
        clock.now += extra
