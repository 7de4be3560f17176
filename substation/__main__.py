"""python -m substation: run one substation."""

from __future__ import annotations

import sys

from smartgrid.config import load_or_exit
from smartgrid.runtime import run_service, setup_logging
from substation.config import SubstationConfig
from substation.service import SubstationService


def main(argv: list[str] | None = None) -> int:
    config = load_or_exit(
        SubstationConfig,
        prog="python -m substation",
        description="Run a substation: consume its queue, run timed charging sessions, "
        "expose substation_current_load on /metrics.",
        argv=argv,
    )
    setup_logging(config.log_level, name=f"substation[{config.substation_id}]")
    service = SubstationService(config)
    return run_service(service.start, service.stop)


if __name__ == "__main__":
    sys.exit(main())
