"""The demo server application: replies with the SHA-256 of the upload.

Mounted at ``/app/sha256`` so ``BITS_NOTIFICATION_URL=/app/sha256`` (or the absolute
URL) with ``BITS_NOTIFICATION_TYPE`` 1 (by reference) or 2 (by value) turns ``/bits/``
into an upload-reply directory served over HTTP, the IIS way.
"""

from __future__ import annotations

import hashlib
import os
import typing as t

from flask import Flask
from flask import Response
from flask import request


def sha256_line(stream: t.BinaryIO) -> bytes:
    """Lower-case hex SHA-256 of everything in ``stream``, plus a newline."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1024 * 1024), b""):
        digest.update(chunk)
    return digest.hexdigest().encode() + b"\n"


def register_server_app(app: Flask) -> None:
    @app.post("/app/sha256")
    def sha256_app() -> Response:
        request_file = request.headers.get("BITS-Request-DataFile-Name")
        response_file = request.headers.get("BITS-Response-DataFile-Name")
        if request_file and response_file:  # type 1: by reference
            with open(request_file, "rb") as f:
                line = sha256_line(f)
            tmp = response_file + ".tmp"
            with open(tmp, "wb") as out:
                out.write(line)
            os.replace(tmp, response_file)
            return Response(b"", 200)
        return Response(sha256_line(request.stream), 200,  # type 2: by value
                        content_type="application/octet-stream")
