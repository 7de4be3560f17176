"""Which dead substations' queues the balancer drains, without a broker."""

from __future__ import annotations

from balancer.draining import Draining


def test_a_substation_presumed_dead_is_drained_once():
    draining: Draining[str] = Draining()
    changes = draining.update(presumed_dead={"s2", "s1"}, alive=set())
    assert changes.newly_dead == ["s1", "s2"] and changes.to_drain == ["s1", "s2"]
    draining.draining("s1", "tag-1")
    draining.draining("s2", "tag-2")
    again = draining.update(presumed_dead={"s1", "s2"}, alive=set())
    assert again.newly_dead == [] and again.to_drain == [] and again.revived == {}


def test_a_drain_that_could_not_start_is_started_at_the_next_update():
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={"s1"}, alive=set())  # not connected: nothing started
    assert draining.update(presumed_dead={"s1"}, alive=set()).to_drain == ["s1"]


def test_a_dead_substation_stays_dead_until_it_is_alive_again_even_once_forgotten():
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={"s1"}, alive=set())
    draining.draining("s1", "tag-1")
    # Forgotten by the fleet: no longer presumed dead, nor alive.
    assert draining.update(presumed_dead=set(), alive=set()).revived == {}
    assert "s1" in draining.dead
    back = draining.update(presumed_dead=set(), alive={"s1"})
    assert back.revived == {"s1": "tag-1"}
    assert draining.dead == set()


def test_after_a_reconnect_every_dead_substation_is_drained_again():
    draining: Draining[str] = Draining()
    draining.update(presumed_dead={"s1"}, alive=set())
    draining.draining("s1", "tag-1")
    draining.connection_lost()
    changes = draining.update(presumed_dead=set(), alive=set())
    assert changes.to_drain == ["s1"] and changes.revived == {} and changes.newly_dead == []
