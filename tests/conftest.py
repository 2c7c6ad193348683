"""Shared fixtures and packet helpers for the flask_bits test suite.

Fixtures: ``make_app`` (a factory taking ``BITS_*`` overrides), ``app``, ``client``,
``runner``, ``bits`` (the app's :class:`~flask_bits.server.BITSServer`),
``upload_folder`` and ``session_folder``.

Helpers (plain functions, import them with ``from tests.conftest import ...``):
``bits_post`` sends one packet the way a real client does (always with a
``Content-Length``, werkzeug's test client would drop ``Content-Length: 0``),
``assert_ack`` checks the Ack skeleton and error headers of a response,
``create_session``, ``send_fragment``, ``close_session``, ``cancel_session`` and
``upload`` (Create -> Fragment* -> Close) drive whole exchanges, and
``session_leftovers`` lists what a session left under the session folder.
"""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask.testing import FlaskCliRunner
from werkzeug.test import EnvironBuilder
from werkzeug.test import TestResponse
from werkzeug.wrappers import Request

from flask_bits import BITS
from flask_bits.server import BITSServer

#: The only BITS upload protocol GUID (PROTOCOL.md 1.4).
PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"

E_INVALIDARG = "0x80070057"
E_ACCESSDENIED = "0x80070005"
BG_E_SESSION_NOT_FOUND = "0x8020001F"
BG_E_TOO_LARGE = "0x80200020"
ERROR_BUSY = "0x800700AA"
ERROR_PATH_NOT_FOUND = "0x80070003"
E_FAIL = "0x80004005"

#: Error headers of an error Ack (PROTOCOL.md 4.1).
ERROR_HEADERS = ("BITS-Error-Code", "BITS-Error", "BITS-Error-Context")

#: Short keyword names accepted by :func:`bits_post` for the usual BITS headers.
_HEADER_ALIASES = {
    "session_id": "BITS-Session-Id",
    "supported_protocols": "BITS-Supported-Protocols",
    "protocols": "BITS-Supported-Protocols",
    "content_range": "Content-Range",
    "content_encoding": "Content-Encoding",
    "content_name": "Content-Name",
}

