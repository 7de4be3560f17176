"""python -m gateway: serve the HTTP API with gunicorn.

Each gunicorn worker process is a full gateway (its own broker connection and event
subscription), so any worker answers for any request. Prometheus metrics are aggregated across
workers through ``PROMETHEUS_MULTIPROC_DIR``, which must be set before prometheus_client is
imported; this module sets it up first and imports the app afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

from gateway.config import GatewayConfig
from smartgrid.config import load_or_exit
from smartgrid.runtime import setup_logging

log = logging.getLogger("gateway")


def _prepare_metrics_dir() -> tuple[str, bool]:
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        # Files from an earlier run would be summed into this one's counters.
        shutil.rmtree(configured, ignore_errors=True)
        os.makedirs(configured, exist_ok=True)
        return configured, False
    directory = tempfile.mkdtemp(prefix="smartgrid-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory, True


def main(argv: list[str] | None = None) -> int:
    config = load_or_exit(
        GatewayConfig,
        prog="python -m gateway",
        description="Serve the gateway HTTP API: POST /charge, GET /charge/<request_id>, "
        "GET /health, GET /metrics.",
        argv=argv,
    )
    setup_logging(config.log_level, name="gateway")
    metrics_dir, owned = _prepare_metrics_dir()
    try:
        from gateway.server import GatewayServer  # after PROMETHEUS_MULTIPROC_DIR is set

        GatewayServer(config).run()
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
