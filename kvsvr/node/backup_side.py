"""A node's side of `kvsvr backup`: a compacted copy of its LMDB made from one
read transaction, served to the client in bounded, crc32c-checked chunks at
a limited rate, one backup at a time (see `kvsvr.backup.messages`).

Only a node that votes gives a copy: a replica still rebuilding, waiting for
its peers or for an operator holds a partial state that is no acceptor's
memory, and the backup's argument (docs/DESIGN.md) counts each copy as one.
Its refusal (`Unavailable`) leaves it out, as an unreachable node is.

What a node holds for backups is bounded: one session (one copy on disk) at
a time, and one chunk (at most `CHUNK_BYTES_MAX`) read into memory at a
time, however many chunk requests arrive at once.

The copy is written to `COPY_DIR_NAME` inside the node's data directory
(LMDB keeps only `data.mdb` and `lock.mdb` there) and removed when the
client ends the session, when a later backup replaces an abandoned one, or
at the next backup's start if the node died mid-backup. The node keeps
serving throughout: the copy runs on a worker thread and takes only a read
transaction, which never blocks LMDB's writer.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from kvsvr.backup.messages import (
    BEGIN_METHOD,
    CHUNK_BYTES_MAX,
    CHUNK_METHOD,
    END_METHOD,
    BeginReply,
    BeginRequest,
    ChunkReply,
    ChunkRequest,
    EndRequest,
)
from kvsvr.errors import InvalidRequest, Unavailable

log = logging.getLogger("kvsvr.backup")

COPY_DIR_NAME: Final = "backup-copy"

# A session nobody asked for a chunk in this long was abandoned (its client
# died or lost the node); a new backup may then replace it. Long enough for
# a client that waits on the other nodes' copies meanwhile.
SESSION_IDLE_S: Final = 120.0


@dataclass
class _Session:
    session: int
    path: Path
    size_bytes: int
    chunk_bytes: int
    rate_bytes_per_s: int
    last_used: float
    send_at: float
    ready: bool = False


class BackupSide:
    """`copy_committed(directory) -> data file` makes the copy (blocking: run
    on a worker thread); `work_dir` is the node's data directory; `votes()`
    says whether this replica votes (a backup is refused while it does not)."""

    def __init__(
        self,
        copy_committed: Callable[[Path], Path],
        work_dir: Path,
        cluster_id: str,
        node_id: str,
        votes: Callable[[], bool] = lambda: True,
    ) -> None:
        self._copy_committed = copy_committed
        self._votes = votes
        # Held while a chunk is read and its send time reserved.
        self._chunk_lock = trio.Lock()
        self._copy_dir = work_dir / COPY_DIR_NAME
        self._cluster_id = cluster_id
        self._node_id = node_id
        self._session: _Session | None = None
        self._sessions = random.Random()
        self.backups_served = 0

    async def handle(self, method: str, body: object) -> object:
        if method == BEGIN_METHOD:
            return (await self._begin(BeginRequest.from_wire(body))).to_wire()
        if method == CHUNK_METHOD:
            return (await self._chunk(ChunkRequest.from_wire(body))).to_wire()
        if method == END_METHOD:
            await self._end(EndRequest.from_wire(body))
            return {}
        raise InvalidRequest(f"unknown backup method {method!r}")

    async def _begin(self, request: BeginRequest) -> BeginReply:
        if not self._votes():
            raise Unavailable(
                f"node {self._node_id} does not vote yet (rebuilding or waiting); "
                "its copy would not be a replica's whole state"
            )
        now = trio.current_time()
        running = self._session
        # A copy still being made is never replaced, however long it takes.
        if running is not None and (not running.ready or now - running.last_used < SESSION_IDLE_S):
            doing = (
                "making its copy"
                if not running.ready
                else f"last active {now - running.last_used:.0f} s ago"
            )
            raise Unavailable(
                f"a backup of node {self._node_id} is already running ({doing}); one at a time"
            )
        session = _Session(
            session=self._sessions.getrandbits(48),
            path=self._copy_dir / "data.mdb",
            size_bytes=0,
            chunk_bytes=min(CHUNK_BYTES_MAX, request.rate_bytes_per_s),
            rate_bytes_per_s=request.rate_bytes_per_s,
            last_used=now,
            send_at=now,
        )
        self._session = session  # from here on, other backups are refused
        try:
            await trio.to_thread.run_sync(self._fresh_copy)
        except BaseException:
            self._session = None
            raise
        session.size_bytes = session.path.stat().st_size
        session.ready = True
        session.last_used = trio.current_time()
        log.info(
            "backup: copy of %d bytes made for session %d", session.size_bytes, session.session
        )
        return BeginReply(session.session, session.size_bytes, self._cluster_id, self._node_id)

    def _fresh_copy(self) -> None:
        shutil.rmtree(self._copy_dir, ignore_errors=True)
        self._copy_committed(self._copy_dir)

    def _current(self, session: int) -> _Session:
        current = self._session
        if current is None or current.session != session or not current.ready:
            raise InvalidRequest(f"no backup session {session} on node {self._node_id}")
        return current

    async def _chunk(self, request: ChunkRequest) -> ChunkReply:
        session = self._current(request.session)
        if request.offset > session.size_bytes:
            raise InvalidRequest(
                f"offset {request.offset} is past the copy's end ({session.size_bytes} bytes)"
            )
        session.last_used = trio.current_time()
        async with self._chunk_lock:
            await trio.sleep_until(session.send_at)
            if self._session is not session:
                raise InvalidRequest(f"backup session {request.session} ended")
            data = await trio.to_thread.run_sync(
                _read_at, session.path, request.offset, session.chunk_bytes
            )
            now = trio.current_time()
            session.send_at = max(now, session.send_at) + len(data) / session.rate_bytes_per_s
            session.last_used = now
        return ChunkReply(data)

    async def _end(self, request: EndRequest) -> None:
        self._current(request.session)
        async with self._chunk_lock:  # no chunk is being read from the copy
            self._current(request.session)
            # Removed while the session still refuses other backups, so the
            # removal never meets the next backup's copy.
            await trio.to_thread.run_sync(_remove_tree, self._copy_dir)
            self._session = None
        self.backups_served += 1


def _remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(size)
