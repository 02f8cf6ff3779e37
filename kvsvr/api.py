"""Messages between a client and a node, their wire form, and the limits of
the client API.

A request travels as `RpcConnection.request(method, body)`: the method is a
`Method`, the body a msgpack map of string keys. Each request and reply here
has one `to_wire()`, which builds that map, and one `from_wire(body)`, which
checks it and raises the error the other end should hear:

- a node parsing a request raises `InvalidRequest` (the client sees it as is);
- a client parsing a reply raises `KvsvrError` ("malformed ... reply").

Both ends use these classes, so a field changes in one place. Unknown fields
in a body are ignored, and optional fields may be left out, so an older or a
newer client keeps working. Checks that need the node's state (is the table
known, is it eventual, does this node hold the key) stay with the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeAlias

from kvsvr.errors import InvalidRequest, KvsvrError
from kvsvr.keys import KEY_BYTES_MAX, decode_key
from kvsvr.protocol.placement import PARTITIONS_MAX, partition_of

__all__ = [
    "DEFAULT_TABLE",
    "KEY_BYTES_MAX",
    "OPERATION_TIMEOUT_MAX_S",
    "OPERATION_TIMEOUT_S",
    "SCAN_LIMIT_DEFAULT",
    "SCAN_LIMIT_MAX",
    "VALUE_BYTES_MAX",
    "GetReply",
    "GetRequest",
    "MapRequest",
    "Method",
    "NodeInfo",
    "PartitionMap",
    "PutReply",
    "PutRequest",
    "ReadConsistency",
    "RecoverRequest",
    "ScanReply",
    "ScanRequest",
    "StatusRequest",
    "TableConsistency",
    "TableInfo",
    "format_address",
    "read_consistency",
    "report_from_wire",
]

# --- limits -------------------------------------------------------------------
# (`KEY_BYTES_MAX`, the largest encoded key, lives with the key encoding in
# `kvsvr.keys` and is re-exported here.)

# The largest value a client stores. A value travels in one frame, is stored in
# one LMDB row and is copied by every replica and the cache; 1 MiB keeps each of
# those cheap and far below the frame limit (`net.MAX_FRAME_BYTES`, 16 MiB).
VALUE_BYTES_MAX: Final = 1024 * 1024

# Rows one scan returns. Its reply is one frame, so the product of this and the
# typical row size must stay well below `net.MAX_FRAME_BYTES`; callers page with
# `start` for more.
SCAN_LIMIT_MAX: Final = 10_000

# Rows a scan returns when the request names no limit.
SCAN_LIMIT_DEFAULT: Final = 1000

# A client operation that has not finished in this time answers Timeout
# (outcome unknown). Below the client's default of 5 s so the client hears why.
OPERATION_TIMEOUT_S: Final = 4.0

# The longest a request may ask the node to work on it (`timeout_s`): a node
# holds a task, and maybe a key's write turn, for that long.
OPERATION_TIMEOUT_MAX_S: Final = 60.0

# The table a request names when it names none.
DEFAULT_TABLE: Final = "default"


# --- enums ------------------------------------------------------------------------


class Method(StrEnum):
    """The client API's request methods."""

    GET = "get"
    PUT = "put"
    SCAN = "scan"
    MAP = "map"
    STATUS = "status"
    RECOVER = "recover"
    WATCH = "watch"


class ReadConsistency(StrEnum):
    """What a get promises. STRONG: linearizable (a quorum round). STALE: one
    replica or the node's cache, possibly older than the latest write, never
    older than the session's floor. LOCAL: the asked node's own replica."""

    STRONG = "strong"
    STALE = "stale"
    LOCAL = "local"


class TableConsistency(StrEnum):
    """How a table replicates: Paxos per key, or last-writer-wins."""

    STRONG = "strong"
    EVENTUAL = "eventual"


# The read consistencies by wire name: one dict lookup per get, where calling
# the enum costs several times more.
_READ_CONSISTENCY: Final = {consistency.value: consistency for consistency in ReadConsistency}


def read_consistency(name: object) -> ReadConsistency | None:
    """The read consistency a name (its wire form) stands for; None if none."""
    return _READ_CONSISTENCY.get(name) if isinstance(name, str) else None


# --- field checks (requests: InvalidRequest, as the node answers them) -------------


def _body(body: object, method: Method) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{method}: the body must be a map")
    return body


