"""A gateway's doubts about the history (gateway/doubts.py), and the events the balancer and
the substations tell again (smartgrid/told.py): pure, no broker."""

from __future__ import annotations

from gateway.doubts import Doubts
from gateway.history import RequestHistory
from smartgrid import contract
from smartgrid.told import Told


def request(request_id: str = "r1") -> contract.ChargeRequest:
    return contract.ChargeRequest(request_id, "EV1", 100.0)


def doubts(**kwargs) -> Doubts:
    return Doubts(copy_after=10, check_after=30, max_interval=100, rng=lambda: 0.0, **kwargs)


def test_a_request_not_read_back_is_sent_again_at_doubling_intervals_until_it_is_read():
    d = doubts()
    d.accepted(request(), now=100)
    assert d.due(109).copies == []
    assert [r.request_id for r in d.due(110).copies] == ["r1"]
    assert d.due(129).copies == []  # 20 s after the first copy, not 10
    assert [r.request_id for r in d.due(130).copies] == ["r1"]
    d.copy_read("r1")
    assert d.due(1_000).copies == []


def test_a_request_read_back_in_time_is_never_sent_again():
    d = doubts()
    d.accepted(request(), now=100)
    d.copy_read("r1")
    assert d.due(1_000) == d.due(2_000)
    assert d.due(1_000).copies == []


def test_an_active_request_standing_still_is_asked_about_at_doubling_intervals_up_to_the_max():
    d = doubts()
    d.moved("r1", active=True, now=0, quiet_from=0)
    asked = [t for t in range(0, 400) if d.due(t).status_requests == ["r1"]]
    assert asked == [30, 90, 190, 290, 390]


def test_word_of_a_request_puts_its_next_ask_off_and_its_end_stops_the_asking():
    d = doubts()
    d.moved("r1", active=True, now=0, quiet_from=0)
    d.moved("r1", active=True, now=25, quiet_from=25)
    assert d.due(30).status_requests == []
    assert d.due(55).status_requests == ["r1"]
    d.moved("r1", active=False, now=56, quiet_from=56)
    assert d.due(10_000).status_requests == []
    assert len(d) == 0


def test_a_charging_request_is_not_doubted_before_its_expected_end():
    d = doubts()
    d.moved("r1", active=True, now=0, quiet_from=3_600)
    assert d.due(3_629).status_requests == []
    assert d.due(3_630).status_requests == ["r1"]


def test_the_first_ask_is_spread_over_half_an_interval():
    d = Doubts(check_after=30, rng=lambda: 1.0)
    d.moved("r1", active=True, now=0, quiet_from=0)
    assert d.due(44).status_requests == []
    assert d.due(45).status_requests == ["r1"]


def test_many_moves_of_few_requests_keep_one_entry_each():
    d = doubts()
    for t in range(100_000):
        d.moved(f"r{t % 10}", active=True, now=t, quiet_from=t)
    assert len(d) == 10
    assert sorted(d.due(10**9).status_requests) == sorted(f"r{i}" for i in range(10))


def test_the_history_tells_its_doubts_of_every_move_and_of_nothing_else():
    d = doubts()
    history = RequestHistory(clock=lambda: 100.0, doubts=d)
    history.accepted(request())
    routed = contract.RequestRouted(101.0, "r1", "EV1", "s1", "b1")
    history.apply(routed)
    assert d._active["r1"][0] == 130  # from the routing
    history.apply(routed)  # a copy says nothing new: the next ask is not put off
    assert d._active["r1"][0] == 130
    history.apply(contract.SessionCompleted(102.0, "r1", "EV1", "s1", "i1", started_at=101.5))
    assert len(d) == 0


def test_a_replayed_word_counts_from_when_it_was_said_not_when_it_was_read():
    d = doubts()
    history = RequestHistory(clock=lambda: 1_000.0, doubts=d)
    history.accepted(request())  # accepted at 100, read at 1,000 (a replay at start)
    history.apply(contract.RequestRouted(500.0, "r1", "EV1", "s1", "b1"))
    assert d._active["r1"][0] == 530  # asked about at once, not in 30 s
    history.apply(contract.RequestRouted(5_000.0, "r1", "EV1", "s2", "b1"))  # a clock ahead
    assert d._active["r1"][0] == 1_030


def test_the_history_forgets_the_doubts_of_what_it_evicts():
    d = doubts()
    history = RequestHistory(capacity=1, clock=lambda: 100.0, doubts=d)
    history.accepted(request("r1"))
    history.accepted(request("r2"))
    assert set(d._active) == {"r2"}


def started(request_id: str = "r1") -> contract.SessionStarted:
    return contract.SessionStarted(
        1.0, request_id, "EV1", "s1", "i1", accepted_at=0.5, expected_end=4.0
    )


def completed(request_id: str = "r1") -> contract.SessionCompleted:
    return contract.SessionCompleted(2.0, request_id, "EV1", "s1", "i1", started_at=1.0)


def test_told_again_are_the_very_events_told_and_of_an_ended_request_its_end_alone():
    told = Told(retell_interval=5)
    told.told(started())
    assert told.again("r1", now=0) == [started()]
    told.told(completed())
    assert told.again("r1", now=10) == [completed()]
    assert told.again("unknown", now=10) == []


def test_a_request_is_told_again_at_most_once_per_interval_however_many_ask():
    told = Told(retell_interval=5)
    told.told(started())
    assert told.again("r1", now=0) == [started()]
    assert told.again("r1", now=4.9) == []
    assert told.again("r1", now=5) == [started()]


def test_what_is_told_is_bounded_by_count_oldest_first():
    told = Told(remember=2)
    for request_id in ("r1", "r2", "r3"):
        told.told(started(request_id))
    assert len(told) == 2
    assert told.again("r1", now=0) == []
    assert told.again("r3", now=0) == [started("r3")]
