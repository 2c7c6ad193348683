"""DirectoryConfig: defaults, coercion and validation messages naming the key."""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest

from flask_bits.config import DEFAULTS
from flask_bits.config import DirectoryConfig


def build(tmp_path: Path, **values: t.Any) -> DirectoryConfig:
    return DirectoryConfig.from_mapping(values, instance_path=str(tmp_path / "instance"))


def test_defaults(tmp_path: Path) -> None:
    cfg = build(tmp_path)
    instance = str(tmp_path / "instance")
    assert cfg.url_prefix == "/bits"
    assert cfg.upload_folder == os.path.join(instance, "bits-uploads")
    assert cfg.session_folder == os.path.join(instance, "bits-sessions")
    assert cfg.upload_enabled is True
    assert cfg.max_upload_size is None  # no limit (A33)
    assert cfg.max_fragment_size >= 13 * 1024 * 1024  # modern clients never shrink (7.3)
    assert cfg.allow_overwrites is False  # A20
    assert cfg.overwrite_status == 409  # A5
    assert cfg.session_timeout == 14 * 24 * 3600  # BITSSessionTimeout
    assert cfg.tombstone_timeout >= 24 * 3600  # 11.2
    assert cfg.send_bits_error is True  # A1
    assert cfg.session_limit == 50  # BITSNumberOfSessionsLimit
    assert cfg.host_id is None
    assert cfg.host_id_fallback_timeout == 86400
    assert cfg.notification_type == 0
    assert cfg.notification_url is None


def test_as_keys_round_trip(tmp_path: Path) -> None:
    cfg = build(tmp_path, BITS_MAX_UPLOAD_SIZE=10**6, BITS_HOST_ID="server8")
    keys = cfg.as_keys()
    assert keys["BITS_MAX_UPLOAD_SIZE"] == 10**6
    assert keys["BITS_HOST_ID"] == "server8"
    assert set(keys) <= set(DEFAULTS) | {"BITS_UPLOAD_FOLDER", "BITS_SESSION_FOLDER"}
    assert DirectoryConfig.from_mapping(keys, instance_path="/unused") == cfg


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    assert build(tmp_path, SECRET_KEY="x", BITS_NOT_A_SETTING=1) == build(tmp_path)


def test_explicit_folders_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = build(tmp_path, BITS_UPLOAD_FOLDER="up", BITS_SESSION_FOLDER=tmp_path / "sess")
    assert cfg.upload_folder == str(tmp_path / "up")
    assert cfg.session_folder == str(tmp_path / "sess")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("BITS_UPLOAD_ENABLED", "false", False),
        ("BITS_UPLOAD_ENABLED", "0", False),
        ("BITS_UPLOAD_ENABLED", "On", True),
        ("BITS_UPLOAD_ENABLED", 0, False),
        ("BITS_ALLOW_OVERWRITES", "yes", True),
        ("BITS_ALLOW_OVERWRITES", 1, True),
        ("BITS_MAX_UPLOAD_SIZE", "1048576", 1048576),
        ("BITS_MAX_UPLOAD_SIZE", "", None),
        ("BITS_MAX_UPLOAD_SIZE", 0, 0),
        ("BITS_MAX_FRAGMENT_SIZE", 5 * 1024, 5 * 1024),
        ("BITS_OVERWRITE_STATUS", 403, 403),
        ("BITS_OVERWRITE_STATUS", "403", 403),
        ("BITS_SESSION_TIMEOUT", "60", 60.0),
        ("BITS_SESSION_TIMEOUT", 1.5, 1.5),
        ("BITS_LOCK_TIMEOUT", 0, 0.0),
        ("BITS_HOST_ID", "", None),
        ("BITS_HOST_ID", "server8.example.com", "server8.example.com"),
        ("BITS_HOST_ID_FALLBACK_TIMEOUT", None, None),
        ("BITS_HOST_ID_FALLBACK_TIMEOUT", "110", 110),
        ("BITS_SESSION_LIMIT", None, None),
    ],
)
def test_values_are_coerced(tmp_path: Path, key: str, value: t.Any, expected: t.Any) -> None:
    cfg = build(tmp_path, **{key: value})
    assert cfg.as_keys()[key] == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("BITS_URL_PREFIX", "bits"),
        ("BITS_URL_PREFIX", "/bits/"),
        ("BITS_URL_PREFIX", "/"),
        ("BITS_URL_PREFIX", ""),
        ("BITS_URL_PREFIX", "//bits"),
        ("BITS_URL_PREFIX", "/a//b"),
        ("BITS_URL_PREFIX", 5),
        ("BITS_UPLOAD_ENABLED", "maybe"),
        ("BITS_UPLOAD_ENABLED", 2),
        ("BITS_UPLOAD_ENABLED", None),
        ("BITS_ALLOW_OVERWRITES", "sometimes"),
        ("BITS_MAX_UPLOAD_SIZE", -1),
        ("BITS_MAX_UPLOAD_SIZE", "10 MB"),
        ("BITS_MAX_UPLOAD_SIZE", 1.5),
        ("BITS_MAX_UPLOAD_SIZE", True),
        ("BITS_MAX_FRAGMENT_SIZE", 5 * 1024 - 1),  # below what clients can shrink to (7.3)
        ("BITS_MAX_FRAGMENT_SIZE", "lots"),
        ("BITS_MAX_FRAGMENT_SIZE", None),
        ("BITS_OVERWRITE_STATUS", 500),
        ("BITS_OVERWRITE_STATUS", 200),
        ("BITS_SESSION_TIMEOUT", 0),
        ("BITS_SESSION_TIMEOUT", -5),
        ("BITS_SESSION_TIMEOUT", "forever"),
        ("BITS_TOMBSTONE_TIMEOUT", -1),
        ("BITS_LOCK_TIMEOUT", "soon"),
        ("BITS_LOCK_TIMEOUT", True),
        ("BITS_SESSION_LIMIT", 0),
        ("BITS_MAX_SESSIONS", -3),
        ("BITS_HOST_ID", "bad/host"),
        ("BITS_HOST_ID", "two words"),
        ("BITS_HOST_ID", "h" * 301),
        ("BITS_HOST_ID", 12),
        ("BITS_HOST_ID_FALLBACK_TIMEOUT", -1),
        ("BITS_NOTIFICATION_TYPE", 3),
        ("BITS_NOTIFICATION_TYPE", "by value"),
        ("BITS_NOTIFICATION_URL", "ftp://example.com/app"),
        ("BITS_NOTIFICATION_URL", "http://example.com/" + "x" * 2200),
        ("BITS_UPLOAD_FOLDER", 42),
        ("BITS_SEND_BITS_ERROR", "perhaps"),
        ("BITS_FSYNC", "always"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_key(
    tmp_path: Path, key: str, value: t.Any
) -> None:
    with pytest.raises(ValueError) as info:
        build(tmp_path, **{key: value})
    assert key in str(info.value)


def test_a_file_as_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    for key in ("BITS_UPLOAD_FOLDER", "BITS_SESSION_FOLDER"):
        with pytest.raises(ValueError, match=key):
            build(tmp_path, **{key: str(path)})
