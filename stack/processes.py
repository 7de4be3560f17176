"""Starting, watching and stopping the services as local processes.

Used by ``python -m stack`` and by the tests. Every child gets ``PR_SET_PDEATHSIG`` so it dies
with its parent even if the parent is killed with SIGKILL: no process is ever left behind.
The signal comes when the *thread* that started the child ends, not the process: start a
service from a thread that outlives it (a service restarted from a short-lived thread gets
SIGTERM as soon as that thread returns).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smartgrid.healthcheck import gauge_reads_one

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class ServiceProcess:
    """One service (``python -m <module>``) with its environment and log file."""

    name: str
    module: str
    env: Mapping[str, str]
    log_path: Path
    health_url: str | None = None
    #: A metric that must read 1 on the health URL (e.g. the broker connection) to be healthy.
    ready_metric: str | None = None
    args: Sequence[str] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        environment = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.argv(),
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            # Own process group: Ctrl-C in a terminal reaches the runner only, which then
            # stops the children in order instead of all at once.
            start_new_session=True,
        )
        log_file.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until ``health_url`` answers 200; raise with the log's tail if it does not."""
        deadline = time.monotonic() + timeout
        last_error = "not started"
        while time.monotonic() < deadline:
            if self.process is None or not self.alive():
                status = self.process.returncode if self.process is not None else "not started"
                raise RuntimeError(f"{self.name} exited with {status}:\n{self.log_tail()}")
            if self.health_url is None:
                return
            try:
                with urllib.request.urlopen(self.health_url, timeout=1) as response:
                    body = response.read().decode(errors="replace")
                    if response.status == 200 and (
                        self.ready_metric is None or gauge_reads_one(body, self.ready_metric)
                    ):
                        return
                    last_error = f"{self.ready_metric} is not 1"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} not healthy after {timeout}s ({last_error}):\n{self.log_tail()}"
        )

    def signal(self, signum: int) -> None:
        if self.process is not None and self.alive():
            self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit status."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ProcessGroup:
    """Several services started in order and stopped in reverse order."""

    def __init__(self) -> None:
        self.services: list[ServiceProcess] = []

    def add(self, service: ServiceProcess) -> ServiceProcess:
        self.services.append(service.start())
        return service

    def first_dead(self) -> ServiceProcess | None:
        return next((s for s in self.services if not s.alive()), None)

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        return {s.name: s.stop(timeout) for s in reversed(self.services)}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
