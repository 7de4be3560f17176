"""AMQP plumbing: one broker connection owned by one I/O thread, kept alive for you.

pika is not thread-safe, so a :class:`Link` owns its connection on a thread of its own and is
the only code that touches it. Other threads talk to it through the two thread-safe entry
points, :meth:`Link.publish` and :meth:`Link.call_soon`; consumer callbacks, timers and
publisher confirms all run on the I/O thread, so services that live on that thread need no locks.

What a Link does for its owner:

* connects (several broker addresses are tried in turn), declares the topology it was given
  (the message contract), applies per-consumer prefetch and starts its consumers;
* publishes with publisher confirms and, when asked, ``mandatory``: each publish returns a
  :class:`concurrent.futures.Future` that succeeds only when the broker has confirmed the
  message, and fails with :class:`Unroutable`, :class:`PublishRejected`,
  :class:`ConnectionLost` or :class:`NotConnected` otherwise;
* keeps "reliable" publishes (lifecycle events) in an outbox while the broker is away and
  sends them again when it is back, so an outage delays them instead of losing them; a publish
  bound to one connection (``generation``) is never sent on another one;
* stamps every publish with the connection's user (``user_id``), which the broker checks, so
  that consumers know who sent a message;
* declares the topology it was given, or checks it passively where its user may not declare
  it (``passive`` declarations): a missing entity closes the channel, and it tries again;
* reconnects with exponential back-off and jitter (tenacity) after any connection or channel
  failure, and runs its owner's timers meanwhile, because the I/O loop keeps running between
  connections;
* hands deliveries to consumers as :class:`Delivery` objects that remember which channel they
  came on, so an ack for a delivery from a connection that has since died is dropped instead
  of closing the new channel with ``PRECONDITION_FAILED - unknown delivery tag``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.exceptions
from pika.adapters.select_connection import IOLoop, PollEvents, SelectConnection
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from smartgrid.amqp.consuming import ConsumerSpec, Delivery, message_handler
from smartgrid.amqp.errors import ConnectionLost, LinkClosed, NotConnected, Unroutable
from smartgrid.amqp.publishing import Outgoing, Publishes
from smartgrid.contract import Binding, Declaration, EventSubscription, Exchange, Queue

log = logging.getLogger(__name__)


#: What :meth:`Link.watch_fd` watches a file descriptor for.
FD_READ, FD_WRITE, FD_ERROR = PollEvents.READ, PollEvents.WRITE, PollEvents.ERROR


class _NeverReady(Exception):
    """A connection attempt ended before the link became ready; back off and try again."""


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


def parse_urls(value: str) -> list[str]:
    """``AMQP_URL`` may list several brokers of a cluster, separated by commas."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    return urls


def connection_parameters(url: str, *, name: str) -> pika.URLParameters:
    """Parameters for ``url`` with defaults that suit long-lived service connections.

    Anything the URL sets explicitly (``?heartbeat=...``) wins over these defaults.
    """
    params = pika.URLParameters(url)
    query = url.partition("?")[2]
    if "heartbeat" not in query:
        # The broker proposes 60 s; a dead peer is then noticed only after two minutes.
        params.heartbeat = 20
    if "blocked_connection_timeout" not in query:
        # A resource alarm blocks publishers; fail them instead of hanging forever.
        params.blocked_connection_timeout = 30
    if "socket_timeout" not in query:
        params.socket_timeout = 5
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name, "product": "smartgrid"}
    return params


def declare(
    channel: pika.channel.Channel | pika.adapters.blocking_connection.BlockingChannel,
    declaration: Declaration,
) -> None:
    """Declare one entity of the contract's topology on ``channel`` (a blocking one too, as
    the tools and tests use)."""
    if isinstance(declaration, Exchange):
        channel.exchange_declare(
            declaration.name,
            exchange_type=declaration.type,
            durable=declaration.durable,
            passive=declaration.passive,
        )
    elif isinstance(declaration, Queue):
        channel.queue_declare(
            declaration.name,
            passive=declaration.passive,
            durable=declaration.durable,
            exclusive=declaration.exclusive,
            auto_delete=declaration.auto_delete,
            arguments=declaration.arguments,
        )
    elif isinstance(declaration, Binding):
        channel.queue_bind(declaration.queue, declaration.exchange, declaration.routing_key)
    else:  # pragma: no cover
        raise TypeError(declaration)


