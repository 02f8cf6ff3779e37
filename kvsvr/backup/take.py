"""`kvsvr backup`: take a backup of a serving cluster.

1. Note the start time, read the partition map.
2. From every node, pull a compacted LMDB copy made from one read
   transaction (`kvsvr.node.backup_side`), chunk by chunk, into
   `OUT/.copies/NODE/`. A node that cannot be reached or is lost mid-copy is
   left out; the backup goes on if every partition still has copies from a
   majority of its replica set, and fails with the reason otherwise.
3. Merge the copies table by table, in key order (each copy is sorted), and
   decide each key (`kvsvr.backup.merge`); keys the copies cannot decide are
   read through the cluster with strong reads, a batch at a time.
4. Write the per-partition data files, then the manifest, and remove the
   copies.
"""

from __future__ import annotations

import heapq
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import crc32c
import trio

from kvsvr import net
from kvsvr.api import PartitionMap, TableConsistency
from kvsvr.backup.format import (
    DATA_DIR_NAME,
    MANIFEST_NAME,
    Manifest,
    NodeEntry,
    PartitionEntry,
    Record,
    TableEntry,
    partition_file_name,
)
from kvsvr.backup.merge import CORRUPT, Copy, Settle, quorum, settle_eventual, settle_strong
from kvsvr.backup.messages import (
    BEGIN_METHOD,
    CHUNK_METHOD,
    END_METHOD,
    BeginReply,
    BeginRequest,
    ChunkReply,
    ChunkRequest,
    EndRequest,
)
from kvsvr.client import Client, connect
from kvsvr.client_options import tls_context
from kvsvr.errors import CorruptRow, KvsvrError, Unavailable
from kvsvr.keys import decode_key
from kvsvr.net.tls import TLSOptions
from kvsvr.protocol.placement import partition_of
from kvsvr.storage import decode_row
from kvsvr.storage.snapshot import DATA_FILE_NAME, CopyReader

log = logging.getLogger("kvsvr.backup")

COPIES_DIR_NAME: Final = ".copies"

# How long a node may take to make its copy (one read transaction over the
# whole map: about a second per few hundred MiB on a loaded disk).
COPY_TIMEOUT_S: Final = 600.0
# One chunk's round trip, rate limit included (a chunk is at most a second's
# worth at the requested rate).
CHUNK_TIMEOUT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 5.0

# Keys the copies leave undecided are read through the cluster in batches of
# this many, this many at a time: enough to keep a round trip's worth of
# reads in flight without crowding out the cluster's clients.
SETTLE_BATCH_KEYS: Final = 512
SETTLE_CONCURRENCY: Final = 32
# A strong read that answers Unavailable or Timeout (a node lost, a duel) is
# tried this many times before the backup gives up.
SETTLE_ATTEMPTS: Final = 5

# Records buffered in memory before they are appended to their files: one
# budget over all partitions, so memory stays bounded however many there are.
BUFFERED_BYTES_MAX: Final = 32 * 1024 * 1024


class BackupFailed(Exception):
    """The backup could not be taken; the message says why. Nothing usable
    was left in the output directory."""


class BackupRefused(Exception):
    """The output directory is not new or empty; nothing was done."""


@dataclass
class BackupResult:
    manifest: Manifest
    nodes_lost: dict[str, str] = field(default_factory=dict)  # node id -> why


Progress = Callable[[str], None]


async def take_backup(
    addresses: Sequence[str],
    secret: str | bytes | None,
    out: Path,
    *,
    rate_bytes_per_s: int,
    progress: Progress = lambda _: None,
    tls: TLSOptions | None = None,
) -> BackupResult:
    """Take a backup of the cluster at `addresses` into the new directory `out`
    (it may exist if empty), over TLS with `tls`. Raises `BackupFailed`, and
    removes what it wrote."""
    _prepare_out(out)
    try:
        return await _take(addresses, secret, out, rate_bytes_per_s, progress, tls)
    except BaseException:
        _clear_out(out)
        raise
    finally:
        shutil.rmtree(out / COPIES_DIR_NAME, ignore_errors=True)


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupRefused(f"{out} exists and is not an empty directory")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)


