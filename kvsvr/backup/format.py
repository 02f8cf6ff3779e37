"""A backup on disk: its manifest (JSON) and its per-partition data files.

    DIR/manifest.json
    DIR/data/p00000.rows ... one file per partition, every partition

A data file is a sequence of msgpack arrays, one per key,
`[table, key, version, value, expires_at_ms, hlc, op_id]`: the key's latest
chosen version as of the backup's start (or later, see docs/DESIGN.md
"Backup and restore"). Deleted keys (tombstones) are left out: a restored
cluster reads them as absent, as the source did.

The manifest names the cluster it came from, its layout (partitions,
replication, nodes, replica sets, tables), when the backup started and
finished, and per partition the file's name, byte size, row count and
crc32c. It is written last, so a directory without one is an unfinished
backup. Everything here is pure: parsing and checking, no file IO.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final

import msgpack

from kvsvr.api import TableConsistency
from kvsvr.keys import KEY_BYTES_MAX
from kvsvr.protocol.placement import PARTITIONS_MAX

FORMAT_NAME: Final = "kvsvr-backup"
# Bumped when the manifest or the record layout changes; verify and restore
# refuse a version they do not know rather than misread it.
FORMAT_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
DATA_DIR_NAME: Final = "data"
RECORD_FIELD_COUNT: Final = 7
CONSISTENCIES: Final = tuple(c.value for c in TableConsistency)

# A manifest lists at most PARTITIONS_MAX partitions and a few hundred bytes
# each; anything far larger is not one of ours and is refused before parsing.
MANIFEST_BYTES_MAX: Final = 16 * 1024 * 1024
# One record holds one key and one value (at most 1 MiB, `api.VALUE_BYTES_MAX`);
# the reader refuses a larger one rather than allocate what a damaged length
# prefix claims.
RECORD_BYTES_MAX: Final = 2 * 1024 * 1024


class BadBackup(Exception):
    """A backup that is incomplete, damaged or not a backup; the message says
    what is wrong and where."""


def partition_file_name(partition: int) -> str:
    return f"{DATA_DIR_NAME}/p{partition:05d}.rows"


@dataclass(frozen=True, slots=True)
class Record:
    table: str
    key: bytes
    version: int
    value: bytes
    expires_at_ms: int | None
    hlc: int
    op_id: int

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(
            [
                self.table,
                self.key,
                self.version,
                self.value,
                self.expires_at_ms,
                self.hlc,
                self.op_id,
            ],
            use_bin_type=True,
        )
        return packed


def _record(fields: object, where: str) -> Record:
    if type(fields) is not list or len(fields) != RECORD_FIELD_COUNT:
        raise BadBackup(f"{where}: not a record of {RECORD_FIELD_COUNT} fields")
    table, key, version, value, expires, hlc, op_id = fields
    ok = (
        type(table) is str
        and table
        and type(key) is bytes
        and 0 < len(key) <= KEY_BYTES_MAX
        and type(version) is int
        and version > 0
        and type(value) is bytes
        and (expires is None or (type(expires) is int and expires >= 0))
        and type(hlc) is int
        and hlc >= 0
        and type(op_id) is int
        and op_id >= 0
    )
    if not ok:
        raise BadBackup(f"{where}: a record field has the wrong type or range")
    return Record(table, key, version, value, expires, hlc, op_id)


def read_records(chunks: Iterator[bytes], where: str) -> Iterator[Record]:
    """The records in a data file's bytes (fed as chunks); BadBackup for
    anything that is not a whole sequence of records."""
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        max_buffer_size=RECORD_BYTES_MAX * 2,
        max_bin_len=RECORD_BYTES_MAX,
        max_str_len=RECORD_BYTES_MAX,
        max_array_len=RECORD_FIELD_COUNT,
        max_map_len=0,
        max_ext_len=0,
    )
    index = 0
    fed_bytes = 0
    # Where the last whole record ended (`tell()` also counts a partial one).
    records_end = 0
    for chunk in chunks:
        fed_bytes += len(chunk)
        try:
            unpacker.feed(chunk)
            for fields in unpacker:
                records_end = unpacker.tell()
                yield _record(fields, f"{where} record {index}")
                index += 1
        except BadBackup:
            raise
        except Exception as error:  # msgpack raises many types; all mean "damaged"
            raise BadBackup(f"{where} record {index}: not valid msgpack ({error!r})") from None
    if records_end != fed_bytes:
        raise BadBackup(f"{where}: ends inside record {index} (truncated?)")


@dataclass(frozen=True, slots=True)
class TableEntry:
    name: str
    consistency: str
    ttl_s: float


@dataclass(frozen=True, slots=True)
class NodeEntry:
    id: str
    index: int
    address: str
    zone: str


@dataclass(frozen=True, slots=True)
class PartitionEntry:
    partition: int
    file: str
    rows: int
    bytes: int
    crc32c: int


@dataclass(frozen=True, slots=True)
class Manifest:
    cluster_id: str
    started_at_ms: int
    finished_at_ms: int
    partitions: int
    replication: int
    nodes: tuple[NodeEntry, ...]
    replica_sets: tuple[tuple[int, ...], ...]
    tables: tuple[TableEntry, ...]
    files: tuple[PartitionEntry, ...]
    # Nodes whose copy the backup used, and keys it settled by a strong read.
    copies_from: tuple[str, ...]
    keys_read_through_cluster: int

    def to_json(self) -> str:
        body = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @property
    def rows(self) -> int:
        return sum(entry.rows for entry in self.files)


def _field(body: dict[str, Any], name: str, kind: type, where: str = "manifest") -> Any:
    value = body.get(name)
    if type(value) is not kind or (type(value) is int and value < 0):
        raise BadBackup(f"{where}: field {name!r} missing or not a {kind.__name__} (got {value!r})")
    return value


def _entries(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = _field(body, name, list)
    if not all(type(item) is dict for item in items):
        raise BadBackup(f"manifest: every entry of {name!r} must be an object")
    return items


def _ttl(table: dict[str, Any]) -> float:
    ttl_s = table.get("ttl_s", 0)
    if type(ttl_s) not in (int, float) or not 0 <= ttl_s < float("inf"):
        raise BadBackup(f"manifest table: field 'ttl_s' is not a number >= 0 (got {ttl_s!r})")
    return float(ttl_s)


def parse_manifest(text: bytes) -> Manifest:
    """The manifest in `text`, every field checked; BadBackup otherwise."""
    if len(text) > MANIFEST_BYTES_MAX:
        raise BadBackup(f"manifest: {len(text)} bytes, over the {MANIFEST_BYTES_MAX} limit")
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadBackup(f"manifest: not valid JSON ({error})") from None
    if type(body) is not dict or body.get("format") != FORMAT_NAME:
        raise BadBackup(f"manifest: not a {FORMAT_NAME} manifest")
    if body.get("format_version") != FORMAT_VERSION:
        raise BadBackup(
            f"manifest: format version {body.get('format_version')!r}; "
            f"this kvsvr reads version {FORMAT_VERSION}"
        )
    partitions = _field(body, "partitions", int)
    if not 1 <= partitions <= PARTITIONS_MAX or partitions & (partitions - 1):
        raise BadBackup(f"manifest: partitions {partitions} is not a power of two in range")
    tables = tuple(
        TableEntry(
            _field(t, "name", str, "manifest table"),
            _field(t, "consistency", str, "manifest table"),
            _ttl(t),
        )
        for t in _entries(body, "tables")
    )
    for table in tables:
        if table.consistency not in CONSISTENCIES:
            raise BadBackup(
                f"manifest: table {table.name!r} has consistency {table.consistency!r}, "
                f"not one of {', '.join(CONSISTENCIES)}"
            )
    nodes = tuple(
        NodeEntry(
            _field(n, "id", str, "manifest node"),
            _field(n, "index", int, "manifest node"),
            _field(n, "address", str, "manifest node"),
            _field(n, "zone", str, "manifest node"),
        )
        for n in _entries(body, "nodes")
    )
    files = tuple(
        PartitionEntry(
            _field(f, "partition", int, "manifest file"),
            _field(f, "file", str, "manifest file"),
            _field(f, "rows", int, "manifest file"),
            _field(f, "bytes", int, "manifest file"),
            _field(f, "crc32c", int, "manifest file"),
        )
        for f in _entries(body, "files")
    )
    if [f.partition for f in files] != list(range(partitions)):
        raise BadBackup(f"manifest: expected one file for each of partitions 0..{partitions - 1}")
    for entry in files:
        if entry.file != partition_file_name(entry.partition):
            raise BadBackup(f"manifest: partition {entry.partition} names file {entry.file!r}")
    replica_sets = _field(body, "replica_sets", list)
    if len(replica_sets) != partitions or not all(
        type(s) is list and all(type(i) is int for i in s) for s in replica_sets
    ):
        raise BadBackup("manifest: replica_sets must list node indexes for every partition")
    replication = _field(body, "replication", int)
    if not 1 <= replication <= len(nodes):
        raise BadBackup(
            f"manifest: replication {replication} with {len(nodes)} nodes "
            "(expected 1 to the node count)"
        )
    copies_from = _field(body, "copies_from", list)
    return Manifest(
        cluster_id=_field(body, "cluster_id", str),
        started_at_ms=_field(body, "started_at_ms", int),
        finished_at_ms=_field(body, "finished_at_ms", int),
        partitions=partitions,
        replication=replication,
        nodes=nodes,
        replica_sets=tuple(tuple(s) for s in replica_sets),
        tables=tables,
        files=files,
        copies_from=tuple(str(n) for n in copies_from),
        keys_read_through_cluster=_field(body, "keys_read_through_cluster", int),
    )
