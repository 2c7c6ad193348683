"""A few lines of raw BITS over HTTP for integration tests (http.client, no magic).

The product's full client is :mod:`flask_bits.client`; this module stays minimal so that
tests can send exactly the packets they mean, including broken ones.
"""

from __future__ import annotations

import contextlib
import http.client
import typing as t
import urllib.parse

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"


class Reply(t.NamedTuple):
    status: int
    headers: dict[str, str]

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def connect(base_url: str, timeout: float = 60.0) -> http.client.HTTPConnection:
    """A keep-alive connection to ``base_url`` (``http://127.0.0.1:port``)."""
    parts = urllib.parse.urlsplit(base_url)
    assert parts.hostname is not None
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


#: A keep-alive connection, or a base URL for a one-shot connection closed afterwards.
Target = http.client.HTTPConnection | str


def bits_post(
    conn: Target,
    path: str,
    packet_type: str | None,
    *,
    session_id: str | None = None,
    body: bytes | t.BinaryIO = b"",
    headers: t.Mapping[str, str] | None = None,
) -> Reply:
    """Send one ``BITS_POST`` and read the whole answer."""
    if isinstance(conn, str):
        with contextlib.closing(connect(conn)) as fresh:
            return bits_post(fresh, path, packet_type, session_id=session_id, body=body,
                             headers=headers)
    hdrs: dict[str, str] = {}
    if packet_type is not None:
        hdrs["BITS-Packet-Type"] = packet_type
    if session_id is not None:
        hdrs["BITS-Session-Id"] = session_id
    if packet_type and packet_type.lower() == "create-session":
        hdrs["BITS-Supported-Protocols"] = PROTOCOL
    if isinstance(body, bytes):
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    conn.request("BITS_POST", path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    assert data == b"", "an Ack never has a body"
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()})


def create_session(conn: Target, path: str) -> str:
    reply = bits_post(conn, path, "Create-Session")
    assert reply.status == 200, reply
    sid = reply.get("BITS-Session-Id")
    assert sid
    return sid


def fragment(conn: Target, path: str, sid: str, data: bytes, first: int, total: int) -> Reply:
    """Send bytes ``first .. first+len(data)-1`` of a ``total``-byte file."""
    rng = f"bytes {first}-{first + len(data) - 1}/{total}" if data else f"bytes 0--1/{total}"
    return bits_post(conn, path, "Fragment", session_id=sid, body=data,
                     headers={"Content-Range": rng})


def upload(
    base_url: str, path: str, data: bytes, fragment_size: int = 1 << 20, *, close: bool = True
) -> Reply:
    """Upload ``data`` in order; return the Ack of the completing fragment."""
    conn = connect(base_url)
    try:
        sid = create_session(conn, path)
        offset, last = 0, None
        while offset < len(data) or last is None:
            chunk = data[offset : offset + fragment_size]
            last = fragment(conn, path, sid, chunk, offset, len(data))
            assert last.status == 200, last
            offset = int(last.get("BITS-Received-Content-Range") or 0)
        if close:
            assert bits_post(conn, path, "Close-Session", session_id=sid).status == 200
        return last
    finally:
        conn.close()
