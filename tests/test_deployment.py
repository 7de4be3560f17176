"""The docker compose stack, checked without Docker: schema, wiring, images, broker definitions.

No Docker engine runs here, so the compose file is validated against the Compose
specification, cross-checked against the code (every command is a real entry point, every
environment variable is one the code reads, every Prometheus target is a service's metrics
port), and the broker definitions it loads are imported into the real local RabbitMQ and used
by the real services under the least-privileged users they get in compose.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from balancer.config import BalancerConfig
from gateway.config import GatewayConfig
from smartgrid import contract, definitions
from stack.local import StackSettings, balancer_process, gateway_process, substation_process
from substation.config import SubstationConfig
from tests.helpers import env_example, eventually, imported_definitions

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _env_names(config_class: type) -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(config_class) if "env" in f.metadata}


#: What each entry point reads from the environment (from the code's own declarations).
READS = {
    "gateway": _env_names(GatewayConfig),
    "balancer": _env_names(BalancerConfig),
    "substation": _env_names(SubstationConfig),
    "loadgen": {"GATEWAY_URL", "AMQP_URL"},
    "smartgrid.definitions": {
        definitions.ADMIN_USER_ENV,
        definitions.ADMIN_PASSWORD_ENV,
        *definitions.PASSWORD_ENV.values(),
    },
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_the_compose_file_validates_against_the_compose_specification():
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (.ci/run installs it)",
)
def test_docker_compose_accepts_the_file_with_the_example_environment():
    result = subprocess.run(
        ["docker-compose", "--profile", "loadgen", "--profile", "scale-out", "config", "-q"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env_example()},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_compose_file_refuses_to_start_without_credentials():
    if shutil.which("docker-compose") is None:
        pytest.skip("Debian's docker-compose is not installed")
    result = subprocess.run(
        ["docker-compose", "config", "-q"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "set it in .env" in result.stderr


def test_images_are_pinned_and_the_broker_is_a_4x_management_image(compose):
    images = {name: service.get("image", "") for name, service in compose["services"].items()}
    assert re.fullmatch(r"rabbitmq:4\.\d+(\.\d+)?-management", images["rabbitmq"]), images[
        "rabbitmq"
    ]
    for name, image in images.items():
        if image.startswith("smartgrid:"):
            continue  # built from this repository
        repository, _, tag = image.partition(":")
        assert tag and tag != "latest", f"{name}: image {image} is not pinned"


def _module_of(service: dict) -> str | None:
    command = service.get("command") or []
    if command[:2] == ["python", "-m"]:
        return command[2]
    return None


def test_every_python_service_runs_a_real_entry_point_with_variables_the_code_reads(compose):
    checked = 0
    for name, service in compose["services"].items():
        module = _module_of(service)
        if module is None:
            continue
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        environment = service.get("environment") or {}
        unknown = set(environment) - READS[module]
        assert not unknown, f"{name} sets variables {module} never reads: {sorted(unknown)}"
        checked += 1
    assert checked >= 7  # definitions, gateway, balancer, three substations, scale-out, loadgen


def test_services_start_only_once_their_dependencies_are_healthy(compose):
    services = compose["services"]
    for name, service in services.items():
        if _module_of(service) in {"gateway", "balancer", "substation", "loadgen"}:
            assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        if name not in {"rabbitmq-definitions", "loadgen"}:
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert (
        services["rabbitmq"]["depends_on"]["rabbitmq-definitions"]["condition"]
        == "service_completed_successfully"
    )


def test_healthchecks_probe_the_port_each_service_listens_on(compose):
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        port = environment.get("METRICS_PORT") or environment.get("GATEWAY_PORT")
        if port is None:
            continue
        probe = " ".join(service["healthcheck"]["test"])
        assert f"localhost:{port}/" in probe, (name, probe)


def test_credentials_come_from_the_environment_not_literals(compose):
    text = COMPOSE_FILE.read_text()
    assert "guest" not in text
    for name, service in compose["services"].items():
        url = (service.get("environment") or {}).get("AMQP_URL")
        if url is not None:
            assert re.fullmatch(
                r"amqp://(\w+):\$\{\w+_AMQP_PASSWORD\}@rabbitmq:5672/smartgrid", url
            ), (name, url)
    # Only the gateway and Grafana are published beyond localhost.
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            if not str(mapping).startswith("127.0.0.1:"):
                assert name in {"gateway", "grafana"}, (name, mapping)
    assert set(env_example()) >= set(READS["smartgrid.definitions"])


def test_prometheus_targets_are_the_services_metrics_ports(compose):
    config = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    services = compose["services"]
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert targets
    for target in targets:
        host, _, port = target.partition(":")
        assert host in services, f"target {target} is not a compose service"
        environment = services[host].get("environment") or {}
        expected = environment.get("METRICS_PORT") or environment.get("GATEWAY_PORT")
        if host == "rabbitmq":
            expected = "15692"
        assert port == expected, f"target {target}: the service listens on {expected}"
    scraped = {t.partition(":")[0] for t in targets}
    assert {
        "gateway",
        "balancer",
        "substation-1",
        "substation-2",
        "substation-3",
        "rabbitmq",
    } <= scraped


def test_the_image_runs_as_a_non_root_user_without_build_tools():
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2, "a build stage and a final stage"
    build, final = stages
    assert re.search(r"^USER (?!root)\S+", final, re.M)
    assert "constraints.txt" in build
    assert not re.search(r"apt-get install|gcc|build-essential", final)


def test_the_committed_definitions_match_the_contract():
    committed = json.loads((ROOT / "rabbitmq/definitions.json").read_text())
    assert committed == definitions.topology_definitions()


def test_password_hashes_use_rabbitmqs_salted_sha256():
    salt = b"\x01\x02\x03\x04"
    encoded = definitions.password_hash("secret", salt)
    raw = base64.b64decode(encoded)
    assert raw[:4] == salt and raw[4:] == hashlib.sha256(salt + b"secret").digest()


@pytest.fixture
def imported_vhost(broker_reachable):
    """The compose definitions (users included) imported into the local broker, renamed so
    that they cannot collide with anything else on it; removed afterwards."""
    vhost = f"smartgrid-defs-{uuid.uuid4().hex[:8]}"
    passwords = {user: uuid.uuid4().hex for user in definitions.PASSWORD_ENV}
    document = definitions.topology_definitions(vhost) | definitions.user_definitions(
        passwords, None, vhost
    )
    with imported_definitions(document, passwords) as urls:
        yield vhost, urls


def _management_api(path: str) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:15672/api/{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def management_api(broker_reachable) -> None:
    result = subprocess.run(
        ["rabbitmq-plugins", "enable", "rabbitmq_management"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    eventually(
        lambda: _try(lambda: _management_api("overview")), timeout=60, what="management API up"
    )


def _try(call):
    try:
        return call() or True
    except OSError:
        return False


@pytest.mark.slow
def test_services_run_on_the_imported_definitions_with_least_privileged_users(
    imported_vhost, management_api, tmp_path
):
    vhost, urls = imported_vhost
    from tests.conftest import free_ports

    ports = free_ports(3)
    base = StackSettings(
        gateway_port=ports[0],
        balancer_port=ports[1],
        substation_ports=(ports[2],),
        substations=1,
        gateway_workers=1,
        poll_interval=0.5,
        session_seconds=0.5,
        log_dir=tmp_path / "logs",
    )
    services = []
    try:
        for make, user in (
            (lambda s: substation_process(s, 0), "substation"),
            (balancer_process, "balancer"),
            (gateway_process, "gateway"),
        ):
            settings = dataclasses.replace(base, amqp_url=urls[user])
            service = make(settings).start()
            services.append(service)
            service.wait_healthy()

        # Requests go all the way through: each user could do its part, and nothing was
        # refused (ACCESS_REFUSED) or conflicted with the imported queues (PRECONDITION_FAILED).
        for _ in range(3):
            request = urllib.request.Request(
                f"{base.gateway_url}/charge",
                data=b'{"ev_id": "EV1"}',
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 202

        def completed() -> bool:
            queue = _management_api(
                f"queues/{vhost}/{contract.substation_queue_name('substation-1')}"
            )
            return queue.get("consumers") == 1 and queue.get("messages", 1) == 0

        eventually(
            completed, timeout=30, what="the substation consuming its queue and the requests done"
        )

        queues = {q["name"]: q for q in _management_api(f"queues/{vhost}")}
        assert queues[contract.PENDING_QUEUE]["consumers"] == 1
        assert queues[contract.PENDING_QUEUE]["arguments"] == next(
            d.arguments
            for d in contract.core_topology()
            if isinstance(d, contract.Queue) and d.name == contract.PENDING_QUEUE
        )
        exchanges = {e["name"] for e in _management_api(f"exchanges/{vhost}")}
        assert {
            contract.REQUESTS_EXCHANGE,
            contract.DISPATCH_EXCHANGE,
            contract.EVENTS_EXCHANGE,
        } <= exchanges
        connections = _management_api("connections")
        names = {
            c.get("client_properties", {}).get("connection_name")
            for c in connections
            if c["vhost"] == vhost
        }
        assert any(n and n.startswith("gateway-") for n in names), names
    finally:
        exits = [s.stop() for s in reversed(services)]
        logs = "\n".join(s.log_tail(200) for s in services)
    assert exits == [0] * len(exits)
    assert "ACCESS_REFUSED" not in logs and "PRECONDITION_FAILED" not in logs
