"""Names and numbers of the BITS Upload Protocol.

Pure data: no I/O, no Flask. Section numbers refer to ``PROTOCOL.md`` (the project's
restatement of [MC-BUP] and the Windows BITS documentation).
"""

from __future__ import annotations

import enum

#: The HTTP method of every BITS upload request (PROTOCOL.md T2).
BITS_POST = "BITS_POST"

#: "BITS 1.5 Upload Protocol", the only protocol GUID ever defined (PROTOCOL.md 1.4).
UPLOAD_PROTOCOL_GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"


class Header:
    """Header names used on the wire (PROTOCOL.md section 3)."""

    PACKET_TYPE = "BITS-Packet-Type"
    SESSION_ID = "BITS-Session-Id"
    SUPPORTED_PROTOCOLS = "BITS-Supported-Protocols"
    PROTOCOL = "BITS-Protocol"
    HOST_ID = "BITS-Host-Id"
    HOST_ID_FALLBACK_TIMEOUT = "BITS-Host-Id-Fallback-Timeout"
    RECEIVED_CONTENT_RANGE = "BITS-Received-Content-Range"
    REPLY_URL = "BITS-Reply-URL"
    ERROR_CODE = "BITS-Error-Code"
    ERROR = "BITS-Error"
    ERROR_CONTEXT = "BITS-Error-Context"
    #: Not part of the protocol: a human-readable reason on error Acks (T4: ignored
    #: by conforming clients).
    ERROR_MESSAGE = "BITS-Error-Message"
    # Server application (notification) headers, PROTOCOL.md 3.3.
    ORIGINAL_REQUEST_URL = "BITS-Original-Request-URL"
    REQUEST_DATAFILE_NAME = "BITS-Request-DataFile-Name"
    RESPONSE_DATAFILE_NAME = "BITS-Response-DataFile-Name"
    STATIC_RESPONSE_URL = "BITS-Static-Response-URL"
    COPY_FILE_TO_DESTINATION = "BITS-Copy-File-To-Destination"


class PacketType(str, enum.Enum):
    """Request packet types; parsed case-insensitively (PROTOCOL.md T10, A6)."""

    PING = "Ping"
    CREATE_SESSION = "Create-Session"
    FRAGMENT = "Fragment"
    CLOSE_SESSION = "Close-Session"
    CANCEL_SESSION = "Cancel-Session"

    @classmethod
    def parse(cls, value: str | None) -> PacketType | None:
        """Return the packet type named by ``value`` (any case), or ``None``."""
        if value is None:
            return None
        return _PACKET_TYPES.get(value.strip().lower())


_PACKET_TYPES = {p.value.lower(): p for p in PacketType}

#: The only packet type a server sends.
ACK = "Ack"


class ErrorContext(enum.IntEnum):
    """``BITS-Error-Context`` values (PROTOCOL.md 4.1)."""

    #: The server itself produced the error (BG_ERROR_CONTEXT_REMOTE_FILE).
    SERVER = 0x5
    #: The error came from the server application (BG_ERROR_CONTEXT_REMOTE_APPLICATION).
    REMOTE_APPLICATION = 0x7


class HResult(enum.IntEnum):
    """HRESULTs the server reports (PROTOCOL.md 4.2)."""

    #: Session id unknown; the client starts a new session.
    BG_E_SESSION_NOT_FOUND = 0x8020001F
    #: The upload exceeds the maximum upload size.
    BG_E_TOO_LARGE = 0x80200020
    #: The request violates the message rules.
    E_INVALIDARG = 0x80070057
    #: Not allowed to upload there, or the destination may not be overwritten.
    E_ACCESSDENIED = 0x80070005
    #: HRESULT_FROM_WIN32(ERROR_DISK_FULL), out of disk space (A15).
    ERROR_DISK_FULL = 0x80070070
    #: The spec's literal for a server application that did not answer in time (8.7).
    NOTIFICATION_TIMEOUT = 0x80070112
    #: HRESULT_FROM_WIN32(ERROR_PATH_NOT_FOUND): the destination's folder is missing.
    ERROR_PATH_NOT_FOUND = 0x80070003
    #: HRESULT_FROM_WIN32(ERROR_BUSY): the session is busy; retry later.
    ERROR_BUSY = 0x800700AA
    #: HRESULT_FROM_WIN32(ERROR_IO_DEVICE): an I/O error on the server.
    ERROR_IO_DEVICE = 0x8007045D
    #: HRESULT_FROM_WIN32(ERROR_TOO_MANY_SESSIONS): a session limit was hit.
    ERROR_TOO_MANY_SESSIONS = 0x80070045
    #: E_PENDING: the server application has not answered yet; retry later.
    E_PENDING = 0x8000000A
    #: HRESULT_FROM_WIN32(ERROR_CONNECTION_REFUSED): the server application is unreachable.
    ERROR_CONNECTION_REFUSED = 0x800704C9
    #: HRESULT_FROM_WIN32(ERROR_TIMEOUT): the request body stalled.
    ERROR_TIMEOUT = 0x800705B4
    #: E_FAIL: an unexpected server failure.
    E_FAIL = 0x80004005
    #: BG_E_HTTP_ERROR_nnn is this plus the status code (PROTOCOL.md 4.2).
    BG_E_HTTP_ERROR_BASE = 0x80190000


def format_hresult(value: int) -> str:
    """Format an HRESULT the way Acks carry it: ``0x`` and 8 upper-case hex digits."""
    return f"0x{value & 0xFFFFFFFF:08X}"


def format_context(context: int) -> str:
    """Format a ``BITS-Error-Context`` value (``0x5`` or ``0x7``)."""
    return f"0x{context:X}"
