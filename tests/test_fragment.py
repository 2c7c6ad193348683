"""Fragment (PROTOCOL.md 7.3, 8.1, 8.2; checklist 9-19)."""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import BG_E_TOO_LARGE
from tests.conftest import E_ACCESSDENIED
from tests.conftest import E_INVALIDARG
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import cancel_session
from tests.conftest import close_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import upload

PATH = "/bits/file.bin"
DATA = bytes(range(256)) * 4  # 1,024 recognisable bytes


def data_file(session_folder: Path, sid: str) -> Path:
    return session_folder / "sessions" / sid / "data.part"


def received(response: t.Any) -> str:
    return t.cast(str, response.headers["BITS-Received-Content-Range"])


def ok(response: t.Any, n: int, sid: str) -> None:
    assert_ack(response, 200)
    assert received(response) == str(n)
    assert response.headers["BITS-Session-Id"] == sid
    assert "BITS-Reply-URL" not in response.headers


def fragment(client: FlaskClient, sid: str, first: int, last: int, total: int = len(DATA),
             data: bytes | None = None, **headers: t.Any) -> t.Any:
    """Send bytes first..last of DATA (or ``data`` with that range)."""
    body = DATA[first : last + 1] if data is None else data
    return bits_post(client, PATH, "Fragment", body, session_id=sid,
                     content_range=f"bytes {first}-{last}/{total}", **headers)


@pytest.fixture
def sid(client: FlaskClient) -> str:
    return create_session(client, PATH)


# -- in-order fragments (checklist 10, 19) -------------------------------------------------


def test_in_order_fragments(client: FlaskClient, sid: str, upload_folder: Path) -> None:
    ok(fragment(client, sid, 0, 99, 1000, DATA[:100]), 100, sid)
    ok(fragment(client, sid, 100, 199, 1000, DATA[100:200]), 200, sid)
    assert not (upload_folder / "file.bin").exists()


