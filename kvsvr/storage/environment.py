"""The LMDB environment as kvsvr opens it: its settings, every durability flag
explicit, the named sub-databases (one per table, plus `meta` and `hints`),
and the checks on table names, scan ranges and stored rows that the engine
applies before it touches the map."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

import lmdb

from kvsvr.errors import CorruptRow, InvalidRequest
from kvsvr.protocol.state import Row
from kvsvr.storage.codec import decode_row

# Address space reserved for the data file; LMDB never grows past it (a full
# map fails the commit; see `kvsvr.storage.engine`). 1 GiB is a test/dev default;
# production nodes pass their disk budget.
DEFAULT_MAP_SIZE_BYTES = 1 << 30
# LMDB rounds the map to pages; below a few MiB the b-tree cannot even hold the
# sub-database records plus one batch.
MAP_SIZE_BYTES_MIN = 1 << 20

# LMDB keeps named databases in a fixed array sized at open and searches it on
# every open_db; tables are declared in the cluster config and are few.
MAX_DBS = 64
# Two of the named databases are ours: `meta` and `hints`.
TABLE_COUNT_MAX = MAX_DBS - 2
# Table names live inside LMDB's key of the sub-database record (`t:` + name)
# and in every error message; a short bound keeps both readable.
TABLE_NAME_BYTES_MAX = 64

# Reader slots in the lock file. Reads run on the trio thread one at a time
# and the writer thread takes none, so a node needs one or two; LMDB's default
# of 126 leaves room for tools (mdb_stat, backups) opening the same files.
MAX_READERS = 126
# py-lmdb keeps this many finished read transactions to reuse: inline reads on
# one thread need only one, and reuse avoids a reader-slot lock per read.
MAX_SPARE_TXNS = 1

# Files and directory are private to the node's user: they hold user data.
FILE_MODE = 0o700

# A scan returns at most this many rows: a scan result travels in one frame
# and is built in memory on the trio thread.
SCAN_ROWS_MAX = 10_000

# Named sub-databases.
TABLE_DB_PREFIX: Final = b"t:"
META_DB: Final = b"meta"
HINTS_DB: Final = b"hints"
RAW_DBS: Final = frozenset({META_DB, HINTS_DB})


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix`, or None
    if there is none (empty prefix, or only 0xff bytes)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def open_environment(
    path: str | Path, *, map_size_bytes: int, fsync: bool = True
) -> lmdb.Environment:
    """The LMDB environment at directory `path` with kvsvr's settings, every
    durability flag explicit. Shared with the raw-LMDB benchmark so both
    measure the same thing. `fsync=False` only for benchmarks (see
    `Storage.open`)."""
    return lmdb.open(
        str(path),
        map_size=map_size_bytes,
        subdir=True,
        readonly=False,
        create=True,
        mode=FILE_MODE,
        # Durability: fsync data and meta page on every commit (unless the
        # benchmark-only `fsync=False`), through
        # write(2) rather than a writable map (a stray pointer cannot
        # scribble on the file, and a torn page cannot reach the meta).
        sync=fsync,
        metasync=fsync,
        map_async=False,
        writemap=False,
        # Random point reads: kernel readahead would only evict useful pages.
        readahead=False,
        # Zero malloc'd pages before they are written, so freed memory
        # (other users' data) never lands in the file.
        meminit=True,
        lock=True,
        max_dbs=MAX_DBS,
        max_readers=MAX_READERS,
        max_spare_txns=MAX_SPARE_TXNS,
    )


def table_db_names(tables: Iterable[str]) -> dict[str, bytes]:
    table_dbs: dict[str, bytes] = {}
    for table in tables:
        if type(table) is not str or not table:
            raise InvalidRequest(f"a table name must be a non-empty str, not {table!r}")
        encoded = table.encode("utf-8")
        if len(encoded) > TABLE_NAME_BYTES_MAX:
            raise InvalidRequest(f"table name {table!r} is over {TABLE_NAME_BYTES_MAX} bytes")
        if table in table_dbs:
            raise InvalidRequest(f"table {table!r} declared twice")
        table_dbs[table] = TABLE_DB_PREFIX + encoded
    if len(table_dbs) > TABLE_COUNT_MAX:
        raise InvalidRequest(f"{len(table_dbs)} tables; the limit is {TABLE_COUNT_MAX}")
    return table_dbs


def raw_db(db_name: bytes) -> bytes:
    if db_name not in RAW_DBS:
        raise InvalidRequest(f"unknown raw database {db_name!r}; expected one of {sorted(RAW_DBS)}")
    return db_name


def check_range(start: bytes, end: bytes | None, limit: int) -> None:
    if type(start) is not bytes or (end is not None and type(end) is not bytes):
        raise InvalidRequest("scan bounds must be bytes")
    if type(limit) is not int or not 0 <= limit <= SCAN_ROWS_MAX:
        raise InvalidRequest(f"scan limit must be an int in [0, {SCAN_ROWS_MAX}], not {limit!r}")


def decode_table_row(table: str, key: bytes, data: bytes) -> Row:
    try:
        return decode_row(data)
    except CorruptRow as error:
        raise CorruptRow(f"table {table!r} key {key!r}: {error}") from error
