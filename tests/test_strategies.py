"""The balancing decisions, called directly: no I/O, no clocks, seeded randomness."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import random

import pytest

from balancer import strategies
from balancer.config import BalancerConfig
from balancer.power_routing import STRATEGY_NAMES
from balancer.strategies import (
    Candidate,
    RoundRobin,
    corrected_min,
    make_strategy,
    power_of_two,
    stale_min,
)
from tests.helpers import present


def candidate(
    name: str, capacity: int = 4, estimate: float = 0, polled_load: float | None = None, **kw
) -> Candidate:
    return Candidate(
        substation=name,
        capacity=capacity,
        estimate=estimate,
        polled_load=estimate if polled_load is None else polled_load,
        **kw,
    )


def route(
    strategy, candidates: list[Candidate], count: int, rng: random.Random
) -> collections.Counter:
    """Route ``count`` requests, raising the chosen candidate's estimate after each pick (as the
    fleet's in-flight correction does); the polled load stays as it was (no new poll)."""
    candidates = list(candidates)
    picks: collections.Counter = collections.Counter()
    for _ in range(count):
        choice = strategy(candidates, rng)
        if choice is None:
            break
        picks[choice.substation] += 1
        index = candidates.index(choice)
        candidates[index] = dataclasses.replace(choice, estimate=choice.estimate + 1)
    return picks


ALL_STRATEGY_NAMES = sorted(strategies.STRATEGIES)


# ------------------------------------------------------------------------------ corrected-min
def test_corrected_min_picks_the_lowest_utilisation_after_taking_the_request():
    options = [
        candidate("busy", capacity=4, estimate=2),  # 3/4
        candidate("best", capacity=4, estimate=1),  # 2/4
        candidate("big", capacity=10, estimate=5),  # 6/10
    ]
    for seed in range(20):
        assert present(corrected_min(options, random.Random(seed))).substation == "best"


def test_corrected_min_counts_the_request_itself_so_a_big_substation_beats_an_idle_small_one():
    # (0+1)/1 = 1.0 for the idle single point, (3+1)/8 = 0.5 for the larger one
    options = [
        candidate("tiny", capacity=1, estimate=0),
        candidate("large", capacity=8, estimate=3),
    ]
    assert present(corrected_min(options, random.Random(0))).substation == "large"


def test_corrected_min_fills_substations_in_proportion_to_their_capacity():
    options = [
        candidate("c2", capacity=2),
        candidate("c4", capacity=4),
        candidate("c8", capacity=8),
    ]
    assert route(corrected_min, options, 7, random.Random(1)) == {"c2": 1, "c4": 2, "c8": 4}
    assert route(corrected_min, options, 14, random.Random(2)) == {"c2": 2, "c4": 4, "c8": 8}


def test_corrected_min_holds_the_request_once_every_capacity_is_used():
    options = [
        candidate("c2", capacity=2),
        candidate("c4", capacity=4),
        candidate("c8", capacity=8),
    ]
    picks = route(corrected_min, options, 100, random.Random(3))
    assert sum(picks.values()) == 14


def test_corrected_min_breaks_a_tie_by_the_soonest_session_end():
    options = [
        candidate("later", estimate=2, next_end=200.0),
        candidate("sooner", estimate=2, next_end=100.0),
        candidate("unknown", estimate=2),
    ]
    for seed in range(50):
        assert present(corrected_min(options, random.Random(seed))).substation == "sooner"


def test_the_session_end_only_breaks_ties_and_never_beats_a_lower_utilisation():
    options = [candidate("ending-soon", estimate=3, next_end=1.0), candidate("emptier", estimate=1)]
    assert present(corrected_min(options, random.Random(0))).substation == "emptier"


