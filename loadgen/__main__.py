"""python -m loadgen: drive EV charging requests through the gateway and report the balance."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from loadgen.observer import ObserverConfig
from loadgen.report import render
from loadgen.run import LoadSettings, run_load
from loadgen.schedules import (
    DEFAULT_PROFILE_DURATION,
    DEFAULT_PROFILE_RATE,
    PROFILES,
    SEED,
    SPIKE_FACTOR,
    named_profile,
)
from loadgen.traffic import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    GatewayUnreachable,
    TokenRefused,
    token_from_env,
)
from smartgrid.config import ConfigError, amqp_url_from_env, from_env

EXIT_UNREACHABLE = 3
EXIT_INCOMPLETE = 4
EXIT_OUTPUT = 5
EXIT_UNAUTHORIZED = 6
EXIT_INTERRUPTED = 130
DEFAULT_DURATION = 60.0
DEFAULT_GIVE_UP_AFTER = 10.0

EPILOG = f"""\
arrival patterns (one of):
  --rate R / --interval S      constant rate (--arrivals poisson: Poisson at that mean rate)
  --burst N --burst-every T    N requests at once every T seconds
  --profile seed               one every 2 s for 300 s, the original test (--scenario seed)
  --profile rush-hour          off-peak (1/5 of the peak) ramping up to the peak over the
                               first quarter, holding for half, ramping down; --rate is the
                               peak (default {DEFAULT_PROFILE_RATE["rush-hour"]:g}/s)
  --profile spike              a steady --rate (default {DEFAULT_PROFILE_RATE["spike"]:g}/s) with
                               --spike-factor times that rate for 5% of the duration,
                               half-way through
  Profiles last --duration (default {DEFAULT_PROFILE_DURATION:g} s); --time-scale compresses every
  interval and duration (0.1: ten times faster, ten times the rate).

exit status:
  0    the run finished (whatever the answers: they are in the report)
  2    bad arguments
  3    the gateway is unreachable at the start, or went away mid-run (after the report),
       or the broker is unreachable when following events
  4    with --expect-complete: not every accepted request completed exactly once
  5    the report could not be written to --json's or --plot's file
  6    the gateway refused loadgen's client token, or wants one (401)
  130  interrupted (Ctrl-C stops sending and waiting, and still reports)

