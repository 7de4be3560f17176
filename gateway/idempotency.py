"""Idempotency keys: reading the header, deriving a request id from it, fingerprinting a body.

A client that repeats ``POST /charge`` with the same ``Idempotency-Key`` (the IETF httpapi draft
"The Idempotency-Key HTTP Header Field") means the same request. The request id is derived from
(client, key), so every replica, before or after a restart, gives a repeat the same id, and
every at-most-once guard downstream (the balancer's ledger, a substation's completed set), all
keyed by request id, applies to repeats as well. The body's fingerprint travels with the request
into the history stream: a repeat with another body is recognised by any gateway, later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from smartgrid import contract

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
KEY_RULE = (
    f"1 to {MAX_KEY_LENGTH} printable ASCII characters, bare or as a quoted string "
    '(Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324")'
)

# Domain separation: no other hash in the system can produce the same ids.
_REQUEST_ID_DOMAIN = b"smartgrid/request-id/v1\x00"


class InvalidKey(ValueError):
    """An Idempotency-Key header that breaks :data:`KEY_RULE`; ``str(exc)`` says how."""


def _printable(value: str) -> bool:
    return all(" " <= ch <= "~" for ch in value)


def _unquote(value: str) -> str:
    """An RFC 8941 sf-string: DQUOTE *( unescaped / "\\" ( DQUOTE / "\\" ) ) DQUOTE."""
    chars = []
    index = 1
    while index < len(value):
        ch = value[index]
        if ch == "\\":
            if index + 1 >= len(value) or value[index + 1] not in '"\\':
                raise InvalidKey('in a quoted key, a backslash may only escape " or \\')
            chars.append(value[index + 1])
            index += 2
            continue
        if ch == '"':
            if index != len(value) - 1:
                raise InvalidKey("a quoted key must end at its closing quote")
            return "".join(chars)
        chars.append(ch)
        index += 1
    raise InvalidKey("a quoted key has no closing quote")


def parse_key(raw: str) -> str:
    """The key in an ``Idempotency-Key`` header value, or :class:`InvalidKey`.

    The draft defines the value as a Structured Field string (quoted); many clients send the
    key bare, as Stripe's API taught them. Both are accepted; the key is what lies inside the
    quotes. Surrounding spaces and tabs are not part of a field value (RFC 9110 section 5.5).
    """
    value = raw.strip(" \t")
    if not _printable(value):
        raise InvalidKey(f"the key must be {KEY_RULE}; it has other characters")
    key = _unquote(value) if value.startswith('"') else value
    if not key:
        raise InvalidKey(f"the key is empty; it must be {KEY_RULE}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"the key has {len(key)} characters; at most {MAX_KEY_LENGTH}")
    return key


def derive_request_id(client: str | None, key: str) -> str:
    """The request id of a request made by ``client`` (None: the open API) with ``key``.

    128 bits of SHA-256, in the contract's request id format. The encoding is unambiguous:
    client names cannot hold the NUL byte that separates them from the key.
    """
    if client is not None and not contract.CLIENT_PATTERN.fullmatch(client):
        raise ValueError(f"client must be {contract.CLIENT_RULE}")
    material = _REQUEST_ID_DOMAIN + (client or "").encode() + b"\x00" + key.encode("ascii")
    return hashlib.sha256(material).hexdigest()[:32]


def _normalised(value: Any) -> Any:
    # 22 and 22.0 are the same number to a client and to the parser that reads them.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def body_fingerprint(fields: Mapping[str, Any]) -> str:
    """The fingerprint of a validated request body: the same for bodies that differ only in
    key order, spacing or 22 against 22.0, and different whenever any value differs."""
    canonical = json.dumps(
        _normalised(dict(fields)), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