def test_whole_file_in_one_fragment(client: FlaskClient, sid: str, upload_folder: Path) -> None:
    ok(fragment(client, sid, 0, len(DATA) - 1), len(DATA), sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


@pytest.mark.parametrize(("size", "length"), [(1, 40), (7, 100), (100, 1024), (1023, 1024),
                                              (1024, 1024), (5000, 1024)])
def test_upload_in_fragments_of_any_size(
    client: FlaskClient, upload_folder: Path, session_folder: Path, size: int, length: int
) -> None:
    sid = upload(client, PATH, DATA[:length], size)
    assert (upload_folder / "file.bin").read_bytes() == DATA[:length]
    assert not (session_folder / "sessions" / sid).exists()


def test_fragment_larger_than_the_copy_buffer(
    client: FlaskClient, upload_folder: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 17)
    upload(client, PATH, data, len(data))
    assert (upload_folder / "file.bin").read_bytes() == data


@pytest.mark.parametrize("packet_type", ["FRAGMENT", "fragment"])
def test_fragment_packet_type_any_case(client: FlaskClient, sid: str, packet_type: str) -> None:
    response = bits_post(client, PATH, packet_type, DATA[:10], session_id=sid,
                         content_range=f"bytes 0-9/{len(DATA)}")
    ok(response, 10, sid)


def test_session_id_any_case(client: FlaskClient, sid: str) -> None:
    ok(fragment(client, sid.lower(), 0, 9), 10, sid)
    ok(fragment(client, sid.strip("{}"), 10, 19), 20, sid)


# -- completion and commit (checklist 19, 21; 8.1, 8.2) ------------------------------------


def test_file_appears_only_with_the_last_byte(
    client: FlaskClient, sid: str, upload_folder: Path
) -> None:
    for first in range(0, len(DATA) - 100, 100):
        ok(fragment(client, sid, first, first + 99), first + 100, sid)
        assert os.listdir(upload_folder) == []  # nothing, not even a temporary file
    ok(fragment(client, sid, 1000, 1023), 1024, sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA  # before Close-Session
    assert sorted(os.listdir(upload_folder)) == ["file.bin"]


def test_retried_completing_fragment_gets_the_same_ack(
    client: FlaskClient, sid: str, upload_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 511), 512, sid)
    first = fragment(client, sid, 512, 1023)
    ok(first, 1024, sid)
    mtime = (upload_folder / "file.bin").stat().st_mtime_ns
    again = fragment(client, sid, 512, 1023, data=b"\xff" * 512)  # different bytes
    ok(again, 1024, sid)
    assert sorted(again.headers.items()) == sorted(first.headers.items())
    assert (upload_folder / "file.bin").read_bytes() == DATA
    assert (upload_folder / "file.bin").stat().st_mtime_ns == mtime


def test_any_fragment_after_completion_gets_the_final_ack(
    client: FlaskClient, sid: str, upload_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 1023), 1024, sid)
    ok(fragment(client, sid, 0, 9, data=b"X" * 10), 1024, sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_destination_appearing_before_completion_is_409_and_the_session_survives(
    client: FlaskClient, sid: str, upload_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 511), 512, sid)
    (upload_folder / "file.bin").write_bytes(b"someone else")
    response = fragment(client, sid, 512, 1023)
    assert_ack(response, 409, E_ACCESSDENIED)
    assert (upload_folder / "file.bin").read_bytes() == b"someone else"
    (upload_folder / "file.bin").unlink()
    ok(fragment(client, sid, 512, 1023), 1024, sid)  # the client retries later
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_destination_appearing_with_overwrites_is_replaced(
    make_app: t.Callable[..., Flask], upload_folder: Path
) -> None:
    client = make_app(BITS_ALLOW_OVERWRITES=True).test_client()
    sid = create_session(client, PATH)
    (upload_folder / "file.bin").write_bytes(b"someone else")
    ok(fragment(client, sid, 0, 1023), 1024, sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_two_sessions_for_one_destination(
    client: FlaskClient, upload_folder: Path
) -> None:
    a = create_session(client, PATH)
    b = create_session(client, PATH)
    ok(fragment(client, a, 0, 1023), 1024, a)
    assert_ack(fragment(client, b, 0, 1023, data=b"B" * 1024), 409, E_ACCESSDENIED)
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_last_commit_wins_with_overwrites(
    make_app: t.Callable[..., Flask], upload_folder: Path
) -> None:
    client = make_app(BITS_ALLOW_OVERWRITES=True).test_client()
    a = create_session(client, PATH)
    b = create_session(client, PATH)
    ok(fragment(client, a, 0, 1023), 1024, a)
    ok(fragment(client, b, 0, 1023, data=b"B" * 1024), 1024, b)
    assert (upload_folder / "file.bin").read_bytes() == b"B" * 1024


def test_folder_replaced_by_a_symlink_before_commit_is_refused(
    client: FlaskClient, upload_folder: Path, tmp_path: Path
) -> None:
    (upload_folder / "dir").mkdir(parents=True)
    sid = create_session(client, "/bits/dir/file.bin")
    (upload_folder / "dir").rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (upload_folder / "dir").symlink_to(outside, target_is_directory=True)
    response = bits_post(client, "/bits/dir/file.bin", "Fragment", b"abc", session_id=sid,
                         content_range="bytes 0-2/3")
    assert_ack(response, 403, E_ACCESSDENIED)
    assert os.listdir(outside) == []


# -- overlap, duplicates, gaps (checklist 11-13; A10) --------------------------------------


def test_overlapping_fragment_writes_only_new_bytes(
    client: FlaskClient, sid: str, upload_folder: Path, session_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 99), 100, sid)
    # Bytes 50..149: the overlap 50..99 carries garbage that must not be written.
    body = b"X" * 50 + DATA[100:150]
    ok(fragment(client, sid, 50, 149, data=body), 150, sid)
    assert data_file(session_folder, sid).read_bytes()[:150] == DATA[:150]
    ok(fragment(client, sid, 150, 1023), 1024, sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_duplicate_fragment_is_200_with_unchanged_offset(
    client: FlaskClient, sid: str, upload_folder: Path, session_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 199), 200, sid)
    ok(fragment(client, sid, 0, 99, data=b"Y" * 100), 200, sid)
    ok(fragment(client, sid, 100, 199, data=b"Z" * 100), 200, sid)
    ok(fragment(client, sid, 0, 199, data=b"W" * 200), 200, sid)
    assert data_file(session_folder, sid).read_bytes() == DATA[:200]
    ok(fragment(client, sid, 200, 1023), 1024, sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


def test_fragment_ending_exactly_at_n_minus_one_writes_nothing(
    client: FlaskClient, sid: str, session_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 99), 100, sid)
    ok(fragment(client, sid, 99, 99, data=b"!"), 100, sid)
    ok(fragment(client, sid, 99, 100, data=b"!" + DATA[100:101]), 101, sid)
    assert data_file(session_folder, sid).read_bytes() == DATA[:101]


