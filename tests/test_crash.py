"""Workers killed with SIGKILL mid-request, and clients that stall mid-body.

DESIGN.md: the acknowledged bytes are the truth; a crash between a write and the state
update must never make the server acknowledge bytes it does not hold, nor corrupt the
file. Each test kills a real gunicorn worker at a chosen moment (found through
``/proc`` or told by a blocking fault hook, see ``fault_apps.py``), lets gunicorn
replace it, and has the client carry on the way BITS does: ask where the server is
(a fragment beyond N answers 416 with N), resend, complete, and compare every byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

import pytest
import wire
from fault_apps import FAULT_APP
from fault_apps import MiB
from fault_apps import RawPacket
from fault_apps import SlowFragment
from fault_apps import clear_trigger
from fault_apps import data_part
from fault_apps import fault_env
from fault_apps import file_size
from fault_apps import folder_leftovers
from fault_apps import folders_env
from fault_apps import is_ack
from fault_apps import make_random_file
from fault_apps import pids_with_open
from fault_apps import read_range
from fault_apps import received
from fault_apps import session_leftovers
from fault_apps import set_trigger
from fault_apps import sha256_file
from fault_apps import sigkill_worker
from fault_apps import upload_temp_files
from fault_apps import wait_reached
from fault_apps import wait_until
from servers import ROOT
from servers import GunicornServer

from flask_bits.store import COMPLETE
from flask_bits.store import FINISHED
from flask_bits.store import RECEIVING

pytestmark = pytest.mark.integration

WORKERS = 2


class Crashy(t.NamedTuple):
    server: GunicornServer
    base: Path
    faults: Path
    uploads: Path
    sessions: Path


@pytest.fixture(scope="module")
def crashy(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Crashy]:
    """The fault app under gunicorn (sync, two workers); triggers start inactive."""
    base = tmp_path_factory.mktemp("crash")
    faults = base / "faults"
    faults.mkdir()
    env = {**folders_env(base), **fault_env(faults)}
    with GunicornServer(FAULT_APP, env=env, workers=WORKERS,
                        log_path=base / "gunicorn.log") as server:
        yield Crashy(server, base, faults, base / "uploads", base / "sessions")
        for name in os.listdir(faults):
            (faults / name).unlink()


def next_offset(base_url: str, path: str, sid: str, src: Path, total: int) -> int:
    """Ask the server for N without sending data it lacks: the file's last byte as a
    fragment, which is beyond N unless only that byte is missing (then it completes)."""
    reply = wire.fragment(base_url, path, sid, read_range(src, total - 1, 1), total - 1, total)
    assert is_ack(reply) and reply.status in (200, 416), reply
    return received(reply)


def send_from(
    base_url: str, path: str, sid: str, src: Path, offset: int, total: int,
    until: int | None = None, size: int = MiB,
) -> int:
    """Send ``src`` (``total`` bytes) from ``offset`` in fragments until N reaches
    ``until`` (the whole file by default); return N."""
    until = total if until is None else until
    conn = wire.connect(base_url, timeout=60)
    try:
        while offset < until:
            chunk = read_range(src, offset, min(size, until - offset))
            reply = wire.fragment(conn, path, sid, chunk, offset, total)
            assert reply.status == 200 and is_ack(reply), reply
            new = received(reply)
            assert offset < new <= total, (offset, reply)
            offset = new
        return offset
    finally:
        conn.close()


def send_one(
    base_url: str, path: str, sid: str, src: Path, first: int, last: int, total: int
) -> wire.Reply:
    return wire.fragment(base_url, path, sid, read_range(src, first, last - first), first, total)


def new_session(base_url: str, path: str) -> str:
    return wire.create_session(base_url, path)


def close(base_url: str, path: str, sid: str) -> None:
    reply = wire.bits_post(base_url, path, "Close-Session", session_id=sid)
    assert reply.status == 200 and is_ack(reply), reply


def finish_and_check(c: Crashy, path: str, sid: str, src: Path, digest: str) -> None:
    close(c.server.url, path, sid)
    assert sha256_file(c.uploads / path.removeprefix("/bits/")) == digest
    assert session_leftovers(c.sessions, sid) == []
    assert upload_temp_files(c.uploads) == []


def test_sigkill_while_writing_a_fragment(crashy: Crashy, tmp_path: Path) -> None:
    """Five trials: kill the worker that is streaming a large, slowly sent fragment to
    disk; the server still reports an N it really holds and the upload resumes from it."""
    c = crashy
    plans = [  # (bytes acknowledged first, whole MiB the server writes before the kill)
        (0, 1), (MiB, 2), (0, 3), (2 * MiB + 4321, 1), (MiB // 2, 2),
    ]
    for trial, (acked, written_mib) in enumerate(plans):
        total = 6 * MiB + 1000 * trial + 17
        src = tmp_path / f"src{trial}.bin"
        digest = make_random_file(src, total)
        path = f"/bits/killed-write-{trial}.bin"
        sid = new_session(c.server.url, path)
        if acked:
            assert send_from(c.server.url, path, sid, src, 0, total, acked) == acked
        length = total - acked  # one big fragment for the rest of the file
        sent = written_mib * MiB + MiB // 2
        part = data_part(c.sessions, sid)
        with SlowFragment(c.server.url, path, sid, acked, length, total) as slow:
            slow.send(read_range(src, acked, sent))
            wait_until(lambda: file_size(part) >= acked + written_mib * MiB, 30,  # noqa: B023
                       "the server to write the fragment's first bytes")
            pids = wait_until(lambda: pids_with_open(c.server.worker_pids(), part), 10,  # noqa: B023
                              "the worker writing data.part")
            assert len(pids) == 1, pids
            sigkill_worker(c.server, pids[0], WORKERS)
            assert slow.response() is None  # the connection died with the worker

        offset = next_offset(c.server.url, path, sid, src, total)
        # Never more than arrived, never less than was acknowledged.
        assert acked <= offset <= acked + sent, (trial, acked, offset)
        assert read_range(part, 0, offset) == read_range(src, 0, offset)
        assert send_from(c.server.url, path, sid, src, offset, total) == total
        finish_and_check(c, path, sid, src, digest)
    assert folder_leftovers(c.sessions) == []


def test_sigkill_before_commit(crashy: Crashy, tmp_path: Path) -> None:
    """All bytes in, killed inside Session.commit before the file is placed: the
    retried last fragment commits it, byte-exact."""
    c = crashy
    total = 3 * MiB + 5
    src = tmp_path / "src.bin"
    digest = make_random_file(src, total)
    path = "/bits/killed-commit.bin"
    sid = new_session(c.server.url, path)
    assert send_from(c.server.url, path, sid, src, 0, total, 2 * MiB) == 2 * MiB

    set_trigger(c.faults, "block-commit")
    try:
        with SlowFragment(c.server.url, path, sid, 2 * MiB, total - 2 * MiB, total) as last:
            last.send(read_range(src, 2 * MiB, total - 2 * MiB))
            pid = wait_reached(c.faults, "commit")
            assert not (c.uploads / "killed-commit.bin").exists()
            sigkill_worker(c.server, pid, WORKERS)
            assert last.response() is None
    finally:
        clear_trigger(c.faults, "block-commit")

    retry = send_one(c.server.url, path, sid, src, 2 * MiB, total, total)
    assert retry.status == 200 and received(retry) == total, retry
    assert sha256_file(c.uploads / "killed-commit.bin") == digest
    again = send_one(c.server.url, path, sid, src, 2 * MiB, total, total)
    assert again.status == 200 and received(again) == total, again
    finish_and_check(c, path, sid, src, digest)


def test_sigkill_between_link_and_unlink(crashy: Crashy, tmp_path: Path) -> None:
    """Killed after the data file was hard-linked to its destination but before its
    session name was unlinked: the retried last fragment sees its own file there (not
    a conflict) and completes."""
    c = crashy
    total = 2 * MiB + 3
    src = tmp_path / "src.bin"
    digest = make_random_file(src, total)
    path = "/bits/killed-link.bin"
    sid = new_session(c.server.url, path)
    assert send_from(c.server.url, path, sid, src, 0, total, MiB) == MiB
    set_trigger(c.faults, "block-linked")
    try:
        with SlowFragment(c.server.url, path, sid, MiB, total - MiB, total) as last:
            last.send(read_range(src, MiB, total - MiB))
            pid = wait_reached(c.faults, "linked")
            assert (c.uploads / "killed-link.bin").exists()
            sigkill_worker(c.server, pid, WORKERS)
            assert last.response() is None
    finally:
        clear_trigger(c.faults, "block-linked")
    retry = send_one(c.server.url, path, sid, src, MiB, total, total)
    assert retry.status == 200 and received(retry) == total, retry
    finish_and_check(c, path, sid, src, digest)


STATE_UPDATES = {
    # id: (state fields the blocked save has, the fragment [first, last) that makes it)
    "mid-upload": ({"phase": RECEIVING, "received": MiB}, (0, MiB)),
    "completing": ({"phase": COMPLETE}, (2 * MiB, None)),
    "completing-torn": ({"phase": COMPLETE, "torn": True}, (2 * MiB, None)),
    "after-commit": ({"phase": FINISHED}, (2 * MiB, None)),
}


@pytest.mark.parametrize("when", list(STATE_UPDATES))
def test_sigkill_during_state_update(crashy: Crashy, tmp_path: Path, when: str) -> None:
    """Killed while saving the session state (before the new state.json replaces the
    old; "torn" leaves a half-written temporary file; "after-commit" is the save that
    follows placing the file): the retried fragment completes, byte-exact."""
    c = crashy
    match, (first, last) = STATE_UPDATES[when]
    total = 3 * MiB + 11
    last = total if last is None else last
    src = tmp_path / "src.bin"
    digest = make_random_file(src, total)
    name = f"killed-state-{when}.bin"
    path = "/bits/" + name
    sid = new_session(c.server.url, path)
    if first:
        assert send_from(c.server.url, path, sid, src, 0, total, first) == first

    set_trigger(c.faults, "block-write-state", match)
    try:
        with SlowFragment(c.server.url, path, sid, first, last - first, total) as slow:
            slow.send(read_range(src, first, last - first))
            pid = wait_reached(c.faults, "write-state")
            # Only the save after the commit finds the file already in place.
            assert (c.uploads / name).exists() == (when == "after-commit")
            sigkill_worker(c.server, pid, WORKERS)
            assert slow.response() is None
    finally:
        clear_trigger(c.faults, "block-write-state")

    # The client never got an Ack, so it sends the same fragment again.
    retry = send_one(c.server.url, path, sid, src, first, last, total)
    assert retry.status == 200 and is_ack(retry), retry
    assert received(retry) == last, retry
    assert send_from(c.server.url, path, sid, src, last, total) == total
    finish_and_check(c, path, sid, src, digest)


def flask_cli(base: Path, *args: str) -> str:
    """``flask bits ...`` on the example app, with the same folders as the server."""
    env = {**os.environ, **folders_env(base), "FLASK_APP": "example_app:create_app"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-m", "flask", "bits", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("ender", ["Close-Session", "Cancel-Session"])
def test_sigkill_while_removing_a_session(crashy: Crashy, tmp_path: Path, ender: str) -> None:
    """Killed after Close/Cancel took the session out of ``sessions/`` but before its
    files were deleted: the client's retry is answered 200 (the tombstone, A23), a
    completed file stays where it is, an incomplete one never appears, and
    ``flask bits cleanup`` removes the debris (the lock at once, the trash once stale)."""
    c = crashy
    total = 3 * MiB + 1
    complete = ender == "Close-Session"
    src = tmp_path / "src.bin"
    digest = make_random_file(src, total)
    name = f"killed-remove-{ender}.bin"
    path = "/bits/" + name
    sid = new_session(c.server.url, path)
    send_from(c.server.url, path, sid, src, 0, total, None if complete else 2 * MiB)

    set_trigger(c.faults, "block-rmtree")
    try:
        with RawPacket(c.server.url, path, ender, sid) as request:
            pid = wait_reached(c.faults, "rmtree")
            assert not (c.sessions / "sessions" / sid).exists()
            sigkill_worker(c.server, pid, WORKERS)
            assert request.response() is None
    finally:
        clear_trigger(c.faults, "block-rmtree")

    conn = wire.connect(c.server.url, timeout=60)
    try:
        retry = wire.bits_post(conn, path, ender, session_id=sid)
    finally:
        conn.close()
    assert retry.status == 200 and is_ack(retry), retry
    dest = c.uploads / name
    if complete:
        assert sha256_file(dest) == digest
    else:
        assert not dest.exists()

    flask_cli(c.base, "cleanup")
    assert not (c.sessions / "locks" / f"{sid}.lock").exists()
    debris = [p for p in (c.sessions / "trash").iterdir() if p.name.startswith(sid)]
    long_ago = time.time() - 2 * 86400
    for entry in debris:  # what a crash left in trash/ goes once it is stale
        os.utime(entry, (long_ago, long_ago))
    flask_cli(c.base, "cleanup")
    assert session_leftovers(c.sessions, sid) == []
    if complete:
        assert sha256_file(dest) == digest


@pytest.fixture
def other_fs(tmp_path: Path) -> t.Iterator[Path]:
    """An empty folder on another filesystem than ``tmp_path``: under /dev/shm, or on a
    tmpfs mounted for the test (as root)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        folder = Path(tempfile.mkdtemp(prefix="flask-bits-test-", dir=shm))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    mnt = tmp_path / "otherfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True, timeout=30, check=False,
    ).returncode != 0:
        pytest.skip("no second filesystem: /dev/shm is missing and tmpfs cannot be mounted")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)


