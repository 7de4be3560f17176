"""A substation's admission of requests, without a broker: tokens are plain strings."""

from __future__ import annotations

from smartgrid import contract
from substation.charging import Admission, ChargingPoints

SESSION = 30.0


def routed(
    n: int = 1,
    *,
    substation: str = "s1",
    maybe_duplicate: bool = False,
    rerouted_from: str | None = None,
) -> contract.RoutedRequest:
    return contract.RoutedRequest(
        f"{n:032x}",
        f"EV{n}",
        1.0,
        substation,
        2.0,
        "b1",
        rerouted_from=rerouted_from,
        maybe_duplicate=maybe_duplicate,
    )


def points(*, remember: int = 50_000) -> ChargingPoints[str]:
    return ChargingPoints("s1", 4, "inst-1", remember=remember)


def complete(charging: ChargingPoints[str], n: int = 1, *, confirmed: bool = True) -> None:
    finished = charging.finish(routed(n).request_id, now=20.0)
    assert finished is not None
    if confirmed:
        charging.reported(routed(n).request_id)
    else:
        charging.report_failed(routed(n).request_id)


def test_a_new_request_starts_a_session_that_holds_its_token():
    charging = points()
    admission, session = charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    assert admission is Admission.STARTED
    assert session is not None
    assert (session.token, session.started_at, session.expected_end) == ("d1", 10.0, 40.0)
    assert charging.load == 1 and charging.received == 1


def test_a_second_copy_of_a_running_request_is_a_duplicate_and_not_charged_twice():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    admission, session = charging.admit(routed(), "d2", now=11.0, duration=SESSION)
    assert (admission, session) == (Admission.DUPLICATE, None)
    assert charging.load == 1 and charging.duplicates == 1


def test_sessions_are_dropped_with_their_connection_and_start_afresh_when_redelivered():
    charging = points()
    charging.admit(routed(1), "d1", now=10.0, duration=SESSION)
    charging.admit(routed(2), "d2", now=10.0, duration=SESSION)
    dropped = charging.drop_all()  # the connection they came on is lost
    assert sorted(s.token for s in dropped) == ["d1", "d2"]
    assert (charging.load, charging.completed) == (0, 0)
    assert charging.session(routed(1).request_id) is None
    admission, session = charging.admit(
        routed(1), "d3", now=12.0, duration=SESSION, redelivered=True
    )
    assert admission is Admission.STARTED and session is not None
    assert session.started_at == 12.0


def test_a_completion_whose_report_was_not_confirmed_is_reported_again_not_charged_again():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    complete(charging, confirmed=False)
    # Maybe nobody heard of it: another substation asking must not be told "completed", nor
    # charge its copy: the report is sent again when the request comes back here.
    assert charging.claimed_by(routed().request_id, "s2") == "running"
    admission, session = charging.admit(routed(), "d2", now=50.0, duration=SESSION)
    assert admission is Admission.REPORT and session is not None
    assert (session.token, session.completed_at) == ("d2", 20.0)
    assert charging.duplicates == 1  # a copy of a request completed here, as the metric says
    charging.reported(routed().request_id)
    assert charging.claimed_by(routed().request_id, "s2") == "completed"
    assert charging.admit(routed(), "d3", now=60.0, duration=SESSION)[0] is Admission.DUPLICATE


def test_a_redelivery_is_not_counted_as_received_again():
    charging = points()
    charging.admit(routed(1), "d1", now=10.0, duration=SESSION, redelivered=True)
    charging.admit(routed(2), "d2", now=10.0, duration=SESSION)
    assert charging.received == 1


def test_a_request_completed_here_is_a_duplicate():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    complete(charging)
    assert charging.admit(routed(), "d2", now=50.0, duration=SESSION)[0] is Admission.DUPLICATE
    assert (charging.load, charging.completed, charging.duplicates) == (0, 1, 1)


def test_completed_requests_are_remembered_up_to_a_limit_oldest_forgotten_first():
    charging = points(remember=2)
    for n in (1, 2, 3):
        charging.admit(routed(n), f"d{n}", now=10.0, duration=SESSION)
        complete(charging, n)
    assert charging.admit(routed(1), "again", now=50.0, duration=SESSION)[0] is Admission.STARTED
    assert charging.admit(routed(3), "again", now=50.0, duration=SESSION)[0] is Admission.DUPLICATE


def test_a_possible_duplicate_unknown_here_is_checked_with_the_fleet_first():
    charging = points()
    admission, session = charging.admit(
        routed(maybe_duplicate=True), "d1", now=10.0, duration=SESSION
    )
    assert (admission, session) == (Admission.CHECK, None)
    assert charging.load == 0
    started = charging.start_checked(routed(), "d1", now=11.0, duration=SESSION)
    assert started.token == "d1" and charging.load == 1


def test_a_request_rerouted_from_a_dead_substation_is_checked_too():
    charging = points()
    admission, _ = charging.admit(routed(rerouted_from="s0"), "d1", now=10.0, duration=SESSION)
    # RoutedRequest.from_request sets maybe_duplicate for rerouted requests; admission follows
    # the flag alone.
    assert admission is Admission.STARTED
    flagged = routed(rerouted_from="s0", maybe_duplicate=True)
    assert charging.admit(flagged, "d2", now=10.0, duration=SESSION)[0] is Admission.DUPLICATE


def test_a_request_another_live_substation_asked_about_is_checked_not_dropped():
    charging = points()
    assert charging.claimed_by(routed().request_id, "s2") == "unknown"
    # Even unflagged: acknowledged only once a session has completed somewhere.
    admission, _ = charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    assert admission is Admission.CHECK


