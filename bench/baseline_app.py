"""Workload A: the stack's limit. A minimal WSGI app, no Flask, no BITS logic.

It answers every request 200 and, when the request has a body, streams it to
``$BASELINE_FOLDER/<last URL segment>`` at the offset named by the first number of
``Content-Range`` (``bytes a-b/T``), in 1 MiB reads, with ``os.pwrite``. That is the least
any upload server on this stack (gunicorn + Python + this disk) has to do per request, so
its throughput is the ceiling flask-bits is measured against.

Just enough BITS to be driven by the same client as flask-bits: a Create-Session gets a
``BITS-Session-Id``, a Fragment gets ``BITS-Received-Content-Range`` (the next offset).
``BASELINE_FSYNC=1`` fsyncs the file before answering a fragment (the A-fsync variant).
``BASELINE_DIRECT=1`` (the A-direct variant) reads the body the way flask-bits does under
gunicorn, straight from the socket into one reusable 256 KiB buffer per thread
(``flask_bits.direct_input``, ``flask_bits.store.BUFFER_SIZE``),
instead of through gunicorn's ``wsgi.input``: the limit of the stack for a server that
does that too.

    gunicorn -k gthread -w 2 --threads 4 --chdir bench 'baseline_app:app'
    gunicorn -k gthread -w 2 --threads 4 --chdir bench 'baseline_app:make_flask_app()'
"""

from __future__ import annotations

import os
import threading
import uuid

from flask_bits.direct_input import direct_input
from flask_bits.store import BUFFER_SIZE

FOLDER = os.environ.get("BASELINE_FOLDER", "/tmp")
FSYNC = os.environ.get("BASELINE_FSYNC", "") in ("1", "true")
DIRECT = os.environ.get("BASELINE_DIRECT", "") in ("1", "true")
CHUNK = 1024 * 1024
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
_local = threading.local()


def _chunks(environ, length):  # type: ignore[no-untyped-def]
    """The body in pieces of at most CHUNK bytes, until it ends (or the client goes)."""
    stream = environ["wsgi.input"]
    direct = direct_input(environ) if DIRECT else None
    if direct is None:
        while length:
            data = stream.read(min(length, CHUNK))
            if not data:
                return
            length -= len(data)
            yield data
        return
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(BUFFER_SIZE))
    while n := direct.readinto(buf):
        yield buf[:n]


def handle(environ):  # type: ignore[no-untyped-def]
    """Store the request body (if any); return the Ack headers."""
    headers = [("BITS-Packet-Type", "Ack"), ("Content-Length", "0")]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    packet = environ.get("HTTP_BITS_PACKET_TYPE", "").lower()
    if packet == "create-session":
        headers.append(("BITS-Session-Id", "{" + str(uuid.uuid4()).upper() + "}"))
    elif packet in ("close-session", "cancel-session"):
        headers.append(("BITS-Session-Id", environ.get("HTTP_BITS_SESSION_ID", "")))
    if length:
        rng = environ.get("HTTP_CONTENT_RANGE", "")
        offset = int(rng.split()[1].split("-", 1)[0]) if rng else 0
        name = environ.get("PATH_INFO", "/upload").rsplit("/", 1)[-1] or "upload"
        fd = os.open(os.path.join(FOLDER, name), _FLAGS, 0o644)
        try:
            pos = offset
            for data in _chunks(environ, length):
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, pos)
                    view = view[n:]
                    pos += n
            if FSYNC:
                os.fsync(fd)
        finally:
            os.close(fd)
        headers.append(("BITS-Received-Content-Range", str(pos)))
    return headers


def app(environ, start_response):  # type: ignore[no-untyped-def]
    """Variant A: bare WSGI."""
    start_response("200 OK", handle(environ))
    return [b""]


def make_flask_app():  # type: ignore[no-untyped-def]
    """Variant A-flask: the same work inside a one-route Flask app (Flask's own cost)."""
    from flask import Flask
    from flask import Response
    from flask import request

    flask_app = Flask(__name__)

    @flask_app.route("/a/<path:name>", methods=["BITS_POST"])
    def post(name):  # type: ignore[no-untyped-def]
        return Response(b"", 200, handle(request.environ))

    return flask_app
