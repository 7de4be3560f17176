"""Reading a stream on a Link: the offsets asked for, when a replay has caught up, and the
reader against the real broker (a replay, its tail, a point in time, an empty stream, a
reconnect that resumes where it stopped)."""

from __future__ import annotations

import concurrent.futures
import datetime
import subprocess
import threading
import time
import uuid
from urllib.parse import unquote

import pika
import pytest

from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.amqp.streams import (
    KEEP_READING,
    RECONNECT,
    RESUBSCRIBE,
    Catchup,
    StreamReader,
    fallen_behind,
    follow_check,
    offset_argument,
    reaches_end_mark,
    silence_means_empty,
    since,
)
from tests.helpers import BrokerClient, eventually

STREAM = "test.stream"


# ----------------------------------------------------------------------------- pure parts
def test_a_reader_resumes_after_the_last_message_it_read_whatever_it_started_at():
    assert offset_argument("first", None) == {"x-stream-offset": "first"}
    assert offset_argument("first", 42) == {"x-stream-offset": 42}
    assert offset_argument(1000.0, 7) == {"x-stream-offset": 7}


def test_a_point_in_time_goes_as_a_timestamp():
    (value,) = offset_argument(since(3600, now=1_700_003_600.0), None).values()
    assert value == datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC)


def test_an_unknown_named_offset_is_refused():
    with pytest.raises(ValueError, match="stream offset"):
        offset_argument("latest", None)


def test_caught_up_on_reading_the_end_mark_not_before():
    catchup = Catchup()
    assert not catchup.read(0)
    assert not catchup.end_found(5)
    assert not catchup.read(4)
    assert catchup.read(5)
    assert not catchup.read(6)  # once per subscription
    assert catchup.caught_up


def test_a_reader_already_past_the_end_mark_when_it_is_found_has_caught_up():
    catchup = Catchup()
    assert not catchup.read(3)
    assert catchup.end_found(2)


def test_an_empty_stream_has_nothing_to_replay():
    assert Catchup().end_found(None)


def test_a_resume_past_the_end_mark_has_caught_up_at_once():
    assert Catchup(resume_at=10).end_found(9)
    assert not Catchup(resume_at=9).end_found(9)


def test_silence_counts_only_once_the_end_is_known():
    catchup = Catchup()
    assert not catchup.quiet()
    catchup.end_found(100)
    assert catchup.quiet()  # started past it (a point in time after the last chunk)


def test_a_point_in_time_reads_the_end_mark_only_if_it_was_published_since():
    assert reaches_end_mark(1000.0, None, stamped=1000)
    assert reaches_end_mark(1000.0, None, stamped=1200)
    # Published before (or unstamped): the reader may start past it; silence tells.
    assert not reaches_end_mark(1000.5, None, stamped=1000)
    assert not reaches_end_mark(1000.0, None, stamped=None)


def test_a_replay_from_a_named_offset_or_a_resume_reads_the_end_mark():
    assert reaches_end_mark("first", None, stamped=None)
    assert reaches_end_mark("last", None, stamped=None)
    assert not reaches_end_mark("next", None, stamped=None)
    assert reaches_end_mark(1000.0, 7, stamped=10)  # Catchup handles a resume past the end


def test_silence_means_an_empty_stream_at_the_first_subscription_only():
    assert silence_means_empty(caught_up_before=False, silent_probes=1, silent_subscriptions=0)
    # After a reconnect: a replica that cannot serve yet (its leader's node just died) is
    # silent too. Probe again, then try the next node, and only then believe it.
    assert not silence_means_empty(caught_up_before=True, silent_probes=1, silent_subscriptions=0)
    assert not silence_means_empty(caught_up_before=True, silent_probes=2, silent_subscriptions=0)
    assert not silence_means_empty(caught_up_before=True, silent_probes=1, silent_subscriptions=1)
    assert silence_means_empty(caught_up_before=True, silent_probes=2, silent_subscriptions=1)


def test_a_follower_that_has_not_read_what_was_at_the_end_a_probe_ago_has_fallen_behind():
    assert fallen_behind(end_before=40, next_offset=40, end_at_start=10)  # 40 not read
    assert fallen_behind(end_before=40, next_offset=12, end_at_start=10)
    assert not fallen_behind(end_before=40, next_offset=41, end_at_start=10)
    assert not fallen_behind(end_before=40, next_offset=90, end_at_start=10)


