"""python -m balancer: route pending charge requests to the least-loaded substation."""

from __future__ import annotations

import sys

from balancer.config import BalancerConfig
from balancer.service import BalancerService
from smartgrid.config import load_or_exit
from smartgrid.runtime import run_service, setup_logging


def main(argv: list[str] | None = None) -> int:
    config = load_or_exit(
        BalancerConfig,
        prog="python -m balancer",
        description="Run the balancer: consume pending charge requests, choose a substation "
        "from polled load corrected by its own bookkeeping, forward with confirms.",
        argv=argv,
    )
    setup_logging(config.log_level, name="balancer")
    service = BalancerService(config)
    return run_service(service.start, service.stop)


if __name__ == "__main__":
    sys.exit(main())
