"""The lean BITS upload client every benchmark variant is driven by.

One keep-alive :class:`http.client.HTTPConnection` per session; fragment bodies are read
from a pre-generated file with ``os.preadv`` into one reusable buffer and sent through a
``memoryview`` (no per-fragment allocation, no big buffers). Headers are written with
``putrequest``/``putheader`` so nothing is buffered or re-encoded behind our back.
"""

from __future__ import annotations

import http.client
import os
import time
import typing as t

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
#: Client read/send buffer (one per connection).
BUF_SIZE = 1024 * 1024


class UploadError(RuntimeError):
    pass


class Client:
    """One BITS client connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, *, timeout: float = 120.0, buf_size: int = BUF_SIZE) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.buf = bytearray(buf_size)
        self.view = memoryview(self.buf)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(
        self,
        path: str,
        packet: str,
        *,
        session_id: str | None = None,
        headers: t.Sequence[tuple[str, str]] = (),
        fd: int | None = None,
        offset: int = 0,
        length: int = 0,
    ) -> tuple[int, http.client.HTTPResponse]:
        """Send one ``BITS_POST``; the body is ``length`` bytes of ``fd`` from ``offset``."""
        conn = self.conn
        for attempt in (0, 1):
            try:
                conn.putrequest("BITS_POST", path, skip_accept_encoding=True)
                conn.putheader("BITS-Packet-Type", packet)
                if session_id is not None:
                    conn.putheader("BITS-Session-Id", session_id)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.putheader("Content-Length", str(length))
                conn.endheaders()
                if length:
                    assert fd is not None
                    self._send_body(fd, offset, length)
                resp = conn.getresponse()
                resp.read()
                return resp.status, resp
            except (ConnectionError, http.client.RemoteDisconnected,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                # The server closed an idle keep-alive connection; retry once on a new one.
                conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_body(self, fd: int, offset: int, length: int) -> None:
        view, size, sock = self.view, len(self.buf), self.conn.sock
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [view[: min(size, end - offset)]], offset)
            if n <= 0:
                raise UploadError("the source file is shorter than the upload")
            sock.sendall(view[:n])
            offset += n

    # -- BITS packets -------------------------------------------------------------------

    def create_session(self, path: str) -> str:
        status, resp = self.post(path, "Create-Session",
                                 headers=[("BITS-Supported-Protocols", PROTOCOL)])
        sid = resp.getheader("BITS-Session-Id")
        if status != 200 or not sid:
            raise UploadError(f"Create-Session answered {status} "
                              f"{resp.getheader('BITS-Error-Code')}")
        return sid

    def close_session(self, path: str, sid: str) -> None:
        status, resp = self.post(path, "Close-Session", session_id=sid)
        if status != 200:
            raise UploadError(f"Close-Session answered {status} "
                              f"{resp.getheader('BITS-Error-Code')}")

    def fragment(
        self, path: str, sid: str, fd: int, first: int, length: int, total: int,
        *, source_offset: int = 0,
    ) -> int:
        """Send bytes ``first .. first+length-1`` (read from ``fd`` at ``source_offset +
        first``); return the server's next offset."""
        status, resp = self.post(
            path, "Fragment", session_id=sid, fd=fd, offset=source_offset + first,
            length=length,
            headers=[("Content-Range", f"bytes {first}-{first + length - 1}/{total}")],
        )
        if status != 200:
            raise UploadError(f"Fragment {first}-{first + length - 1}/{total} answered "
                              f"{status} {resp.getheader('BITS-Error-Code')} "
                              f"{resp.getheader('BITS-Error-Message')}")
        received = resp.getheader("BITS-Received-Content-Range")
        return int(received) if received is not None else first + length


class UploadResult(t.NamedTuple):
    seconds: float  #: first fragment sent .. last fragment acknowledged
    fragments: int
    sent: int  #: bytes acknowledged
    complete: bool  #: False: stopped at ``max_seconds`` and cancelled


def upload(
    client: Client,
    path: str,
    fd: int,
    total: int,
    fragment_size: int,
    *,
    close: bool = True,
    deadline: float | None = None,
    max_seconds: float | None = None,
) -> UploadResult:
    """Create a session, send ``total`` bytes of ``fd`` in order, close it.

    The timed span is the fragment loop only (Create/Close are w5's business).
    ``deadline`` (a ``time.monotonic()`` value) bounds the loop with an error;
    ``max_seconds`` stops it early (the session is then cancelled): the caller gets a rate
    over the fragments that were sent.
    """
    sid = client.create_session(path)
    offset = fragments = 0
    started = time.perf_counter()
    stop_at = started + max_seconds if max_seconds else None
    while offset < total:
        if deadline is not None and time.monotonic() > deadline:
            raise UploadError(f"upload of {path} did not finish before its deadline")
        if stop_at is not None and time.perf_counter() > stop_at:
            seconds = time.perf_counter() - started
            status, _ = client.post(path, "Cancel-Session", session_id=sid)
            if status != 200:
                raise UploadError(f"Cancel-Session answered {status}")
            return UploadResult(seconds, fragments, offset, False)
        length = min(fragment_size, total - offset)
        offset = client.fragment(path, sid, fd, offset, length, total)
        fragments += 1
    seconds = time.perf_counter() - started
    if close:
        client.close_session(path, sid)
    return UploadResult(seconds, fragments, offset, True)
