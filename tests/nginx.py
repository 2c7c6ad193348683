"""A real nginx reverse proxy in front of gunicorn nodes, for integration tests.

``with NginxServer(["127.0.0.1:8001", "127.0.0.1:8002"]) as proxy:`` writes an
``nginx.conf`` into a temporary prefix directory (pid file, logs and temp folders all
live there), runs ``nginx -c CONF -p PREFIX`` in the foreground (``daemon off``, with a
master process), waits with a bounded loop until it accepts connections, and stops it on
exit: ``SIGQUIT`` (graceful), then ``SIGTERM``, then ``SIGKILL`` to its process group.

The generated configuration is the one ``docs/deploy.md`` recommends for BITS, reduced
to what a test needs: round-robin over the nodes, request bodies streamed to the node
(``proxy_request_buffering off``), HTTP/1.1 upstream, ``client_max_body_size`` sized to
the fragment limit, any method (``BITS_POST`` included) passed through, and an
``X-Upstream`` response header that names the node(s) nginx used for each request.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import typing as t
from pathlib import Path

from tests.servers import free_port
from tests.servers import wait_for_port

#: flask_bits' default ``BITS_MAX_FRAGMENT_SIZE`` (16 MiB).
DEFAULT_MAX_FRAGMENT = 16 * 1024 * 1024


def nginx_binary() -> str | None:
    """Path of the nginx executable (``/usr/sbin`` is often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class NginxServer:
    """Run nginx as a round-robin reverse proxy for ``upstreams`` until the block ends.

    :param upstreams: the nodes, as ``"host:port"`` strings.
    :param host: the address nginx listens on (a 127.0.0.0/8 address).
    :param port: the port; by default a free one.
    :param max_fragment_size: the nodes' ``BITS_MAX_FRAGMENT_SIZE``; ``client_max_body_size``
        gets a little head room above it, so oversized fragments still reach the node and
        get the protocol's 413 Ack rather than nginx's HTML 413 page.
    :param connect_timeout: ``proxy_connect_timeout`` (seconds).
    :param read_timeout: ``proxy_read_timeout`` and ``proxy_send_timeout`` (seconds).
    :param next_upstream: the ``proxy_next_upstream`` conditions.
    :param fail_timeout: ``fail_timeout`` of each node (seconds it stays out after a failure).
    :param prefix: the prefix folder; by default a new temporary one, removed by :meth:`stop`.
    """

    def __init__(
        self,
        upstreams: t.Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_fragment_size: int = DEFAULT_MAX_FRAGMENT,
        connect_timeout: float = 2,
        read_timeout: float = 60,
        next_upstream: str = "error timeout http_502 non_idempotent",
        next_upstream_tries: int = 3,
        fail_timeout: float = 5,
        prefix: str | os.PathLike[str] | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("NginxServer needs at least one upstream")
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (run .ci/install-nginx)")
        self.binary = binary
        self.upstreams = list(upstreams)
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.max_fragment_size = max_fragment_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.next_upstream = next_upstream
        self.next_upstream_tries = next_upstream_tries
        self.fail_timeout = fail_timeout
        self._own_prefix = prefix is None
        self.prefix = Path(prefix) if prefix is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: t.IO[bytes] | None = None

    # -- configuration -----------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        assert self.prefix is not None
        return self.prefix / "nginx.conf"

    @property
    def access_log(self) -> Path:
        assert self.prefix is not None
        return self.prefix / "access.log"

    @property
    def error_log(self) -> Path:
        assert self.prefix is not None
        return self.prefix / "error.log"

    def render(self) -> str:
        """The nginx.conf text."""
        assert self.prefix is not None
        p = self.prefix
        # Head room for the request line and headers is not counted by nginx, but keep
        # some anyway so an off-by-a-few body never gets nginx's HTML 413.
        body_limit = self.max_fragment_size + 64 * 1024
        servers = "\n".join(
            f"        server {u} max_fails=1 fail_timeout={_secs(self.fail_timeout)};"
            for u in self.upstreams
        )
        # As root, nginx would switch its workers to "nobody", who may not enter a
        # private temporary folder; a throw-away test proxy can keep root's rights.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""\
# Generated by tests/nginx.py for a BITS web farm test.
{user}daemon off;
master_process on;
worker_processes 1;
pid {p}/nginx.pid;
lock_file {p}/nginx.lock;
error_log {p}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;

    log_format farm '$remote_addr "$request" $status $request_length '
                    'upstream=$upstream_addr upstream_status=$upstream_status '
                    'session=$http_bits_session_id packet=$http_bits_packet_type '
                    'rt=$request_time';
    access_log {p}/access.log farm;
    server_tokens off;
    keepalive_timeout 30s;

    upstream bits_farm {{
        zone bits_farm 64k;
{servers}
    }}

    server {{
        listen {self.host}:{self.port};
        server_name _;

        # Fragments are at most BITS_MAX_FRAGMENT_SIZE bytes.
        client_max_body_size {body_limit};
        client_body_timeout {_secs(self.read_timeout)};

        location / {{
            # Any method, BITS_POST included, goes to the nodes as it is.
            proxy_pass http://bits_farm;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout {_secs(self.connect_timeout)};
            proxy_send_timeout {_secs(self.read_timeout)};
            proxy_read_timeout {_secs(self.read_timeout)};
            proxy_next_upstream {self.next_upstream};
            proxy_next_upstream_tries {self.next_upstream_tries};
            proxy_next_upstream_timeout 10s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> NginxServer:
        if self.prefix is None:
            self.prefix = Path(tempfile.mkdtemp(prefix="bits-nginx-"))
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.render())
        self._stderr = open(self.prefix / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path), "-p", str(self.prefix),
             "-e", str(self.error_log)],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, host=self.host, timeout=15, proc=self.proc)
        except BaseException as exc:
            log = self.read_error_log()
            self.stop()
            if isinstance(exc, Exception):
                raise RuntimeError(f"nginx did not start: {exc}\n{log}") from exc
            raise
        return self

    def read_error_log(self) -> str:
        parts = []
        assert self.prefix is not None
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                parts.append((self.prefix / name).read_text(errors="replace"))
        return "\n".join(parts)

    def read_access_log(self) -> list[str]:
        try:
            return self.access_log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGTERM, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._own_prefix and self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = None

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _secs(value: float) -> str:
    """An nginx time value: whole seconds, or milliseconds below one second."""
    if value >= 1 and float(value).is_integer():
        return f"{int(value)}s"
    return f"{max(1, round(value * 1000))}ms"
