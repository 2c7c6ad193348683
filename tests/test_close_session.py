"""Close-Session (PROTOCOL.md 7.4, 7.3 empty-file decision, 6 tombstones; checklist 27-28)."""

from __future__ import annotations

import json
import os
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_bits.server import BITSServer
from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import E_ACCESSDENIED
from tests.conftest import E_INVALIDARG
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import cancel_session
from tests.conftest import close_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import session_leftovers
from tests.conftest import tombstone_path
from tests.conftest import upload

PATH = "/bits/file.bin"
DATA = b"0123456789" * 100


def closed_ok(response: t.Any, sid: str) -> None:
    assert_ack(response, 200)
    assert response.headers["BITS-Session-Id"] == sid
    assert "BITS-Received-Content-Range" not in response.headers


def assert_session_gone(session_folder: Path, sid: str) -> None:
    assert session_leftovers(session_folder, sid) == []
    assert not (session_folder / "sessions" / sid).exists()
    assert not (session_folder / "locks" / f"{sid}.lock").exists()
    assert os.listdir(session_folder / "trash") == []


def test_close_after_completion(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    sid = upload(client, PATH, DATA, 300, close=False)
    closed_ok(close_session(client, PATH, sid), sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA
    assert_session_gone(session_folder, sid)
    tomb = json.loads(tombstone_path(session_folder, sid).read_text())
    assert tomb["kind"] == "closed"


def test_repeated_close_is_200(client: FlaskClient, session_folder: Path) -> None:
    sid = upload(client, PATH, DATA, 300)
    closed_ok(close_session(client, PATH, sid), sid)
    closed_ok(close_session(client, PATH, sid.lower()), sid)
    assert_session_gone(session_folder, sid)


@pytest.mark.parametrize("packet_type", ["CLOSE-SESSION", "close-session"])
def test_close_packet_type_any_case(client: FlaskClient, packet_type: str) -> None:
    sid = upload(client, PATH, DATA, 1000, close=False)
    closed_ok(bits_post(client, PATH, packet_type, session_id=sid), sid)


def test_close_before_completion_discards_the_data(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    assert_ack(send_fragment(client, PATH, sid, DATA[:100], 0, len(DATA)), 200)
    closed_ok(close_session(client, PATH, sid), sid)
    assert os.listdir(upload_folder) == []  # a partial file never reaches the destination
    assert_session_gone(session_folder, sid)
    # The client cannot continue the session it closed.
    response = send_fragment(client, PATH, sid, DATA[100:200], 100, len(DATA))
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert os.listdir(upload_folder) == []


def test_close_without_any_fragment_commits_an_empty_file(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    # Project decision (PROTOCOL.md 7.3): no Fragment at all means a 0-byte file.
    sid = create_session(client, PATH)
    closed_ok(close_session(client, PATH, sid), sid)
    assert (upload_folder / "file.bin").read_bytes() == b""
    assert_session_gone(session_folder, sid)


def test_close_without_any_fragment_keeps_an_existing_file(
    client: FlaskClient, upload_folder: Path
) -> None:
    sid = create_session(client, PATH)
    (upload_folder / "file.bin").write_bytes(b"someone else")
    response = close_session(client, PATH, sid)
    assert_ack(response, 409, E_ACCESSDENIED)  # the overwrite policy of 8.2
    assert (upload_folder / "file.bin").read_bytes() == b"someone else"


def test_close_without_any_fragment_with_overwrites(
    make_app: t.Callable[..., Flask], upload_folder: Path
) -> None:
    client = make_app(BITS_ALLOW_OVERWRITES=True).test_client()
    sid = create_session(client, PATH)
    (upload_folder / "file.bin").write_bytes(b"old")
    closed_ok(close_session(client, PATH, sid), sid)
    assert (upload_folder / "file.bin").read_bytes() == b""


def test_close_after_an_empty_file_fragment(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    assert_ack(bits_post(client, PATH, "Fragment", session_id=sid,
                         content_range="bytes 0--1/0"), 200)
    closed_ok(close_session(client, PATH, sid), sid)
    assert (upload_folder / "file.bin").read_bytes() == b""
    assert_session_gone(session_folder, sid)


def test_close_unknown_session_is_500(client: FlaskClient) -> None:
    response = close_session(client, PATH, "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}")
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)


def test_close_without_session_id_is_500(client: FlaskClient) -> None:
    assert_ack(bits_post(client, PATH, "Close-Session"), 500, BG_E_SESSION_NOT_FOUND)


def test_close_on_another_path_is_unknown_and_keeps_the_session(
    client: FlaskClient, upload_folder: Path
) -> None:
    sid = create_session(client, PATH)
    assert_ack(send_fragment(client, PATH, sid, DATA[:100], 0, len(DATA)), 200)
    assert_ack(close_session(client, "/bits/other.bin", sid), 500, BG_E_SESSION_NOT_FOUND)
    response = send_fragment(client, PATH, sid, DATA[100:], 100, len(DATA))
    assert_ack(response, 200)
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_close_with_a_body_is_400_and_keeps_the_session(
    client: FlaskClient, session_folder: Path
) -> None:
    sid = create_session(client, PATH)
    response = bits_post(client, PATH, "Close-Session", b"x", session_id=sid)
    assert_ack(response, 400, E_INVALIDARG)
    assert (session_folder / "sessions" / sid).is_dir()


def test_close_after_cancel_is_200(client: FlaskClient, upload_folder: Path) -> None:
    sid = create_session(client, PATH)
    assert_ack(cancel_session(client, PATH, sid), 200)
    closed_ok(close_session(client, PATH, sid), sid)
    assert os.listdir(upload_folder) == []  # no empty file for a cancelled session


def test_close_after_the_tombstone_expired_is_500(
    client: FlaskClient, bits: BITSServer
) -> None:
    sid = upload(client, PATH, DATA, 1000)
    removed = bits.store.cleanup(now=time.time() + 2 * bits.config.tombstone_timeout,
                                 tombstone_timeout=bits.config.tombstone_timeout)
    assert ("tombstone", sid) in removed
    assert_ack(close_session(client, PATH, sid), 500, BG_E_SESSION_NOT_FOUND)


def test_expired_session_is_gone_for_fragments(
    client: FlaskClient, bits: BITSServer, upload_folder: Path, session_folder: Path
) -> None:
    # Checklist 30: an idle session is removed by cleanup; later packets get 0x8020001F.
    sid = create_session(client, PATH)
    assert_ack(send_fragment(client, PATH, sid, DATA[:100], 0, len(DATA)), 200)
    later = time.time() + bits.config.session_timeout + 1
    assert ("session", sid) in bits.store.cleanup(now=later,
                                                  tombstone_timeout=bits.config.tombstone_timeout)
    assert_session_gone(session_folder, sid)
    response = send_fragment(client, PATH, sid, DATA[100:], 100, len(DATA))
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert_ack(close_session(client, PATH, sid), 500, BG_E_SESSION_NOT_FOUND)
    assert os.listdir(upload_folder) == []


def test_close_of_an_owned_session_leaves_nothing_behind(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    alice = {"REMOTE_USER": "alice"}
    created = bits_post(client, PATH, "Create-Session",
                        protocols="{7df0354d-249b-430f-820d-3d2a9bef4931}", environ=alice)
    sid = assert_ack(created, 200).headers["BITS-Session-Id"]
    done = bits_post(client, PATH, "Fragment", DATA, session_id=sid,
                     content_range=f"bytes 0-{len(DATA) - 1}/{len(DATA)}", environ=alice)
    assert_ack(done, 200)
    # Another user's Close is an unknown session and changes nothing.
    other = bits_post(client, PATH, "Close-Session", session_id=sid,
                      environ={"REMOTE_USER": "bob"})
    assert_ack(other, 500, BG_E_SESSION_NOT_FOUND)
    closed_ok(bits_post(client, PATH, "Close-Session", session_id=sid, environ=alice), sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA
    assert_session_gone(session_folder, sid)  # owner markers included
    again = bits_post(client, PATH, "Close-Session", session_id=sid,
                      environ={"REMOTE_USER": "bob"})
    assert_ack(again, 500, BG_E_SESSION_NOT_FOUND)  # the tombstone is alice's


def test_repeated_close_on_another_path_is_unknown(client: FlaskClient) -> None:
    # A tombstone answers 200 only for the session's own path (PROTOCOL.md 6).
    sid = upload(client, PATH, DATA, 1000)
    assert_ack(close_session(client, "/bits/other.bin", sid), 500, BG_E_SESSION_NOT_FOUND)
    assert_ack(close_session(client, PATH, sid), 200)
