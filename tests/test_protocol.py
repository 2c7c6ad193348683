"""Pure protocol functions: parsing request headers, building Acks (no I/O, no Flask)."""

from __future__ import annotations

import re
import typing as t

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from werkzeug.datastructures import EnvironHeaders

from flask_bits import errors
from flask_bits.constants import UPLOAD_PROTOCOL_GUID
from flask_bits.constants import ErrorContext
from flask_bits.constants import HResult
from flask_bits.constants import PacketType
from flask_bits.constants import format_context
from flask_bits.constants import format_hresult
from flask_bits.errors import InvalidRequest
from flask_bits.protocol import MAX_HEADER_VALUE
from flask_bits.protocol import MAX_PROTOCOLS
from flask_bits.protocol import Ack
from flask_bits.protocol import ContentRange
from flask_bits.protocol import canonical_session_id
from flask_bits.protocol import check_environ_header_sizes
from flask_bits.protocol import check_header_sizes
from flask_bits.protocol import negotiate_protocol
from flask_bits.protocol import new_session_id
from flask_bits.protocol import parse_content_length
from flask_bits.protocol import parse_content_range

OTHER_GUID = "{11111111-2222-3333-4444-555555555555}"
SESSION_RE = re.compile(r"\{[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}\}")

# -- Content-Range (PROTOCOL.md 7.3 steps 1-2, A11) ------------------------------------


@pytest.mark.parametrize(
    ("value", "length", "expected"),
    [
        ("bytes 0-99/1000", 100, ContentRange(0, 99, 1000)),
        ("bytes 100-199/1000", 100, ContentRange(100, 199, 1000)),
        ("bytes 0-4891/4892", 4892, ContentRange(0, 4891, 4892)),
        ("bytes 999-999/1000", 1, ContentRange(999, 999, 1000)),
        ("Bytes 0-0/1", 1, ContentRange(0, 0, 1)),  # docs spell the unit "Bytes"
        ("BYTES 0-0/1", 1, ContentRange(0, 0, 1)),
        ("bytes\t5-9/10", 5, ContentRange(5, 9, 10)),
        ("  bytes 5-9/10  ", 5, ContentRange(5, 9, 10)),
        ("bytes 0009-0009/0010", 1, ContentRange(9, 9, 10)),
    ],
)
def test_parse_content_range_accepts_valid_ranges(
    value: str, length: int, expected: ContentRange
) -> None:
    rng = parse_content_range(value, length)
    assert rng == expected
    assert rng.length == length


@pytest.mark.parametrize("value", ["bytes 0--1/0", "bytes 0-0/0", "bytes */0", "BYTES */0"])
def test_parse_content_range_empty_file_forms(value: str) -> None:
    rng = parse_content_range(value, 0)
    assert rng == ContentRange(0, -1, 0)
    assert rng.length == 0


