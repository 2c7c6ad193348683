"""A small Flask app serving BITS uploads, runnable with ``flask run`` or gunicorn.

* ``/bits/<remote path>``: plain uploads into ``BITS_UPLOAD_FOLDER``;
* ``/reply/<remote path>``: upload-reply; the demo server application answers with the
  lower-case hex SHA-256 of the uploaded bytes and a newline;
* ``/app/sha256``: the same server application over HTTP, for
  ``BITS_NOTIFICATION_TYPE`` 1 or 2 with ``BITS_NOTIFICATION_URL`` pointing at it.

Every ``BITS_*`` environment variable is read into the config key of the same name
(JSON-parsed when it parses, else the string). ``EXAMPLE_AUTH=basic`` protects both
directories with HTTP Basic (users ``alice:alice-pw`` and ``bob:bob-pw``).
``EXAMPLE_DASHBOARD=1`` mounts the live view at ``/bits-admin/`` (``admin:admin-pw``).

    flask --app example_app run
    gunicorn -w 2 -b 127.0.0.1:8080 'example_app:create_app()'
"""

from __future__ import annotations

import json
import logging
import os
import typing as t

from flask import Flask

from flask_bits import BITS

from .dashboard import register_dashboard
from .server_app import register_server_app


def env_config(environ: t.Mapping[str, str] | None = None) -> dict[str, t.Any]:
    """Every ``BITS_*`` variable as a config value (JSON when it parses)."""
    environ = os.environ if environ is None else environ
    config: dict[str, t.Any] = {}
    for key, raw in environ.items():
        if not key.startswith("BITS_"):
            continue
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config


def _log_packets() -> None:
    """One INFO line per packet on stderr (gunicorn's error log), once per process."""
    logger = logging.getLogger("flask_bits")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] %(levelname)s "
                                               "flask_bits: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("EXAMPLE_LOG_LEVEL", "INFO"))


def create_app(test_config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """The application factory."""
    _log_packets()
    app = Flask(__name__, instance_relative_config=True)
    app.config.update(env_config())
    if test_config is not None:
        app.config.update(test_config)
    os.makedirs(app.instance_path, exist_ok=True)

    auth = app.config.get("EXAMPLE_AUTH", os.environ.get("EXAMPLE_AUTH", ""))
    authorize = None
    if auth == "basic":
        from .auth import basic_auth

        authorize = basic_auth

    register_server_app(app)
    BITS(app, authorize=authorize)

    reply = BITS(
        name="reply",
        url_prefix="/reply",
        config={"BITS_NOTIFICATION_TYPE": 0},
        authorize=authorize,
    )

    @reply.reply_handler
    def sha256_reply(upload: t.Any) -> bytes:
        from .server_app import sha256_line

        with upload.open() as f:
            return sha256_line(f)

    reply.init_app(app)
    register_dashboard(app)
    return app