@pytest.mark.parametrize(("point", "then"), [
    ("copied", "retry"), ("copied", "cancel"), ("linked", "retry"),
])
def test_sigkill_during_a_cross_filesystem_commit(
    tmp_path: Path, other_fs: Path, point: str, then: str
) -> None:
    """Upload folder and session folder on different filesystems: the commit copies the
    data to a temporary file beside the destination, then links it into place. Killed
    right after the copy, or right after the link: the retried last fragment completes
    byte-exact; a Cancel after the copy leaves nothing at the destination. Either way no
    temporary file stays in the upload folder, at the latest after ``flask bits
    cleanup``."""
    faults = tmp_path / "faults"
    faults.mkdir()
    uploads = other_fs / "uploads"
    sessions = tmp_path / "sessions"
    env = {**fault_env(faults), "BITS_UPLOAD_FOLDER": str(uploads),
           "BITS_SESSION_FOLDER": str(sessions)}
    total = 2 * MiB + 9
    src = tmp_path / "src.bin"
    digest = make_random_file(src, total)
    path = "/bits/across.bin"
    with GunicornServer(FAULT_APP, env=env, workers=WORKERS,
                        log_path=tmp_path / "gunicorn.log") as server:
        sid = new_session(server.url, path)
        assert send_from(server.url, path, sid, src, 0, total, MiB) == MiB
        set_trigger(faults, "block-" + point)
        try:
            with SlowFragment(server.url, path, sid, MiB, total - MiB, total) as last:
                last.send(read_range(src, MiB, total - MiB))
                pid = wait_reached(faults, point)
                assert upload_temp_files(uploads), "expected the copy beside the destination"
                assert (uploads / "across.bin").exists() == (point == "linked")
                sigkill_worker(server, pid, WORKERS)
                assert last.response() is None
        finally:
            clear_trigger(faults, "block-" + point)

        conn = wire.connect(server.url, timeout=60)
        try:
            if then == "retry":
                chunk = read_range(src, MiB, total - MiB)
                retry = wire.fragment(conn, path, sid, chunk, MiB, total)
                assert retry.status == 200 and received(retry) == total, retry
                assert sha256_file(uploads / "across.bin") == digest
                reply = wire.bits_post(conn, path, "Close-Session", session_id=sid)
            else:
                reply = wire.bits_post(conn, path, "Cancel-Session", session_id=sid)
        finally:
            conn.close()
        assert reply.status == 200 and is_ack(reply), reply
        if then == "cancel":
            assert not (uploads / "across.bin").exists()
        else:
            assert upload_temp_files(uploads) == [], "the retried commit left its copy"
            assert session_leftovers(sessions, sid) == []
            return

    env = {**os.environ, **env, "FLASK_APP": "example_app:create_app"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-m", "flask", "bits", "cleanup"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert session_leftovers(sessions, sid) == []
    assert upload_temp_files(uploads) == [], "a temporary copy was left in the upload folder"


@pytest.mark.parametrize(("kind", "stall_at"), [
    ("sync", 2 * MiB), ("gthread", MiB + MiB // 2),
], ids=["sync-aligned", "gthread-unaligned"])
def test_read_timeout_frees_a_stalled_session(tmp_path: Path, kind: str, stall_at: int) -> None:
    """BITS_READ_TIMEOUT=2: a client that stops sending mid-body does not hold the
    session: another packet is served within a bounded time, the bytes the server read
    are kept (all of them when the stall falls on its read size), and the upload
    resumes from the N it reports."""
    total = 4 * MiB
    src = tmp_path / "src.bin"
    digest = make_random_file(src, total)
    path = "/bits/stalled.bin"
    sessions = tmp_path / "sessions"
    env = folders_env(tmp_path, BITS_READ_TIMEOUT="2")
    threads = 2 if kind == "gthread" else 1
    with GunicornServer(env=env, workers=2, worker_class=kind, threads=threads,
                        log_path=tmp_path / "gunicorn.log") as server:
        sid = new_session(server.url, path)
        part = data_part(sessions, sid)
        with SlowFragment(server.url, path, sid, 0, total, total, timeout=20) as slow:
            slow.send(read_range(src, 0, stall_at))
            wait_until(lambda: file_size(part) >= MiB, 20, "the first bytes to be written")
            began = time.monotonic()
            offset = next_offset(server.url, path, sid, src, total)
            elapsed = time.monotonic() - began
            # The stalled request answers too (an error Ack), instead of hanging.
            answer = slow.response()
        assert elapsed < 2 + 6, f"the stalled fragment held the session for {elapsed:.1f}s"
        if answer is not None:  # the client may see it, if still listening: retryable
            status, headers = answer
            assert headers.get("bits-packet-type") == "Ack", answer
            assert status == 408 or status >= 500, answer
        if stall_at % MiB == 0:
            assert offset == stall_at
        else:
            assert stall_at - MiB < offset <= stall_at
        assert read_range(part, 0, offset) == read_range(src, 0, offset)
        assert send_from(server.url, path, sid, src, offset, total) == total
        close(server.url, path, sid)
    assert sha256_file(tmp_path / "uploads" / "stalled.bin") == digest
    assert folder_leftovers(sessions) == []
