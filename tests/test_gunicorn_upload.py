"""A 50 MB upload through a real gunicorn with two workers (PROTOCOL.md 7.1-7.4).

Fragments land on whichever worker accepts the connection (sync workers close the
connection after every answer), so this also shows that no session state lives in
process memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import wire
from fault_apps import MiB
from fault_apps import folder_leftovers
from fault_apps import folders_env
from fault_apps import is_ack
from fault_apps import make_random_file
from fault_apps import received
from fault_apps import session_leftovers
from fault_apps import sha256_file
from fault_apps import upload_temp_files
from servers import GunicornServer

pytestmark = pytest.mark.integration

TOTAL = 50 * MiB
FRAGMENT = MiB
RETRANSMIT_AT = 10 * MiB
GAP_AT = 20 * MiB


def test_upload_50mb_with_retransmit_and_gap(tmp_path: Path) -> None:
    src = tmp_path / "source.bin"
    digest = make_random_file(src, TOTAL)
    uploads, sessions = tmp_path / "uploads", tmp_path / "sessions"
    path = "/bits/big.bin"

    with GunicornServer(env=folders_env(tmp_path), workers=2,
                        log_path=tmp_path / "gunicorn.log") as server, \
            open(src, "rb") as source:
        conn = wire.connect(server.url)
        try:
            ping = wire.bits_post(conn, path, "Ping")
            assert ping.status == 200 and is_ack(ping), ping
            assert ping.get("BITS-Session-Id") is None
            assert ping.get("BITS-Error-Code") is None

            sid = wire.create_session(conn, path)
            offset = 0
            retransmitted = gapped = False
            while offset < TOTAL:
                chunk = os.pread(source.fileno(), FRAGMENT, offset)
                reply = wire.fragment(conn, path, sid, chunk, offset, TOTAL)
                assert reply.status == 200 and is_ack(reply), reply
                assert reply.get("BITS-Session-Id") == sid
                new = received(reply)
                assert new == offset + len(chunk), (offset, reply)

                if new == RETRANSMIT_AT and not retransmitted:
                    # The same fragment again: nothing written, N unchanged (7.3, 3rd row).
                    again = wire.fragment(conn, path, sid, chunk, offset, TOTAL)
                    assert again.status == 200 and is_ack(again), again
                    assert received(again) == new
                    retransmitted = True

                if new == GAP_AT and not gapped:
                    # A fragment beyond N: 416 telling N, nothing written; resume from it.
                    beyond = new + FRAGMENT
                    skipped = os.pread(source.fileno(), FRAGMENT, beyond)
                    gap = wire.fragment(conn, path, sid, skipped, beyond, TOTAL)
                    assert gap.status == 416 and is_ack(gap), gap
                    assert gap.get("BITS-Error-Code") in (None, "0x0", "0x00000000"), gap
                    new = received(gap)
                    assert new == GAP_AT
                    gapped = True
                offset = new

            assert retransmitted and gapped
            assert offset == TOTAL
            assert sha256_file(uploads / "big.bin") == digest

            # The completing fragment retried: the cached final Ack, file untouched.
            last_first = TOTAL - FRAGMENT
            last = os.pread(source.fileno(), FRAGMENT, last_first)
            retry = wire.fragment(conn, path, sid, last, last_first, TOTAL)
            assert retry.status == 200 and received(retry) == TOTAL, retry
            assert sha256_file(uploads / "big.bin") == digest

            close = wire.bits_post(conn, path, "Close-Session", session_id=sid)
            assert close.status == 200 and is_ack(close), close
            assert close.get("BITS-Session-Id") == sid
        finally:
            conn.close()

    assert sha256_file(uploads / "big.bin") == digest
    assert session_leftovers(sessions, sid) == []
    assert not (sessions / "sessions" / sid).exists()
    assert not (sessions / "locks" / f"{sid}.lock").exists()
    assert folder_leftovers(sessions) == []
    assert upload_temp_files(uploads) == []
    assert sorted(p.name for p in uploads.iterdir() if p.is_file()) == ["big.bin"]
