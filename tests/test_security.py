"""Security tests promised by SECURITY.md (PROTOCOL.md sections 2, 4, 6, 7, 12; checklist 16).

1. A hypothesis battery of raw ``BITS_POST`` WSGI requests: 10,000 generated cases
   (3,500 spoiled single packets, 3,000 paths, 2,500 fragments, 1,000 packet sequences of
   up to 10 packets), derandomized and without an example database, so every run sends the
   same cases. After every request: the answer is an Ack (``BITS-Packet-Type: Ack``,
   ``Content-Length: 0``, no body), no 5xx but the protocol's own, nothing written outside
   the two folders (up to four levels above them), no pre-created file, symlink, session,
   tombstone or owner marker changed, no server path or other user's name in a header;
   where the battery drives whole sessions, the statuses, offsets and bytes on disk are
   checked against a model of the protocol.
2. Hand-written cases for each category, with the expected status.
3. Symlinks planted in the upload folder, and swaps between the checks and the commit.
4. Ownership against a real gunicorn with HTTP Basic (``EXAMPLE_AUTH=basic``).
5. Disabled uploads, hostile ``Host`` headers, and notification URLs that never follow
   the client's ``Host``.

The arena of the battery lives on tmpfs (``/dev/shm``) when there is one: the battery is
bound by file-system metadata operations.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import hashlib
import http.client
import logging
import os
import random
import re
import shutil
import socket
import stat
import tempfile
import time
import typing as t
import urllib.parse
import uuid
from pathlib import Path

import pytest
from flask import Response
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from security_apps import PROTOCOL
from security_apps import RecordingServer
from security_apps import ack_problems
from security_apps import assert_ack
from security_apps import bits_app
from security_apps import comparable_headers
from security_apps import create
from security_apps import fragment
from security_apps import post
from security_apps import raw_environ
from security_apps import send
from security_apps import wire_path
from security_apps import wire_value

from flask_bits import paths as bits_paths
from flask_bits.errors import BITSError
from flask_bits.protocol import new_session_id
from flask_bits.store import SessionState
from flask_bits.store import SessionStore

NOT_FOUND = "0x8020001F"
E_INVALIDARG = "0x80070057"
E_ACCESSDENIED = "0x80070005"

#: Shared hypothesis settings: reproducible (derandomized, no example database), no
#: deadline (the file system sets the pace), no health checks about slow or big data.
BATTERY = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": list(HealthCheck),
    "print_blob": False,
}
#: Examples per property test; their sum is the size of the battery.
N_ANY_REQUEST = 3500
N_PATHS = 3000
N_FRAGMENTS = 2500
N_SEQUENCES = 1000


# ===========================================================================================
# The arena: one app, pre-created files, symlinks and other people's sessions
# ===========================================================================================


def _battery_authorize(request: t.Any, remote_path: str, packet_type: t.Any) -> t.Any:
    """Anonymous and ``Bearer good`` pass; any other credentials get a 401 challenge
    (with a body, which must not reach the client); ``forbidden*`` paths are denied."""
    auth = request.headers.get("Authorization")
    if auth is not None and auth != "Bearer good":
        return Response(b"go away", 401, {"WWW-Authenticate": 'Bearer realm="bits"'})
    if remote_path.startswith("forbidden"):
        return False
    return None


def plant_session(
    store: SessionStore, remote_path: str, owner: str | None, data: bytes = b"",
    total: int | None = None, directory: str = "bits",
) -> str:
    """Create a session directly in ``store`` holding ``data`` of ``total`` bytes."""
    now = time.time()
    state = SessionState(
        id=new_session_id(), directory=directory, remote_path=remote_path,
        url=f"http://localhost/{directory}/{remote_path}", owner=owner, protocol=PROTOCOL,
        created=now, last_activity=now, timeout=3600.0, total=total, received=len(data),
    )
    store.create(state, owner_limit=None, total_limit=None)
    if data:
        with open(store.data_path(state.id), "r+b") as f:
            f.write(data)
    return state.id


def _sig(path: str) -> tuple[int, ...] | None:
    """What changes when anything changes a file, a symlink or a folder's entries."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_mode, st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _names(folder: str) -> set[str]:
    with os.scandir(folder) as it:
        return {entry.name for entry in it}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class Arena:
    """Folders, files and sessions the battery attacks, and the checks after each request.

    ``root/a/b/base/`` holds ``canary.txt``, ``outside/`` (the target of planted
    symlinks), ``uploads/`` and ``sessions/`` (directory ``/bits``), ``other-uploads/``
    and ``other-sessions/`` (directory ``/other``). Uploads hold finished files, a folder
    and two symlinks pointing out. Sessions owned by ``victim`` (partial, finished,
    closed) and one of ``mallory`` in ``/other`` must never change. Overwrites are off,
    so no request may change a pre-created file either. ``root``, ``a`` and ``b`` catch
    escapes up to four levels above the upload folder.
    """

    def __init__(self, root: Path) -> None:
        base = self.base = root / "a" / "b" / "base"
        self.uploads = base / "uploads"
        self.sessions = base / "sessions"
        self.other_uploads = base / "other-uploads"
        self.other_sessions = base / "other-sessions"
        self.outside = base / "outside"
        (self.outside / "dir").mkdir(parents=True)
        (self.outside / "target.txt").write_bytes(b"outside target\n")
        (base / "canary.txt").write_bytes(b"canary\n")
        (self.uploads / "sub").mkdir(parents=True)
        (self.uploads / "finished.bin").write_bytes(b"finished file\n")
        (self.uploads / "sub" / "deep.bin").write_bytes(b"deep finished file\n")
        os.symlink(self.outside, self.uploads / "link-out")
        os.symlink(self.outside / "target.txt", self.uploads / "f-link.txt")
        self.other_uploads.mkdir()
        self.app = bits_app(base, authorize=_battery_authorize, other_directory=True)
        self.store: SessionStore = self.app.extensions["bits"]["bits"].store

        victim = {"remote_user": "victim"}
        self.sids: dict[str, str] = {}
        self.sids["victim"] = create(self.app, "/bits/victim.bin", **victim)
        assert_ack(fragment(self.app, "/bits/victim.bin", self.sids["victim"], b"vict", 0, 10,
                            **victim), 200)
        self.sids["victim-done"] = create(self.app, "/bits/victim-done.bin", **victim)
        assert_ack(fragment(self.app, "/bits/victim-done.bin", self.sids["victim-done"],
                            b"victim's file", 0, 13, **victim), 200)
        self.sids["victim-closed"] = create(self.app, "/bits/victim-closed.bin", **victim)
        assert_ack(post(self.app, "/bits/victim-closed.bin", "Cancel-Session",
                        session_id=self.sids["victim-closed"], **victim), 200)
        self.sids["other"] = create(self.app, "/other/o-private.bin", remote_user="mallory")
        assert_ack(fragment(self.app, "/other/o-private.bin", self.sids["other"], b"oth", 0, 8,
                            remote_user="mallory"), 200)
        self.keep = set(self.sids.values())
        self.secrets = [str(root), "victim"]

        # Everything whose metadata must never change.
        fixed = [root, root / "a", root / "a" / "b", base, base / "canary.txt", self.outside,
                 self.outside / "dir", self.outside / "target.txt",
                 self.uploads / "link-out", self.uploads / "f-link.txt",
                 self.uploads / "finished.bin", self.uploads / "sub" / "deep.bin",
                 self.uploads / "victim-done.bin"]
        self.session_dirs = {}
        for folder in (self.sessions, self.other_sessions):
            subs = ["sessions", "staging", "trash", "tombstones", "locks", "owners"]
            self.session_dirs[str(folder)] = [str(folder / sub) for sub in subs]
            for key, sid in self.sids.items():
                if (key == "other") != (folder == self.other_sessions):
                    continue  # session ids are made by the server: each lives in one folder
                sdir = folder / "sessions" / sid
                fixed += [sdir, sdir / "state.json", sdir / "data.part",
                          folder / "tombstones" / f"{sid}.json"]
                fixed += [owner / sid for owner in (folder / "owners").iterdir()]
        self.fixed = [str(p) for p in fixed]
        # (folder, upload root) pairs where new files may appear; their initial names.
        self.grow = [(str(d), str(r)) for d, r in ((self.uploads, self.uploads),
                                                    (self.uploads / "sub", self.uploads),
                                                    (self.other_uploads, self.other_uploads))]
        self.initial_names = {d: _names(d) for d, _ in self.grow}
        self.initial_sigs = [_sig(p) for p in self.fixed]
        self.initial_identity = {d: _sig(d)[:2] for d, _ in self.grow}  # type: ignore[index]

    def violations(self) -> list[str]:
        """What the last requests changed that they must not have."""
        found = []
        for path, before in zip(self.fixed, self.initial_sigs, strict=True):
            if _sig(path) != before:
                found.append(f"{path} changed")
        for folder, root in self.grow:
            if (_sig(folder) or ())[:2] != self.initial_identity[folder]:
                found.append(f"{folder} was replaced")
                continue
            for name in _names(folder) - self.initial_names[folder]:
                full = os.path.join(folder, name)
                if not stat.S_ISREG(os.lstat(full).st_mode):
                    found.append(f"the server made something other than a file: {full}")
                try:
                    bits_paths.split_remote_path(os.path.relpath(full, root))
                except BITSError as exc:
                    found.append(f"file {full!r} has a name the server refuses ({exc})")
        return found

    def new_files(self) -> set[str]:
        """Entries that appeared in the upload folders since the last reset."""
        return {os.path.join(folder, name) for folder, _ in self.grow
                for name in _names(folder) - self.initial_names[folder]}

    def reset(self) -> None:
        """Remove everything the last example created (files, sessions, tombstones)."""
        for folder, _ in self.grow:
            for name in _names(folder) - self.initial_names[folder]:
                _remove(os.path.join(folder, name))
        for subs in self.session_dirs.values():
            for sub in subs:
                with os.scandir(sub) as it:
                    entries = list(it)
                for entry in entries:
                    if sub.endswith("owners"):
                        for marker in _names(entry.path) - self.keep:
                            os.unlink(os.path.join(entry.path, marker))
                    elif entry.name.split(".")[0] not in self.keep or sub.endswith("locks"):
                        _remove(entry.path)

    def check(self, response: t.Any, what: t.Any) -> None:
        """The properties every answer and the disk must have after every request."""
        problems = ack_problems(response, secrets=self.secrets)
        problems += self.violations()
        assert not problems, (problems, response.status, dict(response.headers), what)


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Arena]:
    # tmpfs when there is one: the battery is bound by file-system metadata operations.
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="flask-bits-security-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("arena")
    try:
        yield Arena(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def relaxed_gc() -> t.Iterator[None]:
    """The battery allocates a great deal; fewer young-generation collections save about a
    fifth of its time. The thresholds are restored afterwards."""
    old = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)


# ===========================================================================================
# Strategies
# ===========================================================================================


@dataclasses.dataclass(frozen=True)
class Sid:
    """A placeholder for a session id known only at run time, in one of its spellings."""

    key: str
    variant: int


def spell(sid: str, variant: int) -> str:
    """Spellings of one session id that all name the same session (PROTOCOL.md A32)."""
    bare = sid.strip("{}")
    forms = [sid, sid.lower(), bare, bare.lower(), f" {sid}\t", f"{{{bare.lower()}}}"]
    return forms[variant % len(forms)]


def spoil(sid: str, variant: int) -> str:
    """Near misses of a session id that must name no session."""
    bare = sid.strip("{}")
    forms = [
        "{" + bare, bare + "}", "{{" + bare + "}}", f"{sid}, {sid}", sid.replace("-", ""),
        sid + "\x00", "../" + sid, sid.replace("A", "\uff21"), bare[:-1], sid + "x",
        sid.replace("-", "\u2010"), f"{sid}/../{sid}",
    ]
    return forms[variant % len(forms)]


def resolve(value: t.Any, sids: t.Mapping[str, str]) -> str:
    if isinstance(value, Sid):
        if value.key.startswith("spoil:"):
            return wire_value(spoil(sids[value.key[6:]], value.variant))
        return spell(sids[value.key], value.variant)
    return t.cast(str, value)


# Strategies are flat draws from pools (hypothesis spends most of its time per draw, not
# per value): fixed lists of known-hostile values plus pools of random strings made once,
# reproducibly, from a seeded generator.
_POOL = random.Random(20241127)


def _random_texts(alphabet: str, count: int, max_len: int) -> list[str]:
    return ["".join(_POOL.choice(alphabet) for _ in range(_POOL.randint(0, max_len)))
            for _ in range(count)]


_UNICODE_ALPHABET = ("abcXYZ019-_{}./\\:%@ \t" + "".join(chr(c) for c in range(0x80, 0x100, 7))
                     + "\u0130\u017f\u212a\u2010\u2013\u202e\ufeff\uff10\uff21\ufffd\U0001d7d9"
                     "\x00\x01\x0b\r\n\x7f")
