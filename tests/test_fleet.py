"""The balancer's view of the substations: eligibility and corrected load estimates.

The fleet gets both clocks injected, so nothing here sleeps.
"""

from __future__ import annotations

import math
import random

import pytest

from balancer.fleet import Fleet
from balancer.strategies import corrected_min
from smartgrid import contract

STALE_AFTER = 2.0
FORGET_AFTER = 30.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def wall() -> Clock:
    return Clock(1_700_000_000.0)


@pytest.fixture
def fleet(clock: Clock, wall: Clock) -> Fleet:
    fleet = Fleet(stale_after=STALE_AFTER, forget_after=FORGET_AFTER, clock=clock, wall_clock=wall)
    fleet.add_static("s1", "http://127.0.0.1:9101/metrics")
    return fleet


def reading(
    load: float = 0,
    received: float = 0,
    completed: float = 0,
    *,
    capacity: int = 4,
    instance: str = "i1",
    substation: str = "s1",
    consuming: bool = True,
) -> contract.SubstationReading:
    return contract.SubstationReading(
        substation=substation,
        instance=instance,
        load=load,
        capacity=capacity,
        received=received,
        completed=completed,
        consuming=consuming,
    )


def started(request: str, expected_end: float, *, instance: str = "i1", substation: str = "s1"):
    return contract.SessionStarted(
        at=expected_end - 30,
        request_id=request.ljust(32, "0"),
        ev_id="EV1",
        substation=substation,
        instance=instance,
        accepted_at=expected_end - 31,
        expected_end=expected_end,
    )


def completed(request: str, *, instance: str = "i1", substation: str = "s1"):
    return contract.SessionCompleted(
        at=0.0,
        request_id=request.ljust(32, "0"),
        ev_id="EV1",
        substation=substation,
        instance=instance,
        started_at=0.0,
    )


def announced(
    substation: str = "s2", instance: str = "j1", capacity: int = 4
) -> contract.SubstationAnnounced:
    return contract.SubstationAnnounced(
        at=0.0,
        substation=substation,
        instance=instance,
        capacity=capacity,
        metrics_url=f"http://{substation}:9101/metrics",
        session_seconds=30.0,
    )


def estimate_of(fleet: Fleet, substation: str = "s1") -> float:
    (only,) = [c for c in fleet.candidates() if c.substation == substation]
    return only.estimate


def names(fleet: Fleet) -> set[str]:
    return {c.substation for c in fleet.candidates()}


# ------------------------------------------------------------------------------ eligibility
def test_a_substation_without_a_reading_is_never_a_candidate(fleet: Fleet):
    fleet.announced(announced("s2", capacity=8))
    fleet.routed("s1", 3)
    assert fleet.candidates() == []
    assert math.isnan(fleet.substations["s2"].estimate())  # unknown, not 0
    assert fleet.substations["s2"].capacity == 8


def test_a_reading_makes_a_substation_a_candidate_with_its_polled_numbers(fleet: Fleet):
    fleet.reading("s1", reading(load=3, received=10, completed=7, capacity=6))
    (candidate,) = fleet.candidates()
    assert (
        candidate.substation,
        candidate.capacity,
        candidate.estimate,
        candidate.polled_load,
    ) == ("s1", 6, 3, 3)
    assert candidate.next_end == math.inf


def test_a_reading_for_a_substation_the_fleet_does_not_know_is_ignored(fleet: Fleet):
    fleet.reading("ghost", reading(substation="ghost"))
    assert "ghost" not in fleet.substations
    assert fleet.candidates() == []


def test_a_stale_reading_excludes_the_substation_until_it_is_polled_again(
    fleet: Fleet, clock: Clock
):
    fleet.reading("s1", reading(load=1))
    clock.advance(STALE_AFTER)
    assert names(fleet) == {"s1"}
    clock.advance(0.001)
    assert fleet.candidates() == []
    fleet.reading("s1", reading(load=1))
    assert names(fleet) == {"s1"}


def test_a_failed_poll_keeps_the_last_reading_only_until_it_goes_stale(fleet: Fleet, clock: Clock):
    fleet.reading("s1", reading(load=1))
    fleet.reading_failed("s1", "connection refused")
    tracked = fleet.substations["s1"]
    assert (tracked.last_error, tracked.errors) == ("connection refused", 1)
    assert names(fleet) == {"s1"}
    clock.advance(STALE_AFTER + 1)
    assert fleet.candidates() == []