#: At most this much buffered output goes out in one send (the rest in the next).
COALESCE_BYTES = 256 * 1024

#: Seconds a publish may go unconfirmed (outside a memory or disk alarm) before the link gives
#: up on its channel and starts over on a fresh connection. A broker confirms in milliseconds,
#: or seconds under load; but a RabbitMQ 3.10 channel whose stream's leader node was killed
#: was seen never to confirm what it had routed to that stream, neither ack nor nack, on a
#: connection to a surviving node that stayed open: a substation's completions waited forever,
#: its prefetch used up by the deliveries they were to settle, and it took nothing more.
CONFIRM_TIMEOUT = 30.0
#: Seconds a connection the link closes to start over may take to close before its socket is
#: dropped (a broker that answers nothing on it never sends close-ok).
CLOSE_TIMEOUT = 5.0


def coalesce_writes(transport: Any) -> bool:
    """Make pika's ``transport`` send what it has buffered in one system call, not one per
    frame: pika queues every frame on its own (a publish is three: method, header, body) and
    sends them one by one once the socket is writable, so a loop turn that publishes ten
    messages and acks ten deliveries made 40 ``send`` calls, and the broker read as many TCP
    segments. False (and nothing changed) if this pika's transport does not look as expected.
    """
    produce = getattr(transport, "_produce", None)
    if not isinstance(getattr(transport, "_tx_buffers", None), collections.deque) or not callable(
        produce
    ):
        return False

    def produce_coalesced() -> None:
        buffers: collections.deque[bytes] = transport._tx_buffers
        if len(buffers) > 1:
            parts, size = [], 0
            while buffers and size < COALESCE_BYTES:
                chunk = buffers.popleft()
                parts.append(chunk)
                size += len(chunk)
            buffers.appendleft(b"".join(parts))
        produce()

    transport._produce = produce_coalesced
    return True


class _Connection(SelectConnection):
    """pika's SelectConnection, its writes coalesced (:func:`coalesce_writes`)."""

    def _proto_connection_made(self, transport: Any) -> None:
        super()._proto_connection_made(transport)
        if not coalesce_writes(transport):
            log.warning("pika's transport changed: its writes are not coalesced")


def pace_turns(
    ioloop: IOLoop, min_interval: float, while_: Callable[[], bool] = lambda: True
) -> bool:
    """Let at least ``min_interval`` seconds pass between the starts of two turns of
    ``ioloop``, while ``while_()`` says so: a turn due sooner sleeps first, unless a timer is
    due already.

    At a moderate rate every message otherwise wakes the loop on its own, and each wake-up
    costs a poll, a read, a write, an ack and, in the broker, a settle and a log write of its
    own; messages that arrive while the loop waits are handled in one turn instead (one read
    of many frames, one write of every answer, one ``multiple`` ack). A message after a quiet
    spell is handled at once, and so is what a turn left for right after it (``call_later(0)``:
    the events and acks it flushes); a turn that took ``min_interval`` or longer (a busy loop)
    is followed at once; timers fire up to ``min_interval`` late. False (and nothing changed)
    if ``min_interval`` is 0 or this pika's loop does not look as expected.
    """
    poller = getattr(ioloop, "_poller", None)
    poll = getattr(poller, "poll", None)
    dispatch = getattr(poller, "_dispatch_fd_events", None)
    until_next_timer = getattr(poller, "_get_wait_seconds", None)
    if min_interval <= 0 or not (
        callable(poll) and callable(dispatch) and callable(until_next_timer)
    ):
        return False
    turn_started = -min_interval

    def paced_poll() -> None:
        wait = turn_started + min_interval - time.monotonic()
        if wait > 0 and until_next_timer() != 0 and while_():
            time.sleep(wait)
        poll()

    def dispatch_noting_the_time(fd_event_map: dict[int, int]) -> None:
        # A turn starts once the wait for I/O is over, not when the wait begins.
        nonlocal turn_started
        turn_started = time.monotonic()
        dispatch(fd_event_map)

    poller.poll = paced_poll  # type: ignore[union-attr]
    poller._dispatch_fd_events = dispatch_noting_the_time  # type: ignore[union-attr]
    return True