RANDOM_TEXTS = _random_texts(_UNICODE_ALPHABET, 200, 16)

WEIRD_SIDS = [
    "", " ", "{}", "null", "0", "-1", "../../sessions/x", "..%2f..%2fx", "/etc/passwd",
    "C:\\Windows", "\\\\server\\share", "{../../../../tmp/x}", "\x00", "a\x00b", "\r\n",
    "{00000000-0000-0000-0000-000000000000}", "{FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF}",
    "{7df0354d-249b-430f-820d-3d2a9bef4931}", "x" * 100, "x" * 4096, "x" * 4097, "x" * 10240,
    "{" + "0" * 4096 + "}", "\u00e9\u00e8", "\ufeff{00000000-0000-0000-0000-000000000000}",
    "{\uff10\uff10000000-0000-0000-0000-000000000000}", "*", "%", "{" + "a" * 36 + "}",
    "sessions", "state.json", "..", ".", "CON", "nul",
] + [f"{{{uuid.UUID(int=_POOL.getrandbits(128))}}}" for _ in range(20)] + [
    str(uuid.UUID(int=_POOL.getrandbits(128))) for _ in range(10)] + RANDOM_TEXTS[:60]

SESSION_ID_POOL: list[t.Any] = (
    [Sid(key, v) for key in ("own", "own", "own", "own", "own", "victim", "victim-done",
                             "victim-closed", "other") for v in range(6)]
    + [Sid(key, v) for key in ("spoil:own", "spoil:victim") for v in range(12)]
    + [wire_value(sid) for sid in WEIRD_SIDS]
)

PACKET_TYPE_POOL = [None if v is None else wire_value(v) for v in [
    None, "Ping", "Create-Session", "Fragment", "Close-Session", "Cancel-Session",
    "ping", "PING", "create-session", "CREATE-SESSION", "fragment", "FRAGMENT",
    "close-session", "CLOSE-SESSION", "cancel-session", "CANCEL-SESSION", " Fragment ",
    "Fragment\t", "Ack", "", "Fragment, Fragment", "Ping, Create-Session", "Fr\u00e4gment",
    "Create-Session\x00", "Create-Session\r\nBITS-Packet-Type: Ping", "x" * 5000,
    "Create_Session", "CreateSession", "Close-Session\u00a0", "\u0130ng",
]]

PROTOCOL_POOL = [wire_value(v) for v in [
    PROTOCOL, PROTOCOL.upper(), PROTOCOL.strip("{}"), "{" + PROTOCOL.strip("{}"),
    "{11111111-2222-3333-4444-555555555555}, " + PROTOCOL, ",".join([PROTOCOL] * 101),
    " ".join([PROTOCOL] * 200), "", "*", "\x00", PROTOCOL + "\r\n",
]]

PATH_SEGMENTS = [
    ".", "..", "%2e%2e", "%2E%2e", ".%2e", "%2e", "%252e%252e", "..%2f..%2f", "%2e%2e%2f%2e%2e%2f",
    "%252e%252e%252f", "%c0%ae%c0%ae", "%c0%af", "%e0%80%ae", "%c0%2e", "%uff0e", "..%5c", "%5c",
    "\\", "..\\..", "C:", "c:", "C:%5cWindows", "D:%2f", "%5c%5cserver%5cshare", "\\\\?\\C:",
    "CON", "con", "Con.txt", "nul.txt", "NUL.tar.gz", "COM1", "com9.log", "LPT1", "lpt1.dat",
    "AUX", "PRN", "CONIN$", "conout$.x", "COM\u00b9", "CON .txt", "file.", "file..", "file ",
    " file", "file. ", "file%20", "file%2e", ".bits-x", ".bits-reply", "finished.bin", "sub",
    "deep.bin", "link-out", "f-link.txt", "victim.bin", "victim-done.bin", "own.bin", "%00",
    "a%00b", "%0a", "%0d%0a", "a%09b", "%7f", "%ff", "%fe%ff", "%ef%bf%bd", "~", "$", "*", "?",
    "%3f", "a:b", "a|b", "<", ">", '"', "%22", "%", "%%", "%2", "%zz", "%c3%bc", "\u00fc",
    "\uff23\uff2f\uff2e", "\uff0e\uff0e", "x" * 255, "x" * 256, "\u00e9" * 127, "\u00e9" * 128,
    "%2f", "%2F", "", "forbidden.bin", "outside", "target.txt", "sessions", "..%00", "%2e%2e%00",
]

_SEGMENT_ALPHABET = "aZ09._-~ %/\\:*?\"<>|\x00\x01\n\r\t\u00fc\u00e9\uff0e\u202e\ufeff\u0130"


def _encode_segment(text: str, how: int) -> str:
    """``how``: 0 as is, 1 every non-alphanumeric percent-encoded, 2 '%' double-encoded."""
    if how == 1:
        return "".join(c if c.isascii() and c.isalnum() else
                       urllib.parse.quote(c, safe="") for c in text)
    if how == 2:
        return text.replace("%", "%25")
    return text


SEGMENT_POOL = PATH_SEGMENTS + [_encode_segment(text, _POOL.randint(0, 2))
                                for text in _random_texts(_SEGMENT_ALPHABET, 300, 8)]
FIXED_SUFFIXES = [
    "", "/", "//", "/own.bin", "/sub/new.bin", "/link-out/x.txt", "/link-out/dir/x.txt",
    "/f-link.txt", "/sub/../own.bin", "/%2e%2e/canary.txt", "/..%2fcanary.txt",
    "/%2e%2e%2f%2e%2e%2fcanary.txt", "/" + "a/" * 600 + "x", "/" + "x" * 5000,
    "/" + "d/" * 100 + "x.bin", "/sub//x", "/sub/./x", "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/x",
    "/sub/%2e%2e/%2e%2e/a/b/x",
]


def _suffix(n: int, a: str, b: str, c: str, d: str, tail: str, fixed: str) -> str:
    if n == 0:
        return fixed
    return "/" + "/".join([a, b, c, d][:n]) + tail


SUFFIX_POOL = FIXED_SUFFIXES + [
    _suffix(_POOL.randint(1, 4), *(_POOL.choice(SEGMENT_POOL) for _ in range(4)),
            _POOL.choice(["", "", "", "/", "//"]), "") for _ in range(2500)]
_SEG = st.sampled_from(SEGMENT_POOL)
PATH_SUFFIXES = st.builds(_suffix, st.integers(0, 4), _SEG, _SEG, _SEG, _SEG,
                          st.sampled_from(["", "", "", "/", "//"]),
                          st.sampled_from(FIXED_SUFFIXES))

QUERY_POOL = [wire_value(v) for v in ["", "", "", "", "", "", "a=1", "x=%00", "%0d%0a=1",
                                      "q=" + "x" * 5000, "../../x", "a=1&a=2", "#frag",
                                      "\u00e9=\u00e9"]]

NUMBER_POOL = ([str(i) for i in range(41)] + [
    "-1", "-0", "+1", "0x10", "1e3", "1_0", "00", "0009", "\uff11", "\u0663", "\u06f1",
    "\U0001d7d9", "\u00b2", " 1", "1 ", "", "*", "9223372036854775807", "9223372036854775806",
    "9223372036854775808", "18446744073709551616", "9999999999999999999", "10000000000000000000",
    "1" * 40, "0" * 25 + "1", "-9223372036854775808", str(2**70), str(-(2**70)),
])
FIXED_RANGES = ["bytes */0", "bytes 0--1/0", "bytes 0-0/0", "bytes */10", "bytes */*", "", " ",
                "bytes", "bytes 0-9", "bytes 0-9/", "bytes -9/10", "bytes 0-/10",
                "bytes 0-4/10, bytes 5-9/10", "bytes 0-4/10\r\n"] + RANDOM_TEXTS[60:120]


_UNITS = ["bytes"] * 6 + ["Bytes", "BYTES", "byte", "bytes=", "", "\uff42ytes", "bytes\x00",
                          "bits", "by\u017ftes", "BYTE\u017f"]
_SEPS = [" "] * 6 + ["\t", "", "  ", "\u00a0", "\r\n ", "\n", "\x0b"]
_DASHES = ["-"] * 6 + ["--", "\u2013", "\u2212", "", "+"]
_SLASHES = ["/"] * 6 + ["", "//", "\\", " / "]


def _numbers() -> str:
    return _POOL.choice(NUMBER_POOL) if _POOL.random() < 0.4 else str(_POOL.randint(0, 30))


CONTENT_RANGE_POOL = FIXED_RANGES + [
    f"{_POOL.choice(_UNITS)}{_POOL.choice(_SEPS)}{_numbers()}{_POOL.choice(_DASHES)}"
    f"{_numbers()}{_POOL.choice(_SLASHES)}{_numbers()}" for _ in range(1500)
]

CONTENT_LENGTHS = st.sampled_from(
    ["auto"] * 12 + [None, "", "-1", "+5", " 5", "5 ", "0x5", "\uff15", "\u0665", "5, 5",
                     "1e1", "9223372036854775807", "99999999999999999999", "abc", "00", "5\x00"]
    + [str(i) for i in range(0, 61, 3)]
).map(lambda v: v if v in (None, "auto") else wire_value(v))

FIXED_HEADERS = [
    ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip, chunked"),
    ("Transfer-Encoding", "Chunked"), ("Transfer-Encoding", "identity"),
    ("Content-Encoding", "gzip"), ("Content-Encoding", "identity"), ("Content-Encoding", ""),
    ("Content-Encoding", "IDENTITY "), ("Content-Name", "..\\..\\evil.txt"),
    ("Content-Name", "/etc/passwd"), ("Content-Name", "x" * 300), ("X-Long", "a" * 4096),
    ("X-Long", "a" * 4097), ("X-Long", "a" * 10240), ("X-Injected", "a\r\nBITS-Packet-Type: Ack"),
    ("X-Ctl", "\x00"), ("X-Ctl", "\x7f"), ("X-Tab", "a\tb"), ("X-Latin", "\xff\xfe"),
    ("Expect", "100-continue"), ("Connection", "close"), ("Authorization", "Bearer good"),
    ("Authorization", "Bearer bad"), ("Authorization", "Basic !!!"), ("BITS-Packet-Type", "Ping"),
    ("BITS-Packet-Type", "Fragment"), ("BITS-Session-Id", "{00000000-0000-0000-0000-000000000000}"),
    ("Content-Range", "bytes 0-0/1"), ("Content-Length", "0"), ("Content-Length", "5"),
    ("Content-Type", "multipart/form-data; boundary=x"),
    ("Content-Type", "application/x-www-form-urlencoded"), ("Range", "bytes=0-"),
    ("Cookie", "session=x"), ("Cookie", "c=" + "x" * 70000), ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "host=evil.example"), ("X-Forwarded-For", "10.0.0.1"),
    ("BITS-Supported-Protocols", PROTOCOL), ("Host", "evil.example"),
] + [(name, wire_value(value)) for name, value in zip(
    ["X-A", "x-a", "X_A", "BITS-Error-Code", "Bits-Packet-Type", "Content-Name", "If-Match",
     "A" * 300] * 10, RANDOM_TEXTS[120:200], strict=True)]
BODY_POOL = [b"", b"", b"\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"] + [
    _POOL.randbytes(_POOL.randint(1, 48)) for _ in range(40)]
USERS = st.sampled_from([None, "mallory"])


@dataclasses.dataclass
class RawRequest:
    """One request of the battery, before session placeholders are resolved."""

    path: str
    query: str
    headers: list[tuple[str, t.Any]]
    body: bytes
    content_length: t.Any
    remote_user: str | None

    def environ(self, sids: t.Mapping[str, str]) -> dict[str, t.Any]:
        headers = [(name, resolve(value, sids)) for name, value in self.headers]
        length = str(len(self.body)) if self.content_length == "auto" else self.content_length
        return raw_environ(self.path, headers, self.body, content_length=length,
                           query=self.query, remote_user=self.remote_user)


_OWN_CONTENT = bytes(range(48))
_OWN_TOTAL = 16

#: Ways to spoil a well-formed request; each example applies up to three of them.
MUTATIONS: list[tuple[str, t.Any]] = (
    [("type", v) for v in PACKET_TYPE_POOL]
    + [("path", v) for v in SUFFIX_POOL[::5]] + [("prefix", "/other")] * 10
    + [("sid", v) for v in SESSION_ID_POOL]
    + [("range", wire_value(v)) for v in CONTENT_RANGE_POOL[::2]]
    + [("cl", wire_value(v)) for v in ["", "-1", "+5", " 5", "5 ", "0x5", "\uff15", "\u0665",
                                       "5, 5", "1e1", "9223372036854775807",
                                       "99999999999999999999", "abc", "00", "5\x00", "0"]]
    + [("cl", str(i)) for i in range(0, 40, 3)] + [("cl", None)] * 8
    + [("body", v) for v in BODY_POOL]
    + [("short", k) for k in range(1, 6)] + [("long", k) for k in (1, 5, 100)]
    + [("header", v) for v in FIXED_HEADERS]
    + [("drop", v) for v in ("BITS-Session-Id", "Content-Range", "BITS-Supported-Protocols",
                             "BITS-Packet-Type")] * 3
    + [("dup", v) for v in ("BITS-Session-Id", "Content-Range", "BITS-Supported-Protocols",
                            "BITS-Packet-Type", "Content-Length")] * 3
    + [("protocols", v) for v in PROTOCOL_POOL]
    + [("query", v) for v in QUERY_POOL if v]
    + [("user", None), ("user", "mallory")] * 5
)


