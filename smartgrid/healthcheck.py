"""python -m smartgrid.healthcheck URL [--metric NAME]: exit 0 if the service is healthy.

The container images have no curl; docker compose healthchecks call this instead. With
``--metric`` the URL is a /metrics page and the named gauge must read 1 (for
example ``substation_broker_connected``), so "healthy" means "connected to the broker"; each
``--metric`` given must (the balancer: connected, and polling its substations on schedule).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def gauge_reads_one(page: str, name: str) -> bool:
    """Whether the metrics ``page`` has a sample of ``name`` (any labels) equal to 1."""
    return any(
        line.startswith(name)
        and line[len(name) : len(name) + 1] in ("{", " ")
        and line.rsplit(" ", 1)[-1] in ("1", "1.0")
        for line in page.splitlines()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smartgrid.healthcheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument("url")
    parser.add_argument(
        "--metric", action="append", default=[], help="a gauge on the page that must be 1"
    )
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            body = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    for metric in args.metric:
        if not gauge_reads_one(body, metric):
            print(f"unhealthy: {metric} is not 1", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
