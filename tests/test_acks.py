"""Every answer to a BITS_POST is an Ack (PROTOCOL.md T5-T7, 4.1, 6, 7.6; checklist 1, 31, 32).

The Ack skeleton: ``BITS-Packet-Type: Ack``, ``Content-Length: 0``, no body, no
``Content-Type``. Error Acks carry ``BITS-Error-Code`` and ``BITS-Error`` (same value,
``0x%08X``) and ``BITS-Error-Context: 0x5``; 2xx, 413 and 416 Acks carry none.
"""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask import Response
from flask import abort
from flask.testing import FlaskClient

from tests.conftest import BG_E_SESSION_NOT_FOUND
from tests.conftest import BG_E_TOO_LARGE
from tests.conftest import E_ACCESSDENIED
from tests.conftest import E_FAIL
from tests.conftest import E_INVALIDARG
from tests.conftest import ERROR_HEADERS
from tests.conftest import PROTOCOL
from tests.conftest import assert_ack
from tests.conftest import bits_post
from tests.conftest import create_session
from tests.conftest import send_fragment

PATH = "/bits/file.bin"
PACKET_TYPES = ["Ping", "Create-Session", "Fragment", "Close-Session", "Cancel-Session"]
HRESULT_RE = re.compile(r"0x[0-9A-F]{8}")


def check_ack_rules(response: t.Any) -> None:
    """The rules every Ack follows, whatever its status."""
    assert response.headers.get("BITS-Packet-Type") == "Ack"
    assert response.headers.getlist("Content-Length") == ["0"]
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers
    status = response.status_code
    if 200 <= status < 300 or status in (413, 416):
        for name in ERROR_HEADERS:
            assert name not in response.headers, (status, name)
    else:
        code = response.headers["BITS-Error-Code"]
        assert HRESULT_RE.fullmatch(code), code
        assert response.headers["BITS-Error"] == code
        assert response.headers["BITS-Error-Context"] in ("0x5", "0x7")


def _packet_for(packet_type: str, client: FlaskClient) -> dict[str, t.Any]:
    """Headers that make a valid packet of this type (a fresh session when needed)."""
    if packet_type == "Create-Session":
        return {"protocols": PROTOCOL}
    if packet_type == "Ping":
        return {}
    sid = create_session(client, PATH)
    if packet_type == "Fragment":
        return {"session_id": sid, "content_range": "bytes */0"}
    return {"session_id": sid}


# -- a table of exchanges, one per kind of answer ------------------------------------------


def _ping(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, PATH, "Ping")


def _create(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, PATH, "Create-Session", protocols=PROTOCOL)


def _fragment(c: FlaskClient, up: Path) -> t.Any:
    return send_fragment(c, PATH, create_session(c, PATH), b"abc", 0, 10)


def _final_fragment(c: FlaskClient, up: Path) -> t.Any:
    return send_fragment(c, PATH, create_session(c, PATH), b"abc", 0, 3)


def _gap(c: FlaskClient, up: Path) -> t.Any:
    return send_fragment(c, PATH, create_session(c, PATH), b"abc", 5, 10)


def _too_big_fragment(c: FlaskClient, up: Path) -> t.Any:
    return send_fragment(c, PATH, create_session(c, PATH), b"x" * 6000, 0, 6000)


def _too_big_upload(c: FlaskClient, up: Path) -> t.Any:
    return send_fragment(c, PATH, create_session(c, PATH), b"abc", 0, 10**6)


def _bad_range(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, PATH, "Fragment", b"abc", session_id=create_session(c, PATH),
                     content_range="bytes 0-2")


def _unknown_session(c: FlaskClient, up: Path) -> t.Any:
    return send_fragment(c, PATH, "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}", b"abc", 0, 10)


def _close(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, PATH, "Close-Session", session_id=create_session(c, PATH))


def _cancel(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, PATH, "Cancel-Session", session_id=create_session(c, PATH))


def _traversal(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, "/bits/../x", "Create-Session", protocols=PROTOCOL)


def _missing_folder(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, "/bits/nope/x", "Create-Session", protocols=PROTOCOL)


def _exists(c: FlaskClient, up: Path) -> t.Any:
    (up / "file.bin").write_bytes(b"x")
    return bits_post(c, PATH, "Create-Session", protocols=PROTOCOL)


def _unknown_type(c: FlaskClient, up: Path) -> t.Any:
    return bits_post(c, PATH, "Frobnicate")