def test_mark_unknown_makes_a_substation_ineligible_until_its_next_reading(fleet: Fleet):
    fleet.reading("s1", reading(load=1))
    fleet.mark_unknown("s1")
    assert fleet.candidates() == []
    assert fleet.reading_age(fleet.substations["s1"]) == math.inf
    fleet.reading("s1", reading(load=1))
    assert names(fleet) == {"s1"}


# ------------------------------------------------------------------------------ estimates
def test_the_estimate_is_the_polled_load_plus_routed_since_minus_completed_since(fleet: Fleet):
    fleet.reading("s1", reading(load=2, received=10, completed=8))
    fleet.routed("s1", 3)
    fleet.session_completed(completed("a"))
    assert estimate_of(fleet) == 2 + 3 - 1
    # The next poll saw 2 of the 3 routed requests arrive and the completion: only the third is
    # still in flight, and the completion is in the polled load already.
    fleet.reading("s1", reading(load=3, received=12, completed=9))
    assert estimate_of(fleet) == 3 + 1 - 0


def test_requests_routed_without_a_new_poll_raise_the_estimate_one_each(fleet: Fleet):
    fleet.reading("s1", reading(load=1, received=4, completed=3))
    for expected in range(2, 7):
        fleet.routed("s1")
        assert estimate_of(fleet) == expected
    (candidate,) = fleet.candidates()
    assert candidate.polled_load == 1  # the stale view stays where it was


def test_a_request_that_did_not_stay_where_it_was_routed_no_longer_counts_there(fleet: Fleet):
    fleet.reading("s1", reading(load=1, received=4, completed=3))
    fleet.routed("s1")
    fleet.routed("s1")
    fleet.unrouted("s1")  # its forward failed
    assert estimate_of(fleet) == 2


def test_completions_reduce_the_estimate_but_never_below_zero(fleet: Fleet):
    fleet.reading("s1", reading(load=2, received=5, completed=3))
    fleet.session_completed(completed("a"))
    assert estimate_of(fleet) == 1
    fleet.session_completed(completed("b"))
    fleet.session_completed(completed("c"))
    assert estimate_of(fleet) == 0


def test_a_reading_that_already_counts_the_routed_requests_does_not_count_them_twice(fleet: Fleet):
    fleet.reading("s1", reading(load=0, received=20, completed=20))
    fleet.routed("s1", 5)
    assert estimate_of(fleet) == 5
    fleet.reading("s1", reading(load=5, received=25, completed=20))
    assert estimate_of(fleet) == 5
    fleet.reading("s1", reading(load=5, received=25, completed=20))
    assert estimate_of(fleet) == 5


def test_completions_counted_by_the_poll_and_seen_as_events_before_it_are_not_counted_twice(
    fleet: Fleet,
):
    fleet.reading("s1", reading(load=3, received=3, completed=0))
    fleet.session_completed(completed("a"))
    fleet.session_completed(completed("b"))
    assert estimate_of(fleet) == 1
    fleet.reading("s1", reading(load=1, received=3, completed=2))
    assert estimate_of(fleet) == 1


def test_requests_routed_before_the_first_reading_are_assumed_delivered(fleet: Fleet):
    fleet.routed("s1", 7)
    fleet.reading("s1", reading(load=2, received=40, completed=38))
    assert estimate_of(fleet) == 2
    fleet.routed("s1")
    assert estimate_of(fleet) == 3


def test_a_restarted_substation_is_rebased_on_its_new_counters(fleet: Fleet):
    fleet.reading("s1", reading(load=3, received=50, completed=47, instance="old"))
    fleet.routed("s1", 2)
    fleet.session_completed(completed("a", instance="old"))
    assert estimate_of(fleet) == 4
    fleet.reading("s1", reading(load=0, received=0, completed=0, instance="new"))
    assert estimate_of(fleet) == 0
    fleet.routed("s1")
    assert estimate_of(fleet) == 1
    fleet.session_completed(completed("b", instance="new"))
    assert estimate_of(fleet) == 0
    fleet.reading("s1", reading(load=0, received=1, completed=1, instance="new"))
    assert estimate_of(fleet) == 0


