"""What the gateway answers to ``POST /charge`` and ``DELETE /charge/<id>``, decided from the
request history, without HTTP and without the broker.

Each decision is either an :class:`Answer` (status, JSON body, headers) to send as it is, or a
message to publish first (:class:`PublishRequest`, :class:`PublishCancel`); once the broker has
had its say (:class:`Outcome`), ``after_publish`` / ``after_cancel`` give the answer. The app
turns answers into responses and does the publishing; nothing here blocks or talks to anyone.

The 503s are honest: ``broker_unavailable`` means nothing was published (no connection, or the
broker blocks publishers), so the request was not accepted; ``not_confirmed`` means it was
published and may yet be accepted, so the answer carries its id and ``Location``, and a repeat
with the same Idempotency-Key is safe; ``busy`` means the broker refused it (the pending queue
is full: backpressure), so it was not accepted, and the client should come back after
``Retry-After``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.history import COMPLETED, QUEUED, RequestHistory, RequestRecord
from gateway.idempotency import HEADER, body_fingerprint, derive_request_id
from smartgrid import contract
from smartgrid.power_request import PowerFields

#: Set on the answer to a repeat of an Idempotency-Key (the name Stripe's API made common).
REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishRequest:
    """Publish ``request`` to the requests exchange, then answer with :func:`after_publish`."""

    request: contract.ChargeRequest
    #: A repeat of an earlier acceptance of this id: republished because the history cannot
    #: tell whether the first copy reached the pending queue (the balancer drops the extra).
    repeat: bool = False
    keyed: bool = False


@dataclass(frozen=True)
class PublishCancel:
    """Publish ``event`` (reliably), then answer with :func:`after_cancel`."""

    event: contract.CancelRequested
    #: The request's status when the cancel was decided.
    status: str = QUEUED


class Outcome(enum.Enum):
    #: The broker confirmed the message.
    CONFIRMED = "confirmed"
    #: Nothing was published: no connection, or the broker blocks publishers (an alarm).
    NOT_SENT = "not_sent"
    #: Published, but not confirmed by the deadline (or the connection went after publishing).
    UNCONFIRMED = "unconfirmed"
    #: The broker refused it (a negative confirm) until the deadline.
    REFUSED = "refused"


def error(status: int, code: str, detail: str, /, **extra: Any) -> Answer:
    headers = extra.pop("headers", {})
    return Answer(status, {"error": code, "detail": detail, **extra}, headers)


def _location(request_id: str) -> dict[str, str]:
    return {"Location": f"/charge/{request_id}"}


def _accepted_body(record: RequestRecord | None, request: contract.ChargeRequest) -> dict:
    body = {
        "request_id": request.request_id,
        "ev_id": request.ev_id,
        "status": record.status if record is not None else QUEUED,
    }
    if record is not None and record.substation:
        body["routed_to"] = record.substation
    return body


# ------------------------------------------------------------------------------ POST /charge
def plan_charge(
    history: RequestHistory,
    *,
    client: str | None,
    key: str | None,
    fields: Mapping[str, Any],
    now: float,
    new_request_id: Callable[[], str],
    power: PowerFields | None = None,
) -> Answer | PublishRequest:
    """Decide a valid ``POST /charge`` (``fields``: the validated body; ``key``: the parsed
    Idempotency-Key, or None; ``power``: the body's power fields, the gateway's defaults
    applied, or None for the built-in defaults)."""
    power_fields = power.message_fields() if power is not None else {}
    ev_id = fields["ev_id"]
    fingerprint = None
    if key is not None:
        request_id = derive_request_id(client, key)
        fingerprint = body_fingerprint(fields)
        record = history.lookup(request_id)
        if record is not None and not history.idempotency_expired(record, now):
            if record.body_fingerprint not in (None, fingerprint):
                return error(
                    422,
                    "idempotency_key_reused",
                    f"this {HEADER} was used for another request body; use a new key for a "
                    "new request",
                )
            if record.provisionally_rejected:
                pass  # the broker refused the first attempt: this one is a new attempt
            elif record.status == QUEUED:
                # The same body (the fingerprint says so), so the same power fields.
                return PublishRequest(
                    _repeat_of(record, client, fingerprint, power_fields), True, True
                )
            else:
                return _replayed(record)
    else:
        request_id = new_request_id()
    holder = history.active_for(ev_id)
    if holder is not None and holder[0] != request_id:
        return _ev_busy(ev_id, *holder, client)
    request = contract.ChargeRequest(
        request_id=request_id,
        ev_id=ev_id,
        accepted_at=now,
        client=client,
        body_fingerprint=fingerprint,
        **power_fields,
    )
    return PublishRequest(request, repeat=False, keyed=key is not None)


def _repeat_of(
    record: RequestRecord, client: str | None, fingerprint: str, power_fields: dict[str, Any]
) -> contract.ChargeRequest:
    # The very request the history holds (same accepted_at: the same attempt, to the balancer).
    assert record.ev_id is not None and record.accepted_at is not None
    return contract.ChargeRequest(
        request_id=record.request_id,
        ev_id=record.ev_id,
        accepted_at=record.accepted_at,
        client=client,
        body_fingerprint=fingerprint,
        **power_fields,
    )


def _replayed(record: RequestRecord) -> Answer:
    body = {"request_id": record.request_id, "ev_id": record.ev_id, "status": record.status}
    if record.substation:
        body["routed_to"] = record.substation
    return Answer(202, body, {**_location(record.request_id), REPLAYED_HEADER: "true"})


def _ev_busy(ev_id: str, active_id: str, holder: str | None, client: str | None) -> Answer:
    if client is None or holder == client:
        return error(
            409,
            "ev_busy",
            f"EV {ev_id} already has an active request; cancel it or wait for it to end",
            request_id=active_id,
            headers=_location(active_id),
        )
    # Another client's request: say that the car is busy, but not which request holds it.
    return error(409, "ev_busy", f"EV {ev_id} already has an active request of another client")


def after_publish(
    plan: PublishRequest,
    outcome: Outcome,
    *,
    record: RequestRecord | None,
    retry_after: int,
    source: str = "gateway",
) -> tuple[Answer, contract.Event | None]:
    """The answer once the broker has had its say, and an event to publish (reliably) with it.

    ``record``: the history's record of the request after the gateway applied the confirmed
    request to it (None if there is none).
    """
    request = plan.request
    retry = {"Retry-After": str(retry_after)}
    if outcome is Outcome.CONFIRMED:
        headers = _location(request.request_id)
        if plan.repeat:
            headers[REPLAYED_HEADER] = "true"
        return Answer(202, _accepted_body(record, request), headers), None
    if outcome is Outcome.NOT_SENT:
        return error(
            503,
            "broker_unavailable",
            "the message broker is not accepting requests now; the request was not accepted",
            headers=retry,
        ), None
    repeat = (
        f"repeating it with the same {HEADER} is safe"
        if plan.keyed
        else f"without an {HEADER}, a repeat is a new request: look this one up first"
    )
    if outcome is Outcome.REFUSED:
        # A negative confirm: the pending queue is full (reject-publish), or refused it for
        # another reason of its own. Either way it holds no copy to run.
        code, why = (
            "busy",
            (
                "the system is at capacity (its queue of pending requests is full); the request "
                "was not accepted: try again after Retry-After"
            ),
        )
    else:
        code, why = (
            "not_confirmed",
            (
                "the message broker did not confirm the request in time; it may still be accepted: "
                "look it up at its Location"
            ),
        )
    answer = error(
        503,
        code,
        f"{why}; {repeat}",
        request_id=request.request_id,
        headers={**retry, **_location(request.request_id)},
    )
    if outcome is Outcome.REFUSED and not plan.repeat:
        # The copy the history stream may hold must not keep the EV busy forever; if the
        # pending queue took it after all, its routing overrides this provisional rejection.
        return answer, contract.RequestRejected(
            at=request.accepted_at,
            request_id=request.request_id,
            ev_id=request.ev_id,
            reason=contract.REJECTED_NOT_ENQUEUED,
            detail="the message broker refused the request when it was made",
            source=source,
            accepted_at=request.accepted_at,
        )
    return answer, None


# ------------------------------------------------------------------------------ DELETE /charge/<id>
def plan_cancel(
    history: RequestHistory, request_id: str, *, client: str | None, now: float
) -> Answer | PublishCancel:
    record = history.lookup(request_id, client)
    if record is None:
        return error(404, "not_found", "no such request is known (or it is too old)")
    if record.status == COMPLETED:
        return error(
            409,
            "already_completed",
            "the request has completed; there is nothing to cancel",
            status=record.status,
        )
    if not record.active and record.status != "cancelled":
        return error(
            409,
            "already_ended",
            f"the request has ended ({record.status}) without charging; there is nothing to cancel",
            status=record.status,
        )
    if record.status == "cancelled":
        return Answer(202, record.to_json(), _location(request_id))
    # Publishing again for a request already being cancelled is harmless (whoever holds it
    # obeys once), and covers a command lost with a gateway that died before confirming it.
    assert record.ev_id is not None
    return PublishCancel(
        contract.CancelRequested(at=now, request_id=request_id, ev_id=record.ev_id, client=client),
        status=record.status,
    )


def after_cancel(
    plan: PublishCancel, outcome: Outcome, *, record: RequestRecord | None, retry_after: int
) -> Answer:
    """``record``: the history's record after the gateway applied the confirmed command."""
    if outcome is not Outcome.CONFIRMED:
        return error(
            503,
            "broker_unavailable" if outcome is Outcome.NOT_SENT else "not_confirmed",
            "the message broker did not take the cancellation; repeating the DELETE is safe",
            headers={"Retry-After": str(retry_after)},
        )
    body = (
        record.to_json()
        if record is not None
        else {
            "request_id": plan.event.request_id,
            "ev_id": plan.event.ev_id,
            "status": plan.status,
            "cancel_requested_at": plan.event.at,
        }
    )
    return Answer(202, body, _location(plan.event.request_id))
