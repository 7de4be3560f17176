"""Shared fixtures: a private vhost on the real broker, free ports, service processes.

Every test that touches RabbitMQ gets its own vhost (created with ``rabbitmqctl``, deleted
afterwards), so runs never see each other's queues and the shared broker is left as found.
Nothing here mocks the broker: if it is not reachable the tests fail, they do not skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pika
import pytest
from hypothesis import HealthCheck, settings

from smartgrid.config import DEFAULT_AMQP_URL
from stack.local import StackSettings
from tests.helpers import BrokerClient
from tests.ports import free_port, free_ports  # noqa: F401 - imported from here by tests

BASE_URL = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)

# Property tests assert what is true, not how fast: hypothesis's default 200 ms deadline per
# example and its too-slow health check fail them on a loaded machine (timing is bench/'s).
settings.register_profile("smartgrid", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("smartgrid")

#: The Docker Engine and compose stack fixtures (and running those tests last).
pytest_plugins = ["tests.compose_stack"]


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _url_for_vhost(vhost: str) -> str:
    base = BASE_URL.split(",")[0]
    prefix, _, _ = base.rpartition("/")
    return f"{prefix}/{quote(vhost, safe='')}"


@pytest.fixture(scope="session")
def broker_reachable() -> None:
    try:
        pika.BlockingConnection(pika.URLParameters(BASE_URL.split(",")[0])).close()
    except Exception as exc:  # noqa: BLE001 - report whatever it is
        pytest.fail(f"RabbitMQ is not reachable at {BASE_URL}: {exc} (make test starts it)")


def _make_vhost() -> Iterator[str]:
    vhost = f"smartgrid-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    user = pika.URLParameters(BASE_URL.split(",")[0]).credentials.username
    _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    try:
        yield _url_for_vhost(vhost)
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def amqp_url(broker_reachable: None) -> Iterator[str]:
    """The URL of a fresh, empty vhost for this test."""
    yield from _make_vhost()


@pytest.fixture(scope="module")
def module_amqp_url(broker_reachable: None) -> Iterator[str]:
    """A fresh vhost shared by the tests of one module."""
    yield from _make_vhost()


@pytest.fixture
def stack_settings(amqp_url: str, tmp_path: Path) -> StackSettings:
    """Local-stack settings on free ports and a private vhost; tests adjust the rest."""
    ports = free_ports(2 + 10)
    return StackSettings(
        amqp_url=amqp_url,
        gateway_port=ports[0],
        balancer_port=ports[1],
        substation_ports=tuple(ports[2:]),
        gateway_workers=1,
        log_dir=tmp_path / "logs",
    )


@pytest.fixture
def broker(amqp_url: str) -> Iterator[BrokerClient]:
    """A blocking client on this test's vhost: it sends and reads what the services would."""
    client = BrokerClient(amqp_url)
    yield client
    client.close()


def blocking_channel(
    url: str,
) -> tuple[pika.BlockingConnection, pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()
