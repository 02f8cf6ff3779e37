"""Watches, the node side: the change log fed by the replica, the watch
requests that wait on it, and the peers' logs that fill its skips.

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

Before a watch passes a change that skips versions, the node asks the other
replicas of the key what their logs hold in between (`PeerHistory`, the
`HISTORY_METHOD` request): a replica may have learned a version this one
missed. It needs answers from enough of them to make a majority with itself
(`Unavailable` otherwise: the watch is not answered past the skip).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio

from kvsvr.api import WatchEvent, WatchRequest, watch_reply_to_wire
from kvsvr.config import TableConfig
from kvsvr.errors import InvalidRequest, KvsvrError, Unavailable, WatchCompacted
from kvsvr.keys import decode_key, encode_key, partition_prefix
from kvsvr.protocol.changes import ANSWER_BYTES_MAX, ChangeLog, LogKey
from kvsvr.protocol.state import Row
from kvsvr.storage.environment import table_db_names

# Watch requests one connection may have held at once. A held request takes
# one of the connection's SERVER_REQUESTS_IN_FLIGHT_MAX (256) slots, so half of
# them stay free for its gets and puts.
WATCHES_PER_CONNECTION_MAX: Final = 128
# Watch requests held on one node at once (each is one parked task, ~2 KiB).
WATCHES_PER_NODE_MAX: Final = 8192
# The peers' request for their logged changes of a key between two versions.
HISTORY_METHOD: Final = "watch_history"
# How long a node waits for its peers' logs about one skip: they answer from
# memory, so only a down or paused peer takes this long.
PEER_HISTORY_TIMEOUT_S: Final = 1.0
# Skips one watch request asks the peers about before it answers (each ask
# settles one skip for every later watcher of the key).
FILLS_PER_REQUEST_MAX: Final = 4

# (table, encoded key, low, high) -> the versions and values the peers logged
# strictly between low and high.
AskPeers = Callable[[str, bytes, int, int], Awaitable[list[tuple[int, bytes | None]]]]


class WatchHub:
    """The node's change log and the watch requests waiting on it."""

    def __init__(
        self,
        tables: dict[str, TableConfig],
        read_version: Callable[[str, bytes], int],
        is_replica: Callable[[str, bytes], bool],
        log: ChangeLog | None = None,
        ask_peers: AskPeers | None = None,
    ) -> None:
        """`read_version(table, key)`: the replica's chosen version of a key
        (raises `KvsvrError` when it cannot be read); `ask_peers`: None when
        the key has no other replica to ask."""
        self.tables = tables
        self.read_version = read_version
        self.is_replica = is_replica
        self.log = log if log is not None else ChangeLog()
        self.ask_peers = ask_peers
        self._db_of_table = table_db_names(tables)
        self._table_of_db = {db: table for table, db in self._db_of_table.items()}
        # An eventual table's versions are clock stamps: what its replica
        # applies is delivered as it comes, with no skips to settle.
        self._eventual_dbs = {
            db for table, db in self._db_of_table.items() if tables[table].consistency == "eventual"
        }
        self._waiting: dict[LogKey, set[trio.Event]] = {}
        self._held_by_peer: dict[str, int] = {}
        self.held = 0
        self.answers = 0
        self.compacted = 0
        self.fills = 0

    def status(self) -> dict[str, int]:
        return {
            "held": self.held,
            "answers": self.answers,
            "compacted": self.compacted,
            "fills": self.fills,
            "log_keys": len(self.log),
            "log_bytes": self.log.size_bytes,
            "log_changes": self.log.changes_recorded,
            "log_changes_filled": self.log.changes_filled,
        }

    # ------------------------------------------------------------ the replica's side

    def row_placed(self, db: bytes, key: bytes, row: Row) -> None:
        """The store is about to stage `row` (still reading the old one): log
        it if its chosen version is new, and wake the watches of its key and
        of its partition key."""
        table = self._table_of_db.get(db)
        if table is None:
            return
        try:
            partition, _ = decode_key(key)
        except KvsvrError:
            return  # not a row key; the hook must not fail the write
        group = partition_prefix(partition)
        old_version = partial(self._old_version, table, key)
        settled = db in self._eventual_dbs
        if self.log.record(
            db, key, row.version, row.value, group, old_version=old_version, settled=settled
        ):
            self._wake((db, key))
            self._wake((db, group))

    def _old_version(self, table: str, key: bytes) -> int | None:
        try:
            return self.read_version(table, key)
        except KvsvrError:
            return None

    def _wake(self, log_key: LogKey) -> None:
        events = self._waiting.pop(log_key, None)
        if events is not None:
            for event in events:
                event.set()

    def serve_history(self, body: object) -> dict[str, Any]:
        """A peer's `HISTORY_METHOD` request: [table, key, low, high]."""
        if (
            not isinstance(body, list)
            or len(body) != 4
            or not isinstance(body[0], str)
            or not isinstance(body[1], bytes)
            or not all(isinstance(v, int) and v >= 0 for v in body[2:])
        ):
            raise InvalidRequest("watch_history takes [table, key, low, high]")
        table, key, low, high = body
        if table not in self._db_of_table:
            raise InvalidRequest(f"unknown table {table!r}")
        changes = self.log.between(self._db_of_table[table], key, low, high)
        if changes is None:
            return {"vouch": False, "changes": []}
        return {"vouch": True, "changes": [[c.version, c.value] for c in changes]}

    # ------------------------------------------------------------ the watcher's side

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
        deadline = trio.current_time() + request.wait_s
        fills = 0
        while True:
            events, gaps = self._events(request)
            if gaps and fills < FILLS_PER_REQUEST_MAX:
                # Settled before answering, so that a partition's busy keys
                # never keep a skip of a quiet one waiting.
                fills += 1
                try:
                    await self._fill(request.table, *gaps[0])
                except Unavailable:
                    if not events:
                        raise
                    return self._answer(events)  # what comes before the skip
                continue
            if events or trio.current_time() >= deadline:
                await trio.lowlevel.checkpoint()
                return self._answer(events)
            await self._hold(peer, request, deadline)

    async def _hold(self, peer: str, request: WatchRequest, deadline: float) -> None:
        """Park until a change of the watched key(s) or `deadline`."""
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
            with trio.move_on_at(deadline):
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

    async def _fill(self, table: str, key: bytes, low: int, high: int) -> None:
        """Ask the peers about the skip (low, high) of `key` and log what they
        knew. `Unavailable` when too few of them answered."""
        found: list[tuple[int, bytes | None]] = []
        if self.ask_peers is not None:
            found = await self.ask_peers(table, key, low, high)
        if self.log.fill(self._db_of_table[table], key, low, high, found):
            self.fills += 1

    def _answer(self, events: list[WatchEvent]) -> object:
        self.answers += 1
        return watch_reply_to_wire(events)

    def _log_key(self, request: WatchRequest) -> LogKey:
        db = self._db_of_table[request.table]
        if request.sort_key is None:
            return (db, partition_prefix(request.partition_key))
        return (db, encode_key(request.partition_key, request.sort_key))

    def _events(
        self, request: WatchRequest
    ) -> tuple[list[WatchEvent], list[tuple[bytes, int, int]]]:
        """The events to deliver now, by key, and the skips (key, low, high)
        that stop a key's events until the peers were asked; `WatchCompacted`
        if a key's history is gone. A partition's keys add events until
        `ANSWER_BYTES_MAX` is reached (one key's events stay within it too),
        so an answer stays well under the frame limit."""
        db = self._db_of_table[request.table]
        if request.sort_key is not None:
            sort_keys = [request.sort_key]
        else:
            prefix = partition_prefix(request.partition_key)
            logged = [key[len(prefix) :] for key in self.log.keys_in_group(db, prefix)]
            covered = [sort_key for sort_key in logged if request.covers(sort_key)]
            sort_keys = sorted(set(covered) | set(request.cursors))
        events: list[WatchEvent] = []
        gaps: list[tuple[bytes, int, int]] = []
        answer_bytes = 0
        for sort_key in sort_keys:
            if answer_bytes >= ANSWER_BYTES_MAX:
                break  # the other keys' events go in the next answer
            key = encode_key(request.partition_key, sort_key)
            cursor = request.cursors.get(sort_key, 0)
            answer = self.log.after(db, key, cursor, partial(self.read_version, request.table, key))
            if answer is None:
                self.compacted += 1
                raise WatchCompacted(
                    f"the history of key {sort_key!r} after version {cursor} is gone; "
                    "read it again and watch from its current version"
                )
            previous = cursor
            for change in answer.changes:
                events.append(WatchEvent(sort_key, change.version, previous, change.value))
                previous = change.version
                answer_bytes += change.size_bytes
            if answer.gap is not None:
                gaps.append((key, *answer.gap))
        return events, gaps


