"""docker-compose.cluster.yml on a real Docker Engine: one cluster of three, every quorum queue
and stream on all three, and a node killed mid-load losing nothing, the history included.

The stand-in broker is Debian's RabbitMQ 3.10 (tests/compose_stack.py), which lacks one 4.x
setting of rabbitmq/cluster.conf: continuous membership reconciliation
(quorum_queue.continuous_membership_reconciliation.*), which a 3.10 node refuses to boot with.
The test mounts cluster.conf without those two lines (everything else as committed); the
compose file's own one-shot cluster-setup (rabbitmq/cluster-setup.sh) grows the queues and
streams declared at boot, before the last node joined, onto all three, on 3.10 as on 4.x.

The stand-in also boots its three blank nodes one after the other (rabbitmq-2 once rabbitmq-1
is healthy, rabbitmq-3 once rabbitmq-2 is): before 3.13 reworked peer discovery (a seed node
chosen the same way by every node, the others joining it with retries), blank nodes booting in
parallel could race to create the cluster's schema, and the loser stops with "BOOT FAILED"
(schema_integrity_check_failed; rabbitmq/cluster-operator#689) and comes back through its
restart policy, which `up --wait` reports as a failure: CI saw rabbitmq-1 restart 18 s into a
first boot once. 4.x nodes boot in parallel as the compose file starts them.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smartgrid import contract
from tests.compose_stack import Stack, wait_for
from tests.docker_engine import ROOT, DockerEngine

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

NODES = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
NOT_IN_3_10 = "quorum_queue.continuous_membership_reconciliation."


@pytest.fixture(scope="module")
def cluster(
    docker_engine: DockerEngine, compose_stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    compose_stack.compose.down()  # the single-broker stack is done with; make room
    directory = tmp_path_factory.mktemp("cluster")
    conf = directory / "cluster-3.10.conf"
    conf.write_text(
        "".join(
            line
            for line in (ROOT / "rabbitmq/cluster.conf").read_text().splitlines(keepends=True)
            if not line.startswith(NOT_IN_3_10)
        )
    )
    override = directory / "stand-in-3.10.yml"
    override.write_text(
        "services:\n"
        + "".join(
            f"  {node}:\n    volumes:\n      - {conf}:/etc/rabbitmq/conf.d/30-cluster.conf:ro\n"
            + (
                f"    depends_on:\n      {before}:\n        condition: service_healthy\n"
                if before
                else ""
            )
            for before, node in zip([None, *NODES], NODES, strict=False)
        )
    )
    stack = Stack(
        docker_engine,
        "smartgrid-test-cluster",
        directory,
        ["docker-compose.yml", "docker-compose.cluster.yml", str(override)],
        SESSION_SECONDS="3",
        POLL_INTERVAL="1",
    )
    stack.compose.down()
    try:
        started = time.monotonic()
        try:
            stack.up("--build")
        except Exception as error:
            raise AssertionError(f"{error}\n{stack.diagnose()}") from None
        print(f"cluster up --build: {time.monotonic() - started:.0f}s")
        yield stack
    finally:
        stack.compose.down()


def _ctl(stack: Stack, node: str, *args: str) -> Any:
    """rabbitmqctl's JSON output on ``node``, as parsed: its shape depends on the command."""
    result = stack.compose("exec", "-T", node, *args, "--formatter", "json")
    return json.loads(result.stdout)


def _queues(stack: Stack, via: str) -> dict[str, dict]:
    rows = _ctl(
        stack,
        via,
        "rabbitmqctl",
        "-q",
        "list_queues",
        "-p",
        "smartgrid",
        "name",
        "type",
        "leader",
        "members",
    )
    return {row["name"]: row for row in rows}


def test_the_three_nodes_form_one_cluster_and_every_quorum_queue_is_on_all_three(cluster):
    status = _ctl(cluster, "rabbitmq-1", "rabbitmqctl", "-q", "cluster_status")
    assert sorted(status["running_nodes"]) == [f"rabbit@{node}" for node in NODES], status
    (setup,) = cluster.compose.containers("cluster-setup", all=True)
    assert setup["State"] == "exited" and setup["ExitCode"] == 0, cluster.diagnose()

    def all_on_three():
        queues = _queues(cluster, "rabbitmq-1")
        quorum = {name: q for name, q in queues.items() if q["type"] == "quorum"}
        wanted = {contract.PENDING_QUEUE, contract.DEAD_LETTER_QUEUE} | {
            contract.substation_queue_name(f"substation-{i}") for i in (1, 2, 3)
        }
        if not wanted <= set(quorum):
            return None
        if any(len(q["members"]) != 3 for q in quorum.values()):
            return None
        return quorum

    quorum = wait_for(all_on_three, 120, "every quorum queue with three members", interval=3)
    print({name: q["members"] for name, q in quorum.items()})