def _any_request(kind: str, received: int, a: int, n: int, user: str | None,
                 mutations: list[tuple[str, t.Any]]) -> tuple[RawRequest, int, str | None]:
    """A well-formed packet against ``user``'s own session (which holds ``received`` of
    ``_OWN_TOTAL`` bytes), then spoiled by ``mutations`` (which may change the sender)."""
    owner = user
    prefix, suffix, query = "/bits", "/own.bin", ""
    headers: dict[str, list[t.Any]] = {"BITS-Packet-Type": [kind]}
    body = b""
    if kind == "Create-Session":
        headers["BITS-Supported-Protocols"] = [PROTOCOL]
    if kind in ("Fragment", "Close-Session", "Cancel-Session"):
        headers["BITS-Session-Id"] = [Sid("own", a)]
    if kind == "Fragment":
        first = a % (received + 1)
        last = first + n % (_OWN_TOTAL - first)
        headers["Content-Range"] = [f"bytes {first}-{last}/{_OWN_TOTAL}"]
        body = _OWN_CONTENT[first:last + 1]
    length: t.Any = len(body)
    for what, value in mutations:
        if what == "type":
            headers["BITS-Packet-Type"] = [] if value is None else [value]
        elif what == "path":
            suffix = value
        elif what == "prefix":
            prefix = value
        elif what in ("sid", "range", "protocols"):
            name = {"sid": "BITS-Session-Id", "range": "Content-Range",
                    "protocols": "BITS-Supported-Protocols"}[what]
            headers[name] = [value]
        elif what == "cl":
            length = value
        elif what == "body":
            body = value
        elif what == "short":
            body = body[:-value] if len(body) > value else b""
        elif what == "long":
            body = body + b"X" * value
        elif what == "header":
            headers.setdefault(value[0], []).append(value[1])
        elif what == "drop":
            headers.pop(value, None)
        elif what == "dup":
            if value == "Content-Length":
                headers.setdefault("Content-Length", []).append(str(len(body)))
            elif headers.get(value):
                headers[value].append(headers[value][0])
        elif what == "query":
            query = value
        elif what == "user":
            user = value
    pairs = [(name, value) for name, values in headers.items() for value in values]
    request = RawRequest(wire_path(prefix + suffix), query, pairs, body, length, user)
    return request, received, owner


#: (packet type, bytes the own session holds, a, n, user): drawn as one value.
_BASE_PACKETS = [(_POOL.choice(["Ping", "Create-Session", "Fragment", "Fragment", "Fragment",
                                "Close-Session", "Cancel-Session"]),
                  _POOL.randint(0, 8), _POOL.randint(0, 63), _POOL.randint(0, 63),
                  _POOL.choice([None, "mallory"])) for _ in range(3000)]


def any_request() -> st.SearchStrategy[tuple[RawRequest, int, str | None]]:
    return st.builds(lambda base, mutations: _any_request(*base, mutations),
                     st.sampled_from(_BASE_PACKETS),
                     st.lists(st.sampled_from(MUTATIONS), max_size=3))


# ===========================================================================================
# The battery
# ===========================================================================================


@pytest.mark.usefixtures("relaxed_gc")
def test_battery_any_request(arena: Arena) -> None:
    """A well-formed packet (mostly against a session of the requester's that holds some
    bytes), spoiled by up to three mutations: paths, packet types, session ids (own,
    other people's, spoiled, garbage, 10 KB), Content-Range, Content-Length, bodies
    shorter or longer than it, duplicate and CR/LF headers, chunked bodies, other users.
    Every answer is an Ack, no foreign 5xx, nothing outside or pre-existing changes."""
    runs = [0]

    @settings(max_examples=N_ANY_REQUEST, **BATTERY)
    @given(case=any_request())
    def battery(case: tuple[RawRequest, int, str | None]) -> None:
        runs[0] += 1
        request, received, owner = case
        sids = dict(arena.sids, own=new_session_id())
        if any(isinstance(v, Sid) and v.key.endswith("own") for _, v in request.headers):
            sids["own"] = plant_session(arena.store, "own.bin", owner,
                                        _OWN_CONTENT[:received],
                                        _OWN_TOTAL if received else None)
        try:
            response = send(arena.app, request.environ(sids))
            arena.check(response, request)
        finally:
            arena.reset()

    battery()
    assert runs[0] >= N_ANY_REQUEST


# -- paths ----------------------------------------------------------------------------------


def _remote_of(path_info: str, prefix: str) -> str:
    """The remote path the server sees: PATH_INFO decoded like werkzeug, minus the prefix."""
    return path_info.encode("latin-1").decode("utf-8", "replace")[len(prefix) + 1:]


@pytest.mark.usefixtures("relaxed_gc")
def test_battery_paths(arena: Arena) -> None:
    """Create-Session, then Close-Session (which commits an empty file), on generated
    paths: a session exists only for paths the validator accepts, and the one file that
    appears is exactly at the remote path under the directory's upload folder."""
    runs = [0]

    @settings(max_examples=N_PATHS, **BATTERY)
    @given(prefix=st.sampled_from(["/bits", "/bits", "/bits", "/other"]),
           suffix=PATH_SUFFIXES, user=USERS)
    def battery(prefix: str, suffix: str, user: str | None) -> None:
        runs[0] += 1
        path_info = wire_path(prefix + suffix)
        remote = _remote_of(path_info, prefix)
        folder = arena.uploads if prefix == "/bits" else arena.other_uploads
        try:
            headers = [("BITS-Packet-Type", "Create-Session"),
                       ("BITS-Supported-Protocols", PROTOCOL)]
            response = send(arena.app, raw_environ(path_info, headers, remote_user=user))
            arena.check(response, (path_info, "create"))
            segments = remote.split("/")
            if ".." in segments or "." in segments:
                assert response.status_code in (400, 403, 404), (remote, response.status)
            if response.status_code != 200:
                assert arena.new_files() == set()
                return
            bits_paths.split_remote_path(remote)  # accepted paths are valid paths
            sid = response.headers["BITS-Session-Id"]
            headers = [("BITS-Packet-Type", "Close-Session"), ("BITS-Session-Id", sid)]
            response = send(arena.app, raw_environ(path_info, headers, remote_user=user))
            arena.check(response, (path_info, "close"))
            assert response.status_code == 200, (remote, response.status)
            assert arena.new_files() == {str(folder / remote)}
            assert (folder / remote).read_bytes() == b""
        finally:
            arena.reset()

    battery()
    assert runs[0] >= N_PATHS


# -- fragments ------------------------------------------------------------------------------

_NEAR_FORMATS = [
    "Bytes {a}-{b}/{c}", "bytes\t{a}-{b}/{c}", " bytes {a}-{b}/{c} ", "bytes {a}-{b}/{c}0",
    "bytes 0{a}-{b}/{c}", "bytes {a}-{b}/ {c}", "bytes {a} - {b}/{c}", "bytes */{c}",
    "bytes {a}-{b}/{c}/{c}", "bytes {b}-{a}/{c}", "bytes {a}-{a}/{c}", "BYTES {a}-{b}/{c}",
]
_FRAGMENT_CONTENT = bytes(range(100, 164))
#: Ways to spoil a well-formed Fragment; each example applies up to two of them.
FRAGMENT_MUTATIONS: list[tuple[str, t.Any]] = (
    [("cl", v) for v in ["+1", "-1", "+1000", None, "", "-1x", " 5", "0x5", "\uff15", "5, 5",
                         "9223372036854775807", "99999999999999999999", "0"]] * 3
    + [("short", k) for k in range(1, 6)] * 6 + [("long", k) for k in (1, 7, 100)] * 4
    + [("range", v) for v in CONTENT_RANGE_POOL[::8]]
    + [("format", v) for v in _NEAR_FORMATS] * 3
    + [("sid", Sid("own", v)) for v in range(6)] * 3
    + [("sid", v) for v in SESSION_ID_POOL[::2]]
    + [("path", v) for v in ["/bits/OWN.bin", "/bits/own.bin/", "/bits//own.bin",
                             "/bits/victim.bin", "/other/own.bin", "/bits/./own.bin"]] * 2
    + [("header", v) for v in [
        ("Content-Encoding", "gzip"), ("Content-Encoding", "identity"),
        ("Transfer-Encoding", "chunked"), ("X-Long", "a" * 4097),
        ("Content-Range", "bytes 0-0/1"), ("X-Ctl", "a\nb"), ("Content-Length", "1"),
        ("BITS-Session-Id", "{00000000-0000-0000-0000-000000000000}"),
        ("Content-Name", "../../x"), ("BITS-Packet-Type", "Fragment")]] * 2
    + [("user", None), ("user", "mallory")] * 4
)


@dataclasses.dataclass
class FragmentCase:
    total: int | None        # of the planted session
    held: bytes              # what the planted session holds
    owner: str | None        # of the planted session (the request may come from another)
    request: RawRequest
    content_range: str | None


def _fragment_case(total: int | None, received: int, first: int, count: int,
                   total_kind: str, user: str | None,
                   mutations: list[tuple[str, t.Any]]) -> FragmentCase:
    """A Fragment consistent in itself (range, length and body agree) against a planted
    session holding ``received`` of ``total`` bytes, then spoiled by ``mutations``."""
    held = _FRAGMENT_CONTENT[:min(received, total - 1) if total else 0]
    owner = user
    claimed = total or 1 + received % 24
    claimed = {"same": claimed, "plus": claimed + 1, "minus": max(claimed - 1, 0),
               "zero": 0}[total_kind]
    first = first % (len(held) + 3)  # at, before or (a gap) beyond the received offset
    # Now and then one byte too many; nothing for an empty file.
    count = 0 if claimed == 0 else 1 + count % max(claimed - first + 1, 1)
    body = _FRAGMENT_CONTENT[first:first + count]
    fmt = "bytes {a}-{b}/{c}" if count else "bytes */{c}"
    sid: t.Any = Sid("own", first)
    path, length = "/bits/own.bin", len(body)
    headers: list[tuple[str, t.Any]] = []
    rng: str | None = None
    for what, value in mutations:
        if what == "cl":
            length = (None if value is None else str(len(body) + int(value))
                      if value in ("+1", "-1", "+1000") else value)
        elif what == "short":
            body = body[:-value] if len(body) > value else b""
        elif what == "long":
            body = body + b"X" * value
        elif what == "range":
            rng = value
        elif what == "format":
            fmt = value
        elif what == "sid":
            sid = value
        elif what == "path":
            path = value
        elif what == "header":
            headers.append(value)
        elif what == "user":
            user = value
    if rng is None:
        rng = fmt.format(a=first, b=first + count - 1, c=claimed)
    headers = [("BITS-Packet-Type", "Fragment"), ("BITS-Session-Id", sid),
               ("Content-Range", wire_value(rng)), *headers]
    request = RawRequest(wire_path(path), "", headers, body, length, user)
    return FragmentCase(total, held, owner, request, wire_value(rng))


#: (total, received, first, count, which total is claimed, user): drawn as one value.
_BASE_FRAGMENTS = [(_POOL.choice([None] * 4 + list(range(1, 21))), _POOL.randint(0, 19),
                    _POOL.randint(0, 63), _POOL.randint(0, 63),
                    _POOL.choice(["same"] * 8 + ["plus", "minus", "zero"]),
                    _POOL.choice([None, "mallory"])) for _ in range(3000)]
FRAGMENT_CASES = st.builds(lambda base, mutations: _fragment_case(*base, mutations),
                           st.sampled_from(_BASE_FRAGMENTS),
                           st.lists(st.sampled_from(FRAGMENT_MUTATIONS), max_size=2))


@pytest.mark.usefixtures("relaxed_gc")
def test_battery_fragments(arena: Arena) -> None:
    """Fragments against a session of the requester's that already holds some bytes:
    well-formed ones (overlapping, repeated, gaps, completing, other totals) and spoiled
    ones. Bytes already received never change, new bytes are exactly the right slice of
    the body, the acknowledged offset is what is on disk, and a completed file is
    exactly the received bytes."""
    runs = [0]

    @settings(max_examples=N_FRAGMENTS, **BATTERY)
    @given(case=FRAGMENT_CASES)
    def battery(case: FragmentCase) -> None:
        runs[0] += 1
        sids = dict(arena.sids)
        own = sids["own"] = plant_session(arena.store, "own.bin", case.owner, case.held,
                                          case.total)
        try:
            response = send(arena.app, case.request.environ(sids))
            arena.check(response, case.request)
            _check_own_session(arena, response, own, case.held, case.total,
                               case.content_range, case.request.body)
        finally:
            arena.reset()

    battery()
    assert runs[0] >= N_FRAGMENTS


