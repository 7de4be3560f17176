"""The history relay's frames, window and gap check (gateway/relay_protocol.py), and the
election of the host's one reader (gateway/election.py): no broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import relay_protocol as protocol
from gateway.election import ReaderLock
from gateway.relay import READS_FOR_OTHERS, RELAYED_FROM
from smartgrid.log_lines import pattern


def test_frames_arrive_whole_however_the_bytes_are_cut():
    data = (
        protocol.hello(7, b"stream")
        + protocol.welcome(3)
        + protocol.message(5, 9, "charge.request", "gateway", b'{"a": 1}')
        + protocol.message(10, 10, "request.routed", None, b"")
    )
    reader = protocol.FrameReader()
    frames = []
    for at in range(0, len(data), 3):
        frames += reader.feed(data[at : at + 3])
    kinds = [kind for kind, _ in frames]
    assert kinds == [protocol.HELLO, protocol.WELCOME, protocol.MESSAGE, protocol.MESSAGE]
    assert protocol.decode_hello(frames[0][1]) == (7, b"stream")
    assert protocol.decode_offset(frames[1][1]) == 3
    assert protocol.decode_message(frames[2][1]) == protocol.Relayed(
        5, 9, "charge.request", "gateway", b'{"a": 1}'
    )
    assert protocol.decode_message(frames[3][1]) == protocol.Relayed(
        10, 10, "request.routed", None, b""
    )


def test_what_is_not_a_frame_is_refused():
    with pytest.raises(protocol.ProtocolError):
        protocol.FrameReader().feed(b"\x09\x00\x00\x00\x01x")
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_offset(b"\x00")
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_hello(b"\x00")
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_message(b"\x00" * 5)


@pytest.mark.parametrize(
    ("prev", "offset", "next_offset", "placed"),
    [
        (10, 10, 10, protocol.APPLY),  # the next one
        (8, 12, 10, protocol.APPLY),  # offsets 10 and 11 the reader never read either
        (9, 9, 10, protocol.DUPLICATE),  # read already (from the stream, before the relay)
        (3, 4, 10, protocol.DUPLICATE),
        (11, 11, 10, protocol.GAP),  # offset 10 was relayed to someone, not here
        (15, 20, 10, protocol.GAP),
    ],
)
def test_a_relayed_message_is_applied_skipped_or_a_gap(prev, offset, next_offset, placed):
    assert protocol.place(prev, offset, next_offset) == placed


def _chain(frames: bytes) -> list[protocol.Relayed]:
    return [protocol.decode_message(payload) for _, payload in protocol.FrameReader().feed(frames)]


def test_the_window_chains_each_message_to_the_one_before_and_forgets_the_oldest():
    window = protocol.Window(start=100, limit=3)
    assert window.covers(100) and not window.covers(99)
    assert window.since(100) == b""
    for offset in (100, 101, 105, 106):  # 102-104: not in the stream (a reader skips none)
        window.add(offset, "k", "u", str(offset).encode())
    assert window.end == 107
    assert window.start == 101  # 100 was dropped
    assert not window.covers(100) and window.covers(101) and window.covers(110)
    relayed = _chain(window.since(101))
    assert [(m.prev, m.offset) for m in relayed] == [(101, 101), (102, 105), (106, 106)]
    assert [m.offset for m in _chain(window.since(103))] == [105, 106]
    assert window.since(107) == b""


@pytest.mark.parametrize(
    ("next_offset", "covered", "offsets"),
    [
        (50, False, [101, 105, 106, 110]),  # before the window: too old to follow on
        (100, False, [101, 105, 106, 110]),  # the message dropped last
        (101, True, [101, 105, 106, 110]),  # exactly at the window's start
        (103, True, [105, 106, 110]),  # in the middle, between two offsets of the stream
        (105, True, [105, 106, 110]),  # in the middle, at one
        (110, True, [110]),  # the last message
        (111, True, []),  # at the end: nothing yet
        (120, True, []),  # beyond the end
    ],
)
def test_the_window_since_an_offset(next_offset: int, covered: bool, offsets: list[int]):
    window = protocol.Window(start=100, limit=4)
    frames = {offset: window.add(offset, "k", None, b"") for offset in (100, 101, 105, 106, 110)}
    assert (window.start, window.end) == (101, 111)
    assert window.covers(next_offset) == covered
    assert window.since(next_offset) == b"".join(frames[offset] for offset in offsets)


@pytest.mark.parametrize("next_offset", [0, 6, 7, 8])
def test_an_empty_window_has_nothing_since_any_offset(next_offset: int):
    window = protocol.Window(start=7, limit=3)
    assert window.since(next_offset) == b""
    assert window.covers(next_offset) == (next_offset >= 7)


def test_a_worker_following_a_covered_window_applies_every_message_exactly_once():
    window = protocol.Window(start=0, limit=10)
    for offset in range(8):
        window.add(offset, "k", None, b"")
    next_offset = 5  # the worker read 0-4 itself
    applied = []
    for message in _chain(window.since(3)):  # it asked from further back: duplicates
        placed = protocol.place(message.prev, message.offset, next_offset)
        assert placed != protocol.GAP
        if placed == protocol.APPLY:
            applied.append(message.offset)
            next_offset = message.offset + 1
    assert applied == [5, 6, 7]


def test_what_a_worker_reads_tells_streams_and_brokers_apart_without_the_password():
    here = protocol.source("amqp://gateway:secret@host:5672/smartgrid", "smartgrid.history")
    assert here == protocol.source("amqp://gateway:secret@host:5672/smartgrid", "smartgrid.history")
    assert here != protocol.source("amqp://gateway:secret@host:5672/other", "smartgrid.history")
    assert here != protocol.source("amqp://gateway:secret@host:5672/smartgrid", "other")
    assert b"secret" not in here


def test_the_relay_s_directory_must_leave_room_for_its_socket():
    assert protocol.socket_path_fits("")
    assert protocol.socket_path_fits("/tmp/smartgrid-gateway-relay-abcdefgh")
    assert not protocol.socket_path_fits("/" + "d" * 100)


@pytest.mark.parametrize("line", [READS_FOR_OTHERS, RELAYED_FROM])
def test_the_relay_s_log_lines_are_found_by_the_pattern_of_their_format(line: str):
    logged = f"2026-11-30 17:00:00 INFO gateway.relay: {line % (4242, 0)}\n"
    found = pattern(line).search(logged)
    assert found is not None and found.groups() == ("4242", "0")
    assert pattern(line).search(logged.replace("4242", "pid")) is None


def test_one_holder_of_the_reader_lock_at_a_time(tmp_path: Path):
    path = str(tmp_path / "reader.lock")
    first, second = ReaderLock(path), ReaderLock(path)
    assert first.try_acquire() and first.held
    assert first.try_acquire()  # held already
    assert not second.try_acquire() and not second.held
    first.release()
    assert second.try_acquire()
    second.release()


def test_a_dead_holder_releases_the_lock_at_once(tmp_path: Path):
    path = str(tmp_path / "reader.lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from gateway.election import ReaderLock\n"
            f"assert ReaderLock({path!r}).try_acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        lock = ReaderLock(path)
        assert not lock.try_acquire()
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait(10)
        assert lock.try_acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait(10)
