"""Upload-reply: hand the finished file to the server application, keep and serve its
reply, and let Cancel-Session detach a pending forward (PROTOCOL.md 8.3-8.11).

The server application is either a Python callable (``@bits.reply_handler``) or an HTTP
URL (``BITS_NOTIFICATION_TYPE`` 1 = by reference, 2 = by value). Either way the forward
runs *detached* from the request, in a thread of the worker that received the completing
fragment:

* its progress (``pending``, ``replied``, ``failed``) lives in the session's state, so any
  worker answers a retried final fragment;
* while it runs the thread holds a per-attempt file lock, so a forward whose worker died
  is detected (the lock is free) and started again by the next retry;
* the result is applied under the session lock only if the session still exists and the
  attempt is still the current one: after Cancel-Session (or Close-Session or expiry)
  the result is discarded — nothing is written into the deleted session, no reply URL
  serves it and no signal reports it.

The request that completed the upload waits up to ``BITS_REPLY_WAIT`` seconds for the
result; after that it answers "retry later" (503) and the client's retry of the final
fragment gets the reply once it exists.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import shutil
import threading
import time
import typing as t
import urllib.parse
from dataclasses import dataclass

from werkzeug.utils import send_file
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from . import paths
from .constants import ErrorContext
from .constants import Header
from .constants import HResult
from .errors import ApplicationError
from .errors import BITSError
from .errors import InternalError
from .errors import InvalidRequest
from .locking import LockHandle
from .protocol import Ack
from .protocol import canonical_session_id
from .store import FINISHED
from .store import Session
from .store import SessionState
from .store import io_error

if t.TYPE_CHECKING:
    from flask import Flask

    from .server import BITSServer
    from .server import _Packet

log = logging.getLogger("flask_bits")

#: Longest reply URL a client accepts (PROTOCOL.md 3.2, 8.10).
MAX_REPLY_URL = 2200
#: Path segment under a directory's prefix where replies are served.
REPLY_SEGMENT = ".bits-reply"
_CHUNK = 1024 * 1024

PENDING = "pending"
REPLIED = "replied"
FAILED = "failed"


@dataclass(frozen=True)
class Upload:
    """A finished upload, as the server application sees it."""

    session_id: str
    #: Path of the upload below the directory's URL prefix.
    remote_path: str
    #: The absolute URL of the Create-Session request (``BITS-Original-Request-URL``).
    url: str
    #: The session's owner, or ``None`` when anonymous.
    owner: str | None
    #: Size in bytes.
    size: int
    #: The client's ``Content-Name`` (never use it to build paths).
    content_name: str | None
    #: Path of the uploaded bytes on the server (read-only for the application).
    path: str

    def open(self) -> t.BinaryIO:
        """Open the uploaded bytes for reading."""
        return open(self.path, "rb")


@dataclass
class Reply:
    """What a reply handler may return instead of plain bytes, a path or a stream.

    :param body: the reply bytes.
    :param path: a file whose content is the reply (copied when the handler returns).
    :param stream: a binary stream read to its end for the reply.
    :param static_url: an absolute URL the client downloads instead (never deleted).
    :param copy_to_destination: also place the upload at its destination URL's file.
    """

    body: bytes | None = None
    path: str | os.PathLike[str] | None = None
    stream: t.BinaryIO | None = None
    static_url: str | None = None
    copy_to_destination: bool = False


class ReplyError(Exception):
    """Raise from a reply handler to report an HTTP status to the client (context 0x7).

    A 403 is final: the client is answered the same 403 on every retry and the handler
    is not called again. Other statuses are retried when the client retries.
    """

    def __init__(self, status: int, message: str = "The server application failed.") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ReplyHandler = t.Callable[[Upload], "bytes | str | os.PathLike[str] | t.BinaryIO | Reply | None"]


def application_error(status: int, message: str | None = None) -> BITSError:
    """The Ack error for an application's HTTP status (PROTOCOL.md 8.8)."""
    hresult = HResult.BG_E_HTTP_ERROR_BASE + status
    message = message or f"The server application answered HTTP {status}."
    if status in (401, 407, 413, 416) or status < 300:
        return ApplicationError(message, status=500, hresult=hresult)
    return ApplicationError(message, status=status, hresult=hresult)


