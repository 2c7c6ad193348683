"""Upload-reply (work in progress)."""

from __future__ import annotations

import typing as t

from .errors import InternalError


class ReplyManager:
    def __init__(self, server: t.Any, *, handler: t.Any = None) -> None:
        self.server = server
        self.handler = handler

    def complete(self, packet: t.Any, session: t.Any) -> t.Any:
        raise InternalError("upload-reply is not implemented yet")

    def register_flask(self, app: t.Any) -> None:
        pass

    def handle_wsgi(self, request: t.Any) -> t.Any:
        return None
