"""Per-session file locks (the only module that imports :mod:`filelock`).

Lock files live in ``<session folder>/locks/``, outside the session directories that
Close-Session and Cancel-Session delete. A lock file is unlinked only by a holder, as the
very last step before release, and only once its session is gone for good: a waiter that
then wins the old, unlinked inode notices (its link count is 0) and locks the current
file instead, and a newcomer opens a fresh file and finds no session, so nobody acts on a
session two at a time (see ``tests/test_locking.py``).

The locks are taken with :func:`filelock.lock_descriptor` on a descriptor of our own: the
same ``flock`` primitive as :class:`filelock.FileLock` (the two contend with each other),
at a few microseconds per acquisition instead of the few hundred that ``FileLock``'s
bookkeeping (registry, fork and re-entrancy tracking) costs. That bookkeeping buys nothing
here: every lock is taken once per request and released in a ``finally``. A lock belongs
to its descriptor, not to a thread, so a detached forward may release it from another
thread.
"""

from __future__ import annotations

import os
import time
import typing as t
from contextlib import contextmanager

import filelock

from .errors import SessionBusy

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
#: First and longest pause between two tries on a busy lock (seconds).
_FIRST_PAUSE, _LONGEST_PAUSE = 0.001, 0.05


def lock_file(path: str, wait: float) -> int | None:
    """Open ``path`` and lock it exclusively; the descriptor, or ``None`` after ``wait`` s.

    Polls without blocking, 1 ms at first, doubling up to 50 ms. Each try opens the path
    afresh, and a lock won on a file that its holder unlinked meanwhile is dropped and
    taken again on the current file. Closing the descriptor releases the lock.

    :raises OSError: the file cannot be opened or the filesystem has no ``flock``.
    """
    deadline = time.monotonic() + wait
    pause = _FIRST_PAUSE
    while True:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
        try:
            won = filelock.lock_descriptor(fd, blocking=False)
            if won and os.fstat(fd).st_nlink:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if won:
            continue  # its holder unlinked the file as we won it: lock the current one
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 2, _LONGEST_PAUSE)


class SessionLocker:
    """Builds one lock per acquisition; ``timeout`` bounds every wait (seconds)."""

    def __init__(self, folder: str, *, timeout: float) -> None:
        self.folder = folder
        self.timeout = timeout
        #: Called with the seconds each acquisition waited (for metrics).
        self.on_wait: t.Callable[[float], None] | None = None
        os.makedirs(folder, exist_ok=True)
        self._prefix = os.path.join(folder, "")

    def path(self, name: str) -> str:
        """The lock file for ``name`` (a canonical session id or a fixed name)."""
        return self._prefix + name + ".lock"

    def acquire(self, name: str, *, timeout: float | None = None) -> LockHandle:
        """Take the lock for ``name``; the caller must :meth:`LockHandle.release` it.

        :raises SessionBusy: not free within ``timeout`` (default: the locker's).
        """
        path = self.path(name)
        started = time.monotonic()
        try:
            fd = lock_file(path, self.timeout if timeout is None else timeout)
        finally:
            if self.on_wait is not None:
                self.on_wait(time.monotonic() - started)
        if fd is None:
            raise SessionBusy()
        return LockHandle(path, fd)

    @contextmanager
    def hold(self, name: str, *, timeout: float | None = None) -> t.Iterator[LockHandle]:
        """Hold the lock for ``name``; raise :class:`SessionBusy` after ``timeout``."""
        lock = self.acquire(name, timeout=timeout)
        try:
            yield lock
        finally:
            lock.release()


class LockHandle:
    """A held lock. It belongs to its descriptor, not to a thread: any thread may
    release it (a detached forward does). Set :attr:`discard` to unlink the lock file
    just before release, only once the session is gone for good."""

    __slots__ = ("path", "discard", "_fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        #: Unlink the lock file on release (only when the session is gone for good).
        self.discard = False

    def release(self, *, discard: bool | None = None) -> None:
        """Release the lock (once); ``discard`` overrides :attr:`discard`."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if self.discard if discard is None else discard:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)  # releases the lock
