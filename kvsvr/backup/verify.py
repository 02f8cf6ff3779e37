"""`kvsvr verify-backup`: check a backup on disk before anyone trusts it.

Reads the manifest (every field checked), then every partition's data file
in full: its byte size and crc32c against the manifest, and every record
parsed, counted and placed (its key must belong to that partition, its table
must be one the manifest lists). Any difference is `BadBackup` naming the
file and what is wrong. Files are read in bounded chunks, never whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import crc32c

from kvsvr.backup.format import (
    DATA_DIR_NAME,
    MANIFEST_BYTES_MAX,
    MANIFEST_NAME,
    BadBackup,
    Manifest,
    PartitionEntry,
    Record,
    parse_manifest,
    read_records,
)
from kvsvr.errors import InvalidRequest
from kvsvr.keys import decode_key
from kvsvr.protocol.placement import partition_of

# Data files are read this much at a time.
READ_CHUNK_BYTES: Final = 1024 * 1024


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BadBackup(f"{directory} is not a directory")
    if not path.is_file():
        raise BadBackup(f"{path} is missing: not a backup, or an unfinished one")
    with path.open("rb") as file:
        text = file.read(MANIFEST_BYTES_MAX + 1)
    return parse_manifest(text)


def verify_backup(directory: Path) -> Manifest:
    """The backup's manifest once every file checks out; BadBackup otherwise."""
    manifest = read_manifest(directory)
    tables = {table.name for table in manifest.tables}
    expected = {entry.file for entry in manifest.files}
    data_dir = directory / DATA_DIR_NAME
    if data_dir.is_dir():
        extra = sorted(
            f"{DATA_DIR_NAME}/{p.name}"
            for p in data_dir.iterdir()
            if f"{DATA_DIR_NAME}/{p.name}" not in expected
        )
        if extra:
            raise BadBackup(f"{directory}: files the manifest does not list: {', '.join(extra)}")
    for entry in manifest.files:
        for _ in partition_records(directory, manifest, entry, tables):
            pass
    return manifest


def partition_records(
    directory: Path, manifest: Manifest, entry: PartitionEntry, tables: set[str]
) -> Iterator[Record]:
    """The records of one partition's file, checked as they are read: the
    size, the crc32c and the count once the file ends, each record's table
    and partition as it comes. Restore reads the files through this too."""
    path = directory / entry.file
    if not path.is_file():
        raise BadBackup(f"{entry.file} is missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise BadBackup(f"{entry.file}: {size} bytes, the manifest says {entry.bytes} (truncated?)")
    crc = [0]

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as file:
            while chunk := file.read(READ_CHUNK_BYTES):
                crc[0] = crc32c.crc32c(chunk, crc[0])
                yield chunk

    count = 0
    for record in read_records(chunks(), entry.file):
        _check_place(record, entry, manifest, tables)
        count += 1
        yield record
    if crc[0] != entry.crc32c:
        raise BadBackup(
            f"{entry.file}: crc32c {crc[0]:#010x}, the manifest says {entry.crc32c:#010x} "
            "(the file was altered or damaged)"
        )
    if count != entry.rows:
        raise BadBackup(f"{entry.file}: {count} records, the manifest says {entry.rows}")


def _check_place(
    record: Record, entry: PartitionEntry, manifest: Manifest, tables: set[str]
) -> None:
    if record.table not in tables:
        raise BadBackup(f"{entry.file}: a record of table {record.table!r}, which is not listed")
    try:
        partition_key, _ = decode_key(record.key)
    except InvalidRequest as error:
        raise BadBackup(f"{entry.file}: a record's key is malformed: {error}") from None
    if partition_of(record.table, partition_key, manifest.partitions) != entry.partition:
        raise BadBackup(f"{entry.file}: key {record.key!r} belongs to another partition")
