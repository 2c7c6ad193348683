"""A BITS web farm: three gunicorn nodes behind a real nginx, on 127.0.0.0/8 only.

Two ways to scale out (docs/deploy.md, PROTOCOL.md 9.4):

* **shared storage** -- every node uses the same session and upload folders, nginx
  spreads every request round-robin, so consecutive fragments of one upload land on
  different nodes. A node is SIGKILLed while a fragment is streaming through it; the
  client resends and the upload goes on through the others. ``flask bits cleanup`` runs
  in a loop the whole time, sweeping deliberately expired sessions.
* **host-ID** -- every node has its own folders and announces its own address in
  ``BITS-Host-Id``. Nodes listen on 127.0.0.2-4 with the *same* port as nginx on
  127.0.0.1, because the client replaces only the host part of the URL (A36). A killed
  node's clients fall back to the origin after ``BITS-Host-Id-Fallback-Timeout``,
  get ``BG_E_SESSION_NOT_FOUND`` and start over on another node.

The client is :mod:`tests.farm_client`; the proxy is :mod:`tests.nginx`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest

from tests.farm_client import BG_E_SESSION_NOT_FOUND
from tests.farm_client import BITSUploader
from tests.farm_client import UploadResult
from tests.helpers import sha256_file
from tests.nginx import NginxServer
from tests.nginx import nginx_binary
from tests.servers import ROOT
from tests.servers import GunicornServer
from tests.servers import free_port

pytestmark = pytest.mark.integration

KIB = 1024
MIB = 1024 * KIB
FRAGMENT = 256 * KIB
MAX_FRAGMENT = 1 * MIB
FALLBACK_TIMEOUT = 2
#: Longest a test thread waits at a checkpoint before it gives up.
GATE_TIMEOUT = 60.0


@pytest.fixture(scope="module", autouse=True)
def _need_nginx() -> None:
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing: .ci/run must call .ci/install-nginx")
        pytest.skip("nginx is not installed (run .ci/install-nginx as root)")


# -- nodes ------------------------------------------------------------------------------


class FarmNode(GunicornServer):
    """A gunicorn node that listens on ``host`` (any 127.0.0.0/8 address)."""

    def __init__(self, host: str = "127.0.0.1", **kwargs: t.Any) -> None:
        kwargs.setdefault("workers", 2)
        super().__init__(**kwargs)
        self.host = host
        self.address = f"{host}:{self.port}"
        self.url = f"http://{self.address}"
        self.args[self.args.index("-b") + 1] = self.address

    def kill(self) -> None:
        """SIGKILL the master and every worker (its process group), as a crash would."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def busy_workers(self) -> int:
        """Workers that hold an established client connection (serving a request now)."""
        established = _established_inodes(self.host, self.port)
        busy = 0
        for pid in self.worker_pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in established:
                    busy += 1
                    break
        return busy


def _established_inodes(host: str, port: int) -> set[str]:
    """Socket inodes of ESTABLISHED TCP connections whose local end is ``host:port``."""
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1] == local and cols[3] == "01":
                inodes.add(cols[9])
    return inodes


def common_free_port(hosts: t.Sequence[str]) -> int:
    """A port that is free on every one of ``hosts`` right now."""
    for _ in range(50):
        port = free_port()
        socks: list[socket.socket] = []
        try:
            for host in hosts:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


# -- helpers ----------------------------------------------------------------------------


def make_files(prefix: str, count: int, size: int, seed: int) -> dict[str, bytes]:
    """``count`` files of about ``size`` bytes (sizes differ so fragments misalign)."""
    rng = random.Random(seed)
    return {
        f"{prefix}-{i:02d}.bin": rng.randbytes(size - rng.randrange(0, FRAGMENT))
        for i in range(count)
    }


