"""Mapping a request's remote path to a file under the upload folder, safely.

PROTOCOL.md S7: the destination comes only from the URL path, decoded once. Segments
with ``..``, backslashes, drive letters, NUL or control characters, Windows device
names, trailing dots or spaces are refused even where they would stay inside the folder.
The folder chain is walked with ``O_NOFOLLOW`` directory descriptors (``openat``
style), so a symlink planted inside the upload folder can neither redirect a check nor
the final commit, and no missing folder is ever created.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import typing as t
from contextlib import contextmanager

from werkzeug.security import safe_join

from .errors import AccessDenied
from .errors import DestinationFolderMissing
from .errors import InvalidRequest
from .errors import StorageError

#: Longest remote path accepted, in characters.
MAX_PATH_LENGTH = 1024
#: Longest single name, in bytes of UTF-8 (the limit of common Linux filesystems).
MAX_NAME_BYTES = 255
#: Prefix of the server's own temporary files inside the upload folder.
TEMP_PREFIX = ".bits-"

_DEVICE_NAMES = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)", re.I)
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\ufffd]")
_ESCAPE_CHARS = re.compile(r'[\\:*?"<>|]')

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


def split_remote_path(remote: str) -> tuple[str, ...]:
    """Validate a remote path (relative to the upload prefix) and split it into names.

    :raises InvalidRequest: empty, names a folder, malformed or over-long (400).
    :raises AccessDenied: tries to leave the folder or uses Windows-special names (403).
    """
    if remote == "" or remote.endswith("/"):
        raise InvalidRequest("The URL names a folder, not a file.")
    if len(remote) > MAX_PATH_LENGTH:
        raise InvalidRequest("The URL path is too long.")
    if _BAD_CHARS.search(remote):
        raise InvalidRequest("The URL path contains control or undecodable characters.")
    names = tuple(remote.split("/"))
    for name in names:
        if name == "":
            raise InvalidRequest("The URL path contains an empty segment ('//').")
        if name in (".", ".."):
            raise AccessDenied("The URL path may not contain '.' or '..' segments.")
        if _ESCAPE_CHARS.search(name):
            raise AccessDenied(
                "The URL path may not contain backslashes, drive letters or the "
                'characters : * ? " < > |.'
            )
        if name.endswith((".", " ")) or name.startswith(" "):
            raise InvalidRequest("A name in the URL path ends with a dot or a space.")
        if _DEVICE_NAMES.fullmatch(name.split(".", 1)[0].rstrip(" ")):
            raise AccessDenied("The URL path uses a reserved device name.")
        if name.startswith(TEMP_PREFIX):
            raise AccessDenied(f"Names starting with {TEMP_PREFIX!r} are reserved.")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidRequest("A name in the URL path is too long.")
    return names


def destination_path(root: str, names: t.Sequence[str]) -> str:
    """The absolute destination path for ``names`` under ``root``.

    ``safe_join`` is a second, independent check that the joined path stays inside.
    """
    joined = safe_join(root, *names)
    if joined is None:  # pragma: no cover - split_remote_path refuses these first
        raise AccessDenied("The URL path leaves the upload folder.")
    return joined


@contextmanager
def open_parent(root: str, names: t.Sequence[str]) -> t.Iterator[int]:
    """Open the folder that will hold ``names[-1]``, refusing symlinks on the way.

    Yields a directory file descriptor; closes it afterwards.

    :raises DestinationFolderMissing: a folder on the way does not exist (404).
    :raises AccessDenied: a folder on the way is a symlink or not a folder (403).
    """
    try:
        fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        raise StorageError("The upload folder does not exist.") from None
    try:
        for name in names[:-1]:
            try:
                child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise DestinationFolderMissing() from None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                    raise AccessDenied(
                        "A folder in the URL path is a link or not a folder."
                    ) from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def destination_exists(root: str, names: t.Sequence[str]) -> bool:
    """Whether something other than a folder is at the destination now.

    :raises InvalidRequest: the destination is a folder (400, PROTOCOL.md 7.2 step 3).
    :raises DestinationFolderMissing: see :func:`open_parent`.
    :raises AccessDenied: see :func:`open_parent`.
    """
    with open_parent(root, names) as dir_fd:
        try:
            st = os.stat(names[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
    if stat.S_ISDIR(st.st_mode):
        raise InvalidRequest("The URL names a folder, not a file.")
    return True
