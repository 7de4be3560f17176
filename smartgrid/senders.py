"""Who may send each lifecycle event, and whether a received one comes from them.

The Link stamps every publish with its connection's broker user (``user_id``), and RabbitMQ
refuses a publish whose ``user_id`` is not the connection's user: so the property says which
user sent a message, whatever the message says about itself. Each event kind has owners, the
roles that publish it (:data:`smartgrid.definitions.ROLES`, from which the broker's topic
permissions are made too), and each role has broker users (``EVENT_SENDERS``, by default the
users ``python -m smartgrid.definitions`` creates). An event is trusted when its sender is a
user of a role that owns its kind; when that user is one substation's own
(``substation-{id}``), the substation the event names must be that one as well.

One user for everything (a local stack on ``guest``): a service whose own user is none of the
configured ones runs in *single-user mode*. It cannot tell the roles apart, so it trusts every
event sent as its own user and nothing else: that keeps out clients that log in as someone
else, and no more. Pure: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from smartgrid import contract
from smartgrid.config import setting
from smartgrid.definitions import ROLES, substation_user

log = logging.getLogger(__name__)

#: Where a user name holds the substation id, in a per-substation user's template.
ID_FIELD = "{id}"

#: role=user|user,... as ``python -m smartgrid.definitions --users-from-env`` names them.
DEFAULT_EVENT_SENDERS: tuple[str, ...] = (
    "gateway=gateway",
    "balancer=balancer",
    f"substation=substation|{substation_user(ID_FIELD)}",
    "loadgen=loadgen",
)


def event_senders_setting() -> Any:
    """``EVENT_SENDERS``, the same for every service that follows events."""
    return setting(
        "EVENT_SENDERS",
        DEFAULT_EVENT_SENDERS,
        "Broker users of each role, role=user|user,...; {id} in a user name stands for a "
        "substation id (one user per substation). Events from other users, or of kinds their "
        "role does not send, are ignored. A service whose own user is none of these (every "
        "service on guest) trusts only events sent as its own user",
        check=valid_event_senders,
        expect="comma-separated role=user|user entries, roles " + ", ".join(ROLES),
    )


def event_owners() -> dict[str, frozenset[str]]:
    """Event kind -> the roles that publish it."""
    owners: dict[str, set[str]] = {}
    for role, definition in ROLES.items():
        for event in definition.publishes:
            owners.setdefault(event.kind, set()).add(role)
    return {kind: frozenset(roles) for kind, roles in owners.items()}


def parse_event_senders(entries: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``("balancer=balancer", "substation=substation|substation-{id}")`` -> role -> user
    templates. ValueError for an unknown role or an empty entry."""
    senders: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        role, sep, users = entry.partition("=")
        role = role.strip()
        templates = tuple(u.strip() for u in users.split("|") if u.strip())
        if not sep or role not in ROLES or not templates:
            raise ValueError(entry)
        senders[role] = senders.get(role, ()) + templates
    return senders


def valid_event_senders(entries: tuple[str, ...]) -> bool:
    try:
        parse_event_senders(entries)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _UserTemplate:
    template: str

    def substation_of(self, user: str) -> str | None:
        """For a per-substation template, the id ``user`` stands for; "" if the template is
        one fixed user and ``user`` is it; None if ``user`` does not match."""
        if ID_FIELD not in self.template:
            return "" if user == self.template else None
        prefix, _, suffix = self.template.partition(ID_FIELD)
        if not (user.startswith(prefix) and user.endswith(suffix)):
            return None
        substation = user[len(prefix) : len(user) - len(suffix)]
        return substation if contract.is_valid_substation_id(substation) else None


class Senders:
    """Decides whether an event comes from one of its owners (see the module's docstring)."""

    def __init__(
        self,
        event_senders: Mapping[str, tuple[str, ...]] | Iterable[str],
        *,
        own_user: str,
    ) -> None:
        if not isinstance(event_senders, Mapping):
            event_senders = parse_event_senders(event_senders)
        self.own_user = own_user
        self._templates = {
            role: tuple(_UserTemplate(t) for t in templates)
            for role, templates in event_senders.items()
        }
        self._owners = event_owners()
        self.single_user = not any(
            template.substation_of(own_user) is not None
            for templates in self._templates.values()
            for template in templates
        )
        self.refused = 0

    def refusal(self, event: contract.Event, user_id: str | None) -> str | None:
        """Why ``event``, sent as ``user_id``, is not to be trusted; None if it is."""
        if not user_id:
            return "it carries no user_id"
        if self.single_user:
            if user_id == self.own_user:
                return None
            return f"it was sent by {user_id!r}, and every service here runs as {self.own_user!r}"
        named = getattr(event, "substation", None)
        if named is None and isinstance(event, contract.RequestCancelled):
            # A cancel obeyed before the session started names no substation, but its source
            # is the one that obeyed (a balancer's cancels come from the balancer's user).
            named = event.source
        for role in sorted(self._owners.get(event.kind, ())):
            for template in self._templates.get(role, ()):
                substation = template.substation_of(user_id)
                if substation is None:
                    continue
                if not substation or named is None or named == substation:
                    return None
                return f"{user_id!r} speaks for substation {substation!r} only, not {named!r}"
        return f"{user_id!r} is not a user of a role that sends {event.kind}"

    def trusted(self, events: list[contract.Event], user_id: str | None) -> list[contract.Event]:
        """The events of one message that come from their owners; the others are logged."""
        kept = []
        for event in events:
            reason = self.refusal(event, user_id)
            if reason is None:
                kept.append(event)
                continue
            self.refused += 1
            # A flood of forgeries must not become a flood of log lines.
            if self.refused <= 10 or self.refused % 1000 == 0:
                log.warning(
                    "ignoring a %s event (%d ignored so far): %s", event.kind, self.refused, reason
                )
        return kept
