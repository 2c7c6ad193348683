"""HTTP Basic authentication for the example app (``EXAMPLE_AUTH=basic``)."""

from __future__ import annotations

import hmac
import typing as t

from flask import Response
from flask import g
from werkzeug.wrappers import Request

USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def basic_auth(request: Request, remote_path: str, packet_type: t.Any) -> Response | bool:
    """Allow known users; challenge everyone else with 401 Basic."""
    auth = request.authorization
    if auth is not None and auth.type == "basic" and auth.username in USERS:
        expected = USERS[auth.username]
        if hmac.compare_digest(expected.encode(), (auth.password or "").encode()):
            g.bits_user = auth.username
            return True
    return Response(b"", 401, {"WWW-Authenticate": 'Basic realm="flask-bits example"'})