_PLAIN_RANGE = re.compile(r"[ \t]*bytes[ \t]+(\d+)-(\d+)/(\d+)[ \t]*", re.I | re.ASCII)


def _check_own_session(arena: Arena, response: t.Any, sid: str, held: bytes,
                       total: int | None, content_range: str | None, body: bytes) -> None:
    state = arena.store.peek(sid)
    assert state is not None, "a Fragment removed a session"
    r, n = len(held), state.received
    status = response.status_code
    ack_offset = response.headers.get("BITS-Received-Content-Range")
    assert n >= r, "the received offset went backwards"
    if total is not None:
        assert state.total == total, "the total changed"
    if n > r:
        match = _PLAIN_RANGE.fullmatch(content_range or "")
        assert match, f"bytes were stored for Content-Range {content_range!r}"
        first = int(match.group(1))
        expected = held + body[r - first:n - first]
    else:
        expected = held
    if state.committed:
        data = (arena.uploads / "own.bin").read_bytes()
        assert state.total == n == len(data)
    else:
        data = Path(arena.store.data_path(sid)).read_bytes()
    assert data == expected, "stored bytes differ from what the client sent"
    if status in (200, 416) or (status in (400, 409) and ack_offset is not None):
        assert ack_offset == str(n), (status, ack_offset, n)
    if status in (413, 416) or (status == 400 and n > r):
        # Only a body that ended early keeps bytes on a 400 ("what arrived was kept").
        assert status == 400 or n == r
    if status == 500:
        assert response.headers["BITS-Error-Code"] == NOT_FOUND and n == r


# -- packet sequences -----------------------------------------------------------------------


@dataclasses.dataclass
class _ModelSession:
    slot: int
    total: int | None = None
    received: int = 0
    phase: str = "receiving"  # receiving, complete (commit refused), finished
    gone: bool = False


_OP_KINDS = ["ping", "create", "fragment", "fragment", "fragment", "fragment", "fragment",
             "close", "cancel", "foreign", "unknown", "wrongpath"]
#: (kind, slot, first, length, total, spelling of the id, body shape, which of the slot's ids)
OP_POOL = [(_POOL.choice(_OP_KINDS), _POOL.randint(0, 2), _POOL.randint(0, 63),
            _POOL.randint(0, 63), _POOL.choice(["T", "T", "T", "T", "other"]),
            _POOL.randint(0, 5), _POOL.choice(["full"] * 6 + ["short", "long"]),
            _POOL.randint(0, 2)) for _ in range(5000)]
SEQ_OPS = st.lists(st.sampled_from(OP_POOL), min_size=1, max_size=10)


@pytest.mark.usefixtures("relaxed_gc")
def test_battery_packet_sequences(arena: Arena) -> None:
    """Random sequences of Ping, Create, Fragment, Close and Cancel over three sessions
    (plus other people's and unknown ids, and ids sent to the wrong path), checked
    against a model of the protocol: statuses, acknowledged offsets, tombstones, and the
    bytes in every session and every committed file."""
    runs = [0]

    @settings(max_examples=N_SEQUENCES, **BATTERY)
    @given(ops=SEQ_OPS, totals=st.tuples(*[st.integers(0, 24)] * 3), user=USERS,
           seed=st.integers(0, 255))
    def battery(ops: list[tuple[t.Any, ...]], totals: tuple[int, ...], user: str | None,
                seed: int) -> None:
        runs[0] += 1
        try:
            _run_sequence(arena, ops, totals, user, seed)
        finally:
            arena.reset()

    battery()
    assert runs[0] >= N_SEQUENCES


def _run_sequence(arena: Arena, ops: list[tuple[t.Any, ...]], totals: tuple[int, ...],
                  user: str | None, seed: int) -> None:
    contents = [bytes((seed + 37 * k + 11 * i) % 256 for i in range(64)) for k in range(3)]
    paths = [f"/bits/seq-{k}.bin" for k in range(3)]
    files: dict[int, bytes] = {}  # slot -> committed content
    sessions: dict[str, _ModelSession] = {}
    slot_sids: dict[int, list[str]] = {0: [], 1: [], 2: []}

    def send_packet(path: str, ptype: str, sid: str | None = None, body: bytes = b"",
                    length: int | None = None, rng: str | None = None) -> t.Any:
        headers = [("BITS-Packet-Type", ptype)]
        if ptype == "Create-Session":
            headers.append(("BITS-Supported-Protocols", PROTOCOL))
        if sid is not None:
            headers.append(("BITS-Session-Id", sid))
        if rng is not None:
            headers.append(("Content-Range", rng))
        response = send(arena.app, raw_environ(
            path, headers, body, remote_user=user,
            content_length=len(body) if length is None else length))
        arena.check(response, (ptype, path, sid, rng, len(body), length))
        return response

    def expect(response: t.Any, status: int, error: str | None = None,
               offset: int | None = None) -> None:
        got = (response.status_code, response.headers.get("BITS-Error-Code"))
        assert got == (status, error), (got, status, error, dict(response.headers))
        if offset is not None:
            assert response.headers.get("BITS-Received-Content-Range") == str(offset)

    for kind, slot, a, b, total_kind, spelling, shape, which in ops:
        path = paths[slot]
        known = slot_sids[slot]
        sid = known[which % len(known)] if known else None
        if sid is None and kind in ("fragment", "close", "cancel", "wrongpath"):
            kind = "create"  # the "unknown" ops cover packets before any Create-Session
        if kind == "ping":
            expect(send_packet(path, "Ping"), 200)
        elif kind == "create":
            response = send_packet(path, "Create-Session")
            if slot in files:
                expect(response, 409, E_ACCESSDENIED)
            else:
                expect(response, 200)
                new = response.headers["BITS-Session-Id"]
                sessions[new] = _ModelSession(slot)
                known.append(new)
        elif kind in ("unknown", "foreign") or sid is None:
            ptype = ["Fragment", "Close-Session", "Cancel-Session"][a % 3]
            victim = ["victim", "victim-done", "victim-closed"][b % 3]
            other = (spell(arena.sids[victim], spelling) if kind == "foreign"
                     else f"{{{uuid.UUID(int=a * 64 + b)}}}")
            expect(send_packet(path, ptype, other, rng="bytes 0-0/1" if a % 3 == 0 else None,
                               body=b"x" if a % 3 == 0 else b""), 500, NOT_FOUND)
        elif kind == "wrongpath":
            ptype = ["Fragment", "Close-Session", "Cancel-Session"][a % 3]
            expect(send_packet(paths[(slot + 1) % 3], ptype, spell(sid, spelling),
                               rng="bytes 0-0/1" if a % 3 == 0 else None,
                               body=b"x" if a % 3 == 0 else b""), 500, NOT_FOUND)
        elif kind in ("close", "cancel"):
            model = sessions[sid]
            ptype = "Close-Session" if kind == "close" else "Cancel-Session"
            response = send_packet(path, ptype, spell(sid, spelling))
            if model.gone:
                expect(response, 200)
            elif kind == "close" and model.total is None and slot in files:
                expect(response, 409, E_ACCESSDENIED)  # the empty file may not overwrite
            else:
                expect(response, 200)
                if kind == "close" and model.total is None:
                    files[slot] = b""
                model.gone = True
        else:
            model = sessions[sid]
            _fragment_step(model, send_packet, expect, path, spell(sid, spelling), a, b,
                           total_kind, shape, totals[slot], contents[slot], files)

    for sid, model in sessions.items():
        state = arena.store.peek(sid)
        if model.gone:
            assert state is None
            continue
        assert state is not None and state.received == model.received
        if model.phase != "finished":
            data = Path(arena.store.data_path(sid)).read_bytes()
            assert data == contents[model.slot][:model.received]
    for slot in range(3):
        on_disk = arena.uploads / f"seq-{slot}.bin"
        if slot in files:
            assert on_disk.read_bytes() == files[slot]
        else:
            assert not on_disk.exists()