def test_a_completion_event_arriving_after_a_poll_that_counted_it_is_not_counted_twice(
    fleet: Fleet,
):
    fleet.reading("s1", reading(load=4, received=10, completed=6))  # full
    # A session ends: the substation's counter moves, the poll reads it, and only then does
    # the balancer get the session.completed event (it travels through the broker).
    fleet.reading("s1", reading(load=3, received=10, completed=7))
    fleet.session_completed(completed("a"))
    # The freed point gets the next request, which starts: the substation is full again.
    fleet.routed("s1")
    fleet.reading("s1", reading(load=4, received=11, completed=7))
    assert estimate_of(fleet) == 4
    assert corrected_min(fleet.candidates(), random.Random(0)) is None


def test_a_request_routed_by_another_balancer_and_polled_before_its_event_is_not_counted_twice(
    fleet: Fleet,
):
    fleet.reading("s1", reading(load=1, received=10, completed=9))
    # The other balancer's request arrives and is polled before its request.routed event.
    fleet.reading("s1", reading(load=2, received=11, completed=9))
    fleet.routed("s1")  # what BalancerService does on the other balancer's request.routed
    assert estimate_of(fleet) == 2


def test_a_completion_event_that_never_arrives_is_written_off_after_one_poll_interval(fleet: Fleet):
    fleet.reading("s1", reading(load=4, received=10, completed=6))
    # A session ends but its event is lost: the next poll sees it, the event never comes.
    fleet.reading("s1", reading(load=3, received=10, completed=7))
    fleet.reading("s1", reading(load=3, received=10, completed=7))
    # From now on each completion event seen counts again, one for one.
    fleet.session_completed(completed("x"))
    assert estimate_of(fleet) == 2


def test_a_request_reported_routed_or_completed_twice_counts_once(fleet: Fleet):
    fleet.reading("s1", reading(load=1, received=4, completed=3))
    for _ in range(3):  # an outbox resend, another balancer's event about our own decision
        fleet.routed("s1", request_id="r".ljust(32, "0"))
    assert estimate_of(fleet) == 2
    fleet.unrouted("s1", request_id="r".ljust(32, "0"))
    fleet.unrouted("s1", request_id="r".ljust(32, "0"))  # undone once only
    assert estimate_of(fleet) == 1
    for _ in range(3):
        fleet.session_completed(completed("a"))
    assert estimate_of(fleet) == 0
    assert fleet.substations["s1"].completed_seen == 1


def test_events_about_unknown_substations_or_instances_are_not_counted(fleet: Fleet):
    fleet.reading("s1", reading(load=2, received=4, completed=2))
    fleet.session_completed(completed("a", instance="forged"))
    fleet.session_completed(completed("b", substation="phantom"))
    fleet.session_started(started("c", 1e12, substation="phantom"))
    assert estimate_of(fleet) == 2
    assert not fleet.knows("phantom") and "phantom" not in fleet.substations


def test_forged_completions_are_corrected_by_the_polls_that_follow(fleet: Fleet):
    fleet.reading("s1", reading(load=4, received=10, completed=6))
    for n in range(100):  # forged, about requests that never ran there
        fleet.session_completed(completed(f"{n:032x}"))
    assert estimate_of(fleet) == 0  # pinned at 0 while it is full
    fleet.reading("s1", reading(load=4, received=10, completed=6))
    fleet.reading("s1", reading(load=4, received=10, completed=6))
    assert estimate_of(fleet) == 4
    fleet.session_completed(completed("real"))  # and real ones count again
    assert estimate_of(fleet) == 3


def test_forged_routed_events_are_corrected_by_what_the_queue_holds(fleet: Fleet):
    fleet.reading("s1", reading(load=1, received=10, completed=9))
    for n in range(100):  # forged request.routed: nothing reached the queue
        fleet.routed("s1", request_id=f"{n:032x}")
    assert estimate_of(fleet) == 101
    fleet.queue_depth("s1", queued=0, forwarding=0)
    fleet.reading("s1", reading(load=1, received=10, completed=9))
    fleet.queue_depth("s1", queued=0, forwarding=0)
    assert estimate_of(fleet) == 1
    # And the other way: requests in its queue that no event told of.
    fleet.reading("s1", reading(load=1, received=10, completed=9))
    fleet.queue_depth("s1", queued=3, forwarding=0)
    fleet.reading("s1", reading(load=1, received=10, completed=9))
    fleet.queue_depth("s1", queued=3, forwarding=0)
    assert estimate_of(fleet) == 4


