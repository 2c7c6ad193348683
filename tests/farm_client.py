"""A small BITS upload client that behaves like the Windows client of PROTOCOL.md 9.

Used by ``tests/test_farm.py`` to drive a web farm the way a real client would:

* Create-Session at the destination URL (the *origin*). If the Ack names a
  ``BITS-Host-Id``, replace the host part of the URL with it -- and keep the port
  (9.4, A36) --, Ping that host, and send every later packet of the upload there.
* If the host-ID host cannot be reached, start the fallback timer (9.4: it starts when a
  connection fails and resets when one succeeds). Once it has run longer than
  ``BITS-Host-Id-Fallback-Timeout`` seconds, send later packets to the origin again.
* ``BG_E_SESSION_NOT_FOUND`` (``0x8020001F``) on any packet but Close/Cancel: start over
  with a new Create-Session from byte 0 (9.1 ERROR).
* 200 or 416 on a Fragment: continue at ``BITS-Received-Content-Range`` (9.1 FRAGMENT).
* Connection errors, a proxy's own error page (not an Ack) and 502/503/504: transient,
  the same packet is sent again after a short pause. Everything is bounded by a deadline.

Every request is recorded (:class:`Attempt`) so tests can check where packets went,
including nginx's ``X-Upstream`` header when the request went through the test proxy.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import time
import typing as t
import urllib.parse
from dataclasses import dataclass

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
BG_E_SESSION_NOT_FOUND = 0x8020001F
#: Statuses that mean "a proxy or the server is briefly unable": send the packet again.
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class UploadFailed(Exception):
    """The upload hit an error a BITS client would report to the job's owner."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request: where it went and what came back."""

    packet: str
    base: str
    session_id: str | None
    first: int | None
    status: int | None
    #: ``BITS-Error-Code`` of the answer, as an int.
    error_code: int | None
    #: nginx's ``X-Upstream`` (``$upstream_addr``) when the request went through it.
    upstream: str | None
    #: ``repr`` of the exception when the request failed below HTTP.
    exception: str | None
    time: float

    @property
    def answered_by(self) -> str | None:
        """The upstream that produced the answer (the last one nginx tried)."""
        if not self.upstream:
            return None
        return self.upstream.replace(" : ", ", ").split(", ")[-1].strip()


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    is_ack: bool

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def error_code(self) -> int | None:
        value = self.get("BITS-Error-Code") or self.get("BITS-Error")
        if not value:
            return None
        try:
            return int(value, 16)
        except ValueError:
            return None


@dataclass(slots=True)
class Fallback:
    """The client gave up on a host-ID host and went back to the origin."""

    host: str
    session_id: str | None
    #: Seconds between the first failed connection and the switch.
    unreachable_for: float


@dataclass(slots=True)
class UploadResult:
    path: str
    size: int
    sha256: str
    session_id: str
    sessions: list[str]
    #: The ``BITS-Host-Id`` of the session that finished the upload, if any.
    host_id: str | None
    #: Host IDs announced by every Create-Session, in order.
    host_ids: list[str | None]
    restarts: int
    attempts: list[Attempt]
    fallbacks: list[Fallback]
    elapsed: float

    def fragments(self, session_id: str | None = None) -> list[Attempt]:
        sid = session_id or self.session_id
        return [a for a in self.attempts if a.packet == "Fragment" and a.session_id == sid]

    def upstreams(self, session_id: str | None = None) -> set[str]:
        """The nodes that answered this session's Fragments (through nginx)."""
        return {a.answered_by for a in self.fragments(session_id)
                if a.status == 200 and a.answered_by}

    @property
    def failures(self) -> list[Attempt]:
        """Requests that failed below the protocol: no answer, or a proxy error page."""
        return [a for a in self.attempts if a.status is None or a.status in TRANSIENT_STATUSES]


class _Restart(Exception):
    """BG_E_SESSION_NOT_FOUND: start over with a new session."""


#: ``after_fragment(uploader, next_offset)``: called after each non-final Fragment Ack.
AfterFragment = t.Callable[["BITSUploader", int], None]
#: ``mid_fragment(uploader, first)``: called once half of a Fragment's body is sent.
MidFragment = t.Callable[["BITSUploader", int], None]