def _fragment_step(model: _ModelSession, send_packet: t.Callable[..., t.Any],
                   expect: t.Callable[..., None], path: str, sid: str, a: int, b: int,
                   total_kind: str, shape: str, slot_total: int, content: bytes,
                   files: dict[int, bytes]) -> None:
    total = slot_total if total_kind == "T" else slot_total + 1 + a % 3
    # Mostly where the server is (as a client resumes), else an overlap or anywhere.
    first = [model.received, model.received, max(model.received - b % 4, 0),
             a % (total + 2)][a % 4]
    count = b % (total + 3) if a % 4 == 3 else 1 + b % max(total - first + 1, 1)
    if total == 0 and count == 0:
        first, rng = 0, "bytes */0"
    else:
        count = max(count, 1)
        rng = f"bytes {first}-{first + count - 1}/{total}"
    last = first + count - 1
    data = content[first:first + count]
    body = {"full": data, "short": data[:len(data) // 2], "long": data + b"EXTRA"}[shape]
    response = send_packet(path, "Fragment", sid, body, length=count, rng=rng)
    if model.gone:
        return expect(response, 500, NOT_FOUND)
    valid = (total == 0 and count == 0) or first <= last < total
    if not valid or (model.total is not None and total != model.total):
        return expect(response, 400, E_INVALIDARG, model.received)
    if model.phase != "receiving":
        return _final_step(model, response, expect, files, content)
    if first > model.received:
        return expect(response, 416, None, model.received)
    model.total = total
    if last >= model.received:
        skip = model.received - first
        wanted = last + 1 - model.received
        written = wanted if shape != "short" else max(0, min(wanted, len(body) - skip))
        model.received += written
        if written < wanted:
            return expect(response, 400, E_INVALIDARG, model.received)
    if model.received < total:
        return expect(response, 200, None, model.received)
    model.phase = "complete"
    return _final_step(model, response, expect, files, content)


def _final_step(model: _ModelSession, response: t.Any, expect: t.Callable[..., None],
                files: dict[int, bytes], content: bytes) -> None:
    assert model.total is not None
    if model.phase == "finished":
        return expect(response, 200, None, model.total)
    if model.slot in files:
        return expect(response, 409, E_ACCESSDENIED, model.total)
    files[model.slot] = content[:model.total]
    model.phase = "finished"
    return expect(response, 200, None, model.total)


# ===========================================================================================
# Hand-written cases, one category at a time
# ===========================================================================================


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """``tmp_path/base`` with ``uploads/sub/`` and ``uploads/finished.bin``; ``tmp_path``
    itself holds ``outside/target.txt`` (never to be touched)."""
    base = tmp_path / "base"
    (base / "uploads" / "sub").mkdir(parents=True)
    (base / "uploads" / "finished.bin").write_bytes(b"finished\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "target.txt").write_bytes(b"outside target\n")
    return base


@pytest.fixture
def app(folders: Path) -> t.Any:
    return bits_app(folders)


def _outside_is_untouched(folders: Path) -> None:
    outside = folders.parent / "outside"
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert (outside / "target.txt").read_bytes() == b"outside target\n"
    assert sorted(p.name for p in folders.parent.iterdir()) == ["base", "outside"]
    assert sorted(p.name for p in folders.iterdir()) == ["sessions", "uploads"]


# -- Content-Range ------------------------------------------------------------------------


@pytest.mark.parametrize(("content_range", "length", "status"), [
    ("bytes 0-4/10", 5, 200),
    ("Bytes 0-4/10", 5, 200),
    ("bytes\t0-4/10", 5, 200),
    (" bytes 0-4/10 ", 5, 200),
    ("bytes 0-4/9223372036854775807", 5, 200),   # the largest total a file offset can hold
    # overflows
    ("bytes 0-4/9223372036854775808", 5, 400),
    ("bytes 0-4/18446744073709551616", 5, 400),
    ("bytes 0-4/99999999999999999999", 5, 400),
    ("bytes 0-99999999999999999999/10", 5, 400),
    ("bytes 00000000000000000000-4/10", 5, 400),
    # negatives and signs
    ("bytes -1-4/10", 5, 400),
    ("bytes 0--5/10", 5, 400),
    ("bytes 0-4/-10", 5, 400),
    ("bytes +0-4/10", 5, 400),
    # non-ASCII digits (int() would take them)
    ("bytes \uff10-\uff14/10", 5, 400),
    ("bytes \u0660-\u0664/10", 5, 400),
    ("bytes 0-4/1\u0660", 5, 400),
    ("bytes 0-4/\U0001d7d9\U0001d7d8", 5, 400),
    ("bytes 0-4/1\u00b2", 5, 400),
    # whitespace tricks
    ("bytes 0 - 4/10", 5, 400),
    ("bytes0-4/10", 5, 400),
    ("bytes 0-4 /10", 5, 400),
    ("bytes 0-4/ 10", 5, 400),
    ("bytes\u00a00-4/10", 5, 400),
    ("bytes\r\n 0-4/10", 5, 400),
    ("bytes\x0b0-4/10", 5, 400),
    ("by\u017ftes 0-4/10", 5, 400),               # 'ſ' folds to 's' without re.ASCII
    # missing parts
    ("", 5, 400),
    ("bytes", 5, 400),
    ("bytes 0-4", 5, 400),
    ("bytes 0-4/", 5, 400),
    ("bytes -4/10", 5, 400),
    ("bytes 0-/10", 5, 400),
    ("bytes */10", 5, 400),
    ("bytes 0-4/*", 5, 400),
    ("0-4/10", 5, 400),
    ("bytes=0-4/10", 5, 400),
    # inconsistent
    ("bytes 4-0/10", 5, 400),
    ("bytes 0-10/10", 11, 400),
    ("bytes 0-4/10", 4, 400),
    ("bytes 0-4/10", 6, 400),
    ("bytes 0-4/10, bytes 5-9/10", 5, 400),
    # a gap: nothing written, the client is told where to resume
    ("bytes 5-9/10", 5, 416),
])
def test_content_range_cases(app: t.Any, content_range: str, length: int, status: int) -> None:
    sid = create(app, "/bits/range.bin")
    body = bytes(range(length))
    response = post(app, "/bits/range.bin", "Fragment", body, session_id=sid,
                    headers=[("Content-Range", wire_value(content_range))])
    assert_ack(response, status, {200: None, 400: E_INVALIDARG, 416: None}[status])
    offset = response.headers.get("BITS-Received-Content-Range")
    assert offset == ("5" if status == 200 else "0") or (status == 400 and offset is None)
    state = app.extensions["bits"]["bits"].store.peek(sid)
    assert state.received == (5 if status == 200 else 0)


def test_missing_content_range_is_400(app: t.Any) -> None:
    sid = create(app, "/bits/range.bin")
    assert_ack(post(app, "/bits/range.bin", "Fragment", b"abc", session_id=sid), 400,
               E_INVALIDARG)


# -- Content-Length and bodies ------------------------------------------------------------


@pytest.mark.parametrize("packet", ["Ping", "Create-Session", "Fragment", "Close-Session",
                                    "Cancel-Session"])
def test_missing_content_length_is_400(app: t.Any, packet: str) -> None:
    sid = create(app, "/bits/cl.bin")
    response = post(app, "/bits/cl.bin", packet, session_id=sid, content_length=None,
                    headers=[("Content-Range", "bytes 0-0/1")] if packet == "Fragment" else [])
    assert_ack(response, 400, E_INVALIDARG)


@pytest.mark.parametrize("value", ["", "-1", "+5", " 5x", "0x5", "\uff15", "\u0665", "5, 5",
                                   "1e1", "99999999999999999999", "abc", "5\x00"])
def test_malformed_content_length_is_400(app: t.Any, value: str) -> None:
    sid = create(app, "/bits/cl.bin")
    response = post(app, "/bits/cl.bin", "Fragment", b"hello", session_id=sid,
                    content_length=wire_value(value), headers=[("Content-Range", "bytes 0-4/5")])
    assert_ack(response, 400, E_INVALIDARG)
    assert app.extensions["bits"]["bits"].store.peek(sid).received == 0


@pytest.mark.parametrize("packet", ["Ping", "Create-Session", "Close-Session",
                                    "Cancel-Session"])
def test_body_on_a_bodiless_packet_is_400(app: t.Any, packet: str) -> None:
    sid = create(app, "/bits/cl.bin")
    assert_ack(post(app, "/bits/cl.bin", packet, b"abc", session_id=sid), 400, E_INVALIDARG)
    assert app.extensions["bits"]["bits"].store.peek(sid) is not None


def test_body_shorter_than_content_length_keeps_what_arrived(app: t.Any) -> None:
    sid = create(app, "/bits/short.bin")
    response = post(app, "/bits/short.bin", "Fragment", b"hello", session_id=sid,
                    content_length="10", headers=[("Content-Range", "bytes 0-9/10")])
    assert_ack(response, 400, E_INVALIDARG)
    assert response.headers["BITS-Received-Content-Range"] == "5"
    store = app.extensions["bits"]["bits"].store
    assert Path(store.data_path(sid)).read_bytes() == b"hello"
    # The client resumes where the server says; the file is exactly what was sent.
    assert_ack(fragment(app, "/bits/short.bin", sid, b"world", 5, 10), 200)
    assert (Path(store.folder).parent / "uploads" / "short.bin").read_bytes() == b"helloworld"


def test_body_longer_than_content_length_stores_only_the_range(app: t.Any,
                                                               folders: Path) -> None:
    sid = create(app, "/bits/long.bin")
    response = post(app, "/bits/long.bin", "Fragment", b"helloEXTRA-BYTES", session_id=sid,
                    content_length="5", headers=[("Content-Range", "bytes 0-4/5")])
    assert_ack(response, 200)
    assert (folders / "uploads" / "long.bin").read_bytes() == b"hello"


@pytest.mark.parametrize("encoding", ["chunked", "Chunked", "gzip, chunked", "CHUNKED "])
@pytest.mark.parametrize("with_length", [False, True])
@pytest.mark.parametrize("packet", ["Ping", "Create-Session", "Fragment"])
def test_chunked_bodies_are_refused(app: t.Any, folders: Path, encoding: str,
                                    with_length: bool, packet: str) -> None:
    sid = create(app, "/bits/chunked.bin")
    body = b"5\r\nhello\r\n0\r\n\r\n" if packet == "Fragment" else b"0\r\n\r\n"
    headers = [("Transfer-Encoding", encoding)]
    if packet == "Fragment":
        headers.append(("Content-Range", "bytes 0-4/5"))
    response = post(app, "/bits/chunked.bin", packet, body, session_id=sid, headers=headers,
                    content_length="5" if with_length else None)
    assert_ack(response, 400, E_INVALIDARG)
    assert not (folders / "uploads" / "chunked.bin").exists()
    assert app.extensions["bits"]["bits"].store.peek(sid).received == 0


# -- header values: size, CR/LF, control characters, duplicates -----------------------------


@pytest.mark.parametrize(("name", "size", "status"), [
    ("X-Anything", 4096, 200), ("X-Anything", 4097, 400), ("X-Anything", 65536, 400),
    ("Content-Name", 4097, 400), ("BITS-Session-Id", 4097, 400),
    ("BITS-Supported-Protocols", 4097, 400),
    # credentials may be longer (large Kerberos tokens), but not without bound
    ("Cookie", 4097, 200), ("Authorization", 8192, 200), ("Cookie", 64 * 1024 + 1, 400),
    ("Authorization", 100_000, 400), ("Proxy-Authorization", 100_000, 400),
])
def test_header_value_over_4kb_is_400(app: t.Any, name: str, size: int, status: int) -> None:
    response = post(app, "/bits/big-header.bin", "Ping", headers=[(name, "a" * size)])
    assert_ack(response, status, None if status == 200 else E_INVALIDARG)


@pytest.mark.parametrize("value", ["a\r\nBITS-Packet-Type: Ack", "a\rb", "a\nb", "\x00",
                                   "a\x1bb", "\x7f"])
@pytest.mark.parametrize("name", ["X-Anything", "BITS-Session-Id", "Content-Range",
                                  "Content-Name"])
def test_cr_lf_and_control_characters_in_values_are_400(app: t.Any, folders: Path,
                                                        name: str, value: str) -> None:
    sid = create(app, "/bits/ctl.bin")
    headers = {"Content-Range": "bytes 0-4/5", "BITS-Session-Id": sid}
    headers[name] = headers.get(name, "") + value
    response = post(app, "/bits/ctl.bin", "Fragment", b"hello", headers=list(headers.items()))
    assert_ack(response, 400, E_INVALIDARG)
    assert not (folders / "uploads" / "ctl.bin").exists()


def test_a_tab_in_a_value_is_fine(app: t.Any) -> None:
    assert_ack(post(app, "/bits/x.bin", "Ping", headers=[("X-Anything", "a\tb")]), 200)


@pytest.mark.parametrize(("name", "second", "status", "error"), [
    ("BITS-Packet-Type", "Fragment", 400, E_INVALIDARG),
    ("BITS-Packet-Type", "Ping", 400, E_INVALIDARG),
    ("BITS-Session-Id", "<sid>", 500, NOT_FOUND),
    ("BITS-Session-Id", "{00000000-0000-0000-0000-000000000000}", 500, NOT_FOUND),
    ("Content-Range", "bytes 0-4/5", 400, E_INVALIDARG),
    ("Content-Length", "5", 400, E_INVALIDARG),
])
def test_duplicate_headers(app: t.Any, folders: Path, name: str, second: str, status: int,
                           error: str) -> None:
    """Repeated headers arrive joined with ', ' (gunicorn, werkzeug): never a valid value."""
    sid = create(app, "/bits/dup.bin")
    headers = [("BITS-Packet-Type", "Fragment"), ("BITS-Session-Id", sid),
               ("Content-Range", "bytes 0-4/5"), (name, second.replace("<sid>", sid))]
    response = send(app, raw_environ(wire_path("/bits/dup.bin"), headers, b"hello"))
    assert_ack(response, status, error)
    assert not (folders / "uploads" / "dup.bin").exists()


# -- session ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(("spelling", "found"), [
    (lambda sid: sid, True),
    (lambda sid: sid.lower(), True),
    (lambda sid: sid.strip("{}"), True),
    (lambda sid: sid.strip("{}").lower(), True),
    (lambda sid: f" {sid}\t", True),
    (lambda sid: "{" + sid.strip("{}"), False),
    (lambda sid: sid.strip("{}") + "}", False),
    (lambda sid: "{" + sid + "}", False),
    (lambda sid: sid.replace("-", ""), False),
    (lambda sid: sid.replace("A", "\uff21").replace("B", "\uff22").replace("C", "\uff23")
     .replace("D", "\uff24").replace("E", "\uff25").replace("F", "\uff26")
     .replace("0", "\uff10"), False),
    (lambda sid: "../" + sid, False),
    (lambda sid: sid + "/..", False),
    (lambda sid: f"{sid}, {sid}", False),
    (lambda sid: "../../sessions/" + sid, False),
    (lambda sid: "..\\..\\" + sid, False),
    (lambda sid: "\u00e9" * 50, False),
    (lambda sid: "x" * 100, False),
    (lambda sid: "x" * 4096, False),
])
def test_session_id_spellings(app: t.Any, spelling: t.Callable[[str], str],
                              found: bool) -> None:
    sid = create(app, "/bits/id.bin")
    response = fragment(app, "/bits/id.bin", sid, b"abc", 0, 5)
    response = post(app, "/bits/id.bin", "Fragment", b"de",
                    session_id=wire_value(spelling(sid)),
                    headers=[("Content-Range", "bytes 3-4/5")])
    if found:
        assert_ack(response, 200)
        assert response.headers["BITS-Session-Id"] == sid  # canonical form
    else:
        assert_ack(response, 500, NOT_FOUND)
        assert app.extensions["bits"]["bits"].store.peek(sid).received == 3


@pytest.mark.parametrize(("value", "status", "error"), [
    ("\x00", 400, E_INVALIDARG),
    ("{00000000-0000-0000-0000-00000000000\x00}", 400, E_INVALIDARG),
    ("x" * 10240, 400, E_INVALIDARG),
    ("{" + "0" * 4095 + "}", 400, E_INVALIDARG),
    ("", 500, NOT_FOUND),
    ("{}", 500, NOT_FOUND),
    ("../../../../etc/passwd", 500, NOT_FOUND),
    ("state.json", 500, NOT_FOUND),
    ("..", 500, NOT_FOUND),
    ("CON", 500, NOT_FOUND),
])
@pytest.mark.parametrize("packet", ["Fragment", "Close-Session", "Cancel-Session"])
def test_malformed_session_ids(app: t.Any, folders: Path, value: str, status: int,
                               error: str, packet: str) -> None:
    response = post(app, "/bits/x.bin", packet, b"a" if packet == "Fragment" else b"",
                    session_id=value,
                    headers=[("Content-Range", "bytes 0-0/1")] if packet == "Fragment" else [])
    assert_ack(response, status, error)
    assert "BITS-Session-Id" not in response.headers  # nothing of the input is echoed
    _outside_is_untouched(folders)
    assert sorted(p.name for p in (folders / "sessions" / "sessions").iterdir()) == []
    assert sorted(p.name for p in (folders / "sessions" / "tombstones").iterdir()) == []


# -- remote paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "status"), [
    # traversal, once decoded by the WSGI server
    ("/bits/../outside/x.txt", 403),
    ("/bits/%2e%2e/outside/x.txt", 403),
    ("/bits/%2e%2e%2foutside%2fx.txt", 403),
    ("/bits/..%2f..%2fx.txt", 403),
    ("/bits/%2E%2E%2F%2E%2E%2Fx.txt", 403),
    ("/bits/sub/../../x.txt", 403),
    ("/bits/sub/%2e%2e/finished.bin", 403),
    ("/bits/./x.txt", 403),
    ("/bits/sub/%2e/x.txt", 403),
    # overlong UTF-8 and other undecodable bytes
    ("/bits/%c0%ae%c0%ae/x.txt", 400),
    ("/bits/%c0%ae%c0%ae%c0%afx.txt", 400),
    ("/bits/%e0%80%ae%e0%80%ae/x.txt", 400),
    ("/bits/%ff.txt", 400),
    ("/bits/%ef%bf%bd.txt", 400),   # a literal U+FFFD
    # backslashes, drive letters, UNC, alternate data streams
    ("/bits/..%5cx.txt", 403),
    ("/bits/a%5cb.txt", 403),
    ("/bits/..\\x.txt", 403),
    ("/bits/C:%5cWindows%5cwin.ini", 403),
    ("/bits/C:x.txt", 403),
    ("/bits/c:", 403),
    ("/bits/%5c%5cserver%5cshare%5cx.txt", 403),
    ("/bits/x.txt:stream", 403),
    ("/bits//server/share/x.txt", 400),
    # Windows device names, any case, with extensions
    ("/bits/CON", 403), ("/bits/con.txt", 403), ("/bits/nul.txt", 403),
    ("/bits/NUL.tar.gz", 403), ("/bits/COM1", 403), ("/bits/com9.log", 403),
    ("/bits/LPT1", 403), ("/bits/aux", 403), ("/bits/PRN.x", 403), ("/bits/CONIN$", 403),
    ("/bits/sub/con", 403), ("/bits/COM%c2%b9", 403), ("/bits/CON%20.txt", 403),
    # trailing dots and spaces
    ("/bits/x.txt.", 400), ("/bits/x.txt..", 400), ("/bits/x.txt%20", 400),
    ("/bits/%20x.txt", 400), ("/bits/sub./x.txt", 400), ("/bits/x.txt.%20", 400),
    # very long names and paths
    ("/bits/" + "x" * 255, 200),
    ("/bits/" + "x" * 256, 400),
    ("/bits/" + "%c3%a9" * 128, 400),
    ("/bits/" + "d/" * 600 + "x", 400),
    ("/bits/" + "x" * 20000, 400),
    # empty segments and folders
    ("/bits//x.txt", 400), ("/bits/sub//x.txt", 400), ("/bits/sub/", 400), ("/bits/sub", 400),
    ("/bits/", 400), ("/bits", 400),
    # the server's own names, NUL and control characters
    ("/bits/.bits-x.tmp", 403), ("/bits/sub/.bits-reply", 403),
    ("/bits/%00", 400), ("/bits/x%00.txt", 400), ("/bits/x%01.txt", 400),
    ("/bits/x%09.txt", 400), ("/bits/x%7f.txt", 400),
    ("/bits/x%0a.txt", 400), ("/bits/x%0d%0a.txt", 400),
    # missing folders are never created; a file is not a folder
    ("/bits/nosuchdir/x.txt", 404), ("/bits/finished.bin/x.txt", 403),
    # what stays inside is fine, whatever it looks like
    ("/bits/%252e%252e%252fx.txt", 200),   # double encoding: the literal name "%2e%2e%2fx.txt"
    ("/bits/..x.txt", 200), ("/bits/x..txt", 200), ("/bits/.hidden", 200),
    ("/bits/\uff0e\uff0e", 200), ("/bits/console.txt", 200), ("/bits/com10.txt", 200),
    ("/bits/%c3%bcber.txt", 200), ("/bits/sub/new.txt", 200), ("/bits/x.txt?a=..%2f..", 200),
])
def test_remote_paths(app: t.Any, folders: Path, target: str, status: int) -> None:
    response = post(app, target, "Create-Session")
    error = {200: None, 400: E_INVALIDARG, 403: E_ACCESSDENIED, 404: "0x80070003"}[status]
    assert_ack(response, status, error)
    if status == 200:
        sid = response.headers["BITS-Session-Id"]
        assert_ack(post(app, target, "Close-Session", session_id=sid), 200)
        path, _, _ = target.partition("?")
        remote = _remote_of(wire_path(path), "/bits")
        assert (folders / "uploads" / remote).read_bytes() == b""
    _outside_is_untouched(folders)
    assert (folders / "uploads" / "finished.bin").read_bytes() == b"finished\n"


