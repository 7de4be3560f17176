"""Configuration from environment variables, declared once per service.

Each service describes its settings as a frozen dataclass whose fields are made with
:func:`setting`. The same declaration parses the environment, validates it, and renders the
``--help`` text, so the documented variables are exactly the ones the code reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
AMQP_URL_ENV = "AMQP_URL"
#: A file holding the broker password (docker compose keeps one per service in a volume):
#: it is URL-quoted into every URL of AMQP_URL, so that no character of it can break them.
AMQP_PASSWORD_FILE_ENV = "AMQP_PASSWORD_FILE"

T = TypeVar("T")


class ConfigError(ValueError):
    """An environment variable is present but unusable."""


def setting(
    env: str,
    default: Any,
    help: str,
    *,
    check: Callable[[Any], bool] | None = None,
    expect: str = "",
) -> Any:
    """Declare a dataclass field read from the environment variable ``env``.

    ``check`` validates the parsed value; ``expect`` says in words what it accepts, for the
    error message and the help text.
    """
    return dataclasses.field(
        default=default,
        metadata={"env": env, "help": help, "check": check, "expect": expect},
    )


def declare_topology_setting() -> Any:
    """``DECLARE_TOPOLOGY``, the same for every service."""
    return setting(
        "DECLARE_TOPOLOGY",
        True,
        "Declare the core topology (exchanges, pending and dead-letter queues); 0: only check "
        "that it exists (a passive declare, retried until it does), for a broker whose "
        "definitions declare it and whose service users may not (definitions "
        "--admin-declares-topology)",
    )


#: What ``AMQP_MIN_TURN_INTERVAL`` defaults to where a service paces its AMQP loop.
DEFAULT_MIN_TURN_INTERVAL = 0.02


def min_turn_interval_setting() -> Any:
    """``AMQP_MIN_TURN_INTERVAL``, the same for every service that paces its AMQP loop."""
    return setting(
        "AMQP_MIN_TURN_INTERVAL",
        DEFAULT_MIN_TURN_INTERVAL,
        "Least seconds between the starts of two turns of the AMQP I/O loop (a substation's only "
        "while it takes no share): what arrives meanwhile is handled together (one read, one "
        "write, one ack); a message after a quiet spell at once, a turn that took longer "
        "followed at once; 0: every message on its own turn",
        check=non_negative,
        expect="seconds >= 0",
    )


def positive(value: float) -> bool:
    return value > 0


def non_negative(value: float) -> bool:
    return value >= 0


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(raw)


def _parser_for(annotation: Any) -> Callable[[str], Any]:
    if annotation is bool:
        return _parse_bool
    if annotation in (int, float, str):
        return annotation
    if typing.get_origin(annotation) is tuple:
        return lambda raw: tuple(part.strip() for part in raw.split(",") if part.strip())
    raise TypeError(f"unsupported setting type {annotation!r}")


def _settings(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "env" in f.metadata]


def with_password(urls: str, password: str) -> str:
    """The comma-separated AMQP ``urls`` with ``password`` in each, URL-quoted."""
    quoted = quote(password, safe="")
    result = []
    for url in (part.strip() for part in urls.split(",")):
        if not url:
            continue
        parts = urlsplit(url)
        credentials, _, host = parts.netloc.rpartition("@")
        user = credentials.partition(":")[0]
        result.append(urlunsplit(parts._replace(netloc=f"{user}:{quoted}@{host}")))
    return ",".join(result)


def amqp_url_from_env(
    environ: Mapping[str, str] | None = None, default: str = DEFAULT_AMQP_URL
) -> str:
    """``AMQP_URL`` (or ``default``), with the password from ``AMQP_PASSWORD_FILE`` if set."""
    environ = os.environ if environ is None else environ
    url = environ.get(AMQP_URL_ENV) or default
    path = environ.get(AMQP_PASSWORD_FILE_ENV)
    if not path:
        return url
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{AMQP_PASSWORD_FILE_ENV}={path!r}: {exc.strerror}") from None
    return with_password(url, password)


def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from ``environ`` (default: the process environment)."""
    environ = os.environ if environ is None else environ
    if environ.get(AMQP_PASSWORD_FILE_ENV):
        environ = {**environ, AMQP_URL_ENV: amqp_url_from_env(environ)}
    values: dict[str, Any] = {}
    for field, annotation in _settings(cls):
        env = field.metadata["env"]
        raw = environ.get(env)
        if raw is None or raw == "":
            continue
        try:
            value = _parser_for(annotation)(raw)
        except ValueError:
            raise ConfigError(
                f"{env}={raw!r} is not a valid "
                f"{annotation.__name__ if hasattr(annotation, '__name__') else annotation}"
            ) from None
        check = field.metadata["check"]
        if check is not None and not check(value):
            expect = field.metadata["expect"] or "a valid value"
            raise ConfigError(f"{env}={raw!r}: expected {expect}")
        values[field.name] = value
    return cls(**values)


def environment(cls: type, **values: Any) -> dict[str, str]:
    """The environment variables that give ``cls``'s fields these ``values`` (by field name):
    how to start a service with chosen settings without spelling its variables' names."""
    env_of = {field.name: field.metadata["env"] for field, _ in _settings(cls)}
    unknown = values.keys() - env_of.keys()
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(unknown))}")
    return {env_of[name]: _render(value) for name, value in values.items()}


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)


def default_of(cls: type, name: str) -> Any:
    """The default of ``cls``'s setting ``name``, to build on without writing it again."""
    (field,) = [f for f, _ in _settings(cls) if f.name == name]
    return field.default


def describe(cls: type) -> str:
    """Render the settings of ``cls`` as the environment section of ``--help``."""
    lines = ["environment variables:"]
    for field, _ in _settings(cls):
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        lines.append(f"  {field.metadata['env']:<24} {field.metadata['help']}")
        detail = f"default: {default!r}" if default not in ("", ()) else "default: unset"
        if field.metadata["expect"]:
            detail += f"; {field.metadata['expect']}"
        lines.append(f"  {'':<24} ({detail})")
        if field.metadata["env"] == AMQP_URL_ENV:
            lines.append(f"  {AMQP_PASSWORD_FILE_ENV:<24} File holding the password for AMQP_URL")
            lines.append(f"  {'':<24} (default: unset; any character, quoted into every URL)")
    return "\n".join(lines)


def load_or_exit(
    cls: type[T],
    *,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
) -> T:
    """Parse the command line (only ``--help`` for services) and the environment.

    A bad value ends the process with exit status 2 and a one-line message rather than a
    traceback: it is an operator's mistake, not a bug.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=describe(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        return from_env(cls)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
