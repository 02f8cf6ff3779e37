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
# dirty pages stay a few tens of MiB. A batch also ends once its rows reach
# `FILL_BATCH_BYTES_MAX` (values may be up to 1 MiB each); restore fills up
# to 16 nodes' environments at once, so at most 16 such batches are held.
FILL_BATCH_ROWS: Final = 20_000
FILL_BATCH_BYTES_MAX: Final = 16 * 1024 * 1024


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


class Filler:
    """Creates the environment at `directory` (as a node opens it) holding
    the `meta` records, then the rows `add`ed to it, committed a batch at a
    time with an fsync, as the node commits. `close` commits the rest."""

    def __init__(
        self,
        directory: Path,
        *,
        tables: Iterable[str],
        meta: Iterable[tuple[bytes, bytes]],
        map_size_bytes: int,
    ) -> None:
        self._table_dbs = table_db_names(tables)
        self._env = open_environment(directory, map_size_bytes=map_size_bytes)
        try:
            with self._env.begin(write=True) as txn:
                self._dbs = {
                    name: self._env.open_db(name, txn=txn, create=True)
                    for name in [*self._table_dbs.values(), META_DB, HINTS_DB]
                }
                for key, value in meta:
                    txn.put(key, value, db=self._dbs[META_DB])
        except BaseException:
            self._env.close()
            raise
        self._batch: list[tuple[bytes, bytes, bytes]] = []  # (db name, key, stored row)
        self._batch_bytes = 0
        self.written = 0

    def add(self, table: str, key: bytes, stored: bytes) -> None:
        """Add `table`'s row `key`, already encoded (`codec.encode_row`)."""
        self._batch.append((self._table_dbs[table], key, stored))
        self._batch_bytes += len(key) + len(stored)
        if len(self._batch) >= FILL_BATCH_ROWS or self._batch_bytes >= FILL_BATCH_BYTES_MAX:
            self._commit()

    def _commit(self) -> None:
        if not self._batch:
            return
        with self._env.begin(write=True) as txn:
            for db, key, stored in self._batch:
                txn.put(key, stored, db=self._dbs[db])
        self.written += len(self._batch)
        self._batch = []
        self._batch_bytes = 0

    def close(self, *, commit: bool = True) -> int:
        """Commit what is left (unless `commit` is false) and close; returns
        the rows written."""
        try:
            if commit:
                self._commit()
        finally:
            self._env.close()
        return self.written


def fill_environment(
    directory: Path,
    *,
    tables: Iterable[str],
    rows: Iterable[tuple[str, bytes, Row]],
    meta: Iterable[tuple[bytes, bytes]],
    map_size_bytes: int,
) -> int:
    """Create the environment at `directory` holding `rows` (table, key, row)
    and the `meta` records (a `Filler` fed every row); returns the row count."""
    filler = Filler(directory, tables=tables, meta=meta, map_size_bytes=map_size_bytes)
    try:
        for table, key, row in rows:
            filler.add(table, key, encode_row(row))
    except BaseException:
        filler.close(commit=False)
        raise
    return filler.close()
