"""Helpers for ``tests/test_security.py`` and ``tests/test_limits.py``.

* :func:`raw_environ` / :func:`send`: a ``BITS_POST`` built directly as a WSGI environ, so a
  test can send what no well-behaved client (or werkzeug's ``EnvironBuilder``) would: a
  missing or malformed ``Content-Length``, a body shorter or longer than it, CR/LF and
  control characters in header values, duplicate headers (joined with ``", "`` as gunicorn
  and werkzeug do), a path decoded exactly once, a hostile ``Host``. :func:`send` runs the
  app the way the test client does (``werkzeug.test.run_wsgi_app``), without the client's
  cookie jar, which itself chokes on hostile ``Host`` values.
* :func:`wire_path`: what a WSGI server puts in ``PATH_INFO`` for a request target
  (percent-decoded once, bytes as latin-1).
* :func:`ack_problems`: what is wrong with a response to a ``BITS_POST`` (PROTOCOL.md T7,
  the 5xx answers the protocol allows).
* :class:`RecordingServer`: a tiny HTTP server on 127.0.0.1 that records every request it
  gets (the "evil" host of the notification tests).
"""

from __future__ import annotations

import http.server
import io
import re
import threading
import typing as t
import urllib.parse
from pathlib import Path

from flask import Flask
from werkzeug.test import TestResponse
from werkzeug.test import run_wsgi_app

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"

#: The only 5xx answers the protocol itself gives: (status, BITS-Error-Code).
ALLOWED_5XX = frozenset({
    (500, "0x8020001F"),  # BG_E_SESSION_NOT_FOUND
    (500, "0x80200020"),  # BG_E_TOO_LARGE
    (500, "0x80070070"),  # ERROR_DISK_FULL
    (501, "0x80070005"),  # uploads disabled
    (503, "0x800700AA"),  # ERROR_BUSY
    (503, "0x80070045"),  # ERROR_TOO_MANY_SESSIONS
    (503, "0x8000000A"),  # E_PENDING
})

#: Response headers that differ between two answers for reasons unrelated to the request.
VOLATILE_HEADERS = frozenset({"date", "bits-session-id"})

_UNSET: t.Any = object()


# -- raw requests ---------------------------------------------------------------------------


def wire_path(target: str) -> str:
    """``PATH_INFO`` for a request target as a WSGI server builds it: percent-decoded once;
    non-ASCII characters of ``target`` are sent as UTF-8; bytes are carried as latin-1."""
    return urllib.parse.unquote_to_bytes(target).decode("latin-1")


