"""Prometheus metrics (flask_bits.metrics): counters fed by the signals, the sessions
gauge read from disk at scrape time, and gunicorn's multiprocess mode for real."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import filelock
import pytest
from flask import Flask
from flask import Response

from flask_bits import BITS
from tests import wire
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import cancel_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import upload
from tests.servers import ROOT
from tests.servers import GunicornServer

try:
    import prometheus_client  # noqa: F401
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - the [metrics] extra is part of the CI install
    if os.environ.get("CI"):
        raise
    pytest.skip("prometheus_client is not installed (pip install -e '.[metrics]')",
                allow_module_level=True)

from flask_bits.metrics import BITSMetrics
from flask_bits.metrics import init_metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    """Every sample of a metrics page: ``(name, sorted labels) -> value``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def get_metrics(client: t.Any, path: str = "/metrics") -> Samples:
    response = client.get(path)
    assert response.status_code == 200, response.status
    assert response.content_type.startswith("text/plain")
    assert response.headers["Cache-Control"] == "no-store"
    return scrape(response.get_data(as_text=True))


# -- in process -------------------------------------------------------------------------


def test_import_is_lazy_and_the_error_names_the_extra(tmp_path: Path) -> None:
    """flask_bits (dashboard included) imports without prometheus_client; setting up
    metrics then fails with a message that says what to install."""
    code = """
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
from flask import Flask
import flask_bits, flask_bits.metrics, flask_bits.dashboard
app = Flask("x", instance_path=sys.argv[1])
try:
    flask_bits.metrics.BITSMetrics(app)
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("no ImportError")
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, timeout=60, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert "pip install 'Flask-BITS[metrics]'" in result.stdout


def test_counters_follow_an_upload(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()
    BITSMetrics(app)
    client = app.test_client()
    data = os.urandom(1000)

    upload(client, "/bits/one.bin", data, 300)  # Create, 4 Fragments, Close
    assert_ack(bits_post(client, "/bits/x", "Ping"), 200)
    assert_ack(bits_post(client, "/bits/x", "Fragment", b"ab", session_id="{nope}",
                         content_range="bytes 0-1/2"), 500, "0x8020001F")
    sid = create_session(client, "/bits/two.bin")
    assert_ack(send_fragment(client, "/bits/two.bin", sid, b"12345", 0, 10), 200)
    assert_ack(cancel_session(client, "/bits/two.bin", sid), 200)

    m = get_metrics(client)
    packets = "bits_packets_total"
    assert value(m, packets, directory="bits", packet_type="Create-Session", status="200") == 2
    assert value(m, packets, directory="bits", packet_type="Fragment", status="200") == 5
    assert value(m, packets, directory="bits", packet_type="Fragment", status="500") == 1
    assert value(m, packets, directory="bits", packet_type="Close-Session", status="200") == 1
    assert value(m, packets, directory="bits", packet_type="Cancel-Session", status="200") == 1
    assert value(m, packets, directory="bits", packet_type="Ping", status="200") == 1
    assert total(m, packets) == 11
    assert total(m, "bits_packet_duration_seconds_count") == 11
    # Fragment bodies as sent, errors included: 1000 + 2 + 5.
    assert value(m, "bits_received_bytes_total", directory="bits") == 1007
    assert value(m, "bits_uploads_completed_total", directory="bits") == 1
    assert value(m, "bits_uploaded_bytes_total", directory="bits") == 1000
    assert value(m, "bits_sessions_opened_total", directory="bits") == 2
    assert value(m, "bits_sessions_closed_total", directory="bits", completed="true") == 1
    assert value(m, "bits_sessions_cancelled_total", directory="bits") == 1
    assert value(m, "bits_last_upload_completed_timestamp_seconds",
                 directory="bits") == pytest.approx(time.time(), abs=60)
    assert value(m, "bits_lock_wait_seconds_count", directory="bits") >= 6
    for phase in ("receiving", "complete", "finished"):
        assert value(m, "bits_sessions", directory="bits", phase=phase) == 0


def test_sessions_gauge_is_read_from_disk_at_scrape_time(
    make_app: t.Callable[..., Flask],
) -> None:
    """Sessions opened through another app object (another worker, another node on the
    same folders) count; two directories sharing a session folder count once."""
    app = make_app(init=False)
    BITS(app)
    BITS(app, name="other", url_prefix="/other")  # same BITS_SESSION_FOLDER
    metrics = BITSMetrics(app, path="/internal/metrics")
    worker = make_app()  # another "process" on the same folders, no metrics at all
    other = worker.test_client()

    open_sid = create_session(other, "/bits/a.bin")
    assert_ack(send_fragment(other, "/bits/a.bin", open_sid, b"abc", 0, 9), 200)
    upload(other, "/bits/b.bin", b"xy", 2, close=False)  # finished, waits for Close
    create_session(app.test_client(), "/other/c.bin")

    m = get_metrics(app.test_client(), "/internal/metrics")
    assert value(m, "bits_sessions", directory="bits", phase="receiving") == 1
    assert value(m, "bits_sessions", directory="bits", phase="finished") == 1
    assert value(m, "bits_sessions", directory="bits", phase="complete") == 0
    assert value(m, "bits_sessions", directory="other", phase="receiving") == 1
    assert value(m, "bits_session_bytes", directory="bits") == 5
    assert value(m, "bits_session_bytes", directory="other") == 0
    # The counters only saw this app's own packets: one Create-Session.
    assert total(m, "bits_packets_total") == 1
    assert app.extensions["bits_metrics"] is metrics
    assert app.test_client().get("/metrics").status_code == 404


def test_expiry_and_reply_forwards_are_measured(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(init=False)
    BITS(app)
    reply = BITS(name="reply", url_prefix="/reply", config={"BITS_NOTIFICATION_TYPE": 0})

    @reply.reply_handler
    def answer(upload: t.Any) -> bytes:
        return b"ok\n"

    reply.init_app(app)
    init_metrics(app)
    client = app.test_client()

    rsid = create_session(client, "/reply/r.bin")
    response = assert_ack(send_fragment(client, "/reply/r.bin", rsid, b"data", 0, 4), 200)
    assert "BITS-Reply-URL" in response.headers  # the forward is over
    sid = create_session(client, "/bits/idle.bin")
    server = app.extensions["bits"]["bits"]
    with server.store.lock_existing(sid) as session:
        assert session is not None
        session.state.last_activity -= session.state.timeout + 1
        session.save(touch=False)
    assert ("session", sid) in server.cleanup()

    m = get_metrics(client)
    assert value(m, "bits_reply_forward_duration_seconds_count", directory="reply") == 1
    assert value(m, "bits_sessions_expired_total", directory="bits") == 1
    assert value(m, "bits_sessions", directory="reply", phase="finished") == 1
    assert value(m, "bits_sessions", directory="bits", phase="receiving") == 0


def test_protected_endpoint_and_openmetrics(make_app: t.Callable[..., Flask]) -> None:
    def only_with_token(request: t.Any) -> bool | Response:
        if request.headers.get("Authorization") == "Bearer s3cret":
            return True
        if request.headers.get("Authorization"):
            return False
        return Response("", 401, {"WWW-Authenticate": "Bearer"})

    app = make_app()
    BITSMetrics(app, authorize=only_with_token)
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer no"}).status_code == 403
    response = client.get("/metrics", headers={
        "Authorization": "Bearer s3cret", "Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


def test_setup_errors(make_app: t.Callable[..., Flask], tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app()
    BITSMetrics(app)
    with pytest.raises(RuntimeError, match="already has BITS metrics"):
        BITSMetrics(app)
    # The variable appeared after prometheus_client chose its (in-process) value class.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="before anything imports prometheus_client"):
        BITSMetrics()


# -- gunicorn, several workers, multiprocess mode ------------------------------------------


def metrics_app() -> Flask:
    """The example app with metrics at /metrics (the gunicorn app of the test below)."""
    from example_app import create_app

    app = create_app()
    BITSMetrics(app)
    return app


GUNICORN_CONF = """\
import os, shutil
from flask_bits.metrics import child_exit  # noqa: F401  (a gunicorn hook, by name)

