"""The clients of a deployment and their tokens: the gateway's tokens file, and each token.

    python -m stack.tokens --dir /secrets --owner 10001 loadgen:10001 driver

For each client ``NAME[:UID]`` its token is kept in ``DIR/NAME-token``, readable by UID alone
(by root alone without one), and made at the first run (``gateway.clients.new_token``). The
tokens file ``DIR/gateway-tokens`` (``GATEWAY_TOKENS_FILE``: hashes only, in
``gateway.clients``'s format, readable by ``--owner``) lists the hash of each. Later runs
change nothing. Deleting a client's token file and running again rotates its token: the
client's old lines go, so the old token stops working at the gateway's next start. Lines of
other clients, added with ``python -m gateway.clients add FILE NAME``, are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.clients import Clients, TokensFileError, new_token, token_line
from smartgrid import contract

TOKENS_FILE = "gateway-tokens"
_HEADER = (
    "# The gateway's clients: one 'client-name sha256-of-token' per line (GATEWAY_TOKENS_FILE).\n"
    "# Add one with: python -m gateway.clients add <this file> <name>  (it prints the token).\n"
)


@dataclass(frozen=True)
class Client:
    name: str
    #: Who may read its token file (None: root alone).
    owner: int | None = None

    @classmethod
    def parse(cls, text: str) -> Client:
        name, _, owner = text.partition(":")
        if not contract.CLIENT_PATTERN.fullmatch(name):
            raise argparse.ArgumentTypeError(f"a client name must be {contract.CLIENT_RULE}")
        try:
            return cls(name, int(owner) if owner else None)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a user id: {owner!r}") from None


def token_path(directory: Path, client: str) -> Path:
    return directory / f"{client}-token"


def _write_private(path: Path, text: str, owner: int | None) -> None:
    """Replace ``path`` with ``text``, readable only by ``owner`` (the caller if None), never
    readable by anyone else in between."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    temporary.touch(mode=0o400)
    temporary.chmod(0o600)
    temporary.write_text(text)
    temporary.chmod(0o400)
    if owner is not None:
        os.chown(temporary, owner, owner)
    temporary.replace(path)


def _client_of(line: str) -> str | None:
    fields = line.split("#", 1)[0].split()
    return fields[0] if fields else None


def ensure_tokens(
    directory: Path, clients: list[Client], owner: int | None = None
) -> dict[str, str]:
    """Each client's token (kept, or made now) and the tokens file listing their hashes; see
    the module's docstring. Returns client name -> token."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens_file = directory / TOKENS_FILE
    kept = tokens_file.read_text(encoding="utf-8") if tokens_file.exists() else _HEADER
    lines = kept.splitlines()
    tokens = {}
    for client in clients:
        path = token_path(directory, client.name)
        token = path.read_text(encoding="utf-8").strip() if path.exists() else ""
        if not token:
            token = new_token()
            _write_private(path, token + "\n", client.owner)
        elif client.owner is not None and path.stat().st_uid != client.owner:
            os.chown(path, client.owner, client.owner)
        line = token_line(client.name, token)
        if line not in lines:
            # A new token, or one given anew: the client's earlier tokens are revoked.
            lines = [x for x in lines if _client_of(x) != client.name] + [line]
        tokens[client.name] = token
    text = "\n".join(lines) + "\n"
    Clients.parse(text, source=str(tokens_file))  # the gateway must be able to read it
    if text != kept:
        _write_private(tokens_file, text, owner)
    elif owner is not None and tokens_file.stat().st_uid != owner:
        os.chown(tokens_file, owner, owner)
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stack.tokens",
        description="Keep the gateway's tokens file and a token for each client (made at the "
        "first run; delete a client's token file to rotate it).",
    )
    parser.add_argument("--dir", type=Path, required=True, help="where the files are kept")
    parser.add_argument(
        "--owner", type=int, help=f"the user that reads {TOKENS_FILE} (the gateway's)"
    )
    parser.add_argument(
        "clients",
        nargs="+",
        type=Client.parse,
        metavar="NAME[:UID]",
        help="a client, and the user that may read its token (default: root alone)",
    )
    args = parser.parse_args(argv)
    try:
        tokens = ensure_tokens(args.dir, args.clients, args.owner)
    except TokensFileError as exc:
        print(f"stack.tokens: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.dir / TOKENS_FILE}: clients "
        + ", ".join(f"{name} ({token_path(args.dir, name)})" for name in tokens)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
