"""Make a patched copy of flask_bits for a B' benchmark variant (flask_bits itself is not
touched).

    python bench/patches/make_patched.py /tmp/fb-p123           # P1 + P2 + P3
    python bench/patches/make_patched.py /tmp/fb-p1 --only p1
    python bench/run.py --patched "B'=/tmp/fb-p12" --only w2,w3,w5
    python bench/patches/make_patched.py /tmp/fb-p12 --diff > p12.diff   # the diff too

Copies the repository's current ``flask_bits`` to ``DEST/flask_bits`` and applies the
proposals as exact text edits (each must match exactly once, else it stops: the source has
moved on and the proposal needs a look):

* p1: a Fragment no longer rewrites state.json (an atomic write + rename over the old file,
  which on ext4 also starts writeback of the new file, ``auto_da_alloc``): while receiving,
  the data file's size is the next expected offset; the state file is rewritten only when
  something else changed, or when the stored idle timer is a minute old. A failed write is
  cut off again (``ftruncate``) so the size never counts its bytes.
* p2: the session lock is ``fcntl.flock`` on our own descriptor instead of
  ``filelock.FileLock`` (about 170 Python calls and a dozen syscalls per acquisition).
* p3: read the body in 1 MiB steps again (``CHUNK_SIZE``), gunicorn's own read-ahead:
  with 256 KiB reads, gunicorn's ``Unreader`` receives up to 1 MiB and copies what is left
  of its buffer again on every read, each copy a fresh mmap with this malloc setup.
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
     '''"""Per-session file locks (``flock`` on files under the session folder).'''),
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
'''),
    ("locking.py", '''        """Hold the lock for ``name``; raise :class:`SessionBusy` after ``timeout``."""
        handle = LockHandle(self.path(name))
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
        finally:''', '''        """Hold the lock for ``name``; raise :class:`SessionBusy` after ``timeout``.

        ``flock`` on a descriptor of our own (so threads exclude each other too), polled
        without blocking: 1 ms, doubling up to 50 ms, until ``timeout``. Each try opens
        the path afresh, and a lock won on a file its holder has just unlinked is
        dropped and taken again on the current file, so there is one holder at a time.
        """
        handle = LockHandle(self.path(name))
        wait = self.timeout if timeout is None else timeout
        started = time.monotonic()
        delay = 0.001
        try:
            while True:
                fd = os.open(handle.path, _OPEN_FLAGS, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if os.fstat(fd).st_nlink:
                        break
                    os.close(fd)  # won a file its holder unlinked: take the new one
                    continue
                except BlockingIOError:
                    os.close(fd)
                except BaseException:
                    os.close(fd)
                    raise
                left = started + wait - time.monotonic()
                if left <= 0:
                    raise SessionBusy()
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
        finally:'''),
    ("locking.py", '''            finally:
                lock.release()
''', '''            finally:
                os.close(fd)  # closing the only descriptor releases the flock
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

PATCHES = {"p1": P1, "p2": P2, "p3": P3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", help="folder to create DEST/flask_bits in (replaced if present)")
    p.add_argument("--only", default="p1,p2,p3", help="comma list of p1, p2, p3")
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
