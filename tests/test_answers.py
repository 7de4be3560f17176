"""What the gateway answers to POST and DELETE, decided from the history (no HTTP, no broker)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.answers import (
    REPLAYED_HEADER,
    Answer,
    Outcome,
    PublishCancel,
    PublishRequest,
    after_cancel,
    after_publish,
    plan_cancel,
    plan_charge,
)
from gateway.history import RequestHistory
from gateway.idempotency import body_fingerprint, derive_request_id
from smartgrid import contract
from smartgrid.power_request import parse_power_fields

NOW = 1_000_000.0
FRESH = "f" * 32


def fresh_ids():
    counter = itertools.count()
    return lambda: f"{next(counter):032x}"


@pytest.fixture
def history() -> RequestHistory:
    return RequestHistory(clock=lambda: NOW, idempotency_ttl=3600, max_age=7200)


def post(history, body=None, *, client="fleet-1", key=None, now=NOW, rid=FRESH, power=None):
    return plan_charge(
        history,
        client=client,
        key=key,
        fields=body or {"ev_id": "EV1"},
        now=now,
        new_request_id=lambda: rid,
        power=power,
    )


def accept(history, plan: PublishRequest) -> Answer:
    """What the app does with a plan whose publish the broker confirmed."""
    history.accepted(plan.request)
    answer, event = after_publish(
        plan, Outcome.CONFIRMED, record=history.lookup(plan.request.request_id), retry_after=5
    )
    assert event is None
    return answer


def routed(rid, ev="EV1"):
    return contract.RequestRouted(
        at=NOW + 1, request_id=rid, ev_id=ev, substation="s1", balancer="b"
    )


def completed(rid, ev="EV1"):
    return contract.SessionCompleted(
        at=NOW + 30, request_id=rid, ev_id=ev, substation="s1", instance="i", started_at=NOW + 2
    )


# ------------------------------------------------------------------------------ POST: fresh
def test_a_request_without_a_key_gets_a_new_id_and_carries_its_client(history):
    plan = post(history)
    assert isinstance(plan, PublishRequest) and not plan.repeat and not plan.keyed
    assert plan.request == contract.ChargeRequest(
        request_id=FRESH, ev_id="EV1", accepted_at=NOW, client="fleet-1"
    )
    answer = accept(history, plan)
    assert answer.status == 202
    assert answer.body == {"request_id": FRESH, "ev_id": "EV1", "status": "queued"}
    assert answer.headers == {"Location": f"/charge/{FRESH}"}


def test_a_request_with_a_key_gets_the_derived_id_and_the_body_fingerprint(history):
    plan = post(history, key="k1")
    assert plan.keyed
    assert plan.request.request_id == derive_request_id("fleet-1", "k1")
    assert plan.request.body_fingerprint == body_fingerprint({"ev_id": "EV1"})


def test_the_request_carries_the_power_fields_and_so_does_a_repeat_of_it(history):
    body = {"ev_id": "EV1", "max_kw": 50, "priority": "fleet"}
    power = parse_power_fields(body)
    first = post(history, body, key="k1", power=power)
    assert first.request.power() == power
    accept(history, first)
    repeat = post(history, body, key="k1", now=NOW + 5, power=power)
    assert isinstance(repeat, PublishRequest) and repeat.request == first.request


# ------------------------------------------------------------------------------ POST: repeats
def test_a_repeat_of_a_queued_request_is_published_again_as_the_same_attempt(history):
    first = post(history, key="k1")
    accept(history, first)
    repeat = post(history, key="k1", now=NOW + 5)
    assert isinstance(repeat, PublishRequest) and repeat.repeat
    assert repeat.request == first.request  # same id, same accepted_at: the balancer drops it
    answer = accept(history, repeat)
    assert answer.status == 202 and answer.body["request_id"] == first.request.request_id
    assert answer.headers[REPLAYED_HEADER] == "true"


@pytest.mark.parametrize("progress", ["routed", "completed", "rejected"])
def test_a_repeat_of_a_request_that_moved_on_is_answered_from_the_history(history, progress):
    first = post(history, key="k1")
    accept(history, first)
    rid = first.request.request_id
    history.apply(routed(rid))
    if progress == "completed":
        history.apply(completed(rid))
    if progress == "rejected":
        history = RequestHistory(clock=lambda: NOW, idempotency_ttl=3600)
        history.accepted(first.request)
        history.apply(
            contract.RequestRejected(
                at=NOW + 1,
                request_id=rid,
                ev_id="EV1",
                reason="ev_busy",
                detail="d",
                source="b",
                accepted_at=NOW,
            )
        )
    answer = post(history, key="k1", now=NOW + 60)
    assert isinstance(answer, Answer)
    assert answer.status == 202  # the status code of the first answer
    assert answer.body["request_id"] == rid and answer.body["status"] == progress
    assert answer.headers == {"Location": f"/charge/{rid}", REPLAYED_HEADER: "true"}


def test_the_same_key_with_another_body_is_a_422(history):
    accept(history, post(history, key="k1"))
    answer = post(history, {"ev_id": "EV2"}, key="k1")
    assert isinstance(answer, Answer) and answer.status == 422
    assert answer.body["error"] == "idempotency_key_reused"


def test_a_body_differing_only_in_form_is_the_same_body(history):
    accept(history, post(history, {"ev_id": "EV1", "max_kw": 22}, key="k1"))
    repeat = post(history, {"max_kw": 22.0, "ev_id": "EV1"}, key="k1")
    assert isinstance(repeat, PublishRequest) and repeat.repeat


def test_the_same_key_from_another_client_is_another_request(history):
    accept(history, post(history, key="k1", client="fleet-1"))
    other = post(history, {"ev_id": "EV2"}, key="k1", client="fleet-2")
    assert isinstance(other, PublishRequest) and not other.repeat
    assert other.request.request_id == derive_request_id("fleet-2", "k1")


def test_a_key_used_again_after_the_ttl_is_a_new_attempt_of_the_same_id(history):
    first = post(history, key="k1", now=NOW - 4000)
    history.accepted(first.request)
    history.apply(completed(first.request.request_id))
    again = post(history, {"ev_id": "EV9"}, key="k1")  # even with another body
    assert isinstance(again, PublishRequest) and not again.repeat
    assert again.request.request_id == first.request.request_id
    assert again.request.accepted_at == NOW


def test_a_repeat_after_the_broker_refused_the_first_attempt_is_a_new_attempt(history):
    first = post(history, key="k1")
    history.accepted(first.request)  # the stream's copy
    answer, event = after_publish(first, Outcome.REFUSED, record=None, retry_after=5)
    history.apply(event)
    again = post(history, key="k1", now=NOW + 5)
    assert isinstance(again, PublishRequest) and not again.repeat
    assert again.request.accepted_at == NOW + 5
    assert accept(history, again).body["status"] == "queued"


# ------------------------------------------------------------------------------ POST: ev_busy
def test_a_second_request_for_a_busy_ev_is_a_409_naming_the_active_one(history):
    first = post(history)
    accept(history, first)
    answer = post(history, key="k2")
    assert isinstance(answer, Answer) and answer.status == 409
    assert answer.body["error"] == "ev_busy" and answer.body["request_id"] == FRESH
    assert answer.headers == {"Location": f"/charge/{FRESH}"}


def test_another_clients_busy_ev_is_a_409_that_does_not_name_the_request(history):
    accept(history, post(history, client="fleet-1"))
    answer = post(history, client="fleet-2", rid="e" * 32)
    assert answer.status == 409 and answer.body["error"] == "ev_busy"
    assert "request_id" not in answer.body and "Location" not in answer.headers


def test_a_repeat_of_the_active_request_itself_is_not_busy(history):
    accept(history, post(history, key="k1"))
    assert isinstance(post(history, key="k1"), PublishRequest)


def test_an_ev_is_free_again_once_its_request_ended(history):
    accept(history, post(history))
    history.apply(completed(FRESH))
    assert isinstance(post(history, key="next"), PublishRequest)


# ------------------------------------------------------------------------------ POST: 503s
def test_nothing_sent_is_a_503_that_says_not_accepted_and_names_no_request(history):
    answer, event = after_publish(post(history), Outcome.NOT_SENT, record=None, retry_after=7)
    assert answer.status == 503 and answer.body["error"] == "broker_unavailable"
    assert "not accepted" in answer.body["detail"]
    assert "request_id" not in answer.body and answer.headers == {"Retry-After": "7"}
    assert event is None


@pytest.mark.parametrize(
    ("outcome", "code", "accepted"),
    [
        (Outcome.UNCONFIRMED, "not_confirmed", "may still be accepted"),
        (Outcome.REFUSED, "busy", "not accepted"),
    ],
)
@pytest.mark.parametrize("key", [None, "k1"])
def test_an_unconfirmed_or_refused_request_is_a_503_with_its_id_and_location(
    history, outcome, code, accepted, key
):
    plan = post(history, key=key)
    answer, _event = after_publish(plan, outcome, record=None, retry_after=7)
    rid = plan.request.request_id
    assert answer.status == 503 and answer.body["error"] == code
    assert answer.body["request_id"] == rid
    assert answer.headers == {"Retry-After": "7", "Location": f"/charge/{rid}"}
    assert accepted in answer.body["detail"]
    assert ("is safe" in answer.body["detail"]) == (key is not None)


def test_a_refused_request_is_provisionally_rejected_so_its_ev_is_not_held(history):
    plan = post(history)
    history.accepted(plan.request)  # the history stream took its copy
    _answer, event = after_publish(plan, Outcome.REFUSED, record=None, retry_after=5, source="gw-1")
    assert isinstance(event, contract.RequestRejected)
    assert (event.reason, event.source, event.accepted_at) == ("not_enqueued", "gw-1", NOW)
    history.apply(event)
    assert history.active_for("EV1") is None
    # ... and if the pending queue took it after all, its routing wins.
    history.apply(routed(FRESH))
    assert history.get(FRESH)["status"] == "routed"


def test_an_unconfirmed_request_is_not_rejected(history):
    _answer, event = after_publish(post(history), Outcome.UNCONFIRMED, record=None, retry_after=5)
    assert event is None


# ------------------------------------------------------------------------------ DELETE
def cancel(history, rid=FRESH, client="fleet-1"):
    return plan_cancel(history, rid, client=client, now=NOW + 10)


def confirm_cancel(history, plan: PublishCancel) -> Answer:
    history.apply(plan.event)
    record = history.lookup(plan.event.request_id)
    return after_cancel(plan, Outcome.CONFIRMED, record=record, retry_after=5)


@pytest.mark.parametrize("progress", ["queued", "routed", "charging"])
def test_cancelling_an_active_request_publishes_the_command_and_answers_202(history, progress):
    accept(history, post(history))
    if progress != "queued":
        history.apply(routed(FRESH))
    if progress == "charging":
        history.apply(
            contract.SessionStarted(
                at=NOW + 2,
                request_id=FRESH,
                ev_id="EV1",
                substation="s1",
                instance="i",
                accepted_at=NOW,
                expected_end=NOW + 32,
            )
        )
    plan = cancel(history)
    assert isinstance(plan, PublishCancel)
    assert plan.event == contract.CancelRequested(
        at=NOW + 10, request_id=FRESH, ev_id="EV1", client="fleet-1"
    )
    answer = confirm_cancel(history, plan)
    assert answer.status == 202
    assert answer.body["status"] == progress and answer.body["cancel_requested_at"] == NOW + 10
    assert answer.headers == {"Location": f"/charge/{FRESH}"}


def test_repeating_a_cancel_is_harmless(history):
    accept(history, post(history))
    confirm_cancel(history, cancel(history))
    again = cancel(history)
    assert isinstance(again, PublishCancel)  # still being cancelled: the command again
    history.apply(contract.RequestCancelled(at=NOW + 11, request_id=FRESH, ev_id="EV1", source="b"))
    done = cancel(history)
    assert isinstance(done, Answer) and done.status == 202
    assert done.body["status"] == "cancelled"


@pytest.mark.parametrize("client", ["fleet-2", "fleet-1"])
def test_cancelling_an_unknown_or_another_clients_request_is_a_404(history, client):
    accept(history, post(history, client="fleet-2" if client == "fleet-1" else "fleet-1"))
    assert cancel(history, client=client).status == 404
    assert cancel(history, "0" * 32).status == 404


def test_cancelling_a_completed_request_is_a_409(history):
    accept(history, post(history))
    history.apply(completed(FRESH))
    answer = cancel(history)
    assert answer.status == 409 and answer.body["error"] == "already_completed"


@pytest.mark.parametrize("reason", ["ev_busy", "dead"])
def test_cancelling_a_request_that_ended_without_charging_is_a_409(history, reason):
    accept(history, post(history))
    event: contract.Event
    if reason == "dead":
        event = contract.RequestDeadLettered(at=NOW, reason="x", source="q", request_id=FRESH)
    else:
        event = contract.RequestRejected(
            at=NOW, request_id=FRESH, ev_id="EV1", reason=reason, detail="", source="b",
            accepted_at=NOW,
        )  # fmt: skip
    history.apply(event)
    answer = cancel(history)
    assert answer.status == 409 and answer.body["error"] == "already_ended"


@pytest.mark.parametrize("outcome", [Outcome.NOT_SENT, Outcome.UNCONFIRMED, Outcome.REFUSED])
def test_a_cancel_the_broker_did_not_take_is_a_503_safe_to_repeat(history, outcome):
    accept(history, post(history))
    answer = after_cancel(cancel(history), outcome, record=None, retry_after=3)
    assert answer.status == 503 and answer.headers == {"Retry-After": "3"}
    assert "safe" in answer.body["detail"]


# ------------------------------------------------------------------------------ properties
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["fleet-1", "fleet-2"]),
            st.sampled_from(["k1", "k2", "k3", None]),
            st.sampled_from(["EV1", "EV2"]),
            st.booleans(),  # the request ends (completes) right after
        ),
        max_size=25,
    )
)
def test_whatever_clients_post_no_ev_ever_has_two_active_requests_at_one_gateway(
    posts: list[tuple[str, str | None, str, bool]],
) -> None:
    history = RequestHistory(clock=lambda: NOW)
    ids = fresh_ids()
    issued: set[str] = set()
    for client, key, ev, ends in posts:
        plan = plan_charge(
            history, client=client, key=key, fields={"ev_id": ev}, now=NOW, new_request_id=ids
        )
        if isinstance(plan, PublishRequest):
            history.accepted(plan.request)
            issued.add(plan.request.request_id)
            if ends:
                history.apply(completed(plan.request.request_id, ev))
        else:
            assert plan.status in (202, 409, 422)
        for each in ("EV1", "EV2"):
            records = [r for rid in issued if (r := history.get(rid)) is not None]
            assert len(records) == len(issued)  # every issued request is known
            active = [r for r in records if r["ev_id"] == each and r["status"] == "queued"]
            assert len(active) <= 1, active
