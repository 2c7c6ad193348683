"""Fault injection for the integration tests, and the client-side helpers they share.

Server side
-----------
:func:`fault_app` is the example app with hooks that are inert until a trigger file
appears in ``$FAULT_DIR``. gunicorn loads it as ``fault_apps:fault_app()`` with
``tests/`` on ``PYTHONPATH`` (see :func:`fault_env`). Triggers:

``block-<point>``
    JSON object of session-state fields that must all match (``{}`` matches any call;
    the key ``"torn": true`` first leaves a half-written ``state.json.tmp``). When a
    matching call reaches the point, the worker writes ``reached-<point>`` holding its
    pid and waits until the block file is removed (at most :data:`BLOCK_MAX` seconds),
    then carries on. Points: ``commit`` (``Session.commit``), ``write-state``
    (``SessionStore._write_state``), ``rmtree`` (deleting a removed session's folder
    from ``trash/``, after Close/Cancel took it out of ``sessions/``), ``copied`` (a
    commit across filesystems has copied the data next to the destination, before
    putting it in place), ``linked`` (right after a successful ``os.link``: the file is
    at its destination, the source not yet unlinked).
``fail-pwrite``
    ``{"errno": "EIO", "after": 0}``: ``os.pwrite`` writes nothing at or past file
    offset ``after`` and raises ``OSError(errno)`` there (a short write up to it).
``fail-open``
    ``{"errno": "EACCES"}``: opening a session's ``data.part`` raises ``OSError(errno)``.
``fail-tombstone``
    ``{"errno": "ENOSPC", "once": true}``: writing a tombstone fails the way a full disk
    fails it (the temporary file is created, then ``OSError(errno)``); ``once`` removes
    the trigger when it fires, as freeing space would.

A ``fail-*`` trigger that fires leaves ``hit-<trigger>`` behind, so a test can tell that
the fault really happened.

Client side
-----------
Raw sockets for half-sent fragments, polling with deadlines, random files on disk,
SHA-256 of files, and leak checks over the session and upload folders.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import time
import typing as t
import urllib.parse
from pathlib import Path

from helpers import sha256_file as sha256_file
from helpers import wait_until as wait_until

MiB = 1 << 20
#: Longest time a blocked hook waits for its block file to go away.
BLOCK_MAX = 60.0
TESTS_DIR = Path(__file__).resolve().parent
#: The app spec gunicorn gets for :func:`fault_app`.
FAULT_APP = "fault_apps:fault_app()"


# -- server side: the fault-injecting app -------------------------------------------------


def fault_app() -> t.Any:
    """The example app with the fault hooks of this module's docstring installed."""
    from example_app import create_app
    from flask_bits import store

    folder = os.environ["FAULT_DIR"]
    _install(store, folder)
    return create_app()


