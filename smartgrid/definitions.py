"""RabbitMQ definitions (the broker's import format) generated from the message contract.

``rabbitmq/definitions.json`` is this module's output for the topology alone, committed so
operators can read and import it; a test keeps it identical to the contract. For docker
compose, ``--users-from-env`` adds one user per service with the least permissions it needs,
passwords stored only as RabbitMQ password hashes; the broker imports that file at boot, so no
``guest`` user is ever created there. With ``--secrets-dir`` a password not set in the
environment is generated at the first run and kept in that directory (one file per variable,
which is also where each service reads its own); a password set in the environment replaces
the kept one.

What each service may do is written once, as a :class:`Role` (what it publishes, consumes,
and which event kinds it publishes and subscribes to), and turned into permissions here.
Topic permissions on the events exchange hold every role to its own event kinds.
``--admin-declares-topology`` also takes from the services the right to declare (and so to
delete) the core topology, and ``--substation-users`` gives each substation a user of its
own, held to its own queue; tests/test_permissions.py tries every attack against both.

    python -m smartgrid.definitions --output rabbitmq/definitions.json
    python -m smartgrid.definitions --users-from-env --secrets-dir /secrets \
        --output /definitions/definitions.json
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from smartgrid import contract

DEFAULT_VHOST = "smartgrid"


@dataclass(frozen=True)
class Role:
    """What one service does on the broker, by name; the permissions are worked out from it.

    RabbitMQ checks three things per resource (https://www.rabbitmq.com/docs/access-control):
    *configure* to declare (even an identical redeclare) or delete a queue or exchange;
    *write* to publish to an exchange, or to be the destination of a binding; *read* to consume
    (or purge) a queue, or to be the source of a binding. On the topic exchange of lifecycle
    events, topic permissions also check the routing key, which is the event kind: *write*
    when publishing, *read* when binding. A passive declare needs no permission at all.
    """

    #: Exchanges it publishes to.
    publishes_to: tuple[str, ...] = ()
    #: Queues it consumes.
    consumes: tuple[str, ...] = ()
    #: Event kinds it publishes, and the kinds its event subscription binds.
    publishes: tuple[type[contract.Event], ...] = ()
    subscribes: tuple[type[contract.Event], ...] = ()
    #: Its event subscription queues are named <subscription>.<anything>.
    subscription: str = ""
    #: Substation queues it declares, binds to the dispatch exchange and consumes: a regex.
    substation_queues: str = ""
    #: Power share queues it declares, binds to the power exchange and consumes: a regex.
    #: They are exclusive to the consuming connection, so nobody can declare them beforehand.
    share_queues: str = ""
    #: It declares the power topology (``contract.power_topology``) when services declare:
    #: the power exchange, the reports queue, the limits stream and their bindings.
    declares_power: bool = False
    #: It reads the history stream (``contract.HISTORY_STREAM``), and declares it and its
    #: bindings when services declare (whoever starts first declares it).
    reads_history: bool = False
    #: Queues of an earlier version that it empties into today's and deletes, where services
    #: declare the topology (unbinding one from the requests exchange needs write on it and
    #: read on the exchange, which they have then).
    retires: tuple[str, ...] = ()


_ANY_SUBSTATION_QUEUE = (
    re.escape(contract.SUBSTATION_QUEUE_PREFIX) + contract.SUBSTATION_ID_PATTERN.pattern
)
_ANY_SHARE_QUEUE = (
    re.escape(contract.POWER_SHARE_QUEUE_PREFIX) + contract.SUBSTATION_ID_PATTERN.pattern
)

ROLES: dict[str, Role] = {
    # Internet-facing: it publishes requests, a driver's cancels, the requests the broker
    # refused (not_enqueued) and its doubts about requests that stand still, and follows their
    # fate in the history stream alone (no event subscription of its own).
    "gateway": Role(
        publishes_to=(contract.REQUESTS_EXCHANGE, contract.EVENTS_EXCHANGE),
        publishes=(contract.CancelRequested, contract.RequestRejected, contract.StatusRequested),
        reads_history=True,
    ),
    "balancer": Role(
        publishes_to=(
            contract.DISPATCH_EXCHANGE,
            contract.EVENTS_EXCHANGE,
            contract.DEAD_LETTER_EXCHANGE,
            # Requests off a substation presumed dead go back to pending.
            contract.REQUESTS_EXCHANGE,
            # Its allocator's shares of the grid's limits (one balancer's at a time).
            contract.POWER_EXCHANGE,
        ),
        # The allocator reads the substations' reports and the operators' limits.
        consumes=(
            contract.PENDING_QUEUE,
            contract.POWER_REPORTS_QUEUE,
            contract.GRID_LIMITS_STREAM,
        ),
        publishes=(
            contract.RequestRouted,
            contract.BalancerStarted,
            contract.RequestDeadLettered,
            # Its ledger's decisions: a car already busy (ev_busy), a cancel obeyed before the
            # request was forwarded.
            contract.RequestRejected,
            contract.RequestCancelled,
        ),
        subscribes=contract.BALANCER_EVENTS.events,
        subscription=contract.BALANCER_EVENTS.prefix,
        # It declares and drains the queue of any substation presumed dead.
        substation_queues=_ANY_SUBSTATION_QUEUE,
        declares_power=True,
        # Its ledger is replayed from the history when it becomes the active consumer.
        reads_history=True,
        # balancer/legacy_pending.py: the pending queue before its arguments changed.
        retires=(contract.LEGACY_PENDING_QUEUE,),
    ),
    "substation": Role(
        publishes_to=(contract.EVENTS_EXCHANGE, contract.DEAD_LETTER_EXCHANGE),
        publishes=(
            contract.SessionStarted,
            contract.SessionCompleted,
            contract.SessionLookup,
            contract.SessionLookupReply,
            contract.SubstationAnnounced,
            contract.SubstationLeaving,
            contract.RequestDeadLettered,
            contract.SessionPower,
            contract.PowerDemand,
            # A cancel it obeyed: the request waited in its queue, or charged there.
            contract.RequestCancelled,
        ),
        subscribes=contract.SUBSTATION_EVENTS.events,
        subscription=contract.SUBSTATION_EVENTS.prefix,
        # One user shared by every substation cannot be held to one queue.
        substation_queues=_ANY_SUBSTATION_QUEUE,
        share_queues=_ANY_SHARE_QUEUE,
        # Its cancel book is replayed from the recent history at start.
        reads_history=True,
    ),
    # It reads the lifecycle events to build its ledger, and sends requests over HTTP only.
    "loadgen": Role(
        subscribes=contract.LOADGEN_EVENTS.events,
        subscription=contract.LOADGEN_EVENTS.prefix,
    ),
}

#: The core topology, which services declare themselves until they can check it passively
#: (``services_declare``): that needs configure on every entity (so also lets them delete
#: it), write on the queues it binds and read on the exchanges they are bound to.
_CORE = [
    contract.REQUESTS_EXCHANGE,
    contract.DISPATCH_EXCHANGE,
    contract.EVENTS_EXCHANGE,
    contract.DEAD_LETTER_EXCHANGE,
    contract.PENDING_QUEUE,
    contract.DEAD_LETTER_QUEUE,
]
_CORE_BIND_WRITE = [contract.PENDING_QUEUE, contract.DEAD_LETTER_QUEUE]
_CORE_BIND_READ = [contract.REQUESTS_EXCHANGE, contract.DEAD_LETTER_EXCHANGE]
#: The power topology, for a role that declares it: its entities, the queues it binds (to the
#: events exchange, whose topic permissions check the kinds bound).
_POWER = [contract.POWER_EXCHANGE, contract.POWER_REPORTS_QUEUE, contract.GRID_LIMITS_STREAM]
_POWER_BIND_WRITE = [contract.POWER_REPORTS_QUEUE, contract.GRID_LIMITS_STREAM]
_POWER_BIND_KINDS = [
    d.routing_key
    for d in contract.power_topology()
    if isinstance(d, contract.Binding) and d.exchange == contract.EVENTS_EXCHANGE
]


def default_history_topology() -> list[contract.Declaration]:
    """The history stream with the services' default retention (the admin's definitions
    declare it so; services that declare it themselves must use the same settings)."""
    return contract.history_topology(
        max_age_seconds=contract.HISTORY_MAX_AGE_SECONDS, max_bytes=contract.HISTORY_MAX_BYTES
    )


#: The history stream, for a role that reads it: the stream is bound to the requests exchange
#: (read on it is in _CORE_BIND_READ) and to the events exchange by the kinds it keeps.
_HISTORY_BIND_KINDS = [
    d.routing_key
    for d in default_history_topology()
    if isinstance(d, contract.Binding) and d.exchange == contract.EVENTS_EXCHANGE
]

#: A regex that matches no name a client can use ("^$" is RabbitMQ's own "nothing").
NOTHING = "^$"


def _exactly(names: Iterable[str], *regexes: str) -> str:
    parts = sorted({re.escape(n) for n in names}) + sorted({r for r in regexes if r})
    return "^(" + "|".join(parts) + ")$" if parts else NOTHING


def substation_user(substation_id: str) -> str:
    """The broker user of one substation, in the one-user-per-substation setup."""
    return f"substation-{substation_id}"


def role_permissions(
    role: Role, *, services_declare: bool = True, substation_id: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The (resource, topic) permissions of ``role``, as RabbitMQ regexes.

    ``services_declare``: the services declare the core topology themselves (today's
    services) instead of checking it passively. Then every user may also delete it; only
    without it are the core queues and exchanges the admin's alone.

    ``substation_id``: a substation's own user, held to its own queue, which the admin's
    definitions declare and bind (:func:`topology_definitions` ``substations``).
    """
    subscription = re.escape(role.subscription) + r"\..+" if role.subscription else ""
    configure: list[str] = []
    write = list(role.publishes_to)
    read = list(role.consumes)
    if role.reads_history:
        # Consuming a stream, from any offset, needs read on it and nothing else.
        read.append(contract.HISTORY_STREAM)
    if role.subscribes:
        read.append(contract.EVENTS_EXCHANGE)
    own_queues = role.substation_queues
    binds_own_queue = bool(own_queues)
    share_queues = role.share_queues
    if substation_id is not None:
        own_queues = re.escape(contract.substation_queue_name(substation_id))
        share_queues = re.escape(contract.power_share_queue_name(substation_id))
        # Its queue and binding come from the admin: binding needs read on the dispatch
        # exchange, a direct exchange whose routing keys no permission checks, so a user that
        # may bind could bind its queue to another substation's id as well.
        binds_own_queue = services_declare
    topic_read = [e.kind for e in role.subscribes]
    if services_declare:
        configure += _CORE
        write += _CORE_BIND_WRITE
        read += _CORE_BIND_READ
        if role.declares_power:
            configure += _POWER
            write += _POWER_BIND_WRITE
            read.append(contract.EVENTS_EXCHANGE)
            topic_read += _POWER_BIND_KINDS
        if role.reads_history:
            configure.append(contract.HISTORY_STREAM)
            write.append(contract.HISTORY_STREAM)
            read.append(contract.EVENTS_EXCHANGE)
            topic_read += _HISTORY_BIND_KINDS
    if role.retires and services_declare:
        # Where the admin alone declares the topology, the admin retires it too
        # (python -m balancer.legacy_pending).
        configure += role.retires
        write += role.retires
        read += role.retires
    if binds_own_queue:
        read.append(contract.DISPATCH_EXCHANGE)
    if share_queues:
        # Its share queue is declared and bound by itself alone (exclusive); binding needs
        # read on the power exchange, so it could also bind a copy of another substation's
        # shares, which are no secret and which that one still receives.
        read.append(contract.POWER_EXCHANGE)
        if services_declare:
            configure.append(contract.POWER_EXCHANGE)
    resource = {
        "configure": _exactly(
            configure, subscription, own_queues if binds_own_queue else "", share_queues
        ),
        "write": _exactly(write, subscription, own_queues if binds_own_queue else "", share_queues),
        "read": _exactly(read, subscription, own_queues, share_queues),
    }
    topic = {
        "exchange": contract.EVENTS_EXCHANGE,
        "write": _exactly(e.kind for e in role.publishes),
        "read": _exactly(topic_read),
    }
    return resource, topic