@pytest.mark.parametrize("packet", ["Fragment", "Close-Session", "Cancel-Session"])
def test_session_packets_check_the_path_too(app: t.Any, folders: Path, packet: str) -> None:
    """A session is bound to its path: its id sent to any other URL is an unknown id."""
    sid = create(app, "/bits/bound.bin")
    for target in ("/bits/other.bin", "/bits/%2e%2e/bound.bin", "/bits/sub/../bound.bin",
                   "/bits/BOUND.bin", "/bits//bound.bin", "/bits/bound.bin/"):
        response = post(app, target, packet, b"a" if packet == "Fragment" else b"",
                        session_id=sid,
                        headers=[("Content-Range", "bytes 0-0/1")] if packet == "Fragment"
                        else [])
        assert_ack(response, 500, NOT_FOUND)
    assert app.extensions["bits"]["bits"].store.peek(sid) is not None
    assert sorted(p.name for p in (folders / "uploads").iterdir()) == ["finished.bin", "sub"]


# -- packets in the wrong order --------------------------------------------------------------


def test_packets_in_the_wrong_order(app: t.Any, folders: Path) -> None:
    path = "/bits/order.bin"
    unknown = f"{{{uuid.uuid4()}}}"
    # Before any Create-Session: every session packet names an unknown session.
    assert_ack(fragment(app, path, unknown, b"abc", 0, 3), 500, NOT_FOUND)
    assert_ack(post(app, path, "Close-Session", session_id=unknown), 500, NOT_FOUND)
    assert_ack(post(app, path, "Cancel-Session", session_id=unknown), 500, NOT_FOUND)
    # Ping never creates or names a session, whatever it carries.
    ping = assert_ack(post(app, path, "Ping", session_id=unknown), 200)
    assert "BITS-Session-Id" not in ping.headers
    # Create-Session ignores a session id sent along and makes a new one.
    sid = create(app, path, session_id=unknown)
    assert sid.upper() != unknown.upper()
    # Fragments out of order: a gap is 416 and writes nothing.
    assert_ack(fragment(app, path, sid, b"def", 3, 6), 416)
    assert_ack(fragment(app, path, sid, b"abc", 0, 6), 200)
    assert_ack(fragment(app, path, sid, b"abc", 0, 6), 200)  # repeated: nothing new
    assert_ack(fragment(app, path, sid, b"def", 3, 6), 200)  # completes
    assert (folders / "uploads" / "order.bin").read_bytes() == b"abcdef"
    # After completion: a retried fragment gets the same Ack, the file stays.
    again = assert_ack(fragment(app, path, sid, b"def", 3, 6), 200)
    assert again.headers["BITS-Received-Content-Range"] == "6"
    # A second Create-Session for the finished file: the file exists.
    assert_ack(post(app, path, "Create-Session"), 409, E_ACCESSDENIED)
    assert_ack(post(app, path, "Close-Session", session_id=sid), 200)
    assert_ack(post(app, path, "Close-Session", session_id=sid), 200)   # tombstone
    assert_ack(post(app, path, "Cancel-Session", session_id=sid), 200)  # tombstone
    assert_ack(fragment(app, path, sid, b"def", 3, 6), 500, NOT_FOUND)
    assert (folders / "uploads" / "order.bin").read_bytes() == b"abcdef"
    # Cancel before completion: nothing reaches the destination.
    sid2 = create(app, "/bits/cancelled.bin")
    assert_ack(fragment(app, "/bits/cancelled.bin", sid2, b"abc", 0, 6), 200)
    assert_ack(post(app, "/bits/cancelled.bin", "Cancel-Session", session_id=sid2), 200)
    assert_ack(fragment(app, "/bits/cancelled.bin", sid2, b"def", 3, 6), 500, NOT_FOUND)
    assert not (folders / "uploads" / "cancelled.bin").exists()
    _outside_is_untouched(folders)


@pytest.mark.parametrize("packet_type", [None, "", "Ack", "Fragment, Fragment", "Frag ment",
                                         "Create_Session", "x" * 100, "\u00c5ck"])
def test_unknown_packet_types_are_400(app: t.Any, packet_type: str | None) -> None:
    response = post(app, "/bits/x.bin", None,
                    headers=[] if packet_type is None else
                    [("BITS-Packet-Type", wire_value(packet_type))])
    assert_ack(response, 400, E_INVALIDARG)


@pytest.mark.parametrize("packet_type", ["ping", "PING", " Ping ", "create-session",
                                         "CREATE-SESSION"])
def test_packet_types_are_case_insensitive(app: t.Any, packet_type: str) -> None:
    response = post(app, "/bits/case.bin", None,
                    headers=[("BITS-Packet-Type", packet_type),
                             ("BITS-Supported-Protocols", PROTOCOL)])
    assert_ack(response, 200)


# ===========================================================================================
# Symlinks planted in the upload folder, and swaps between the checks and the commit
# ===========================================================================================


@pytest.fixture
def planted(folders: Path) -> Path:
    """``uploads/evil -> outside`` (a folder link) and ``uploads/f.txt -> outside/target``
    (a file link); returns the ``outside`` folder."""
    outside = folders.parent / "outside"
    os.symlink(outside, folders / "uploads" / "evil")
    os.symlink(outside / "target.txt", folders / "uploads" / "f.txt")
    return outside