def test_gap_is_416_with_the_next_offset(
    client: FlaskClient, sid: str, session_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 99), 100, sid)
    response = fragment(client, sid, 200, 299)
    assert_ack(response, 416)  # no error headers (A9)
    assert received(response) == "100"
    assert response.headers["BITS-Session-Id"] == sid
    assert data_file(session_folder, sid).read_bytes() == DATA[:100]  # nothing written
    ok(fragment(client, sid, 100, 199), 200, sid)


def test_gap_on_the_first_fragment(client: FlaskClient, sid: str, session_folder: Path) -> None:
    response = fragment(client, sid, 1, 10)
    assert_ack(response, 416)
    assert received(response) == "0"
    assert data_file(session_folder, sid).read_bytes() == b""


def test_gap_including_the_last_byte_does_not_complete(
    client: FlaskClient, sid: str, upload_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 99), 100, sid)
    assert_ack(fragment(client, sid, 500, 1023), 416)
    assert not (upload_folder / "file.bin").exists()


# -- total length (checklist 14, 18) -------------------------------------------------------


def test_total_change_is_400_and_the_session_survives(
    client: FlaskClient, sid: str, session_folder: Path
) -> None:
    ok(fragment(client, sid, 0, 99, 1000, DATA[:100]), 100, sid)
    response = fragment(client, sid, 100, 199, 2000, DATA[100:200])
    assert_ack(response, 400, E_INVALIDARG)
    assert received(response) == "100"
    assert data_file(session_folder, sid).read_bytes() == DATA[:100]
    ok(fragment(client, sid, 100, 199, 1000, DATA[100:200]), 200, sid)


def test_total_above_the_maximum_upload_size_is_500(
    make_app: t.Callable[..., Flask], session_folder: Path
) -> None:
    client = make_app(BITS_MAX_UPLOAD_SIZE=1000).test_client()
    sid = create_session(client, PATH)
    too_large = assert_ack(fragment(client, sid, 0, 99, 1001, DATA[:100]), 500, BG_E_TOO_LARGE)
    assert received(too_large) == "0"
    assert data_file(session_folder, sid).read_bytes() == b""
    ok(fragment(client, sid, 0, 99, 1000, DATA[:100]), 100, sid)  # the session survives


def test_total_equal_to_the_maximum_upload_size(
    make_app: t.Callable[..., Flask], upload_folder: Path
) -> None:
    client = make_app(BITS_MAX_UPLOAD_SIZE=len(DATA)).test_client()
    upload(client, PATH, DATA, 300)
    assert (upload_folder / "file.bin").read_bytes() == DATA


# -- framing and syntax (checklist 15-17) --------------------------------------------------


@pytest.mark.parametrize("body_size", [0, 99, 101])
def test_content_length_different_from_the_range_is_400(
    client: FlaskClient, sid: str, session_folder: Path, body_size: int
) -> None:
    response = bits_post(client, PATH, "Fragment", DATA[:body_size], session_id=sid,
                         content_range="bytes 0-99/1024")
    assert_ack(response, 400, E_INVALIDARG)
    assert data_file(session_folder, sid).read_bytes() == b""
    ok(fragment(client, sid, 0, 99), 100, sid)


