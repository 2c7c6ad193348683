"""Start and stop real servers (gunicorn) on 127.0.0.1 for integration tests.

Every process started here is stopped by the context manager, readiness is polled with a
bounded loop, and ports come from the OS. glibc's malloc thresholds are fixed for every
server process so that measurements and memory checks are repeatable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Environment every server process gets (see DEVELOPERS guide: malloc thresholds).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int,
    *,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    proc: subprocess.Popen[t.Any] | None = None,
) -> None:
    """Wait (bounded) until something accepts connections on ``host:port``; fail early
    if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class GunicornServer:
    """``with GunicornServer(env={...}) as server:`` runs gunicorn until the block ends.

    :param app: the WSGI app spec, by default the example app's factory.
    :param env: extra environment (``BITS_*`` keys for the example app).
    :param workers: number of worker processes.
    :param worker_class: ``sync`` or ``gthread``.
    :param threads: threads per worker (gthread).
    :param extra_args: more gunicorn arguments.
    """

    def __init__(
        self,
        app: str = "example_app:create_app()",
        *,
        env: t.Mapping[str, str] | None = None,
        workers: int = 2,
        worker_class: str = "sync",
        threads: int = 1,
        port: int | None = None,
        timeout: int = 60,
        extra_args: t.Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.port = port or free_port()
        #: The address start() waits on (a subclass may bind another 127.0.0.0/8 one).
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **MALLOC_ENV, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.args = [
            sys.executable, "-m", "gunicorn",
            "-b", f"127.0.0.1:{self.port}",
            "-w", str(workers),
            "-k", worker_class,
            "--threads", str(threads),
            "--timeout", str(timeout),
            "--graceful-timeout", "5",
            "--no-control-socket",
            *extra_args,
            app,
        ]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: t.IO[bytes] | None = None

    def start(self) -> GunicornServer:
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args, cwd=str(ROOT), env=self.env,
            stdout=self._log or subprocess.DEVNULL, stderr=self._log or subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, host=self.host, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (children of the master)."""
        assert self.proc is not None
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