environment variables:
  GATEWAY_URL   default for --url (http://localhost:8000)
  {TOKEN_ENV}  the client token sent as Authorization: Bearer (gateways with
                GATEWAY_TOKENS_FILE); every request also carries an Idempotency-Key
  {TOKEN_FILE_ENV}  a file holding it (docker compose keeps one in its secrets)
  AMQP_URL      default for --amqp-url (the broker whose lifecycle events are followed)
  AMQP_PASSWORD_FILE  a file holding its password (quoted into AMQP_URL)
  DECLARE_TOPOLOGY, EVENT_SENDERS   as for the services (see python -m balancer --help)
"""


def _positive(kind):
    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
        return value

    return parse


def _non_negative(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {raw}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen",
        description="Send EV charging requests to the gateway on a schedule, follow them to the "
        "end of their sessions, and report acceptance, latency and how evenly load was spread.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("GATEWAY_URL", "http://localhost:8000"),
        help="gateway base URL",
    )
    parser.add_argument(
        "--amqp-url",
        default=amqp_url_from_env(),
        help="broker to follow lifecycle events on (for fates, waits and load spread)",
    )
    parser.add_argument(
        "--no-observe", action="store_true", help="do not follow events; report HTTP answers only"
    )

    pattern = parser.add_argument_group("arrival pattern")
    pattern.add_argument("--profile", choices=PROFILES, help="a named load profile (see below)")
    pattern.add_argument("--scenario", choices=["seed"], help="same as --profile seed")
    rate = pattern.add_mutually_exclusive_group()
    rate.add_argument(
        "--rate", type=_positive(float), help="requests per second (a profile's peak or base rate)"
    )
    rate.add_argument("--interval", type=_positive(float), help="seconds between requests")
    pattern.add_argument(
        "--arrivals",
        choices=["constant", "poisson"],
        default="constant",
        help="evenly spaced or Poisson arrivals (default constant)",
    )
    pattern.add_argument(
        "--burst", type=_positive(int), metavar="N", help="send N requests at once..."
    )
    pattern.add_argument(
        "--burst-every", type=_positive(float), metavar="T", help="...every T seconds (default 10)"
    )
    pattern.add_argument(
        "--spike-factor",
        type=_positive(float),
        help=f"--profile spike: how many times the base rate (default {SPIKE_FACTOR:g})",
    )
    pattern.add_argument(
        "--time-scale",
        type=_positive(float),
        default=1.0,
        help="multiply every interval and duration (0.1: ten times faster)",
    )
    pattern.add_argument(
        "--seed", type=int, default=1, help="random seed (Poisson arrivals), for reproducible runs"
    )

    power = parser.add_argument_group("power (issue 15)")
    power.add_argument(
        "--ev-mix",
        action="store_true",
        help="send the EV mix (car power 3.7-150 kW, energy 5-80 kWh, priorities), arriving "
        "like a day compressed by --simulated-hour, with --rate as the peak; report kW per "
        "substation and grid node against their limits, energy, pauses, waits per class and "
        "fairness",
    )
    power.add_argument(
        "--simulated-hour",
        type=_positive(float),
        default=float(os.environ.get("SIMULATED_HOUR_SECONDS", "3600") or 3600),
        metavar="SECONDS",
        help="real seconds per simulated hour, as the substations' SIMULATED_HOUR_SECONDS "
        "(default: that variable, else 3600)",
    )
    power.add_argument(
        "--topology",
        default=os.environ.get("GRID_TOPOLOGY_FILE") or None,
        metavar="FILE",
        help="the grid topology file, for power per grid node against its limit (default "
        "GRID_TOPOLOGY_FILE)",
    )

    stop = parser.add_argument_group("how long, how much")
    stop.add_argument(
        "--duration",
        type=_positive(float),
        help=f"stop sending after this many seconds (default {DEFAULT_DURATION:g}, profiles "
        f"{DEFAULT_PROFILE_DURATION:g})",
    )
    stop.add_argument("--count", type=_positive(int), help="stop after this many requests")
    stop.add_argument(
        "--ev-prefix",
        default="EV",
        help="EV ids are this and a number (default EV); one EV has one active request at a "
        "time, so a run overlapping an earlier one's sessions wants another prefix",
    )
    stop.add_argument(
        "--concurrency", type=_positive(int), default=256, help="most requests in flight at once"
    )
    stop.add_argument(
        "--timeout", type=_positive(float), default=10.0, help="HTTP timeout per request (seconds)"
    )
    stop.add_argument(
        "--settle-timeout",
        type=_positive(float),
        default=120.0,
        help="how long to wait for accepted requests to complete",
    )
    stop.add_argument(
        "--give-up-after",
        type=_non_negative,
        default=DEFAULT_GIVE_UP_AFTER,
        help="stop sending once the gateway has refused connections for this many seconds "
        f"(default {DEFAULT_GIVE_UP_AFTER:g}; 0: never)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--sample-interval",
        type=_positive(float),
        default=0.1,
        help="load spread sampling interval (seconds)",
    )
    out.add_argument(
        "--no-progress",
        action="store_true",
        help="no live view (also when stdout is not a terminal)",
    )
    out.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    out.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw load per substation and the spread over time (PNG)",
    )
    out.add_argument(
        "--expect-complete",
        action="store_true",
        help=f"exit {EXIT_INCOMPLETE} unless every accepted request completed exactly once",
    )
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The profile asked for (``--scenario`` is an alias), after the combinations are checked."""
    if args.scenario and args.profile and args.scenario != args.profile:
        parser.error(
            f"--scenario {args.scenario} and --profile {args.profile} contradict each other"
        )
    profile = args.profile or args.scenario
    if args.burst_every is not None and args.burst is None:
        parser.error("--burst-every needs --burst")
    if args.burst is not None:
        clashes = [
            flag
            for flag, given in (
                ("--profile/--scenario", profile),
                ("--rate", args.rate),
                ("--interval", args.interval),
                ("--arrivals poisson", args.arrivals == "poisson"),
            )
            if given
        ]
        if clashes:
            parser.error(f"--burst cannot be combined with {', '.join(clashes)}")
    if args.spike_factor is not None and profile != "spike":
        parser.error("--spike-factor only applies to --profile spike")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a directory")
    if args.plot and os.path.isdir(args.plot):
        parser.error(f"--plot {args.plot} is a directory")
    return profile


def _scenario_name(args: argparse.Namespace, profile: str | None, settings: LoadSettings) -> str:
    """What was asked for, in the terms it was asked (before the time scale)."""
    scale = args.time_scale
    limits = []
    if settings.duration is not None:
        limits.append(f"for {settings.duration / scale:g} s")
    if args.count is not None:
        limits.append(f"up to {args.count} requests")
    extra = (" " + ", ".join(limits) if limits else "") + (
        ", poisson" if args.arrivals == "poisson" else ""
    )
    extra += f", time x{scale:g}" if scale != 1 else ""
    rate = args.rate or (1 / args.interval if args.interval else None)
    if args.burst:
        return f"bursts of {args.burst} every {args.burst_every or 10:g} s{extra}"
    if profile == "seed":
        return f"seed: one every {settings.interval / scale:g} s{extra}"
    if profile == "rush-hour":
        return f"rush-hour: peak {rate or DEFAULT_PROFILE_RATE['rush-hour']:g}/s{extra}"
    if profile == "spike":
        factor = args.spike_factor or SPIKE_FACTOR
        return f"spike: {rate or DEFAULT_PROFILE_RATE['spike']:g}/s with a {factor:g}x spike{extra}"
    return f"{scale / settings.interval:g}/s{extra}"


def settings_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
) -> LoadSettings:
    profile = _check(parser or build_parser(), args)
    observer_settings = from_env(ObserverConfig)
    scale = args.time_scale
    interval = 1.0
    duration = args.duration
    rate_profile = None
    if profile == "seed":
        interval = SEED.interval
        duration = duration or SEED.duration
    elif profile in ("rush-hour", "spike"):
        duration = duration or DEFAULT_PROFILE_DURATION
        rate = args.rate or (1 / args.interval if args.interval else None)
        rate_profile = named_profile(
            profile, rate=rate, duration=duration, spike_factor=args.spike_factor or SPIKE_FACTOR
        ).scaled(scale)
    if args.rate:
        interval = 1 / args.rate
    elif args.interval:
        interval = args.interval
    if duration is None and args.count is None:
        duration = DEFAULT_DURATION
    burst_every = (args.burst_every or 10.0) * scale if args.burst else None
    settings = LoadSettings(
        gateway_url=args.url,
        token=token_from_env(),
        ev_prefix=args.ev_prefix,
        amqp_url=None if args.no_observe else args.amqp_url,
        declare_topology=observer_settings.declare_topology,
        event_senders=observer_settings.event_senders,
        interval=interval * scale,
        arrivals=args.arrivals,
        duration=duration * scale if duration is not None else None,
        count=args.count,
        concurrency=args.concurrency,
        timeout=args.timeout,
        settle_timeout=args.settle_timeout,
        sample_interval=args.sample_interval,
        seed=args.seed,
        burst=args.burst,
        burst_every=burst_every,
        profile=rate_profile,
        live=not args.no_progress and sys.stdout.isatty(),
        give_up_after=args.give_up_after or None,
        interruptible=True,
        ev_mix=args.ev_mix,
        hour_seconds=args.simulated_hour,
        topology_file=args.topology,
    )
    settings.scenario = _scenario_name(args, profile, settings)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pika logs every failed reconnect attempt as half a dozen ERROR lines, some with a
    # traceback; the Link says what matters (lost, retrying, back) in one line each.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        settings = settings_from_args(args, parser)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        result = run_load(settings)
    except TokenRefused as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return EXIT_UNAUTHORIZED
    except GatewayUnreachable as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ConnectionError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("loadgen: interrupted before anything was sent", file=sys.stderr)
        return EXIT_INTERRUPTED
    report = result.report
    if sys.stdout.isatty():
        from rich.console import Console

        from loadgen.summary import summary

        Console().print(summary(report))
    else:
        print(render(report), flush=True)
    if result.power is not None:
        from loadgen.power import render_power

        print(render_power(result.power), flush=True)
    try:
        if args.json:
            document = report.to_json()
            if result.power is not None:
                document["power"] = result.power.to_json()
            with open(args.json, "w") as handle:
                json.dump(document, handle, indent=2)
        if args.plot:
            from loadgen.plot import write_plot

            write_plot(report, result.timeline, args.plot)
            if result.power is not None:
                from loadgen.plot import power_plot_path, write_power_plot

                write_power_plot(result.power, power_plot_path(args.plot), report.scenario)
    except OSError as exc:
        print(
            f"loadgen: cannot write {exc.filename or 'the output'}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_OUTPUT
    if report.stopped_early == "interrupted":
        return EXIT_INTERRUPTED
    if report.stopped_early:
        print(f"loadgen: stopped early: {report.stopped_early}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.expect_complete and not report.every_accepted_completed_once:
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
