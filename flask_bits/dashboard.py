"""A live view of the upload sessions of every BITS directory of an app (optional).

One page, server-rendered, that refreshes itself every second from a JSON endpoint:
per session its directory, file, owner, a progress bar, throughput, idle time, phase
and reply state, and a Cancel button. No build step: a template, a CSS file and a
small script.

It shows who uploads what and can cancel uploads, so it must be protected::

    from flask_bits.dashboard import BITSDashboard

    def admins_only(request):
        if is_admin(request):                       # your check
            return True
        return Response("", 401, {"WWW-Authenticate": 'Basic realm="admin"'})

    BITSDashboard(app, url_prefix="/bits-admin", authorize=admins_only)

``authorize(request)`` runs before every request of the blueprint (page, JSON, static
files, Cancel): ``True`` lets it through, a response is sent as is (a 401 challenge, a
redirect to a login page), anything else is a 403. Without ``authorize`` the dashboard
refuses to be created unless ``allow_unprotected=True`` says that something in front of
the app protects it.

Cancel is a ``POST`` that must carry the ``X-BITS-Dashboard: 1`` header (a cross-site
page cannot send it without a CORS preflight) and, when the browser sends ``Origin`` or
``Sec-Fetch-Site``, come from the dashboard's own origin (or one of
``trusted_origins``, for proxies that rewrite ``Host``). It removes the session the way
``flask bits cancel`` does: its data and any pending reply go, a file already in place
stays, and the client's next packet is answered "session not found".

Sessions are read from the session folders on every poll, so any worker process (or any
node sharing the folders) shows the same thing.
"""

from __future__ import annotations

import logging
import time
import typing as t

from flask import Blueprint
from flask import Flask
from flask import current_app
from flask import jsonify
from flask import render_template
from flask import request
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from .errors import BITSError
from .protocol import canonical_session_id
from .store import SessionState

if t.TYPE_CHECKING:
    from .server import BITSServer

log = logging.getLogger("flask_bits")

#: ``authorize(request)``: ``True`` allows, a response is sent as is, anything else 403.
DashboardAuthorizer = t.Callable[[Request], "bool | Response"]

#: The header a Cancel request must carry (with the value ``1``).
CSRF_HEADER = "X-BITS-Dashboard"

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}

_UNPROTECTED = (
    "The BITS dashboard lists every upload session and can cancel them, so it needs "
    "authorize=<callable(request) -> True | False | response>; pass "
    "allow_unprotected=True only if something in front of the app protects it."
)


def make_dashboard_blueprint(
    *,
    authorize: DashboardAuthorizer | None = None,
    allow_unprotected: bool = False,
    name: str = "bits_dashboard",
    poll_interval: float = 1.0,
    max_rows: int = 500,
    trusted_origins: t.Iterable[str] = (),
) -> Blueprint:
    """The dashboard as a blueprint; register it with a ``url_prefix``.

    :param authorize: see :data:`DashboardAuthorizer`.
    :param allow_unprotected: allow ``authorize=None`` (an outer layer protects it).
    :param name: the blueprint's name (and endpoint prefix).
    :param poll_interval: seconds between two refreshes of the page.
    :param max_rows: the most sessions one poll returns (the oldest first).
    :param trusted_origins: more origins (``https://admin.example``) allowed to Cancel.

    :raises ValueError: no ``authorize`` and no ``allow_unprotected=True``.
    """
    if authorize is None and not allow_unprotected:
        raise ValueError(_UNPROTECTED)
    if authorize is not None and not callable(authorize):
        raise ValueError("authorize must be a callable taking the request.")
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive.")
    trusted = frozenset(o.rstrip("/") for o in trusted_origins)

    bp = Blueprint(name, __name__, template_folder="templates",
                   static_folder="static/bits", static_url_path="/static")

    @bp.before_request
    def protect() -> Response | None:
        if authorize is None:
            return None
        verdict = authorize(request._get_current_object())  # type: ignore[attr-defined]
        if isinstance(verdict, Response):
            return verdict
        if verdict is True:
            return None
        return _json_error("Access denied.", 403)

    @bp.after_request
    def security_headers(response: Response) -> Response:
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @bp.get("/")
    def index() -> str:
        data = snapshot(max_rows=max_rows)
        return render_template(
            "bits/dashboard.html",
            data=data,
            interval_ms=int(poll_interval * 1000),
            csrf_header=CSRF_HEADER,
            fmt_bytes=format_bytes,
            fmt_seconds=format_seconds,
        )

    @bp.get("/sessions.json")
    def sessions_json() -> Response:
        return jsonify(snapshot(max_rows=max_rows))

    @bp.post("/sessions/<session_id>/cancel")
    def cancel(session_id: str) -> Response | tuple[Response, int]:
        problem = _cross_site_problem(request, trusted)
        if problem is not None:
            return _json_error(problem, 403)
        sid = canonical_session_id(session_id)
        if sid is None:
            return _json_error("Not a session id.", 400)
        for server in _servers_by_folder():
            try:
                removed = server.cancel(sid)
            except BITSError as exc:
                return _json_error(f"Could not cancel now ({exc.message}); try again.", 409)
            if removed:
                log.warning("dashboard: session %s cancelled by %s", sid,
                            request.remote_user or request.remote_addr or "?")
                return jsonify({"cancelled": True, "id": sid})
        return _json_error("No open session with this id.", 404)

    return bp


