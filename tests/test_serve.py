"""``flask-bits serve`` and ``flask_bits.serve:create_app()``.

The integration tests start the real console script on a free port on 127.0.0.1,
upload with :mod:`flask_bits.client`, and stop the process with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import typing as t
from pathlib import Path

import pytest
import wire
from helpers import sha256_file
from servers import ROOT
from servers import GunicornServer
from servers import free_port
from servers import wait_for_port

from flask_bits import serve
from flask_bits.client import BITSClient
from flask_bits.errors import BITSError
from flask_bits.reply import Reply
from flask_bits.reply import ReplyError
from flask_bits.reply import Upload

FAST = {"retry_delay": 0.02, "timeout": 30.0, "max_retries": 8, "request_timeout": 30.0}

#: A reply command: the SHA-256 of the upload and its remote path.
HASH_COMMAND = [
    sys.executable, "-c",
    "import hashlib, os, sys; "
    "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest(), "
    "os.environ['UPLOAD_REMOTE_PATH'])",
]


def flask_bits_script() -> list[str]:
    """The installed ``flask-bits`` console script (else the module, same code)."""
    script = Path(sysconfig.get_path("scripts")) / "flask-bits"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "flask_bits.serve"]  # pragma: no cover


class Served(t.NamedTuple):
    url: str
    proc: subprocess.Popen[bytes]
    output: Path


@contextlib.contextmanager
def flask_bits_serve(tmp_path: Path, *args: str,
                     env: t.Mapping[str, str] | None = None) -> t.Iterator[Served]:
    """Run ``flask-bits serve ARGS --port <free>`` until the block ends (SIGTERM)."""
    port = free_port()
    output = tmp_path / "serve.out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [*flask_bits_script(), "serve", "--port", str(port), *args],
            cwd=str(tmp_path), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, proc=proc)
        yield Served(f"http://127.0.0.1:{port}", proc, output)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - reported below
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                raise


@pytest.mark.integration
def test_serve_uploads_and_stops(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(1024 * 1024 + 7))
    with flask_bits_serve(tmp_path, "--upload-folder", str(uploads)) as served:
        result = BITSClient(served.url + "/bits/", fragment_size=256 * 1024,
                            **FAST).upload(src)
        # The client is also reachable as `flask-bits upload`.
        second = subprocess.run(
            [*flask_bits_script(), "upload", served.url + "/bits/copy.bin", str(src), "-q"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=60,
            check=False,
        )
        assert second.returncode == 0, second.stderr.decode()
    assert served.proc.returncode == 0
    assert result.size == src.stat().st_size
    assert sha256_file(uploads / "data.bin") == sha256_file(src)
    assert sha256_file(uploads / "copy.bin") == sha256_file(src)
    # Sessions live beside the upload folder, never inside it.
    assert (tmp_path / "uploads-sessions").is_dir()
    assert sorted(p.name for p in uploads.iterdir()) == ["copy.bin", "data.bin"]

    text = served.output.read_text()
    base = served.url + "/bits/"
    assert f"BITS upload server at {base}" in text
    assert f"bitsadmin /transfer myjob /upload {base}" in text
    assert f"Start-BitsTransfer -TransferType Upload -Destination {base}" in text
    assert (f"FLASK_BITS_UPLOAD_FOLDER={uploads} gunicorn -w 4 -b "
            f"127.0.0.1:{served.url.rsplit(':', 1)[1]} 'flask_bits.serve:create_app()'") in text
    assert "flask-bits: stopped" in text


@pytest.mark.integration
def test_serve_reply_command(tmp_path: Path) -> None:
    uploads = tmp_path / "up"
    src = tmp_path / "hash me.bin"
    src.write_bytes(os.urandom(300 * 1024))
    with flask_bits_serve(tmp_path, "--upload-folder", str(uploads), "--prefix", "/r",
                          "--reply-command", shlex.join(HASH_COMMAND),
                          "--keep-uploads") as served:
        result = BITSClient(served.url + "/r/", fragment_size=64 * 1024, **FAST).upload(src)
    assert result.reply_bytes == f"{sha256_file(src)} hash me.bin\n".encode()
    assert result.reply_url is not None and result.reply_url.startswith(served.url + "/r/")
    assert sha256_file(uploads / "hash me.bin") == sha256_file(src)  # --keep-uploads
    text = served.output.read_text()
    assert "/upload-reply " in text and "-TransferType UploadReply" in text
    assert "FLASK_BITS_REPLY_COMMAND=" in text and "FLASK_BITS_KEEP_UPLOADS=true" in text


@pytest.mark.integration
def test_serve_drops_a_stalled_fragment(tmp_path: Path) -> None:
    """BITS_READ_TIMEOUT also applies to werkzeug's server: a client that stops sending
    mid-fragment does not hold the session; the next try continues it."""
    uploads = tmp_path / "u"
    data = os.urandom(50_000)
    path = "/bits/stall.bin"
    with flask_bits_serve(tmp_path, "--upload-folder", str(uploads),
                          env={"FLASK_BITS_READ_TIMEOUT": "1"}) as served:
        conn = wire.connect(served.url)
        try:
            sid = wire.create_session(conn, path)
        finally:
            conn.close()
        port = int(served.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            raw.sendall(
                f"BITS_POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"BITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n"
                f"Content-Range: bytes 0-49999/50000\r\nContent-Length: 50000\r\n\r\n"
                .encode() + data[:1000])
            started = time.monotonic()
            while raw.recv(65536):  # until the server gives up on us and closes
                pass
            assert time.monotonic() - started < 15
        conn = wire.connect(served.url)
        try:
            ack = wire.fragment(conn, path, sid, data, 0, len(data))
            assert ack.status == 200, ack
            assert ack.get("BITS-Received-Content-Range") == "50000"
            assert wire.bits_post(conn, path, "Close-Session", session_id=sid).status == 200
        finally:
            conn.close()
    assert (uploads / "stall.bin").read_bytes() == data


@pytest.mark.integration
def test_gunicorn_runs_create_app_from_the_environment(tmp_path: Path) -> None:
    """The production command the banner prints: gunicorn 'flask_bits.serve:create_app()'."""
    uploads = tmp_path / "prod"
    env = {"FLASK_BITS_UPLOAD_FOLDER": str(uploads), "FLASK_BITS_URL_PREFIX": "/up",
           "FLASK_BITS_REPLY_COMMAND": shlex.join(HASH_COMMAND)}
    src = tmp_path / "prod.bin"
    src.write_bytes(os.urandom(100 * 1024))
    with GunicornServer("flask_bits.serve:create_app()", env=env,
                        log_path=tmp_path / "gunicorn.log") as server:
        result = BITSClient(server.url + "/up/", fragment_size=32 * 1024, **FAST).upload(src)
    assert result.reply_bytes == f"{sha256_file(src)} prod.bin\n".encode()
    assert not (uploads / "prod.bin").exists()  # upload-reply keeps nothing by default


def test_create_app_reads_the_environment(tmp_path: Path) -> None:
    environ = {
        "BITS_UPLOAD_FOLDER": str(tmp_path / "ignored"),
        "FLASK_BITS_UPLOAD_FOLDER": str(tmp_path / "files"),  # FLASK_BITS_ wins
        "BITS_MAX_FRAGMENT_SIZE": "65536",
        "FLASK_BITS_ALLOW_OVERWRITES": "true",
        "FLASK_BITS_URL_PREFIX": "/drop",
        "UNRELATED": "x",
    }
    app = serve.create_app(environ=environ)
    server = app.extensions["bits"]["bits"]
    cfg = server.config
    assert cfg.upload_folder == str(tmp_path / "files")
    assert cfg.session_folder == str(tmp_path / "files-sessions")
    assert cfg.max_fragment_size == 65536
    assert cfg.allow_overwrites is True
    assert cfg.url_prefix == "/drop"
    assert server.replies is None  # no reply command: plain uploads
    command = serve.gunicorn_command(app, "0.0.0.0", 9000)
    assert command == (f"FLASK_BITS_UPLOAD_FOLDER={tmp_path / 'files'} "
                       "FLASK_BITS_URL_PREFIX=/drop FLASK_BITS_ALLOW_OVERWRITES=true "
                       "gunicorn -w 4 -b 0.0.0.0:9000 'flask_bits.serve:create_app()'")
    assert "no authentication" in serve.banner(app, "0.0.0.0", 9000)
    assert "no authentication" not in serve.banner(app, "127.0.0.1", 9000)


def test_create_app_reply_command_settings(tmp_path: Path) -> None:
    environ = {"FLASK_BITS_UPLOAD_FOLDER": str(tmp_path / "u"),
               "FLASK_BITS_REPLY_COMMAND": "wc -c",
               "FLASK_BITS_REPLY_COMMAND_TIMEOUT": "12.5",
               "FLASK_BITS_KEEP_UPLOADS": "yes",
               "BITS_NOTIFICATION_TIMEOUT": "60"}
    app = serve.create_app(environ=environ)
    handler = app.extensions["bits"]["bits"].replies.handler
    assert isinstance(handler, serve.CommandReplyHandler)
    assert handler.argv == ["wc", "-c"]
    assert handler.timeout == 12.5
    assert handler.keep_upload is True
    # Without its own timeout, the command gets BITS_NOTIFICATION_TIMEOUT.
    del environ["FLASK_BITS_REPLY_COMMAND_TIMEOUT"]
    app = serve.create_app(environ=environ)
    assert app.extensions["bits"]["bits"].replies.handler.timeout == 60.0
    # The settings of serve itself never reach the BITS_* config.
    assert "BITS_REPLY_COMMAND" not in app.config
    assert "BITS_KEEP_UPLOADS" not in app.config


def test_create_app_needs_an_upload_folder() -> None:
    with pytest.raises(ValueError, match="FLASK_BITS_UPLOAD_FOLDER"):
        serve.create_app(environ={})


def test_serve_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["serve", "--upload-folder", str(tmp_path / "u"), "--prefix", "bits/"],
                 ["serve", "--upload-folder", str(tmp_path / "u"), "--keep-uploads"],
                 ["serve"], []):
        with pytest.raises(SystemExit) as info:
            serve.main(args)
        assert info.value.code == 2, args
    assert "BITS_URL_PREFIX" in capsys.readouterr().err


def _upload(tmp_path: Path, data: bytes = b"hello") -> Upload:
    path = tmp_path / "data.part"
    path.write_bytes(data)
    return Upload(session_id="{11111111-2222-4333-8444-555555555555}", remote_path="a/b.txt",
                  url="http://127.0.0.1/bits/a/b.txt", owner="alice", size=len(data),
                  content_name="b.txt", path=str(path))


def test_command_reply_handler(tmp_path: Path) -> None:
    command = [sys.executable, "-c",
               "import os, sys; sys.stdout.write(open(sys.argv[1]).read().upper() + "
               "os.environ['UPLOAD_OWNER'] + os.environ['UPLOAD_SIZE'])"]
    reply = serve.CommandReplyHandler(command, timeout=30)(_upload(tmp_path))
    assert isinstance(reply, Reply) and reply.stream is not None
    try:
        assert reply.stream.read() == b"HELLOalice5"
    finally:
        reply.stream.close()
    assert reply.copy_to_destination is False


def test_command_reply_handler_failures(tmp_path: Path) -> None:
    upload = _upload(tmp_path)
    failing = serve.CommandReplyHandler([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(ReplyError) as info:
        failing(upload)
    assert info.value.status == 500
    slow = serve.CommandReplyHandler(
        [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    with pytest.raises(BITSError) as timeout:
        slow(upload)
    assert timeout.value.status == 408
    missing = serve.CommandReplyHandler([str(tmp_path / "no-such-command")])
    with pytest.raises(ReplyError):
        missing(upload)
    with pytest.raises(ValueError):
        serve.split_command("   ")
    assert serve.split_command("tool --flag 'two words'") == ["tool", "--flag", "two words"]
