"""granian serving the gateway's Flask app, configured from :class:`GatewayConfig`.

granian (hyper and tokio underneath) owns the sockets: it parses requests in Rust, closes a
connection whose headers take longer than ``HEADER_TIMEOUT`` (or that sits idle that long
between requests), and hands each request to Python on the worker's event loop. There
:class:`gateway.rsgi.BufferedWSGI` receives the body against ``BODY_TIMEOUT`` and
``MAX_BODY_BYTES`` and only then runs the Flask app on one of ``GATEWAY_THREADS`` threads. So a
slow client holds a socket, never a thread, and is cut off by a deadline.

Each of ``GATEWAY_WORKERS`` processes is a full gateway (its own broker connection, and its
own history); once caught up, one of them reads the history stream for the others and relays
it to them over a Unix socket in ``HISTORY_RELAY_DIR`` (gateway/relay.py). On SIGTERM granian
stops accepting, the workers answer the requests they have, and each worker then stops its
broker link; a worker that has not finished after :data:`GRACEFUL_TIMEOUT` is killed. A worker
that dies is started again, and its live gauges (``gateway_broker_connected``) leave the
aggregated metrics.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.server.mp import MPServer
from prometheus_client import multiprocess

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.rsgi import BufferedWSGI, Limits

log = logging.getLogger(__name__)

#: Seconds a starting worker waits for the history to be read before it serves anyway (and
#: answers 503 "replaying the history" until it is): 100,000 requests' history is about 70 MB.
HISTORY_WAIT = 60
#: Seconds a worker may take, after SIGTERM, to answer the requests it has.
GRACEFUL_TIMEOUT = 10
#: granian's read buffer, which bounds a request's headers in its Rust layer (431 with an empty
#: body beyond). It stays at granian's default unless MAX_HEADER_BYTES asks for more, so that
#: our own JSON 431 answers every size in between.
_GRANIAN_BUFFER = 8192 + 4096 * 100
#: granian's messages through our logging setup instead of its own handlers.
_LOGGING = {
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        "granian.access": {"handlers": [], "propagate": False},
    }
}


def build_app(config: GatewayConfig) -> BufferedWSGI:
    """One worker's application: the Flask app, its broker link, and the buffering front."""
    app = create_app(config)
    broker = app.extensions["smartgrid.broker"]
    # Serve only once the broker link is up and the history read, or answer 503 until then;
    # wait a while so a freshly started stack does not begin with a burst of 503s.
    if broker.link.wait_ready(timeout=5):
        broker.wait_caught_up(timeout=HISTORY_WAIT)

    def stop() -> None:
        broker.stop()
        # Its live gauges no longer count once it has gone.
        multiprocess.mark_process_dead(os.getpid())
        log.info("worker %d stopped", os.getpid())

    limits = Limits(
        max_body=config.max_body, max_header=config.max_header, body_timeout=config.body_timeout
    )
    return BufferedWSGI(app, limits, threads=config.threads, on_stop=stop)


class _Server(MPServer):
    def _respawn_workers(self, workers: list[int], *args: Any, **kwargs: Any) -> None:
        # A worker that died could not clean up after itself.
        dead = [self.wrks[index].inner.pid for index in workers]
        super()._respawn_workers(workers, *args, **kwargs)
        for pid in dead:
            multiprocess.mark_process_dead(pid)


def serve(config: GatewayConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = _Server(
        "gateway",  # a label: the app comes from the loader below
        address=config.bind,
        port=config.port,
        interface=Interfaces.RSGI,
        workers=config.workers,
        # HTTP/1.1 only, as the clients speak it: one set of limits to reason about.
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(
            header_read_timeout=round(config.header_timeout * 1000),
            max_buffer_size=max(_GRANIAN_BUFFER, 2 * config.max_header),
        ),
        log_level=config.log_level.lower(),  # type: ignore[arg-type]  # a LogLevels value
        log_dictconfig=_LOGGING,
        respawn_failed_workers=True,
        # granian's "backpressure" bounds the connections a worker holds, not only the requests
        # it runs: at its default (512 with two workers) 1,500 slow connections kept others
        # waiting to be accepted until the slow ones timed out.
        backpressure=config.max_connections,
        workers_kill_timeout=GRACEFUL_TIMEOUT,
    )

    def load(_target: str) -> Any:  # an RSGI app object; granian's hint says only "callable"
        # Runs in each worker process, after the fork: a broker connection and its I/O thread
        # must not cross a fork.
        return build_app(config)

    server.serve(target_loader=load)
