"""Watches, the node side: the change log fed by the replica, and the watch
requests that wait on it.

Every row the node's storage stages passes through `WatchHub.row_placed`
(the store's one hook, `Storage.row_placed`); a new chosen version goes into
the change log (`kvsvr.protocol.changes`) and wakes the watch requests
waiting on its key or its partition key. Nothing in the node polls.

A watch is a request the node holds: the client asks for the changes after
its cursors, the node answers at once when the log has some, or parks the
request (one `trio.Event`, no buffer) until a change of the watched key
arrives or `wait_s` passes, and the client asks again as soon as the answer
arrives. So a watcher that stops reading has no request held: the node keeps
nothing for it beyond the shared, bounded log, and its memory never grows
with a slow watcher. When such a watcher comes back after its key's history
was dropped, it gets `WatchCompacted`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

import trio

from kvsvr.api import WatchEvent, WatchRequest, watch_reply_to_wire
from kvsvr.config import TableConfig
from kvsvr.errors import InvalidRequest, Unavailable, WatchCompacted
from kvsvr.keys import decode_key, encode_key, partition_prefix
from kvsvr.protocol.changes import ChangeLog, LogKey
from kvsvr.protocol.state import Row
from kvsvr.storage.environment import table_db_names

# Watch requests one connection may have held at once. A held request takes
# one of the connection's SERVER_REQUESTS_IN_FLIGHT_MAX (256) slots, so half of
# them stay free for its gets and puts.
WATCHES_PER_CONNECTION_MAX: Final = 128
# Watch requests held on one node at once (each is one parked task, ~2 KiB).
WATCHES_PER_NODE_MAX: Final = 8192


class WatchHub:
    """The node's change log and the watch requests waiting on it."""

    def __init__(
        self,
        tables: dict[str, TableConfig],
        read_version: Callable[[str, bytes], int],
        is_replica: Callable[[str, bytes], bool],
        log: ChangeLog | None = None,
    ) -> None:
        self.tables = tables
        self.read_version = read_version
        self.is_replica = is_replica
        self.log = log if log is not None else ChangeLog()
        self._db_of_table = table_db_names(tables)
        self._waiting: dict[LogKey, set[trio.Event]] = {}
        self._held_by_peer: dict[str, int] = {}
        self.held = 0
        self.answers = 0
        self.compacted = 0

    def status(self) -> dict[str, int]:
        return {
            "held": self.held,
            "answers": self.answers,
            "compacted": self.compacted,
            "log_keys": len(self.log),
            "log_bytes": self.log.size_bytes,
            "log_changes": self.log.changes_recorded,
        }

    def row_placed(self, db: bytes, key: bytes, row: Row) -> None:
        """The store staged `row`: log it if its chosen version is new, and wake
        the watches of its key and of its partition key."""
        partition, _ = decode_key(key)
        group = partition_prefix(partition)
        if self.log.record(db, key, row.version, row.value, group) is None:
            return
        self._wake((db, key))
        self._wake((db, group))

    def _wake(self, log_key: LogKey) -> None:
        events = self._waiting.pop(log_key, None)
        if events is not None:
            for event in events:
                event.set()

    async def watch(self, peer: str, body: object) -> object:
        """Answer one watch request (see the module docstring)."""
        request = WatchRequest.from_wire(body)
        if self.log.bytes_max == 0:
            raise Unavailable("watches are off on this node (watch_history_bytes_max = 0)")
        if request.table not in self.tables:
            raise InvalidRequest(f"unknown table {request.table!r}")
        encode_key(request.partition_key)  # checks its size
        if not self.is_replica(request.table, request.partition_key):
            raise Unavailable("this node holds no replica of the key; ask one that does")
        events = self._events(request)
        if events or request.wait_s == 0:
            await trio.lowlevel.checkpoint()
            return self._answer(events)
        if self._held_by_peer.get(peer, 0) >= WATCHES_PER_CONNECTION_MAX:
            raise Unavailable(
                f"this connection already holds {WATCHES_PER_CONNECTION_MAX} watches "
                "(WATCHES_PER_CONNECTION_MAX)"
            )
        if self.held >= WATCHES_PER_NODE_MAX:
            raise Unavailable(f"this node holds {WATCHES_PER_NODE_MAX} watches already")
        woken = trio.Event()
        log_key = self._log_key(request)
        self._waiting.setdefault(log_key, set()).add(woken)
        self._held_by_peer[peer] = self._held_by_peer.get(peer, 0) + 1
        self.held += 1
        try:
            with trio.move_on_after(request.wait_s):
                await woken.wait()
        finally:
            self.held -= 1
            left = self._held_by_peer[peer] - 1
            if left:
                self._held_by_peer[peer] = left
            else:
                del self._held_by_peer[peer]
            waiting = self._waiting.get(log_key)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[log_key]
        return self._answer(self._events(request))

    def _answer(self, events: list[WatchEvent]) -> object:
        self.answers += 1
        return watch_reply_to_wire(events)

    def _log_key(self, request: WatchRequest) -> LogKey:
        db = self._db_of_table[request.table]
        if request.sort_key is None:
            return (db, partition_prefix(request.partition_key))
        return (db, encode_key(request.partition_key, request.sort_key))

    def _events(self, request: WatchRequest) -> list[WatchEvent]:
        """The events to deliver now, by key; `WatchCompacted` if a key's
        history is gone."""
        db = self._db_of_table[request.table]
        if request.sort_key is not None:
            sort_keys = [request.sort_key]
        else:
            prefix = partition_prefix(request.partition_key)
            logged = [key[len(prefix) :] for key in self.log.keys_in_group(db, prefix)]
            covered = [sort_key for sort_key in logged if request.covers(sort_key)]
            sort_keys = sorted(set(covered) | set(request.cursors))
        events: list[WatchEvent] = []
        for sort_key in sort_keys:
            key = encode_key(request.partition_key, sort_key)
            cursor = request.cursors.get(sort_key, 0)
            changes = self.log.after(
                db, key, cursor, partial(self.read_version, request.table, key)
            )
            if changes is None:
                self.compacted += 1
                raise WatchCompacted(
                    f"the history of key {sort_key!r} after version {cursor} is gone; "
                    "read it again and watch from its current version"
                )
            previous = cursor
            for change in changes:
                events.append(WatchEvent(sort_key, change.version, previous, change.value))
                previous = change.version
        return events
