"""Client tokens of a deployment (stack.tokens): made once, kept, rotated, read by the gateway's
own parser, and private to their readers. No broker."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.clients import Clients, token_line
from stack import tokens as stack_tokens
from stack.tokens import TOKENS_FILE, Client, ensure_tokens, token_path

CLIENTS = [Client("loadgen"), Client("driver")]


def _clients(directory: Path) -> Clients:
    return Clients.load(directory / TOKENS_FILE)


def test_tokens_are_made_once_then_kept(tmp_path: Path):
    first = ensure_tokens(tmp_path, CLIENTS)
    assert set(first) == {"loadgen", "driver"} and first["loadgen"] != first["driver"]
    clients = _clients(tmp_path)
    assert clients.names == ["driver", "loadgen"]
    for name, token in first.items():
        assert clients.authenticate(f"Bearer {token}") == name
        assert token_path(tmp_path, name).read_text().strip() == token
    text = (tmp_path / TOKENS_FILE).read_text()
    assert all(token not in text for token in first.values())  # hashes only
    assert ensure_tokens(tmp_path, CLIENTS) == first
    assert (tmp_path / TOKENS_FILE).read_text() == text


def test_files_are_readable_by_their_owner_alone(tmp_path: Path):
    ensure_tokens(tmp_path, CLIENTS)
    for path in (tmp_path / TOKENS_FILE, token_path(tmp_path, "driver")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o400, path
    assert not list(tmp_path.glob(".*.new"))


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_each_file_goes_to_the_user_that_reads_it(tmp_path: Path):
    ensure_tokens(tmp_path, [Client("loadgen", 10001), Client("driver")], owner=10001)
    assert (tmp_path / TOKENS_FILE).stat().st_uid == 10001
    assert token_path(tmp_path, "loadgen").stat().st_uid == 10001
    assert token_path(tmp_path, "driver").stat().st_uid == 0


def test_deleting_a_token_rotates_it_and_hand_added_clients_stay(tmp_path: Path):
    old = ensure_tokens(tmp_path, CLIENTS)
    tokens_file = tmp_path / TOKENS_FILE
    tokens_file.chmod(0o600)
    with tokens_file.open("a") as handle:  # as `python -m gateway.clients add` does
        handle.write(token_line("alice", "alices-token") + "\n")
    token_path(tmp_path, "driver").unlink()
    new = ensure_tokens(tmp_path, CLIENTS)
    assert new["loadgen"] == old["loadgen"] and new["driver"] != old["driver"]
    clients = _clients(tmp_path)
    assert clients.authenticate(f"Bearer {new['driver']}") == "driver"
    assert clients.authenticate(f"Bearer {old['driver']}") != "driver"  # revoked
    assert clients.authenticate("Bearer alices-token") == "alice"


def test_the_command_line_names_what_it_kept_and_refuses_a_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    assert stack_tokens.main(["--dir", str(tmp_path), "loadgen", "driver"]) == 0
    assert "clients loadgen" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        stack_tokens.main(["--dir", str(tmp_path), "no spaces"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / TOKENS_FILE).write_text("driver not-a-hash\n")
    assert stack_tokens.main(["--dir", str(broken), "loadgen"]) == 1
    assert "line 1" in capsys.readouterr().err