def run_uploads(
    origin: str,
    files: t.Mapping[str, bytes],
    *,
    make: t.Callable[[str, bytes], BITSUploader] | None = None,
    on_start: t.Callable[[dict[str, BITSUploader]], None] | None = None,
) -> dict[str, UploadResult]:
    """Upload every file concurrently (one thread each); re-raise the first failure.

    ``on_start(uploaders)`` runs in this thread while the uploads go on (tests use it to
    wait for a checkpoint and kill a node); whatever it raises, every thread ends.
    """
    uploaders = {
        name: (make(name, data) if make else BITSUploader(origin, f"/bits/{name}", data))
        for name, data in files.items()
    }
    results: dict[str, UploadResult] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(uploaders)) as pool:
        futures = {pool.submit(u.run): name for name, u in uploaders.items()}
        if on_start is not None:
            on_start(uploaders)
        for future in concurrent.futures.as_completed(futures, timeout=180):
            results[futures[future]] = future.result()
    return results


class Checkpoint:
    """Uploads stop at ``offset`` until :meth:`release`; :meth:`wait` until all arrived."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.arrived: set[str] = set()
        self.cond = threading.Condition()
        self.released = threading.Event()

    def arrive(self, uploader: BITSUploader) -> None:
        with self.cond:
            if uploader.path in self.arrived:
                return
            self.arrived.add(uploader.path)
            self.cond.notify_all()
        if not self.released.wait(GATE_TIMEOUT):
            raise TimeoutError(f"{uploader.path}: never released from the checkpoint")

    def after_fragment(self, uploader: BITSUploader, offset: int) -> None:
        if offset >= self.offset:
            self.arrive(uploader)

    def mid_fragment(self, uploader: BITSUploader, first: int) -> None:
        if first >= self.offset:
            self.arrive(uploader)

    def wait(self, count: int, timeout: float = GATE_TIMEOUT) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.arrived) >= count, timeout):
                raise TimeoutError(f"only {len(self.arrived)} of {count} uploads arrived")

    def release(self) -> None:
        self.released.set()


def flask_cli(
    env: t.Mapping[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``flask <args>`` for the example app with a node's environment."""
    full = {**os.environ, **env, "FLASK_APP": "example_app:create_app"}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "flask", *args], cwd=str(ROOT), env=full,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


