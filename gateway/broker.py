"""The gateway's side of the broker: publishing accepted requests, following their events."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from gateway.tracker import RequestTracker
from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link, NotConnected, PublishRejected
from smartgrid.events import events_in
from smartgrid.senders import DEFAULT_EVENT_SENDERS, Senders


class GatewayBroker:
    def __init__(
        self,
        amqp_url: str,
        *,
        name: str,
        tracker: RequestTracker,
        on_connection_change: Callable[[bool], None] | None = None,
        declare_topology: bool = True,
        event_senders: Iterable[str] = DEFAULT_EVENT_SENDERS,
    ):
        self.tracker = tracker
        self.on_connection_change = on_connection_change
        self.link = Link(
            amqp_url,
            name=name,
            topology=contract.topology(contract.core_topology(), declare=declare_topology),
            consumers=[ConsumerSpec(contract.GATEWAY_EVENTS, self._on_event, auto_ack=True)],
            on_ready=lambda: self._connection_changed(True),
            on_lost=lambda: self._connection_changed(False),
        )
        self.senders = Senders(event_senders, own_user=self.link.user)

    def _connection_changed(self, connected: bool) -> None:
        if self.on_connection_change is not None:
            self.on_connection_change(connected)

    @property
    def ready(self) -> bool:
        return self.link.ready

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a connection being (re-)established; whether it is up."""
        return self.link.wait_ready(timeout)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop(timeout=5)

    def publish_request(self, request: contract.ChargeRequest) -> Future:
        """Publish a request to the pending queue; the future succeeds once it is confirmed."""
        return self.link.publish(
            contract.REQUESTS_EXCHANGE,
            contract.REQUEST_ROUTING_KEY,
            request.to_body(),
            mandatory=True,
        )

    def accept(self, request: contract.ChargeRequest, *, deadline: float) -> None:
        """Publish ``request`` to the pending queue and return once the broker has confirmed
        it, trying again until ``deadline`` (time.monotonic()) where that is safe.

        A refusal (``basic.nack``: a quorum queue electing a new leader) or a missing
        connection certainly did not enqueue the message, so trying again cannot duplicate it;
        a connection lost *after* publishing might have, so that is never retried (the driver
        gets 503 and may try again with a new request). Raises a
        :class:`~smartgrid.amqp.LinkError`, or :class:`concurrent.futures.TimeoutError` at
        the deadline.
        """
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FutureTimeout()
            try:
                self.publish_request(request).result(timeout=remaining)
                return
            except (PublishRejected, NotConnected):
                if deadline - time.monotonic() <= delay:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                self.link.wait_ready(max(0.0, deadline - time.monotonic()))

    def _on_event(self, delivery: Delivery) -> None:
        for event in events_in(delivery, self.senders):
            self.tracker.apply(event)
