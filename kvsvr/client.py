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

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

import crc32c
import trio

from kvsvr import net
from kvsvr.errors import InvalidRequest, KvsvrError, Timeout, Unavailable
from kvsvr.keys import KeyPart, UserKey, encode_key, split_user_key, to_bytes
from kvsvr.protocol.placement import PARTITIONS_MAX, partition_of

logger = logging.getLogger(__name__)

# --- limits -------------------------------------------------------------------

# The largest value a client sends. A value travels in one frame, is stored in
# one LMDB row and is copied by every replica and the cache; 1 MiB keeps each of
# those cheap and far below the frame limit.
VALUE_BYTES_MAX: Final = 1024 * 1024

# Rows one scan returns. Its reply is one frame, so the product of this and the
# typical row size must stay well below `net.MAX_FRAME_BYTES`; callers page with
# `start` for more.
SCAN_LIMIT_MAX: Final = 10_000

# Keys whose versions the session remembers for stale reads (least recently used
# forgotten first). An entry costs up to ~1 KiB (a 500-byte key and overhead), so
# this bounds the memory to ~16 MiB; a forgotten key's stale reads lose only the
# "never backwards" promise, and only for keys the session has not touched in
# its last 16 Ki operations.
SESSION_KEYS_MAX: Final = 16 * 1024

# Bookkeeping per near-cache entry beyond key and value (the OrderedDict node,
# the entry, the tuple key): counted so tiny values cannot overrun the budget.
NEAR_CACHE_ENTRY_OVERHEAD_BYTES: Final = 200

# How long a node that could not be connected to is skipped in favour of the
# next replica. Short, because a restarted node should get its keys back soon;
# long enough that every operation meanwhile does not pay a failed connect.
NODE_DOWN_S: Final = 3.0

# Time one connection attempt (TCP connect and handshake) gets. A live node on
# the same network answers in milliseconds; past this it is down or drowning,
# and the next replica should get a try while the operation still has time.
CONNECT_ATTEMPT_TIMEOUT_S: Final = 2.0

# Time `SyncClient.close` waits for its trio thread to finish closing connections.
SYNC_CLOSE_TIMEOUT_S: Final = 10.0

# How often `wait_ready` asks the nodes again.
READY_POLL_S: Final = 0.1
CONSISTENCIES: Final = ("strong", "stale", "local")

DEFAULT_TABLE: Final = "default"


# --- results and the partition map ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """A stored value and the version that wrote it.

    `key` is set by `scan` only, where it is the row's *sort key* (the partition
    key is the one scanned); `get` leaves it None, as the caller knows the key.
    """

    value: bytes
    version: int
    key: bytes | None = None


# `Item(value, version)` for the hot path: a frozen dataclass's __init__ sets
# each field through `object.__setattr__`, which costs twice as much as
# filling the slots directly. Same class, same fields, same immutability.
_new_object = object.__new__
_set_item_value = Item.__dict__["value"].__set__
_set_item_version = Item.__dict__["version"].__set__
_set_item_key = Item.__dict__["key"].__set__


def _item(value: bytes, version: int) -> Item:
    item: Item = _new_object(Item)
    _set_item_value(item, value)
    _set_item_version(item, version)
    _set_item_key(item, None)
    return item


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    index: int  # what the replica sets name nodes by
    host: str
    port: int
    zone: str

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class TableInfo:
    name: str
    consistency: str
    ttl_s: float


@dataclass(frozen=True, slots=True)
class PartitionMap:
    """Where every partition lives, as a node reports it (`"map"`)."""

    partitions: int
    replication: int
    nodes: tuple[NodeInfo, ...]
    replica_sets: tuple[tuple[int, ...], ...]  # node indexes, preferred coordinator first
    tables: tuple[TableInfo, ...]

    @classmethod
    def from_wire(cls, body: object) -> PartitionMap:
        """Parse and check a `"map"` reply; `KvsvrError` if it makes no sense."""
        try:
            return _parse_map(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise KvsvrError(f"the node sent a malformed partition map: {exc}") from exc

    def node_by_index(self, index: int) -> NodeInfo:
        for node in self.nodes:
            if node.index == index:
                return node
        raise KvsvrError(f"the partition map names node index {index}, which it does not list")

    def find_node(self, name: str) -> NodeInfo | None:
        """The node with this id or address ("host:port"), if the map lists it."""
        for node in self.nodes:
            if name in (node.id, node.address):
                return node
        return None

    def table(self, name: str) -> TableInfo | None:
        for table in self.tables:
            if table.name == name:
                return table
        return None

    def replicas(self, table: str, partition_key: bytes) -> list[NodeInfo]:
        """The replicas of a key's partition, preferred coordinator first."""
        return self.replicas_of_partition(partition_of(table, partition_key, self.partitions))

    def replicas_of_partition(self, partition: int) -> list[NodeInfo]:
        return [self.node_by_index(index) for index in self.replica_sets[partition]]


def _parse_map(body: object) -> PartitionMap:
    if not isinstance(body, dict):
        raise TypeError(f"expected a dict, got {type(body).__name__}")
    partitions = _int_field(body, "partitions")
    if not 0 < partitions <= PARTITIONS_MAX or partitions & (partitions - 1):
        raise ValueError(f"partitions = {partitions} is not a power of two up to {PARTITIONS_MAX}")
    nodes = tuple(
        NodeInfo(
            id=_str_field(raw, "id"),
            index=_int_field(raw, "index"),
            host=_str_field(raw, "host"),
            port=_int_field(raw, "port"),
            zone=_str_field(raw, "zone"),
        )
        for raw in _list_field(body, "nodes")
    )
    if not nodes:
        raise ValueError("it lists no nodes")
    indexes = {node.index for node in nodes}
    replica_sets = tuple(
        tuple(_checked_index(index, indexes) for index in _as_list(replicas))
        for replicas in _list_field(body, "replica_sets")
    )
    if len(replica_sets) != partitions or not all(replica_sets):
        raise ValueError(f"expected {partitions} non-empty replica sets, got {len(replica_sets)}")
    tables = tuple(
        TableInfo(
            name=_str_field(raw, "name"),
            consistency=_str_field(raw, "consistency"),
            ttl_s=float(raw.get("ttl_s", 0.0)),
        )
        for raw in body.get("tables", [])
    )
    return PartitionMap(partitions, _int_field(body, "replication"), nodes, replica_sets, tables)