class CleanupLoop:
    """Runs ``flask bits cleanup`` back to back, as a cron job on one node would."""

    def __init__(self, env: t.Mapping[str, str], max_runs: int = 40) -> None:
        self.env = dict(env)
        self.max_runs = max_runs
        self.runs: list[tuple[float, float, subprocess.CompletedProcess[str]]] = []
        self.lock = threading.Lock()
        self.finished_run = threading.Condition(self.lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cleanup-loop", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set() and len(self.runs) < self.max_runs:
            started = time.monotonic()
            proc = flask_cli(self.env, "bits", "cleanup")
            with self.lock:
                self.runs.append((started, time.monotonic(), proc))
                self.finished_run.notify_all()

    def wait_for_run_started_after(self, when: float, timeout: float = GATE_TIMEOUT) -> None:
        with self.finished_run:
            if not self.finished_run.wait_for(
                lambda: any(start >= when for start, _, _ in self.runs)
                or not self._thread.is_alive(), timeout
            ):
                raise TimeoutError("no cleanup run finished in time")

    def removed(self) -> list[str]:
        return [line for _, _, p in self.runs for line in p.stdout.splitlines()
                if line.startswith("removed ")]

    def __enter__(self) -> CleanupLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def abandon_sessions(origin: str, count: int) -> list[str]:
    """Open sessions that send one fragment and are never touched again; then age them
    past the session timeout, so the next ``flask bits cleanup`` must remove them."""
    sids = []
    for i in range(count):
        data = random.Random(1000 + i).randbytes(3 * FRAGMENT)
        uploader = BITSUploader(origin, f"/bits/abandoned-{i}.bin", data)
        try:
            sids.append(uploader.create_session())
            reply = uploader.send_fragment(0, FRAGMENT - 1)
            assert reply.status == 200, reply
        finally:
            uploader.close()
    return sids


def backdate_sessions(session_folder: Path, sids: t.Iterable[str], seconds: float) -> None:
    for sid in sids:
        path = session_folder / "sessions" / sid / "state.json"
        state = json.loads(path.read_text())
        state["last_activity"] -= seconds
        tmp = path.with_suffix(".json.aged")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def raw_fragment(origin: str, path: str, sid: str) -> tuple[int, str | None]:
    """One Fragment for ``sid`` through ``origin``: (status, BITS-Error-Code)."""
    uploader = BITSUploader(origin, path, b"x")
    try:
        reply = uploader.send_fragment(0, 0, session_id=sid)
    finally:
        uploader.close()
    return reply.status, reply.get("BITS-Error-Code")


def check_folder(folder: Path, expected: t.Mapping[str, str]) -> None:
    """``folder`` holds exactly the ``expected`` files (name -> SHA-256), nothing partial."""
    found = {p.name for p in folder.iterdir() if p.name != ".reply-uploads"}
    assert found == set(expected), (sorted(found - set(expected)), sorted(set(expected) - found))
    for name, digest in expected.items():
        assert sha256_file(folder / name) == digest, name


# -- shared storage ---------------------------------------------------------------------


def test_shared_storage_farm(tmp_path: Path) -> None:
    """Three nodes share one session folder and one upload folder behind round-robin."""
    sessions, uploads = tmp_path / "sessions", tmp_path / "uploads"
    env = {
        "BITS_SESSION_FOLDER": str(sessions),
        "BITS_UPLOAD_FOLDER": str(uploads),
        "BITS_MAX_FRAGMENT_SIZE": str(MAX_FRAGMENT),
        "BITS_READ_TIMEOUT": "30",
        # No sweeps inside the nodes: the operator's `flask bits cleanup` does them.
        "BITS_CLEANUP_INTERVAL": "0",
    }
    nodes = [FarmNode(env=env, log_path=tmp_path / f"node{i}.log") for i in range(3)]
    with contextlib.ExitStack() as stack:
        for node in nodes:
            stack.enter_context(node)
        proxy = stack.enter_context(
            NginxServer([n.address for n in nodes], max_fragment_size=MAX_FRAGMENT)
        )
        addresses = {n.address for n in nodes}

        # Sessions nobody will come back for, aged past their timeout: the cleanup
        # loop must remove them -- and nothing else -- while the uploads run.
        abandoned = abandon_sessions(proxy.url, 4)
        backdate_sessions(sessions, abandoned, 15 * 24 * 3600)

        # The operator's cleanup, on "one node", the whole time; tombstones of closed
        # sessions expire at once so it has work to do beside the abandoned sessions.
        cleanup = stack.enter_context(CleanupLoop({**env, "BITS_TOMBSTONE_TIMEOUT": "0"}))

        # -- 1: 20 concurrent uploads, every fragment round-robin over the nodes --------
        files1 = make_files("shared", 20, 3 * MIB, seed=1)
        midpoint = Checkpoint(MIB)
        sweep_started: list[float] = []

        def wait_for_sweep(uploads: dict[str, BITSUploader]) -> None:
            # Everyone parks mid-upload; a whole cleanup run happens; everyone goes on.
            try:
                midpoint.wait(len(uploads))
                sweep_started.append(time.monotonic())
                cleanup.wait_for_run_started_after(sweep_started[0])
            finally:
                midpoint.release()

        results1 = run_uploads(
            proxy.url, files1, on_start=wait_for_sweep,
            make=lambda name, data: BITSUploader(proxy.url, f"/bits/{name}", data,
                                                 fragment_size=FRAGMENT,
                                                 after_fragment=midpoint.after_fragment),
        )
        for name, result in results1.items():
            assert result.restarts == 0, name
            assert result.sha256 == hashlib.sha256(files1[name]).hexdigest()
            frags = [a for a in result.fragments() if a.status == 200]
            assert len(frags) >= 10, name
            # Consecutive fragments were served by different nodes.
            served = [a.answered_by for a in frags]
            assert set(served) <= addresses, served
            assert len(set(served)) >= 2, (name, served)
            assert any(a != b for a, b in zip(served, served[1:], strict=False)), (name, served)
        used = set().union(*(r.upstreams() for r in results1.values()))
        assert used == addresses, used
        check_folder(uploads, {n: hashlib.sha256(d).hexdigest() for n, d in files1.items()})

        # -- 2: a node dies while a fragment streams through it ---------------------------
        files2 = make_files("killed", 20, 3 * MIB, seed=2)
        checkpoint = Checkpoint(MIB)
        # One upload stops half-way through a fragment's body. (One only: with sync
        # workers a stalled body holds a worker, and two stalls on one node would leave
        # it no worker for the requests nginx keeps sending it -- see docs/deploy.md.)
        stallers = set(list(files2)[:1])
        victim: list[FarmNode] = []
        killed_at: list[float] = []

        def kill_busy_node(uploads: dict[str, BITSUploader]) -> None:
            try:
                checkpoint.wait(len(uploads))
                # Every other upload waits between two requests: once exactly one worker
                # holds a connection, it is the one reading the stalled body. Kill its node.
                deadline = time.monotonic() + 15
                while True:
                    busy = {n.address: n.busy_workers() for n in nodes}
                    if sum(busy.values()) == 1:
                        break
                    assert time.monotonic() < deadline, f"stalled fragment not found: {busy}"
                    time.sleep(0.05)
                node = max(nodes, key=lambda n: busy[n.address])
                victim.append(node)
                killed_at.append(time.monotonic())
                node.kill()
            finally:
                checkpoint.release()

        def make2(name: str, data: bytes) -> BITSUploader:
            if name in stallers:
                return BITSUploader(proxy.url, f"/bits/{name}", data, fragment_size=FRAGMENT,
                                    mid_fragment=checkpoint.mid_fragment)
            return BITSUploader(proxy.url, f"/bits/{name}", data, fragment_size=FRAGMENT,
                                after_fragment=checkpoint.after_fragment)

        results2 = run_uploads(proxy.url, files2, make=make2, on_start=kill_busy_node)
        dead = victim[0].address
        for name, result in results2.items():
            assert result.restarts == 0, (name, "shared storage never loses a session")
            assert result.sha256 == hashlib.sha256(files2[name]).hexdigest()
            late = [a for a in result.attempts if a.time > killed_at[0] and a.status == 200]
            assert all(a.answered_by != dead for a in late), name
        # The fragment that was streaming through the victim failed and was sent again.
        interrupted = [a for r in results2.values() for a in r.failures
                       if a.packet == "Fragment" and a.time > killed_at[0]]
        assert interrupted, "no in-flight fragment was cut by the kill"
        # nginx answers 502 naming the dead node (it cannot resend a streamed body), or
        # the connection drops; either way the client resent and resynced.
        assert any(a.answered_by == dead or a.exception for a in interrupted), interrupted

        # Nothing else broke: all files complete, no session left open, the abandoned
        # ones swept, every cleanup run succeeded.
        check_folder(uploads, {n: hashlib.sha256(d).hexdigest()
                               for n, d in {**files1, **files2}.items()})
        listing = flask_cli(env, "bits", "sessions", "--json")
        assert listing.returncode == 0, listing.stderr
        open_ids = {row["id"] for row in json.loads(listing.stdout)}
        assert open_ids == set(), open_ids
        for i, sid in enumerate(abandoned):
            status, code = raw_fragment(proxy.url, f"/bits/abandoned-{i}.bin", sid)
            assert (status, code) == (500, "0x8020001F")
        cleanup.__exit__()
        assert cleanup.runs, "the cleanup loop never ran"
        for _, _, proc in cleanup.runs:
            assert proc.returncode == 0, proc.stderr
        removed = cleanup.removed()
        assert {f"removed session {sid}" for sid in abandoned} <= set(removed), removed
        swept = {line.split()[-1] for line in removed if line.startswith("removed session ")}
        assert swept == set(abandoned), swept
        assert not list((sessions / "staging").iterdir())


# -- host ID ----------------------------------------------------------------------------


def test_host_id_farm(tmp_path: Path) -> None:
    """Separate folders per node; each node sends its own BITS-Host-Id."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = common_free_port(["127.0.0.1", *hosts])
    envs = {
        host: {
            "BITS_SESSION_FOLDER": str(tmp_path / host / "sessions"),
            "BITS_UPLOAD_FOLDER": str(tmp_path / host / "uploads"),
            "BITS_MAX_FRAGMENT_SIZE": str(MAX_FRAGMENT),
            "BITS_HOST_ID": host,
            "BITS_HOST_ID_FALLBACK_TIMEOUT": str(FALLBACK_TIMEOUT),
        }
        for host in hosts
    }
    nodes = {
        host: FarmNode(host=host, port=port, env=envs[host],
                       log_path=tmp_path / f"node-{host}.log")
        for host in hosts
    }
    with contextlib.ExitStack() as stack:
        for node in nodes.values():
            stack.enter_context(node)
        proxy = stack.enter_context(NginxServer(
            [n.address for n in nodes.values()], host="127.0.0.1", port=port,
            max_fragment_size=MAX_FRAGMENT,
        ))
        assert proxy.url == f"http://127.0.0.1:{port}"

        def make(name: str, data: bytes, **kwargs: t.Any) -> BITSUploader:
            return BITSUploader(proxy.url, f"/bits/{name}", data, fragment_size=FRAGMENT,
                                **kwargs)

        # -- 1: the origin creates, the host-ID host receives ---------------------------
        files1 = make_files("hostid", 15, 2 * MIB, seed=3)
        results1 = run_uploads(proxy.url, files1, make=make)
        landed: dict[str, dict[str, str]] = {host: {} for host in hosts}
        for name, result in results1.items():
            assert result.restarts == 0 and not result.fallbacks, name
            host = result.host_id
            assert host in hosts, result.host_ids
            creates = [a for a in result.attempts if a.packet == "Create-Session"]
            assert creates[-1].base == proxy.url
            # The node that made the session announced itself.
            assert creates[-1].answered_by == f"{host}:{port}", creates[-1]
            later = [a for a in result.attempts if a.packet != "Create-Session"]
            assert later[0].packet == "Ping"
            # Same port, other host: straight to the node, past the proxy.
            assert {a.base for a in later} == {f"http://{host}:{port}"}
            assert all(a.upstream is None for a in later)
            landed[host][name] = hashlib.sha256(files1[name]).hexdigest()
        assert all(landed.values()), {h: len(f) for h, f in landed.items()}
        for host in hosts:
            check_folder(tmp_path / host / "uploads", landed[host])

        # -- 2: a node dies with sessions half-way; its clients fall back and restart ----
        files2 = make_files("failover", 20, 2 * MIB, seed=4)
        checkpoint = Checkpoint(MIB)
        victim: list[str] = []
        killed_at: list[float] = []

        def kill_busiest(uploads: dict[str, BITSUploader]) -> None:
            try:
                checkpoint.wait(len(uploads))
                counts = {h: sum(u.host_id == h for u in uploads.values()) for h in hosts}
                host = max(hosts, key=lambda h: counts[h])
                assert counts[host] > 0, counts
                victim.append(host)
                killed_at.append(time.monotonic())
                nodes[host].kill()
            finally:
                checkpoint.release()

        results2 = run_uploads(
            proxy.url, files2, on_start=kill_busiest,
            make=lambda name, data: make(name, data, after_fragment=checkpoint.after_fragment),
        )
        dead = victim[0]
        orphans = set()
        moved = 0
        for name, result in results2.items():
            assert result.host_id in hosts and result.host_id != dead, (name, result.host_ids)
            if result.host_ids[0] == dead:
                # 9.4: unreachable for the fallback timeout -> origin -> SESSION_NOT_FOUND
                # -> a new session elsewhere, from byte 0.
                moved += 1
                assert result.fallbacks, name
                assert all(f.host == dead for f in result.fallbacks)
                assert min(f.unreachable_for for f in result.fallbacks) >= FALLBACK_TIMEOUT
                assert result.restarts >= 1
                at_origin = [a for a in result.attempts
                             if a.session_id == result.sessions[0] and a.base == proxy.url]
                assert at_origin and at_origin[-1].error_code == BG_E_SESSION_NOT_FOUND
                assert len(result.sessions) == result.restarts + 1
                orphans.add(result.sessions[0])
            else:
                assert result.restarts == 0 and not result.fallbacks, name
            landed[result.host_id][name] = hashlib.sha256(files2[name]).hexdigest()
        assert moved > 0
        # Every finished file is complete and sits where its last session was.
        for host in hosts:
            check_folder(tmp_path / host / "uploads", landed[host])
        # The dead node keeps its half-done sessions until they expire (9.4).
        listing = flask_cli(envs[dead], "bits", "sessions", "--json")
        assert listing.returncode == 0, listing.stderr
        rows = json.loads(listing.stdout)
        assert {r["id"] for r in rows} == orphans
        assert all(r["received"] < r["total"] for r in rows), rows
        # The live nodes closed everything.
        for host in hosts:
            if host != dead:
                listing = flask_cli(envs[host], "bits", "sessions", "--json")
                assert listing.returncode == 0 and json.loads(listing.stdout) == []


def test_nginx_passes_bits_post_untouched(tmp_path: Path) -> None:
    """The generated proxy config: BITS_POST and its headers reach the node as sent, and
    an oversized fragment gets the node's 413 Ack, not nginx's HTML page."""
    env = {
        "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
        "BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
        "BITS_MAX_FRAGMENT_SIZE": str(64 * KIB),
    }
    with FarmNode(env=env, workers=1) as node, NginxServer(
        [node.address], max_fragment_size=64 * KIB
    ) as proxy:
        uploader = BITSUploader(proxy.url, "/bits/big.bin", b"y" * (128 * KIB))
        try:
            uploader.create_session()
            # Above the node's limit but within nginx's: the node's 413 Ack comes back.
            reply = uploader.send_fragment(0, 96 * KIB - 1)
            assert reply.is_ack and reply.status == 413, reply
            assert reply.get("X-Upstream") == node.address
            reply = uploader.send_fragment(0, 64 * KIB - 1)
            assert reply.status == 200, reply
            assert reply.get("BITS-Received-Content-Range") == str(64 * KIB)
            # Above nginx's own limit: nginx refuses it itself, with a page, not an Ack
            # (so client_max_body_size must stay above BITS_MAX_FRAGMENT_SIZE).
            size = 256 * KIB  # small enough to sit in socket buffers while nginx answers
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=30)
            try:
                conn.request("BITS_POST", "/bits/big.bin", body=b"z" * size, headers={
                    "BITS-Packet-Type": "Fragment", "BITS-Session-Id": uploader.session_id,
                    "Content-Range": f"bytes 0-{size - 1}/{size}"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 413 and resp.getheader("BITS-Packet-Type") is None
                assert resp.getheader("X-Upstream") is None  # never reached a node
            finally:
                conn.close()
        finally:
            uploader.close()
        assert '"BITS_POST /bits/big.bin HTTP/1.1" 413' in "\n".join(proxy.read_access_log())
