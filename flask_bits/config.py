"""Configuration of one upload directory, read once from ``BITS_*`` keys.

Every key has a default that works with no configuration at all; folders default to
``app.instance_path``. Values are validated when the directory is set up, with messages
that name the key. The table in README.md documents each key.
"""

from __future__ import annotations

import os
import typing as t
from dataclasses import dataclass
from dataclasses import fields

#: ``BITS_*`` keys and their defaults (``None`` folders resolve under the instance path).
DEFAULTS: dict[str, t.Any] = {
    "BITS_URL_PREFIX": "/bits",
    "BITS_UPLOAD_FOLDER": None,
    "BITS_SESSION_FOLDER": None,
    "BITS_UPLOAD_ENABLED": True,
    "BITS_MAX_UPLOAD_SIZE": None,
    "BITS_MAX_FRAGMENT_SIZE": 16 * 1024 * 1024,
    "BITS_ALLOW_OVERWRITES": False,
    "BITS_OVERWRITE_STATUS": 409,
    "BITS_SESSION_TIMEOUT": 14 * 24 * 3600,
    "BITS_TOMBSTONE_TIMEOUT": 24 * 3600,
    "BITS_LOCK_TIMEOUT": 10.0,
    "BITS_FSYNC": False,
    "BITS_DIRECT_INPUT": True,
    "BITS_SEND_BITS_ERROR": True,
    "BITS_SESSION_LIMIT": 50,
    "BITS_MAX_SESSIONS": None,
    "BITS_READ_TIMEOUT": 60.0,
    "BITS_CLEANUP_INTERVAL": 3600.0,
    "BITS_HOST_ID": None,
    "BITS_HOST_ID_FALLBACK_TIMEOUT": 86400,
    "BITS_NOTIFICATION_TYPE": 0,
    "BITS_NOTIFICATION_URL": None,
    "BITS_NOTIFICATION_TIMEOUT": 300.0,
    "BITS_REPLY_WAIT": 25.0,
    "BITS_REPLY_URL_BASE": None,
    "BITS_ACCEPT_ANY_2XX": False,
}


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """The settings of one upload directory (one URL prefix), validated."""

    url_prefix: str
    upload_folder: str
    session_folder: str
    upload_enabled: bool
    max_upload_size: int | None
    max_fragment_size: int
    allow_overwrites: bool
    overwrite_status: int
    session_timeout: float
    tombstone_timeout: float
    lock_timeout: float
    fsync: bool
    direct_input: bool
    send_bits_error: bool
    session_limit: int | None
    max_sessions: int | None
    read_timeout: float | None
    cleanup_interval: float
    host_id: str | None
    host_id_fallback_timeout: int | None
    notification_type: int
    notification_url: str | None
    notification_timeout: float
    reply_wait: float
    reply_url_base: str | None
    accept_any_2xx: bool

    @classmethod
    def from_mapping(
        cls, config: t.Mapping[str, t.Any], *, instance_path: str
    ) -> DirectoryConfig:
        """Build and validate from ``BITS_*`` keys (missing keys take their defaults).

        :raises ValueError: a value is invalid; the message names the key.
        """
        values = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
        v = _Validator(values)
        prefix = v.text("BITS_URL_PREFIX")
        if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise ValueError(
                "BITS_URL_PREFIX must be a path like '/bits': starting with '/', not "
                f"ending with one, and not the site root; got {prefix!r}."
            )
        ntype = v.integer("BITS_NOTIFICATION_TYPE", minimum=0)
        if ntype not in (0, 1, 2):
            raise ValueError(f"BITS_NOTIFICATION_TYPE must be 0, 1 or 2, got {ntype!r}.")
        overwrite_status = v.integer("BITS_OVERWRITE_STATUS", minimum=0)
        if overwrite_status not in (403, 409):
            raise ValueError(
                f"BITS_OVERWRITE_STATUS must be 409 or 403, got {overwrite_status!r}."
            )
        max_fragment = v.integer("BITS_MAX_FRAGMENT_SIZE", minimum=5 * 1024)
        host_id = v.optional_text("BITS_HOST_ID")
        if host_id is not None and (len(host_id) > 300 or any(c in host_id for c in "/ \t")):
            raise ValueError("BITS_HOST_ID must be a host name or address of at most 300 "
                             f"characters, got {host_id!r}.")
        upload_folder = v.folder("BITS_UPLOAD_FOLDER", instance_path, "bits-uploads")
        session_folder = v.folder("BITS_SESSION_FOLDER", instance_path, "bits-sessions")
        if _nested(upload_folder, session_folder):
            # Clients could otherwise upload into (or next to) the server's own state.
            raise ValueError(
                "BITS_SESSION_FOLDER and BITS_UPLOAD_FOLDER must not contain each other, "
                f"got {session_folder!r} and {upload_folder!r}."
            )
        return cls(
            url_prefix=prefix,
            upload_folder=upload_folder,
            session_folder=session_folder,
            upload_enabled=v.boolean("BITS_UPLOAD_ENABLED"),
            max_upload_size=v.optional_integer("BITS_MAX_UPLOAD_SIZE", minimum=0),
            max_fragment_size=max_fragment,
            allow_overwrites=v.boolean("BITS_ALLOW_OVERWRITES"),
            overwrite_status=overwrite_status,
            session_timeout=v.number("BITS_SESSION_TIMEOUT", positive=True),
            tombstone_timeout=v.number("BITS_TOMBSTONE_TIMEOUT"),
            lock_timeout=v.number("BITS_LOCK_TIMEOUT"),
            fsync=v.boolean("BITS_FSYNC"),
            direct_input=v.boolean("BITS_DIRECT_INPUT"),
            send_bits_error=v.boolean("BITS_SEND_BITS_ERROR"),
            session_limit=v.optional_integer("BITS_SESSION_LIMIT", minimum=1),
            max_sessions=v.optional_integer("BITS_MAX_SESSIONS", minimum=1),
            read_timeout=v.optional_number("BITS_READ_TIMEOUT"),
            cleanup_interval=v.number("BITS_CLEANUP_INTERVAL"),
            host_id=host_id,
            host_id_fallback_timeout=v.optional_integer(
                "BITS_HOST_ID_FALLBACK_TIMEOUT", minimum=0
            ),
            notification_type=ntype,
            notification_url=_notification_url(v, ntype),
            notification_timeout=v.number("BITS_NOTIFICATION_TIMEOUT", positive=True),
            reply_wait=v.number("BITS_REPLY_WAIT"),
            reply_url_base=v.optional_text("BITS_REPLY_URL_BASE"),
            accept_any_2xx=v.boolean("BITS_ACCEPT_ANY_2XX"),
        )

    def as_keys(self) -> dict[str, t.Any]:
        """The settings as ``BITS_*`` keys (for listings and diagnostics)."""
        return {"BITS_" + f.name.upper(): getattr(self, f.name) for f in fields(self)}


