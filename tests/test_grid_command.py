"""python -m smartgrid.grid, the operator's command, as a real process against the real broker:
it checks the topology file, and a limit change is a persistent, well-formed grid.limit message
in the durable stream every balancer replays, confirmed before the command says so."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from smartgrid import contract
from smartgrid.limits import LimitOverride, override_from_event

TOPOLOGY = """
[[node]]
id = "site"
limit_kw = 400

[[node]]
id = "feeder-a"
parent = "site"
limit_kw = 150

[[node]]
id = "s1"
parent = "feeder-a"
limit_kw = 60
"""


@pytest.fixture
def topology(tmp_path: Path) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(TOPOLOGY)
    return path


def grid(
    *args: str, url: str = "amqp://guest:guest@127.0.0.1:1/%2F"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smartgrid.grid", "--amqp-url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_limits(url: str, expected: int, timeout: float = 15) -> list:
    """Every message of the limits stream from its start, as a balancer replays it."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        declared = channel.queue_declare(contract.GRID_LIMITS_STREAM, passive=True)
        assert declared.method.queue == contract.GRID_LIMITS_STREAM
        channel.basic_qos(prefetch_count=100)  # a stream consumer needs a prefetch
        found = []
        deadline = time.monotonic() + timeout
        for method, properties, body in channel.consume(
            contract.GRID_LIMITS_STREAM,
            arguments={"x-stream-offset": "first"},
            inactivity_timeout=0.5,
        ):
            if method is not None:
                found.append((method.routing_key, properties, body))
                channel.basic_ack(method.delivery_tag)
            if len(found) >= expected or time.monotonic() > deadline:
                break
        channel.cancel()
        return found
    finally:
        connection.close()


def test_help_says_what_it_does():
    result = grid("--help")
    assert result.returncode == 0
    for word in ("check", "set", "clear", "GRID_TOPOLOGY_FILE", "AMQP_URL", "--for"):
        assert word in result.stdout


def test_check_prints_the_tree_of_a_good_file(topology: Path):
    result = grid("--topology", str(topology), "check")
    assert result.returncode == 0, result.stderr
    assert "3 node(s), no problems" in result.stdout
    assert "site  400 kW\n  feeder-a  150 kW\n    s1  60 kW" in result.stdout


def test_every_problem_of_a_bad_file_is_reported_and_nothing_is_published(
    tmp_path: Path, amqp_url: str
):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[node]]\nid = "a"\nparent = "b"\nlimit_kw = 10\n\n'
        '[[node]]\nid = "b"\nparent = "a"\nlimit_kw = -1\n\n'
        '[[node]]\nid = "c"\nparent = "nowhere"\nlimit_kw = 5\ncolour = "red"\n'
    )
    for args in (("check",), ("set", "a", "5")):
        result = grid("--topology", str(bad), *args, url=amqp_url)
        assert result.returncode == 2
        assert "limit_kw" in result.stderr and "colour" in result.stderr
        assert "'nowhere' is not defined" in result.stderr
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # never declared: 404
            connection.channel().queue_declare(contract.GRID_LIMITS_STREAM, passive=True)
    finally:
        connection.close()


def test_a_limit_change_is_a_durable_well_formed_message_confirmed_by_the_broker(
    topology: Path, amqp_url: str
):
    before = time.time()
    result = grid(
        "--topology", str(topology), "set", "feeder-a", "80", "--for", "900", url=amqp_url
    )
    assert result.returncode == 0, result.stderr
    assert "feeder-a: 80 kW until" in result.stdout and "confirmed" in result.stdout
    cleared = grid("--topology", str(topology), "clear", "feeder-a", url=amqp_url)
    assert cleared.returncode == 0, cleared.stderr

    (key, properties, body), (_, _, clear_body) = read_limits(amqp_url, expected=2)
    assert key == contract.GridLimit.kind
    assert properties.delivery_mode == 2  # persistent, in a stream (always on disk)
    event = contract.decode_event(key, body)
    assert isinstance(event, contract.GridLimit)
    override = override_from_event(event)
    assert override.node == "feeder-a" and override.limit_w == 80_000
    assert before <= override.issued_at <= time.time()
    assert override.valid_until == pytest.approx(override.issued_at + 900)
    assert event.issued_by and "@" in event.issued_by
    clear_event = contract.decode_event(key, clear_body)
    assert isinstance(clear_event, contract.GridLimit)
    cleared_override = override_from_event(clear_event)
    assert cleared_override == LimitOverride("feeder-a", None, cleared_override.issued_at, None)
    assert cleared_override.issued_at >= override.issued_at


