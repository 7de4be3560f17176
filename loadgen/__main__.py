"""python -m loadgen: drive EV charging requests through the gateway and report the balance."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from loadgen.report import render
from loadgen.run import SEED_SCENARIO, LoadSettings, run_load
from loadgen.traffic import GatewayUnreachable

EXIT_UNREACHABLE = 3
EXIT_INCOMPLETE = 4


def _positive(kind):
    def parse(raw: str):
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen",
        description="Send EV charging requests to the gateway at a set rate, follow them to the "
        "end of their sessions, and report acceptance, latency and how evenly load was spread.",
        epilog="environment variables:\n"
        "  GATEWAY_URL   default for --url (http://localhost:8000)\n"
        "  AMQP_URL      default for --amqp-url (the broker whose lifecycle events are followed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://localhost:8000"), help="gateway base URL")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F"),
        help="broker to follow lifecycle events on (for fates, waits and load spread)",
    )
    parser.add_argument("--no-observe", action="store_true", help="do not follow events; report HTTP answers only")
    parser.add_argument("--scenario", choices=["seed"], help="seed: one EV every 2 s for 5 min (the original test)")
    parser.add_argument("--time-scale", type=_positive(float), default=1.0, help="multiply every interval and duration (0.1: ten times faster)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=_positive(float), help="requests per second")
    rate.add_argument("--interval", type=_positive(float), help="seconds between requests")
    parser.add_argument("--arrivals", choices=["constant", "poisson"], default="constant", help="arrival pattern")
    parser.add_argument("--duration", type=_positive(float), help="stop sending after this many seconds")
    parser.add_argument("--count", type=_positive(int), help="stop after this many requests")
    parser.add_argument("--concurrency", type=_positive(int), default=256, help="most requests in flight at once")
    parser.add_argument("--timeout", type=_positive(float), default=10.0, help="HTTP timeout per request")
    parser.add_argument("--settle-timeout", type=_positive(float), default=120.0, help="how long to wait for accepted requests to complete")
    parser.add_argument("--sample-interval", type=_positive(float), default=0.1, help="load spread sampling interval (seconds)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (poisson arrivals)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--expect-complete", action="store_true", help=f"exit {EXIT_INCOMPLETE} unless every accepted request completed exactly once")
    return parser


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    interval = 1.0
    duration = args.duration
    if args.scenario == "seed":
        interval = SEED_SCENARIO["interval"]
        duration = duration or SEED_SCENARIO["duration"]
    if args.rate:
        interval = 1 / args.rate
    elif args.interval:
        interval = args.interval
    if duration is None and args.count is None:
        duration = 60.0
    scale = args.time_scale
    return LoadSettings(
        gateway_url=args.url,
        amqp_url=None if args.no_observe else args.amqp_url,
        interval=interval * scale,
        arrivals=args.arrivals,
        duration=duration * scale if duration is not None else None,
        count=args.count,
        concurrency=args.concurrency,
        timeout=args.timeout,
        settle_timeout=args.settle_timeout,
        sample_interval=args.sample_interval,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)
    settings = settings_from_args(args)
    try:
        report = run_load(settings).report
    except GatewayUnreachable as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ConnectionError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(render(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_json(), handle, indent=2)
    if args.expect_complete and not report.every_accepted_completed_once:
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
