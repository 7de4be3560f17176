"""The benchmarks' helpers: each stack on ports of its own; bench.history_read on the broker."""

from __future__ import annotations

import socket
from pathlib import Path

from bench import accept_cpu, history_read
from bench.common import PORT_BLOCK, bench_settings, free_port_block, source_tree


def test_each_benchmark_stack_gets_a_block_of_ports_free_when_chosen():
    """Two benchmarks side by side (several sessions share the machine) must not share ports."""
    first = free_port_block()
    held = []
    try:
        for port in range(first, first + PORT_BLOCK):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", port))  # every port of the block was free
        second = free_port_block()
        assert not set(range(first, first + PORT_BLOCK)) & set(range(second, second + PORT_BLOCK))
    finally:
        for sock in held:
            sock.close()


def test_the_stack_settings_take_their_ports_from_one_block():
    settings = bench_settings("amqp://guest:guest@127.0.0.1/x", Path("/tmp"), substations=5)
    ports = {settings.gateway_port, settings.balancer_port}
    ports |= {settings.substation_port(index) for index in range(5)}
    assert len(ports) == 7
    assert max(ports) - min(ports) < PORT_BLOCK


def test_the_history_read_benchmark_replays_every_request_it_filled_the_stream_with(amqp_url):
    made = history_read.fill(amqp_url, 30, batch=7)
    messages = 30 + 3 * 5  # the requests, and each kind of event in batches of 7
    result = history_read.read(amqp_url, made, messages)  # exits unless it holds all 30
    assert result["cpu_us_per_request"] > 0


def test_the_accept_benchmark_has_every_request_confirmed(amqp_url):
    result = accept_cpu.accept_many(amqp_url, requests=40, threads=4)
    assert result["outcomes"] == ["confirmed"]
    assert result["cpu_us_per_request"] > 0


def test_a_revision_can_carry_settings_for_its_own_services():
    label, env = source_tree("HEAD:BALANCER_STRATEGY=corrected-min:X=a=b")
    assert env["BALANCER_STRATEGY"] == "corrected-min"
    assert env["X"] == "a=b"
    assert (Path(env["PYTHONPATH"]) / "bench" / "common.py").is_file()
    assert label.endswith(" BALANCER_STRATEGY=corrected-min X=a=b")
    assert "BALANCER_STRATEGY" not in source_tree("HEAD")[1]
