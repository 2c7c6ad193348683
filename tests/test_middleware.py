"""The same core through BITSMiddleware around a bare (non-Flask) WSGI app."""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest
from werkzeug.test import Client
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from flask_bits import BITSMiddleware
from flask_bits.config import DirectoryConfig
from flask_bits.server import BITSServer
from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import E_ACCESSDENIED
from tests.conftest import E_FAIL
from tests.conftest import E_INVALIDARG
from tests.conftest import PROTOCOL
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import cancel_session
from tests.conftest import close_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import session_leftovers
from tests.conftest import upload

PATH = "/bits/file.bin"
DATA = os.urandom(3000)


class BareApp:
    """A plain WSGI app that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, environ: dict[str, t.Any], start_response: t.Any) -> t.Iterable[bytes]:
        request = Request(environ)
        self.seen.append((request.method, request.path))
        body = request.get_data()
        response = Response(b"bare:" + request.method.encode() + b":" + body,
                            content_type="text/plain")
        return response(environ, start_response)


@pytest.fixture
def inner() -> BareApp:
    return BareApp()


def config(tmp_path: Path, **extra: t.Any) -> dict[str, t.Any]:
    return {
        "BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
        "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
        "BITS_CLEANUP_INTERVAL": 0,
        **extra,
    }


@pytest.fixture
def wsgi(inner: BareApp, tmp_path: Path) -> Client:
    return Client(BITSMiddleware(inner, config(tmp_path), instance_path=str(tmp_path / "inst")))


# -- pass-through --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/bits/file.bin"),
        ("HEAD", "/bits/file.bin"),
        ("POST", "/bits/file.bin"),
        ("PUT", "/bits"),
        ("BITS_POST", "/other/file.bin"),  # not under the prefix
        ("BITS_POST", "/bitsy/file.bin"),  # shares the prefix's letters only
        ("BITS_POST", "/"),
    ],
)
def test_other_requests_pass_through_untouched(
    wsgi: Client, inner: BareApp, method: str, path: str
) -> None:
    response = wsgi.open(path, method=method, data=b"body",
                         headers={"BITS-Packet-Type": "Ping"})
    assert inner.seen == [(method, path)]
    assert "BITS-Packet-Type" not in response.headers
    assert response.status_code == 200
    if method != "HEAD":
        assert response.get_data() == b"bare:" + method.encode() + b":body"


def test_bits_requests_do_not_reach_the_app(wsgi: Client, inner: BareApp) -> None:
    assert_ack(bits_post(wsgi, PATH, "Ping"), 200)
    assert_ack(bits_post(wsgi, "/bits", "Ping"), 200)
    assert inner.seen == []


# -- the protocol through the middleware ---------------------------------------------------


def test_full_upload(wsgi: Client, tmp_path: Path) -> None:
    sid = upload(wsgi, PATH, DATA, 1000)
    assert (tmp_path / "uploads" / "file.bin").read_bytes() == DATA
    assert session_leftovers(tmp_path / "sessions", sid) == []


def test_fragment_rules(wsgi: Client, tmp_path: Path) -> None:
    sid = create_session(wsgi, PATH)
    ok = assert_ack(send_fragment(wsgi, PATH, sid, DATA[:1000], 0, len(DATA)), 200)
    assert ok.headers["BITS-Received-Content-Range"] == "1000"
    gap = assert_ack(send_fragment(wsgi, PATH, sid, DATA[2000:], 2000, len(DATA)), 416)
    assert gap.headers["BITS-Received-Content-Range"] == "1000"
    overlap = send_fragment(wsgi, PATH, sid, b"X" * 500 + DATA[1000:2000], 500, len(DATA))
    assert assert_ack(overlap, 200).headers["BITS-Received-Content-Range"] == "2000"
    changed = send_fragment(wsgi, PATH, sid, DATA[2000:], 2000, len(DATA) + 1)
    assert_ack(changed, 400, E_INVALIDARG)
    assert not (tmp_path / "uploads" / "file.bin").exists()
    done = assert_ack(send_fragment(wsgi, PATH, sid, DATA[2000:], 2000, len(DATA)), 200)
    assert done.headers["BITS-Received-Content-Range"] == str(len(DATA))
    assert (tmp_path / "uploads" / "file.bin").read_bytes() == DATA


def test_create_session_errors(wsgi: Client, tmp_path: Path) -> None:
    assert_ack(bits_post(wsgi, "/bits/../x", "Create-Session", protocols=PROTOCOL), 403,
               E_ACCESSDENIED)
    assert_ack(bits_post(wsgi, "/bits//x", "Create-Session", protocols=PROTOCOL), 400,
               E_INVALIDARG)
    assert_ack(bits_post(wsgi, "/bits/", "Create-Session", protocols=PROTOCOL), 400,
               E_INVALIDARG)
    assert_ack(bits_post(wsgi, PATH, "Create-Session"), 400, E_INVALIDARG)
    assert_ack(bits_post(wsgi, "/bits/a%0Ab", "Create-Session", protocols=PROTOCOL), 400,
               E_INVALIDARG)


def test_close_and_cancel(wsgi: Client, tmp_path: Path) -> None:
    a = create_session(wsgi, PATH)
    assert_ack(send_fragment(wsgi, PATH, a, DATA[:10], 0, len(DATA)), 200)
    assert_ack(cancel_session(wsgi, PATH, a), 200)
    assert_ack(cancel_session(wsgi, PATH, a), 200)
    assert_ack(send_fragment(wsgi, PATH, a, DATA[10:20], 10, len(DATA)), 500,
               BG_E_SESSION_NOT_FOUND)
    b = create_session(wsgi, PATH)
    assert_ack(close_session(wsgi, PATH, b), 200)
    assert (tmp_path / "uploads" / "file.bin").read_bytes() == b""  # no fragment: empty file
    for sid in (a, b):
        assert session_leftovers(tmp_path / "sessions", sid) == []


def test_missing_content_length_is_400(wsgi: Client) -> None:
    assert_ack(bits_post(wsgi, PATH, "Ping", content_length=None), 400, E_INVALIDARG)


def test_unknown_packet_type_is_400(wsgi: Client) -> None:
    assert_ack(bits_post(wsgi, PATH, "Frobnicate"), 400, E_INVALIDARG)


def test_disabled_uploads(inner: BareApp, tmp_path: Path) -> None:
    client = Client(BITSMiddleware(inner, config(tmp_path, BITS_UPLOAD_ENABLED=False)))
    for packet_type in ("Ping", "Create-Session"):
        assert_ack(bits_post(client, PATH, packet_type, protocols=PROTOCOL), 501, E_ACCESSDENIED)
    assert inner.seen == []


def test_authorize_and_identify_hooks(inner: BareApp, tmp_path: Path) -> None:
    def authorize(request: Request, path: str, packet: t.Any) -> Response | bool:
        if request.authorization is None:
            return Response(b"who are you", 401, {"WWW-Authenticate": 'Basic realm="mw"'})
        return request.authorization.username != "mallory"

    def identify(request: Request) -> str | None:
        return request.authorization.username if request.authorization else None

    client = Client(BITSMiddleware(inner, config(tmp_path), authorize=authorize,
                                   identify=identify))
    challenged = bits_post(client, PATH, "Ping")
    assert challenged.status_code == 401
    assert challenged.headers["BITS-Packet-Type"] == "Ack"
    assert challenged.headers["WWW-Authenticate"] == 'Basic realm="mw"'
    assert challenged.get_data() == b""
    assert "Content-Type" not in challenged.headers

    alice = {"Authorization": "Basic YWxpY2U6cHc="}  # alice:pw
    bob = {"Authorization": "Basic Ym9iOnB3"}  # bob:pw
    mallory = {"Authorization": "Basic bWFsbG9yeTpwdw=="}  # mallory:pw
    assert_ack(bits_post(client, PATH, "Ping", headers=mallory), 403, E_ACCESSDENIED)
    created = bits_post(client, PATH, "Create-Session", protocols=PROTOCOL, headers=alice)
    sid = assert_ack(created, 200).headers["BITS-Session-Id"]
    stolen = bits_post(client, PATH, "Fragment", b"abc", session_id=sid,
                       content_range="bytes 0-2/3", headers=bob)
    assert_ack(stolen, 500, BG_E_SESSION_NOT_FOUND)
    mine = bits_post(client, PATH, "Fragment", b"abc", session_id=sid,
                     content_range="bytes 0-2/3", headers=alice)
    assert_ack(mine, 200)
    assert (tmp_path / "uploads" / "file.bin").read_bytes() == b"abc"


def test_exception_in_a_hook_is_a_500_ack(inner: BareApp, tmp_path: Path) -> None:
    def authorize(request: Request, path: str, packet: t.Any) -> bool:
        raise ValueError("broken hook")

    client = Client(BITSMiddleware(inner, config(tmp_path), authorize=authorize))
    assert_ack(bits_post(client, PATH, "Ping"), 500, E_FAIL)


def test_several_directories_pick_the_longest_prefix(inner: BareApp, tmp_path: Path) -> None:
    def server(name: str, prefix: str) -> BITSServer:
        cfg = DirectoryConfig.from_mapping(
            {
                "BITS_URL_PREFIX": prefix,
                "BITS_UPLOAD_FOLDER": str(tmp_path / name / "uploads"),
                "BITS_SESSION_FOLDER": str(tmp_path / name / "sessions"),
                "BITS_CLEANUP_INTERVAL": 0,
            },
            instance_path=str(tmp_path),
        )
        return BITSServer(cfg, name=name)

    outer, nested = server("outer", "/up"), server("nested", "/up/special")
    client = Client(BITSMiddleware(inner, servers=[outer, nested]))
    upload(client, "/up/a.bin", b"outer", 10)
    upload(client, "/up/special/b.bin", b"nested", 10)
    assert os.listdir(tmp_path / "outer" / "uploads") == ["a.bin"]
    assert os.listdir(tmp_path / "nested" / "uploads") == ["b.bin"]
    # A session of one directory is unknown to the other.
    sid = create_session(client, "/up/special/c.bin")
    response = send_fragment(client, "/up/c.bin", sid, b"x", 0, 1)
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    assert inner.seen == []


def test_default_folders_go_under_the_instance_path(inner: BareApp, tmp_path: Path) -> None:
    middleware = BITSMiddleware(inner, {"BITS_CLEANUP_INTERVAL": 0},
                                instance_path=str(tmp_path / "inst"))
    upload(Client(middleware), PATH, b"abc", 2)
    assert (tmp_path / "inst" / "bits-uploads" / "file.bin").read_bytes() == b"abc"
    assert (tmp_path / "inst" / "bits-sessions" / "sessions").is_dir()