class Link:
    """One broker connection, its channel, its consumers and its publishes.

    Call :meth:`start` once; :meth:`stop` closes the connection (unacknowledged deliveries go
    back to their queues) and ends the I/O thread. ``min_turn_interval`` paces the I/O loop
    while ``pace_while()`` says so (:func:`pace_turns`).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        name: str,
        topology: Iterable[Declaration] = (),
        consumers: Iterable[ConsumerSpec] = (),
        on_ready: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        outbox_limit: int = 100_000,
        max_backoff: float = 10.0,
        confirm_timeout: float = CONFIRM_TIMEOUT,
        min_turn_interval: float = 0.0,
        pace_while: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self._urls = parse_urls(url) if isinstance(url, str) else list(url)
        self._topology = list(topology)
        self._consumers = list(consumers)
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._max_backoff = max_backoff
        self._confirm_timeout = confirm_timeout

        self._ioloop = IOLoop()
        if min_turn_interval > 0 and not pace_turns(self._ioloop, min_turn_interval, pace_while):
            log.warning("%s: pika's I/O loop changed: its turns are not paced", name)
        self._handoff: collections.deque[Callable[[], None]] = collections.deque()
        self._handoff_lock = threading.Lock()
        self._stop_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"amqp-{name}", daemon=True)
        self._ready = threading.Event()
        self._stopping = False
        self._stopped = threading.Event()
        # Start at a random address: services given the same list spread over the cluster's
        # nodes instead of all connecting to (and failing over from) the first.
        self._attempt = random.randrange(len(self._urls))
        self._current_url = self._urls[self._attempt]

        # I/O-thread state.
        self._connection: SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._generation = 0
        self._user = ""
        self._became_ready = False
        self._close_reason: BaseException | None = None
        self._publishes = Publishes(name=name, outbox_limit=outbox_limit)
        self._consumer_tags: list[str] = []
        #: Stream consumers, never cancelled by the link (ConsumerSpec.stream).
        self._stream_tags: set[str] = set()
        #: Delivery tags of this channel's deliveries not yet settled, oldest first (consumers
        #: that acknowledge; a dict as an ordered set), and those acknowledged during this
        #: loop turn, whose acks go out at its end (:meth:`_send_acks`).
        self._unsettled: dict[int, None] = {}
        self._acked: set[int] = set()
        self._link_id = uuid.uuid4().hex[:10]
        self._durable_subscriptions: set[str] = set()
        #: Why the broker blocks this connection's publishes (``connection.blocked``: a memory
        #: or disk alarm), or None. Set on the I/O thread, read from any.
        self._blocked_reason: str | None = None
        #: When the broker last stopped blocking publishes (time.monotonic()).
        self._unblocked_at = 0.0

    # ----------------------------------------------------------------------------------------
    # Any thread
    # ----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Connected, topology declared and consumers started."""
        return self._ready.is_set()

    @property
    def stopping(self) -> bool:
        """:meth:`stop` has begun: channels and the connection are being closed on purpose."""
        return self._stopping

    @property
    def user(self) -> str:
        """The broker user this link connects as (every publish carries it as ``user_id``)."""
        return connection_parameters(self._current_url, name=self.name).credentials.username

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def blocked_reason(self) -> str | None:
        """Why the broker blocks this connection's publishes now (``connection.blocked``, a
        memory or disk alarm), or None. RabbitMQ tells a connection when it publishes during an
        alarm; until the alarm clears, whatever it publishes waits unconfirmed."""
        return self._blocked_reason

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> Link:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel consumers, wait briefly for outstanding confirms, close, join the thread."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._ioloop.add_callback_threadsafe(
            lambda: self._begin_stop(deadline=time.monotonic() + timeout / 2)
        )
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: I/O thread did not stop within %.1fs", self.name, timeout)

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the I/O thread when :meth:`stop` begins, while it can still publish
        (and have those publishes confirmed before the connection closes). Call before
        :meth:`start`."""
        self._stop_hooks.append(hook)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread (the only thread-safe way into the Link)."""
        if threading.current_thread() is self._thread:
            callback()
            return
        # Waking the I/O thread is a pipe write and read, dearer than most callbacks: while
        # a wake-up is on its way, later callbacks join it instead of sending their own (a
        # busy gateway's request threads publish far faster than one wake-up apiece).
        with self._handoff_lock:
            # Callbacks are waiting exactly while a wake-up is on its way.
            wake_up_on_its_way = bool(self._handoff)
            self._handoff.append(callback)
        if not wake_up_on_its_way:
            self._ioloop.add_callback_threadsafe(self._run_handoff)

    def _run_handoff(self) -> None:
        with self._handoff_lock:
            callbacks, self._handoff = self._handoff, collections.deque()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # pragma: no cover - a bug in the caller, not in the others
                log.exception("%s: a callback handed to the I/O thread failed", self.name)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        reliable: bool = False,
        generation: int | None = None,
    ) -> concurrent.futures.Future:
        """Publish with confirms; the future completes when the broker has confirmed it.

        ``reliable`` messages survive connection loss: they wait in the outbox and are sent
        again on the next connection (so they may arrive twice). Use it for messages whose loss
        matters more than a duplicate and whose consumers deduplicate. Other messages fail
        fast, which is what a caller that can still say "try again" wants.

        ``generation`` binds the publish to one connection (that of a delivery it reports on,
        :attr:`Delivery.generation`): it fails with :class:`ConnectionLost` rather than go out
        on any later connection, reliable or not.
        """
        outgoing = Outgoing(
            exchange, routing_key, body, headers, persistent, mandatory, reliable, generation
        )
        if self._stopped.is_set():
            outgoing.fail(LinkClosed(f"{self.name}: link is stopped"))
        else:
            self.call_soon(lambda: self._send(outgoing))
        return outgoing.future

    # ----------------------------------------------------------------------------------------
    # I/O thread only
    # ----------------------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], object]) -> object:
        """Run ``callback`` on the I/O thread after ``delay`` seconds, across reconnects."""
        return self._ioloop.call_later(delay, callback)

    def cancel_timer(self, handle: object) -> None:
        self._ioloop.remove_timeout(handle)

    def watch_fd(self, fd: int, on_event: Callable[[int, int], None], events: int) -> None:
        """I/O thread: call ``on_event(fd, events)`` when ``fd`` is ready for ``events``
        (:data:`FD_READ`, :data:`FD_WRITE`), across reconnects, until :meth:`unwatch_fd`."""
        self._ioloop.add_handler(fd, on_event, events)

    def rewatch_fd(self, fd: int, events: int) -> None:
        """I/O thread: what a watched ``fd`` is watched for from now on."""
        self._ioloop.update_handler(fd, events)

    def unwatch_fd(self, fd: int) -> None:
        """I/O thread."""
        self._ioloop.remove_handler(fd)

    @property
    def generation(self) -> int:
        """The number of the channel open now (or last open); deliveries carry theirs."""
        return self._generation

    def inspect_queue(self, queue: str, callback: Callable[[int, int], None]) -> bool:
        """Ask for ``queue``'s ready messages and consumers; ``callback(messages, consumers)``
        runs on the I/O thread. A passive declare: no permission needed, but a queue that does
        not exist closes the channel (and the link reconnects). False when not connected."""
        channel = self._channel
        if channel is None or not channel.is_open or not self.ready:
            return False

        def answered(frame: Any) -> None:
            callback(frame.method.message_count, frame.method.consumer_count)

        channel.queue_declare(queue, passive=True, callback=answered)
        return True

    def delete_queue(self, queue: str) -> bool:
        """Delete ``queue`` now (I/O thread), whatever it holds; False when not connected.
        Deleting a queue that does not exist succeeds. There is no "only if empty": quorum
        queues refuse ``if-empty`` and ``if-unused`` with 540 NOT_IMPLEMENTED, which closes
        the connection, so the caller checks first (:meth:`inspect_queue`)."""
        channel = self._channel
        if channel is None or not channel.is_open or not self.ready:
            return False
        channel.queue_delete(queue)
        return True

    def is_current(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` came on the channel open now (so it can still be settled)."""
        return self._live_channel_for(delivery) is not None

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge ``delivery``; False if its channel is gone (it will be redelivered).

        The ack goes out at the end of this loop turn, with the others of the turn: one
        ``multiple`` ack for those that settle everything up to a tag (each ack is a frame
        to send, and a settle the quorum queue writes to its log). Were the connection lost
        before, the delivery comes again, as it would had the frame been lost on the way.
        """
        channel = self._live_channel_for(delivery)
        if channel is None:
            return False
        tag = delivery.delivery_tag
        if tag not in self._unsettled:
            channel.basic_ack(tag)  # not ours to batch (a consumer added by hand, say)
            return True
        if not self._acked:
            self._ioloop.call_later(0, self._send_acks)
        self._acked.add(tag)
        return True

    def reject(self, delivery: Delivery, *, requeue: bool) -> bool:
        """Reject ``delivery``. With ``requeue`` it counts toward the queue's delivery limit."""
        channel = self._live_channel_for(delivery)
        if channel is None:
            return False
        self._unsettled.pop(delivery.delivery_tag, None)
        channel.basic_reject(delivery.delivery_tag, requeue=requeue)
        return True

    def _send_acks(self) -> None:
        """The acks of this turn: one ``multiple`` ack for those that, with the ones before,
        settle every delivery up to a tag; one each for the rest (a delivery still unsettled
        below them, one waiting for a downstream confirm, must stay so)."""
        acked, self._acked = self._acked, set()
        channel = self._channel
        if not acked or channel is None or not channel.is_open:
            return
        unsettled = self._unsettled
        run_end = None
        for tag in unsettled:
            if tag not in acked:
                break
            run_end = tag
        if run_end is not None:
            for tag in list(itertools.takewhile(lambda t: t <= run_end, unsettled)):
                del unsettled[tag]
                acked.discard(tag)
            channel.basic_ack(run_end, multiple=True)
        for tag in sorted(acked):
            if tag in unsettled:  # not rejected meanwhile
                del unsettled[tag]
                channel.basic_ack(tag)

    def cancel_consumers(self) -> None:
        """Stop receiving new deliveries; those already received stay ours to settle."""
        if self._channel is not None and self._channel.is_open:
            for tag in self._consumer_tags:
                self._channel.basic_cancel(tag)
        self._consumer_tags.clear()

    # ----------------------------------------------------------------------------------------
    # Connection lifecycle (I/O thread)
    # ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self._confirm_timeout > 0:
            # Timers outlive connections: one watch for the link's whole life.
            self._ioloop.call_later(self._confirm_timeout / 3, self._watch_confirms)
        try:
            while not self._stopping:
                retrying = Retrying(
                    retry=retry_if_exception_type(_NeverReady),
                    wait=wait_exponential(multiplier=0.2, max=self._max_backoff)
                    + wait_random(0, 0.5),
                    stop=lambda _state: self._stopping,
                    sleep=self._idle,
                    before_sleep=self._log_retry,
                    reraise=True,
                )
                try:
                    retrying(self._serve_one_connection)
                except _NeverReady:
                    pass  # stopping while the broker was unreachable
        except Exception:  # pragma: no cover - a bug in the link itself
            log.exception("%s: I/O thread crashed", self.name)
        finally:
            self._ready.clear()
            self._stopped.set()
            self._publishes.fail_all(LinkClosed(f"{self.name}: link stopped"))

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: broker unavailable (%s); retrying in %.1fs",
            self.name,
            error,
            state.next_action.sleep if state.next_action else 0,
        )

    def _idle(self, seconds: float) -> None:
        """Back-off sleep that keeps the I/O loop (timers, thread-safe calls) running."""
        if self._stopping:
            return
        self._ioloop.call_later(seconds, self._ioloop.stop)
        self._ioloop.start()

    def _serve_one_connection(self) -> None:
        if self._stopping:
            raise _NeverReady("stopping")
        url = self._urls[self._attempt % len(self._urls)]
        self._attempt += 1
        self._current_url = url
        self._became_ready = False
        self._close_reason = None
        parameters = connection_parameters(url, name=self.name)
        self._user = parameters.credentials.username
        self._connection = _Connection(
            parameters=parameters,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )
        self._connection.add_on_connection_blocked_callback(self._on_blocked)
        self._connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._ioloop.start()  # until the connection closes (or fails to open)
        self._connection = None
        if not self._became_ready and not self._stopping:
            raise _NeverReady(self._close_reason or "connection closed during set-up")
        if not self._stopping:
            log.warning("%s: connection lost (%s); reconnecting", self.name, self._close_reason)

    def _on_connection_open(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: Any, error: BaseException) -> None:
        self._close_reason = error
        self._ioloop.stop()

    def _on_blocked(self, _connection: Any, frame: Any) -> None:
        self._blocked_reason = getattr(frame.method, "reason", None) or "the broker is blocked"
        log.warning("%s: the broker blocks publishing: %s", self.name, self._blocked_reason)

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        if self._blocked_reason is not None:
            log.info("%s: the broker accepts publishing again", self.name)
        self._blocked_reason = None
        self._unblocked_at = time.monotonic()

    def _watch_confirms(self) -> None:
        """Every third of ``confirm_timeout``: a publish the broker has owed a confirm for
        longer (not counting an alarm's block) means a channel that will never confirm it, so
        start over on a fresh connection (see :data:`CONFIRM_TIMEOUT`)."""
        if self._stopping:
            return
        self._ioloop.call_later(self._confirm_timeout / 3, self._watch_confirms)
        oldest = self._publishes.oldest_unconfirmed()
        if oldest is None or not self._ready.is_set() or self._blocked_reason is not None:
            return
        waited = time.monotonic() - max(oldest, self._unblocked_at)
        if waited > self._confirm_timeout:
            self.reconnect(
                f"the broker has not confirmed a publish in {waited:.0f}s "
                f"({self._publishes.unconfirmed} unconfirmed)"
            )

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._close_reason = reason
        self._connection_gone(reason)
        self._ioloop.stop()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._generation += 1
        self._channel = channel
        self._unsettled, self._acked = {}, set()
        self._publishes.new_channel()
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.confirm_delivery(self._on_confirm)
        for declaration in self._topology:
            declare(channel, declaration)
        for consumer in self._consumers:
            self._start_consumer(channel, consumer)
        # Every call above is a synchronous AMQP method that pika sends in order, one at a
        # time; a no-op qos queued last answers only when all of them have succeeded.
        channel.basic_qos(prefetch_count=0, callback=lambda _frame: self._on_channel_ready(channel))

    def _start_consumer(self, channel: pika.channel.Channel, spec: ConsumerSpec) -> str:
        if isinstance(spec.queue, EventSubscription):
            # Unique to this process and, unless durable, to this connection.
            suffix = self._link_id if spec.queue.durable else f"{self._generation}.{self._link_id}"
            for declaration in spec.queue.declarations(suffix):
                declare(channel, declaration)
            queue = spec.queue.queue_name(suffix)
            if spec.queue.durable:
                self._durable_subscriptions.add(queue)
        else:
            queue = spec.queue
        on_message = message_handler(
            spec,
            generation=self._generation,
            requeue=lambda delivery: self.reject(delivery, requeue=True),
            link_name=self.name,
            ack=self.ack,
        )
        if not spec.auto_ack:
            on_message = self._tracking(on_message, self._generation)
        channel.basic_qos(prefetch_count=0 if spec.auto_ack else spec.prefetch)
        tag = channel.basic_consume(
            queue,
            on_message,
            auto_ack=spec.auto_ack,
            arguments=spec.arguments() if spec.arguments is not None else None,
        )
        if spec.stream:  # it ends with its channel (ConsumerSpec.stream)
            self._stream_tags.add(tag)
        else:
            self._consumer_tags.append(tag)
        return tag

    def _tracking(
        self, on_message: Callable[[Any, Any, Any, bytes], None], generation: int
    ) -> Callable[[Any, Any, Any, bytes], None]:
        """``on_message``, the delivery counted as unsettled first (see :meth:`ack`)."""

        def track(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            if generation == self._generation:
                self._unsettled[method.delivery_tag] = None
            on_message(channel, method, properties, body)

        return track

    def declare(self, declarations: Iterable[Declaration]) -> bool:
        """Declare more of the topology now (I/O thread); False when not connected."""
        if self._channel is None or not self.ready:
            return False
        for declaration in declarations:
            declare(self._channel, declaration)
        return True

    def add_consumer(self, spec: ConsumerSpec) -> str | None:
        """Start consuming as ``spec`` says now (I/O thread). Unlike the consumers given to the
        constructor it is not restarted after a reconnect. None when not connected."""
        if self._channel is None or not self.ready:
            return None
        return self._start_consumer(self._channel, spec)

    def open_side_channel(self, on_open: Callable[[pika.channel.Channel], None]) -> bool:
        """Open another channel on this connection (I/O thread), for a short exchange that must
        not disturb the link's own channel; its owner closes it (it closes with the
        connection anyway). A stream probe uses one: closing a channel drops what is on its way
        to it, where cancelling a consumer would reject it. False when not connected."""
        connection = self._connection
        if connection is None or not connection.is_open or not self.ready:
            return False
        connection.channel(on_open_callback=on_open)
        return True

    def cancel_consumer(self, tag: str) -> None:
        if tag in self._consumer_tags:
            self._consumer_tags.remove(tag)
            if self._channel is not None and self._channel.is_open:
                self._channel.basic_cancel(tag)

    def reconnect(self, reason: str) -> None:
        """Start over on a fresh connection, to the next address (I/O thread): for an owner
        that finds this one no longer serves it (a stream consumer that stopped hearing from
        its stream, say). Owners restart what they added (on_lost, on_ready)."""
        if self._stopping or self._connection is None or not self._connection.is_open:
            return
        log.warning("%s: reconnecting: %s", self.name, reason)
        self._close_reason = RuntimeError(reason)
        connection: SelectConnection = self._connection
        connection.close()

        def abort() -> None:
            # A peer that answers nothing never sends close-ok: drop the socket instead
            # (pika's own adapter method for a broken stream; it calls on_connection_closed).
            if connection.is_closed or id(self._connection) != id(connection):
                return
            log.warning("%s: the broker did not answer the close; dropping the socket", self.name)
            connection._adapter_disconnect_stream()

        self._ioloop.call_later(CLOSE_TIMEOUT, abort)

    def _on_channel_ready(self, channel: pika.channel.Channel) -> None:
        if channel is not self._channel or self._stopping:
            return
        self._became_ready = True
        self._ready.set()
        log.info("%s: connected to %s and ready", self.name, _redact(self._current_url))
        for outgoing in self._publishes.take_waiting():
            self._send(outgoing)
        if self._on_ready is not None:
            self._on_ready()

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        if self._stopping:
            return
        # A channel error (a declaration that conflicts, an unknown delivery tag) leaves the
        # connection in an unknown state; start over from a fresh connection.
        log.error("%s: channel closed by broker: %s", self.name, reason)
        self._close_reason = reason
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_consumer_cancelled(self, frame: pika.frame.Method) -> None:
        """The broker cancelled a consumer of this link: its queue was deleted (by an operator,
        or by a balancer that took it for a forgotten substation's). Rather than stay connected
        and consume nothing, start over from a fresh connection, which declares the topology
        again and restarts the consumers (owners restart those they added: on_lost, on_ready)."""
        tag = frame.method.consumer_tag
        if (tag not in self._consumer_tags and tag not in self._stream_tags) or self._stopping:
            return
        if tag in self._consumer_tags:
            self._consumer_tags.remove(tag)
        log.error(
            "%s: the broker cancelled consumer %s (queue deleted?); reconnecting", self.name, tag
        )
        self._close_reason = RuntimeError(f"consumer {tag} cancelled by the broker")
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _connection_gone(self, reason: BaseException) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        self._blocked_reason = None
        self._channel = None
        self._consumer_tags.clear()
        self._stream_tags.clear()
        lost = ConnectionLost(f"{self.name}: connection lost before confirmation: {reason}")
        # Unconfirmed publishes first, then those still waiting (unreliable ones among them were
        # made while the channel was being set up): reliable ones are sent again, in that order.
        self._publishes.connection_lost(lost, keep_reliable=not self._stopping)
        if was_ready and self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:
                log.exception("%s: on_lost hook failed", self.name)

    def _begin_stop(self, deadline: float) -> None:
        for hook in self._stop_hooks:
            hook()
        self._ready.clear()
        self._send_acks()
        self.cancel_consumers()
        if self._channel is not None and self._channel.is_open:
            for queue in self._durable_subscriptions:
                self._channel.queue_delete(queue)
        if self._connection is None:
            self._ioloop.stop()  # idle between attempts
            return
        self._close_when_settled(deadline)

    def _close_when_settled(self, deadline: float) -> None:
        connection = self._connection
        if connection is None:
            return
        if self._publishes.unconfirmed and time.monotonic() < deadline and connection.is_open:
            self._ioloop.call_later(0.02, lambda: self._close_when_settled(deadline))
            return
        if connection.is_closed:
            self._ioloop.stop()
        elif not connection.is_closing:
            connection.close()  # also aborts a connection still being opened

    # ----------------------------------------------------------------------------------------
    # Publishing (I/O thread)
    # ----------------------------------------------------------------------------------------
    def _send(self, outgoing: Outgoing) -> None:
        if outgoing.generation is not None and outgoing.generation != self._generation:
            outgoing.fail(
                ConnectionLost(f"{self.name}: the connection this publish belongs to is gone")
            )
            return
        channel = self._channel
        if channel is None or not channel.is_open or not self._ready.is_set():
            setting_up = channel is not None and channel.is_open
            # A consumer may publish while the channel is still being set up (deliveries start
            # as soon as its basic.consume is answered): that waits for readiness, moments
            # away, instead of failing as "not connected".
            if (outgoing.reliable or setting_up) and not self._stopping:
                self._publishes.wait(outgoing)
            else:
                outgoing.fail(NotConnected(f"{self.name}: not connected to the broker"))
            return
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent
            if outgoing.persistent
            else pika.DeliveryMode.Transient,
            # Lets a basic.return (which carries no delivery tag) find its publish.
            message_id=f"{self._generation}.{self._publishes.next_tag}",
            # The broker refuses a publish whose user_id is not the connection's user, so
            # consumers can trust it to say who sent a message.
            user_id=self._user,
            timestamp=int(time.time()),
            headers=outgoing.headers,
        )
        try:
            channel.basic_publish(
                outgoing.exchange,
                outgoing.routing_key,
                outgoing.body,
                properties,
                mandatory=outgoing.mandatory,
            )
        except (pika.exceptions.AMQPError, OSError) as exc:
            outgoing.fail(NotConnected(f"{self.name}: publish failed: {exc}"))
            return
        self._publishes.sent(outgoing)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        refused = self._publishes.confirmed(
            method.delivery_tag,
            multiple=method.multiple,
            acked=isinstance(method, pika.spec.Basic.Ack),
        )
        for outgoing in refused:
            # An internal broker error; try again shortly rather than losing an event.
            self._ioloop.call_later(1.0, lambda o=outgoing: self._send(o))

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        generation, _, tag = (properties.message_id or "").partition(".")
        if generation != str(self._generation) or not tag.isdigit():
            return
        self._publishes.returned(
            int(tag),
            Unroutable(
                f"{method.reply_text}: no queue for exchange {method.exchange!r} "
                f"routing key {method.routing_key!r}"
            ),
        )

    def _live_channel_for(self, delivery: Delivery) -> pika.channel.Channel | None:
        channel = self._channel
        if channel is None or not channel.is_open or delivery.generation != self._generation:
            return None
        return channel
