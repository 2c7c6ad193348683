"""The BITS upload client (``flask_bits.client``): Python API and command line.

Integration tests run the client against a real gunicorn serving the example app.
Faults are made by :class:`Proxy`, a small TCP forwarder on 127.0.0.1 that can cut a
connection after a number of bytes, refuse a host name, or run a hook (e.g. expire or
cancel the session from the side) just before it forwards a request -- at that moment
no request of the client is in flight, so the hook is deterministic.

Unit tests at the end use a tiny scripted BITS server (stdlib ``http.server``) for
statuses gunicorn cannot be made to answer on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
import wire
from helpers import sha256_file
from servers import ROOT
from servers import GunicornServer

from flask_bits import client as bits_client
from flask_bits.client import MIN_FRAGMENT_SIZE
from flask_bits.client import BITSClient
from flask_bits.client import LocalFileError
from flask_bits.client import RetriesExhausted
from flask_bits.client import ServerRefused
from flask_bits.client import UploadResult
from flask_bits.store import SessionStore

KiB = 1024
MiB = 1024 * 1024

#: Fast retries for tests: a broken connection is retried within milliseconds.
FAST = {"retry_delay": 0.02, "timeout": 30.0, "max_retries": 8, "request_timeout": 30.0}


# -- helpers ------------------------------------------------------------------------


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """Write ``size`` pseudo-random bytes to ``path``; return their SHA-256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(f"seed-{seed}".encode()).digest() * 2048  # 64 KiB pattern
    with open(path, "wb") as f:
        left, n = size, 0
        while left:
            chunk = (block[n % 251:] + block[: n % 251])[: min(left, len(block))]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
            n += 1
    return digest.hexdigest()


