"""Clients: the tokens file, Bearer tokens checked against their hashes, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clients import AuthFailure, Clients, TokensFileError, hash_token, token_line

TOKEN_1, TOKEN_2, TOKEN_3 = "tok-one", "tok.two~", "tok/three+=="
FILE = f"""# smartgrid gateway clients
fleet-1 {hash_token(TOKEN_1)}
  fleet-2   {hash_token(TOKEN_2).upper()}   # upper-case hex is fine

fleet-1 {hash_token(TOKEN_3)}  # a second token, while the first is rotated out
"""


@pytest.fixture
def clients() -> Clients:
    return Clients.parse(FILE)


def test_a_valid_token_names_its_client(clients):
    assert clients.authenticate(f"Bearer {TOKEN_1}") == "fleet-1"
    assert clients.authenticate(f"Bearer {TOKEN_2}") == "fleet-2"
    assert clients.authenticate(f"Bearer {TOKEN_3}") == "fleet-1"
    assert clients.authenticate(f"bearer   {TOKEN_1}") == "fleet-1"  # the scheme is case-blind
    assert clients.names == ["fleet-1", "fleet-2"]


@pytest.mark.parametrize(
    "header, code",
    [
        (None, None),
        ("", None),
        ("Bearer", "invalid_request"),
        ("Basic Zm9vOmJhcg==", "invalid_request"),
        (f"Bearer {TOKEN_1} extra", "invalid_request"),
        ("Bearer wrong-token", "invalid_token"),
        (f"Bearer {hash_token(TOKEN_1)}", "invalid_token"),  # the hash is not the token
    ],
)
def test_a_missing_or_wrong_token_is_a_401_json_with_a_challenge(clients, header, code):
    failure = clients.authenticate(header)
    assert isinstance(failure, AuthFailure) and failure.code == code
    answer = failure.answer()
    assert answer.status == 401 and answer.body["error"] == "unauthorized" and answer.body["detail"]
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="smartgrid"')
    assert (f'error="{code}"' in challenge) == (code is not None)


@given(st.text(max_size=100))
def test_no_header_value_authenticates_without_a_listed_token(header):
    result = Clients.parse(FILE).authenticate(header)
    if isinstance(result, AuthFailure):
        assert result.answer().status == 401
    else:
        assert header.split()[-1] in (TOKEN_1, TOKEN_2, TOKEN_3)


@pytest.mark.parametrize(
    "text, words",
    [
        ("fleet-1\n", "line 1: expected 'client-name sha256-hex', found 1 field"),
        (f"a b {hash_token('x')}\n", "found 3 field"),
        (f"\n\nbad/name {hash_token('x')}\n", "line 3: client name 'bad/name'"),
        ("fleet-1 plain-token\n", "not a SHA-256 in hex"),
        (f"fleet-1 {hash_token('x')[:63]}\n", "not a SHA-256"),
        (
            f"a {hash_token('x')}\nb {hash_token('x')}\n",
            "line 2: this token hash is already listed for 'a'",
        ),
        ("# only comments\n\n", "lists no clients"),
    ],
)
def test_a_bad_tokens_file_is_refused_naming_the_line_and_the_fault(text, words):
    with pytest.raises(TokensFileError, match=words.replace("(", r"\(")) as caught:
        Clients.parse(text, source="tokens.txt")
    assert str(caught.value).startswith("tokens.txt")


def test_an_unreadable_tokens_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TokensFileError, match="cannot read the tokens file"):
        Clients.load(tmp_path / "missing")


def test_a_token_line_is_what_the_file_expects():
    clients = Clients.parse(token_line("fleet-9", "secret") + "\n")
    assert clients.authenticate("Bearer secret") == "fleet-9"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.clients", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_adds_a_client_whose_printed_token_works(tmp_path: Path):
    path = tmp_path / "tokens"
    first = run_cli("add", str(path), "fleet-1")
    second = run_cli("add", str(path), "loadgen")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    clients = Clients.load(path)
    assert clients.authenticate(f"Bearer {first.stdout.strip()}") == "fleet-1"
    assert clients.authenticate(f"Bearer {second.stdout.strip()}") == "loadgen"
    assert first.stdout.strip() not in path.read_text()  # only its hash is stored
    checked = run_cli("check", str(path))
    assert checked.returncode == 0 and checked.stdout.split() == ["fleet-1", "loadgen"]


def test_the_cli_check_reports_a_bad_file(tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("fleet-1 not-a-hash\n")
    result = run_cli("check", str(path))
    assert result.returncode == 1 and "line 1" in result.stderr


def test_the_cli_has_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "add" in result.stdout
