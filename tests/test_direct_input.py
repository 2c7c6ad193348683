"""Fragment bodies read straight from gunicorn's socket (flask_bits.direct_input).

The unit tests drive gunicorn's own body classes over a socket pair, so that a gunicorn
whose layout changes fails here rather than in production; the integration tests run a
real gunicorn with keep-alive connections (gthread), where a miscount of the body would
corrupt the next request on the connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import threading
import typing as t
from pathlib import Path

import pytest
import wire
from fault_apps import MiB
from fault_apps import folders_env
from fault_apps import received
from gunicorn.http.body import Body
from gunicorn.http.body import ChunkedReader
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader
from helpers import wait_until
from servers import GunicornServer

import flask_bits.server
from flask_bits import BITSMiddleware
from flask_bits.direct_input import DirectInput
from flask_bits.direct_input import direct_input


@pytest.fixture
def pair() -> t.Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(None)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def gunicorn_body(sock: socket.socket, length: int, read_ahead: bytes = b"") -> Body:
    """gunicorn's ``wsgi.input`` for a body of ``length`` bytes, ``read_ahead`` of which
    (and maybe more: a pipelined request) came in with the headers."""
    unreader = SocketUnreader(sock)
    unreader.buf.write(read_ahead)
    return Body(LengthReader(unreader, length))


def read_all(reader: DirectInput, size: int = 7000) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(size))
    while n := reader.readinto(buf):
        out += buf[:n]
    return bytes(out)


def test_read_ahead_first_then_socket_and_a_pipelined_request_stays(pair: t.Any) -> None:
    a, b = pair
    payload = os.urandom(50_000)
    nxt = b"BITS_POST /bits/x HTTP/1.1\r\n"
    body = gunicorn_body(a, len(payload), read_ahead=payload[:3000])
    environ = {"gunicorn.socket": a, "wsgi.input": body}
    reader = direct_input(environ)
    assert isinstance(reader, DirectInput)
    b.sendall(payload[3000:] + nxt)
    assert read_all(reader) == payload
    assert body.reader.length == 0 and body.failed is False
    assert body.read() == b""  # what gunicorn's drain sees: nothing left of this body
    assert body.reader.unreader.read() == nxt  # the next request is untouched


def test_a_short_body_entirely_in_the_read_ahead(pair: t.Any) -> None:
    a, _ = pair
    nxt = b"BITS_POST /bits/y HTTP/1.1\r\nHost: x\r\n\r\n"
    body = gunicorn_body(a, 10, read_ahead=b"0123456789" + nxt)
    reader = direct_input({"gunicorn.socket": a, "wsgi.input": body})
    assert reader is not None
    assert read_all(reader, 4) == b"0123456789"  # never touched the (empty) socket
    assert body.reader.unreader.read() == nxt


@pytest.mark.parametrize("python_timeout", [None, 0.05])
def test_read_ahead_is_handed_out_without_waiting_for_more(
    pair: t.Any, python_timeout: float | None
) -> None:
    a, b = pair
    a.settimeout(python_timeout)
    body = gunicorn_body(a, 10_000, read_ahead=b"h" * 1000)
    reader = direct_input({"gunicorn.socket": a, "wsgi.input": body})
    assert reader is not None
    buf = memoryview(bytearray(8192))
    assert reader.readinto(buf) == 1000  # nothing else has arrived: no blocking read
    assert body.failed is False and body.reader.length == 9000
    b.sendall(b"r" * 9000)
    assert read_all(reader) == b"r" * 9000


def test_what_the_application_already_read_is_not_handed_out_again(pair: t.Any) -> None:
    a, b = pair
    payload = os.urandom(20_000)
    body = gunicorn_body(a, len(payload), read_ahead=payload[:5000])
    assert body.read(100) == payload[:100]  # gunicorn keeps the rest of its chunk
    reader = direct_input({"gunicorn.socket": a, "wsgi.input": body})
    assert reader is not None
    b.sendall(payload[5000:])
    assert read_all(reader) == payload[100:]
    assert body.reader.length == 0


def test_peer_gone_mid_body_tells_gunicorn_to_close(pair: t.Any) -> None:
    a, b = pair
    body = gunicorn_body(a, 10_000)
    reader = direct_input({"gunicorn.socket": a, "wsgi.input": body})
    assert reader is not None
    b.sendall(b"x" * 4000)
    b.close()
    assert read_all(reader) == b"x" * 4000
    assert body.reader.length == 6000
    assert body.failed is True


def test_stalled_read_raises_and_tells_gunicorn_to_close(pair: t.Any) -> None:
    a, _ = pair
    a.settimeout(0.05)  # nothing is ever sent: the read must time out
    body = gunicorn_body(a, 10_000)
    reader = direct_input({"gunicorn.socket": a, "wsgi.input": body})
    assert reader is not None
    with pytest.raises(TimeoutError):
        reader.readinto(memoryview(bytearray(100)))
    assert body.failed is True
    assert body.reader.length == 10_000


class _TLSLike(socket.socket):
    pass


def test_not_taken_when_it_cannot_be_safe(pair: t.Any) -> None:
    a, _ = pair
    body = gunicorn_body(a, 10)
    # Not gunicorn (werkzeug's server, the test client).
    assert direct_input({"wsgi.input": io.BytesIO(b"x" * 10)}) is None
    assert direct_input({"werkzeug.socket": a, "wsgi.input": body}) is None
    # A socket subclass (ssl.SSLSocket is one): its bytes are not the body's bytes.
    tls = _TLSLike(fileno=os.dup(a.fileno()))
    try:
        assert direct_input({"gunicorn.socket": tls, "wsgi.input": body}) is None
    finally:
        tls.close()
    # A chunked body: its length is not known up front.
    chunked = Body(ChunkedReader(None, SocketUnreader(a)))
    assert direct_input({"gunicorn.socket": a, "wsgi.input": chunked}) is None
    # Another socket than the body's.
    other = gunicorn_body(a, 10)
    c, d = socket.socketpair()
    with c, d:
        assert direct_input({"gunicorn.socket": c, "wsgi.input": other}) is None
    # A gunicorn without the "failed" flag could not be told to drop the connection.
    del body.failed
    assert direct_input({"gunicorn.socket": a, "wsgi.input": body}) is None


@pytest.mark.parametrize("enabled", [True, False])
def test_server_streams_a_gunicorn_body(pair: t.Any, tmp_path: Path, monkeypatch: t.Any,
                                        enabled: bool) -> None:
    """The Fragment handler takes the direct path when it is on (and only then), and the
    file holds exactly the body, whatever arrived with the headers."""
    taken: list[object] = []

    def spy(environ: t.Mapping[str, t.Any]) -> DirectInput | None:
        taken.append(direct_input(environ))
        return t.cast(DirectInput | None, taken[-1])

    monkeypatch.setattr(flask_bits.server, "direct_input", spy)
    app = BITSMiddleware(lambda e, s: [], config={
        "BITS_UPLOAD_FOLDER": str(tmp_path / "up"), "BITS_SESSION_FOLDER": str(tmp_path / "s"),
        "BITS_DIRECT_INPUT": enabled})

    def call(packet: str, body: t.Any = None, length: int = 0, **headers: str) -> dict[str, str]:
        environ = {"REQUEST_METHOD": "BITS_POST", "PATH_INFO": "/bits/f.bin",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                   "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
                   "CONTENT_LENGTH": str(length), "HTTP_BITS_PACKET_TYPE": packet,
                   "wsgi.input": body if body is not None else io.BytesIO(),
                   "HTTP_BITS_SUPPORTED_PROTOCOLS": wire.PROTOCOL}
        if body is not None:
            environ["gunicorn.socket"] = a
        environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
        out: dict[str, str] = {}

        def start_response(status: str, hdrs: list[tuple[str, str]], exc: t.Any = None) -> None:
            out.update(dict(hdrs), status=status)

        b"".join(app(environ, start_response))
        return out

    a, b = pair
    sid = call("Create-Session")["BITS-Session-Id"]
    payload = os.urandom(3 * MiB + 17)
    body = gunicorn_body(a, len(payload), read_ahead=payload[:8192])
    sender = threading.Thread(target=b.sendall, args=(payload[8192:] + b"NEXT",))
    sender.start()
    ack = call("Fragment", body, len(payload), BITS_SESSION_ID=sid,
               CONTENT_RANGE=f"bytes 0-{len(payload) - 1}/{len(payload)}")
    sender.join(timeout=30)
    assert ack["status"].startswith("200"), ack
    assert ack["BITS-Received-Content-Range"] == str(len(payload))
    assert (tmp_path / "up" / "f.bin").read_bytes() == payload
    assert body.reader.unreader.read() == b"NEXT"
    # Off, the handler does not even look; on, it took the direct path.
    assert [r is not None for r in taken] == ([True] if enabled else [])


def _raw_fragment(path: str, sid: str, data: bytes, first: int, total: int) -> bytes:
    head = (f"BITS_POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"BITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n"
            f"Content-Range: bytes {first}-{first + len(data) - 1}/{total}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def _responses(stream: t.BinaryIO, count: int) -> list[wire.Reply]:
    """Read ``count`` bodiless answers off one connection's reader, in order."""
    replies = []
    for _ in range(count):
        status_line = stream.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers.get("content-length") == "0", headers
        assert headers.get("connection", "").lower() != "close", headers
        replies.append(wire.Reply(int(status_line.split()[1]), headers))
    return replies


