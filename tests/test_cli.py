"""``flask bits sessions|cleanup|cancel`` through ``app.test_cli_runner()``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flask.testing import FlaskClient
from flask.testing import FlaskCliRunner

from flask_bits.server import BITSServer
from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import assert_ack
from tests.conftest import cancel_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import session_leftovers
from tests.conftest import tombstone_path
from tests.conftest import upload

DAY = 24 * 3600


def age_session(server: BITSServer, sid: str, seconds: float) -> None:
    """Pretend the session was last active ``seconds`` ago (rewrite its state file)."""
    path = Path(server.store.session_dir(sid)) / "state.json"
    state = json.loads(path.read_text())
    state["last_activity"] -= seconds
    state["created"] -= seconds
    path.write_text(json.dumps(state))


# -- sessions ------------------------------------------------------------------------------


def test_sessions_when_there_are_none(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["bits", "sessions"])
    assert result.exit_code == 0, result.output
    assert "No open sessions" in result.output


def test_sessions_table(runner: FlaskCliRunner, client: FlaskClient) -> None:
    a = create_session(client, "/bits/a.bin")
    b = create_session(client, "/bits/b.bin")
    assert_ack(send_fragment(client, "/bits/b.bin", b, b"x" * 10, 0, 40), 200)
    result = runner.invoke(args=["bits", "sessions"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "SESSION" in lines[0]
    row_a = next(line for line in lines if a in line)
    row_b = next(line for line in lines if b in line)
    assert "a.bin" in row_a and "0/?" in row_a
    assert "b.bin" in row_b and "10/40" in row_b


def test_sessions_json(runner: FlaskCliRunner, client: FlaskClient) -> None:
    sid = create_session(client, "/bits/file.bin")
    assert_ack(send_fragment(client, "/bits/file.bin", sid, b"abc", 0, 9), 200)
    result = runner.invoke(args=["bits", "sessions", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == sid
    assert row["directory"] == "bits"
    assert row["remote_path"] == "file.bin"
    assert row["received"] == 3
    assert row["total"] == 9
    assert row["owner"] is None
    assert 0 <= row["idle"] < 3600


def test_sessions_json_when_there_are_none(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["bits", "sessions", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == []


def test_closed_sessions_are_not_listed(runner: FlaskCliRunner, client: FlaskClient) -> None:
    sid = upload(client, "/bits/file.bin", b"abc", 2)
    result = runner.invoke(args=["bits", "sessions", "--json"])
    assert sid not in result.output
    assert json.loads(result.output) == []


# -- cleanup -------------------------------------------------------------------------------


def test_cleanup_with_nothing_to_do(runner: FlaskCliRunner, client: FlaskClient) -> None:
    sid = create_session(client, "/bits/file.bin")
    result = runner.invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0, result.output
    assert "0 item(s) removed" in result.output
    assert sid not in result.output


def test_cleanup_removes_expired_sessions_and_is_idempotent(
    runner: FlaskCliRunner, client: FlaskClient, bits: BITSServer, session_folder: Path,
    upload_folder: Path,
) -> None:
    old = create_session(client, "/bits/old.bin")
    assert_ack(send_fragment(client, "/bits/old.bin", old, b"abc", 0, 9), 200)
    young = create_session(client, "/bits/young.bin")
    age_session(bits, old, bits.config.session_timeout + 60)
    result = runner.invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0, result.output
    assert f"removed session {old}" in result.output
    assert young not in result.output
    assert "1 item(s) removed" in result.output
    assert session_leftovers(session_folder, old) == []
    assert bits.store.peek(young) is not None
    assert os.listdir(upload_folder) == []
    again = runner.invoke(args=["bits", "cleanup"])
    assert again.exit_code == 0
    assert "0 item(s) removed" in again.output
    assert old not in again.output
    response = send_fragment(client, "/bits/old.bin", old, b"def", 3, 9)
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)


def test_cleanup_removes_expired_tombstones(
    runner: FlaskCliRunner, client: FlaskClient, bits: BITSServer, session_folder: Path
) -> None:
    sid = create_session(client, "/bits/file.bin")
    assert_ack(cancel_session(client, "/bits/file.bin", sid), 200)
    tomb = tombstone_path(session_folder, sid)
    assert tomb.exists()
    past = time.time() - bits.config.tombstone_timeout - 60
    os.utime(tomb, (past, past))
    result = runner.invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0, result.output
    assert f"removed tombstone {sid}" in result.output
    assert not tomb.exists()
    assert_ack(cancel_session(client, "/bits/file.bin", sid), 500, BG_E_SESSION_NOT_FOUND)


# -- cancel --------------------------------------------------------------------------------


def test_cancel_a_session(
    runner: FlaskCliRunner, client: FlaskClient, session_folder: Path, upload_folder: Path
) -> None:
    sid = create_session(client, "/bits/file.bin")
    assert_ack(send_fragment(client, "/bits/file.bin", sid, b"abc", 0, 9), 200)
    result = runner.invoke(args=["bits", "cancel", sid.lower()])
    assert result.exit_code == 0, result.output
    assert "cancelled" in result.output
    assert session_leftovers(session_folder, sid) == []
    assert os.listdir(upload_folder) == []
    # The client's next packets: a Fragment finds no session, its Cancel-Session gets 200.
    assert_ack(send_fragment(client, "/bits/file.bin", sid, b"def", 3, 9), 500,
               BG_E_SESSION_NOT_FOUND)
    assert_ack(cancel_session(client, "/bits/file.bin", sid), 200)
    listing = runner.invoke(args=["bits", "sessions", "--json"])
    assert json.loads(listing.output) == []


def test_cancel_an_unknown_session_fails(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["bits", "cancel", "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"])
    assert result.exit_code != 0
    assert "no open session" in result.output


def test_cancel_twice_fails_the_second_time(runner: FlaskCliRunner, client: FlaskClient) -> None:
    sid = create_session(client, "/bits/file.bin")
    assert runner.invoke(args=["bits", "cancel", sid]).exit_code == 0
    second = runner.invoke(args=["bits", "cancel", sid])
    assert second.exit_code != 0