@pytest.mark.parametrize(
    "content_range",
    [
        "bytes +0-99/1024",
        "bytes 0-+99/1024",
        "bytes 0_0-99/1024",
        "bytes \u0660-\u0669\u0669/1024",  # non-ASCII digits
        "bytes \uff10-99/1024",
        "bytes 99-0/1024",  # inverted
        "bytes 0-99",  # missing total
        "bytes 0-99/",
        "bytes 0-99/*",
        "bytes 0 - 99/1024",  # spaces
        "bytes 0-99 /1024",
        "bytes=0-99/1024",
        "0-99/1024",
        "items 0-99/1024",
        "bytes -100/1024",
        "bytes 0-1024/1024",  # last == total
        "",
    ],
)
def test_malformed_content_range_is_400(
    client: FlaskClient, sid: str, session_folder: Path, content_range: str
) -> None:
    body = DATA[:100]
    response = bits_post(client, PATH, "Fragment", body, session_id=sid,
                         content_range=content_range)
    assert_ack(response, 400, E_INVALIDARG)
    assert received(response) == "0"
    assert data_file(session_folder, sid).read_bytes() == b""
    ok(fragment(client, sid, 0, 99), 100, sid)


def test_missing_content_range_is_400(client: FlaskClient, sid: str) -> None:
    response = bits_post(client, PATH, "Fragment", DATA[:10], session_id=sid)
    assert_ack(response, 400, E_INVALIDARG)


def test_missing_content_length_is_400(client: FlaskClient, sid: str, session_folder: Path) -> None:
    response = bits_post(client, PATH, "Fragment", DATA[:10], session_id=sid,
                         content_range="bytes 0-9/1024", content_length=None)
    assert_ack(response, 400, E_INVALIDARG)
    assert data_file(session_folder, sid).read_bytes() == b""


def test_body_shorter_than_content_length_keeps_what_arrived(
    client: FlaskClient, sid: str, session_folder: Path, upload_folder: Path
) -> None:
    # The client went away after 60 of 100 announced bytes.
    response = bits_post(client, PATH, "Fragment", DATA[:60], session_id=sid,
                         content_range="bytes 0-99/1024", content_length=100)
    assert response.status_code >= 400
    assert response.headers["BITS-Packet-Type"] == "Ack"
    assert received(response) == "60"
    ok(fragment(client, sid, 60, 1023), 1024, sid)
    assert (upload_folder / "file.bin").read_bytes() == DATA


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, identity", "x-unknown"])
def test_content_encoding_other_than_identity_is_400(
    client: FlaskClient, sid: str, session_folder: Path, encoding: str
) -> None:
    response = fragment(client, sid, 0, 99, content_encoding=encoding)
    assert_ack(response, 400, E_INVALIDARG)
    assert received(response) == "0"
    assert data_file(session_folder, sid).read_bytes() == b""


@pytest.mark.parametrize("encoding", ["identity", "Identity", "IDENTITY"])
def test_content_encoding_identity_is_accepted(
    client: FlaskClient, sid: str, encoding: str
) -> None:
    ok(fragment(client, sid, 0, 99, content_encoding=encoding), 100, sid)


def test_fragment_above_the_fragment_limit_is_413_without_error_headers(
    make_app: t.Callable[..., Flask], session_folder: Path
) -> None:
    client = make_app(BITS_MAX_FRAGMENT_SIZE=5 * 1024).test_client()
    data = os.urandom(5 * 1024 + 1)
    sid = create_session(client, PATH)
    response = send_fragment(client, PATH, sid, data, 0, len(data))
    assert_ack(response, 413)
    assert received(response) == "0"
    assert data_file(session_folder, sid).read_bytes() == b""
    ok(send_fragment(client, PATH, sid, data[:5120], 0, len(data)), 5120, sid)  # exactly the limit
    ok(send_fragment(client, PATH, sid, data[5120:], 5120, len(data)), len(data), sid)


# -- sessions (checklist 9; 6 step 8) ------------------------------------------------------


