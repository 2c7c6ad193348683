"""The live view of the example app: ``/bits-admin/``, only with ``EXAMPLE_DASHBOARD=1``.

Protected by HTTP Basic, user ``admin`` with password ``admin-pw`` (a separate realm
from the upload users of ``EXAMPLE_AUTH=basic``)::

    EXAMPLE_DASHBOARD=1 flask --app example_app run
    # then open http://127.0.0.1:5000/bits-admin/ and sign in as admin / admin-pw
"""

from __future__ import annotations

import hmac
import os
import typing as t

from flask import Flask
from flask import Response
from werkzeug.wrappers import Request

from flask_bits.dashboard import BITSDashboard

ADMINS = {"admin": "admin-pw"}
URL_PREFIX = "/bits-admin"

_ON = ("1", "true", "yes", "on")


def admin_basic_auth(request: Request) -> bool | Response:
    """Allow the admins; challenge everyone else with 401 Basic."""
    auth = request.authorization
    if auth is not None and auth.type == "basic" and auth.username in ADMINS:
        expected = ADMINS[auth.username]
        if hmac.compare_digest(expected.encode(), (auth.password or "").encode()):
            return True
    return Response("Sign in as an administrator.\n", 401,
                    {"WWW-Authenticate": 'Basic realm="flask-bits admin", charset="UTF-8"'},
                    mimetype="text/plain")


def register_dashboard(app: Flask) -> BITSDashboard | None:
    """Mount the dashboard at ``/bits-admin`` when ``EXAMPLE_DASHBOARD`` is on (in the
    app's config or the environment). Idempotent: returns the existing one if any."""
    existing = app.extensions.get("bits_dashboard")
    if existing is not None:
        return t.cast(BITSDashboard, existing)
    flag = app.config.get("EXAMPLE_DASHBOARD", os.environ.get("EXAMPLE_DASHBOARD", ""))
    if str(flag).strip().lower() not in _ON:
        return None
    return BITSDashboard(app, url_prefix=URL_PREFIX, authorize=admin_basic_auth)
