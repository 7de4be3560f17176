"""A throw-away RabbitMQ cluster of N nodes on this machine, beside the shared broker.

Debian's ``rabbitmq-server`` runs several nodes on one host when each has its own node name,
ports and directories. Each node here gets:

* a node name of its own (``sgc<i>-<token>@localhost``), registered with the machine's epmd;
* its own AMQP, Erlang distribution, management and Prometheus ports (free ones, on 127.0.0.1);
* a directory of its own under ``/tmp`` (config, enabled plugins, data, logs), owned by the
  ``rabbitmq`` user the server runs as (pytest's private ``tmp_path`` is not readable by it).

Nodes boot in parallel (about 20 s), then nodes 2..N join node 1 with ``rabbitmqctl stop_app``,
``join_cluster``, ``start_app``. :meth:`RabbitCluster.stop` stops every node and removes its
directory; so does an ``atexit`` hook if the test process ends without calling it. The shared
broker (``rabbit@localhost``, 5672/25672) is never addressed: every ``rabbitmqctl`` call names
its node with ``-n``.

    with RabbitCluster(3) as cluster:
        vhost_urls = cluster.add_vhost("my-test")      # one AMQP URL per node
        cluster.kill(cluster.nodes[0])                  # SIGKILL, like a crash
        cluster.restart(cluster.nodes[0])
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.ports import free_ports

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQ_USER = "rabbitmq"
DEFAULT_PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus")


class ClusterError(RuntimeError):
    """A node did not start, join or answer as expected (with the log's tail)."""


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Node:
    index: int
    name: str  # e.g. sgc1-1a2b3c@localhost
    amqp_port: int
    dist_port: int
    management_port: int
    prometheus_port: int
    base: Path
    plugins: tuple[str, ...] = DEFAULT_PLUGINS
    #: More arguments for the node's Erlang VM (benchmarks: its schedulers' busy waiting).
    erl_args: str = ""
    #: The OS process id of the node's Erlang VM (beam.smp) once started.
    os_pid: int | None = field(default=None, repr=False)

    @property
    def config_file(self) -> Path:
        return self.base / "rabbitmq.conf"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.base / "rabbitmq.pid"

    def url(self, vhost: str = "/", user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"

    def environment(self) -> dict[str, str]:
        """What ``rabbitmq-server`` needs to be this node (these win over rabbitmq-env.conf)."""
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.config_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # The machine's epmd (127.0.0.1 only) and distribution on loopback, like the
            # shared node's /etc/rabbitmq/rabbitmq-env.conf, which this node does not read.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": " ".join(
                filter(None, ("-kernel inet_dist_use_interface {127,0,0,1}", self.erl_args))
            ),
        }

    def write_files(self) -> None:
        self.base.mkdir(parents=True)
        (self.base / "mnesia").mkdir()
        self.log_dir.mkdir()
        lines = [
            f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}",
            "loopback_users = none",
            # Tests never fill a disk or the memory of this machine; do not alarm on a busy CI box.
            "disk_free_limit.absolute = 50MB",
        ]
        if "rabbitmq_management" in self.plugins:
            lines += [
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
            ]
        if "rabbitmq_prometheus" in self.plugins:
            lines += [
                f"prometheus.tcp.port = {self.prometheus_port}",
                "prometheus.tcp.ip = 127.0.0.1",
            ]
        self.config_file.write_text("\n".join(lines) + "\n")
        (self.base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.base / "rabbitmq-env.conf").write_text("# deliberately empty: see environment()\n")
        (self.base / "advanced.config").write_text("[].\n")

    def read_pid(self) -> int | None:
        """The pid the node wrote at boot (a fallback when it never answered)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def process_alive(self) -> bool:
        """Whether the node's Erlang VM still runs (its name is not on the command line in
        3.10, so the pid is the one the node itself reported, and must still be a beam)."""
        if self.os_pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{self.os_pid}/cmdline").read_bytes()
            state = Path(f"/proc/{self.os_pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return False
        return b"beam" in cmdline.split(b"\0", 1)[0] and state != "Z"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RabbitCluster:
    """``size`` RabbitMQ nodes clustered together; a context manager that tears them down."""

    def __init__(
        self,
        size: int = 3,
        *,
        plugins: tuple[str, ...] = DEFAULT_PLUGINS,
        boot_timeout: float = 120.0,
        root: Path | None = None,
        erl_args: str = "",
    ):
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.boot_timeout = boot_timeout
        token = uuid.uuid4().hex[:6]
        self.root = root or Path(tempfile.mkdtemp(prefix=f"smartgrid-cluster-{token}-", dir="/tmp"))
        ports = free_ports(4 * size)
        self.nodes = [
            Node(
                index=i + 1,
                name=f"sgc{i + 1}-{token}@localhost",
                amqp_port=ports[4 * i],
                dist_port=ports[4 * i + 1],
                management_port=ports[4 * i + 2],
                prometheus_port=ports[4 * i + 3],
                base=self.root / f"node{i + 1}",
                plugins=plugins,
                erl_args=erl_args,
            )
            for i in range(size)
        ]
        self._stopped = False
        atexit.register(self.stop)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Boot every node in parallel, then join nodes 2..N to node 1."""
        user = pwd.getpwnam(RABBITMQ_USER)
        for node in self.nodes:
            node.write_files()
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(self.root, 0o755)
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(self.boot, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.wait_running(len(self.nodes))

    def boot(self, node: Node) -> None:
        """Start ``node`` (fresh or after a stop/kill, keeping its data) and wait until it runs."""
        result = subprocess.run(
            ["runuser", "-u", RABBITMQ_USER, "--", SERVER, "-detached"],
            env={**os.environ, **node.environment()},
            cwd=node.base,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{node.name}: rabbitmq-server -detached failed:\n{result.stdout}\n{result.stderr}"
            )
        deadline = time.monotonic() + self.boot_timeout
        while not _listening(node.amqp_port):
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{node.name}: no AMQP listener after {self.boot_timeout}s:\n{node.log_tail()}"
                )
            time.sleep(0.25)
        self.ctl(node, "await_startup", timeout=self.boot_timeout)
        node.os_pid = int(self.ctl(node, "eval", "list_to_integer(os:getpid()).").stdout.strip())

    restart = boot

    def kill(self, node: Node) -> None:
        """SIGKILL the node's VM: a crash, with no goodbye to its peers or clients."""
        if node.os_pid is None:
            raise ClusterError(f"{node.name} was never started")
        os.kill(node.os_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while node.process_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop every node (gracefully, then SIGKILL) and delete its directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)

        def stop_one(node: Node) -> None:
            node.os_pid = node.os_pid or node.read_pid()
            # Asked even when its pid is unknown (a boot that failed half-way): it may run.
            self.ctl(node, "stop", check=False, timeout=60)
            deadline = time.monotonic() + 15
            while node.process_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if node.os_pid is not None and node.process_alive():
                os.kill(node.os_pid, signal.SIGKILL)

        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(stop_one, self.nodes))
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ rabbitmqctl
    def ctl(
        self, node: Node, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """``rabbitmqctl -n <node> ...`` (as the rabbitmq user, through Debian's wrapper)."""
        result = subprocess.run(
            ["rabbitmqctl", "-q", "-n", node.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}\n--- log ---\n{node.log_tail()}"
            )
        return result

    def ctl_json(self, node: Node, *args: str) -> Any:
        """rabbitmqctl's JSON output, as parsed: its shape depends on the command."""
        return json.loads(self.ctl(node, *args, "--formatter", "json").stdout or "null")

    def any_running(self) -> Node:
        for node in self.nodes:
            if node.process_alive():
                return node
        raise ClusterError("no node is running")

    def running_nodes(self, via: Node | None = None) -> list[str]:
        status = self.ctl_json(via or self.any_running(), "cluster_status")
        return sorted(status["running_nodes"])

    def wait_running(self, count: int, timeout: float = 60.0, via: Node | None = None) -> list[str]:
        deadline = time.monotonic() + timeout
        running: list[str] = []
        while time.monotonic() < deadline:
            running = self.running_nodes(via)
            if len(running) == count:
                return running
            time.sleep(0.5)
        raise ClusterError(f"{count} nodes not running after {timeout}s: {running}")

    def add_vhost(self, vhost: str, user: str = "guest") -> list[str]:
        """Create ``vhost`` on the cluster with full permissions for ``user``; its URL on each
        node."""
        via = self.any_running()
        self.ctl(via, "add_vhost", vhost)
        self.ctl(via, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return [node.url(vhost) for node in self.nodes]

    def queues(self, vhost: str, via: Node | None = None) -> dict[str, dict]:
        """Every queue of ``vhost``: its type, leader and members (quorum queues)."""
        rows = self.ctl_json(
            via or self.any_running(),
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "leader",
            "members",
        )
        return {row["name"]: row for row in rows}

    def node_named(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)
