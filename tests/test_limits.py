"""Limits against abuse (SECURITY.md "Resource exhaustion"; PROTOCOL.md S9, 7.3, 10, T5)
and the logging contract.

Session limits per identified owner and in total, fragment and upload size limits,
header sizes, session expiry and tombstone expiry (``store.cleanup`` and
``flask bits cleanup``), and one INFO line per packet on the ``flask_bits`` logger, with
client mistakes never logged at ERROR.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from security_apps import assert_ack
from security_apps import bits_app
from security_apps import create
from security_apps import fragment
from security_apps import post

from flask_bits import store as store_module
from flask_bits.store import SessionStore

NOT_FOUND = "0x8020001F"
TOO_LARGE = "0x80200020"
TOO_MANY_SESSIONS = "0x80070045"
E_INVALIDARG = "0x80070057"
ERROR_HEADERS = ("BITS-Error-Code", "BITS-Error", "BITS-Error-Context")


def owner_header(request: t.Any) -> str | None:
    """The test apps' ``identify``: the principal named in ``X-Owner`` (or anonymous)."""
    return request.headers.get("X-Owner") or None


def as_owner(owner: str | None) -> dict[str, t.Any]:
    return {"headers": [("X-Owner", owner)]} if owner else {}


@pytest.fixture
def make(tmp_path: Path) -> t.Callable[..., t.Any]:
    def factory(**config: t.Any) -> t.Any:
        return bits_app(tmp_path, identify=owner_header, **config)

    return factory


def store_of(app: t.Any) -> SessionStore:
    return t.cast(SessionStore, app.extensions["bits"]["bits"].store)


def close(app: t.Any, path: str, sid: str, owner: str | None = None) -> t.Any:
    return post(app, path, "Close-Session", session_id=sid, **as_owner(owner))


# -- session limits --------------------------------------------------------------------------


def test_session_limit_per_identified_owner(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_SESSION_LIMIT=3)
    alice = [create(app, f"/bits/a{i}.bin", **as_owner("alice")) for i in range(3)]
    refused = post(app, "/bits/a3.bin", "Create-Session", **as_owner("alice"))
    assert_ack(refused, 503, TOO_MANY_SESSIONS)
    assert "BITS-Session-Id" not in refused.headers
    # Other owners have their own budget.
    bob = [create(app, f"/bits/b{i}.bin", **as_owner("bob")) for i in range(3)]
    assert_ack(post(app, "/bits/b3.bin", "Create-Session", **as_owner("bob")), 503,
               TOO_MANY_SESSIONS)
    # Closing (or cancelling) one of alice's sessions makes room for exactly one more.
    assert_ack(close(app, "/bits/a0.bin", alice[0], "alice"), 200)
    create(app, "/bits/a3.bin", **as_owner("alice"))
    assert_ack(post(app, "/bits/a4.bin", "Create-Session", **as_owner("alice")), 503,
               TOO_MANY_SESSIONS)
    assert_ack(post(app, "/bits/b1.bin", "Cancel-Session", session_id=bob[1],
                    **as_owner("bob")), 200)
    create(app, "/bits/b3.bin", **as_owner("bob"))
    # A refused Create-Session left nothing behind.
    assert len(list(store_of(app).iter_states())) == 6


def test_finished_uploads_still_count_until_closed(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_SESSION_LIMIT=1)
    sid = create(app, "/bits/done.bin", **as_owner("alice"))
    assert_ack(fragment(app, "/bits/done.bin", sid, b"abc", 0, 3, **as_owner("alice")), 200)
    assert_ack(post(app, "/bits/next.bin", "Create-Session", **as_owner("alice")), 503,
               TOO_MANY_SESSIONS)
    assert_ack(close(app, "/bits/done.bin", sid, "alice"), 200)
    create(app, "/bits/next.bin", **as_owner("alice"))


def test_expired_sessions_free_their_owners_budget(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_SESSION_LIMIT=1)
    create(app, "/bits/old.bin", **as_owner("alice"))
    store_of(app).cleanup(now=time.time() + 15 * 24 * 3600, tombstone_timeout=86400)
    create(app, "/bits/new.bin", **as_owner("alice"))


