"""Create-Session (PROTOCOL.md 7.2, 6, 12 S7; checklist 3-8)."""

from __future__ import annotations

import os
import re
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import E_ACCESSDENIED
from tests.conftest import E_INVALIDARG
from tests.conftest import ERROR_PATH_NOT_FOUND
from tests.conftest import PROTOCOL
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import upload

SESSION_ID_RE = re.compile(r"\{[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\}")
OTHER = "{11111111-2222-3333-4444-555555555555}"
SUCCESS_ONLY = ("BITS-Protocol", "BITS-Session-Id", "Accept-Encoding")


def create(client: FlaskClient, path: str, **headers: t.Any) -> t.Any:
    headers.setdefault("protocols", PROTOCOL)
    return bits_post(client, path, "Create-Session", **headers)


def assert_refused(response: t.Any, status: int, error: str) -> None:
    assert_ack(response, status, error)
    for name in SUCCESS_ONLY:
        assert name not in response.headers, name


def sessions_in(session_folder: Path) -> list[str]:
    folder = session_folder / "sessions"
    return sorted(os.listdir(folder)) if folder.exists() else []


# -- success ------------------------------------------------------------------------------


def test_create_session_success_ack(client: FlaskClient, session_folder: Path) -> None:
    response = assert_ack(create(client, "/bits/file.txt"), 200)
    assert response.headers["BITS-Protocol"] == "{7df0354d-249b-430f-820d-3d2a9bef4931}"
    assert SESSION_ID_RE.fullmatch(response.headers["BITS-Session-Id"])
    assert response.headers["Accept-Encoding"] == "identity"
    for name in ("BITS-Host-Id", "BITS-Host-Id-Fallback-Timeout",
                 "BITS-Received-Content-Range", "BITS-Reply-URL"):
        assert name not in response.headers
    assert sessions_in(session_folder) == [response.headers["BITS-Session-Id"]]


def test_create_session_does_not_touch_the_destination(
    client: FlaskClient, upload_folder: Path
) -> None:
    create_session(client, "/bits/file.txt")
    assert os.listdir(upload_folder) == []


def test_session_ids_are_unique(client: FlaskClient) -> None:
    ids = {create_session(client, "/bits/file.txt") for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    "protocols",
    [
        "{7df0354d-249b-430f-820d-3d2a9bef4931}",
        "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
        "{7Df0354D-249b-430F-820d-3D2a9BeF4931}",
        f"{OTHER} {{7df0354d-249b-430f-820d-3d2a9bef4931}}",
        f"{OTHER},{{7df0354d-249b-430f-820d-3d2a9bef4931}}",
        f"{OTHER}, {{7DF0354D-249B-430F-820D-3D2A9BEF4931}}",
        f"{{7df0354d-249b-430f-820d-3d2a9bef4931}} {OTHER}",
        "  {7df0354d-249b-430f-820d-3d2a9bef4931}  ",
    ],
)
def test_protocol_guid_in_any_case_and_list_form(client: FlaskClient, protocols: str) -> None:
    response = assert_ack(create(client, "/bits/file.txt", protocols=protocols), 200)
    assert response.headers["BITS-Protocol"] == "{7df0354d-249b-430f-820d-3d2a9bef4931}"


@pytest.mark.parametrize("packet_type", ["Create-Session", "CREATE-SESSION", "create-session"])
def test_create_session_packet_type_any_case(client: FlaskClient, packet_type: str) -> None:
    response = bits_post(client, "/bits/file.txt", packet_type, protocols=PROTOCOL)
    assert_ack(response, 200)


def test_unknown_headers_and_content_name_are_ignored(
    client: FlaskClient, upload_folder: Path
) -> None:
    sid = create_session(
        client,
        "/bits/file.txt",
        content_name="..\\..\\evil.txt",
        headers={"X-Whatever": "1"},
    )
    upload_data = b"payload"
    response = send_fragment(client, "/bits/file.txt", sid, upload_data, 0, len(upload_data),
                             content_name="../../evil.txt")
    assert_ack(response, 200)
    assert (upload_folder / "file.txt").read_bytes() == upload_data
    assert sorted(os.listdir(upload_folder)) == ["file.txt"]


def test_a_session_id_sent_with_create_session_is_ignored(client: FlaskClient) -> None:
    given = "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
    sid = create_session(client, "/bits/file.txt", session_id=given)
    assert sid != given


def test_query_string_is_not_part_of_the_file_name(
    client: FlaskClient, upload_folder: Path
) -> None:
    upload(client, "/bits/file.txt?account=86433", b"abc", 2)
    assert sorted(os.listdir(upload_folder)) == ["file.txt"]


def test_percent_encoded_names_are_decoded_once(
    client: FlaskClient, upload_folder: Path
) -> None:
    upload(client, "/bits/%C3%BCber%2520.txt", b"abc", 10)
    assert sorted(os.listdir(upload_folder)) == ["\u00fcber%20.txt"]


