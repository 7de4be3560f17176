"""Fixtures for the tests that run the real docker-compose.yml on a real Docker Engine.

A pytest plugin (tests/conftest.py loads it): one engine per test session (tests/docker_engine.py),
the stand-in images built when missing, and the compose stack in a private project with host
ports of its own and an env file of its own (a developer's .env is never read). Tests marked
``docker`` run at the end of the session, so that the engine and the stacks they start are
stopped once they are done, not kept running beside the rest of the suite.

Where the engine cannot run (not root, packages missing) the tests skip and say what to run;
under CI (CI=true) they fail instead: CI installs everything and skips nothing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.docker_engine import ROOT, Compose, DockerEngine, missing_requirements
from tests.ports import free_ports

COMPOSE_FILE = ROOT / "docker-compose.yml"
#: Grafana has no Debian package, so no stand-in image: the tests start everything else.
NOT_RUN_HERE = {"grafana"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Docker tests last (see the module docstring); of those, the ones on the single-broker
    stack first, so that it is down before the cluster comes up."""

    def order(item: pytest.Item) -> tuple[bool, bool]:
        docker = item.get_closest_marker("docker") is not None
        return docker, docker and "cluster" in item.path.stem

    items.sort(key=order)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: runs containers on a Docker Engine of its own")


