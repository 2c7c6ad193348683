"""Pure BITS protocol functions: parsing request headers and building Acks.

Rule for this module: it does no I/O and imports neither Flask nor werkzeug; headers come
in as any object with ``.get(name)`` and go out as a list of ``(name, value)`` pairs.
Each function cites the PROTOCOL.md rule it implements.
"""

from __future__ import annotations

import re
import typing as t
import uuid
from dataclasses import dataclass
from dataclasses import field

from .constants import ACK
from .constants import UPLOAD_PROTOCOL_GUID
from .constants import Header
from .constants import format_context
from .constants import format_hresult
from .errors import BITSError
from .errors import InvalidRequest

#: Largest header value a Windows server accepts (PROTOCOL.md T5).
MAX_HEADER_VALUE = 4096
#: Largest number of GUIDs accepted in BITS-Supported-Protocols (A7).
MAX_PROTOCOLS = 100
#: Largest file size the protocol layer represents (fits a signed 64-bit offset).
MAX_TOTAL = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ContentRange:
    """An inclusive byte range ``first..last`` of a file of ``total`` bytes.

    The empty file is ``ContentRange(0, -1, 0)`` (PROTOCOL.md A11).
    """

    first: int
    last: int
    total: int

    @property
    def length(self) -> int:
        """Number of bytes in the range."""
        return self.last - self.first + 1


# RFC 2616 14.16: "bytes" SP first-byte-pos "-" last-byte-pos "/" instance-length.
_DIGITS = r"[0-9]{1,19}"
_RANGE_RE = re.compile(rf"bytes[ \t]+({_DIGITS})-({_DIGITS})/({_DIGITS})", re.ASCII | re.I)
# The empty-file spellings of A11: "bytes 0--1/0" and "bytes */0" ("bytes 0-0/0" above).
_EMPTY_RE = re.compile(r"bytes[ \t]+(?:0--1|\*)/0+", re.ASCII | re.I)


def parse_content_range(value: str | None, content_length: int) -> ContentRange:
    """Parse a Fragment's ``Content-Range`` and check it against ``Content-Length``.

    Implements PROTOCOL.md 7.3 steps 1 and 2 and A11: ``a <= b < T`` with plain ASCII
    digits; the body must hold exactly ``b - a + 1`` bytes; a zero-length body with a
    total of 0 is the empty file.

    :raises InvalidRequest: the header is missing, malformed or disagrees with the length.
    """
    if value is None:
        raise InvalidRequest("A Fragment needs a Content-Range header.")
    text = value.strip(" \t")
    if content_length == 0 and _EMPTY_RE.fullmatch(text):
        return ContentRange(0, -1, 0)
    match = _RANGE_RE.fullmatch(text)
    if match is None:
        raise InvalidRequest("Content-Range must read 'bytes first-last/total'.")
    first, last, total = (int(g) for g in match.groups())
    if total == 0 and first == 0 and last == 0 and content_length == 0:
        return ContentRange(0, -1, 0)
    if total > MAX_TOTAL or not first <= last < total:
        raise InvalidRequest("Content-Range must satisfy first <= last < total.")
    if last - first + 1 != content_length:
        raise InvalidRequest("Content-Length does not match the length of Content-Range.")
    return ContentRange(first, last, total)


_GUID_RE = re.compile(
    r"\{?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\}?", re.ASCII | re.I
)


def canonical_session_id(value: str | None) -> str | None:
    """Return the canonical ``{GUID}`` form of a session id, or ``None`` if it is not one.

    Session ids are compared case-insensitively (PROTOCOL.md 7.2 step 5, A32). This
    server only issues GUIDs, so anything else names no session; the result is safe to
    use as a file name.
    """
    if value is None:
        return None
    match = _GUID_RE.fullmatch(value.strip(" \t"))
    if match is None or match.group(0).count("{") != match.group(0).count("}"):
        return None
    return "{" + match.group(1).upper() + "}"


def new_session_id() -> str:
    """A fresh session id: a version-4 GUID from the OS CSPRNG, in braces (7.2 step 5)."""
    return "{" + str(uuid.uuid4()).upper() + "}"


