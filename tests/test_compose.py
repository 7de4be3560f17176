"""The real docker-compose.yml on a real Docker Engine, as a user runs it.

The engine is the tests' own (tests/docker_engine.py); the images docker-compose.yml pins
for RabbitMQ and Prometheus, and the Dockerfile's Python base, are stand-ins built from Debian
packages (scripts/build-standin-images: RabbitMQ 3.10 rather than 4.1, Prometheus 2.42 rather
than 2.53), since no image registry is reachable here. Grafana has no stand-in: every other
service runs, Grafana does not (the dashboard's queries are checked against a real Prometheus
in test_monitoring.py).

The tests share one stack and run in order: it comes up with no .env (no secret given), takes
requests, runs the loadgen profile, keeps dead letters, scales out, survives `down` and `up`,
and takes a changed password.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import uuid

import pytest

from smartgrid import contract
from tests.compose_stack import Stack, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]


def _up(stack: Stack, *args: str, profiles: tuple[str, ...] = ()) -> None:
    try:
        stack.up(*args, profiles=profiles)
    except Exception as error:
        raise AssertionError(f"{error}\n{stack.diagnose()}") from None


def _completed(stack: Stack, request_id: str) -> dict | None:
    record = stack.status(request_id)
    return record if record.get("status") == "completed" else None


def _charge_and_complete(stack: Stack, count: int = 3) -> list[dict]:
    accepted = []
    for i in range(count):
        status, body = stack.charge(f"EV{uuid.uuid4().hex[:6]}{i}")
        assert status == 202, body
        accepted.append(body)
    return [
        wait_for(lambda b=body: _completed(stack, b["request_id"]), 60, f"{body} completed")
        for body in accepted
    ]


def test_up_with_nothing_prepared_builds_once_and_every_service_becomes_healthy(compose_stack):
    stack = compose_stack
    assert not any("PASSWORD" in key or "COOKIE" in key for key in stack.env), stack.env
    started = time.monotonic()
    _up(stack, "--build")
    print(f"up --build: {time.monotonic() - started:.0f}s")

    containers = {c["Service"]: c for c in stack.compose.containers(all=True)}
    expected = set(stack.services()) - {"setup", "tokens"}
    running = {name for name, c in containers.items() if c["State"] == "running"}
    assert running == expected, stack.diagnose()
    for name in expected:
        assert containers[name].get("Health") in ("healthy", ""), stack.diagnose()
    for one_shot in ("setup", "tokens"):
        assert containers[one_shot]["State"] == "exited", stack.diagnose()
        assert containers[one_shot]["ExitCode"] == 0, stack.diagnose()

    # One service builds the image; the others run it.
    config = json.loads(stack.compose("config", "--format", "json").stdout)
    builders = [name for name, service in config["services"].items() if "build" in service]
    assert builders == ["setup"]
    images = {service["image"] for service in config["services"].values() if "build" in service}
    assert stack.compose.engine.docker("image", "inspect", *images).returncode == 0

    # Secrets were generated, and the admin can read the broker's password as the README says.
    password = stack.secret("rabbitmq-admin-password")
    assert len(password) >= 32
    overview = stack.management("overview", password=password)
    assert overview["rabbitmq_version"]


def test_requests_flow_from_202_to_completed(compose_stack):
    records = _charge_and_complete(compose_stack, 5)
    assert {r["substation"] for r in records} <= {"substation-1", "substation-2", "substation-3"}


def test_the_api_wants_a_token_and_a_request_belongs_to_its_client(compose_stack):
    stack = compose_stack
    code, body = stack.charge("EV-no-token", client=None)
    assert code == 401 and body["error"] == "unauthorized", body
    key = f"compose-{uuid.uuid4().hex}"
    code, first = stack.charge("EV-token", key=key)
    assert code == 202, first
    code, again = stack.charge("EV-token", key=key)  # a retry: the same request, not another
    assert code == 202 and again["request_id"] == first["request_id"], again
    # Another gateway worker may answer the GET, and learns of the request from the history
    # stream a moment later: read-your-writes holds within one worker only.
    wait_for(lambda: stack.lookup(first["request_id"])[0] == 200, 10, "the driver sees it")
    # loadgen's token is another client's: the driver's request is none of its business.
    assert stack.lookup(first["request_id"], client="loadgen")[0] == 404
    wait_for(lambda: _completed(stack, first["request_id"]), 60, "the keyed request completed")


def test_prometheus_has_every_target_up(compose_stack: Stack) -> None:
    def all_up() -> dict[str, list[str]] | None:
        targets = compose_stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        jobs: dict[str, list[str]] = {}
        for target in targets:
            jobs.setdefault(target["labels"]["job"], []).append(target["health"])
        if sorted(jobs) != ["balancer", "gateway", "rabbitmq", "rabbitmq-queues", "substations"]:
            return None
        if len(jobs["substations"]) != 3 or any(h != "up" for hs in jobs.values() for h in hs):
            return None
        return jobs

    wait_for(all_up, 90, "every Prometheus target up (3 substations)", interval=2)
    # Without the scale-out profile, the substations' DNS name still resolves: no errors.
    logs = compose_stack.compose.logs("prometheus", tail=500)
    assert "no such host" not in logs and "DNS resolution failed" not in logs, logs


def test_the_loadgen_profile_plays_a_short_scenario_and_loses_nothing(compose_stack):
    result = compose_stack.compose(
        "--profile",
        "loadgen",
        "run",
        "--rm",
        "loadgen",
        "python",
        "-m",
        "loadgen",
        "--rate",
        "4",
        "--duration",
        "6",
        "--expect-complete",
        "--no-progress",
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    # --expect-complete made it exit non-zero otherwise; the report says it too.
    sent = re.search(r"sent (\d+), accepted (\d+), rejected 0, errors 0", result.stdout)
    assert sent and int(sent.group(1)) == int(sent.group(2)) >= 20, result.stdout
    assert f"completed once {sent.group(2)}, completed more than once 0" in result.stdout
    assert "dead-lettered 0, unfinished 0" in result.stdout


def test_dead_letters_are_kept_and_the_tool_reaches_the_broker(compose_stack):
    stack = compose_stack
    stack.management(
        f"exchanges/smartgrid/{contract.REQUESTS_EXCHANGE}/publish",
        method="POST",
        body={
            "properties": {"delivery_mode": 2},
            "routing_key": contract.REQUEST_ROUTING_KEY,
            "payload": "not a charge request",
            "payload_encoding": "string",
        },
    )

    def listed():
        result = stack.compose("--profile", "tools", "run", "--rm", "deadletters", "list", "--json")
        return json.loads(result.stdout)

    letters = wait_for(listed, 60, "the invalid request dead-lettered", interval=3)
    assert len(letters) == 1 and "not a charge request" in letters[0]["body"]


def test_scale_out_brings_five_more_substations_that_take_traffic(compose_stack):
    stack = compose_stack
    _up(stack, "--scale", "substation=5", profiles=("scale-out",))
    replicas = stack.compose.containers("substation")
    assert len(replicas) == 5 and all(c["Health"] == "healthy" for c in replicas), replicas

    def targets_up():
        targets = stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        up = [t for t in targets if t["labels"]["job"] == "substations" and t["health"] == "up"]
        return len(up) == 8

    wait_for(targets_up, 90, "8 substation targets up in Prometheus", interval=2)
    # Enough requests that the balancer, keeping loads even, must use the new ones.
    records = _charge_and_complete(stack, 24)
    used = {r["substation"] for r in records}
    newcomers = used - {"substation-1", "substation-2", "substation-3"}
    assert len(newcomers) == 5, used

    _up(stack, "--scale", "substation=0", profiles=("scale-out",))
    stack.compose("rm", "--force", "--stop", "substation")


def test_down_and_up_again_keeps_the_data(compose_stack):
    stack = compose_stack
    password = stack.secret("rabbitmq-admin-password")
    before_down = time.time()
    time.sleep(6)  # one more scrape, so Prometheus has stored samples up to here
    stack.compose("down", "--timeout", "20")
    assert not stack.compose.containers(all=True)
    _up(stack)

    assert stack.secret("rabbitmq-admin-password") == password
    queue = stack.management(f"queues/smartgrid/{contract.DEAD_LETTER_QUEUE}")
    assert queue["messages"] == 1, queue  # the dead letter of the test above
    query = stack.prometheus(f"/api/v1/query?query=up&time={before_down:.3f}")
    assert query["data"]["result"], "Prometheus lost the samples from before the restart"
    _charge_and_complete(stack, 3)


def test_a_password_changed_in_env_works_after_up(compose_stack):
    stack = compose_stack
    old_admin = stack.secret("rabbitmq-admin-password")
    # Characters that break a URL (/ # ? % @ :), split a URL list (,) or that compose would
    # expand ($) unquoted.
    awkward = "n3w/pa#ss?w%rd@:,$HOME x"
    stack.set_env(GATEWAY_AMQP_PASSWORD=awkward, RABBITMQ_ADMIN_PASSWORD=awkward + "!admin")
    _up(stack)

    assert stack.secret("gateway-amqp-password") == awkward
    assert stack.management("whoami", password=awkward + "!admin")["name"] == "admin"
    with pytest.raises(urllib.error.HTTPError) as refused:
        stack.management("whoami", password=old_admin)
    assert refused.value.code == 401
    _charge_and_complete(stack, 3)
    assert "ACCESS_REFUSED" not in stack.compose.logs("gateway", tail=200)
