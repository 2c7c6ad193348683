"""The server application over HTTP, the IIS way (PROTOCOL.md 8.3-8.8).

``BITS_NOTIFICATION_TYPE`` 1 POSTs the *paths* of the upload and of the reply file to
write; 2 POSTs the upload itself as the body (with its ``Content-Length``, never chunked)
and takes the response body as the reply. Both directions are streamed. The server only
ever contacts the configured URL: a relative URL is resolved against the address the
server itself listens on, never against a host named in the client's request.

Uses ``requests`` (``pip install flask-bits[http]``).
"""

from __future__ import annotations

import logging
import os
import time
import typing as t
import urllib.parse

from .config import DirectoryConfig
from .constants import Header
from .constants import HResult
from .errors import ApplicationError

if t.TYPE_CHECKING:
    from .reply import Upload
    from .reply import _Result

_CHUNK = 1024 * 1024
log = logging.getLogger("flask_bits")


def resolve_notification_url(
    notification_url: str, destination_url: str, local_base: str | None
) -> str | None:
    """The URL to POST to (PROTOCOL.md 8.6, A19), or ``None`` if it cannot be resolved.

    An absolute URL is used as is; a relative one is resolved against the destination's
    path on ``local_base`` (this server's own address; ``None`` when unknown). The
    destination's query string is appended, joined with ``&`` when the URL already has
    one.
    """
    dest = urllib.parse.urlsplit(destination_url)
    if urllib.parse.urlsplit(notification_url).scheme:
        url = notification_url
    elif local_base is None:
        return None
    else:
        url = urllib.parse.urljoin(local_base + (dest.path or "/"), notification_url)
    if dest.query:
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + dest.query
    return url


class HttpNotifier:
    """POSTs finished uploads to ``BITS_NOTIFICATION_URL``."""

    def __init__(self, config: DirectoryConfig) -> None:
        try:
            import requests
        except ImportError:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "BITS_NOTIFICATION_TYPE 1 and 2 need the 'requests' package: "
                "pip install 'flask-bits[http]'."
            ) from None
        self.requests = requests
        self.config = config

    def notify(
        self, upload: Upload, fwd: t.Mapping[str, t.Any], response_path: str, tmp_path: str
    ) -> _Result:
        from .reply import _open_new
        from .reply import _Result
        from .reply import application_error
        from .reply import timeout_error

        cfg = self.config
        assert cfg.notification_url is not None
        url = resolve_notification_url(cfg.notification_url, upload.url, fwd["local_base"])
        if url is None:
            log.error("A relative BITS_NOTIFICATION_URL needs a WSGI server that exposes its "
                      "socket (gunicorn, werkzeug); use an absolute URL here.")
            return _Result(error=ApplicationError(
                "The server application's URL cannot be resolved on this server."))
        headers = {
            Header.ORIGINAL_REQUEST_URL: upload.url,
            "User-Agent": "flask-bits",
            "Accept": "*/*",
        }
        body: t.Any = b""
        if cfg.notification_type == 1:
            headers[Header.REQUEST_DATAFILE_NAME] = upload.path
            headers[Header.RESPONSE_DATAFILE_NAME] = response_path
        elif upload.size:
            body = open(upload.path, "rb")
            headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = str(0 if cfg.notification_type == 1 else upload.size)
        deadline = time.monotonic() + cfg.notification_timeout
        requests = self.requests
        session = requests.Session()
        session.trust_env = False  # no proxies from the environment: talk to the app only
        try:
            try:
                resp = session.post(
                    url, data=body, headers=headers, stream=True, allow_redirects=False,
                    timeout=(min(30.0, cfg.notification_timeout), cfg.notification_timeout),
                )
            except requests.Timeout:
                return _Result(error=timeout_error())
            except requests.RequestException as exc:
                return _Result(error=ApplicationError(
                    f"The server application could not be reached ({type(exc).__name__}).",
                    status=503, hresult=HResult.ERROR_CONNECTION_REFUSED))
            finally:
                if hasattr(body, "close"):
                    body.close()
            with resp:
                status = resp.status_code
                if not (status == 200 or (cfg.accept_any_2xx and 200 <= status < 300)):
                    return _Result(error=application_error(status))
                copy = Header.COPY_FILE_TO_DESTINATION in resp.headers
                static = resp.headers.get(Header.STATIC_RESPONSE_URL, "").strip()
                if static:
                    return _Result(static_url=static, copy=copy)
                if cfg.notification_type == 1 and os.path.isfile(response_path):
                    return _Result(reply_file=response_path, copy=copy)
                try:
                    with _open_new(tmp_path) as out:
                        for chunk in resp.iter_content(_CHUNK):
                            if time.monotonic() > deadline:
                                return _Result(error=timeout_error())
                            out.write(chunk)
                except requests.Timeout:
                    return _Result(error=timeout_error())
                except requests.RequestException:
                    return _Result(error=ApplicationError(
                        "The server application's reply broke off.", status=503,
                        hresult=HResult.ERROR_CONNECTION_REFUSED))
                return _Result(reply_file=tmp_path, copy=copy)
        finally:
            session.close()