def test_utilisations_equal_up_to_rounding_count_as_a_tie():
    # 1/3 and 2/6 differ in the last bit as floats; the session end must still decide.
    options = [
        candidate("thirds", capacity=3, estimate=0, next_end=50.0),
        candidate("sixths", capacity=6, estimate=1, next_end=10.0),
    ]
    assert present(corrected_min(options, random.Random(0))).substation == "sixths"


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_a_full_tie_is_broken_at_random_not_by_list_order(order: str):
    options = [candidate(name, estimate=1, next_end=10.0) for name in ("a", "b", "c")]
    if order == "reversed":
        options.reverse()

    def pick(seed: int) -> str:
        return present(corrected_min(options, random.Random(seed))).substation

    chosen = collections.Counter(pick(seed) for seed in range(300))
    assert set(chosen) == {"a", "b", "c"}
    assert min(chosen.values()) >= 50  # roughly uniform: 100 each expected


@pytest.mark.parametrize("estimate", [4, 5, 4.5])
def test_corrected_min_holds_the_request_when_every_candidate_is_full(estimate: float):
    options = [
        candidate("a", capacity=4, estimate=estimate),
        candidate("b", capacity=4, estimate=4),
    ]
    assert corrected_min(options, random.Random(0)) is None


def test_corrected_min_skips_a_full_candidate_even_when_it_would_end_a_session_soonest():
    options = [
        candidate("full", capacity=2, estimate=2, next_end=1.0),
        candidate("open", capacity=2, estimate=1),
    ]
    assert present(corrected_min(options, random.Random(0))).substation == "open"


@pytest.mark.parametrize("name", ALL_STRATEGY_NAMES)
def test_every_strategy_holds_when_there_are_no_candidates(name: str):
    assert make_strategy(name)([], random.Random(0)) is None


# ------------------------------------------------------------------------------ stale-min
def test_stale_min_decides_on_the_polled_load_and_ignores_the_estimate():
    options = [
        candidate("looks-idle", estimate=3, polled_load=0),
        candidate("really-idle", estimate=0, polled_load=2),
    ]
    assert present(stale_min(options, random.Random(0))).substation == "looks-idle"
    assert present(corrected_min(options, random.Random(0))).substation == "really-idle"


def test_stale_min_herds_every_request_between_polls_onto_one_substation():
    options = [candidate("a", estimate=1), candidate("b", estimate=0), candidate("c", estimate=1)]
    picks = route(stale_min, options, 10, random.Random(4))
    assert picks == {"b": 10}  # far beyond b's capacity of 4: the original design's failure


def test_corrected_min_spreads_the_same_requests_because_its_estimate_counts_them():
    options = [candidate("a", estimate=1), candidate("b", estimate=0), candidate("c", estimate=1)]
    picks = route(corrected_min, options, 10, random.Random(4))
    assert sum(picks.values()) == 10
    final = {name: picks[name] + start for name, start in (("a", 1), ("b", 0), ("c", 1))}
    assert max(final.values()) - min(final.values()) <= 1


# ------------------------------------------------------------------------------ p2c
def test_p2c_never_picks_a_full_candidate_while_an_open_one_exists():
    options = [candidate(f"full{i}", capacity=8, estimate=8) for i in range(5)]
    options.append(candidate("open", capacity=1, estimate=0))
    for seed in range(200):
        assert present(power_of_two(options, random.Random(seed))).substation == "open"


def test_p2c_holds_when_every_candidate_is_full():
    options = [candidate("a", capacity=2, estimate=2), candidate("b", capacity=3, estimate=3)]
    assert power_of_two(options, random.Random(0)) is None


def test_p2c_picks_the_better_of_the_two_it_samples():
    # With two candidates both are always sampled, so the better one always wins.
    options = [candidate("worse", estimate=3), candidate("better", estimate=1)]
    for seed in range(50):
        assert present(power_of_two(options, random.Random(seed))).substation == "better"