def test_no_end_found_by_the_last_probe_is_never_behind():
    assert not fallen_behind(end_before=None, next_offset=None, end_at_start=None)
    assert not fallen_behind(end_before=None, next_offset=3, end_at_start=10)


def test_a_follower_that_has_read_nothing_is_behind_only_once_the_stream_grew():
    # It started past the end it found (a point in time after the last chunk, or "next").
    assert not fallen_behind(end_before=10, next_offset=None, end_at_start=10)
    assert fallen_behind(end_before=11, next_offset=None, end_at_start=10)
    assert fallen_behind(end_before=0, next_offset=None, end_at_start=None)  # was empty


def check(*, behind=False, behind_before=False, unanswered=0, has_messages=True) -> str:
    return follow_check(
        behind=behind,
        behind_before=behind_before,
        unanswered_probes=unanswered,
        stream_has_messages=has_messages,
    )


def test_a_follower_behind_resubscribes_and_reconnects_if_that_did_not_help():
    assert check() == KEEP_READING
    assert check(behind=True) == RESUBSCRIBE
    assert check(behind=True, behind_before=True) == RECONNECT
    assert check(behind=False, behind_before=True) == KEEP_READING


def test_a_node_that_answers_no_probe_of_a_stream_with_messages_is_left():
    assert check(unanswered=1) == KEEP_READING
    assert check(unanswered=2) == RECONNECT
    assert check(unanswered=5, has_messages=False) == KEEP_READING  # an empty stream is silent


