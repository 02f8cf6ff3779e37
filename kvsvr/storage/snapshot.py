"""Whole-environment copies for backup and restore, outside the node's
`Storage`: a compacted copy of the committed data made from one read
transaction, reading the rows of such a copy in key order, and filling a new
environment with rows.

None of these touch the overlay, the group-commit writer or the decoded-row
cache: the copy sees exactly what LMDB committed (every reply a replica sent
was durable before it left, so it is in the copy), and the fill writes an
environment no node has open yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import lmdb

from kvsvr.protocol.state import Row
from kvsvr.storage.codec import encode_row
from kvsvr.storage.environment import (
    HINTS_DB,
    MAX_DBS,
    META_DB,
    open_environment,
    table_db_names,
)

# The file LMDB keeps its data in, inside an environment's directory.
DATA_FILE_NAME: Final = "data.mdb"

# Rows written per transaction when filling a new environment: large enough
# that commits (each an fsync) are few, small enough that a transaction's
# dirty pages stay a few tens of MiB.
FILL_BATCH_ROWS: Final = 20_000


def copy_environment(env: lmdb.Environment, directory: Path) -> Path:
    """Copy `env`'s committed data, compacted, into the empty `directory`
    (`mdb_env_copy2` with `MDB_CP_COMPACT`: one read transaction, so the copy
    is a consistent point in time while writers go on). Blocks for the length
    of the copy: run it on a worker thread. Returns the copied data file."""
    directory.mkdir(mode=0o700, parents=False, exist_ok=False)
    env.copy(str(directory), compact=True)
    return directory / DATA_FILE_NAME


class CopyReader:
    """A read-only view of a copied environment (a directory holding a
    `data.mdb`): its tables' raw rows in key order, from one read transaction."""

    def __init__(self, directory: Path) -> None:
        self._env = lmdb.open(
            str(directory),
            subdir=True,
            readonly=True,
            lock=False,
            create=False,
            max_dbs=MAX_DBS,
            readahead=True,
        )
        self._txn = self._env.begin(write=False, buffers=False)
        self.tables = self._table_names()

    def _table_names(self) -> set[str]:
        names: set[str] = set()
        with self._txn.cursor() as cursor:
            for name in cursor.iternext(keys=True, values=False):
                assert isinstance(name, bytes)
                if name.startswith(b"t:"):
                    names.add(name[2:].decode("utf-8", errors="replace"))
        return names

    def rows(self, table: str) -> Iterator[tuple[bytes, bytes]]:
        """(key, stored row bytes) of `table` in key order; nothing if the
        copy has no such table."""
        if table not in self.tables:
            return
        db = self._env.open_db(table_db_names([table])[table], txn=self._txn, create=False)
        with self._txn.cursor(db) as cursor:
            for key, data in cursor:
                yield bytes(key), bytes(data)

    def close(self) -> None:
        self._txn.abort()
        self._env.close()


def fill_environment(
    directory: Path,
    *,
    tables: Iterable[str],
    rows: Iterable[tuple[str, bytes, Row]],
    meta: Iterable[tuple[bytes, bytes]],
    map_size_bytes: int,
) -> int:
    """Create the environment at `directory` (as a node opens it) holding
    `rows` (table, key, row) and the `meta` records; returns the row count.
    Each batch is committed with an fsync, as the node commits."""
    table_dbs = table_db_names(tables)
    env = open_environment(directory, map_size_bytes=map_size_bytes)
    written = 0
    try:
        with env.begin(write=True) as txn:
            dbs = {
                name: env.open_db(name, txn=txn, create=True)
                for name in [*table_dbs.values(), META_DB, HINTS_DB]
            }
            for key, value in meta:
                txn.put(key, value, db=dbs[META_DB])
        batch: list[tuple[str, bytes, Row]] = []
        for item in rows:
            batch.append(item)
            if len(batch) >= FILL_BATCH_ROWS:
                written += _fill_batch(env, dbs, table_dbs, batch)
                batch = []
        written += _fill_batch(env, dbs, table_dbs, batch)
    finally:
        env.close()
    return written


def _fill_batch(
    env: lmdb.Environment,
    dbs: dict[bytes, lmdb._Database],
    table_dbs: dict[str, bytes],
    batch: list[tuple[str, bytes, Row]],
) -> int:
    if not batch:
        return 0
    with env.begin(write=True) as txn:
        for table, key, row in batch:
            txn.put(key, encode_row(row), db=dbs[table_dbs[table]])
    return len(batch)