def _table(body: dict[str, Any]) -> str:
    table = body.get("table", DEFAULT_TABLE)
    if not isinstance(table, str):
        raise InvalidRequest("table must be a str")
    return table


def _encoded_key(body: dict[str, Any]) -> bytes:
    key = body.get("key")
    if not isinstance(key, bytes):
        raise InvalidRequest("key must be bytes (an encoded key)")
    partition_key, _ = decode_key(key)
    if not partition_key:
        raise InvalidRequest("the partition key must not be empty")
    return key


def _timeout(body: dict[str, Any]) -> float | None:
    timeout = body.get("timeout_s")
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or not 0 < timeout <= OPERATION_TIMEOUT_MAX_S:
        raise InvalidRequest(f"timeout_s must be in (0, {OPERATION_TIMEOUT_MAX_S}]")
    return float(timeout)


def _optional_bytes(body: dict[str, Any], name: str) -> bytes | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bytes):
        raise InvalidRequest("start and end must be bytes")
    return value


# --- requests -----------------------------------------------------------------------

# Messages are values: nobody changes one after building it. They are not
# `frozen` dataclasses all the same, because a frozen __init__ sets every field
# through object.__setattr__ (about 3x the cost of a plain one), and the client
# builds one per operation; `unsafe_hash` keeps them hashable, as in
# `kvsvr.protocol.messages`.


@dataclass(slots=True, unsafe_hash=True)
class GetRequest:
    """Read one key. `min_version` is the session's floor for non-strong reads
    (0: none); `cached_version` the version the client's near cache holds (the
    node then answers "unchanged" when the quorum chose exactly it)."""

    table: str
    key: bytes  # encoded (`kvsvr.keys.encode_key`)
    consistency: ReadConsistency = ReadConsistency.STRONG
    max_age_s: float | None = None
    min_version: int = 0
    cached_version: int | None = None
    timeout_s: float | None = None  # None: the node's OPERATION_TIMEOUT_S

    def partition_key(self) -> bytes:
        return decode_key(self.key)[0]

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "table": self.table,
            "key": self.key,
            "consistency": self.consistency,
            "max_age_s": self.max_age_s,
            "min_version": self.min_version,
        }
        if self.cached_version is not None:
            body["cached_version"] = self.cached_version
        if self.timeout_s is not None:
            body["timeout_s"] = self.timeout_s
        return body

    @staticmethod
    def from_wire(body: object) -> GetRequest:
        checked = _body(body, Method.GET)
        table = _table(checked)
        key = _encoded_key(checked)
        consistency = read_consistency(checked.get("consistency", "strong"))
        if consistency is None:
            raise InvalidRequest("consistency must be 'strong', 'stale' or 'local'")
        min_version = checked.get("min_version") or 0
        if not isinstance(min_version, int):
            raise InvalidRequest("min_version must be an int")
        max_age_s = checked.get("max_age_s")
        if max_age_s is not None and (
            not isinstance(max_age_s, int | float) or isinstance(max_age_s, bool) or max_age_s < 0
        ):
            raise InvalidRequest("max_age_s must be a number >= 0 or None")
        cached_version = checked.get("cached_version")
        if cached_version is not None and (
            not isinstance(cached_version, int)
            or isinstance(cached_version, bool)
            or cached_version < 1
        ):
            raise InvalidRequest("cached_version must be an int >= 1 or None")
        return GetRequest(
            table, key, consistency, max_age_s, min_version, cached_version, _timeout(checked)
        )


@dataclass(slots=True, unsafe_hash=True)
class PutRequest:
    """Write one key: `value` None deletes it (a tombstone). With `if_version`,
    only if the key is at that version; with `if_absent`, only if it holds no
    value. The table's TTL, if any, is the node's to apply."""

    table: str
    key: bytes  # encoded
    value: bytes | None
    if_version: int | None = None
    if_absent: bool = False
    timeout_s: float | None = None  # None: the node's OPERATION_TIMEOUT_S

    def partition_key(self) -> bytes:
        return decode_key(self.key)[0]

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "table": self.table,
            "key": self.key,
            "value": self.value,
            "if_version": self.if_version,
            "if_absent": self.if_absent,
        }
        if self.timeout_s is not None:
            body["timeout_s"] = self.timeout_s
        return body

    @staticmethod
    def from_wire(body: object) -> PutRequest:
        checked = _body(body, Method.PUT)
        table = _table(checked)
        key = _encoded_key(checked)
        value = checked.get("value")
        if value is not None and not isinstance(value, bytes):
            raise InvalidRequest("value must be bytes (or None to delete)")
        if value is not None and len(value) > VALUE_BYTES_MAX:
            raise InvalidRequest(f"value is {len(value)} bytes; the limit is {VALUE_BYTES_MAX}")
        if_version = checked.get("if_version")
        if if_version is not None and (not isinstance(if_version, int) or if_version < 0):
            raise InvalidRequest("if_version must be an int >= 0")
        if_absent = checked.get("if_absent", False)
        if not isinstance(if_absent, bool):
            raise InvalidRequest("if_absent must be a bool")
        return PutRequest(table, key, value, if_version, if_absent, _timeout(checked))