def test_upload_into_an_existing_subfolder(client: FlaskClient, upload_folder: Path) -> None:
    (upload_folder / "a" / "b").mkdir(parents=True)
    upload(client, "/bits/a/b/file.txt", b"deep", 3)
    assert (upload_folder / "a" / "b" / "file.txt").read_bytes() == b"deep"


# -- protocol negotiation failures ---------------------------------------------------------


@pytest.mark.parametrize(
    "protocols",
    [
        OTHER,
        f"{OTHER} {OTHER}",
        "",
        "{7df0354d-249b-430f-820d-3d2a9bef4930}",
        "7df0354d",
    ],
)
def test_unknown_protocol_is_400(
    client: FlaskClient, session_folder: Path, protocols: str
) -> None:
    assert_refused(create(client, "/bits/file.txt", protocols=protocols), 400, E_INVALIDARG)
    assert sessions_in(session_folder) == []


def test_missing_protocol_header_is_400(client: FlaskClient, session_folder: Path) -> None:
    response = bits_post(client, "/bits/file.txt", "Create-Session")
    assert_refused(response, 400, E_INVALIDARG)
    assert sessions_in(session_folder) == []


# -- framing ------------------------------------------------------------------------------


def test_create_session_with_a_body_is_400(client: FlaskClient, session_folder: Path) -> None:
    response = bits_post(client, "/bits/file.txt", "Create-Session", b"x", protocols=PROTOCOL)
    assert_refused(response, 400, E_INVALIDARG)
    assert sessions_in(session_folder) == []


def test_create_session_with_nonzero_content_length_header_is_400(client: FlaskClient) -> None:
    response = bits_post(client, "/bits/file.txt", "Create-Session", b"xyz",
                         protocols=PROTOCOL, content_length=3)
    assert_refused(response, 400, E_INVALIDARG)


def test_create_session_without_content_length_is_400(client: FlaskClient) -> None:
    response = bits_post(client, "/bits/file.txt", "Create-Session", protocols=PROTOCOL,
                         content_length=None)
    assert_refused(response, 400, E_INVALIDARG)


# -- destination checks --------------------------------------------------------------------