def _as_list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _list_field(body: Mapping[str, Any], name: str) -> list[Any]:
    return _as_list(body[name])


def _int_field(body: Mapping[str, Any], name: str) -> int:
    value = body[name]
    if type(value) is not int:
        raise TypeError(f"{name!r} must be an int, got {value!r}")
    return value


def _str_field(body: Mapping[str, Any], name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise TypeError(f"{name!r} must be a str, got {value!r}")
    return value


def _checked_index(index: object, known: set[int]) -> int:
    if type(index) is not int or index not in known:
        raise ValueError(f"replica set names unknown node index {index!r}")
    return index


# --- routing (pure) ------------------------------------------------------------------


def route(
    partition_map: PartitionMap,
    table: str,
    partition_key: bytes,
    *,
    down_until: Mapping[str, float],
    now: float,
) -> list[NodeInfo]:
    """The nodes to try for a key, in order: its replicas, preferred coordinator
    first, with those marked down (by address, until a time) moved to the end so
    they are still tried when nothing else answers."""
    replicas = partition_map.replicas(table, partition_key)
    live = [node for node in replicas if down_until.get(node.address, -math.inf) <= now]
    down = [node for node in replicas if node not in live]
    return live + down


# Probe keys on which `_partition_hash_seed` checks its shortcut against `partition_of`.
_PARTITION_PROBES: Final = (b"\x00", b"k", b"kvsvr partition probe", bytes(range(256)))

_crc32c = crc32c.crc32c


def _partition_hash_seed(table: str) -> int | None:
    """The crc32c of `table`'s prefix in the hash `partition_of` takes, so that
    a key's partition is `crc32c(partition_key, seed) & (partitions - 1)`
    without building `table + NUL + partition_key` per operation. None if
    `partition_of` does not hash that way (checked on probe keys at the widest
    mask): the client then calls `partition_of` itself."""
    seed: int = _crc32c(table.encode("utf-8") + b"\x00")
    mask = PARTITIONS_MAX - 1
    for probe in _PARTITION_PROBES:
        if _crc32c(probe, seed) & mask != partition_of(table, probe, PARTITIONS_MAX):
            return None
    return seed


# --- session versions ---------------------------------------------------------------


class SessionVersions:
    """Per (table, encoded key), the highest version this session wrote or read;
    least recently used entries beyond `capacity` are forgotten."""

    def __init__(self, capacity: int = SESSION_KEYS_MAX) -> None:
        assert capacity > 0
        self._capacity = capacity
        self._versions: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._versions)

    def observe(self, table: str, encoded_key: bytes, version: int) -> None:
        entry = (table, encoded_key)
        versions = self._versions
        known = versions.get(entry)
        if known is None:  # a new entry goes in last: the most recently used
            versions[entry] = version
            if len(versions) > self._capacity:
                versions.popitem(last=False)
            return
        if version > known:
            versions[entry] = version
        versions.move_to_end(entry)

    def version(self, table: str, encoded_key: bytes) -> int:
        """The version a read of this key must at least return (0: no constraint)."""
        entry = (table, encoded_key)
        version = self._versions.get(entry)
        if version is None:
            return 0
        self._versions.move_to_end(entry)
        return version


# --- the near cache -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NearEntry:
    version: int
    value: bytes
    expires_at_ms: int | None  # the node's clock; None: no TTL (or not told)

    def size_bytes(self, encoded_key: bytes) -> int:
        return len(encoded_key) + len(self.value) + NEAR_CACHE_ENTRY_OVERHEAD_BYTES


@dataclass(slots=True)
class NearCacheStats:
    unchanged: int = 0  # strong reads answered "unchanged": the value did not travel
    transferred: int = 0  # strong reads sent with a cached version that got a value back
    misses: int = 0  # strong reads with nothing cached for the key
    evictions: int = 0


class NearCache:
    """(table, encoded key) -> the latest (version, value) this client saw,
    least recently used first out, bounded by bytes. Never holds an older
    version in place of a newer one; absent values are not kept."""

    def __init__(self, bytes_max: int) -> None:
        assert bytes_max > 0
        self.bytes_max = bytes_max
        self.bytes_used = 0
        self.stats = NearCacheStats()
        self._entries: OrderedDict[tuple[str, bytes], NearEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, table: str, encoded_key: bytes, now_ms: int) -> NearEntry | None:
        """The entry, unless its value has expired by `now_ms` (then it goes:
        the node would answer "absent", never "unchanged", for it)."""
        slot = (table, encoded_key)
        entry = self._entries.get(slot)
        if entry is None:
            return None
        if entry.expires_at_ms is not None and entry.expires_at_ms <= now_ms:
            self.discard(table, encoded_key)
            return None
        self._entries.move_to_end(slot)
        return entry

    def put(
        self,
        table: str,
        encoded_key: bytes,
        version: int,
        value: bytes | None,
        expires_at_ms: int | None = None,
    ) -> None:
        slot = (table, encoded_key)
        current = self._entries.get(slot)
        if current is not None and current.version > version:
            return
        self.discard(table, encoded_key)
        if value is None:
            return
        entry = NearEntry(version, value, expires_at_ms)
        size = entry.size_bytes(encoded_key)
        if size > self.bytes_max:
            return
        self._entries[slot] = entry
        self.bytes_used += size
        while self.bytes_used > self.bytes_max:
            (_, old_key), old = self._entries.popitem(last=False)
            self.bytes_used -= old.size_bytes(old_key)
            self.stats.evictions += 1
        assert self.bytes_used >= 0

    def discard(self, table: str, encoded_key: bytes) -> None:
        entry = self._entries.pop((table, encoded_key), None)
        if entry is not None:
            self.bytes_used -= entry.size_bytes(encoded_key)