@dataclass(slots=True, unsafe_hash=True)
class ScanRequest:
    """The rows of one partition key with sort keys in [start, end) (None or
    empty: from the first, to the last), in sort-key order, at most `limit`."""

    table: str
    partition_key: bytes
    start: bytes | None = None
    end: bytes | None = None
    limit: int = SCAN_LIMIT_DEFAULT
    timeout_s: float | None = None  # None: the node's OPERATION_TIMEOUT_S

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "table": self.table,
            "partition_key": self.partition_key,
            "start": self.start,
            "end": self.end,
            "limit": self.limit,
        }
        if self.timeout_s is not None:
            body["timeout_s"] = self.timeout_s
        return body

    @staticmethod
    def from_wire(body: object) -> ScanRequest:
        checked = _body(body, Method.SCAN)
        table = _table(checked)
        partition_key = checked.get("partition_key")
        if not isinstance(partition_key, bytes) or not partition_key:
            raise InvalidRequest("partition_key must be non-empty bytes")
        start = _optional_bytes(checked, "start")
        end = _optional_bytes(checked, "end")
        limit = checked.get("limit", SCAN_LIMIT_DEFAULT)
        if not isinstance(limit, int) or not 1 <= limit <= SCAN_LIMIT_MAX:
            raise InvalidRequest(f"limit must be between 1 and {SCAN_LIMIT_MAX}")
        return ScanRequest(table, partition_key, start, end, limit, _timeout(checked))


# A partition watch resumes from one version per key: at most this many keys
# (a request carries them all; 1000 cursors are ~20 KiB on the wire).
WATCH_CURSORS_MAX: Final = 1000
# The longest a node holds a watch request with nothing to deliver before it
# answers with no events (the client asks again at once).
WATCH_WAIT_MAX_S: Final = 30.0


@dataclass(slots=True)
class WatchRequest:
    """The changes after `cursors` of one key (`sort_key` set) or of the rows
    of one partition key with sort keys in [start, end) (`sort_key` None; None
    or empty bounds: from the first, to the last). `cursors` maps a sort key
    to the last version the watcher has; a key missing from it is watched
    from 0. The node answers at once if it has changes, else within `wait_s`."""

    table: str
    partition_key: bytes
    sort_key: bytes | None
    cursors: dict[bytes, int]
    wait_s: float
    start: bytes | None = None
    end: bytes | None = None

    def covers(self, sort_key: bytes) -> bool:
        """Whether the watch covers the row with this sort key."""
        if self.sort_key is not None:
            return sort_key == self.sort_key
        return (not self.start or sort_key >= self.start) and (not self.end or sort_key < self.end)

    def to_wire(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "partition_key": self.partition_key,
            "sort_key": self.sort_key,
            "cursors": self.cursors,
            "wait_s": self.wait_s,
            "start": self.start,
            "end": self.end,
        }

    @staticmethod
    def from_wire(body: object) -> WatchRequest:
        checked = _body(body, Method.WATCH)
        table = _table(checked)
        partition_key = checked.get("partition_key")
        if not isinstance(partition_key, bytes) or not partition_key:
            raise InvalidRequest("partition_key must be non-empty bytes")
        sort_key = checked.get("sort_key")
        if sort_key is not None and not isinstance(sort_key, bytes):
            raise InvalidRequest("sort_key must be bytes or None")
        cursors = checked.get("cursors")
        if not isinstance(cursors, dict) or len(cursors) > WATCH_CURSORS_MAX:
            raise InvalidRequest(f"cursors must be a map of at most {WATCH_CURSORS_MAX} keys")
        start = _optional_bytes(checked, "start")
        end = _optional_bytes(checked, "end")
        if sort_key is not None and (start or end):
            raise InvalidRequest("start and end bound a partition watch, not a one-key watch")
        wait_s = checked.get("wait_s")
        if not isinstance(wait_s, int | float) or not 0 <= wait_s <= WATCH_WAIT_MAX_S:
            raise InvalidRequest(f"wait_s must be in [0, {WATCH_WAIT_MAX_S}]")
        request = WatchRequest(table, partition_key, sort_key, cursors, float(wait_s), start, end)
        for key, version in cursors.items():
            if not isinstance(key, bytes) or not isinstance(version, int) or version < 0:
                raise InvalidRequest("cursors map sort keys (bytes) to versions (ints >= 0)")
            if not request.covers(key):
                raise InvalidRequest(f"cursor of sort key {key!r}, which the watch does not cover")
        return request