def test_p2c_samples_candidates_in_proportion_to_capacity():
    # Equal utilisation after the request ((e+1)/c == 1 for all), so the pick is one of the two
    # sampled at random. Drawing 2 without replacement with weights 2:4:8 includes each with
    # probability 41/105, 75/105, 94/105, so each is chosen half as often: 0.195, 0.357, 0.448
    # (uniform sampling would give 1/3 each).
    options = [candidate("c2", capacity=2, estimate=1), candidate("c4", capacity=4, estimate=3)]
    options.append(candidate("c8", capacity=8, estimate=7))
    rng = random.Random(20240601)
    trials = 20_000
    chosen = collections.Counter(
        present(power_of_two(options, rng)).substation for _ in range(trials)
    )
    shares = {name: count / trials for name, count in chosen.items()}
    expected = {"c2": 41 / 210, "c4": 75 / 210, "c8": 94 / 210}
    for name, share in expected.items():
        assert shares[name] == pytest.approx(share, abs=0.03), shares
    assert shares["c2"] < shares["c4"] < shares["c8"]


# ------------------------------------------------------------------------------ round robin
def test_round_robin_hands_out_requests_in_proportion_to_capacity():
    rr = RoundRobin()
    options = [
        candidate("c2", capacity=2),
        candidate("c4", capacity=4),
        candidate("c8", capacity=8),
    ]
    picks = collections.Counter(
        present(rr(options, random.Random(0))).substation for _ in range(14 * 10)
    )
    assert picks == {"c2": 20, "c4": 40, "c8": 80}


def test_round_robin_is_smooth_every_full_cycle_is_exactly_proportional_and_interleaved():
    rr = RoundRobin()
    options = [
        candidate("c2", capacity=2),
        candidate("c4", capacity=4),
        candidate("c8", capacity=8),
    ]
    sequence = [present(rr(options, random.Random(0))).substation for _ in range(14 * 5)]
    for start in range(0, len(sequence) - 14 + 1):
        assert collections.Counter(sequence[start : start + 14]) == {"c2": 2, "c4": 4, "c8": 8}
    longest_run = max(len(list(run)) for _, run in itertools.groupby(sequence))
    assert longest_run <= 2  # not 8 in a row for the biggest, as plain weighted RR would do


def test_round_robin_ignores_load():
    rr = RoundRobin()
    options = [candidate("a", estimate=4), candidate("b", estimate=0)]
    picks = collections.Counter(
        present(rr(options, random.Random(0))).substation for _ in range(10)
    )
    assert picks == {"a": 5, "b": 5}


def test_each_round_robin_from_make_strategy_has_its_own_state():
    options = [candidate("a"), candidate("b")]
    first, second = make_strategy("round-robin"), make_strategy("round-robin")
    assert first is not second
    assert first(options, random.Random(0)) == second(options, random.Random(0))


# ------------------------------------------------------------------------------ random
def test_weighted_random_picks_in_proportion_to_capacity():
    options = [candidate("c1", capacity=1), candidate("c3", capacity=3)]
    rng = random.Random(7)
    chosen = collections.Counter(
        present(strategies.weighted_random(options, rng)).substation for _ in range(8000)
    )
    assert chosen["c3"] / 8000 == pytest.approx(0.75, abs=0.03)


# ------------------------------------------------------------------------------ factory
@pytest.mark.parametrize("name", ALL_STRATEGY_NAMES)
def test_make_strategy_returns_a_working_strategy_for_every_known_name(name: str):
    chosen = make_strategy(name)([candidate("only")], random.Random(0))
    assert chosen is not None and chosen.substation == "only"


def test_the_balancers_default_is_power_min_and_every_count_strategy_is_a_choice_too():
    assert BalancerConfig().strategy == "power-min"
    assert set(STRATEGY_NAMES) == {"power-min", *strategies.STRATEGIES}


@pytest.mark.parametrize("name", ["", "least-loaded", "Corrected-Min", "corrected_min"])
def test_make_strategy_rejects_an_unknown_name_listing_the_choices(name: str):
    with pytest.raises(ValueError, match="unknown strategy") as caught:
        make_strategy(name)
    assert "corrected-min" in str(caught.value)


def test_a_candidate_without_a_known_session_end_sorts_last():
    assert candidate("x").next_end == math.inf