# --- validation (pure) ---------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6 host]:port"; InvalidRequest if malformed."""
    host, separator, port_text = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidRequest(f"bad node address {address!r}: expected HOST:PORT")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidRequest(
            f"a value must be bytes, not {type(value).__name__} (encode text with .encode())"
        )
    if len(value) > VALUE_BYTES_MAX:
        raise InvalidRequest(f"the value is {len(value)} bytes; the limit is {VALUE_BYTES_MAX}")
    return value


def _check_version(if_version: object) -> int | None:
    if if_version is None:
        return None
    if type(if_version) is not int or if_version < 0:
        raise InvalidRequest(f"if_version must be an int >= 0, not {if_version!r}")
    return if_version


def _check_read_options(consistency: object, max_age_s: object) -> float | None:
    if consistency not in CONSISTENCIES:
        raise InvalidRequest(f"consistency must be one of {CONSISTENCIES}, not {consistency!r}")
    if max_age_s is None:
        return None
    if (
        not isinstance(max_age_s, int | float)
        or isinstance(max_age_s, bool)
        or not 0 <= max_age_s < math.inf
    ):
        raise InvalidRequest(f"max_age_s must be a number >= 0 or None, not {max_age_s!r}")
    return float(max_age_s)


def _check_near_cache_bytes(near_cache_bytes: object) -> int:
    if near_cache_bytes is None:
        return 0
    if type(near_cache_bytes) is not int or near_cache_bytes < 0:
        raise InvalidRequest(
            f"near_cache_bytes must be an int >= 0 or None, not {near_cache_bytes!r}"
        )
    return near_cache_bytes


def _check_limit(limit: object) -> int:
    if type(limit) is not int or not 1 <= limit <= SCAN_LIMIT_MAX:
        raise InvalidRequest(f"limit must be an int from 1 to {SCAN_LIMIT_MAX}, not {limit!r}")
    return limit


def _check_timeout(timeout_s: object) -> float:
    if (
        not isinstance(timeout_s, int | float)
        or isinstance(timeout_s, bool)
        or not 0 < timeout_s < math.inf
    ):
        raise InvalidRequest(f"timeout_s must be a number > 0, not {timeout_s!r}")
    return float(timeout_s)


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None or isinstance(secret, bytes):
        return secret or None
    if isinstance(secret, str):
        return secret.encode("utf-8") or None
    raise InvalidRequest(f"secret must be str, bytes or None, not {type(secret).__name__}")


def _address_list(addresses: list[str] | str) -> list[tuple[str, int]]:
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    parsed = [parse_address(address) for address in addresses if address.strip()]
    if not parsed:
        raise InvalidRequest("give at least one node address (HOST:PORT)")
    return parsed


# --- reply parsing ------------------------------------------------------------------


def _reply_dict(reply: object, method: str) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise KvsvrError(f"malformed {method!r} reply: expected a dict, got {reply!r:.200}")
    return reply


def _reply_version(reply: Mapping[str, Any], method: str) -> int:
    version = reply.get("version")
    if type(version) is not int or version < 0:
        raise KvsvrError(f"malformed {method!r} reply: bad version {version!r:.100}")
    return version


def _get_reply(reply: object) -> tuple[int, bytes | None]:
    if type(reply) is dict:  # the well-formed reply, checked in one pass
        version = reply.get("version")
        value = reply.get("value")
        if type(version) is int and version >= 0 and (value is None or type(value) is bytes):
            return version, value
    body = _reply_dict(reply, "get")
    value = body.get("value")
    if value is not None and not isinstance(value, bytes):
        raise KvsvrError(f"malformed 'get' reply: value is a {type(value).__name__}")
    return _reply_version(body, "get"), value


def _near_reply(reply: object, near: NearEntry) -> tuple[int, bytes | None, int | None]:
    """(version, value, expires_at_ms) of a strong get sent with `near`'s version."""
    body = _reply_dict(reply, "get")
    version = _reply_version(body, "get")
    if body.get("unchanged") is True:
        if version != near.version:
            raise KvsvrError(
                f"malformed 'get' reply: unchanged at version {version}, "
                f"but the client holds version {near.version}"
            )
        return version, near.value, near.expires_at_ms
    _, value = _get_reply(body)
    expires = body.get("expires_at_ms")
    return version, value, expires if type(expires) is int else None


def _scan_reply(reply: object) -> list[Item]:
    rows = _reply_dict(reply, "scan").get("items")
    if not isinstance(rows, list):
        raise KvsvrError("malformed 'scan' reply: no list of items")
    items: list[Item] = []
    for row in rows:
        if not (
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], bytes)
            and isinstance(row[1], bytes)
            and type(row[2]) is int
        ):
            raise KvsvrError(f"malformed 'scan' reply: bad row {row!r:.200}")
        items.append(Item(value=row[1], version=row[2], key=row[0]))
    return items


# --- the async client ---------------------------------------------------------------