def _notification_url(v: _Validator, ntype: int) -> str | None:
    url = v.optional_text("BITS_NOTIFICATION_URL")
    if url is not None and len(url) > 2200:
        raise ValueError("BITS_NOTIFICATION_URL must be at most 2,200 characters.")
    if url is not None and ("://" in url and not url.lower().startswith(("http://", "https://"))):
        raise ValueError(f"BITS_NOTIFICATION_URL must be an http(s) URL, got {url!r}.")
    return url


def _nested(a: str, b: str) -> bool:
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep)


class _Validator:
    def __init__(self, values: dict[str, t.Any]) -> None:
        self.values = values

    def text(self, key: str) -> str:
        value = self.values[key]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} must be a non-empty string, got {value!r}.")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.values[key]
        if value is None or value == "":
            return None
        return self.text(key)

    def boolean(self, key: str) -> bool:
        value = self.values[key]
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        raise ValueError(f"{key} must be true or false, got {value!r}.")

    def integer(self, key: str, *, minimum: int) -> int:
        value = self.values[key]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be a whole number of at least {minimum}, got {value!r}.")
        return value

    def optional_integer(self, key: str, *, minimum: int) -> int | None:
        if self.values[key] in (None, ""):
            return None
        return self.integer(key, minimum=minimum)

    def number(self, key: str, *, positive: bool = False) -> float:
        value = self.values[key]
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            positive and value == 0
        ):
            kind = "a positive" if positive else "a non-negative"
            raise ValueError(f"{key} must be {kind} number of seconds, got {value!r}.")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        if self.values[key] in (None, "", 0):
            return None
        return self.number(key)

    def folder(self, key: str, instance_path: str, default: str) -> str:
        value = self.values[key]
        if value is None or value == "":
            return os.path.join(instance_path, default)
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{key} must be a folder path, got {value!r}.")
        path = os.path.abspath(os.fspath(value))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{key} must be a folder, but {path!r} is a file.")
        return path


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
