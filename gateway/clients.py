"""Clients and their tokens: the tokens file, and checking ``Authorization: Bearer <token>``.

The file (``GATEWAY_TOKENS_FILE``) holds one ``client-name sha256-hex`` per line: the SHA-256
of each token, never the token. ``#`` starts a comment; blank lines are ignored. A client may
have several lines (several tokens, to rotate one without downtime). A bad line stops the
gateway at start with the file, the line number and what is wrong.

``python -m gateway.clients add FILE NAME`` makes a token, appends its line to FILE and prints
the token (the only time it is shown).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.answers import Answer, error
from smartgrid import contract

REALM = "smartgrid"
_HEX = re.compile(r"[0-9a-fA-F]{64}")
# RFC 6750 section 2.1: b64token.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)


class TokensFileError(ValueError):
    """A tokens file that cannot be used; ``str(exc)`` names the file, the line and why."""


@dataclass(frozen=True)
class AuthFailure:
    detail: str
    #: RFC 6750 error code: None when no credentials were sent at all.
    code: str | None = None

    def answer(self) -> Answer:
        challenge = f'Bearer realm="{REALM}"'
        if self.code is not None:
            challenge += f', error="{self.code}"'
        return error(401, "unauthorized", self.detail, headers={"WWW-Authenticate": challenge})


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """256 random bits, in characters a Bearer token may hold."""
    return secrets.token_urlsafe(32)


def token_line(client: str, token: str) -> str:
    return f"{client} {hash_token(token)}"


class Clients:
    def __init__(self, entries: list[tuple[str, str]]):
        if not entries:
            raise ValueError("no clients")
        self._entries = tuple((client, bytes.fromhex(digest)) for client, digest in entries)

    @property
    def names(self) -> list[str]:
        return sorted({client for client, _ in self._entries})

    @classmethod
    def parse(cls, text: str, source: str = "the tokens file") -> Clients:
        entries: list[tuple[str, str]] = []
        owners: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}, line {number}"
            parts = line.split()
            if len(parts) != 2:
                raise TokensFileError(
                    f"{where}: expected 'client-name sha256-hex', found {len(parts)} field(s)"
                )
            client, digest = parts
            if not contract.CLIENT_PATTERN.fullmatch(client):
                raise TokensFileError(
                    f"{where}: client name {client[:80]!r} must be {contract.CLIENT_RULE}"
                )
            if not _HEX.fullmatch(digest):
                raise TokensFileError(
                    f"{where}: {digest[:80]!r} is not a SHA-256 in hex (64 hex digits); store "
                    "the hash of the token, not the token"
                )
            digest = digest.lower()
            if digest in owners:
                raise TokensFileError(
                    f"{where}: this token hash is already listed for {owners[digest]!r}"
                )
            owners[digest] = client
            entries.append((client, digest))
        if not entries:
            raise TokensFileError(f"{source} lists no clients: nobody could use the API")
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path) -> Clients:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokensFileError(f"cannot read the tokens file {path}: {exc}") from None
        return cls.parse(text, source=str(path))

    def authenticate(self, authorization: str | None) -> str | AuthFailure:
        """The client a request's ``Authorization`` header names, or why it is refused."""
        if not authorization:
            return AuthFailure("send Authorization: Bearer <token>")
        match = _BEARER.fullmatch(authorization.strip())
        if match is None:
            return AuthFailure(
                "the Authorization header must be 'Bearer <token>'", code="invalid_request"
            )
        presented = hashlib.sha256(match.group(1).encode()).digest()
        # Compare with every entry, without stopping at a match: the time taken says nothing
        # about which entry (or how much of one) matched.
        found = None
        for client, digest in self._entries:
            if hmac.compare_digest(presented, digest):
                found = client
        if found is None:
            return AuthFailure("the token is not valid", code="invalid_token")
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.clients",
        description="Manage the gateway's tokens file (GATEWAY_TOKENS_FILE).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser(
        "add", help="make a token for a client, append its hash to FILE, print the token"
    )
    add.add_argument("file", type=Path)
    add.add_argument("client")
    check = commands.add_parser(
        "check", help="read FILE and list its clients, or say what is wrong"
    )
    check.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "add":
        if not contract.CLIENT_PATTERN.fullmatch(args.client):
            parser.error(f"a client name must be {contract.CLIENT_RULE}")
        token = new_token()
        with args.file.open("a", encoding="utf-8") as tokens:
            tokens.write(token_line(args.client, token) + "\n")
        print(token)
        return 0
    try:
        clients = Clients.load(args.file)
    except TokensFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    print("\n".join(clients.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
