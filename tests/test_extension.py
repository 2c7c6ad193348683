"""The Flask extension: factory pattern, several directories, hooks, registration."""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask import g

from flask_bits import BITS
from flask_bits.server import BITSServer
from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import E_ACCESSDENIED
from tests.conftest import PROTOCOL
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import close_session
from tests.conftest import create_session
from tests.conftest import send_fragment
from tests.conftest import upload


def bare_app(tmp_path: Path, name: str = "app", **config: t.Any) -> Flask:
    app = Flask(name, instance_path=str(tmp_path / name / "instance"))
    app.config.update(TESTING=True, BITS_CLEANUP_INTERVAL=0, **config)
    return app


# -- registration --------------------------------------------------------------------------


def test_constructor_with_app_registers(app: Flask) -> None:
    server = app.extensions["bits"]["bits"]
    assert isinstance(server, BITSServer)
    assert server.name == "bits"
    assert server.config.url_prefix == "/bits"
    assert BITS.get_server(app=app) is server
    with app.app_context():
        assert BITS.get_server() is server
    assert "bits" in app.cli.commands


def test_factory_pattern(tmp_path: Path) -> None:
    bits = BITS()
    app = bare_app(tmp_path, BITS_UPLOAD_FOLDER=str(tmp_path / "up"),
                   BITS_SESSION_FOLDER=str(tmp_path / "sess"))
    assert "bits" not in app.extensions
    bits.init_app(app)
    client = app.test_client()
    upload(client, "/bits/file.bin", b"factory", 3)
    assert (tmp_path / "up" / "file.bin").read_bytes() == b"factory"


def test_one_extension_object_on_two_apps_keeps_them_apart(tmp_path: Path) -> None:
    bits = BITS()
    one = bare_app(tmp_path, "one", BITS_UPLOAD_FOLDER=str(tmp_path / "up1"),
                   BITS_SESSION_FOLDER=str(tmp_path / "s1"))
    two = bare_app(tmp_path, "two", BITS_UPLOAD_FOLDER=str(tmp_path / "up2"),
                   BITS_SESSION_FOLDER=str(tmp_path / "s2"))
    bits.init_app(one)
    bits.init_app(two)
    assert one.extensions["bits"]["bits"] is not two.extensions["bits"]["bits"]
    sid = create_session(one.test_client(), "/bits/file.bin")
    response = send_fragment(two.test_client(), "/bits/file.bin", sid, b"abc", 0, 3)
    assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    upload(two.test_client(), "/bits/file.bin", b"two", 10)
    assert (tmp_path / "up2" / "file.bin").read_bytes() == b"two"
    assert not (tmp_path / "up1" / "file.bin").exists()


def test_config_is_read_once_at_init_app(tmp_path: Path) -> None:
    app = bare_app(tmp_path, BITS_UPLOAD_FOLDER=str(tmp_path / "up"),
                   BITS_SESSION_FOLDER=str(tmp_path / "sess"))
    BITS(app)
    app.config["BITS_UPLOAD_ENABLED"] = False  # too late: the directory is set up
    assert_ack(bits_post(app.test_client(), "/bits/x", "Ping"), 200)


def test_duplicate_name_raises(app: Flask) -> None:
    with pytest.raises(RuntimeError, match="bits"):
        BITS(app)
    with pytest.raises(RuntimeError):
        BITS(app, url_prefix="/elsewhere")


def test_duplicate_prefix_raises(app: Flask) -> None:
    with pytest.raises(RuntimeError, match="/bits"):
        BITS(app, name="second")


def test_invalid_config_raises_value_error_naming_the_key(tmp_path: Path) -> None:
    app = bare_app(tmp_path, BITS_MAX_FRAGMENT_SIZE="lots")
    with pytest.raises(ValueError, match="BITS_MAX_FRAGMENT_SIZE"):
        BITS(app)
    assert "bits" not in app.extensions.get("bits", {})


def test_invalid_per_directory_override_names_the_key(tmp_path: Path) -> None:
    app = bare_app(tmp_path)
    with pytest.raises(ValueError, match="BITS_OVERWRITE_STATUS"):
        BITS(app, config={"BITS_OVERWRITE_STATUS": 500})
    with pytest.raises(ValueError, match="BITS_URL_PREFIX"):
        BITS(app, name="other", url_prefix="no-slash")


