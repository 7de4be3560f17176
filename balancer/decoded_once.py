"""One decoding of a message that two of the balancer's consumers receive.

Every ``power.demand`` report reaches a balancer twice: its router's event subscription feeds
the power view, and the allocator's reports queue (on a connection and thread of its own)
feeds the share allocator. A report carries every running session's minimum and maximum, so
decoding it is the costly part of taking it in, and with thousands of sessions running each
consumer decoding it on its own was 16% of the balancer's CPU (docs/benchmarks.md §4).

:class:`DecodedOnce` keeps what the first consumer decoded, by the message's body, for the
other one to take. The result is what decoding the body again would give (decoding depends on
the routing key and the body alone; the events are frozen, so sharing them between threads is
safe); each consumer still checks the senders of what it takes itself. A body only one
consumer receives (the allocator of a standby balancer consumes no reports) is dropped once
``keep`` newer ones are waiting, so nothing grows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from smartgrid import contract

Decode = Callable[[str, bytes], list[contract.Event]]

#: Bodies waiting for their second consumer; the two take a report within milliseconds of
#: each other, and substations report a few times a second.
KEEP = 64


class DecodedOnce:
    """Decodings of ``routing_key``'s messages shared by two consumers (thread-safe)."""

    def __init__(
        self,
        routing_key: str,
        *,
        keep: int = KEEP,
        decode: Decode = contract.decode_events,
    ) -> None:
        self.routing_key = routing_key
        self._keep = keep
        self._decode = decode
        self._lock = threading.Lock()
        self._waiting: OrderedDict[bytes, tuple[contract.Event, ...]] = OrderedDict()
        #: Bodies decoded here, and bodies taken from the other consumer's decoding.
        self.decoded = 0
        self.shared = 0

    def decode_events(self, routing_key: str, body: bytes) -> list[contract.Event]:
        """:func:`smartgrid.contract.decode_events`, once per body for ``routing_key``'s
        messages: the second consumer of a body takes the first one's events. Raises
        :class:`~smartgrid.contract.InvalidMessage` as decoding does (a failure is not kept:
        the other consumer decodes and fails on its own)."""
        if routing_key != self.routing_key:
            return self._decode(routing_key, body)
        with self._lock:
            kept = self._waiting.pop(body, None)
            if kept is not None:
                self.shared += 1
                return list(kept)
        events = self._decode(routing_key, body)
        with self._lock:
            self.decoded += 1
            self._waiting[body] = tuple(events)
            while len(self._waiting) > self._keep:
                self._waiting.popitem(last=False)
        return events