#: rabbitmq-streams, wherever the image keeps it (Debian's package: out of PATH).
STREAMS_CLI = (
    "sh",
    "-c",
    '"$(command -v rabbitmq-streams || echo /usr/lib/rabbitmq/bin/rabbitmq-streams)" "$@"',
    "rabbitmq-streams",
)


def _stream_nodes(stack: Stack, stream: str, via: str = "rabbitmq-1") -> list[str]:
    rows = _ctl(stack, via, *STREAMS_CLI, "-q", "stream_status", "--vhost", "smartgrid", stream)
    return sorted(row["node"] for row in rows)


def test_every_stream_has_a_replica_on_every_node(cluster):
    """A stream consumer reads from the replica on its own node, and a node without one
    refuses it: the gateways, balancers and substations may be connected to any node."""
    for stream in (contract.HISTORY_STREAM, contract.GRID_LIMITS_STREAM):
        assert _stream_nodes(cluster, stream) == [f"rabbit@{node}" for node in NODES], stream


def test_killing_a_node_mid_load_loses_nothing(cluster: Stack, tmp_path: Path) -> None:
    leader = _queues(cluster, "rabbitmq-1")[contract.PENDING_QUEUE]["leader"].split("@")[1]
    survivor = next(node for node in NODES if node != leader)
    accepted: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            try:
                status, body = cluster.charge(f"EV{uuid.uuid4().hex[:6]}")
            except OSError:
                status, body = 0, {}
            if status == 202:
                accepted.append(body["request_id"])
            else:
                refused.append(status)
            time.sleep(0.1)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(5)
    before_kill = len(accepted)
    cluster.compose("kill", "-s", "SIGKILL", leader)  # docker kill: no goodbye to anyone
    # Load goes on through the failover: 30 more accepted, however slow the machine is.
    wait_for(lambda: len(accepted) >= before_kill + 30, 120, "30 requests accepted after the kill")
    stop.set()
    sender.join(timeout=30)
    assert before_kill > 10, before_kill

    def unfinished() -> list[str]:
        left = []
        for request_id in accepted:
            try:
                if cluster.status(request_id).get("status") != "completed":
                    left.append(request_id)
            except OSError:
                left.append(request_id)
        return left

    def state(request_id: str) -> str:
        try:
            return json.dumps(cluster.status(request_id), sort_keys=True)
        except OSError as error:  # an HTTPError too (404: the gateway does not know it)
            return repr(error)

    def explain(what: str) -> AssertionError:
        left = unfinished()
        states = collections.Counter(state(r) for r in left[:20])
        logs = tmp_path / "stack.log"
        logs.write_text(cluster.compose.logs(tail=5000))
        return AssertionError(
            f"{what}: {len(left)} of {len(accepted)} not completed: {states}\n"
            f"(every service's log: {logs})\n{cluster.compose.logs('gateway', 'balancer', tail=80)}"
        )

    try:
        wait_for(lambda: not unfinished() or None, 180, "every accepted request completed")
    except AssertionError:
        raise explain("after the kill") from None
    # Two of three nodes still make a majority; the queue has a leader again, on a survivor.
    new_leader = _queues(cluster, survivor)[contract.PENDING_QUEUE]["leader"]
    assert new_leader != f"rabbit@{leader}"
    print(f"accepted {len(accepted)}, refused {len(refused)} while {leader} was killed")

    # The history survived the node: a gateway started now replays it from a survivor's
    # replica, and still answers for every request, from before the kill and after.
    restarted = time.monotonic()
    cluster.compose("restart", "gateway")
    try:
        wait_for(lambda: not unfinished() or None, 120, "every request completed after a restart")
    except AssertionError:
        raise explain("after a restart of the gateway") from None
    # Its replay read a live replica (the failover's refusals, before, are in the log too).
    since = f"{int(time.monotonic() - restarted) + 2}s"
    logs = cluster.compose("logs", "--no-color", "--since", since, "gateway").stdout
    assert "does not have a replica" not in logs, logs
