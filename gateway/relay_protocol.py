"""What the history relay says over its local socket, and how each side checks it (pure).

One gateway worker of a host reads the history stream and relays it to the others
(gateway/relay.py). Every relayed message carries its stream offset and the offset just
after the message relayed before it (``prev``), so that a worker can tell, whatever happened
to the relay, whether a message follows on from what it has read (:func:`place`): the stream's
offsets are the ordering truth; a message read twice is harmless (a record only moves
forward), a gap is not.

Frames: a kind (one byte) and the payload's length (4 bytes), then the payload.

* ``HELLO`` (worker to reader): the offset just after the last message the worker has read,
  and what it reads (:func:`source`: a digest of its broker URL and stream), so that a reader of
  another stream (a directory shared by mistake) relays nothing to it.
* ``WELCOME`` (reader to worker): the first offset the reader can still relay (its window's
  start); then the window's messages from the worker's offset on, then each new one.
* ``MESSAGE``: ``prev``, offset, routing key, sender (``user_id``) and body.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import os
import struct
from dataclasses import dataclass

HELLO, WELCOME, MESSAGE = 1, 2, 3

#: The names of the election's lock and of the relay's socket in the relay's directory.
LOCK_NAME, SOCKET_NAME = "history-reader.lock", "history-relay.sock"
#: The longest path a Unix socket can be bound to (sun_path, less its terminating NUL).
_MAX_SOCKET_PATH = 107

_HEADER = struct.Struct("!BI")
_OFFSET = struct.Struct("!q")
_MESSAGE_HEAD = struct.Struct("!qqHH")

#: Messages the reader keeps for a worker that asks for what follows an offset a little
#: behind (a few seconds of a busy stream): ``HISTORY_RELAY_WINDOW``'s default.
WINDOW = 20_000

#: What a relayed message is to a worker: the next one, one it has already, or past a gap.
APPLY, DUPLICATE, GAP = "apply", "duplicate", "gap"


class ProtocolError(Exception):
    """The peer sent something that is not a relay frame."""


@dataclass(frozen=True)
class Relayed:
    """A message of the history stream as the relay passes it on."""

    prev: int
    offset: int
    routing_key: str
    user_id: str | None
    body: bytes


def socket_path_fits(directory: str) -> bool:
    """Whether the relay's socket can be bound in ``directory`` (the empty default does)."""
    return not directory or len(os.path.join(directory, SOCKET_NAME).encode()) <= _MAX_SOCKET_PATH


def source(amqp_url: str, stream: str) -> bytes:
    """What a worker reads, as it introduces itself (a digest: the URL may hold a password)."""
    return hashlib.sha256(f"{amqp_url}\n{stream}".encode()).digest()[:16]


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def hello(next_offset: int, reads: bytes) -> bytes:
    return _frame(HELLO, _OFFSET.pack(next_offset) + reads)


def decode_hello(payload: bytes) -> tuple[int, bytes]:
    """The worker's next offset, and what it reads."""
    if len(payload) < _OFFSET.size:
        raise ProtocolError(f"a hello frame of {len(payload)} bytes")
    (offset,) = _OFFSET.unpack_from(payload)
    return int(offset), payload[_OFFSET.size :]


def welcome(window_start: int) -> bytes:
    return _frame(WELCOME, _OFFSET.pack(window_start))


def message(prev: int, offset: int, routing_key: str, user_id: str | None, body: bytes) -> bytes:
    key = routing_key.encode()
    user = (user_id or "").encode()
    head = _MESSAGE_HEAD.pack(prev, offset, len(key), len(user))
    return _frame(MESSAGE, head + key + user + body)


def decode_offset(payload: bytes) -> int:
    if len(payload) != _OFFSET.size:
        raise ProtocolError(f"an offset frame of {len(payload)} bytes")
    (offset,) = _OFFSET.unpack(payload)
    return int(offset)


def decode_message(payload: bytes) -> Relayed:
    if len(payload) < _MESSAGE_HEAD.size:
        raise ProtocolError(f"a message frame of {len(payload)} bytes")
    prev, offset, key_length, user_length = _MESSAGE_HEAD.unpack_from(payload)
    start = _MESSAGE_HEAD.size
    if len(payload) < start + key_length + user_length:
        raise ProtocolError("a message frame shorter than its routing key and sender")
    key = payload[start : start + key_length].decode()
    user = payload[start + key_length : start + key_length + user_length].decode()
    body = payload[start + key_length + user_length :]
    return Relayed(prev, offset, key, user or None, bytes(body))


class FrameReader:
    """Frames out of a byte stream that arrives in pieces."""

    #: A frame longer than this is not the relay's (a history message is a few KB at most).
    MAX_FRAME = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``, as (kind, payload)."""
        self._buffer += data
        frames = []
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer, at)
            if kind not in (HELLO, WELCOME, MESSAGE) or length > self.MAX_FRAME:
                raise ProtocolError(f"a frame of kind {kind} and {length} bytes")
            end = at + _HEADER.size + length
            if len(buffer) < end:
                break
            frames.append((kind, bytes(buffer[at + _HEADER.size : end])))
            at = end
        del buffer[:at]
        return frames


def place(prev: int, offset: int, next_offset: int) -> str:
    """What a worker that has read everything before ``next_offset`` does with a relayed
    message: :data:`APPLY` it, skip a :data:`DUPLICATE`, or stop at a :data:`GAP` (the
    relay read on from ``prev``, past what the worker has)."""
    if offset < next_offset:
        return DUPLICATE
    if prev > next_offset:
        return GAP
    return APPLY


class Window:
    """The reader's recent messages as frames, so that a worker that read up to a little
    earlier can follow on from where it is; and the chain of ``prev`` offsets.

    ``start``: the offset just after the last message read before the window's first (the
    reader's next offset when it began relaying). A worker at ``next_offset`` can follow from
    the window when ``covers(next_offset)``.
    """

    def __init__(self, start: int, limit: int) -> None:
        if limit <= 0:
            raise ValueError("a window holds at least one message")
        self.limit = limit
        #: The offset just after the last message relayed.
        self.end = start
        self._start = start
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()

    @property
    def start(self) -> int:
        return self._start

    def add(self, offset: int, routing_key: str, user_id: str | None, body: bytes) -> bytes:
        """The frame relaying the message at ``offset``, kept in the window."""
        frame = message(self.end, offset, routing_key, user_id, body)
        self.end = offset + 1
        self._frames.append((offset, frame))
        if len(self._frames) > self.limit:
            dropped, _ = self._frames.popleft()
            self._start = dropped + 1
        return frame

    def covers(self, next_offset: int) -> bool:
        return next_offset >= self._start

    def since(self, next_offset: int) -> bytes:
        """The window's frames of the messages at ``next_offset`` and after."""
        frames = self._frames
        # The offsets increase (the relay adds only what follows ``end``): the first one to
        # send is found by bisection, and the rest taken from the right, for a worker that
        # joins asks for the last few of a window of thousands.
        after = len(frames) - bisect.bisect_left(frames, next_offset, key=_offset_of)
        newest_first = [frame for _, frame in itertools.islice(reversed(frames), after)]
        return b"".join(reversed(newest_first))


def _offset_of(kept: tuple[int, bytes]) -> int:
    return kept[0]
