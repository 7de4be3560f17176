"""Publisher confirms and the outbox as plain state: no broker, no connection."""

from __future__ import annotations

import pytest

from smartgrid.amqp.errors import ConnectionLost, NotConnected, PublishRejected, Unroutable
from smartgrid.amqp.publishing import Outgoing, Publishes


def outgoing(n: int = 0, *, reliable: bool = False, generation: int | None = None) -> Outgoing:
    return Outgoing("x", "key", b"%d" % n, None, True, True, reliable, generation)


def sent(publishes: Publishes, *messages: Outgoing) -> list[int]:
    return [publishes.sent(message) for message in messages]


def test_tags_count_from_one_on_every_channel():
    publishes = Publishes(name="t", outbox_limit=10)
    assert sent(publishes, outgoing(), outgoing()) == [1, 2]
    publishes.new_channel()
    assert sent(publishes, outgoing()) == [1]


def test_a_multiple_ack_confirms_every_publish_up_to_its_tag_and_no_later_one():
    publishes = Publishes(name="t", outbox_limit=10)
    messages = [outgoing(n) for n in range(4)]
    sent(publishes, *messages)
    assert publishes.confirmed(3, multiple=True, acked=True) == []
    assert [m.future.done() for m in messages] == [True, True, True, False]
    assert messages[0].future.result() is None
    assert publishes.unconfirmed == 1


def test_a_single_ack_confirms_that_publish_only():
    publishes = Publishes(name="t", outbox_limit=10)
    first, second = outgoing(1), outgoing(2)
    sent(publishes, first, second)
    publishes.confirmed(2, multiple=False, acked=True)
    assert second.future.done() and not first.future.done()


def test_a_nack_fails_an_ordinary_publish_and_hands_a_reliable_one_back_to_send_again():
    publishes = Publishes(name="t", outbox_limit=10)
    ordinary, reliable = outgoing(1), outgoing(2, reliable=True)
    sent(publishes, ordinary, reliable)
    assert publishes.confirmed(2, multiple=True, acked=False) == [reliable]
    with pytest.raises(PublishRejected):
        ordinary.future.result(0)
    assert not reliable.future.done()
    assert publishes.unconfirmed == 0


def test_a_nack_hands_a_publish_bound_to_its_connection_back_to_send_again():
    """A substation's report on a delivery it holds: failing it would leave the delivery
    unsettled on a live connection, its session's end never reported."""
    publishes = Publishes(name="t", outbox_limit=10)
    ordinary, report = outgoing(1), outgoing(2, generation=7)
    sent(publishes, ordinary, report)
    assert publishes.confirmed(2, multiple=True, acked=False) == [report]
    assert ordinary.future.done() and not report.future.done()


def test_a_returned_publish_fails_as_unroutable_and_its_later_confirm_is_ignored():
    publishes = Publishes(name="t", outbox_limit=10)
    message = outgoing()
    (tag,) = sent(publishes, message)
    publishes.returned(tag, Unroutable("no queue"))
    assert publishes.confirmed(tag, multiple=False, acked=True) == []
    with pytest.raises(Unroutable):
        message.future.result(0)


def test_a_lost_connection_keeps_reliable_publishes_in_order_and_fails_the_others():
    publishes = Publishes(name="t", outbox_limit=10)
    unconfirmed_reliable, unconfirmed_ordinary = outgoing(1, reliable=True), outgoing(2)
    waiting_reliable, waiting_ordinary = outgoing(3, reliable=True), outgoing(4)
    sent(publishes, unconfirmed_reliable, unconfirmed_ordinary)
    publishes.wait(waiting_reliable)
    publishes.wait(waiting_ordinary)  # made while the channel was being set up

    publishes.connection_lost(ConnectionLost("gone"), keep_reliable=True)

    for failed in (unconfirmed_ordinary, waiting_ordinary):
        with pytest.raises(ConnectionLost):
            failed.future.result(0)
    # Unconfirmed first, then those that were waiting: the order they were published in.
    assert publishes.take_waiting() == [unconfirmed_reliable, waiting_reliable]
    assert not unconfirmed_reliable.future.done()
    assert publishes.unconfirmed == publishes.waiting == 0


def test_when_stopping_a_lost_connection_fails_reliable_publishes_too():
    publishes = Publishes(name="t", outbox_limit=10)
    reliable = outgoing(reliable=True)
    sent(publishes, reliable)
    publishes.connection_lost(ConnectionLost("gone"), keep_reliable=False)
    with pytest.raises(ConnectionLost):
        reliable.future.result(0)


def test_a_full_outbox_drops_its_oldest_publish():
    publishes = Publishes(name="t", outbox_limit=2)
    messages = [outgoing(n, reliable=True) for n in range(3)]
    for message in messages:
        publishes.wait(message)
    with pytest.raises(NotConnected, match="outbox full"):
        messages[0].future.result(0)
    assert publishes.take_waiting() == messages[1:]


def test_fail_all_settles_everything_outstanding():
    publishes = Publishes(name="t", outbox_limit=10)
    unconfirmed, waiting = outgoing(1), outgoing(2, reliable=True)
    sent(publishes, unconfirmed)
    publishes.wait(waiting)
    publishes.fail_all(NotConnected("stopped"))
    assert all(isinstance(m.future.exception(0), NotConnected) for m in (unconfirmed, waiting))
    assert publishes.unconfirmed == publishes.waiting == 0


def test_a_publish_is_settled_once():
    message = outgoing()
    message.succeed()
    message.fail(NotConnected("late"))
    assert message.future.result(0) is None


def test_the_oldest_unconfirmed_publish_is_the_first_still_owed_a_confirm():
    publishes = Publishes(name="t", outbox_limit=10)
    assert publishes.oldest_unconfirmed() is None
    first, second = outgoing(1), outgoing(2)
    publishes.sent(first, now=10.0)
    publishes.sent(second, now=12.0)
    assert publishes.oldest_unconfirmed() == 10.0
    publishes.confirmed(1, multiple=False, acked=True)
    assert publishes.oldest_unconfirmed() == 12.0
