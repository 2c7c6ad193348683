"""Session locks across processes (flask_bits/locking.py).

Children are plain forks while the test process has a single thread (fast, and safe
then); otherwise a ``forkserver`` that preloads this module forks them, so a thread
left behind by another test can never deadlock a child. Every wait is bounded and
driven by events or queues, never by sleeping.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import threading
import time
import typing as t
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
from flask import Flask

from flask_bits.errors import SessionBusy
from flask_bits.locking import SessionLocker
from flask_bits.locking import lock_file
from flask_bits.protocol import new_session_id
from flask_bits.store import SessionGone
from flask_bits.store import SessionState
from flask_bits.store import SessionStore
from tests.conftest import ERROR_BUSY
from tests.conftest import assert_ack
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import session_leftovers

#: Upper bound for any wait on a child; far above what a healthy run needs.
DEADLINE = 30.0
Context = multiprocessing.context.BaseContext


@pytest.fixture
def ctx() -> Context:
    """The multiprocessing context for this test's children."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload([__name__])
    return server


# -- children (module level so that a forkserver can import them) --------------------------


def _hold_lock(folder: str, name: str, acquired: Event, release: Event) -> None:
    locker = SessionLocker(folder, timeout=DEADLINE)
    with locker.hold(name):
        acquired.set()
        release.wait(DEADLINE)


def _hold_session(
    session_folder: str, session_id: str, acquired: Event, release: Event
) -> None:
    store = SessionStore(session_folder, lock_timeout=DEADLINE)
    with store.open(session_id, directory="bits", owner=None):
        acquired.set()
        release.wait(DEADLINE)


def _counter_worker(
    session_folder: str, session_id: str, limit: int, start: Event, ready: Event, results: t.Any
) -> None:
    """Increment the session's ``received`` under its lock until it reaches ``limit``;
    whoever reaches it removes the session. Reports how many increments it made."""
    store = SessionStore(session_folder, lock_timeout=DEADLINE)
    start.wait(DEADLINE)
    ready.set()
    mine = 0
    outcome = "?"
    while True:
        try:
            with store.open(session_id, directory="bits", owner=None) as session:
                value = session.state.received
                os.sched_yield()  # widen the read-modify-write window
                session.state.received = value + 1
                session.save()
                mine += 1
                if value + 1 >= limit:
                    session.remove("closed")
        except SessionGone:
            outcome = "gone"
            break
        except Exception as exc:  # report, do not hang the parent
            outcome = f"error: {exc!r}"
            break
    results.put((mine, outcome))


# -- helpers -------------------------------------------------------------------------------


def _start(
    ctx: Context, target: t.Callable[..., None], *args: t.Any
) -> multiprocessing.process.BaseProcess:
    proc = ctx.Process(target=target, args=args, daemon=True)  # type: ignore[attr-defined]
    proc.start()
    return proc


def _finish(proc: multiprocessing.process.BaseProcess) -> None:
    proc.join(DEADLINE)
    if proc.is_alive():  # pragma: no cover - only on a hang
        proc.kill()
        proc.join()
    assert proc.exitcode == 0


def _make_session(folder: str) -> SessionState:
    now = time.time()
    state = SessionState(
        id=new_session_id(), directory="bits", remote_path="file.bin",
        url="http://localhost/bits/file.bin", owner=None,
        protocol="{7df0354d-249b-430f-820d-3d2a9bef4931}", created=now, last_activity=now,
        timeout=3600.0,
    )
    SessionStore(folder).create(state, owner_limit=None, total_limit=None)
    return state


# -- tests ---------------------------------------------------------------------------------