@pytest.mark.parametrize(
    "session_id",
    [
        "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}",  # well-formed, unknown
        "not-a-session",
        "../../sessions",
        "",
    ],
)
def test_unknown_session_is_500(client: FlaskClient, session_id: str) -> None:
    response = fragment(client, session_id, 0, 9)
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert "BITS-Received-Content-Range" not in response.headers


def test_missing_session_id_is_500(client: FlaskClient) -> None:
    response = bits_post(client, PATH, "Fragment", DATA[:10], content_range="bytes 0-9/1024")
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)


def test_session_of_another_path_is_unknown(
    client: FlaskClient, sid: str, upload_folder: Path, session_folder: Path
) -> None:
    response = bits_post(client, "/bits/other.bin", "Fragment", DATA[:10], session_id=sid,
                         content_range="bytes 0-9/1024")
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert data_file(session_folder, sid).read_bytes() == b""
    ok(fragment(client, sid, 0, 9), 10, sid)  # still fine on its own path
    assert os.listdir(upload_folder) == []


def test_session_of_another_owner_is_unknown(client: FlaskClient) -> None:
    created = bits_post(client, PATH, "Create-Session",
                        protocols="{7df0354d-249b-430f-820d-3d2a9bef4931}",
                        environ={"REMOTE_USER": "alice"})
    sid = assert_ack(created, 200).headers["BITS-Session-Id"]
    as_bob = bits_post(client, PATH, "Fragment", DATA[:10], session_id=sid,
                       content_range="bytes 0-9/1024", environ={"REMOTE_USER": "bob"})
    assert_ack(as_bob, 500, BG_E_SESSION_NOT_FOUND)
    anonymous = fragment(client, sid, 0, 9)
    assert_ack(anonymous, 500, BG_E_SESSION_NOT_FOUND)
    as_alice = bits_post(client, PATH, "Fragment", DATA[:10], session_id=sid,
                         content_range="bytes 0-9/1024", environ={"REMOTE_USER": "alice"})
    ok(as_alice, 10, sid)


@pytest.mark.parametrize("end", [close_session, cancel_session])
def test_fragment_after_close_or_cancel_is_session_not_found(
    client: FlaskClient, sid: str, upload_folder: Path, end: t.Callable[..., t.Any]
) -> None:
    ok(fragment(client, sid, 0, 99), 100, sid)
    assert_ack(end(client, PATH, sid), 200)
    response = fragment(client, sid, 100, 199)
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert os.listdir(upload_folder) == []


# -- zero-length files (A11) ---------------------------------------------------------------


@pytest.mark.parametrize("content_range", ["bytes 0--1/0", "bytes 0-0/0", "bytes */0"])
def test_zero_length_file(
    client: FlaskClient, sid: str, upload_folder: Path, content_range: str
) -> None:
    response = bits_post(client, PATH, "Fragment", b"", session_id=sid,
                         content_range=content_range)
    ok(response, 0, sid)
    assert (upload_folder / "file.bin").read_bytes() == b""  # committed before Close
    retry = bits_post(client, PATH, "Fragment", b"", session_id=sid, content_range=content_range)
    ok(retry, 0, sid)
    assert_ack(close_session(client, PATH, sid), 200)
    assert (upload_folder / "file.bin").read_bytes() == b""


def test_zero_length_range_with_a_body_is_400(client: FlaskClient, sid: str) -> None:
    response = bits_post(client, PATH, "Fragment", b"x", session_id=sid,
                         content_range="bytes 0-0/0")
    assert_ack(response, 400, E_INVALIDARG)


def test_zero_length_fragment_of_a_non_empty_file_is_400(client: FlaskClient, sid: str) -> None:
    response = bits_post(client, PATH, "Fragment", b"", session_id=sid,
                         content_range="bytes */10")
    assert_ack(response, 400, E_INVALIDARG)


def test_zero_length_after_bytes_of_a_larger_total_is_400(
    client: FlaskClient, sid: str
) -> None:
    ok(fragment(client, sid, 0, 9), 10, sid)
    response = bits_post(client, PATH, "Fragment", b"", session_id=sid, content_range="bytes */0")
    assert_ack(response, 400, E_INVALIDARG)
    assert received(response) == "10"