#: Environment variables holding each user's password in docker compose.
PASSWORD_ENV = {
    "gateway": "GATEWAY_AMQP_PASSWORD",
    "balancer": "BALANCER_AMQP_PASSWORD",
    "substation": "SUBSTATION_AMQP_PASSWORD",
    "loadgen": "LOADGEN_AMQP_PASSWORD",
}
ADMIN_USER_ENV = "RABBITMQ_ADMIN_USER"
ADMIN_PASSWORD_ENV = "RABBITMQ_ADMIN_PASSWORD"
DEFAULT_ADMIN_USER = "admin"
#: Shared by the nodes of a cluster; kept like a password, written into each node's data.
ERLANG_COOKIE_ENV = "RABBITMQ_ERLANG_COOKIE"


def substation_password_env(substation_id: str) -> str:
    """Where one substation's own user finds its password (one user per substation)."""
    return "SUBSTATION_AMQP_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", substation_id).upper()


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _argument_values(arguments: dict) -> dict:
    return dict(sorted(arguments.items()))


def topology_definitions(vhost: str = DEFAULT_VHOST, *, substations: Iterable[str] = ()) -> dict:
    """The core topology; with ``substations``, also their queues and bindings (for users
    that may not declare them: one user per substation)."""
    declarations = contract.core_topology() + contract.power_topology() + default_history_topology()
    for substation in substations:
        declarations += contract.substation_topology(substation)
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": d.name,
                "vhost": vhost,
                "type": d.type,
                "durable": d.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for d in declarations
            if isinstance(d, contract.Exchange)
        ],
        "queues": [
            {
                "name": d.name,
                "vhost": vhost,
                "durable": d.durable,
                "auto_delete": False,
                "arguments": _argument_values(d.arguments),
            }
            for d in declarations
            if isinstance(d, contract.Queue)
        ],
        "bindings": [
            {
                "source": d.exchange,
                "vhost": vhost,
                "destination": d.queue,
                "destination_type": "queue",
                "routing_key": d.routing_key,
                "arguments": {},
            }
            for d in declarations
            if isinstance(d, contract.Binding)
        ],
        "policies": [],
    }


