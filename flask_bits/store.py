"""The filesystem session store: create, lock, write ranges, commit, remove, expire.

Knows files and locks, not HTTP. Layout under the session folder::

    sessions/<id>/state.json    the session record (JSON, replaced atomically)
    sessions/<id>/data.part     the bytes received so far (the "request entity")
    sessions/<id>/reply/        the reply of an upload-reply job, if any
    staging/<id>/               a session being created (renamed into sessions/)
    tombstones/<id>.json        closed or cancelled sessions, answered with 200
    owners/<hash>/<id>          one marker per session of an identified owner
    locks/<id>.lock             per-session lock files, outside the deleted folders
    trash/                      removed session folders on their way out

No session state is kept in process memory: any worker process, or any node sharing
the folder, serves any packet. The state's ``received`` is the truth: data is written
before the state that acknowledges it, so a crash never acknowledges bytes the server
does not hold.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import typing as t
from contextlib import contextmanager
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields

from . import paths
from .errors import BITSError
from .errors import BodyTimeout
from .errors import DestinationExists
from .errors import DiskFull
from .errors import InvalidRequest
from .errors import SessionBusy
from .errors import SessionNotFound
from .errors import StorageError
from .errors import TooManySessions
from .locking import LockHandle
from .locking import SessionLocker
from .protocol import canonical_session_id

log = logging.getLogger("flask_bits")

#: Size of the reads from a body without ``readinto`` (gunicorn's own ``wsgi.input``,
#: when :mod:`flask_bits.direct_input` cannot be used). 1 MiB is gunicorn's read-ahead
#: (SocketUnreader.max_body_chunk): with smaller reads its Unreader copies what is left
#: of its buffer again on every read. A body stalling mid-read (BITS_READ_TIMEOUT) loses
#: at most one read; the client resends it.
CHUNK_SIZE = 1024 * 1024

#: Size of the reusable buffers a fragment is read into where the body offers
#: ``readinto`` (:mod:`flask_bits.direct_input` under gunicorn, werkzeug's streams).
#: 256 KiB stays in the CPU's cache between the ``recv`` and the ``pwrite``; in the
#: benchmark it beat 1 MiB on w3 and kept workers smaller (bench/README.md).
BUFFER_SIZE = 256 * 1024

#: How many spare buffers a process keeps for reuse (more are made while more
#: fragments are in flight, and dropped afterwards).
SPARE_BUFFERS = 8

#: A fragment rewrites the state file only for this idle-timer precision (seconds), or
#: a tenth of the session timeout when that is shorter.
ACTIVITY_PRECISION = 60.0

# Session phases (PROTOCOL.md 5.3): RECEIVE_FRAGMENTS is split into "receiving" and
# "complete" (all bytes held, final step not finished); WAIT_FOR_CLOSE is "finished".
RECEIVING = "receiving"
COMPLETE = "complete"
FINISHED = "finished"


@dataclass(slots=True)
class SessionState:
    """The session record of PROTOCOL.md 5.2, as stored in ``state.json``."""

    id: str
    directory: str
    remote_path: str
    url: str
    owner: str | None
    protocol: str
    created: float
    last_activity: float
    timeout: float
    total: int | None = None
    received: int = 0
    phase: str = RECEIVING
    content_name: str | None = None
    #: The Ack of the completing fragment, replayed to retries (status, headers, error).
    final_ack: dict[str, t.Any] | None = None
    #: Upload-reply progress (see :mod:`flask_bits.reply`).
    forward: dict[str, t.Any] | None = None
    #: The destination file is in place.
    committed: bool = False
    extra: dict[str, t.Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, t.Any]) -> SessionState:
        """The state from its decoded ``state.json``; unknown keys are ignored."""
        if data.keys() <= _STATE_FIELDS:
            return cls(**data)
        return cls(**{k: v for k, v in data.items() if k in _STATE_FIELDS})


_STATE_FIELDS = frozenset(f.name for f in fields(SessionState))


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a closed or cancelled session (PROTOCOL.md 6, A23)."""

    id: str
    directory: str
    owner: str | None
    kind: str
    time: float
    remote_path: str | None = None


def _read_small_file(path: str) -> bytes:
    """The whole of a small file (a session's state), read without a file object."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:  # an unusually large state: read the rest
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return data


def io_error(exc: OSError, what: str) -> BITSError:
    """Map an ``OSError`` to the error Ack for it (PROTOCOL.md 7.3 step 8)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull()
    log.error("I/O error while %s: %s", what, exc)
    return StorageError()


