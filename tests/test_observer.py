"""loadgen's ledger (the event observer) against the real broker.

Events are published at least once: a substation whose connection drops before the broker
confirmed its ``session.completed`` sends that same event again after reconnecting. The ledger
must count such a resend once, or a healthy run would be reported as "completed twice", while a
genuine second session (another instance, another time) must still be counted.
"""

from __future__ import annotations

import time
import uuid

from loadgen.observer import EventObserver
from smartgrid import contract
from tests.helpers import BrokerClient, eventually


def _session(request_id: str, substation: str, instance: str, started_at: float):
    started = contract.SessionStarted(
        at=started_at,
        request_id=request_id,
        ev_id="EV1",
        substation=substation,
        instance=instance,
        accepted_at=started_at - 0.1,
        expected_end=started_at + 1.5,
    )
    completed = contract.SessionCompleted(
        at=started_at + 1.5,
        request_id=request_id,
        ev_id="EV1",
        substation=substation,
        instance=instance,
        started_at=started_at,
    )
    return started, completed


def test_a_resent_event_is_counted_once_and_a_second_session_twice(amqp_url: str):
    observer = EventObserver(amqp_url, name=f"test-observer-{uuid.uuid4().hex[:6]}")
    observer.start()
    broker = BrokerClient(amqp_url)
    resent, repeated = uuid.uuid4().hex, uuid.uuid4().hex
    now = time.time()
    try:
        first_started, first_completed = _session(resent, "substation-1", "a1", now)
        # The same two events twice, byte for byte: what a publisher's resend looks like.
        for event in (first_started, first_completed, first_started, first_completed):
            broker.publish_event(event)
        # A request charged twice: by a restarted instance, a little later.
        for event in (
            *_session(repeated, "substation-2", "b1", now),
            *_session(repeated, "substation-2", "b2", now + 2),
        ):
            broker.publish_event(event)
        eventually(lambda: observer.settled([resent, repeated]) == 2)
        eventually(lambda: len(observer.fates([repeated])[repeated].completed) == 2)
        fates = observer.fates([resent, repeated])
    finally:
        observer.stop()
        broker.close()
    assert fates[resent].started == [first_started]
    assert fates[resent].completed == [first_completed]
    assert [s.instance for s in fates[repeated].started] == ["b1", "b2"]
    assert [c.instance for c in fates[repeated].completed] == ["b1", "b2"]
    assert observer.active_sessions() == {"substation-1": 0, "substation-2": 0}
