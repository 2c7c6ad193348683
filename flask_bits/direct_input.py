"""Fragment bodies read straight from gunicorn's socket, without gunicorn's copies.

gunicorn's ``wsgi.input`` hands out every body chunk as a new ``bytes`` object that has
been through two ``BytesIO`` buffers and a slice on the way: for 1 MiB fragments that is
more CPU than receiving the bytes and writing them to disk together. For a body of
known length on a plain TCP socket, :func:`direct_input` returns a reader whose
``readinto`` first hands out what gunicorn already buffered (read ahead with the
headers), then reads the rest with ``recv_into`` into the caller's reusable buffer. It
keeps gunicorn's own count of the body in step, so that after the response the
connection is reused (or closed) exactly as if gunicorn had read the body itself; if a
read fails or the peer goes away, gunicorn is told to close the connection.

This relies on the layout of ``gunicorn.http.body`` (``Body.buf``, ``Body.reader``,
``LengthReader.length``, ``Unreader.buf``, ``SocketUnreader.sock``, ``Body.failed``),
checked before use: with any other server, a TLS socket, a chunked body or a gunicorn
laid out otherwise, :func:`direct_input` answers ``None`` and the caller reads
``wsgi.input`` as usual. ``BITS_DIRECT_INPUT = False`` turns it off.
"""

from __future__ import annotations

import io
import os
import socket
import typing as t

__all__ = ["DirectInput", "direct_input"]


class DirectInput:
    """A ``readinto`` reader over the rest of one gunicorn request body."""

    __slots__ = ("_body", "_reader", "_sock", "_prefix", "_pos")

    def __init__(self, body: t.Any, reader: t.Any, sock: socket.socket, prefix: bytes) -> None:
        self._body = body
        self._reader = reader
        self._sock = sock
        self._prefix = prefix
        self._pos = 0

    def readinto(self, buf: memoryview) -> int:
        """Fill the start of ``buf`` with the next body bytes; 0 at the end of the body.

        Like ``socket.recv_into``, a stalled read raises (``BlockingIOError`` under
        ``SO_RCVTIMEO``, ``TimeoutError`` under a Python timeout) and may return fewer
        bytes than asked for.
        """
        n = 0
        if self._pos < len(self._prefix):
            n = min(len(buf), len(self._prefix) - self._pos)
            buf[:n] = self._prefix[self._pos : self._pos + n]
            self._pos += n
        reader = self._reader
        left = reader.length
        if left <= 0 or n == len(buf):
            return n
        try:
            if n:  # top up with what has already arrived, without waiting for more
                got = self._sock.recv_into(buf[n:], min(len(buf) - n, left), socket.MSG_DONTWAIT)
            else:
                got = self._sock.recv_into(buf, min(len(buf), left))
        except (BlockingIOError, TimeoutError):
            if n:  # nothing more yet (a socket with a Python timeout polls first)
                return n  # the next call waits for it
            self._body.failed = True
            raise
        except BaseException:
            self._body.failed = True  # where this body ends on the wire is now unknown
            raise
        if not got:
            self._body.failed = True  # the peer closed the connection mid-body
        reader.length = left - got
        return n + got


def direct_input(environ: t.Mapping[str, t.Any]) -> DirectInput | None:
    """A :class:`DirectInput` for this request's body, or ``None`` if it cannot be had
    safely (not gunicorn, not a plain TCP socket, not a body of known length)."""
    sock: socket.socket = environ.get("gunicorn.socket")  # type: ignore[assignment]
    if type(sock) is not socket.socket:
        return None  # TLS (ssl.SSLSocket) or another server
    body: t.Any = environ.get("wsgi.input")
    if type(body).__module__ != "gunicorn.http.body" or type(body).__name__ != "Body":
        return None
    reader: t.Any = getattr(body, "reader", None)
    if type(reader).__name__ != "LengthReader" or type(getattr(reader, "length", None)) is not int:
        return None
    unreader: t.Any = getattr(reader, "unreader", None)
    if getattr(unreader, "sock", None) is not sock:
        return None
    body_buf, ahead = getattr(body, "buf", None), getattr(unreader, "buf", None)
    if type(body_buf) is not io.BytesIO or type(ahead) is not io.BytesIO:
        return None
    if not hasattr(body, "failed"):
        return None  # a gunicorn that could not be told to drop a broken connection
    # Take what gunicorn already holds of this body: its own buffer (the application's
    # earlier short reads), then its read-ahead, up to the end of this body; anything
    # beyond (a pipelined next request) stays with gunicorn.
    prefix = body_buf.getvalue()
    body.buf = io.BytesIO()
    buffered = ahead.getvalue()
    take = min(len(buffered), reader.length)
    if take:
        unreader.buf = io.BytesIO()
        unreader.buf.write(buffered[take:])
        unreader.buf.seek(0, os.SEEK_END)
        reader.length -= take
        prefix += buffered[:take]
    return DirectInput(body, reader, sock, prefix)