class PeerHistory:
    """Asks the other replicas of a key for their logs about one skip."""

    def __init__(
        self,
        me: int,
        replicas_of: Callable[[str, bytes], list[int]],
        call_peer: Callable[[int, str, object], Awaitable[object]],
    ) -> None:
        self.me = me
        self.replicas_of = replicas_of
        self.call_peer = call_peer

    async def ask(
        self, table: str, key: bytes, low: int, high: int
    ) -> list[tuple[int, bytes | None]]:
        """Every version (with its value) the peers that answered in time logged
        between `low` and `high`; `Unavailable` unless they make a majority
        of the key's replicas with this one."""
        partition_key, _ = decode_key(key)
        replicas = self.replicas_of(table, partition_key)
        others = [r for r in replicas if r != self.me]
        needed = len(replicas) // 2  # peers that make a majority with this replica
        found: list[tuple[int, bytes | None]] = []
        vouched = 0

        async def ask_one(target: int) -> None:
            nonlocal vouched
            try:
                reply = await self.call_peer(target, HISTORY_METHOD, [table, key, low, high])
            except KvsvrError:
                return
            versions = _history_reply(reply)
            if versions is not None:
                found.extend(versions)
                vouched += 1

        with trio.move_on_after(PEER_HISTORY_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for target in others:
                    nursery.start_soon(ask_one, target)
        if vouched < needed:
            raise Unavailable(
                f"only {vouched} of the {needed} peers needed could say which versions "
                f"lie between {low} and {high}; ask again later"
            )
        return found


def _history_reply(reply: object) -> list[tuple[int, bytes | None]] | None:
    """A peer's answer: its versions between the bounds, or None when it
    cannot vouch for the range (or the answer is malformed)."""
    if not isinstance(reply, dict) or reply.get("vouch") is not True:
        return None
    changes = reply.get("changes")
    if not isinstance(changes, list):
        return None
    found: list[tuple[int, bytes | None]] = []
    for item in changes:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], int)
            or not (item[1] is None or isinstance(item[1], bytes))
        ):
            return None
        found.append((item[0], item[1]))
    return found