class SessionStore:
    """Sessions on the filesystem under ``folder``.

    :param folder: the session folder (created if missing).
    :param lock_timeout: longest wait for a session lock, in seconds.
    :param fsync: fsync data and state before acknowledging, and the folder after a
        commit, so acknowledged bytes survive power loss.
    """

    def __init__(self, folder: str, *, lock_timeout: float = 10.0, fsync: bool = False):
        self.folder = os.path.abspath(folder)
        self.fsync = fsync
        for sub in ("sessions", "staging", "tombstones", "owners", "trash"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        self.locker = SessionLocker(os.path.join(self.folder, "locks"), timeout=lock_timeout)
        # Session ids are canonical ({GUID}) before they reach a path: plain concatenation
        # is safe, and cheaper than os.path.join on every packet.
        self._sessions = os.path.join(self.folder, "sessions") + os.sep

    # -- paths -------------------------------------------------------------------

    def session_dir(self, session_id: str) -> str:
        return self._sessions + session_id

    def data_path(self, session_id: str) -> str:
        return self._sessions + session_id + os.sep + "data.part"

    def reply_dir(self, session_id: str) -> str:
        return self._sessions + session_id + os.sep + "reply"

    def _state_path(self, session_id: str) -> str:
        return self._sessions + session_id + os.sep + "state.json"

    def _tombstone_path(self, session_id: str) -> str:
        return os.path.join(self.folder, "tombstones", session_id + ".json")

    def _owner_dir(self, owner: str) -> str:
        digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return os.path.join(self.folder, "owners", digest)

    # -- create ------------------------------------------------------------------

    def create(
        self, state: SessionState, *, owner_limit: int | None, total_limit: int | None
    ) -> None:
        """Record a new session (its folder appears atomically, complete).

        :raises TooManySessions: the owner or the server has too many open sessions.
        :raises DiskFull: no space for the session folder.
        """
        marker = None
        try:
            if total_limit is not None and self.count() >= total_limit:
                raise TooManySessions()
            if state.owner is not None and owner_limit is not None:
                marker = self._add_owner_marker(state.owner, state.id, owner_limit)
            staging = os.path.join(self.folder, "staging", state.id)
            os.mkdir(staging)
            try:
                with open(os.path.join(staging, "data.part"), "xb"):
                    pass
                self._write_state(staging, state)
                os.rename(staging, self.session_dir(state.id))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if total_limit is not None and self.count() > total_limit:
                # Counted after appearing: racing creators may all be refused, but never
                # all let in past the cap.
                shutil.rmtree(self.session_dir(state.id), ignore_errors=True)
                raise TooManySessions()
        except OSError as exc:
            if marker is not None:
                _unlink_quiet(marker)
            raise io_error(exc, "creating a session") from None
        except BaseException:
            if marker is not None:
                _unlink_quiet(marker)
            raise

    def _add_owner_marker(self, owner: str, session_id: str, limit: int) -> str:
        folder = self._owner_dir(owner)
        os.makedirs(folder, exist_ok=True)
        marker = os.path.join(folder, session_id)
        with open(marker, "xb"):
            pass
        # Count after adding: two racing creators may both be refused, never both let in
        # past the limit. Markers of sessions removed by a crash are pruned here.
        live = 0
        for entry in os.scandir(folder):
            if os.path.isdir(self.session_dir(entry.name)) or entry.name == session_id:
                live += 1
            elif time.time() - _mtime(entry.path) > 60:
                _unlink_quiet(entry.path)
            else:
                live += 1  # a session being created right now
        if live > limit:
            _unlink_quiet(marker)
            raise TooManySessions(
                "This user has too many open upload sessions; finish or cancel some first."
            )
        return marker

    def count(self) -> int:
        """Number of open sessions."""
        with os.scandir(os.path.join(self.folder, "sessions")) as it:
            return sum(1 for _ in it)

    # -- open --------------------------------------------------------------------

    @contextmanager
    def open(
        self,
        session_id: str | None,
        *,
        directory: str,
        owner: str | None,
        remote_path: str | None = None,
    ) -> t.Iterator[Session]:
        """Lock the session and yield it; the lock is released on exit.

        A session of another upload directory or another owner is reported exactly
        like an unknown one (PROTOCOL.md 6 step 8, S8); so is a request for another
        ``remote_path`` than the session's, when one is given.

        :raises SessionNotFound: no such session for this directory and owner.
        :raises SessionGone: the session was closed or cancelled (its tombstone).
        :raises SessionBusy: the lock was not free within the lock timeout.
        """
        sid = canonical_session_id(session_id)
        if sid is None:
            raise SessionNotFound()
        if not os.path.isdir(self.session_dir(sid)):
            self._raise_gone(sid, directory, owner, remote_path)

        def visible(state: SessionState) -> bool:
            return (state.directory, state.owner) == (directory, owner) and (
                remote_path is None or remote_path == state.remote_path
            )

        try:
            lock = self.locker.acquire(sid, timeout=0)
        except SessionBusy:
            # Busy: someone else's session must not answer "busy" (an existence
            # oracle, and a way to tie up workers), so check before waiting.
            peeked = self._read_state(sid)
            if peeked is not None and not visible(peeked):
                raise SessionNotFound() from None
            lock = self.locker.acquire(sid)
        try:
            state = self._read_state(sid)
            if state is None:
                lock.discard = True
                self._raise_gone(sid, directory, owner, remote_path)
            assert state is not None
            if not visible(state):
                raise SessionNotFound()
            yield Session(self, state, lock)
        finally:
            lock.release()

    @contextmanager
    def lock_existing(self, session_id: str) -> t.Iterator[Session | None]:
        """Lock a session whatever its owner; yield ``None`` if it no longer exists."""
        with self.locker.hold(session_id) as lock:
            state = self._read_state(session_id)
            if state is None:
                lock.discard = True
                yield None
            else:
                yield Session(self, state, lock)

    def _raise_gone(
        self, sid: str, directory: str, owner: str | None, remote_path: str | None
    ) -> t.NoReturn:
        tomb = self.tombstone(sid)
        if (
            tomb is not None
            and (tomb.directory, tomb.owner) == (directory, owner)
            and (remote_path is None or tomb.remote_path in (None, remote_path))
        ):
            raise SessionGone(tomb)
        raise SessionNotFound()

    def _read_state(self, sid: str) -> SessionState | None:
        try:
            state = SessionState.from_json(json.loads(_read_small_file(self._state_path(sid))))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.error("Unreadable session state %s: %s", sid, exc)
            return None
        if state.phase == RECEIVING:
            # Fragments are written at offset == the data file's size, and a failed write
            # is cut off again, so while receiving the size is the next expected offset
            # (Session.save_progress does not rewrite the state file for it).
            try:
                state.received = max(state.received, os.stat(self.data_path(sid)).st_size)
            except FileNotFoundError:
                pass
        return state

    def peek(self, session_id: str) -> SessionState | None:
        """Read a session's state without locking (for listings and cleanup)."""
        sid = canonical_session_id(session_id)
        return None if sid is None else self._read_state(sid)

    def _write_state(self, folder: str, state: SessionState) -> None:
        path = os.path.join(folder, "state.json")
        tmp = path + ".tmp"
        data = json.dumps(asdict(state), separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(folder)

    def tombstone(self, session_id: str) -> Tombstone | None:
        """The tombstone of a closed or cancelled session, if it is still kept."""
        try:
            with open(self._tombstone_path(session_id), "rb") as f:
                return Tombstone(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    # -- listing and expiry --------------------------------------------------------

    def iter_states(self) -> t.Iterator[SessionState]:
        """Every readable session state, unlocked (a snapshot for listings)."""
        with os.scandir(os.path.join(self.folder, "sessions")) as it:
            names = [e.name for e in it]
        for name in sorted(names):
            state = self._read_state(name)
            if state is not None:
                yield state

    def remove_by_id(self, session_id: str, *, kind: str) -> bool:
        """Remove a session whatever its owner (``flask bits cancel``); True if removed."""
        sid = canonical_session_id(session_id)
        if sid is None or not os.path.isdir(self.session_dir(sid)):
            return False
        with self.locker.hold(sid) as lock:
            state = self._read_state(sid)
            if state is None:
                lock.discard = True
                return False
            Session(self, state, lock).remove(kind)
            return True

    def cleanup(
        self,
        *,
        now: float | None = None,
        tombstone_timeout: float,
        timeouts: t.Mapping[str, float] | None = None,
        upload_folders: t.Mapping[str, str] | None = None,
        stale_after: float = 3600,
    ) -> list[tuple[str, str]]:
        """Remove expired sessions, expired tombstones and debris of crashed requests.

        A session expires after its directory's session timeout (``timeouts`` maps
        directory names to seconds; otherwise the timeout recorded at creation).
        ``upload_folders`` (directory name -> folder) lets it also delete the temporary
        copy a crashed cross-filesystem commit may have left beside the destination.
        Safe to run at any time on any node: every session is re-checked under its lock,
        and a busy session is skipped. Returns ``(what, id)`` pairs of what was removed.
        """
        now = time.time() if now is None else now
        timeouts = timeouts or {}

        def expired(state: SessionState) -> bool:
            return now - state.last_activity >= timeouts.get(state.directory, state.timeout)

        removed: list[tuple[str, str]] = []
        for state in list(self.iter_states()):
            if not expired(state):
                continue
            try:
                with self.locker.hold(state.id, timeout=0) as lock:
                    fresh = self._read_state(state.id)
                    if fresh is None:
                        lock.discard = True
                        continue
                    if not expired(fresh):
                        continue
                    session = Session(self, fresh, lock)
                    folder = (upload_folders or {}).get(fresh.directory)
                    if folder is not None:
                        session.discard_temp_copy(folder)
                    session.remove("expired", tombstone=False)
                    removed.append(("session", state.id))
            except BITSError:
                continue  # busy: it is being used, so it is not idle
        tomb_dir = os.path.join(self.folder, "tombstones")
        for entry in _scan(tomb_dir):
            if now - _mtime(entry.path) >= tombstone_timeout:
                _unlink_quiet(entry.path)
                removed.append(("tombstone", entry.name.removesuffix(".json")))
        for sub in ("staging", "trash"):
            for entry in _scan(os.path.join(self.folder, sub)):
                if now - _mtime(entry.path) >= stale_after:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append((sub, entry.name))
        removed.extend(self._prune_locks())
        return removed

    def _prune_locks(self) -> list[tuple[str, str]]:
        """Unlink lock files of sessions that no longer exist (under their lock)."""
        removed = []
        for entry in _scan(self.locker.folder):
            name = entry.name.removesuffix(".lock")
            sid = canonical_session_id(name.split(".", 1)[0])
            if sid is None or not name.startswith(sid) or os.path.isdir(self.session_dir(sid)):
                continue
            try:
                with self.locker.hold(name, timeout=0) as lock:
                    if not os.path.isdir(self.session_dir(sid)):
                        lock.discard = True
                        removed.append(("lock", sid))
            except BITSError:
                continue
        return removed


class SessionGone(Exception):
    """The session was closed or cancelled; its tombstone says by whom and how."""

    def __init__(self, tombstone: Tombstone) -> None:
        super().__init__(tombstone.id)
        self.tombstone = tombstone


_spare_buffers: list[memoryview] = []


def _take_buffer() -> memoryview:
    """A :data:`BUFFER_SIZE` buffer to stream one fragment through: a spare one if there
    is one (a fresh buffer that large is mapped and faulted in anew every time)."""
    try:
        return _spare_buffers.pop()  # atomic: threads never get the same buffer
    except IndexError:
        return memoryview(bytearray(BUFFER_SIZE))


def _give_back(buf: memoryview) -> None:
    if len(_spare_buffers) < SPARE_BUFFERS:
        _spare_buffers.append(buf)


class Session:
    """A locked session. Methods change files; :meth:`save` persists the state."""

    def __init__(self, store: SessionStore, state: SessionState, lock: LockHandle):
        self.store = store
        self.state = state
        self.lock = lock
        self.removed = False
        self._stored = (state.total, state.phase, state.last_activity)
        #: The last :meth:`write` ended because the body stalled (BITS_READ_TIMEOUT).
        self.timed_out = False

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def data_path(self) -> str:
        return self.store.data_path(self.state.id)

    def save(self, *, touch: bool = True) -> None:
        """Write the state atomically; ``touch`` resets the idle timer (A30)."""
        if touch:
            self.state.last_activity = time.time()
        try:
            self.store._write_state(self.store.session_dir(self.id), self.state)
        except OSError as exc:
            raise io_error(exc, "saving session state") from None
        self._stored = (self.state.total, self.state.phase, self.state.last_activity)

    def save_progress(self) -> None:
        """Persist a fragment: like :meth:`save`, but skip the state file when only
        ``received`` changed (the data file's size records it, see ``_read_state``) and
        the stored idle timer is less than :data:`ACTIVITY_PRECISION` seconds old."""
        total, phase, activity = self._stored
        precision = min(ACTIVITY_PRECISION, self.state.timeout / 10)
        if (self.state.total, self.state.phase) != (total, phase) or (
            time.time() - activity >= precision
        ):
            self.save()

    def write(self, offset: int, skip: int, count: int, stream: t.Any) -> int:
        """Stream ``skip`` bytes to nowhere, then ``count`` bytes into the file at ``offset``.

        Reads in bounded chunks. Returns how many bytes were written; fewer than
        ``count`` means the body ended early (client gone). Data is flushed (and
        fsynced when configured) before returning, so the caller may acknowledge it.
        """
        readinto = getattr(stream, "readinto", None)
        if readinto is None:
            # gunicorn's own body hands out a new bytes object per read anyway: write
            # that as it is instead of copying it into a buffer first.
            return self._stream_to_file(offset, skip, count, stream.read, CHUNK_SIZE)
        # werkzeug's streams, DirectInput: a bounded buffer, reused across requests.
        buf = _take_buffer()
        try:
            return self._stream_to_file(
                offset, skip, count, lambda n: buf[: readinto(buf[:n]) or 0], len(buf)
            )
        finally:
            _give_back(buf)

    def _stream_to_file(
        self, offset: int, skip: int, count: int,
        read_some: t.Callable[[int], bytes | memoryview], chunk_size: int,
    ) -> int:
        """:meth:`write`, reading with ``read_some(n)`` (at most ``n`` bytes, empty at
        the end of the body) in pieces of at most ``chunk_size``."""
        size = min(chunk_size, max(count, skip, 1))

        def read(n: int) -> bytes | memoryview:
            # Empty means the body ended early; a stalled read (BITS_READ_TIMEOUT) raises
            # BodyTimeout. Either way the caller keeps what was stored before.
            try:
                return read_some(n)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
                raise BodyTimeout() from None
            except (OSError, ValueError):
                return b""  # the client went away

        while skip:
            got = len(read(min(skip, size)))
            if not got:
                return 0
            skip -= got
        written = 0
        try:
            fd = os.open(self.data_path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError("The session's data file is missing.") from None
        except OSError as exc:
            raise io_error(exc, "opening session data") from None
        try:
            while written < count:
                try:
                    chunk = read(min(count - written, size))
                except BodyTimeout:
                    self.timed_out = True
                    break
                if not chunk:
                    break
                pos = os.pwrite(fd, chunk, offset + written)
                while pos < len(chunk):  # a short write (rare): write the rest
                    pos += os.pwrite(fd, memoryview(chunk)[pos:], offset + written + pos)
                written += len(chunk)
            if self.store.fsync:
                os.fsync(fd)
        except OSError as exc:
            # Keep what is safely on disk: the acknowledged offset never moves past it,
            # and the data file (whose size is the next expected offset) neither.
            try:
                os.ftruncate(fd, offset)
            except OSError:
                pass
            raise io_error(exc, "writing fragment data") from None
        finally:
            os.close(fd)
        return written

    def commit(
        self, root: str, names: t.Sequence[str], *, allow_overwrite: bool, conflict_status: int
    ) -> None:
        """Place the received file at its destination atomically (PROTOCOL.md 8.2).

        Without overwrites the file is hard-linked into place, which fails if anything
        appeared there meanwhile; with overwrites it is renamed over the old file. The
        folder chain is opened without following symlinks.

        :raises DestinationExists: overwrites are off and the destination exists.
        """
        data = self.data_path
        try:
            with paths.open_parent(root, names) as dir_fd:
                self._place(data, dir_fd, names[-1], allow_overwrite, conflict_status)
                if self.store.fsync:
                    os.fsync(dir_fd)
        except BITSError:
            raise
        except OSError as exc:
            raise io_error(exc, "committing an upload") from None
        self.state.committed = True

    def _place(
        self, data: str, dir_fd: int, name: str, allow_overwrite: bool, conflict_status: int
    ) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise InvalidRequest("The URL names a folder, not a file.")
        copy_name = f"{paths.TEMP_PREFIX}{self.id}.tmp"
        if st is not None:
            try:
                cst = os.stat(copy_name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                cst = None
            if cst is not None and (cst.st_ino, cst.st_dev) == (st.st_ino, st.st_dev):
                # A crash after our copy was linked into place (another filesystem).
                _unlink_quiet(data)
                os.unlink(copy_name, dir_fd=dir_fd)
                return
        try:
            src = os.stat(data)
        except FileNotFoundError:
            # A crash after the rename but before the state was saved.
            if st is not None and st.st_size == self.state.total:
                return
            raise StorageError("The session's data file is missing.") from None
        if st is not None and (st.st_ino, st.st_dev) == (src.st_ino, src.st_dev):
            os.unlink(data)  # a crash after the link but before the unlink
            return
        if self.store.fsync:
            _fsync_path(data)
        if st is not None and not allow_overwrite:
            raise DestinationExists(status=conflict_status)
        tmp_name = None
        try:
            if allow_overwrite:
                os.replace(data, name, dst_dir_fd=dir_fd)
                return
            os.link(data, name, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(data)
        except FileExistsError:
            raise DestinationExists(status=conflict_status) from None
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            # Another filesystem (or no hard links): copy next to the destination first.
            tmp_name = f"{paths.TEMP_PREFIX}{self.id}.tmp"
            _copy_into(data, dir_fd, tmp_name, fsync=self.store.fsync)
            if allow_overwrite:
                os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                try:
                    os.link(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                            follow_symlinks=False)
                except FileExistsError:
                    raise DestinationExists(status=conflict_status) from None
                except OSError as exc2:
                    if exc2.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    if _exists(name, dir_fd):
                        raise DestinationExists(status=conflict_status) from None
                    os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.unlink(data)
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass

    def remove(self, kind: str, *, tombstone: bool = True) -> None:
        """Delete the session folder (data and reply), leave a tombstone, drop the lock.

        ``kind`` is ``"closed"``, ``"cancelled"`` or ``"expired"``. A file already
        committed to its destination is never touched.
        """
        store, sid = self.store, self.id
        pending = None
        try:
            if tombstone:
                tomb = Tombstone(sid, self.state.directory, self.state.owner, kind, time.time(),
                                 self.state.remote_path)
                try:
                    self._write_tombstone(tomb)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    pending = tomb  # written below, once this session's space is free
            trash = os.path.join(store.folder, "trash", f"{sid}.{os.getpid()}.{time.time_ns()}")
            os.rename(store.session_dir(sid), trash)
            shutil.rmtree(trash, ignore_errors=True)
            if pending is not None:
                try:
                    self._write_tombstone(pending)
                except OSError as exc:
                    log.warning("No tombstone for session %s: %s", sid, exc)
            if self.state.owner is not None:
                _unlink_quiet(os.path.join(store._owner_dir(self.state.owner), sid))
        except OSError as exc:
            raise io_error(exc, "removing a session") from None
        self.removed = True
        self.lock.discard = True

    def _write_tombstone(self, tomb: Tombstone) -> None:
        path = self.store._tombstone_path(tomb.id)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(tomb), f)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def discard_temp_copy(self, root: str) -> None:
        """Delete the copy a crashed cross-filesystem commit left beside the destination."""
        try:
            names = paths.split_remote_path(self.state.remote_path)
            with paths.open_parent(root, names) as dir_fd:
                os.unlink(f"{paths.TEMP_PREFIX}{self.id}.tmp", dir_fd=dir_fd)
        except (FileNotFoundError, BITSError):
            pass
        except OSError as exc:
            log.warning("Could not delete the temporary copy of session %s: %s", self.id, exc)


def _copy_into(src: str, dir_fd: int, name: str, *, fsync: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(src, "rb") as fin:
        out = os.open(name, flags, 0o644, dir_fd=dir_fd)
        try:
            size = os.fstat(fin.fileno()).st_size
            sent = 0
            while sent < size:
                n = os.sendfile(out, fin.fileno(), sent, min(size - sent, 1 << 30))
                if n == 0:
                    break
                sent += n
            if fsync:
                os.fsync(out)
        finally:
            os.close(out)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scan(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _mtime(path: str) -> float:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return time.time()


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