def timeout_error() -> BITSError:
    """The server application did not answer in time: 408 ``0x80070112`` (8.7)."""
    return ApplicationError(
        "The server application did not answer in time.",
        status=408,
        hresult=HResult.NOTIFICATION_TIMEOUT,
    )


class ReplyManager:
    """Upload-reply for one upload directory (attached to its :class:`BITSServer`).

    :param handler: an in-process server application; without one the directory's
        ``BITS_NOTIFICATION_URL`` is called over HTTP.
    """

    def __init__(self, server: BITSServer, *, handler: ReplyHandler | None = None) -> None:
        self.server = server
        self.handler = handler
        cfg = server.config
        if handler is None:
            if cfg.notification_type not in (1, 2) or not cfg.notification_url:
                raise ValueError(
                    "BITS_NOTIFICATION_URL must be set when BITS_NOTIFICATION_TYPE is 1 or 2 "
                    "and no reply handler is registered."
                )
            from .notify import HttpNotifier

            self.notifier: HttpNotifier | None = HttpNotifier(cfg)
        else:
            self.notifier = None
        self._events: dict[str, threading.Event] = {}
        self._events_lock = threading.Lock()

    # -- the completing fragment ---------------------------------------------------------

    def complete(self, packet: _Packet, session: Session) -> Ack | PendingReply:
        """Called under the session lock when all bytes are held and no final Ack is
        cached: start (or restart) the forward, or report on the running one."""
        state = session.state
        fwd = state.forward or {}
        status = fwd.get("status")
        if status == REPLIED:
            return self._finish_copy(session)
        if status == PENDING:
            if time.time() > fwd.get("deadline", 0):
                self._fail(session, timeout_error())
                return self._report_failure(session)
            if not self._forward_dead(state):
                return PendingReply(state.id, fwd["token"])
        if status == FAILED and not fwd.get("reported"):
            # The failure happened after the client stopped waiting: report it once
            # (PROTOCOL.md 8.7/8.8); the next retry posts the file again.
            return self._report_failure(session)
        return self._start(packet, session)

    def _report_failure(self, session: Session) -> Ack:
        state = session.state
        fwd = state.forward or {}
        fwd["reported"] = True
        session.save()
        return Ack.for_error(_error_from_dict(fwd.get("error") or {}, state.total), state.id)

    def _start(self, packet: _Packet, session: Session) -> PendingReply:
        state = session.state
        attempt = int((state.forward or {}).get("attempt", 0)) + 1
        token = secrets.token_hex(16)
        reply_dir = self.server.store.reply_dir(state.id)
        shutil.rmtree(reply_dir, ignore_errors=True)
        try:
            os.mkdir(reply_dir)
        except OSError as exc:
            raise io_error(exc, "preparing a reply folder") from None
        state.forward = {
            "status": PENDING,
            "attempt": attempt,
            "token": token,
            "started": time.time(),
            "deadline": time.time() + self.server.config.notification_timeout,
            "base_url": _base_url(packet.request, self.server.config.reply_url_base),
            "local_base": _local_base(packet.request),
        }
        # The forward's liveness lock is taken here, before anyone can see the new
        # attempt, and released by the forward thread when it ends.
        liveness = self.server.store.locker.acquire(_lock_name(state.id, state.forward), timeout=0)
        try:
            session.save()
        except BaseException:
            liveness.release(discard=True)
            raise
        upload = Upload(
            session_id=state.id,
            remote_path=state.remote_path,
            url=state.url,
            owner=state.owner,
            size=state.total or 0,
            content_name=state.content_name,
            path=session.data_path,
        )
        event = threading.Event()
        with self._events_lock:
            self._events[token] = event
        thread = threading.Thread(
            target=self._run,
            args=(upload, dict(state.forward), liveness, event),
            name=f"flask-bits-forward-{state.id}",
            daemon=True,
        )
        thread.start()
        return PendingReply(state.id, token)

    def _forward_dead(self, state: SessionState) -> bool:
        """True when the worker that ran the pending forward is gone (its lock is free)."""
        fwd = state.forward or {}
        try:
            with self.server.store.locker.hold(_lock_name(state.id, fwd), timeout=0) as lock:
                lock.discard = True  # that attempt is over for good: drop its lock file
                return True
        except BITSError:
            return False

    def wait(self, packet: _Packet, pending: PendingReply) -> Ack:
        """Wait (without the session lock) up to ``BITS_REPLY_WAIT`` for the forward,
        then answer from the session's state."""
        wait = self.server.config.reply_wait
        deadline = time.monotonic() + wait
        with self._events_lock:
            event = self._events.get(pending.token)
        if event is not None:
            event.wait(wait)
        else:
            while time.monotonic() < deadline:
                state = self.server.store.peek(pending.session_id)
                if state is None or (state.forward or {}).get("status") != PENDING:
                    break
                time.sleep(0.05)
        with self.server._open(packet) as session:
            state = session.state
            if state.final_ack is not None:
                from .server import _replay

                return _replay(state)
            fwd = state.forward or {}
            if fwd.get("status") == FAILED and fwd.get("token") == pending.token:
                return self._report_failure(session)
            if fwd.get("status") == REPLIED:
                return self._finish_copy(session)
            total = state.total
        error = ApplicationError(
            "The server application is still working; retry this fragment later.",
            status=503,
            hresult=HResult.E_PENDING,
        )
        error.received = total
        return Ack.for_error(error, pending.session_id)

    # -- the detached forward ---------------------------------------------------------------

    def _run(
        self, upload: Upload, fwd: dict[str, t.Any], liveness: LockHandle,
        done: threading.Event,
    ) -> None:
        try:
            try:
                result = self._call(upload, fwd)
                self._apply(upload.session_id, fwd["token"], result)
            finally:
                liveness.release(discard=True)  # this attempt is over for good
        except Exception:
            log.exception("Upload-reply forward for %s failed", upload.session_id)
        finally:
            done.set()
            with self._events_lock:
                self._events.pop(fwd["token"], None)

    def _call(self, upload: Upload, fwd: dict[str, t.Any]) -> _Result:
        reply_dir = self.server.store.reply_dir(upload.session_id)
        response_path = os.path.join(reply_dir, "response.bin")
        tmp_path = os.path.join(reply_dir, "response.tmp")
        try:
            if self.notifier is not None:
                result = self.notifier.notify(upload, fwd, response_path, tmp_path)
            else:
                result = self._call_handler(upload, tmp_path)
            if result.static_url is not None:
                _check_static_url(result.static_url)
            return result
        except ReplyError as exc:
            return _Result(error=application_error(exc.status, exc.message))
        except BITSError as exc:
            return _Result(error=exc)
        except OSError as exc:
            if not os.path.isdir(reply_dir):
                return _Result(error=InternalError("The session is gone."))  # detached
            return _Result(error=io_error(exc, "storing a reply"))
        except Exception:
            log.exception("Reply handler raised for session %s", upload.session_id)
            return _Result(error=ApplicationError("The server application failed."))

    def _call_handler(self, upload: Upload, tmp_path: str) -> _Result:
        assert self.handler is not None
        value = self.handler(upload)
        reply = value if isinstance(value, Reply) else _as_reply(value)
        if reply.static_url is not None:
            return _Result(static_url=reply.static_url, copy=reply.copy_to_destination)
        if reply.body is not None:
            with _open_new(tmp_path) as out:
                out.write(reply.body)
        elif reply.path is not None:
            with open(reply.path, "rb") as src, _open_new(tmp_path) as out:
                shutil.copyfileobj(src, out, _CHUNK)
        elif reply.stream is not None:
            try:
                with _open_new(tmp_path) as out:
                    shutil.copyfileobj(reply.stream, out, _CHUNK)
            finally:
                reply.stream.close()
        else:
            with _open_new(tmp_path):
                pass  # an empty reply is a zero-length file (A25)
        return _Result(reply_file=tmp_path, copy=reply.copy_to_destination)

    def _apply(self, session_id: str, token: str, result: _Result) -> None:
        """Record the result under the session lock, unless the forward was detached."""
        store = self.server.store
        with store.lock_existing(session_id) as session:
            fwd = None if session is None else session.state.forward
            if session is None or not fwd or fwd.get("token") != token or (
                fwd.get("status") != PENDING
            ):
                log.info("reply for session=%s discarded: session cancelled, closed or "
                         "superseded", session_id)
                return
            state = session.state
            if result.error is not None:
                self._fail(session, result.error)
                return
            if result.static_url is not None:
                fwd["reply_url"] = result.static_url
            else:
                final = os.path.join(store.reply_dir(state.id), "response.bin")
                if result.reply_file is not None and result.reply_file != final:
                    os.replace(result.reply_file, final)
                fwd["reply_url"] = _reply_url(fwd["base_url"], self.server, state.id, token)
                if len(fwd["reply_url"]) > MAX_REPLY_URL:
                    self._fail(session, InvalidRequest("The reply URL is too long."))
                    return
            fwd["status"] = REPLIED
            fwd["copy"] = bool(result.copy)
            fwd["finished"] = time.time()
            self._finish_copy(session)
        self.server.on_event("upload-completed", session_id=session_id,
                             remote_path=state.remote_path, size=state.total, owner=state.owner)
        self.server.on_event("reply-forwarded", session_id=session_id, status=200,
                             duration=time.time() - float(fwd.get("started", time.time())))

    def _finish_copy(self, session: Session) -> Ack:
        """Commit to the destination if the application asked for it, then cache and
        return the final Ack (PROTOCOL.md 8.2: a failed copy is retried alone)."""
        state = session.state
        fwd = state.forward or {}
        if fwd.get("copy") and not state.committed:
            try:
                names = paths.split_remote_path(state.remote_path)
                session.commit(self.server.config.upload_folder, names,
                               allow_overwrite=self.server.config.allow_overwrites,
                               conflict_status=self.server.config.overwrite_status)
            except BITSError as exc:
                session.save()
                exc.received = state.total
                return Ack.for_error(exc, state.id)
        ack = Ack(200, session_id=state.id)
        ack.headers.append((Header.RECEIVED_CONTENT_RANGE, str(state.total)))
        ack.headers.append((Header.REPLY_URL, fwd["reply_url"]))
        self.server.finish(session, ack)
        return ack

    def _fail(self, session: Session, error: BITSError) -> None:
        state = session.state
        fwd = state.forward or {}
        fwd["status"] = FAILED
        fwd["error"] = {"status": error.status, "hresult": error.hresult,
                        "context": error.context, "message": error.message}
        state.forward = fwd
        if error.status == 403 and error.context == ErrorContext.REMOTE_APPLICATION:
            # Never post again after a 403 (PROTOCOL.md 8.8): cache it as the final Ack.
            ack = Ack.for_error(_error_from_dict(fwd["error"], state.total), state.id)
            state.final_ack = {"status": ack.status, "headers": ack.headers,
                               "error": fwd["error"]}
            state.phase = FINISHED
        session.save()

    # -- serving the reply ------------------------------------------------------------------

    def serve(self, request: Request, sid_hex: str, token: str) -> Response:
        """GET/HEAD of a reply URL (PROTOCOL.md 8.11): ranges, stable validators."""
        sid = canonical_session_id(sid_hex)
        state = None if sid is None else self.server.store.peek(sid)
        fwd = {} if state is None else (state.forward or {})
        if self.server.authorize is not None:
            # The same authentication as the upload (PROTOCOL.md 8.11 D8), asked whether
            # or not the session exists, so that the answer reveals nothing.
            remote = state.remote_path if state is not None else ""
            verdict = self.server.authorize(request, remote, None)
            if isinstance(verdict, Response):
                return verdict
            if verdict is False:
                state = None
        owner = None if state is None else self.server.identify(request)
        if (
            state is None
            or state.directory != self.server.name
            or fwd.get("status") != REPLIED
            or not hmac.compare_digest(str(fwd.get("token", "")), token)
            or state.owner != owner
        ):
            return Response(b"Not found\n", 404, mimetype="text/plain")
        path = os.path.join(self.server.store.reply_dir(state.id), "response.bin")
        environ = request.environ
        if "," in environ.get("HTTP_RANGE", ""):
            # Several ranges: answer the whole file; the client falls back to single
            # ranges (PROTOCOL.md 8.11 D5).
            environ = {k: v for k, v in environ.items() if k != "HTTP_RANGE"}
        try:
            st = os.stat(path)
            response = send_file(path, environ, mimetype="application/octet-stream",
                                 conditional=True, last_modified=st.st_mtime,
                                 etag=f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}")
        except FileNotFoundError:  # closed or cancelled meanwhile
            return Response(b"Not found\n", 404, mimetype="text/plain")
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Cache-Control"] = "private, no-transform"
        return response

    def register_flask(self, app: Flask) -> None:
        """Route ``GET``/``HEAD`` ``<prefix>/.bits-reply/<sid>/<token>`` to :meth:`serve`."""
        name = self.server.name
        prefix = self.server.config.url_prefix

        def bits_reply(sid: str, token: str) -> Response:
            from flask import request

            from .extension import BITS

            replies = BITS.get_server(name).replies
            assert replies is not None
            return replies.serve(request, sid, token)

        bits_reply.__name__ = f"bits_reply_{name}"
        app.add_url_rule(f"{prefix}/{REPLY_SEGMENT}/<sid>/<token>", f"bits_reply_{name}",
                         bits_reply, methods=["GET", "HEAD"])

    def handle_wsgi(self, request: Request) -> Response | None:
        """For the WSGI middleware: serve a reply URL, or ``None`` if this is not one."""
        if request.method not in ("GET", "HEAD"):
            return None
        rest = request.path[len(self.server.config.url_prefix) + 1 :].split("/")
        if len(rest) == 3 and rest[0] == REPLY_SEGMENT:
            return self.serve(request, rest[1], rest[2])
        return None


