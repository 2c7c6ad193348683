"""A cross-platform BITS upload client: the Windows BITS service's upload side, in Python.

Uploads a file to any BITS upload server (this package's, or IIS with the BITS server
extension) the way the Windows client does (PROTOCOL.md section 9): Ping, Create-Session,
the file in fragments, the reply of an upload-reply job, Close-Session. Standard library
only; ``tqdm`` (the ``progress`` extra) draws a progress bar when it is installed.

Command line::

    python -m flask_bits.client upload URL FILE [options]
    python -m flask_bits.client cancel URL [SESSION_ID] [options]

``URL`` is the destination: ``http://host:8080/bits/dir/name.bin``. A URL ending in ``/``
gets ``FILE``'s name appended.

What the client does on its own:

* streams ``FILE`` from disk in fragments (default 1 MiB; ``--fragment-size``), never
  holding the file in memory;
* after a broken connection: Pings, re-sends the next fragment, and continues from the
  offset the server reports (``BITS-Received-Content-Range``), also on 416;
* ``BG_E_SESSION_NOT_FOUND`` (0x8020001F): starts over from byte 0 with a new session;
* 413: halves the fragment size, never below 5120 bytes;
* ``BITS-Host-Id``: sends the rest of the upload to that host (same port), after a Ping;
  when that host stays unreachable for ``BITS-Host-Id-Fallback-Timeout`` seconds it goes
  back to the original URL;
* HTTP Basic (``--user USER:PASS``), sent once the server has asked for it (401);
* ``BITS-Reply-URL``: downloads the reply (HEAD, then ranged GETs, resumable) before
  Close-Session; it goes to ``--reply-output PATH`` (``-`` for stdout), by default to
  stdout when it is at most 64 KiB, else to ``FILENAME.reply`` in the current folder;
* transient failures -- connection errors, 408, 409, 5xx except 501 and 505 -- are
  retried with exponential backoff, at most ``--max-retries`` times in a row and for at
  most ``--timeout`` seconds in a row (any success resets both); other 4xx are fatal,
  and so is ``BG_E_TOO_LARGE``; a 503 ``E_PENDING`` (the server application is still
  making the reply) is asked again without counting as a failure;
* ``--state-file PATH`` records the session so that re-running the same command after an
  interruption or a failure continues the same session.

Exit codes:

===  ==========================================================================
0    success
2    usage error (bad arguments or URL)
3    the server refused the upload, or broke the protocol (fatal, not retried)
4    transient failures went on after all retries (see --max-retries, --timeout)
5    local file error (cannot read FILE, FILE changed, cannot write the reply)
130  interrupted (Ctrl-C); with --state-file, re-run the command to continue
===  ==========================================================================

Python API::

    from flask_bits.client import BITSClient

    client = BITSClient("http://127.0.0.1:8080/bits/", auth=("alice", "secret"))
    result = client.upload("report.pdf", "reports/2024.pdf")
    print(result.session_id, result.size, result.reply_bytes)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import http.client
import io
import json
import logging
import os
import random
import re
import ssl
import stat
import sys
import time
import typing as t
import urllib.parse

log = logging.getLogger("flask_bits.client")

#: "BITS 1.5 Upload Protocol", the only protocol GUID (PROTOCOL.md 1.4).
PROTOCOL_GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
#: Default fragment size (Windows clients use up to 13 MB).
DEFAULT_FRAGMENT_SIZE = 1024 * 1024
#: Smallest fragment a client may fall back to after a 413 (PROTOCOL.md 9.3).
MIN_FRAGMENT_SIZE = 5 * 1024
#: Default size of one ranged GET of a reply.
DEFAULT_REPLY_CHUNK_SIZE = 1024 * 1024

BG_E_SESSION_NOT_FOUND = 0x8020001F
BG_E_TOO_LARGE = 0x80200020
#: With a 503: the server application is still working on the upload; retry later.
E_PENDING = 0x8000000A
#: Packets that name a session (and so can get BG_E_SESSION_NOT_FOUND).
_SESSION_PACKETS = ("Fragment", "Close-Session", "Cancel-Session")
#: Pause between retries of a final fragment whose reply is still being made.
PENDING_DELAY = 1.0

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TRANSIENT = 4
EXIT_LOCAL = 5
EXIT_INTERRUPTED = 130

_HRESULT_NAMES = {
    0x8020001F: "BG_E_SESSION_NOT_FOUND",
    0x80200020: "BG_E_TOO_LARGE (the upload exceeds the server's maximum size)",
    0x80070057: "E_INVALIDARG (the request broke the protocol's rules)",
    0x80070005: "E_ACCESSDENIED",
    0x80070070: "ERROR_DISK_FULL (the server is out of disk space)",
    0x80070112: "the server application did not answer in time",
    0x80004005: "E_FAIL (unexpected server error)",
    0x8000000A: "E_PENDING (the server application is still working)",
}

#: ``progress(phase, done, total)``: ``phase`` is ``"upload"`` or ``"reply"``; ``done``
#: and ``total`` count bytes.
ProgressCallback = t.Callable[[str, int, int], None]
#: Where a reply goes: a path (written via ``PATH.part``, resumable), a binary stream,
#: ``None`` (kept in memory, :attr:`UploadResult.reply_bytes`), or a callable that gets
#: the reply's size and returns one of these.
ReplyOutput = t.Union[
    str, "os.PathLike[str]", t.BinaryIO, None, t.Callable[[int], t.Any]
]


# -- errors -------------------------------------------------------------------------


class BITSClientError(Exception):
    """Base class of the client's errors; :attr:`exit_code` is the CLI's exit code."""

    exit_code = EXIT_REFUSED


class ServerRefused(BITSClientError):
    """The server refused a request with a fatal status (or broke the protocol).

    :param status: the HTTP status (0 when the server's answer made no sense).
    :param hresult: the ``BITS-Error-Code`` value, if any.
    :param context: the ``BITS-Error-Context`` value, if any.
    """

    exit_code = EXIT_REFUSED

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        hresult: int | None = None,
        context: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.hresult = hresult
        self.context = context


class RetriesExhausted(BITSClientError):
    """Transient failures went on for ``max_retries`` tries or ``timeout`` seconds."""

    exit_code = EXIT_TRANSIENT


class LocalFileError(BITSClientError):
    """The local file could not be read, changed during the upload, or the reply could
    not be written."""

    exit_code = EXIT_LOCAL


class _Transient(Exception):
    """One failed attempt that may succeed later."""

    def __init__(self, message: str, *, connection: bool = False,
                 retry_after: float | None = None, pending: bool = False) -> None:
        super().__init__(message)
        self.connection = connection
        self.retry_after = retry_after
        #: The server is busy with this very request (a reply being made): retrying
        #: does not count as a failure, only against the time limit.
        self.pending = pending


class _SessionLost(Exception):
    """The server does not know the session (0x8020001F): start over."""


# -- results ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadResult:
    """What :meth:`BITSClient.upload` did."""

    #: The session that completed the upload.
    session_id: str
    #: Bytes uploaded (the file's size).
    size: int
    #: The destination URL.
    url: str
    #: The reply URL of an upload-reply job, else ``None``.
    reply_url: str | None = None
    #: Where the reply was saved, when it went to a path.
    reply_path: str | None = None
    #: The reply, when it was kept in memory.
    reply_bytes: bytes | None = None
    #: The reply's size in bytes (``None`` without a reply).
    reply_size: int | None = None
    #: How many times the upload started over with a new session.
    restarts: int = 0
    #: The fragment size in use at the end (smaller than asked after a 413).
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    #: The URL the last fragment went to (differs from :attr:`url` with a host ID).
    final_url: str | None = None

    def to_json(self) -> dict[str, t.Any]:
        """A JSON-ready dict (the reply's bytes are left out)."""
        data = dataclasses.asdict(self)
        data.pop("reply_bytes")
        return data


# -- HTTP plumbing ------------------------------------------------------------------


@dataclasses.dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def is_ack(self) -> bool:
        return (self.get("BITS-Packet-Type") or "").strip().lower() == "ack"

    def hresult(self) -> int | None:
        value = self.get("BITS-Error-Code") or self.get("BITS-Error")
        return _parse_hex(value)

    def describe(self) -> str:
        text = f"{self.status} {self.reason}".strip()
        code = self.hresult()
        if code is not None:
            name = _HRESULT_NAMES.get(code)
            text += f", error 0x{code:08X}" + (f" {name}" if name else "")
            ctx = _parse_hex(self.get("BITS-Error-Context"))
            if ctx == 0x7:
                text += " from the server application"
        message = self.get("BITS-Error-Message")
        if message:
            text += f": {message}"
        elif not self.is_ack and self.status >= 400:
            text += " (not a BITS Ack: is this URL a BITS upload directory?)"
        return text


def _parse_hex(value: str | None) -> int | None:
    if not value:
        return None
    text = value.strip().lower()
    text = text[2:] if text.startswith("0x") else text.lstrip("x")
    try:
        return int(text, 16)
    except ValueError:
        return None


class _Body:
    """``length`` bytes of ``file`` from ``offset``, read in blocks by http.client."""

    def __init__(self, file: t.BinaryIO, offset: int, length: int,
                 on_read: t.Callable[[int], None] | None = None) -> None:
        self.file = file
        self.remaining = length
        self.offset = offset
        self.on_read = on_read
        self.started = False

    def read(self, size: int = -1) -> bytes:
        if not self.started:
            self.started = True
            try:
                self.file.seek(self.offset)
            except OSError as exc:
                raise LocalFileError(f"cannot read the file: {exc}") from exc
        if self.remaining <= 0:
            return b""
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        try:
            data = self.file.read(want)
        except OSError as exc:
            raise LocalFileError(f"cannot read the file: {exc}") from exc
        if not data:
            raise LocalFileError("the file became shorter during the upload")
        self.remaining -= len(data)
        if self.on_read is not None:
            self.on_read(len(data))
        return data


class _Connections:
    """One keep-alive connection per (scheme, host, port)."""

    def __init__(self, *, timeout: float, ssl_context: ssl.SSLContext | None,
                 user_agent: str) -> None:
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.user_agent = user_agent
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}
        self._used: set[tuple[str, str, int]] = set()

    def _key(self, url: str) -> tuple[str, str, int]:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, host, port

    def _get(self, key: tuple[str, str, int]) -> http.client.HTTPConnection:
        conn = self._conns.get(key)
        if conn is None:
            scheme, host, port = key
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout,
                    context=self.ssl_context or ssl.create_default_context(),
                    blocksize=65536,
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout,
                                                  blocksize=65536)
            self._conns[key] = conn
        return conn

    def drop(self, url: str) -> None:
        key = self._key(url)
        conn = self._conns.pop(key, None)
        self._used.discard(key)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        self._used.clear()

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body_factory: t.Callable[[], _Body] | None = None,
        *,
        sink: t.Callable[[http.client.HTTPResponse], None] | None = None,
    ) -> _Response:
        """Send one request; read the answer (at most 64 KiB of body unless ``sink``
        consumes it). Connection problems raise :class:`_Transient`.

        A request that fails on a reused keep-alive connection before any answer is
        sent once more on a fresh connection (the server may have closed it idly).
        """
        key = self._key(url)
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": self.user_agent, "Accept": "*/*", **headers}
        for attempt in (0, 1):
            reused = key in self._used
            conn = self._get(key)
            body = body_factory() if body_factory is not None else None
            if body is None and method not in ("GET", "HEAD"):
                headers.setdefault("Content-Length", "0")
            early = False
            try:
                try:
                    conn.request(method, target, body=body, headers=headers)
                except (OSError, http.client.HTTPException) as exc:
                    # The server may have answered early (a 413 before reading the body)
                    # and closed: try to read that answer before giving up.
                    if body is None or not body.started:
                        raise
                    try:
                        resp = conn.getresponse()
                    except (OSError, http.client.HTTPException):
                        raise exc from None
                    early = True  # the body was not sent whole: never reuse this one
                else:
                    resp = conn.getresponse()
                self._used.add(key)
                headers_out = {k.lower(): v for k, v in resp.getheaders()}
                if sink is not None and 200 <= resp.status < 300:
                    sink(resp)
                    data = b""
                else:
                    data = resp.read(65536)
                if early or resp.will_close or not resp.isclosed():
                    self.drop(url)
                return _Response(resp.status, resp.reason or "", headers_out, data)
            except LocalFileError:
                self.drop(url)
                raise
            except (OSError, http.client.HTTPException) as exc:
                self.drop(url)
                if attempt == 0 and reused and not isinstance(exc, TimeoutError) and (
                    body is None or not body.started
                ):
                    continue
                raise _Transient(f"connection to {parts.netloc} failed: "
                                 f"{_describe_exc(exc)}", connection=True) from exc
            except BaseException:
                self.drop(url)
                raise
        raise AssertionError("unreachable")  # pragma: no cover


def _describe_exc(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if text != exc.__class__.__name__ else text


# -- retries -------------------------------------------------------------------------


class _Retrier:
    """Exponential backoff bounded by a count and a time, both reset by a success."""

    def __init__(self, *, max_retries: int, timeout: float, delay: float,
                 max_delay: float = 60.0) -> None:
        self.max_retries = max_retries
        self.timeout = timeout
        self.delay = delay
        self.max_delay = max_delay
        self.failures = 0
        self.started: float | None = None

    def reset(self) -> None:
        self.failures = 0
        self.started = None

    def failed(self, error: Exception, retry_after: float | None = None, *,
               pending: bool = False) -> None:
        """Sleep before the next try, or raise :class:`RetriesExhausted`.

        ``pending`` answers ("still working, retry later") count only against the time
        limit, and are retried after :data:`PENDING_DELAY` (or ``Retry-After``).
        """
        now = time.monotonic()
        if self.started is None:
            self.started = now
        elapsed = now - self.started
        if pending:
            if elapsed >= self.timeout:
                raise RetriesExhausted(f"giving up after {elapsed:.1f}s: {error}") from error
            wait = PENDING_DELAY if retry_after is None else retry_after
            pause = min(wait, self.max_delay, self.timeout - elapsed)
            log.info("%s; asking again in %.1fs", error, pause)
            time.sleep(max(0.0, pause))
            return
        self.failures += 1
        if self.failures > self.max_retries or elapsed >= self.timeout:
            raise RetriesExhausted(
                f"giving up after {self.failures} failed tries in {elapsed:.1f}s: {error}"
            ) from error
        pause = self.delay * 2 ** min(self.failures - 1, 30)
        pause = min(self.max_delay, pause * random.uniform(0.75, 1.25))
        if retry_after is not None:
            pause = max(pause, min(retry_after, self.max_delay))
        pause = max(0.0, min(pause, self.timeout - elapsed))
        log.warning("%s; retry %d/%d in %.1fs", error, self.failures, self.max_retries, pause)
        time.sleep(pause)


def _status_is_fatal(status: int) -> bool:
    """PROTOCOL.md 4.4 and A29: 4xx fatal except 408/409; 5xx transient except 501/505;
    3xx transient except 300-305 and 307; everything else transient."""
    if 400 <= status < 500:
        return status not in (408, 409)
    if 500 <= status < 600:
        return status in (501, 505)
    if 300 <= status < 400:
        return status <= 305 or status == 307
    return False


def _retry_after(resp: _Response) -> float | None:
    value = resp.get("Retry-After")
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


# -- local files -------------------------------------------------------------------


class _Source:
    """The file being uploaded: a path (opened here) or a seekable binary stream."""

    def __init__(self, source: str | os.PathLike[str] | t.BinaryIO) -> None:
        self.path: str | None = None
        self._owned = False
        if isinstance(source, (str, os.PathLike)):
            self.path = os.path.abspath(os.fspath(source))
            try:
                self.file: t.BinaryIO = open(self.path, "rb")
            except OSError as exc:
                raise LocalFileError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
            self._owned = True
        else:
            self.file = source
            if not (hasattr(source, "read") and hasattr(source, "seek")):
                raise TypeError("upload() needs a path or a seekable binary file object")
        try:
            self.identity = self._stat()
            if self.identity is not None:
                self.size = self.identity[0]
            else:
                self.file.seek(0, os.SEEK_END)
                self.size = self.file.tell()
        except OSError as exc:
            self.close()
            raise LocalFileError(f"cannot read the file: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str | None:
        if self.path is not None:
            return os.path.basename(self.path)
        name = getattr(self.file, "name", None)
        return os.path.basename(name) if isinstance(name, str) else None

    def _stat(self) -> tuple[int, int] | None:
        try:
            fd = self.file.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size, st.st_mtime_ns

    def check_unchanged(self) -> None:
        """Raise :class:`LocalFileError` if the file's size or mtime changed."""
        if self.identity is None:
            return
        try:
            now = self._stat()
        except OSError as exc:
            raise LocalFileError(f"cannot read the file: {exc}") from exc
        if now != self.identity:
            raise LocalFileError("the file changed during the upload; start again")

    def close(self) -> None:
        if self._owned:
            self.file.close()


class _StateFile:
    """The resume record of ``--state-file``: JSON, replaced atomically."""

    VERSION = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))

    def load(self) -> dict[str, t.Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return None
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            log.warning("ignoring state file %s: not a flask-bits client state", self.path)
            return None
        return data

    def save(self, data: dict[str, t.Any]) -> None:
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": self.VERSION, **data}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise LocalFileError(f"cannot write the state file {self.path}: {exc}") from exc

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _ReplySink:
    """Where reply bytes go; supports continuing at an offset."""

    def __init__(self, target: t.Any, size: int, *, resume_ok: bool) -> None:
        self.size = size
        self.path: str | None = None
        self.part: str | None = None
        self.memory: io.BytesIO | None = None
        self._stream: t.BinaryIO | None = None
        self._owned = False
        self.start = 0
        if target is None:
            self.memory = io.BytesIO()
            self._stream = self.memory
        elif isinstance(target, (str, os.PathLike)):
            self.path = os.path.abspath(os.fspath(target))
            self.part = self.path + ".part"
            try:
                have = os.path.getsize(self.part) if resume_ok else -1
            except OSError:
                have = -1
            try:
                if 0 <= have <= size:
                    self._stream = open(self.part, "r+b")
                    self._stream.seek(have)
                    self.start = have
                else:
                    self._stream = open(self.part, "wb")
            except OSError as exc:
                raise LocalFileError(f"cannot write the reply to {self.part}: {exc}") from exc
            self._owned = True
        else:
            self._stream = target

    def restart(self) -> None:
        """The reply changed on the server: throw away what was written."""
        assert self._stream is not None
        if self.memory is not None or self.part is not None:
            self._stream.seek(0)
            self._stream.truncate()
        else:
            raise ServerRefused("the reply changed on the server while it was being written "
                                "to a stream")

    def write(self, data: bytes) -> None:
        assert self._stream is not None
        try:
            self._stream.write(data)
        except OSError as exc:
            raise LocalFileError(f"cannot write the reply: {exc}") from exc

    def finish(self) -> None:
        assert self._stream is not None
        try:
            self._stream.flush()
            if self._owned:
                self._stream.close()
                assert self.part is not None and self.path is not None
                os.replace(self.part, self.path)
        except OSError as exc:
            raise LocalFileError(f"cannot write the reply: {exc}") from exc

    def close(self) -> None:
        if self._owned and self._stream is not None and not self._stream.closed:
            self._stream.close()


# -- the client ------------------------------------------------------------------------


class BITSClient:
    """A BITS upload client.

    :param base_url: the upload URL, or a base that :meth:`upload`'s ``url`` is resolved
        against (``http://host:8080/bits/``). User info in it (``user:pass@``) is used
        as ``auth``.
    :param fragment_size: bytes per Fragment (at least 5120); halved after a 413.
    :param auth: HTTP Basic credentials, ``(user, password)`` or ``"user:password"``.
        They are sent once a host has challenged with a 401, and from then on.
    :param timeout: the longest time (seconds) transient failures may go on in a row
        before :class:`RetriesExhausted`; any success restarts the clock.
    :param max_retries: the most transient failures in a row before
        :class:`RetriesExhausted`.
    :param progress: called as ``progress(phase, done, total)`` (see
        :data:`ProgressCallback`).
    :param request_timeout: socket timeout of each request, seconds.
    :param retry_delay: the first backoff pause, doubled after each failure (max 60 s).
    :param max_restarts: the most times one upload starts over with a new session
        (after ``BG_E_SESSION_NOT_FOUND``) before giving up.
    :param reply_chunk_size: bytes per ranged GET of a reply.
    :param ssl_context: for https URLs (default: system trust store, verified).
    :param user_agent: the ``User-Agent`` header.
    """

    def __init__(
        self,
        base_url: str,
        *,
        fragment_size: int = DEFAULT_FRAGMENT_SIZE,
        auth: tuple[str, str] | str | None = None,
        timeout: float = 600.0,
        max_retries: int = 10,
        progress: ProgressCallback | None = None,
        request_timeout: float = 300.0,
        retry_delay: float = 0.5,
        max_restarts: int = 5,
        reply_chunk_size: int = DEFAULT_REPLY_CHUNK_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str | None = None,
    ) -> None:
        if fragment_size < MIN_FRAGMENT_SIZE:
            raise ValueError(f"fragment_size must be at least {MIN_FRAGMENT_SIZE} bytes")
        if reply_chunk_size < 1:
            raise ValueError("reply_chunk_size must be positive")
        if max_retries < 0 or timeout < 0 or retry_delay < 0 or max_restarts < 0:
            raise ValueError("max_retries, timeout, retry_delay and max_restarts must not "
                             "be negative")
        self.base_url, url_auth = _split_userinfo(base_url)
        self.auth = _parse_auth(auth) if auth is not None else url_auth
        self.fragment_size = fragment_size
        self.timeout = timeout
        self.max_retries = max_retries
        self.progress = progress
        self.request_timeout = request_timeout
        self.retry_delay = retry_delay
        self.max_restarts = max_restarts
        self.reply_chunk_size = reply_chunk_size
        self.ssl_context = ssl_context
        self.user_agent = user_agent or f"flask-bits-client/{_version()}"

    def resolve(self, url: str | None = None, name: str | None = None) -> str:
        """The absolute upload URL for ``url`` (relative to the base URL); a URL ending
        in ``/`` gets ``name`` appended (percent-encoded)."""
        full = self.base_url if url is None else urllib.parse.urljoin(self.base_url, url)
        full, _ = _split_userinfo(full)
        parts = urllib.parse.urlsplit(full)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {full!r}")
        path = parts.path or "/"
        if path.endswith("/"):
            if not name:
                raise ValueError(f"the URL {full!r} names a folder; add the file name")
            path += urllib.parse.quote(name)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, _quote_path(path),
                                        parts.query, ""))

    def upload(
        self,
        source: str | os.PathLike[str] | t.BinaryIO,
        url: str | None = None,
        *,
        state_file: str | os.PathLike[str] | None = None,
        reply_output: ReplyOutput = None,
    ) -> UploadResult:
        """Upload ``source`` (a path, or a seekable binary file object) to ``url``.

        :param url: the destination, relative to the base URL (``None``: the base URL;
            one ending in ``/`` gets the file's name appended).
        :param state_file: a JSON file recording the session; when it describes this
            same URL and unchanged file, the upload continues that session. Removed
            after success. Only for paths.
        :param reply_output: where the reply of an upload-reply job goes (see
            :data:`ReplyOutput`); default: memory.
        :raises ServerRefused: a fatal answer (exit code 3).
        :raises RetriesExhausted: transient failures did not stop (exit code 4).
        :raises LocalFileError: the file cannot be read or changed (exit code 5).
        """
        src = _Source(source)
        try:
            if state_file is not None and src.path is None:
                raise ValueError("state_file needs a path to upload, not a file object")
            target = self.resolve(url, src.name)
            job = _UploadJob(self, src, target,
                             _StateFile(state_file) if state_file is not None else None,
                             reply_output)
            return job.run()
        finally:
            src.close()

    def cancel(self, url: str | None, session_id: str) -> bool:
        """Send Cancel-Session for ``session_id`` to its upload ``url``.

        :returns: ``True`` when the server acknowledged it, ``False`` when the server
            does not know the session (already closed, cancelled or expired).
        :raises ServerRefused: a fatal answer.
        :raises RetriesExhausted: transient failures did not stop.
        """
        target = self.resolve(url)
        conns = self._connections()
        try:
            exchange = _Exchanger(self, conns)
            try:
                exchange.post("Cancel-Session", lambda: target, session_id=session_id)
            except _SessionLost:
                return False
            return True
        finally:
            conns.close()

    def _connections(self) -> _Connections:
        return _Connections(timeout=self.request_timeout, ssl_context=self.ssl_context,
                            user_agent=self.user_agent)


class _Exchanger:
    """Sends packets: answers auth challenges, classifies answers, retries."""

    def __init__(self, client: BITSClient, conns: _Connections) -> None:
        self.client = client
        self.conns = conns
        self.retrier = _Retrier(max_retries=client.max_retries, timeout=client.timeout,
                                delay=client.retry_delay)
        self.auth_hosts: set[str] = set()
        #: Called with the failure before each backoff; may change where packets go.
        self.on_connection_failure: t.Callable[[str], None] | None = None
        #: Called after each answered request (any status) with its URL.
        self.on_answer: t.Callable[[str], None] | None = None
        self.need_ping = False

    def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body_factory: t.Callable[[], _Body] | None = None,
        sink: t.Callable[[http.client.HTTPResponse], None] | None = None,
    ) -> _Response:
        """One request, with HTTP Basic sent or added after a 401 challenge."""
        netloc = urllib.parse.urlsplit(url).netloc.lower()
        auth = self.client.auth
        sent_auth = auth is not None and netloc in self.auth_hosts
        resp = self.conns.request(method, url, self._with_auth(headers, sent_auth),
                                  body_factory, sink=sink)
        if (resp.status == 401 and auth is not None and not sent_auth
                and "basic" in (resp.get("WWW-Authenticate") or "").lower()):
            self.auth_hosts.add(netloc)
            resp = self.conns.request(method, url, self._with_auth(headers, True),
                                      body_factory, sink=sink)
        if self.on_answer is not None:
            self.on_answer(url)
        return resp

    def _with_auth(self, headers: dict[str, str], use: bool) -> dict[str, str]:
        if not use or self.client.auth is None:
            return dict(headers)
        user, password = self.client.auth
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {**headers, "Authorization": f"Basic {token}"}

    def post(
        self,
        packet: str,
        url: t.Callable[[], str],
        *,
        session_id: str | None = None,
        headers: t.Callable[[], dict[str, str]] | None = None,
        body: t.Callable[[], _Body] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> _Response:
        """Send a ``BITS_POST`` until it gets a status in ``ok``; retries transient
        failures (Pinging first after a connection failure, as Windows does).

        ``url``, ``headers`` and ``body`` are called for every try, so they can follow a
        host change or a new offset.

        :raises _SessionLost: the server does not know the session.
        :raises ServerRefused: a fatal answer.
        :raises RetriesExhausted: transient failures did not stop.
        """
        while True:
            try:
                if self.need_ping and packet != "Ping":
                    self._check("Ping", self._bits_post("Ping", url(), {}), (200,))
                    self.need_ping = False
                extra = headers() if headers is not None else {}
                if session_id is not None:
                    extra["BITS-Session-Id"] = session_id
                resp = self._bits_post(packet, url(), extra, body)
                self._check(packet, resp, ok)
                self.retrier.reset()
                return resp
            except _Transient as exc:
                if exc.connection:
                    self.need_ping = True
                    if self.on_connection_failure is not None:
                        self.on_connection_failure(str(exc))
                self.retrier.failed(exc, exc.retry_after, pending=exc.pending)

    def _bits_post(self, packet: str, url: str, headers: dict[str, str],
                   body: t.Callable[[], _Body] | None = None) -> _Response:
        return self.send("BITS_POST", url, {"BITS-Packet-Type": packet, **headers}, body)

    def _check(self, packet: str, resp: _Response, ok: tuple[int, ...]) -> None:
        if resp.status in ok:
            if not resp.is_ack and resp.status != 413:  # a proxy's 413 is fine too
                raise ServerRefused(f"{packet}: the server answered {resp.status} without "
                                    "a BITS Ack; is this URL a BITS upload directory?",
                                    status=resp.status)
            return
        code = resp.hresult()
        ctx = _parse_hex(resp.get("BITS-Error-Context"))
        what = f"{packet}: {resp.describe()}"
        if code == BG_E_SESSION_NOT_FOUND and resp.is_ack and packet in _SESSION_PACKETS:
            raise _SessionLost(what)
        if resp.status == 401:
            hint = ("the credentials were rejected" if self.client.auth is not None
                    else "the server requires authentication (use --user USER:PASS)")
            raise ServerRefused(f"{what}; {hint}", status=401, hresult=code, context=ctx)
        if resp.status == 407:
            raise ServerRefused(f"{what}; proxy authentication is not supported",
                                status=407, hresult=code, context=ctx)
        if _status_is_fatal(resp.status) or code == BG_E_TOO_LARGE:
            raise ServerRefused(what, status=resp.status, hresult=code, context=ctx)
        if resp.status == 409 and packet in ("Create-Session", "Fragment"):
            what += " (the destination exists and may not be overwritten?)"
        pending = resp.status == 503 and code == E_PENDING and packet == "Fragment"
        raise _Transient(what, retry_after=_retry_after(resp), pending=pending)


class _UploadJob:
    """One upload: the client state machine of PROTOCOL.md 9.1."""

    def __init__(self, client: BITSClient, src: _Source, url: str,
                 state: _StateFile | None, reply_output: ReplyOutput) -> None:
        self.client = client
        self.src = src
        self.origin = url
        self.url = url
        self.state = state
        self.reply_output = reply_output
        self.fragment_size = client.fragment_size
        self.session_id: str | None = None
        self.host_id: str | None = None
        self.fallback_timeout: float | None = None
        self.host_failing_since: float | None = None
        self.offset = 0
        self.inflight = 0
        self.reply_url: str | None = None
        self.reply_meta: dict[str, t.Any] | None = None
        self.restarts = 0
        self.stalls = 0
        self.content_name = _content_name(src.name)
        self.conns = client._connections()
        self.exchange = _Exchanger(client, self.conns)
        self.exchange.on_connection_failure = self._connection_failed
        self.exchange.on_answer = self._answered

    # -- driver ----------------------------------------------------------------------

    def run(self) -> UploadResult:
        try:
            resumed = self._load_state()
            if not resumed:
                self._ping_and_create()
            else:
                self.exchange.need_ping = True
            while True:
                try:
                    if self.reply_url is None:
                        self._send_fragments()
                    reply = self._get_reply()
                    self._close_session()
                    break
                except _SessionLost as exc:
                    self._restart(str(exc))
            if self.state is not None:
                self.state.remove()
            assert self.session_id is not None
            return UploadResult(
                session_id=self.session_id,
                size=self.src.size,
                url=self.origin,
                reply_url=self.reply_url,
                reply_path=reply.path if reply is not None else None,
                reply_bytes=(reply.memory.getvalue()
                             if reply is not None and reply.memory is not None else None),
                reply_size=reply.size if reply is not None else None,
                restarts=self.restarts,
                fragment_size=self.fragment_size,
                final_url=self.url,
            )
        finally:
            self.conns.close()

    def _restart(self, why: str) -> None:
        self.restarts += 1
        if self.restarts > self.client.max_restarts:
            raise ServerRefused(f"{why}; the upload started over {self.restarts - 1} times "
                                "already, giving up", hresult=BG_E_SESSION_NOT_FOUND)
        log.warning("%s; starting over with a new session (restart %d)", why, self.restarts)
        self.session_id = None
        self.host_id = None
        self.fallback_timeout = None
        self.host_failing_since = None
        self.url = self.origin
        self.offset = 0
        self.reply_url = None
        self.reply_meta = None
        self.stalls = 0
        self._ping_and_create()

    # -- packets ---------------------------------------------------------------------

    def _ping_and_create(self) -> None:
        ex = self.exchange
        ex.post("Ping", lambda: self.url)
        ex.need_ping = False
        resp = ex.post("Create-Session", lambda: self.url,
                       headers=lambda: {"BITS-Supported-Protocols": PROTOCOL_GUID})
        sid = (resp.get("BITS-Session-Id") or "").strip()
        if not sid:
            raise ServerRefused("Create-Session: the Ack has no BITS-Session-Id")
        protocol = resp.get("BITS-Protocol")
        if protocol is not None and protocol.strip().lower() != PROTOCOL_GUID:
            raise ServerRefused(f"Create-Session: the server chose protocol {protocol!r}, "
                                "not the BITS 1.5 upload protocol")
        self.session_id = sid
        host_id = (resp.get("BITS-Host-Id") or "").strip()
        if host_id:
            timeout = (resp.get("BITS-Host-Id-Fallback-Timeout") or "").strip()
            self.host_id = host_id
            self.fallback_timeout = float(timeout) if timeout.isdigit() else None
            self.url = _with_host(self.origin, host_id)
            log.info("session %s: using host %s (BITS-Host-Id)", sid, host_id)
            self.exchange.need_ping = True  # Ping the host-ID host first (9.1 PING)
        self.offset = 0
        self._save()

    def _send_fragments(self) -> None:
        size = self.src.size
        while True:
            self.src.check_unchanged()
            if size == 0:  # the empty file (PROTOCOL.md A11)
                first, length, rng = 0, 0, "bytes 0--1/0"
            else:
                # Everything acknowledged already (a resumed run that lost the final
                # Ack): send the last fragment again to get the final Ack replayed.
                first = self.offset if self.offset < size else size - min(
                    self.fragment_size, size)
                length = min(self.fragment_size, size - first)
                rng = f"bytes {first}-{first + length - 1}/{size}"
            self._report("upload", self.offset)
            resp = self.exchange.post(
                "Fragment", lambda: self.url, session_id=self.session_id,
                headers=functools.partial(self._fragment_headers, rng, length),
                body=functools.partial(self._body, first, length),
                ok=(200, 413, 416),
            )
            self.inflight = 0
            if resp.status == 413:
                self._shrink(length, resp)
                continue
            received = _parse_offset(resp.get("BITS-Received-Content-Range"))
            if received is None or received > size:
                raise ServerRefused(f"Fragment: {resp.status} Ack with a missing or invalid "
                                    "BITS-Received-Content-Range "
                                    f"{resp.get('BITS-Received-Content-Range')!r}")
            if resp.status == 416:
                log.info("server holds %d bytes, not %d: continuing from there (416)",
                         received, first)
            progressed = received > self.offset
            self.offset = received
            if received == size and resp.status == 200:
                self.reply_url = (resp.get("BITS-Reply-URL") or "").strip() or None
                self._save()
                self._report("upload", size)
                return
            if progressed:
                self.stalls = 0
            else:
                self.stalls += 1
                if self.stalls > max(self.client.max_retries, 3):
                    raise RetriesExhausted(f"the server accepts no more data at offset "
                                           f"{received} ({resp.status} answers)")
            self._save()

    def _fragment_headers(self, rng: str, length: int) -> dict[str, str]:
        headers = {"Content-Range": rng, "Content-Length": str(length)}
        if self.content_name:
            headers["Content-Name"] = self.content_name
        return headers

    def _body(self, first: int, length: int) -> _Body:
        self.inflight = 0

        def on_read(n: int) -> None:
            self.inflight += n
            self._report("upload", min(self.src.size, first + self.inflight))

        return _Body(self.src.file, first, length, on_read)

    def _shrink(self, length: int, resp: _Response) -> None:
        if length <= MIN_FRAGMENT_SIZE:
            raise ServerRefused(f"Fragment: {resp.describe()}; the server refuses even "
                                f"{length}-byte fragments", status=413)
        self.fragment_size = max(MIN_FRAGMENT_SIZE, length // 2)
        log.info("server refused a %d-byte fragment (413); now sending %d bytes", length,
                 self.fragment_size)
        self._save()

    def _close_session(self) -> None:
        try:
            self.exchange.post("Close-Session", lambda: self.url, session_id=self.session_id)
        except _SessionLost as exc:
            # The completing fragment was acknowledged, so the upload is done; the docs'
            # client does not resend Close-Session for this code (A23).
            log.warning("%s; the upload had already completed", exc)

    # -- host ID ---------------------------------------------------------------------

    def _connection_failed(self, error: str) -> None:
        if self.host_id is None or self.url == self.origin:
            return
        now = time.monotonic()
        if self.host_failing_since is None:
            self.host_failing_since = now
        if self.fallback_timeout is not None and (
            now - self.host_failing_since >= self.fallback_timeout
        ):
            log.warning("host %s unreachable for %.0fs (BITS-Host-Id-Fallback-Timeout); "
                        "going back to %s", self.host_id, now - self.host_failing_since,
                        urllib.parse.urlsplit(self.origin).netloc)
            self.url = self.origin
            self.host_failing_since = None
            self.exchange.retrier.reset()
            self._save()

    def _answered(self, url: str) -> None:
        if url == self.url:
            self.host_failing_since = None

    # -- reply -----------------------------------------------------------------------

    def _get_reply(self) -> _ReplySink | None:
        if self.reply_url is None:
            return None
        url = urllib.parse.urljoin(self.url, self.reply_url.replace("\\", "/"))
        url = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(fragment=""))
        return _ReplyDownload(self, url).run()

    # -- bookkeeping -------------------------------------------------------------------

    def _report(self, phase: str, done: int, total: int | None = None) -> None:
        if self.client.progress is not None:
            self.client.progress(phase, done, self.src.size if total is None else total)

    def _load_state(self) -> bool:
        if self.state is None:
            return False
        data = self.state.load()
        if data is None:
            return False
        file = data.get("file") or {}
        same_file = (file.get("path") == self.src.path and file.get("size") == self.src.size
                     and self.src.identity is not None
                     and file.get("mtime_ns") == self.src.identity[1])
        if data.get("url") != self.origin or not same_file or not data.get("session_id"):
            log.warning("state file %s describes another upload (or the file changed); "
                        "starting a new session", self.state.path)
            if data.get("url") == self.origin and data.get("session_id"):
                self._cancel_quietly(str(data["session_id"]), str(data.get("current_url")
                                                                   or self.origin))
            self.state.remove()
            return False
        self.session_id = str(data["session_id"])
        self.host_id = data.get("host_id")
        self.fallback_timeout = data.get("host_fallback_timeout")
        self.url = str(data.get("current_url") or self.origin)
        self.offset = int(data.get("offset") or 0)
        self.fragment_size = max(MIN_FRAGMENT_SIZE,
                                 min(self.fragment_size, int(data.get("fragment_size")
                                                             or self.fragment_size)))
        self.reply_url = data.get("reply_url")
        self.reply_meta = data.get("reply")
        log.info("continuing session %s at byte %d (state file %s)", self.session_id,
                 self.offset, self.state.path)
        return True

    def _save(self) -> None:
        if self.state is None:
            return
        assert self.src.identity is not None
        self.state.save({
            "url": self.origin,
            "current_url": self.url,
            "session_id": self.session_id,
            "host_id": self.host_id,
            "host_fallback_timeout": self.fallback_timeout,
            "offset": self.offset,
            "fragment_size": self.fragment_size,
            "file": {"path": self.src.path, "size": self.src.size,
                     "mtime_ns": self.src.identity[1]},
            "reply_url": self.reply_url,
            "reply": self.reply_meta,
        })

    def _cancel_quietly(self, session_id: str, url: str) -> None:
        try:
            self.conns.request("BITS_POST", url, {"BITS-Packet-Type": "Cancel-Session",
                                                  "BITS-Session-Id": session_id})
        except _Transient:
            pass


class _ReplyDownload:
    """HEAD for the size, then ranged GETs (PROTOCOL.md 8.11), resumable."""

    def __init__(self, job: _UploadJob, url: str) -> None:
        self.job = job
        self.url = url
        self.exchange = job.exchange
        self.retrier = job.exchange.retrier
        self.validator: str | None = None

    def run(self) -> _ReplySink:
        size, validator = self._head()
        job = self.job
        resume_ok = bool(job.reply_meta and job.reply_meta.get("url") == self.url
                         and job.reply_meta.get("size") == size
                         and job.reply_meta.get("validator") == validator)
        target = job.reply_output
        if callable(target) and not isinstance(target, (str, os.PathLike)) and not hasattr(
            target, "write"
        ):
            target = target(size)
        sink = _ReplySink(target, size, resume_ok=resume_ok)
        try:
            self._remember(sink, size, validator)
            pos = sink.start
            job._report("reply", pos, size)
            while pos < size:
                end = min(size, pos + job.client.reply_chunk_size) - 1
                try:
                    pos = self._get_range(sink, pos, end, size)
                except _Transient as exc:
                    self.retrier.failed(exc, exc.retry_after)
                    continue
                except _ReplyChanged as exc:
                    log.warning("%s; downloading the reply again", exc)
                    size, validator = self._head()
                    sink.restart()
                    sink.size = size
                    self._remember(sink, size, validator)
                    pos = 0
                    continue
                self.retrier.reset()
                job._report("reply", pos, size)
            sink.finish()
            return sink
        finally:
            sink.close()

    def _remember(self, sink: _ReplySink, size: int, validator: str | None) -> None:
        self.validator = validator
        self.job.reply_meta = {"url": self.url, "size": size, "validator": validator,
                               "path": sink.path}
        self.job._save()

    def _head(self) -> tuple[int, str | None]:
        while True:
            try:
                resp = self._request("HEAD", {})
                if resp.status != 200:
                    self._fail("HEAD", resp)
                length = _parse_offset(resp.get("Content-Length"))
                if length is None:
                    raise ServerRefused("reply: the HEAD answer has no Content-Length "
                                        "(BG_E_MISSING_FILE_SIZE)", status=resp.status)
                self.retrier.reset()
                return length, resp.get("ETag") or resp.get("Last-Modified")
            except _Transient as exc:
                self.retrier.failed(exc, exc.retry_after)

    def _get_range(self, sink: _ReplySink, pos: int, end: int, size: int) -> int:
        """GET bytes ``pos..end``; returns the new position (short after a cut)."""
        written = 0
        expected = end + 1 - pos

        def consume(resp: http.client.HTTPResponse) -> None:
            nonlocal written, expected
            if resp.status != 206:
                return
            crange = _parse_content_range(resp.getheader("Content-Range"))
            if crange is None or crange[0] != pos or crange[2] != size or not (
                pos <= crange[1] <= end
            ):
                raise ServerRefused(f"reply: bad Content-Range "
                                    f"{resp.getheader('Content-Range')!r} for "
                                    f"bytes={pos}-{end} of {size}")
            expected = crange[1] + 1 - pos
            while written < expected:
                chunk = resp.read(min(65536, expected - written))
                if not chunk:
                    break
                sink.write(chunk)
                written += len(chunk)
                self.job._report("reply", pos + written, size)

        headers = {"Range": f"bytes={pos}-{end}", "Accept-Encoding": "identity"}
        if self.validator:
            headers["If-Range"] = self.validator
        try:
            resp = self._request("GET", headers, sink=consume)
        except _Transient:
            if written:
                return pos + written  # keep what arrived; the next GET continues here
            raise
        if resp.status == 206:
            if written < expected:
                if written:
                    return pos + written
                raise _Transient("reply: the range answer ended early", connection=True)
            return pos + written
        if resp.status == 200:
            # A 200 to a range request means no range support (D3) or, with If-Range,
            # that the reply changed.
            if self.validator and (resp.get("ETag") or resp.get("Last-Modified")) not in (
                None, self.validator
            ):
                raise _ReplyChanged("reply: the reply changed on the server")
            raise ServerRefused("reply: the server ignored the Range header "
                                "(BG_E_INSUFFICIENT_RANGE_SUPPORT)", status=200)
        if resp.status == 416:
            raise _ReplyChanged("reply: 416 for a range inside the reply's size")
        self._fail("GET", resp)

    def _request(self, method: str, headers: dict[str, str],
                 sink: t.Callable[[http.client.HTTPResponse], None] | None = None,
                 ) -> _Response:
        url = self.url
        for _ in range(6):
            resp = self.exchange.send(method, url, headers, sink=sink)
            location = resp.get("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                url = urllib.parse.urljoin(url, location)
                continue
            self.url = url
            return resp
        raise ServerRefused("reply: too many redirects")

    def _fail(self, method: str, resp: _Response) -> t.NoReturn:
        what = f"reply {method} {self.url}: {resp.describe()}"
        if resp.status == 401:
            raise ServerRefused(what + "; authentication failed", status=401)
        if _status_is_fatal(resp.status):
            raise ServerRefused(what, status=resp.status)
        raise _Transient(what, retry_after=_retry_after(resp))


class _ReplyChanged(Exception):
    pass


# -- helpers -------------------------------------------------------------------------


def _parse_offset(value: str | None) -> int | None:
    if value is None or not re.fullmatch(r"\s*[0-9]{1,19}\s*", value):
        return None
    return int(value)


def _parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    match = re.fullmatch(r"\s*bytes\s+([0-9]+)-([0-9]+)/([0-9]+)\s*", value or "", re.I)
    if match is None:
        return None
    first, last, total = (int(g) for g in match.groups())
    return first, last, total


def _content_name(name: str | None) -> str | None:
    """The ``Content-Name`` header: the file name if it is plain printable ASCII without
    the characters Windows forbids (PROTOCOL.md 3.1), else none."""
    if not name or len(name) > 260:
        return None
    if not all(" " <= c < "\x7f" for c in name) or any(c in name for c in '\\/:*?"<>|'):
        return None
    return name


def _quote_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/%:@!$&'()*+,;=~")


def _with_host(url: str, host: str) -> str:
    """``url`` with its host replaced by ``host``, keeping scheme, port and path (9.4)."""
    parts = urllib.parse.urlsplit(url)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), auth


def _parse_auth(auth: tuple[str, str] | str) -> tuple[str, str]:
    if isinstance(auth, str):
        user, sep, password = auth.partition(":")
        if not sep:
            raise ValueError("auth must be 'user:password' or a (user, password) tuple")
        return user, password
    user, password = auth
    return str(user), str(password)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flask-bits")
    except Exception:  # pragma: no cover - not installed
        return "0"


# -- command line ------------------------------------------------------------------


def _exit_codes_text() -> str:
    doc = __doc__ or ""
    start = doc.index("Exit codes:")
    end = doc.index("Python API::")
    lines = [line for line in doc[start:end].rstrip().splitlines() if not line.startswith("===")]
    return "\n".join(lines)


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+)\s*([kmg]?)(?:i?b)?\s*", text, re.I)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 65536, 64K, 1M)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[
        match.group(2).lower()]
    if value < MIN_FRAGMENT_SIZE:
        raise argparse.ArgumentTypeError(f"at least {MIN_FRAGMENT_SIZE} bytes (5K)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``python -m flask_bits.client`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m flask_bits.client",
        description="Upload files to a BITS upload server (Windows BITS upload protocol).",
        epilog=_exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--user", metavar="USER:PASS",
                       help="HTTP Basic credentials (prompted for when ':PASS' is missing)")
        p.add_argument("--max-retries", type=int, default=10, metavar="N",
                       help="most transient failures in a row (default 10)")
        p.add_argument("--timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                       help="longest time transient failures may go on in a row "
                            "(default 600)")
        p.add_argument("--request-timeout", type=_positive_float, default=300.0,
                       metavar="SECONDS", help="socket timeout per request (default 300)")
        p.add_argument("--retry-delay", type=_positive_float, default=0.5, metavar="SECONDS",
                       help="first backoff pause, doubled per failure (default 0.5)")
        p.add_argument("--insecure", action="store_true",
                       help="https: do not verify the server's certificate")
        p.add_argument("--cacert", metavar="FILE", help="https: trust the CAs in FILE")
        p.add_argument("--state-file", metavar="PATH",
                       help="JSON file recording the session, to continue it by re-running "
                            "the same command")
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="more messages on stderr")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="only errors on stderr, no progress")

    up = sub.add_parser(
        "upload", help="upload FILE to URL",
        description="Upload FILE to URL; a URL ending in '/' gets FILE's name appended.",
        epilog=_exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("url", metavar="URL")
    up.add_argument("file", metavar="FILE")
    up.add_argument("--fragment-size", type=_size, default=DEFAULT_FRAGMENT_SIZE,
                    metavar="SIZE", help="bytes per fragment, e.g. 64K or 4M (default 1M, "
                                         "at least 5K)")
    up.add_argument("--reply-output", metavar="PATH",
                    help="where the reply of an upload-reply job goes ('-' for stdout); "
                         "default: stdout up to 64 KiB, else FILENAME.reply in the current "
                         "folder")
    up.add_argument("--json", action="store_true",
                    help="print the result as JSON on stdout (the reply then goes to a "
                         "file unless --reply-output says otherwise)")
    common(up)

    cancel = sub.add_parser(
        "cancel", help="cancel an upload session",
        description="Send Cancel-Session for SESSION_ID (or the session in --state-file) "
                    "to its upload URL.",
        epilog=_exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cancel.add_argument("url", metavar="URL")
    cancel.add_argument("session_id", metavar="SESSION_ID", nargs="?")
    common(cancel)
    return parser


class _ProgressPrinter:
    """A tqdm bar on a terminal (if tqdm is installed), else plain lines on stderr."""

    def __init__(self, name: str, *, quiet: bool) -> None:
        self.name = name
        self.quiet = quiet
        self.bars: dict[str, t.Any] = {}
        self.last: dict[str, tuple[float, int]] = {}
        self.tqdm: t.Any = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

                self.tqdm = tqdm
            except ImportError:
                pass

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.tqdm is not None:
            bar = self.bars.get(phase)
            if bar is None:
                bar = self.bars[phase] = self.tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"{phase} {self.name}", file=sys.stderr, leave=True)
            bar.total = total
            bar.n = done
            bar.refresh()
            return
        now = time.monotonic()
        pct = 100 if total == 0 else done * 100 // total
        last_time, last_pct = self.last.get(phase, (0.0, -100))
        if pct >= last_pct + 10 or (now - last_time >= 5 and pct != last_pct) or (
            done == total and last_pct != 100
        ):
            self.last[phase] = (now, pct)
            print(f"{phase}: {_human(done)} / {_human(total)} ({pct}%)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def main(argv: t.Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.INFO if args.verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(level)
    try:
        return _run(parser, args)
    except KeyboardInterrupt:
        hint = "; re-run the same command to continue" if args.state_file else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    auth: tuple[str, str] | None = None
    if args.user is not None:
        user, sep, password = args.user.partition(":")
        if not sep:
            import getpass

            password = getpass.getpass(f"Password for {user}: ")
        auth = (user, password)
    ssl_context = None
    if args.insecure or args.cacert:
        ssl_context = ssl.create_default_context(cafile=args.cacert)
        if args.insecure:
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
    fragment_size = getattr(args, "fragment_size", DEFAULT_FRAGMENT_SIZE)
    name = os.path.basename(args.file) if args.command == "upload" else ""
    printer = _ProgressPrinter(name, quiet=args.quiet)
    try:
        client = BITSClient(
            args.url, fragment_size=fragment_size, auth=auth, timeout=args.timeout,
            max_retries=args.max_retries, progress=printer,
            request_timeout=args.request_timeout, retry_delay=args.retry_delay,
            ssl_context=ssl_context,
        )
        if args.command == "cancel":
            return _cancel(parser, client, args)
        target = client.resolve(None, name)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return _upload(client, args, target)
    except BITSClientError as exc:
        printer.close()
        print(f"error: {exc}", file=sys.stderr)
        if args.state_file and not isinstance(exc, LocalFileError):
            print(f"(the session is recorded in {args.state_file}; re-run the same "
                  "command to continue)", file=sys.stderr)
        return exc.exit_code
    finally:
        printer.close()


def _upload(client: BITSClient, args: argparse.Namespace, target: str) -> int:
    name = os.path.basename(args.file)
    reply_output: ReplyOutput
    if args.reply_output == "-":
        reply_output = sys.stdout.buffer
    elif args.reply_output:
        reply_output = args.reply_output
    else:
        default_path = os.path.abspath((name or "upload") + ".reply")

        def choose(size: int) -> t.Any:
            if size <= 64 * 1024 and not args.json:
                return sys.stdout.buffer
            return default_path

        reply_output = choose
    result = client.upload(args.file, target, state_file=args.state_file,
                           reply_output=reply_output)
    sys.stdout.flush()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif not args.quiet:
        extra = f"; reply saved to {result.reply_path}" if result.reply_path else ""
        print(f"uploaded {result.size} bytes to {result.url} (session {result.session_id})"
              f"{extra}", file=sys.stderr)
    return EXIT_OK


def _cancel(parser: argparse.ArgumentParser, client: BITSClient,
            args: argparse.Namespace) -> int:
    session_id = args.session_id
    url = None
    state = _StateFile(args.state_file) if args.state_file else None
    if session_id is None:
        data = state.load() if state is not None else None
        if data is None or not data.get("session_id"):
            parser.error("give SESSION_ID, or a --state-file that records a session")
        session_id = str(data["session_id"])
        url = str(data.get("current_url") or data.get("url") or args.url)
    try:
        known = client.cancel(url, session_id)
    except BITSClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if state is not None:
        state.remove()
    if known:
        if not args.quiet:
            print(f"cancelled session {session_id}", file=sys.stderr)
    else:
        print(f"warning: the server does not know session {session_id} (already closed, "
              "cancelled or expired)", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
