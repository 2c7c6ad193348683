"""flask_bits: the server side of the BITS upload protocol, for Flask and any WSGI app.

Layers, top to bottom (data never flows back up):

* glue: :mod:`.extension` (Flask), :mod:`.middleware` (WSGI), :mod:`.cli`, :mod:`.signals`
* core: :mod:`.server` (request in, Ack out) and :mod:`.reply` (upload-reply)
* storage: :mod:`.store`, :mod:`.locking`, :mod:`.paths`
* protocol: :mod:`.protocol`, :mod:`.constants`, :mod:`.errors` -- pure, no I/O

Use ``importlib.metadata.version("flask-bits")`` for the version.
"""

from __future__ import annotations

from .config import DirectoryConfig as DirectoryConfig
from .constants import PacketType as PacketType
from .errors import BITSError as BITSError
from .extension import BITS as BITS
from .middleware import BITSMiddleware as BITSMiddleware
from .server import BITSServer as BITSServer

__all__ = ["BITS", "BITSError", "BITSMiddleware", "BITSServer", "DirectoryConfig", "PacketType"]
