"""Out of space and other I/O errors while storing fragments (PROTOCOL.md 7.3 step 8).

Disk full is real where the tests run as root: a size-limited tmpfs holds both the
session and the upload folder. Elsewhere (and always, in addition) the same path is
driven by fault injection (``fault_apps.py``). Either way: the failing fragment gets
500 with ``0x80070070`` and context ``0x5`` (A15), the acknowledged bytes stay intact,
and once space is back the upload completes byte-exact. Other I/O errors give a proper
error Ack (500, context 0x5) and a log line, never a traceback or an HTML page.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import typing as t
from pathlib import Path

import pytest
import wire
from fault_apps import FAULT_APP
from fault_apps import MiB
from fault_apps import clear_trigger
from fault_apps import data_part
from fault_apps import fault_env
from fault_apps import folder_leftovers
from fault_apps import folders_env
from fault_apps import is_ack
from fault_apps import make_random_file
from fault_apps import read_range
from fault_apps import received
from fault_apps import session_leftovers
from fault_apps import set_trigger
from fault_apps import sha256_file
from fault_apps import upload_temp_files
from servers import GunicornServer

pytestmark = pytest.mark.integration

DISK_FULL = "0x80070070"
E_FAIL = "0x80004005"
TMPFS_SIZE = 8 * MiB


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> t.Iterator[Path | None]:
    """A mounted 8 MiB tmpfs, or None where mounting is impossible (not root).

    ``FLASK_BITS_TEST_NO_MOUNT=1`` takes the fault-injection path even as root.
    """
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or os.environ.get("FLASK_BITS_TEST_NO_MOUNT") == "1":
        yield None
        return
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(mnt)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if result.returncode != 0:  # root without the right to mount (a container)
        yield None
        return
    try:
        yield mnt
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30,
                              check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30,
                           check=False)


class Faulty(t.NamedTuple):
    server: GunicornServer
    faults: Path
    uploads: Path
    sessions: Path
    log: Path


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Faulty]:
    base = tmp_path_factory.mktemp("io-faults")
    faults = base / "faults"
    faults.mkdir()
    env = {**folders_env(base), **fault_env(faults)}
    log = base / "gunicorn.log"
    with GunicornServer(FAULT_APP, env=env, workers=2, log_path=log) as server:
        yield Faulty(server, faults, base / "uploads", base / "sessions", log)


# -- helpers --------------------------------------------------------------------------


def fragment_at(
    base_url: str, path: str, sid: str, src: Path, first: int, length: int, total: int
) -> wire.Reply:
    return wire.fragment(base_url, path, sid, read_range(src, first, length), first, total)


def packet(base_url: str, path: str, kind: str, sid: str | None = None) -> wire.Reply:
    return wire.bits_post(base_url, path, kind, session_id=sid)


def upload_until_error(
    base_url: str, path: str, sid: str, src: Path, offset: int, total: int,
    until: int | None = None,
) -> tuple[int, wire.Reply | None]:
    """Send 1 MiB fragments of ``src`` (``total`` bytes) from ``offset`` up to ``until``
    (the end); stop at the first non-200. Returns the last acknowledged N and the
    failing reply (None if ``until`` was reached)."""
    until = total if until is None else until
    while offset < until:
        reply = fragment_at(base_url, path, sid, src, offset, min(MiB, until - offset), total)
        if reply.status != 200:
            return offset, reply
        assert is_ack(reply), reply
        offset = received(reply)
    return offset, None


def probe(base_url: str, path: str, sid: str, src: Path, total: int) -> int:
    """N, asked with the file's last byte (416 unless only that byte is missing)."""
    reply = fragment_at(base_url, path, sid, src, total - 1, 1, total)
    assert is_ack(reply) and reply.status in (200, 416), reply
    return received(reply)


def assert_error_ack(reply: wire.Reply, code: str | None, sid: str, acked: int, total: int) -> None:
    """500, context 0x5, the expected (or some specific, non-generic) HRESULT, no body,
    no HTML; a BITS-Received-Content-Range, if sent, is not below what was acknowledged."""
    assert reply.status == 500 and is_ack(reply), reply
    assert reply.get("Content-Type") is None or "html" not in reply.get("Content-Type", ""), reply
    assert reply.get("BITS-Error-Context") == "0x5", reply
    value = reply.get("BITS-Error-Code")
    if code is not None:
        assert value == code, reply
    else:
        assert value is not None and value.startswith("0x8"), reply
        assert value not in (DISK_FULL, E_FAIL), reply
    assert reply.get("BITS-Session-Id") == sid, reply
    if reply.get("BITS-Received-Content-Range") is not None:
        assert acked <= received(reply) <= total, reply


