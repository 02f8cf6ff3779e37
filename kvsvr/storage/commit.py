"""The body of a commit, which runs off the trio thread: the op a batch
carries, the one LMDB write transaction that commits a batch of them, and the
long-lived thread that runs those transactions one at a time. The staging,
batching and fail-stop around them are `kvsvr.storage.engine`'s."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import lmdb
import trio

from kvsvr.protocol.state import Row


@dataclass(slots=True)
class Op:
    db_name: bytes
    key: bytes
    data: bytes | None  # None: delete the key
    seq: int  # staging order; tells a later write to the same key from this one
    row: Row | None = None  # the decoded row `data` encodes (table writes)

    @property
    def size_bytes(self) -> int:
        return len(self.key) + (0 if self.data is None else len(self.data))


def commit_ops(env: lmdb.Environment, dbs: dict[bytes, lmdb._Database], ops: list[Op]) -> None:
    """One write transaction, committed (and fsynced) or aborted as a whole.
    Runs on the commit thread: touches only `ops`, `env` and `dbs`.

    Puts go in runs through `Cursor.putmulti`: one call per run, not one
    per row. (py-lmdb 3 lets the GIL go around every row in both, but a
    row's put is shorter than the trio thread's wake-up, so taking it
    back mostly succeeds at once: with another thread busy in Python, a
    commit of 1 or 50 rows took ~5.7 ms, one switch interval plus the
    fsync, either way; 0.5 ms with nothing else running.)
    The ops keep their order: a run ends at a delete or at a change of
    database."""
    with env.begin(write=True) as txn:
        run: list[tuple[bytes, bytes]] = []
        run_db = b""
        for op in ops:
            if op.data is not None and (op.db_name == run_db or not run):
                run.append((op.key, op.data))
                run_db = op.db_name
                continue
            if run:
                txn.cursor(db=dbs[run_db]).putmulti(run)
                run = []
            if op.data is None:
                txn.delete(op.key, db=dbs[op.db_name])
            else:
                run.append((op.key, op.data))
                run_db = op.db_name
        if run:
            txn.cursor(db=dbs[run_db]).putmulti(run)


class CommitThread:
    """One long-lived thread that runs the commits, one at a time.

    `trio.to_thread.run_sync` per batch costs a capacity-limiter round and a
    thread-cache hand-off on top of the unavoidable wake-ups (about twice the
    trio-thread CPU per batch on this machine); this thread is fed by a queue
    and posts each result back with `TrioToken.run_sync_soon`. Started on the
    first commit, stopped when the environment closes."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker_thread: threading.Thread | None = None

    async def run(self, function: Callable[[], None]) -> None:
        """Run `function` on the thread; return (or raise) what it did. Waits
        uncancellably: callers shield it anyway (a commit, once begun, ends)."""
        if self._worker_thread is None:
            self._worker_thread = threading.Thread(
                target=self._serve, name="kvsvr-lmdb-commit", daemon=True
            )
            self._worker_thread.start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        result: list[BaseException | None] = []

        def job() -> None:
            try:
                function()
                result.append(None)
            except BaseException as error:  # handed to the trio side, raised there
                result.append(error)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task)
            except trio.RunFinishedError:
                pass  # nobody waits any more

        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        (error,) = result
        if error is not None:
            raise error

    def stop(self) -> None:
        if self._worker_thread is not None:
            self._jobs.put(None)
            self._worker_thread.join()
            self._worker_thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