EXCHANGES: list[tuple[t.Callable[[FlaskClient, Path], t.Any], int, str | None]] = [
    (_ping, 200, None),
    (_create, 200, None),
    (_fragment, 200, None),
    (_final_fragment, 200, None),
    (_gap, 416, None),
    (_too_big_fragment, 413, None),
    (_too_big_upload, 500, BG_E_TOO_LARGE),
    (_bad_range, 400, E_INVALIDARG),
    (_unknown_session, 500, BG_E_SESSION_NOT_FOUND),
    (_close, 200, None),
    (_cancel, 200, None),
    (_traversal, 403, E_ACCESSDENIED),
    (_missing_folder, 404, "0x80070003"),
    (_exists, 409, E_ACCESSDENIED),
    (_unknown_type, 400, E_INVALIDARG),
]


@pytest.mark.parametrize(
    ("exchange", "status", "error"), EXCHANGES, ids=[e[0].__name__.strip("_") for e in EXCHANGES]
)
def test_every_answer_is_an_ack(
    make_app: t.Callable[..., Flask],
    upload_folder: Path,
    exchange: t.Callable[[FlaskClient, Path], t.Any],
    status: int,
    error: str | None,
) -> None:
    app = make_app(BITS_MAX_FRAGMENT_SIZE=5 * 1024, BITS_MAX_UPLOAD_SIZE=1000)
    response = exchange(app.test_client(), upload_folder)
    assert_ack(response, status, error)
    check_ack_rules(response)


def test_without_the_bits_error_header(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_SEND_BITS_ERROR=False).test_client()
    response = bits_post(client, PATH, "Frobnicate")
    assert response.status_code == 400
    assert response.headers["BITS-Error-Code"] == E_INVALIDARG
    assert "BITS-Error" not in response.headers
    assert response.headers["BITS-Error-Context"] == "0x5"


# -- packet types (7.6, checklist 31) ------------------------------------------------------


@pytest.mark.parametrize(
    "packet_type", ["Ack", "ACK", "Get", "Create_Session", "Fragments", "Ping Ping", ""]
)
def test_unknown_packet_type_is_400(client: FlaskClient, packet_type: str) -> None:
    assert_ack(bits_post(client, PATH, packet_type), 400, E_INVALIDARG)


def test_missing_packet_type_is_400(client: FlaskClient) -> None:
    assert_ack(bits_post(client, PATH, None), 400, E_INVALIDARG)


# -- framing (T5, T6) ----------------------------------------------------------------------


@pytest.mark.parametrize("packet_type", PACKET_TYPES)
def test_header_value_over_4_kb_is_400(
    client: FlaskClient, upload_folder: Path, packet_type: str
) -> None:
    headers = _packet_for(packet_type, client)
    response = bits_post(client, PATH, packet_type, content_name="n" * 4097, **headers)
    assert_ack(response, 400, E_INVALIDARG)
    assert "BITS-Protocol" not in response.headers
    assert not (upload_folder / "file.bin").exists()


@pytest.mark.parametrize("packet_type", PACKET_TYPES)
def test_missing_content_length_is_400(client: FlaskClient, packet_type: str) -> None:
    headers = _packet_for(packet_type, client)
    response = bits_post(client, PATH, packet_type, content_length=None, **headers)
    assert_ack(response, 400, E_INVALIDARG)


def test_chunked_request_body_is_400(client: FlaskClient) -> None:
    sid = create_session(client, PATH)
    response = bits_post(client, PATH, "Fragment", b"abc", session_id=sid,
                         content_range="bytes 0-2/3", content_length=None,
                         headers={"Transfer-Encoding": "chunked"})
    assert_ack(response, 400, E_INVALIDARG)


# -- uploads disabled (A16, A35; checklist 2) ----------------------------------------------


@pytest.mark.parametrize("packet_type", PACKET_TYPES + ["Frobnicate"])
def test_disabled_uploads_answer_501_to_every_packet(
    make_app: t.Callable[..., Flask], upload_folder: Path, session_folder: Path, packet_type: str
) -> None:
    enabled = make_app().test_client()
    headers = _packet_for(packet_type, enabled) if packet_type != "Frobnicate" else {}
    disabled = make_app(BITS_UPLOAD_ENABLED=False).test_client()
    response = bits_post(disabled, PATH, packet_type, **headers)
    assert_ack(response, 501, E_ACCESSDENIED)
    for name in ("BITS-Protocol", "BITS-Received-Content-Range"):
        assert name not in response.headers
    assert not (upload_folder / "file.bin").exists()


# -- answers made outside the core ---------------------------------------------------------


