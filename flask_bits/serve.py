"""``flask-bits serve``: a BITS upload server in one command.

::

    flask-bits serve --upload-folder DIR [--session-folder DIR] [--host 127.0.0.1]
                     [--port 8080] [--prefix /bits] [--reply-command CMD]

runs a Flask app with one BITS upload directory on werkzeug's threaded server (fine for
one-command use) and prints how Windows clients (``bitsadmin``, ``Start-BitsTransfer``)
and this package's client reach it, plus the equivalent gunicorn command for
production, which uses :func:`create_app`::

    FLASK_BITS_UPLOAD_FOLDER=/srv/uploads gunicorn -w 4 -b 127.0.0.1:8080 \\
        'flask_bits.serve:create_app()'

:func:`create_app` reads its settings from the environment: every ``BITS_*`` config key
(see README) as ``BITS_<KEY>`` or ``FLASK_BITS_<KEY>`` (the latter wins; values are
JSON-parsed when they parse, else taken as strings), plus three settings of its own:

``FLASK_BITS_REPLY_COMMAND``
    Makes the directory an upload-reply directory: for every finished upload, this
    command runs (split like a shell would, but run without a shell) with the uploaded
    file's path as its last argument; its standard output is the reply. It also gets
    ``UPLOAD_REMOTE_PATH``, ``UPLOAD_URL``, ``UPLOAD_SIZE``, ``UPLOAD_SESSION_ID`` and
    ``UPLOAD_OWNER`` in its environment. A non-zero exit status answers the client with a
    500 from the server application (the client retries, and the command runs again).
``FLASK_BITS_REPLY_COMMAND_TIMEOUT``
    Seconds the command may run (default: ``BITS_NOTIFICATION_TIMEOUT``); past that the
    client gets a 408 and retries later.
``FLASK_BITS_KEEP_UPLOADS``
    With a reply command, also keep the uploaded file at its destination in the upload
    folder (upload-reply jobs normally leave nothing there).

Without ``BITS_SESSION_FOLDER`` sessions live beside the upload folder, in
``<upload folder>-sessions`` (e.g. ``/srv/uploads-sessions``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import typing as t

from flask import Flask

from .extension import BITS
from .reply import Reply
from .reply import ReplyError
from .reply import Upload
from .reply import timeout_error

log = logging.getLogger("flask_bits")

#: Environment variables of :func:`create_app` itself (not ``BITS_*`` config keys).
SERVE_SETTINGS = ("REPLY_COMMAND", "REPLY_COMMAND_TIMEOUT", "KEEP_UPLOADS")
#: The default session folder is the upload folder's path plus this.
SESSION_SUFFIX = "-sessions"


def env_config(environ: t.Mapping[str, str] | None = None) -> dict[str, t.Any]:
    """``BITS_*`` config keys from ``BITS_<KEY>`` and ``FLASK_BITS_<KEY>`` variables
    (the latter win), JSON-parsed when they parse; :data:`SERVE_SETTINGS` left out."""
    environ = os.environ if environ is None else environ
    config: dict[str, t.Any] = {}
    for prefix in ("BITS_", "FLASK_BITS_"):
        for name, raw in environ.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):]
            if not key or key in SERVE_SETTINGS:
                continue
            config["BITS_" + key] = _json_or_text(raw)
    return config


def _json_or_text(raw: str) -> t.Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _setting(environ: t.Mapping[str, str], name: str) -> str | None:
    value = environ.get("FLASK_BITS_" + name)
    if value is None:
        value = environ.get("BITS_" + name)
    return value if value not in (None, "") else None


def create_app(
    config: t.Mapping[str, t.Any] | None = None,
    *,
    reply_command: str | t.Sequence[str] | None = None,
    reply_command_timeout: float | None = None,
    keep_uploads: bool | None = None,
    environ: t.Mapping[str, str] | None = None,
) -> Flask:
    """A Flask app serving one BITS upload directory, configured from the environment.

    :param config: ``BITS_*`` keys that override the environment's.
    :param reply_command: see ``FLASK_BITS_REPLY_COMMAND`` (a string is split with
        :func:`shlex.split`); overrides the environment.
    :param reply_command_timeout: see ``FLASK_BITS_REPLY_COMMAND_TIMEOUT``.
    :param keep_uploads: see ``FLASK_BITS_KEEP_UPLOADS``.
    :param environ: read instead of :data:`os.environ`.
    :raises ValueError: no upload folder is configured, or a setting is invalid.
    """
    environ = os.environ if environ is None else environ
    values = env_config(environ)
    values.update(config or {})
    upload_folder = values.get("BITS_UPLOAD_FOLDER")
    if not upload_folder:
        raise ValueError(
            "No upload folder: set FLASK_BITS_UPLOAD_FOLDER (or BITS_UPLOAD_FOLDER) to the "
            "folder uploads go to, or use 'flask-bits serve --upload-folder DIR'."
        )
    upload_folder = os.path.abspath(os.fspath(upload_folder))
    values["BITS_UPLOAD_FOLDER"] = upload_folder
    if not values.get("BITS_SESSION_FOLDER"):
        values["BITS_SESSION_FOLDER"] = default_session_folder(upload_folder)

    if reply_command is None:
        reply_command = _setting(environ, "REPLY_COMMAND")
    if reply_command_timeout is None:
        raw_timeout = _setting(environ, "REPLY_COMMAND_TIMEOUT")
        if raw_timeout is not None:
            try:
                reply_command_timeout = float(raw_timeout)
            except ValueError:
                raise ValueError("FLASK_BITS_REPLY_COMMAND_TIMEOUT must be a number of "
                                 f"seconds, got {raw_timeout!r}.") from None
    if keep_uploads is None:
        raw_keep = _setting(environ, "KEEP_UPLOADS")
        keep_uploads = raw_keep is not None and raw_keep.strip().lower() in (
            "1", "true", "yes", "on")

    app = Flask(__name__)
    app.config.update(values)
    bits = BITS()
    if reply_command:
        argv = split_command(reply_command)
        bits.reply_handler(CommandReplyHandler(argv, timeout=reply_command_timeout,
                                               keep_upload=keep_uploads))
    bits.init_app(app)
    server = BITS.get_server(app=app)
    handler = server.replies.handler if server.replies is not None else None
    if isinstance(handler, CommandReplyHandler) and handler.timeout is None:
        handler.timeout = server.config.notification_timeout
    return app


def default_session_folder(upload_folder: str) -> str:
    """``<upload folder>-sessions``, beside the upload folder (same file system, so
    finished uploads are moved into place atomically; never inside it, where clients
    could reach it)."""
    upload_folder = os.path.abspath(upload_folder).rstrip(os.sep)
    if not os.path.basename(upload_folder):
        raise ValueError("The upload folder is a file system root; give a session folder "
                         "too (FLASK_BITS_SESSION_FOLDER or --session-folder).")
    return upload_folder + SESSION_SUFFIX


def split_command(command: str | t.Sequence[str]) -> list[str]:
    """The argument vector of a reply command (shell-free; a string is split the way
    a POSIX shell would split it, without any expansion)."""
    if isinstance(command, str):
        argv = shlex.split(command, posix=os.name != "nt")
    else:
        argv = [str(a) for a in command]
    if not argv:
        raise ValueError("The reply command is empty.")
    return argv


class CommandReplyHandler:
    """A reply handler that runs a command (``@bits.reply_handler`` compatible).

    The command gets the uploaded file's path as its last argument and
    ``UPLOAD_REMOTE_PATH``, ``UPLOAD_URL``, ``UPLOAD_SIZE``, ``UPLOAD_SESSION_ID`` and
    ``UPLOAD_OWNER`` in its environment; its standard output (spooled to a temporary
    file, never held in memory) is the reply; its standard error goes to the server's.

    :param argv: the command and its first arguments.
    :param timeout: seconds the command may run (``None``: no limit).
    :param keep_upload: also keep the upload at its destination.
    """

    def __init__(self, argv: t.Sequence[str], *, timeout: float | None = None,
                 keep_upload: bool = False) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.keep_upload = keep_upload

    def __call__(self, upload: Upload) -> Reply:
        env = dict(os.environ)
        env.update({
            "UPLOAD_REMOTE_PATH": upload.remote_path,
            "UPLOAD_URL": upload.url,
            "UPLOAD_SIZE": str(upload.size),
            "UPLOAD_SESSION_ID": upload.session_id,
            "UPLOAD_OWNER": upload.owner or "",
        })
        out = tempfile.TemporaryFile()
        try:
            try:
                proc = subprocess.run(
                    [*self.argv, upload.path], stdin=subprocess.DEVNULL, stdout=out,
                    env=env, timeout=self.timeout, check=False,
                )
            except subprocess.TimeoutExpired:
                log.warning("reply command timed out after %ss for session %s",
                            self.timeout, upload.session_id)
                raise timeout_error() from None
            except OSError as exc:
                log.error("cannot run the reply command %s: %s", self.argv[0], exc)
                raise ReplyError(500, "The reply command could not be started.") from None
            if proc.returncode != 0:
                log.warning("reply command exited with status %s for session %s",
                            proc.returncode, upload.session_id)
                raise ReplyError(500, f"The reply command failed (exit status "
                                      f"{proc.returncode}).")
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return Reply(stream=t.cast(t.BinaryIO, out), copy_to_destination=self.keep_upload)


# -- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``flask-bits`` argument parser (``serve``; ``upload`` and ``cancel`` are
    :mod:`flask_bits.client`'s)."""
    parser = argparse.ArgumentParser(
        prog="flask-bits",
        description="BITS upload server and client. 'flask-bits upload --help' and "
                    "'flask-bits cancel --help' describe the client commands.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run a BITS upload server",
        description="Run a BITS upload server (werkzeug's threaded server; use the printed "
                    "gunicorn command in production). Any other BITS_* setting can be given "
                    "as an environment variable, e.g. FLASK_BITS_MAX_UPLOAD_SIZE=1000000.",
    )
    serve.add_argument("--upload-folder", required=True, metavar="DIR",
                       help="where finished uploads go (created if missing)")
    serve.add_argument("--session-folder", metavar="DIR",
                       help=f"where sessions live (default: DIR{SESSION_SUFFIX}, beside DIR)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--prefix", default="/bits", help="URL prefix (default /bits)")
    serve.add_argument("--reply-command", metavar="CMD",
                       help="upload-reply: run CMD with the uploaded file's path as last "
                            "argument; its stdout is the reply (no shell is used)")
    serve.add_argument("--reply-command-timeout", type=float, metavar="SECONDS",
                       help="longest run of the reply command (default "
                            "BITS_NOTIFICATION_TIMEOUT, 300)")
    serve.add_argument("--keep-uploads", action="store_true",
                       help="with --reply-command: also keep uploads in the upload folder")
    serve.add_argument("--allow-overwrites", action="store_true",
                       help="let an upload replace an existing file")
    sub.add_parser("upload", help="upload a file (see 'flask-bits upload --help')",
                   add_help=False)
    sub.add_parser("cancel", help="cancel an upload session", add_help=False)
    return parser