@pytest.mark.parametrize("value", ["bytes 0--1/0", "bytes 0-0/0", "bytes */0"])
def test_parse_content_range_empty_file_forms_need_an_empty_body(value: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_content_range(value, 1)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bytes",
        "bytes 0-99",  # missing total
        "bytes 0-99/",  # missing total
        "bytes 0-99/*",  # unknown total
        "bytes */100",  # unsatisfied-range form for a non-empty file
        "bytes -99/100",  # suffix form
        "bytes 0-/100",
        "bytes +0-99/100",  # int() would accept "+0"
        "bytes 0-+99/100",
        "bytes 0-99/+100",
        "bytes -0-99/100",
        "bytes 0_0-99/100",  # int() would accept "0_0"
        "bytes 0-9_9/100",
        "bytes \u0660-\u0669\u0669/\u0661\u0660\u0660",  # Arabic-Indic digits
        "bytes \uff10-\uff19\uff19/\uff11\uff10\uff10",  # full-width digits
        "bytes 0 -99/100",  # spaces inside the range
        "bytes 0- 99/100",
        "bytes 0-99 /100",
        "bytes 0-99/ 100",
        "bytes0-99/100",  # no separator after the unit
        "bytes=0-99/100",  # the Range header syntax
        "0-99/100",  # no unit
        "items 0-99/100",  # another unit
        "bytes 0x0-0x63/100",
        "bytes 0-99/100, bytes 100-199/200",  # two ranges
        "bytes 0-99/100\x00",
        "bytes 0-99/100 trailing",
        "bytes 0.0-99/100",
    ],
)
def test_parse_content_range_rejects_malformed_values(value: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_content_range(value, 100)


def test_parse_content_range_missing_header() -> None:
    with pytest.raises(InvalidRequest):
        parse_content_range(None, 0)


@pytest.mark.parametrize(
    "value",
    [
        "bytes 10-5/20",  # inverted
        "bytes 0-100/100",  # last == total
        "bytes 0-200/100",  # last > total
        "bytes 100-100/100",
        "bytes 0-9999999999999999999/9999999999999999999",  # total above 2**63 - 1
        "bytes 0-1/99999999999999999999",  # 20 digits
    ],
)
def test_parse_content_range_rejects_impossible_ranges(value: str) -> None:
    first_last = value.split()[1].split("/")[0].split("-")
    length = max(1, int(first_last[1]) - int(first_last[0]) + 1)
    with pytest.raises(InvalidRequest):
        parse_content_range(value, length)


@pytest.mark.parametrize("length", [0, 99, 101, 1000])
def test_parse_content_range_rejects_length_mismatch(length: int) -> None:
    with pytest.raises(InvalidRequest):
        parse_content_range("bytes 0-99/1000", length)


def test_parse_content_range_largest_total() -> None:
    total = 2**63 - 1
    rng = parse_content_range(f"bytes {total - 1}-{total - 1}/{total}", 1)
    assert rng == ContentRange(total - 1, total - 1, total)


# -- Content-Length (T6) ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("17", 17), (" 5 ", 5), (None, None)])
def test_parse_content_length(value: str | None, expected: int | None) -> None:
    assert parse_content_length(value) == expected


@pytest.mark.parametrize("value", ["", "+5", "-1", "5.0", "1_0", "0x10", "\u0665", "5 5", "five"])
def test_parse_content_length_rejects_non_decimal(value: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_content_length(value)


# -- session ids (7.2 step 5, A32) -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "{a0ff5911-4144-45b3-bf27-27afc8ec8a67}",
        "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}",
        "{A0ff5911-4144-45B3-bf27-27AFC8ec8a67}",
        "a0ff5911-4144-45b3-bf27-27afc8ec8a67",
        " {a0ff5911-4144-45b3-bf27-27afc8ec8a67}\t",
    ],
)
def test_canonical_session_id_is_braced_upper_case(value: str) -> None:
    assert canonical_session_id(value) == "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "{}",
        "not-a-guid",
        "{a0ff5911-4144-45b3-bf27-27afc8ec8a67",  # unbalanced braces
        "a0ff5911-4144-45b3-bf27-27afc8ec8a67}",
        "{{a0ff5911-4144-45b3-bf27-27afc8ec8a67}}",
        "{a0ff5911-4144-45b3-bf27-27afc8ec8a6}",  # one digit short
        "{a0ff5911-4144-45b3-bf27-27afc8ec8a677}",  # one digit too many
        "{g0ff5911-4144-45b3-bf27-27afc8ec8a67}",  # not hex
        "{a0ff5911-4144-45b3-bf27-27afc8ec8a67}\n",
        "../{a0ff5911-4144-45b3-bf27-27afc8ec8a67}",
        "{a0ff5911-4144-45b3-bf27-27afc8ec8a67}/..",
        "{\uff10\uff10ff5911-4144-45b3-bf27-27afc8ec8a67}",  # full-width digits
    ],
)
def test_canonical_session_id_refuses_non_guids(value: str | None) -> None:
    assert canonical_session_id(value) is None


def test_new_session_ids_are_braced_upper_case_v4_guids() -> None:
    ids = {new_session_id() for _ in range(200)}
    assert len(ids) == 200
    for sid in ids:
        assert SESSION_RE.fullmatch(sid), sid
        assert canonical_session_id(sid) == sid