def sha256_line(path: Path | str) -> bytes:
    """What the example app's upload-reply directory answers (hex SHA-256 + newline)."""
    return sha256_file(path).encode() + b"\n"


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """``python -m flask_bits.client ARGS`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flask_bits.client", *args], cwd=str(ROOT),
                          env=env, capture_output=True, timeout=timeout, check=False)


CapBytes = pytest.CaptureFixture[bytes]


class CLIResult(t.NamedTuple):
    returncode: int
    stdout: bytes
    stderr: bytes


def cli(capsys: CapBytes, *args: str) -> CLIResult:
    """``python -m flask_bits.client ARGS`` in this process (fast; the real
    subprocess runs are in the tests that say so)."""
    capsys.readouterr()
    try:
        code = bits_client.main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return CLIResult(code, out, err)


class Folders(t.NamedTuple):
    uploads: Path
    sessions: Path
    base: Path


def start_gunicorn(base: Path, **env: str) -> tuple[GunicornServer, Folders]:
    folders = Folders(base / "uploads", base / "sessions", base)
    server = GunicornServer(env={"BITS_UPLOAD_FOLDER": str(folders.uploads),
                                 "BITS_SESSION_FOLDER": str(folders.sessions),
                                 "BITS_CLEANUP_INTERVAL": "0", **env},
                            log_path=base / "gunicorn.log")
    return server.start(), folders


class Live(t.NamedTuple):
    server: GunicornServer
    folders: Folders

    @property
    def url(self) -> str:
        return self.server.url


#: The shared server's fragment limit: above every fragment size the tests use, except
#: in the 413 test.
LIVE_MAX_FRAGMENT = 2 * MiB


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Live]:
    """gunicorn with the example app: ``/bits/`` plain uploads, ``/reply/`` upload-reply."""
    server, folders = start_gunicorn(tmp_path_factory.mktemp("live"),
                                     BITS_MAX_FRAGMENT_SIZE=str(LIVE_MAX_FRAGMENT))
    try:
        yield Live(server, folders)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live_auth(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Live]:
    """The example app with HTTP Basic (alice:alice-pw, bob:bob-pw)."""
    server, folders = start_gunicorn(tmp_path_factory.mktemp("auth"), EXAMPLE_AUTH="basic")
    try:
        yield Live(server, folders)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live_host_id(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Live]:
    """Announces ``BITS-Host-Id: 127.0.0.1`` with a 1 s fallback timeout."""
    server, folders = start_gunicorn(tmp_path_factory.mktemp("hostid"),
                                     BITS_HOST_ID="127.0.0.1",
                                     BITS_HOST_ID_FALLBACK_TIMEOUT="1")
    try:
        yield Live(server, folders)
    finally:
        server.stop()


class Request(t.NamedTuple):
    method: str
    path: str
    headers: dict[str, str]

    @property
    def packet(self) -> str | None:
        return self.headers.get("bits-packet-type")

    @property
    def host(self) -> str:
        return self.headers.get("host", "").rsplit(":", 1)[0]


class Proxy:
    """A TCP forwarder ``127.0.0.1:<port>`` -> ``127.0.0.1:<upstream>`` for fault tests.

    :param cut_upload_after: once, when the client has sent this many bytes in total
        (over all connections), cut the connection that carries the next byte.
    :param cut_get_body_after: once, cut a GET answer after this many body bytes.
    :param refuse_hosts: close connections whose request names one of these hosts.
    :param before_request: called with each :class:`Request` before it is forwarded.

    gunicorn's sync workers close every connection after one answer, so every
    connection carries exactly one request; that is all this proxy handles.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        cut_upload_after: int | None = None,
        cut_get_body_after: int | None = None,
        refuse_hosts: t.Collection[str] = (),
        before_request: t.Callable[[Request], None] | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.cut_upload_after = cut_upload_after
        self.cut_get_body_after = cut_get_body_after
        self.refuse_hosts = set(refuse_hosts)
        self.before_request = before_request
        self.requests: list[Request] = []
        self.cuts: list[str] = []
        self.refused = 0
        self.errors: list[BaseException] = []
        self._uploaded = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def __enter__(self) -> Proxy:
        thread = threading.Thread(target=self._accept_loop, name="test-proxy", daemon=True)
        thread.start()
        self._accept_thread = thread
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accept_thread.join(10)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for th in threads:
            th.join(10)
        self.listener.close()
        assert not any(th.is_alive() for th in threads), "proxy threads did not stop"

    def packets(self) -> list[str | None]:
        with self._lock:
            return [r.packet if r.method == "BITS_POST" else r.method for r in self.requests]

    # -- internals ------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            with self._lock:
                self._socks.add(conn)
                self._threads.append(thread)
            thread.start()

    def _handle(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
                if len(buf) > 65536:
                    return
            head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            req = Request(method, path, headers)
            with self._lock:
                self.requests.append(req)
            if req.host in self.refuse_hosts:
                with self._lock:
                    self.refused += 1
                return
            if self.before_request is not None:
                self.before_request(req)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
            with self._lock:
                self._socks.add(upstream)
            down = threading.Thread(target=self._pump_down, args=(upstream, client, method),
                                    daemon=True)
            down.start()
            self._pump_up(client, upstream, buf)
            down.join(30)
        except OSError:
            pass
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.errors.append(exc)
        finally:
            for s in (client, upstream):
                if s is not None:
                    with self._lock:
                        self._socks.discard(s)
                    s.close()

    def _cut(self, a: socket.socket, b: socket.socket, why: str) -> None:
        with self._lock:
            self.cuts.append(why)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _pump_up(self, client: socket.socket, upstream: socket.socket, first: bytes) -> None:
        data = first
        while data:
            with self._lock:
                limit = self.cut_upload_after
                if limit is not None and self._uploaded + len(data) > limit:
                    self.cut_upload_after = None
                    data = data[: limit - self._uploaded]
                    cut = True
                else:
                    cut = False
                self._uploaded += len(data)
            upstream.sendall(data)
            if cut:
                self._cut(client, upstream, "upload")
                return
            data = client.recv(65536)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _pump_down(self, upstream: socket.socket, client: socket.socket, method: str) -> None:
        head_done = False
        body = 0
        buf = b""
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if method == "GET" and self.cut_get_body_after is not None:
                    if not head_done:
                        buf += data
                        if b"\r\n\r\n" not in buf:
                            continue
                        head, data = buf.split(b"\r\n\r\n", 1)
                        client.sendall(head + b"\r\n\r\n")
                        head_done = True
                    with self._lock:
                        limit = self.cut_get_body_after
                        cut = limit is not None and body + len(data) > limit
                        if cut:
                            self.cut_get_body_after = None
                            data = data[: limit - body]  # type: ignore[operator]
                    client.sendall(data)
                    body += len(data)
                    if cut:
                        self._cut(client, upstream, "get-body")
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)


def expire_session(folders: Folders, session_id: str) -> bool:
    """Expire ``session_id`` like the cleanup does after the session timeout (no
    tombstone); True if it was removed."""
    store = SessionStore(str(folders.sessions))
    removed = store.cleanup(now=time.time() + 10**9, tombstone_timeout=10**12)
    return ("session", session_id) in removed


def state_of(path: Path) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], json.loads(path.read_text()))


def interrupt_after(limit: int, phase: str = "upload") -> bits_client.ProgressCallback:
    def progress(p: str, done: int, total: int) -> None:
        if p == phase and done >= limit:
            raise KeyboardInterrupt

    return progress


# -- plain uploads ------------------------------------------------------------------

integration = pytest.mark.integration


