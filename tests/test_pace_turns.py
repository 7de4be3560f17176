"""pace_turns: what arrives while a paced I/O loop waits is handled in one turn; a message
after a quiet spell is not held back. A real pika IOLoop reading a real socket pair."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pika.adapters.select_connection import IOLoop

from smartgrid.amqp import link
from smartgrid.amqp.link import FD_READ, pace_turns

INTERVAL = 0.5


class _Reader:
    """An IOLoop on a thread of its own, recording what each turn read from a socket."""

    def __init__(self, min_interval: float, while_: Callable[[], bool] = lambda: True) -> None:
        self.ioloop = IOLoop()
        self.paced = pace_turns(self.ioloop, min_interval, while_)
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.reads: list[bytes] = []
        self.on_read: Callable[[], object] = lambda: None
        self.read_event = threading.Event()
        self.ioloop.add_handler(self.ours.fileno(), self._on_readable, FD_READ)
        self.thread = threading.Thread(target=self.ioloop.start, daemon=True)
        self.thread.start()

    def _on_readable(self, _fd: int, _events: int) -> None:
        self.reads.append(self.ours.recv(4096))
        self.on_read()
        self.read_event.set()

    def send(self, data: bytes) -> None:
        self.theirs.sendall(data)

    def wait_for_reads(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.reads) < count:
            assert time.monotonic() < deadline, f"only {self.reads} read"
            self.read_event.wait(0.05)
            self.read_event.clear()

    def close(self) -> None:
        self.ioloop.add_callback_threadsafe(self.ioloop.stop)
        self.thread.join(10)
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def happened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the loops did, in order: "sleep" for each pause (the tests add their own)."""
    log: list[str] = []
    real_sleep = time.sleep

    def recorded_sleep(seconds: float) -> None:
        log.append("sleep")
        real_sleep(seconds)

    monkeypatch.setattr(link.time, "sleep", recorded_sleep)
    return log


@pytest.fixture
def paced() -> Iterator[_Reader]:
    reader = _Reader(INTERVAL)
    yield reader
    reader.close()


def test_what_arrives_while_the_loop_waits_is_read_in_one_turn(paced: _Reader) -> None:
    assert paced.paced
    paced.send(b"a")
    paced.wait_for_reads(1)
    # Both arrive well within INTERVAL of the turn that read "a": the loop is still waiting.
    paced.send(b"b")
    time.sleep(0.02)
    paced.send(b"c")
    paced.wait_for_reads(2)
    assert paced.reads == [b"a", b"bc"]


def test_a_message_after_a_quiet_spell_is_not_held_back(
    paced: _Reader, happened: list[str]
) -> None:
    paced.send(b"a")
    paced.wait_for_reads(1)
    time.sleep(INTERVAL * 1.5)
    # The loop sleeps after each turn (the next is not due yet), never before reading what
    # came after a quiet spell.
    happened.clear()
    paced.on_read = lambda: happened.append("read")
    paced.send(b"b")
    paced.wait_for_reads(2)
    assert paced.reads == [b"a", b"b"]
    assert happened[0] == "read"


def test_what_a_turn_leaves_for_right_after_it_is_not_held_back(
    paced: _Reader, happened: list[str]
) -> None:
    # A turn's output (events flushed, acks sent) is scheduled with call_later(0): it goes out
    # right after the turn, not a pace later, even when a timer of the turn scheduled it (pika
    # runs those on the next turn).
    flushed = threading.Event()

    def flush() -> None:
        happened.append("flush")
        flushed.set()

    paced.on_read = lambda: paced.ioloop.call_later(0, lambda: paced.ioloop.call_later(0, flush))
    paced.send(b"a")
    assert flushed.wait(10)
    assert happened[0] == "flush"


def test_a_turn_as_long_as_the_pace_is_followed_at_once(
    paced: _Reader, happened: list[str]
) -> None:
    # A busy loop (each turn as long as the pace or longer) is never slowed down.
    def busy_first_turn() -> None:
        happened.append("read")
        if len(happened) == 1:
            paced.send(b"b")
            busy_until = time.monotonic() + INTERVAL * 1.2
            while time.monotonic() < busy_until:
                pass

    paced.on_read = busy_first_turn
    paced.send(b"a")
    paced.wait_for_reads(2)
    assert paced.reads == [b"a", b"b"]
    assert happened[:2] == ["read", "read"]


def test_unpaced_loops_read_each_message_in_its_own_turn() -> None:
    reader = _Reader(0.0)
    try:
        assert not reader.paced
        reader.send(b"a")
        reader.wait_for_reads(1)
        reader.send(b"b")
        reader.wait_for_reads(2)
        assert reader.reads == [b"a", b"b"]
    finally:
        reader.close()


def test_a_loop_paced_only_while_a_condition_holds_never_sleeps_while_it_does_not(
    happened: list[str],
) -> None:
    # A substation under a share: the cars wait for each of its turns.
    reader = _Reader(INTERVAL, while_=lambda: False)
    try:
        assert reader.paced
        for count, data in enumerate((b"a", b"b", b"c"), start=1):
            reader.send(data)
            reader.wait_for_reads(count)
        assert reader.reads == [b"a", b"b", b"c"]
        assert "sleep" not in happened
    finally:
        reader.close()
