"""A recording HTTP server application for the upload-reply tests (PROTOCOL.md 8.3-8.8).

:class:`AppServer` runs a small werkzeug WSGI app on 127.0.0.1 (``make_server`` in a
thread of the test process) that plays the *server application* a BITS server notifies
with ``BITS_NOTIFICATION_TYPE`` 1 or 2. Every call is recorded (:class:`Call`: method,
path, query, headers, ``Content-Length``, ``Transfer-Encoding``, body length and digest,
and for type 1 what the request file held) so tests can inspect exactly what arrived.

Behaviour is scripted per *case*: the ``case`` query parameter, which reaches the
application because the BITS server appends the destination URL's query string to the
notification URL (8.6). ``server.script("c1", Action(status=500), Action())`` makes the
first call of case ``c1`` answer 500 and the second the default; calls beyond the script
get the default :class:`Action`, which answers like ``example_app``'s ``/app/sha256``: the
reply is the hex SHA-256 of the upload and a newline (the response body for type 2, the
response file for type 1).

Routes:

``POST /app/notify``
    the notification endpoint (any query string);
``GET|HEAD /static/<name>``
    files of :attr:`AppServer.static_dir` (for ``BITS-Static-Response-URL``).

Nothing waits forever: a gated call waits at most :data:`GATE_MAX` seconds, and
:meth:`AppServer.stop` opens every gate, cuts every sleep short and waits (bounded) for
the handler threads to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import threading
import time
import typing as t
import urllib.parse

from werkzeug.serving import make_server
from werkzeug.utils import send_from_directory
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

#: Longest time a gated call waits for its gate.
GATE_MAX = 30.0


def sha256_line(data: bytes) -> bytes:
    """What ``example_app`` replies: lower-case hex SHA-256 and a newline."""
    return hashlib.sha256(data).hexdigest().encode() + b"\n"


@dataclasses.dataclass
class Action:
    """How the application answers one call.

    :param status: the HTTP status.
    :param body: the response body; ``None`` means the default reply (type 2: the
        SHA-256 line of the request body; type 1: no body).
    :param reply_file: type 1: bytes to write to ``BITS-Response-DataFile-Name``;
        ``None`` writes the SHA-256 line of the request file (only on status 200),
        ``b""`` is written as an empty file, ``False`` writes nothing.
    :param static_url: send ``BITS-Static-Response-URL`` with this value.
    :param copy: send ``BITS-Copy-File-To-Destination``.
    :param sleep: seconds to wait before answering (cut short by :meth:`AppServer.stop`).
    :param gate: wait until this event is set before answering (at most
        :data:`GATE_MAX` seconds).
    """

    status: int = 200
    body: bytes | None = None
    reply_file: bytes | t.Literal[False] | None = None
    static_url: str | None = None
    copy: bool = False
    sleep: float = 0.0
    gate: threading.Event | None = None


@dataclasses.dataclass
class Call:
    """One request the application received."""

    case: str | None
    method: str
    path: str
    query: str
    #: Header names lower-cased.
    headers: dict[str, str]
    content_length: str | None
    transfer_encoding: str | None
    body_length: int
    body_sha256: str
    #: Type 1: SHA-256 of ``BITS-Request-DataFile-Name`` read during the call (or the
    #: error reading it), whether the response file existed and its folder existed.
    request_file_sha256: str | None = None
    request_file_error: str | None = None
    response_file_existed: bool | None = None
    response_dir_existed: bool | None = None
    #: Set when the answer has been produced (``outcome`` says how it went).
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    outcome: str = "pending"

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class AppServer:
    """``with AppServer() as app:`` serves the recording application until the block ends."""

    def __init__(self) -> None:
        self.static_dir = tempfile.mkdtemp(prefix="bits-static-")
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._scripts: dict[str | None, list[Action]] = {}
        self._gates: list[threading.Event] = []
        self._stopping = threading.Event()
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._server: t.Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def notify_url(self) -> str:
        return f"{self.url}/app/notify"

    def script(self, case: str, *actions: Action) -> None:
        """The next calls of ``case`` get ``actions`` in order, then the default."""
        with self._lock:
            self._scripts[case] = list(actions)
            for action in actions:
                if action.gate is not None:
                    self._gates.append(action.gate)

    def gate(self) -> threading.Event:
        """A new gate, opened by :meth:`stop` at the latest."""
        event = threading.Event()
        with self._lock:
            self._gates.append(event)
        return event

    def calls(self, case: str | None = None) -> list[Call]:
        """The calls so far (of ``case`` only, if given)."""
        with self._lock:
            return [c for c in self._calls if case is None or c.case == case]

    def wait_calls(self, case: str, count: int, timeout: float = 20.0) -> list[Call]:
        """Wait until ``case`` has at least ``count`` calls; return them."""
        deadline = time.monotonic() + timeout
        while True:
            calls = self.calls(case)
            if len(calls) >= count:
                return calls
            if time.monotonic() >= deadline:
                raise AssertionError(f"case {case!r}: {len(calls)} call(s) after {timeout}s, "
                                     f"expected {count}")
            time.sleep(0.01)

    def static_file(self, name: str, data: bytes) -> str:
        """Put ``data`` at ``/static/<name>``; return its absolute URL."""
        with open(os.path.join(self.static_dir, name), "wb") as f:
            f.write(data)
        return f"{self.url}/static/{name}"

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> AppServer:
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="reply-app-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            gates = list(self._gates)
        for gate in gates:
            gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=10)
        for name in os.listdir(self.static_dir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.static_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.static_dir)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the application ---------------------------------------------------------------

    def _wsgi(self, environ: dict[str, t.Any], start_response: t.Any) -> t.Iterable[bytes]:
        with self._idle:
            self._active += 1
        try:
            request = Request(environ)
            try:
                response = self._dispatch(request)
            except Exception as exc:  # never let a test helper crash a handler thread
                response = Response(f"reply_apps error: {exc!r}\n", 599)
            return response(environ, start_response)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _dispatch(self, request: Request) -> Response:
        if request.path.startswith("/static/") and request.method in ("GET", "HEAD"):
            return send_from_directory(self.static_dir, request.path[len("/static/"):],
                                       request.environ)
        if request.path != "/app/notify" or request.method != "POST":
            return Response(b"not here\n", 404)
        return self._notify(request)

    def _notify(self, request: Request) -> Response:
        body = request.get_data()
        query = request.query_string.decode("latin-1")
        case = request.args.get("case")
        call = Call(
            case=case,
            method=request.method,
            path=request.path,
            query=query,
            headers={k.lower(): v for k, v in request.headers.items()},
            content_length=request.headers.get("Content-Length"),
            transfer_encoding=request.headers.get("Transfer-Encoding"),
            body_length=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
        )
        request_file = request.headers.get("BITS-Request-DataFile-Name")
        response_file = request.headers.get("BITS-Response-DataFile-Name")
        upload_bytes = body
        if request_file:
            try:
                with open(request_file, "rb") as f:
                    upload_bytes = f.read()
                call.request_file_sha256 = hashlib.sha256(upload_bytes).hexdigest()
            except OSError as exc:
                call.request_file_error = repr(exc)
        if response_file:
            call.response_file_existed = os.path.lexists(response_file)
            call.response_dir_existed = os.path.isdir(os.path.dirname(response_file))
        with self._lock:
            self._calls.append(call)
            script = self._scripts.get(case)
            action = script.pop(0) if script else Action()
        try:
            if action.gate is not None:
                action.gate.wait(GATE_MAX)
            if action.sleep:
                self._stopping.wait(action.sleep)
            headers: dict[str, str] = {}
            if action.static_url is not None:
                headers["BITS-Static-Response-URL"] = action.static_url
            if action.copy:
                headers["BITS-Copy-File-To-Destination"] = "1"
            reply_body = action.body
            if response_file and action.reply_file is not False and (
                action.reply_file is not None or action.status == 200
            ) and action.static_url is None:
                data = (sha256_line(upload_bytes) if action.reply_file is None
                        else action.reply_file)
                try:
                    # Plain open: a vanished reply folder is never re-created here.
                    with open(response_file, "wb") as out:
                        out.write(data)
                except OSError as exc:
                    call.outcome = f"response file not written: {exc!r}"
                    return Response(b"could not write the response file\n", 500)
            elif reply_body is None and not response_file and action.static_url is None:
                reply_body = sha256_line(body)
            call.outcome = f"answered {action.status}"
            return Response(reply_body or b"", action.status, headers,
                            content_type="application/octet-stream")
        finally:
            call.finished.set()


def parse_reply_url(url: str) -> tuple[str, str]:
    """``(base, path)`` of an absolute reply URL: ``("http://host:port", "/path")``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.netloc, url
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{parts.netloc}", path