# ----------------------------------------------------------------------------- the broker
def declare_stream(url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_declare(STREAM, durable=True, arguments={"x-queue-type": "stream"})
    connection.close()


def publish(url: str, bodies: list[bytes]) -> None:
    """Publish to the stream, all at once, and wait for the confirms (so the broker writes
    them in few, large chunks)."""
    link = Link(url, name=f"test-publisher-{uuid.uuid4().hex[:6]}").start()
    try:
        assert link.wait_ready(10)
        futures = [link.publish("", STREAM, body) for body in bodies]
        for future in futures:
            future.result(20)
    finally:
        link.stop()


class Reading:
    """A Link with a StreamReader, and what it read."""

    def __init__(
        self,
        url: str,
        *,
        start="first",
        quiet: float = 1.0,
        then=None,
        follow: bool = True,
        probe_every: float = 5.0,
    ) -> None:
        self.read: list[tuple[str, bytes]] = []
        self.read_when_caught_up: list[int] = []
        self.then = then
        self.link = Link(
            url,
            name=f"test-{uuid.uuid4().hex[:6]}",
            on_ready=lambda: self.reader.on_ready(),
            on_lost=lambda: self.reader.on_lost(),
        )
        self.reader = StreamReader(
            self.link,
            STREAM,
            lambda d: self.read.append((d.routing_key, d.body)),
            start=start,
            on_caught_up=self._caught_up,
            prefetch=50,
            quiet=quiet,
            follow=follow,
            probe_every=probe_every,
        )
        self.link.start()

    def _caught_up(self) -> None:
        self.read_when_caught_up.append(len(self.read))
        if self.then is not None:
            self.then(self)

    def stop(self) -> None:
        self.link.stop()


def test_a_replay_catches_up_before_a_consumer_it_starts_hears_anything_then_follows_the_tail(
    amqp_url: str,
) -> None:
    declare_stream(amqp_url)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_declare("after-replay", durable=True)
    connection.channel().basic_publish("", "after-replay", b"go")
    connection.close()
    bodies = [b"%d" % i for i in range(2000)]
    for start in range(0, len(bodies), 500):
        publish(amqp_url, bodies[start : start + 500])

    heard_after: list[int] = []

    def start_the_other_consumer(reading: Reading) -> None:
        def on_message(delivery: Delivery) -> None:
            heard_after.append(len(reading.read))
            reading.link.ack(delivery)

        reading.link.add_consumer(ConsumerSpec("after-replay", on_message))

    reading = Reading(amqp_url, then=start_the_other_consumer)
    try:
        assert reading.reader.wait_caught_up(30)
        # Everything the stream held was read before the other queue's first delivery.
        assert eventually(lambda: heard_after) == [len(bodies)]
        assert [body for _key, body in reading.read] == bodies
        publish(amqp_url, [b"tail"])
        eventually(lambda: len(reading.read) == len(bodies) + 1)
        assert reading.read[-1] == (STREAM, b"tail")
        assert reading.read_when_caught_up[0] <= len(bodies)
    finally:
        reading.stop()


def test_an_empty_stream_is_caught_up_after_a_quiet_while_and_then_followed(amqp_url):
    declare_stream(amqp_url)
    reading = Reading(amqp_url, quiet=0.5)
    try:
        assert reading.reader.wait_caught_up(20)
        assert reading.read == []
        publish(amqp_url, [b"first"])
        assert [body for _key, body in eventually(lambda: reading.read)] == [b"first"]
    finally:
        reading.stop()


def test_a_reader_from_a_point_in_time_skips_what_is_older(amqp_url):
    declare_stream(amqp_url)
    publish(amqp_url, [b"old-1", b"old-2"])
    time.sleep(1.5)  # stream chunk timestamps are in milliseconds; leave a clear gap
    cutoff = time.time()
    time.sleep(0.5)
    publish(amqp_url, [b"new"])
    reading = Reading(amqp_url, start=cutoff, quiet=0.5)
    try:
        assert reading.reader.wait_caught_up(20)
        assert [body for _key, body in reading.read] == [b"new"]
    finally:
        reading.stop()


def test_a_reader_from_a_point_in_time_after_the_last_message_catches_up_on_silence(amqp_url):
    declare_stream(amqp_url)
    publish(amqp_url, [b"old"])
    time.sleep(1.5)
    reading = Reading(amqp_url, start=time.time(), quiet=0.5)
    try:
        assert reading.reader.wait_caught_up(20)
        assert reading.read == []
        publish(amqp_url, [b"new"])
        assert [body for _key, body in eventually(lambda: reading.read)] == [b"new"]
    finally:
        reading.stop()


def test_after_a_reconnect_the_reader_resumes_where_it_stopped_and_catches_up_again(amqp_url):
    declare_stream(amqp_url)
    publish(amqp_url, [b"a", b"b", b"c"])
    reading = Reading(amqp_url, quiet=0.5)
    try:
        assert reading.reader.wait_caught_up(20)
        eventually(lambda: len(reading.read) == 3)
        vhost = amqp_url.rsplit("/", 1)[1]
        subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "test"],
            check=True,
            timeout=60,
        )
        publish(amqp_url, [b"d"])
        eventually(lambda: len(reading.read_when_caught_up) == 2, timeout=30)
        read = eventually(lambda: reading.read if len(reading.read) >= 4 else None)
        assert [body for _key, body in read] == [b"a", b"b", b"c", b"d"]
    finally:
        reading.stop()