def test_a_claim_by_the_substation_it_was_rerouted_from_does_not_stop_it():
    charging = points()
    charging.claimed_by(routed().request_id, "s0")  # s0 asked, then died
    request = routed(rerouted_from="s0", maybe_duplicate=True)
    assert charging.admit(request, "d1", now=10.0, duration=SESSION)[0] is Admission.CHECK


def test_a_lookup_is_answered_with_what_is_known_here():
    charging = points()
    charging.admit(routed(1), "d1", now=10.0, duration=SESSION)
    charging.admit(routed(2), "d2", now=10.0, duration=SESSION)
    complete(charging, 2)
    assert charging.claimed_by(routed(1).request_id, "s2") == "running"
    assert charging.claimed_by(routed(2).request_id, "s2") == "completed"
    assert charging.claimed_by(routed(3).request_id, "s2") == "unknown"


def test_two_substations_checking_one_request_answer_so_that_exactly_one_charges_it():
    """Each holds a copy and asks the other: the lower id says running (it charges), the
    higher says unknown (it keeps its copy until the lower says completed)."""
    lower: ChargingPoints[str] = ChargingPoints("s1", 4, "i1")
    higher: ChargingPoints[str] = ChargingPoints("s2", 4, "i2")
    request_id = routed().request_id
    assert lower.claimed_by(request_id, "s2", checking=True) == "running"
    assert higher.claimed_by(request_id, "s1", checking=True) == "unknown"
    # Not holding a copy, neither claims it.
    assert lower.claimed_by(request_id, "s3") == "unknown"
    assert points().claimed_by(request_id, "s2") == "unknown"


def test_finishing_an_unknown_request_changes_nothing():
    charging = points()
    assert charging.finish(routed().request_id, now=1.0) is None
    assert charging.snapshot() == (0, 0, 0, 0)


def test_a_stopped_session_frees_its_point_and_counts_as_completed_and_cancelled():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    stopped = charging.stop(routed().request_id, now=12.0)
    assert stopped is not None and stopped.cancelled and stopped.completed_at == 12.0
    assert charging.snapshot() == (0, 1, 1, 0)
    assert charging.cancel_counts() == (1, 0)
    assert charging.stop(routed().request_id, now=13.0) is None
    assert charging.ended_at(routed().request_id) == 12.0


def test_a_stopped_session_whose_cancel_was_not_confirmed_is_reported_again():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    charging.stop(routed().request_id, now=12.0)
    charging.report_failed(routed().request_id)
    admission, session = charging.admit(routed(), "d2", now=20.0, duration=SESSION)
    assert admission is Admission.REPORT and session is not None and session.cancelled
    charging.reported(routed().request_id)
    assert charging.admit(routed(), "d3", now=21.0, duration=SESSION)[0] is Admission.DUPLICATE


def test_a_request_cancelled_before_it_started_is_a_duplicate_when_redelivered():
    charging = points()
    charging.count_received()
    charging.cancelled_unstarted(routed(), now=5.0)
    assert charging.holds(routed())
    assert charging.admit(routed(), "d2", now=6.0, duration=SESSION)[0] is Admission.DUPLICATE
    assert charging.cancel_counts() == (0, 1)
    assert charging.snapshot() == (0, 2, 0, 1)  # the redelivery was not flagged as one here


def test_an_id_used_again_after_the_ttl_is_a_new_attempt_not_a_duplicate():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    complete(charging)
    later = contract.RoutedRequest(routed().request_id, "EV1", 1.0 + 86_400, "s1", 86_402.0, "b1")
    assert not charging.holds(later) and charging.holds(routed())
    admission, session = charging.admit(later, "d2", now=86_403.0, duration=SESSION)
    assert admission is Admission.STARTED and session is not None


def test_a_session_that_ended_here_before_a_restart_is_a_duplicate_when_redelivered():
    # The history says an earlier process of this substation started it at 3.0 and completed
    # it at 8.0; it was killed before its ack, so the broker hands the request to this one.
    charging = points()
    charging.ended_before(routed().request_id, started_by=3.0, ended_at=8.0)
    assert charging.holds(routed())
    admission, session = charging.admit(routed(), "d1", now=9.0, duration=SESSION, redelivered=True)
    assert (admission, session) == (Admission.DUPLICATE, None)
    assert charging.load == 0
    assert charging.claimed_by(routed().request_id, "s2") == "completed"


def test_an_attempt_accepted_after_that_session_started_is_a_new_one():
    charging = points()
    charging.ended_before(routed().request_id, started_by=3.0, ended_at=8.0)
    later = contract.RoutedRequest(routed().request_id, "EV1", 86_401.0, "s1", 86_402.0, "b1")
    assert not charging.holds(later)
    assert charging.admit(later, "d1", now=86_403.0, duration=SESSION)[0] is Admission.STARTED


def test_what_the_process_knows_itself_is_not_replaced_by_the_history():
    charging = points()
    charging.admit(routed(), "d1", now=10.0, duration=SESSION)
    charging.ended_before(routed().request_id, started_by=3.0, ended_at=8.0)
    assert charging.load == 1  # still charging: the history's older session changes nothing
    complete(charging)
    # Its own record stays exact: an attempt accepted between is a new one.
    between = contract.RoutedRequest(routed().request_id, "EV1", 2.5, "s1", 2.6, "b1")
    charging.ended_before(routed().request_id, started_by=3.0, ended_at=8.0)
    assert not charging.holds(between) and charging.holds(routed())