def main(argv: t.Sequence[str] | None = None) -> int:
    """The ``flask-bits`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in ("upload", "cancel"):
        from . import client

        return client.main(args_list, prog="flask-bits")
    parser = build_parser()
    args = parser.parse_args(args_list)
    config: dict[str, t.Any] = {"BITS_UPLOAD_FOLDER": args.upload_folder,
                                "BITS_URL_PREFIX": args.prefix}
    if args.session_folder:
        config["BITS_SESSION_FOLDER"] = args.session_folder
    if args.allow_overwrites:
        config["BITS_ALLOW_OVERWRITES"] = True
    if args.keep_uploads and not args.reply_command:
        parser.error("--keep-uploads only makes sense with --reply-command")
    try:
        app = create_app(config, reply_command=args.reply_command,
                         reply_command_timeout=args.reply_command_timeout,
                         keep_uploads=args.keep_uploads or None)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(app, args.host, args.port)


def serve(app: Flask, host: str, port: int) -> int:
    """Run ``app`` on werkzeug's threaded server until Ctrl-C or SIGTERM."""
    from werkzeug.serving import WSGIRequestHandler
    from werkzeug.serving import make_server

    _setup_logging()
    # BITS_READ_TIMEOUT bounds each socket read on gunicorn only; give werkzeug's
    # connections the same timeout, so a stalled client cannot hold a session's lock.
    read_timeout = BITS.get_server(app=app).config.read_timeout
    handler = type("BITSRequestHandler", (WSGIRequestHandler,), {"timeout": read_timeout})
    try:
        server = make_server(host, port, app, threaded=True, request_handler=handler)
    except (OSError, SystemExit) as exc:
        print(f"flask-bits: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(banner(app, host, server.server_port), flush=True)

    def stop(signum: int, frame: t.Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    print("flask-bits: stopped", flush=True)
    return 0


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def banner(app: Flask, host: str, port: int) -> str:
    """What ``flask-bits serve`` prints: the upload URL and how to use it."""
    server = BITS.get_server(app=app)
    cfg = server.config
    shown = host
    if host in ("", "0.0.0.0", "::"):
        shown = socket.gethostname()
    if ":" in shown:
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}{cfg.url_prefix}/"
    reply = server.replies is not None
    handler = server.replies.handler if server.replies is not None else None
    lines = [
        f"flask-bits: BITS upload server at {base}",
        f"  uploads go to:    {cfg.upload_folder}",
        f"  sessions kept in: {cfg.session_folder}",
    ]
    if isinstance(handler, CommandReplyHandler):
        lines.append(f"  upload-reply:     {shlex.join(handler.argv)} FILE"
                     + ("  (uploads also kept)" if handler.keep_upload else ""))
    kind, ps_kind = ("/upload-reply", "UploadReply") if reply else ("/upload", "Upload")
    lines += [
        "",
        "Upload from Windows (cmd):",
        f"  bitsadmin /transfer myjob {kind} {base}report.pdf C:\\path\\to\\report.pdf",
        "Upload from Windows (PowerShell):",
        f"  Start-BitsTransfer -TransferType {ps_kind} -Destination {base}report.pdf "
        "-Source C:\\path\\to\\report.pdf",
        "Upload from any OS:",
        f"  python -m flask_bits.client upload {base} report.pdf",
        "",
        "In production, run the same server with gunicorn:",
        f"  {gunicorn_command(app, host, port)}",
    ]
    if host not in ("127.0.0.1", "localhost", "::1") and server.authorize is None:
        lines += ["", "WARNING: no authentication: anyone who can reach this port can "
                      "upload. Put it behind a proxy with authentication and TLS."]
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def gunicorn_command(app: Flask, host: str, port: int) -> str:
    """The gunicorn command line that serves the same directory as ``app``."""
    server = BITS.get_server(app=app)
    cfg = server.config
    env = [f"FLASK_BITS_UPLOAD_FOLDER={shlex.quote(cfg.upload_folder)}"]
    if cfg.session_folder != default_session_folder(cfg.upload_folder):
        env.append(f"FLASK_BITS_SESSION_FOLDER={shlex.quote(cfg.session_folder)}")
    if cfg.url_prefix != "/bits":
        env.append(f"FLASK_BITS_URL_PREFIX={shlex.quote(cfg.url_prefix)}")
    if cfg.allow_overwrites:
        env.append("FLASK_BITS_ALLOW_OVERWRITES=true")
    handler = server.replies.handler if server.replies is not None else None
    if isinstance(handler, CommandReplyHandler):
        env.append(f"FLASK_BITS_REPLY_COMMAND={shlex.quote(shlex.join(handler.argv))}")
        if handler.keep_upload:
            env.append("FLASK_BITS_KEEP_UPLOADS=true")
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return " ".join([*env, "gunicorn", "-w", "4", "-b", bind,
                     shlex.quote("flask_bits.serve:create_app()")])


if __name__ == "__main__":
    sys.exit(main())
