# ruff: noqa: E501  (the patch texts are exact source lines)
"""Make a patched copy of flask_bits for a B' benchmark variant (flask_bits itself is not
touched).

    python bench/patches/make_patched.py /tmp/fb-all            # P1 + P2 + P3 + P4
    python bench/patches/make_patched.py /tmp/fb-p1 --only p1
    python bench/run.py --patched "B'=/tmp/fb-all" --only w2,w3,w5
    python bench/patches/make_patched.py /tmp/fb-all --diff > all.diff   # the diff too

Copies the repository's current ``flask_bits`` to ``DEST/flask_bits`` and applies the
proposals as exact text edits (each must match exactly once, else it stops: the source has
moved on and the proposal needs a look):

* p1: a Fragment no longer rewrites state.json (an atomic write + rename over the old file,
  which on ext4 also starts writeback of the new file, ``auto_da_alloc``): while receiving,
  the data file's size is the next expected offset; the state file is rewritten only when
  something else changed, or when the stored idle timer is a minute old. A failed write is
  cut off again (``ftruncate``) so the size never counts its bytes.
* p2: the session locks (``SessionLocker.hold`` and ``acquire_detached``) are
  ``fcntl.flock`` on our own descriptor instead of ``filelock.FileLock`` (about 170 Python
  calls and a dozen syscalls per acquisition); flock belongs to the descriptor, so a
  detached lock may still be released from another thread.
* p3: read the body in 1 MiB steps again (``CHUNK_SIZE``), gunicorn's own read-ahead:
  with 256 KiB reads, gunicorn's ``Unreader`` receives up to 1 MiB and copies what is left
  of its buffer again on every read, each copy a fresh mmap with this malloc setup.
* p4: write the bytes gunicorn's ``read`` returns as they are, instead of copying them into
  a per-fragment ``bytearray`` first (one 1 MiB allocation, page faults and copy less per
  fragment; streams with ``readinto`` keep the buffer).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

P1 = [
    ("store.py", '''# Session phases (PROTOCOL.md 5.3):''', '''#: A fragment rewrites the state file only for this idle-timer precision (seconds).
ACTIVITY_PRECISION = 60.0

# Session phases (PROTOCOL.md 5.3):'''),
    ("store.py", '''            with open(os.path.join(self.session_dir(sid), "state.json"), "rb") as f:
                return SessionState.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.error("Unreadable session state %s: %s", sid, exc)
            return None
''', '''            with open(os.path.join(self.session_dir(sid), "state.json"), "rb") as f:
                state = SessionState.from_json(json.load(f))
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
'''),
    ("store.py", '''        self.lock = lock
        self.removed = False
''', '''        self.lock = lock
        self.removed = False
        self._stored = (state.total, state.phase, state.last_activity)
'''),
    ("store.py", '''            self.store._write_state(self.store.session_dir(self.id), self.state)
        except OSError as exc:
            raise io_error(exc, "saving session state") from None
''', '''            self.store._write_state(self.store.session_dir(self.id), self.state)
        except OSError as exc:
            raise io_error(exc, "saving session state") from None
        self._stored = (self.state.total, self.state.phase, self.state.last_activity)

    def save_progress(self) -> None:
        """Persist a fragment: like :meth:`save`, but skip the state file when only
        ``received`` changed (the data file's size records it, see ``_read_state``) and
        the stored idle timer is less than :data:`ACTIVITY_PRECISION` seconds old."""
        total, phase, activity = self._stored
        if (self.state.total, self.state.phase) != (total, phase) or (
            time.time() - activity >= ACTIVITY_PRECISION
        ):
            self.save()
'''),
    ("store.py", '''        except OSError as exc:
            # Keep what is safely on disk: the acknowledged offset never moves past it.
            raise io_error(exc, "writing fragment data") from None
''', '''        except OSError as exc:
            # Keep what is safely on disk: the acknowledged offset never moves past it,
            # and the data file (whose size is the next expected offset) neither.
            try:
                os.ftruncate(fd, offset)
            except OSError:
                pass
            raise io_error(exc, "writing fragment data") from None
'''),
    ("server.py", '''        session.save()
        self.on_event("fragment-received",''', '''        session.save_progress()
        self.on_event("fragment-received",'''),
]

P2 = [
    ("locking.py", '''"""Per-session file locks (the only module that imports :mod:`filelock`).''',
     '''"""Per-session file locks: ``fcntl.flock`` on lock files under the session folder.'''),
    ("locking.py", '''import os
import time
import typing as t
from contextlib import contextmanager

import filelock

from .errors import SessionBusy
''', '''import fcntl
import os
import time
import typing as t
from contextlib import contextmanager

from .errors import SessionBusy

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


def _lock_file(path: str, wait: float) -> int | None:
    """Open ``path`` and ``flock`` it exclusively; the descriptor, or ``None`` after
    ``wait`` seconds. Polls without blocking: 1 ms, doubling up to 50 ms. Each try opens
    the path afresh, and a lock won on a file its holder has just unlinked is dropped and
    taken again on the current file, so there is one holder at a time. The lock belongs
    to the descriptor, not to a thread: closing it (from any thread) releases it.
    """''' + '\n' + '''    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
        else:
            if os.fstat(fd).st_nlink:
                return fd
            os.close(fd)  # its holder unlinked it meanwhile: lock the current file
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
'''),
    ("locking.py", '''        handle = LockHandle(self.path(name))
        lock = filelock.FileLock(
            handle.path,
            timeout=self.timeout if timeout is None else timeout,
            is_singleton=False,
        )
        started = time.monotonic()
        try:
            lock.acquire()
        except filelock.Timeout:
            raise SessionBusy() from None
        finally:''', '''        handle = LockHandle(self.path(name))
        started = time.monotonic()
        try:
            fd = _lock_file(handle.path, self.timeout if timeout is None else timeout)
            if fd is None:
                raise SessionBusy()
        finally:'''),
    ("locking.py", '''            finally:
                lock.release()
''', '''            finally:
                os.close(fd)  # releases the flock
'''),
    ("locking.py", '''    def __init__(self, lock: filelock.BaseFileLock, path: str) -> None:
        self._lock = lock
        self.path = path
''', '''    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path
'''),
    ("locking.py", '''        finally:
            self._lock.release()
''', '''        finally:
            os.close(self._fd)
'''),
    ("locking.py", '''    lock = filelock.FileLock(path, timeout=0, thread_local=False, is_singleton=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise SessionBusy() from None
    return DetachedLock(lock, path)
''', '''    fd = _lock_file(path, 0)
    if fd is None:
        raise SessionBusy()
    return DetachedLock(fd, path)
'''),
]

P3 = [
    ("store.py",
     "#: Size of the buffer a fragment is streamed through (memory stays flat). Small enough\n"
     "#: that a body stalling mid-read (BITS_READ_TIMEOUT) loses little of what arrived.\n"
     "CHUNK_SIZE = 256 * 1024\n",
     "#: Size of the buffer a fragment is streamed through (memory stays flat). 1 MiB is\n"
     "#: gunicorn's read-ahead (SocketUnreader.max_body_chunk): with smaller reads its\n"
     "#: Unreader copies what is left of its buffer again on every read. A body stalling\n"
     "#: mid-read (BITS_READ_TIMEOUT) loses at most this much; the client resends it.\n"
     "CHUNK_SIZE = 1024 * 1024\n"),
]

P4 = [
    ("store.py", """        size = min(CHUNK_SIZE, max(count, skip, 1))
        buf = bytearray(size)
        view = memoryview(buf)
        readinto = getattr(stream, "readinto", None)

        def read(n: int) -> int:
            # 0 means the body ended early; a stalled read (BITS_READ_TIMEOUT) raises
            # BodyTimeout. Either way the caller keeps what was stored before.
            try:
                if readinto is not None:
                    return readinto(view[:n]) or 0
                data = stream.read(n)
            except TimeoutError:
                raise BodyTimeout() from None
            except (OSError, ValueError):
                return 0  # the client went away
            view[: len(data)] = data
            return len(data)
""", """        size = min(CHUNK_SIZE, max(count, skip, 1))
        readinto = getattr(stream, "readinto", None)
        # A stream without readinto (gunicorn's) hands out a new bytes object per read
        # anyway: write that, instead of copying it into a buffer of our own first.
        view = memoryview(bytearray(size) if readinto is not None else b"")

        def read(n: int) -> int:
            # 0 means the body ended early; a stalled read (BITS_READ_TIMEOUT) raises
            # BodyTimeout. Either way the caller keeps what was stored before.
            nonlocal view
            try:
                if readinto is not None:
                    return readinto(view[:n]) or 0
                data = stream.read(n)
            except TimeoutError:
                raise BodyTimeout() from None
            except (OSError, ValueError):
                return 0  # the client went away
            view = memoryview(data)
            return len(data)
"""),
]

PATCHES = {"p1": P1, "p2": P2, "p3": P3, "p4": P4}
#: Text that shows a proposal is already in the source (applied upstream, maybe reworded).
APPLIED = {
    "p1": ("store.py", "def save_progress("),
    "p2": ("locking.py", "fcntl.flock("),
    "p3": ("store.py", "CHUNK_SIZE = 1024 * 1024"),
    "p4": ("store.py", "view = memoryview(bytearray(size) if readinto"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", help="folder to create DEST/flask_bits in (replaced if present)")
    p.add_argument("--only", default="p1,p2,p3,p4", help="comma list of p1 ... p4")
    p.add_argument("--source", default=str(ROOT / "flask_bits"), help="flask_bits to copy")
    p.add_argument("--diff", action="store_true", help="print a unified diff of the edits")
    args = p.parse_args()
    src = Path(args.source)
    dest = Path(args.dest) / "flask_bits"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    edited: dict[str, str] = {}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        marker_file, marker = APPLIED[name]
        if marker in (edited.get(marker_file) or (dest / marker_file).read_text()):
            print(f"{name}: already in the source, skipped", file=sys.stderr)
            continue
        for filename, old, new in PATCHES[name]:
            text = edited.get(filename) or (dest / filename).read_text()
            if text.count(old) != 1:
                print(f"{name}: {filename}: the text to replace occurs {text.count(old)} "
                      f"times (expected once):\n{old}", file=sys.stderr)
                return 1
            edited[filename] = text.replace(old, new)
    for filename, text in sorted(edited.items()):
        (dest / filename).write_text(text)
        if args.diff:
            before = (src / filename).read_text().splitlines(keepends=True)
            sys.stdout.writelines(difflib.unified_diff(
                before, text.splitlines(keepends=True),
                f"a/flask_bits/{filename}", f"b/flask_bits/{filename}"))
    print(f"patched copy ({args.only}) in {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