def negotiate_protocol(value: str | None) -> str:
    """Pick the protocol from ``BITS-Supported-Protocols`` (PROTOCOL.md 7.2 step 2, A7).

    :raises InvalidRequest: the header is missing or names no protocol we speak (A13).
    """
    if not value:
        raise InvalidRequest("Create-Session needs BITS-Supported-Protocols.")
    offered = [p for p in re.split(r"[\s,]+", value.strip()) if p]
    if len(offered) > MAX_PROTOCOLS:
        raise InvalidRequest("BITS-Supported-Protocols lists too many protocols.")
    wanted = UPLOAD_PROTOCOL_GUID.strip("{}").lower()
    for guid in offered:
        if guid.lower().strip("{}") == wanted and guid.count("{") == guid.count("}"):
            return UPLOAD_PROTOCOL_GUID
    raise InvalidRequest("None of the offered protocols is supported by this server.")


_DIGITS_RE = re.compile(r"[0-9]{1,19}", re.ASCII)


def parse_content_length(value: str | None) -> int | None:
    """Parse ``Content-Length``: plain ASCII digits, or ``None`` when absent.

    :raises InvalidRequest: the value is not a non-negative decimal integer.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    if not _DIGITS_RE.fullmatch(text):
        raise InvalidRequest("Content-Length must be a decimal number.")
    return int(text)


#: Credentials may be longer than 4 KB (Kerberos tokens of large domains); T5 is about
#: the protocol's own headers, so these get a larger bound.
_LONG_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
MAX_CREDENTIAL_VALUE = 64 * 1024


def check_header_sizes(items: t.Iterable[tuple[str, str]]) -> None:
    """Refuse any header value longer than 4 KB, and control characters (T5).

    Credentials (``Authorization``, ``Proxy-Authorization``, ``Cookie``) may be up to
    64 KB.

    :raises InvalidRequest: a value is too long or contains a control character.
    """
    for name, value in items:
        limit = MAX_CREDENTIAL_VALUE if name.lower() in _LONG_HEADERS else MAX_HEADER_VALUE
        if len(value) > limit:
            raise InvalidRequest(f"The {_safe_name(name)} header is longer than 4 KB.")
        if _CONTROL_RE.search(value):
            raise InvalidRequest(
                f"The {_safe_name(name)} header contains control characters."
            )


_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_environ_header_sizes(environ: t.Mapping[str, t.Any]) -> None:
    """:func:`check_header_sizes` for the request headers of a WSGI ``environ``, read
    straight from it (the per-packet path; werkzeug's header view costs more).

    :raises InvalidRequest: a value is too long or contains a control character.
    """
    values = [
        v for k, v in environ.items()
        if (k[:5] == "HTTP_" or k in _CONTENT_KEYS) and isinstance(v, str)
    ]
    # One scan of all values for the common case (tabs are allowed, so they join them);
    # only a suspect request is checked header by header, for an exact message.
    if _CONTROL_RE.search("\t".join(values)) or max(map(len, values), default=0) > MAX_HEADER_VALUE:
        for key, value in environ.items():
            if (key[:5] == "HTTP_" or key in _CONTENT_KEYS) and isinstance(value, str):
                name = key[5:] if key[:5] == "HTTP_" else key
                check_header_sizes([(name.replace("_", "-").title(), value)])


_CONTENT_KEYS = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "?", name[:64])


@dataclass(slots=True)
class Ack:
    """An ``Ack`` packet: status plus headers, never a body (PROTOCOL.md 7.0, T7)."""

    status: int = 200
    session_id: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    error: BITSError | None = None

    @classmethod
    def for_error(cls, error: BITSError, session_id: str | None = None) -> Ack:
        """The Ack that reports ``error`` (PROTOCOL.md 4.1)."""
        ack = cls(status=error.status, session_id=session_id, error=error)
        if error.received is not None:
            ack.headers.append((Header.RECEIVED_CONTENT_RANGE, str(error.received)))
        return ack

    def to_headers(self, *, send_bits_error: bool = True) -> list[tuple[str, str]]:
        """All response headers of this Ack, ``Content-Length: 0`` included."""
        out = [(Header.PACKET_TYPE, ACK)]
        if self.session_id is not None:
            out.append((Header.SESSION_ID, self.session_id))
        out.extend(self.headers)
        error = self.error
        if error is not None and error.error_headers:
            code = format_hresult(error.hresult)
            out.append((Header.ERROR_CODE, code))
            if send_bits_error:
                out.append((Header.ERROR, code))
            out.append((Header.ERROR_CONTEXT, format_context(error.context)))
        if error is not None:
            out.append((Header.ERROR_MESSAGE, _ascii(error.message)))
        out.append(("Pragma", "no-cache"))
        out.append(("Content-Length", "0"))
        return out


def _ascii(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:512]
