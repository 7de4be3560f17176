"""Reading a RabbitMQ stream (the history stream, say) on a Link: a replay, then its tail.

A :class:`StreamReader` consumes a stream from an offset (``first``, or a point in time such as
"an hour ago"), hands each message to its owner on the Link's I/O thread, and says when it has
*caught up*: read everything the stream held when it subscribed. A service that must replay
before it acts (a balancer before it consumes the pending queue, a substation before its
request queue) starts its other consumers from ``on_caught_up``. After a reconnect it resumes
just after the last message it read, so nothing is read twice and nothing is skipped (unless
retention dropped it meanwhile; then it starts at the oldest message left).

**How it knows it has caught up.** AMQP 0.9.1 gives no stream length (``queue.declare-ok``
says 0 messages for a stream on RabbitMQ 3.10), and an idle window alone confuses a slow
broker with the end of the stream. So on each subscription the reader first asks where the
stream ends: a *probe* consumer at offset ``last``, on a channel of its own, receives the
stream's last chunk; the ``x-stream-offset`` of its first message is the *end mark*, and the
probe's channel is closed at once. (Its own channel, because a stream sends a consumer whole
chunks whatever its prefetch, and pika rejects what reaches a cancelled consumer, which a
stream answers by closing the channel; closing the probe's channel drops it instead.) The
reader has caught up once it has read the end mark. The rest of that last chunk is sent in the
same go, so it is already on the wire ahead of anything that a consumer started from
``on_caught_up`` on the reader's channel receives.

Two cases have no end mark to read, and fall back on ``quiet`` seconds of silence:

* the probe hears nothing: the stream is empty, so there is nothing to replay;
* the reader starts past the end mark (a point in time after the last chunk was written, or a
  resume after a reconnect that had read it): it may never hear a message. Resuming past the
  end mark is recognised at once; a point in time by the end mark's publish time (every Link
  stamps what it publishes, in whole seconds): a message stamped at or after the point in time
  was written after it, so the reader will read it (:func:`reaches_end_mark`); else only
  silence since the end was found tells.

A reader that will read the end mark does not take a short silence for the end: a loaded
broker was seen to take longer than ``quiet`` to send a consumer at a point in time its first
chunk (a substation's cancels, replayed after a reconnect, then came up empty). It waits
:data:`STALLED_REPLAY_AFTER` seconds of silence, a stalled consumer's, before it counts itself
caught up anyway; a following reader's probes then find it behind and resubscribe it.

**A follower that falls behind.** A following reader that has caught up asks where the stream
ends again every ``probe_every`` seconds (:data:`FOLLOW_PROBE_EVERY`: one probe, one channel
open and one chunk sent, per few seconds per reader). A consumer can stop hearing from its
stream while the stream goes on: on RabbitMQ 3.10, when the node hosting a stream's leader is
killed, a consumer reading another node's replica has been seen to receive nothing more, on a
channel and a connection that stay open, so the Link never reconnects (a gateway worker then
answered 404 or a stale status for every request accepted after the kill). So if a probe finds
the end past what the reader has read, and the next probe, ``probe_every`` seconds later, finds
the reader still short of that end (:func:`fallen_behind`), the reader resubscribes on a fresh
channel of its own, just after the last offset it read; a mistake costs one resubscription,
never a message read twice or skipped. The stalled consumer cannot be cancelled (see below): it
stays on the Link's channel until the next reconnect, and whatever it might still send is
acknowledged and ignored.

A stream requires manual acks and a prefetch; acks only make room for more deliveries (a
stream redelivers nothing), so each message is acknowledged before it is handed over. The
owner's callback must not raise: a stream answers a reject by closing the channel, so the
reader logs the error and goes on.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika.channel

from smartgrid.amqp.consuming import ConsumerSpec, Delivery
from smartgrid.amqp.link import Link, declare
from smartgrid.contract import Declaration

log = logging.getLogger(__name__)

#: Named offsets a stream consumer may start at.
NAMED_OFFSETS = ("first", "last", "next")

#: Where a reader starts: a named offset, or a point in time (Unix seconds).
Start = str | float

#: Seconds between a following reader's probes of the stream's end (see the module docstring):
#: it resubscribes when it has not read, by one probe, what the stream held at the one before.
FOLLOW_PROBE_EVERY = 5.0


#: What a following reader does after a probe: nothing, read on a fresh channel, or start over
#: on a fresh connection (to the Link's next address).
KEEP_READING, RESUBSCRIBE, RECONNECT = "keep reading", "resubscribe", "reconnect"

#: Seconds of silence after which a reader that will read its end mark
#: (:func:`reaches_end_mark`) stops waiting for it: its consumer has stalled, not caught up.
STALLED_REPLAY_AFTER = 15.0

#: Probes in a row that hear nothing from a stream known to hold messages before the reader
#: gives up on its node (a node whose replica cannot serve a consumer answers no probe either).
UNANSWERED_PROBES_BEFORE_RECONNECT = 2

#: Subscriptions in a row whose probes heard nothing before a reader that had caught up once
#: takes its stream for empty (see :func:`silence_means_empty`).
SILENT_SUBSCRIPTIONS_BEFORE_EMPTY = 2


def silence_means_empty(
    *, caught_up_before: bool, silent_probes: int, silent_subscriptions: int
) -> bool:
    """Whether a probe that heard nothing says the stream is empty.

    At a reader's first subscription it does: an empty stream answers no probe. After a
    reconnect, it was seen not to: right after a stream's leader died (RabbitMQ 3.10, a killed
    cluster node), another node's replica answered no probe while the stream held hundreds of
    messages, and a balancer that took that silence for an empty stream replayed nothing into
    its ledger. So a reader that had caught up before probes again, has the link reconnect to
    its next address after ``UNANSWERED_PROBES_BEFORE_RECONNECT`` silent probes, and takes the
    stream for empty only when ``SILENT_SUBSCRIPTIONS_BEFORE_EMPTY`` subscriptions in a row
    heard nothing (a stream emptied meanwhile: deleted and declared again)."""
    if not caught_up_before:
        return True
    return (
        silent_subscriptions + 1 >= SILENT_SUBSCRIPTIONS_BEFORE_EMPTY
        and silent_probes >= UNANSWERED_PROBES_BEFORE_RECONNECT
    )


def follow_check(
    *, behind: bool, behind_before: bool, unanswered_probes: int, stream_has_messages: bool
) -> str:
    """What a following reader does now. ``behind``: :func:`fallen_behind` by this probe;
    ``behind_before``: by the one before too, so a resubscription did not help;
    ``unanswered_probes``: probes in a row that heard nothing."""
    if stream_has_messages and unanswered_probes >= UNANSWERED_PROBES_BEFORE_RECONNECT:
        return RECONNECT
    if behind:
        return RECONNECT if behind_before else RESUBSCRIBE
    return KEEP_READING


def fallen_behind(
    end_before: int | None, next_offset: int | None, end_at_start: int | None
) -> bool:
    """Whether a following reader has fallen behind its stream.

    ``end_before``: the end mark (the first offset of the stream's last chunk) that the
    previous probe found, a probe interval ago (None: it found none). ``next_offset``: the
    offset just after the last message the reader has read since (None: it has read nothing).
    ``end_at_start``: the end mark when the reader subscribed (None: the stream was empty),
    which a reader that started past it (a point in time later than the last chunk) never
    reads. A reader keeping up has read the message at ``end_before`` well within an interval.
    """
    if end_before is None:
        return False
    if next_offset is not None:
        return next_offset <= end_before
    return end_at_start is None or end_before > end_at_start


def reaches_end_mark(start: Start, resume_at: int | None, stamped: int | None) -> bool:
    """Whether a subscription reads the end mark, which the probe found stamped at ``stamped``
    (the publisher's ``timestamp``, whole Unix seconds; None if unstamped). A resume at or
    before the end mark reads it (one past it is caught up at once), so does a replay from
    ``first`` or ``last``; one from ``next`` never does. One from a point in time reads it when
    it was published at or after that time: the chunk holding it was written later still (by
    the broker's clock; a publisher whose clock runs ahead of it by more than a publish takes
    can mislead this, and then costs the reader :data:`STALLED_REPLAY_AFTER`, not a message)."""
    if resume_at is not None:
        return True
    if isinstance(start, str):
        return start != "next"
    return stamped is not None and stamped >= start


def offset_argument(start: Start, resume_at: int | None) -> dict[str, Any]:
    """The ``basic.consume`` arguments: resume just after the last message read, or start as
    asked. A point in time goes as an AMQP timestamp (pika encodes a datetime as one), which
    starts at the first chunk written at or after it."""
    if resume_at is not None:
        return {"x-stream-offset": resume_at}
    if isinstance(start, str):
        if start not in NAMED_OFFSETS:
            raise ValueError(f"a stream offset is one of {NAMED_OFFSETS} or a time, not {start!r}")
        return {"x-stream-offset": start}
    return {"x-stream-offset": datetime.datetime.fromtimestamp(start, tz=datetime.UTC)}


def since(lookback: float, now: float | None = None) -> float:
    """The point in time ``lookback`` seconds ago, for :class:`StreamReader` ``start``."""
    return (time.time() if now is None else now) - lookback


def stream_offset(delivery: Delivery) -> int | None:
    offset = delivery.headers.get("x-stream-offset")
    return offset if isinstance(offset, int) and not isinstance(offset, bool) else None


class Catchup:
    """Whether a subscription has read what its stream held when it began (pure state).

    ``resume_at``: the first offset this subscription asked for, if it asked for one.
    """

    def __init__(self, resume_at: int | None = None) -> None:
        self.resume_at = resume_at
        #: The first offset of the stream's last chunk at subscription; None while unknown
        #: (and when the stream was empty).
        self.end_mark: int | None = None
        self.end_known = False
        self.read_up_to: int | None = None
        self.caught_up = False

    def end_found(self, end_mark: int | None) -> bool:
        """The probe answered with ``end_mark`` (None: it heard nothing, the stream is empty).
        True when this makes the subscription caught up."""
        if self.end_known:
            return False
        self.end_known, self.end_mark = True, end_mark
        if (
            end_mark is None
            or (self.read_up_to is not None and self.read_up_to >= end_mark)
            or (self.resume_at is not None and self.resume_at > end_mark)
        ):
            return self._catch_up()
        return False

    def read(self, offset: int | None) -> bool:
        """A message at ``offset`` was read; True when this makes the subscription caught up."""
        if offset is not None and (self.read_up_to is None or offset > self.read_up_to):
            self.read_up_to = offset
        if (
            self.end_known
            and self.end_mark is not None
            and offset is not None
            and offset >= self.end_mark
        ):
            return self._catch_up()
        return False

    def quiet(self) -> bool:
        """Nothing was read for a while after the end was found: the reader started past it
        (a point in time later than the last chunk). True when this makes it caught up."""
        if not self.end_known:
            return False
        return self._catch_up()

    def _catch_up(self) -> bool:
        if self.caught_up:
            return False
        self.caught_up = True
        return True


class StreamReader:
    """Reads ``stream`` on ``link`` from ``start``, then follows its tail (``follow``), or
    stops a little after it has caught up (``follow=False``).

    Call :meth:`on_ready` from the Link's ``on_ready`` and :meth:`on_lost` from its
    ``on_lost`` (I/O thread). ``on_message(delivery)`` and ``on_caught_up()`` run on the I/O
    thread; a delivery has ``routing_key``, ``body``, and ``properties.user_id`` (the sender,
    for :func:`smartgrid.events.events_in`), and is acknowledged already. ``on_caught_up``
    runs once per subscription, so again after a reconnect, once the reader has resumed and
    read to the end.

    A following reader consumes on the Link's channel, so that a consumer its owner starts from
    ``on_caught_up`` hears nothing before the replay is done. ``follow=False`` is for an owner
    whose own event subscription hears what comes next (a substation's cancels: the whole
    history's traffic is not worth following for them): the reader consumes on a channel of its
    own and closes it ``quiet`` seconds after it has caught up (it cannot cancel its consumer:
    a stream sends whole chunks, and pika would reject what is still on its way). After a
    reconnect that followed a finished replay it reads what came since ``resume_margin``
    seconds before the loss (the owner's subscription queue went with the connection).

    A following reader that has caught up probes the stream's end every ``probe_every``
    seconds and resubscribes, on a fresh channel, if it has fallen behind (see the module
    docstring); ``resubscriptions`` counts those.

    ``pausable``: a following reader that consumes on a channel of its own, so that once
    caught up it can stop reading the stream (:meth:`pause`) and be fed the same messages by
    someone who reads them (:meth:`feed`: the gateway's workers, gateway/relay.py), go on
    probing the stream's end meanwhile, and read it again itself (:meth:`resume`, or by itself
    when it falls behind, which ``on_resubscribed`` tells its owner).

    ``declare_if_missing``: the stream and its bindings, declared only if the stream does not
    exist yet. A stream declared with other retention settings (by a service configured
    otherwise) is then read as it is; declaring it again with other arguments would be refused
    (``PRECONDITION_FAILED``), and the Link would reconnect in vain forever.
    """

    def __init__(
        self,
        link: Link,
        stream: str,
        on_message: Callable[[Delivery], None],
        *,
        start: Start = "first",
        on_caught_up: Callable[[], None] | None = None,
        follow: bool = True,
        prefetch: int = 1000,
        quiet: float = 2.0,
        resume_margin: float = 10.0,
        probe_every: float = FOLLOW_PROBE_EVERY,
        declare_if_missing: Sequence[Declaration] = (),
        pausable: bool = False,
        on_resubscribed: Callable[[], None] | None = None,
    ) -> None:
        offset_argument(start, None)  # a bad start fails here, not on the I/O thread
        self.link = link
        self.stream = stream
        self.start = start
        self.on_message = on_message
        self.on_caught_up = on_caught_up
        self.follow = follow
        self.prefetch = prefetch
        self.quiet = quiet
        self.resume_margin = resume_margin
        self.probe_every = probe_every
        self.declare_if_missing = list(declare_if_missing)
        self.pausable = pausable
        self.on_resubscribed = on_resubscribed
        #: A pausable reader that has stopped reading the stream and is fed instead.
        self.paused = False
        #: The offset just after the last message read: where a new subscription resumes.
        self.next_offset: int | None = None
        self.messages_read = 0
        self._catchup = Catchup()
        self._subscription = 0
        self._probe_channel: pika.channel.Channel | None = None
        self._reader_channel: pika.channel.Channel | None = None
        self._last_read = 0.0
        #: Seconds of silence after the end was found that end this subscription's replay.
        self._silence_ends_replay = quiet
        self._caught_up = threading.Event()
        #: The end mark the last probe of a following reader found (None: none yet).
        self._end_seen: int | None = None
        self._probe_attempt = 0
        self._behind_before = False
        self._unanswered_probes = 0
        #: Times a following reader found itself behind and resubscribed, or reconnected.
        self.resubscriptions = 0
        self.reconnections = 0
        #: Whether any subscription has caught up; subscriptions in a row whose probes heard
        #: nothing, and silent probes in this subscription (:func:`silence_means_empty`).
        self._caught_up_before = False
        self._silent_subscriptions = 0
        self._silent_probes = 0

    # ------------------------------------------------------------------ any thread
    @property
    def caught_up(self) -> bool:
        """The current subscription has read what the stream held when it began."""
        return self._caught_up.is_set()

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        return self._caught_up.wait(timeout)

    # ------------------------------------------------------------------ I/O thread
    def on_ready(self) -> None:
        """Subscribe (again): the probe for the end mark, and the reader itself."""
        self._subscription += 1
        subscription = self._subscription
        self._caught_up.clear()
        if self.declare_if_missing:
            self._ensure_stream(subscription)
        else:
            self._subscribe(subscription)

    def _ensure_stream(self, subscription: int) -> None:
        """Declare the stream (``declare_if_missing``) unless it exists: a passive check first,
        on a channel of its own, since a 404 closes the channel."""
        answered = False

        def check(channel: pika.channel.Channel) -> None:
            if subscription != self._subscription:
                channel.close()
                return

            def exists(_frame: Any) -> None:
                nonlocal answered
                answered = True
                channel.close()
                self._subscribe(subscription)

            channel.add_on_close_callback(lambda _ch, reason: missing(reason))
            channel.queue_declare(self.stream, passive=True, callback=exists)

        def missing(reason: BaseException) -> None:
            if answered or subscription != self._subscription:
                return
            if getattr(reason, "reply_code", None) == 404:
                self.link.open_side_channel(lambda channel: self._declare_on(subscription, channel))
            else:
                self._retry_ensure(subscription, reason)

        self.link.open_side_channel(check)

    def _declare_on(self, subscription: int, channel: pika.channel.Channel) -> None:
        if subscription != self._subscription:
            channel.close()
            return
        declared = False

        def done(_frame: Any) -> None:
            nonlocal declared
            declared = True
            channel.close()
            log.info("%s: declared", self.stream)
            self._subscribe(subscription)

        def closed(reason: BaseException) -> None:
            # Someone else declared it meanwhile, with other settings, say: check again.
            if not declared and subscription == self._subscription:
                self._retry_ensure(subscription, reason)

        channel.add_on_close_callback(lambda _ch, reason: closed(reason))
        for declaration in self.declare_if_missing:
            declare(channel, declaration)
        # Synchronous methods answer in order: a no-op qos answers once all of them have.
        channel.basic_qos(prefetch_count=0, callback=done)

    def _retry_ensure(self, subscription: int, reason: BaseException) -> None:
        log.warning("%s: could not check or declare the stream (%s); retrying", self.stream, reason)
        self.link.call_later(
            self.quiet,
            lambda: (
                self._ensure_stream(subscription)
                if subscription == self._subscription and self.link.ready
                else None
            ),
        )

    def _subscribe(self, subscription: int) -> None:
        if subscription != self._subscription or not self.link.ready:
            return
        self._catchup = Catchup(resume_at=self.next_offset)
        self._silence_ends_replay = self.quiet
        self._probe_attempt = 0
        self._silent_probes = 0
        self._last_read = time.monotonic()
        if not self.link.open_side_channel(lambda channel: self._probe(subscription, channel)):
            return
        self.paused = False
        if self.follow and not self.pausable:
            self.link.add_consumer(
                ConsumerSpec(
                    self.stream,
                    lambda delivery: self._on_delivery(subscription, delivery),
                    prefetch=self.prefetch,
                    arguments=self._arguments,
                    stream=True,
                )
            )
        else:
            self.link.open_side_channel(lambda channel: self._read_on(subscription, channel))
        self.link.call_later(self.quiet, lambda: self._probe_quiet(subscription))

    def read_again(self) -> None:
        """Read what the stream gained since this reader caught up, to its new end mark, then
        call ``on_caught_up`` again (I/O thread). For a reader that does not follow, whose
        owner needs what came since before it acts: a standby substation about to take over
        its queue, whose predecessor may have ended sessions meanwhile. Resumes just after the
        last message read."""
        channel, self._reader_channel = self._reader_channel, None
        if channel is not None and channel.is_open:
            channel.close()
        self.on_ready()

    def on_lost(self) -> None:
        if not self.follow and self._catchup.caught_up:
            # Its owner's subscription heard what came after the replay until now.
            self.start = since(self.resume_margin)
            self.next_offset = None
        self._subscription += 1  # late timers and deliveries of the old channel do nothing
        self._caught_up.clear()
        self._probe_channel = self._reader_channel = None
        self.paused = False

    @property
    def _on_own_channel(self) -> bool:
        return not self.follow or self.pausable

    # ------------------------------------------------- a pausable reader, fed from elsewhere
    def pause(self) -> None:
        """Stop reading the stream (a ``pausable`` following reader that has caught up), to be
        fed its messages by :meth:`feed` instead. It stays caught up, and goes on probing the
        stream's end: if what it is fed falls behind, it reads the stream again by itself
        (``on_resubscribed``)."""
        if not (self.pausable and self.follow and self.caught_up) or self.paused:
            return
        self.paused = True
        channel, self._reader_channel = self._reader_channel, None
        if channel is not None and channel.is_open:
            channel.close()  # what is still on its way is dropped (its channel is closing)

    def feed(self, delivery: Delivery) -> None:
        """A message of the stream read by someone else, in the stream's order: handled as if
        read here (one before :attr:`next_offset` is skipped)."""
        self._read(self._subscription, delivery)

    def resume(self) -> None:
        """Read the stream again, just after the last offset read or fed (a paused reader)."""
        if not self.paused:
            return
        self.paused = False
        subscription = self._subscription
        if self.link.ready:
            self.link.open_side_channel(lambda channel: self._read_on(subscription, channel))

    def _arguments(self) -> dict[str, Any]:
        return offset_argument(self.start, self.next_offset)

    def _probe(self, subscription: int, channel: pika.channel.Channel) -> None:
        if subscription != self._subscription:
            channel.close()
            return
        self._probe_channel = channel
        channel.add_on_close_callback(
            lambda _ch, reason: self._probe_closed(subscription, channel, reason)
        )

        def on_message(_channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
            if channel.is_open:
                channel.close()  # whatever else of the chunk is on its way is dropped
            if subscription != self._subscription or self._catchup.end_known:
                return
            headers = properties.headers or {}
            end_mark = headers.get("x-stream-offset")
            if not isinstance(end_mark, int):  # pragma: no cover - streams always send it
                log.warning("%s: a stream delivery without x-stream-offset", self.stream)
                return
            self._settle(subscription, self._catchup.end_found(end_mark))
            if not self.caught_up:
                reaches = reaches_end_mark(
                    self.start, self._catchup.resume_at, properties.timestamp
                )
                self._silence_ends_replay = STALLED_REPLAY_AFTER if reaches else self.quiet
                self.link.call_later(self.quiet, lambda: self._reader_quiet(subscription))

        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(self.stream, on_message, arguments={"x-stream-offset": "last"})

    def _read_on(self, subscription: int, channel: pika.channel.Channel) -> None:
        """Consume on a channel of the reader's own (``follow=False``, ``pausable``, or after
        a resubscription)."""
        if subscription != self._subscription:
            channel.close()
            return
        self._reader_channel = channel
        self._last_read = time.monotonic()
        channel.add_on_close_callback(
            lambda _ch, reason: self._reader_closed(subscription, channel, reason)
        )
        # One ack per loop turn for what arrived in it (multiple), as the Link acks on its own
        # channel: an ack only makes room for more deliveries.
        unacked = [0]

        def send_ack() -> None:
            tag, unacked[0] = unacked[0], 0
            if tag and channel.is_open:
                channel.basic_ack(tag, multiple=True)

        def on_message(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
            if not channel.is_open:
                return
            if not unacked[0]:
                self.link.call_later(0, send_ack)
            unacked[0] = method.delivery_tag
            delivery = Delivery.received(self.link.generation, method, properties, body)
            self._read(subscription, delivery)

        # The broker cancels a consumer whose stream is deleted (or whose replica goes away):
        # close the channel, and read again on another one.
        channel.add_on_cancel_callback(lambda _frame: channel.close() if channel.is_open else None)
        channel.basic_qos(prefetch_count=self.prefetch)
        channel.basic_consume(self.stream, on_message, arguments=self._arguments())

    def _reader_closed(
        self, subscription: int, channel: pika.channel.Channel, reason: BaseException
    ) -> None:
        if (
            subscription != self._subscription
            or self._reader_channel is not channel
            or self.link.stopping
        ):
            return  # closed by the reader (a later one may read already), or with the connection
        self._reader_channel = None
        log.warning("%s: the reader's channel was closed (%s); reading again", self.stream, reason)
        self.link.call_later(self.quiet, lambda: self._read_again(subscription))

    def _read_again(self, subscription: int) -> None:
        if subscription == self._subscription and self._reader_channel is None:
            self.link.open_side_channel(lambda channel: self._read_on(subscription, channel))

    def _stop_reading(self, subscription: int) -> None:
        if subscription != self._subscription:
            return  # a later subscription reads on a channel of its own
        channel, self._reader_channel = self._reader_channel, None
        if channel is not None and channel.is_open:
            channel.close()
            log.info("%s: replay done (%d message(s) read)", self.stream, self.messages_read)

    def _probe_closed(
        self, subscription: int, channel: pika.channel.Channel, reason: BaseException
    ) -> None:
        """The broker closed the probe's channel before it answered: no end was found, which
        is not an empty stream (a node whose replica is restarting after its leader died
        refuses stream consumers for a while: 406 "does not have a replica", 541). Probe
        again rather than replay nothing."""
        if (
            subscription != self._subscription
            or self._catchup.end_known
            or channel is not self._probe_channel
        ):
            return  # answered, given up on as silent, or gone with the connection
        self._probe_channel = None
        self._probe_attempt += 1  # the refused probe's silence timer no longer counts
        log.warning(
            "%s: the probe of the stream's end was refused (%s); probing again", self.stream, reason
        )

        def again() -> None:
            if subscription == self._subscription and not self._catchup.end_known:
                self._probe_again(subscription)

        self.link.call_later(self.quiet, again)

    def _probe_again(self, subscription: int) -> None:
        """A fresh probe of the stream's end, on a channel of its own, timed by a silence
        timer of its own (an earlier probe's no longer counts)."""
        self._probe_attempt += 1
        attempt = self._probe_attempt
        if self.link.open_side_channel(lambda channel: self._probe(subscription, channel)):
            self.link.call_later(self.quiet, lambda: self._probe_quiet(subscription, attempt))

    def _probe_quiet(self, subscription: int, attempt: int = 0) -> None:
        if (
            subscription != self._subscription
            or self._catchup.end_known
            or attempt != self._probe_attempt
        ):
            return
        channel, self._probe_channel = self._probe_channel, None
        if channel is not None and channel.is_open:
            channel.close()
        self._silent_probes += 1
        if silence_means_empty(
            caught_up_before=self._caught_up_before,
            silent_probes=self._silent_probes,
            silent_subscriptions=self._silent_subscriptions,
        ):
            # A stream with anything in it answers at offset "last" at once: it is empty.
            self._settle(subscription, self._catchup.end_found(None))
            return
        if self._silent_probes >= UNANSWERED_PROBES_BEFORE_RECONNECT:
            self._silent_subscriptions += 1
            self.reconnections += 1
            self.link.reconnect(
                f"{self.stream}: {self._silent_probes} probes of the stream's end heard nothing "
                "on this node since the reconnect"
            )
            return
        log.warning(
            "%s: the probe of the stream's end heard nothing in %.1fs since the reconnect; "
            "probing again",
            self.stream,
            self.quiet,
        )
        self._probe_again(subscription)

    def _reader_quiet(self, subscription: int) -> None:
        if subscription != self._subscription or self.caught_up:
            return
        if self._on_own_channel and self._reader_channel is None:
            # Its channel was refused (a replica restarting after its leader died): silence
            # while nobody listens is not the end of the stream. It counts again from when the
            # reader consumes again (_read_on).
            self.link.call_later(self.quiet, lambda: self._reader_quiet(subscription))
            return
        waited = time.monotonic() - self._last_read
        if waited < self._silence_ends_replay:
            self.link.call_later(
                min(self.quiet, self._silence_ends_replay - waited),
                lambda: self._reader_quiet(subscription),
            )
            return
        if self._silence_ends_replay > self.quiet:
            log.warning(
                "%s: nothing read for %.0fs before the stream's end (offset %s): taken for "
                "caught up",
                self.stream,
                waited,
                self._catchup.end_mark,
            )
        self._settle(subscription, self._catchup.quiet())

    def _on_delivery(self, subscription: int, delivery: Delivery) -> None:
        self.link.ack(delivery)
        self._read(subscription, delivery)

    def _read(self, subscription: int, delivery: Delivery) -> None:
        if subscription != self._subscription:
            return
        offset = stream_offset(delivery)
        if offset is not None and self.next_offset is not None and offset < self.next_offset:
            return  # before the resume point (a chunk is sent whole)
        if offset is not None:
            self.next_offset = offset + 1
        self._last_read = time.monotonic()
        self.messages_read += 1
        try:
            self.on_message(delivery)
        except Exception:
            # A reject would close the channel; a message the owner cannot use is skipped.
            log.exception("%s: the reader failed on the message at offset %s", self.stream, offset)
        self._settle(subscription, self._catchup.read(offset))

    def _settle(self, subscription: int, became_caught_up: bool) -> None:
        if not became_caught_up:
            return
        self._caught_up.set()
        self._caught_up_before = True
        if self._catchup.end_mark is not None:
            self._silent_subscriptions = 0
        log.info("%s: caught up (%d message(s) read)", self.stream, self.messages_read)
        if not self.follow:
            # The rest of the last chunk is on its way in the same go: a moment to take it.
            self.link.call_later(self.quiet, lambda: self._stop_reading(subscription))
        else:
            self._end_seen, self._behind_before, self._unanswered_probes = None, False, 0
            self.link.call_later(self.probe_every, lambda: self._watch(subscription))
        if self.on_caught_up is not None:
            self.on_caught_up()

    # ------------------------------------------------------ a follower that falls behind
    def _watch(self, subscription: int) -> None:
        """Every ``probe_every`` seconds while following: act on what the probes say
        (:func:`follow_check`), then probe the end again."""
        if subscription != self._subscription or not self.link.ready:
            return
        behind = fallen_behind(self._end_seen, self.next_offset, self._catchup.end_mark)
        action = follow_check(
            behind=behind,
            behind_before=self._behind_before,
            unanswered_probes=self._unanswered_probes,
            stream_has_messages=self.next_offset is not None or self._catchup.end_mark is not None,
        )
        self._behind_before = behind
        log.debug(
            "%s: end %s by the last probe, read up to %s, %d probe(s) unanswered: %s",
            self.stream,
            self._end_seen,
            None if self.next_offset is None else self.next_offset - 1,
            self._unanswered_probes,
            action,
        )
        if action == RECONNECT:
            self.reconnections += 1
            self.link.reconnect(
                f"{self.stream}: the reader stays behind the stream's end (read up to "
                f"{None if self.next_offset is None else self.next_offset - 1}, the end at "
                f"{self._end_seen}, {self._unanswered_probes} probe(s) unanswered)"
            )
            return  # on_lost, then on_ready: a new subscription, on another node
        if action == RESUBSCRIBE:
            subscription = self._resubscribe()
        self._probe_end(subscription)
        self.link.call_later(self.probe_every, lambda: self._watch(subscription))

    def _probe_end(self, subscription: int) -> None:
        """Find the stream's end mark now, into ``_end_seen`` (a probe like the one at
        subscription, on a channel of its own, closed on its first message or after
        ``quiet`` seconds of silence, which counts as an unanswered probe)."""
        answered = False
        probe_channel: list[pika.channel.Channel] = []

        def on_open(channel: pika.channel.Channel) -> None:
            if subscription != self._subscription or answered:
                channel.close()
                return
            probe_channel.append(channel)

            def on_message(_channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
                nonlocal answered
                if channel.is_open:
                    channel.close()  # whatever else of the chunk is on its way is dropped
                if answered or subscription != self._subscription:
                    return
                answered = True
                self._unanswered_probes = 0
                end_mark = (properties.headers or {}).get("x-stream-offset")
                if isinstance(end_mark, int):
                    self._end_seen = end_mark

            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(self.stream, on_message, arguments={"x-stream-offset": "last"})

        def silent() -> None:
            nonlocal answered
            for channel in probe_channel:
                if channel.is_open:
                    channel.close()
            if answered or subscription != self._subscription:
                return
            answered = True  # a late channel or message no longer counts
            self._unanswered_probes += 1
            if self.next_offset is None and self._catchup.end_mark is None:
                return  # an empty stream answers no probe
            log.warning(
                "%s: the probe of the stream's end heard nothing in %.1fs (%d in a row)",
                self.stream,
                self.quiet,
                self._unanswered_probes,
            )

        self.link.open_side_channel(on_open)
        self.link.call_later(self.quiet, silent)

    def _resubscribe(self) -> int:
        """Read on a fresh channel of the reader's own from just after the last offset read.
        A new subscription number, so that what the old consumer might still deliver is
        ignored (the Link's channel acknowledges it); the reader stays caught up."""
        log.warning(
            "%s: fallen behind: not read up to offset %s, at the stream's end %.0fs ago "
            "(read up to %s); resubscribing on a fresh channel",
            self.stream,
            self._end_seen,
            self.probe_every,
            None if self.next_offset is None else self.next_offset - 1,
        )
        self._subscription += 1
        subscription = self._subscription
        self.resubscriptions += 1
        self.paused = False
        self._end_seen = None
        channel, self._reader_channel = self._reader_channel, None
        if channel is not None and channel.is_open:
            channel.close()
        self.link.open_side_channel(lambda channel: self._read_on(subscription, channel))
        if self.on_resubscribed is not None:
            self.on_resubscribed()
        return subscription
