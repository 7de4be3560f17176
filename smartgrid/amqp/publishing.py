"""Publisher confirms and the outbox: which publishes the broker still owes an answer.

Plain state, no I/O: the :class:`~smartgrid.amqp.link.Link` sends and receives the frames and
tells a :class:`Publishes` what happened (sent, confirmed, returned, connection lost); it
settles each publish's future and says which publishes are to be sent again.

A publish is "reliable" when losing it matters more than sending it twice (lifecycle events,
whose consumers deduplicate): while the broker is away it waits in the outbox, and after a
lost connection or a negative confirm it is sent again. A publish bound to a connection (a
report on a delivery that connection holds) is sent again after a negative confirm too, on
that connection: nobody else will ever get that delivery while the connection lives, so
failing the report would leave the delivery unsettled and its outcome unreported until the
connection ends (a broker node killed in a cluster nacks what was routed to a queue or stream
whose leader it was, while the publisher's own connection, to another node, lives on). Every
other publish fails fast, which is what a caller that can still say "try again" wants.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from smartgrid.amqp.errors import LinkError, NotConnected, PublishRejected

log = logging.getLogger(__name__)


@dataclass
class Outgoing:
    """One publish, from the caller's call until the broker has answered for it."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None
    persistent: bool
    mandatory: bool
    reliable: bool
    #: Bound to this connection (see ``Link.publish``): never kept for another one.
    generation: int | None = None
    #: When it last went out on a channel (time.monotonic()).
    sent_at: float | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def succeed(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Publishes:
    """The publishes of one link: unconfirmed on the current channel, or waiting for one."""

    def __init__(self, *, name: str, outbox_limit: int) -> None:
        self._name = name
        self._outbox_limit = outbox_limit
        #: By delivery tag; insertion order is tag order.
        self._unconfirmed: dict[int, Outgoing] = {}
        self._outbox: collections.deque[Outgoing] = collections.deque()
        self.next_tag = 1

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    @property
    def waiting(self) -> int:
        return len(self._outbox)

    def oldest_unconfirmed(self) -> float | None:
        """When the oldest publish the broker still owes a confirm went out (None: none)."""
        for outgoing in self._unconfirmed.values():
            return outgoing.sent_at
        return None

    def new_channel(self) -> None:
        """A channel in confirm mode numbers its publishes from 1."""
        self.next_tag = 1

    def sent(self, outgoing: Outgoing, now: float | None = None) -> int:
        """``outgoing`` went out on the channel as tag :attr:`next_tag` (at ``now``, by
        time.monotonic()); that tag."""
        tag = self.next_tag
        outgoing.sent_at = time.monotonic() if now is None else now
        self._unconfirmed[tag] = outgoing
        self.next_tag += 1
        return tag

    def wait(self, outgoing: Outgoing) -> None:
        """Keep ``outgoing`` in the outbox until there is a channel to send it on. A full
        outbox drops (and fails) its oldest publish rather than grow without bound."""
        if len(self._outbox) >= self._outbox_limit:
            self._outbox.popleft().fail(NotConnected(f"{self._name}: outbox full"))
            log.error("%s: outbox full; dropped the oldest waiting message", self._name)
        self._outbox.append(outgoing)

    def take_waiting(self) -> list[Outgoing]:
        """Everything in the outbox, oldest first, to be sent now."""
        waiting, self._outbox = list(self._outbox), collections.deque()
        return waiting

    def confirmed(self, tag: int, *, multiple: bool, acked: bool) -> list[Outgoing]:
        """The broker confirmed (``acked``) or refused publishes up to ``tag``. Settle them;
        return the refused ones that are reliable or bound to a connection, to be sent again
        after a pause (on a later connection, a bound one then fails as its connection lost)."""
        if multiple:
            tags = list(itertools.takewhile(lambda t: t <= tag, self._unconfirmed))
        else:
            tags = [tag]
        again = []
        for each in tags:
            outgoing = self._unconfirmed.pop(each, None)
            if outgoing is None:
                continue
            if acked:
                outgoing.succeed()
            elif outgoing.reliable or outgoing.generation is not None:
                again.append(outgoing)  # an internal broker error; do not lose an event
            else:
                outgoing.fail(PublishRejected(f"broker refused message to {outgoing.exchange!r}"))
        return again

    def returned(self, tag: int, error: LinkError) -> None:
        """The broker returned the publish ``tag`` (unroutable); its confirm follows, but the
        publish has failed already."""
        outgoing = self._unconfirmed.pop(tag, None)
        if outgoing is not None:
            outgoing.fail(error)

    def connection_lost(self, error: LinkError, *, keep_reliable: bool) -> None:
        """The channel is gone with every publish it had not confirmed. Reliable ones (with
        ``keep_reliable``) wait for the next channel, unconfirmed first, in their order; the
        rest (and those bound to the lost connection) fail with ``error``."""
        pending = [*self._unconfirmed.values(), *self._outbox]
        self._unconfirmed = {}
        self._outbox = collections.deque()
        for outgoing in pending:
            if outgoing.reliable and keep_reliable and outgoing.generation is None:
                self._outbox.append(outgoing)
            else:
                outgoing.fail(error)

    def fail_all(self, error: LinkError) -> None:
        for outgoing in [*self._unconfirmed.values(), *self._outbox]:
            outgoing.fail(error)
        self._unconfirmed.clear()
        self._outbox.clear()
