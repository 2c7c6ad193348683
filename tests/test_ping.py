"""Ping (PROTOCOL.md 7.1, 6, A35; checklist 1-2)."""

from __future__ import annotations

import typing as t

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import E_ACCESSDENIED
from tests.conftest import E_INVALIDARG
from tests.conftest import assert_ack
from tests.conftest import bits_post

SESSION_HEADERS = (
    "BITS-Session-Id",
    "BITS-Protocol",
    "Accept-Encoding",
    "BITS-Received-Content-Range",
    "BITS-Host-Id",
    "BITS-Host-Id-Fallback-Timeout",
    "BITS-Reply-URL",
)


def assert_no_session_headers(response: t.Any) -> None:
    for name in SESSION_HEADERS:
        assert name not in response.headers, name


def test_ping_is_a_bare_200_ack(client: FlaskClient) -> None:
    response = assert_ack(bits_post(client, "/bits/file.txt", "Ping"), 200)
    assert_no_session_headers(response)


@pytest.mark.parametrize("packet_type", ["Ping", "PING", "ping", " Ping ", "pInG"])
def test_ping_packet_type_is_case_insensitive(client: FlaskClient, packet_type: str) -> None:
    assert_ack(bits_post(client, "/bits/file.txt", packet_type), 200)


@pytest.mark.parametrize(
    "path",
    [
        "/bits",  # the prefix root
        "/bits/",
        "/bits/missing/folder/file.txt",  # no destination checks for Ping
        "/bits/any.txt?query=1",
    ],
)
def test_ping_does_no_destination_checks(client: FlaskClient, path: str) -> None:
    response = assert_ack(bits_post(client, path, "Ping"), 200)
    assert_no_session_headers(response)


def test_ping_ignores_session_and_unknown_headers(client: FlaskClient) -> None:
    response = bits_post(
        client,
        "/bits/file.txt",
        "Ping",
        session_id="{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}",
        content_name="file.txt",
        headers={"X-Unknown-Header": "whatever", "User-Agent": "Microsoft BITS/7.8"},
    )
    assert_ack(response, 200)
    assert_no_session_headers(response)


def test_ping_with_a_body_is_400(client: FlaskClient) -> None:
    response = assert_ack(bits_post(client, "/bits/file.txt", "Ping", b"x"), 400, E_INVALIDARG)
    assert_no_session_headers(response)


def test_ping_without_content_length_is_400(client: FlaskClient) -> None:
    # PROTOCOL.md T6, A16: every request carries Content-Length; Windows answers 400.
    response = bits_post(client, "/bits/file.txt", "Ping", content_length=None)
    assert_ack(response, 400, E_INVALIDARG)


def test_ping_when_uploads_are_disabled_is_501(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_UPLOAD_ENABLED=False).test_client()
    response = bits_post(client, "/bits/file.txt", "Ping")
    assert_ack(response, 501, E_ACCESSDENIED)
    assert_no_session_headers(response)


def test_ping_with_a_header_value_over_4_kb_is_400(client: FlaskClient) -> None:
    response = bits_post(client, "/bits/file.txt", "Ping", content_name="x" * 4097)
    assert_ack(response, 400, E_INVALIDARG)


def test_ping_with_a_4_kb_header_value_is_accepted(client: FlaskClient) -> None:
    response = bits_post(client, "/bits/file.txt", "Ping", content_name="x" * 4096)
    assert_ack(response, 200)


def test_ping_denied_by_the_authorize_hook_is_403(make_app: t.Callable[..., Flask]) -> None:
    from flask_bits import BITS

    app = make_app(init=False)
    BITS(app, authorize=lambda request, path, packet: False)
    response = bits_post(app.test_client(), "/bits/file.txt", "Ping")
    assert_ack(response, 403, E_ACCESSDENIED)