def pinned_images() -> dict[str, str]:
    """The images the stand-ins replace, as the project pins them."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base is not None
    return {
        "python": base.group(1),
        "rabbitmq": services["rabbitmq"]["image"],
        "prometheus": services["prometheus"]["image"],
    }


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    reason = missing_requirements()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI skips nothing: {reason}")
        pytest.skip(reason)
    with DockerEngine() as engine:
        images = pinned_images()
        engine.build_standin_images(images["python"], images["rabbitmq"], images["prometheus"])
        yield engine


class Stack:
    """A compose project of the real compose file(s), with its own env file and host ports."""

    def __init__(
        self, engine: DockerEngine, project: str, directory: Path, files: list[str], **env: str
    ):
        self.env_file = directory / f"{project}.env"
        self.ports = dict(
            zip(
                [
                    "GATEWAY_HOST_PORT",
                    "RABBITMQ_UI_HOST_PORT",
                    "PROMETHEUS_HOST_PORT",
                    "GRAFANA_HOST_PORT",
                    "RABBITMQ_1_UI_HOST_PORT",
                    "RABBITMQ_2_UI_HOST_PORT",
                    "RABBITMQ_3_UI_HOST_PORT",
                ],
                map(str, free_ports(7)),
                strict=True,
            )
        )
        self.env = {**self.ports, **env}
        self._tokens: dict[str, str] = {}
        self.write_env()
        self.compose = Compose(
            engine,
            project,
            ROOT,
            files=[str(ROOT / f) if not Path(f).is_absolute() else f for f in files],
            env_file=self.env_file,
        )

    def write_env(self) -> None:
        # Single quotes: compose takes the value literally ($, #, spaces and all).
        lines = [f"{key}='{value}'" for key, value in self.env.items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def set_env(self, **values: str) -> None:
        self.env.update(values)
        self.write_env()

    def services(self, *profiles: str) -> list[str]:
        args = [arg for p in profiles for arg in ("--profile", p)]
        names = self.compose(*args, "config", "--services").stdout.split()
        return [name for name in names if name not in NOT_RUN_HERE]

    def up(self, *args: str, profiles: tuple[str, ...] = (), timeout: float = 600) -> None:
        profile_args = [arg for p in profiles for arg in ("--profile", p)]
        self.compose(
            *profile_args,
            "up",
            "--detach",
            "--wait",
            "--wait-timeout",
            str(int(timeout)),
            *args,
            *self.services(*profiles),
            timeout=timeout + 60,
        )

    # ------------------------------------------------------------------ HTTP, from the host
    def url(self, port_variable: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port_variable]}{path}"

    def token(self, client: str = "driver") -> str:
        """A client's token, as the README tells a user to read theirs."""
        if client not in self._tokens:
            self._tokens[client] = self.secret(f"{client}-token").strip()
        return self._tokens[client]

    def _headers(self, client: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if client is not None:
            headers["Authorization"] = f"Bearer {self.token(client)}"
        return headers

    def _call(self, request: urllib.request.Request) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def charge(
        self, ev_id: str, *, client: str | None = "driver", key: str | None = None
    ) -> tuple[int, dict]:
        """POST /charge as ``client`` (None: without a token), with an Idempotency-Key."""
        headers = self._headers(client)
        if key is not None:
            headers["Idempotency-Key"] = key
        request = urllib.request.Request(
            self.url("GATEWAY_HOST_PORT", "/charge"),
            data=json.dumps({"ev_id": ev_id}).encode(),
            headers=headers,
        )
        return self._call(request)

    def lookup(self, request_id: str, *, client: str | None = "driver") -> tuple[int, dict]:
        """GET /charge/<id> as ``client``."""
        url = self.url("GATEWAY_HOST_PORT", f"/charge/{request_id}")
        return self._call(urllib.request.Request(url, headers=self._headers(client)))

    def status(self, request_id: str) -> dict:
        """The driver's request's record (an HTTPError, an OSError, if there is none)."""
        url = self.url("GATEWAY_HOST_PORT", f"/charge/{request_id}")
        request = urllib.request.Request(url, headers=self._headers("driver"))
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def secret(self, name: str) -> str:
        """A secret the setup service keeps in the secrets volume (as a user would read it)."""
        return self.compose("run", "--rm", "--no-deps", "setup", "cat", f"/secrets/{name}").stdout

    def management(
        self,
        path: str,
        *,
        user: str = "admin",
        password: str | None = None,
        port_variable: str = "RABBITMQ_UI_HOST_PORT",
        method: str = "GET",
        body: dict | None = None,
    ) -> object:
        password = self.secret("rabbitmq-admin-password") if password is None else password
        request = urllib.request.Request(
            self.url(port_variable, f"/api/{path}"),
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def prometheus(self, path: str) -> dict:
        with urllib.request.urlopen(self.url("PROMETHEUS_HOST_PORT", path), timeout=10) as r:
            return json.loads(r.read())

    def diagnose(self) -> str:
        """What to print when something did not come up: every container's state, a short
        tail of every log, and last (where a cut report keeps it) the whole story of each
        container that restarted, failed its health check or exited with an error."""
        containers = self.compose.containers(all=True)
        states, troubled = [], []
        for c in containers:
            inspected = self._inspect(c["Name"])
            state = inspected.get("State", {})
            restarts = inspected.get("RestartCount", 0)
            states.append(
                f"{c['Name']}: {c['State']} {c.get('Health') or ''} {c.get('Status', '')}"
                f" restarts={restarts} exit={state.get('ExitCode')} {state.get('Error') or ''}"
            )
            health = state.get("Health") or {}
            if restarts or health.get("Status") == "unhealthy" or state.get("ExitCode"):
                probes = "\n".join(
                    f"  {probe.get('End', '')} exit {probe.get('ExitCode')}: "
                    f"{(probe.get('Output') or '').strip()[-300:]}"
                    for probe in health.get("Log") or []
                )
                troubled.append(
                    f"--- {c['Name']}: restarts={restarts}, health checks:\n{probes}\n"
                    f"{self.compose.logs(c['Service'], tail=400)}"
                )
        return "\n".join(["\n".join(states), "--- logs ---", self.compose.logs(tail=30), *troubled])

    def _inspect(self, container: str) -> dict:
        result = self.compose.engine.docker("inspect", container, check=False)
        try:
            (inspected,) = json.loads(result.stdout)
        except ValueError:
            return {}
        return inspected


@pytest.fixture(scope="session")
def compose_stack(docker_engine: DockerEngine, tmp_path_factory) -> Iterator[Stack]:
    """The real docker-compose.yml, brought up by the first test that uses it (test_compose),
    short sessions and polls so that the tests do not wait long; removed with its volumes."""
    stack = Stack(
        docker_engine,
        "smartgrid-test",
        tmp_path_factory.mktemp("compose"),
        ["docker-compose.yml"],
        SESSION_SECONDS="3",
        POLL_INTERVAL="1",
    )
    stack.compose.down()  # what an interrupted run left behind
    try:
        yield stack
    finally:
        stack.compose.down()


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    """``check()`` until truthy; errors along the way count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"not true after {timeout}s: {what} (last: {last!r})")
