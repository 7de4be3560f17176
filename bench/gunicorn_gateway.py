"""The gateway's Flask app under gunicorn ``gthread``, as it was served before granian: the
baseline that ``bench.cpu --server gunicorn`` and ``bench.slowloris --server gunicorn`` measure
in the same run as the real gateway. Same settings, same app, same broker link.

    .venv/bin/python -m bench.gunicorn_gateway        # the environment of python -m gateway
"""

from __future__ import annotations

import sys

from gateway.__main__ import prepared_metrics_dir
from gateway.config import GatewayConfig
from smartgrid.config import load_or_exit
from smartgrid.runtime import setup_logging


def _server(config: GatewayConfig):
    from gunicorn.app.base import BaseApplication  # after PROMETHEUS_MULTIPROC_DIR is set
    from prometheus_client import multiprocess

    from gateway.app import create_app

    def child_exit(_server, worker) -> None:
        multiprocess.mark_process_dead(worker.pid)

    def worker_exit(_server, worker) -> None:
        broker = getattr(worker.wsgi, "extensions", {}).get("smartgrid.broker")
        if broker is not None:
            broker.stop()

    class GunicornGateway(BaseApplication):
        def load_config(self) -> None:
            settings = {
                "bind": f"{config.bind}:{config.port}",
                "workers": config.workers,
                "threads": config.threads,
                "worker_class": "gthread",
                "timeout": 30,
                "graceful_timeout": 10,
                "keepalive": 5,
                "loglevel": config.log_level.lower(),
                "child_exit": child_exit,
                "worker_exit": worker_exit,
                "preload_app": False,  # a broker connection must not cross a fork
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            app = create_app(config)
            app.extensions["smartgrid.broker"].link.wait_ready(timeout=5)
            return app

    return GunicornGateway()


def main() -> int:
    config = load_or_exit(
        GatewayConfig,
        prog="python -m bench.gunicorn_gateway",
        description="The gateway under gunicorn gthread (a benchmark baseline).",
    )
    setup_logging(config.log_level, name="gateway-gunicorn")
    with prepared_metrics_dir():
        _server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