def _user(name: str, password: str, tags: list[str]) -> dict:
    return {
        "name": name,
        "password_hash": password_hash(password),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": tags,
    }


def user_definitions(
    passwords: dict[str, str],
    admin: tuple[str, str] | None,
    vhost: str = DEFAULT_VHOST,
    *,
    services_declare: bool = True,
    substation_passwords: dict[str, str] | None = None,
) -> dict:
    """Users and permissions: one user per role in ``passwords`` (role -> password), and with
    ``substation_passwords`` (substation id -> password) one user per substation instead of
    the shared ``substation`` user."""
    users, permissions, topic_permissions = [], [], []

    def grant(user: str, role: Role, substation_id: str | None = None) -> None:
        resource, topic = role_permissions(
            role, services_declare=services_declare, substation_id=substation_id
        )
        permissions.append({"user": user, "vhost": vhost, **resource})
        topic_permissions.append({"user": user, "vhost": vhost, **topic})

    for name, password in passwords.items():
        users.append(_user(name, password, []))
        grant(name, ROLES[name])
    for substation, password in (substation_passwords or {}).items():
        name = substation_user(substation)
        users.append(_user(name, password, []))
        grant(name, ROLES["substation"], substation)
    if admin is not None:
        admin_name, admin_password = admin
        users.append(_user(admin_name, admin_password, ["administrator"]))
        permissions.append(
            {"user": admin_name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        )
    return {"users": users, "permissions": permissions, "topic_permissions": topic_permissions}


def users_from_env(
    environ: dict[str, str], substations: Iterable[str] = ()
) -> tuple[dict[str, str], tuple[str, str], dict[str, str]]:
    """(role passwords, admin, substation passwords) from the environment. With
    ``substations`` each has a user of its own, and there is no shared substation user."""
    substations = list(substations)
    roles = {r: v for r, v in PASSWORD_ENV.items() if not (substations and r == "substation")}
    own = {s: substation_password_env(s) for s in substations}
    missing = [
        v
        for v in [*roles.values(), *own.values(), ADMIN_USER_ENV, ADMIN_PASSWORD_ENV]
        if not environ.get(v)
    ]
    if missing:
        raise SystemExit(f"definitions: set {', '.join(missing)} (see .env.example)")
    return (
        {role: environ[variable] for role, variable in roles.items()},
        (environ[ADMIN_USER_ENV], environ[ADMIN_PASSWORD_ENV]),
        {substation: environ[variable] for substation, variable in own.items()},
    )


def secret_file(directory: Path, variable: str) -> Path:
    """Where ``variable``'s secret is kept: GATEWAY_AMQP_PASSWORD -> gateway-amqp-password."""
    return directory / variable.lower().replace("_", "-")


def keep_secret(directory: Path, variable: str, given: str | None, owner: int | None = None) -> str:
    """The secret ``given`` (it replaces a kept one), else the one kept in ``directory``, else
    a new random one; kept in ``directory`` either way, readable by ``owner`` alone."""
    path = secret_file(directory, variable)
    kept = path.read_text() if path.exists() else None
    value = given or kept or secrets.token_hex(20)
    target = path
    if value != kept:
        target = path.with_name(f".{path.name}.new")
        target.unlink(missing_ok=True)
        target.touch(mode=0o400)
        target.write_text(value)
    target.chmod(0o400)
    if owner is not None:
        os.chown(target, owner, owner)
    if target != path:
        target.replace(path)
    return value


def users_from_secrets(
    environ: dict[str, str],
    directory: Path,
    owner: int | None = None,
    substations: Iterable[str] = (),
) -> tuple[dict[str, str], tuple[str, str], dict[str, str]]:
    """As :func:`users_from_env`, but a password the environment does not give is the one kept
    in ``directory`` (generated at the first run); service passwords readable by ``owner``."""
    substations = list(substations)
    roles = {r: v for r, v in PASSWORD_ENV.items() if not (substations and r == "substation")}
    own = {s: substation_password_env(s) for s in substations}
    directory.mkdir(parents=True, exist_ok=True)

    def keep(variable: str, owner: int | None) -> str:
        return keep_secret(directory, variable, environ.get(variable), owner)

    return (
        {role: keep(variable, owner) for role, variable in roles.items()},
        (environ.get(ADMIN_USER_ENV) or DEFAULT_ADMIN_USER, keep(ADMIN_PASSWORD_ENV, None)),
        {substation: keep(variable, owner) for substation, variable in own.items()},
    )


def install_erlang_cookie(cookie: str, parent: Path) -> list[Path]:
    """Write ``cookie`` as ``.erlang.cookie`` into each node data directory under ``parent``
    (the image's entrypoint hands it to the rabbitmq user); unchanged files are left alone."""
    written = []
    for data in sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []:
        path = data / ".erlang.cookie"
        if path.exists() and path.read_text().strip() == cookie:
            continue
        path.unlink(missing_ok=True)
        path.write_text(cookie)
        path.chmod(0o400)
        written.append(path)
    return written


def _secret_spec(text: str) -> tuple[str, int | None]:
    variable, _, owner = text.partition(":")
    return variable, int(owner) if owner else None


def _substation_ids(value: str) -> list[str]:
    ids = [part.strip() for part in value.split(",") if part.strip()]
    bad = [i for i in ids if not contract.is_valid_substation_id(i)]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid substation id(s): {', '.join(bad)}")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smartgrid.definitions",
        description="Write RabbitMQ definitions for the message contract.",
        epilog="with --users-from-env: "
        + ", ".join([ADMIN_USER_ENV, ADMIN_PASSWORD_ENV, *PASSWORD_ENV.values()])
        + "; with --substation-users also "
        + substation_password_env("<ID>"),
    )
    parser.add_argument("--vhost", default=DEFAULT_VHOST)
    parser.add_argument(
        "--users-from-env", action="store_true", help="add the service users and the admin"
    )
    parser.add_argument(
        "--admin-declares-topology",
        action="store_true",
        help="only the admin may declare or delete the core topology; the services must check "
        "it passively (DECLARE_TOPOLOGY=0)",
    )
    parser.add_argument(
        "--substation-users",
        type=_substation_ids,
        default=[],
        metavar="ID,ID,...",
        help="one user per substation, held to its own queue (declared here), instead of one "
        "shared substation user",
    )
    parser.add_argument(
        "--output", "-o", type=Path, help="file to write (default: standard output)"
    )
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        help="keep the passwords here; generate those the environment does not give",
    )
    parser.add_argument(
        "--service-uid", type=int, help="owner of the services' password files (their user)"
    )
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="VARIABLE[:UID]",
        help="keep another secret in --secrets-dir the same way, readable by UID (repeatable)",
    )
    parser.add_argument(
        "--erlang-cookie-under",
        type=Path,
        metavar="DIR",
        help=f"write {ERLANG_COOKIE_ENV} (kept in --secrets-dir) into every node data "
        "directory under DIR",
    )
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.secrets_dir is None and (args.secret or args.erlang_cookie_under):
        parser.error("--secret and --erlang-cookie-under need --secrets-dir")
    definitions = topology_definitions(args.vhost, substations=args.substation_users)
    if args.users_from_env:
        if args.secrets_dir is None:
            passwords, admin, substation_passwords = users_from_env(environ, args.substation_users)
        else:
            passwords, admin, substation_passwords = users_from_secrets(
                environ, args.secrets_dir, args.service_uid, args.substation_users
            )
        definitions |= user_definitions(
            passwords,
            admin,
            args.vhost,
            services_declare=not args.admin_declares_topology,
            substation_passwords=substation_passwords,
        )
    for variable, owner in map(_secret_spec, args.secret):
        keep_secret(args.secrets_dir, variable, environ.get(variable), owner)
    if args.erlang_cookie_under is not None:
        cookie = keep_secret(args.secrets_dir, ERLANG_COOKIE_ENV, environ.get(ERLANG_COOKIE_ENV))
        install_erlang_cookie(cookie, args.erlang_cookie_under)
    text = json.dumps(definitions, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
