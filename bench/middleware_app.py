"""Variant B-wsgi: the same flask-bits core as B, served by :class:`BITSMiddleware` in front
of a bare WSGI app instead of through the Flask extension (no Flask request context,
routing or after-request hook per packet). Same ``BITS_*`` environment and the same
per-packet log line as the example app, so it differs from B only in the glue.

    gunicorn -k gthread --chdir bench 'middleware_app:create_app()'
"""

from __future__ import annotations

import os

from example_app import env_config
from flask_bits import BITSMiddleware


def _not_found(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]


def create_app():  # type: ignore[no-untyped-def]
    import example_app

    log_packets = getattr(example_app, "_log_packets", None)
    if log_packets is not None:
        log_packets()  # the example app's one INFO line per packet
    return BITSMiddleware(_not_found, config=env_config(),
                          instance_path=os.path.join(os.path.dirname(example_app.__file__),
                                                     os.pardir, "instance"))