def test_plain_post_on_the_prefix_is_not_bits(client: FlaskClient) -> None:
    # Other methods are outside the protocol: a 405 that is not an Ack is fine.
    response = client.post("/bits/file.bin")
    assert response.status_code == 405
    assert "BITS_POST" in response.headers["Allow"]


def test_before_request_401_is_an_ack_with_the_challenge(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app()

    @app.before_request
    def require_login() -> Response | None:
        return Response("<h1>log in</h1>", 401, {"WWW-Authenticate": 'Basic realm="x"'},
                        content_type="text/html")

    response = bits_post(app.test_client(), PATH, "Ping")
    assert response.status_code == 401
    check_ack_rules(response)
    assert response.headers["WWW-Authenticate"] == 'Basic realm="x"'


def test_before_request_abort_401_is_an_ack_with_the_challenge(
    make_app: t.Callable[..., Flask],
) -> None:
    app = make_app()

    @app.before_request
    def require_login() -> None:
        abort(Response("login", 401, {"WWW-Authenticate": 'Basic realm="y"'}))

    for packet_type in PACKET_TYPES:
        response = bits_post(app.test_client(), PATH, packet_type, protocols=PROTOCOL)
        assert response.status_code == 401
        check_ack_rules(response)
        assert response.headers["WWW-Authenticate"] == 'Basic realm="y"'


def test_before_request_abort_403_is_an_ack(make_app: t.Callable[..., Flask]) -> None:
    app = make_app()

    @app.before_request
    def forbid() -> None:
        abort(403)

    response = bits_post(app.test_client(), PATH, "Create-Session", protocols=PROTOCOL)
    assert_ack(response, 403, E_ACCESSDENIED)
    assert "BITS-Session-Id" not in response.headers


def test_before_request_exception_is_a_500_ack(make_app: t.Callable[..., Flask]) -> None:
    app = make_app(TESTING=False, PROPAGATE_EXCEPTIONS=False)

    @app.before_request
    def explode() -> None:
        raise RuntimeError("boom")

    response = bits_post(app.test_client(), PATH, "Ping")
    assert response.status_code == 500
    check_ack_rules(response)
    assert b"boom" not in response.get_data()


def test_exception_in_the_authorize_hook_is_a_500_ack(make_app: t.Callable[..., Flask]) -> None:
    from flask_bits import BITS

    app = make_app(init=False)

    def authorize(request: t.Any, path: str, packet: t.Any) -> bool:
        raise RuntimeError("hook failed")

    BITS(app, authorize=authorize)
    response = bits_post(app.test_client(), PATH, "Ping")
    assert_ack(response, 500, E_FAIL)


def test_authorize_hook_challenge_is_an_ack(make_app: t.Callable[..., Flask]) -> None:
    from flask_bits import BITS

    app = make_app(init=False)

    def authorize(request: t.Any, path: str, packet: t.Any) -> Response | bool:
        if request.authorization is None:
            return Response(b"please", 401, {"WWW-Authenticate": 'Basic realm="bits"'})
        return True

    BITS(app, authorize=authorize)
    client = app.test_client()
    response = bits_post(client, PATH, "Ping")
    assert response.status_code == 401
    check_ack_rules(response)
    assert response.headers["WWW-Authenticate"] == 'Basic realm="bits"'
    authorized = bits_post(client, PATH, "Ping", headers={"Authorization": "Basic YTpi"})
    assert_ack(authorized, 200)


# -- order of the common checks (PROTOCOL.md 6: auth, enabled, packet type, rules, length) ---


def test_authentication_comes_before_the_message_rules(make_app: t.Callable[..., Flask]) -> None:
    from flask_bits import BITS

    app = make_app(init=False)
    BITS(app, authorize=lambda request, path, packet: Response(
        b"", 401, {"WWW-Authenticate": 'Basic realm="bits"'}))
    response = bits_post(app.test_client(), PATH, "Ping", content_name="n" * 4097)
    assert response.status_code == 401  # step 1 before step 4
    check_ack_rules(response)
    assert response.headers["WWW-Authenticate"] == 'Basic realm="bits"'


def test_disabled_uploads_come_before_the_message_rules(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_UPLOAD_ENABLED=False).test_client()
    response = bits_post(client, PATH, "Ping", content_name="n" * 4097)
    assert_ack(response, 501, E_ACCESSDENIED)  # step 2 before step 4


def test_disabled_uploads_come_before_the_packet_type(make_app: t.Callable[..., Flask]) -> None:
    client = make_app(BITS_UPLOAD_ENABLED=False).test_client()
    assert_ack(bits_post(client, PATH, None), 501, E_ACCESSDENIED)  # step 2 before step 3

