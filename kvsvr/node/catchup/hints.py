"""Hinted handoff.

When a coordinator finishes a write while a replica of the key is down, it
keeps a *hint* in its LMDB `hints` sub-database: the chosen row, keyed by
(target, table, key), so a hot key keeps one hint, not one per write. Hints
are bounded per target in count and bytes and live at most `hint_ttl_s`;
beyond either bound a hint is dropped and counted, and anti-entropy brings
that row instead (hint storms bounded, nothing lost). When the detector sees
the target back, its hints are replayed in batches at
`hint_replay_rows_per_s` at most. Replay is idempotent: a replica keeps a
hinted row only when its version is higher than what it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio

from kvsvr.errors import CorruptRow, KvsvrError
from kvsvr.node.catchup.context import RPC_TIMEOUT_S, Collaborators, Readiness
from kvsvr.protocol.catchup import hint_key, pack_hint, parse_hint_key, unpack_hint
from kvsvr.protocol.catchup_messages import APPLY, ApplyRows
from kvsvr.protocol.state import Row
from kvsvr.storage import Storage, decode_row, encode_row
from kvsvr.storage.engine import HINTS_DB

log = logging.getLogger("kvsvr.replication")

HINT_BATCH_ROWS: Final = 512  # hints per replay request (within ROWS_PER_REQUEST_MAX)
HINT_REPLAY_IDLE_S: Final = 1.0  # look for new hints of an up target this often
_COUNT_PAGE_ROWS: Final = 10_000  # hints per step when counting them at start


@dataclass
class TargetHints:
    count: int = 0
    bytes: int = 0
    stored: int = 0
    replayed: int = 0
    dropped_full: int = 0
    dropped_expired: int = 0


class HintStore:
    """The `hints` sub-database with its per-target counts (kept in memory,
    counted from disk at start)."""

    def __init__(self, context: Collaborators) -> None:
        config = context.config
        self.storage: Storage = context.storage
        self.clock = context.clock
        self.targets: dict[int, TargetHints] = {
            n.index: TargetHints() for n in config.nodes if n.index != context.me.index
        }
        self.bytes_max = config.hint_bytes_max
        self.count_max = config.hints_max
        self.ttl_ms = int(config.hint_ttl_s * 1000)
        for target, stats in self.targets.items():
            start = bytes((target,))
            while True:
                page = self.storage.scan_raw(
                    HINTS_DB, start, bytes((target + 1,)), _COUNT_PAGE_ROWS
                )
                for hkey, data in page:
                    stats.count += 1
                    stats.bytes += len(hkey) + len(data)
                if len(page) < _COUNT_PAGE_ROWS:
                    break
                start = page[-1][0] + b"\x00"

    def add(self, target: int, table: str, key: bytes, row: Row) -> None:
        stats = self.targets[target]
        hkey = hint_key(target, table, key)
        data = pack_hint(self.clock.wall_ms(), encode_row(row))
        old = self.storage.read_raw(HINTS_DB, hkey)
        if old is not None:
            try:
                if decode_row(unpack_hint(old)[1]).version >= row.version:
                    return
            except CorruptRow:
                pass
        grow_bytes = len(hkey) + len(data) - (0 if old is None else len(hkey) + len(old))
        grow_count = 0 if old is not None else 1
        if stats.count + grow_count > self.count_max or stats.bytes + grow_bytes > self.bytes_max:
            stats.dropped_full += 1  # anti-entropy will bring this row instead
            return
        self.storage.stage_raw(HINTS_DB, hkey, data, lazy=True)
        stats.count += grow_count
        stats.bytes += grow_bytes
        stats.stored += 1

    def batch(self, target: int, limit: int) -> list[tuple[bytes, bytes]]:
        return self.storage.scan_raw(HINTS_DB, bytes((target,)), bytes((target + 1,)), limit)

    def remove(self, hkey: bytes, data: bytes) -> None:
        stats = self.targets[hkey[0]]
        self.storage.stage_raw(HINTS_DB, hkey, None, lazy=True)
        stats.count -= 1
        stats.bytes -= len(hkey) + len(data)
        assert stats.count >= 0

    def status(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            names[p]: {
                "pending": h.count,
                "bytes": h.bytes,
                "stored": h.stored,
                "replayed": h.replayed,
                "dropped_full": h.dropped_full,
                "dropped_expired": h.dropped_expired,
            }
            for p, h in self.targets.items()
        }


class HintedHandoff:
    """Keeps hints for replicas that are down and replays them when they are back."""

    def __init__(
        self, context: Collaborators, readiness: Readiness, is_up: Callable[[int], bool]
    ) -> None:
        self.context = context
        self.readiness = readiness
        self.is_up = is_up
        self.me = context.me.index
        self.store = HintStore(context)
        self.wakeups = {index: trio.Event() for index in self.store.targets}

    def peer_up(self, peer: int) -> None:
        """The detector saw `peer` come back: replay its hints now."""
        self.wakeups[peer].set()

    def after_write(
        self,
        table: str,
        key: bytes,
        replicas: Iterable[int],
        version: int,
        value: bytes | None,
        expires_at_ms: int | None,
    ) -> None:
        """A write of `version` was chosen: keep a hint for each replica that is
        down. (The row is built only then: nearly always, nobody is down.)"""
        for target in replicas:
            if target == self.me:
                continue
            # The detector needs a heartbeat or two to notice; a connection the
            # peer's kernel closed (a crashed process) says so at once.
            if not self.is_up(target) or not self.context.peers[target].up:
                row = Row(version=version, value=value, expires_at_ms=expires_at_ms)
                self.store.add(target, table, key, row)

    def hint(self, target: int, table: str, key: bytes, row: Row) -> None:
        if target != self.me:
            self.store.add(target, table, key, row)

    async def replay_loop(self, peer: int) -> None:
        stats = self.store.targets[peer]
        while True:
            with trio.move_on_after(HINT_REPLAY_IDLE_S):
                await self.wakeups[peer].wait()
            self.wakeups[peer] = trio.Event()
            while stats.count > 0 and self.is_up(peer) and self.readiness.ready:
                try:
                    replayed = await self.replay_batch(peer)
                except (KvsvrError, trio.TooSlowError) as error:
                    log.info("hint replay to %d paused: %s", peer, error)
                    break
                if replayed == 0:
                    break
                await trio.sleep(replayed / self.context.config.hint_replay_rows_per_s)

    async def replay_batch(self, peer: int) -> int:
        store = self.store
        stats = store.targets[peer]
        batch = store.batch(peer, HINT_BATCH_ROWS)
        oldest_ms = self.context.clock.wall_ms() - store.ttl_ms
        by_table: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
        for hkey, data in batch:
            try:
                _, table, key = parse_hint_key(hkey)
                created_ms, row_bytes = unpack_hint(data)
            except CorruptRow:
                log.error("dropping an unreadable hint %r", hkey)
                store.remove(hkey, data)
                continue
            if created_ms < oldest_ms or table not in self.context.tables:
                store.remove(hkey, data)
                stats.dropped_expired += 1
                continue
            by_table.setdefault(table, []).append((hkey, key, row_bytes))
        for table, items in by_table.items():
            rows = tuple((key, row_bytes) for _, key, row_bytes in items)
            with trio.fail_after(RPC_TIMEOUT_S):
                await self.context.peers[peer].call(APPLY, ApplyRows(table, rows).to_wire())
            for hkey, _, row_bytes in items:
                data_now = store.storage.read_raw(HINTS_DB, hkey)
                # A newer hint for the key may have replaced the one sent: keep it.
                if data_now is not None and _hint_carries(data_now, row_bytes):
                    store.remove(hkey, data_now)
            stats.replayed += len(items)
        return len(batch)


def _hint_carries(data: bytes, row_bytes: bytes) -> bool:
    try:
        return unpack_hint(data)[1] == row_bytes
    except CorruptRow:
        return True  # unreadable: drop it