def _outside_unchanged(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert (outside / "target.txt").read_bytes() == b"outside target\n"


@pytest.mark.parametrize("target", ["/bits/evil/x.txt", "/bits/evil/target.txt",
                                    "/bits/evil/../x.txt", "/bits/f.txt/x.txt"])
@pytest.mark.parametrize("overwrites", [False, True])
def test_upload_through_a_folder_symlink_is_refused(folders: Path, planted: Path, target: str,
                                                    overwrites: bool) -> None:
    app = bits_app(folders, BITS_ALLOW_OVERWRITES=overwrites)
    assert_ack(post(app, target, "Create-Session"), 403, E_ACCESSDENIED)
    _outside_unchanged(planted)


def test_file_symlink_without_overwrites_is_409(folders: Path, planted: Path) -> None:
    app = bits_app(folders)
    assert_ack(post(app, "/bits/f.txt", "Create-Session"), 409, E_ACCESSDENIED)
    _outside_unchanged(planted)
    assert os.readlink(folders / "uploads" / "f.txt") == str(planted / "target.txt")


def test_file_symlink_with_overwrites_is_replaced_not_followed(folders: Path,
                                                               planted: Path) -> None:
    app = bits_app(folders, BITS_ALLOW_OVERWRITES=True)
    sid = create(app, "/bits/f.txt")
    assert_ack(fragment(app, "/bits/f.txt", sid, b"new content", 0, 11), 200)
    link = folders / "uploads" / "f.txt"
    assert not link.is_symlink() and link.read_bytes() == b"new content"
    _outside_unchanged(planted)


def test_symlink_planted_at_the_destination_after_create(folders: Path) -> None:
    """Without overwrites the commit is a hard link: a symlink that appeared at the name
    since Create-Session makes it 409, and the link's target is untouched."""
    outside = folders.parent / "outside"
    app = bits_app(folders)
    sid = create(app, "/bits/late.txt")
    assert_ack(fragment(app, "/bits/late.txt", sid, b"abc", 0, 6), 200)
    os.symlink(outside / "target.txt", folders / "uploads" / "late.txt")
    assert_ack(fragment(app, "/bits/late.txt", sid, b"def", 3, 6), 409, E_ACCESSDENIED)
    _outside_unchanged(outside)
    assert (folders / "uploads" / "late.txt").is_symlink()


def test_toctou_folder_swapped_for_a_symlink_before_the_final_fragment(folders: Path) -> None:
    """Create-Session checks ``uploads/dir``; before the final fragment the attacker
    replaces ``dir`` with a symlink pointing out. The commit refuses (403) and nothing
    is written outside; the received bytes are kept, so once the folder is back the
    retried fragment completes the upload."""
    outside = folders.parent / "outside"
    uploads = folders / "uploads"
    (uploads / "dir" / "deeper").mkdir(parents=True)
    app = bits_app(folders)
    for target, swapped in (("/bits/dir/x.txt", uploads / "dir"),
                            ("/bits/dir/deeper/y.txt", uploads / "dir")):
        sid = create(app, target)
        assert_ack(fragment(app, target, sid, b"abc", 0, 6), 200)
        os.rename(swapped, uploads / "dir.real")
        os.symlink(outside, swapped)
        assert_ack(fragment(app, target, sid, b"def", 3, 6), 403, E_ACCESSDENIED)
        _outside_unchanged(outside)
        os.unlink(swapped)
        os.rename(uploads / "dir.real", swapped)
        assert_ack(fragment(app, target, sid, b"def", 3, 6), 200)
        assert (uploads / target.removeprefix("/bits/")).read_bytes() == b"abcdef"
    _outside_unchanged(outside)


def test_toctou_swap_after_the_folder_was_opened(folders: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap happens *inside* the commit, after the folder chain was checked and
    opened: the file still lands in the folder that was opened (now renamed), never
    behind the symlink."""
    outside = folders.parent / "outside"
    uploads = folders / "uploads"
    (uploads / "dir").mkdir()
    original = bits_paths.open_parent
    armed = []

    @contextlib.contextmanager
    def racing_open_parent(root: str, names: t.Sequence[str]) -> t.Iterator[int]:
        with original(root, names) as fd:
            if armed:
                armed.clear()
                os.rename(uploads / "dir", uploads / "dir.real")
                os.symlink(outside, uploads / "dir")
            yield fd

    monkeypatch.setattr(bits_paths, "open_parent", racing_open_parent)
    for overwrites in (False, True):
        app = bits_app(folders, BITS_ALLOW_OVERWRITES=overwrites)
        sid = create(app, "/bits/dir/x.txt")
        armed.append(True)  # swap during the commit of the completing fragment
        assert_ack(fragment(app, "/bits/dir/x.txt", sid, b"abcdef", 0, 6), 200)
        assert not armed
        _outside_unchanged(outside)
        assert (uploads / "dir.real" / "x.txt").read_bytes() == b"abcdef"
        os.unlink(uploads / "dir")
        shutil.rmtree(uploads / "dir.real")
        (uploads / "dir").mkdir()


def test_symlinked_upload_folder_children_are_not_listed_or_followed(folders: Path,
                                                                     planted: Path) -> None:
    """Close-Session of a session whose path leads through a symlink commits nothing."""
    app = bits_app(folders)
    sid = create(app, "/bits/real.bin")
    # The session's path was fine at creation; now its name becomes a folder symlink.
    os.symlink(planted, folders / "uploads" / "real.bin")
    assert_ack(post(app, "/bits/real.bin", "Close-Session", session_id=sid), 409,
               E_ACCESSDENIED)
    _outside_unchanged(planted)


# ===========================================================================================
# Ownership: alice and bob against a real gunicorn with HTTP Basic (EXAMPLE_AUTH=basic)
# ===========================================================================================


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ALICE = _basic("alice", "alice-pw")
BOB = _basic("bob", "bob-pw")
ANONYMOUS: dict[str, str] = {}


class Wire(t.NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def _request(base_url: str, method: str, path: str, headers: t.Mapping[str, str],
             body: bytes = b"") -> Wire:
    """One request on a fresh connection; every header of the answer, in order."""
    parts = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        hdrs = {"Content-Length": str(len(body)), **headers}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Wire(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def _bits(base_url: str, path: str, packet: str, who: t.Mapping[str, str], *,
          sid: str | None = None, body: bytes = b"", rng: str | None = None,
          extra: t.Mapping[str, str] | None = None) -> Wire:
    headers = {"BITS-Packet-Type": packet, **who, **(extra or {})}
    if packet == "Create-Session":
        headers["BITS-Supported-Protocols"] = PROTOCOL
    if sid is not None:
        headers["BITS-Session-Id"] = sid
    if rng is not None:
        headers["Content-Range"] = rng
    reply = _request(base_url, "BITS_POST", path, headers, body)
    assert reply.get("BITS-Packet-Type") == "Ack" and reply.get("Content-Length") == "0"
    assert reply.body == b""
    return reply


def _mentions(reply: Wire, secrets: t.Iterable[str]) -> list[str]:
    return [f"{k}: {v}" for k, v in reply.headers for s in secrets if s.lower() in v.lower()]


@pytest.fixture(scope="module")
def basic_server(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[t.Any]:
    from servers import GunicornServer

    base = tmp_path_factory.mktemp("basic-auth")
    env = {"EXAMPLE_AUTH": "basic", "BITS_UPLOAD_FOLDER": str(base / "uploads"),
           "BITS_SESSION_FOLDER": str(base / "sessions"), "BITS_CLEANUP_INTERVAL": "0"}
    with GunicornServer(env=env, workers=2, log_path=base / "gunicorn.log") as server:
        server.base = base
        yield server


@pytest.mark.integration
@pytest.mark.parametrize("packet", ["Ping", "Create-Session", "Fragment", "Close-Session",
                                    "Cancel-Session"])
@pytest.mark.parametrize("who", [ANONYMOUS, _basic("alice", "wrong"), _basic("mallory", "x"),
                                 {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"},
                                 _basic("alice", "")])
def test_unauthenticated_packets_get_a_401_challenge(basic_server: t.Any, packet: str,
                                                     who: dict[str, str]) -> None:
    reply = _bits(basic_server.url, "/bits/anon.bin", packet, who,
                  sid=f"{{{uuid.uuid4()}}}" if packet not in ("Ping", "Create-Session") else None,
                  body=b"x" if packet == "Fragment" else b"",
                  rng="bytes 0-0/1" if packet == "Fragment" else None)
    assert reply.status == 401
    assert (reply.get("WWW-Authenticate") or "").startswith("Basic ")
    assert reply.get("BITS-Session-Id") is None or packet not in ("Ping", "Create-Session")
    assert not (basic_server.base / "uploads" / "anon.bin").exists()


@pytest.mark.integration
def test_another_users_session_is_an_unknown_session(basic_server: t.Any) -> None:
    url = basic_server.url
    path = "/bits/alice-secret.bin"
    data = b"ALICEDATA0123456789"
    secrets = ["alice", "alice-secret", data.decode(), str(basic_server.base)]

    sid = _bits(url, path, "Create-Session", ALICE).get("BITS-Session-Id")
    assert sid
    first = _bits(url, path, "Fragment", ALICE, sid=sid, body=data[:9],
                  rng=f"bytes 0-8/{len(data)}")
    assert first.status == 200 and first.get("BITS-Received-Content-Range") == "9"

    def as_unknown(packet: str, session_id: str, *, body: bytes = b"",
                   rng: str | None = None, target: str = path) -> None:
        """bob's answer for ``session_id`` equals his answer for a random unknown id."""
        got = _bits(url, target, packet, BOB, sid=session_id, body=body, rng=rng)
        unknown = _bits(url, target, packet, BOB, sid=f"{{{uuid.uuid4()}}}", body=body,
                        rng=rng)
        assert got.status == unknown.status == 500
        assert got.get("BITS-Error-Code") == NOT_FOUND
        assert comparable_headers(got.headers) == comparable_headers(unknown.headers)
        assert not _mentions(got, secrets)

    for spelling in (sid, sid.lower(), sid.strip("{}")):
        as_unknown("Fragment", spelling, body=data[9:], rng=f"bytes 9-18/{len(data)}")
        as_unknown("Fragment", spelling, body=data, rng=f"bytes 0-18/{len(data)}")
        as_unknown("Close-Session", spelling)
        as_unknown("Cancel-Session", spelling)
        as_unknown("Fragment", spelling, body=b"x", rng="bytes 0-0/1", target="/bits/bob.bin")
    # Nothing bob did reached alice's session: she resumes where she was.
    rest = _bits(url, path, "Fragment", ALICE, sid=sid, body=data[9:],
                 rng=f"bytes 9-18/{len(data)}")
    assert rest.status == 200 and rest.get("BITS-Received-Content-Range") == str(len(data))
    assert (basic_server.base / "uploads" / "alice-secret.bin").read_bytes() == data
    # After completion, and after alice's Close (tombstone), still unknown to bob.
    as_unknown("Close-Session", sid)
    as_unknown("Fragment", sid, body=data[9:], rng=f"bytes 9-18/{len(data)}")
    assert _bits(url, path, "Close-Session", ALICE, sid=sid).status == 200
    assert _bits(url, path, "Close-Session", ALICE, sid=sid).status == 200  # repeated
    as_unknown("Close-Session", sid)
    as_unknown("Cancel-Session", sid)
    # bob cannot replace alice's file either (overwrites are off).
    create = _bits(url, path, "Create-Session", BOB)
    assert create.status == 409 and not _mentions(create, secrets)
    assert (basic_server.base / "uploads" / "alice-secret.bin").read_bytes() == data


@pytest.mark.integration
def test_reply_is_served_to_its_owner_only(basic_server: t.Any) -> None:
    url = basic_server.url
    path = "/reply/alice-reply.bin"
    data = b"alice's request for a reply"
    sid = _bits(url, path, "Create-Session", ALICE).get("BITS-Session-Id")
    final = _bits(url, path, "Fragment", ALICE, sid=sid, body=data,
                  rng=f"bytes 0-{len(data) - 1}/{len(data)}")
    assert final.status == 200, final
    reply_url = final.get("BITS-Reply-URL")
    assert reply_url
    reply_path = urllib.parse.urlsplit(reply_url).path
    expected = hashlib.sha256(data).hexdigest().encode() + b"\n"

    mine = _request(url, "GET", reply_path, ALICE)
    assert mine.status == 200 and mine.body == expected

    sid_hex, token = reply_path.rsplit("/", 2)[-2:]
    random_url = reply_path.replace(sid_hex, str(uuid.uuid4())).replace(token, "0" * 32)
    wrong_token = reply_path.replace(token, "0" * 32)
    secrets = ["alice", data.decode(), expected.decode().strip(), str(basic_server.base)]
    for method in ("GET", "HEAD"):
        bobs = _request(url, method, reply_path, BOB)
        assert bobs.status == 404 and expected not in bobs.body
        assert not _mentions(Wire(bobs.status, bobs.headers, b""), secrets)
        for other in (random_url, wrong_token):
            unknown = _request(url, method, other, BOB)
            assert (unknown.status, comparable_headers(unknown.headers), unknown.body) == (
                bobs.status, comparable_headers(bobs.headers), bobs.body)
        # Anonymous: what this server does is to challenge first (401 with Basic).
        anonymous = _request(url, method, reply_path, ANONYMOUS)
        assert anonymous.status == 401 and expected not in anonymous.body
        assert (anonymous.get("WWW-Authenticate") or "").startswith("Basic ")
    assert _bits(url, path, "Close-Session", ALICE, sid=sid).status == 200
    assert _request(url, "GET", reply_path, ALICE).status == 404  # gone with the session


@pytest.fixture
def example(folders: Path) -> t.Callable[..., t.Any]:
    """The example app (``/bits`` plain, ``/reply`` upload-reply) on the test folders."""
    from example_app import create_app

    def make(**config: t.Any) -> t.Any:
        return create_app({"TESTING": True, "BITS_UPLOAD_FOLDER": str(folders / "uploads"),
                           "BITS_SESSION_FOLDER": str(folders / "sessions"),
                           "BITS_CLEANUP_INTERVAL": 0, **config})

    return make


def _auth(who: t.Mapping[str, str]) -> list[tuple[str, str]]:
    return list(who.items())


def test_reply_url_probes_do_not_reveal_whether_a_session_exists(
        example: t.Callable[..., t.Any]) -> None:
    """SECURITY.md: a reply download from anyone but the owner gets exactly the answer an
    unknown session gets, "no existence oracle". An anonymous probe of a live session's
    reply URL, even with a wrong token, must be answered like a probe of a random id."""
    app = example(EXAMPLE_AUTH="basic")
    data = b"alice's upload"
    sid = create(app, "/reply/probe.bin", headers=_auth(ALICE))
    final = fragment(app, "/reply/probe.bin", sid, data, 0, len(data), headers=_auth(ALICE))
    reply_path = urllib.parse.urlsplit(assert_ack(final, 200).headers["BITS-Reply-URL"]).path
    sid_hex, token = reply_path.rsplit("/", 2)[-2:]
    client = app.test_client()
    live_wrong_token = client.get(reply_path.replace(token, "0" * 32))
    live = client.get(reply_path)
    unknown = client.get(reply_path.replace(sid_hex, str(uuid.uuid4())))
    answers = [(r.status_code, r.headers.get("WWW-Authenticate")) for r in
               (live_wrong_token, live, unknown)]
    assert answers[0] == answers[1] == answers[2], answers


def test_a_busy_foreign_session_is_still_an_unknown_session(folders: Path) -> None:
    """While alice's session is locked (her fragment is streaming), bob probing her id
    must get what an unknown id gets, at once: not a 503 "busy" after the lock timeout
    (an existence oracle, and a way to tie up workers on someone else's lock)."""
    app = bits_app(folders, BITS_LOCK_TIMEOUT=2)
    store = app.extensions["bits"]["bits"].store
    sid = create(app, "/bits/busy.bin", remote_user="alice")
    unknown_sid = f"{{{uuid.uuid4()}}}"
    with store.locker.hold(sid):
        for packet in ("Fragment", "Close-Session", "Cancel-Session"):
            kwargs: dict[str, t.Any] = {"remote_user": "bob"}
            if packet == "Fragment":
                kwargs.update(headers=[("Content-Range", "bytes 0-0/1")])
            started = time.monotonic()
            bob = post(app, "/bits/busy.bin", packet, b"x" if packet == "Fragment" else b"",
                       session_id=sid, **kwargs)
            waited = time.monotonic() - started
            unknown = post(app, "/bits/busy.bin", packet,
                           b"x" if packet == "Fragment" else b"", session_id=unknown_sid,
                           **kwargs)
            assert (bob.status_code, bob.headers.get("BITS-Error-Code")) == (
                unknown.status_code, unknown.headers.get("BITS-Error-Code")), packet
            assert comparable_headers(bob.headers.items()) == comparable_headers(
                unknown.headers.items())
            assert waited < 1, "bob waited for alice's lock"
    assert store.peek(sid) is not None


# ===========================================================================================
# Uploads disabled (PROTOCOL.md 6 step 2, A35)
# ===========================================================================================

_EVERY_PACKET = ["Ping", "Create-Session", "Fragment", "Close-Session", "Cancel-Session",
                 None, "Bogus"]


def _any_packet(app: t.Any, prefix: str, packet: str | None,
                who: t.Mapping[str, str]) -> t.Any:
    headers = _auth(who)
    if packet == "Fragment":
        headers.append(("Content-Range", "bytes 0-0/1"))
    return post(app, f"{prefix}/disabled.bin", packet, b"x" if packet == "Fragment" else b"",
                session_id=f"{{{uuid.uuid4()}}}" if packet in _EVERY_PACKET[2:5] else None,
                headers=headers)


@pytest.mark.parametrize("prefix", ["/bits", "/reply"])
@pytest.mark.parametrize("packet", _EVERY_PACKET)
def test_disabled_uploads_are_501_for_every_packet(example: t.Callable[..., t.Any],
                                                   folders: Path, prefix: str,
                                                   packet: str | None) -> None:
    app = example(BITS_UPLOAD_ENABLED=False)
    assert_ack(_any_packet(app, prefix, packet, ANONYMOUS), 501, E_ACCESSDENIED)
    assert sorted(p.name for p in (folders / "uploads").iterdir()) == ["finished.bin", "sub"]


@pytest.mark.parametrize("prefix", ["/bits", "/reply"])
@pytest.mark.parametrize("packet", _EVERY_PACKET)
def test_disabled_uploads_authenticate_first(example: t.Callable[..., t.Any], prefix: str,
                                             packet: str | None) -> None:
    app = example(BITS_UPLOAD_ENABLED=False, EXAMPLE_AUTH="basic")
    for who in (ANONYMOUS, _basic("alice", "wrong")):
        response = assert_ack(_any_packet(app, prefix, packet, who), 401)
        assert response.headers["WWW-Authenticate"].startswith("Basic ")
    for who in (ALICE, BOB):
        assert_ack(_any_packet(app, prefix, packet, who), 501, E_ACCESSDENIED)


# ===========================================================================================
# Hostile Host headers; notification URLs resolve to the server's own address
# ===========================================================================================

HOSTILE_HOSTS = [
    "evil.example", "evil.example:1234", "127.0.0.1:1", "[::1]:22", "evil.example:0",
    "evil.example:70000", "evil.example:99999999999999999999", "evil.example:-1",
    "evil.example:abc", "evil.example:", "[::1", "[::1]:99999", "user:pw@evil.example",
    "evil.example/../x", "\u00e9vil.example", "evil.example.", "x" * 300, "",
]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
@pytest.mark.parametrize("prefix", ["/bits", "/reply"])
def test_hostile_host_headers_are_not_internal_errors(example: t.Callable[..., t.Any],
                                                      caplog: pytest.LogCaptureFixture,
                                                      host: str, prefix: str) -> None:
    """The Host header is client input: whatever it says, the upload works (or is refused
    as a bad request), never a 500 E_FAIL with a traceback logged at ERROR."""
    app = example()
    caplog.set_level(logging.INFO, logger="flask_bits")
    host = wire_value(host)
    created = post(app, f"{prefix}/host.bin", "Create-Session", host=host)
    assert_ack(created)
    assert created.status_code in (200, 400), (created.status, dict(created.headers))
    if created.status_code == 200:
        sid = created.headers["BITS-Session-Id"]
        final = assert_ack(fragment(app, f"{prefix}/host.bin", sid, b"hello", 0, 5,
                                    host=host))
        assert final.status_code in (200, 400), (final.status, dict(final.headers))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.mark.parametrize(("notification_url", "destination", "expected"), [
    ("/app/sha256", "http://evil.example:1234/bits/x.bin", "http://127.0.0.1:8000/app/sha256"),
    ("app/sha256", "http://evil.example:1234/bits/sub/x.bin",
     "http://127.0.0.1:8000/bits/sub/app/sha256"),
    ("app", "http://evil.example/bits/x.bin?ACCOUNT=86433",
     "http://127.0.0.1:8000/bits/app?ACCOUNT=86433"),
    ("app?a=1", "http://evil.example/bits/x.bin?b=2", "http://127.0.0.1:8000/bits/app?a=1&b=2"),
    ("app", "http://user:pw@evil.example:1/bits/x.bin", "http://127.0.0.1:8000/bits/app"),
    ("app", "http://evil.example//evil2.example/x.bin",
     "http://127.0.0.1:8000/evil2.example/app"),
    ("app", "http://evil.example/bits/x.bin?q=%23@evil2.example",
     "http://127.0.0.1:8000/bits/app?q=%23@evil2.example"),
    ("http://app.internal:9000/hook", "http://evil.example/bits/x.bin?A=1",
     "http://app.internal:9000/hook?A=1"),
    ("https://app.internal/hook?k=v", "http://evil.example/bits/x.bin",
     "https://app.internal/hook?k=v"),
])
def test_resolve_notification_url(notification_url: str, destination: str,
                                  expected: str) -> None:
    from flask_bits.notify import resolve_notification_url

    url = resolve_notification_url(notification_url, destination, "http://127.0.0.1:8000")
    assert url == expected
    parts = urllib.parse.urlsplit(url)
    if not urllib.parse.urlsplit(notification_url).scheme:
        assert (parts.hostname, parts.port, parts.username) == ("127.0.0.1", 8000, None)


@pytest.mark.parametrize("query", ["a=1", "x=%0d%0aHost:%20evil.example", "a=1#@evil.example",
                                   "@evil.example:80/", "a=%2F%2Fevil.example"])
def test_resolve_notification_url_keeps_the_host_whatever_the_query(query: str) -> None:
    from flask_bits.notify import resolve_notification_url

    url = resolve_notification_url("/app/sha256", f"http://evil.example:1/bits/x?{query}",
                                   "http://127.0.0.1:8000")
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "http", "127.0.0.1", 8000, "/app/sha256")


@pytest.mark.integration
def test_notifications_go_to_the_servers_own_address_whatever_the_host(
        tmp_path: Path) -> None:
    """Type 2 with a relative BITS_NOTIFICATION_URL on a real gunicorn: requests whose
    Host names another server (a recording server on 127.0.0.1, or evil.example) still
    have the upload POSTed to the example app's own /app/sha256, and the "evil" server
    is never contacted."""
    from servers import GunicornServer

    env = {"BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
           "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
           "BITS_NOTIFICATION_TYPE": "2", "BITS_NOTIFICATION_URL": "/app/sha256",
           "BITS_REPLY_WAIT": "5", "BITS_CLEANUP_INTERVAL": "0"}
    with RecordingServer(b"from the evil server\n") as evil, \
            GunicornServer(env=env, workers=1, worker_class="gthread", threads=4,
                           log_path=tmp_path / "gunicorn.log") as server:
        hosts = [f"127.0.0.1:{evil.port}", f"localhost:{evil.port}", "evil.example:1234",
                 "evil.example"]
        for i, host in enumerate(hosts):
            path = f"/bits/notify-{i}.bin"
            data = f"upload number {i}".encode()
            sid = _bits(server.url, path, "Create-Session", {"Host": host}).get(
                "BITS-Session-Id")
            for _attempt in range(10):  # 503 E_PENDING: the client retries the fragment
                final = _bits(server.url, path, "Fragment", {"Host": host}, sid=sid,
                              body=data, rng=f"bytes 0-{len(data) - 1}/{len(data)}")
                if (final.status, final.get("BITS-Error-Code")) != (503, "0x8000000A"):
                    break
            assert final.status == 200, final
            reply_path = urllib.parse.urlsplit(final.get("BITS-Reply-URL") or "").path
            reply = _request(server.url, "GET", reply_path, {})
            assert reply.status == 200
            assert reply.body == hashlib.sha256(data).hexdigest().encode() + b"\n"
        assert evil.requests == []


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(self.unix_path)
        self.sock = sock


@pytest.mark.integration
def test_notifications_over_a_unix_socket_never_follow_the_host_header(
        tmp_path: Path) -> None:
    """gunicorn behind a proxy usually listens on a unix socket, and then derives
    SERVER_NAME/SERVER_PORT from the client's Host header. A relative notification URL
    must still never reach the host and port named there."""
    from servers import GunicornServer

    sock_dir = tempfile.mkdtemp(prefix="fb-")  # AF_UNIX paths are short (108 bytes)
    sock_path = os.path.join(sock_dir, "g.sock")
    env = {"BITS_UPLOAD_FOLDER": str(tmp_path / "uploads"),
           "BITS_SESSION_FOLDER": str(tmp_path / "sessions"),
           "BITS_NOTIFICATION_TYPE": "2", "BITS_NOTIFICATION_URL": "/app/sha256",
           "BITS_REPLY_WAIT": "5", "BITS_CLEANUP_INTERVAL": "0"}

    def unix_bits(headers: dict[str, str], body: bytes = b"") -> Wire:
        conn = _UnixConnection(sock_path)
        try:
            conn.request("BITS_POST", "/bits/unix.bin", body=body,
                         headers={"Content-Length": str(len(body)), **headers})
            resp = conn.getresponse()
            reply = Wire(resp.status, resp.getheaders(), resp.read())
        finally:
            conn.close()
        assert reply.get("BITS-Packet-Type") == "Ack" and reply.body == b""
        return reply

    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, sock_dir, ignore_errors=True)
        evil = stack.enter_context(RecordingServer(b"from the evil server\n"))
        stack.enter_context(GunicornServer(env=env, workers=1, worker_class="gthread",
                                           threads=4, extra_args=["-b", f"unix:{sock_path}"],
                                           log_path=tmp_path / "gunicorn.log"))
        host = f"127.0.0.1:{evil.port}"
        created = unix_bits({"BITS-Packet-Type": "Create-Session", "Host": host,
                             "BITS-Supported-Protocols": PROTOCOL})
        sid = created.get("BITS-Session-Id")
        assert created.status == 200 and sid
        for _attempt in range(3):
            unix_bits({"BITS-Packet-Type": "Fragment", "BITS-Session-Id": sid, "Host": host,
                       "Content-Range": "bytes 0-4/5"}, b"hello")
        assert evil.requests == []


