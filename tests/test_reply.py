"""Upload-reply (PROTOCOL.md 5.2-5.3, 7.3-7.5, 8.1-8.11, 4.4, A17-A29; checklist 19-29).

Two halves:

* the in-process server application (``@bits.reply_handler``) through the Flask test
  client: the completing fragment's Ack, every kind of handler result, handler errors,
  the ``Upload`` object, reply-URL serving (8.11) and exactly-once (8.9);
* the HTTP server application (notification types 1 and 2) with real servers on
  127.0.0.1: gunicorn running ``example_app`` notifies :class:`reply_apps.AppServer`, a
  recording application in a thread of this process. These are marked ``integration``.

The test client drops ``Content-Length: 0``; ``tests.conftest.bits_post`` always sets it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
import wire
from flask import Flask
from flask.testing import FlaskClient
from helpers import wait_until
from reply_apps import Action
from reply_apps import AppServer
from reply_apps import parse_reply_url
from reply_apps import sha256_line
from servers import ROOT
from servers import GunicornServer

from flask_bits import BITS
from flask_bits.reply import Reply
from flask_bits.reply import ReplyError
from flask_bits.reply import Upload
from flask_bits.store import SessionStore
from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import PROTOCOL
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import session_leftovers

#: BG_E_HTTP_ERROR_nnn = 0x80190000 + nnn (PROTOCOL.md 4.2).
BG_E_HTTP_403 = "0x80190193"
BG_E_HTTP_500 = "0x801901F4"
#: The spec literal for a notification timeout (8.7, A15).
NOTIFICATION_TIMEOUT = "0x80070112"
E_INVALIDARG = "0x80070057"
#: What this server sends with its "retry later" 503 while the application works.
E_PENDING = "0x8000000A"
CTX_APP = "0x7"
USER_HEADER = "X-Test-User"


def http_error(status: int) -> str:
    return f"0x{0x80190000 + status:08X}"


# ======================================================================================
# In-process server application, through the Flask test client
# ======================================================================================


class Recorder:
    """A reply handler that records every call and answers with ``result(upload)``."""

    def __init__(self, result: t.Callable[[Upload], t.Any]) -> None:
        self.result = result
        self.uploads: list[Upload] = []
        self.seen: list[dict[str, t.Any]] = []
        self.lock = threading.Lock()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.uploads)

    def __call__(self, upload: Upload) -> t.Any:
        with open(upload.path, "rb") as f:
            by_path = f.read()
        with upload.open() as f:
            by_open = f.read()
        with self.lock:
            self.uploads.append(upload)
            self.seen.append({"by_path": by_path, "by_open": by_open})
        return self.result(upload)


def reversed_upload(upload: Upload) -> bytes:
    with upload.open() as f:
        return bytes(reversed(f.read()))


def identify_by_header(request: t.Any) -> str | None:
    return request.headers.get(USER_HEADER) or None


@pytest.fixture
def reply_app(make_app: t.Callable[..., Flask]) -> t.Callable[..., tuple[Flask, BITS]]:
    """``reply_app(handler, **BITS_config)``: an app whose ``/bits`` directory answers
    with ``handler``; sessions are owned by the ``X-Test-User`` header."""

    def factory(handler: t.Callable[[Upload], t.Any], **config: t.Any) -> tuple[Flask, BITS]:
        app = make_app(init=False, **config)
        bits = BITS(identify=identify_by_header)
        bits.reply_handler(handler)
        bits.init_app(app)
        return app, bits

    return factory


def post(
    client: FlaskClient, path: str, packet_type: str, body: bytes = b"", *,
    sid: str | None = None, user: str | None = None,
    headers: t.Mapping[str, str] | None = None,
) -> t.Any:
    hdrs: dict[str, str] = {}
    if sid is not None:
        hdrs["BITS-Session-Id"] = sid
    if user is not None:
        hdrs[USER_HEADER] = user
    if packet_type == "Create-Session":
        hdrs["BITS-Supported-Protocols"] = PROTOCOL
    hdrs.update(headers or {})
    return bits_post(client, path, packet_type, body, headers=hdrs)


def fragment(client: FlaskClient, path: str, sid: str, data: bytes, first: int, total: int,
             *, user: str | None = None, **headers: str) -> t.Any:
    rng = f"bytes {first}-{first + len(data) - 1}/{total}"
    return post(client, path, "Fragment", data, sid=sid, user=user,
                headers={"Content-Range": rng, **headers})


def create(client: FlaskClient, path: str, *, user: str | None = None, **headers: str) -> str:
    response = assert_ack(post(client, path, "Create-Session", user=user, headers=headers), 200)
    return str(response.headers["BITS-Session-Id"])


def upload_all(
    client: FlaskClient, path: str, data: bytes, *, pieces: int = 3, user: str | None = None,
    **headers: str,
) -> tuple[str, t.Any]:
    """Create a session and send ``data`` in ``pieces`` fragments; every fragment but
    the last must be a plain 200 without ``BITS-Reply-URL``. Returns the session id
    and the completing fragment's response."""
    sid = create(client, path, user=user)
    total = len(data)
    step = -(-total // pieces)
    offset = 0
    while offset + step < total:
        r = assert_ack(fragment(client, path, sid, data[offset:offset + step], offset, total,
                                user=user, **headers), 200)
        assert r.headers["BITS-Received-Content-Range"] == str(offset + step)
        assert r.headers["BITS-Session-Id"] == sid
        assert "BITS-Reply-URL" not in r.headers, "a non-completing fragment has no reply URL"
        offset += step
    final = fragment(client, path, sid, data[offset:], offset, total, user=user, **headers)
    return sid, final


def get(client: FlaskClient, url: str, *, method: str = "GET", user: str | None = None,
        **headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET/HEAD a reply URL; return status, headers and body (the response is closed)."""
    if user is not None:
        headers[USER_HEADER] = user
    response = client.open(url, method=method, headers=headers)
    try:
        return response.status_code, dict(response.headers), response.get_data()
    finally:
        response.close()


def reply_url_of(response: t.Any, sid: str) -> str:
    url = str(response.headers["BITS-Reply-URL"])
    assert url.startswith(f"http://localhost/bits/.bits-reply/{sid.strip('{}').lower()}/"), url
    assert len(url) <= 2200
    return url


DATA = bytes(range(256)) * 20  # 5,120 bytes


def test_completing_fragment_carries_reply_url(reply_app: t.Any) -> None:
    handler = Recorder(reversed_upload)
    app, _ = reply_app(handler)
    client = app.test_client()
    sid, final = upload_all(client, "/bits/doc.bin", DATA)
    assert_ack(final, 200)
    assert final.headers["BITS-Received-Content-Range"] == str(len(DATA))
    assert final.headers["BITS-Session-Id"] == sid
    assert final.headers.getlist("BITS-Reply-URL") == [reply_url_of(final, sid)]
    status, headers, body = get(client, final.headers["BITS-Reply-URL"])
    assert status == 200
    assert body == bytes(reversed(DATA))
    assert headers["Content-Length"] == str(len(DATA))
    assert handler.count == 1


def test_plain_directory_sends_no_reply_url(make_app: t.Callable[..., Flask],
                                            upload_folder: Path) -> None:
    """Checklist 19: type 0 without a handler commits and never sends a reply URL."""
    client = make_app().test_client()
    sid, final = upload_all(client, "/bits/plain.bin", DATA)
    assert_ack(final, 200)
    assert final.headers["BITS-Received-Content-Range"] == str(len(DATA))
    assert "BITS-Reply-URL" not in final.headers
    assert (upload_folder / "plain.bin").read_bytes() == DATA


def test_upload_fields(reply_app: t.Any, session_folder: Path) -> None:
    handler = Recorder(lambda u: b"ok\n")
    app, _ = reply_app(handler)
    client = app.test_client()
    path = "/bits/sub/dir/report.bin?job=7&x=a%20b"
    sid = create(client, path, user="alice", **{"Content-Name": "report.bin"})
    r = fragment(client, path, sid, DATA, 0, len(DATA), user="alice",
                 **{"Content-Name": "report.bin"})
    assert_ack(r, 200)
    assert handler.count == 1
    upload = handler.uploads[0]
    assert upload.session_id == sid
    assert upload.remote_path == "sub/dir/report.bin"
    assert upload.url == "http://localhost/bits/sub/dir/report.bin?job=7&x=a%20b"
    assert upload.owner == "alice"
    assert upload.size == len(DATA)
    assert upload.content_name == "report.bin"
    assert os.path.isabs(upload.path)
    assert Path(upload.path).resolve().is_relative_to(session_folder.resolve())
    assert handler.seen[0] == {"by_path": DATA, "by_open": DATA}


def test_upload_content_name_from_fragments(reply_app: t.Any) -> None:
    """Windows (and flask_bits.client) send Content-Name on every Fragment and not on
    Create-Session (PROTOCOL.md 3.1, A8); the handler should still see the name."""
    handler = Recorder(lambda u: b"ok\n")
    app, _ = reply_app(handler)
    client = app.test_client()
    sid = create(client, "/bits/named.bin")
    r = fragment(client, "/bits/named.bin", sid, DATA, 0, len(DATA),
                 **{"Content-Name": "local-name.bin"})
    assert_ack(r, 200)
    assert handler.uploads[0].content_name == "local-name.bin"


class _TrackedStream(io.BytesIO):
    closed_by_server = False

    def close(self) -> None:
        type(self).closed_by_server = True
        super().close()


@pytest.mark.parametrize("kind", ["bytes", "path", "stream", "reply-body", "reply-path",
                                  "reply-stream"])
def test_handler_result_kinds(reply_app: t.Any, tmp_path: Path, kind: str) -> None:
    source = tmp_path / "reply-source.bin"
    expected = b"reply for " + kind.encode() + b"\n" + bytes(range(256)) * 8
    source.write_bytes(expected)
    _TrackedStream.closed_by_server = False

    def result(upload: Upload) -> t.Any:
        return {
            "bytes": lambda: expected,
            "path": lambda: str(source),
            "stream": lambda: _TrackedStream(expected),
            "reply-body": lambda: Reply(body=expected),
            "reply-path": lambda: Reply(path=source),
            "reply-stream": lambda: Reply(stream=_TrackedStream(expected)),
        }[kind]()

    app, _ = reply_app(Recorder(result))
    client = app.test_client()
    sid, final = upload_all(client, "/bits/kind.bin", DATA)
    assert_ack(final, 200)
    status, headers, body = get(client, reply_url_of(final, sid))
    assert (status, body) == (200, expected)
    assert headers["Content-Length"] == str(len(expected))
    if "path" in kind:
        assert source.read_bytes() == expected, "the handler's file is copied, not moved"
    if "stream" in kind:
        assert _TrackedStream.closed_by_server, "the server closes a returned stream"


def test_empty_reply_is_a_zero_length_file(reply_app: t.Any) -> None:
    """A25: a handler returning None still gets a reply URL, serving 0 bytes."""
    app, _ = reply_app(Recorder(lambda u: None))
    client = app.test_client()
    sid, final = upload_all(client, "/bits/empty-reply.bin", DATA)
    assert_ack(final, 200)
    url = reply_url_of(final, sid)
    status, headers, body = get(client, url, method="HEAD")
    assert status == 200 and headers["Content-Length"] == "0" and body == b""
    status, headers, body = get(client, url)
    assert status == 200 and headers["Content-Length"] == "0" and body == b""


def test_static_reply_url_is_returned_verbatim(reply_app: t.Any, session_folder: Path) -> None:
    static = "https://downloads.example.com/replies/Update%20Pack.bin?v=3&sig=abc"
    handler = Recorder(lambda u: Reply(static_url=static))
    app, _ = reply_app(handler)
    client = app.test_client()
    sid, final = upload_all(client, "/bits/static.bin", DATA)
    assert_ack(final, 200)
    assert final.headers.getlist("BITS-Reply-URL") == [static]
    again = assert_ack(fragment(client, "/bits/static.bin", sid, DATA[-10:], len(DATA) - 10,
                                len(DATA)), 200)
    assert again.headers.getlist("BITS-Reply-URL") == [static]
    assert handler.count == 1
    assert_ack(post(client, "/bits/static.bin", "Close-Session", sid=sid), 200)
    assert session_leftovers(session_folder, sid) == []


def test_copy_to_destination_then_cancel_keeps_file(
    reply_app: t.Any, upload_folder: Path, session_folder: Path
) -> None:
    """8.2 / checklist 25 and 29: the upload is also placed at its destination; a later
    Cancel-Session deletes the reply but not the committed file."""
    app, _ = reply_app(Recorder(lambda u: Reply(body=b"copied\n", copy_to_destination=True)))
    client = app.test_client()
    sid, final = upload_all(client, "/bits/kept.bin", DATA)
    assert_ack(final, 200)
    url = reply_url_of(final, sid)
    assert (upload_folder / "kept.bin").read_bytes() == DATA
    assert get(client, url)[::2] == (200, b"copied\n")
    assert_ack(post(client, "/bits/kept.bin", "Cancel-Session", sid=sid), 200)
    assert get(client, url)[0] == 404
    assert (upload_folder / "kept.bin").read_bytes() == DATA
    assert session_leftovers(session_folder, sid) == []


def test_without_copy_nothing_reaches_the_destination(reply_app: t.Any,
                                                      upload_folder: Path) -> None:
    app, _ = reply_app(Recorder(lambda u: b"r\n"))
    client = app.test_client()
    sid, final = upload_all(client, "/bits/not-kept.bin", DATA)
    assert_ack(final, 200)
    assert_ack(post(client, "/bits/not-kept.bin", "Close-Session", sid=sid), 200)
    assert not (upload_folder / "not-kept.bin").exists()


def test_reply_error_403_is_cached(reply_app: t.Any) -> None:
    """8.8: a 403 from the application is final; retries get it without a new call."""

    def deny(upload: Upload) -> t.Any:
        raise ReplyError(403, "not for you")

    handler = Recorder(deny)
    app, _ = reply_app(handler)
    client = app.test_client()
    sid, final = upload_all(client, "/bits/denied.bin", DATA)
    assert_ack(final, 403, BG_E_HTTP_403, context=CTX_APP)
    assert "BITS-Reply-URL" not in final.headers
    assert final.headers["BITS-Received-Content-Range"] == str(len(DATA))
    for _ in range(2):
        again = fragment(client, "/bits/denied.bin", sid, DATA[-100:], len(DATA) - 100,
                         len(DATA))
        assert_ack(again, 403, BG_E_HTTP_403, context=CTX_APP)
        assert "BITS-Reply-URL" not in again.headers
    assert handler.count == 1


@pytest.mark.parametrize(("app_status", "ack_status"),
                         [(500, 500), (404, 404), (401, 500), (413, 500)])
def test_reply_error_is_retried(reply_app: t.Any, app_status: int, ack_status: int) -> None:
    """8.8: other statuses are relayed (401/407/413/416 as 500) with 0x80190000+status,
    context 0x7, and the retried final fragment calls the handler again."""
    calls = []

    def flaky(upload: Upload) -> t.Any:
        calls.append(1)
        if len(calls) == 1:
            raise ReplyError(app_status)
        return b"second time\n"

    app, _ = reply_app(flaky)
    client = app.test_client()
    sid, final = upload_all(client, "/bits/flaky.bin", DATA)
    assert_ack(final, ack_status, http_error(app_status), context=CTX_APP)
    assert final.headers["BITS-Received-Content-Range"] == str(len(DATA))
    assert "BITS-Reply-URL" not in final.headers
    again = assert_ack(fragment(client, "/bits/flaky.bin", sid, DATA[-100:],
                                len(DATA) - 100, len(DATA)), 200)
    assert len(calls) == 2
    assert get(client, reply_url_of(again, sid))[::2] == (200, b"second time\n")


def test_handler_exception_is_500_without_details(reply_app: t.Any) -> None:
    calls = []

    def broken(upload: Upload) -> t.Any:
        calls.append(1)
        raise RuntimeError("secret-detail /etc/shadow")

    app, _ = reply_app(broken)
    client = app.test_client()
    sid, final = upload_all(client, "/bits/broken.bin", DATA)
    assert final.headers.get("BITS-Error-Code")
    assert_ack(final, 500, final.headers.get("BITS-Error-Code"), context=CTX_APP)
    assert final.headers["BITS-Received-Content-Range"] == str(len(DATA))
    leaked = " ".join(f"{k}: {v}" for k, v in final.headers.items())
    assert "secret-detail" not in leaked and "Traceback" not in leaked
    assert "RuntimeError" not in leaked and "/etc/shadow" not in leaked
    assert "BITS-Reply-URL" not in final.headers
    # Not cached: the retry calls the handler again.
    again = fragment(client, "/bits/broken.bin", sid, DATA[-1:], len(DATA) - 1, len(DATA))
    assert_ack(again, 500, again.headers.get("BITS-Error-Code"), context=CTX_APP)
    assert len(calls) == 2


# -- serving the reply (8.11) ----------------------------------------------------------


@pytest.fixture
def served(reply_app: t.Any) -> tuple[FlaskClient, str, str]:
    """A finished reply-upload by alice: ``(client, sid, reply URL)``; the reply is the
    upload reversed (5,120 bytes)."""
    app, _ = reply_app(Recorder(reversed_upload))
    client = app.test_client()
    sid, final = upload_all(client, "/bits/served.bin", DATA, user="alice")
    assert_ack(final, 200)
    return client, sid, reply_url_of(final, sid)


REPLY = bytes(reversed(DATA))


def test_reply_head_and_ranges(served: tuple[FlaskClient, str, str]) -> None:
    client, _, url = served
    status, head, body = get(client, url, method="HEAD", user="alice",
                             **{"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and body == b""
    assert head["Content-Length"] == str(len(REPLY))
    assert head["Accept-Ranges"] == "bytes"
    assert "Content-Encoding" not in head
    assert "ETag" in head and "Last-Modified" in head

    for spec, first, last in [("0-99", 0, 99), ("100-5119", 100, 5119), ("5000-", 5000, 5119),
                              ("-20", 5100, 5119), ("7-7", 7, 7)]:
        status, headers, body = get(client, url, user="alice", Range=f"bytes={spec}",
                                    **{"Accept-Encoding": "identity"})
        assert status == 206, spec
        assert headers["Content-Range"] == f"bytes {first}-{last}/{len(REPLY)}"
        assert headers["Content-Length"] == str(last - first + 1)
        assert body == REPLY[first:last + 1]
        assert "Content-Encoding" not in headers
        assert headers["ETag"] == head["ETag"]
        assert headers["Last-Modified"] == head["Last-Modified"]

    status, headers, body = get(client, url, user="alice")
    assert (status, body) == (200, REPLY)
    assert headers["Content-Length"] == str(len(REPLY))
    assert headers["ETag"] == head["ETag"] and headers["Last-Modified"] == head["Last-Modified"]
    status, again, _ = get(client, url, method="HEAD", user="alice")
    assert again["ETag"] == head["ETag"] and again["Last-Modified"] == head["Last-Modified"]


def test_reply_multiple_ranges_answer_whole_file(served: tuple[FlaskClient, str, str]) -> None:
    """D5: several ranges -> 200 with the whole file (the client falls back)."""
    client, _, url = served
    status, headers, body = get(client, url, user="alice", Range="bytes=0-9,20-29")
    assert (status, body) == (200, REPLY)
    assert headers["Content-Length"] == str(len(REPLY))


def test_reply_unsatisfiable_range_is_416(served: tuple[FlaskClient, str, str]) -> None:
    client, _, url = served
    status, headers, _ = get(client, url, user="alice", Range="bytes=9000-9999")
    assert status == 416
    assert headers.get("Content-Range") == f"bytes */{len(REPLY)}"


def test_reply_wrong_token_or_owner_is_404(served: tuple[FlaskClient, str, str]) -> None:
    client, sid, url = served
    assert get(client, url, user="alice")[0] == 200
    base, token = url.rsplit("/", 1)
    wrong = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert get(client, f"{base}/{wrong}", user="alice")[0] == 404
    assert get(client, f"{base}/{token}0", user="alice")[0] == 404
    assert get(client, f"{base}/{token.upper()}", user="alice")[0] == 404
    assert get(client, url, user="bob")[0] == 404
    assert get(client, url)[0] == 404  # anonymous
    other = "00000000-0000-4000-8000-000000000000"
    assert get(client, url.replace(sid.strip("{}").lower(), other), user="alice")[0] == 404


@pytest.mark.parametrize("packet", ["Close-Session", "Cancel-Session"])
def test_reply_url_stops_serving_after_close_or_cancel(
    served: tuple[FlaskClient, str, str], session_folder: Path, packet: str
) -> None:
    """Checklist 27/29: Close or Cancel deletes the reply; repeats are answered 200."""
    client, sid, url = served
    assert get(client, url, user="alice")[0] == 200
    assert_ack(post(client, "/bits/served.bin", packet, sid=sid, user="alice"), 200)
    assert get(client, url, user="alice")[0] == 404
    assert get(client, url, method="HEAD", user="alice")[0] == 404
    assert session_leftovers(session_folder, sid) == []
    assert_ack(post(client, "/bits/served.bin", packet, sid=sid, user="alice"), 200)
    late = fragment(client, "/bits/served.bin", sid, DATA[-10:], len(DATA) - 10, len(DATA),
                    user="alice")
    assert_ack(late, 500, BG_E_SESSION_NOT_FOUND)


def test_cancel_before_completion_never_calls_handler(
    reply_app: t.Any, upload_folder: Path, session_folder: Path
) -> None:
    handler = Recorder(lambda u: b"x")
    app, _ = reply_app(handler)
    client = app.test_client()
    sid = create(client, "/bits/abandoned.bin")
    assert_ack(fragment(client, "/bits/abandoned.bin", sid, DATA[:100], 0, len(DATA)), 200)
    assert_ack(post(client, "/bits/abandoned.bin", "Cancel-Session", sid=sid), 200)
    assert handler.count == 0
    assert not (upload_folder / "abandoned.bin").exists()
    assert session_leftovers(session_folder, sid) == []


# -- exactly once (8.9) ---------------------------------------------------------------------


def test_retried_final_fragment_replays_the_ack(reply_app: t.Any) -> None:
    handler = Recorder(reversed_upload)
    app, _ = reply_app(handler)
    client = app.test_client()
    path = "/bits/once.bin"
    sid, final = upload_all(client, path, DATA)
    assert_ack(final, 200)
    expected = sorted(final.headers.items())
    retries = [
        fragment(client, path, sid, DATA[-1706:], len(DATA) - 1706, len(DATA)),  # same copy
        fragment(client, path, sid, DATA[-1:], len(DATA) - 1, len(DATA)),
        fragment(client, path, sid, DATA, 0, len(DATA)),  # the whole file again
    ]
    for again in retries:
        assert_ack(again, 200)
        assert sorted(again.headers.items()) == expected
    assert handler.count == 1
    assert get(client, final.headers["BITS-Reply-URL"])[::2] == (200, REPLY)


def test_zero_length_upload_gets_a_reply(reply_app: t.Any) -> None:
    """A11 in upload-reply mode: an empty file completes and is handed over."""
    handler = Recorder(lambda u: b"size=%d\n" % u.size)
    app, _ = reply_app(handler)
    client = app.test_client()
    sid = create(client, "/bits/empty.bin")
    final = assert_ack(post(client, "/bits/empty.bin", "Fragment", b"", sid=sid,
                            headers={"Content-Range": "bytes 0--1/0"}), 200)
    assert final.headers["BITS-Received-Content-Range"] == "0"
    assert handler.count == 1 and handler.seen[0]["by_open"] == b""
    assert get(client, reply_url_of(final, sid))[::2] == (200, b"size=0\n")


def test_copy_conflict_retries_only_the_copy(
    reply_app: t.Any, upload_folder: Path
) -> None:
    """8.2: the destination appeared meanwhile (overwrites off) -> the overwrite-policy
    error, context 0x5; the retry only retries the copy, the handler is not called again."""
    handler = Recorder(lambda u: Reply(body=b"conflict\n", copy_to_destination=True))
    app, _ = reply_app(handler)
    client = app.test_client()
    upload_folder.mkdir(parents=True, exist_ok=True)
    (upload_folder / "taken.bin").write_bytes(b"somebody else's file")
    sid, final = upload_all(client, "/bits/taken.bin", DATA)
    assert_ack(final, 409, "0x80070005")
    assert "BITS-Reply-URL" not in final.headers
    assert final.headers["BITS-Received-Content-Range"] == str(len(DATA))
    assert (upload_folder / "taken.bin").read_bytes() == b"somebody else's file"
    (upload_folder / "taken.bin").unlink()
    again = assert_ack(fragment(client, "/bits/taken.bin", sid, DATA[-1:], len(DATA) - 1,
                                len(DATA)), 200)
    assert (upload_folder / "taken.bin").read_bytes() == DATA
    assert get(client, reply_url_of(again, sid))[::2] == (200, b"conflict\n")
    assert handler.count == 1


def _forward_status(session_folder: Path, sid: str) -> str | None:
    try:
        state = json.loads((session_folder / "sessions" / sid / "state.json").read_text())
    except FileNotFoundError:
        return None
    return (state.get("forward") or {}).get("status")


def test_late_failure_is_reported_once_then_retried(
    reply_app: t.Any, session_folder: Path
) -> None:
    """7.3 / 8.8: a failure that happens after the client stopped waiting (503) is
    reported to the next retry; the retry after that calls the handler again."""
    gate = threading.Event()
    calls = []

    def slow_then_ok(upload: Upload) -> t.Any:
        calls.append(1)
        if len(calls) == 1:
            gate.wait(10)
            raise ReplyError(500)
        return b"ok\n"

    app, _ = reply_app(slow_then_ok, BITS_REPLY_WAIT=0.2)
    client = app.test_client()
    try:
        sid, first = upload_all(client, "/bits/late.bin", DATA)
        assert_ack(first, 503, E_PENDING, context=CTX_APP)
        assert "BITS-Reply-URL" not in first.headers
    finally:
        gate.set()
    wait_until(lambda: _forward_status(session_folder, sid) == "failed", 10, "the late failure")
    retry = fragment(client, "/bits/late.bin", sid, DATA[-1:], len(DATA) - 1, len(DATA))
    assert_ack(retry, 500, BG_E_HTTP_500, context=CTX_APP)
    assert retry.headers["BITS-Received-Content-Range"] == str(len(DATA))
    assert len(calls) == 1
    ok = assert_ack(fragment(client, "/bits/late.bin", sid, DATA[-1:], len(DATA) - 1,
                             len(DATA)), 200)
    assert len(calls) == 2
    assert get(client, reply_url_of(ok, sid))[::2] == (200, b"ok\n")


def test_cancel_detaches_in_process_handler(
    reply_app: t.Any, session_folder: Path, upload_folder: Path
) -> None:
    """Cancel-Session while the handler runs: 200 at once; the handler's result is
    dropped (no folder re-created, no copy, no reply URL, no reply_forwarded signal)."""
    from flask_bits import signals

    gate = threading.Event()
    returned = threading.Event()

    def blocked(upload: Upload) -> t.Any:
        gate.wait(10)
        returned.set()
        return Reply(body=b"too late\n", copy_to_destination=True)

    app, _ = reply_app(blocked, BITS_REPLY_WAIT=0.2)
    forwarded: list[dict[str, t.Any]] = []

    def on_forwarded(sender: t.Any, **data: t.Any) -> None:
        forwarded.append(data)

    client = app.test_client()
    with signals.reply_forwarded.connected_to(on_forwarded, app):
        try:
            sid, first = upload_all(client, "/bits/detached.bin", DATA)
            assert_ack(first, 503, E_PENDING, context=CTX_APP)
            token = reply_token(session_folder, sid)
            assert_ack(post(client, "/bits/detached.bin", "Cancel-Session", sid=sid), 200)
            assert not returned.is_set(), "Cancel-Session does not wait for the handler"
            assert not (session_folder / "sessions" / sid).exists()
        finally:
            gate.set()
        assert returned.wait(10)
        recreated = []

        def settled() -> bool:
            if (session_folder / "sessions" / sid).exists():
                recreated.append(True)
            return not session_leftovers(session_folder, sid)

        wait_until(settled, 10, "the detached forward to end")
    assert not recreated
    assert forwarded == []
    assert not (upload_folder / "detached.bin").exists()
    url = f"http://localhost/bits/.bits-reply/{sid.strip('{}').lower()}/{token}"
    assert get(client, url)[0] == 404
    late = fragment(client, "/bits/detached.bin", sid, DATA[-1:], len(DATA) - 1, len(DATA))
    assert_ack(late, 500, BG_E_SESSION_NOT_FOUND)
    assert_ack(post(client, "/bits/detached.bin", "Cancel-Session", sid=sid), 200)


def test_example_app_reply_url_uses_upload_authentication(tmp_path: Path) -> None:
    """D8: the reply URL asks for the same authentication as the upload and serves only
    the session's owner (example_app with EXAMPLE_AUTH=basic)."""
    from example_app import create_app

    app = create_app({
        "TESTING": True,
        "EXAMPLE_AUTH": "basic",
        "BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
        "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
        "BITS_CLEANUP_INTERVAL": 0,
    })
    client = app.test_client()
    alice = {"Authorization": "Basic YWxpY2U6YWxpY2UtcHc="}  # alice:alice-pw
    bob = {"Authorization": "Basic Ym9iOmJvYi1wdw=="}  # bob:bob-pw
    sid = create(client, "/reply/a.bin", **alice)
    final = assert_ack(fragment(client, "/reply/a.bin", sid, DATA, 0, len(DATA), **alice), 200)
    url = final.headers["BITS-Reply-URL"]
    assert url.startswith("http://localhost/reply/.bits-reply/")
    status, headers, _ = get(client, url)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert get(client, url, **bob)[0] == 404
    assert get(client, url, **alice)[::2] == (200, sha256_line(DATA))


# ======================================================================================
# HTTP server application (types 1 and 2) with real servers on 127.0.0.1
# ======================================================================================


UPLOAD = os.urandom(256 * 1024 + 123)
TOTAL = len(UPLOAD)
LAST = 1000  # bytes in the completing fragment (small: answered without reading it all)


def fetch(url: str, *, method: str = "GET", headers: t.Mapping[str, str] | None = None,
          ) -> tuple[int, dict[str, str], bytes]:
    base, path = parse_reply_url(url)
    conn = wire.connect(base, timeout=30)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def packet(base: str, path: str, packet_type: str, sid: str) -> wire.Reply:
    return wire.bits_post(base, path, packet_type, session_id=sid)


def begin(base: str, path: str, data: bytes = UPLOAD) -> str:
    """Create a session and send everything but the last :data:`LAST` bytes."""
    conn = wire.connect(base, timeout=60)
    try:
        sid = wire.create_session(conn, path)
        reply = wire.fragment(conn, path, sid, data[:-LAST], 0, len(data))
        assert reply.status == 200, reply
        assert reply.get("BITS-Received-Content-Range") == str(len(data) - LAST)
        assert reply.get("BITS-Reply-URL") is None
        return sid
    finally:
        conn.close()


def final(base: str, path: str, sid: str, data: bytes = UPLOAD) -> wire.Reply:
    """Send the completing fragment once."""
    return wire.fragment(base, path, sid, data[-LAST:], len(data) - LAST, len(data))


def is_pending(reply: wire.Reply) -> bool:
    return reply.status == 503 and reply.get("BITS-Error-Code") == E_PENDING


def final_until_answered(base: str, path: str, sid: str, data: bytes = UPLOAD,
                         timeout: float = 30.0) -> tuple[wire.Reply, int]:
    """Send the completing fragment like a client: again after each "retry later" 503
    (each one already took ``BITS_REPLY_WAIT``). Returns the first other answer and how
    many 503s came before it."""
    deadline = time.monotonic() + timeout
    pending = 0
    while True:
        reply = final(base, path, sid, data)
        if not is_pending(reply):
            return reply, pending
        pending += 1
        assert time.monotonic() < deadline, f"still pending after {timeout}s"


def assert_wire_ack(reply: wire.Reply, status: int, error: str | None = None,
                    context: str = "0x5") -> None:
    assert reply.status == status, reply
    assert reply.get("BITS-Packet-Type") == "Ack" and reply.get("Content-Length") == "0", reply
    if error is None:
        assert reply.get("BITS-Error-Code") is None, reply
    else:
        assert reply.get("BITS-Error-Code") == error, reply
        assert reply.get("BITS-Error-Context") == context, reply


def assert_replied(reply: wire.Reply, sid: str, base: str, total: int = TOTAL) -> str:
    assert_wire_ack(reply, 200)
    assert reply.get("BITS-Received-Content-Range") == str(total)
    assert reply.get("BITS-Session-Id") == sid
    url = reply.get("BITS-Reply-URL")
    assert url is not None, reply
    assert url.startswith(f"{base}/"), url
    return url


def reply_token(session_folder: Path, sid: str) -> str:
    state = json.loads((session_folder / "sessions" / sid / "state.json").read_text())
    return str(state["forward"]["token"])


def reply_url_for(base: str, sid: str, token: str, prefix: str = "/bits") -> str:
    return f"{base}{prefix}/.bits-reply/{sid.strip('{}').lower()}/{token}"


class Bits(t.NamedTuple):
    """A gunicorn BITS server under test and its folders."""

    server: GunicornServer
    folder: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def sessions(self) -> Path:
        return self.folder / "sessions"

    @property
    def uploads(self) -> Path:
        return self.folder / "uploads"


def bits_env(folder: Path, **env: t.Any) -> dict[str, str]:
    return {
        "BITS_UPLOAD_FOLDER": str(folder / "uploads"),
        "BITS_SESSION_FOLDER": str(folder / "sessions"),
        "BITS_CLEANUP_INTERVAL": "0",
        **{k: str(v) for k, v in env.items()},
    }


@pytest.fixture(scope="module")
def app_server() -> t.Iterator[AppServer]:
    with AppServer() as server:
        yield server


#: Tests check the folders before stopping; at teardown workers need no grace period.
FAST_STOP = ("--graceful-timeout", "0")


def _gunicorn(folder: Path, workers: int, **env: t.Any) -> t.Iterator[Bits]:
    folder.mkdir(parents=True, exist_ok=True)
    environment = bits_env(folder, **env)
    with GunicornServer(env=environment, workers=workers, extra_args=FAST_STOP,
                        log_path=folder / "gunicorn.log") as server:
        wait_until(lambda: len(server.worker_pids()) == workers, 20, "all gunicorn workers")
        yield Bits(server, folder, environment)


@pytest.fixture(scope="module")
def gun2(app_server: AppServer, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Bits]:
    """Type 2 to the recording app (its URL already has a query), retry-later after 1 s."""
    yield from _gunicorn(tmp_path_factory.mktemp("gun2"), 3,
                         BITS_NOTIFICATION_TYPE=2,
                         BITS_NOTIFICATION_URL=app_server.notify_url + "?via=bits",
                         BITS_REPLY_WAIT=1)


@pytest.fixture(scope="module")
def gun1(app_server: AppServer, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Bits]:
    """Type 1 to the recording app."""
    yield from _gunicorn(tmp_path_factory.mktemp("gun1"), 2,
                         BITS_NOTIFICATION_TYPE=1,
                         BITS_NOTIFICATION_URL=app_server.notify_url,
                         BITS_REPLY_WAIT=5)


# -- the notification request (8.4, 8.6) ---------------------------------------------------


@pytest.mark.integration
def test_type2_posts_the_upload_as_body(gun2: Bits, app_server: AppServer) -> None:
    case = "t2-body"
    path = f"/bits/t2-body.bin?case={case}&user=a%20b"
    sid = begin(gun2.url, path)
    reply, _ = final_until_answered(gun2.url, path, sid)
    url = assert_replied(reply, sid, gun2.url)

    calls = app_server.calls(case)
    assert len(calls) == 1
    call = calls[0]
    assert (call.method, call.path) == ("POST", "/app/notify")
    assert call.query == f"via=bits&case={case}&user=a%20b", "8.6: destination query appended"
    assert call.header("BITS-Original-Request-URL") == gun2.url + path
    assert call.content_length == str(TOTAL)
    assert call.transfer_encoding is None
    assert call.body_length == len(UPLOAD)
    assert call.body_sha256 == hashlib.sha256(UPLOAD).hexdigest()
    for absent in ("BITS-Request-DataFile-Name", "BITS-Response-DataFile-Name",
                   "BITS-Packet-Type"):
        assert call.header(absent) is None, absent

    assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
    again, pending = final_until_answered(gun2.url, path, sid)
    assert pending == 0
    assert again.get("BITS-Reply-URL") == url and again.status == 200
    assert len(app_server.calls(case)) == 1, "a retry after success never notifies again"
    assert_wire_ack(packet(gun2.url, path, "Close-Session", sid), 200)
    assert fetch(url)[0] == 404
    assert session_leftovers(gun2.sessions, sid) == []


@pytest.mark.integration
def test_type1_posts_file_names(gun1: Bits, app_server: AppServer) -> None:
    case = "t1-names"
    path = f"/bits/t1-names.bin?case={case}"
    sid = begin(gun1.url, path)
    reply, _ = final_until_answered(gun1.url, path, sid)
    url = assert_replied(reply, sid, gun1.url)

    calls = app_server.calls(case)
    assert len(calls) == 1
    call = calls[0]
    assert call.method == "POST" and call.query == f"case={case}"
    assert call.header("BITS-Original-Request-URL") == gun1.url + path
    assert call.content_length == "0" and call.body_length == 0
    assert call.transfer_encoding is None
    assert call.header("BITS-Packet-Type") is None
    request_file = call.header("BITS-Request-DataFile-Name")
    response_file = call.header("BITS-Response-DataFile-Name")
    assert request_file and response_file
    session_dir = (gun1.sessions / "sessions" / sid).resolve()
    for name in (request_file, response_file):
        assert os.path.isabs(name)
        assert Path(name).resolve().is_relative_to(session_dir), name
    assert call.request_file_error is None
    assert call.request_file_sha256 == hashlib.sha256(UPLOAD).hexdigest()
    assert call.response_file_existed is False, "the application creates the reply file"
    assert call.response_dir_existed is True

    assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
    assert_wire_ack(packet(gun1.url, path, "Close-Session", sid), 200)
    assert not os.path.exists(request_file) and not os.path.exists(response_file)
    assert fetch(url)[0] == 404
    assert session_leftovers(gun1.sessions, sid) == []


@pytest.mark.integration
def test_type1_reply_from_body_without_file(gun1: Bits, app_server: AppServer) -> None:
    """A18: no response file but a body -> the body is the reply."""
    case = "t1-body"
    app_server.script(case, Action(reply_file=False, body=b"from the body\n"))
    path = f"/bits/t1-body.bin?case={case}"
    sid = begin(gun1.url, path)
    reply, _ = final_until_answered(gun1.url, path, sid)
    url = assert_replied(reply, sid, gun1.url)
    assert fetch(url)[::2] == (200, b"from the body\n")
    assert_wire_ack(packet(gun1.url, path, "Close-Session", sid), 200)


# -- the notification response (8.5, 8.2) ----------------------------------------------------


@pytest.mark.integration
def test_static_response_url(gun2: Bits, app_server: AppServer) -> None:
    case = "static"
    static_bytes = b"the static reply\n" * 10
    static_url = app_server.static_file("static-reply.bin", static_bytes) + "?x=1&y=%7B%7D"
    app_server.script(case, Action(static_url=static_url, body=b""))
    path = f"/bits/static.bin?case={case}"
    sid = begin(gun2.url, path)
    reply, _ = final_until_answered(gun2.url, path, sid)
    assert_wire_ack(reply, 200)
    assert reply.get("BITS-Reply-URL") == static_url, "returned verbatim"
    again, _ = final_until_answered(gun2.url, path, sid)
    assert again.get("BITS-Reply-URL") == static_url
    assert len(app_server.calls(case)) == 1
    assert_wire_ack(packet(gun2.url, path, "Close-Session", sid), 200)
    assert fetch(static_url)[::2] == (200, static_bytes), "a static reply is never deleted"
    assert session_leftovers(gun2.sessions, sid) == []


@pytest.mark.integration
def test_malformed_static_url_is_411(gun2: Bits, app_server: AppServer) -> None:
    """8.5: a relative BITS-Static-Response-URL -> 411 E_INVALIDARG, context 0x7."""
    case = "static-relative"
    app_server.script(case, Action(static_url="replies/relative.bin", body=b""))
    path = f"/bits/static-relative.bin?case={case}"
    sid = begin(gun2.url, path)
    reply, _ = final_until_answered(gun2.url, path, sid)
    assert_wire_ack(reply, 411, E_INVALIDARG, CTX_APP)
    assert reply.get("BITS-Reply-URL") is None
    assert_wire_ack(packet(gun2.url, path, "Cancel-Session", sid), 200)


@pytest.mark.integration
def test_copy_file_to_destination_then_cancel(gun2: Bits, app_server: AppServer) -> None:
    """Checklist 25 and 29: the file is placed; Cancel deletes the reply, keeps the file."""
    case = "copy"
    app_server.script(case, Action(copy=True))
    path = f"/bits/copied.bin?case={case}"
    sid = begin(gun2.url, path)
    reply, _ = final_until_answered(gun2.url, path, sid)
    url = assert_replied(reply, sid, gun2.url)
    assert (gun2.uploads / "copied.bin").read_bytes() == UPLOAD
    assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
    assert_wire_ack(packet(gun2.url, path, "Cancel-Session", sid), 200)
    assert fetch(url)[0] == 404
    assert (gun2.uploads / "copied.bin").read_bytes() == UPLOAD
    assert session_leftovers(gun2.sessions, sid) == []


# -- application errors (8.8) ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(("app_status", "ack_status"),
                         [(500, 500), (503, 503), (401, 500), (204, 500)])
def test_application_error_then_retry(gun2: Bits, app_server: AppServer, app_status: int,
                                      ack_status: int) -> None:
    case = f"error-{app_status}"
    app_server.script(case, Action(status=app_status, body=b""))
    path = f"/bits/error-{app_status}.bin?case={case}"
    sid = begin(gun2.url, path)
    reply, _ = final_until_answered(gun2.url, path, sid)
    assert_wire_ack(reply, ack_status, http_error(app_status), CTX_APP)
    assert reply.get("BITS-Received-Content-Range") == str(TOTAL)
    assert reply.get("BITS-Session-Id") == sid
    assert reply.get("BITS-Reply-URL") is None
    assert len(app_server.calls(case)) == 1
    again, _ = final_until_answered(gun2.url, path, sid)
    url = assert_replied(again, sid, gun2.url)
    assert len(app_server.calls(case)) == 2, "the retried final fragment notifies again"
    assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
    assert_wire_ack(packet(gun2.url, path, "Close-Session", sid), 200)


@pytest.mark.integration
def test_application_403_is_final(gun2: Bits, app_server: AppServer) -> None:
    case = "forbidden"
    app_server.script(case, Action(status=403, body=b""))
    path = f"/bits/forbidden.bin?case={case}"
    sid = begin(gun2.url, path)
    reply, _ = final_until_answered(gun2.url, path, sid)
    assert_wire_ack(reply, 403, BG_E_HTTP_403, CTX_APP)
    assert reply.get("BITS-Received-Content-Range") == str(TOTAL)
    for _ in range(2):
        again, _ = final_until_answered(gun2.url, path, sid)
        assert_wire_ack(again, 403, BG_E_HTTP_403, CTX_APP)
    assert len(app_server.calls(case)) == 1, "never re-posted after a 403"
    assert_wire_ack(packet(gun2.url, path, "Close-Session", sid), 200)


@pytest.fixture(scope="module")
def gun_timeout(app_server: AppServer,
                tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Bits]:
    yield from _gunicorn(tmp_path_factory.mktemp("gun-timeout"), 2,
                         BITS_NOTIFICATION_TYPE=2,
                         BITS_NOTIFICATION_URL=app_server.notify_url,
                         BITS_NOTIFICATION_TIMEOUT=1)


@pytest.mark.integration
def test_application_timeout_is_408(gun_timeout: Bits, app_server: AppServer) -> None:
    """8.7: no answer within BITS_NOTIFICATION_TIMEOUT -> 408 0x80070112 ctx 0x7; the
    retried final fragment notifies again."""
    case = "timeout"
    app_server.script(case, Action(sleep=3))
    path = f"/bits/timeout.bin?case={case}"
    sid = begin(gun_timeout.url, path)
    reply = final(gun_timeout.url, path, sid)
    assert_wire_ack(reply, 408, NOTIFICATION_TIMEOUT, CTX_APP)
    assert reply.get("BITS-Received-Content-Range") == str(TOTAL)
    assert reply.get("BITS-Reply-URL") is None
    again, _ = final_until_answered(gun_timeout.url, path, sid)
    url = assert_replied(again, sid, gun_timeout.url)
    assert len(app_server.calls(case)) == 2
    assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
    assert_wire_ack(packet(gun_timeout.url, path, "Close-Session", sid), 200)


# -- slow applications and duplicates (8.9) -----------------------------------------------------


@pytest.mark.integration
def test_slow_application_retry_later(gun2: Bits, app_server: AppServer) -> None:
    case = "slow"
    gate = app_server.gate()
    app_server.script(case, Action(gate=gate))
    path = f"/bits/slow.bin?case={case}"
    sid = begin(gun2.url, path)
    first = final(gun2.url, path, sid)
    assert is_pending(first), first
    assert first.get("BITS-Packet-Type") == "Ack" and first.get("BITS-Reply-URL") is None
    assert first.get("BITS-Session-Id") == sid
    app_server.wait_calls(case, 1)
    still = final(gun2.url, path, sid)  # the application is still working
    assert is_pending(still), still
    assert len(app_server.calls(case)) == 1

    gate.set()
    assert app_server.calls(case)[0].finished.wait(10)
    reply, _ = final_until_answered(gun2.url, path, sid)
    url = assert_replied(reply, sid, gun2.url)
    assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
    again = final(gun2.url, path, sid)
    assert again.status == 200 and again.get("BITS-Reply-URL") == url
    assert len(app_server.calls(case)) == 1, "called exactly once"
    assert_wire_ack(packet(gun2.url, path, "Close-Session", sid), 200)
    assert session_leftovers(gun2.sessions, sid) == []


@pytest.mark.integration
def test_retry_later_ack_carries_received_range(gun2: Bits, app_server: AppServer) -> None:
    """8.8 / 7.3: every error Ack of the final fragment carries
    BITS-Received-Content-Range: T -- the "retry later" 503 too."""
    case = "slow-range"
    gate = app_server.gate()
    app_server.script(case, Action(gate=gate))
    path = f"/bits/slow-range.bin?case={case}"
    sid = begin(gun2.url, path)
    try:
        first = final(gun2.url, path, sid)
        assert is_pending(first), first
        assert first.get("BITS-Received-Content-Range") == str(TOTAL), first
    finally:
        gate.set()
        assert_wire_ack(packet(gun2.url, path, "Cancel-Session", sid), 200)


@pytest.mark.integration
def test_concurrent_final_fragments_notify_once(gun2: Bits, app_server: AppServer) -> None:
    case = "concurrent"
    gate = app_server.gate()
    app_server.script(case, Action(gate=gate))
    path = f"/bits/concurrent.bin?case={case}"
    sid = begin(gun2.url, path)
    barrier = threading.Barrier(2, timeout=20)
    first_answers = [threading.Event(), threading.Event()]
    results: list[tuple[wire.Reply, wire.Reply] | BaseException] = [None, None]  # type: ignore[list-item]

    def client(i: int) -> None:
        try:
            barrier.wait()
            first = final(gun2.url, path, sid)
            first_answers[i].set()
            results[i] = (first, final_until_answered(gun2.url, path, sid)[0])
        except BaseException as exc:  # reported by the main thread
            first_answers[i].set()
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    try:
        for event in first_answers:
            assert event.wait(30)
    finally:
        gate.set()
        for th in threads:
            th.join(60)
    assert not any(th.is_alive() for th in threads)
    urls = set()
    for result in results:
        assert not isinstance(result, BaseException), result
        first, last = result
        assert first.status in (200, 503), first
        urls.add(assert_replied(last, sid, gun2.url))
    assert len(urls) == 1, urls
    assert len(app_server.calls(case)) == 1, "the application is called once"
    assert fetch(urls.pop())[::2] == (200, sha256_line(UPLOAD))
    assert_wire_ack(packet(gun2.url, path, "Close-Session", sid), 200)


# -- Cancel-Session detaches a pending forward ------------------------------------------------


@pytest.mark.integration
def test_cancel_detaches_pending_forward(gun2: Bits, app_server: AppServer) -> None:
    case = "cancel-pending"
    gate = app_server.gate()
    # The application will even ask for the copy: a detached result must be dropped.
    app_server.script(case, Action(gate=gate, copy=True))
    path = f"/bits/cancel-pending.bin?case={case}"
    sid = begin(gun2.url, path)
    session_dir = gun2.sessions / "sessions" / sid
    first = final(gun2.url, path, sid)
    assert is_pending(first), first
    call = app_server.wait_calls(case, 1)[0]
    token = reply_token(gun2.sessions, sid)

    started = time.monotonic()
    cancel = packet(gun2.url, path, "Cancel-Session", sid)
    assert not call.finished.is_set(), "Cancel-Session does not wait for the forward"
    assert time.monotonic() - started < 10
    assert_wire_ack(cancel, 200)
    assert cancel.get("BITS-Session-Id") == sid
    assert not session_dir.exists()

    gate.set()
    assert call.finished.wait(10)
    recreated = []

    def settled() -> bool:
        if session_dir.exists():
            recreated.append(True)
        return not session_leftovers(gun2.sessions, sid)

    wait_until(settled, 15, f"no leftovers of {sid}")
    assert not recreated, "a detached forward re-created the session folder"
    assert not session_dir.exists()
    assert fetch(reply_url_for(gun2.url, sid, token))[0] == 404
    assert not (gun2.uploads / "cancel-pending.bin").exists()
    late = final(gun2.url, path, sid)
    assert_wire_ack(late, 500, BG_E_SESSION_NOT_FOUND)
    assert_wire_ack(packet(gun2.url, path, "Cancel-Session", sid), 200)
    assert len(app_server.calls(case)) == 1
    assert session_leftovers(gun2.sessions, sid) == []


@pytest.fixture(scope="module")
def gun_kill(app_server: AppServer,
             tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Bits]:
    """Its workers get SIGKILLed (gunicorn respawns them)."""
    yield from _gunicorn(tmp_path_factory.mktemp("gun-kill"), 2,
                         BITS_NOTIFICATION_TYPE=2,
                         BITS_NOTIFICATION_URL=app_server.notify_url,
                         BITS_REPLY_WAIT=1)


def kill_all_workers(bits: Bits, workers: int = 2) -> None:
    old = bits.server.worker_pids()
    assert len(old) == workers
    for pid in old:
        os.kill(pid, signal.SIGKILL)

    def respawned() -> bool:
        pids = bits.server.worker_pids()
        return len(pids) == workers and not set(pids) & set(old)

    wait_until(respawned, 30, "gunicorn to replace every worker")


@pytest.mark.integration
def test_killed_forward_is_restarted_by_retry(gun_kill: Bits, app_server: AppServer) -> None:
    case = "kill-retry"
    gate = app_server.gate()
    app_server.script(case, Action(gate=gate))  # the second call answers at once
    path = f"/bits/kill-retry.bin?case={case}"
    sid = begin(gun_kill.url, path)
    try:
        assert is_pending(final(gun_kill.url, path, sid))
        app_server.wait_calls(case, 1)
        kill_all_workers(gun_kill)
        reply, _ = final_until_answered(gun_kill.url, path, sid)
        url = assert_replied(reply, sid, gun_kill.url)
        assert len(app_server.calls(case)) == 2, "the forward was started again"
        assert fetch(url)[::2] == (200, sha256_line(UPLOAD))
        assert_wire_ack(packet(gun_kill.url, path, "Close-Session", sid), 200)
        assert fetch(url)[0] == 404
        # The dead attempt's forward lock file may stay until the next cleanup sweep.
        left = session_leftovers(gun_kill.sessions, sid)
        assert left in ([], [f"locks/{sid}.forward-1.lock"]), left
        SessionStore(str(gun_kill.sessions)).cleanup(tombstone_timeout=86400)
        assert session_leftovers(gun_kill.sessions, sid) == []
    finally:
        gate.set()


@pytest.mark.integration
def test_killed_forward_then_cancel_leaves_nothing_after_cleanup(
    gun_kill: Bits, app_server: AppServer
) -> None:
    case = "kill-cancel"
    gate = app_server.gate()
    app_server.script(case, Action(gate=gate))
    path = f"/bits/kill-cancel.bin?case={case}"
    sid = begin(gun_kill.url, path)
    try:
        assert is_pending(final(gun_kill.url, path, sid))
        app_server.wait_calls(case, 1)
        token = reply_token(gun_kill.sessions, sid)
        kill_all_workers(gun_kill)
        assert_wire_ack(packet(gun_kill.url, path, "Cancel-Session", sid), 200)
        cleanup = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "example_app:create_app", "bits",
             "cleanup"],
            cwd=str(ROOT), env={**os.environ, **gun_kill.env}, capture_output=True,
            text=True, timeout=60,
        )
        assert cleanup.returncode == 0, cleanup.stderr
        assert session_leftovers(gun_kill.sessions, sid) == []
        assert fetch(reply_url_for(gun_kill.url, sid, token))[0] == 404
        assert_wire_ack(final(gun_kill.url, path, sid), 500, BG_E_SESSION_NOT_FOUND)
        assert len(app_server.calls(case)) == 1
    finally:
        gate.set()


