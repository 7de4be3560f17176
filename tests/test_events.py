"""Batched lifecycle events through the real broker: what arrives, and when each is confirmed."""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections.abc import Iterator, Sequence

import pytest

from smartgrid import contract
from smartgrid.amqp import Link
from smartgrid.events import EventPublisher
from tests.helpers import BrokerClient, eventually


@pytest.fixture
def link(amqp_url: str) -> Iterator[Link]:
    link = Link(
        amqp_url, name=f"test-events-{uuid.uuid4().hex[:6]}", topology=contract.core_topology()
    ).start()
    assert link.wait_ready(10)
    yield link
    link.stop()


def _routed(n: int) -> contract.RequestRouted:
    return contract.RequestRouted(
        at=float(n), request_id=f"{n:032x}", ev_id=f"EV{n}", substation="s1", balancer="b1"
    )


def _completed(n: int) -> contract.SessionCompleted:
    return contract.SessionCompleted(
        at=float(n),
        request_id=f"{n:032x}",
        ev_id=f"EV{n}",
        substation="s1",
        instance="i1",
        started_at=0.5,
    )


def _publish_in_one_turn(
    link: Link, publisher: EventPublisher, events: Sequence[contract.Event]
) -> list[concurrent.futures.Future]:
    """Publish ``events`` from one callback on the I/O thread, as a consumer callback would."""
    futures: list[concurrent.futures.Future] = []
    done = threading.Event()

    def publish_all() -> None:
        futures.extend(publisher.publish(event) for event in events)
        done.set()

    link.call_soon(publish_all)
    assert done.wait(5)
    return futures


def _messages(broker: BrokerClient, queue: str, expected: int) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []

    def arrived() -> bool:
        while True:
            method, _properties, body = broker.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return len(found) >= expected
            found.append((method.routing_key, body))

    eventually(arrived, timeout=10, what=f"{expected} event message(s)")
    return found


def test_events_published_in_one_turn_go_as_one_message_per_kind_and_each_is_confirmed(
    link, broker
):
    queue = broker.subscribe_events(contract.RequestRouted.kind, contract.SessionCompleted.kind)
    publisher = EventPublisher(link)
    routed = [_routed(n) for n in range(40)]
    completed = [_completed(n) for n in range(3)]
    mixed: list[contract.Event] = [*routed[:20], *completed, *routed[20:]]
    futures = _publish_in_one_turn(link, publisher, mixed)
    for future in futures:
        assert future.result(10) is None

    messages = dict(_messages(broker, queue, expected=2))
    assert set(messages) == {contract.RequestRouted.kind, contract.SessionCompleted.kind}
    assert (
        contract.decode_events(contract.RequestRouted.kind, messages[contract.RequestRouted.kind])
        == routed
    )
    assert (
        contract.decode_events(
            contract.SessionCompleted.kind, messages[contract.SessionCompleted.kind]
        )
        == completed
    )
    assert broker.channel.basic_get(queue, auto_ack=True)[0] is None, (
        "more messages than one per kind"
    )


def test_a_lone_event_leaves_at_once_as_a_plain_event_message(link, broker):
    queue = broker.subscribe_events(contract.RequestRouted.kind)
    publisher = EventPublisher(link)
    (future,) = _publish_in_one_turn(link, publisher, [_routed(7)])
    assert future.result(10) is None
    [(kind, body)] = _messages(broker, queue, expected=1)
    assert body == _routed(7).to_body()
    assert contract.decode_event(kind, body) == _routed(7)


def test_a_full_batch_is_sent_without_waiting_for_the_end_of_the_turn(link, broker):
    queue = broker.subscribe_events(contract.RequestRouted.kind)
    publisher = EventPublisher(link, max_batch=16)
    events = [_routed(n) for n in range(40)]
    for future in _publish_in_one_turn(link, publisher, events):
        assert future.result(10) is None
    messages = _messages(broker, queue, expected=3)
    batches = [contract.decode_events(kind, body) for kind, body in messages]
    assert [len(batch) for batch in batches] == [16, 16, 8]
    assert [event for batch in batches for event in batch] == events


def test_events_waiting_for_the_end_of_the_turn_are_sent_when_the_link_stops(
    amqp_url: str, broker: BrokerClient
) -> None:
    # A substation's last session.completed is published moments before its shutdown stops
    # the link; its request is acknowledged only once that event is confirmed.
    queue = broker.subscribe_events(contract.SessionCompleted.kind)
    link = Link(
        amqp_url, name=f"test-events-{uuid.uuid4().hex[:6]}", topology=contract.core_topology()
    ).start()
    assert link.wait_ready(10)
    publisher = EventPublisher(link)
    events = [_completed(n) for n in range(5)]
    futures: list[concurrent.futures.Future] = []
    link.call_soon(lambda: futures.extend(publisher.publish(event) for event in events))
    link.stop()
    assert len(futures) == 5
    for future in futures:
        assert future.result(5) is None
    [(kind, body)] = _messages(broker, queue, expected=1)
    assert contract.decode_events(kind, body) == events


def test_an_unreliable_event_goes_out_at_once_on_its_own(link, broker):
    queue = broker.subscribe_events(contract.SubstationLeaving.kind)
    publisher = EventPublisher(link)
    event = contract.SubstationLeaving(at=1.0, substation="s1", instance="i1")
    assert publisher.publish(event, reliable=False).result(10) is None
    assert eventually(lambda: broker.events(queue)) == [event]
