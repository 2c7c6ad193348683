"""Racing packets against a real gunicorn (sync and gthread workers).

The client never has two requests of one session outstanding, but retries and
cancellations do overlap on the server (PROTOCOL.md 6: serialise per session). Every
race below has a small set of legal outcomes; each test checks that only those happen,
that completed files are byte-exact, that cancelled or discarded uploads leave no byte
anywhere, and that nothing leaks in the session folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import wire
from fault_apps import MiB
from fault_apps import SlowFragment
from fault_apps import data_part
from fault_apps import file_size
from fault_apps import folder_leftovers
from fault_apps import folders_env
from fault_apps import is_ack
from fault_apps import received
from fault_apps import session_leftovers
from fault_apps import upload_temp_files
from fault_apps import wait_until
from servers import ROOT
from servers import GunicornServer

pytestmark = pytest.mark.integration

SESSION_NOT_FOUND = "0x8020001F"
ERROR_BUSY = "0x800700AA"
FRAG = 256 * 1024
#: Sessions raced at once per scenario, and client threads.
SESSIONS = 6
THREADS = 24
STORM = 200

WORKER_KINDS = {
    "sync": {"workers": 4, "worker_class": "sync", "threads": 1},
    "gthread": {"workers": 4, "worker_class": "gthread", "threads": 4},
}


class Server(t.NamedTuple):
    server: GunicornServer
    base: Path
    uploads: Path
    sessions: Path
    env: dict[str, str]


@pytest.fixture(scope="module", params=sorted(WORKER_KINDS))
def srv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Server]:
    base = tmp_path_factory.mktemp(f"race-{request.param}")
    env = folders_env(base)
    with GunicornServer(env=env, log_path=base / "gunicorn.log",
                        **WORKER_KINDS[request.param]) as server:
        yield Server(server, base, base / "uploads", base / "sessions", env)


@pytest.fixture(scope="module")
def pool() -> t.Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=THREADS) as executor:
        yield executor


# -- helpers ----------------------------------------------------------------------------

_counter = iter(range(1_000_000))
_counter_lock = threading.Lock()


def new_name(prefix: str) -> str:
    with _counter_lock:
        return f"/bits/{prefix}-{next(_counter)}-{os.getpid()}.bin"


def post(base_url: str, path: str, packet: str, sid: str | None = None) -> wire.Reply:
    return wire.bits_post(base_url, path, packet, session_id=sid)


def frag(base_url: str, path: str, sid: str, data: bytes, first: int, last: int) -> wire.Reply:
    """Send bytes ``first..last-1`` of ``data`` (the whole file) on a fresh connection."""
    return wire.fragment(base_url, path, sid, data[first:last], first, len(data))


def start(base_url: str, path: str, data: bytes, acked: int) -> str:
    """A new session holding the first ``acked`` bytes of ``data``."""
    conn = wire.connect(base_url, timeout=60)
    try:
        sid = wire.create_session(conn, path)
        offset = 0
        while offset < acked:
            end = min(offset + FRAG, acked)
            reply = wire.fragment(conn, path, sid, data[offset:end], offset, len(data))
            assert reply.status == 200, reply
            offset = received(reply)
        assert offset == acked
        return sid
    finally:
        conn.close()


def race(*calls: t.Callable[[], wire.Reply], flip: bool = False) -> list[wire.Reply]:
    """Run ``calls`` at the same moment (own threads, a barrier); their replies in order.

    Which call wins depends mostly on start order, so ``flip`` starts them in reverse:
    scenarios alternate it to see both outcomes of a two-way race.
    """
    barrier = threading.Barrier(len(calls), timeout=30)
    results: list[t.Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised in the test's thread below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in reversed(threads) if flip else threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), "a racing request did not finish in 120 s"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def in_parallel(pool: ThreadPoolExecutor, jobs: t.Sequence[t.Callable[[], t.Any]]) -> list[t.Any]:
    futures = [pool.submit(job) for job in jobs]
    return [f.result(timeout=180) for f in futures]


def each_session(pool: ThreadPoolExecutor, scenario: t.Callable[[int], t.Any]) -> list[t.Any]:
    """Run ``scenario(i)`` for ``SESSIONS`` sessions at once."""
    return in_parallel(pool, [functools.partial(scenario, i) for i in range(SESSIONS)])


def destination(s: Server, path: str) -> Path:
    return s.uploads / path.removeprefix("/bits/")


def assert_gone(s: Server, sid: str) -> None:
    assert session_leftovers(s.sessions, sid) == [], sid


def assert_not_found(reply: wire.Reply) -> None:
    """A packet for a closed or cancelled session: BG_E_SESSION_NOT_FOUND (6 step 8)."""
    assert is_ack(reply), reply
    assert reply.status == 500, reply
    assert reply.get("BITS-Error-Code") == SESSION_NOT_FOUND, reply
    assert reply.get("BITS-Error-Context") == "0x5", reply


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- races -------------------------------------------------------------------------------


def test_two_copies_of_the_same_fragment(srv: Server, pool: ThreadPoolExecutor) -> None:
    """Both copies get 200 with the same N; the file is written once, byte-exact."""

    def scenario(i: int) -> tuple[str, str, bytes]:
        path = new_name("copies")
        data = os.urandom(2 * FRAG + 1234)
        sid = start(srv.server.url, path, data, 0)
        for first, last in ((0, FRAG), (FRAG, len(data))):
            copy = functools.partial(frag, srv.server.url, path, sid, data, first, last)
            for reply in race(copy, copy):
                assert reply.status == 200 and is_ack(reply), reply
                assert received(reply) == last, reply
        assert post(srv.server.url, path, "Close-Session", sid).status == 200
        return path, sid, data

    for path, sid, data in each_session(pool, scenario):
        assert file_digest(destination(srv, path)) == sha(data)
        assert_gone(srv, sid)


def test_overlapping_retransmits_race(srv: Server, pool: ThreadPoolExecutor) -> None:
    """Overlapping copies starting at or before N: all 200, N only grows, no byte twice."""

    def scenario(i: int) -> tuple[str, str, bytes]:
        path = new_name("overlap")
        data = os.urandom(3 * FRAG + 777)
        total = len(data)
        sid = start(srv.server.url, path, data, FRAG)
        ranges = [
            (FRAG // 2, 2 * FRAG),
            (FRAG, 2 * FRAG + FRAG // 2),
            (0, FRAG),  # wholly inside what is held
            (3, total),  # completes the file
            (FRAG - 1, total - 5),
        ]
        replies = race(*[
            functools.partial(frag, srv.server.url, path, sid, data, first, last)
            for first, last in ranges
        ])
        for (_first, last), reply in zip(ranges, replies, strict=True):
            assert reply.status == 200 and is_ack(reply), reply
            assert last <= received(reply) <= total, reply
        retry = frag(srv.server.url, path, sid, data, total - 10, total)
        assert retry.status == 200 and received(retry) == total, retry
        assert post(srv.server.url, path, "Close-Session", sid).status == 200
        return path, sid, data

    for path, sid, data in each_session(pool, scenario):
        assert file_digest(destination(srv, path)) == sha(data)
        assert_gone(srv, sid)


@pytest.mark.parametrize("ending", ["Cancel-Session", "Close-Session"], ids=["cancel", "close"])
@pytest.mark.parametrize("completing", [False, True], ids=["middle", "last"])
def test_fragment_races_the_end_of_its_session(
    srv: Server, pool: ThreadPoolExecutor, completing: bool, ending: str
) -> None:
    """Cancel or Close first: the fragment finds no session, and an incomplete upload
    never reaches its destination (Close discards partial data, 7.4 step 3). Fragment
    first: it is acknowledged, and a completed file stays (7.5 step 4)."""

    def scenario(i: int) -> tuple[str, str, bytes, wire.Reply]:
        path = new_name("frag-" + ending.split("-")[0].lower())
        data = os.urandom((2 if completing else 3) * FRAG)
        sid = start(srv.server.url, path, data, FRAG)
        fragment, end = race(
            lambda: frag(srv.server.url, path, sid, data, FRAG, 2 * FRAG),
            lambda: post(srv.server.url, path, ending, sid),
            flip=i % 2 == 1,
        )
        assert end.status == 200 and is_ack(end), end
        assert end.get("BITS-Session-Id") == sid
        if fragment.status == 200:
            assert received(fragment) == 2 * FRAG, fragment
        else:
            assert_not_found(fragment)
        return path, sid, data, fragment

    for path, sid, data, fragment in each_session(pool, scenario):
        dest = destination(srv, path)
        if completing and fragment.status == 200:
            assert file_digest(dest) == sha(data)
        else:
            assert not dest.exists(), f"an upload ended by {ending} left bytes at its destination"
        assert_gone(srv, sid)


@pytest.mark.parametrize("complete", [False, True], ids=["incomplete", "complete"])
def test_close_races_cancel(srv: Server, pool: ThreadPoolExecutor, complete: bool) -> None:
    """Both answered 200 (the loser meets the tombstone, A23); a committed file stays,
    an incomplete upload leaves nothing."""

    def scenario(i: int) -> tuple[str, str, bytes]:
        path = new_name("close-cancel")
        data = os.urandom(2 * FRAG + 99)
        sid = start(srv.server.url, path, data, len(data) if complete else FRAG)
        close, cancel = race(
            lambda: post(srv.server.url, path, "Close-Session", sid),
            lambda: post(srv.server.url, path, "Cancel-Session", sid),
            flip=i % 2 == 1,
        )
        for reply in (close, cancel):
            assert reply.status == 200 and is_ack(reply), reply
            assert reply.get("BITS-Session-Id") == sid
        return path, sid, data

    for path, sid, data in each_session(pool, scenario):
        dest = destination(srv, path)
        if complete:
            assert file_digest(dest) == sha(data)
        else:
            assert not dest.exists()
        assert_gone(srv, sid)


@pytest.mark.parametrize("ender", ["Cancel-Session", "Close-Session"])
def test_fragment_after_session_ended(srv: Server, ender: str) -> None:
    """The deterministic end of the races above: a Fragment arriving after Close or
    Cancel names no active session: 500 BG_E_SESSION_NOT_FOUND (6 step 8, 4.3), so the
    client starts over; a repeated Close/Cancel meets the tombstone: 200 (A23)."""
    path = new_name("late")
    data = os.urandom(3 * FRAG)
    sid = start(srv.server.url, path, data, FRAG)
    assert post(srv.server.url, path, ender, sid).status == 200
    late = frag(srv.server.url, path, sid, data, FRAG, 2 * FRAG)
    assert_not_found(late)
    for packet in ("Close-Session", "Cancel-Session"):
        again = post(srv.server.url, path, packet, sid)
        assert again.status == 200 and is_ack(again), again
    assert not destination(srv, path).exists()
    assert_gone(srv, sid)


def test_create_session_storm(srv: Server, pool: ThreadPoolExecutor) -> None:
    """200 concurrent Create-Sessions: all 200 with distinct ids; then half closed
    (no fragment: an empty file, 7.3 project decision) and half cancelled at once."""
    paths = [new_name("storm") for _ in range(STORM)]

    def create(path: str) -> str:
        conn = wire.connect(srv.server.url, timeout=60)
        try:
            return wire.create_session(conn, path)
        finally:
            conn.close()

    started = time.monotonic()
    sids = in_parallel(pool, [lambda p=p: create(p) for p in paths])
    assert len(set(sids)) == STORM
    assert time.monotonic() - started < 90

    def finish(i: int) -> wire.Reply:
        packet = "Close-Session" if i % 2 == 0 else "Cancel-Session"
        return post(srv.server.url, paths[i], packet, sids[i])

    replies = in_parallel(pool, [lambda i=i: finish(i) for i in range(STORM)])
    for i, reply in enumerate(replies):
        assert reply.status == 200 and is_ack(reply), reply
        dest = destination(srv, paths[i])
        if i % 2 == 0:
            assert dest.is_file() and dest.stat().st_size == 0
        else:
            assert not dest.exists()
        assert_gone(srv, sids[i])


def test_no_leaks_after_cli_cleanup(srv: Server) -> None:
    """After closes and cancels, and after ``flask bits cleanup``: no session folder,
    lock, staging, trash or temporary file is left. The sweep keeps live sessions,
    drops expired tombstones, and an expired session leaves nothing behind (10)."""
    # Fresh traffic of every kind, so the check means something on its own.
    data = os.urandom(FRAG + 5)
    done = new_name("cli-done")
    sid_done = start(srv.server.url, done, data, len(data))
    assert post(srv.server.url, done, "Close-Session", sid_done).status == 200
    cancelled = new_name("cli-cancel")
    sid_cancel = start(srv.server.url, cancelled, data, FRAG)
    assert post(srv.server.url, cancelled, "Cancel-Session", sid_cancel).status == 200
    live = new_name("cli-live")
    sid_live = start(srv.server.url, live, data, FRAG)
    abandoned = new_name("cli-abandoned")
    sid_abandoned = start(srv.server.url, abandoned, data, FRAG)
    open_ids = (sid_live, sid_abandoned)

    def flask(*args: str, **env: str) -> str:
        full = {**os.environ, **srv.env, "FLASK_APP": "example_app:create_app", **env}
        full["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), full.get("PYTHONPATH")) if p
        )
        result = subprocess.run([sys.executable, "-m", "flask", "bits", *args], cwd=ROOT,
                                env=full, capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    flask("cleanup", BITS_TOMBSTONE_TIMEOUT="0")
    for sid in open_ids:
        assert data_part(srv.sessions, sid).is_file(), "cleanup removed a live session"
    assert [p for p in folder_leftovers(srv.sessions)
            if not any(sid in p for sid in open_ids)] == []
    assert list((srv.sessions / "tombstones").iterdir()) == []

    # The live session still works after the sweep, then goes away with its client.
    reply = frag(srv.server.url, live, sid_live, data, FRAG, len(data))
    assert reply.status == 200 and received(reply) == len(data), reply
    assert post(srv.server.url, live, "Close-Session", sid_live).status == 200
    assert file_digest(destination(srv, live)) == sha(data)
    assert file_digest(destination(srv, done)) == sha(data)
    assert not destination(srv, cancelled).exists()

    # With a tiny session timeout the abandoned session expires: nothing may remain.
    out = flask("cleanup", BITS_SESSION_TIMEOUT="0.001")
    assert f"session {sid_abandoned}" in out, out
    assert not destination(srv, abandoned).exists()
    assert session_leftovers(srv.sessions, sid_abandoned) == []
    assert folder_leftovers(srv.sessions) == []
    assert upload_temp_files(srv.uploads) == []
    late = frag(srv.server.url, abandoned, sid_abandoned, data, FRAG, len(data))
    assert_not_found(late)


# -- lock timeout -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(WORKER_KINDS))
def test_lock_timeout_answers_busy(tmp_path: Path, kind: str) -> None:
    """A session held by a slow fragment: another packet for it gets 503 0x800700AA after
    about BITS_LOCK_TIMEOUT, never hangs; the slow fragment then completes normally."""
    lock_timeout = 1.0
    env = folders_env(tmp_path, BITS_LOCK_TIMEOUT=str(lock_timeout))
    total = 3 * MiB
    data = os.urandom(total)
    path = "/bits/busy.bin"
    with GunicornServer(env=env, log_path=tmp_path / "gunicorn.log",
                        **WORKER_KINDS[kind]) as server:
        sid = start(server.url, path, data, 0)
        with SlowFragment(server.url, path, sid, 0, 2 * MiB, total) as slow:
            slow.send(data[: MiB + MiB // 4])
            wait_until(lambda: file_size(data_part(tmp_path / "sessions", sid)) >= MiB, 20,
                       "the slow fragment to be written")
            for packet in ("Fragment", "Cancel-Session"):
                began = time.monotonic()
                if packet == "Fragment":
                    reply = frag(server.url, path, sid, data, MiB, 2 * MiB)
                else:
                    reply = post(server.url, path, packet, sid)
                elapsed = time.monotonic() - began
                assert reply.status == 503 and is_ack(reply), reply
                assert reply.get("BITS-Error-Code") == ERROR_BUSY, reply
                assert reply.get("BITS-Error-Context") == "0x5", reply
                assert lock_timeout * 0.8 <= elapsed < lock_timeout + 5, elapsed
            slow.send(data[MiB + MiB // 4 : 2 * MiB])
            answer = slow.response()
        assert answer is not None
        status, headers = answer
        assert status == 200 and headers.get("bits-received-content-range") == str(2 * MiB)
        last = frag(server.url, path, sid, data, 2 * MiB, total)
        assert last.status == 200 and received(last) == total, last
        assert post(server.url, path, "Close-Session", sid).status == 200
    assert file_digest(tmp_path / "uploads" / "busy.bin") == sha(data)
    assert folder_leftovers(tmp_path / "sessions") == []
