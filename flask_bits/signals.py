"""Blinker signals sent by the Flask extension; the sender is always the app.

Connect with ``upload_completed.connect(receiver, app)``. Every signal also carries
``directory``, the name of the upload directory that sent it.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A session was created. Keyword arguments: ``session_id``, ``remote_path``, ``owner``.
session_created = _signals.signal("session-created")
#: A fragment was stored. Keyword arguments: ``session_id``, ``received``, ``total``,
#: ``written`` (new bytes stored by this fragment).
fragment_received = _signals.signal("fragment-received")
#: A file is complete and in place (or handed to the reply handler). Keyword arguments:
#: ``session_id``, ``remote_path``, ``size``, ``owner``.
upload_completed = _signals.signal("upload-completed")
#: The server application answered. Keyword arguments: ``session_id``, ``status``,
#: ``duration`` (seconds since the forward started).
reply_forwarded = _signals.signal("reply-forwarded")
#: Close-Session was processed. Keyword arguments: ``session_id``, ``completed``.
session_closed = _signals.signal("session-closed")
#: Cancel-Session was processed. Keyword arguments: ``session_id``.
session_cancelled = _signals.signal("session-cancelled")
#: Cleanup removed an idle session. Keyword arguments: ``session_id``.
session_expired = _signals.signal("session-expired")

#: Every BITS_POST answered. Keyword arguments: ``packet_type``, ``status``, ``bytes``,
#: ``duration`` (seconds).
packet_handled = _signals.signal("packet-handled")
#: A session lock was taken. Keyword arguments: ``seconds`` waited.
lock_waited = _signals.signal("lock-waited")

#: Event name used by the core -> signal.
BY_EVENT = {
    "session-created": session_created,
    "fragment-received": fragment_received,
    "upload-completed": upload_completed,
    "reply-forwarded": reply_forwarded,
    "session-closed": session_closed,
    "session-cancelled": session_cancelled,
    "session-expired": session_expired,
    "packet-handled": packet_handled,
    "lock-waited": lock_waited,
}