def test_a_follower_that_stops_hearing_from_its_stream_resubscribes_and_reads_on(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare_stream(amqp_url)
    publish(amqp_url, [b"before"])
    reading = Reading(amqp_url, quiet=0.3, probe_every=0.5)
    try:
        assert reading.reader.wait_caught_up(20)
        eventually(lambda: len(reading.read) == 1)
        # Its consumer on the Link's channel stalls: unacknowledged, its prefetch runs out,
        # and the broker sends it nothing more on a channel that stays open (as a consumer
        # of a replica whose leader died did on RabbitMQ 3.10).
        monkeypatch.setattr(reading.link, "ack", lambda _delivery: True)
        bodies = [b"%d" % i for i in range(400)]
        for start in range(0, len(bodies), 50):
            publish(amqp_url, bodies[start : start + 50])
        eventually(lambda: len(reading.read) == 1 + len(bodies), timeout=30)
        assert reading.reader.resubscriptions >= 1
        # Nothing read twice, nothing skipped, and the tail followed on the fresh channel.
        assert [body for _key, body in reading.read] == [b"before", *bodies]
        publish(amqp_url, [b"tail"])
        eventually(lambda: reading.read[-1] == (STREAM, b"tail"))
        assert reading.link.ready and reading.reader.caught_up
    finally:
        reading.stop()


def test_a_refused_probe_is_not_an_empty_stream(amqp_url):
    # A node whose replica is restarting refuses stream consumers (406, 541): the probe's
    # channel is closed without an answer. Here the stream does not exist yet (404).
    reading = Reading(amqp_url, quiet=0.3, follow=False)
    try:
        time.sleep(1.0)  # the probe refused a few times
        declare_stream(amqp_url)
        publish(amqp_url, [b"there all along"])
        assert reading.reader.wait_caught_up(30)
        # Caught up by reading the end mark, not by a silence taken for an empty stream.
        assert eventually(lambda: reading.read_when_caught_up) == [1]
        assert [body for _key, body in reading.read] == [b"there all along"]
    finally:
        reading.stop()


def test_a_replay_only_reader_stops_after_catching_up_and_after_a_reconnect_reads_the_gap(
    amqp_url,
):
    declare_stream(amqp_url)
    bodies = [b"%d" % i for i in range(300)]
    publish(amqp_url, bodies)
    reading = Reading(amqp_url, quiet=0.3, follow=False)
    try:
        assert reading.reader.wait_caught_up(20)
        eventually(lambda: len(reading.read) == len(bodies))
        # Its channel closes a moment after the replay: what comes later is not read.
        eventually(lambda: reading.reader._reader_channel is None)  # noqa: SLF001
        publish(amqp_url, [b"later"])
        vhost = amqp_url.rsplit("/", 1)[1]
        subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "test"],
            check=True,
            timeout=60,
        )
        # After the reconnect it reads from shortly before the loss: "later" among it.
        eventually(lambda: len(reading.read_when_caught_up) == 2, timeout=30)
        assert eventually(lambda: reading.read[-1][1] == b"later")
        assert [body for _key, body in reading.read[: len(bodies)]] == bodies
    finally:
        reading.stop()


def test_a_replay_only_reader_asked_to_read_again_reads_what_came_since_once(amqp_url):
    """read_again: what the stream gained since the replay, to its new end, each message once,
    and on_caught_up again (a standby substation before it takes its queue)."""
    declare_stream(amqp_url)
    bodies = [b"%d" % i for i in range(100)]
    publish(amqp_url, bodies)
    reading = Reading(amqp_url, quiet=0.3, follow=False)
    try:
        assert reading.reader.wait_caught_up(20)
        eventually(lambda: reading.reader._reader_channel is None)  # noqa: SLF001
        later = [b"later-%d" % i for i in range(3)]
        publish(amqp_url, later)
        reading.link.call_soon(reading.reader.read_again)
        eventually(lambda: len(reading.read_when_caught_up) == 2, timeout=30)
        # Caught up again on reading the new end mark (the first message of the last chunk;
        # the rest of the chunk comes in the same go).
        assert reading.read_when_caught_up[1] > len(bodies)
        eventually(lambda: len(reading.read) >= len(bodies) + len(later))
        assert [body for _key, body in reading.read] == bodies + later
    finally:
        reading.stop()


def test_the_history_stream_of_the_contract_is_read_with_its_routing_keys(amqp_url: str) -> None:
    topology = contract.core_topology() + contract.history_topology(
        max_age_seconds=3600, max_bytes=10_000_000
    )
    done = threading.Event()
    read: list[str] = []
    link = Link(
        amqp_url,
        name="test-history",
        topology=topology,
        on_ready=lambda: reader.on_ready(),
        on_lost=lambda: reader.on_lost(),
    )
    reader = StreamReader(
        link,
        contract.HISTORY_STREAM,
        lambda d: read.append(d.routing_key),
        on_caught_up=done.set,
        quiet=0.5,
    )
    link.start()
    try:
        assert done.wait(20)
        event = contract.CancelRequested(at=time.time(), request_id="r1", ev_id="EV1", client="c")
        link.publish(contract.EVENTS_EXCHANGE, event.kind, contract.encode_events([event]))
        assert eventually(lambda: read) == [event.kind]
    finally:
        link.stop()