def test_relative_notification_url_never_follows_a_host_derived_server_port(
        folders: Path) -> None:
    """Without a listening socket in the environ (the Flask test client, and servers such
    as Apache mod_wsgi with UseCanonicalName Off, or gunicorn on a unix socket, which
    derive SERVER_NAME/SERVER_PORT from the Host header), a relative notification URL
    must not be resolved against the port the client named in Host: SECURITY.md says
    "never a Host header or any other client input"."""
    with RecordingServer(b"the evil server's answer\n") as evil:
        app = bits_app(folders, BITS_NOTIFICATION_TYPE=2, BITS_NOTIFICATION_URL="/app/sha256",
                       BITS_NOTIFICATION_TIMEOUT=10, BITS_REPLY_WAIT=10)
        host = {"host": f"evil.example:{evil.port}",
                "extra": {"SERVER_NAME": "evil.example", "SERVER_PORT": str(evil.port)}}
        sid = create(app, "/bits/ssrf.bin", **host)
        final = fragment(app, "/bits/ssrf.bin", sid, b"secret upload", 0, 13, **host)
        # Any Ack will do (a reply, or an error saying the URL cannot be resolved here).
        assert final.headers.get("BITS-Packet-Type") == "Ack" and final.get_data() == b""
        posted = [(method, path, body) for method, path, _, body in evil.requests]
        assert posted == [], "the upload was POSTed to the port named in the Host header"