@pytest.mark.integration
@pytest.mark.parametrize("direct", ["true", "false"])
def test_keep_alive_connection_with_pipelined_fragments(tmp_path: Path, direct: str) -> None:
    """Fragments of many sizes (some inside gunicorn's read-ahead, one overlapping an
    earlier one, so partly skipped) on ONE keep-alive connection, several sent in one
    go: every answer is right, and the file is exactly the source."""
    sizes = [1, 10, 5000, 8191, 65_536, 65_537, MiB - 1, MiB + 3, 2 * MiB + 5, 100]
    total = sum(sizes)
    payload = os.urandom(total)
    env = folders_env(tmp_path, BITS_DIRECT_INPUT=direct)
    path = "/bits/keepalive.bin"
    with GunicornServer(env=env, workers=1, worker_class="gthread", threads=2,
                        log_path=tmp_path / "gunicorn.log") as server:
        sid = wire.create_session(server.url, path)
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock, \
                sock.makefile("rb") as answers:
            offset, expected = 0, []
            batch = b""
            for i, size in enumerate(sizes):
                first = offset - 3 if i == 6 else offset  # a retransmitted overlap
                batch += _raw_fragment(path, sid, payload[first:offset + size], first, total)
                offset += size
                expected.append(offset)
                if i % 3 == 2 or i == len(sizes) - 1:  # three requests per write
                    sock.sendall(batch)
                    batch = b""
            replies = _responses(answers, len(sizes))
            ping = b"BITS_POST /bits/p HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n" \
                   b"Content-Length: 0\r\n\r\n"
            sock.sendall(ping)
            assert _responses(answers, 1)[0].status == 200
        assert [r.status for r in replies] == [200] * len(sizes), replies
        assert [received(r) for r in replies] == expected
        close = wire.bits_post(server.url, path, "Close-Session", session_id=sid)
        assert close.status == 200
    digest = hashlib.sha256((tmp_path / "uploads" / "keepalive.bin").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(payload).hexdigest()


@pytest.mark.integration
def test_client_gone_mid_fragment_keeps_what_arrived(tmp_path: Path) -> None:
    """A client that dies mid-body on a keep-alive worker: what arrived is kept and
    acknowledged on the next connection, the rest resumes from there."""
    total = 3 * MiB
    payload = os.urandom(total)
    path = "/bits/gone.bin"
    with GunicornServer(env=folders_env(tmp_path), workers=1, worker_class="gthread",
                        threads=2, log_path=tmp_path / "gunicorn.log") as server:
        sid = wire.create_session(server.url, path)
        sent = MiB + 12345
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(_raw_fragment(path, sid, payload, 0, total)[:-(total - sent)])
        # Where the server stands: a one-byte fragment beyond N gets 416 telling N.
        with contextlib.closing(wire.connect(server.url)) as conn:

            def acknowledged() -> bool:
                probe = wire.fragment(conn, path, sid, payload[-1:], total - 1, total)
                assert probe.status == 416, probe
                return received(probe) == sent

            wait_until(acknowledged, 30, "the bytes that arrived to be acknowledged")
            reply = wire.fragment(conn, path, sid, payload[sent:], sent, total)
            assert reply.status == 200 and received(reply) == total, reply
        assert wire.bits_post(server.url, path, "Close-Session", session_id=sid).status == 200
    assert (tmp_path / "uploads" / "gone.bin").read_bytes() == payload
