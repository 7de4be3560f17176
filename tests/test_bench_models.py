"""The benchmarks' own arithmetic: the ideal-wait simulations that strategies are judged
against, and how the latency sweep reads its rows. Pure functions, no stack."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.balance import simulate_jsq, simulate_one_queue
from bench.latency import highest_within


def test_one_queue_gives_each_arrival_the_first_point_to_free_anywhere():
    # Two points, 1 s sessions: the third and fourth arrivals take the points freed at
    # t = 1.0 and t = 1.1.
    assert simulate_one_queue([0.0, 0.1, 0.2, 0.3], (1, 1), 1.0) == pytest.approx(
        [0.0, 0.0, 0.8, 0.8]
    )


def test_jsq_can_queue_behind_a_substation_while_a_point_frees_sooner_elsewhere():
    # a runs 0.0-1.0, b 0.5-1.5; the arrival at 0.6 queues at a (a tie, lowest index) and runs
    # 1.0-2.0. At 1.1 both substations hold one session: JSQ sees a tie again and queues at a
    # until 2.0, while b frees at 1.5. Counting sessions does not see which ends first.
    arrivals = [0.0, 0.5, 0.6, 1.1]
    assert simulate_jsq(arrivals, (1, 1), 1.0) == pytest.approx([0.0, 0.0, 0.4, 0.9])
    assert simulate_one_queue(arrivals, (1, 1), 1.0) == pytest.approx([0.0, 0.0, 0.4, 0.4])


@given(
    gaps=st.lists(
        st.floats(min_value=0.0, max_value=2.0, allow_nan=False), min_size=1, max_size=60
    ),
    capacities=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=4),
    session=st.floats(min_value=0.1, max_value=5.0, allow_nan=False),
)
def test_no_dispatcher_beats_one_shared_queue_on_mean_wait(gaps, capacities, session):
    arrivals, at = [], 0.0
    for gap in gaps:
        at += gap
        arrivals.append(at)
    one_queue = simulate_one_queue(arrivals, tuple(capacities), session)
    jsq = simulate_jsq(arrivals, tuple(capacities), session)
    assert len(one_queue) == len(jsq) == len(arrivals)
    assert min(one_queue) >= 0
    assert statistics.fmean(one_queue) <= statistics.fmean(jsq) + 1e-9


def _row(rate: float, p99: float | None, failed: int = 0) -> dict:
    return {"offered_per_s": rate, "accept_latency_ms": {"p99": p99}, "failed": failed}


def test_the_highest_rate_within_target_is_the_last_before_the_first_miss():
    rows = [_row(300, 60.0), _row(100, 10.0), _row(200, 45.0), _row(400, 30.0)]
    # 400/s came in under the target by luck after 300/s missed it: it does not count.
    assert highest_within(rows, 50.0) == 200


def test_a_rate_with_failed_requests_or_no_latency_is_a_miss():
    assert highest_within([_row(100, 10.0), _row(200, 20.0, failed=3)], 50.0) == 100
    assert highest_within([_row(100, None)], 50.0) is None
    assert highest_within([_row(100, 80.0)], 50.0) is None
