"""Per-session file locks (the only module that imports :mod:`filelock`).

Lock files live in ``<session folder>/locks/``, outside the session directories that
Close-Session and Cancel-Session delete. A lock file is unlinked only by a holder, as the
very last step before release, and only once its session is gone for good: a waiter that
then wins the old, unlinked inode finds no session, and a newcomer opens a fresh file and
finds no session either, so nobody acts on a session two at a time (see
``tests/test_locking.py``).
"""

from __future__ import annotations

import os
import time
import typing as t
from contextlib import contextmanager

import filelock

from .errors import SessionBusy


class SessionLocker:
    """Builds one lock per acquisition; ``timeout`` bounds every wait (seconds)."""

    def __init__(self, folder: str, *, timeout: float) -> None:
        self.folder = folder
        self.timeout = timeout
        #: Called with the seconds each acquisition waited (for metrics).
        self.on_wait: t.Callable[[float], None] | None = None
        os.makedirs(folder, exist_ok=True)

    def path(self, name: str) -> str:
        """The lock file for ``name`` (a canonical session id or a fixed name)."""
        return os.path.join(self.folder, name + ".lock")

    @contextmanager
    def hold(self, name: str, *, timeout: float | None = None) -> t.Iterator[LockHandle]:
        """Hold the lock for ``name``; raise :class:`SessionBusy` after ``timeout``."""
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
        finally:
            if self.on_wait is not None:
                self.on_wait(time.monotonic() - started)
        try:
            yield handle
        finally:
            try:
                if handle.discard:
                    try:
                        os.unlink(handle.path)
                    except FileNotFoundError:
                        pass
            finally:
                lock.release()


class LockHandle:
    """A held lock; set :attr:`discard` to unlink the lock file just before release."""

    __slots__ = ("path", "discard")

    def __init__(self, path: str) -> None:
        self.path = path
        #: Unlink the lock file on release (only when the session is gone for good).
        self.discard = False


class DetachedLock:
    """A lock taken in one thread and released in another (a detached forward)."""

    def __init__(self, lock: filelock.BaseFileLock, path: str) -> None:
        self._lock = lock
        self.path = path

    def release(self, *, discard: bool = False) -> None:
        """Release; ``discard`` unlinks the lock file first (see the module docstring)."""
        try:
            if discard:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            self._lock.release()


def acquire_detached(locker: SessionLocker, name: str) -> DetachedLock:
    """Take ``name``'s lock without waiting, releasable from any thread.

    :raises SessionBusy: somebody holds it.
    """
    path = locker.path(name)
    lock = filelock.FileLock(path, timeout=0, thread_local=False, is_singleton=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise SessionBusy() from None
    return DetachedLock(lock, path)
