"""Throughput and cost of flask-bits against the limit of its own stack, in one run.

    python bench/run.py                      # the default variants (5-10 minutes)
    python bench/run.py --smoke --reps 1     # tiny sizes, ~10 seconds
    python bench/run.py --only w1,w3 --reps 5 --out results.md
    python bench/run.py --patched /tmp/fb-patched   # adds B' (a patched flask_bits copy)
    python bench/run.py --variants A,A-flask,B --only w2

Variants, all under the same gunicorn settings (gthread, 2 workers x 4 threads, pinned to
CPU 1; the client is pinned to CPU 0):

* ``A``        bench/baseline_app.py: stream the body to a file at the offset, answer 200;
* ``A-fsync``  the same, fsync before answering (the disk's own cost of durability);
* ``A-flask``  the same inside a one-route Flask app (what Flask itself costs);
* ``A-direct`` A reading the body as flask-bits does under gunicorn: straight from the
               socket into a reusable buffer, not through gunicorn's ``wsgi.input``;
* ``B``        flask-bits, the example app, plain ``/bits`` directory;
* ``B-fsync``  the same with ``BITS_FSYNC=true``;
* ``B-wsgi``   flask-bits through ``BITSMiddleware`` in front of a bare WSGI app (no Flask);
* ``B'``, ``B'-fsync``, ``B'-wsgi``  with ``--patched DIR``: flask_bits imported from DIR.

Default: A, A-direct, B, B-fsync (plus B', B'-fsync per --patched).

Workloads (see bench/README.md): w1 1 GiB in 8 MiB fragments (MB/s); w2 256 MiB in 64 KiB
fragments (fragments/s); w3 32 concurrent sessions x 32 MiB in 1 MiB fragments (aggregate
MB/s); w4 peak RSS per worker (256 MiB and 2 GiB uploads, and during w3); w5 Create+Close
round trip with an empty store vs one holding 10 000 sessions.

Every repetition runs every selected workload on every variant, variant order rotated per
repetition, so that noise from the machine lands on all of them alike. Reported: the
median over repetitions and the spread (min-max). MB = 10^6 bytes, MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from client import Client  # noqa: E402
from client import UploadError  # noqa: E402
from client import upload  # noqa: E402
from servers import GunicornServer  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000


# -- sizes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    w1_total: int = 1 * GiB
    w1_fragment: int = 8 * MiB
    w2_total: int = 256 * MiB
    w2_fragment: int = 64 * KiB
    w3_sessions: int = 32
    w3_total: int = 32 * MiB
    w3_fragment: int = 1 * MiB
    w4_small: int = 256 * MiB
    w4_large: int = 2 * GiB
    w4_fragment: int = 8 * MiB
    w5_sessions: int = 10_000
    w5_round_trips: int = 400
    w5_batch: int = 40
    w5_warmup: int = 30

    @property
    def source_size(self) -> int:
        return max(self.w1_total, self.w2_total, self.w3_sessions * self.w3_total,
                   self.w4_small, self.w4_large)


SMOKE = Sizes(
    w1_total=4 * MiB, w1_fragment=1 * MiB,
    w2_total=512 * KiB, w2_fragment=64 * KiB,
    w3_sessions=4, w3_total=1 * MiB, w3_fragment=256 * KiB,
    w4_small=1 * MiB, w4_large=4 * MiB, w4_fragment=1 * MiB,
    w5_sessions=50, w5_round_trips=10, w5_batch=5, w5_warmup=2,
)

WORKLOADS = ("w1", "w2", "w3", "w4", "w5")


# -- machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: str) -> str:
    """``device (fstype) mounted on mountpoint`` for the mount holding ``path``."""
    path = os.path.realpath(path)
    best = ("?", "?", "/")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize / GiB
    return f"{best[0]} ({best[1]}) mounted on {best[2]}, {free:.0f} GiB free"


def machine_lines(tmp: str, pinned: bool) -> list[str]:
    import gunicorn

    try:
        from importlib.metadata import version

        import flask_bits  # noqa: F401
        fb = version("flask-bits")
    except Exception:  # pragma: no cover - informational only
        fb = "?"
    return [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores"
        + (" (client pinned to CPU 0, server to CPU 1)" if pinned else " (not pinned)"),
        f"Memory: {_meminfo('MemTotal') // 1024} MiB; kernel {platform.release()}",
        f"Temp dir: {tmp} on {filesystem_of(tmp)}",
        f"Python {platform.python_version()}, gunicorn {gunicorn.__version__}, flask-bits {fb}",
    ]


def _meminfo(key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# -- servers ---------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    kind: str  # "A" (baseline) or "B" (flask-bits)
    fsync: bool = False
    pythonpath: str | None = None  # a folder holding a patched flask_bits
    flask: bool = False  # A only: the baseline inside a one-route Flask app
    direct: bool = False  # A only: body read from gunicorn's socket (flask_bits.direct_input)
    wsgi: bool = False  # B only: BITSMiddleware in front of a bare WSGI app, no Flask

    @property
    def prefix(self) -> str:
        return "/a" if self.kind == "A" else "/bits"


class BenchServer(GunicornServer):
    """GunicornServer pinned with ``taskset`` and pointed at its own folders."""

    def __init__(self, variant: Variant, folder: Path, *, workers: int, threads: int,
                 cpu: int | None, session_folder: Path | None = None) -> None:
        self.variant = variant
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        if variant.kind == "A":
            self.upload_folder = folder / "files"
            self.upload_folder.mkdir(exist_ok=True)
            app = "baseline_app:make_flask_app()" if variant.flask else "baseline_app:app"
            env = {"BASELINE_FOLDER": str(self.upload_folder),
                   "BASELINE_FSYNC": "1" if variant.fsync else "0",
                   "BASELINE_DIRECT": "1" if variant.direct else "0"}
        else:
            self.upload_folder = folder / "uploads"
            self.session_folder = session_folder or folder / "sessions"
            app = "middleware_app:create_app()" if variant.wsgi else "example_app:create_app()"
            env = {"BITS_UPLOAD_FOLDER": str(self.upload_folder),
                   "BITS_SESSION_FOLDER": str(self.session_folder),
                   "BITS_FSYNC": "true" if variant.fsync else "false"}
        super().__init__(app, env=env, workers=workers, worker_class="gthread",
                         threads=threads, log_path=folder / "gunicorn.log")
        # Patched flask_bits first, then the repository (example_app), then bench/.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (variant.pythonpath, str(ROOT), str(BENCH)) if p)
        if cpu is not None:
            self.args = ["taskset", "-c", str(cpu), *self.args]

    def launch(self) -> None:
        """Start gunicorn without waiting. The working directory is the server's own
        folder, not the repository: ``python -m`` puts the working directory first on
        sys.path, which would shadow a patched flask_bits given in PYTHONPATH."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            self.args, cwd=str(self.folder), env=self.env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> BenchServer:
        from servers import wait_for_port

        self.launch()
        try:
            wait_for_port(self.port, proc=self.proc, timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def output(self, name: str) -> Path:
        return self.upload_folder / name

    def reset_peaks(self) -> None:
        """Reset VmHWM of every worker (``echo 5 > /proc/<pid>/clear_refs``)."""
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pids: t.Iterable[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads, dead ones included)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RSSSampler:
    """Samples VmRSS of a server's workers every ``interval`` s; at the end takes VmHWM.

    ``peak_mib`` is the largest per-worker peak (max of sampled VmRSS and VmHWM).
    """

    def __init__(self, server: BenchServer, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.server.worker_pids():
                self.peak_kib = max(self.peak_kib, _status_kib(pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self.server.reset_peaks()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for pid in self.server.worker_pids():
            self.peak_kib = max(self.peak_kib, _status_kib(pid, "VmHWM"))

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


# -- the bench -------------------------------------------------------------------------


def row_labels(s: Sizes) -> dict[str, tuple[str, str, str]]:
    """Table rows in order: key -> (workload label, unit, which way is better)."""

    def sz(n: int) -> str:
        if n >= GiB and n % GiB == 0:
            return f"{n // GiB} GiB"
        return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"

    w3 = f"{s.w3_sessions} sessions x {sz(s.w3_total)}"
    return {
        "w1": (f"w1 {sz(s.w1_total)}, {sz(s.w1_fragment)} fragments", "MB/s", "higher"),
        "w2": (f"w2 {sz(s.w2_total)}, {sz(s.w2_fragment)} fragments", "fragments/s", "higher"),
        "w3": (f"w3 {w3}, {sz(s.w3_fragment)} fragments", "MB/s", "higher"),
        "w4-small": (f"w4 peak RSS/worker, {sz(s.w4_small)} upload", "MiB", "lower"),
        "w4-large": (f"w4 peak RSS/worker, {sz(s.w4_large)} upload", "MiB", "lower"),
        "w4-w3": ("w4 peak RSS/worker, during w3", "MiB", "lower"),
        "w5-empty": ("w5 Create+Close, empty store", "ms", "lower"),
        "w5-full": (f"w5 Create+Close, {s.w5_sessions} sessions", "ms", "lower"),
        "w5-ratio": (f"w5 {s.w5_sessions} sessions / empty", "x", "lower"),
        "w1-cpu": ("cost: w1 server CPU", "s/GiB", "lower"),
        "w2-cpu": ("cost: w2 server CPU", "µs/fragment", "lower"),
        "w3-cpu": ("cost: w3 server CPU", "s/GiB", "lower"),
    }


@dataclass
class Bench:
    sizes: Sizes
    tmp: Path
    source: Path
    variants: list[Variant]
    workers: int
    threads: int
    pinned: bool
    verify: bool
    deadline_s: float
    w2_seconds: float | None = None
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    servers: dict[str, BenchServer] = field(default_factory=dict)
    full_servers: dict[str, BenchServer] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # -- setup ----------------------------------------------------------------------

    def start_servers(self, workloads: t.Sequence[str]) -> None:
        cpu = 1 if self.pinned else None
        pending: list[BenchServer] = []
        for v in self.variants:
            srv = BenchServer(v, self.tmp / f"srv-{_slug(v.name)}", workers=self.workers,
                              threads=self.threads, cpu=cpu)
            self.servers[v.name] = srv
            pending.append(srv)
        if "w5" in workloads and any(v.kind == "B" for v in self.variants):
            full_store = self.tmp / "full-store"
            t0 = time.perf_counter()
            prefill_store(full_store, self.sizes.w5_sessions)
            self.notes.append(f"w5: {self.sizes.w5_sessions} sessions created with "
                              f"SessionStore.create in {time.perf_counter() - t0:.1f} s")
            for v in self.variants:
                if v.kind == "B":
                    srv = BenchServer(v, self.tmp / f"srv-{_slug(v.name)}-full",
                                      workers=self.workers, threads=self.threads, cpu=cpu,
                                      session_folder=full_store)
                    self.full_servers[v.name] = srv
                    pending.append(srv)
        # Start them all at once (each waits for its port in turn).
        for srv in pending:
            srv.launch()
        from servers import wait_for_port
        for srv in pending:
            wait_for_port(srv.port, proc=srv.proc, timeout=60)
        # The workers are forked after the port opens: wait until all are up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len(s.worker_pids()) >= self.workers for s in pending):
                break
            time.sleep(0.05)
        # One Ping each so that every worker has imported and built its app.
        for srv in pending:
            with Client(srv.port, timeout=30) as c:
                for _ in range(self.workers * 2):
                    c.post(srv.variant.prefix + "/ping", "Ping")

    def stop_servers(self) -> None:
        """SIGTERM every server at once, then wait (SIGKILL after 10 s), then close logs."""
        servers = [*self.servers.values(), *self.full_servers.values()]
        for srv in servers:
            if srv.proc is not None and srv.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(srv.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for srv in servers:
            if srv.proc is None:
                continue
            try:
                srv.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait(timeout=10)
        for srv in servers:
            with contextlib.suppress(Exception):
                srv.stop()  # closes the log file; the process is already gone

    def record(self, row: str, variant: str, value: float) -> None:
        self.results.setdefault(row, {}).setdefault(variant, []).append(value)

    def deadline(self) -> float:
        return time.monotonic() + self.deadline_s

    # -- helpers --------------------------------------------------------------------

    def _finish_file(self, srv: BenchServer, name: str, offset: int, total: int) -> None:
        """Check the uploaded file (size; content too with ``verify``) and delete it."""
        path = srv.output(name)
        try:
            size = path.stat().st_size
            if size != total:
                raise UploadError(f"{srv.variant.name}: {name} has {size} bytes, "
                                  f"expected {total}")
            if self.verify and _sha256(path, 0, total) != _sha256(self.source, offset, total):
                raise UploadError(f"{srv.variant.name}: {name} differs from the source")
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _single(self, v: Variant, name: str, total: int, fragment: int,
                max_seconds: float | None = None) -> tuple[float, int, float]:
        """One upload; returns (seconds, fragments, server CPU seconds)."""
        srv = self.servers[v.name]
        fd = os.open(self.source, os.O_RDONLY)
        pids = srv.worker_pids()
        cpu0 = cpu_seconds(pids)
        try:
            with Client(srv.port) as c:
                res = upload(c, f"{v.prefix}/{name}", fd, total, fragment,
                             deadline=self.deadline(), max_seconds=max_seconds)
        finally:
            os.close(fd)
        cpu = cpu_seconds(pids) - cpu0
        if res.complete:
            self._finish_file(srv, name, 0, total)
        else:
            with contextlib.suppress(FileNotFoundError):
                srv.output(name).unlink()  # A keeps the partial file; B cancelled it
            self.notes.append(f"{name} {v.name}: stopped after {res.seconds:.0f} s "
                              f"(--w2-seconds) at {res.sent / MiB:.0f} of {total / MiB:.0f} "
                              f"MiB; rate over its {res.fragments} fragments")
        return res.seconds, res.fragments, cpu

    # -- workloads ------------------------------------------------------------------

    def w1(self, v: Variant, rep: int) -> str:
        s = self.sizes
        secs, _, cpu = self._single(v, f"w1-r{rep}.bin", s.w1_total, s.w1_fragment)
        mbs = s.w1_total / MB / secs
        self.record("w1", v.name, mbs)
        self.record("w1-cpu", v.name, cpu / (s.w1_total / GiB))
        return f"{mbs:8.1f} MB/s, server CPU {cpu / (s.w1_total / GiB):.2f} s/GiB"

    def w2(self, v: Variant, rep: int) -> str:
        s = self.sizes
        secs, frags, cpu = self._single(v, f"w2-r{rep}.bin", s.w2_total, s.w2_fragment,
                                        max_seconds=self.w2_seconds)
        fps = frags / secs
        self.record("w2", v.name, fps)
        self.record("w2-cpu", v.name, cpu / frags * 1e6)
        return f"{fps:8.0f} fragments/s, server CPU {cpu / frags * 1e6:.0f} µs/fragment"

    def w3(self, v: Variant, rep: int) -> str:
        s = self.sizes
        srv = self.servers[v.name]
        n = s.w3_sessions
        barrier = threading.Barrier(n + 1, timeout=60)
        ends: list[float] = [0.0] * n
        errors: list[BaseException] = []
        fd = os.open(self.source, os.O_RDONLY)

        def session(i: int) -> None:
            path = f"{v.prefix}/w3-r{rep}-{i}.bin"
            base = i * s.w3_total
            try:
                with Client(srv.port) as c:
                    sid = c.create_session(path)
                    barrier.wait()
                    offset, deadline = 0, self.deadline()
                    while offset < s.w3_total:
                        if time.monotonic() > deadline:
                            raise UploadError("w3 session did not finish before its deadline")
                        length = min(s.w3_fragment, s.w3_total - offset)
                        offset = c.fragment(path, sid, fd, offset, length, s.w3_total,
                                            source_offset=base)
                    ends[i] = time.perf_counter()
                    c.close_session(path, sid)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.abort()

        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(n)]
        pids = srv.worker_pids()
        cpu0 = cpu_seconds(pids)
        try:
            with RSSSampler(srv) as rss:
                for th in threads:
                    th.start()
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass
                started = time.perf_counter()
                for th in threads:
                    th.join(timeout=self.deadline_s + 60)
        finally:
            os.close(fd)
        cpu = cpu_seconds(pids) - cpu0
        if errors:
            raise errors[0]
        if any(th.is_alive() for th in threads):
            raise UploadError("w3: a session thread is still running")
        for i in range(n):
            self._finish_file(srv, f"w3-r{rep}-{i}.bin", i * s.w3_total, s.w3_total)
        mbs = n * s.w3_total / MB / (max(ends) - started)
        gib = n * s.w3_total / GiB
        self.record("w3", v.name, mbs)
        self.record("w3-cpu", v.name, cpu / gib)
        self.record("w4-w3", v.name, rss.peak_mib)
        return (f"{mbs:8.1f} MB/s aggregate, server CPU {cpu / gib:.2f} s/GiB, "
                f"peak RSS/worker {rss.peak_mib:.1f} MiB")

    def w4(self, v: Variant, rep: int) -> str:
        s = self.sizes
        srv = self.servers[v.name]
        out = []
        for row, total in (("w4-small", s.w4_small), ("w4-large", s.w4_large)):
            with RSSSampler(srv) as rss:
                self._single(v, f"w4-r{rep}-{total}.bin", total, s.w4_fragment)
            self.record(row, v.name, rss.peak_mib)
            out.append(f"{total // MiB} MiB: {rss.peak_mib:.1f} MiB")
        return "peak RSS/worker " + ", ".join(out)

    def w5(self, v: Variant, rep: int) -> str:
        s = self.sizes
        stores = [("w5-empty", self.servers[v.name])]
        if v.name in self.full_servers:
            stores.append(("w5-full", self.full_servers[v.name]))
        times: dict[str, list[float]] = {row: [] for row, _ in stores}
        clients = {row: Client(srv.port) for row, srv in stores}
        try:
            for row, _srv in stores:  # warm up (keep-alive connection, code paths)
                for i in range(s.w5_warmup):
                    _round_trip(clients[row], f"{v.prefix}/w5-warm-{rep}-{i}")
            batches = max(1, s.w5_round_trips // s.w5_batch)
            deadline = self.deadline()
            for b in range(batches):
                order = stores if b % 2 == 0 else stores[::-1]
                for row, _srv in order:
                    for i in range(s.w5_batch):
                        if time.monotonic() > deadline:
                            raise UploadError("w5 did not finish before its deadline")
                        times[row].append(
                            _round_trip(clients[row], f"{v.prefix}/w5-r{rep}-{b}-{i}"))
        finally:
            for c in clients.values():
                c.close()
        out = []
        for row, vals in times.items():
            med = statistics.median(vals) * 1000
            self.record(row, v.name, med)
            out.append(f"{row[3:]} {med:.2f} ms")
        if "w5-full" in times:
            ratio = statistics.median(times["w5-full"]) / statistics.median(times["w5-empty"])
            self.record("w5-ratio", v.name, ratio)
            out.append(f"ratio {ratio:.2f}")
        return ", ".join(out)


def _round_trip(client: Client, path: str) -> float:
    t0 = time.perf_counter()
    sid = client.create_session(path)
    client.close_session(path, sid)
    return time.perf_counter() - t0


def prefill_store(folder: Path, count: int) -> None:
    """Create ``count`` open sessions in the store at ``folder`` (directory ``bits``)."""
    from flask_bits.protocol import new_session_id
    from flask_bits.store import SessionState
    from flask_bits.store import SessionStore

    store = SessionStore(str(folder))
    now = time.time()
    for i in range(count):
        state = SessionState(
            id=new_session_id(), directory="bits", remote_path=f"prefill/{i}.bin",
            url=f"http://127.0.0.1/bits/prefill/{i}.bin", owner=None,
            protocol="{7df0354d-249b-430f-820d-3d2a9bef4931}", created=now,
            last_activity=now, timeout=14 * 24 * 3600.0,
        )
        store.create(state, owner_limit=None, total_limit=None)
    # The first Create-Session of a process starts a background sweep when the stamp is
    # older than BITS_CLEANUP_INTERVAL; that once-an-hour cost is measured on its own
    # (see README), not smeared over the round trips.
    (folder / "cleanup.stamp").touch()


def remove_tree(path: Path) -> None:
    """``rm -rf`` (much faster than shutil.rmtree on 10 000 session folders), bounded."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], timeout=600, check=False)
    shutil.rmtree(path, ignore_errors=True)


def _slug(name: str) -> str:
    return name.replace("'", "p").replace("-", "_")


def _sha256(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length:
            data = f.read(min(length, MiB))
            if not data:
                break
            h.update(data)
            length -= len(data)
    return h.hexdigest()


def make_source(path: Path, size: int) -> None:
    """A file of ``size`` random-looking bytes (a 64 MiB random block, repeated with a
    varying 8-byte stamp per MiB so no two MiB are equal)."""
    block = bytearray(os.urandom(min(size, 64 * MiB)))
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(len(block), size - written)
            for off in range(0, n, MiB):
                block[off:off + 8] = (written + off).to_bytes(8, "little")
            f.write(memoryview(block)[:n])
            written += n


# -- report ----------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit in ("fragments/s", "µs/fragment"):
        return f"{value:.0f}"
    if unit in ("ms", "x"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def cell(values: list[float] | None, unit: str) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, unit)
    return f"{fmt(med, unit)} ({fmt(min(values), unit)}–{fmt(max(values), unit)})"


def ratio(b: list[float] | None, a: list[float] | None) -> str:
    if not a or not b or not statistics.median(a):
        return "—"
    return f"{statistics.median(b) / statistics.median(a):.2f}"


def table(bench: Bench, labels: dict[str, tuple[str, str, str]]) -> list[str]:
    """workload | unit | A | B | B/A | B-fsync | B-fsync/A | ... | A-fsync | B-fsync/A-fsync"""
    names = [v.name for v in bench.variants]
    plan: list[tuple[str, str | None]] = []  # (variant, None) or (variant, its baseline)
    if "A" in names:
        plan.append(("A", None))
    for n in names:
        if n.startswith("B"):
            plan.append((n, None))
            if "A" in names:
                plan.append((n, "A"))
    if "A-flask" in names:
        plan.append(("A-flask", None))
        plan.append(("A-flask", "A"))
        plan.extend((n, "A-flask") for n in names if n.startswith("B") and not n.endswith("fsync"))
    if "A-direct" in names:
        plan.append(("A-direct", None))
        plan.append(("A-direct", "A"))
        plan.extend((n, "A-direct") for n in names if n.startswith("B") and not n.endswith("fsync"))
    if "A-fsync" in names:
        plan.append(("A-fsync", None))
        plan.extend((n, "A-fsync") for n in names if n.startswith("B") and n.endswith("fsync"))
    cols = ["workload", "unit"] + [n if b is None else f"{n}/{b}" for n, b in plan]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row, (label, unit, better) in labels.items():
        if row not in bench.results:
            continue
        res = bench.results[row]
        cells = [label, f"{unit} ({better} is better)"]
        for n, b in plan:
            cells.append(cell(res.get(n), unit) if b is None else _ratio_cell(row, res, n, b))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio_cell(row: str, res: dict[str, list[float]], n: str, b: str) -> str:
    if row == "w5-ratio" or row.startswith("w4"):
        return "—"  # a ratio of ratios, or of memory, says nothing useful
    return ratio(res.get(n), res.get(b))


def targets(bench: Bench) -> list[str]:
    """The issue's targets, per flask-bits variant, from the medians of this run."""
    r = bench.results

    def med(row: str, n: str) -> float | None:
        vals = r.get(row, {}).get(n)
        return statistics.median(vals) if vals else None

    out: list[str] = []
    for v in [v for v in bench.variants if v.kind == "B"]:
        n = v.name
        # The targets are defined for B against A; fsync variants are listed for information.
        info = " (informational: no target for fsync variants)" if v.fsync else ""
        for row, goal in (("w1", 0.9), ("w2", 0.6), ("w3", 0.9)):
            b, a = med(row, n), med(row, "A")
            if b is not None and a is not None:
                verdict = "met" if b / a >= goal else "MISSED"
                out.append(f"- {row} {n}/A = {b / a:.2f} (target ≥ {goal}): {verdict}{info}")
        small, large, w3 = (med(row, n) for row in ("w4-small", "w4-large", "w4-w3"))
        if small is not None and large is not None:
            peak = max(x for x in (small, large, w3) if x is not None)
            grow = large - small
            verdict = "met" if peak < 100 and grow < max(5.0, 0.1 * small) else "MISSED"
            out.append(f"- w4 {n} peak RSS/worker {peak:.1f} MiB (target < 100), largest minus "
                       f"smallest upload {grow:+.1f} MiB (target: flat, < 5 MiB): {verdict}")
        x = med("w5-ratio", n)
        if x is not None:
            verdict = "met" if x <= 1.2 else "MISSED"
            out.append(f"- w5 {n} full/empty store = {x:.2f} (target ≤ 1.2): {verdict}")
    return out


# -- main ------------------------------------------------------------------------------


def parse_args(argv: t.Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, smoke 1)")
    p.add_argument("--w4-reps", type=int, default=1,
                   help="repetitions of w4 (peak memory is not timing noise; default 1)")
    p.add_argument("--only", default=",".join(WORKLOADS), help="workloads, e.g. w1,w3")
    p.add_argument("--variants", default=None,
                   help="comma list of A, A-fsync, A-flask, A-direct, B, B-fsync, B-wsgi and "
                        "the --patched ones (default: A,A-direct,B,B-fsync plus "
                        "NAME,NAME-fsync per --patched)")
    p.add_argument("--patched", action="append", default=[], metavar="[NAME=]DIR",
                   help="a folder holding a patched flask_bits package: adds variants NAME "
                        "and NAME-fsync (default name B'); may be repeated")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--tmp", default=None, help="parent of the temp dir (default: $TMPDIR)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="gunicorn workers (default: one per core)")
    p.add_argument("--threads", type=int, default=4, help="gthread threads per worker")
    p.add_argument("--no-pin", action="store_true", help="do not pin client and server")
    p.add_argument("--verify", action="store_true",
                   help="compare every uploaded file's SHA-256 (default only with --smoke)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="longest time one upload may take, in seconds")
    p.add_argument("--w2-seconds", type=float, default=20.0,
                   help="stop a w2 upload after this long and rate the fragments sent so far "
                        "(0: never; keeps a busy machine's run within budget)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    return p.parse_args(argv)


def build_variants(args: argparse.Namespace) -> list[Variant]:
    all_variants = {
        "A": Variant("A", "A"),
        "A-fsync": Variant("A-fsync", "A", fsync=True),
        "A-flask": Variant("A-flask", "A", flask=True),
        "A-direct": Variant("A-direct", "A", direct=True),
        "B": Variant("B", "B"),
        "B-fsync": Variant("B-fsync", "B", fsync=True),
        "B-wsgi": Variant("B-wsgi", "B", wsgi=True),
    }
    default = ["A", "A-direct", "B", "B-fsync"]
    for i, spec in enumerate(args.patched):
        name, sep, folder = spec.rpartition("=")
        if not sep:
            name = "B" + "'" * (i + 1)
        folder = os.path.abspath(folder)
        if not name.startswith("B") or name in all_variants:
            raise SystemExit(f"--patched: the name {name!r} must start with B and be new")
        if not os.path.isfile(os.path.join(folder, "flask_bits", "__init__.py")):
            raise SystemExit(f"--patched: no flask_bits package in {folder}")
        all_variants[name] = Variant(name, "B", pythonpath=folder)
        all_variants[name + "-wsgi"] = Variant(name + "-wsgi", "B", pythonpath=folder,
                                               wsgi=True)
        all_variants[name + "-fsync"] = Variant(name + "-fsync", "B", fsync=True,
                                                pythonpath=folder)
        default += [name, name + "-fsync"]
    names = [n.strip() for n in args.variants.split(",")] if args.variants else default
    unknown = [n for n in names if n and n not in all_variants]
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(unknown)}; "
                         f"known: {', '.join(all_variants)}")
    return [all_variants[n] for n in names if n]


def main(argv: t.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a test's timeout, a CI cancel) unwinds through the finally that stops servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = SMOKE if args.smoke else Sizes()
    reps = args.reps if args.reps is not None else (1 if args.smoke else 3)
    workloads = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or reps < 1:
        raise SystemExit(f"unknown workload(s) {bad}" if bad else "--reps must be >= 1")
    variants = build_variants(args)
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
    if pinned:
        os.sched_setaffinity(0, {0})
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="flask-bits-bench-", dir=args.tmp))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    bench = Bench(sizes=sizes, tmp=tmp, source=tmp / "source.bin", variants=variants,
                  workers=args.workers, threads=args.threads, pinned=bool(pinned),
                  verify=args.verify or args.smoke, deadline_s=args.deadline,
                  w2_seconds=args.w2_seconds or None)
    try:
        need = sizes.source_size
        if "w4" not in workloads:
            need = max(sizes.w1_total, sizes.w2_total, sizes.w3_sessions * sizes.w3_total)
        log(f"writing a {need / MiB:.0f} MiB source file in {tmp}")
        make_source(bench.source, need)
        log("starting servers: " + ", ".join(v.name for v in variants))
        bench.start_servers(workloads)
        log("servers ready")
        for rep in range(reps):
            k = rep % len(variants)
            order = variants[k:] + variants[:k]
            for w in workloads:
                if w == "w4" and rep >= args.w4_reps:
                    continue
                for v in order:
                    t0 = time.monotonic()
                    summary = getattr(bench, w)(v, rep)
                    log(f"rep {rep + 1}/{reps} {w} {v.name:9s} {summary} "
                        f"({time.monotonic() - t0:.1f}s)")
    finally:
        elapsed = time.monotonic() - started
        bench.stop_servers()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            remove_tree(tmp)

    labels = row_labels(sizes)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    report = [
        f"## flask-bits benchmark, {now}",
        "",
        f"Command: `{command.strip()}` ({reps} repetition(s), w4 {min(reps, args.w4_reps)}; "
        f"{elapsed:.0f} s + {time.monotonic() - started - elapsed:.0f} s cleanup)",
        "",
        *[f"- {line}" for line in machine_lines(str(tmp.parent), bool(pinned))],
        f"- gunicorn: gthread, {args.workers} workers x {args.threads} threads, "
        "keep-alive client (http.client)",
        "",
        "Cells: median over repetitions (min–max). Ratios: ratio of medians.",
        "",
        *table(bench, labels),
        "",
        "Targets:",
        *targets(bench),
        *(["", "Notes:", *[f"- {n}" for n in bench.notes]] if bench.notes else []),
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