def test_the_limits_stream_is_durable_and_bound_to_the_limit_kind(topology: Path, amqp_url: str):
    assert grid("set", "s9", "5", url=amqp_url).returncode == 0  # no topology: any node
    (stream,) = [
        d
        for d in contract.power_topology()
        if isinstance(d, contract.Queue) and d.name == contract.GRID_LIMITS_STREAM
    ]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        # Redeclaring with the contract's arguments succeeds only if it exists with exactly
        # those (a durable stream); anything else is PRECONDITION_FAILED.
        connection.channel().queue_declare(stream.name, durable=True, arguments=stream.arguments)
    finally:
        connection.close()
    assert len(read_limits(amqp_url, expected=1)) == 1


def test_a_node_the_file_does_not_name_needs_unlisted(topology: Path, amqp_url: str):
    refused = grid("--topology", str(topology), "set", "s7", "20", url=amqp_url)
    assert refused.returncode == 2 and "names no node 's7'" in refused.stderr
    allowed = grid("--topology", str(topology), "set", "s7", "20", "--unlisted", url=amqp_url)
    assert allowed.returncode == 0, allowed.stderr


def test_raising_a_node_above_its_rating_is_published_with_a_note(topology: Path, amqp_url: str):
    result = grid("--topology", str(topology), "set", "s1", "100", url=amqp_url)
    assert result.returncode == 0
    assert "rating in the file is 60 kW" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("set", "feeder-a", "0"),
        ("set", "feeder-a", "-3"),
        ("set", "feeder-a", "lots"),
        ("set", "feeder-a", "inf"),
        ("set", "feeder-a", "5", "--for", "0"),
        ("set", "bad.id", "5"),
        ("clear",),
    ],
)
def test_bad_arguments_are_a_usage_error(args: tuple[str, ...]):
    result = grid(*args)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_an_unreachable_broker_is_exit_1_with_a_reason():
    result = grid("--timeout", "1", "set", "feeder-a", "5")
    assert result.returncode == 1
    assert "did not confirm" in result.stderr
    shown = grid("--timeout", "1", "show")
    assert shown.returncode == 1 and "could not read the limits" in shown.stderr


def test_show_prints_the_overrides_in_force_from_the_stream(topology: Path, amqp_url: str):
    """Replayed as a balancer does: the latest override of each node, expired and cleared ones
    left out, the lower of rating and override in force, a node the file does not name last."""
    changes = [
        ("set", "feeder-a", "100", "--for", "900"),
        ("set", "s1", "30"),
        ("clear", "s1"),
        ("set", "site", "350"),
        ("set", "site", "300", "--for", "0.5"),  # newer than 350, and soon over: none in force
        ("set", "s7", "20", "--unlisted"),
        ("set", "feeder-a", "200"),  # above its rating: in force is still the rating
        ("set", "feeder-a", "90", "--for", "900"),
    ]
    for change in changes:
        result = grid("--topology", str(topology), *change, url=amqp_url)
        assert result.returncode == 0, result.stderr
    time.sleep(0.6)

    shown = grid("--topology", str(topology), "show", "--json", url=amqp_url)
    assert shown.returncode == 0, shown.stderr
    rows = {row["node"]: row for row in json.loads(shown.stdout)["nodes"]}
    assert list(rows) == ["site", "feeder-a", "s1", "s7"]
    assert (rows["site"]["override_kw"], rows["site"]["in_force_kw"]) == (None, 400)
    assert (rows["feeder-a"]["override_kw"], rows["feeder-a"]["in_force_kw"]) == (90, 90)
    assert rows["feeder-a"]["until"] == pytest.approx(rows["feeder-a"]["issued_at"] + 900)
    assert "@" in rows["feeder-a"]["issued_by"]
    assert (rows["s1"]["override_kw"], rows["s1"]["in_force_kw"]) == (None, 60)
    assert (rows["s7"]["rating_kw"], rows["s7"]["in_force_kw"]) == (None, 20)

    text = grid("--topology", str(topology), "show", url=amqp_url)
    assert text.returncode == 0, text.stderr
    assert "2 override(s) in force" in text.stdout
    lines = text.stdout.splitlines()
    assert any(
        line.startswith("  feeder-a  90 kW  (override 90 kW until ") and "rating 150 kW" in line
        for line in lines
    ), text.stdout
    assert "    s1  60 kW" in lines and "site  400 kW" in lines


def test_show_on_a_broker_no_limit_was_ever_set_on(amqp_url: str):
    result = grid("show", url=amqp_url)
    assert result.returncode == 0, result.stderr
    assert "0 override(s) in force" in result.stdout