class BITSDashboard:
    """The dashboard as a Flask extension: ``BITSDashboard(app, authorize=...)``.

    Takes the arguments of :func:`make_dashboard_blueprint` plus ``url_prefix``.

    :raises ValueError: no ``authorize`` and no ``allow_unprotected=True``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        url_prefix: str = "/bits-admin",
        authorize: DashboardAuthorizer | None = None,
        allow_unprotected: bool = False,
        **options: t.Any,
    ) -> None:
        if authorize is None and not allow_unprotected:
            raise ValueError(_UNPROTECTED)
        if not url_prefix.startswith("/") or url_prefix == "/":
            raise ValueError("url_prefix must be a path such as '/bits-admin'.")
        self.url_prefix = url_prefix.rstrip("/")
        self.authorize = authorize
        self.allow_unprotected = allow_unprotected
        self.options = options
        self.blueprint: Blueprint | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the blueprint on ``app`` (and ``app.extensions['bits_dashboard']``)."""
        self.blueprint = make_dashboard_blueprint(
            authorize=self.authorize, allow_unprotected=self.allow_unprotected,
            **self.options,
        )
        app.register_blueprint(self.blueprint, url_prefix=self.url_prefix)
        app.extensions["bits_dashboard"] = self


# -- data --------------------------------------------------------------------------------


def _servers_by_folder() -> list[BITSServer]:
    """One server per session folder (directories may share a folder)."""
    seen: dict[str, BITSServer] = {}
    for server in current_app.extensions.get("bits", {}).values():
        seen.setdefault(server.store.folder, server)
    return list(seen.values())


def session_row(state: SessionState, now: float) -> dict[str, t.Any]:
    """What the page shows of one session (never the reply token)."""
    active = max(state.last_activity - state.created, 0.0)
    total = state.total
    return {
        "id": state.id,
        "directory": state.directory,
        "remote_path": state.remote_path,
        "owner": state.owner,
        "received": state.received,
        "total": total,
        "progress": (state.received / total if total else (1.0 if total == 0 else None)),
        "created": state.created,
        "last_activity": state.last_activity,
        "age": max(now - state.created, 0.0),
        "idle": max(now - state.last_activity, 0.0),
        "average_rate": state.received / active if active > 0 else None,
        "phase": state.phase,
        "reply": (state.forward or {}).get("status"),
    }


def snapshot(*, max_rows: int = 500) -> dict[str, t.Any]:
    """The sessions of every directory of the current app, oldest first."""
    now = time.time()
    rows: list[dict[str, t.Any]] = []
    errors: list[str] = []
    servers = _servers_by_folder()
    for server in servers:
        try:
            rows.extend(session_row(state, now) for state in server.store.iter_states())
        except OSError as exc:
            log.warning("dashboard: cannot list sessions in %s: %s", server.store.folder, exc)
            errors.append(f"Cannot list the sessions of directory {server.name!r}.")
    rows.sort(key=lambda r: (r["created"], r["id"]))
    return {
        "now": now,
        "count": len(rows),
        "truncated": len(rows) > max_rows,
        "directories": sorted(current_app.extensions.get("bits", {})),
        "errors": errors,
        "sessions": rows[:max_rows],
    }


# -- helpers -----------------------------------------------------------------------------


def _cross_site_problem(req: Request, trusted: frozenset[str]) -> str | None:
    """Why this Cancel may come from another site, or ``None`` if it may not."""
    if req.headers.get(CSRF_HEADER) != "1":
        return f"Missing the {CSRF_HEADER} header."
    origin = req.headers.get("Origin")
    if origin is not None:
        own = req.host_url.rstrip("/")
        if origin.rstrip("/") != own and origin.rstrip("/") not in trusted:
            return "Cross-origin request refused."
        return None
    site = req.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return "Cross-site request refused."
    return None


def _json_error(message: str, status: int) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def format_bytes(size: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"?"``."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m 15s"``."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"