def test_max_sessions_is_a_global_cap(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_MAX_SESSIONS=3, BITS_SESSION_LIMIT=None)
    sids = [create(app, f"/bits/s{i}.bin", **as_owner(owner))
            for i, owner in enumerate(["alice", "bob", None])]
    for owner in ("alice", "carol", None):
        response = post(app, "/bits/s3.bin", "Create-Session", **as_owner(owner))
        assert_ack(response, 503, TOO_MANY_SESSIONS)
    assert_ack(close(app, "/bits/s1.bin", sids[1], "bob"), 200)
    create(app, "/bits/s3.bin", **as_owner("carol"))
    assert_ack(post(app, "/bits/s4.bin", "Create-Session"), 503, TOO_MANY_SESSIONS)
    assert store_of(app).count() == 3


def test_racing_creates_cannot_exceed_the_global_cap(make: t.Callable[..., t.Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Create-Session requests that check the session count at the same moment must
    not both get in past BITS_MAX_SESSIONS (the per-owner limit already guarantees this:
    "two racing creators may both be refused, never both let in past the limit")."""
    app = make(BITS_MAX_SESSIONS=2, BITS_SESSION_LIMIT=None)
    create(app, "/bits/first.bin")
    barrier = threading.Barrier(2, timeout=5)
    original = SessionStore.count
    local = threading.local()

    def synchronised_count(self: SessionStore) -> int:
        value = original(self)
        if not getattr(local, "done", False):  # line the two creators up once
            local.done = True
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass  # the code under test serialises creators: nothing to line up
        return value

    monkeypatch.setattr(SessionStore, "count", synchronised_count)
    results: dict[str, int] = {}

    def creator(name: str) -> None:
        results[name] = post(app, f"/bits/{name}.bin", "Create-Session").status_code

    threads = [threading.Thread(target=creator, args=(name,)) for name in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == ["x", "y"]
    assert original(store_of(app)) <= 2, results
    assert sorted(results.values()) in ([200, 503], [503, 503]), results


# -- size limits --------------------------------------------------------------------------------


def test_fragment_size_limit_is_413_without_error_headers(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_MAX_FRAGMENT_SIZE=5 * 1024)
    sid = create(app, "/bits/big.bin")
    data = bytes(range(256)) * 24  # 6 KiB
    response = fragment(app, "/bits/big.bin", sid, data[: 5 * 1024 + 1], 0, len(data))
    assert_ack(response, 413)
    for name in ERROR_HEADERS:
        assert name not in response.headers
    assert response.headers.get("BITS-Received-Content-Range") in (None, "0")
    assert store_of(app).peek(sid).received == 0
    # The client shrinks its fragments and carries on (never below 5 KB, 9.3).
    assert_ack(fragment(app, "/bits/big.bin", sid, data[: 5 * 1024], 0, len(data)), 200)
    assert_ack(fragment(app, "/bits/big.bin", sid, data[5 * 1024:], 5 * 1024, len(data)), 200)
    assert (Path(app.config["BITS_UPLOAD_FOLDER"]) / "big.bin").read_bytes() == data


def test_fragment_size_limit_is_checked_before_reading_the_body(
        make: t.Callable[..., t.Any]) -> None:
    """A huge Content-Length with a tiny body: refused by its declared size (413)."""
    app = make(BITS_MAX_FRAGMENT_SIZE=5 * 1024)
    sid = create(app, "/bits/huge.bin")
    length = 2**40
    response = post(app, "/bits/huge.bin", "Fragment", b"tiny", session_id=sid,
                    content_length=str(length),
                    headers=[("Content-Range", f"bytes 0-{length - 1}/{length}")])
    assert_ack(response, 413)
    assert store_of(app).peek(sid).received == 0


@pytest.mark.parametrize(("total", "status", "error"), [
    (1000, 200, None), (1001, 500, TOO_LARGE), (10**18, 500, TOO_LARGE),
    (2**63 - 1, 500, TOO_LARGE),
])
def test_max_upload_size(make: t.Callable[..., t.Any], total: int, status: int,
                         error: str | None) -> None:
    app = make(BITS_MAX_UPLOAD_SIZE=1000)
    sid = create(app, "/bits/upload.bin")
    response = fragment(app, "/bits/upload.bin", sid, b"0123456789", 0, total)
    assert_ack(response, status, error)
    assert store_of(app).peek(sid).received == (10 if status == 200 else 0)
    if status != 200:
        assert store_of(app).peek(sid).total is None  # nothing was learned from it


def test_max_upload_size_of_zero_allows_only_empty_files(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_MAX_UPLOAD_SIZE=0)
    sid = create(app, "/bits/empty.bin")
    assert_ack(post(app, "/bits/empty.bin", "Fragment", session_id=sid,
                    headers=[("Content-Range", "bytes */0")]), 200)
    sid = create(app, "/bits/one.bin")
    assert_ack(fragment(app, "/bits/one.bin", sid, b"x", 0, 1), 500, TOO_LARGE)


@pytest.mark.parametrize(("size", "status"), [(4096, 200), (4097, 400), (100_000, 400)])
@pytest.mark.parametrize("name", ["X-Anything", "BITS-Session-Id", "Content-Range",
                                  "Content-Name", "User-Agent"])
def test_header_values_over_4kb_are_400(make: t.Callable[..., t.Any], name: str, size: int,
                                        status: int) -> None:
    app = make()
    sid = create(app, "/bits/h.bin")
    value = {"BITS-Session-Id": sid + " " * (size - len(sid)),
             "Content-Range": "bytes 0-4/5" + " " * (size - 11)}.get(name, "a" * size)
    headers = {"BITS-Session-Id": sid, "Content-Range": "bytes 0-4/5", name: value}
    response = post(app, "/bits/h.bin", "Fragment", b"hello", headers=list(headers.items()))
    assert_ack(response, status, None if status == 200 else E_INVALIDARG)
    assert store_of(app).peek(sid) is None or store_of(app).peek(sid).received == (
        5 if status == 200 else 0)


# -- session expiry and cleanup ------------------------------------------------------------------


class _Clock:
    """``flask_bits.store``'s view of ``time``, ``offset`` seconds in the future."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def time_ns(self) -> int:
        return time.time_ns() + int(self.offset * 1e9)

    def __getattr__(self, name: str) -> t.Any:
        return getattr(time, name)


def test_expired_session_is_removed_by_store_cleanup(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_SESSION_TIMEOUT=3600)
    store = store_of(app)
    sid = create(app, "/bits/idle.bin")
    assert_ack(fragment(app, "/bits/idle.bin", sid, b"abc", 0, 6), 200)
    # Not yet idle for the whole timeout: kept.
    assert store.cleanup(now=time.time() + 3000, tombstone_timeout=86400) == []
    assert store.peek(sid) is not None
    removed = store.cleanup(now=time.time() + 3601, tombstone_timeout=86400)
    assert ("session", sid) in removed
    assert store.peek(sid) is None
    assert_ack(fragment(app, "/bits/idle.bin", sid, b"def", 3, 6), 500, NOT_FOUND)
    # No tombstone for an expired session: Close and Cancel are unknown, too, so the
    # client starts over (PROTOCOL.md 10).
    assert_ack(close(app, "/bits/idle.bin", sid), 500, NOT_FOUND)
    assert not (Path(app.config["BITS_UPLOAD_FOLDER"]) / "idle.bin").exists()


def test_activity_resets_the_idle_timer(make: t.Callable[..., t.Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app = make(BITS_SESSION_TIMEOUT=3600)
    store = store_of(app)
    sid = create(app, "/bits/busy.bin")
    monkeypatch.setattr(store_module, "time", _Clock(3000))
    assert_ack(fragment(app, "/bits/busy.bin", sid, b"abc", 0, 6), 200)  # touched at +3000
    assert store.cleanup(now=time.time() + 3601, tombstone_timeout=86400) == []
    assert store.cleanup(now=time.time() + 6601, tombstone_timeout=86400) != []
    assert store.peek(sid) is None


def test_flask_bits_cleanup_command_expires_sessions(make: t.Callable[..., t.Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    app = make(BITS_SESSION_TIMEOUT=60)
    sid = create(app, "/bits/cli.bin")
    assert_ack(fragment(app, "/bits/cli.bin", sid, b"abc", 0, 6), 200)
    keep = create(app, "/bits/fresh.bin")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0, result.output
    assert sid not in result.output  # not idle long enough yet
    monkeypatch.setattr(store_module, "time", _Clock(61))
    assert_ack(fragment(app, "/bits/fresh.bin", keep, b"x", 0, 2), 200)  # active at +61
    result = runner.invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0, result.output
    assert f"removed session {sid}" in result.output
    assert keep not in result.output
    monkeypatch.undo()
    assert_ack(fragment(app, "/bits/cli.bin", sid, b"def", 3, 6), 500, NOT_FOUND)
    assert_ack(fragment(app, "/bits/fresh.bin", keep, b"y", 1, 2), 200)
    # Idempotent.
    result = runner.invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0 and "removed session" not in result.output


def test_tombstones_expire(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_TOMBSTONE_TIMEOUT=600)
    store = store_of(app)
    sid = create(app, "/bits/t.bin")
    assert_ack(close(app, "/bits/t.bin", sid), 200)
    assert_ack(close(app, "/bits/t.bin", sid), 200)  # a retried Close: tombstone
    assert_ack(post(app, "/bits/t.bin", "Cancel-Session", session_id=sid), 200)
    assert store.cleanup(now=time.time() + 500, tombstone_timeout=600) == []
    assert_ack(close(app, "/bits/t.bin", sid), 200)
    removed = store.cleanup(now=time.time() + 601, tombstone_timeout=600)
    assert ("tombstone", sid) in removed
    assert_ack(close(app, "/bits/t.bin", sid), 500, NOT_FOUND)
    assert_ack(post(app, "/bits/t.bin", "Cancel-Session", session_id=sid), 500, NOT_FOUND)


def test_flask_bits_cleanup_command_expires_tombstones(make: t.Callable[..., t.Any]) -> None:
    app = make(BITS_TOMBSTONE_TIMEOUT=0)
    sid = create(app, "/bits/t.bin")
    assert_ack(post(app, "/bits/t.bin", "Cancel-Session", session_id=sid), 200)
    result = app.test_cli_runner().invoke(args=["bits", "cleanup"])
    assert result.exit_code == 0, result.output
    assert f"removed tombstone {sid}" in result.output
    assert_ack(post(app, "/bits/t.bin", "Cancel-Session", session_id=sid), 500, NOT_FOUND)


# -- the logging contract --------------------------------------------------------------------------

_LINE = re.compile(
    r"(?P<packet>\S+) session=(?P<session>\S+) status=(?P<status>\d{3})"
    r"(?: hresult=0x[0-9A-F]{8})? bytes=(?P<bytes>\d+) (?P<ms>\d+\.\d)ms(?:: .*)?"
)


def _packet_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "flask_bits"]


def _one_line(caplog: pytest.LogCaptureFixture, response: t.Any, packet: str,
              session: str | None, size: int) -> logging.LogRecord:
    records = _packet_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    match = _LINE.fullmatch(record.getMessage())
    assert match, record.getMessage()
    assert match["packet"] == packet
    assert match["session"] == (session or "-")
    assert int(match["status"]) == response.status_code
    assert int(match["bytes"]) == size
    assert float(match["ms"]) >= 0
    return record


def test_one_info_line_per_packet(make: t.Callable[..., t.Any],
                                  caplog: pytest.LogCaptureFixture) -> None:
    app = make()
    caplog.set_level(logging.DEBUG, logger="flask_bits")
    steps: list[tuple[str, t.Callable[[str | None], t.Any], int]] = [
        ("Ping", lambda sid: post(app, "/bits/log.bin", "Ping"), 0),
        ("Create-Session", lambda sid: post(app, "/bits/log.bin", "Create-Session"), 0),
        ("Fragment", lambda sid: fragment(app, "/bits/log.bin", sid, b"abc", 0, 6), 3),
        ("Fragment", lambda sid: fragment(app, "/bits/log.bin", sid, b"def", 3, 6), 3),
        ("Close-Session", lambda sid: close(app, "/bits/log.bin", sid), 0),
        ("Cancel-Session", lambda sid: post(app, "/bits/log.bin", "Cancel-Session",
                                            session_id=sid), 0),
    ]
    sid = None
    for packet, send, size in steps:
        caplog.clear()
        response = send(sid)
        assert response.status_code == 200
        sid = sid or response.headers.get("BITS-Session-Id")
        record = _one_line(caplog, response, packet, None if packet == "Ping" else sid, size)
        assert record.levelno == logging.INFO


def _mistakes(app: t.Any) -> list[tuple[str, t.Callable[[], t.Any], str, bool]]:
    """Client mistakes: (packet, request, expected session field, echoes the id)."""
    sid = create(app, "/bits/m.bin")
    unknown = f"{{{str(uuid.uuid4()).upper()}}}"
    return [
        ("Fragment", lambda: fragment(app, "/bits/m.bin", sid, b"abc", 3, 10), sid, True),  # 416
        ("Fragment", lambda: post(app, "/bits/m.bin", "Fragment", b"abc", session_id=sid,
                                  headers=[("Content-Range", "bytes 0-9/x")]), sid, True),
        ("Fragment", lambda: fragment(app, "/bits/m.bin", unknown, b"abc", 0, 3), unknown,
         True),
        ("Close-Session", lambda: close(app, "/bits/m.bin", unknown), unknown, True),
        ("Cancel-Session", lambda: post(app, "/bits/m.bin", "Cancel-Session",
                                        session_id="../../x"), "-", False),
        ("Create-Session", lambda: post(app, "/bits/../x", "Create-Session"), "-", False),
        ("Create-Session", lambda: post(app, "/bits/x", None,
                                        headers=[("BITS-Packet-Type", "Create-Session"),
                                                 ("BITS-Supported-Protocols", "{bogus}")]),
         "-", False),
        ("Ping", lambda: post(app, "/bits/m.bin", "Ping", headers=[("X-Big", "a" * 5000)]),
         "-", False),
        ("Ping", lambda: post(app, "/bits/m.bin", "Ping", content_length=None), "-", False),
        ("Ping", lambda: post(app, "/bits/m.bin", "Ping", b"body"), "-", False),
        ("Bogus", lambda: post(app, "/bits/m.bin", "Bogus"), "-", False),
        ("Fragment", lambda: fragment(app, "/bits/m.bin", sid, b"x" * 6000, 0, 6000), sid,
         True),  # 413
    ]


def test_client_mistakes_are_logged_once_at_info(make: t.Callable[..., t.Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    app = make(BITS_MAX_FRAGMENT_SIZE=5 * 1024)
    caplog.set_level(logging.DEBUG, logger="flask_bits")
    for packet, send, session, _ in _mistakes(app):
        caplog.clear()
        response = send()
        assert 400 <= response.status_code < 600
        records = _packet_records(caplog)
        assert len(records) == 1, (packet, [r.getMessage() for r in records])
        record = records[0]
        match = _LINE.fullmatch(record.getMessage())
        assert match, record.getMessage()
        assert (match["packet"], match["session"], int(match["status"])) == (
            packet, session, response.status_code), record.getMessage()
        assert record.levelno == logging.INFO, (record.levelname, record.getMessage())


def test_no_client_mistake_is_logged_at_error(make: t.Callable[..., t.Any],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the client sends, nothing reaches ERROR (ERROR is for server faults)."""
    app = make(BITS_MAX_FRAGMENT_SIZE=5 * 1024, BITS_MAX_UPLOAD_SIZE=100)
    caplog.set_level(logging.DEBUG)
    for _, send, _, _ in _mistakes(app):
        send()
    sid = create(app, "/bits/x.bin")
    fragment(app, "/bits/x.bin", sid, b"abc", 0, 1000)  # too large
    post(app, "/bits/x.bin", "Fragment", b"abc", session_id=sid, content_length="10",
         headers=[("Content-Range", "bytes 0-9/10")])  # body ended early
    post(app, "/bits/x.bin", "Fragment", b"abc", session_id=sid,
         headers=[("Content-Range", "bytes 0-2/3"), ("Content-Encoding", "gzip")])
    post(app, "/bits/x.bin", "Fragment", b"abc", session_id=sid,
         headers=[("Content-Range", "bytes 0-2/3"), ("Transfer-Encoding", "chunked")])
    post(app, "/bits/sub/dir/x.bin", "Create-Session")  # missing folder
    post(app, "/bits/x%00.bin", "Create-Session")
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_auth_challenges_are_logged_too(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """One line per packet includes packets answered by the authorize hook (401)."""
    from flask import Response

    def challenge(request: t.Any, remote_path: str, packet_type: t.Any) -> t.Any:
        return Response(b"", 401, {"WWW-Authenticate": 'Basic realm="x"'})

    app = bits_app(tmp_path, authorize=challenge)
    caplog.set_level(logging.DEBUG, logger="flask_bits")
    response = post(app, "/bits/x.bin", "Ping")
    assert_ack(response, 401)
    records = _packet_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    assert _LINE.fullmatch(records[0].getMessage())


def test_log_lines_carry_no_paths_or_data(make: t.Callable[..., t.Any],
                                          caplog: pytest.LogCaptureFixture) -> None:
    app = make()
    caplog.set_level(logging.DEBUG, logger="flask_bits")
    sid = create(app, "/bits/secret-name.bin", **as_owner("alice"))
    fragment(app, "/bits/secret-name.bin", sid, b"TOPSECRETDATA", 0, 13, **as_owner("alice"))
    post(app, "/bits/secret-name.bin", "Fragment", b"x", session_id=sid,
         headers=[("Content-Range", "bytes 0-0/1"), ("X-Owner", "mallory")])
    post(app, "/bits/../etc/secret-name", "Create-Session")
    text = "\n".join(r.getMessage() for r in _packet_records(caplog))
    for secret in ("secret-name", "TOPSECRETDATA", "alice", "mallory",
                   app.config["BITS_UPLOAD_FOLDER"], app.config["BITS_SESSION_FOLDER"]):
        assert secret not in text



def test_read_timeout_on_a_blocking_socket_is_the_kernels_and_is_undone() -> None:
    """gunicorn's blocking sockets get SO_RCVTIMEO (no poll per read); a stalled read
    fails with EAGAIN, and the socket is left as it was found."""
    import socket
    import struct

    from werkzeug.wrappers import Request

    from flask_bits.server import _read_timeout
    from flask_bits.server import _timeval

    assert _timeval(0) == struct.pack("@ll", 0, 0)
    assert _timeval(1e-9) == struct.pack("@ll", 0, 1)  # never "no timeout" by rounding
    assert _timeval(2.5) == struct.pack("@ll", 2, 500_000)
    ours, peer = socket.socketpair()
    try:
        request = Request({"gunicorn.socket": ours})
        size = len(_timeval(0))
        with _read_timeout(request, 0.05):
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, size) != _timeval(0)
            assert ours.gettimeout() is None  # Python-level blocking mode untouched
            started = time.monotonic()
            with pytest.raises(BlockingIOError):
                ours.recv(10)
            assert time.monotonic() - started < 5
            peer.sendall(b"abc")
            assert ours.recv(10) == b"abc"
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, size) == _timeval(0)
        assert ours.gettimeout() is None
        ours.settimeout(7.0)  # a socket with its own timeout keeps the Python mechanism
        with _read_timeout(request, 0.05):
            assert ours.gettimeout() == 0.05
        assert ours.gettimeout() == 7.0
    finally:
        ours.close()
        peer.close()
