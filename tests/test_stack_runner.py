"""The local stack runner: `make up` starts everything and Ctrl-C stops every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import free_ports
from tests.helpers import eventually


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _charge(port: int, token: str | None) -> int:
    headers = {"Content-Type": "application/json", "Idempotency-Key": "stack-runner-1"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/charge",
        data=json.dumps({"ev_id": "EV1"}).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_ctrl_c_stops_every_process_of_the_local_stack(amqp_url: str, tmp_path: Path) -> None:
    gateway, balancer, substation_base = free_ports(3)  # substations use the base and the next port
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stack",
            "up",
            "--gateway-port",
            str(gateway),
            "--balancer-port",
            str(balancer),
            "--substation-port",
            str(substation_base),
            "--substations",
            "2",
            "--prometheus-port",
            "0",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    output = runner.stdout
    assert output is not None  # a pipe
    reader = threading.Thread(target=lambda: lines.extend(output), daemon=True)
    reader.start()
    try:
        eventually(
            lambda: any("Ctrl-C stops everything" in line for line in lines),
            timeout=60,
            what="the stack up",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway}/health", timeout=2) as response:
            assert response.status == 200
        # Clients with tokens: the driver's is kept beside the logs, and the runner says where.
        driver = tmp_path / "tokens" / "driver-token"
        assert any(str(driver) in line for line in lines), lines
        assert _charge(gateway, None) == 401
        assert _charge(gateway, "not-a-token") == 401
        assert _charge(gateway, driver.read_text().strip()) == 202
        children = _children(runner.pid)
        assert len(children) == 4  # two substations, the balancer, the gateway
        # The gateway's worker processes too.
        processes = children + [g for c in children for g in _children(c)]

        runner.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        assert runner.wait(timeout=60) == 0
        reader.join(timeout=10)
        assert any("stopping" in line for line in lines), lines
        eventually(
            lambda: not any(_alive(pid) for pid in processes), timeout=10, what="every process gone"
        )
    finally:
        if runner.poll() is None:
            runner.kill()


def test_the_runner_explains_itself():
    result = subprocess.run(
        [sys.executable, "-m", "stack", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "run" in result.stdout and "up" in result.stdout
