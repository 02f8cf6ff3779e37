"""Anti-entropy and purges.

Every `anti_entropy_interval_s` a node compares, with each peer and for each
table, DIGEST_BUCKETS bucket digests per shared partition (see
`kvsvr.protocol.catchup`). For the buckets that differ it asks the peer for
(key, version) pairs and pulls the rows where the peer is ahead, at
`anti_entropy_rows_per_s` at most. Pull only: each node fetches what it
lacks, so the pair converges after both passes. A pulled strong row with a
proposal above anything this replica knows is settled by a Paxos read.

The same scan purges. Expired rows: an eventual table's are deleted; a strong
table's keep their version and promise but lose the value (see `purge_row`).
An eventual table's tombstone is deleted once it is older than
`tombstone_grace_s` (longer than the hint lifetime) and every other replica
holds it or nothing for the key, so no replica or late hint can bring the
deleted value back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from kvsvr.errors import CorruptRow, KvsvrError
from kvsvr.keys import decode_key
from kvsvr.node.catchup.context import (
    RPC_TIMEOUT_S,
    SCAN_ROWS_PER_S,
    Collaborators,
    apply_rows,
    local_page,
)
from kvsvr.protocol.catchup import (
    DIGEST_BUCKETS,
    bucket_of,
    is_dead,
    newest_version,
    purge_row,
    row_hash,
    tombstone_purgeable,
)
from kvsvr.protocol.catchup_messages import (
    DIGEST,
    KEYS,
    KEYS_PAGE_MAX,
    ROWS,
    ROWS_PER_REQUEST_MAX,
    DigestReply,
    DigestRequest,
    KeysReply,
    KeysRequest,
    RowsReply,
    RowsRequest,
)
from kvsvr.protocol.placement import partition_of
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import decode_row, encode_row

log = logging.getLogger("kvsvr.replication")

DIGEST_CACHE_S: Final = 2.0  # a peer's digest request within this reuses the last scan
TOMBSTONES_PER_PASS_MAX: Final = 100_000
FIRST_PASS_AFTER_S: Final = 1.0  # after start: catch up on what hints did not cover
DIGEST_TIMEOUT_S: Final = 120.0  # a peer may have to scan its table first


@dataclass
class AntiEntropyStats:
    passes: int = 0
    buckets_differing: int = 0
    rows_pulled: int = 0
    keys_settled: int = 0
    rows_purged: int = 0
    tombstones_purged: int = 0
    failures: int = 0
    # partition -> peer index -> wall time of the last completed comparison
    last_pass: dict[int, dict[int, float]] = field(default_factory=dict)


class AntiEntropy:
    """This node's passes over its tables, and its answers to its peers' passes."""

    def __init__(self, context: Collaborators, is_up: Callable[[int], bool]) -> None:
        self.context = context
        self.storage = context.storage
        self.is_up = is_up
        self.me = context.me.index
        self.partitions = context.config.partitions
        self.replica_sets = context.replica_sets
        self.stats = AntiEntropyStats()
        self._digest_cache: dict[str, tuple[float, dict[int, list[int]]]] = {}
        self._tombstones: dict[str, list[tuple[bytes, int]]] = {}
        # Peer index -> the partitions both of us hold.
        self.shared: dict[int, list[int]] = {
            peer.index: [
                p for p, s in enumerate(self.replica_sets) if self.me in s and peer.index in s
            ]
            for peer in context.config.nodes
            if peer.index != self.me
        }

    def _partition(self, table: str, key: bytes) -> int:
        return partition_of(table, decode_key(key)[0], self.partitions)

    # ------------------------------------------------------------ passes

    async def run(self) -> None:
        await trio.sleep(FIRST_PASS_AFTER_S)
        while True:
            started = trio.current_time()
            await self.run_pass()
            await trio.sleep_until(started + self.context.config.anti_entropy_interval_s)

    async def run_pass(self) -> None:
        tables = self.context.config.tables
        self.stats.passes += 1
        self._digest_cache.clear()
        for table in tables:
            try:
                await self.digests(table.name, purge=True)
            except KvsvrError as error:
                log.warning("anti-entropy scan of %s failed: %s", table.name, error)
        for peer, shared in self.shared.items():
            if not shared or not self.is_up(peer):
                continue
            try:
                for table in tables:
                    await self._compare_with(peer, table.name, shared)
                wall = self.context.clock.wall_s()
                for partition in shared:
                    self.stats.last_pass.setdefault(partition, {})[peer] = wall
            except (KvsvrError, trio.TooSlowError) as error:
                self.stats.failures += 1
                log.info("anti-entropy with %d stopped: %s", peer, error)
        for table in tables:
            if table.consistency == "eventual":
                try:
                    await self._purge_tombstones(table.name)
                except (KvsvrError, trio.TooSlowError) as error:
                    log.info("tombstone purge in %s paused: %s", table.name, error)

    async def _compare_with(self, peer: int, table: str, shared: list[int]) -> None:
        mine = await self.digests(table)
        link = self.context.peers[peer]
        with trio.fail_after(DIGEST_TIMEOUT_S):
            raw = await link.call(DIGEST, DigestRequest(table, self.me).to_wire())
        theirs = DigestReply.from_wire(raw).digests
        empty = [0] * DIGEST_BUCKETS
        differing: list[tuple[int, int]] = []
        for p in shared:
            ours, other = mine.get(p, empty), theirs.get(p, empty)
            differing += [(p, b) for b in range(DIGEST_BUCKETS) if ours[b] != other[b]]
        if not differing:
            return
        self.stats.buckets_differing += len(differing)
        start = b""
        eventual = self.context.eventual(table)
        while True:
            request = KeysRequest(table, self.me, tuple(differing), start)
            with trio.fail_after(DIGEST_TIMEOUT_S):
                reply = KeysReply.from_wire(await link.call(KEYS, request.to_wire()))
            wanted: list[bytes] = []
            for key, version in reply.pairs:
                try:
                    local = self.storage.read_row(table, key)
                except CorruptRow:
                    continue  # the corrupt-row repair owns it
                if version > (0 if local is None else newest_version(local)):
                    wanted.append(key)
            for at in range(0, len(wanted), ROWS_PER_REQUEST_MAX):
                chunk = tuple(wanted[at : at + ROWS_PER_REQUEST_MAX])
                with trio.fail_after(RPC_TIMEOUT_S):
                    raw = await link.call(ROWS, RowsRequest(table, chunk).to_wire())
                rows = RowsReply.from_wire(raw, len(chunk)).rows
                learned = [
                    (key, row) for key, row in zip(chunk, rows, strict=True) if row is not None
                ]
                await apply_rows(self.context, table, learned, eventual=eventual)
                self.stats.rows_pulled += len(learned)
                if not eventual:
                    await self._settle_in_flight(table, learned)
                await trio.sleep(len(chunk) / self.context.config.anti_entropy_rows_per_s)
            if not reply.more or not reply.pairs:
                return
            start = reply.pairs[-1][0] + b"\x00"

    async def _settle_in_flight(self, table: str, learned: list[tuple[bytes, bytes]]) -> None:
        """Keys where the peer holds a proposal above anything we know: only a
        Paxos read can tell whether it was chosen; it settles the proposal on a
        majority and repairs this replica (it answers its own node first)."""
        for key, raw in learned:
            row = decode_row(raw)
            if row.accepted is None:
                continue
            local = self.storage.read_row(table, key) or EMPTY_ROW
            if row.accepted.version <= local.version:
                continue
            try:
                await self.context.settle(table, key)
                self.stats.keys_settled += 1
            except KvsvrError as error:
                log.info("anti-entropy could not settle %r yet: %s", key, error)

    async def digests(self, table: str, *, purge: bool = False) -> dict[int, list[int]]:
        """Bucket digests of every partition of `table` this node holds, from one
        scan taken in steps of SCAN_PAGE_ROWS at SCAN_ROWS_PER_S at most, so a
        pass over a large table costs a bounded share of a core. With `purge`
        (this node's own pass), expired rows found on the way are purged. A
        peer asking for digests gets those of our last scan while it is
        younger than DIGEST_CACHE_S."""
        clock = self.context.clock
        cached = self._digest_cache.get(table)
        # A digest older than a moment differs from a fresh one under any write
        # load, and every difference costs a key listing: peers get fresh ones.
        if cached is not None and clock.monotonic() - cached[0] < DIGEST_CACHE_S:
            return cached[1]
        eventual = self.context.eventual(table)
        grace_ms = self.context.grace_ms()
        result: dict[int, list[int]] = {}
        candidates: list[tuple[bytes, int]] = []
        start: bytes | None = b""
        while start is not None:
            page, start = local_page(self.storage, table, start)
            now = clock.wall_ms()
            for key, raw in page:
                try:
                    row = decode_row(raw)
                except CorruptRow:
                    continue
                if purge and eventual and row.value is None and is_dead(row, True, now, grace_ms):
                    candidates.append((key, row.version))  # a tombstone past its grace
                if purge:
                    outcome = purge_row(row, eventual, now)
                    if outcome is not False:
                        assert outcome is None or isinstance(outcome, Row)
                        # Read and rewrite with no checkpoint between: no message races it.
                        self.storage.stage(table, key, outcome, lazy=True)
                        self.stats.rows_purged += 1
                        if outcome is None:
                            continue
                        row = outcome
                if row.version == 0 or is_dead(row, eventual, now, grace_ms):
                    continue
                buckets = result.get(partition := self._partition(table, key))
                if buckets is None:
                    buckets = result[partition] = [0] * DIGEST_BUCKETS
                buckets[bucket_of(key)] ^= row_hash(key, newest_version(row))
            if start is not None:
                await trio.sleep(len(page) / SCAN_ROWS_PER_S)
        self._digest_cache[table] = (clock.monotonic(), result)
        if purge:
            self._tombstones[table] = candidates[:TOMBSTONES_PER_PASS_MAX]
        return result

    async def _purge_tombstones(self, table: str) -> None:
        """Delete the tombstones past their grace that the last scan found,
        once every other replica holds the same tombstone or nothing."""
        candidates = self._tombstones.pop(table, [])
        for at in range(0, len(candidates), ROWS_PER_REQUEST_MAX):
            chunk = candidates[at : at + ROWS_PER_REQUEST_MAX]
            by_peer: dict[int, list[bytes]] = {}
            for key, _ in chunk:
                for peer in self.replica_sets[self._partition(table, key)]:
                    if peer != self.me:
                        by_peer.setdefault(peer, []).append(key)
            versions = dict(chunk)
            answered: dict[bytes, int] = {}
            keep: set[bytes] = set()
            for peer, keys in by_peer.items():
                request = RowsRequest(table, tuple(keys))
                with trio.fail_after(RPC_TIMEOUT_S):
                    raw = await self.context.peers[peer].call(ROWS, request.to_wire())
                rows = RowsReply.from_wire(raw, len(keys)).rows
                for key, row in zip(keys, rows, strict=True):
                    answered[key] = answered.get(key, 0) + 1
                    other = EMPTY_ROW if row is None else decode_row(row)
                    if not tombstone_purgeable(versions[key], other):
                        keep.add(key)
            for key, version in chunk:
                replicas = self.replica_sets[self._partition(table, key)]
                if key in keep or answered.get(key, 0) < len(replicas) - 1:
                    continue
                current = self.storage.read_row(table, key)
                if current is not None and current.version == version and current.value is None:
                    self.storage.stage(table, key, None, lazy=True)
                    self.stats.tombstones_purged += 1

    # ------------------------------------------------------------ serving peers

    async def serve_digests(self, request: DigestRequest) -> DigestReply:
        mine = await self.digests(request.table)
        shared = self.shared.get(request.requester, [])
        return DigestReply({p: mine[p] for p in shared if p in mine})

    async def serve_keys(self, request: KeysRequest) -> KeysReply:
        table = request.table
        wanted = set(request.buckets)
        shared = set(self.shared.get(request.requester, []))
        eventual = self.context.eventual(table)
        grace_ms = self.context.grace_ms()
        pairs: list[tuple[bytes, int]] = []
        start: bytes | None = request.start
        while start is not None and len(pairs) < KEYS_PAGE_MAX:
            page, start = local_page(self.storage, table, start)
            now = self.context.clock.wall_ms()
            for key, raw in page:
                partition = self._partition(table, key)
                if partition not in shared or (partition, bucket_of(key)) not in wanted:
                    continue
                try:
                    row = decode_row(raw)
                except CorruptRow:
                    continue
                if row.version == 0 or is_dead(row, eventual, now, grace_ms):
                    continue
                pairs.append((key, newest_version(row)))
            if start is not None:
                await trio.sleep(len(page) / SCAN_ROWS_PER_S)
        return KeysReply(tuple(pairs), start is not None)

    def serve_rows(self, request: RowsRequest) -> RowsReply:
        rows = (self.context.read_row(request.table, key) for key in request.keys)
        return RowsReply(tuple(None if row is None else encode_row(row) for row in rows))

    def status(self) -> dict[str, Any]:
        wall = self.context.clock.wall_s()
        last: dict[str, float | None] = {}
        for partition, replicas in enumerate(self.replica_sets):
            if self.me not in replicas:
                continue
            peers = self.stats.last_pass.get(partition, {})
            times = [peers.get(p) for p in replicas if p != self.me]
            known = [t for t in times if t is not None]
            last[str(partition)] = (
                round(wall - min(known), 1) if known and len(known) == len(times) else None
            )
        stats = self.stats
        return {
            "passes": stats.passes,
            "buckets_differing": stats.buckets_differing,
            "rows_pulled": stats.rows_pulled,
            "keys_settled": stats.keys_settled,
            "rows_purged": stats.rows_purged,
            "tombstones_purged": stats.tombstones_purged,
            "failures": stats.failures,
            "last_pass_s_ago": last,
        }