# -- protocol negotiation (7.2 step 2, A7, A13) -------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "{7df0354d-249b-430f-820d-3d2a9bef4931}",
        "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
        "  {7df0354d-249b-430f-820d-3d2a9bef4931}  ",
        f"{OTHER_GUID} {{7df0354d-249b-430f-820d-3d2a9bef4931}}",
        f"{OTHER_GUID},{{7df0354d-249b-430f-820d-3d2a9bef4931}}",
        f"{OTHER_GUID}, {{7DF0354D-249B-430F-820D-3D2A9BEF4931}}",
        f"{OTHER_GUID} ,\t{{7df0354d-249b-430f-820d-3d2a9bef4931}} {OTHER_GUID}",
        "{7df0354d-249b-430f-820d-3d2a9bef4931}," + OTHER_GUID,
    ],
)
def test_negotiate_protocol_finds_the_upload_protocol(value: str) -> None:
    assert negotiate_protocol(value) == UPLOAD_PROTOCOL_GUID
    assert UPLOAD_PROTOCOL_GUID == "{7df0354d-249b-430f-820d-3d2a9bef4931}"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        OTHER_GUID,
        f"{OTHER_GUID} {OTHER_GUID}",
        "{7df0354d-249b-430f-820d-3d2a9bef4930}",  # last digit differs
        "{7df0354d-249b-430f-820d-3d2a9bef4931",  # unbalanced brace
        "{7df0354d249b430f820d3d2a9bef4931}",  # no dashes
        "BITS 1.5 Upload Protocol",
    ],
)
def test_negotiate_protocol_refuses_unknown_protocols(value: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        negotiate_protocol(value)
    assert info.value.status == 400
    assert info.value.hresult == HResult.E_INVALIDARG


def test_negotiate_protocol_caps_the_list() -> None:
    ok = " ".join([OTHER_GUID] * (MAX_PROTOCOLS - 1) + [UPLOAD_PROTOCOL_GUID])
    assert negotiate_protocol(ok) == UPLOAD_PROTOCOL_GUID
    too_many = " ".join([OTHER_GUID] * MAX_PROTOCOLS + [UPLOAD_PROTOCOL_GUID])
    with pytest.raises(InvalidRequest):
        negotiate_protocol(too_many)


# -- header sizes (T5) -----------------------------------------------------------------


def test_check_header_sizes_accepts_4_kb() -> None:
    check_header_sizes([("Content-Name", "x" * MAX_HEADER_VALUE), ("Host", "localhost")])
    assert MAX_HEADER_VALUE == 4096


@pytest.mark.parametrize(
    "value",
    ["x" * (MAX_HEADER_VALUE + 1), "a\x00b", "a\x01b", "a\nb", "a\rb", "a\x1fb", "a\x7fb"],
)
def test_check_header_sizes_refuses_long_or_control_values(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_header_sizes([("Host", "localhost"), ("X-Test", value)])
    assert info.value.status == 400
    assert info.value.hresult == HResult.E_INVALIDARG


def test_check_header_sizes_allows_tabs() -> None:
    check_header_sizes([("X-Test", "a\tb")])


@pytest.mark.parametrize("name", ["Authorization", "proxy-authorization", "Cookie"])
def test_credentials_may_exceed_4_kb_but_not_64_kb(name: str) -> None:
    # Kerberos/Negotiate tokens of large domains exceed 4 KB; T5 is about BITS headers.
    check_header_sizes([(name, "Negotiate " + "x" * 12000)])
    with pytest.raises(InvalidRequest):
        check_header_sizes([(name, "x" * (64 * 1024 + 1))])


@given(
    st.dictionaries(
        st.sampled_from(["HTTP_AUTHORIZATION", "HTTP_COOKIE", "HTTP_X_TEST", "HTTP_HOST",
                         "CONTENT_LENGTH", "CONTENT_TYPE", "PATH_INFO", "SERVER_NAME"]),
        st.one_of(
            st.text(alphabet="ab\t\x00\n\x7f", max_size=8),
            st.integers(4090, 4100).map(lambda n: "x" * n),
            st.integers(65530, 65540).map(lambda n: "x" * n),
        ),
    )
)
@settings(max_examples=300, derandomize=True, deadline=None)
def test_environ_header_check_agrees_with_the_header_list_check(environ: dict[str, str]) -> None:
    """The per-packet check reads the environ directly; it must refuse exactly what the
    check over werkzeug's header view refuses, with the same message."""
    headers = EnvironHeaders({**environ, "wsgi.input": None})

    def outcome(check: t.Callable[[], None]) -> str | None:
        try:
            check()
        except InvalidRequest as exc:
            return exc.message
        return None

    # Each offending header's own message (the two may meet them in another order).
    refusals = {
        outcome(lambda item=item: check_header_sizes([item])) for item in headers.items()
    } - {None}
    got = outcome(lambda: check_environ_header_sizes(environ))
    assert (got is None) == (not refusals)
    assert got is None or got in refusals


# -- packet types (T10, A6) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Ping", PacketType.PING),
        ("PING", PacketType.PING),
        ("ping", PacketType.PING),
        (" Ping ", PacketType.PING),
        ("Create-Session", PacketType.CREATE_SESSION),
        ("CREATE-SESSION", PacketType.CREATE_SESSION),
        ("Fragment", PacketType.FRAGMENT),
        ("FRAGMENT", PacketType.FRAGMENT),
        ("Close-Session", PacketType.CLOSE_SESSION),
        ("CLOSE-SESSION", PacketType.CLOSE_SESSION),
        ("Cancel-Session", PacketType.CANCEL_SESSION),
        ("cancel-session", PacketType.CANCEL_SESSION),
    ],
)
def test_packet_type_parse_is_case_insensitive(value: str, expected: PacketType) -> None:
    assert PacketType.parse(value) is expected


@pytest.mark.parametrize(
    "value", [None, "", "Ack", "ACK", "Create_Session", "CreateSession", "Get"]
)
def test_packet_type_parse_unknown(value: str | None) -> None:
    assert PacketType.parse(value) is None


