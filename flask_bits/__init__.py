"""flask_bits: the server side of the BITS upload protocol, for Flask and any WSGI app.

Layers, top to bottom (data never flows back up):

* glue: :mod:`.extension` (Flask), :mod:`.middleware` (WSGI), :mod:`.cli`, :mod:`.signals`
* core: :mod:`.server` (request in, Ack out) and :mod:`.reply` (upload-reply)
* storage: :mod:`.store`, :mod:`.locking`, :mod:`.paths`
* protocol: :mod:`.protocol`, :mod:`.constants`, :mod:`.errors` -- pure, no I/O
* tools: :mod:`.client` (needs only the standard library), :mod:`.serve`,
  :mod:`.metrics`, :mod:`.dashboard`

The public names below are imported on first use, so ``python -m flask_bits.client``
starts without loading Flask. Use ``importlib.metadata.version("flask-bits")`` for the
version.
"""

from __future__ import annotations

import importlib
import typing as t

if t.TYPE_CHECKING:
    from .config import DirectoryConfig as DirectoryConfig
    from .constants import PacketType as PacketType
    from .errors import BITSError as BITSError
    from .extension import BITS as BITS
    from .middleware import BITSMiddleware as BITSMiddleware
    from .server import BITSServer as BITSServer

__all__ = ["BITS", "BITSError", "BITSMiddleware", "BITSServer", "DirectoryConfig", "PacketType"]

_HOMES = {
    "BITS": ".extension",
    "BITSError": ".errors",
    "BITSMiddleware": ".middleware",
    "BITSServer": ".server",
    "DirectoryConfig": ".config",
    "PacketType": ".constants",
}


def __getattr__(name: str) -> t.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'flask_bits' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