@dataclass(slots=True, frozen=True)
class WatchEvent:
    """One chosen version of one key. `value` None: the key was deleted.
    `previous_version` is the version before it in the watch's order: the
    versions between were folded into one write or never reached the node's
    replica (see docs/DESIGN.md "Watch")."""

    key: bytes  # the sort key (b"" for a key without one)
    version: int
    previous_version: int
    value: bytes | None

    @property
    def deleted(self) -> bool:
        return self.value is None


def watch_reply_to_wire(events: list[WatchEvent]) -> dict[str, Any]:
    return {
        "events": [[e.key, e.version, e.previous_version, e.value] for e in events],
    }


def watch_reply_from_wire(reply: object) -> list[WatchEvent]:
    body = _reply_body(reply, Method.WATCH)
    events: list[WatchEvent] = []
    for item in _list_field(body, "events"):
        if (
            not isinstance(item, list)
            or len(item) != 4
            or not isinstance(item[0], bytes)
            or not isinstance(item[1], int)
            or not isinstance(item[2], int)
            or not (item[3] is None or isinstance(item[3], bytes))
        ):
            raise KvsvrError(f"malformed watch event: {item!r}")
        events.append(WatchEvent(item[0], item[1], item[2], item[3]))
    return events


@dataclass(slots=True, unsafe_hash=True)
class MapRequest:
    """Ask for the partition map (`PartitionMap`)."""

    def to_wire(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def from_wire(body: object) -> MapRequest:
        return MapRequest()  # the body carries nothing; any body is accepted


@dataclass(slots=True, unsafe_hash=True)
class StatusRequest:
    """Ask a node for its status report (see `report_from_wire`)."""

    def to_wire(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def from_wire(body: object) -> StatusRequest:
        return StatusRequest()  # the body carries nothing; any body is accepted


@dataclass(slots=True, unsafe_hash=True)
class RecoverRequest:
    """Tell a node that waits for an operator to rebuild from the replicas
    that kept their data; it acts only when `accept_data_loss` is true."""

    accept_data_loss: bool

    def to_wire(self) -> dict[str, Any]:
        return {"accept_data_loss": self.accept_data_loss}

    @staticmethod
    def from_wire(body: object) -> RecoverRequest:
        return RecoverRequest(_body(body, Method.RECOVER).get("accept_data_loss") is True)


ClientRequest: TypeAlias = (
    GetRequest | PutRequest | ScanRequest | MapRequest | StatusRequest | RecoverRequest
)


# --- replies ----------------------------------------------------------------------


def _reply_body(reply: object, method: Method) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise KvsvrError(f"malformed {method.value!r} reply: expected a dict, got {reply!r:.200}")
    return reply


def _reply_version(reply: dict[str, Any], method: Method) -> int:
    version = reply.get("version")
    if type(version) is not int or version < 0:
        raise KvsvrError(f"malformed {method.value!r} reply: bad version {version!r:.100}")
    return version


@dataclass(slots=True, unsafe_hash=True)
class GetReply:
    """A key's version and value (None: absent). To a get sent with
    `cached_version`, `unchanged` says the quorum chose exactly that version
    (the value did not travel), and `expires_at_ms` is the value's expiry on
    the node's clock (None: none), for the client's near cache."""

    version: int
    value: bytes | None
    expires_at_ms: int | None = None
    unchanged: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.unchanged:
            return {"version": self.version, "unchanged": True}
        if self.expires_at_ms is None:
            return {"version": self.version, "value": self.value}
        return {"version": self.version, "value": self.value, "expires_at_ms": self.expires_at_ms}

    @staticmethod
    def from_wire(reply: object) -> GetReply:
        if type(reply) is dict:  # the well-formed reply, checked in one pass
            version = reply.get("version")
            value = reply.get("value")
            if type(version) is int and version >= 0 and (value is None or type(value) is bytes):
                expires = reply.get("expires_at_ms")
                return GetReply(
                    version,
                    value,
                    expires if type(expires) is int else None,
                    reply.get("unchanged") is True,
                )
        body = _reply_body(reply, Method.GET)
        value = body.get("value")
        if value is not None and not isinstance(value, bytes):
            raise KvsvrError(f"malformed 'get' reply: value is a {type(value).__name__}")
        expires = body.get("expires_at_ms")
        return GetReply(
            _reply_version(body, Method.GET),
            value,
            expires if type(expires) is int else None,
            body.get("unchanged") is True,
        )


@dataclass(slots=True, unsafe_hash=True)
class PutReply:
    """The version a write (put, cas or delete) was written at."""

    version: int

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version}

    @staticmethod
    def from_wire(reply: object) -> PutReply:
        if type(reply) is dict:  # the well-formed reply, checked in one pass
            version = reply.get("version")
            if type(version) is int and version >= 0:
                return PutReply(version)
        return PutReply(_reply_version(_reply_body(reply, Method.PUT), Method.PUT))


@dataclass(slots=True, unsafe_hash=True)
class ScanReply:
    """A scan's rows: (sort key, value, version), in sort-key order."""

    rows: tuple[tuple[bytes, bytes, int], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"items": [[sort_key, value, version] for sort_key, value, version in self.rows]}

    @staticmethod
    def from_wire(reply: object) -> ScanReply:
        raw_rows = _reply_body(reply, Method.SCAN).get("items")
        if not isinstance(raw_rows, list):
            raise KvsvrError("malformed 'scan' reply: no list of items")
        rows: list[tuple[bytes, bytes, int]] = []
        for row in raw_rows:
            if not (
                isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], bytes)
                and isinstance(row[1], bytes)
                and type(row[2]) is int
            ):
                raise KvsvrError(f"malformed 'scan' reply: bad row {row!r:.200}")
            rows.append((row[0], row[1], row[2]))
        return ScanReply(tuple(rows))