# -- HRESULT formatting (4.1) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0x8020001F, "0x8020001F"),
        (0x80070057, "0x80070057"),
        (0x80200020, "0x80200020"),
        (0x80070005, "0x80070005"),
        (0, "0x00000000"),
        (-2147024809, "0x80070057"),  # a signed HRESULT
        (0x800700AA, "0x800700AA"),
    ],
)
def test_format_hresult(value: int, text: str) -> None:
    assert format_hresult(value) == text
    assert re.fullmatch(r"0x[0-9A-F]{8}", text)


def test_format_context() -> None:
    assert format_context(ErrorContext.SERVER) == "0x5"
    assert format_context(ErrorContext.REMOTE_APPLICATION) == "0x7"


# -- errors and Acks (4.1, 4.3, T7) ------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status", "hresult", "headers"),
    [
        (errors.InvalidRequest, 400, 0x80070057, True),
        (errors.SessionNotFound, 500, 0x8020001F, True),
        (errors.AccessDenied, 403, 0x80070005, True),
        (errors.DestinationExists, 409, 0x80070005, True),
        (errors.UploadsDisabled, 501, 0x80070005, True),
        (errors.UploadTooLarge, 500, 0x80200020, True),
        (errors.FragmentTooLarge, 413, None, False),
        (errors.DiskFull, 500, 0x80070070, True),
        (errors.SessionBusy, 503, 0x800700AA, True),
        (errors.InternalError, 500, 0x80004005, True),
    ],
)
def test_error_classes_follow_the_status_matrix(
    cls: type[errors.BITSError], status: int, hresult: int | None, headers: bool
) -> None:
    error = cls()
    assert error.status == status
    if hresult is not None:
        assert error.hresult == hresult
    assert error.context == ErrorContext.SERVER
    assert error.error_headers is headers
    assert error.message


def _header_dict(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_success_ack_headers() -> None:
    ack = Ack(200, session_id="{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}")
    ack.headers.append(("BITS-Received-Content-Range", "100"))
    pairs = ack.to_headers()
    headers = _header_dict(pairs)
    assert pairs[0] == ("BITS-Packet-Type", "Ack")
    assert headers["content-length"] == ["0"]
    assert headers["bits-session-id"] == ["{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"]
    assert headers["bits-received-content-range"] == ["100"]
    for name in ("bits-error-code", "bits-error", "bits-error-context", "content-type"):
        assert name not in headers


def test_error_ack_headers() -> None:
    pairs = Ack.for_error(errors.SessionNotFound(), "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}")
    headers = _header_dict(pairs.to_headers())
    assert pairs.status == 500
    assert headers["bits-packet-type"] == ["Ack"]
    assert headers["bits-error-code"] == ["0x8020001F"]
    assert headers["bits-error"] == ["0x8020001F"]
    assert headers["bits-error-context"] == ["0x5"]
    assert headers["content-length"] == ["0"]


def test_error_ack_without_bits_error_header() -> None:
    headers = _header_dict(Ack.for_error(errors.InvalidRequest()).to_headers(send_bits_error=False))
    assert headers["bits-error-code"] == ["0x80070057"]
    assert "bits-error" not in headers
    assert headers["bits-error-context"] == ["0x5"]


def test_application_error_context_is_0x7() -> None:
    headers = _header_dict(
        Ack.for_error(errors.ApplicationError(status=500, hresult=0x801901F4)).to_headers()
    )
    assert headers["bits-error-code"] == ["0x801901F4"]
    assert headers["bits-error-context"] == ["0x7"]


def test_range_mismatch_ack_has_no_error_headers_but_the_offset() -> None:
    ack = Ack.for_error(errors.RangeMismatch(100), "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}")
    headers = _header_dict(ack.to_headers())
    assert ack.status == 416
    assert headers["bits-received-content-range"] == ["100"]
    for name in ("bits-error-code", "bits-error", "bits-error-context"):
        assert name not in headers


def test_fragment_too_large_ack_has_no_error_headers() -> None:
    ack = Ack.for_error(errors.FragmentTooLarge())
    headers = _header_dict(ack.to_headers())
    assert ack.status == 413
    for name in ("bits-error-code", "bits-error", "bits-error-context"):
        assert name not in headers


def test_error_message_header_is_printable_ascii() -> None:
    ack = Ack.for_error(errors.InvalidRequest("caf\u00e9\r\nX-Injected: 1"))
    pairs = ack.to_headers()
    for name, value in pairs:
        assert re.fullmatch(r"[\x20-\x7e]*", value), (name, value)
        assert re.fullmatch(r"[A-Za-z0-9-]+", name), name