_DEFAULT = object()


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture
def upload_folder(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture
def session_folder(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def make_app(tmp_path: Path, upload_folder: Path, session_folder: Path) -> t.Callable[..., Flask]:
    """A factory for test apps: ``make_app(BITS_ALLOW_OVERWRITES=True)``.

    Every app keeps its instance path and both folders under ``tmp_path``. The
    opportunistic background cleanup is off (``BITS_CLEANUP_INTERVAL=0``) so that no
    thread runs behind a test's back; ``test_store.py`` covers it explicitly. Pass
    ``init=False`` to get an app without the extension.
    """

    def factory(*, init: bool = True, **config: t.Any) -> Flask:
        app = Flask("flask_bits_tests", instance_path=str(tmp_path / "instance"))
        app.config.update(
            TESTING=True,
            BITS_UPLOAD_FOLDER=str(upload_folder),
            BITS_SESSION_FOLDER=str(session_folder),
            BITS_CLEANUP_INTERVAL=0,
        )
        app.config.update(config)
        if init:
            BITS(app)
        return app

    return factory


@pytest.fixture
def app(make_app: t.Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def bits(app: Flask) -> BITSServer:
    """The core serving the app's default ``bits`` directory."""
    return t.cast(BITSServer, app.extensions["bits"]["bits"])


# -- sending packets ----------------------------------------------------------------


def _header_name(key: str) -> str:
    return _HEADER_ALIASES.get(key.lower(), key.replace("_", "-"))


def bits_post(
    client: t.Any,
    path: str,
    packet_type: str | None,
    body: bytes = b"",
    *,
    content_length: t.Any = _DEFAULT,
    headers: t.Mapping[str, str] | None = None,
    environ: t.Mapping[str, t.Any] | None = None,
    **more_headers: str,
) -> TestResponse:
    """Send one ``BITS_POST`` with ``BITS-Packet-Type: packet_type`` (omitted if None).

    Keyword headers use underscores for dashes (``content_range="bytes 0-1/2"``);
    ``session_id`` and ``protocols`` stand for ``BITS-Session-Id`` and
    ``BITS-Supported-Protocols``. ``headers`` adds headers with any name.

    ``Content-Length`` is always sent, like a real client does, as ``len(body)`` unless
    ``content_length`` says otherwise; ``content_length=None`` sends none at all.
    """
    all_headers: dict[str, str] = {}
    if packet_type is not None:
        all_headers["BITS-Packet-Type"] = packet_type
    for key, value in more_headers.items():
        all_headers[_header_name(key)] = value
    if headers:
        all_headers.update(headers)
    overrides: dict[str, t.Any] = dict(environ or {})
    if content_length is None:
        # No Content-Length at all: werkzeug's builder always computes one for a
        # body, so build the environ, drop the key and send it as a ready request.
        env = EnvironBuilder(
            path, method="BITS_POST", headers=list(all_headers.items()), data=body,
            environ_overrides=overrides,
        ).get_environ()
        env.pop("CONTENT_LENGTH", None)
        return t.cast(TestResponse, client.open(Request(env)))
    length = len(body) if content_length is _DEFAULT else content_length
    overrides["CONTENT_LENGTH"] = str(length)
    return t.cast(
        TestResponse,
        client.open(
            path,
            method="BITS_POST",
            headers=all_headers,
            data=body,
            environ_overrides=overrides,
        ),
    )


def assert_ack(
    response: TestResponse,
    status: int,
    error: str | None = None,
    *,
    context: str = "0x5",
) -> TestResponse:
    """Check the Ack skeleton (PROTOCOL.md T7) and the error headers (4.1, A3).

    ``error`` is the expected HRESULT text; ``None`` means no error headers at all.
    """
    assert response.status_code == status, (response.status, dict(response.headers))
    assert response.headers.get("BITS-Packet-Type") == "Ack"
    assert response.headers.getlist("Content-Length") == ["0"]
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers
    if error is None:
        for name in ERROR_HEADERS:
            assert name not in response.headers, (name, dict(response.headers))
    else:
        assert response.headers.getlist("BITS-Error-Code") == [error]
        assert response.headers.getlist("BITS-Error") == [error]
        assert response.headers.getlist("BITS-Error-Context") == [context]
    return response


def create_session(client: t.Any, path: str = "/bits/file.bin", **headers: t.Any) -> str:
    """Create a session on ``path`` and return its id (asserts a 200 Ack)."""
    headers.setdefault("protocols", PROTOCOL)
    response = assert_ack(bits_post(client, path, "Create-Session", **headers), 200)
    session_id = response.headers["BITS-Session-Id"]
    assert session_id
    return session_id


def send_fragment(
    client: t.Any,
    path: str,
    session_id: str,
    data: bytes,
    first: int,
    total: int,
    **headers: t.Any,
) -> TestResponse:
    """Send ``data`` as bytes ``first..first+len(data)-1`` of a ``total``-byte file."""
    last = first + len(data) - 1
    return bits_post(
        client,
        path,
        "Fragment",
        data,
        session_id=session_id,
        content_range=f"bytes {first}-{last}/{total}",
        **headers,
    )


def close_session(client: t.Any, path: str, session_id: str) -> TestResponse:
    return bits_post(client, path, "Close-Session", session_id=session_id)


def cancel_session(client: t.Any, path: str, session_id: str) -> TestResponse:
    return bits_post(client, path, "Cancel-Session", session_id=session_id)


def upload(
    client: t.Any,
    path: str,
    data: bytes,
    fragment_size: int,
    *,
    close: bool = True,
) -> str:
    """Upload ``data`` like a client: Create, Fragments of ``fragment_size``, Close.

    Checks every Ack on the way, including ``BITS-Received-Content-Range``; returns the
    session id.
    """
    session_id = create_session(client, path)
    total = len(data)
    offset = 0
    while offset < total:
        chunk = data[offset : offset + fragment_size]
        response = assert_ack(send_fragment(client, path, session_id, chunk, offset, total), 200)
        offset += len(chunk)
        assert response.headers["BITS-Received-Content-Range"] == str(offset)
        assert response.headers["BITS-Session-Id"] == session_id
        assert "BITS-Reply-URL" not in response.headers
    if close:
        assert_ack(close_session(client, path, session_id), 200)
    return session_id


# -- inspecting the session folder ----------------------------------------------------


def session_leftovers(session_folder: Path | str, session_id: str) -> list[str]:
    """Everything under the session folder still named after ``session_id``,
    except its tombstone (which is meant to stay): folders, data, lock files."""
    root = Path(session_folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if session_id in name and not (Path(dirpath).name == "tombstones"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def tombstone_path(session_folder: Path | str, session_id: str) -> Path:
    return Path(session_folder) / "tombstones" / f"{session_id}.json"
