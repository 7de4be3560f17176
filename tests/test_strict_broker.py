"""The hardened setup on a real broker: the definitions alone declare the topology
(``--admin-declares-topology``), each substation has a user of its own (``--substation-users``),
and the real service processes check the topology passively and trust events only from their
owners.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartgrid import contract, definitions
from stack.local import StackSettings, balancer_process, gateway_process, substation_process
from stack.processes import ProcessGroup
from tests.helpers import (
    eventually,
    health_url,
    import_document,
    imported_definitions,
    metric,
)
from tests.ports import free_ports
from tests.test_history_stream import read_stream

pytestmark = pytest.mark.slow

SUBSTATIONS = ("substation-1", "substation-2")


@dataclasses.dataclass
class StrictBroker:
    vhost: str
    #: role, or substation id, -> AMQP URL of its user
    urls: dict[str, str]
    users: dict[str, str]

    def import_topology(self) -> None:
        import_document(definitions.topology_definitions(self.vhost, substations=SUBSTATIONS))

    @property
    def event_senders(self) -> str:
        own = "|".join(self.users[s] for s in SUBSTATIONS)
        roles = [f"{role}={self.users[role]}" for role in ("gateway", "balancer", "loadgen")]
        return ",".join([*roles, f"substation={own}"])


@pytest.fixture
def strict(broker_reachable) -> Iterator[StrictBroker]:
    """Users and permissions of the hardened setup, without the topology (import_topology)."""
    vhost = f"smartgrid-strict-{uuid.uuid4().hex[:8]}"
    roles = {role: uuid.uuid4().hex for role in definitions.PASSWORD_ENV if role != "substation"}
    own = {s: uuid.uuid4().hex for s in SUBSTATIONS}
    document = {"vhosts": [{"name": vhost}]} | definitions.user_definitions(
        roles, None, vhost, services_declare=False, substation_passwords=own
    )
    passwords = roles | {definitions.substation_user(s): p for s, p in own.items()}
    with imported_definitions(document, passwords) as by_user:
        urls = {r: by_user[r] for r in roles} | {
            s: by_user[definitions.substation_user(s)] for s in SUBSTATIONS
        }
        users = {key: url.split("//", 1)[1].split(":", 1)[0] for key, url in urls.items()}
        # Ids here are "substation-N", so their users are "substation-substation-N<suffix>":
        # the suffix the import adds is not part of the template, so name each user.
        yield StrictBroker(vhost, urls, users)


def _stack(strict: StrictBroker, tmp_path: Path) -> tuple[StackSettings, ProcessGroup]:
    ports = free_ports(2 + len(SUBSTATIONS))
    settings = StackSettings(
        gateway_port=ports[0],
        balancer_port=ports[1],
        substation_ports=tuple(ports[2:]),
        substations=len(SUBSTATIONS),
        capacity=3,
        gateway_workers=1,
        poll_interval=0.5,
        session_seconds=0.5,
        log_dir=tmp_path / "logs",
        extra_env={"DECLARE_TOPOLOGY": "0", "EVENT_SENDERS": strict.event_senders},
    )
    group = ProcessGroup()
    for index, substation in enumerate(SUBSTATIONS):
        service = substation_process(
            dataclasses.replace(settings, amqp_url=strict.urls[substation]), index
        )
        service.env = {**service.env, "DECLARE_QUEUE": "0"}
        group.add(service)
    group.add(balancer_process(dataclasses.replace(settings, amqp_url=strict.urls["balancer"])))
    group.add(gateway_process(dataclasses.replace(settings, amqp_url=strict.urls["gateway"])))
    return settings, group


def _post_charge(settings: StackSettings, ev_id: str) -> str:
    request = urllib.request.Request(
        f"{settings.gateway_url}/charge",
        data=json.dumps({"ev_id": ev_id}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        return json.loads(response.read())["request_id"]


def _completed(settings: StackSettings, request_id: str) -> bool:
    with urllib.request.urlopen(f"{settings.gateway_url}/charge/{request_id}", timeout=5) as r:
        return json.loads(r.read())["status"] == "completed"


def test_services_check_the_admins_topology_passively_and_wait_until_it_exists(
    strict: StrictBroker, tmp_path: Path
):
    settings, group = _stack(strict, tmp_path)
    try:
        # Nothing is declared yet: each passive declare meets 404 NOT_FOUND, and every
        # service keeps trying (none may declare the topology itself, none gives up).
        time.sleep(3)
        for service in group.services:
            assert service.alive(), service.log_tail(50)
        balancer = group.services[len(SUBSTATIONS)]
        assert metric(health_url(balancer), "balancer_broker_connected") == 0
        for service, substation in zip(group.services, SUBSTATIONS, strict=False):
            connected = metric(
                health_url(service), "substation_broker_connected", substation=substation
            )
            assert connected == 0
        strict.import_topology()
        for service in group.services:
            service.wait_healthy(60)
        request_ids = [_post_charge(settings, f"EV{i}") for i in range(6)]
        for request_id in request_ids:
            eventually(
                functools.partial(_completed, settings, request_id),
                timeout=60,
                what=f"{request_id} completed",
            )
        # Each request and its fate reached the history the definitions declared, which the
        # gateway's user may read from its start.
        # (Events come in batches, so the count of messages is not known: read for a while.)
        history = read_stream(strict.urls["gateway"], expected=10**6, timeout=3)
        for request_id in request_ids:
            kinds = [key for key, body in history if request_id.encode() in body]
            assert contract.REQUEST_ROUTING_KEY in kinds and "session.completed" in kinds, kinds
    finally:
        exits = group.stop()
    logs = "\n".join(s.log_tail(400) for s in group.services)
    assert "NOT_FOUND" in logs  # they did meet the missing topology
    assert "ACCESS_REFUSED" not in logs and "PRECONDITION_FAILED" not in logs
    assert set(exits.values()) == {0}, exits