def test_default_folders_are_under_the_instance_path(tmp_path: Path) -> None:
    app = bare_app(tmp_path)
    BITS(app)
    server: BITSServer = app.extensions["bits"]["bits"]
    instance = Path(app.instance_path)
    assert Path(server.config.upload_folder) == instance / "bits-uploads"
    assert Path(server.config.session_folder) == instance / "bits-sessions"
    assert (instance / "bits-uploads").is_dir()
    upload(app.test_client(), "/bits/file.bin", b"abc", 2)
    assert (instance / "bits-uploads" / "file.bin").read_bytes() == b"abc"


# -- two directories on one app ------------------------------------------------------------


@pytest.fixture
def two_dirs(tmp_path: Path) -> Flask:
    app = bare_app(tmp_path)
    BITS(app, name="public", url_prefix="/public",
         config={"BITS_UPLOAD_FOLDER": str(tmp_path / "public"),
                 "BITS_SESSION_FOLDER": str(tmp_path / "public-sessions")})
    BITS(app, name="private", url_prefix="/private",
         config={"BITS_UPLOAD_FOLDER": str(tmp_path / "private"),
                 "BITS_SESSION_FOLDER": str(tmp_path / "private-sessions"),
                 "BITS_ALLOW_OVERWRITES": True})
    return app


def test_two_directories_upload_to_their_own_folders(two_dirs: Flask, tmp_path: Path) -> None:
    client = two_dirs.test_client()
    upload(client, "/public/a.bin", b"public", 4)
    upload(client, "/private/b.bin", b"private", 4)
    assert os.listdir(tmp_path / "public") == ["a.bin"]
    assert os.listdir(tmp_path / "private") == ["b.bin"]
    assert (tmp_path / "private" / "b.bin").read_bytes() == b"private"
    # Per-directory settings: only /private allows overwrites.
    upload(client, "/private/b.bin", b"again", 4)
    response = bits_post(client, "/public/a.bin", "Create-Session", protocols=PROTOCOL)
    assert_ack(response, 409, E_ACCESSDENIED)


def test_sessions_of_one_directory_are_unknown_to_the_other(two_dirs: Flask) -> None:
    client = two_dirs.test_client()
    sid = create_session(client, "/public/file.bin")
    for packet in ("Fragment", "Close-Session", "Cancel-Session"):
        response = bits_post(client, "/private/file.bin", packet, b"" if packet != "Fragment"
                             else b"abc", session_id=sid, content_range="bytes 0-2/3")
        assert_ack(response, 500, BG_E_SESSION_NOT_FOUND)
    ok = send_fragment(client, "/public/file.bin", sid, b"abc", 0, 3)
    assert_ack(ok, 200)


def test_directories_sharing_a_session_folder_stay_apart(tmp_path: Path) -> None:
    app = bare_app(tmp_path, BITS_SESSION_FOLDER=str(tmp_path / "shared-sessions"))
    BITS(app, name="a", url_prefix="/a", config={"BITS_UPLOAD_FOLDER": str(tmp_path / "a")})
    BITS(app, name="b", url_prefix="/b", config={"BITS_UPLOAD_FOLDER": str(tmp_path / "b")})
    client = app.test_client()
    sid = create_session(client, "/a/file.bin")
    assert_ack(send_fragment(client, "/b/file.bin", sid, b"abc", 0, 3), 500,
               BG_E_SESSION_NOT_FOUND)
    assert_ack(close_session(client, "/a/file.bin", sid), 200)
    assert_ack(close_session(client, "/b/file.bin", sid), 500, BG_E_SESSION_NOT_FOUND)


def test_nested_prefixes(tmp_path: Path) -> None:
    app = bare_app(tmp_path)
    BITS(app, name="outer", url_prefix="/up",
         config={"BITS_UPLOAD_FOLDER": str(tmp_path / "outer"),
                 "BITS_SESSION_FOLDER": str(tmp_path / "outer-s")})
    BITS(app, name="inner", url_prefix="/up/inner",
         config={"BITS_UPLOAD_FOLDER": str(tmp_path / "inner"),
                 "BITS_SESSION_FOLDER": str(tmp_path / "inner-s"),
                 "BITS_UPLOAD_ENABLED": False})
    client = app.test_client()
    assert_ack(bits_post(client, "/up/inner/x", "Ping"), 501, E_ACCESSDENIED)
    assert_ack(bits_post(client, "/up/x", "Ping"), 200)


# -- hooks ---------------------------------------------------------------------------------


