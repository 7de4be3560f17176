"""python -m gateway: serve the HTTP API with granian (gateway/server.py).

Each worker process is a full gateway (its own broker connection and history), so
any worker answers for any request; one of them reads the history stream for the others
(gateway/relay.py) through ``HISTORY_RELAY_DIR``. Prometheus metrics are aggregated across
workers through ``PROMETHEUS_MULTIPROC_DIR``, which must be set before prometheus_client is
imported; this module sets it up first and imports the app afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from gateway.clients import Clients, TokensFileError  # no prometheus_client underneath
from gateway.config import GatewayConfig
from smartgrid.config import load_or_exit
from smartgrid.runtime import setup_logging

log = logging.getLogger("gateway")


@contextlib.contextmanager
def _private_dir(configured: str, prefix: str, *, emptied: bool) -> Iterator[str]:
    """``configured`` (made if missing, ``emptied`` first if asked), or a temporary
    directory that is removed afterwards."""
    if configured:
        if emptied:
            shutil.rmtree(configured, ignore_errors=True)
        os.makedirs(configured, mode=0o700, exist_ok=True)
        yield configured
        return
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def prepared_metrics_dir() -> Iterator[str]:
    """An empty ``PROMETHEUS_MULTIPROC_DIR`` (the configured one, or a temporary one that is
    removed afterwards), set in the environment before prometheus_client is imported."""
    # Files from an earlier run would be summed into this one's counters: emptied.
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    with _private_dir(configured, "smartgrid-gateway-metrics-", emptied=True) as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        yield directory


@contextlib.contextmanager
def prepared_relay_dir(config: GatewayConfig) -> Iterator[GatewayConfig]:
    """``config`` with the directory of its workers' history relay (``HISTORY_RELAY_DIR``, or
    a temporary one removed afterwards); with one worker, none (it reads the stream itself).
    Made by the master, before the workers start, so that it is this gateway's own."""
    if not config.relays_history:
        yield dataclasses.replace(config, history_relay_dir="")
        return
    # Not emptied: a lock file and a socket left by an earlier run are harmless.
    with _private_dir(
        config.history_relay_dir, "smartgrid-gateway-relay-", emptied=False
    ) as directory:
        yield dataclasses.replace(config, history_relay_dir=directory)


def main(argv: list[str] | None = None) -> int:
    config = load_or_exit(
        GatewayConfig,
        prog="python -m gateway",
        description="Serve the gateway HTTP API: POST /charge, GET and DELETE "
        "/charge/<request_id>, GET /health, GET /metrics, GET /openapi.json. Slow clients are "
        "cut off by HEADER_TIMEOUT and BODY_TIMEOUT.",
        argv=argv,
    )
    setup_logging(config.log_level, name="gateway")
    # A tokens file that cannot be used stops the gateway here, not in every worker.
    if config.tokens_file:
        try:
            Clients.load(config.tokens_file)
        except TokensFileError as exc:
            print(f"python -m gateway: {exc}", file=sys.stderr)
            return 2
    with prepared_metrics_dir(), prepared_relay_dir(config) as served:
        from gateway.server import serve  # after PROMETHEUS_MULTIPROC_DIR is set

        serve(served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
