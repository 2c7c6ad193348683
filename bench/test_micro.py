"""pytest-benchmark micro-benchmarks of the pure protocol functions (no I/O).

Not part of the default test run (it lives under bench/, and bench/pytest.ini drops the
repository's ``--benchmark-skip``)::

    python -m pytest bench/test_micro.py
    python -m pytest bench/test_micro.py --benchmark-save=before   # then compare later

Each benchmark asserts its result too, so a change that breaks the function fails here
instead of producing a fast wrong number.
"""

from __future__ import annotations

import typing as t

import pytest

from flask_bits.errors import InvalidRequest
from flask_bits.errors import RangeMismatch
from flask_bits.protocol import Ack
from flask_bits.protocol import ContentRange
from flask_bits.protocol import canonical_session_id
from flask_bits.protocol import check_header_sizes
from flask_bits.protocol import negotiate_protocol
from flask_bits.protocol import parse_content_range

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
SID = "{C85B4E0A-9EB9-4114-BFA4-8A43B4710091}"

#: The headers of a typical Fragment from a Windows client.
FRAGMENT_HEADERS = [
    ("Host", "uploads.example.com"),
    ("User-Agent", "Microsoft BITS/7.8"),
    ("BITS-Packet-Type", "Fragment"),
    ("BITS-Session-Id", SID),
    ("Content-Name", "report-2024-04-23.zip"),
    ("Content-Range", "bytes 8388608-16777215/1073741824"),
    ("Content-Length", "8388608"),
    ("Connection", "Keep-Alive"),
]


# -- parse_content_range ---------------------------------------------------------------


def test_parse_content_range(benchmark: t.Any) -> None:
    rng = benchmark(parse_content_range, "bytes 8388608-16777215/1073741824", 8388608)
    assert rng == ContentRange(8388608, 16777215, 1073741824)


def test_parse_content_range_empty_file(benchmark: t.Any) -> None:
    assert benchmark(parse_content_range, "bytes 0--1/0", 0) == ContentRange(0, -1, 0)


def test_parse_content_range_malformed(benchmark: t.Any) -> None:
    def bad() -> None:
        with pytest.raises(InvalidRequest):
            parse_content_range("bytes=0-10/20", 11)

    benchmark(bad)


# -- canonical_session_id --------------------------------------------------------------


@pytest.mark.parametrize("value", [SID, SID.lower().strip("{}"), "  " + SID.lower() + " "],
                         ids=["canonical", "bare-lower", "padded"])
def test_canonical_session_id(benchmark: t.Any, value: str) -> None:
    assert benchmark(canonical_session_id, value) == SID


def test_canonical_session_id_garbage(benchmark: t.Any) -> None:
    assert benchmark(canonical_session_id, "../../etc/passwd") is None


# -- negotiate_protocol ----------------------------------------------------------------


def test_negotiate_protocol(benchmark: t.Any) -> None:
    assert benchmark(negotiate_protocol, PROTOCOL) == PROTOCOL


def test_negotiate_protocol_long_list(benchmark: t.Any) -> None:
    offered = " ".join([f"{{{i:08x}-0000-0000-0000-000000000000}}" for i in range(20)]
                       + [PROTOCOL.upper()])
    assert benchmark(negotiate_protocol, offered) == PROTOCOL


# -- Ack.to_headers --------------------------------------------------------------------


def test_ack_to_headers_fragment(benchmark: t.Any) -> None:
    ack = Ack(200, session_id=SID, headers=[("BITS-Received-Content-Range", "16777216")])
    headers = benchmark(ack.to_headers)
    assert ("BITS-Received-Content-Range", "16777216") in headers
    assert ("Content-Length", "0") in headers


def test_ack_to_headers_error(benchmark: t.Any) -> None:
    ack = Ack.for_error(InvalidRequest("Content-Range must read 'bytes first-last/total'."), SID)
    headers = dict(benchmark(ack.to_headers))
    assert headers["BITS-Error-Code"] == "0x80070057"


def test_ack_to_headers_416(benchmark: t.Any) -> None:
    ack = Ack.for_error(RangeMismatch(4096), SID)
    headers = dict(benchmark(ack.to_headers))
    assert headers["BITS-Received-Content-Range"] == "4096"
    assert "BITS-Error-Code" not in headers


# -- check_header_sizes ----------------------------------------------------------------


def test_check_header_sizes_fragment(benchmark: t.Any) -> None:
    benchmark(check_header_sizes, FRAGMENT_HEADERS)


def test_check_header_sizes_large(benchmark: t.Any) -> None:
    headers = [*FRAGMENT_HEADERS, ("Cookie", "a=" + "x" * 4000), ("Authorization", "b" * 2000)]
    benchmark(check_header_sizes, headers)
