"""WSGI middleware: BITS uploads for any WSGI app (Django, Pyramid, bare werkzeug).

``BITS_POST`` requests under a directory's prefix are answered by the core; every other
request goes to the wrapped app untouched.
"""

from __future__ import annotations

import typing as t

from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request

from .config import DirectoryConfig
from .constants import BITS_POST
from .server import Authorizer
from .server import BITSServer
from .server import Identifier

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment


class BITSMiddleware:
    """Serve BITS upload directories in front of ``app``.

    :param app: the WSGI app to wrap.
    :param config: ``BITS_*`` keys for one directory (ignored if ``servers`` is given).
    :param instance_path: where default folders go when the config names none.
    :param servers: several directories, each a :class:`BITSServer`.
    :param authorize: see :data:`flask_bits.server.Authorizer`.
    :param identify: see :data:`flask_bits.server.Identifier`.
    """

    def __init__(
        self,
        app: WSGIApplication,
        config: t.Mapping[str, t.Any] | None = None,
        *,
        instance_path: str = "instance",
        servers: t.Sequence[BITSServer] | None = None,
        authorize: Authorizer | None = None,
        identify: Identifier | None = None,
    ) -> None:
        self.app = app
        if servers is None:
            cfg = DirectoryConfig.from_mapping(config or {}, instance_path=instance_path)
            servers = [BITSServer(cfg, authorize=authorize, identify=identify)]
        # Longest prefix first, so nested prefixes pick the most specific directory.
        self.servers = sorted(servers, key=lambda s: -len(s.config.url_prefix))

    def server_for(self, path: str) -> BITSServer | None:
        """The directory whose prefix ``path`` lies under, if any."""
        for server in self.servers:
            prefix = server.config.url_prefix
            if path == prefix or path.startswith(prefix + "/"):
                return server
        return None

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> t.Iterable[bytes]:
        request = Request(environ)
        server = self.server_for(request.path)
        if server is not None and server.replies is not None:
            reply = server.replies.handle_wsgi(request)
            if reply is not None:
                return reply(environ, start_response)
        if request.method != BITS_POST or server is None:
            return self.app(environ, start_response)
        remote = request.path[len(server.config.url_prefix) + 1 :]
        ack = server.answer(request, remote)  # always an Ack, never a body
        start_response(f"{ack.status} {HTTP_STATUS_CODES.get(ack.status, 'Unknown')}",
                       server.ack_headers(ack))
        return [b""]