@integration
@pytest.mark.parametrize("size", [0, 1, 4099, 3 * MiB + 17])
def test_upload_is_byte_exact(live: Live, tmp_path: Path, size: int) -> None:
    src = tmp_path / f"file-{size}.bin"
    digest = make_file(src, size, seed=size)
    seen: list[tuple[str, int, int]] = []
    client = BITSClient(live.url + "/bits/", fragment_size=256 * KiB,
                        progress=lambda *a: seen.append(a), **FAST)
    result = client.upload(src)
    dest = live.folders.uploads / src.name
    assert sha256_file(dest) == digest
    assert isinstance(result, UploadResult)
    assert result.size == size
    assert result.url == f"{live.url}/bits/{src.name}"
    assert result.session_id.startswith("{") and result.restarts == 0
    assert result.reply_url is None and result.reply_bytes is None
    assert seen and seen[-1] == ("upload", size, size)
    assert all(0 <= done <= total == size for _, done, total in seen)
    # Close-Session was sent: nothing of the session is left but its tombstone.
    store = SessionStore(str(live.folders.sessions))
    assert store.peek(result.session_id) is None
    assert store.tombstone(result.session_id) is not None


@integration
def test_upload_from_file_object_and_relative_url(live: Live) -> None:
    data = os.urandom(70 * KiB)
    client = BITSClient(live.url + "/bits/", fragment_size=32 * KiB, **FAST)
    result = client.upload(io.BytesIO(data), "stream-upload.bin")
    assert result.size == len(data)
    assert (live.folders.uploads / "stream-upload.bin").read_bytes() == data


