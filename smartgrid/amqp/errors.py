"""Why a publish did not reach the broker's confirmation."""

from __future__ import annotations


class LinkError(Exception):
    """A publish did not reach the broker's confirmation."""


class NotConnected(LinkError):
    """There is no usable connection to the broker right now."""


class ConnectionLost(LinkError):
    """The connection closed before the broker confirmed the message; it may or may not have
    been enqueued."""


class Unroutable(LinkError):
    """A ``mandatory`` message matched no queue and was returned by the broker."""


class PublishRejected(LinkError):
    """The broker refused the message (``basic.nack``)."""


class LinkClosed(LinkError):
    """The link was stopped before the message could be confirmed."""
