"""SessionStore without Flask or HTTP: create, open, write, commit, remove, cleanup."""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_bits.errors import DestinationExists
from flask_bits.errors import DiskFull
from flask_bits.errors import InvalidRequest
from flask_bits.errors import SessionBusy
from flask_bits.errors import SessionNotFound
from flask_bits.errors import StorageError
from flask_bits.errors import TooManySessions
from flask_bits.protocol import new_session_id
from flask_bits.server import BITSServer
from flask_bits.store import RECEIVING
from flask_bits.store import SessionGone
from flask_bits.store import SessionState
from flask_bits.store import SessionStore
from flask_bits.store import io_error
from tests.conftest import create_session
from tests.conftest import session_leftovers

DAY = 24 * 3600.0


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(str(tmp_path / "sessions"), lock_timeout=2.0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


def make_state(
    *,
    directory: str = "bits",
    remote_path: str = "file.bin",
    owner: str | None = None,
    last_activity: float | None = None,
    timeout: float = DAY,
) -> SessionState:
    now = time.time()
    return SessionState(
        id=new_session_id(),
        directory=directory,
        remote_path=remote_path,
        url="http://localhost/bits/" + remote_path,
        owner=owner,
        protocol="{7df0354d-249b-430f-820d-3d2a9bef4931}",
        created=now if last_activity is None else last_activity,
        last_activity=now if last_activity is None else last_activity,
        timeout=timeout,
    )


def new_session(store: SessionStore, **kwargs: t.Any) -> SessionState:
    state = make_state(**kwargs)
    store.create(state, owner_limit=None, total_limit=None)
    return state


def open_session(store: SessionStore, state: SessionState, **kwargs: t.Any) -> t.Any:
    kwargs.setdefault("directory", state.directory)
    kwargs.setdefault("owner", state.owner)
    return store.open(state.id, **kwargs)


def fill(store: SessionStore, state: SessionState, data: bytes) -> None:
    """Receive ``data`` as the whole file and mark it received."""
    with open_session(store, state) as session:
        assert session.write(0, 0, len(data), io.BytesIO(data)) == len(data)
        session.state.total = len(data)
        session.state.received = len(data)
        session.save()


# -- create / open ----------------------------------------------------------------------


def test_create_makes_a_complete_session_folder(store: SessionStore) -> None:
    state = new_session(store)
    folder = Path(store.session_dir(state.id))
    assert sorted(p.name for p in folder.iterdir()) == ["data.part", "state.json"]
    assert (folder / "data.part").read_bytes() == b""
    saved = json.loads((folder / "state.json").read_text())
    assert saved["id"] == state.id
    assert saved["remote_path"] == "file.bin"
    assert saved["received"] == 0
    assert saved["total"] is None
    assert os.listdir(os.path.join(store.folder, "staging")) == []
    assert store.count() == 1
    peeked = store.peek(state.id.lower())
    assert peeked is not None and peeked.id == state.id


def test_open_yields_the_locked_session(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state, remote_path="file.bin") as session:
        assert session.id == state.id
        assert session.state.phase == RECEIVING
        assert os.path.exists(store.locker.path(state.id))


def test_open_accepts_any_case_of_the_id(store: SessionStore) -> None:
    state = new_session(store)
    with store.open(state.id.lower(), directory="bits", owner=None) as session:
        assert session.id == state.id


@pytest.mark.parametrize(
    "kwargs",
    [
        {"directory": "other"},
        {"owner": "mallory"},
        {"remote_path": "other.bin"},
    ],
)
def test_open_treats_foreign_sessions_as_unknown(
    store: SessionStore, kwargs: dict[str, t.Any]
) -> None:
    state = new_session(store)
    with pytest.raises(SessionNotFound):
        with open_session(store, state, **kwargs):
            pass  # pragma: no cover


def test_open_binds_sessions_to_their_owner(store: SessionStore) -> None:
    state = new_session(store, owner="alice")
    with pytest.raises(SessionNotFound):
        with open_session(store, state, owner=None):
            pass  # pragma: no cover
    with open_session(store, state, owner="alice") as session:
        assert session.state.owner == "alice"


@pytest.mark.parametrize("sid", [None, "", "nope", "../../etc/passwd", "{}"])
def test_open_unknown_or_malformed_ids(store: SessionStore, sid: str | None) -> None:
    with pytest.raises(SessionNotFound):
        with store.open(sid, directory="bits", owner=None):
            pass  # pragma: no cover


def test_open_unknown_guid_leaves_no_lock_file(store: SessionStore) -> None:
    sid = new_session_id()
    with pytest.raises(SessionNotFound):
        with store.open(sid, directory="bits", owner=None):
            pass  # pragma: no cover
    assert session_leftovers(store.folder, sid) == []


def test_state_from_json_ignores_unknown_keys() -> None:
    state = make_state()
    data = {f: getattr(state, f) for f in ("id", "directory", "remote_path", "url", "owner",
                                            "protocol", "created", "last_activity", "timeout")}
    data["from_a_newer_version"] = 1
    assert SessionState.from_json(data) == state


# -- limits --------------------------------------------------------------------------------


def test_owner_session_limit(store: SessionStore) -> None:
    first = make_state(owner="alice")
    store.create(first, owner_limit=2, total_limit=None)
    store.create(make_state(owner="alice"), owner_limit=2, total_limit=None)
    with pytest.raises(TooManySessions) as info:
        store.create(make_state(owner="alice"), owner_limit=2, total_limit=None)
    assert info.value.status == 503
    store.create(make_state(owner="bob"), owner_limit=2, total_limit=None)  # per owner
    with open_session(store, first) as session:
        session.remove("closed")
    store.create(make_state(owner="alice"), owner_limit=2, total_limit=None)
    assert store.count() == 3


def test_total_session_limit(store: SessionStore) -> None:
    store.create(make_state(), owner_limit=None, total_limit=1)
    with pytest.raises(TooManySessions):
        store.create(make_state(), owner_limit=None, total_limit=1)
    assert store.count() == 1


# -- write --------------------------------------------------------------------------------


def test_write_streams_bytes_at_the_offset(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state) as session:
        assert session.write(0, 0, 5, io.BytesIO(b"hello")) == 5
        assert session.write(5, 0, 6, io.BytesIO(b" world")) == 6
    assert Path(store.data_path(state.id)).read_bytes() == b"hello world"


def test_write_skips_the_overlap(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state) as session:
        session.write(0, 0, 4, io.BytesIO(b"abcd"))
        # A fragment for bytes 2..7 of which 2..3 are held: skip 2, write 4 at offset 4.
        assert session.write(4, 2, 4, io.BytesIO(b"XXefgh")) == 4
    assert Path(store.data_path(state.id)).read_bytes() == b"abcdefgh"


def test_write_reports_a_short_body(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state) as session:
        assert session.write(0, 0, 10, io.BytesIO(b"abc")) == 3
        assert session.write(3, 5, 10, io.BytesIO(b"abc")) == 0  # ended inside the skip
    assert Path(store.data_path(state.id)).read_bytes() == b"abc"


def test_write_larger_than_the_chunk_size(store: SessionStore) -> None:
    data = os.urandom(2 * 1024 * 1024 + 123)
    state = new_session(store)
    with open_session(store, state) as session:
        assert session.write(0, 0, len(data), io.BytesIO(data)) == len(data)
    assert Path(store.data_path(state.id)).read_bytes() == data


def test_write_buffers_are_reused_and_bounded(store: SessionStore) -> None:
    """Concurrent fragments never share a buffer; afterwards a few spares are kept for
    reuse, not one per request that was ever in flight."""
    from flask_bits import store as store_module

    taken = [store_module._take_buffer() for _ in range(store_module.SPARE_BUFFERS + 4)]
    assert len({id(b.obj) for b in taken}) == len(taken)
    assert all(len(b) == store_module.BUFFER_SIZE for b in taken)
    for buf in taken:
        store_module._give_back(buf)
    assert len(store_module._spare_buffers) == store_module.SPARE_BUFFERS
    spare = set(map(id, store_module._spare_buffers))
    state = new_session(store)
    data = os.urandom(3 * store_module.BUFFER_SIZE + 5)
    with open_session(store, state) as session:
        assert session.write(0, 0, len(data), io.BytesIO(data)) == len(data)
    assert Path(store.data_path(state.id)).read_bytes() == data
    # The write borrowed a spare buffer and gave it back.
    assert set(map(id, store_module._spare_buffers)) == spare


def test_write_with_a_read_only_stream(store: SessionStore) -> None:
    class Reader:
        def __init__(self, data: bytes) -> None:
            self.buf = io.BytesIO(data)

        def read(self, n: int) -> bytes:
            return self.buf.read(min(n, 3))  # short reads, no readinto

    state = new_session(store)
    with open_session(store, state) as session:
        assert session.write(0, 2, 8, t.cast(t.IO[bytes], Reader(b"..01234567"))) == 8
    assert Path(store.data_path(state.id)).read_bytes() == b"01234567"


def test_save_persists_and_touches(store: SessionStore) -> None:
    state = new_session(store, last_activity=1000.0)
    with open_session(store, state) as session:
        session.state.received = 7
        session.save()
    fresh = store.peek(state.id)
    assert fresh is not None
    assert fresh.received == 7
    assert fresh.last_activity > 1000.0


# -- commit --------------------------------------------------------------------------------


def test_commit_places_the_file_atomically(store: SessionStore, root: Path) -> None:
    state = new_session(store)
    fill(store, state, b"payload")
    with open_session(store, state) as session:
        session.commit(str(root), ("file.bin",), allow_overwrite=False, conflict_status=409)
        assert session.state.committed is True
        session.save()
    assert (root / "file.bin").read_bytes() == b"payload"
    assert not os.path.exists(store.data_path(state.id))  # moved, not copied
    assert sorted(os.listdir(root)) == ["file.bin"]  # no temporary files left


def test_commit_into_a_subfolder(store: SessionStore, root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    state = new_session(store, remote_path="a/b/file.bin")
    fill(store, state, b"deep")
    with open_session(store, state) as session:
        session.commit(str(root), ("a", "b", "file.bin"), allow_overwrite=False,
                       conflict_status=409)
    assert (root / "a" / "b" / "file.bin").read_bytes() == b"deep"


@pytest.mark.parametrize("status", [409, 403])
def test_commit_refuses_to_overwrite(store: SessionStore, root: Path, status: int) -> None:
    (root / "file.bin").write_bytes(b"old")
    state = new_session(store)
    fill(store, state, b"new")
    with open_session(store, state) as session:
        with pytest.raises(DestinationExists) as info:
            session.commit(str(root), ("file.bin",), allow_overwrite=False,
                           conflict_status=status)
        assert session.state.committed is False
    assert info.value.status == status
    assert info.value.hresult == 0x80070005
    assert (root / "file.bin").read_bytes() == b"old"
    assert Path(store.data_path(state.id)).read_bytes() == b"new"  # kept for a retry


def test_commit_with_overwrites_replaces(store: SessionStore, root: Path) -> None:
    (root / "file.bin").write_bytes(b"old")
    state = new_session(store)
    fill(store, state, b"new")
    with open_session(store, state) as session:
        session.commit(str(root), ("file.bin",), allow_overwrite=True, conflict_status=409)
    assert (root / "file.bin").read_bytes() == b"new"


def test_commit_over_a_symlink_replaces_the_link_not_its_target(
    store: SessionStore, root: Path, tmp_path: Path
) -> None:
    target = tmp_path / "outside.txt"
    target.write_bytes(b"do not touch")
    (root / "file.bin").symlink_to(target)
    state = new_session(store)
    fill(store, state, b"new")
    with open_session(store, state) as session:
        session.commit(str(root), ("file.bin",), allow_overwrite=True, conflict_status=409)
    assert not (root / "file.bin").is_symlink()
    assert (root / "file.bin").read_bytes() == b"new"
    assert target.read_bytes() == b"do not touch"


def test_commit_onto_a_folder_is_400(store: SessionStore, root: Path) -> None:
    (root / "file.bin").mkdir()
    state = new_session(store)
    fill(store, state, b"x")
    with open_session(store, state) as session:
        with pytest.raises(InvalidRequest):
            session.commit(str(root), ("file.bin",), allow_overwrite=True, conflict_status=409)
    assert (root / "file.bin").is_dir()


def test_commit_is_repeatable_after_a_crash_between_link_and_unlink(
    store: SessionStore, root: Path
) -> None:
    state = new_session(store)
    fill(store, state, b"abc")
    os.link(store.data_path(state.id), root / "file.bin")  # the link happened, then a crash
    with open_session(store, state) as session:
        session.commit(str(root), ("file.bin",), allow_overwrite=False, conflict_status=409)
    assert (root / "file.bin").read_bytes() == b"abc"
    assert not os.path.exists(store.data_path(state.id))


# -- remove / tombstones -------------------------------------------------------------------


def test_remove_leaves_only_a_tombstone(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state) as session:
        session.remove("closed")
        assert session.removed
    assert session_leftovers(store.folder, state.id) == []
    assert os.listdir(os.path.join(store.folder, "trash")) == []
    tomb = store.tombstone(state.id)
    assert tomb is not None
    assert (tomb.id, tomb.kind, tomb.directory, tomb.owner) == (state.id, "closed", "bits", None)
    with pytest.raises(SessionGone) as info:
        with open_session(store, state):
            pass  # pragma: no cover
    assert info.value.tombstone.kind == "closed"
    assert store.count() == 0


def test_tombstone_of_another_directory_or_owner_is_unknown(store: SessionStore) -> None:
    state = new_session(store, owner="alice")
    with open_session(store, state) as session:
        session.remove("cancelled")
    for kwargs in ({"directory": "other"}, {"owner": "bob"}):
        with pytest.raises(SessionNotFound):
            with open_session(store, state, **kwargs):
                pass  # pragma: no cover


def test_remove_without_tombstone(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state) as session:
        session.remove("expired", tombstone=False)
    assert store.tombstone(state.id) is None
    assert session_leftovers(store.folder, state.id) == []
    with pytest.raises(SessionNotFound):
        with open_session(store, state):
            pass  # pragma: no cover


def test_remove_keeps_a_committed_file(store: SessionStore, root: Path) -> None:
    state = new_session(store)
    fill(store, state, b"keep me")
    with open_session(store, state) as session:
        session.commit(str(root), ("file.bin",), allow_overwrite=False, conflict_status=409)
        session.remove("cancelled")
    assert (root / "file.bin").read_bytes() == b"keep me"


def test_remove_by_id(store: SessionStore) -> None:
    state = new_session(store, owner="alice")
    assert store.remove_by_id(state.id.lower(), kind="cancelled") is True
    assert store.remove_by_id(state.id, kind="cancelled") is False
    assert store.remove_by_id("garbage", kind="cancelled") is False
    tomb = store.tombstone(state.id)
    assert tomb is not None and tomb.kind == "cancelled"
    assert session_leftovers(store.folder, state.id) == []


def test_iter_states_lists_every_session(store: SessionStore) -> None:
    ids = sorted(new_session(store).id for _ in range(3))
    assert [s.id for s in store.iter_states()] == ids


# -- cleanup (PROTOCOL.md 10) --------------------------------------------------------------


def test_cleanup_removes_expired_sessions_only(store: SessionStore) -> None:
    now = time.time()
    old = new_session(store, last_activity=now - 2 * DAY, timeout=DAY)
    young = new_session(store, last_activity=now - 10, timeout=DAY)
    fill(store, young, b"x")  # touching it keeps it young
    removed = store.cleanup(now=now, tombstone_timeout=DAY)
    assert ("session", old.id) in removed
    assert all(ident != young.id for _, ident in removed)
    assert session_leftovers(store.folder, old.id) == []
    assert store.tombstone(old.id) is None  # expiry leaves no tombstone
    assert store.peek(young.id) is not None
    assert store.cleanup(now=now, tombstone_timeout=DAY) == []  # idempotent


def test_cleanup_uses_the_session_timeout_of_each_session(store: SessionStore) -> None:
    now = time.time()
    short = new_session(store, last_activity=now, timeout=60)
    long = new_session(store, last_activity=now, timeout=DAY)
    removed = store.cleanup(now=now + 61, tombstone_timeout=DAY)
    assert removed == [("session", short.id)]
    assert store.peek(long.id) is not None
    assert store.cleanup(now=now + DAY + 1, tombstone_timeout=2 * DAY) == [("session", long.id)]


def test_cleanup_removes_expired_tombstones(store: SessionStore) -> None:
    state = new_session(store)
    with open_session(store, state) as session:
        session.remove("closed")
    now = time.time()
    assert store.cleanup(now=now, tombstone_timeout=DAY) == []
    assert store.tombstone(state.id) is not None
    assert store.cleanup(now=now + DAY + 1, tombstone_timeout=DAY) == [("tombstone", state.id)]
    assert store.tombstone(state.id) is None
    with pytest.raises(SessionNotFound):
        with open_session(store, state):
            pass  # pragma: no cover


def test_cleanup_skips_a_busy_session(store: SessionStore) -> None:
    now = time.time()
    state = new_session(store, last_activity=now - 2 * DAY, timeout=DAY)
    with open_session(store, state):
        assert store.cleanup(now=now, tombstone_timeout=DAY) == []
    assert store.peek(state.id) is not None
    assert store.cleanup(now=now, tombstone_timeout=DAY) == [("session", state.id)]


def test_cleanup_removes_stale_debris(store: SessionStore) -> None:
    staging = Path(store.folder) / "staging" / "{DEAD}"
    trash = Path(store.folder) / "trash" / "{DEAD}.1.2"
    staging.mkdir()
    trash.mkdir()
    (trash / "data.part").write_bytes(b"x")
    now = time.time()
    assert store.cleanup(now=now, tombstone_timeout=DAY) == []
    removed = store.cleanup(now=now + 7200, tombstone_timeout=DAY, stale_after=3600)
    assert ("staging", "{DEAD}") in removed
    assert ("trash", "{DEAD}.1.2") in removed
    assert not staging.exists() and not trash.exists()


def test_cleanup_prunes_orphan_lock_files(store: SessionStore) -> None:
    sid = new_session_id()
    lock = Path(store.locker.path(sid))
    lock.write_bytes(b"")
    live = new_session(store)
    with open_session(store, live):
        pass
    removed = store.cleanup(now=time.time(), tombstone_timeout=DAY)
    assert ("lock", sid) in removed
    assert not lock.exists()
    assert store.peek(live.id) is not None


# -- io errors -----------------------------------------------------------------------------


def test_io_error_mapping() -> None:
    assert isinstance(io_error(OSError(errno.ENOSPC, "full"), "testing"), DiskFull)
    assert io_error(OSError(errno.ENOSPC, "full"), "testing").hresult == 0x80070070
    assert isinstance(io_error(OSError(errno.EDQUOT, "quota"), "testing"), DiskFull)
    other = io_error(OSError(errno.EIO, "io"), "testing")
    assert isinstance(other, StorageError)
    assert other.status == 500


def test_lock_timeout_gives_session_busy(tmp_path: Path) -> None:
    store = SessionStore(str(tmp_path / "s"), lock_timeout=0.05)
    state = new_session(store)
    with open_session(store, state):
        other = SessionStore(str(tmp_path / "s"), lock_timeout=0.05)
        with pytest.raises(SessionBusy):
            with open_session(other, state):
                pass  # pragma: no cover


# -- opportunistic cleanup by the server ---------------------------------------------------


def test_server_starts_a_background_cleanup_on_create_session(
    make_app: t.Callable[..., Flask], session_folder: Path
) -> None:
    app = make_app(BITS_CLEANUP_INTERVAL=3600)
    server: BITSServer = app.extensions["bits"]["bits"]
    expired = make_state(last_activity=time.time() - 30 * DAY)
    server.store.create(expired, owner_limit=None, total_limit=None)
    before = set(threading.enumerate())
    create_session(app.test_client(), "/bits/new.bin")
    sweepers = [th for th in threading.enumerate()
                if th not in before and th.name == "flask-bits-cleanup"]
    for th in sweepers:
        th.join(timeout=10)
    assert server.store.peek(expired.id) is None
    assert (session_folder / "cleanup.stamp").exists()


def test_server_cleanup_method(bits: BITSServer) -> None:
    expired = make_state(last_activity=time.time() - 30 * DAY)
    bits.store.create(expired, owner_limit=None, total_limit=None)
    assert bits.cleanup() == [("session", expired.id)]
    assert bits.cleanup() == []
