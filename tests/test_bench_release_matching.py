"""The experiment of matching held requests to what freed (bench/release_matching.py): with a
window of 1 it is the balancer's release, and no request is overtaken in its class more than
its bound allows. Pure, no stack."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.priorities import ReleaseScheduler, release
from bench.power_balance import ev_site
from bench.power_sim import DaySimulation, Matching, loadgen_trace
from bench.release_matching import Matcher, matched_release
from smartgrid.power import CLASS_ORDER, Priority

no_deadline = settings(deadline=None)

#: A held request in these tests: (its number in arrival order, its kW).
Held = tuple[int, int]

#: Held requests: (class, kW) in arrival order; then the kW that frees at each release call.
requests = st.lists(st.tuples(st.sampled_from(CLASS_ORDER), st.integers(1, 10)), max_size=30)
freed = st.lists(st.integers(0, 15), min_size=1, max_size=10)


def play(held, budgets, run):
    """Hold ``held`` (numbered in arrival order), free each budget in turn and release with
    ``run``; the released numbers in order."""
    waiting: dict[Priority, deque[Held]] = {c: deque() for c in CLASS_ORDER}
    for number, (priority, kw) in enumerate(held):
        waiting[priority].append((number, kw))
    order = []
    left = [0]
    for budget in budgets:
        left[0] += budget

        def admit(item):
            left[0] -= item[1]
            order.append(item[0])

        run(waiting, lambda item: item[1] <= left[0], admit)
    return order


@no_deadline
@given(requests, freed)
def test_a_window_of_one_releases_as_the_balancer_does(held, budgets):
    ours, theirs = ReleaseScheduler(), ReleaseScheduler()
    matcher: Matcher[Held] = Matcher(lambda i: i[0], window=1, max_passes=3)
    assert play(
        held,
        budgets,
        lambda w, fits, admit: matched_release(ours, w, fits, admit, matcher, lambda i: -i[1]),
    ) == play(held, budgets, lambda w, fits, admit: release(theirs, w, fits, admit))


@no_deadline
@given(requests, freed, st.integers(1, 8), st.integers(0, 5))
def test_no_request_is_overtaken_in_its_class_more_than_the_bound(held, budgets, window, passes):
    matcher: Matcher[Held] = Matcher(lambda i: i[0], window, passes)
    # Prefer the smallest: the large ones at the head are the ones overtaken.
    order = play(
        held,
        budgets,
        lambda w, fits, admit: matched_release(
            ReleaseScheduler(), w, fits, admit, matcher, lambda i: -i[1]
        ),
    )
    position = {number: at for at, number in enumerate(order)}
    for number, (priority, _) in enumerate(held):
        overtaken_by = [
            later
            for later, (other, _) in enumerate(held)
            if later > number
            and other is priority
            and later in position
            and position[later] < position.get(number, len(order))
        ]
        assert len(overtaken_by) <= passes


def test_the_matched_loop_with_a_window_of_one_and_no_hold_is_the_balancers_release():
    trace = loadgen_trace(peak_rate=13 / 3.6, hour_seconds=3.6, hours=8, seed=3)

    def day(matching: Matching):
        sim = DaySimulation(
            ev_site(), trace, "power-min", hour_seconds=3.6, poll_interval=5.0, matching=matching
        )
        return [(o.substation, o.started_at, o.ended_at) for o in sim.run().outcomes]

    # A hold that never holds takes the matched loop, at a window of 1.
    assert day(Matching(hold_below=0.5, hold_minutes=0)) == day(Matching())


def test_within_the_window_the_best_suited_goes_first_and_the_oldest_on_a_tie():
    matcher: Matcher[Held] = Matcher(lambda i: i[0], window=3, max_passes=5)
    # Suits best the smallest; 3 and 4 are equal; 5 is beyond the window until one leaves.
    order = play(
        [(Priority.STANDARD, kw) for kw in (5, 2, 4, 4, 1)],
        [100],
        lambda w, fits, admit: matched_release(
            ReleaseScheduler(), w, fits, admit, matcher, lambda i: -i[1]
        ),
    )
    assert order == [1, 2, 4, 3, 0]
