"""Which dead substations' queues the balancer drains, and deletes, without a broker."""

from __future__ import annotations

from balancer.draining import DrainChanges, Draining, Retirement


def test_a_substation_presumed_dead_is_drained_once() -> None:
    draining: Draining[str] = Draining()
    changes = draining.update(presumed_dead={"s2", "s1"}, alive=set())
    assert changes.newly_dead == ["s1", "s2"] and changes.to_drain == ["s1", "s2"]
    draining.draining("s1", "tag-1")
    draining.draining("s2", "tag-2")
    again = draining.update(presumed_dead={"s1", "s2"}, alive=set())
    assert again.newly_dead == [] and again.to_drain == [] and again.revived == {}


def test_a_drain_that_could_not_start_is_started_at_the_next_update() -> None:
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={"s1"}, alive=set())  # not connected: nothing started
    assert draining.update(presumed_dead={"s1"}, alive=set()).to_drain == ["s1"]


def test_a_dead_substation_stays_dead_until_it_is_alive_again_even_once_forgotten() -> None:
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={"s1"}, alive=set())
    draining.draining("s1", "tag-1")
    # Forgotten by the fleet: no longer presumed dead, nor alive.
    assert draining.update(presumed_dead=set(), alive=set()).revived == {}
    assert "s1" in draining.dead
    back = draining.update(presumed_dead=set(), alive={"s1"})
    assert back.revived == {"s1": "tag-1"}
    assert draining.dead == set()


def test_after_a_reconnect_every_dead_substation_is_drained_again() -> None:
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={"s1"}, alive=set())
    draining.draining("s1", "tag-1")
    draining.connection_lost()
    changes = draining.update(presumed_dead=set(), alive=set())
    assert changes.to_drain == ["s1"] and changes.revived == {} and changes.newly_dead == []


def _forgotten_and_drained(substation: str = "s1") -> Draining[str]:
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={substation}, alive=set())
    draining.draining(substation, "tag-1")
    draining.forgotten(substation)
    return draining


def test_a_forgotten_dead_substations_empty_queue_is_deleted_and_no_longer_tracked():
    draining = _forgotten_and_drained()
    changes = draining.update(presumed_dead=set(), alive=set())
    assert changes.to_retire == {"s1": "tag-1"} and changes.to_drain == []
    # Checking: neither drained again nor retired twice while the answer is awaited.
    waiting = draining.update(presumed_dead=set(), alive=set())
    assert waiting.to_retire == {} and waiting.to_drain == []
    assert draining.checked("s1", messages=0, consumers=0) is Retirement.DELETE
    assert draining.dead == set()
    assert draining.update(presumed_dead=set(), alive=set()) == DrainChanges()


def test_a_substation_forgotten_before_it_was_presumed_dead_is_left_alone() -> None:
    draining: Draining[str] = Draining()
    draining.forgotten("s1")  # never drained here: nothing of this balancer's is in its queue
    changes = draining.update(presumed_dead=set(), alive=set())
    assert changes.to_retire == {} and changes.to_drain == []


def test_a_live_substation_is_never_retired() -> None:
    draining: Draining[str] = Draining()
    draining.update(presumed_dead=set(), alive={"s1"})
    draining.forgotten("s1")
    assert draining.update(presumed_dead=set(), alive={"s1"}).to_retire == {}


def test_a_queue_still_holding_requests_is_drained_again_and_checked_again():
    draining = _forgotten_and_drained()
    draining.update(presumed_dead=set(), alive=set())
    assert draining.checked("s1", messages=3, consumers=0) is Retirement.DRAIN_AGAIN
    assert "s1" in draining.dead
    again = draining.update(presumed_dead=set(), alive=set())
    assert again.to_drain == ["s1"] and again.to_retire == {}
    draining.draining("s1", "tag-2")
    assert draining.update(presumed_dead=set(), alive=set()).to_retire == {"s1": "tag-2"}
    assert draining.checked("s1", messages=0, consumers=0) is Retirement.DELETE


def test_a_queue_is_not_retired_while_a_request_taken_off_it_is_being_moved():
    draining = _forgotten_and_drained()
    draining.moving("s1", (1, 7))
    assert draining.update(presumed_dead=set(), alive=set()).to_retire == {}
    draining.settled("s1", (1, 7))
    assert draining.update(presumed_dead=set(), alive=set()).to_retire == {"s1": "tag-1"}


def test_a_delivery_still_being_moved_when_the_check_answers_keeps_the_queue():
    """Delivered to the drain just before it was cancelled: the queue's ready count misses it,
    and were its move to fail it would be given back to that queue."""
    draining = _forgotten_and_drained()
    draining.update(presumed_dead=set(), alive=set())
    draining.moving("s1", (1, 8))
    assert draining.checked("s1", messages=0, consumers=0) is Retirement.DRAIN_AGAIN
    draining.settled("s1", (1, 8))
    assert draining.update(presumed_dead=set(), alive=set()).to_drain == ["s1"]


def test_a_queue_someone_else_consumes_is_left_and_no_longer_tracked():
    """The substation is back under its id, or another balancer drains it (and deletes it
    when it forgets it in turn)."""
    draining = _forgotten_and_drained()
    draining.update(presumed_dead=set(), alive=set())
    assert draining.checked("s1", messages=2, consumers=1) is Retirement.LEAVE
    assert draining.dead == set()
    assert draining.update(presumed_dead=set(), alive=set()) == DrainChanges()


def test_a_substation_back_while_its_queue_is_checked_keeps_its_queue():
    draining = _forgotten_and_drained()
    draining.update(presumed_dead=set(), alive=set())
    back = draining.update(presumed_dead=set(), alive={"s1"})
    assert back.revived == {}  # its drain was already cancelled for the check
    assert draining.checked("s1", messages=0, consumers=0) is Retirement.LEAVE


def test_after_a_reconnect_a_retirement_starts_over():
    draining = _forgotten_and_drained()
    draining.moving("s1", (1, 9))
    draining.connection_lost()  # the broker gives the delivery back to the queue
    assert draining.checked("s1", messages=0, consumers=0) is Retirement.LEAVE
    assert "s1" in draining.dead
    assert draining.update(presumed_dead=set(), alive=set()).to_drain == ["s1"]
    draining.draining("s1", "tag-2")
    draining.settled("s1", (1, 9))  # the old delivery's late callback changes nothing
    assert draining.update(presumed_dead=set(), alive=set()).to_retire == {"s1": "tag-2"}