class BITSUploader:
    """Upload ``data`` to ``origin`` + ``path`` like a Windows BITS client; see module doc.

    :param origin: ``http://host:port`` of the destination URL (a proxy, in a farm).
    :param path: the URL path, e.g. ``/bits/a.bin``.
    :param data: the file's bytes (not empty).
    :param fragment_size: bytes per Fragment.
    :param timeout: socket timeout for each request.
    :param deadline: the whole upload must finish within this many seconds.
    :param retry_delay: pause before resending a packet after a transient failure.
    :param max_restarts: how many new sessions after ``BG_E_SESSION_NOT_FOUND``.
    :param after_fragment: see :data:`AfterFragment` (tests use it as a checkpoint).
    :param mid_fragment: see :data:`MidFragment` (tests use it to stall a request).
    """

    def __init__(
        self,
        origin: str,
        path: str,
        data: bytes,
        *,
        fragment_size: int = 256 * 1024,
        timeout: float = 30.0,
        deadline: float = 90.0,
        retry_delay: float = 0.05,
        max_restarts: int = 5,
        after_fragment: AfterFragment | None = None,
        mid_fragment: MidFragment | None = None,
    ) -> None:
        if not data:
            raise ValueError("BITSUploader needs a non-empty file")
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"origin must be http://host:port, got {origin!r}")
        self.origin = f"http://{parts.hostname}:{parts.port}"
        self.port = parts.port
        self.path = path
        self.data = data
        self.fragment_size = fragment_size
        self.timeout = timeout
        self.deadline_seconds = deadline
        self.retry_delay = retry_delay
        self.max_restarts = max_restarts
        self.after_fragment = after_fragment
        self.mid_fragment = mid_fragment

        self.attempts: list[Attempt] = []
        self.fallbacks: list[Fallback] = []
        self.sessions: list[str] = []
        self.host_ids: list[str | None] = []
        self.restarts = 0
        self._conns: dict[str, http.client.HTTPConnection] = {}
        # Per-session state (9.1 INIT).
        self.session_id: str | None = None
        self.host_id: str | None = None
        self.host_base: str | None = None
        self.fallback_timeout = math.inf
        self.base = self.origin
        self._failing_since: float | None = None
        self._deadline = 0.0

    # -- the state machine ------------------------------------------------------------

    def run(self) -> UploadResult:
        started = time.monotonic()
        self._deadline = started + self.deadline_seconds
        try:
            while True:
                self._init()
                self._create_session()
                try:
                    if self.host_base is not None:
                        self._ping()
                    self._send_fragments()
                except _Restart:
                    self.restarts += 1
                    if self.restarts > self.max_restarts:
                        raise UploadFailed(f"{self.path}: more than {self.max_restarts} "
                                           "restarts") from None
                    continue
                break
            self._close_session()
        finally:
            self.close()
        assert self.session_id is not None
        return UploadResult(
            path=self.path,
            size=len(self.data),
            sha256=hashlib.sha256(self.data).hexdigest(),
            session_id=self.session_id,
            sessions=list(self.sessions),
            host_id=self.host_id,
            host_ids=list(self.host_ids),
            restarts=self.restarts,
            attempts=list(self.attempts),
            fallbacks=list(self.fallbacks),
            elapsed=time.monotonic() - started,
        )

    # -- single packets (for tests that drive a session by hand) ---------------------------

    def create_session(self, *, deadline: float = 30.0) -> str:
        """Send just a Create-Session (retrying transient failures); return the id."""
        self._deadline = time.monotonic() + deadline
        self._init()
        self._create_session()
        assert self.session_id is not None
        return self.session_id

    def send_fragment(
        self, first: int, last: int, *, session_id: str | None = None, deadline: float = 30.0
    ) -> Reply:
        """Send bytes ``first..last`` once (transient failures are retried) and return the
        Ack, whatever it says. ``session_id`` overrides the current session."""
        self._deadline = time.monotonic() + deadline
        if session_id is not None:
            self.session_id = session_id
        return self._exchange(
            "Fragment", body=self.data[first : last + 1], first=first,
            headers={"Content-Range": f"bytes {first}-{last}/{len(self.data)}"},
        )

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _init(self) -> None:
        self.session_id = None
        self.host_id = None
        self.host_base = None
        self.fallback_timeout = math.inf
        self.base = self.origin
        self._failing_since = None

    def _create_session(self) -> None:
        reply = self._exchange("Create-Session",
                               headers={"BITS-Supported-Protocols": PROTOCOL})
        if reply.status != 200:
            raise UploadFailed(f"{self.path}: Create-Session answered {reply.status} "
                               f"{reply.get('BITS-Error-Code')}")
        sid = reply.get("BITS-Session-Id")
        if not sid:
            raise UploadFailed(f"{self.path}: Create-Session Ack without a session id")
        self.session_id = sid
        self.sessions.append(sid)
        host_id = reply.get("BITS-Host-Id")
        self.host_ids.append(host_id)
        if host_id:
            self.host_id = host_id
            # 9.4 / A36: only the host part is replaced; the port stays.
            host = f"[{host_id}]" if ":" in host_id else host_id
            self.host_base = f"http://{host}:{self.port}"
            self.base = self.host_base
            timeout = reply.get("BITS-Host-Id-Fallback-Timeout")
            if timeout and timeout.strip().isdigit():
                self.fallback_timeout = float(timeout)

    def _ping(self) -> None:
        reply = self._exchange("Ping")
        if reply.status != 200:
            raise UploadFailed(f"{self.path}: Ping answered {reply.status}")

    def _send_fragments(self) -> None:
        total = len(self.data)
        offset = 0
        while True:
            chunk = self.data[offset : offset + self.fragment_size]
            last = offset + len(chunk) - 1
            reply = self._exchange(
                "Fragment", body=chunk, first=offset,
                headers={"Content-Range": f"bytes {offset}-{last}/{total}"},
            )
            if reply.error_code == BG_E_SESSION_NOT_FOUND:
                raise _Restart()
            if reply.status not in (200, 416):
                raise UploadFailed(f"{self.path}: Fragment {offset}-{last} answered "
                                   f"{reply.status} {reply.get('BITS-Error-Code')} "
                                   f"{reply.get('BITS-Error-Message')!r}; last attempts: "
                                   f"{self.attempts[-4:]}")
            received = reply.get("BITS-Received-Content-Range")
            if received is None or not received.strip().isdigit():
                raise UploadFailed(f"{self.path}: Fragment Ack without a valid "
                                   f"BITS-Received-Content-Range: {received!r}")
            offset = int(received)
            if offset > total:
                raise UploadFailed(f"{self.path}: server claims {offset} of {total} bytes")
            if offset == total and reply.status == 200:
                return
            if self.after_fragment is not None:
                self.after_fragment(self, offset)

    def _close_session(self) -> None:
        reply = self._exchange("Close-Session")
        # After a completed upload the file is already in place; a session the server no
        # longer knows (its tombstone swept) needs nothing more (7.4, A23).
        if reply.status != 200 and reply.error_code != BG_E_SESSION_NOT_FOUND:
            raise UploadFailed(f"{self.path}: Close-Session answered {reply.status}")

    # -- requests ---------------------------------------------------------------------

    def _exchange(
        self,
        packet: str,
        *,
        body: bytes = b"",
        first: int | None = None,
        headers: t.Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one packet to the current host until an Ack (other than 502-504) comes."""
        while True:
            if time.monotonic() > self._deadline:
                raise UploadFailed(f"{self.path}: no progress within {self.deadline_seconds}s "
                                   f"(last attempts: {self.attempts[-3:]})")
            base = self.base
            try:
                reply = self._send(base, packet, body, first, headers or {})
            except (OSError, http.client.HTTPException) as exc:
                self._drop(base)
                self._record(packet, base, first, None, exc)
                self._unreachable(base)
                time.sleep(self.retry_delay)
                continue
            self._record(packet, base, first, reply, None)
            if base == self.host_base:
                self._failing_since = None  # the host-ID host answered: timer reset
            if not reply.is_ack or reply.status in TRANSIENT_STATUSES:
                time.sleep(self.retry_delay)
                continue
            return reply

    def _unreachable(self, base: str) -> None:
        """The fallback timer of 9.4: runs while the host-ID host cannot be reached."""
        if base != self.host_base:
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.fallback_timeout:
            assert self.host_id is not None
            self.fallbacks.append(Fallback(self.host_id, self.session_id,
                                           now - self._failing_since))
            self.base = self.origin
            self._failing_since = None

    def _connection(self, base: str) -> http.client.HTTPConnection:
        conn = self._conns.get(base)
        if conn is None:
            parts = urllib.parse.urlsplit(base)
            assert parts.hostname is not None
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
            self._conns[base] = conn
        return conn

    def _drop(self, base: str) -> None:
        conn = self._conns.pop(base, None)
        if conn is not None:
            conn.close()

    def _send(
        self, base: str, packet: str, body: bytes, first: int | None,
        headers: t.Mapping[str, str],
    ) -> Reply:
        conn = self._connection(base)
        conn.putrequest("BITS_POST", self.path, skip_accept_encoding=True)
        conn.putheader("BITS-Packet-Type", packet)
        if self.session_id is not None and packet in ("Fragment", "Close-Session",
                                                      "Cancel-Session"):
            conn.putheader("BITS-Session-Id", self.session_id)
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("User-Agent", "flask-bits farm test client")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        if body:
            half = len(body) // 2
            conn.send(body[:half])
            if self.mid_fragment is not None and first is not None:
                self.mid_fragment(self, first)
            conn.send(body[half:])
        resp = conn.getresponse()
        resp.read()  # an Ack has no body; a proxy's error page has one
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self._drop(base)
        return Reply(resp.status, hdrs, hdrs.get("bits-packet-type", "").lower() == "ack")

    def _record(
        self, packet: str, base: str, first: int | None, reply: Reply | None,
        exc: BaseException | None,
    ) -> None:
        self.attempts.append(Attempt(
            packet=packet,
            base=base,
            session_id=self.session_id,
            first=first,
            status=None if reply is None else reply.status,
            error_code=None if reply is None else reply.error_code,
            upstream=None if reply is None else reply.get("X-Upstream"),
            exception=None if exc is None else repr(exc),
            time=time.monotonic(),
        ))
