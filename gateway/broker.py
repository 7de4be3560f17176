"""The gateway's side of the broker: publishing accepted requests, following their events."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from gateway.tracker import RequestTracker
from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.events import events_in


class GatewayBroker:
    def __init__(
        self,
        amqp_url: str,
        *,
        name: str,
        tracker: RequestTracker,
        on_connection_change: Callable[[bool], None] | None = None,
    ):
        self.tracker = tracker
        self.on_connection_change = on_connection_change
        self.link = Link(
            amqp_url,
            name=name,
            topology=contract.core_topology(),
            consumers=[ConsumerSpec(contract.GATEWAY_EVENTS, self._on_event, auto_ack=True)],
            on_ready=lambda: self._connection_changed(True),
            on_lost=lambda: self._connection_changed(False),
        )

    def _connection_changed(self, connected: bool) -> None:
        if self.on_connection_change is not None:
            self.on_connection_change(connected)

    @property
    def ready(self) -> bool:
        return self.link.ready

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

    def _on_event(self, delivery: Delivery) -> None:
        for event in events_in(delivery):
            self.tracker.apply(event)
