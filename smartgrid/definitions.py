"""RabbitMQ definitions (the broker's import format) generated from the message contract.

``rabbitmq/definitions.json`` is this module's output for the topology alone, committed so
operators can read and import it; a test keeps it identical to the contract. For docker
compose, ``--users-from-env`` adds one user per service with the least permissions it needs,
passwords taken from the environment (``.env``) and stored only as RabbitMQ password hashes;
the broker imports that file at boot, so no ``guest`` user is ever created there.

    python -m smartgrid.definitions --output rabbitmq/definitions.json
    python -m smartgrid.definitions --users-from-env --output /definitions/definitions.json
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
from pathlib import Path

from smartgrid import contract

DEFAULT_VHOST = "smartgrid"


#: What each service does on the broker, as RabbitMQ permission regexes (configure, write,
#: read). Every service declares the core topology (configure on it; binding the pending and
#: dead-letter queues needs write on them and read on their exchanges) and its own exclusive
#: event subscription queue (smartgrid.<service>-events.*).
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
_SUBSTATION_QUEUES = re.escape(contract.SUBSTATION_QUEUE_PREFIX) + ".+"


def _permissions(
    *, extra_configure: str = "", write: list[str], read: list[str], events_queue: str
) -> dict:
    subscription = re.escape(events_queue) + r"\..+"

    def pattern(names: list[str], *extra: str) -> str:
        parts = [re.escape(n) for n in names] + [e for e in extra if e]
        return "^(" + "|".join(parts) + ")$"

    return {
        "configure": pattern(_CORE, subscription, extra_configure),
        "write": pattern(_CORE_BIND_WRITE + write, subscription, extra_configure),
        "read": pattern(
            _CORE_BIND_READ + read + [contract.EVENTS_EXCHANGE], subscription, extra_configure
        ),
    }


SERVICE_PERMISSIONS = {
    "gateway": _permissions(
        write=[contract.REQUESTS_EXCHANGE, contract.EVENTS_EXCHANGE],
        read=[],
        events_queue="smartgrid.gateway-events",
    ),
    "balancer": _permissions(
        # It declares and drains the queue of a substation that died.
        extra_configure=_SUBSTATION_QUEUES,
        write=[
            contract.DISPATCH_EXCHANGE,
            contract.EVENTS_EXCHANGE,
            contract.DEAD_LETTER_EXCHANGE,
            contract.REQUESTS_EXCHANGE,
        ],
        read=[contract.PENDING_QUEUE],
        events_queue="smartgrid.balancer-events",
    ),
    "substation": _permissions(
        # Each substation declares and binds its own queue.
        extra_configure=_SUBSTATION_QUEUES,
        write=[contract.EVENTS_EXCHANGE, contract.DEAD_LETTER_EXCHANGE],
        read=[contract.DISPATCH_EXCHANGE],
        events_queue="smartgrid.substation-events",
    ),
    "loadgen": _permissions(
        write=[],
        read=[],
        events_queue="smartgrid.loadgen-events",
    ),
}

#: Environment variables holding each user's password in docker compose.
PASSWORD_ENV = {
    "gateway": "GATEWAY_AMQP_PASSWORD",
    "balancer": "BALANCER_AMQP_PASSWORD",
    "substation": "SUBSTATION_AMQP_PASSWORD",
    "loadgen": "LOADGEN_AMQP_PASSWORD",
}
ADMIN_USER_ENV = "RABBITMQ_ADMIN_USER"
ADMIN_PASSWORD_ENV = "RABBITMQ_ADMIN_PASSWORD"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _argument_values(arguments: dict) -> dict:
    return dict(sorted(arguments.items()))


def topology_definitions(vhost: str = DEFAULT_VHOST) -> dict:
    declarations = contract.core_topology()
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
        # Substation queues are declared by each substation from the same contract; their
        # arguments are listed here for operators, as a policy-free reference.
        "policies": [],
    }


def user_definitions(
    passwords: dict[str, str], admin: tuple[str, str] | None, vhost: str = DEFAULT_VHOST
) -> dict:
    users = [
        {
            "name": name,
            "password_hash": password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": [],
        }
        for name, password in passwords.items()
    ]
    permissions = [
        {"user": name, "vhost": vhost, **SERVICE_PERMISSIONS[name]} for name in passwords
    ]
    if admin is not None:
        admin_name, admin_password = admin
        users.append(
            {
                "name": admin_name,
                "password_hash": password_hash(admin_password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
            }
        )
        permissions.append(
            {"user": admin_name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        )
    return {"users": users, "permissions": permissions}


def users_from_env(environ: dict[str, str]) -> tuple[dict[str, str], tuple[str, str]]:
    missing = [
        v
        for v in [*PASSWORD_ENV.values(), ADMIN_USER_ENV, ADMIN_PASSWORD_ENV]
        if not environ.get(v)
    ]
    if missing:
        raise SystemExit(f"definitions: set {', '.join(missing)} (see .env.example)")
    passwords = {user: environ[variable] for user, variable in PASSWORD_ENV.items()}
    return passwords, (environ[ADMIN_USER_ENV], environ[ADMIN_PASSWORD_ENV])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smartgrid.definitions",
        description="Write RabbitMQ definitions for the message contract.",
        epilog="with --users-from-env: "
        + ", ".join([ADMIN_USER_ENV, ADMIN_PASSWORD_ENV, *PASSWORD_ENV.values()]),
    )
    parser.add_argument("--vhost", default=DEFAULT_VHOST)
    parser.add_argument(
        "--users-from-env", action="store_true", help="add the service users and the admin"
    )
    parser.add_argument(
        "--output", "-o", type=Path, help="file to write (default: standard output)"
    )
    args = parser.parse_args(argv)
    definitions = topology_definitions(args.vhost)
    if args.users_from_env:
        passwords, admin = users_from_env(dict(os.environ))
        definitions |= user_definitions(passwords, admin, args.vhost)
    text = json.dumps(definitions, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
