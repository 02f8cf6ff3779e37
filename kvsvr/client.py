"""The kvsvr client: an async one (trio) and a blocking one for scripts.

    async with kvsvr.connect(["127.0.0.1:7101", "127.0.0.1:7102"], secret="s") as client:
        version = await client.put("greeting", b"hello")
        item = await client.get("greeting")            # Item(value=b"hello", version=...)
        await client.cas("greeting", b"hi", if_version=item.version)
        await client.put(("alice", "inbox/0001"), b"...")   # (partition key, sort key)
        rows = await client.scan("alice", start="inbox/", end="inbox0")

    with kvsvr.SyncClient("127.0.0.1:7101") as client:   # the same methods, blocking
        client.put("greeting", b"hello")

`connect` reaches the first address that answers, fetches the partition map,
and from then on sends each key straight to its partition's preferred
coordinator (the first live replica), so writes take the Paxos fast path. It
opens connections to other nodes when a key first needs them. A node that
cannot be *connected to* is skipped for `NODE_DOWN_S` and the next replica is
tried; a request that was *sent* and then lost its connection raises
`Unavailable` (its outcome is unknown) and is never sent again, except reads,
which are safe to repeat on another replica.

Keys are `bytes` or `str` (UTF-8), or a tuple `(partition_key, sort_key)`;
values are `bytes`. Every operation is bounded by the client's `timeout_s` and
raises `kvsvr.Timeout` past it.

Near cache (`connect(..., near_cache_bytes=N)`, off by default): the client
keeps the values it read or wrote most recently, up to N bytes, and a strong
read sends the version it holds. The node still runs the full quorum read;
when the quorum chose exactly that version it answers "unchanged" without the
value, which the client then takes from its cache. Strong reads stay
linearizable: the quorum decides, the near cache only saves moving the value
(a version names exactly one value of a key).

Session guarantee for stale reads: the client remembers, per key, the highest
version it has written or read (for the `SESSION_KEYS_MAX` most recently used
keys) and asks a stale read for at least that version, so a session never sees
its own writes go backwards. Strong reads need no help: they are linearizable.
"""

from __future__ import annotations

# The client lives in modules by concern; this module is its public face:
#   kvsvr.api             the messages, their wire form, the API's limits
#   kvsvr.client_async    Client and connect: connections, retries, deadlines
#   kvsvr.client_sync     SyncClient: a Client in a thread of its own
#   kvsvr.client_routing  addresses, a key's replicas, nodes marked down
#   kvsvr.client_cache    session versions and the near cache
#   kvsvr.client_options  checks of what a caller passes
from kvsvr.api import (
    DEFAULT_TABLE,
    SCAN_LIMIT_MAX,
    VALUE_BYTES_MAX,
    NodeInfo,
    PartitionMap,
    ReadConsistency,
    TableInfo,
    format_address,
)
from kvsvr.client_async import (
    CONNECT_ATTEMPT_TIMEOUT_S,
    NODE_DOWN_S,
    READY_POLL_S,
    Client,
    Item,
    connect,
)
from kvsvr.client_cache import (
    NEAR_CACHE_ENTRY_OVERHEAD_BYTES,
    SESSION_KEYS_MAX,
    NearCache,
    NearCacheStats,
    NearEntry,
    SessionVersions,
)
from kvsvr.client_options import CONSISTENCIES
from kvsvr.client_routing import parse_address, route
from kvsvr.client_sync import SYNC_CLOSE_TIMEOUT_S, SyncClient
from kvsvr.net.tls import TLSOptions

__all__ = [
    "CONNECT_ATTEMPT_TIMEOUT_S",
    "CONSISTENCIES",
    "DEFAULT_TABLE",
    "NEAR_CACHE_ENTRY_OVERHEAD_BYTES",
    "NODE_DOWN_S",
    "READY_POLL_S",
    "SCAN_LIMIT_MAX",
    "SESSION_KEYS_MAX",
    "SYNC_CLOSE_TIMEOUT_S",
    "VALUE_BYTES_MAX",
    "Client",
    "Item",
    "NearCache",
    "NearCacheStats",
    "NearEntry",
    "NodeInfo",
    "PartitionMap",
    "ReadConsistency",
    "SessionVersions",
    "SyncClient",
    "TLSOptions",
    "TableInfo",
    "connect",
    "format_address",
    "parse_address",
    "route",
]