def test_loser_gets_session_busy_within_the_timeout(tmp_path: Path, ctx: Context) -> None:
    folder = str(tmp_path / "locks")
    acquired, release = ctx.Event(), ctx.Event()
    proc = _start(ctx, _hold_lock, folder, "{SESSION}", acquired, release)
    try:
        assert acquired.wait(DEADLINE)
        locker = SessionLocker(folder, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(SessionBusy) as info:
            with locker.hold("{SESSION}"):
                pass  # pragma: no cover
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 5.0
        assert info.value.status == 503
        assert info.value.hresult == 0x800700AA
    finally:
        # The holder dies without releasing: the OS drops its lock (no stale lock).
        proc.kill()
        proc.join(DEADLINE)
    with SessionLocker(folder, timeout=5.0).hold("{SESSION}") as handle:
        assert handle.path.endswith("{SESSION}.lock")


def test_busy_session_is_a_503_ack(
    make_app: t.Callable[..., Flask], session_folder: Path, ctx: Context
) -> None:
    app = make_app(BITS_LOCK_TIMEOUT=0.3)
    client = app.test_client()
    sid = create_session(client, "/bits/file.bin")
    acquired, release = ctx.Event(), ctx.Event()
    proc = _start(ctx, _hold_session, str(session_folder), sid, acquired, release)
    try:
        assert acquired.wait(DEADLINE)
        started = time.monotonic()
        response = send_fragment(client, "/bits/file.bin", sid, b"abc", 0, 6)
        assert time.monotonic() - started < 5.0
        assert_ack(response, 503, ERROR_BUSY)
        assert response.headers["BITS-Session-Id"] == sid
    finally:
        release.set()
        _finish(proc)
    response = assert_ack(send_fragment(client, "/bits/file.bin", sid, b"abc", 0, 6), 200)
    assert response.headers["BITS-Received-Content-Range"] == "3"


def test_waiter_on_a_removed_session_finds_it_gone(tmp_path: Path, ctx: Context) -> None:
    """The unlink-on-remove protocol: a process blocked on the lock while the holder
    removes the session must not see (or resurrect) the session afterwards."""
    folder = str(tmp_path / "sessions")
    state = _make_session(folder)
    store = SessionStore(folder, lock_timeout=DEADLINE)
    results = ctx.Queue()
    start, ready = ctx.Event(), ctx.Event()
    # Started before we take the lock, so that a forked child inherits no lock of ours.
    proc = _start(ctx, _counter_worker, folder, state.id, 10**9, start, ready, results)
    with store.open(state.id, directory="bits", owner=None) as session:
        # The child tries to open the session while we hold its lock and remove it.
        start.set()
        assert ready.wait(DEADLINE)
        session.remove("closed")
    mine, outcome = results.get(timeout=DEADLINE)
    _finish(proc)
    assert (mine, outcome) == (0, "gone")
    assert session_leftovers(folder, state.id) == []
    assert not os.path.isdir(store.session_dir(state.id))


def test_unlink_on_remove_keeps_mutual_exclusion(tmp_path: Path, ctx: Context) -> None:
    """Several processes do a read-modify-write of one session under its lock until one
    of them removes it. A lost update or an increment after the removal would show up
    in the total, a resurrected session or lock file in the folder."""
    folder = str(tmp_path / "sessions")
    state = _make_session(folder)
    limit, workers = 60, 3
    start = ctx.Event()
    results = ctx.Queue()
    readies = [ctx.Event() for _ in range(workers)]  # keep them alive for the children
    procs = [
        _start(ctx, _counter_worker, folder, state.id, limit, start, ready, results)
        for ready in readies
    ]
    start.set()
    outcomes = [results.get(timeout=DEADLINE) for _ in procs]
    for proc in procs:
        _finish(proc)
    assert all(outcome == "gone" for _, outcome in outcomes), outcomes
    assert sum(mine for mine, _ in outcomes) == limit
    assert session_leftovers(folder, state.id) == []
    store = SessionStore(folder)
    tomb = store.tombstone(state.id)
    assert tomb is not None and tomb.kind == "closed"


def test_stale_opener_of_an_unlinked_lock_file_finds_no_session(tmp_path: Path) -> None:
    """A waiter that opened the lock file before the holder unlinked it may win that
    old inode while a newcomer locks a fresh file: both must find the session gone."""
    folder = str(tmp_path / "sessions")
    state = _make_session(folder)
    store = SessionStore(folder, lock_timeout=1.0)
    lock_path = store.locker.path(state.id)
    with store.open(state.id, directory="bits", owner=None) as session:
        stale_fd = os.open(lock_path, os.O_RDWR)  # a waiter's descriptor of the old inode
        session.remove("closed")
    try:
        assert not os.path.exists(lock_path)
        import fcntl

        fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the waiter wins the old inode
        with pytest.raises(SessionGone):  # ... and a newcomer gets the fresh file
            with store.open(state.id, directory="bits", owner=None):
                pass  # pragma: no cover
        assert store.peek(state.id) is None
    finally:
        os.close(stale_fd)
    assert session_leftovers(folder, state.id) == []


def test_lock_file_contends_with_filelock_filelock(tmp_path: Path) -> None:
    """Our descriptor locks and :class:`filelock.FileLock` exclude each other both ways
    (the same ``flock`` primitive), so tools built on filelock can join in."""
    import filelock

    path = str(tmp_path / "x.lock")
    theirs = filelock.FileLock(path, timeout=0, is_singleton=False)
    with theirs:
        assert lock_file(path, 0) is None
    fd = lock_file(path, 0)
    assert fd is not None
    try:
        with pytest.raises(filelock.Timeout):
            theirs.acquire()
    finally:
        os.close(fd)
    with theirs:  # free again once the descriptor is closed
        pass


def test_lock_file_gives_up_after_the_wait(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    fd = lock_file(path, 0)
    assert fd is not None
    try:
        started = time.monotonic()
        assert lock_file(path, 0.2) is None
        waited = time.monotonic() - started
        assert 0.2 <= waited < 5
    finally:
        os.close(fd)


def test_lock_file_waits_for_a_release_from_another_thread(tmp_path: Path) -> None:
    """A waiter gets the lock once the holder releases it, and a detached lock may be
    released from a thread other than the one that took it."""
    locker = SessionLocker(str(tmp_path / "locks"), timeout=5)
    detached = locker.acquire("s", timeout=0)
    with pytest.raises(SessionBusy):
        locker.acquire("s", timeout=0)
    waiting = threading.Event()
    got: list[float] = []

    def wait_for_it() -> None:
        waiting.set()
        with locker.hold("s"):
            got.append(time.monotonic())

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    assert waiting.wait(DEADLINE)
    released = time.monotonic()
    threading.Thread(target=detached.release).start()
    thread.join(DEADLINE)
    assert not thread.is_alive() and len(got) == 1 and got[0] >= released


def test_lock_won_on_an_unlinked_file_is_retaken_on_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the holder unlinks the lock file between our open and our lock, we lock the
    file now at the path, which a third party may hold: never two holders at once."""
    import filelock

    from flask_bits import locking

    path = str(tmp_path / "x.lock")
    real_lock = filelock.lock_descriptor
    calls: list[int] = []
    third: list[int] = []

    def unlink_first(fd: int, *, blocking: bool = True) -> bool:
        calls.append(fd)
        if len(calls) == 1:  # the "holder" unlinks it just as we win the old inode
            os.unlink(path)
            newcomer = os.open(path, os.O_RDWR | os.O_CREAT)
            assert real_lock(newcomer, blocking=False)
            third.append(newcomer)
        return real_lock(fd, blocking=blocking)

    monkeypatch.setattr(locking.filelock, "lock_descriptor", unlink_first)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT))
    try:
        assert lock_file(path, 0) is None  # the newcomer holds the current file
        assert len(calls) == 2
    finally:
        os.close(third[0])
    fd = lock_file(path, 0)
    assert fd is not None
    os.close(fd)


def test_a_filesystem_without_flock_answers_500_and_logs(
    client: t.Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No silent fallback to marker files: a lock that cannot be taken is a server error
    with a log line, and the session is still there once locking works again."""
    import errno

    from flask_bits import locking
    from tests.conftest import create_session
    from tests.conftest import send_fragment

    session_id = create_session(client)

    def no_flock(fd: int, *, blocking: bool = True) -> bool:
        raise OSError(errno.ENOSYS, "flock is not supported")

    monkeypatch.setattr(locking.filelock, "lock_descriptor", no_flock)
    response = send_fragment(client, "/bits/file.bin", session_id, b"abc", 0, 3)
    assert response.status_code == 500
    assert response.headers["BITS-Packet-Type"] == "Ack"
    assert any(r.levelname in ("WARNING", "ERROR") for r in caplog.records)
    monkeypatch.undo()
    response = send_fragment(client, "/bits/file.bin", session_id, b"abc", 0, 3)
    assert_ack(response, 200)
    assert response.headers["BITS-Received-Content-Range"] == "3"


def test_a_lock_is_released_once_and_discard_unlinks_its_file(tmp_path: Path) -> None:
    locker = SessionLocker(str(tmp_path / "locks"), timeout=1)
    lock = locker.acquire("s")
    assert os.path.exists(lock.path)
    lock.release()
    lock.release()  # a second release is a no-op, not a close of someone else's fd
    again = locker.acquire("s", timeout=0)  # free again
    again.release(discard=True)
    assert not os.path.exists(again.path)
    with locker.hold("s") as held:
        held.discard = True
    assert not os.path.exists(held.path)
