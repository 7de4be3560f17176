"""The power reports decoded once for the balancer's router and allocator."""

from __future__ import annotations

import threading

import pytest

from balancer.decoded_once import DecodedOnce
from smartgrid import contract

KIND = contract.PowerDemand.kind


def report_body(at: float, substation: str = "s1") -> bytes:
    return contract.PowerDemand(
        at=at,
        substation=substation,
        instance="i1",
        limit_kw=100.0,
        failsafe_kw=0.0,
        limit_in_force_kw=100.0,
        power_kw=22.0,
        sessions_standard=2,
        floor_kw_standard=0.0,
        want_kw_standard=22.0,
        session_min_kw_standard=(0.0, 0.0),
        session_max_kw_standard=(11.0, 11.0),
        session_min_kw_emergency=(),
        session_max_kw_emergency=(),
        session_min_kw_fleet=(),
        session_max_kw_fleet=(),
    ).to_body()


class CountingDecode:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, routing_key: str, body: bytes) -> list[contract.Event]:
        self.calls += 1
        return contract.decode_events(routing_key, body)


def test_the_second_consumer_of_a_body_takes_the_first_ones_events():
    decode = CountingDecode()
    shared = DecodedOnce(KIND, decode=decode)
    body = report_body(1000.0)
    first = shared.decode_events(KIND, body)
    # The other consumer's delivery: an equal body in a bytes object of its own.
    second = shared.decode_events(KIND, bytes(bytearray(body)))
    assert decode.calls == 1
    assert first == second == contract.decode_events(KIND, body)
    assert second is not first  # each consumer has a list of its own
    # Taken: a third delivery of the same body (a third consumer, or a copy) decodes again.
    assert shared.decode_events(KIND, body) == first
    assert decode.calls == 2


def test_other_kinds_are_decoded_each_time():
    decode = CountingDecode()
    shared = DecodedOnce(KIND, decode=decode)
    event = contract.SubstationLeaving(at=1.0, substation="s1", instance="i1")
    for _ in range(2):
        assert shared.decode_events(event.kind, event.to_body()) == [event]
    assert decode.calls == 2


def test_bodies_only_one_consumer_receives_are_not_kept_beyond_keep():
    decode = CountingDecode()
    shared = DecodedOnce(KIND, keep=3, decode=decode)
    bodies = [report_body(1000.0 + i) for i in range(5)]
    for body in bodies:
        shared.decode_events(KIND, body)
    assert decode.calls == 5
    # The three newest are still waiting for their second taker; the two oldest were dropped.
    for body in reversed(bodies):
        shared.decode_events(KIND, body)
    assert decode.calls == 7
    assert shared.shared == 3


def test_an_invalid_body_fails_for_each_consumer():
    shared = DecodedOnce(KIND)
    for _ in range(2):
        with pytest.raises(contract.InvalidMessage):
            shared.decode_events(KIND, b'{"at": "yesterday"}')


def test_two_threads_get_what_decoding_gives() -> None:
    shared = DecodedOnce(KIND)
    bodies = [report_body(1000.0 + i, substation=f"s{i % 3}") for i in range(500)]
    results: dict[str, list] = {}

    def consume(name: str) -> None:
        results[name] = [shared.decode_events(KIND, body) for body in bodies]

    threads = [threading.Thread(target=consume, args=(name,)) for name in ("router", "allocator")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [contract.decode_events(KIND, body) for body in bodies]
    assert results["router"] == expected
    assert results["allocator"] == expected
    # How many the second thread took rather than decoded depends on the threads' timing.
    assert shared.decoded + shared.shared == 2 * len(bodies)
