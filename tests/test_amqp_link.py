"""The AMQP link against the real broker: confirms, returns, poison messages, reconnection."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid

import pika
import pika.exceptions
import pytest

from smartgrid import contract
from smartgrid.amqp import ConnectionLost, ConsumerSpec, Delivery, Link, NotConnected, Unroutable
from smartgrid.amqp import link as link_module
from smartgrid.dead_lettering import DeadLetterer
from smartgrid.events import EventPublisher
from tests.helpers import BrokerClient, eventually


def _link(url: str, **kwargs) -> Link:
    link = Link(
        url, name=f"test-{uuid.uuid4().hex[:6]}", topology=contract.core_topology(), **kwargs
    ).start()
    assert link.wait_ready(10)
    return link


def test_a_publish_completes_only_when_the_broker_has_confirmed_it(amqp_url, broker):
    link = _link(amqp_url)
    try:
        futures = [
            link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b'{"n": %d}' % i)
            for i in range(500)
        ]
        for future in futures:
            assert future.result(10) is None
        assert broker.message_count(contract.PENDING_QUEUE) == 500
    finally:
        link.stop()


def test_publishes_from_many_threads_at_once_are_all_sent_each_thread_in_its_own_order(
    amqp_url: str, broker: BrokerClient
) -> None:
    # Request threads share wake-ups of the I/O thread; none of their publishes may be lost
    # or overtake an earlier one from the same thread.
    link = _link(amqp_url)
    threads, per_thread = 8, 150
    futures: dict[int, list] = {t: [] for t in range(threads)}

    def publish_from(t: int) -> None:
        for i in range(per_thread):
            body = json.dumps({"thread": t, "n": i}).encode()
            futures[t].append(
                link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, body)
            )

    try:
        workers = [threading.Thread(target=publish_from, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(10)
        for future in (f for fs in futures.values() for f in fs):
            assert future.result(10) is None
        sent = [json.loads(body) for _properties, body in broker.get_all(contract.PENDING_QUEUE)]
        assert len(sent) == threads * per_thread
        for t in range(threads):
            assert [m["n"] for m in sent if m["thread"] == t] == list(range(per_thread))
    finally:
        link.stop()


def test_a_loop_turns_frames_go_out_in_one_send_and_arrive_whole(
    amqp_url: str, broker: BrokerClient
) -> None:
    # The 500 publishes of one hand-off (1,500 frames: method, header, body) are coalesced
    # into a few sends of up to COALESCE_BYTES; the broker must still read every message.
    link = _link(amqp_url)
    try:
        assert link._connection is not None  # ready
        transport = link._connection._transport
        sends: list[int] = []
        send = transport._sigint_safe_send

        def counted_send(sock: socket.socket, data: bytes) -> int:
            sends.append(len(data))
            return send(sock, data)

        transport._sigint_safe_send = counted_send
        bodies = [json.dumps({"n": i, "pad": "x" * (i % 700)}).encode() for i in range(500)]

        def publish_all() -> list:
            return [
                link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, body)
                for body in bodies
            ]

        futures: list = []
        link.call_soon(lambda: futures.extend(publish_all()))
        eventually(lambda: len(futures) == 500)
        for future in futures:
            assert future.result(10) is None
        assert len(sends) < 100, sends  # not one a frame
        assert max(sends) <= link_module.COALESCE_BYTES + 1024
        assert [body for _, body in broker.get_all(contract.PENDING_QUEUE)] == bodies
    finally:
        link.stop()


def test_acks_of_one_turn_go_as_one_multiple_ack_that_never_covers_an_unsettled_delivery(
    amqp_url: str, broker: BrokerClient
) -> None:
    for n in range(20):
        broker.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b"%d" % n)
    received: list[Delivery] = []
    link = _link(
        amqp_url,
        consumers=[ConsumerSpec(contract.PENDING_QUEUE, received.append, prefetch=50)],
    )
    try:
        eventually(lambda: len(received) == 20)
        acks: list[tuple[int, bool]] = []
        channel = link._channel
        assert channel is not None  # ready
        basic_ack = channel.basic_ack

        def recorded_ack(tag: int, multiple: bool = False) -> None:
            acks.append((tag, multiple))
            basic_ack(tag, multiple=multiple)

        channel.basic_ack = recorded_ack
        held = received[5]  # waits for a downstream confirm, say
        done = threading.Event()

        def ack_all_but_the_held_one() -> None:
            for delivery in received:
                if delivery is not held:
                    assert link.ack(delivery)
            link.call_later(0.05, done.set)

        link.call_soon(ack_all_but_the_held_one)
        assert done.wait(10)
        tags = [d.delivery_tag for d in received]
        assert acks == [(tags[4], True)] + [(tag, False) for tag in tags[6:]]
    finally:
        link.stop()
    # The held delivery went back to its queue when the link closed; nothing else did.
    assert [body for _, body in broker.get_all(contract.PENDING_QUEUE)] == [b"5"]


def test_a_mandatory_message_that_reaches_no_queue_fails_with_unroutable(amqp_url):
    link = _link(amqp_url)
    try:
        future = link.publish(contract.DISPATCH_EXCHANGE, "no-such-substation", b"{}")
        with pytest.raises(Unroutable, match="no-such-substation"):
            future.result(10)
        # The next publish on the same channel is unaffected.
        link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b"{}").result(10)
    finally:
        link.stop()


def test_a_publish_without_a_broker_fails_fast_instead_of_hanging():
    link = Link("amqp://guest:guest@127.0.0.1:1/%2F", name="nowhere").start()
    try:
        future = link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b"{}")
        with pytest.raises(NotConnected):
            future.result(5)
        assert not link.ready
    finally:
        link.stop()
    assert not link.thread.is_alive()


def test_a_message_its_consumer_keeps_failing_on_is_dead_lettered_with_the_reason(
    amqp_url: str, broker: BrokerClient
) -> None:
    attempts = []

    def crash(delivery: Delivery) -> None:
        attempts.append(delivery.delivery_tag)
        raise RuntimeError("cannot handle this")

    holder: dict[str, DeadLetterer] = {}
    link = Link(
        amqp_url,
        name=f"test-{uuid.uuid4().hex[:6]}",
        topology=contract.core_topology(),
        consumers=[
            ConsumerSpec(
                contract.PENDING_QUEUE,
                crash,
                prefetch=1,
                on_poison=lambda d, e: holder["dead_letters"].poisoned(
                    d, e, source=contract.PENDING_QUEUE
                ),
            )
        ],
    )
    holder["dead_letters"] = DeadLetterer(link, EventPublisher(link))
    link.start()
    assert link.wait_ready(10)
    try:
        broker.send_request(ev_id="EV-POISON")
        letters = eventually(
            lambda: broker.get_all(contract.DEAD_LETTER_QUEUE), what="a dead letter"
        )
        reason = letters[0][0].headers[contract.REASON_HEADER]
        assert "RuntimeError: cannot handle this" in reason
        assert f"{contract.DELIVERY_LIMIT} times" in reason
        assert len(attempts) == contract.DELIVERY_LIMIT
        assert link.thread.is_alive()
    finally:
        link.stop()


def test_after_connections_are_forced_closed_the_link_reconnects_and_sends_what_waited(
    amqp_url: str, broker: BrokerClient
) -> None:
    events = broker.subscribe_events(contract.RequestAccepted.kind)
    received: list[Delivery] = []
    link = _link(
        amqp_url, consumers=[ConsumerSpec(contract.PENDING_QUEUE, received.append, prefetch=10)]
    )
    try:
        broker.send_request()
        delivery = eventually(lambda: received[0] if received else None)
        vhost = amqp_url.rsplit("/", 1)[1]
        subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "test"],
            check=True,
            timeout=60,
        )
        broker = BrokerClient(amqp_url)  # the test's own connection was closed too
        events = broker.subscribe_events(contract.RequestAccepted.kind)

        # A reliable publish made around the outage (waiting in the outbox if the link is
        # still reconnecting, or unconfirmed when the connection dropped) is delivered.
        event = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="EV1")
        done = threading.Event()
        link.publish(
            contract.EVENTS_EXCHANGE, event.kind, event.to_body(), mandatory=False, reliable=True
        ).add_done_callback(lambda _f: done.set())
        assert link.wait_ready(20)
        assert done.wait(10)
        accepted = eventually(lambda: broker.events_of(events, contract.RequestAccepted))
        assert [e.request_id for e in accepted] == [event.request_id]

        # The old delivery belongs to the dead channel: acking it is a no-op, not a channel
        # error; the broker redelivered the message on the new channel.
        redelivered = eventually(lambda: received[1] if len(received) >= 2 else None)
        assert redelivered.redelivered
        acked_stale = threading.Event()
        link.call_soon(lambda: acked_stale.set() if not link.ack(delivery) else None)
        assert acked_stale.wait(5)

        def ack_the_redelivered() -> None:
            link.ack(redelivered)

        link.call_soon(ack_the_redelivered)
        eventually(lambda: broker.message_count(contract.PENDING_QUEUE) == 0 and link.ready)
    finally:
        link.stop()
        broker.close()


def test_reliable_publishes_wait_out_an_outage_and_unreliable_ones_fail_fast(amqp_url, broker):
    from tests.proxy import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    url = proxy.url(amqp_url)
    events = broker.subscribe_events(contract.RequestAccepted.kind)
    link = _link(url, max_backoff=0.5)
    try:
        proxy.cut()
        eventually(lambda: not link.ready, timeout=30, what="the link noticing the outage")

        event = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="EV1")
        waiting = link.publish(
            contract.EVENTS_EXCHANGE, event.kind, event.to_body(), mandatory=False, reliable=True
        )
        failing = link.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b"{}")
        with pytest.raises(NotConnected):
            failing.result(5)
        time.sleep(1.0)
        assert not waiting.done()  # kept in the outbox, not failed

        proxy.start()  # the broker is back
        assert waiting.result(20) is None
        accepted = eventually(lambda: broker.events_of(events, contract.RequestAccepted))
        assert [e.request_id for e in accepted] == [event.request_id]
        assert link.ready
    finally:
        link.stop()
        proxy.cut()


def test_a_publish_bound_to_a_lost_connection_is_never_sent_on_the_next_one(
    amqp_url: str, broker: BrokerClient
) -> None:
    """What a substation reports about a delivery goes out on the delivery's connection or
    not at all: once that connection is lost, the broker has handed the delivery on."""
    from tests.proxy import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    url = proxy.url(amqp_url)
    events = broker.subscribe_events(contract.SessionCompleted.kind, contract.RequestAccepted.kind)
    link = _link(url, max_backoff=0.5)
    try:
        generation = link.generation
        proxy.cut()
        eventually(lambda: not link.ready, timeout=30, what="the link noticing the outage")
        bound = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="B")
        kept = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="K")
        publisher = EventPublisher(link)
        futures: list = []
        link.call_soon(
            lambda: futures.extend(
                [publisher.publish(bound, generation=generation), publisher.publish(kept)]
            )
        )
        eventually(lambda: len(futures) == 2)
        with pytest.raises((ConnectionLost, NotConnected)):
            futures[0].result(10)
        proxy.start()
        assert futures[1].result(20) is None
        assert link.generation > generation
        time.sleep(0.5)
        assert [e.request_id for e in broker.events_of(events, contract.RequestAccepted)] == [
            kept.request_id
        ]
    finally:
        link.stop()
        proxy.cut()


def test_a_publish_bound_to_a_live_connection_is_sent_again_until_the_broker_takes_it(
    amqp_url: str, broker: BrokerClient
) -> None:
    """A broker that refuses a report (a node killed in a cluster nacks what it led) must not
    leave a substation's delivery unsettled on a live connection with its end unreported: the
    report goes out again, on the same connection, until it is confirmed."""
    full = f"full-{uuid.uuid4().hex[:6]}"
    broker.channel.queue_declare(
        full, exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    broker.channel.queue_bind(full, contract.EVENTS_EXCHANGE, contract.SessionCompleted.kind)
    broker.publish("", full, b"filler")
    link = _link(amqp_url)
    try:
        event = contract.SessionCompleted(
            at=time.time(),
            request_id=uuid.uuid4().hex,
            ev_id="EV1",
            substation="s1",
            instance="i",
            started_at=time.time() - 1,
        )
        futures: list = []
        generation = link.generation
        link.call_soon(
            lambda: futures.append(EventPublisher(link).publish(event, generation=generation))
        )
        eventually(lambda: futures)
        time.sleep(2.5)  # refused, sent again after a pause, refused again
        assert not futures[0].done()
        broker.channel.queue_purge(full)
        assert futures[0].result(10) is None
        assert link.generation == generation
        bodies = [body for _properties, body in broker.get_all(full)]
        (delivered,) = [e for b in bodies for e in contract.decode_events(event.kind, b)]
        assert isinstance(delivered, contract.SessionCompleted)
        assert delivered.request_id == event.request_id
    finally:
        link.stop()


def test_a_link_whose_publishes_go_unconfirmed_too_long_starts_over_on_a_fresh_connection(
    amqp_url, broker
):
    """A channel that never confirms (seen on RabbitMQ 3.10 after a stream's leader node was
    killed) must not hold a reliable publish, and what waits on it, forever."""
    from tests.proxy import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    url = proxy.url(amqp_url)
    link = _link(url, confirm_timeout=1.0, max_backoff=0.5)
    try:
        generation = link.generation
        proxy.freeze()  # the connection stays open; nothing more comes back on it
        future = link.publish(
            contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, b'{"n": 1}', reliable=True
        )
        assert future.result(20) is None
        assert link.generation > generation
        assert [body for _properties, body in broker.get_all(contract.PENDING_QUEUE)] == [
            b'{"n": 1}'
        ]
    finally:
        link.stop(timeout=1)
        proxy.cut()


def test_every_publish_carries_the_connections_user_which_the_broker_vouches_for(amqp_url, broker):
    queue = broker.subscribe_events(contract.RequestAccepted.kind)
    link = _link(amqp_url)
    try:
        event = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="EV1")
        link.publish(contract.EVENTS_EXCHANGE, event.kind, event.to_body()).result(10)
        method, properties, _body = eventually(
            lambda: (got := broker.channel.basic_get(queue, auto_ack=True))[0] and got
        )
        assert properties.user_id == link.user == "guest"
        # Anyone else's name is refused by the broker (406 PRECONDITION_FAILED), so the
        # property cannot be forged by a client that logs in as someone else.
        forged = pika.BasicProperties(user_id="balancer")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            broker.channel.basic_publish(contract.EVENTS_EXCHANGE, event.kind, b"{}", forged)
            broker.connection.process_data_events(1)
        assert refused.value.reply_code == 406
    finally:
        link.stop()


def test_a_durable_subscription_keeps_the_events_published_while_the_link_was_away(
    amqp_url: str, broker: BrokerClient
) -> None:
    from tests.proxy import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    url = proxy.url(amqp_url)
    seen: list[str] = []

    def note(delivery: Delivery) -> None:
        event = contract.decode_event(delivery.routing_key, delivery.body)
        assert isinstance(event, contract.RequestAccepted)
        seen.append(event.request_id)

    consumer = ConsumerSpec(
        contract.EventSubscription("test", (contract.RequestAccepted,), durable=True),
        note,
        ack_when_handled=True,
    )
    link = _link(url, consumers=[consumer], max_backoff=0.5)

    def publish_event() -> str:
        event = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="EV1")
        broker.channel.basic_publish(contract.EVENTS_EXCHANGE, event.kind, event.to_body())
        return event.request_id

    try:
        before = publish_event()
        eventually(lambda: seen == [before])
        proxy.cut()
        eventually(lambda: not link.ready, timeout=30)
        during = publish_event()  # nobody connected to receive it right now
        proxy.start()
        assert link.wait_ready(20)
        eventually(lambda: seen == [before, during], what="the event published during the outage")
    finally:
        link.stop()
        proxy.cut()
    # Stopping the link deletes its subscription queue.
    queues = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", amqp_url.rsplit("/", 1)[1], "name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "smartgrid.test-events" not in queues


def test_an_event_being_handled_when_the_connection_goes_comes_again(
    amqp_url: str, broker: BrokerClient
) -> None:
    """A durable subscription acknowledges an event once handled: one in its handler (or on
    its way) when the connection is lost is delivered again. With auto-ack it was gone: the
    lookup a substation lost that way let a request charge twice; loadgen's observer, a
    completion it lost, reported a request unfinished."""
    from tests.proxy import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    url = proxy.url(amqp_url)
    seen: list[str] = []
    handling, cut = threading.Event(), threading.Event()

    def note(delivery: Delivery) -> None:
        event = contract.decode_event(delivery.routing_key, delivery.body)
        assert isinstance(event, contract.RequestAccepted)
        seen.append(event.request_id)
        if len(seen) == 1:  # the connection goes while the first delivery is being handled
            handling.set()
            cut.wait(10)

    consumer = ConsumerSpec(
        contract.EventSubscription("test", (contract.RequestAccepted,), durable=True),
        note,
        ack_when_handled=True,
    )
    link = _link(url, consumers=[consumer], max_backoff=0.5)
    try:
        event = contract.RequestAccepted(at=time.time(), request_id=uuid.uuid4().hex, ev_id="EV1")
        broker.channel.basic_publish(contract.EVENTS_EXCHANGE, event.kind, event.to_body())
        assert handling.wait(10)
        proxy.cut()
        cut.set()
        eventually(lambda: not link.ready, timeout=30)
        proxy.start()
        assert link.wait_ready(20)
        eventually(lambda: seen == [event.request_id] * 2, what="the event delivered again")
    finally:
        cut.set()
        link.stop()
        proxy.cut()


def test_what_a_consumer_publishes_before_the_link_is_ready_is_sent_not_refused(
    amqp_url: str, broker: BrokerClient
) -> None:
    # A queue that already holds messages delivers them right after basic.consume-ok, before
    # the link has finished setting up and calls itself ready. A consumer that forwards each
    # one (the balancer) must not be told "not connected" for them: it would reject them back,
    # burning the delivery limit in a tight loop until the broker dead-letters good requests.
    sent = [broker.send_request() for _ in range(30)]
    failures: list[BaseException] = []
    holder: dict[str, Link] = {}

    def forward(delivery: Delivery) -> None:
        link = holder["link"]
        future = link.publish(contract.DISPATCH_EXCHANGE, "forwarded", delivery.body)

        def settle(f) -> None:
            if f.exception() is None:
                link.ack(delivery)
            else:
                failures.append(f.exception())
                link.reject(delivery, requeue=False)

        future.add_done_callback(settle)

    forwarded = contract.Queue("smartgrid.test-forwarded", {"x-queue-type": "quorum"})
    link = Link(
        amqp_url,
        name="test-forwarder",
        topology=[
            *contract.core_topology(),
            forwarded,
            contract.Binding(forwarded.name, contract.DISPATCH_EXCHANGE, "forwarded"),
        ],
        consumers=[ConsumerSpec(contract.PENDING_QUEUE, forward, prefetch=50)],
    )
    holder["link"] = link
    link.start()
    try:
        assert link.wait_ready(10)
        eventually(
            lambda: broker.message_count(forwarded.name) == len(sent),
            what="every message forwarded",
        )
    finally:
        link.stop()
    assert failures == []
    assert broker.message_count(contract.PENDING_QUEUE) == 0


def test_a_consumer_whose_queue_is_deleted_comes_back_on_a_fresh_connection(
    amqp_url: str, broker: BrokerClient
) -> None:
    """Deleted under its consumer (by an operator, or by a balancer that took it for a
    forgotten substation's), a queue is declared again and consumed again, not silently
    abandoned."""
    received: list[str] = []
    queue = contract.substation_queue_name("s1")

    def on_message(delivery: Delivery) -> None:
        received.append(contract.RoutedRequest.from_body(delivery.body).request_id)
        link.ack(delivery)

    link = Link(
        amqp_url,
        name=f"test-{uuid.uuid4().hex[:6]}",
        topology=contract.core_topology() + contract.substation_topology("s1"),
        consumers=[ConsumerSpec(queue, on_message, prefetch=5)],
    ).start()
    try:
        assert link.wait_ready(10)
        first = broker.send_to_substation("s1")
        eventually(lambda: received == [first])
        broker.channel.queue_delete(queue)
        again = eventually(lambda: _try_send(broker, "s1"), what="the queue declared again")
        eventually(lambda: received == [first, again], what="the queue consumed again")
        assert link.ready
    finally:
        link.stop()


def _try_send(broker: BrokerClient, substation: str) -> str | None:
    """A request for ``substation``, or None while its queue does not exist (unroutable)."""
    try:
        return broker.send_to_substation(substation)
    except pika.exceptions.UnroutableError:
        return None
