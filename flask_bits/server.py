"""The BITS server core: a werkzeug request in, an Ack response out.

One method per packet, picked from a table (PROTOCOL.md section 7). Knows nothing of
Flask: the Flask extension and the WSGI middleware are thin glue around
:class:`BITSServer`. Every answer is an Ack; every failure becomes an error Ack.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import sys
import threading
import time
import typing as t
from dataclasses import dataclass

from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from . import paths
from .config import DirectoryConfig
from .constants import ACK
from .constants import Header
from .constants import PacketType
from .direct_input import direct_input
from .errors import AccessDenied
from .errors import BITSError
from .errors import BodyTimeout
from .errors import DestinationExists
from .errors import FragmentTooLarge
from .errors import InternalError
from .errors import InvalidRequest
from .errors import RangeMismatch
from .errors import SessionNotFound
from .errors import UploadsDisabled
from .errors import UploadTooLarge
from .protocol import Ack
from .protocol import ContentRange
from .protocol import canonical_session_id
from .protocol import check_environ_header_sizes
from .protocol import negotiate_protocol
from .protocol import new_session_id
from .protocol import parse_content_length
from .protocol import parse_content_range
from .store import COMPLETE
from .store import FINISHED
from .store import RECEIVING
from .store import Session
from .store import SessionGone
from .store import SessionState
from .store import SessionStore

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from werkzeug.datastructures import Headers

    from .reply import ReplyManager

log = logging.getLogger("flask_bits")

#: ``authorize(request, remote_path, packet_type)``: ``False`` denies (403); may raise
#: :class:`BITSError` or return a werkzeug ``Response`` (a 401 challenge) to send as is.
Authorizer = t.Callable[[Request, str, "PacketType | None"], "bool | Response | None"]
#: ``identify(request)``: the principal that owns sessions, or ``None`` (anonymous).
Identifier = t.Callable[[Request], "str | None"]
#: ``on_event(name, **data)``: how the core reports events to the glue (signals).
EventSink = t.Callable[..., None]


_SESSION_PACKETS = (PacketType.FRAGMENT, PacketType.CLOSE_SESSION, PacketType.CANCEL_SESSION)


class ClientGone(InvalidRequest):
    """The request body ended before ``Content-Length`` bytes arrived."""

    default_message = "The request body ended early; the bytes stored so far were kept."


#: The WSGI environ keys of the BITS headers read on every packet. The hot path reads
#: request headers straight from the environ: what ``request.headers`` does, in fewer steps.
_ENV_PACKET_TYPE = "HTTP_BITS_PACKET_TYPE"
_ENV_SESSION_ID = "HTTP_BITS_SESSION_ID"


class AckResponse(Response):
    """A response that carries no body and no ``Content-Type`` (PROTOCOL.md T7)."""

    default_mimetype: str | None = None

    def get_wsgi_headers(self, environ: WSGIEnvironment) -> Headers:
        """The headers as they are: an Ack has no body, no ``Location`` and its own
        ``Content-Length: 0``, so werkzeug's fix-ups (and their copy) have nothing to do."""
        return self.headers


def default_identity(request: Request) -> str | None:
    """The owner of new sessions: ``REMOTE_USER`` as set by the server or app."""
    user = request.environ.get("REMOTE_USER")
    return str(user) if user else None


@dataclass(slots=True)
class _Packet:
    request: Request
    type: PacketType
    remote_path: str
    content_length: int
    owner: str | None
    session_id: str | None


