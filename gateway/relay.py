"""One reader of the history stream per gateway host: the others are relayed what it reads.

Every gateway worker keeps its own :class:`~gateway.history.RequestHistory` (its own accepts
reach it at once, any worker answers ``GET`` for any request, Idempotency-Key and ``ev_busy``
decide from it), but only one worker of a host reads the history stream from the broker once
the others have caught up: the holder of a file lock (gateway/election.py). It relays every
message it reads, offsets and all, over a Unix socket of the gateway's private directory to
the other workers, batched per turn of its I/O loop; they apply each as if they had read it
(``StreamReader.feed``). That saves each other worker the broker's deliveries and pika's
handling of them; decoding and applying stays per worker.

The guarantees of a worker reading the stream itself are kept:

* A worker replays the stream itself at start, and answers 503 "replaying the history" until
  it has caught up, as before. Only then does it try to take the lock, or else ask the reader
  for what follows its last offset (``HELLO``); the reader answers with the start of its window
  of recent messages (``WELCOME``) and the window's messages from there. A worker beyond the
  window goes on reading the stream itself, and asks again a little later.
* Every relayed message says where the one relayed before it ended (gateway/relay_protocol.py):
  a worker skips what it has already and, at a gap, or when the relay's socket breaks or the
  reader dies, reads the stream itself again from its own last offset at once, then takes the
  lock if it is free. A worker fed by the relay keeps probing the stream's end as a reader
  does (``StreamReader``'s follower check): a relay that falls behind the stream (a reader
  stopped, or stuck) makes it read the stream itself too.
* A reader that loses its broker connection drops its workers, which read the stream
  themselves, and refuses new ones until it has caught up again. A worker that loses its own
  connection reads the stream itself again from its last offset, as before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable

import pika

from gateway import relay_protocol as protocol
from gateway.election import ReaderLock
from smartgrid.amqp import Delivery, Link
from smartgrid.amqp.link import FD_READ, FD_WRITE
from smartgrid.amqp.streams import StreamReader, stream_offset

log = logging.getLogger(__name__)

#: How a worker reads the history (:attr:`HistoryRelay.mode`, ``gateway_history_reading`` and
#: /health): from the stream for itself alone, from the stream for the host's other workers
#: too, or fed by the relay.
STREAM, RELAY, RELAYED = "stream", "relay", "relayed"
READING_MODES = (STREAM, RELAY, RELAYED)

#: Why a worker that was relayed to reads the stream itself again (``on_fallback``,
#: ``gateway_history_relay_fallbacks_total{cause}``): a gap in the relayed history; the relay's
#: socket closed or broken (the reader stopped or died, dropped the worker, or sent garbage);
#: the relayed history fell behind the stream's end; the worker's own broker connection was
#: lost. ``other_stream`` is counted by the reader: it refused a worker that reads another
#: stream or broker (a relay directory shared by mistake), which therefore reads its own.
GAP, RELAY_CONNECTION, BEHIND, BROKER_CONNECTION, OTHER_STREAM = (
    "gap",
    "relay_connection",
    "behind",
    "broker_connection",
    "other_stream",
)
FALLBACK_CAUSES = (GAP, RELAY_CONNECTION, BEHIND, BROKER_CONNECTION, OTHER_STREAM)

#: The lines a worker logs as it takes a part in the relay, defined once for the relay and
#: what reads its log (tests/test_history_relay_process.py, through
#: ``smartgrid.log_lines.pattern``): it reads the stream for the others (its pid, and the
#: offset it relays from); it is relayed to (its pid, and the offset it follows on from).
READS_FOR_OTHERS = (
    "history relay: worker %d reads the history stream for the host's other workers "
    "(from offset %d)"
)
RELAYED_FROM = "history relay: worker %d is relayed the history from offset %d"

#: How often a worker that reads the stream itself tries to take the lock, or to be relayed.
RETRY_EVERY = 1.0
#: Bytes a worker may have waiting to be sent to it before the reader drops it (it then reads
#: the stream itself): a worker that stopped taking them must not hold the reader's memory.
MAX_BACKLOG = 32 * 1024 * 1024
_RECEIVE = 256 * 1024


class _Peer:
    """One end of a relay connection, non-blocking, on the Link's I/O loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.frames = protocol.FrameReader()
        self.backlog = bytearray()
        #: A worker that has been welcomed (reader's side), or that follows (worker's side).
        self.live = False

    def receive(self) -> list[tuple[int, bytes]] | None:
        """The frames that arrived; None when the connection is closed or broken."""
        try:
            data = self.sock.recv(_RECEIVE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        return self.frames.feed(data)

    def send(self, data: bytes) -> bool:
        """Send ``data`` after what waits; whether anything is left waiting."""
        if self.backlog:
            self.backlog += data
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(data):
                self.backlog += data[sent:]
        return bool(self.backlog)

    def send_backlog(self) -> bool:
        """Send what waits; whether anything is still left."""
        try:
            sent = self.sock.send(self.backlog)
        except (BlockingIOError, InterruptedError):
            sent = 0
        del self.backlog[:sent]
        return bool(self.backlog)


class HistoryRelay:
    """A gateway worker's part in its host's relay of the history stream; I/O thread only.

    ``reader``: the worker's ``pausable`` StreamReader of the history, whose ``on_message``
    calls :meth:`relay` and whose ``on_resubscribed`` is :meth:`on_resubscribed`. ``reads``:
    what it reads (``relay_protocol.source``). ``window``: how many of the messages it relays,
    as the reader, it keeps for a worker that asks to follow on from a little behind
    (``HISTORY_RELAY_WINDOW``). ``on_fallback(cause)``, if set: a worker went
    back to reading the stream itself, or was refused the relay, for one of
    :data:`FALLBACK_CAUSES` (the gateway's metrics count them).
    """

    def __init__(
        self,
        link: Link,
        reader: StreamReader,
        directory: str,
        *,
        reads: bytes,
        window: int = protocol.WINDOW,
        retry_every: float = RETRY_EVERY,
    ) -> None:
        self.link = link
        self.reader = reader
        self.lock = ReaderLock(os.path.join(directory, protocol.LOCK_NAME))
        self.socket_path = os.path.join(directory, protocol.SOCKET_NAME)
        #: What this worker reads (relay_protocol.source): a reader of another stream
        #: relays nothing to it.
        self.reads = reads
        self.window_limit = window
        self.retry_every = retry_every
        self.on_fallback: Callable[[str], None] | None = None
        self._started = False
        # As the reader:
        self._server: socket.socket | None = None
        self._window: protocol.Window | None = None
        self._workers: dict[int, _Peer] = {}
        self._pending: list[bytes] = []
        # As a worker relayed to:
        self._upstream: _Peer | None = None
        #: Times this worker went back to reading the stream itself after being relayed to.
        self.fallbacks = 0

    # ------------------------------------------------------------------ state
    @property
    def reading_for_others(self) -> bool:
        """This worker holds the lock: it reads the stream for the host's other workers."""
        return self._window is not None

    @property
    def relayed(self) -> bool:
        """This worker is fed by the relay instead of reading the stream (any thread: /health
        asks, while the I/O thread may let go of the relay)."""
        upstream = self._upstream
        return upstream is not None and upstream.live

    @property
    def mode(self) -> str:
        """How this worker reads the history now (one of :data:`READING_MODES`)."""
        if self.reading_for_others:
            return RELAY
        return RELAYED if self.relayed else STREAM

    # ------------------------------------------------------------------ the Link's hooks
    def on_ready(self) -> None:
        if not self._started:
            self._started = True
            self.link.call_later(self.retry_every, self._tick)

    def on_lost(self) -> None:
        # The reader resumes from its last offset on the next connection (StreamReader).
        self._drop_upstream("the broker connection was lost", BROKER_CONNECTION, resume=False)
        for peer in list(self._workers.values()):
            self._drop_worker(peer)

    def on_resubscribed(self) -> None:
        """The reader fell behind the stream while fed, and reads it itself again."""
        self._drop_upstream("the relayed history fell behind the stream", BEHIND, resume=False)

    def close(self) -> None:
        """Let go of the lock and the sockets (the worker is stopping)."""
        if self._upstream is not None:
            self._upstream.sock.close()
        for peer in self._workers.values():
            peer.sock.close()
        if self._server is not None:
            self._server.close()
        self.lock.release()

    def _tick(self) -> None:
        idle = not self.reading_for_others and self._upstream is None
        if idle and self.link.ready and self.reader.caught_up and not self._take_lock():
            self._connect()
        self.link.call_later(self.retry_every, self._tick)

    # ------------------------------------------------------------------ as the reader
    def _take_lock(self) -> bool:
        if not self.lock.try_acquire():
            return False
        self.reader.resume()
        try:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)  # a dead reader's
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(self.socket_path)
            server.listen(64)
            server.setblocking(False)
        except OSError:
            log.exception("history relay: cannot listen on %s", self.socket_path)
            self.lock.release()
            return False
        self._server = server
        self._window = protocol.Window(self.reader.next_offset or 0, self.window_limit)
        self.link.watch_fd(server.fileno(), self._on_connect, FD_READ)
        log.info(READS_FOR_OTHERS, os.getpid(), self._window.start)
        return True

    def relay(self, delivery: Delivery) -> None:
        """A message this worker read from the stream (the reader's ``on_message``)."""
        window = self._window
        if window is None:
            return  # not the reader: nothing to relay (every message of every worker comes here)
        offset = stream_offset(delivery)
        if offset is None or offset < window.end:
            return
        frame = window.add(offset, delivery.routing_key, delivery.properties.user_id, delivery.body)
        if not self._workers:
            return
        if not self._pending:
            self.link.call_later(0, self._send_pending)  # the rest of this loop turn joins it
        self._pending.append(frame)

    def _send_pending(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        for peer in list(self._workers.values()):
            if peer.live:
                self._send_to(peer, data)

    def _send_to(self, peer: _Peer, data: bytes) -> None:
        if peer.send(data):
            if len(peer.backlog) > MAX_BACKLOG:
                log.warning("history relay: a worker does not keep up; dropped")
                self._drop_worker(peer)
                return
            self.link.rewatch_fd(peer.fd, FD_READ | FD_WRITE)

    def _on_connect(self, _fd: int, _events: int) -> None:
        assert self._server is not None
        while True:
            try:
                sock, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("history relay: cannot accept a worker (%s)", exc)
                return
            sock.setblocking(False)
            peer = _Peer(sock)
            self._workers[peer.fd] = peer
            self.link.watch_fd(peer.fd, self._on_worker, FD_READ)

    def _on_worker(self, fd: int, events: int) -> None:
        peer = self._workers.get(fd)
        if peer is None:
            return
        if events & FD_WRITE and not peer.send_backlog():
            self.link.rewatch_fd(peer.fd, FD_READ)
        if not events & FD_READ:
            return
        try:
            frames = peer.receive()
        except protocol.ProtocolError as exc:
            log.warning("history relay: %s from a worker; dropped", exc)
            frames = None
        if frames is None:
            self._drop_worker(peer)
            return
        for kind, payload in frames:
            if kind != protocol.HELLO or peer.live:
                self._drop_worker(peer)
                return
            self._welcome(peer, *protocol.decode_hello(payload))

    def _welcome(self, peer: _Peer, next_offset: int, reads: bytes) -> None:
        window = self._window
        if reads != self.reads:
            log.error(
                "history relay: a worker reading another stream or broker asks to be relayed "
                "to in %s: HISTORY_RELAY_DIR must be one gateway's own",
                os.path.dirname(self.socket_path),
            )
            self._fell_back(OTHER_STREAM)
            self._drop_worker(peer)
            return
        if window is None or not (self.link.ready and self.reader.caught_up):
            self._drop_worker(peer)  # it reads the stream itself, and asks again later
            return
        if not window.covers(next_offset):
            self._drop_worker(peer)  # beyond the window: it reads the stream itself
            return
        peer.live = True
        self._send_to(peer, protocol.welcome(window.start) + window.since(next_offset))

    def _drop_worker(self, peer: _Peer) -> None:
        if self._workers.pop(peer.fd, None) is None:
            return
        self.link.unwatch_fd(peer.fd)
        peer.sock.close()

    # ------------------------------------------------------------------ as a worker relayed to
    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.socket_path)
            sock.send(protocol.hello(self.reader.next_offset or 0, self.reads))
        except OSError:
            sock.close()  # no reader listening (yet, or any more): read the stream itself
            return
        self._upstream = _Peer(sock)
        self.link.watch_fd(self._upstream.fd, self._on_upstream, FD_READ)

    def _on_upstream(self, _fd: int, _events: int) -> None:
        peer = self._upstream
        if peer is None:
            return
        try:
            frames = peer.receive()
        except protocol.ProtocolError as exc:
            self._drop_upstream(f"the relay sent {exc}", RELAY_CONNECTION)
            return
        if frames is None:
            self._drop_upstream("the relay's connection closed", RELAY_CONNECTION)
            return
        for kind, payload in frames:
            if kind == protocol.WELCOME and not peer.live:
                if not self._follow(peer, protocol.decode_offset(payload)):
                    return
            elif kind == protocol.MESSAGE and peer.live:
                if not self._apply(protocol.decode_message(payload)):
                    return
            else:
                self._drop_upstream(
                    f"the relay sent a frame of kind {kind} out of turn", RELAY_CONNECTION
                )
                return

    def _follow(self, peer: _Peer, window_start: int) -> bool:
        next_offset = self.reader.next_offset or 0
        if window_start > next_offset or not self.reader.caught_up:
            self._drop_upstream(
                f"the relay's window starts at offset {window_start}, after this worker's "
                f"{next_offset}",
                GAP,
            )
            return False
        peer.live = True
        self.reader.pause()
        log.info(RELAYED_FROM, os.getpid(), next_offset)
        return True

    def _apply(self, message: protocol.Relayed) -> bool:
        next_offset = self.reader.next_offset or 0
        placed = protocol.place(message.prev, message.offset, next_offset)
        if placed == protocol.DUPLICATE:
            return True
        if placed == protocol.GAP:
            self._drop_upstream(
                f"a gap in the relayed history (offsets {next_offset} to {message.prev - 1})",
                GAP,
            )
            return False
        self.reader.feed(
            Delivery(
                generation=self.link.generation,
                delivery_tag=0,
                exchange="",
                routing_key=message.routing_key,
                redelivered=False,
                properties=pika.BasicProperties(
                    user_id=message.user_id, headers={"x-stream-offset": message.offset}
                ),
                body=message.body,
            )
        )
        return True

    def _fell_back(self, cause: str) -> None:
        if self.on_fallback is not None:
            self.on_fallback(cause)

    def _drop_upstream(self, reason: str, cause: str, *, resume: bool = True) -> None:
        """Stop being relayed to (``cause``: one of :data:`FALLBACK_CAUSES`, counted when the
        worker was fed), and read the stream itself again."""
        peer, self._upstream = self._upstream, None
        if peer is None:
            return
        self.link.unwatch_fd(peer.fd)
        peer.sock.close()
        if peer.live:
            self._fell_back(cause)
            self.fallbacks += 1
            log.warning(
                "history relay: %s; worker %d reads the stream itself from offset %s",
                reason,
                os.getpid(),
                self.reader.next_offset,
            )
        else:
            log.debug("history relay: not relayed now: %s", reason)
        if resume:
            self.reader.resume()
            if self.link.ready and self.reader.caught_up:
                self._take_lock()  # the reader may have died: read for the others at once


def reading_mode(relay: HistoryRelay | None) -> str:
    """How a worker reads the history: by itself, always, when it has no relay."""
    return STREAM if relay is None else relay.mode