@dataclass(frozen=True)
class PendingReply:
    """The forward runs; wait for it outside the session lock."""

    session_id: str
    token: str


@dataclass
class _Result:
    reply_file: str | None = None
    static_url: str | None = None
    copy: bool = False
    error: BITSError | None = None


def _as_reply(value: t.Any) -> Reply:
    if value is None:
        return Reply(body=b"")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Reply(body=bytes(value))
    if isinstance(value, (str, os.PathLike)):
        return Reply(path=value)
    if hasattr(value, "read"):
        return Reply(stream=value)
    raise TypeError(f"A reply handler returned {type(value).__name__}; expected bytes, a "
                    "path, a binary stream, a Reply or None.")


def _open_new(path: str) -> t.BinaryIO:
    # O_CREAT in an existing folder only: a removed session folder is never re-created.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def _lock_name(session_id: str, fwd: t.Mapping[str, t.Any]) -> str:
    return f"{session_id}.forward-{int(fwd.get('attempt', 0))}"


def _check_static_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        # PROTOCOL.md 8.5: a malformed application response -> 411 E_INVALIDARG, ctx 0x7.
        raise ApplicationError("The server application sent a relative or invalid "
                               "BITS-Static-Response-URL.", status=411,
                               hresult=HResult.E_INVALIDARG)
    if len(url) > MAX_REPLY_URL:
        raise InvalidRequest("The reply URL from the server application is too long.")