def test_authorize_decorator_denies_with_403(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(init=False)
    bits = BITS()
    seen: list[tuple[str, t.Any]] = []

    @bits.authorize
    def only_public(request: t.Any, remote_path: str, packet_type: t.Any) -> bool:
        seen.append((remote_path, packet_type))
        return remote_path.startswith("public/")

    bits.init_app(app)
    client = app.test_client()
    (Path(app.config["BITS_UPLOAD_FOLDER"]) / "public").mkdir(parents=True)
    assert_ack(bits_post(client, "/bits/secret.bin", "Create-Session", protocols=PROTOCOL), 403,
               E_ACCESSDENIED)
    upload(client, "/bits/public/ok.bin", b"abc", 2)
    assert seen[0][0] == "secret.bin"
    assert seen[0][1].value == "Create-Session"
    assert all(path.startswith("public/") for path, _ in seen[1:])


def test_identify_decorator_binds_sessions(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(init=False)
    bits = BITS()

    @bits.identify
    def user(request: t.Any) -> str | None:
        return request.headers.get("X-User")

    bits.init_app(app)
    client = app.test_client()
    sid = assert_ack(bits_post(client, "/bits/f", "Create-Session", protocols=PROTOCOL,
                               headers={"X-User": "alice"}), 200).headers["BITS-Session-Id"]
    other = bits_post(client, "/bits/f", "Fragment", b"abc", session_id=sid,
                      content_range="bytes 0-2/3", headers={"X-User": "bob"})
    assert_ack(other, 500, BG_E_SESSION_NOT_FOUND)
    mine = bits_post(client, "/bits/f", "Fragment", b"abc", session_id=sid,
                     content_range="bytes 0-2/3", headers={"X-User": "alice"})
    assert_ack(mine, 200)


def test_default_identity_uses_g_bits_user(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()

    @app.before_request
    def login() -> None:
        from flask import request

        g.bits_user = request.headers.get("X-User")

    client = app.test_client()
    sid = assert_ack(bits_post(client, "/bits/f", "Create-Session", protocols=PROTOCOL,
                               headers={"X-User": "alice"}), 200).headers["BITS-Session-Id"]
    server: BITSServer = app.extensions["bits"]["bits"]
    state = server.store.peek(sid)
    assert state is not None and state.owner == "alice"
    other = bits_post(client, "/bits/f", "Close-Session", session_id=sid,
                      headers={"X-User": "bob"})
    assert_ack(other, 500, BG_E_SESSION_NOT_FOUND)


def test_other_routes_of_the_app_are_untouched(app: Flask) -> None:
    @app.route("/hello", methods=["GET", "POST"])
    def hello() -> str:
        return "hi"

    client = app.test_client()
    assert client.get("/hello").get_data() == b"hi"
    response = client.post("/hello")
    assert response.get_data() == b"hi"
    assert "BITS-Packet-Type" not in response.headers
    # A BITS_POST outside every prefix is not answered by BITS.
    outside = bits_post(client, "/hello", "Ping")
    assert outside.status_code == 405
    assert "BITS-Packet-Type" not in outside.headers
    lookalike = bits_post(client, "/bitsy/file.bin", "Ping")  # not under "/bits"
    assert lookalike.status_code == 404
    assert "BITS-Packet-Type" not in lookalike.headers


@pytest.mark.parametrize("custom_response_class", [False, True])
def test_acks_keep_what_after_request_hooks_add(
    make_app: t.Callable[..., Flask], custom_response_class: bool
) -> None:
    """Flask sends the Ack as the view built it (no conversion, no Content-Type), and
    what the app's after_request hooks add still goes out; with an app-specific
    response class Flask converts the Ack, and the answer is the same."""
    from flask import Response as FlaskResponse

    class AppResponse(FlaskResponse):
        pass

    app = make_app(init=False)
    if custom_response_class:
        app.response_class = AppResponse
    BITS(app)
    sent: list[type] = []

    @app.after_request
    def stamp(response: t.Any) -> t.Any:
        sent.append(type(response))
        response.headers["X-Stamp"] = "1"
        return response

    reply = bits_post(app.test_client(), "/bits/f.bin", "Ping")
    assert_ack(reply, 200)
    assert reply.headers["X-Stamp"] == "1"
    assert "Content-Type" not in reply.headers
    assert reply.headers["Content-Length"] == "0" and reply.get_data() == b""
    assert issubclass(sent[0], AppResponse if custom_response_class else FlaskResponse)
    server = BITS.get_server(app=app)
    assert (server.response_class.__name__ == "FlaskAckResponse") is not custom_response_class
