"""kvsvr: a distributed, strongly consistent key-value store.

import kvsvr

async with kvsvr.connect(["127.0.0.1:7101"], secret="s") as client:
    await client.put("greeting", b"hello")

with kvsvr.SyncClient(["127.0.0.1:7101"], secret="s") as client:
    print(client.get("greeting"))

with kvsvr.temporary_cluster(3) as cluster:   # local node processes, ready
    ...
"""

from __future__ import annotations

from importlib import metadata as _metadata

# First: importing _build refuses a compiled build older than its sources,
# before anything compiled is imported.
from kvsvr import _build  # noqa: F401  (imported for that check)
from kvsvr.api import WatchEvent
from kvsvr.client import Client, Item, SyncClient, connect
from kvsvr.client_watch import Watch
from kvsvr.config import ClusterConfig, load_config
from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    CorruptRow,
    InvalidRequest,
    KvsvrError,
    Timeout,
    Unavailable,
    WatchCompacted,
)
from kvsvr.local import LocalCluster, temporary_cluster
from kvsvr.net.tls import TLSOptions

try:
    __version__: str = _metadata.version("kvsvr")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AuthenticationFailed",
    "Client",
    "ClusterConfig",
    "Conflict",
    "CorruptRow",
    "InvalidRequest",
    "Item",
    "KvsvrError",
    "LocalCluster",
    "SyncClient",
    "TLSOptions",
    "Timeout",
    "Unavailable",
    "Watch",
    "WatchCompacted",
    "WatchEvent",
    "__version__",
    "connect",
    "load_config",
    "temporary_cluster",
]