def _error_from_dict(error: t.Mapping[str, t.Any], received: int | None) -> BITSError:
    exc = BITSError(str(error.get("message", "")), status=int(error.get("status", 500)),
                    hresult=int(error.get("hresult", HResult.E_FAIL)),
                    context=int(error.get("context", ErrorContext.REMOTE_APPLICATION)))
    exc.received = received
    return exc


def _base_url(request: Request, configured: str | None) -> str:
    """Scheme and host the reply URL is built on: ``BITS_REPLY_URL_BASE`` or the host
    the client used for this request (the host-id host in a farm, 8.10)."""
    if configured:
        return configured.rstrip("/")
    from .server import request_url

    return request_url(request, host_only=True).rstrip("/") + request.root_path


def _local_base(request: Request) -> str | None:
    """``http://<address the server accepted this connection on>``, for relative
    notification URLs: never a host taken from the request's headers (SECURITY.md).
    ``None`` when the WSGI server does not expose its socket (then only an absolute
    ``BITS_NOTIFICATION_URL`` can be used: ``SERVER_NAME``/``SERVER_PORT`` may come from
    the client's ``Host`` header)."""
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    try:
        name = sock.getsockname()  # type: ignore[union-attr]
    except (AttributeError, OSError):
        return None
    if not (isinstance(name, tuple) and len(name) >= 2):
        return None  # a unix socket has no TCP address: only an absolute URL can work
    host, port = name[:2]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in str(host):
        host = f"[{host}]"
    scheme = "https" if request.environ.get("wsgi.url_scheme") == "https" else "http"
    return f"{scheme}://{host}:{port}"


def _reply_url(base: str, server: BITSServer, session_id: str, token: str) -> str:
    sid_hex = session_id.strip("{}").lower()
    return f"{base}{server.config.url_prefix}/{REPLY_SEGMENT}/{sid_hex}/{token}"
