"""python -m stack: the whole system as local processes.

``run``: start gateway, balancer and three substations, play the original test scenario with
time compressed (sessions 15 x and polls 2.5 x the arrival interval, as in the original), print
the report with the load spread between substations, stop everything.

``up``: start the same stack and keep it running until Ctrl-C.

Both run the gateway with client tokens (GATEWAY_TOKENS_FILE), kept under ``out/tokens``
(beside the log directory): ``loadgen-token`` for the load run, ``driver-token`` for you.
``--open`` runs the API without tokens.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from loadgen.report import render
from loadgen.run import LoadSettings, run_load
from loadgen.schedules import SEED
from smartgrid.config import DEFAULT_AMQP_URL
from stack.local import StackSettings, start_stack
from stack.processes import ProcessGroup
from stack.tokens import TOKENS_FILE, Client, ensure_tokens, token_path

log = logging.getLogger("stack")


def _capacities(raw: str) -> tuple[int, ...]:
    try:
        found = tuple(int(n) for n in raw.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not whole numbers: {raw!r}") from None
    if any(n < 1 for n in found):
        raise argparse.ArgumentTypeError(f"each substation needs a charging point: {raw!r}")
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stack",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"environment variables:\n  AMQP_URL   the broker (default {DEFAULT_AMQP_URL})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = StackSettings()
    for name, text in (
        ("run", "run the compressed seed scenario and report"),
        ("up", "start and keep running"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--substations", type=int, default=defaults.substations, help="how many substations"
        )
        p.add_argument(
            "--capacity",
            type=int,
            default=defaults.capacity,
            help="charging points per substation",
        )
        p.add_argument("--strategy", default=defaults.strategy, help="BALANCER_STRATEGY")
        p.add_argument("--gateway-port", type=int, default=defaults.gateway_port)
        p.add_argument(
            "--balancer-port",
            type=int,
            default=defaults.balancer_port,
            help="the balancer's /metrics",
        )
        p.add_argument(
            "--substation-port",
            type=int,
            default=defaults.substation_base_port,
            help="the first substation's /metrics (then +1 each)",
        )
        p.add_argument(
            "--log-dir", type=Path, default=defaults.log_dir, help="where each service logs"
        )
        p.add_argument(
            "--open",
            action="store_true",
            help="no client tokens: anyone who reaches the gateway may use the API",
        )
        if name == "run":
            p.add_argument(
                "--time-scale",
                type=float,
                default=0.1,
                help="1.0 plays the scenario in real time (5 minutes)",
            )
            p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        else:
            p.add_argument("--session-seconds", type=float, default=SEED.session_seconds)
            p.add_argument("--poll-interval", type=float, default=SEED.poll_interval)
            p.add_argument(
                "--topology",
                metavar="FILE",
                help="GRID_TOPOLOGY_FILE for every service: the grid's tree of kW limits",
            )
            p.add_argument(
                "--capacities",
                type=_capacities,
                metavar="N,N,...",
                help="charging points of each substation (instead of --capacity)",
            )
            p.add_argument(
                "--simulated-hour",
                type=float,
                default=defaults.simulated_hour_seconds,
                metavar="SECONDS",
                help="SIMULATED_HOUR_SECONDS of the substations (default: real time)",
            )
            p.add_argument(
                "--prometheus-port", type=int, default=9090, help="0: do not start Prometheus"
            )
    return parser


def _tokens_dir(log_dir: Path) -> Path:
    return log_dir.parent / "tokens"


def _settings(
    args: argparse.Namespace, *, session_seconds: float, poll_interval: float
) -> StackSettings:
    tokens_dir = _tokens_dir(args.log_dir)
    return StackSettings(
        tokens_file=None if args.open else tokens_dir / TOKENS_FILE,
        substations=args.substations,
        capacity=args.capacity,
        strategy=args.strategy,
        gateway_port=args.gateway_port,
        balancer_port=args.balancer_port,
        substation_base_port=args.substation_port,
        session_seconds=session_seconds,
        poll_interval=poll_interval,
        log_dir=args.log_dir,
    )


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return stop


def cmd_run(args: argparse.Namespace) -> int:
    scale = args.time_scale
    settings = _settings(
        args, session_seconds=SEED.session_seconds * scale, poll_interval=SEED.poll_interval * scale
    )
    print(
        f"starting {settings.substations} substations ({settings.capacity} points, sessions "
        f"{settings.session_seconds:g}s), "
        f"balancer ({settings.strategy}, polls every {settings.poll_interval:g}s), gateway on "
        f":{settings.gateway_port}; "
        f"logs in {settings.log_dir}/",
        flush=True,
    )
    tokens = _client_tokens(settings)
    group = start_stack(settings)
    try:
        load = LoadSettings(
            gateway_url=settings.gateway_url,
            token=tokens.get("loadgen"),
            amqp_url=settings.amqp_url,
            interval=SEED.interval * scale,
            duration=SEED.duration * scale,
            settle_timeout=settings.session_seconds * 4 + 30,
        )
        print(
            f"seed scenario x{scale:g}: one EV every {load.interval:g}s for {load.duration:g}s...",
            flush=True,
        )
        report = run_load(load).report
    finally:
        statuses = group.stop()
    print(render(report))
    unclean = {name: code for name, code in statuses.items() if code != 0}
    print(
        f"stopped {len(statuses)} processes"
        + (f"; unclean exits: {unclean}" if unclean else " cleanly")
    )
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.every_accepted_completed_once and not unclean else 1


def _client_tokens(settings: StackSettings) -> dict[str, str]:
    """loadgen's and the driver's tokens, kept beside the tokens file (none if open)."""
    if settings.tokens_file is None:
        return {}
    return ensure_tokens(settings.tokens_file.parent, [Client("loadgen"), Client("driver")])


def _start_prometheus(group: ProcessGroup, settings: StackSettings, port: int = 9090) -> None:
    """Add a Prometheus with the project's rules (monitoring/prometheus), if it is installed."""
    if shutil.which("prometheus") is None:
        print("prometheus   not installed (apt-get install prometheus); running without it")
        return
    from stack.prometheus import prometheus_process

    service = group.add(
        prometheus_process(settings, port=port, data_dir=settings.log_dir.parent / "prometheus")
    )
    try:
        service.wait_healthy()
    except (RuntimeError, TimeoutError) as exc:  # optional: the stack runs on without it
        service.stop()
        group.services.remove(service)
        print(f"prometheus   did not start, running without it: {exc}", file=sys.stderr)
        return
    print(f"prometheus   http://127.0.0.1:{port}  (rules and alerts from monitoring/prometheus)")


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(
        args, session_seconds=args.session_seconds, poll_interval=args.poll_interval
    )
    settings.simulated_hour_seconds = args.simulated_hour
    if args.topology:
        settings.extra_env = {**settings.extra_env, "GRID_TOPOLOGY_FILE": args.topology}
    if args.capacities:
        settings.capacities = args.capacities
        settings.substations = len(args.capacities)
    stop = _stop_on_signals()
    group = None
    try:
        _client_tokens(settings)
        group = start_stack(settings)
        print(
            f"gateway      {settings.gateway_url}  (POST /charge, GET and DELETE "
            "/charge/<id>, /health, /metrics, /openapi.json)"
        )
        if settings.tokens_file is not None:
            driver = token_path(settings.tokens_file.parent, "driver")
            print(
                f"token        {driver} (send Authorization: Bearer <it>; clients in "
                f"{settings.tokens_file})\n"
                f'             curl -H "Authorization: Bearer $(cat {driver})" '
                f"-H 'Idempotency-Key: my-first-charge' -H 'Content-Type: application/json' "
                f'-d \'{{"ev_id": "EV1"}}\' {settings.gateway_url}/charge'
            )
        else:
            print("token        none: the API is open (--open)")
        print(f"balancer     http://{settings.host}:{settings.balancer_port}/metrics")
        for i, substation in enumerate(settings.substation_ids()):
            print(f"{substation:<12} http://{settings.host}:{settings.substation_port(i)}/metrics")
        if args.prometheus_port:
            _start_prometheus(group, settings, port=args.prometheus_port)
        print(f"logs in {settings.log_dir}/; Ctrl-C stops everything", flush=True)
        while not stop.is_set():
            dead = group.first_dead()
            if dead is not None:
                print(f"{dead.name} exited unexpectedly:\n{dead.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        if group is None:
            print("interrupted while starting; everything started has been stopped", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if group is not None:
            print("stopping...", flush=True)
            group.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)
    return cmd_run(args) if args.command == "run" else cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