def test_a_backlog_in_the_queue_is_not_mistaken_for_drift(fleet: Fleet):
    fleet.reading("s1", reading(load=4, received=10, completed=6))
    fleet.routed("s1", 5)  # waiting in its queue: it is full
    fleet.routed("s1")  # and one forward of ours not yet confirmed
    for _ in range(3):
        fleet.reading("s1", reading(load=4, received=10, completed=6))
        fleet.queue_depth("s1", queued=5, forwarding=1)
    assert estimate_of(fleet) == 10


# ------------------------------------------------------------------------------ session ends
def test_next_end_is_the_soonest_expected_end_of_a_running_session(fleet: Fleet, wall: Clock):
    fleet.reading("s1", reading(load=3))
    now = wall.now
    fleet.session_started(started("a", now + 30))
    fleet.session_started(started("b", now + 10))
    fleet.session_started(started("c", now + 20))
    assert fleet.candidates()[0].next_end == now + 10


def test_completed_sessions_are_dropped_from_next_end(fleet: Fleet, wall: Clock):
    fleet.reading("s1", reading(load=2))
    now = wall.now
    fleet.session_started(started("a", now + 30))
    fleet.session_started(started("b", now + 10))
    fleet.session_completed(completed("b"))
    assert fleet.candidates()[0].next_end == now + 30
    fleet.session_completed(completed("a"))
    assert fleet.candidates()[0].next_end == math.inf


def test_expected_ends_long_past_are_forgotten_even_without_a_completion(
    fleet: Fleet, wall: Clock, clock: Clock
):
    fleet.reading("s1", reading(load=1))
    fleet.session_started(started("a", wall.now + 5))
    wall.advance(5 + 61)
    assert fleet.candidates()[0].next_end == math.inf
    assert fleet.substations["s1"].running_ends == {}


def test_session_ends_of_a_previous_instance_are_dropped_on_restart(fleet: Fleet, wall: Clock):
    fleet.reading("s1", reading(load=1, instance="old"))
    fleet.session_started(started("a", wall.now + 5, instance="old"))
    fleet.reading("s1", reading(load=0, instance="new"))
    assert fleet.candidates()[0].next_end == math.inf


# ------------------------------------------------------------------------------ membership
def test_a_leaving_substation_is_excluded_until_a_new_instance_appears(fleet: Fleet):
    fleet.reading("s1", reading(load=1, instance="i1"))
    fleet.leaving(contract.SubstationLeaving(at=0.0, substation="s1", instance="i1"))
    assert fleet.candidates() == []
    fleet.reading("s1", reading(load=1, instance="i1"))  # still the one that said goodbye
    assert fleet.candidates() == []
    fleet.reading("s1", reading(load=0, instance="i2"))
    assert names(fleet) == {"s1"}


def test_a_leaving_its_own_page_contradicts_is_ignored_two_polls_later(fleet: Fleet):
    """A forged substation.leaving (any substation user may publish one) pauses a live
    substation for two polls at most, and never has its queue drained."""
    fleet.reading("s1", reading(load=1, instance="i1"))
    fleet.leaving(contract.SubstationLeaving(at=0.0, substation="s1", instance="i1"))
    assert fleet.candidates() == [] and fleet.presumed_dead(drain_after=60) == []
    fleet.reading("s1", reading(load=1, instance="i1"))  # maybe polled before the event
    assert fleet.candidates() == []
    fleet.reading("s1", reading(load=1, instance="i1"))  # surely after it, and consuming
    assert names(fleet) == {"s1"}
    assert fleet.substations["s1"].refuted_leavings == 1


