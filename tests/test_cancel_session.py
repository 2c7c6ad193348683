"""Cancel-Session (PROTOCOL.md 7.5, 6 tombstones, A12; checklist 29)."""

from __future__ import annotations

import json
import os
import typing as t
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import E_INVALIDARG
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import cancel_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import session_leftovers
from tests.conftest import tombstone_path
from tests.conftest import upload

PATH = "/bits/file.bin"
DATA = b"abcdefghij" * 50


def cancelled_ok(response: t.Any, sid: str) -> None:
    assert_ack(response, 200)
    assert response.headers["BITS-Session-Id"] == sid


def assert_session_gone(session_folder: Path, sid: str) -> None:
    assert session_leftovers(session_folder, sid) == []
    assert not (session_folder / "sessions" / sid).exists()
    assert not (session_folder / "locks" / f"{sid}.lock").exists()
    assert os.listdir(session_folder / "trash") == []


def test_cancel_before_completion(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    assert_ack(send_fragment(client, PATH, sid, DATA[:100], 0, len(DATA)), 200)
    cancelled_ok(cancel_session(client, PATH, sid), sid)
    assert os.listdir(upload_folder) == []
    assert_session_gone(session_folder, sid)
    assert json.loads(tombstone_path(session_folder, sid).read_text())["kind"] == "cancelled"


def test_cancel_without_any_fragment_creates_nothing(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    cancelled_ok(cancel_session(client, PATH, sid), sid)
    assert os.listdir(upload_folder) == []
    assert_session_gone(session_folder, sid)


def test_cancel_after_completion_keeps_the_committed_file(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    sid = upload(client, PATH, DATA, 200, close=False)
    cancelled_ok(cancel_session(client, PATH, sid), sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA
    assert_session_gone(session_folder, sid)


def test_repeated_cancel_is_200(client: FlaskClient, session_folder: Path) -> None:
    sid = create_session(client, PATH)
    cancelled_ok(cancel_session(client, PATH, sid), sid)
    cancelled_ok(cancel_session(client, PATH, sid), sid)
    cancelled_ok(cancel_session(client, PATH, sid.lower()), sid)
    assert_session_gone(session_folder, sid)


def test_cancel_after_close_is_200(client: FlaskClient, upload_folder: Path) -> None:
    sid = upload(client, PATH, DATA, 500)
    cancelled_ok(cancel_session(client, PATH, sid), sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


@pytest.mark.parametrize("packet_type", ["CANCEL-SESSION", "cancel-session"])
def test_cancel_packet_type_any_case(client: FlaskClient, packet_type: str) -> None:
    sid = create_session(client, PATH)
    cancelled_ok(bits_post(client, PATH, packet_type, session_id=sid), sid)


@pytest.mark.parametrize(
    "session_id", ["{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}", "garbage", ""]
)
def test_cancel_unknown_session_is_500(client: FlaskClient, session_id: str) -> None:
    response = cancel_session(client, PATH, session_id)
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)


def test_cancel_on_another_path_is_unknown_and_keeps_the_session(
    client: FlaskClient, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    assert_ack(cancel_session(client, "/bits/other.bin", sid), 500, BG_E_SESSION_NOT_FOUND)
    assert (session_folder / "sessions" / sid).is_dir()
    assert_ack(send_fragment(client, PATH, sid, DATA, 0, len(DATA)), 200)


def test_cancel_with_a_body_is_400_and_keeps_the_session(
    client: FlaskClient, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    response = bits_post(client, PATH, "Cancel-Session", b"x", session_id=sid)
    assert_ack(response, 400, E_INVALIDARG)
    assert (session_folder / "sessions" / sid).is_dir()


def test_cancel_of_another_owners_session_is_unknown(
    client: FlaskClient, session_folder: Path
) -> None:
    created = bits_post(client, PATH, "Create-Session",
                        protocols="{7df0354d-249b-430f-820d-3d2a9bef4931}",
                        environ={"REMOTE_USER": "alice"})
    sid = assert_ack(created, 200).headers["BITS-Session-Id"]
    response = bits_post(client, PATH, "Cancel-Session", session_id=sid,
                         environ={"REMOTE_USER": "bob"})
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert (session_folder / "sessions" / sid).is_dir()