@integration
def test_cli_upload_exit_0_with_json(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "cli upload.bin"  # a space: the client percent-encodes the URL
    digest = make_file(src, 300 * KiB + 5)
    proc = run_cli("upload", live.url + "/bits/", str(src), "--fragment-size", "64K", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["size"] == 300 * KiB + 5
    assert result["url"] == f"{live.url}/bits/cli%20upload.bin"
    assert result["fragment_size"] == 64 * KiB
    assert sha256_file(live.folders.uploads / "cli upload.bin") == digest


@integration
def test_cli_plain_output_without_tty(capsysbinary: CapBytes, live: Live, tmp_path: Path) -> None:
    src = tmp_path / "lines.bin"
    make_file(src, 200 * KiB)
    proc = cli(capsysbinary, "upload", live.url + "/bits/lines.bin", str(src),
               "--fragment-size", "64K")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert "upload: 200.0 KiB / 200.0 KiB (100%)" in err  # plain lines, no bar
    assert "\r" not in err
    assert "uploaded 204800 bytes" in err


@integration
def test_existing_destination_is_retried_then_exit_4(capsysbinary: CapBytes, live: Live,
                                                     tmp_path: Path) -> None:
    """409 (overwrites off) is transient for BITS clients (PROTOCOL.md A5, 4.4)."""
    src = tmp_path / "twice.bin"
    make_file(src, 10 * KiB)
    BITSClient(live.url + "/bits/", **FAST).upload(src)
    proc = cli(capsysbinary, "upload", live.url + "/bits/", str(src), "--max-retries", "2",
                   "--retry-delay", "0.01", "-q")
    assert proc.returncode == 4, proc.stderr.decode()
    assert b"409" in proc.stderr


@integration
def test_fatal_answers_exit_3(capsysbinary: CapBytes, live: Live, tmp_path: Path) -> None:
    src = tmp_path / "x.bin"
    make_file(src, 100)
    # A traversal in the destination: 403 E_ACCESSDENIED, fatal, not retried.
    proc = cli(capsysbinary, "upload", live.url + "/bits/a/%2e%2e/x.bin", str(src),
               "--max-retries", "0")
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"403" in proc.stderr
    # Not a BITS directory at all.
    proc = cli(capsysbinary, "upload", live.url + "/nowhere/x.bin", str(src))
    assert proc.returncode == 3
    assert b"not a BITS" in proc.stderr


def test_cli_usage_and_local_errors(capsysbinary: CapBytes, tmp_path: Path) -> None:
    missing = cli(capsysbinary, "upload", "http://127.0.0.1:9/bits/x",
                  str(tmp_path / "missing.bin"), "--max-retries", "0")
    assert missing.returncode == 5
    assert b"missing.bin" in missing.stderr
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    assert cli(capsysbinary, "upload", "ftp://127.0.0.1/x", str(src)).returncode == 2
    too_small = cli(capsysbinary, "upload", "http://127.0.0.1:9/x", str(src),
                    "--fragment-size", "4K")
    assert too_small.returncode == 2
    assert cli(capsysbinary, "frobnicate").returncode == 2
    help_text = cli(capsysbinary, "upload", "--help").stdout.decode()
    for code in ("0 ", "2 ", "3 ", "4 ", "5 ", "130"):
        assert f"\n{code}" in help_text
    assert "Exit codes" in (bits_client.__doc__ or "")


# -- resume and resync ----------------------------------------------------------------


@integration
def test_connection_cut_mid_fragment_resumes(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "cut.bin"
    size = 2 * MiB + 333
    digest = make_file(src, size, seed=7)
    # Cut in the middle of the third fragment's body.
    with Proxy(live.server.port, cut_upload_after=2 * 256 * KiB + 100 * KiB) as proxy:
        client = BITSClient(proxy.url() + "/bits/", fragment_size=256 * KiB, **FAST)
        result = client.upload(src)
    assert proxy.cuts == ["upload"]
    assert not proxy.errors
    assert sha256_file(live.folders.uploads / "cut.bin") == digest
    assert result.restarts == 0
    packets = proxy.packets()
    # After the cut: a Ping (as Windows does on resume), then the fragment again.
    fragments = [i for i, p in enumerate(packets) if p == "Fragment"]
    assert len(fragments) >= 9 + 1  # 9 fragments needed, at least one re-sent
    assert "Ping" in packets[fragments[2]:]


@integration
def test_state_file_resume_and_416_resync(live: Live, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """An interrupted run leaves a state file; the re-run continues the same session.
    A state that claims more than the server holds gets a 416 and resyncs."""
    src = tmp_path / "resume.bin"
    size = 1 * MiB + 99
    digest = make_file(src, size, seed=3)
    state = tmp_path / "state.json"
    url = live.url + "/bits/resume.bin"
    client = BITSClient(url, fragment_size=128 * KiB, progress=interrupt_after(300 * KiB),
                        **FAST)
    with pytest.raises(KeyboardInterrupt):
        client.upload(src, state_file=state)
    saved = state_of(state)
    assert saved["url"] == url and saved["offset"] == 256 * KiB
    assert saved["file"]["size"] == size
    session_id = saved["session_id"]
    assert not (live.folders.uploads / "resume.bin").exists()

    # Pretend more was acknowledged than the server holds: it answers 416 with N.
    saved["offset"] = 768 * KiB
    state.write_text(json.dumps(saved))
    with caplog.at_level(logging.INFO, logger="flask_bits.client"):
        result = BITSClient(url, fragment_size=128 * KiB, **FAST).upload(src,
                                                                         state_file=state)
    assert result.session_id == session_id  # the same session, continued
    assert result.restarts == 0
    assert any("(416)" in r.getMessage() for r in caplog.records)
    assert sha256_file(live.folders.uploads / "resume.bin") == digest
    assert not state.exists()  # removed after success


@integration
def test_state_file_of_a_changed_file_starts_over(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "changing.bin"
    make_file(src, 400 * KiB, seed=1)
    state = tmp_path / "state.json"
    url = live.url + "/bits/changing.bin"
    with pytest.raises(KeyboardInterrupt):
        BITSClient(url, fragment_size=64 * KiB, progress=interrupt_after(100 * KiB),
                   **FAST).upload(src, state_file=state)
    old = state_of(state)["session_id"]
    digest = make_file(src, 300 * KiB, seed=2)  # a different file now
    result = BITSClient(url, fragment_size=64 * KiB, **FAST).upload(src, state_file=state)
    assert result.session_id != old
    assert sha256_file(live.folders.uploads / "changing.bin") == digest
    # The abandoned session was cancelled on the way.
    assert SessionStore(str(live.folders.sessions)).peek(old) is None


@integration
def test_cli_rerun_with_state_file_continues(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "rerun.bin"
    digest = make_file(src, 700 * KiB, seed=5)
    state = tmp_path / "rerun.state"
    url = live.url + "/bits/rerun.bin"
    # First run: interrupted (as by Ctrl-C) -> exit 130, state kept.
    printer_call = bits_client._ProgressPrinter.__call__

    def ctrl_c(self: t.Any, phase: str, done: int, total: int) -> None:
        if done >= 200 * KiB:
            raise KeyboardInterrupt
        printer_call(self, phase, done, total)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bits_client._ProgressPrinter, "__call__", ctrl_c)
        code = bits_client.main(["upload", url, str(src), "--state-file", str(state),
                                 "--fragment-size", "64K", "-q"])
    assert code == 130
    session_id = state_of(state)["session_id"]
    # Second run of the same command, in a new process: continues, exit 0.
    proc = run_cli("upload", url, str(src), "--state-file", str(state), "--fragment-size",
                   "64K", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["session_id"] == session_id
    assert sha256_file(live.folders.uploads / "rerun.bin") == digest
    assert not state.exists()


@integration
def test_session_not_found_restarts_from_zero(live: Live, tmp_path: Path) -> None:
    """The server loses the session (expired) mid-upload: 0x8020001F -> new
    Create-Session, upload again from byte 0 (PROTOCOL.md 4.4, 9.1)."""
    src = tmp_path / "lost.bin"
    digest = make_file(src, 600 * KiB, seed=11)
    created: list[str] = []
    expired: list[bool] = []
    fragments = 0

    def hook(req: Request) -> None:
        nonlocal fragments
        if req.packet == "Fragment":
            fragments += 1
            if fragments == 3:
                expired.append(expire_session(live.folders, req.headers["bits-session-id"]))
        if req.packet == "Create-Session":
            created.append(req.path)

    with Proxy(live.server.port, before_request=hook) as proxy:
        result = BITSClient(proxy.url() + "/bits/", fragment_size=128 * KiB,
                            **FAST).upload(src)
    assert expired == [True]
    assert result.restarts == 1
    assert len(created) == 2
    packets = proxy.packets()
    assert packets.count("Fragment") == 2 + 1 + 5  # 2 ok, 1 refused, all 5 again
    assert sha256_file(live.folders.uploads / "lost.bin") == digest


@integration
def test_cancel_from_the_side_restarts(live: Live, tmp_path: Path) -> None:
    """Cancel-Session sent by someone else mid-upload: the next Fragment gets
    0x8020001F and the client starts over."""
    src = tmp_path / "cancelled.bin"
    digest = make_file(src, 600 * KiB, seed=12)
    fragments = 0

    def hook(req: Request) -> None:
        nonlocal fragments
        if req.packet == "Fragment":
            fragments += 1
            if fragments == 3:
                conn = wire.connect(live.url)
                try:
                    ack = wire.bits_post(conn, req.path, "Cancel-Session",
                                         session_id=req.headers["bits-session-id"])
                finally:
                    conn.close()
                cancelled.append(ack.status)

    cancelled: list[int] = []
    with Proxy(live.server.port, before_request=hook) as proxy:
        result = BITSClient(proxy.url() + "/bits/", fragment_size=128 * KiB,
                            **{**FAST, "max_retries": 2}).upload(src)
    assert cancelled == [200]
    assert result.restarts == 1
    assert sha256_file(live.folders.uploads / "cancelled.bin") == digest


@integration
def test_413_halves_the_fragment_size(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "shrink.bin"
    digest = make_file(src, 5 * MiB + 1)
    result = BITSClient(live.url + "/bits/", fragment_size=16 * MiB, **FAST).upload(src)
    # The whole file fits one 16 MiB fragment; halving what was sent (5 MiB + 1):
    # 2.5 MiB is still refused, 1.25 MiB is below the server's 2 MiB.
    assert LIVE_MAX_FRAGMENT == 2 * MiB
    assert result.fragment_size == (5 * MiB + 1) // 4
    assert sha256_file(live.folders.uploads / "shrink.bin") == digest


# -- host ID ---------------------------------------------------------------------------


@integration
def test_host_id_is_followed_with_the_same_port(live_host_id: Live, tmp_path: Path) -> None:
    src = tmp_path / "farm.bin"
    digest = make_file(src, 200 * KiB)
    with Proxy(live_host_id.server.port) as proxy:
        result = BITSClient(proxy.url("localhost") + "/bits/", fragment_size=64 * KiB,
                            **FAST).upload(src)
        requests = list(proxy.requests)
    assert [r.packet for r in requests[:2]] == ["Ping", "Create-Session"]
    assert {r.host for r in requests[:2]} == {"localhost"}
    # After Create-Session: a Ping to the host-ID host, then everything goes there.
    assert requests[2].packet == "Ping"
    assert {r.host for r in requests[2:]} == {"127.0.0.1"}
    assert {r.headers["host"] for r in requests[2:]} == {f"127.0.0.1:{proxy.port}"}
    assert result.final_url == f"http://127.0.0.1:{proxy.port}/bits/farm.bin"
    assert sha256_file(live_host_id.folders.uploads / "farm.bin") == digest


@integration
def test_host_id_fallback_after_its_timeout(live_host_id: Live, tmp_path: Path) -> None:
    """The host-ID host cannot be reached: after BITS-Host-Id-Fallback-Timeout (1 s)
    the client goes back to the original URL (here the session survives, since both
    names reach the same server and storage)."""
    src = tmp_path / "fallback.bin"
    digest = make_file(src, 200 * KiB)
    with Proxy(live_host_id.server.port, refuse_hosts={"127.0.0.1"}) as proxy:
        started = time.monotonic()
        result = BITSClient(proxy.url("localhost") + "/bits/", fragment_size=64 * KiB,
                            **{**FAST, "max_retries": 20}).upload(src)
        elapsed = time.monotonic() - started
    assert proxy.refused >= 2
    assert elapsed >= 1.0
    assert result.final_url == f"http://localhost:{proxy.port}/bits/fallback.bin"
    assert sha256_file(live_host_id.folders.uploads / "fallback.bin") == digest


# -- authentication ----------------------------------------------------------------------


@integration
def test_basic_auth_answers_the_challenge(live_auth: Live, tmp_path: Path) -> None:
    src = tmp_path / "secret.bin"
    digest = make_file(src, 150 * KiB)
    with Proxy(live_auth.server.port) as proxy:
        result = BITSClient(proxy.url() + "/bits/", auth=("alice", "alice-pw"),
                            fragment_size=64 * KiB, **FAST).upload(src)
        requests = list(proxy.requests)
    assert sha256_file(live_auth.folders.uploads / "secret.bin") == digest
    assert result.size == 150 * KiB
    # The first Ping goes without credentials, is challenged, and is answered.
    assert "authorization" not in requests[0].headers
    assert requests[1].packet == "Ping" and requests[1].headers["authorization"].startswith(
        "Basic ")
    assert all("authorization" in r.headers for r in requests[1:])


@integration
def test_basic_auth_cli(capsysbinary: CapBytes, live_auth: Live, tmp_path: Path) -> None:
    src = tmp_path / "cli-secret.bin"
    digest = make_file(src, 20 * KiB)
    url = live_auth.url + "/bits/"
    ok = cli(capsysbinary, "upload", url, str(src), "--user", "bob:bob-pw")
    assert ok.returncode == 0, ok.stderr.decode()
    assert sha256_file(live_auth.folders.uploads / "cli-secret.bin") == digest
    wrong = cli(capsysbinary, "upload", url + "other.bin", str(src), "--user", "bob:nope")
    assert wrong.returncode == 3
    assert b"credentials were rejected" in wrong.stderr
    anonymous = cli(capsysbinary, "upload", url + "other.bin", str(src))
    assert anonymous.returncode == 3
    assert b"--user" in anonymous.stderr


# -- cancel ---------------------------------------------------------------------------------


@integration
def test_cancel_command(capsysbinary: CapBytes, live: Live, tmp_path: Path) -> None:
    src = tmp_path / "to-cancel.bin"
    make_file(src, 500 * KiB)
    state = tmp_path / "cancel.state"
    url = live.url + "/bits/to-cancel.bin"
    with pytest.raises(KeyboardInterrupt):
        BITSClient(url, fragment_size=64 * KiB, progress=interrupt_after(100 * KiB),
                   **FAST).upload(src, state_file=state)
    sid = state_of(state)["session_id"]
    store = SessionStore(str(live.folders.sessions))
    assert store.peek(sid) is not None

    proc = run_cli("cancel", url, sid)
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"cancelled session {sid}".encode() in proc.stderr
    assert store.peek(sid) is None
    assert store.tombstone(sid) is not None
    assert not (live.folders.uploads / "to-cancel.bin").exists()

    # Again: the server remembers it was cancelled (tombstone) and says 200.
    assert cli(capsysbinary, "cancel", url, sid).returncode == 0
    # An unknown session: nothing to cancel; a warning, still exit 0.
    unknown = cli(capsysbinary, "cancel", url, "{00000000-0000-4000-8000-000000000000}")
    assert unknown.returncode == 0
    assert b"does not know" in unknown.stderr
    # The API says which case it was.
    api = BITSClient(url, **FAST)
    assert api.cancel(None, sid) is True
    assert api.cancel(None, "{00000000-0000-4000-8000-000000000000}") is False


@integration
def test_cancel_from_state_file(capsysbinary: CapBytes, live: Live, tmp_path: Path) -> None:
    src = tmp_path / "state-cancel.bin"
    make_file(src, 500 * KiB)
    state = tmp_path / "c.state"
    url = live.url + "/bits/state-cancel.bin"
    with pytest.raises(KeyboardInterrupt):
        BITSClient(url, fragment_size=64 * KiB, progress=interrupt_after(70 * KiB),
                   **FAST).upload(src, state_file=state)
    sid = state_of(state)["session_id"]
    proc = cli(capsysbinary, "cancel", url, "--state-file", str(state))
    assert proc.returncode == 0, proc.stderr.decode()
    assert SessionStore(str(live.folders.sessions)).peek(sid) is None
    assert not state.exists()


# -- upload-reply ----------------------------------------------------------------------------


@integration
def test_reply_is_downloaded(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "hash-me.bin"
    make_file(src, 1 * MiB + 3)
    result = BITSClient(live.url + "/reply/", fragment_size=256 * KiB, **FAST).upload(src)
    assert result.reply_bytes == sha256_line(src)
    assert result.reply_size == 65
    assert result.reply_url is not None and result.reply_url.startswith(live.url + "/")
    assert result.reply_path is None


@integration
def test_reply_of_an_empty_upload(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "empty-reply.bin"
    src.write_bytes(b"")
    result = BITSClient(live.url + "/reply/", **FAST).upload(src)
    assert result.reply_bytes == hashlib.sha256(b"").hexdigest().encode() + b"\n"


@integration
def test_reply_download_resumes_after_a_cut(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "cut-reply.bin"
    make_file(src, 50 * KiB)
    out = tmp_path / "reply.txt"
    with Proxy(live.server.port, cut_get_body_after=10) as proxy:
        result = BITSClient(proxy.url() + "/reply/", reply_chunk_size=32, **FAST).upload(
            src, reply_output=out)
        requests = list(proxy.requests)
    assert proxy.cuts == ["get-body"]
    assert out.read_bytes() == sha256_line(src)
    assert result.reply_path == str(out)
    assert not Path(str(out) + ".part").exists()
    ranges = [r.headers.get("range") for r in requests if r.method == "GET"]
    assert ranges[:3] == ["bytes=0-31", "bytes=10-41", "bytes=42-64"]
    assert any(r.method == "HEAD" for r in requests)
    # The reply was fetched before Close-Session (PROTOCOL.md 7.4).
    packets = [r.method if r.method != "BITS_POST" else r.packet for r in requests]
    assert packets.index("Close-Session") > max(i for i, p in enumerate(packets) if p == "GET")


@integration
def test_partial_reply_file_is_resumed_on_rerun(live: Live, tmp_path: Path) -> None:
    src = tmp_path / "rerun-reply.bin"
    make_file(src, 40 * KiB)
    out = tmp_path / "rerun-reply.txt"
    state = tmp_path / "reply.state"
    url = live.url + "/reply/rerun-reply.bin"
    with pytest.raises(KeyboardInterrupt):
        BITSClient(url, reply_chunk_size=16, progress=interrupt_after(20, "reply"),
                   **FAST).upload(src, state_file=state, reply_output=out)
    part = Path(str(out) + ".part")
    assert part.stat().st_size == 32  # two 16-byte ranges arrived before the Ctrl-C
    assert state_of(state)["reply_url"]
    starts: list[int] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "reply":
            starts.append(done)

    result = BITSClient(url, reply_chunk_size=16, progress=progress, **FAST).upload(
        src, state_file=state, reply_output=out)
    assert starts[0] == 32  # continued, not started over
    assert out.read_bytes() == sha256_line(src)
    assert result.reply_path == str(out)
    assert not part.exists() and not state.exists()


@integration
def test_reply_cli_stdout_and_file(capsysbinary: CapBytes, live: Live,
                                   tmp_path: Path) -> None:
    src = tmp_path / "cli-reply.bin"
    make_file(src, 30 * KiB)
    proc = run_cli("upload", live.url + "/reply/", str(src), "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == sha256_line(src)  # a small reply goes to stdout
    out = tmp_path / "out" / "reply.bin"
    out.parent.mkdir()
    proc = cli(capsysbinary, "upload", live.url + "/reply/second.bin", str(src), "--reply-output",
                   str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    assert out.read_bytes() == sha256_line(src)


@integration
def test_reply_with_basic_auth(live_auth: Live, tmp_path: Path) -> None:
    src = tmp_path / "auth-reply.bin"
    make_file(src, 10 * KiB)
    result = BITSClient(live_auth.url + "/reply/", auth="alice:alice-pw",
                        **FAST).upload(src)
    assert result.reply_bytes == sha256_line(src)


# -- unit tests against a scripted server ---------------------------------------------------


class Scripted(http.server.ThreadingHTTPServer):
    """A BITS server whose answers to Fragments come from a list (then 200s)."""

    daemon_threads = True

    def __init__(self, fragment_answers: list[tuple[int, dict[str, str]]]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.fragment_answers = fragment_answers
        self.fragment_lengths: list[int] = []
        self.packets: list[str] = []
        self.received = 0

    def __enter__(self) -> Scripted:
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.thread.join(10)
        self.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/bits/f.bin"


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Scripted

    def log_message(self, format: str, *args: t.Any) -> None:
        pass

    def do_BITS_POST(self) -> None:  # noqa: N802
        packet = self.headers.get("BITS-Packet-Type", "")
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.packets.append(packet)
        headers = {"BITS-Session-Id": "{11111111-2222-4333-8444-555555555555}"}
        status = 200
        if packet == "Create-Session":
            headers["BITS-Protocol"] = bits_client.PROTOCOL_GUID
        elif packet == "Fragment":
            self.server.fragment_lengths.append(len(body))
            if self.server.fragment_answers:
                status, extra = self.server.fragment_answers.pop(0)
                headers.update(extra)
            else:
                first, _, rest = self.headers["Content-Range"][6:].partition("-")
                if int(first) <= self.server.received:
                    self.server.received = int(first) + len(body)
            headers.setdefault("BITS-Received-Content-Range", str(self.server.received))
        self.send_response(status)
        self.send_header("BITS-Packet-Type", "Ack")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_413_never_goes_below_5120_bytes() -> None:
    with Scripted([(413, {})] * 10) as server:
        client = BITSClient(server.url, fragment_size=64 * KiB, **FAST)
        with pytest.raises(ServerRefused) as info:
            client.upload(io.BytesIO(b"x" * 100 * KiB))
    assert server.fragment_lengths == [65536, 32768, 16384, 8192, MIN_FRAGMENT_SIZE]
    assert info.value.status == 413
    assert info.value.exit_code == 3


def test_transient_statuses_are_retried() -> None:
    answers = [(503, {"BITS-Error-Code": "0x800700AA", "BITS-Error-Context": "0x5"}),
               (500, {"BITS-Error-Code": "0x80070070", "BITS-Error-Context": "0x5"}),
               (408, {})]
    data = b"y" * 9000
    with Scripted(list(answers)) as server:
        result = BITSClient(server.url, fragment_size=MIN_FRAGMENT_SIZE, **FAST).upload(
            io.BytesIO(data))
    assert result.size == len(data)
    assert server.fragment_lengths == [5120] * 4 + [9000 - 5120]
    assert server.packets[-1] == "Close-Session"


@pytest.mark.parametrize("status, code", [
    (400, "0x80070057"), (403, "0x80070005"), (404, None), (501, "0x80070005"),
    (500, "0x80200020"),  # upload too large: fatal although a 5xx (PROTOCOL.md 4.4)
])
def test_fatal_statuses_are_not_retried(status: int, code: str | None) -> None:
    extra = {"BITS-Error-Code": code, "BITS-Error-Context": "0x5"} if code else {}
    with Scripted([(status, extra)]) as server:
        with pytest.raises(ServerRefused) as info:
            BITSClient(server.url, **FAST).upload(io.BytesIO(b"z" * 100))
    assert server.packets.count("Fragment") == 1
    assert info.value.status == status
    assert "Close-Session" not in server.packets


def test_pending_reply_is_asked_again_without_using_up_retries() -> None:
    """503 + E_PENDING: the server application is still making the reply (reply.py);
    asking again is not a failure."""
    pending = (503, {"BITS-Error-Code": "0x8000000A", "BITS-Error-Context": "0x7",
                     "Retry-After": "0"})
    with Scripted([pending] * 5) as server:
        client = BITSClient(server.url, max_retries=1, retry_delay=0.001, timeout=30)
        result = client.upload(io.BytesIO(b"p" * 100))
    assert result.size == 100
    assert server.packets.count("Fragment") == 6


def test_retries_are_bounded_by_count() -> None:
    with Scripted([(503, {})] * 50) as server:
        client = BITSClient(server.url, max_retries=3, retry_delay=0.001, timeout=30)
        with pytest.raises(RetriesExhausted) as info:
            client.upload(io.BytesIO(b"z" * 100))
    assert server.packets.count("Fragment") == 4  # the first try and 3 retries
    assert info.value.exit_code == 4


def test_retries_are_bounded_by_time() -> None:
    with Scripted([(503, {})] * 1000) as server:
        client = BITSClient(server.url, max_retries=10**6, retry_delay=0.01, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(RetriesExhausted):
            client.upload(io.BytesIO(b"z" * 100))
    assert time.monotonic() - started < 5


def test_nothing_listens_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        client = BITSClient(f"http://127.0.0.1:{port}/bits/x", max_retries=2,
                            retry_delay=0.001)
        with pytest.raises(RetriesExhausted):
            client.upload(io.BytesIO(b"z"))


def test_local_file_changed_during_upload(tmp_path: Path) -> None:
    src = tmp_path / "grow.bin"
    src.write_bytes(b"a" * 20 * KiB)

    def grow(phase: str, done: int, total: int) -> None:
        if done >= 10 * KiB:
            with open(src, "ab") as f:
                f.write(b"more")

    with Scripted([]) as server:
        client = BITSClient(server.url, fragment_size=MIN_FRAGMENT_SIZE, progress=grow,
                            **FAST)
        with pytest.raises(LocalFileError) as info:
            client.upload(src)
    assert info.value.exit_code == 5


def test_url_handling() -> None:
    client = BITSClient("http://user:pw%40x@127.0.0.1:8080/bits/")
    assert client.auth == ("user", "pw@x")
    assert client.base_url == "http://127.0.0.1:8080/bits/"
    assert client.resolve(None, "a b.txt") == "http://127.0.0.1:8080/bits/a%20b.txt"
    assert client.resolve("sub/x.bin") == "http://127.0.0.1:8080/bits/sub/x.bin"
    assert client.resolve("/other/x.bin") == "http://127.0.0.1:8080/other/x.bin"
    with pytest.raises(ValueError):
        client.resolve(None)
    with pytest.raises(ValueError):
        BITSClient("http://127.0.0.1/", fragment_size=MIN_FRAGMENT_SIZE - 1)
    assert bits_client._with_host("http://a.example:8080/p?q=1", "b") == "http://b:8080/p?q=1"
    assert bits_client._with_host("https://a/p", "::1") == "https://[::1]/p"