def _install(store: t.Any, folder: str) -> None:
    orig_commit = store.Session.commit
    orig_write_state = store.SessionStore._write_state
    real_pwrite = os.pwrite
    real_open = os.open

    def commit(self: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        _checkpoint(folder, "commit", self.state, None)
        return orig_commit(self, *args, **kwargs)

    def write_state(self: t.Any, state_folder: str, state: t.Any) -> None:
        _checkpoint(folder, "write-state", state, state_folder)
        return orig_write_state(self, state_folder, state)

    def pwrite(fd: int, data: t.Any, offset: int) -> int:
        spec = _trigger(folder, "fail-pwrite")
        if spec is not None:
            after = int(spec.get("after", 0))
            if offset >= after:
                _fail(folder, "fail-pwrite", spec, "EIO")
            data = memoryview(data)[: after - offset]
        return real_pwrite(fd, data, offset)

    def open_(path: t.Any, flags: int, *args: t.Any, **kwargs: t.Any) -> int:
        if isinstance(path, str) and path.endswith("data.part"):
            spec = _trigger(folder, "fail-open")
            if spec is not None:
                _fail(folder, "fail-open", spec, "EACCES", path)
        return real_open(path, flags, *args, **kwargs)

    def store_open(file: t.Any, mode: str = "r", *args: t.Any, **kwargs: t.Any) -> t.Any:
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if "w" in mode and name.endswith(".json.tmp") and (
            os.path.basename(os.path.dirname(name)) == "tombstones"
        ):
            spec = _trigger(folder, "fail-tombstone")
            if spec is not None:
                with open(file, mode, *args, **kwargs):
                    pass  # the file exists, its data never made it (like ENOSPC on close)
                _fail(folder, "fail-tombstone", spec, "ENOSPC", name)
        return open(file, mode, *args, **kwargs)

    class _Shutil:
        """``shutil`` as the store sees it, with a checkpoint in ``rmtree``."""

        def __getattr__(self, name: str) -> t.Any:
            return getattr(shutil, name)

        @staticmethod
        def rmtree(path: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
            if f"{os.sep}trash{os.sep}" in os.fspath(path):
                _checkpoint(folder, "rmtree", None, None)
            shutil.rmtree(path, *args, **kwargs)

    orig_copy_into = store._copy_into

    def copy_into(*args: t.Any, **kwargs: t.Any) -> None:
        orig_copy_into(*args, **kwargs)
        _checkpoint(folder, "copied", None, None)

    real_link = os.link

    def link(src: t.Any, dst: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
        real_link(src, dst, *args, **kwargs)
        _checkpoint(folder, "linked", None, None)

    store.Session.commit = commit
    store.SessionStore._write_state = write_state
    store._copy_into = copy_into
    os.link = link
    store.shutil = _Shutil()
    store.open = store_open  # shadows the builtin inside flask_bits.store only
    os.pwrite = pwrite
    os.open = open_


def _fail(folder: str, name: str, spec: dict[str, t.Any], default: str, *path: str) -> t.NoReturn:
    """Raise the trigger's OSError; note the hit, and disarm a ``once`` trigger."""
    with open(os.path.join(folder, "hit-" + name), "a") as f:
        f.write(f"{os.getpid()}\n")
    if spec.get("once"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
    code = getattr(errno, spec.get("errno", default))
    raise OSError(code, os.strerror(code), *path)


def _trigger(folder: str, name: str) -> dict[str, t.Any] | None:
    try:
        with open(os.path.join(folder, name), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return dict(json.loads(text or b"{}"))


def _checkpoint(folder: str, point: str, state: t.Any, state_folder: str | None) -> None:
    spec = _trigger(folder, "block-" + point)
    if spec is None:
        return
    torn = spec.pop("torn", False)
    if any(getattr(state, key, object()) != value for key, value in spec.items()):
        return
    if torn and state_folder is not None:
        text = json.dumps({"id": state.id, "received": state.received}).encode()
        with open(os.path.join(state_folder, "state.json.tmp"), "wb") as f:
            f.write(text[: len(text) // 2])
    reached = os.path.join(folder, "reached-" + point)
    with open(reached + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(reached + ".tmp", reached)
    block = os.path.join(folder, "block-" + point)
    deadline = time.monotonic() + BLOCK_MAX
    while os.path.exists(block) and time.monotonic() < deadline:
        time.sleep(0.02)


# -- client side ---------------------------------------------------------------------------


def fault_env(fault_dir: Path, **env: str) -> dict[str, str]:
    """Environment for a gunicorn running :data:`FAULT_APP` with triggers in ``fault_dir``."""
    return {"FAULT_DIR": str(fault_dir), "PYTHONPATH": str(TESTS_DIR), **env}


def folders_env(base: Path, **env: str) -> dict[str, str]:
    """``BITS_UPLOAD_FOLDER`` / ``BITS_SESSION_FOLDER`` under ``base`` (plus ``env``)."""
    return {
        "BITS_UPLOAD_FOLDER": str(base / "uploads"),
        "BITS_SESSION_FOLDER": str(base / "sessions"),
        **env,
    }


def set_trigger(fault_dir: Path, name: str, spec: t.Mapping[str, t.Any] | None = None) -> None:
    tmp = fault_dir / (name + ".tmp")
    tmp.write_text(json.dumps(dict(spec or {})))
    os.replace(tmp, fault_dir / name)


def clear_trigger(fault_dir: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (fault_dir / name).unlink()


def wait_reached(fault_dir: Path, point: str, timeout: float = 30.0) -> int:
    """Wait until a worker is blocked at ``point``; return its pid (and forget the marker)."""
    path = fault_dir / ("reached-" + point)
    wait_until(path.exists, timeout, f"a worker blocked at {point}")
    pid = int(path.read_text())
    path.unlink()
    return pid


def make_random_file(path: Path, size: int, chunk: int = MiB) -> str:
    """Write ``size`` random bytes to ``path``; return their SHA-256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def read_range(path: Path | str, first: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, first)


def file_size(path: Path | str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def data_part(session_folder: Path, sid: str) -> Path:
    return session_folder / "sessions" / sid / "data.part"


def is_ack(reply: t.Any) -> bool:
    """The framing every answer to a ``BITS_POST`` has (PROTOCOL.md T7)."""
    return reply.get("BITS-Packet-Type") == "Ack" and reply.get("Content-Length") == "0"


def received(reply: t.Any) -> int:
    value = reply.get("BITS-Received-Content-Range")
    assert value is not None and value.isdigit(), reply
    return int(value)


class RawPacket:
    """A ``BITS_POST`` over a raw socket: headers now, body (if any) piece by piece.

    Nothing here sends more than asked, so the test decides how far the server gets,
    and a connection that dies with its worker is an answer (``None``), not an error.
    Always :meth:`close` (or use as a context manager).
    """

    def __init__(
        self, base_url: str, path: str, packet: str, sid: str | None = None, *,
        length: int = 0, headers: t.Mapping[str, str] | None = None, timeout: float = 30.0,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        lines = [f"BITS_POST {path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}",
                 f"BITS-Packet-Type: {packet}"]
        if sid is not None:
            lines.append(f"BITS-Session-Id: {sid}")
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        lines.append(f"Content-Length: {length}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str]] | None:
        """The server's answer, or ``None`` if the connection ended without one."""
        resp = http.client.HTTPResponse(self.sock, method="BITS_POST")
        try:
            resp.begin()
            body = resp.read()
            assert body == b"", "an Ack never has a body"
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}
        except (http.client.RemoteDisconnected, ConnectionError, http.client.IncompleteRead):
            return None
        finally:
            resp.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPacket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlowFragment(RawPacket):
    """A Fragment for bytes ``first .. first+length-1`` of ``total``, body sent later."""

    def __init__(
        self, base_url: str, path: str, sid: str, first: int, length: int, total: int,
        *, timeout: float = 30.0,
    ) -> None:
        super().__init__(
            base_url, path, "Fragment", sid, length=length, timeout=timeout,
            headers={"Content-Range": f"bytes {first}-{first + length - 1}/{total}"},
        )


def pids_with_open(pids: t.Iterable[int], target: Path) -> list[int]:
    """The processes among ``pids`` that have ``target`` open."""
    want = os.fspath(target)
    found = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == want:
                    found.append(pid)
                    break
    return found


def sigkill_worker(server: t.Any, pid: int, workers: int, timeout: float = 30.0) -> None:
    """SIGKILL one of ``server``'s workers and wait until gunicorn has replaced it."""
    assert pid in server.worker_pids(), f"{pid} is not a worker of this server"
    os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        pids = server.worker_pids()
        return pid not in pids and len(pids) == workers

    wait_until(replaced, timeout, f"gunicorn to replace worker {pid}", interval=0.05)


def session_leftovers(session_folder: Path, sid: str) -> list[str]:
    """Everything a finished session ``sid`` may not leave behind."""
    found = []
    for rel in (f"sessions/{sid}", f"staging/{sid}", f"locks/{sid}.lock"):
        if os.path.lexists(session_folder / rel):
            found.append(rel)
    for sub in ("trash", "staging"):
        folder = session_folder / sub
        if folder.is_dir():
            found.extend(f"{sub}/{name}" for name in os.listdir(folder) if sid in name)
    return found


def folder_leftovers(session_folder: Path) -> list[str]:
    """Debris in a whole session folder: open sessions, staging, trash, session locks
    and temporary files (tombstones and the sweep's own lock are expected)."""
    found = []
    for sub in ("sessions", "staging", "trash"):
        folder = session_folder / sub
        if folder.is_dir():
            found.extend(f"{sub}/{name}" for name in sorted(os.listdir(folder)))
    locks = session_folder / "locks"
    if locks.is_dir():
        found.extend(f"locks/{n}" for n in sorted(os.listdir(locks)) if n != "cleanup.lock")
    for root, _dirs, files in os.walk(session_folder):
        found.extend(os.path.join(root, n) for n in files if n.endswith(".tmp"))
    return found


def upload_temp_files(upload_folder: Path) -> list[str]:
    """The server's temporary files (``.bits-*``, ``*.tmp``) left in the upload folder."""
    found = []
    for root, _dirs, files in os.walk(upload_folder):
        found.extend(
            os.path.join(root, n) for n in files if n.startswith(".bits-") or n.endswith(".tmp")
        )
    return found
