"""gunicorn, configured from :class:`GatewayConfig` instead of a config file."""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication
from prometheus_client import multiprocess

from gateway.app import create_app
from gateway.config import GatewayConfig

log = logging.getLogger(__name__)


def _child_exit(_server, worker) -> None:
    # Drop a dead worker's live gauges from the aggregated metrics.
    multiprocess.mark_process_dead(worker.pid)


def _worker_exit(_server, worker) -> None:
    broker = getattr(worker.wsgi, "extensions", {}).get("smartgrid.broker")
    if broker is not None:
        broker.stop()


class GatewayServer(BaseApplication):
    def __init__(self, config: GatewayConfig):
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        settings = {
            "bind": f"{self.config.bind}:{self.config.port}",
            "workers": self.config.workers,
            "threads": self.config.threads,
            "worker_class": "gthread",
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "loglevel": self.config.log_level.lower(),
            "proc_name": "smartgrid-gateway",
            "child_exit": _child_exit,
            "worker_exit": _worker_exit,
            # A worker's broker connection and I/O thread must be created after the fork.
            "preload_app": False,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        app = create_app(self.config)
        broker = app.extensions["smartgrid.broker"]
        # Serve only once the broker link is up, or answer 503 until then; wait briefly so a
        # freshly started stack does not begin with a burst of 503s.
        broker.link.wait_ready(timeout=5)
        return app