def on_starting(server):
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
"""


class Sender:
    """Sends BITS packets and counts them the way the server should."""

    def __init__(self, base_url: str) -> None:
        self.conn = wire.connect(base_url, timeout=30)
        self.packets: collections.Counter[tuple[str, str]] = collections.Counter()
        self.fragment_bytes = 0

    def post(self, path: str, packet_type: str, **kwargs: t.Any) -> wire.Reply:
        reply = wire.bits_post(self.conn, path, packet_type, **kwargs)
        self.count(packet_type, reply.status, len(kwargs.get("body", b"")))
        return reply

    def count(self, packet_type: str, status: int, size: int = 0) -> None:
        self.packets[(packet_type, str(status))] += 1
        if packet_type == "Fragment":
            self.fragment_bytes += size

    def upload(self, path: str, data: bytes, fragment: int) -> None:
        reply = self.post(path, "Create-Session")
        assert reply.status == 200, reply
        sid = reply.get("BITS-Session-Id")
        for first in range(0, len(data), fragment):
            chunk = data[first:first + fragment]
            rng = f"bytes {first}-{first + len(chunk) - 1}/{len(data)}"
            reply = self.post(path, "Fragment", session_id=sid, body=chunk,
                              headers={"Content-Range": rng})
            assert reply.status == 200, reply
        assert self.post(path, "Close-Session", session_id=sid).status == 200


def scrape_server(base_url: str) -> Samples:
    conn = wire.connect(base_url, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        assert response.getheader("Content-Type", "").startswith("text/plain")
        return scrape(body)
    finally:
        conn.close()


def packet_counts(samples: Samples) -> collections.Counter[tuple[str, str]]:
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for (name, labels), v in samples.items():
        if name == "bits_packets_total" and v:
            lbl = dict(labels)
            assert lbl["directory"] == "bits"
            counts[(lbl["packet_type"], lbl["status"])] += int(v)
    return counts


def hold_lock_check(lock_path: Path) -> bool:
    """True while some process holds the session lock (a fragment is being read)."""
    lock = filelock.FileLock(str(lock_path), timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    lock.release()
    return False


@pytest.mark.integration
def test_gunicorn_multiprocess_aggregates_every_worker(tmp_path: Path) -> None:
    prom = tmp_path / "prometheus"
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    env = {
        "BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
        "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
        "BITS_CLEANUP_INTERVAL": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
    with GunicornServer("tests.test_metrics:metrics_app()", env=env, workers=2,
                        extra_args=["-c", str(conf)],
                        log_path=tmp_path / "gunicorn.log") as server:
        sender = Sender(server.url)
        slow_conn = wire.connect(server.url, timeout=30)
        try:
            # 1. Keep one worker busy in the middle of a fragment body, so that the
            #    packets below are all answered by the other worker.
            slow_path = "/bits/slow.bin"
            reply = sender.post(slow_path, "Create-Session")
            slow_sid = reply.get("BITS-Session-Id")
            assert reply.status == 200 and slow_sid
            half = b"s" * 4096
            slow_conn.putrequest("BITS_POST", slow_path, skip_accept_encoding=True)
            for name, val in (("BITS-Packet-Type", "Fragment"), ("BITS-Session-Id", slow_sid),
                              ("Content-Range", f"bytes 0-8191/{3 * 8192}"),
                              ("Content-Length", "8192")):
                slow_conn.putheader(name, val)
            slow_conn.endheaders()
            slow_conn.send(half)
            lock_path = tmp_path / "sessions" / "locks" / f"{slow_sid}.lock"
            deadline = time.monotonic() + 20
            while not hold_lock_check(lock_path):
                assert time.monotonic() < deadline, "no worker took the slow fragment"
                time.sleep(0.02)

            # 2. Uploads, a Ping, an error and a cancel, all on the other worker.
            for i in range(3):
                sender.upload(f"/bits/file{i}.bin", os.urandom(20_000 + i), 8192)
            assert sender.post("/bits/x", "Ping").status == 200
            bad = sender.post("/bits/x", "Fragment", session_id="{nope}", body=b"zz",
                              headers={"Content-Range": "bytes 0-1/2"})
            assert bad.status == 500
            reply = sender.post("/bits/c.bin", "Create-Session")
            assert sender.post("/bits/c.bin", "Cancel-Session",
                               session_id=reply.get("BITS-Session-Id")).status == 200

            # 3. Let the busy worker finish its fragment (the session stays open).
            slow_conn.send(half)
            slow_reply = slow_conn.getresponse()
            slow_reply.read()
            assert slow_reply.status == 200
            assert slow_reply.getheader("BITS-Received-Content-Range") == "8192"
            sender.count("Fragment", 200, 8192)
        finally:
            slow_conn.close()
            sender.conn.close()

        workers = server.worker_pids()
        assert len(workers) == 2
        counter_files = {p.name for p in prom.glob("counter_*.db")}
        assert {f"counter_{pid}.db" for pid in workers} <= counter_files, counter_files

        expected = sender.packets
        sent = sum(expected.values())
        assert sent == 21
        # Whichever worker answers the scrape, it adds up both workers' files.
        for _ in range(4):
            m = scrape_server(server.url)
            assert packet_counts(m) == expected
            assert total(m, "bits_packets_total") == sent
            assert value(m, "bits_received_bytes_total", directory="bits") == (
                sender.fragment_bytes)
            assert value(m, "bits_uploads_completed_total", directory="bits") == 3
            assert value(m, "bits_sessions_opened_total", directory="bits") == 5
            assert value(m, "bits_sessions_cancelled_total", directory="bits") == 1
            assert value(m, "bits_sessions", directory="bits", phase="receiving") == 1
            assert value(m, "bits_session_bytes", directory="bits") == 8192
            assert value(m, "bits_lock_wait_seconds_count", directory="bits") >= 14

        # 4. A worker dies and is replaced: what it counted still counts (child_exit
        #    runs in the master and only drops live gauges).
        victim = workers[0]
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            pids = server.worker_pids()
            if victim not in pids and len(pids) == 2:
                break
            assert time.monotonic() < deadline, f"worker {victim} was not replaced: {pids}"
            time.sleep(0.05)
        for _ in range(3):
            m = scrape_server(server.url)
            assert packet_counts(m) == expected