def test_existing_file_without_overwrites_is_409(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    upload_folder.mkdir(exist_ok=True)
    (upload_folder / "file.txt").write_bytes(b"old")
    assert_refused(create(client, "/bits/file.txt"), 409, E_ACCESSDENIED)
    assert (upload_folder / "file.txt").read_bytes() == b"old"
    assert sessions_in(session_folder) == []


def test_existing_file_with_overwrite_status_403(
    make_app: t.Callable[..., Flask], upload_folder: Path
) -> None:
    client = make_app(BITS_OVERWRITE_STATUS=403).test_client()
    (upload_folder / "file.txt").write_bytes(b"old")
    assert_refused(create(client, "/bits/file.txt"), 403, E_ACCESSDENIED)


def test_existing_file_with_overwrites_is_replaced(
    make_app: t.Callable[..., Flask], upload_folder: Path
) -> None:
    client = make_app(BITS_ALLOW_OVERWRITES=True).test_client()
    (upload_folder / "file.txt").write_bytes(b"old contents")
    upload(client, "/bits/file.txt", b"new", 2)
    assert (upload_folder / "file.txt").read_bytes() == b"new"
    assert sorted(os.listdir(upload_folder)) == ["file.txt"]


@pytest.mark.parametrize("path", ["/bits", "/bits/", "/bits/dir", "/bits/dir/", "/bits/dir/sub/"])
def test_url_naming_a_folder_is_400(
    client: FlaskClient, upload_folder: Path, session_folder: Path, path: str
) -> None:
    (upload_folder / "dir" / "sub").mkdir(parents=True)
    assert_refused(create(client, path), 400, E_INVALIDARG)
    assert sessions_in(session_folder) == []


@pytest.mark.parametrize("path", ["/bits//file.txt", "/bits/dir//file.txt", "/bits///"])
def test_empty_path_segments_are_400(client: FlaskClient, upload_folder: Path, path: str) -> None:
    (upload_folder / "dir").mkdir(parents=True)
    assert_refused(create(client, path), 400, E_INVALIDARG)


@pytest.mark.parametrize(
    "path",
    [
        "/bits/../file.txt",
        "/bits/%2e%2e/file.txt",
        "/bits/%2E%2E/%2E%2E/etc/passwd",
        "/bits/dir/../../file.txt",
        "/bits/./file.txt",
        "/bits/..%5Cfile.txt",  # backslash
        "/bits/dir%5Cfile.txt",
        "/bits/C:file.txt",
        "/bits/C%3A%5Cfile.txt",
        "/bits/%5C%5Cserver%5Cshare%5Cfile.txt",  # UNC
        "/bits/CON",
        "/bits/nul.txt",
        "/bits/dir/lpt1.log",
    ],
)
def test_traversal_and_reserved_names_are_403(
    client: FlaskClient, upload_folder: Path, session_folder: Path, tmp_path: Path, path: str
) -> None:
    (upload_folder / "dir").mkdir(parents=True)
    assert_refused(create(client, path), 403, E_ACCESSDENIED)
    assert sessions_in(session_folder) == []


@pytest.mark.parametrize(
    "path",
    [
        "/bits/a%00b.txt",  # NUL
        "/bits/a%01b.txt",  # control character
        "/bits/a%0Ab.txt",
        "/bits/%FF%FE.txt",  # not UTF-8
        "/bits/file.",  # trailing dot
        "/bits/file%20",  # trailing space
    ],
)
def test_malformed_names_are_400(client: FlaskClient, session_folder: Path, path: str) -> None:
    assert_refused(create(client, path), 400, E_INVALIDARG)
    assert sessions_in(session_folder) == []


def test_missing_parent_folder_is_404(
    client: FlaskClient, upload_folder: Path, session_folder: Path
) -> None:
    assert_refused(create(client, "/bits/missing/file.txt"), 404, ERROR_PATH_NOT_FOUND)
    assert not (upload_folder / "missing").exists()  # never created
    assert sessions_in(session_folder) == []


def test_symlinked_folder_inside_the_upload_folder_is_403(
    client: FlaskClient, upload_folder: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (upload_folder / "link").symlink_to(outside, target_is_directory=True)
    assert_refused(create(client, "/bits/link/file.txt"), 403, E_ACCESSDENIED)
    assert os.listdir(outside) == []


# -- host id (7.2, 9.4; checklist 8) -------------------------------------------------------


def test_no_host_id_by_default(client: FlaskClient) -> None:
    response = create(client, "/bits/file.txt")
    assert "BITS-Host-Id" not in response.headers
    assert "BITS-Host-Id-Fallback-Timeout" not in response.headers


def test_host_id_with_default_fallback_timeout(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_HOST_ID="server8").test_client()
    response = assert_ack(create(client, "/bits/file.txt"), 200)
    assert response.headers["BITS-Host-Id"] == "server8"
    assert response.headers["BITS-Host-Id-Fallback-Timeout"] == "86400"


def test_host_id_with_fallback_timeout(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_HOST_ID="10.0.0.8", BITS_HOST_ID_FALLBACK_TIMEOUT=110).test_client()
    response = assert_ack(create(client, "/bits/file.txt"), 200)
    assert response.headers["BITS-Host-Id"] == "10.0.0.8"
    assert response.headers["BITS-Host-Id-Fallback-Timeout"] == "110"


@pytest.mark.parametrize("timeout", [0, None])
def test_host_id_without_fallback_timeout(
    make_app: t.Callable[..., Flask], timeout: int | None
) -> None:
    client = make_app(BITS_HOST_ID="server8", BITS_HOST_ID_FALLBACK_TIMEOUT=timeout).test_client()
    response = assert_ack(create(client, "/bits/file.txt"), 200)
    assert response.headers["BITS-Host-Id"] == "server8"
    assert "BITS-Host-Id-Fallback-Timeout" not in response.headers


def test_host_id_only_on_the_create_session_ack(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_HOST_ID="server8", BITS_HOST_ID_FALLBACK_TIMEOUT=110).test_client()
    sid = create_session(client, "/bits/file.txt")
    others = [
        bits_post(client, "/bits/file.txt", "Ping"),
        send_fragment(client, "/bits/file.txt", sid, b"ab", 0, 4),
        bits_post(client, "/bits/file.txt", "Close-Session", session_id=sid),
    ]
    for response in others:
        assert_ack(response, 200)
        assert "BITS-Host-Id" not in response.headers
        assert "BITS-Host-Id-Fallback-Timeout" not in response.headers


def test_host_id_not_on_a_failed_create_session(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_HOST_ID="server8").test_client()
    response = create(client, "/bits/file.txt", protocols=OTHER)
    assert_refused(response, 400, E_INVALIDARG)
    assert "BITS-Host-Id" not in response.headers


# -- session limits ------------------------------------------------------------------------


def test_per_user_session_limit(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_SESSION_LIMIT=2).test_client()
    alice = {"REMOTE_USER": "alice"}
    for _ in range(2):
        assert_ack(bits_post(client, "/bits/f", "Create-Session", protocols=PROTOCOL,
                             environ=alice), 200)
    refused = bits_post(client, "/bits/f", "Create-Session", protocols=PROTOCOL, environ=alice)
    assert_refused(refused, 503, "0x80070045")
    bob = bits_post(client, "/bits/f", "Create-Session", protocols=PROTOCOL,
                    environ={"REMOTE_USER": "bob"})
    assert_ack(bob, 200)


def test_server_wide_session_limit(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_MAX_SESSIONS=1).test_client()
    create_session(client, "/bits/a")
    assert_refused(create(client, "/bits/b"), 503, "0x80070045")