class BITSServer:
    """Serves one upload directory (one URL prefix with its folders and settings).

    :param config: the directory's validated settings.
    :param name: the directory's name (sessions are bound to it).
    :param authorize: see :data:`Authorizer`.
    :param identify: see :data:`Identifier`.
    :param on_event: see :data:`EventSink`.
    """

    def __init__(
        self,
        config: DirectoryConfig,
        *,
        name: str = "bits",
        authorize: Authorizer | None = None,
        identify: Identifier | None = None,
        on_event: EventSink | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.authorize = authorize
        self.identify = identify or default_identity
        self.on_event = on_event or (lambda name, **data: None)
        self.store = SessionStore(
            config.session_folder, lock_timeout=config.lock_timeout, fsync=config.fsync
        )
        self.store.locker.on_wait = lambda seconds: self.on_event("lock-waited", seconds=seconds)
        os.makedirs(config.upload_folder, exist_ok=True)
        #: Set when this directory answers with replies (upload-reply).
        self.replies: ReplyManager | None = None
        self._handlers: dict[PacketType, t.Callable[[_Packet], Ack]] = {
            PacketType.CREATE_SESSION: self._create_session,
            PacketType.FRAGMENT: self._fragment,
            PacketType.CLOSE_SESSION: self._close_session,
            PacketType.CANCEL_SESSION: self._cancel_session,
        }
        self._last_cleanup_check = 0.0
        #: The class of Ack responses (the Flask extension uses one that is also the
        #: app's response class, so that Flask sends it as it is).
        self.response_class: type[AckResponse] = AckResponse

    # -- entry point ---------------------------------------------------------------

    def handle(self, request: Request, remote_path: str) -> Response:
        """Answer one ``BITS_POST`` request for ``remote_path`` (relative to the prefix)."""
        return self.ack_response(self.answer(request, remote_path))

    def answer(self, request: Request, remote_path: str) -> Ack:
        """Like :meth:`handle`, but return the :class:`Ack` itself (see
        :meth:`ack_headers`), for glue that answers without a werkzeug response."""
        started = time.monotonic()
        environ = request.environ
        packet_name = environ.get(_ENV_PACKET_TYPE, "-")[:32]
        parsed = PacketType.parse(packet_name)
        try:  # for the log line and the event; _dispatch refuses a malformed value
            size = parse_content_length(environ.get("CONTENT_LENGTH")) or 0
        except InvalidRequest:
            size = 0
        try:
            result = self._dispatch(request, remote_path)
        except BITSError as exc:
            result = self.error_ack(exc, echoed_session_id(request, parsed))
        except Exception:
            log.exception("Unexpected error handling %s", _printable(packet_name))
            result = self.error_ack(InternalError(), echoed_session_id(request, parsed))
        if isinstance(result, Response):  # e.g. a 401 challenge from the authorize hook
            result = self._ack_for(result, echoed_session_id(request, parsed))
        self._log(result, parsed.value if parsed else _printable(packet_name), size, started)
        self.on_event("packet-handled", packet_type=parsed.value if parsed else "unknown",
                      status=result.status, bytes=size, duration=time.monotonic() - started)
        return result

    def error_ack(self, error: BITSError, session_id: str | None) -> Ack:
        """The Ack for ``error``; the session id is echoed only for session packets."""
        return Ack.for_error(error, session_id)

    def ack_headers(self, ack: Ack) -> list[tuple[str, str]]:
        """The response headers of ``ack`` under this directory's settings."""
        return ack.to_headers(send_bits_error=self.config.send_bits_error)

    def ack_response(self, ack: Ack) -> Response:
        """Turn an :class:`Ack` into a bodiless werkzeug response."""
        return self.response_class(None, status=ack.status, headers=self.ack_headers(ack))

    def as_ack(self, response: Response, session_id: str | None = None) -> Response:
        """Turn any response to a ``BITS_POST`` (an auth challenge, a werkzeug error page)
        into an Ack with the same status: no body, error headers, challenges kept."""
        if response.headers.get(Header.PACKET_TYPE) == ACK:
            return response
        return self.ack_response(self._ack_for(response, session_id))

    def _ack_for(self, response: Response, session_id: str | None) -> Ack:
        status = response.status_code
        if status < 400:
            error: BITSError = InternalError("The application answered a BITS packet "
                                             "with a non-Ack response.")
        else:
            error = _HTTP_ERRORS.get(status, InvalidRequest if status < 500 else InternalError)(
                _HTTP_MESSAGES.get(status), status=status)
        ack = self.error_ack(error, session_id)
        for name in _KEPT_HEADERS:
            for value in response.headers.getlist(name):
                ack.headers.append((name, value))
        response.close()
        return ack

    def _log(self, ack: Ack, packet: str, size: int, started: float) -> None:
        error = ack.error
        level = logging.INFO if error is None or error.client_fault else logging.WARNING
        if not log.isEnabledFor(level):
            return
        ms = (time.monotonic() - started) * 1000
        if error is None:
            log.info("%s session=%s status=%d bytes=%d %.1fms", packet,
                     ack.session_id or "-", ack.status, size, ms)
        else:
            log.log(level, "%s session=%s status=%d hresult=0x%08X bytes=%d %.1fms: %s",
                    packet, ack.session_id or "-", ack.status,
                    error.hresult & 0xFFFFFFFF, size, ms, error.message)

    def _dispatch(self, request: Request, remote_path: str) -> Ack | Response:
        environ = request.environ
        raw_type = environ.get(_ENV_PACKET_TYPE)
        packet_type = PacketType.parse(raw_type)
        # PROTOCOL.md 6: authentication first (a 401 even for Ping, A35), then 501, then
        # the packet type, then the message rules.
        if self.authorize is not None:
            verdict = self.authorize(request, remote_path, packet_type)
            if isinstance(verdict, Response):
                return verdict
            if verdict is False:
                raise AccessDenied()
        if not self.config.upload_enabled:
            raise UploadsDisabled()
        if packet_type is None:
            if raw_type is None:
                raise InvalidRequest("The BITS-Packet-Type header is missing.")
            raise InvalidRequest("Unknown BITS-Packet-Type.")
        check_environ_header_sizes(environ)
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            raise InvalidRequest("Chunked request bodies are not allowed; send Content-Length.")
        content_length = parse_content_length(environ.get("CONTENT_LENGTH"))
        if content_length is None:
            raise InvalidRequest("The Content-Length header is missing.")
        if packet_type is not PacketType.FRAGMENT and content_length != 0:
            raise InvalidRequest(f"A {packet_type.value} packet must have Content-Length: 0.")
        if packet_type is PacketType.PING:
            return Ack(200)  # PROTOCOL.md 7.1: nothing beyond the checks above
        packet = _Packet(
            request=request,
            type=packet_type,
            remote_path=remote_path,
            content_length=content_length,
            owner=self.identify(request),
            session_id=environ.get(_ENV_SESSION_ID),
        )
        return self._handlers[packet_type](packet)

    # -- packets ---------------------------------------------------------------------

    def _create_session(self, packet: _Packet) -> Ack:
        """Create-Session (PROTOCOL.md 7.2)."""
        cfg = self.config
        protocol = negotiate_protocol(packet.request.headers.get(Header.SUPPORTED_PROTOCOLS))
        names = paths.split_remote_path(packet.remote_path)
        if self.places_files:
            paths.destination_path(cfg.upload_folder, names)
            exists = paths.destination_exists(cfg.upload_folder, names)
            if exists and not cfg.allow_overwrites:
                raise DestinationExists(status=cfg.overwrite_status)
        now = time.time()
        state = SessionState(
            id=new_session_id(),
            directory=self.name,
            remote_path=packet.remote_path,
            url=request_url(packet.request),
            owner=packet.owner,
            protocol=protocol,
            created=now,
            last_activity=now,
            timeout=cfg.session_timeout,
            content_name=_content_name(packet.request),
        )
        self.store.create(state, owner_limit=cfg.session_limit, total_limit=cfg.max_sessions)
        ack = Ack(200, session_id=state.id)
        ack.headers.append((Header.PROTOCOL, protocol))
        ack.headers.append(("Accept-Encoding", "identity"))
        if cfg.host_id:
            ack.headers.append((Header.HOST_ID, cfg.host_id))
            if cfg.host_id_fallback_timeout:
                ack.headers.append(
                    (Header.HOST_ID_FALLBACK_TIMEOUT, str(cfg.host_id_fallback_timeout))
                )
        self.on_event("session-created", session_id=state.id, remote_path=state.remote_path,
                      owner=state.owner)
        self._maybe_cleanup()
        return ack

    @property
    def places_files(self) -> bool:
        """Whether finished uploads go to the destination (type 0, no reply handler)."""
        return self.replies is None

    def _fragment(self, packet: _Packet) -> Ack:
        """Fragment (PROTOCOL.md 7.3)."""
        try:
            with self._open(packet) as session:
                try:
                    result = self._fragment_locked(packet, session)
                except BITSError as exc:
                    if exc.received is None and not isinstance(exc, SessionNotFound):
                        exc.received = session.state.received
                    raise
            if isinstance(result, Ack):
                return result
            # Upload-reply: wait for the server application without the session lock.
            assert self.replies is not None
            return self.replies.wait(packet, result)
        except SessionGone:
            raise SessionNotFound() from None

    def _fragment_locked(self, packet: _Packet, session: Session) -> t.Any:
        cfg, state, request = self.config, session.state, packet.request
        environ = request.environ
        rng = parse_content_range(environ.get("HTTP_CONTENT_RANGE"), packet.content_length)
        encoding = environ.get("HTTP_CONTENT_ENCODING")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            raise InvalidRequest("Only the identity Content-Encoding is supported.")
        if rng.length > cfg.max_fragment_size:
            raise FragmentTooLarge()
        if state.content_name is None:
            # Windows sends Content-Name on Fragments, not on Create-Session (A8).
            state.content_name = _content_name(request)
        if state.total is None:
            if cfg.max_upload_size is not None and rng.total > cfg.max_upload_size:
                raise UploadTooLarge()
            state.total = rng.total
        elif rng.total != state.total:
            raise InvalidRequest("The total length differs from the earlier fragments'.")
        if state.phase != RECEIVING:
            return self._final(packet, session)
        received = state.received
        if rng.first > received:
            raise RangeMismatch(received)
        if rng.last >= received:
            self._write(packet, session, rng)
        complete = state.received == state.total
        if complete:
            state.phase = COMPLETE
        session.save_progress()
        self.on_event("fragment-received", session_id=state.id, received=state.received,
                      total=state.total, written=state.received - received)
        if complete:
            return self._final(packet, session)
        return self._received_ack(session)

    def _write(self, packet: _Packet, session: Session, rng: ContentRange) -> None:
        state = session.state
        start = state.received
        count = rng.last + 1 - start
        environ = packet.request.environ
        stream = (self.config.direct_input and direct_input(environ)) or environ["wsgi.input"]
        with _read_timeout(packet.request, self.config.read_timeout):
            written = session.write(start, start - rng.first, count, stream)
        state.received = start + written
        if written < count:
            session.save()
            raise BodyTimeout() if session.timed_out else ClientGone()

    def _received_ack(self, session: Session) -> Ack:
        ack = Ack(200, session_id=session.id)
        ack.headers.append((Header.RECEIVED_CONTENT_RANGE, str(session.state.received)))
        return ack

    def _final(self, packet: _Packet, session: Session) -> t.Any:
        """The completing fragment, or a retry of it (PROTOCOL.md 7.3 step 10, 8.1)."""
        state = session.state
        if state.final_ack is not None:
            return _replay(state)
        if self.replies is not None:
            return self.replies.complete(packet, session)
        if not state.committed:
            names = paths.split_remote_path(state.remote_path)
            session.commit(self.config.upload_folder, names,
                           allow_overwrite=self.config.allow_overwrites,
                           conflict_status=self.config.overwrite_status)
        ack = self._received_ack(session)
        self.finish(session, ack)
        self.on_event("upload-completed", session_id=state.id, remote_path=state.remote_path,
                      size=state.total, owner=state.owner)
        return ack

    def finish(self, session: Session, ack: Ack) -> None:
        """Cache ``ack`` as the final Ack and enter WAIT_FOR_CLOSE (PROTOCOL.md 5.3)."""
        session.state.phase = FINISHED
        session.state.final_ack = {"status": ack.status, "headers": ack.headers}
        session.save()

    def _close_session(self, packet: _Packet) -> Ack:
        """Close-Session (PROTOCOL.md 7.4; empty-file decision of 7.3)."""
        try:
            with self._open(packet) as session:
                state = session.state
                if (state.total is None and self.places_files and not state.committed):
                    # Project decision: no Fragment at all means an empty file.
                    names = paths.split_remote_path(state.remote_path)
                    session.commit(self.config.upload_folder, names,
                                   allow_overwrite=self.config.allow_overwrites,
                                   conflict_status=self.config.overwrite_status)
                    state.total = 0
                    self.on_event("upload-completed", session_id=state.id,
                                  remote_path=state.remote_path, size=0, owner=state.owner)
                session.discard_temp_copy(self.config.upload_folder)
                session.remove("closed")
                self.on_event("session-closed", session_id=state.id,
                              completed=state.committed or state.phase == FINISHED)
                return Ack(200, session_id=session.id)
        except SessionGone as gone:
            return Ack(200, session_id=gone.tombstone.id)

    def _cancel_session(self, packet: _Packet) -> Ack:
        """Cancel-Session (PROTOCOL.md 7.5): data and reply go; a committed file stays."""
        try:
            with self._open(packet) as session:
                session.discard_temp_copy(self.config.upload_folder)
                session.remove("cancelled")
                self.on_event("session-cancelled", session_id=session.id)
                return Ack(200, session_id=session.id)
        except SessionGone as gone:
            return Ack(200, session_id=gone.tombstone.id)

    def _open(self, packet: _Packet) -> t.ContextManager[Session]:
        return self.store.open(packet.session_id, directory=self.name, owner=packet.owner,
                               remote_path=packet.remote_path)

    # -- housekeeping ------------------------------------------------------------------

    def _maybe_cleanup(self) -> None:
        """Start a background sweep if none ran for ``BITS_CLEANUP_INTERVAL`` seconds."""
        interval = self.config.cleanup_interval
        now = time.time()
        if not interval or now - self._last_cleanup_check < min(interval, 60):
            return
        self._last_cleanup_check = now
        stamp = os.path.join(self.store.folder, "cleanup.stamp")
        try:
            if now - os.stat(stamp).st_mtime < interval:
                return
        except FileNotFoundError:
            pass
        try:
            with open(stamp, "a"):
                os.utime(stamp, None)
        except OSError:
            return
        threading.Thread(target=self.cleanup, name="flask-bits-cleanup", daemon=True).start()

    def cancel(self, session_id: str) -> bool:
        """Cancel a session of this session folder whatever its owner, as an operator
        (``flask bits cancel``, the live view); True if there was one to cancel."""
        sid = canonical_session_id(session_id)
        if sid is None or not self.store.remove_by_id(sid, kind="cancelled"):
            return False
        self.on_event("session-cancelled", session_id=sid)
        return True

    def cleanup(self) -> list[tuple[str, str]]:
        """Remove expired sessions and tombstones now; returns what was removed."""
        try:
            with self.store.locker.hold("cleanup", timeout=0):
                removed = self.store.cleanup(
                    tombstone_timeout=self.config.tombstone_timeout,
                    timeouts={self.name: self.config.session_timeout},
                    upload_folders={self.name: self.config.upload_folder},
                )
        except BITSError:
            return []  # another process is sweeping
        for what, ident in removed:
            if what == "session":
                self.on_event("session-expired", session_id=ident)
        if removed:
            log.info("cleanup removed %d item(s)", len(removed))
        return removed


class _read_timeout:
    """Bound each body read on the server's socket (``BITS_READ_TIMEOUT``): gunicorn and
    werkzeug's server expose it; other servers must enforce their own read timeout.

    A plain blocking socket (gunicorn's) gets the kernel's ``SO_RCVTIMEO``, so that each
    ``recv`` stays one system call; a Python-level timeout would add a ``poll`` and a GIL
    round trip before every read. A stalled read then fails with ``EAGAIN``
    (:class:`BlockingIOError`), which :meth:`Session.write` treats like a timeout.
    """

    def __init__(self, request: Request, seconds: float | None) -> None:
        environ = request.environ
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        self.sock = sock if seconds else None
        self.seconds = seconds or 0.0
        self.old: float | None = None
        self.kernel = False

    def __enter__(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            self.old = sock.gettimeout()
            if self.old is None and _KERNEL_TIMEOUT and type(sock) is socket.socket:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.seconds))
                self.kernel = True
            else:
                sock.settimeout(self.seconds)
        except OSError:
            self.sock = None

    def __exit__(self, *exc: t.Any) -> None:
        if self.sock is not None:
            try:
                if self.kernel:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
                else:
                    self.sock.settimeout(self.old)
            except OSError:
                pass


