"""cProfile inside a gunicorn worker: the example app (or the baseline) wrapped.

Every request is profiled in the thread that serves it; ``GET /__profile__/dump`` writes
the accumulated stats of the worker that answers it to ``$PROFILE_OUT`` (a ``.prof``
file for :mod:`pstats`, snakeviz, ...), ``GET /__profile__/reset`` clears them. Run it
with ONE worker and ONE thread (``-w 1 --threads 1``), as bench/profile_run.py does.

    PROFILE_TARGET=bits   -> example_app:create_app()
    PROFILE_TARGET=baseline -> baseline_app:app
    PROFILE_TARGET=baseline-flask -> baseline_app:make_flask_app()
    PROFILE_TARGET=bits-wsgi -> middleware_app:create_app()
"""

from __future__ import annotations

import cProfile
import os
import threading

_lock = threading.Lock()
_profiler = cProfile.Profile()


def _target():  # type: ignore[no-untyped-def]
    target = os.environ.get("PROFILE_TARGET", "bits")
    if target == "baseline":
        from baseline_app import app as base

        return base
    if target == "bits-wsgi":
        from middleware_app import create_app as create_wsgi

        return create_wsgi()
    if target == "baseline-flask":
        from baseline_app import make_flask_app

        return make_flask_app()
    from example_app import create_app

    return create_app()


_app = _target()


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ.get("PATH_INFO", "")
    if path == "/__profile__/dump":
        with _lock:
            _profiler.dump_stats(os.environ["PROFILE_OUT"])
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    if path == "/__profile__/reset":
        with _lock:
            _profiler.clear()
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    with _lock:
        _profiler.enable()
        try:
            body = _app(environ, start_response)
            out = list(body)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            _profiler.disable()
    return out