class Client:
    """An async kvsvr client. Make one with `kvsvr.connect(...)`, which hosts its
    connections' background tasks and closes it on exit."""

    def __init__(
        self,
        nursery: trio.Nursery,
        partition_map: PartitionMap,
        *,
        secret: bytes | None,
        timeout_s: float,
        home_address: str | None = None,
        near_cache_bytes: int | None = None,
    ) -> None:
        self._nursery = nursery
        # Per partition, its replicas with their addresses (see `_candidates`),
        # the map's table names, and the partition hash's mask and per-table
        # seeds (`_partition_hash_seed`): all follow `_set_map`.
        self._replicas: dict[int, tuple[tuple[NodeInfo, str], ...]] = {}
        self._table_names: frozenset[str] = frozenset()
        self._partition_mask = 0
        self._hash_seeds: dict[str, int] = {}
        self._set_map(partition_map)
        self._secret = secret
        self._timeout_s = _check_timeout(timeout_s)
        self._home_address = home_address  # the node `status()` asks by default
        self._connections: dict[str, net.RpcConnection] = {}
        self._connect_locks: dict[str, trio.Lock] = {}
        self._down_until: dict[str, float] = {}
        self._session = SessionVersions()
        bytes_max = _check_near_cache_bytes(near_cache_bytes)
        self._near_cache = NearCache(bytes_max) if bytes_max else None
        self._closed = False

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def near_cache(self) -> NearCache | None:
        """The client's near cache (None when off): its figures are in `.stats`."""
        return self._near_cache

    # --- public operations ---

    async def get(
        self,
        key: UserKey,
        *,
        table: str = DEFAULT_TABLE,
        consistency: str = "strong",
        max_age_s: float | None = None,
    ) -> Item | None:
        """The key's value and version, or None if it is absent.

        `consistency="strong"` (the default) is linearizable. `"stale"` and
        `"local"` are answered by one replica without a quorum round, possibly
        older than the latest write (at most `max_age_s` old if given) but never
        older than what this client last wrote or read for the key."""
        # The hot path: everything an operation needs is done here, in this
        # coroutine, down to `RpcConnection.request` (each layer of coroutines
        # costs on every suspension and resumption); `_get` and `_call` do the
        # rest (near cache, no open connection yet, a replica lost).
        if type(table) is not str or table not in self._table_names:
            self._check_table(table)
        if type(key) is bytes:  # the common case, without split_user_key's checks
            partition_key = key
            encoded = encode_key(key)
        else:
            partition_key, sort_key = split_user_key(key)
            encoded = encode_key(partition_key, sort_key)
        max_age = _check_read_options(consistency, max_age_s)
        min_version = 0 if consistency == "strong" else self._session.version(table, encoded)
        if self._closed:
            raise RuntimeError("the kvsvr client is closed")
        deadline = trio.current_time() + self._timeout_s
        try:
            if self._near_cache is None:
                body = {
                    "table": table,
                    "key": encoded,
                    "consistency": consistency,
                    "max_age_s": max_age,
                    "min_version": min_version,
                }
                candidates = self._candidates(table, partition_key)
                connection = self._connections.get(candidates[0][1])
                if connection is not None and not connection.closed:
                    try:
                        reply = await connection.request("get", body, deadline=deadline)
                    except Unavailable as exc:
                        if not connection.closed:
                            raise
                        # A read is repeatable: on to the next replicas, as in `_call`.
                        self._mark_down(candidates[0][1])
                        reply = await self._call_from(
                            candidates, 1, [str(exc)], "get", body, True, deadline
                        )
                else:
                    reply = await self._call_from(candidates, 0, [], "get", body, True, deadline)
                version, value = _get_reply(reply)
            else:
                version, value = await self._get(
                    table, partition_key, encoded, consistency, max_age, min_version, deadline
                )
            if version < min_version:
                # The node should have fallen back to a strong read itself; if it
                # did not, do it here rather than let the session go backwards.
                logger.warning(
                    "a %s read returned version %d < %d", consistency, version, min_version
                )
                version, value = await self._get(
                    table, partition_key, encoded, "strong", None, 0, deadline
                )
        except trio.TooSlowError:
            raise self._timed_out("get") from None
        self._session.observe(table, encoded, version)
        return None if value is None else _item(value, version)

    async def put(
        self,
        key: UserKey,
        value: bytes,
        *,
        table: str = DEFAULT_TABLE,
        if_version: int | None = None,
        if_absent: bool = False,
    ) -> int:
        """Write `value`; returns the version it was written at. With
        `if_version`, only if the key's current version is that one; with
        `if_absent`, only if the key holds no value. Otherwise `Conflict`, and
        nothing is written."""
        # `_write`, inlined (as `get`, the hot path is one coroutine down to
        # `RpcConnection.request`).
        value = _check_value(value)
        partition_key, encoded, body = self._write_request(key, value, table, if_version, if_absent)
        deadline = self._operation_deadline()
        try:
            candidates = self._candidates(table, partition_key)
            connection = self._connections.get(candidates[0][1])
            if connection is not None and not connection.closed:
                reply = await connection.request("put", body, deadline=deadline)
            else:
                reply = await self._call_from(candidates, 0, [], "put", body, False, deadline)
        except trio.TooSlowError:
            raise self._timed_out("put") from None
        return self._written(table, encoded, value, reply)

    async def delete(
        self, key: UserKey, *, table: str = DEFAULT_TABLE, if_version: int | None = None
    ) -> int:
        """Delete the key (a tombstone at a new version, which is returned)."""
        return await self._write(
            "delete", key, None, table=table, if_version=if_version, if_absent=False
        )

    async def cas(
        self, key: UserKey, value: bytes, *, if_version: int, table: str = DEFAULT_TABLE
    ) -> int:
        """Compare-and-set: `put(key, value, if_version=if_version)`."""
        if if_version is None:
            raise InvalidRequest("cas needs if_version")
        return await self.put(key, value, table=table, if_version=if_version)

    async def scan(
        self,
        partition_key: KeyPart,
        *,
        table: str = DEFAULT_TABLE,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
        limit: int = 1000,
    ) -> list[Item]:
        """The rows of one partition key with sort keys in [start, end), in
        sort-key order, at most `limit` of them. Each `Item.key` is a sort key."""
        self._check_table(table)
        partition = to_bytes(partition_key)
        encode_key(partition)  # checks the partition key's size
        start_key = None if start is None else to_bytes(start)
        end_key = None if end is None else to_bytes(end)
        body = {
            "table": table,
            "partition_key": partition,
            "start": start_key,
            "end": end_key,
            "limit": _check_limit(limit),
        }
        deadline = self._operation_deadline()
        try:
            reply = await self._call(
                table, partition, "scan", body, repeatable=True, deadline=deadline
            )
        except trio.TooSlowError:
            raise self._timed_out("scan") from None
        items = _scan_reply(reply)
        for item in items:
            assert item.key is not None
            self._session.observe(table, encode_key(partition, item.key), item.version)
        return items

    async def status(self, node: str | None = None) -> dict[str, Any]:
        """A node's status (id, partitions held, counters...). `node` is a node
        id or "host:port"; None asks the node the client first reached."""
        with self._deadline("status"):
            connection = await self._status_connection(node)
            return _reply_dict(await connection.request("status", {}), "status")

    async def recover(
        self, node: str, *, accept_data_loss: bool, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """Tell a node that waits for an operator (a majority of some partition's
        replicas lost their data) to rebuild from the replicas that kept theirs.
        Returns once it is ready, with what may have been lost (`"loss"`);
        a node that needs no operator answers `"recovered": False`."""
        if not accept_data_loss:
            raise InvalidRequest("recovery may lose acknowledged writes: pass accept_data_loss")
        if not timeout_s > 0:
            raise InvalidRequest(f"timeout_s must be > 0, not {timeout_s!r}")
        try:
            with trio.fail_after(timeout_s):
                connection = await self._status_connection(node)
                reply = await connection.request(
                    "recover", {"accept_data_loss": True}, deadline=trio.current_time() + timeout_s
                )
        except trio.TooSlowError:
            raise Timeout(f"node {node} did not finish recovering in {timeout_s:g} s") from None
        return _reply_dict(reply, "recover")

    async def cluster_status(self) -> list[dict[str, Any]]:
        """Every node of the map, asked at once: its status with `"health"`
        set to its replica's state ("ready", "starting", "waiting_for_peers",
        "rebuilding", "needs_operator"; only "ready" serves), or only its id,
        address and zone with `"health"` saying why it could not be asked."""
        results: dict[str, dict[str, Any]] = {}

        async def ask(node: NodeInfo) -> None:
            try:
                with trio.fail_after(self._timeout_s):
                    status = await self.status(node.id)
                replication = status.get("replication")
                state = replication.get("state") if isinstance(replication, Mapping) else None
                status["health"] = str(state) if state is not None else "answering"
            except (KvsvrError, trio.TooSlowError) as error:
                status = {"node": node.id, "health": f"unreachable ({error})"}
            status.setdefault("address", f"{node.host}:{node.port}")
            status.setdefault("zone", node.zone)
            results[node.id] = status

        async with trio.open_nursery() as nursery:
            for node in self._map.nodes:
                nursery.start_soon(ask, node)
        return [results[node.id] for node in self._map.nodes]

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every node of the map answers, its replica is "ready"
        (it votes: a node with an empty data directory first founds the
        cluster or rebuilds what it lost; see `cluster_status` for the other
        states) and it sees every other node up. Raises `Timeout` after
        `timeout_s`, saying which nodes were not ready and why (a node that
        needs an operator says so)."""
        if not timeout_s > 0:
            raise InvalidRequest(f"timeout_s must be > 0, not {timeout_s!r}")
        waiting = {node.id: "not asked yet" for node in self._map.nodes}
        with trio.move_on_after(timeout_s):
            while True:
                for status in await self.cluster_status():
                    reason = _not_ready_because(status)
                    if reason is None:
                        waiting.pop(str(status.get("node")), None)
                    else:
                        waiting[str(status.get("node"))] = reason
                if not waiting:
                    return
                await trio.sleep(READY_POLL_S)
        detail = "; ".join(f"{node}: {reason}" for node, reason in sorted(waiting.items()))
        raise Timeout(f"cluster not ready after {timeout_s:g} s ({detail})")

    async def partition_map(self, *, refresh: bool = False) -> PartitionMap:
        """The partition map the client routes by; `refresh=True` fetches it anew."""
        if refresh:
            with self._deadline("map"):
                connection = await self._status_connection(None)
                self._set_map(PartitionMap.from_wire(await connection.request("map", {})))
        else:
            await trio.lowlevel.checkpoint()
        return self._map

    async def aclose(self) -> None:
        """Close every connection. Operations after this raise RuntimeError."""
        self._closed = True
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            await connection.aclose()
        await trio.lowlevel.checkpoint()

    # --- internals ---

    @contextmanager
    def _deadline(self, operation: str) -> Iterator[None]:
        """Bound an operation that is not on the hot path by the client's timeout."""
        deadline = self._operation_deadline()
        try:
            with trio.fail_at(deadline):
                yield
        except trio.TooSlowError:
            raise self._timed_out(operation) from None

    def _operation_deadline(self) -> float:
        """The time (trio's clock) by which an operation starting now must end.
        The hot path passes it down (`_call`, `RpcConnection.request`) instead of
        opening a cancel scope per operation; a `trio.TooSlowError` raised from
        there means it has passed."""
        if self._closed:
            raise RuntimeError("the kvsvr client is closed")
        return trio.current_time() + self._timeout_s

    def _timed_out(self, operation: str) -> Timeout:
        return Timeout(f"{operation} timed out after {self._timeout_s} s; the outcome is unknown")

    def _check_table(self, table: object) -> str:
        if type(table) is str and table in self._table_names:
            return table
        if not isinstance(table, str):
            raise InvalidRequest(f"a table name must be a str, not {type(table).__name__}")
        if self._map.tables and self._map.table(table) is None:
            known = ", ".join(t.name for t in self._map.tables)
            raise InvalidRequest(f"no table {table!r} in this cluster (tables: {known})")
        return table

    def _key(self, table: str, key: UserKey) -> tuple[bytes, bytes]:
        """(partition key, encoded key), checked."""
        self._check_table(table)
        if type(key) is bytes:  # the common case, without split_user_key's checks
            return key, encode_key(key)
        partition_key, sort_key = split_user_key(key)
        return partition_key, encode_key(partition_key, sort_key)

    async def _get(
        self,
        table: str,
        partition_key: bytes,
        encoded: bytes,
        consistency: str,
        max_age_s: float | None,
        min_version: int,
        deadline: float,
    ) -> tuple[int, bytes | None]:
        body: dict[str, Any] = {
            "table": table,
            "key": encoded,
            "consistency": consistency,
            "max_age_s": max_age_s,
            "min_version": min_version,
        }
        near_cache = self._near_cache
        if near_cache is None:
            return _get_reply(
                await self._call(
                    table, partition_key, "get", body, repeatable=True, deadline=deadline
                )
            )
        now_ms = int(time.time() * 1000)
        near = near_cache.get(table, encoded, now_ms) if consistency == "strong" else None
        if near is None:
            if consistency == "strong":
                near_cache.stats.misses += 1
            reply = await self._call(
                table, partition_key, "get", body, repeatable=True, deadline=deadline
            )
            version, value = _get_reply(reply)
            expires = _reply_dict(reply, "get").get("expires_at_ms")
            expires_at_ms = expires if type(expires) is int else None
        else:
            body["cached_version"] = near.version
            reply = await self._call(
                table, partition_key, "get", body, repeatable=True, deadline=deadline
            )
            version, value, expires_at_ms = _near_reply(reply, near)
            if _reply_dict(reply, "get").get("unchanged") is True:
                near_cache.stats.unchanged += 1
            else:
                near_cache.stats.transferred += 1
        near_cache.put(table, encoded, version, value, expires_at_ms)
        return version, value

    async def _write(
        self,
        operation: str,
        key: UserKey,
        value: bytes | None,
        *,
        table: str,
        if_version: int | None,
        if_absent: bool,
    ) -> int:
        partition_key, encoded, body = self._write_request(key, value, table, if_version, if_absent)
        deadline = self._operation_deadline()
        try:
            reply = await self._call(
                table, partition_key, "put", body, repeatable=False, deadline=deadline
            )
        except trio.TooSlowError:
            raise self._timed_out(operation) from None
        return self._written(table, encoded, value, reply)

    def _write_request(
        self,
        key: UserKey,
        value: bytes | None,
        table: str,
        if_version: int | None,
        if_absent: bool,
    ) -> tuple[bytes, bytes, dict[str, Any]]:
        """A write's (partition key, encoded key, request body), checked; the
        near cache forgets the key."""
        partition_key, encoded = self._key(table, key)
        if not isinstance(if_absent, bool):
            raise InvalidRequest(f"if_absent must be a bool, not {if_absent!r}")
        if if_version is not None and _check_version(if_version) is not None and if_absent:
            raise InvalidRequest("give if_version or if_absent, not both")
        body = {
            "table": table,
            "key": encoded,
            "value": value,
            "if_version": if_version,
            "if_absent": if_absent,
        }
        if self._near_cache is not None:
            # Whatever happens to this write, what the cache holds may be old.
            self._near_cache.discard(table, encoded)
        return partition_key, encoded, body

    def _written(self, table: str, encoded: bytes, value: bytes | None, reply: object) -> int:
        """The version a write's reply names, remembered by the session (and
        the near cache)."""
        if type(reply) is dict:  # the well-formed reply, checked in one pass
            version = reply.get("version")
            if type(version) is not int or version < 0:
                version = _reply_version(reply, "put")  # raises
        else:
            version = _reply_version(_reply_dict(reply, "put"), "put")
        self._session.observe(table, encoded, version)
        if self._near_cache is not None:
            self._near_cache.put(table, encoded, version, value)
        return version

    async def _call(
        self,
        table: str,
        partition_key: bytes,
        method: str,
        body: object,
        *,
        repeatable: bool,
        deadline: float,
    ) -> object:
        """Send to the first replica that can be reached. A request whose
        connection is lost after sending goes to the next replica only if
        `repeatable` (a read); a write's outcome is then unknown: Unavailable.
        Raises `trio.TooSlowError` once `deadline` (trio's clock) has passed."""
        return await self._call_from(
            self._candidates(table, partition_key), 0, [], method, body, repeatable, deadline
        )

    async def _call_from(
        self,
        candidates: Sequence[tuple[NodeInfo, str]],
        start: int,
        failures: list[str],
        method: str,
        body: object,
        repeatable: bool,
        deadline: float,
    ) -> object:
        """`_call` from `candidates[start]` on, after `failures` with those before."""
        for node, address in candidates[start:]:
            connection = self._connections.get(address)
            if connection is None or connection.closed:
                try:
                    connection = await self._connection_by(node, deadline)
                except Unavailable as exc:
                    failures.append(str(exc))
                    continue
            try:
                return await connection.request(method, body, deadline=deadline)
            except Unavailable as exc:
                if not (repeatable and connection.closed):
                    raise
                self._mark_down(address)
                failures.append(str(exc))
        raise Unavailable(
            f"no replica of the key's partition could be reached: {'; '.join(failures)}"
        )

    def _candidates(self, table: str, partition_key: bytes) -> Sequence[tuple[NodeInfo, str]]:
        """`route`'s nodes for a key, each with its address. While no node is
        marked down (the usual case) they are a partition's replicas in map
        order, kept per partition rather than looked up anew per operation."""
        if self._down_until:
            nodes = route(
                self._map,
                table,
                partition_key,
                down_until=self._down_until,
                now=trio.current_time(),
            )
            return [(node, node.address) for node in nodes]
        seed = self._hash_seeds.get(table)
        if seed is None:
            partition = partition_of(table, partition_key, self._map.partitions)
        else:
            partition = _crc32c(partition_key, seed) & self._partition_mask
        replicas = self._replicas.get(partition)
        if replicas is None:  # at most `PARTITIONS_MAX` entries
            replicas = tuple(
                (node, node.address) for node in self._map.replicas_of_partition(partition)
            )
            self._replicas[partition] = replicas
        return replicas

    def _set_map(self, partition_map: PartitionMap) -> None:
        self._map = partition_map
        self._replicas.clear()
        self._table_names = frozenset(table.name for table in partition_map.tables)
        self._partition_mask = partition_map.partitions - 1
        self._hash_seeds = {
            table: seed
            for table in self._table_names | {DEFAULT_TABLE}
            if (seed := _partition_hash_seed(table)) is not None
        }

    async def _connection_by(self, node: NodeInfo, deadline: float) -> net.RpcConnection:
        """`_connection` to `node`, bounded by `deadline` (then `trio.TooSlowError`)."""
        with trio.CancelScope(deadline=deadline):
            return await self._connection(node.host, node.port)
        raise trio.TooSlowError  # reached only when the deadline cut the connect short

    async def _status_connection(self, node: str | None) -> net.RpcConnection:
        if node is not None:
            known = self._map.find_node(node)
            host, port = (known.host, known.port) if known else _node_address(node)
            return await self._connection(host, port)
        addresses = [node.address for node in self._map.nodes]
        if self._home_address is not None:
            addresses.insert(0, self._home_address)
        failures: list[str] = []
        for address in addresses:
            try:
                return await self._connection(*parse_address(address))
            except Unavailable as exc:
                failures.append(str(exc))
        raise Unavailable(f"no node could be reached: {'; '.join(failures)}")

    async def _connection(self, host: str, port: int) -> net.RpcConnection:
        """An open connection to a node, made on first use. Unavailable if it
        cannot be reached (and the node is then skipped for `NODE_DOWN_S`)."""
        address = format_address(host, port)
        lock = self._connect_locks.setdefault(address, trio.Lock())
        async with lock:  # one connect per node at a time; the others reuse it
            existing = self._connections.get(address)
            if existing is not None and not existing.closed:
                return existing
            if self._closed:
                raise RuntimeError("the kvsvr client is closed")
            try:
                connection = await net.connect(
                    host,
                    port,
                    secret=self._secret,
                    connect_timeout_s=min(CONNECT_ATTEMPT_TIMEOUT_S, self._timeout_s),
                )
            except Unavailable:
                self._mark_down(address)
                raise
            await self._nursery.start(connection.run)
            self._connections[address] = connection
            self._down_until.pop(address, None)
            return connection

    def _mark_down(self, address: str) -> None:
        self._down_until[address] = trio.current_time() + NODE_DOWN_S


def _node_address(node: str) -> tuple[str, int]:
    try:
        return parse_address(node)
    except InvalidRequest:
        raise InvalidRequest(
            f"no node {node!r} in the partition map (give a node id or HOST:PORT)"
        ) from None


@asynccontextmanager
async def connect(
    addresses: list[str] | str,
    *,
    secret: str | bytes | None = None,
    timeout_s: float = 5.0,
    near_cache_bytes: int | None = None,
) -> AsyncIterator[Client]:
    """Connect to a kvsvr cluster: `async with kvsvr.connect(...) as client:`.

    `addresses` is a list of "host:port" (or one string, comma-separated); the
    first that answers supplies the partition map. `secret` is the cluster
    secret (None for an open cluster). `near_cache_bytes` turns on the
    client's near cache with that budget (None or 0: off). Raises
    `Unavailable` if no address answers, `AuthenticationFailed` if the secret
    is refused, and `Timeout` if all that takes longer than `timeout_s`.
    """
    seeds = _address_list(addresses)
    secret_bytes = _secret_bytes(secret)
    timeout = _check_timeout(timeout_s)
    near_bytes = _check_near_cache_bytes(near_cache_bytes)
    # As in RpcConnection._hosted: the body's exception is carried out of the
    # nursery and re-raised as is, not wrapped in an ExceptionGroup.
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client: Client | None = None
        try:
            client = await _bootstrap(nursery, seeds, secret_bytes, timeout, near_bytes)
            yield client
        except BaseException as exc:
            body_error = exc
        finally:
            if client is not None:
                await client.aclose()
    if body_error is not None:
        raise body_error


async def _bootstrap(
    nursery: trio.Nursery,
    seeds: list[tuple[str, int]],
    secret: bytes | None,
    timeout_s: float,
    near_cache_bytes: int = 0,
) -> Client:
    """A client around the first seed that answers with a partition map."""
    failures: list[str] = []
    try:
        with trio.fail_after(timeout_s):
            for host, port in seeds:
                try:
                    return await _client_from_seed(
                        nursery, host, port, secret, timeout_s, near_cache_bytes
                    )
                except Unavailable as exc:
                    failures.append(str(exc))
    except trio.TooSlowError:
        raise Timeout(
            f"connecting to the cluster timed out after {timeout_s} s "
            f"({'; '.join(failures) or 'no node answered'})"
        ) from None
    raise Unavailable(f"no node of the cluster could be reached: {'; '.join(failures)}")


async def _client_from_seed(
    nursery: trio.Nursery,
    host: str,
    port: int,
    secret: bytes | None,
    timeout_s: float,
    near_cache_bytes: int = 0,
) -> Client:
    connection = await net.connect(
        host, port, secret=secret, connect_timeout_s=min(CONNECT_ATTEMPT_TIMEOUT_S, timeout_s)
    )
    await nursery.start(connection.run)
    try:
        partition_map = PartitionMap.from_wire(await connection.request("map", {}))
    except BaseException:
        # Closing cancels the connection's task at once; the wait may be cut short.
        with trio.CancelScope(shield=True):
            await connection.aclose()
        raise
    address = format_address(host, port)
    client = Client(
        nursery,
        partition_map,
        secret=secret,
        timeout_s=timeout_s,
        home_address=address,
        near_cache_bytes=near_cache_bytes,
    )
    client._connections[address] = connection
    return client


# --- the blocking client --------------------------------------------------------------

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _not_ready_because(status: Mapping[str, Any]) -> str | None:
    """Why a node (its `cluster_status` entry) is not ready yet; None if it is."""
    if status.get("health") != "ready":
        return str(status.get("health"))
    replication = status.get("replication")
    if not isinstance(replication, Mapping):
        return "no replication status"
    state = replication.get("state")
    if state != "ready":
        return f"replica {state}"
    peers = replication.get("peers")
    down = sorted(
        str(peer)
        for peer, seen in (peers.items() if isinstance(peers, Mapping) else ())
        if not (isinstance(seen, Mapping) and seen.get("up"))
    )
    if down:
        return f"sees {', '.join(down)} down"
    return None


class SyncClient:
    """A blocking kvsvr client for scripts, with the methods of `Client`.

        with SyncClient(["127.0.0.1:7101"], secret="s") as client:
            client.put("greeting", b"hello")

    It runs trio and an async `Client` in a background thread of its own and
    calls into it; several threads may share one SyncClient. `close()` (or
    leaving the `with` block) closes the connections and ends the thread.
    """

    def __init__(
        self,
        addresses: list[str] | str,
        *,
        secret: str | bytes | None = None,
        timeout_s: float = 5.0,
        near_cache_bytes: int | None = None,
    ) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=trio.run,
            args=(self._main, addresses, secret, timeout_s, near_cache_bytes),
            name="kvsvr-sync-client",
            daemon=True,  # a forgotten close() must not keep the interpreter alive
        )
        self._thread.start()
        self._ready.wait()  # connect() is bounded by timeout_s, so this ends
        if self._client is None:
            self._thread.join()
            self._closed = True
            assert self._error is not None
            error, self._error = self._error, None
            raise error

    async def _main(
        self,
        addresses: list[str] | str,
        secret: str | bytes | None,
        timeout_s: float,
        near_cache_bytes: int | None,
    ) -> None:
        try:
            async with connect(
                addresses, secret=secret, timeout_s=timeout_s, near_cache_bytes=near_cache_bytes
            ) as client:
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._client = client
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            # Carried to the caller's thread: by __init__ or by close().
            self._error = exc
        finally:
            self._ready.set()

    def _run(self, method: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise RuntimeError("the kvsvr SyncClient is closed")

        async def call() -> _T:
            return await method(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._token)

    @property
    def _async(self) -> Client:
        if self._client is None:
            raise RuntimeError("the kvsvr SyncClient is closed")
        return self._client

    def get(
        self,
        key: UserKey,
        *,
        table: str = DEFAULT_TABLE,
        consistency: str = "strong",
        max_age_s: float | None = None,
    ) -> Item | None:
        return self._run(
            self._async.get, key, table=table, consistency=consistency, max_age_s=max_age_s
        )

    def put(
        self,
        key: UserKey,
        value: bytes,
        *,
        table: str = DEFAULT_TABLE,
        if_version: int | None = None,
        if_absent: bool = False,
    ) -> int:
        return self._run(
            self._async.put, key, value, table=table, if_version=if_version, if_absent=if_absent
        )

    def delete(
        self, key: UserKey, *, table: str = DEFAULT_TABLE, if_version: int | None = None
    ) -> int:
        return self._run(self._async.delete, key, table=table, if_version=if_version)

    def cas(
        self, key: UserKey, value: bytes, *, if_version: int, table: str = DEFAULT_TABLE
    ) -> int:
        return self._run(self._async.cas, key, value, if_version=if_version, table=table)

    def scan(
        self,
        partition_key: KeyPart,
        *,
        table: str = DEFAULT_TABLE,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
        limit: int = 1000,
    ) -> list[Item]:
        return self._run(
            self._async.scan, partition_key, table=table, start=start, end=end, limit=limit
        )

    def status(self, node: str | None = None) -> dict[str, Any]:
        return self._run(self._async.status, node)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self._run(self._async.wait_ready, timeout_s)

    def recover(
        self, node: str, *, accept_data_loss: bool, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        return self._run(
            self._async.recover, node, accept_data_loss=accept_data_loss, timeout_s=timeout_s
        )

    def partition_map(self, *, refresh: bool = False) -> PartitionMap:
        return self._run(self._async.partition_map, refresh=refresh)

    def close(self) -> None:
        """Close the connections and stop the background thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stop, token = self._stop, self._token
        assert stop is not None and token is not None
        try:
            trio.from_thread.run_sync(stop.set, trio_token=token)
        except trio.RunFinishedError:
            pass  # the thread already ended (its error, if any, is raised below)
        self._thread.join(SYNC_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            raise KvsvrError(f"the client thread did not stop within {SYNC_CLOSE_TIMEOUT_S} s")
        self._client = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