#: ``SO_RCVTIMEO`` takes a ``struct timeval`` of two native longs on Linux.
_KERNEL_TIMEOUT = sys.platform.startswith("linux")


@functools.lru_cache(maxsize=16)
def _timeval(seconds: float) -> bytes:
    """``seconds`` as a timeval; 0 means no timeout, so a positive value stays >= 1 µs."""
    micros = max(1, round(seconds * 1_000_000)) if seconds > 0 else 0
    return struct.pack("@ll", *divmod(micros, 1_000_000))


_HTTP_ERRORS: dict[int, type[BITSError]] = {
    401: AccessDenied,
    403: AccessDenied,
    407: AccessDenied,
    413: FragmentTooLarge,
}
_HTTP_MESSAGES = {
    401: "Authentication is required.",
    403: "Access is denied.",
    404: "Nothing is served at this URL.",
    405: "Method not allowed here.",
    407: "Proxy authentication is required.",
    413: "The request is too large.",
}
_KEPT_HEADERS = ("WWW-Authenticate", "Proxy-Authenticate", "Retry-After", "Set-Cookie")


def _replay(state: SessionState) -> Ack:
    cached = state.final_ack or {}
    ack = Ack(int(cached.get("status", 200)), session_id=state.id)
    ack.headers.extend((str(k), str(v)) for k, v in cached.get("headers", []))
    error = cached.get("error")
    if error is not None:
        ack.error = BITSError(error["message"], status=ack.status, hresult=error["hresult"],
                              context=error["context"])
    return ack


def echoed_session_id(request: Request, packet_type: PacketType | None) -> str | None:
    """The session id an error Ack echoes: only for session packets, canonical (7.0)."""
    if packet_type not in _SESSION_PACKETS:
        return None
    return canonical_session_id(request.environ.get(_ENV_SESSION_ID))


def request_url(request: Request, *, host_only: bool = False) -> str:
    """The request's absolute URL (or ``scheme://host/``); a malformed ``Host`` header
    (werkzeug refuses e.g. a port over 65535) is the client's mistake: 400."""
    try:
        return request.host_url if host_only else request.url
    except ValueError:
        raise InvalidRequest("The Host header is malformed.") from None


def _content_name(request: Request) -> str | None:
    value = request.environ.get("HTTP_CONTENT_NAME")
    return value[:260] if value else None


def _printable(text: str) -> str:
    return "".join(c if " " < c < "\x7f" else "?" for c in text)