def _clear_out(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


async def _take(
    addresses: Sequence[str],
    secret: str | bytes | None,
    out: Path,
    rate_bytes_per_s: int,
    progress: Progress,
    tls: TLSOptions | None,
) -> BackupResult:
    async with connect(list(addresses), secret=secret, tls=tls) as client:
        layout = await client.partition_map(refresh=True)
        # The backup's start: every node's copy is made after it.
        started_at_ms = int(time.time() * 1000)
        copies, cluster_id, lost = await _pull_copies(
            layout, secret, out / COPIES_DIR_NAME, rate_bytes_per_s, progress, tls_context(tls)
        )
        _require_majorities(layout, copies, lost)
        progress(f"copies from {', '.join(sorted(copies))}; merging")
        writer = _PartitionFiles(out, layout.partitions)
        settled = await _merge(layout, copies, writer, client)
        files = writer.finish()
    manifest = Manifest(
        cluster_id=cluster_id,
        started_at_ms=started_at_ms,
        finished_at_ms=int(time.time() * 1000),
        partitions=layout.partitions,
        replication=layout.replication,
        nodes=tuple(
            NodeEntry(node.id, node.index, node.address, node.zone) for node in layout.nodes
        ),
        replica_sets=layout.replica_sets,
        tables=tuple(
            TableEntry(t.name, t.consistency.value, float(t.ttl_s or 0)) for t in layout.tables
        ),
        files=tuple(files),
        copies_from=tuple(sorted(copies)),
        keys_read_through_cluster=settled,
    )
    _write_durably(out / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    _fsync_dir(out)
    return BackupResult(manifest, lost)


# --- pulling the copies ---------------------------------------------------------------


async def _pull_copies(
    layout: PartitionMap,
    secret: str | bytes | None,
    copies_dir: Path,
    rate_bytes_per_s: int,
    progress: Progress,
    tls: ssl.SSLContext | None,
) -> tuple[dict[str, Path], str, dict[str, str]]:
    """Every reachable node's copy: (node id -> copy directory, the cluster id,
    node id -> why its copy is missing)."""
    copies: dict[str, Path] = {}
    lost: dict[str, str] = {}
    cluster_ids: dict[str, str] = {}
    secret_bytes = secret.encode() if isinstance(secret, str) else secret

    async def pull(node_id: str, host: str, port: int) -> None:
        directory = copies_dir / node_id
        directory.mkdir(parents=True, mode=0o700)
        try:
            reply = await _pull_one(
                host, port, secret_bytes, directory / DATA_FILE_NAME, rate_bytes_per_s, tls
            )
        except (KvsvrError, OSError, trio.TooSlowError) as error:
            shutil.rmtree(directory, ignore_errors=True)
            lost[node_id] = _describe(error)
            progress(f"node {node_id}: no copy ({lost[node_id]})")
            return
        cluster_ids[node_id] = reply.cluster_id
        copies[node_id] = directory
        progress(f"node {node_id}: copy of {reply.size_bytes} bytes")

    async with trio.open_nursery() as nursery:
        for node in layout.nodes:
            nursery.start_soon(pull, node.id, node.host, node.port)
    if len(set(cluster_ids.values())) > 1:
        raise BackupFailed(f"the nodes belong to different clusters: {cluster_ids}")
    if not cluster_ids:
        raise BackupFailed(
            "no node gave a copy: "
            + "; ".join(f"{node}: {why}" for node, why in sorted(lost.items()))
        )
    return copies, next(iter(cluster_ids.values())), lost


def _describe(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return str(error) or type(error).__name__


async def _pull_one(
    host: str,
    port: int,
    secret: bytes | None,
    path: Path,
    rate_bytes_per_s: int,
    tls: ssl.SSLContext | None,
) -> BeginReply:
    connection = await net.connect(
        host, port, secret=secret, connect_timeout_s=CONNECT_TIMEOUT_S, tls=tls
    )
    async with connection:
        body = BeginRequest(rate_bytes_per_s).to_wire()
        with trio.fail_after(COPY_TIMEOUT_S):
            reply = BeginReply.from_wire(await connection.request(BEGIN_METHOD, body))
        try:
            await _receive_file(connection, reply, path)
        finally:
            if not connection.closed:
                with trio.move_on_after(CHUNK_TIMEOUT_S):
                    await connection.request(END_METHOD, EndRequest(reply.session).to_wire())
    return reply


async def _receive_file(connection: net.RpcConnection, reply: BeginReply, path: Path) -> None:
    offset = 0
    with path.open("wb") as file:
        while offset < reply.size_bytes:
            request = ChunkRequest(reply.session, offset).to_wire()
            with trio.fail_after(CHUNK_TIMEOUT_S):
                chunk = ChunkReply.from_wire(await connection.request(CHUNK_METHOD, request))
            if not chunk.data:
                raise KvsvrError(f"the copy ended at byte {offset} of {reply.size_bytes}")
            file.write(chunk.data)
            offset += len(chunk.data)
    if offset != reply.size_bytes:
        raise KvsvrError(f"received {offset} bytes of a {reply.size_bytes}-byte copy")


def _require_majorities(
    layout: PartitionMap, copies: dict[str, Path], lost: dict[str, str]
) -> None:
    index_of = {node.id: node.index for node in layout.nodes}
    have = {index_of[node_id] for node_id in copies}
    for partition, replicas in enumerate(layout.replica_sets):
        present = sum(1 for index in replicas if index in have)
        if present < quorum(len(replicas)):
            missing = ", ".join(f"{node}: {why}" for node, why in sorted(lost.items()))
            raise BackupFailed(
                f"partition {partition} has copies from {present} of its {len(replicas)} "
                f"replicas, and a backup needs a majority; nodes lost: {missing}"
            )


# --- merging --------------------------------------------------------------------------


async def _merge(
    layout: PartitionMap, copies: dict[str, Path], writer: _PartitionFiles, client: Client
) -> int:
    """Decide every key into `writer`; returns the keys read through the cluster."""
    index_of = {node.id: node.index for node in layout.nodes}
    readers = {index_of[node_id]: CopyReader(path) for node_id, path in copies.items()}
    settled = 0
    try:
        for table in layout.tables:
            undecided: list[tuple[int, bytes, list[Copy]]] = []
            eventual = table.consistency is TableConsistency.EVENTUAL
            for partition, key, key_copies in _keys(table.name, layout, readers):
                if eventual:
                    decision = settle_eventual(table.name, key, key_copies)
                else:
                    decision = settle_strong(table.name, key, key_copies, layout.replication)
                if decision is Settle.AMBIGUOUS:
                    undecided.append((partition, key, key_copies))
                    if len(undecided) >= SETTLE_BATCH_KEYS:
                        settled += await _settle(client, table.name, undecided, writer)
                        undecided = []
                elif isinstance(decision, Record):
                    writer.add(partition, decision)
            settled += await _settle(client, table.name, undecided, writer)
    finally:
        for reader in readers.values():
            reader.close()
    return settled


def _keys(
    table: str, layout: PartitionMap, readers: dict[int, CopyReader]
) -> Iterator[tuple[int, bytes, list[Copy]]]:
    """(partition, key, the copies of its replica set's rows) for every key of
    `table` in any copy, in key order."""
    streams = [_tagged(index, reader.rows(table)) for index, reader in readers.items()]
    current: bytes | None = None
    found: dict[int, bytes] = {}
    for key, index, data in heapq.merge(*streams):
        if key != current:
            if current is not None:
                yield _decoded(table, current, found, layout, readers)
            current, found = key, {}
        found[index] = data
    if current is not None:
        yield _decoded(table, current, found, layout, readers)


def _tagged(index: int, rows: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, int, bytes]]:
    for key, data in rows:
        yield key, index, data


def _decoded(
    table: str,
    key: bytes,
    found: dict[int, bytes],
    layout: PartitionMap,
    readers: dict[int, CopyReader],
) -> tuple[int, bytes, list[Copy]]:
    partition = partition_of(table, decode_key(key)[0], layout.partitions)
    copies: list[Copy] = []
    # Replicas usually hold the same bytes for a key: each is decoded once.
    decoded: dict[bytes, Copy] = {}
    for index in layout.replica_sets[partition]:
        if index not in readers:
            continue  # no copy of this replica
        data = found.get(index)
        if data is None:
            copies.append(None)
            continue
        copy = decoded.get(data)
        if copy is None:
            try:
                copy = decode_row(data)
            except CorruptRow:
                copy = CORRUPT
            decoded[data] = copy
        copies.append(copy)
    return partition, key, copies


async def _settle(
    client: Client,
    table: str,
    undecided: list[tuple[int, bytes, list[Copy]]],
    writer: _PartitionFiles,
) -> int:
    """Read each undecided key through the cluster (a strong read, which
    settles any proposal in flight) and keep what it answers."""
    limiter = trio.CapacityLimiter(SETTLE_CONCURRENCY)
    results: list[tuple[int, Record]] = []

    async def read(partition: int, key: bytes, copies: list[Copy]) -> None:
        async with limiter:
            item = await _strong_read(client, table, key)
        if item is not None:
            version, value = item
            results.append((partition, _record_after_read(table, key, version, value, copies)))

    async with trio.open_nursery() as nursery:
        for partition, key, copies in undecided:
            nursery.start_soon(read, partition, key, copies)
    for partition, record in results:
        writer.add(partition, record)
    return len(undecided)


async def _strong_read(client: Client, table: str, key: bytes) -> tuple[int, bytes] | None:
    partition_key, sort_key = decode_key(key)
    for attempt in range(1, SETTLE_ATTEMPTS + 1):
        try:
            item = await client.get((partition_key, sort_key), table=table)
        except Unavailable as error:  # Timeout is an Unavailable
            if attempt == SETTLE_ATTEMPTS:
                raise BackupFailed(
                    f"table {table!r} key {key!r}: the copies leave its latest version "
                    f"undecided, and reading it through the cluster failed: {error}"
                ) from None
            continue
        return None if item is None else (item.version, item.value)
    raise AssertionError("unreachable")


def _record_after_read(
    table: str, key: bytes, version: int, value: bytes, copies: list[Copy]
) -> Record:
    """The record of a key read through the cluster; its expiry is the one a
    copy holds for that version (a read does not return it)."""
    expires: int | None = None
    for copy in copies:
        if not isinstance(copy, str) and copy is not None:
            if copy.version == version:
                expires = copy.expires_at_ms
            elif copy.accepted is not None and copy.accepted.version == version:
                expires = copy.accepted.expires_at_ms
    return Record(table, key, version, value, expires, 0, 0)


# --- writing ----------------------------------------------------------------------------


class _PartitionFiles:
    """Appends records to every partition's data file, buffered under one
    byte budget, keeping each file's size, row count and crc32c."""

    def __init__(self, out: Path, partitions: int) -> None:
        self._out = out
        (out / DATA_DIR_NAME).mkdir(mode=0o700)
        self._buffers: dict[int, bytearray] = {}
        self._buffered_bytes = 0
        self._rows = [0] * partitions
        self._sizes = [0] * partitions
        self._crcs = [0] * partitions
        for partition in range(partitions):
            (out / partition_file_name(partition)).touch(mode=0o600)

    def add(self, partition: int, record: Record) -> None:
        packed = record.pack()
        self._buffers.setdefault(partition, bytearray()).extend(packed)
        self._rows[partition] += 1
        self._buffered_bytes += len(packed)
        if self._buffered_bytes >= BUFFERED_BYTES_MAX:
            self._flush()

    def _flush(self) -> None:
        for partition, buffer in self._buffers.items():
            with (self._out / partition_file_name(partition)).open("ab") as file:
                file.write(buffer)
            self._sizes[partition] += len(buffer)
            self._crcs[partition] = crc32c.crc32c(buffer, self._crcs[partition])
        self._buffers = {}
        self._buffered_bytes = 0

    def finish(self) -> list[PartitionEntry]:
        self._flush()
        entries = []
        for partition in range(len(self._rows)):
            path = self._out / partition_file_name(partition)
            _fsync_file(path)
            entries.append(
                PartitionEntry(
                    partition,
                    partition_file_name(partition),
                    self._rows[partition],
                    self._sizes[partition],
                    self._crcs[partition],
                )
            )
        _fsync_dir(self._out / DATA_DIR_NAME)
        return entries


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _write_durably(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)
