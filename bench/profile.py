"""Where each process's CPU goes under load: py-spy's samples of every service, summarised.

Starts the throughput benchmark's stack (as ``bench.cpu``), drives it with ``wrk`` (as many
requests as ``--connections`` allow) or loadgen at ``--rate``, and meanwhile samples every
service with py-spy (its worker processes too) for ``--duration`` seconds. Only the thread
holding the GIL is sampled, so a sample is a moment spent running Python (work done outside
the GIL, in C or Rust or the kernel, is not seen: bench.cpu counts it). Prints, per
service, its samples by role (bench/profile_roles.py: the history stream, the HTTP layer,
pika's frames...) and the functions holding the largest share of its samples, counted
inclusively (a function and everything it called) and by itself; the raw collapsed stacks
are kept in ``--out`` for a flame graph (``flamegraph.pl`` or speedscope read them).

    .venv/bin/python -m bench.profile --client wrk [--duration 20] [--top 25]
    .venv/bin/python -m bench.profile --client loadgen --rate 200
    .venv/bin/python -m bench.profile --client wrk --rev main   # the services of a revision

py-spy comes with the ``bench`` extra (``pip install -e '.[bench]'``) and needs ptrace (root,
or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    GATEWAY_SERVERS,
    bench_settings,
    markdown_table,
    private_vhost,
    source_tree,
)
from bench.cpu import _drive
from bench.profile_roles import by_role_of_file
from bench.throughput import CAPACITY, SESSION_SECONDS
from stack.local import start_stack


def py_spy() -> str | None:
    """py-spy of this venv (the bench extra), or one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def sample(pid: int, duration: float, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            py_spy() or "py-spy",
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            # Only the thread holding the GIL: py-spy's guess at idle threads counts threads
            # waiting on a lock or in poll() as busy here.
            "--gil",
            "--format",
            "raw",
            "--rate",
            "100",
            "--duration",
            f"{duration:.0f}",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _function(frame: str) -> str:
    """``name (path/to/module.py:123)`` as ``module.py:name``, the line dropped."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{short}:{name}"


def summarise(collapsed: Path, top: int) -> tuple[int, list[list[object]]]:
    """Samples in all, and the ``top`` functions by inclusive share, with their own share."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # The first frame names the process and thread (py-spy's --subprocesses); skip them.
        frames = [_function(f) for f in stack.split(";") if " (" in f]
        total += count
        for function in set(frames):
            inclusive[function] += count
        if frames:
            own[frames[-1]] += count
    rows: list[list[object]] = [
        [function, f"{n / total:.1%}", f"{own[function] / total:.1%}"]
        for function, n in inclusive.most_common(top)
    ]
    return total, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--client", choices=("loadgen", "wrk"), default="wrk")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s sent by loadgen")
    parser.add_argument("--connections", type=int, default=64, help="wrk's connections")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25, help="functions shown per service")
    parser.add_argument(
        "--session-seconds",
        type=float,
        default=SESSION_SECONDS,
        help=f"each session's length (default {SESSION_SECONDS:g}), as bench.cpu's",
    )
    parser.add_argument("--server", choices=sorted(GATEWAY_SERVERS), default="granian")
    parser.add_argument("--out", type=Path, default=None, help="where the raw stacks go")
    parser.add_argument(
        "--rev", default="", help="a git revision to run the services from (default: this checkout)"
    )
    args = parser.parse_args()
    if py_spy() is None:
        parser.error("py-spy is not installed (pip install -e '.[bench]')")
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("wrk is not installed (make bench-tools)")
    out = args.out or Path(tempfile.mkdtemp(prefix="smartgrid-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    extra_env = source_tree(args.rev)[1] if args.rev else {}
    with private_vhost("bench-profile") as url:
        settings = bench_settings(
            url,
            out / "logs",
            capacity=CAPACITY,
            session_seconds=args.session_seconds,
            poll_interval=1.0,
            gateway_module=GATEWAY_SERVERS[args.server],
            extra_env=extra_env,
        )
        group = start_stack(settings)
        try:
            time.sleep(2)
            samplers = {
                service.name: sample(service.pid, args.duration, out / f"{service.name}.txt")
                for service in group.services
            }
            accepted = _drive(
                args.client,
                settings.gateway_url,
                args.rate,
                args.duration + 1,
                args.connections,
                out,
            )
            for sampler in samplers.values():
                sampler.wait(timeout=60)
        finally:
            group.stop()
    print(f"{accepted:,} requests accepted; raw stacks in {out}")
    for name in samplers:
        path = out / f"{name}.txt"
        if not path.exists():
            print(f"\n{name}: no samples (py-spy failed)")
            continue
        total, rows = summarise(path, args.top)
        print(f"\n{name}: {total:,} samples\n")
        for role, share in by_role_of_file(name, path):
            print(f"- {role}: {share:.1%}")
        print()
        print(markdown_table(["function", "inclusive", "own"], rows))


if __name__ == "__main__":
    main()