def finish(base_url: str, path: str, sid: str, src: Path, offset: int, total: int) -> None:
    end, failed = upload_until_error(base_url, path, sid, src, offset, total)
    assert failed is None and end == total, failed
    reply = packet(base_url, path, "Close-Session", sid)
    assert reply.status == 200 and is_ack(reply), reply


# -- disk full ------------------------------------------------------------------------


def test_disk_full_for_real_or_injected(tmp_path: Path, tmpfs: Path | None) -> None:
    """ENOSPC on a real, full tmpfs when running as root; injected ENOSPC otherwise."""
    if tmpfs is None:
        faults = tmp_path / "faults"
        faults.mkdir()
        base = tmp_path / "folders"
        env = {**folders_env(base), **fault_env(faults)}
        app = FAULT_APP
        set_trigger(faults, "fail-pwrite", {"errno": "ENOSPC", "after": 4 * MiB + 12345})
        total = 7 * MiB + 3
    else:
        base = tmpfs
        env = folders_env(base)
        app = "example_app:create_app()"
        total = 7 * MiB + 3  # with a 3 MiB filler: more than the 8 MiB there are
        filler = base / "filler.bin"
        make_random_file(filler, 3 * MiB)
    src = tmp_path / "source.bin"
    digest = make_random_file(src, total)
    path = "/bits/too-big.bin"

    with GunicornServer(app, env=env, workers=2, log_path=tmp_path / "gunicorn.log") as server:
        sid = packet(server.url, path, "Create-Session").get("BITS-Session-Id")
        assert sid
        acked, failed = upload_until_error(server.url, path, sid, src, 0, total)
        assert failed is not None, "the upload never ran out of space"
        assert acked >= MiB, "expected some fragments to fit before the disk filled up"
        assert_error_ack(failed, DISK_FULL, sid, acked, total)

        # Still full: the same fragment fails the same way; nothing acknowledged is lost.
        again = fragment_at(server.url, path, sid, src, acked, min(MiB, total - acked), total)
        assert_error_ack(again, DISK_FULL, sid, acked, total)
        held = probe(server.url, path, sid, src, total)
        assert acked <= held < total
        part = data_part(base / "sessions", sid)
        assert read_range(part, 0, held) == read_range(src, 0, held)
        top_up = None
        if tmpfs is not None:
            # A failed write is cut back, so fill what it freed: then there is no space
            # for a new session either (7.2 step 6), and no half-made one is left.
            top_up = fill_up(base, "top-up.bin")
            create = packet(server.url, "/bits/another.bin", "Create-Session")
            assert create.status == 500 and is_ack(create), create
            assert create.get("BITS-Error-Code") == DISK_FULL, create
            assert create.get("BITS-Session-Id") is None, create
            assert os.listdir(base / "sessions" / "staging") == []

        # Space is back: the upload resumes from N and completes byte-exact.
        if tmpfs is None:
            clear_trigger(faults, "fail-pwrite")
        else:
            filler.unlink()
            assert top_up is not None
            top_up.unlink()
        finish(server.url, path, sid, src, held, total)

    assert sha256_file(base / "uploads" / "too-big.bin") == digest
    assert session_leftovers(base / "sessions", sid) == []
    assert folder_leftovers(base / "sessions") == []
    assert upload_temp_files(base / "uploads") == []


