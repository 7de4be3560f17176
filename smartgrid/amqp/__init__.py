"""AMQP plumbing, split along pika's seams.

* :mod:`smartgrid.amqp.link`: :class:`Link`, one broker connection owned by one I/O thread;
  it connects, declares the contract's topology, reconnects, and is the only code that
  touches pika's connection and channel.
* :mod:`smartgrid.amqp.publishing`: publisher confirms and the outbox, as plain state.
* :mod:`smartgrid.amqp.consuming`: what a Link consumes (:class:`ConsumerSpec`), what it
  hands over (:class:`Delivery`), and what it does when a consumer fails.
* :mod:`smartgrid.amqp.streams`: reading a stream on a Link (:class:`StreamReader`): a replay
  from an offset or a point in time, when it has caught up, then the tail.
* :mod:`smartgrid.amqp.errors`: why a publish failed.
"""

from smartgrid.amqp.consuming import ConsumerSpec, Delivery
from smartgrid.amqp.errors import (
    ConnectionLost,
    LinkClosed,
    LinkError,
    NotConnected,
    PublishRejected,
    Unroutable,
)
from smartgrid.amqp.link import Link, connection_parameters, parse_urls

__all__ = [
    "ConnectionLost",
    "ConsumerSpec",
    "Delivery",
    "Link",
    "LinkClosed",
    "LinkError",
    "NotConnected",
    "PublishRejected",
    "Unroutable",
    "connection_parameters",
    "parse_urls",
]