def test_a_real_leaving_stops_consuming_and_has_its_queue_drained(fleet: Fleet):
    fleet.reading("s1", reading(load=1, instance="i1"))
    fleet.leaving(contract.SubstationLeaving(at=0.0, substation="s1", instance="i1"))
    fleet.reading("s1", reading(load=1, instance="i1", consuming=False))
    fleet.reading("s1", reading(load=0, instance="i1", consuming=False))
    assert fleet.candidates() == []
    assert fleet.presumed_dead(drain_after=60) == ["s1"]


def test_a_leaving_from_an_unknown_instance_changes_nothing(fleet: Fleet):
    fleet.reading("s1", reading(instance="i1"))
    fleet.leaving(contract.SubstationLeaving(at=0.0, substation="s1", instance="made-up"))
    assert names(fleet) == {"s1"}


def test_leaving_with_an_older_instance_does_not_exclude_the_current_one(fleet: Fleet):
    fleet.reading("s1", reading(instance="i2"))
    fleet.leaving(contract.SubstationLeaving(at=0.0, substation="s1", instance="i1"))
    assert names(fleet) == {"s1"}


def test_an_announcement_adds_a_poll_target_once(fleet: Fleet):
    assert fleet.announced(announced("s2")) is True
    assert ("s2", "http://s2:9101/metrics") in fleet.poll_targets
    assert fleet.announced(announced("s2")) is False
    assert len(fleet.poll_targets) == 2


def test_an_announcement_does_not_replace_the_url_of_a_static_substation(fleet: Fleet):
    assert fleet.announced(announced("s1")) is False
    assert fleet.poll_targets == (("s1", "http://127.0.0.1:9101/metrics"),)


def test_forget_silent_drops_announced_substations_that_went_quiet_but_never_static_ones(
    fleet: Fleet, clock: Clock
):
    fleet.announced(announced("quiet"))
    fleet.announced(announced("talking"))
    clock.advance(FORGET_AFTER - 1)
    fleet.reading("talking", reading(substation="talking"))
    clock.advance(2)
    assert fleet.forget_silent() == ["quiet"]
    assert set(fleet.substations) == {"s1", "talking"}
    assert {target for target, _ in fleet.poll_targets} == {"s1", "talking"}
    clock.advance(10 * FORGET_AFTER)
    assert fleet.forget_silent() == ["talking"]
    assert set(fleet.substations) == {"s1"}  # static, never read, still kept


def test_forget_silent_keeps_a_substation_announced_just_now(fleet: Fleet, clock: Clock):
    fleet.announced(announced("s2"))
    clock.advance(FORGET_AFTER)
    assert fleet.forget_silent() == []
    assert "s2" in fleet.substations


def cancelled(
    request: str, *, started_at: float | None = 0.0, instance: str = "i1", substation: str = "s1"
) -> contract.RequestCancelled:
    return contract.RequestCancelled(
        at=1.0,
        request_id=request.ljust(32, "0"),
        ev_id="EV1",
        source=substation,
        substation=substation,
        instance=instance,
        started_at=started_at,
    )


def test_a_session_stopped_by_a_cancel_frees_its_point_as_a_completion_does_once(fleet: Fleet):
    fleet.reading("s1", reading(load=2, received=5, completed=3))
    fleet.session_started(started("a", expected_end=100.0))
    fleet.request_cancelled(cancelled("a"))
    fleet.request_cancelled(cancelled("a"))  # a copy of the event
    fleet.session_completed(completed("a"))  # cannot happen, but counts once all the same
    assert estimate_of(fleet) == 1
    assert fleet.substations["s1"].next_end(0.0) == math.inf  # its end is no longer expected
    # The substation counts it as completed too: the next poll agrees.
    fleet.reading("s1", reading(load=1, received=5, completed=4))
    assert estimate_of(fleet) == 1


def test_a_request_cancelled_before_it_started_frees_no_point(fleet: Fleet):
    fleet.reading("s1", reading(load=2, received=5, completed=3))
    fleet.request_cancelled(cancelled("a", started_at=None))
    balancer_cancel = contract.RequestCancelled(
        at=1.0, request_id="b".ljust(32, "0"), ev_id="EV2", source="balancer-1"
    )
    fleet.request_cancelled(balancer_cancel)
    fleet.request_cancelled(cancelled("c", instance="unknown-instance"))
    assert estimate_of(fleet) == 2