def fill_up(folder: Path, name: str = "filler.bin") -> Path:
    """Write a filler file into ``folder`` until its filesystem has no space left."""
    filler = folder / name
    block = os.urandom(64 * 1024)
    with open(filler, "wb", buffering=0) as f:
        for _ in range(TMPFS_SIZE // len(block) + 1):
            try:
                f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError("the filesystem never filled up")
    return filler


@pytest.mark.parametrize("ender", ["Cancel-Session", "Close-Session"])
def test_ending_a_session_on_a_full_disk_frees_its_space(
    tmp_path: Path, tmpfs: Path | None, ender: str
) -> None:
    """On a full disk, Cancel-Session (or Close-Session of an incomplete upload) still
    releases the session's data and answers 200 (7.4, 7.5: "answer 200 after releasing
    resources"); bookkeeping that needs space must not keep the space taken. Where no
    tmpfs can be mounted, the tombstone write fails with an injected ENOSPC instead."""
    faults = tmp_path / "faults"
    faults.mkdir()
    if tmpfs is None:
        base = tmp_path / "folders"
        env = {**folders_env(base), **fault_env(faults)}
        app = FAULT_APP
    else:
        base = tmpfs
        env = folders_env(base)
        app = "example_app:create_app()"
    total = 5 * MiB
    src = tmp_path / "source.bin"
    make_random_file(src, total)
    path = "/bits/victim.bin"

    with GunicornServer(app, env=env, workers=2, log_path=tmp_path / "gunicorn.log") as server:
        sid = packet(server.url, path, "Create-Session").get("BITS-Session-Id")
        assert sid
        acked, failed = upload_until_error(server.url, path, sid, src, 0, total, 3 * MiB)
        assert failed is None and acked == 3 * MiB
        if tmpfs is None:
            set_trigger(faults, "fail-tombstone", {"errno": "ENOSPC", "once": True})
        else:
            fill_up(base)
            assert os.statvfs(base).f_bavail == 0

        reply = packet(server.url, path, ender, sid)
        assert reply.status == 200 and is_ack(reply), reply
        assert reply.get("BITS-Session-Id") == sid
        if tmpfs is None:
            assert (faults / "hit-fail-tombstone").exists(), "the fault was not injected"
        else:
            free = os.statvfs(base)
            assert free.f_bavail * free.f_frsize >= 3 * MiB - 64 * 1024, "space not freed"
        assert not (base / "uploads" / "victim.bin").exists()
        assert session_leftovers(base / "sessions", sid) == []
        assert folder_leftovers(base / "sessions") == []

        # The client's repeat (its Ack was lost) is answered 200 as well (A23).
        again = packet(server.url, path, ender, sid)
        assert again.status == 200 and is_ack(again), again


# -- injected I/O errors --------------------------------------------------------------

INJECTED = {
    # id: (trigger, spec, expected HRESULT or None for "a specific non-generic one")
    "ENOSPC-write": ("fail-pwrite", {"errno": "ENOSPC", "after": MiB + MiB // 2}, DISK_FULL),
    "EIO-write": ("fail-pwrite", {"errno": "EIO", "after": MiB + 100}, None),
    "EACCES-open": ("fail-open", {"errno": "EACCES"}, None),
}


@pytest.mark.parametrize("case", list(INJECTED))
def test_injected_io_error(faulty: Faulty, tmp_path: Path, case: str) -> None:
    """An I/O error in the middle of a fragment: a proper 500 error Ack with context 0x5
    and a log line naming the cause; the acknowledged bytes stay; the client's retry
    after the fault clears completes the file byte-exact."""
    trigger, spec, code = INJECTED[case]
    total = 3 * MiB + 7
    src = tmp_path / "source.bin"
    digest = make_random_file(src, total)
    name = f"injected-{case}.bin"
    path = "/bits/" + name
    url = faulty.server.url
    sid = packet(url, path, "Create-Session").get("BITS-Session-Id")
    assert sid
    first = fragment_at(url, path, sid, src, 0, MiB, total)
    assert first.status == 200 and received(first) == MiB, first

    set_trigger(faulty.faults, trigger, spec)
    try:
        failed = fragment_at(url, path, sid, src, MiB, MiB, total)
        assert_error_ack(failed, code, sid, MiB, total)
    finally:
        clear_trigger(faulty.faults, trigger)

    assert probe(url, path, sid, src, total) == MiB
    assert read_range(data_part(faulty.sessions, sid), 0, MiB) == read_range(src, 0, MiB)
    finish(url, path, sid, src, MiB, total)
    assert sha256_file(faulty.uploads / name) == digest
    assert session_leftovers(faulty.sessions, sid) == []

    log = faulty.log.read_text(errors="replace")
    lines = [line for line in log.splitlines() if sid in line and "500" in line]
    assert lines, f"no log line for the failed fragment of {sid}"
    if code != DISK_FULL:
        cause = os.strerror(getattr(errno, spec["errno"]))
        assert cause in log, f"the log does not name the cause ({cause!r})"


def test_no_leftovers_after_injected_errors(faulty: Faulty) -> None:
    """Runs after the injected errors above (module order): no debris in either folder."""
    with contextlib.suppress(FileNotFoundError):
        assert [n for n in os.listdir(faulty.faults) if not n.startswith("hit-")] == []
    assert folder_leftovers(faulty.sessions) == []
    assert upload_temp_files(faulty.uploads) == []
