"""What every benchmark needs: a private vhost, the stack on it, readings of its metrics."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import timeit
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from smartgrid.config import DEFAULT_AMQP_URL
from stack.local import StackSettings

ROOT = Path(__file__).resolve().parent.parent
#: The HTTP servers a benchmark can put the gateway under: the module each runs as.
GATEWAY_SERVERS = {"granian": "gateway", "gunicorn": "bench.gunicorn_gateway"}
RESULTS = ROOT / "docs" / "bench"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def private_vhost(prefix: str = "bench") -> Iterator[str]:
    """A fresh vhost on the broker of AMQP_URL (default: the local one); its URL."""
    base = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL).split(",")[0]
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{base.rpartition('/')[0]}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


#: A benchmark's stack takes a block of this many ports (the gateway's, the balancer's, then the
#: substations'), chosen free below the kernel's ephemeral range, so that benchmarks run side
#: by side on one machine (several sessions share it) do not collide, or worse, serve each
#: other's clients: on fixed ports a second run's services failed to start ("Address already
#: in use") and its wrk measured the first run's gateway.
PORT_BLOCK = 32
_PORT_RANGE = (10_000, 30_000)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(width: int = PORT_BLOCK) -> int:
    """The first of ``width`` consecutive ports that are free now."""
    for _ in range(200):
        base = random.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - width)
        if all(_port_free(port) for port in range(base, base + width)):
            return base
    raise RuntimeError(f"no {width} consecutive free ports in {_PORT_RANGE}")


def bench_settings(amqp_url: str, log_dir: Path, **overrides) -> StackSettings:
    """Stack settings on a block of free ports (:func:`free_port_block`), logging only
    warnings."""
    base = free_port_block()
    settings = StackSettings(
        amqp_url=amqp_url,
        gateway_port=base,
        balancer_port=base + 1,
        substation_base_port=base + 2,
        log_dir=log_dir,
        log_level="WARNING",
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def source_tree(revision: str) -> tuple[str, dict[str, str]]:
    """The source of ``revision`` (any git revision of this repository), exported to a fresh
    directory; its label (the revision and its short hash) and the variables under which a
    service's ``python -m`` imports the project from that directory rather than from this
    checkout (PYTHONSAFEPATH: the working directory would come first otherwise). What the venv
    has installed (the libraries) is shared: a comparison of revisions measures the project's
    own code, on the same stack, in the same run.

    ``revision:NAME=VALUE[:NAME=VALUE...]`` also sets those variables for that revision's
    services alone: a revision older than a setting the stack now gives every service (e.g.
    ``aeffa06:BALANCER_STRATEGY=corrected-min``, from before power-min) refuses it otherwise.
    """
    revision, *settings = revision.split(":")
    variables = dict(setting.split("=", 1) for setting in settings)
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    directory = Path(tempfile.mkdtemp(prefix=f"smartgrid-{short}-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", short],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    label = " ".join([revision if revision == short else f"{revision} ({short})", *settings])
    return label, {"PYTHONPATH": str(directory), "PYTHONSAFEPATH": "1", **variables}


def measure_in_child(script: str, env: dict[str, str] | None, *args: str) -> dict:
    """Run ``script --measure *args`` in a child process, with ``env`` from
    :func:`source_tree` (another revision's code; None: this checkout's), and return the JSON
    object it prints: a micro-benchmark's measurement of one revision, in a process of its own."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(script), "--measure", *args],
        env={**os.environ, **env} if env else None,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def best_in_children(script: str, revs: str, counts: str, repeat: int, *args: str) -> list[dict]:
    """A micro-benchmark's driver: for each count of ``counts`` (comma-separated, passed as
    the child's ``--measure``) and each revision of ``revs`` (comma-separated; none: this
    checkout), ``repeat`` runs of :func:`measure_in_child` with ``args``, and the best (least)
    of each figure, with the side's ``revision`` label and ``running``, the count."""
    sides = [source_tree(rev) for rev in revs.split(",") if rev] or [("this checkout", {})]
    results = []
    for running in [int(n) for n in counts.split(",")]:
        for label, env in sides:
            runs = [measure_in_child(script, env, str(running), *args) for _ in range(repeat)]
            best = {key: min(r[key] for r in runs) for key in runs[0]}
            results.append({"revision": label, "running": running, **best})
    return results


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def histogram_quantile(samples: dict, name: str, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a histogram (all label sets summed)."""
    buckets: dict[float, float] = {}
    for (n, labels), v in samples.items():
        if n == f"{name}_bucket":
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    if not buckets:
        return None
    ordered = sorted(buckets.items())
    count = ordered[-1][1]
    if count == 0:
        return None
    for le, cumulative in ordered:
        if cumulative >= q * count:
            return le
    return ordered[-1][0]


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python_loop_ms": python_loop_ms(),
    }


def python_loop_ms() -> float:
    """Milliseconds for ``sum(range(10**6))``, best of five: how fast this machine ran Python.

    The same kind of machine is not always as fast (the development machine took from 17 to
    30 ms within one hour), and every figure here is CPU-bound: a result is only comparable
    with one taken at a similar speed.
    """
    return round(min(timeit.repeat("sum(range(1_000_000))", number=3, repeat=5)) / 3 * 1000, 1)


def save(name: str, document: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **document}, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
