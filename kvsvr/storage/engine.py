"""The node's LMDB store: tables of rows, `meta`, `hints`, one group-commit writer.

Threading model. Everything here runs on the trio thread except the body of a
commit, which runs on the store's one commit thread (`CommitThread`): one LMDB write
transaction, one fsync, never an await inside it. Reads run inline on the trio
thread (an LMDB read is about a microsecond). `stage*` and every other method
must be called from the trio thread only (they touch the overlay and the
batch queue without locks); the worker thread only reads an op list handed to
it, which nothing mutates while the commit runs.

Pending overlay. `stage` records a write in memory and queues it; `read_row`
and `scan` see it at once, before it is durable. A protocol handler reads a
key, computes the new row, stages it and then awaits durability; a second
message for the same key, handled while the first commit runs, reads the
staged row, never the stale one on disk. A staged write must not be *answered*
before `wait_durable` returns: the overlay serves the node's own next
decision, never an acknowledgement.

Commit failure is fail-stop. If a commit raises (`lmdb.MapFullError`, an I/O
error from fsync, anything), the writer
  1. fails that batch and every batch queued behind it (their
     `wait_durable` raises `StorageFailed`, so nothing is acknowledged),
  2. clears the overlay, so reads show only what LMDB holds, never a write
     that is not on disk,
  3. refuses every later `stage` with `StorageFailed`, and
  4. raises `StorageFailed` out of `run`, which takes down the node's nursery
     loudly rather than letting it limp on without a disk.
Per-op problems that would fail a whole batch (bad key size, oversized
record, unknown table) are rejected by `stage` with `InvalidRequest` before
they reach a batch, so a batch fails only for reasons of the environment. The
fix for a full map is to restart the node with a larger `map_size_bytes`; what
was durable is still there. Safety of writes a failed commit might still have
left on disk (an fsync error after LMDB wrote its meta page): they were never
acknowledged, and holding a promise or an accepted value that was never
answered is safe in Paxos.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import lmdb
import trio

from kvsvr.errors import InvalidRequest, KvsvrError, Unavailable
from kvsvr.protocol.state import Row
from kvsvr.storage.codec import crc_ok, encode_row
from kvsvr.storage.commit import CommitThread, Op, commit_ops
from kvsvr.storage.decoded_rows import DECODED_ROW_OVERHEAD_BYTES as DECODED_ROW_OVERHEAD_BYTES
from kvsvr.storage.decoded_rows import DecodedRows
from kvsvr.storage.environment import DEFAULT_MAP_SIZE_BYTES as DEFAULT_MAP_SIZE_BYTES
from kvsvr.storage.environment import HINTS_DB as HINTS_DB
from kvsvr.storage.environment import MAP_SIZE_BYTES_MIN as MAP_SIZE_BYTES_MIN
from kvsvr.storage.environment import META_DB as META_DB
from kvsvr.storage.environment import (
    check_range,
    decode_table_row,
    raw_db,
    table_db_names,
)
from kvsvr.storage.environment import open_environment as open_environment
from kvsvr.storage.environment import prefix_end as prefix_end
from kvsvr.storage.snapshot import copy_environment

_log = logging.getLogger("kvsvr.storage")

# --- Limits and LMDB settings ----------------------------------------------

# At most this many ops per commit: bounds the dirty pages LMDB holds in
# memory and the fsync latency every waiter of one batch pays.
BATCH_OPS_MAX = 4096
# A batch holding only lazy writes (see `Storage.stage`) waits at most this long
# for an urgent write to share its fsync. Long next to the gap between puts on
# a quietly used node, so that each put costs a replica one fsync, not two (at
# 5 ms, one client's puts 20 ms apart cost every replica two transactions per
# put and the three nodes 20-25% more CPU: measured in bench/RESULTS.md); short
# next to what losing a learned commit in a crash costs, one recovery round.
LAZY_COMMIT_DELAY_S = 0.05
# At most this many key+value bytes per commit, for the same reason; at disk
# bandwidths of a few hundred MB/s this keeps one commit in the tens of ms.
BATCH_BYTES_MAX = 16 << 20
# One record (key + encoded row) must fit in an empty batch, or it could never
# be committed.
RECORD_BYTES_MAX = BATCH_BYTES_MAX
# Everything staged but not yet committed (overlay and queued batches) is held
# in memory; past these bounds `stage` refuses with `StorageOverloaded` (the
# caller answers "unavailable") instead of growing without limit. 16 full
# batches of ops, a quarter GiB of bytes.
STAGED_OPS_MAX = 16 * BATCH_OPS_MAX
STAGED_BYTES_MAX = 256 << 20

# Decoded rows kept for reads (see `DecodedRows`): a put touches its row on
# the coordinator's replica up to three times within milliseconds, and a hot
# key is touched by every operation. 8 MiB holds ~15,000 rows of 100 B values
# (seconds of writes at full load) and eight of the largest. It is memory
# outside the node's row cache (`cache_bytes_max`, which is what caches reads),
# counted against the 100 MiB a node may use beyond that cache
# (test_cache_memory.py): 32 MiB would take a third of it.
DECODED_ROWS_BYTES_MAX = 8 << 20

# --- Errors -------------------------------------------------------------------


class StorageFailed(KvsvrError):
    """A commit failed (map full, I/O error). The write is not durable and the
    store has stopped accepting writes; the node must restart."""

    code = "storage_failed"


def _failed_again(failure: StorageFailed) -> StorageFailed:
    """The error for a caller that meets an earlier failure: a new one, with
    the same message and cause. (Not `raise ... from`: compiled by mypyc, that
    drops the cause.)"""
    again = StorageFailed(str(failure))
    again.__cause__ = failure.__cause__
    return again


class StorageOverloaded(Unavailable):
    """Too much is staged and not yet committed; nothing was staged. Retry later."""


class StorageClosed(Unavailable):
    """The store is closing or closed; nothing was staged."""


# --- Statistics, tickets, batches ----------------------------------------------


@dataclass(slots=True)
class StorageStats:
    """Counters of the group-commit writer, for metrics and benchmarks."""

    batches_committed: int = 0
    ops_committed: int = 0
    bytes_committed: int = 0
    max_batch_ops: int = 0
    commit_seconds_total: float = 0.0  # in write transactions, fsync included


@dataclass(slots=True, eq=False)
class _Batch:
    ops: list[Op] = field(default_factory=list)
    size_bytes: int = 0
    # Someone waits on this batch: commit it as soon as the writer is free.
    # A batch of only lazy writes waits up to LAZY_COMMIT_DELAY_S for company.
    urgent: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    error: StorageFailed | None = None
    # Run on the trio thread once `done` is set (see `Storage.when_durable`).
    callbacks: list[Callable[[StorageFailed | None], None]] = field(default_factory=list)

    def set_done(self) -> None:
        self.done.set()
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            try:
                callback(self.error)
            except Exception:  # one waiter's bug must not cost the others their answer
                _log.exception("a when_durable callback failed")

    def fits(self, op_count: int, size_bytes: int) -> bool:
        return (
            len(self.ops) + op_count <= BATCH_OPS_MAX
            and self.size_bytes + size_bytes <= BATCH_BYTES_MAX
        )


@dataclass(slots=True, eq=False)
class CommitTicket:
    """Returned by `stage`; pass it to `Storage.wait_durable`. Never changed
    once made (not `frozen`: a frozen __init__ costs ~5x, paid per stage)."""

    _batch: _Batch

    @property
    def is_durable(self) -> bool:
        """True once the write is committed and fsynced."""
        return self._batch.done.is_set() and self._batch.error is None


# LMDB environments must never cross a fork (their locks and mmap belong to
# the process that opened them). Cheaper than os.getpid() on every call.
_process_generation = 0


def _after_fork_in_child() -> None:
    global _process_generation
    _process_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- The store -------------------------------------------------------------------


class Storage:
    """One node's LMDB environment. Create with `Storage.open`, start the writer
    with `await nursery.start(storage.run)`, finish with `await storage.aclose()`."""

    def __init__(
        self,
        env: lmdb.Environment,
        dbs: dict[bytes, lmdb._Database],
        table_dbs: dict[str, bytes],
    ) -> None:
        """Use `Storage.open`."""
        self._env = env
        self._dbs = dbs  # never mutated after open: the writer thread reads it
        self._table_dbs = table_dbs
        self._key_bytes_max = env.max_key_size()
        self._generation = _process_generation
        # Staged, uncommitted writes by database and key: the latest one wins.
        self._overlay: dict[bytes, dict[bytes, Op]] = {name: {} for name in dbs}
        self._decoded = DecodedRows(DECODED_ROWS_BYTES_MAX)
        self._sealed: deque[_Batch] = deque()  # full batches, oldest first
        self._gathering = _Batch()  # the batch new writes join
        self._staged_ops = 0  # in every uncommitted batch, including the one committing
        self._staged_bytes = 0
        self._seq = 0
        self._wakeup = trio.Event()  # set when there is work or on close
        self._lazy_waiting = False  # the writer is holding a lazy-only batch
        self._writer_running = False
        self._writer_stopped = trio.Event()
        self._commit_in_flight = False
        self._closing = False
        self._closed = False
        self._failure: StorageFailed | None = None
        self._stats = StorageStats()
        self._commit_thread = CommitThread()
        # Told of every committed batch, on the trio thread: its write
        # transaction's seconds (fsync included) and its row changes.
        self.commit_observer: Callable[[float, int], None] | None = None
        self._last_commit_s = 0.0  # set on the commit thread, read after it
        # Told of every decoded row about to be staged (sub-database, key, row) while
        # reads still see the row it replaces (`kvsvr.node.watch`). Must not raise.
        self.row_placed: Callable[[bytes, bytes, Row], None] | None = None
        # Called after every `_read_hook_every_bytes` of rows read from the map
        # (see `set_read_hook`); None: no hook.
        self._read_hook: Callable[[], object] | None = None
        self._read_hook_every_bytes = 0
        self._read_bytes_since_hook = 0

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        tables: Iterable[str],
        map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES,
        fsync: bool = True,
    ) -> Storage:
        """Open (creating if needed) the environment at directory `path` with one
        sub-database per table plus `meta` and `hints`. Call it in the process
        that uses the store, after any fork. `fsync=False` (the config's
        `unsafe_no_fsync`, for benchmarks) commits without flushing to disk:
        a commit then survives a crash of the process but not of the machine."""
        table_dbs = table_db_names(tables)
        if type(map_size_bytes) is not int or map_size_bytes < MAP_SIZE_BYTES_MIN:
            raise InvalidRequest(f"map_size_bytes must be an int >= {MAP_SIZE_BYTES_MIN}")
        env = open_environment(path, map_size_bytes=map_size_bytes, fsync=fsync)
        try:
            db_names = [*table_dbs.values(), META_DB, HINTS_DB]
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name, txn=txn, create=True) for name in db_names}
        except BaseException:
            env.close()
            raise
        return cls(env, dbs, table_dbs)

    # --- Reads (inline) -----------------------------------------------------------

    def read_row(self, table: str, key: bytes) -> Row | None:
        """The row of `key` (a staged write shadows LMDB), or None if absent.
        Raises `CorruptRow` for a row that fails its checks."""
        db_name = self._table_db(table)
        row = self._decoded.get(db_name, key)
        if row is not None:
            self._check_readable()
            return row
        data = self._read(db_name, key)
        if data is None:
            return None
        row = decode_table_row(table, key, data)
        self._decoded.put(db_name, key, row, len(data))
        return row

    def scan(
        self, table: str, start: bytes, end: bytes | None, limit: int
    ) -> list[tuple[bytes, Row]]:
        """Rows with `start <= key < end` (`end` None: no upper bound), ascending,
        at most `limit`; staged writes and deletes are merged in. A corrupt row
        in the range raises `CorruptRow`: a scan never skips data silently."""
        found = self._scan(self._table_db(table), start, end, limit)
        return [(key, decode_table_row(table, key, data)) for key, data in found]

    def scan_table_raw(
        self, table: str, start: bytes, end: bytes | None, limit: int, *, bytes_max: int = 0
    ) -> list[tuple[bytes, bytes]]:
        """Like `scan`, but the rows as stored (crc included), undecoded: for
        anti-entropy, which ships rows on and must step over a corrupt one.
        With `bytes_max` > 0 the page also ends once its keys and rows reach
        that many bytes (at least one row is returned): a shorter page than
        `limit` then does not mean the range is exhausted; an empty one does."""
        return self._scan(self._table_db(table), start, end, limit, bytes_max)

    def scan_prefix(self, table: str, prefix: bytes, limit: int) -> list[tuple[bytes, Row]]:
        """Rows whose key starts with `prefix`, ascending, at most `limit`."""
        return self.scan(table, prefix, prefix_end(prefix), limit)

    def read_meta(self, key: bytes) -> bytes | None:
        return self._read(META_DB, key)

    def read_raw(self, db_name: bytes, key: bytes) -> bytes | None:
        """A value of `meta` or `hints` (staged writes included)."""
        return self._read(raw_db(db_name), key)

    def scan_raw(
        self, db_name: bytes, start: bytes, end: bytes | None, limit: int
    ) -> list[tuple[bytes, bytes]]:
        """Like `scan`, over `meta` or `hints`, returning the stored bytes."""
        return self._scan(raw_db(db_name), start, end, limit)

    # --- Writes ----------------------------------------------------------------

    def stage(self, table: str, key: bytes, row: Row | None, *, lazy: bool = False) -> CommitTicket:
        """Queue `row` (None: delete the key) for the next commit and make it
        visible to reads at once. Trio thread only. Raises `InvalidRequest`
        (bad table, key or row), `StorageOverloaded`, `StorageClosed` or
        `StorageFailed`; in every case nothing was staged.

        A `lazy` write is one nobody waits on (a learned commit, a repair
        hint): it does not start a commit of its own, but rides along with the
        next one, or is committed after LAZY_COMMIT_DELAY_S at the latest. A
        crash may lose it; only use it for writes that can be learned again."""
        return self._stage_one(self._prepare(table, key, row), lazy)

    def stage_meta(self, key: bytes, value: bytes | None) -> CommitTicket:
        return self.stage_raw(META_DB, key, value)

    def stage_raw(
        self, db_name: bytes, key: bytes, value: bytes | None, *, lazy: bool = False
    ) -> CommitTicket:
        """Like `stage`, for raw bytes in `meta` or `hints`."""
        return self._stage_one(self._prepare_raw(raw_db(db_name), key, value), lazy)

    async def wait_durable(self, ticket: CommitTicket) -> None:
        """Return once the ticket's write is committed and fsynced; raise
        `StorageFailed` if its commit failed."""
        await ticket._batch.done.wait()
        failure = ticket._batch.error
        if failure is not None:
            raise _failed_again(failure)

    def when_durable(
        self, ticket: CommitTicket, callback: Callable[[StorageFailed | None], None]
    ) -> None:
        """`wait_durable` without a task: `callback(None)` runs on the trio
        thread once the ticket's write is committed and fsynced, or
        `callback(error)` if its commit failed; at once if that is already so."""
        batch = ticket._batch
        if batch.done.is_set():
            callback(batch.error)
        else:
            batch.callbacks.append(callback)

    async def write(self, ops: Sequence[tuple[str, bytes, Row | None]]) -> None:
        """Stage every (table, key, row) and wait until they are durable. The ops
        commit together in one transaction (all or none); either every op is
        staged or, if one is invalid, none is."""
        if len(ops) == 0:
            await trio.lowlevel.checkpoint()
            return
        ticket = self._stage_all([self._prepare(table, key, row) for table, key, row in ops])
        await self.wait_durable(ticket)

    async def write_row_bytes(self, table: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Like `write`, for rows already encoded (copied as stored from a peer):
        each must pass its crc32c, or nothing is staged."""
        if not items:
            await trio.lowlevel.checkpoint()
            return
        db_name = self._table_db(table)
        for key, data in items:
            if not crc_ok(data):
                raise InvalidRequest(f"table {table!r} key {key!r}: row bytes fail their crc")
        ticket = self._stage_all([self._prepare_raw(db_name, key, data) for key, data in items])
        await self.wait_durable(ticket)

    # --- The group-commit writer ----------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: commit whatever is staged, batch after batch, until
        `aclose`. Start it with `await nursery.start(storage.run)`. Raises
        `StorageFailed` if a commit fails (see the module docstring)."""
        self._check_process()
        if self._writer_running or self._closing:
            raise RuntimeError("Storage.run is already running, or the store is closing")
        self._writer_running = True
        self._writer_stopped = trio.Event()
        task_status.started()
        try:
            while True:
                if not (self._sealed or self._gathering.urgent or self._closing):
                    if self._failure is not None:
                        return
                    self._wakeup = trio.Event()
                    if self._gathering.ops:
                        # Only lazy writes: give an urgent one a moment to join.
                        self._lazy_waiting = True
                        with trio.move_on_after(LAZY_COMMIT_DELAY_S):
                            await self._wakeup.wait()
                        self._lazy_waiting = False
                    else:
                        await self._wakeup.wait()
                        continue
                batch = self._take_batch()
                if batch is not None:
                    await self._commit(batch)
                elif self._closing or self._failure is not None:
                    return
        finally:
            self._writer_running = False
            self._writer_stopped.set()

    async def aclose(self) -> None:
        """Refuse new writes, commit everything staged, close the environment.
        Idempotent. Shielded: a cancelled shutdown still finishes the writes it
        had accepted (a bounded amount: at most `STAGED_OPS_MAX`)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        self._wakeup.set()
        try:
            with trio.CancelScope(shield=True):
                if self._writer_running:
                    await self._writer_stopped.wait()
                while (batch := self._take_batch()) is not None:
                    await self._commit(batch)
        finally:
            self._close_env()

    def close(self) -> None:
        """Synchronous `aclose`, for code outside trio (tools, benchmarks): it
        commits what is staged on the calling thread. Inside trio use `aclose`."""
        if self._closed:
            return
        if self._commit_in_flight:
            raise RuntimeError("Storage.close() while a commit runs; use aclose()")
        self._closing = True
        self._wakeup.set()
        try:
            while (batch := self._take_batch()) is not None:
                self._commit_sync(batch)
        finally:
            self._close_env()

    def copy_committed(self, directory: Path) -> Path:
        """A compacted copy of the committed data, made from one read
        transaction, into the new `directory` (`snapshot.copy_environment`).
        Blocks: call it on a worker thread."""
        self._check_readable()
        return copy_environment(self._env, directory)

    @property
    def stats(self) -> StorageStats:
        """A snapshot of the writer's counters."""
        return dataclasses.replace(self._stats)

    @property
    def staged_ops(self) -> int:
        """Writes staged and not yet committed."""
        return self._staged_ops

    @property
    def overlay_size(self) -> int:
        """Keys the overlay holds (staged, not yet committed)."""
        return sum(len(entries) for entries in self._overlay.values())

    @property
    def closed(self) -> bool:
        """Whether `close` or `aclose` has run (the map is gone then)."""
        return self._closed

    def set_read_hook(self, hook: Callable[[], object] | None, every_bytes: int) -> None:
        """Call `hook` (on the reading thread, possibly inside a read
        transaction) each time `every_bytes` of keys and rows have been read
        from LMDB's map; None removes it. The residency guard uses it to trim
        the map during a burst of reads (a large scan) instead of only on its
        timer. The hook must not read or write the store."""
        assert hook is None or every_bytes > 0
        self._read_hook = hook
        self._read_hook_every_bytes = every_bytes
        self._read_bytes_since_hook = 0

    def _count_read(self, read_bytes: int) -> None:
        if self._read_hook is None:
            return
        self._read_bytes_since_hook += read_bytes
        if self._read_bytes_since_hook >= self._read_hook_every_bytes:
            self._read_bytes_since_hook = 0
            self._read_hook()

    @property
    def failure(self) -> StorageFailed | None:
        """The commit failure that stopped the store, if any."""
        return self._failure

    # --- Internals: reads ------------------------------------------------------

    def _read(self, db_name: bytes, key: bytes) -> bytes | None:
        self._check_readable()
        self._check_key(key)
        staged = self._overlay[db_name].get(key)
        if staged is not None:
            return staged.data
        with self._env.begin(db=self._dbs[db_name]) as txn:
            data: bytes | None = txn.get(key)
        if data is not None:
            self._count_read(len(key) + len(data))
        return data

    def _scan(
        self, db_name: bytes, start: bytes, end: bytes | None, limit: int, bytes_max: int = 0
    ) -> list[tuple[bytes, bytes]]:
        """Merge LMDB's range with the overlay's, overlay first on equal keys.
        `bytes_max` > 0 also ends the page at that many bytes (see `scan_table_raw`)."""
        self._check_readable()
        check_range(start, end, limit)
        # The overlay is bounded by STAGED_OPS_MAX; a linear filter is cheap
        # next to building the rows.
        staged = sorted(
            (key, op.data)
            for key, op in self._overlay[db_name].items()
            if start <= key and (end is None or key < end)
        )
        found: list[tuple[bytes, bytes]] = []
        found_bytes = 0
        staged_index = 0
        with self._env.begin(db=self._dbs[db_name]) as txn:
            cursor = txn.cursor()
            on_disk = cursor.set_range(start) if start else cursor.first()
            while len(found) < limit and not 0 < bytes_max <= found_bytes:
                disk_key: bytes | None = cursor.key() if on_disk else None
                if disk_key is not None and end is not None and disk_key >= end:
                    disk_key = None
                staged_key = staged[staged_index][0] if staged_index < len(staged) else None
                if staged_key is None and disk_key is None:
                    break
                if staged_key is not None and (disk_key is None or staged_key <= disk_key):
                    if staged_key == disk_key:
                        on_disk = cursor.next()  # shadowed by the staged write
                    data = staged[staged_index][1]
                    staged_index += 1
                    if data is not None:
                        found.append((staged_key, data))
                        found_bytes += len(staged_key) + len(data)
                else:
                    assert disk_key is not None
                    disk_data: bytes = cursor.value()
                    found.append((disk_key, disk_data))
                    found_bytes += len(disk_key) + len(disk_data)
                    self._count_read(len(disk_key) + len(disk_data))
                    on_disk = cursor.next()
        assert len(found) <= limit
        assert all(found[i][0] < found[i + 1][0] for i in range(len(found) - 1))
        return found

    # --- Internals: staging ------------------------------------------------------

    def _prepare(self, table: str, key: bytes, row: Row | None) -> Op:
        db_name = self._table_db(table)
        if row is not None and not isinstance(row, Row):
            raise InvalidRequest(f"a row must be a Row or None, not {type(row).__name__}")
        try:
            data = None if row is None else encode_row(row)
        except ValueError as error:
            raise InvalidRequest(f"table {table!r} key {key!r}: {error}") from error
        op = self._prepare_raw(db_name, key, data)
        op.row = row
        return op

    def _prepare_raw(self, db_name: bytes, key: bytes, data: bytes | None) -> Op:
        self._check_key(key)
        if data is not None and type(data) is not bytes:
            raise InvalidRequest(f"a stored value must be bytes or None, not {type(data).__name__}")
        op = Op(db_name=db_name, key=key, data=data, seq=0)
        if op.size_bytes > RECORD_BYTES_MAX:
            raise InvalidRequest(
                f"record is {op.size_bytes} bytes; the limit is {RECORD_BYTES_MAX}"
            )
        return op

    def _stage_all(self, ops: list[Op], *, lazy: bool = False) -> CommitTicket:
        """Stage `ops` into one batch (so they commit atomically), or none of them."""
        assert ops
        self._check_writable()
        size_bytes = sum(op.size_bytes for op in ops)
        if len(ops) > BATCH_OPS_MAX or size_bytes > BATCH_BYTES_MAX:
            raise InvalidRequest(
                f"{len(ops)} ops of {size_bytes} bytes exceed one batch "
                f"({BATCH_OPS_MAX} ops, {BATCH_BYTES_MAX} bytes)"
            )
        batch = self._batch_with_room(len(ops), size_bytes)
        for op in ops:
            self._place(batch, op)
        return self._staged(batch, len(ops), size_bytes, lazy)

    def _stage_one(self, op: Op, lazy: bool) -> CommitTicket:
        """`_stage_all([op])` without the list work: a Paxos step stages one
        row, several times per operation. One record always fits in an empty
        batch (`_prepare_raw` bounds it by RECORD_BYTES_MAX)."""
        self._check_writable()
        size_bytes = op.size_bytes
        batch = self._batch_with_room(1, size_bytes)
        self._place(batch, op)
        return self._staged(batch, 1, size_bytes, lazy)

    def _batch_with_room(self, op_count: int, size_bytes: int) -> _Batch:
        """The batch that `op_count` ops of `size_bytes` join (sealing the
        gathering one if they do not fit in it); `StorageOverloaded` if too
        much already awaits commit."""
        if (
            self._staged_ops + op_count > STAGED_OPS_MAX
            or self._staged_bytes + size_bytes > STAGED_BYTES_MAX
        ):
            raise StorageOverloaded(
                f"{self._staged_ops} writes ({self._staged_bytes} bytes) await commit"
            )
        if not self._gathering.fits(op_count, size_bytes):
            self._sealed.append(self._gathering)
            self._gathering = _Batch()
        batch = self._gathering
        assert batch.fits(op_count, size_bytes)
        return batch

    def _place(self, batch: _Batch, op: Op) -> None:
        """Add `op` to `batch` and make it what reads see."""
        if op.row is not None and self.row_placed is not None:
            self.row_placed(op.db_name, op.key, op.row)  # reads still see the old row
        self._seq += 1
        op.seq = self._seq
        batch.ops.append(op)
        self._overlay[op.db_name][op.key] = op
        if op.row is not None and op.data is not None:
            self._decoded.put(op.db_name, op.key, op.row, len(op.data))
        else:
            self._decoded.drop(op.db_name, op.key)

    def _staged(self, batch: _Batch, op_count: int, size_bytes: int, lazy: bool) -> CommitTicket:
        """Count what was placed in `batch`, wake the writer, make the ticket."""
        batch.size_bytes += size_bytes
        self._staged_ops += op_count
        self._staged_bytes += size_bytes
        if not lazy:
            batch.urgent = True
            self._wakeup.set()
        elif not self._lazy_waiting:
            self._wakeup.set()  # the writer starts its lazy-flush timer
        return CommitTicket(batch)

    # --- Internals: committing ----------------------------------------------------

    def _take_batch(self) -> _Batch | None:
        """The oldest uncommitted batch, or None. Takes the gathering batch too:
        what arrived while the last commit ran goes in the next one."""
        if self._failure is not None:
            return None
        if self._sealed:
            return self._sealed.popleft()
        if self._gathering.ops:
            batch = self._gathering
            self._gathering = _Batch()
            return batch
        return None

    async def _commit(self, batch: _Batch) -> None:
        assert not self._commit_in_flight, "one commit at a time"
        self._commit_in_flight = True
        try:
            # Shielded: once taken, a batch is committed and its waiters told,
            # even if the writer is being cancelled (one fsync at most).
            with trio.CancelScope(shield=True):
                commit = self._commit_in_thread
                await self._commit_thread.run(lambda: commit(batch.ops))
        except Exception as error:
            self._fail(batch, error)
        finally:
            self._commit_in_flight = False
        self._finish(batch)

    def _commit_sync(self, batch: _Batch) -> None:
        assert not self._commit_in_flight
        try:
            self._commit_in_thread(batch.ops)
        except Exception as error:
            self._fail(batch, error)
        self._finish(batch)

    def _commit_in_thread(self, ops: list[Op]) -> None:
        """One write transaction for `ops` (see `commit_ops`); runs on the commit thread."""
        started = time.perf_counter()
        commit_ops(self._env, self._dbs, ops)
        self._last_commit_s = time.perf_counter() - started

    def _finish(self, batch: _Batch) -> None:
        """Trio thread, right after the commit: retire the batch's overlay
        entries (unless a later write to the key was staged), wake its waiters."""
        for op in batch.ops:
            entries = self._overlay[op.db_name]
            if entries.get(op.key) is op:
                del entries[op.key]
        self._staged_ops -= len(batch.ops)
        self._staged_bytes -= batch.size_bytes
        assert self._staged_ops >= 0 and self._staged_bytes >= 0
        self._stats.batches_committed += 1
        self._stats.ops_committed += len(batch.ops)
        self._stats.bytes_committed += batch.size_bytes
        self._stats.max_batch_ops = max(self._stats.max_batch_ops, len(batch.ops))
        self._stats.commit_seconds_total += self._last_commit_s
        if self.commit_observer is not None:
            self.commit_observer(self._last_commit_s, len(batch.ops))
        batch.set_done()

    def _fail(self, batch: _Batch, error: Exception) -> NoReturn:
        """Fail-stop: fail this batch and every one behind it, drop the overlay,
        refuse further writes, raise `StorageFailed`."""
        failed = [batch, *self._sealed]
        if self._gathering.ops:
            failed.append(self._gathering)
        lost_ops = sum(len(each.ops) for each in failed)
        failure = StorageFailed(
            f"LMDB commit of {len(batch.ops)} writes failed ({error!r}); the store "
            f"stopped: {lost_ops} staged writes were not made durable and further "
            "writes are refused. Restart the node (with a larger map_size_bytes "
            "if the map is full)."
        )
        failure.__cause__ = error
        self._failure = failure
        self._sealed.clear()
        self._gathering = _Batch()
        for entries in self._overlay.values():
            entries.clear()
        self._decoded.clear()
        self._staged_ops = 0
        self._staged_bytes = 0
        for each in failed:
            each.error = failure
            each.set_done()
        self._wakeup.set()
        raise failure

    # --- Internals: checks ------------------------------------------------------

    def _close_env(self) -> None:
        self._closing = True
        self._closed = True
        self._commit_thread.stop()
        self._env.close()

    def _table_db(self, table: str) -> bytes:
        db_name = self._table_dbs.get(table)
        if db_name is None:
            raise InvalidRequest(f"unknown table {table!r}")
        return db_name

    def _check_key(self, key: bytes) -> None:
        if type(key) is not bytes:
            raise InvalidRequest(f"a stored key must be bytes, not {type(key).__name__}")
        if not 0 < len(key) <= self._key_bytes_max:
            raise InvalidRequest(
                f"a stored key must be 1 to {self._key_bytes_max} bytes, not {len(key)}"
            )

    def _check_process(self) -> None:
        if self._generation != _process_generation:
            raise RuntimeError("an LMDB environment must not be used across fork")

    def _check_readable(self) -> None:
        self._check_process()
        if self._closed:
            raise StorageClosed("the store is closed")

    def _check_writable(self) -> None:
        self._check_process()
        if self._failure is not None:
            raise _failed_again(self._failure)
        if self._closing:
            raise StorageClosed("the store is closing; no new writes")
