"""Errors that become error Acks.

Each :class:`BITSError` carries everything the Ack needs: the HTTP status, the HRESULT
(``BITS-Error-Code``), the error context and a short human-readable message. The
status/HRESULT pairs follow PROTOCOL.md 4.3. Pure: no I/O, no Flask.
"""

from __future__ import annotations

from .constants import ErrorContext
from .constants import HResult


class BITSError(Exception):
    """An error reported to the client as an Ack.

    :param message: what went wrong, for the ``BITS-Error-Message`` header and the log.
        Never put another user's data or a server path in it.
    :param status: override the class's HTTP status.
    :param hresult: override the class's HRESULT.
    :param context: override the class's error context.
    """

    status: int = 500
    hresult: int = HResult.E_FAIL
    context: int = ErrorContext.SERVER
    #: 413 and 416 are signals, not errors: no error headers (PROTOCOL.md A3, A9, A14).
    error_headers: bool = True
    #: A client mistake (logged at INFO) rather than a server fault (logged at ERROR).
    client_fault: bool = True
    default_message = "The request failed."
    #: Next expected offset, sent as ``BITS-Received-Content-Range`` when known.
    received: int | None = None

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        hresult: int | None = None,
        context: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        if status is not None:
            self.status = status
        if hresult is not None:
            self.hresult = hresult
        if context is not None:
            self.context = context
        super().__init__(self.message)


class InvalidRequest(BITSError):
    """The request breaks the message rules: 400 ``E_INVALIDARG``."""

    status = 400
    hresult = HResult.E_INVALIDARG
    default_message = "The request does not satisfy the BITS message rules."


class SessionNotFound(BITSError):
    """Unknown (or someone else's) session: 500 ``BG_E_SESSION_NOT_FOUND``."""

    status = 500
    hresult = HResult.BG_E_SESSION_NOT_FOUND
    default_message = "The session does not exist on this server."


class AccessDenied(BITSError):
    """Not allowed to upload to this destination: 403 ``E_ACCESSDENIED``."""

    status = 403
    hresult = HResult.E_ACCESSDENIED
    default_message = "Uploading to this URL is not allowed."


class DestinationExists(BITSError):
    """The destination exists and overwrites are off: 409 (or 403) ``E_ACCESSDENIED``."""

    status = 409
    hresult = HResult.E_ACCESSDENIED
    default_message = "A file already exists at this URL and overwrites are not allowed."


class DestinationFolderMissing(BITSError):
    """The destination's folder does not exist (PROTOCOL.md 15): 404."""

    status = 404
    hresult = HResult.ERROR_PATH_NOT_FOUND
    default_message = "The folder of this URL does not exist on the server."


class UploadsDisabled(BITSError):
    """BITS uploads are not enabled under this prefix: 501 ``E_ACCESSDENIED`` (A16)."""

    status = 501
    hresult = HResult.E_ACCESSDENIED
    default_message = "BITS uploads are not enabled for this URL."


class UploadTooLarge(BITSError):
    """The file exceeds the maximum upload size: 500 ``BG_E_TOO_LARGE`` (A14)."""

    status = 500
    hresult = HResult.BG_E_TOO_LARGE
    default_message = "The file is larger than the maximum upload size."


class FragmentTooLarge(BITSError):
    """The fragment is larger than one request may be: 413, no error headers (A14)."""

    status = 413
    error_headers = False
    default_message = "The fragment is too large; send smaller fragments."


class RangeMismatch(BITSError):
    """The fragment starts beyond the next expected offset: 416 (A9, A10)."""

    status = 416
    hresult = 0
    error_headers = False
    default_message = "The fragment does not start at the next expected offset."

    def __init__(self, received: int, message: str | None = None) -> None:
        super().__init__(message)
        self.received = received


class DiskFull(BITSError):
    """No space left on the server: 500 ``0x80070070`` (A15); transient for the client."""

    status = 500
    hresult = HResult.ERROR_DISK_FULL
    client_fault = False
    default_message = "The server is out of disk space; retry later."


class StorageError(BITSError):
    """Another I/O error on the server: 500, transient for the client."""

    status = 500
    hresult = HResult.ERROR_IO_DEVICE
    client_fault = False
    default_message = "The server could not store the data; retry later."


class BodyTimeout(BITSError):
    """The request body stalled longer than ``BITS_READ_TIMEOUT``: 408, retryable (4.4)."""

    status = 408
    hresult = HResult.ERROR_TIMEOUT
    default_message = "The request body stalled; the bytes stored so far were kept. Resume."


class SessionBusy(BITSError):
    """The session lock could not be taken in time: 503, retryable."""

    status = 503
    hresult = HResult.ERROR_BUSY
    client_fault = False
    default_message = "The session is busy with another request; retry later."


class TooManySessions(BITSError):
    """A session limit was hit at Create-Session: 503, retryable once sessions end."""

    status = 503
    hresult = HResult.ERROR_TOO_MANY_SESSIONS
    default_message = "Too many open upload sessions; finish or cancel some first."


class ApplicationError(BITSError):
    """The server application failed or answered with an error (context 0x7, 8.8)."""

    context = ErrorContext.REMOTE_APPLICATION
    default_message = "The server application reported an error."


class InternalError(BITSError):
    """An unexpected failure inside the server: 500 ``E_FAIL``, no details."""

    status = 500
    hresult = HResult.E_FAIL
    client_fault = False
    default_message = "Internal server error."