# -- example_app over gunicorn -------------------------------------------------------------------


def check_reply_download(url: str, expected: bytes) -> None:
    """What a BITS download job does with a reply URL: HEAD, then ranged GETs."""
    status, head, body = fetch(url, method="HEAD")
    assert status == 200 and body == b""
    assert head["content-length"] == str(len(expected))
    assert head["accept-ranges"] == "bytes"
    assert "content-encoding" not in head
    got = b""
    step = 20
    for first in range(0, len(expected), step):
        last = min(first + step, len(expected)) - 1
        status, headers, body = fetch(url, headers={"Range": f"bytes={first}-{last}",
                                                    "Accept-Encoding": "identity"})
        assert status == 206
        assert headers["content-range"] == f"bytes {first}-{last}/{len(expected)}"
        assert headers["content-length"] == str(last - first + 1)
        assert headers["last-modified"] == head["last-modified"]
        assert headers.get("etag") == head.get("etag")
        assert "content-encoding" not in headers
        got += body
    assert got == expected


@pytest.mark.integration
@pytest.mark.parametrize("notification_type", [1, 2])
def test_example_app_replies(tmp_path: Path, notification_type: int) -> None:
    env = bits_env(tmp_path, BITS_NOTIFICATION_TYPE=notification_type,
                   BITS_NOTIFICATION_URL="/app/sha256")
    with GunicornServer(env=env, workers=2, extra_args=FAST_STOP,
                        log_path=tmp_path / "gunicorn.log") as server:
        expected = sha256_line(UPLOAD)
        # The in-process handler of /reply/.
        last = wire.upload(server.url, "/reply/x.bin", UPLOAD, 100_000, close=False)
        url = last.get("BITS-Reply-URL")
        assert last.status == 200 and url, last
        assert url.startswith(f"{server.url}/reply/.bits-reply/")
        check_reply_download(url, expected)
        # /bits/ notifies /app/sha256 over HTTP (a relative URL: this server itself).
        last = wire.upload(server.url, "/bits/x.bin", UPLOAD, 100_000, close=False)
        url = last.get("BITS-Reply-URL")
        assert last.status == 200 and url, last
        assert url.startswith(f"{server.url}/bits/.bits-reply/")
        check_reply_download(url, expected)
        assert not (tmp_path / "uploads" / "x.bin").exists()
