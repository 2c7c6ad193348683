"""Small helpers shared by the test modules: file digests and bounded polling."""

from __future__ import annotations

import hashlib
import time
import typing as t
from pathlib import Path

_BLOCK = 1024 * 1024


def sha256_file(path: Path | str) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def wait_until(
    predicate: t.Callable[[], t.Any], timeout: float, what: str, interval: float = 0.01
) -> t.Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
