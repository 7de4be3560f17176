"""Process plumbing shared by the long-running services: logging and signal handling."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO", *, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)-7s {name} %(name)s: %(message)s",
    )
    # pika narrates every connection step at INFO; its warnings and errors still show.
    logging.getLogger("pika").setLevel(logging.WARNING)


def wait_for_termination() -> int:
    """Block the main thread until SIGTERM or SIGINT; return the signal number."""
    received = threading.Event()
    which: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        which.append(signum)
        received.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    received.wait()
    log.info("received %s; shutting down", signal.Signals(which[0]).name)
    return which[0]


def run_service(start: Callable[[], None], stop: Callable[[], None]) -> int:
    """Start a service, run until asked to stop, stop it; the process exit status."""
    try:
        start()
    except OSError as exc:  # a port in use, an address that does not exist
        log.error("cannot start: %s", exc)
        return 1
    wait_for_termination()
    stop()
    log.info("stopped cleanly")
    return 0
