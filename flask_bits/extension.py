"""The Flask extension: ``BITS(app)`` or ``BITS().init_app(app)``.

Each :class:`BITS` instance is one upload directory (a URL prefix with its folders and
settings, like an IIS virtual directory). An app may have several, with different
``name`` and ``url_prefix``; per-directory settings override the app's ``BITS_*`` keys.
"""

from __future__ import annotations

import typing as t
import weakref

import flask
from flask import Flask
from flask import current_app
from flask import g
from flask import request
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from .config import DirectoryConfig
from .constants import ACK
from .constants import BITS_POST
from .constants import Header
from .constants import PacketType
from .server import AckResponse
from .server import Authorizer
from .server import BITSServer
from .server import Identifier
from .server import echoed_session_id

F = t.TypeVar("F", bound=t.Callable[..., t.Any])


class BITSPathConverter(BaseConverter):
    """Matches the rest of the path after a prefix: nothing, or ``/`` and anything
    (``//`` included), so that every ``BITS_POST`` under a prefix reaches the BITS view
    and gets an Ack. One rule, no defaults: werkzeug never redirects a BITS client."""

    regex = r"(?:/[\s\S]*)?"
    part_isolating = False


class BITS:
    """A BITS upload directory on a Flask app.

    :param app: the app to set up now (else call :meth:`init_app` later).
    :param name: the directory's name; unique per app. Sessions belong to it.
    :param url_prefix: overrides ``BITS_URL_PREFIX``.
    :param config: ``BITS_*`` keys that override the app's for this directory.
    :param authorize: see :meth:`authorize`.
    :param identify: see :meth:`identify`.

    The app's config is read once, in :meth:`init_app`.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        name: str = "bits",
        url_prefix: str | None = None,
        config: t.Mapping[str, t.Any] | None = None,
        authorize: Authorizer | None = None,
        identify: Identifier | None = None,
    ) -> None:
        self.name = name
        self.url_prefix = url_prefix
        self.config_overrides = dict(config or {})
        self._authorize = authorize
        self._identify = identify
        self._reply_handler: t.Callable[..., t.Any] | None = None
        if app is not None:
            self.init_app(app)

    # -- decorators --------------------------------------------------------------------

    def authorize(self, func: F) -> F:
        """Register ``func(request, remote_path, packet_type)`` as the authorization hook.

        Return ``True``/``None`` to allow, ``False`` to deny (403 ``0x80070005``), or a
        response (such as a 401 with a ``WWW-Authenticate`` challenge) to send as an Ack.
        Register it before :meth:`init_app`.
        """
        self._authorize = func
        return func

    def identify(self, func: F) -> F:
        """Register ``func(request) -> str | None`` naming the owner of new sessions."""
        self._identify = func
        return func

    def reply_handler(self, func: F) -> F:
        """Register the in-process server application for upload-reply jobs."""
        self._reply_handler = func
        return func

    # -- setup ------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Read the config, create the folders and register the ``BITS_POST`` view.

        :raises RuntimeError: a directory of this name is already set up on ``app``.
        :raises ValueError: a ``BITS_*`` value is invalid (the message names the key).
        """
        directories: dict[str, BITSServer] = app.extensions.setdefault("bits", {})
        if self.name in directories:
            raise RuntimeError(
                f"A BITS upload directory named {self.name!r} is already registered on "
                "this app. Import and use that instance instead, or pass another name=."
            )
        values = {k: v for k, v in app.config.items() if k.startswith("BITS_")}
        values.update(self.config_overrides)
        if self.url_prefix is not None:
            values["BITS_URL_PREFIX"] = self.url_prefix
        config = DirectoryConfig.from_mapping(values, instance_path=app.instance_path)
        for other in directories.values():
            if other.config.url_prefix == config.url_prefix:
                raise RuntimeError(f"URL prefix {config.url_prefix!r} is already used by "
                                   f"BITS directory {other.name!r}.")
        app_ref = weakref.ref(app)
        server = BITSServer(
            config,
            name=self.name,
            authorize=self._authorize,
            identify=self._identify or flask_identity,
            on_event=_signal_sender(app_ref, self.name),
        )
        if self._reply_handler is not None or config.notification_type:
            from .reply import ReplyManager

            server.replies = ReplyManager(server, handler=self._reply_handler)
        if app.response_class is flask.Response:
            server.response_class = FlaskAckResponse
        directories[self.name] = server

        if "bitspath" not in app.url_map.converters:
            app.url_map.converters["bitspath"] = BITSPathConverter
        endpoint = f"bits_{self.name}"
        view = _make_view(self.name)
        app.add_url_rule(config.url_prefix + "<bitspath:remote_path>", endpoint, view,
                         methods=[BITS_POST], merge_slashes=False, strict_slashes=False)
        if server.replies is not None:
            server.replies.register_flask(app)
        if len(directories) == 1:
            app.after_request(_ack_everything)
            from .cli import bits_cli

            app.cli.add_command(bits_cli)

    @staticmethod
    def get_server(name: str = "bits", app: Flask | None = None) -> BITSServer:
        """The :class:`BITSServer` of directory ``name`` on ``app`` (or the current app)."""
        server: BITSServer = (app or current_app).extensions["bits"][name]
        return server


class FlaskAckResponse(AckResponse, flask.Response):
    """An Ack that is already a ``flask.Response``: Flask would otherwise convert it
    (``force_type``), losing :class:`AckResponse`'s cheaper header handling."""


def flask_identity(req: Request) -> str | None:
    """Default owner: ``g.bits_user``, then a logged-in Flask-Login user, then
    ``REMOTE_USER`` (set by the WSGI server or a trusted proxy)."""
    user = g.get("bits_user")
    if user:
        return str(user)
    login_user = g.get("_login_user")
    if login_user is not None and getattr(login_user, "is_authenticated", False):
        return str(login_user.get_id())
    remote = req.environ.get("REMOTE_USER")
    return str(remote) if remote else None


def _make_view(name: str) -> t.Callable[..., Response]:
    def bits_post(remote_path: str) -> Response:
        server: BITSServer = current_app.extensions["bits"][name]
        req = request._get_current_object()  # type: ignore[attr-defined]
        return server.handle(req, remote_path[1:])

    bits_post.__name__ = f"bits_post_{name}"
    return bits_post


def _server_for_path(app: Flask, path: str) -> BITSServer | None:
    best: BITSServer | None = None
    for server in app.extensions.get("bits", {}).values():
        prefix = server.config.url_prefix
        if path == prefix or path.startswith(prefix + "/"):
            if best is None or len(prefix) > len(best.config.url_prefix):
                best = server
    return best


def _ack_everything(response: Response) -> Response:
    """After every request: a ``BITS_POST`` under a BITS prefix always gets an Ack,
    even when a ``before_request`` hook, routing or an error handler answered it."""
    if request.method != BITS_POST or response.headers.get(Header.PACKET_TYPE) == ACK:
        return response  # not BITS, or the BITS view answered it already
    server = _server_for_path(current_app._get_current_object(), request.path)  # type: ignore[attr-defined]
    if server is None:
        return response
    packet_type = PacketType.parse(request.headers.get(Header.PACKET_TYPE))
    return server.as_ack(response, echoed_session_id(request, packet_type))


def _signal_sender(app_ref: weakref.ref[Flask], directory: str) -> t.Callable[..., None]:
    from .signals import BY_EVENT

    def send(event: str, **data: t.Any) -> None:
        signal = BY_EVENT.get(event)
        app = app_ref()
        if signal is not None and app is not None and signal.receivers:
            signal.send(app, directory=directory, **data)

    return send