def test_a_link_following_a_busy_stream_stops_with_its_last_publishes_confirmed(
    amqp_url: str,
) -> None:
    # Cancelling the stream consumer on stop would have pika reject the chunks on their way,
    # and the broker close the channel with the confirms still due.
    declare_stream(amqp_url)
    pumping = threading.Event()
    pumping.set()

    def pump() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        while pumping.is_set():
            for _ in range(50):
                channel.basic_publish("", STREAM, b"x" * 100)
            connection.process_data_events(0.01)
        connection.close()

    pumper = threading.Thread(target=pump)
    pumper.start()
    confirmed = threading.Event()
    link = Link(
        amqp_url,
        name="test-stop",
        topology=[contract.Queue("last-words", {})],
        on_ready=lambda: reader.on_ready(),
        on_lost=lambda: reader.on_lost(),
    )
    reader = StreamReader(link, STREAM, lambda d: None, quiet=0.3, prefetch=100)

    failed: list[BaseException] = []

    def keep_failure(future: concurrent.futures.Future) -> None:
        if (error := future.exception()) is not None:
            failed.append(error)

    def last_words() -> None:
        # Enough that confirms are still due when the consumers are cancelled.
        futures = [link.publish("", "last-words", b"bye") for _ in range(3000)]
        for future in futures:
            future.add_done_callback(keep_failure)
        futures[-1].add_done_callback(lambda f: confirmed.set() if not f.exception() else None)

    link.on_stop(last_words)
    link.start()
    try:
        assert reader.wait_caught_up(20)
        eventually(lambda: reader.messages_read > 500)
    finally:
        link.stop()
        pumping.clear()
        pumper.join(10)
    assert confirmed.is_set() and failed == []


def read_declaring(url: str, declarations: list[contract.Declaration]) -> None:
    """Read the history stream once to its end with ``declare_if_missing``."""
    link = Link(
        url,
        name="test-declare",
        topology=contract.core_topology(),
        on_ready=lambda: reader.on_ready(),
        on_lost=lambda: reader.on_lost(),
    )
    reader = StreamReader(
        link, contract.HISTORY_STREAM, lambda d: None, quiet=0.3, declare_if_missing=declarations
    )
    link.start()
    try:
        assert reader.wait_caught_up(20)
    finally:
        link.stop()


def history_max_age(url: str) -> str:
    vhost = unquote(url.rsplit("/", 1)[1])
    listed = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "arguments",
            "--no-table-headers",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (line,) = [line for line in listed.splitlines() if line.startswith(contract.HISTORY_STREAM)]
    return line.partition("x-max-age")[2].split('"')[2]


OURS = contract.history_topology(max_age_seconds=3600, max_bytes=10_000_000)


def test_a_missing_stream_is_declared_with_its_bindings(amqp_url):
    read_declaring(amqp_url, OURS)
    assert history_max_age(amqp_url) == "3600s"
    client = BrokerClient(amqp_url)
    cancel = contract.CancelRequested(at=time.time(), request_id="r", ev_id="EV1", client="c")
    try:  # bound: a cancel is routable now (mandatory: an unroutable one would raise)
        client.publish(contract.EVENTS_EXCHANGE, cancel.kind, cancel.to_body())
    finally:
        client.close()


def test_a_stream_declared_with_other_settings_is_read_as_it_is(amqp_url):
    theirs = contract.history_topology(max_age_seconds=7200, max_bytes=20_000_000)
    (queue,) = [d for d in theirs if isinstance(d, contract.Queue)]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_declare(queue.name, durable=True, arguments=queue.arguments)
    connection.close()
    read_declaring(amqp_url, OURS)
    assert history_max_age(amqp_url) == "7200s"


def test_a_following_reader_whose_stream_is_deleted_starts_over_on_a_new_connection(amqp_url):
    declare_stream(amqp_url)
    publish(amqp_url, [b"before"])
    reading = Reading(amqp_url, quiet=0.3)
    try:
        assert reading.reader.wait_caught_up(20)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().queue_delete(STREAM)
        connection.close()
        declare_stream(amqp_url)
        publish(amqp_url, [b"after"])
        # The broker cancelled the consumer; the link reconnected and the reader subscribed
        # again (at the offset after the last one it read, which the new stream has reached).
        eventually(lambda: len(reading.read_when_caught_up) >= 2, timeout=30)
        assert reading.link.ready
    finally:
        reading.stop()