def report_from_wire(reply: object, method: Method) -> dict[str, Any]:
    """A status or recover reply: a report for operators and tools (counters,
    replica state, what a recovery lost), whose fields grow with the node, so
    it stays a map; checked to be one."""
    return _reply_body(reply, method)


# --- the partition map (the "map" reply) ----------------------------------------------


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "host": self.host,
            "port": self.port,
            "zone": self.zone,
        }


@dataclass(frozen=True, slots=True)
class TableInfo:
    name: str
    consistency: TableConsistency
    ttl_s: float

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "consistency": self.consistency, "ttl_s": self.ttl_s}


@dataclass(frozen=True, slots=True)
class PartitionMap:
    """Where every partition lives, as a node reports it (the "map" reply)."""

    partitions: int
    replication: int
    nodes: tuple[NodeInfo, ...]
    replica_sets: tuple[tuple[int, ...], ...]  # node indexes, preferred coordinator first
    tables: tuple[TableInfo, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "replication": self.replication,
            "nodes": [node.to_wire() for node in self.nodes],
            "replica_sets": [list(replicas) for replicas in self.replica_sets],
            "tables": [table.to_wire() for table in self.tables],
        }

    @classmethod
    def from_wire(cls, body: object) -> PartitionMap:
        """Parse and check a "map" reply; `KvsvrError` if it makes no sense."""
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
            consistency=TableConsistency(_str_field(raw, "consistency")),
            ttl_s=float(raw.get("ttl_s", 0.0)),
        )
        for raw in body.get("tables", [])
    )
    return PartitionMap(partitions, _int_field(body, "replication"), nodes, replica_sets, tables)


def _as_list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _list_field(body: dict[str, Any], name: str) -> list[Any]:
    return _as_list(body[name])


def _int_field(body: dict[str, Any], name: str) -> int:
    value = body[name]
    if type(value) is not int:
        raise TypeError(f"{name!r} must be an int, got {value!r}")
    return value


def _str_field(body: dict[str, Any], name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise TypeError(f"{name!r} must be a str, got {value!r}")
    return value


def _checked_index(index: object, known: set[int]) -> int:
    if type(index) is not int or index not in known:
        raise ValueError(f"replica set names unknown node index {index!r}")
    return index