def wire_value(text: str) -> str:
    """A header value as a WSGI server passes it on: the UTF-8 bytes as latin-1."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def raw_environ(
    path_info: str,
    headers: t.Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_length: t.Any = _UNSET,
    method: str = "BITS_POST",
    query: str = "",
    remote_user: str | None = None,
    host: str = "localhost",
    extra: t.Mapping[str, t.Any] | None = None,
) -> dict[str, t.Any]:
    """A WSGI environ for one request; header values are used exactly as given.

    ``content_length`` defaults to ``len(body)``; ``None`` sends no ``Content-Length``;
    a string is sent verbatim. Repeated header names are joined with ``", "``.
    """
    env: dict[str, t.Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": host,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    joined: dict[str, list[str]] = {}
    if content_length is _UNSET:
        joined["CONTENT_LENGTH"] = [str(len(body))]
    elif content_length is not None:
        joined["CONTENT_LENGTH"] = [str(content_length)]
    if remote_user is not None:
        env["REMOTE_USER"] = remote_user
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        joined.setdefault(key, []).append(value)
    for key, values in joined.items():
        env[key] = ", ".join(values)
    env.update(extra or {})
    return env


def send(app: t.Any, environ: dict[str, t.Any]) -> TestResponse:
    """Run ``app`` on ``environ`` and return the whole, buffered response."""
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    return TestResponse(app_iter, status, headers, request=None)  # type: ignore[arg-type]


def post(
    app: t.Any,
    url_path: str,
    packet_type: str | None,
    body: bytes = b"",
    *,
    session_id: str | None = None,
    headers: t.Iterable[tuple[str, str]] = (),
    **kwargs: t.Any,
) -> TestResponse:
    """One ``BITS_POST`` to ``url_path`` (a request target, decoded once like a server)."""
    hdrs: list[tuple[str, str]] = []
    if packet_type is not None:
        hdrs.append(("BITS-Packet-Type", packet_type))
    if session_id is not None:
        hdrs.append(("BITS-Session-Id", session_id))
    if packet_type is not None and packet_type.lower() == "create-session":
        hdrs.append(("BITS-Supported-Protocols", PROTOCOL))
    hdrs.extend(headers)
    path, _, query = url_path.partition("?")
    return send(app, raw_environ(wire_path(path), hdrs, body, query=query, **kwargs))


def create(app: t.Any, url_path: str, **kwargs: t.Any) -> str:
    response = post(app, url_path, "Create-Session", **kwargs)
    assert response.status_code == 200, (response.status, dict(response.headers))
    return response.headers["BITS-Session-Id"]


def fragment(
    app: t.Any, url_path: str, sid: str, data: bytes, first: int, total: int, **kwargs: t.Any
) -> TestResponse:
    rng = f"bytes {first}-{first + len(data) - 1}/{total}"
    headers = [("Content-Range", rng), *kwargs.pop("headers", ())]
    return post(app, url_path, "Fragment", data, session_id=sid, headers=headers, **kwargs)


# -- checking answers -----------------------------------------------------------------------


def ack_problems(response: TestResponse, *, secrets: t.Iterable[str] = ()) -> list[str]:
    """Everything that makes ``response`` an unacceptable answer to a ``BITS_POST``."""
    problems = []
    status = response.status_code
    code = response.headers.get("BITS-Error-Code")
    if response.headers.get("BITS-Packet-Type") != "Ack":
        problems.append("no BITS-Packet-Type: Ack")
    if response.headers.getlist("Content-Length") != ["0"]:
        problems.append(f"Content-Length {response.headers.getlist('Content-Length')}")
    if response.get_data() != b"":
        problems.append("a body")
    if "Content-Type" in response.headers:
        problems.append("a Content-Type")
    if not (200 <= status < 300 or 400 <= status < 500 or (status, code) in ALLOWED_5XX):
        problems.append(f"status {status} with error code {code}")
    if status == 200 and code is not None:
        problems.append("error headers on a 200")
    if code is not None:
        if not re.fullmatch(r"0x[0-9A-F]{8}", code):
            problems.append(f"malformed error code {code!r}")
        if response.headers.get("BITS-Error-Context") not in ("0x5", "0x7"):
            problems.append("error code without a valid context")
    for value in response.headers.values():
        for secret in secrets:
            if secret and secret in value:
                problems.append(f"header value mentions {secret!r}")
    return problems


def assert_ack(response: TestResponse, status: int | None = None, error: str | None = _UNSET,
               *, secrets: t.Iterable[str] = ()) -> TestResponse:
    """Assert the Ack skeleton, and the status and error code when given."""
    problems = ack_problems(response, secrets=secrets)
    assert not problems, (problems, response.status, dict(response.headers))
    if status is not None:
        assert response.status_code == status, (response.status, dict(response.headers))
    if error is not _UNSET:
        assert response.headers.get("BITS-Error-Code") == error, dict(response.headers)
    return response


def comparable_headers(headers: t.Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header pairs without the volatile ones, names lower-cased, in order."""
    return [(k.lower(), v) for k, v in headers if k.lower() not in VOLATILE_HEADERS]


# -- apps -----------------------------------------------------------------------------------


def bits_app(
    base: Path,
    *,
    authorize: t.Any = None,
    identify: t.Any = None,
    other_directory: bool = False,
    **config: t.Any,
) -> Flask:
    """A Flask app with the ``/bits`` directory on ``base/uploads`` and ``base/sessions``
    (and, with ``other_directory``, ``/other`` on ``base/other-uploads`` and
    ``base/other-sessions``). Background cleanup is off."""
    from flask_bits import BITS

    app = Flask("flask_bits_security", instance_path=str(base / "instance"))
    app.config.update(
        TESTING=True,
        BITS_UPLOAD_FOLDER=str(base / "uploads"),
        BITS_SESSION_FOLDER=str(base / "sessions"),
        BITS_CLEANUP_INTERVAL=0,
    )
    app.config.update(config)
    BITS(app, authorize=authorize, identify=identify)
    if other_directory:
        BITS(app, name="other", url_prefix="/other", authorize=authorize, identify=identify,
             config={"BITS_UPLOAD_FOLDER": str(base / "other-uploads"),
                     "BITS_SESSION_FOLDER": str(base / "other-sessions")})
    return app


# -- a recording HTTP server ------------------------------------------------------------------


class RecordingServer:
    """``with RecordingServer() as rec:`` serves on ``rec.port`` (127.0.0.1) until the
    block ends and keeps ``(method, path, headers, body)`` of every request in
    ``rec.requests``; it answers ``200`` with ``body``."""

    def __init__(self, body: bytes = b"recorded\n") -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.body = body
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), data))
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            do_GET = do_POST = do_PUT = do_HEAD = do_BITS_POST = _any

            def log_message(self, format: str, *args: t.Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)
