"""The gateway's side of the broker: publishing requests and commands, following their events.

Every publish ends in one :class:`~gateway.answers.Outcome`, which says honestly what the
broker did with it: ``NOT_SENT`` (nothing left this process: no connection, or the broker blocks
publishers during a memory or disk alarm), ``REFUSED`` (the pending queue refused it),
``UNCONFIRMED`` (published, but no confirm by the deadline, or the connection went after
publishing: it may still be enqueued) or ``CONFIRMED``.

RabbitMQ tells a connection that it is blocked (``connection.blocked``) only once it publishes
during an alarm. So that the first request after an alarm starts is refused at once, too, rather
than held unconfirmed until the deadline, an idle link publishes a *canary* now and then: a
tiny message that no queue takes, whose only job is to be blocked first.

What the gateway knows of requests comes from the history stream (``contract.HISTORY_STREAM``):
each worker reads it from the first offset at start into its :class:`RequestHistory`, then
follows its tail, so every replica, after any restart, knows every request in the retention
window. Until it has caught up, it is not ready (``unavailable_reason``). With
``history_relay_dir``, the workers of a host that have caught up follow the tail through one
of them, which reads it for the others (gateway/relay.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from gateway import relay_protocol
from gateway.answers import Outcome
from gateway.doubts import Doubts
from gateway.history import RequestHistory
from gateway.relay import HistoryRelay
from smartgrid import contract
from smartgrid.amqp import (
    Delivery,
    Link,
    NotConnected,
    PublishRejected,
    Unroutable,
)
from smartgrid.amqp.streams import StreamReader
from smartgrid.events import events_in
from smartgrid.senders import DEFAULT_EVENT_SENDERS, Senders

log = logging.getLogger(__name__)

#: How long a publish waits for a broker connection that is being re-established: a reconnect
#: (a broker restart, a cluster node failing over) takes well under a second.
READY_WAIT = 1.0
#: How long negative confirms are tried again: long enough for a quorum queue to elect a new
#: leader, short enough that a full pending queue is answered soon.
REFUSED_RETRY = 1.0
#: An idle link publishes a canary this often, so that it learns of an alarm before a request
#: would (see the module's docstring).
CANARY_INTERVAL = 1.0
#: The canary's routing key on the requests exchange: bound to no queue, so the broker drops it.
CANARY_ROUTING_KEY = "gateway.canary"
#: How often the doubts about the history are looked at (gateway/doubts.py).
DOUBTS_INTERVAL = 5.0
#: /health's reason until the history has been read up to the stream's end.
REPLAYING = "replaying the history"
#: While waiting for a confirm, how often to look whether the broker has blocked the link.
_BLOCKED_POLL = 0.1


class _Blocked(Exception):
    """The broker blocked the connection while a publish waited for its confirm."""


class GatewayBroker:
    def __init__(
        self,
        amqp_url: str,
        *,
        name: str,
        history: RequestHistory,
        on_connection_change: Callable[[bool], None] | None = None,
        declare_topology: bool = True,
        event_senders: Iterable[str] = DEFAULT_EVENT_SENDERS,
        canary_interval: float = CANARY_INTERVAL,
        history_max_age: int = contract.HISTORY_MAX_AGE_SECONDS,
        history_max_bytes: int = contract.HISTORY_MAX_BYTES,
        history_relay_dir: str | None = None,
        history_relay_window: int = relay_protocol.WINDOW,
    ):
        self.history = history
        self.on_connection_change = on_connection_change
        stream = contract.history_topology(
            max_age_seconds=history_max_age, max_bytes=history_max_bytes
        )
        self.link = Link(
            amqp_url,
            name=name,
            topology=contract.topology(contract.core_topology() + stream, declare=declare_topology),
            on_ready=self._on_ready,
            on_lost=self._on_lost,
        )
        self.senders = Senders(event_senders, own_user=self.link.user)
        self.reader = StreamReader(
            self.link,
            contract.HISTORY_STREAM,
            self._on_history,
            start="first",
            pausable=history_relay_dir is not None,
            on_resubscribed=self._on_history_resubscribed,
        )
        #: The host's one reader of the history stream relays it to the other workers
        #: (gateway/relay.py); None: this worker reads it itself, always.
        self.relay = (
            None
            if history_relay_dir is None
            else HistoryRelay(
                self.link,
                self.reader,
                history_relay_dir,
                reads=relay_protocol.source(amqp_url, contract.HISTORY_STREAM),
                window=history_relay_window,
            )
        )
        self._canary_interval = canary_interval
        self._last_publish = 0.0
        self._canary_started = False
        self._canary_lock = threading.Lock()
        if history.doubts is None:
            history.doubts = Doubts()
        self.doubts: Doubts = history.doubts
        self.doubts_interval = DOUBTS_INTERVAL

    def _on_ready(self) -> None:
        self.reader.on_ready()
        if self.relay is not None:
            self.relay.on_ready()
        self._connection_changed(True)
        with self._canary_lock:
            start, self._canary_started = not self._canary_started, True
        if start:
            if self._canary_interval > 0:
                self._canary()
            self.link.call_later(self.doubts_interval, self._act_on_doubts)

    def _on_lost(self) -> None:
        self.reader.on_lost()
        if self.relay is not None:
            self.relay.on_lost()
        self._connection_changed(False)

    def _connection_changed(self, connected: bool) -> None:
        if self.on_connection_change is not None:
            self.on_connection_change(connected)

    @property
    def ready(self) -> bool:
        return self.link.ready

    @property
    def blocked_reason(self) -> str | None:
        """Why the broker blocks this gateway's publishes now (a memory or disk alarm)."""
        return self.link.blocked_reason

    @property
    def unavailable_reason(self) -> str | None:
        """Why nothing can be published now, in words for /health; None when it can."""
        if not self.link.ready:
            return "not connected to the message broker"
        blocked = self.link.blocked_reason
        if blocked is not None:
            return f"the message broker blocks publishing ({blocked})"
        if not self.reader.caught_up:
            return REPLAYING
        return None

    @property
    def caught_up(self) -> bool:
        """The history has read the stream up to where it ended when this connection began."""
        return self.reader.caught_up

    def wait_caught_up(self, timeout: float) -> bool:
        return self.reader.wait_caught_up(timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a connection being (re-)established; whether it is up."""
        return self.link.wait_ready(timeout)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop(timeout=5)
        if self.relay is not None:
            self.relay.close()  # another worker takes the lock at once

    # ------------------------------------------------------------------ publishing
    def publish_request(
        self, request: contract.ChargeRequest, routing_key: str = contract.REQUEST_ROUTING_KEY
    ) -> Future:
        """Publish a request to the pending queue (and, under the default key, the history
        stream); the future succeeds once it is confirmed."""
        self._last_publish = time.monotonic()
        return self.link.publish(
            contract.REQUESTS_EXCHANGE, routing_key, request.to_body(), mandatory=True
        )

    def accept(self, request: contract.ChargeRequest, *, deadline: float) -> Outcome:
        """Publish ``request`` to the pending queue (and the history stream) and say what the
        broker did with it by ``deadline`` (time.monotonic()).

        Nothing is published while the broker blocks publishers or there is no connection
        (``NOT_SENT``; a reconnect under way is waited for, briefly). A negative confirm says
        that the pending queue or the history stream refused the request, not which: a stream
        electing a new leader may refuse what the pending queue took, and the request would
        then run. So the tries that follow go to the pending queue alone
        (``contract.REQUEST_PENDING_ROUTING_KEY``), for :data:`REFUSED_RETRY`: a confirm means
        the request will run (``CONFIRMED``; a second copy is a duplicate the balancer drops,
        and a history without the request is mended by the doubts' copy), a refusal that the
        pending queue itself refuses it (``REFUSED``: full, or electing a leader); with no
        answer to such a try the request may have been taken (``UNCONFIRMED``). A connection
        lost after publishing, or no confirm by the deadline, may have enqueued it: that is
        ``UNCONFIRMED`` too, and is never tried again here.
        """
        # What the refusals so far say: after the first publish's, only that the request may
        # be in the pending queue; after a try for the pending queue alone, that it is not.
        refusal: Outcome | None = None
        routing_key = contract.REQUEST_ROUTING_KEY
        delay = 0.05
        # A full pending queue (backpressure) refuses every try: give up on it well before the
        # deadline rather than hold a server thread each time.
        stop_retrying = time.monotonic() + REFUSED_RETRY
        while True:
            if not self._can_publish(deadline):
                return refusal or Outcome.NOT_SENT
            try:
                self._wait(self.publish_request(request, routing_key), deadline)
                self.doubts.accepted(request, time.time())
                return Outcome.CONFIRMED
            except NotConnected:  # the link went between the check and the publish
                return refusal or Outcome.NOT_SENT
            except (PublishRejected, Unroutable):
                refusal = (
                    Outcome.REFUSED
                    if routing_key == contract.REQUEST_PENDING_ROUTING_KEY
                    else Outcome.UNCONFIRMED
                )
                routing_key = contract.REQUEST_PENDING_ROUTING_KEY
                if min(deadline, stop_retrying) - time.monotonic() <= delay:
                    return refusal
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except Exception:  # lost after publishing, blocked, timed out, link stopped
                return Outcome.UNCONFIRMED

    def publish_event(self, event: contract.Event) -> Future:
        """Publish ``event`` reliably: while the broker is away it waits in the link's outbox,
        and it is sent again after a lost connection or a negative confirm. The future
        succeeds once the broker has confirmed it."""
        self._last_publish = time.monotonic()
        return self.link.publish(
            contract.EVENTS_EXCHANGE, event.kind, event.to_body(), mandatory=False, reliable=True
        )

    def command(self, event: contract.Event, *, deadline: float) -> Outcome:
        """Publish ``event`` (a command such as ``request.cancel_requested``) reliably, unless
        it cannot be sent now (``NOT_SENT``: nothing published); ``CONFIRMED`` once the broker
        has it by ``deadline``, else ``UNCONFIRMED`` (it stays in the outbox and goes out
        later)."""
        if not self._can_publish(deadline):
            return Outcome.NOT_SENT
        try:
            self._wait(self.publish_event(event), deadline)
        except Exception:
            return Outcome.UNCONFIRMED
        return Outcome.CONFIRMED

    def _can_publish(self, deadline: float) -> bool:
        if self.link.blocked_reason is not None:
            return False
        if self.link.ready:
            return True
        return self.link.wait_ready(max(0.0, min(READY_WAIT, deadline - time.monotonic())))

    def _wait(self, future: Future, deadline: float) -> None:
        """The future's result by ``deadline``; :class:`_Blocked` as soon as the broker blocks
        the link meanwhile (it holds the message until the alarm clears: answer now)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FutureTimeout()
            # Future.result waits on the future's own condition: concurrent.futures.wait
            # builds a waiter with an Event of its own and locks the future twice more, some
            # 5-10 µs of CPU per request more (issue 16).
            try:
                future.result(timeout=min(remaining, _BLOCKED_POLL))
                return
            except FutureTimeout:
                if future.done():
                    raise  # the publish itself failed so, not the wait
            if self.link.blocked_reason is not None:
                raise _Blocked(self.link.blocked_reason)

    def _canary(self) -> None:
        """I/O thread: publish a canary if nothing was published lately, then again later."""
        idle = time.monotonic() - self._last_publish >= self._canary_interval
        if idle and self.link.ready and self.link.blocked_reason is None:
            self._last_publish = time.monotonic()
            self.link.publish(
                contract.REQUESTS_EXCHANGE,
                CANARY_ROUTING_KEY,
                b"{}",
                persistent=False,
                mandatory=False,
            )
        self.link.call_later(self._canary_interval, self._canary)

    def _act_on_doubts(self) -> None:
        """I/O thread: send again what the stream lost, ask about what stands still
        (gateway/doubts.py); only once the history is read up to date, so that what is still
        to be read is not taken for lost."""
        if self.link.ready and self.reader.caught_up:
            due = self.doubts.due(time.time())
            for request in due.copies:
                log.info(
                    "request %s was not read back from the history: sent again", request.request_id
                )
                self.link.publish(
                    contract.REQUESTS_EXCHANGE,
                    contract.REQUEST_COPY_ROUTING_KEY,
                    request.to_body(),
                    mandatory=False,
                    reliable=True,
                )
            now = time.time()
            for request_id in due.status_requests:
                log.debug("request %s stands still in the history: status asked", request_id)
                self.publish_event(contract.StatusRequested(at=now, request_id=request_id))
        self.link.call_later(self.doubts_interval, self._act_on_doubts)

    # ------------------------------------------------------------------ following
    def _on_history_resubscribed(self) -> None:
        if self.relay is not None:
            self.relay.on_resubscribed()

    def _on_history(self, delivery: Delivery) -> None:
        """One message of the history stream (I/O thread): a request or a batch of events,
        read from the stream or relayed; relayed on to the host's other workers by their
        reader."""
        self._apply_history(delivery)
        if self.relay is not None:
            self.relay.relay(delivery)

    def _apply_history(self, delivery: Delivery) -> None:
        if delivery.routing_key in contract.HISTORY_REQUEST_KEYS:
            # Only the gateways and the balancer (reroutes) may publish to the requests
            # exchange: the broker's permissions vouch for its sender.
            try:
                request = contract.ChargeRequest.from_body(delivery.body)
            except contract.InvalidMessage as exc:
                log.warning("ignoring an invalid request in the history: %s", exc)
                return
            self.history.accepted(request)
            self.doubts.copy_read(request.request_id)
            return
        for event in events_in(delivery, self.senders):
            self.history.apply(event)
