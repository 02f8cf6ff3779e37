"""Catching up: hinted handoff, anti-entropy, rebuilding a wiped replica, purges.

A write waits for a quorum; the replicas that missed it catch up here, in the
background, each mechanism bounded:

- **Failure detector.** Every node pings each peer every HEARTBEAT_S and keeps
  the recent inter-arrival times; a peer is *down* when a ping failed or when
  the silence since its last answer is improbable (phi accrual, as Cassandra
  and Akka do, with an exponential model of the arrivals).
- **Hinted handoff.** When a coordinator finishes a write while a replica of
  the key is down, it keeps a *hint* in its LMDB `hints` sub-database: the
  chosen row, keyed by (target, table, key), so a hot key keeps one hint, not
  one per write. Hints are bounded per target in count and bytes and live at
  most `hint_ttl_s`; beyond either bound a hint is dropped and counted, and
  anti-entropy brings that row instead (hint storms bounded, nothing lost).
  When the detector sees the target back, its hints are replayed in batches
  at `hint_replay_rows_per_s` at most. Replay is idempotent: a replica keeps a
  hinted row only when its version is higher than what it holds.
- **Anti-entropy.** Every `anti_entropy_interval_s` a node compares, with each
  peer and for each table, 16 bucket digests per shared partition: the xor
  of crc32c(key, version) of the live rows in the bucket. For the buckets that
  differ it asks the peer for (key, version) pairs and pulls the rows where
  the peer is ahead, at `anti_entropy_rows_per_s` at most. Pull only: each
  node fetches what it lacks, so the pair converges after both passes.
- **Start and rebuild.** How a node starts is decided by
  `kvsvr.protocol.lifecycle` (identity in `meta`, "new" or "existing",
  founding or replacing). A replacement must not vote on any strong key
  until its rows are rebuilt, merging promises and proposals as well as
  values from enough *ready* replicas of each partition it holds
  (`replica.peers_needed_to_rebuild`: a majority of the partition), or it
  could forget a promise it made and let two values be chosen. Until then it
  refuses Paxos messages on strong tables (the other replicas still form a
  majority). It never waits on a peer that lost its data too: when too few
  replicas of a partition kept theirs, it reports "needs operator" and waits
  for `kvsvr recover --accept-data-loss`.
- **Purges.** Expired rows: an eventual table's are deleted; a strong table's
  keep their version and promise but lose the value (the key's version must
  never go back: see `purge_row`). An eventual table's tombstone is deleted
  once it is older than `tombstone_grace_s` (longer than the hint lifetime)
  and every other replica holds it or nothing for the key, so no replica or
  late hint can bring the deleted value back.

All learned rows travel as stored rows (the codec, crc included) and are
applied as *chosen* values: for a strong table as a commit with its value
(`replica.apply_commit`), for an eventual table by last-writer-wins. Both only
ever raise a key's version, which is what makes every path idempotent.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Final

import crc32c
import msgpack
import trio

from kvsvr.errors import CorruptRow, FrameError, InvalidRequest, KvsvrError, Unavailable
from kvsvr.keys import decode_key
from kvsvr.protocol import lifecycle, replica
from kvsvr.protocol.eventual import lww_apply, stamp_ms
from kvsvr.protocol.lifecycle import (
    NEEDS_OPERATOR,
    READY,
    REBUILDING,
    STARTING,
    WAITING_FOR_PEERS,
    Hello,
    HelloReply,
    Identity,
)
from kvsvr.protocol.placement import partition_of
from kvsvr.protocol.state import EMPTY_ROW, ZERO_BALLOT, Row
from kvsvr.storage import Storage, decode_row, encode_row
from kvsvr.storage.codec import crc_ok
from kvsvr.storage.engine import HINTS_DB

if TYPE_CHECKING:
    from kvsvr.node.server import Node

log = logging.getLogger("kvsvr.replication")

HEARTBEAT_S: Final = 0.5
HEARTBEAT_DOWN_S: Final = 0.1
HEARTBEAT_TIMEOUT_S: Final = 2.0
# phi = -log10(P(a silence this long)); 4 means a 1-in-10,000 silence. With
# 0.5 s pings that is about 4.6 s of silence; a refused connection is faster.
PHI_DOWN: Final = 4.0
ARRIVALS_KEPT: Final = 100
JOIN_WAIT_S: Final = 0.8  # below the coordinators' round timeout (1 s)
# A node deciding how to start, or waiting for rebuild sources, looks again
# when a peer's hello changes what it knows, and at least this often.
DECIDE_AGAIN_S: Final = 0.25
MEMBERS_MAX: Final = 256  # node ids remembered as members: more than a cluster has

HINT_BATCH_ROWS: Final = 512
HINT_REPLAY_IDLE_S: Final = 1.0  # look for new hints of an up target this often
HINT_KEY_TABLE_BYTES_MAX: Final = 255

DIGEST_BUCKETS: Final = 16
DIGEST_CACHE_S: Final = 2.0  # a peer's digest request within this reuses the last scan
SCAN_PAGE_ROWS: Final = 1000  # rows per step of a local scan (then other tasks run)
# ... and at most about this many bytes: a page is held in memory whole, and
# 1000 rows of 64 KiB values would be 64 MiB (issue #7 bounds a node's RSS).
SCAN_PAGE_BYTES: Final = 4 << 20
# Rows per second a digest scan reads: about a tenth of a core for decoding and
# hashing, so 1,000,000 rows take 20 s per pass.
SCAN_ROWS_PER_S: Final = 50_000
TOMBSTONES_PER_PASS_MAX: Final = 100_000
KEYS_PAGE_MAX: Final = 20_000  # (key, version) pairs per answer
ROWS_PER_REQUEST_MAX: Final = 1000
AE_FIRST_PASS_AFTER_S: Final = 1.0  # after start: catch up on what hints did not cover
REBUILD_PAGE_ROWS: Final = 4000
REBUILD_RETRY_S: Final = 0.5
RPC_TIMEOUT_S: Final = 10.0
DIGEST_TIMEOUT_S: Final = 120.0  # a peer may have to scan its table first

# `meta` keys. The identity (cluster id, node id) is written before the node
# first votes; `rebuild_pending` from the start of a replacement's rebuild to
# its end, so that a rebuild cut short is taken up again, never mistaken for
# a directory that holds its data. `initialized` is what directories made
# before cluster ids carry.
IDENTITY_KEY: Final = b"identity"
REBUILD_PENDING_KEY: Final = b"rebuild_pending"
MEMBERS_KEY: Final = b"members"
OLD_MARKER_KEY: Final = b"initialized"

# RPC methods this module answers (the node's handler dispatches them here).
PING: Final = "ping"
APPLY: Final = "apply"
DIGEST: Final = "ae_digest"
KEYS: Final = "ae_keys"
ROWS: Final = "ae_rows"  # rows by key
PAGE: Final = "ae_page"  # rows by key range: rebuilding
METHODS: Final = frozenset({PING, APPLY, DIGEST, KEYS, ROWS, PAGE})

_VERSION = struct.Struct(">Q")


def _page_full(page: list[tuple[bytes, bytes]]) -> bool:
    """Whether a local scan page ended at its row or byte limit (more may
    follow) rather than at the end of the table."""
    return len(page) >= SCAN_PAGE_ROWS or sum(len(k) + len(r) for k, r in page) >= SCAN_PAGE_BYTES


def _local_page(
    storage: Storage, table: str, start: bytes
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """One step of a local table scan: the stored rows from `start` (bounded in
    rows and bytes) and where the next step starts (None: the table ended)."""
    page = storage.scan_table_raw(table, start, None, SCAN_PAGE_ROWS, bytes_max=SCAN_PAGE_BYTES)
    return page, (page[-1][0] + b"\x00" if _page_full(page) else None)


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------- pure parts


class PhiDetector:
    """Phi accrual failure detection for one peer (clock passed in)."""

    def __init__(self) -> None:
        self.intervals: deque[float] = deque(maxlen=ARRIVALS_KEPT)
        self.last_arrival: float | None = None
        self.failed = True  # until the first answer: unknown counts as down
        self.transitions_up = 0
        self.mean = HEARTBEAT_S  # of the intervals kept (updated on each arrival)

    def arrived(self, now: float) -> bool:
        """Record an answer. True when the peer was down and is now up."""
        if self.last_arrival is not None:
            self.intervals.append(now - self.last_arrival)
            self.mean = max(sum(self.intervals) / len(self.intervals), HEARTBEAT_S / 2)
        self.last_arrival = now
        was_down = self.failed
        self.failed = False
        if was_down:
            self.transitions_up += 1
        return was_down

    def fail(self) -> None:
        self.failed = True

    def phi(self, now: float) -> float:
        if self.last_arrival is None:
            return math.inf
        return (now - self.last_arrival) / self.mean * math.log10(math.e)

    def is_up(self, now: float) -> bool:
        return not self.failed and self.phi(now) < PHI_DOWN


def newest_version(row: Row) -> int:
    """The version a row knows of: chosen, or proposed above it. Digests use
    it, so that a replica that has not even seen a proposal the others
    accepted (the last write of a key is committed lazily, on the next write
    or read) differs from them and gets the key settled."""
    return row.version if row.accepted is None else max(row.version, row.accepted.version)


def row_hash(key: bytes, version: int) -> int:
    # Not crc32c: a crc is linear, so crc(k1, v) ^ crc(k1, v') equals
    # crc(k2, v) ^ crc(k2, v') and two keys a version apart in one bucket would
    # cancel out of the xor. A cryptographic hash has no such structure.
    return int.from_bytes(blake2b(key + _VERSION.pack(version), digest_size=8).digest(), "big")


def bucket_of(key: bytes) -> int:
    return crc32c.crc32c(key) % DIGEST_BUCKETS


def is_dead(row: Row, eventual: bool, now: int, grace_ms: int) -> bool:
    """A row no replica needs to copy: an eventual row that expired, or an
    eventual tombstone past its grace. Left out of digests, so replicas that
    purged it and replicas that have not yet agree."""
    if not eventual:
        return False
    if row.expires_at_ms is not None and row.expires_at_ms <= now:
        return True
    return row.value is None and row.version > 0 and stamp_ms(row.version) + grace_ms < now


def purge_row(row: Row, eventual: bool, now: int) -> Row | bool | None:
    """What a background purge does to one row: False, nothing; None, delete
    it; a Row, rewrite it. Only expiry is decided here (tombstones need the
    other replicas' word, see `Replication._purge_tombstones`).

    A strong row that expired keeps its version, promise and any proposal and
    drops only the value: deleting the row would let the key's version start
    again from 0 on this replica while others remember the higher one, and a
    new write chosen at a lower version would then lose to the old version on
    every read that met such a replica. Expiry is part of the chosen value, so
    every replica drops the same value."""
    if row.expires_at_ms is None or row.expires_at_ms > now:
        return False
    if eventual:
        return None
    if row.value is None:
        return False
    return Row(
        version=row.version,
        value=None,
        expires_at_ms=None,
        promised=row.promised,
        accepted=row.accepted,
        hlc=row.hlc,
        op_id=row.op_id,
        recent_ops=row.recent_ops,
    )


def learn(current: Row, incoming: Row, eventual: bool) -> Row | None:
    """Fold a chosen row from elsewhere into ours; None when ours is as new."""
    if incoming.version <= current.version:
        return None
    if eventual:
        return lww_apply(current, incoming)
    return replica.apply_commit(
        current,
        incoming.version,
        ZERO_BALLOT,
        True,
        incoming.value,
        incoming.expires_at_ms,
        incoming.op_id,
    )


def hint_key(target: int, table: str, key: bytes) -> bytes:
    name = table.encode()
    assert 0 < target < 256 and len(name) <= HINT_KEY_TABLE_BYTES_MAX
    return bytes((target, len(name))) + name + key


def parse_hint_key(raw: bytes) -> tuple[int, str, bytes]:
    if len(raw) < 2 or len(raw) < 2 + raw[1]:
        raise CorruptRow(f"bad hint key {raw!r}")
    return raw[0], raw[2 : 2 + raw[1]].decode(), raw[2 + raw[1] :]


# --------------------------------------------------------------------- hints


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

    def __init__(self, node: Node) -> None:
        self.node = node
        self.storage = node.storage
        self.targets: dict[int, TargetHints] = {
            n.index: TargetHints() for n in node.config.nodes if n.index != node.me.index
        }
        self.bytes_max = node.config.hint_bytes_max
        self.count_max = node.config.hints_max
        self.ttl_ms = int(node.config.hint_ttl_s * 1000)
        for target, stats in self.targets.items():
            start = bytes((target,))
            while True:
                page = self.storage.scan_raw(HINTS_DB, start, bytes((target + 1,)), 10_000)
                for hkey, data in page:
                    stats.count += 1
                    stats.bytes += len(hkey) + len(data)
                if len(page) < 10_000:
                    break
                start = page[-1][0] + b"\x00"

    def add(self, target: int, table: str, key: bytes, row: Row) -> None:
        stats = self.targets[target]
        hkey = hint_key(target, table, key)
        data: bytes = msgpack.packb([now_ms(), encode_row(row)])
        old = self.storage.read_raw(HINTS_DB, hkey)
        if old is not None:
            try:
                if _hint_row(old).version >= row.version:
                    return
            except (CorruptRow, ValueError):
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


def _hint_row(data: bytes) -> Row:
    fields = msgpack.unpackb(data, raw=False)
    if not isinstance(fields, list) or len(fields) != 2 or not isinstance(fields[1], bytes):
        raise CorruptRow("bad hint")
    return decode_row(fields[1])


# --------------------------------------------------------------------- the service


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


@dataclass
class RebuildStats:
    rows_rebuilt: int = 0
    tables_done: int = 0
    tables_total: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    waiting_for: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


class Replication:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.storage = node.storage
        self.config = node.config
        self.me = node.me.index
        self.partitions = node.config.partitions
        self.replica_sets = node.replica_sets
        self.detectors = {n.index: PhiDetector() for n in node.config.nodes if n.index != self.me}
        self.hints = HintStore(node)
        self.replay_wakeups = {index: trio.Event() for index in self.detectors}
        self.ae = AntiEntropyStats()
        self.rebuild = RebuildStats()
        self.names = {n.index: n.id for n in node.config.nodes}
        self.indexes = {n.id: n.index for n in node.config.nodes}
        assert node.config.cluster_id is not None, "a node needs the cluster id"
        self.cluster_id: str = node.config.cluster_id
        # What each peer said last: its hello reply (state, whether it knows us).
        self.peer_replies: dict[int, HelloReply] = {}
        self._foreign_logged: set[str] = set()
        self._changed = trio.Event()  # a peer's reply changed what we know
        # Set (and replaced) when this node becomes ready: every heartbeat says
        # hello at once, so that peers record it as a member within a round
        # trip of its first vote, not a beat later (see `lifecycle.decide_new`).
        self._announce = trio.Event()
        self.members: set[str] = _read_members(self.storage.read_meta(MEMBERS_KEY))
        # Set by `kvsvr recover --accept-data-loss`; what the rebuild then lost.
        self.accept_data_loss = False
        self.lost: dict[int, tuple[int, ...]] = {}
        self.loss_report: dict[str, Any] | None = None
        # Strong tables refuse votes until the node knows it did not lose data.
        self.state = STARTING
        self.ready = False
        self.ready_event = trio.Event()
        self._digest_cache: dict[str, tuple[float, dict[int, list[int]]]] = {}
        self._tombstones: dict[str, list[tuple[bytes, int]]] = {}
        self._shared: dict[int, list[int]] = {
            peer: [p for p, s in enumerate(self.replica_sets) if self.me in s and peer in s]
            for peer in self.detectors
        }
        stored_raw = self.storage.read_meta(IDENTITY_KEY)
        stored = None if stored_raw is None else Identity.from_bytes(stored_raw)
        self.start = lifecycle.decide_start(
            stored,
            self.storage.read_meta(OLD_MARKER_KEY) is not None or self._has_rows(),
            self.cluster_id,
            node.me.id,
            node.initial_state,
            rebuild_pending=self.storage.read_meta(REBUILD_PENDING_KEY) is not None,
        )
        if self.start.kind == "refuse":
            raise lifecycle.WrongCluster(self.start.reason)
        if self.start.kind in ("replacement", "ask_peers"):
            log.info("data directory: %s", self.start.reason)
        if self.start.kind == "adopt":
            self.storage.stage_meta(IDENTITY_KEY, self._identity().to_bytes())
        if self.start.kind in ("ready", "adopt"):
            self._become_ready(self.start.reason)

    # ------------------------------------------------------------ queries

    def is_up(self, peer: int) -> bool:
        return self.detectors[peer].is_up(time.monotonic())

    async def wait_to_vote(self) -> None:
        """Return when this replica may vote on strong keys; raise Unavailable
        if it may not. A node still deciding how to start (asking its peers
        whether it founds the cluster, which takes a moment after a fresh
        start) holds the message up to JOIN_WAIT_S rather than refusing it; a
        rebuilding one refuses at once."""
        if self.ready:
            return
        if self.state in (STARTING, WAITING_FOR_PEERS):
            with trio.move_on_after(JOIN_WAIT_S):
                await self.ready_event.wait()
            if self.ready:
                return
        raise Unavailable(f"this replica is {self.state} and does not vote yet")

    def _eventual(self, table: str) -> bool:
        return self.node.tables[table].consistency == "eventual"

    def _has_rows(self) -> bool:
        return any(self.storage.scan_table_raw(t.name, b"", None, 1) for t in self.config.tables)

    def _identity(self) -> Identity:
        return Identity(self.cluster_id, self.names[self.me])

    def _become_ready(self, why: str) -> None:
        self.ready = True
        self.ready_event.set()
        self.state = READY
        self._announce.set()
        self._announce = trio.Event()
        log.info("replica ready (%s)", why)

    # ------------------------------------------------------------ write hooks

    def hint_after_write(
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
        now = time.monotonic()
        for target in replicas:
            if target == self.me:
                continue
            # The detector needs a heartbeat or two to notice; a connection the
            # peer's kernel closed (a crashed process) says so at once.
            if not self.detectors[target].is_up(now) or not self.node.peers[target].up:
                row = Row(version=version, value=value, expires_at_ms=expires_at_ms)
                self.hints.add(target, table, key, row)

    def hint(self, target: int, table: str, key: bytes, row: Row) -> None:
        if target != self.me:
            self.hints.add(target, table, key, row)

    # ------------------------------------------------------------ background tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self.detectors:
                nursery.start_soon(self._heartbeat, peer)
                nursery.start_soon(self._replay_loop, peer)
            task_status.started()
            if not self.ready:
                await self._bootstrap()
            nursery.start_soon(self._anti_entropy_loop)

    async def _heartbeat(self, peer: int) -> None:
        """Say hello to the peer every beat: who we are and our state; its
        reply says the same of it, and whether it knows us as a member."""
        detector = self.detectors[peer]
        while True:
            started = trio.current_time()
            try:
                hello = Hello(self.cluster_id, self.names[self.me], self.state)
                with trio.fail_after(HEARTBEAT_TIMEOUT_S):
                    raw = await self.node.peers[peer].call(PING, hello.to_wire())
                reply = HelloReply.from_wire(raw)
                if not self._heard(peer, reply):
                    raise FrameError(f"peer {self.names[peer]} is of another cluster")
                if detector.arrived(time.monotonic()):
                    log.info("peer %d is up", peer)
                    self.replay_wakeups[peer].set()
            except (KvsvrError, trio.TooSlowError):
                if not detector.failed:
                    log.info("peer %d is down", peer)
                detector.fail()
            # A peer that is down is asked again sooner, so that its link (and
            # the first rounds after it comes back) do not wait a whole beat.
            beat = HEARTBEAT_S if not detector.failed else HEARTBEAT_DOWN_S
            with trio.move_on_at(started + beat):
                await self._announce.wait()

    def _heard(self, peer: int, reply: HelloReply) -> bool:
        """Take in a peer's hello reply; False if it is of another cluster."""
        if reply.cluster_id != self.cluster_id:
            self._log_foreign(self.names[peer], reply.cluster_id)
        elif reply.state == READY:
            self._remember_member(self.names[peer])
        previous = self.peer_replies.get(peer)
        self.peer_replies[peer] = reply
        if previous != reply:
            self._changed.set()
        return reply.cluster_id == self.cluster_id

    def _log_foreign(self, peer: str, cluster_id: str) -> None:
        if peer not in self._foreign_logged:
            self._foreign_logged.add(peer)
            log.error(
                "peer %s belongs to cluster %s, not %s: it is not talked to",
                peer,
                cluster_id,
                self.cluster_id,
            )

    def _remember_member(self, node_id: str) -> None:
        """A peer seen voting is a member: should it come back empty, it was
        wiped and must rebuild (see `lifecycle.decide_new`)."""
        if node_id in self.members or len(self.members) >= MEMBERS_MAX:
            return
        self.members.add(node_id)
        self.storage.stage_meta(MEMBERS_KEY, msgpack.packb(sorted(self.members)))

    def _answer_hello(self, body: object) -> list[Any]:
        hello = Hello.from_wire(body)
        if hello.node_id not in self.indexes or hello.node_id == self.names[self.me]:
            raise InvalidRequest(f"hello from unknown node {hello.node_id!r}")
        if hello.cluster_id != self.cluster_id:
            self._log_foreign(hello.node_id, hello.cluster_id)
        elif hello.state == READY:
            self._remember_member(hello.node_id)
        knows = hello.node_id in self.members and hello.cluster_id == self.cluster_id
        return HelloReply(self.cluster_id, self.state, knows).to_wire()

    async def _decide_again(self) -> None:
        """Sleep until a peer's reply changes what we know (or a while)."""
        with trio.move_on_after(DECIDE_AGAIN_S):
            await self._changed.wait()
        self._changed = trio.Event()

    async def _replay_loop(self, peer: int) -> None:
        stats = self.hints.targets[peer]
        while True:
            with trio.move_on_after(HINT_REPLAY_IDLE_S):
                await self.replay_wakeups[peer].wait()
            self.replay_wakeups[peer] = trio.Event()
            while stats.count > 0 and self.is_up(peer) and self.ready:
                try:
                    replayed = await self._replay_batch(peer)
                except (KvsvrError, trio.TooSlowError) as error:
                    log.info("hint replay to %d paused: %s", peer, error)
                    break
                if replayed == 0:
                    break
                await trio.sleep(replayed / self.config.hint_replay_rows_per_s)

    async def _replay_batch(self, peer: int) -> int:
        stats = self.hints.targets[peer]
        batch = self.hints.batch(peer, HINT_BATCH_ROWS)
        oldest_ms = now_ms() - self.hints.ttl_ms
        by_table: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
        for hkey, data in batch:
            try:
                _, table, key = parse_hint_key(hkey)
                created_ms, row_bytes = msgpack.unpackb(data, raw=False)
            except (CorruptRow, ValueError, TypeError, UnicodeDecodeError):
                log.error("dropping an unreadable hint %r", hkey)
                self.hints.remove(hkey, data)
                continue
            if created_ms < oldest_ms or table not in self.node.tables:
                self.hints.remove(hkey, data)
                stats.dropped_expired += 1
                continue
            by_table.setdefault(table, []).append((hkey, key, row_bytes))
        for table, items in by_table.items():
            with trio.fail_after(RPC_TIMEOUT_S):
                await self.node.peers[peer].call(
                    APPLY, [table, [[key, row_bytes] for _, key, row_bytes in items]]
                )
            for hkey, _, row_bytes in items:
                data_now = self.storage.read_raw(HINTS_DB, hkey)
                # A newer hint for the key may have replaced the one sent: keep it.
                if data_now is not None and _hint_carries(data_now, row_bytes):
                    self.hints.remove(hkey, data_now)
            stats.replayed += len(items)
        return len(batch)

    # ------------------------------------------------------------ starting / rebuild

    async def _bootstrap(self) -> None:
        """Found the cluster, or rebuild this replica before it votes (see
        `kvsvr.protocol.lifecycle`)."""
        if self.start.kind == "ask_peers":
            self.state = WAITING_FOR_PEERS
            started = trio.current_time()
            peers = [self.names[p] for p in self.detectors]
            while True:
                replies = {
                    self.names[p]: r
                    for p, r in self.peer_replies.items()
                    if self.is_up(p) or r.cluster_id != self.cluster_id
                }
                decision = lifecycle.decide_new(
                    replies, peers, self.cluster_id, trio.current_time() - started
                )
                if decision.kind == "refuse":
                    log.error("refusing to start: %s", decision.reason)
                    raise lifecycle.WrongCluster(decision.reason)
                if decision.kind == "found":
                    await self.storage.wait_durable(
                        self.storage.stage_meta(IDENTITY_KEY, self._identity().to_bytes())
                    )
                    self._become_ready(decision.reason)
                    return
                if decision.kind == "replacement":
                    log.warning("%s", decision.reason)
                    break
                await self._decide_again()
        await self._rebuild_before_voting()

    async def _rebuild_before_voting(self) -> None:
        self.state = REBUILDING
        self.rebuild.started_at = time.time()
        # Pending first: a directory with the identity and no pending mark is
        # one that holds its data.
        self.storage.stage_meta(REBUILD_PENDING_KEY, b"1")
        await self.storage.wait_durable(
            self.storage.stage_meta(IDENTITY_KEY, self._identity().to_bytes())
        )
        log.warning("this replica is empty but its peers hold data: rebuilding before voting")
        while True:
            plan = lifecycle.plan_rebuild(
                self.replica_sets,
                self.me,
                {p: r.state for p, r in self.peer_replies.items() if self.is_up(p)},
                accept_data_loss=self.accept_data_loss,
            )
            self.rebuild.waiting_for = tuple(self.names[p] for p in plan.waiting_for)
            if plan.needs_operator:
                if self.state != NEEDS_OPERATOR:
                    log.error("%s", self._operator_message(plan.lost))
                self.state = NEEDS_OPERATOR
                self.lost = plan.lost
                await self._decide_again()
                continue
            self.state = REBUILDING
            if plan.sources is None:
                await self._decide_again()
                continue
            self.rebuild.sources = tuple(self.names[p] for p in sorted(plan.sources))
            try:
                await self._rebuild_all(sorted(plan.sources))
                break
            except (KvsvrError, trio.TooSlowError) as error:
                log.warning("rebuild paused (%s); retrying", error)
                await trio.sleep(REBUILD_RETRY_S)
        if self.accept_data_loss:
            self.loss_report = self._loss_report(plan.short)
            log.error("recovered with data loss accepted: %s", self.loss_report["message"])
        await self.storage.wait_durable(self.storage.stage_meta(REBUILD_PENDING_KEY, None))
        self.rebuild.finished_at = time.time()
        self.rebuild.waiting_for = ()
        self._become_ready(f"rebuilt {self.rebuild.rows_rebuilt} rows from peers")

    def _operator_message(self, lost: dict[int, tuple[int, ...]]) -> str:
        return lifecycle.needs_operator_message(
            {p: [self.names[n] for n in nodes] for p, nodes in lost.items()}
        )

    def _loss_report(self, short: dict[int, tuple[int, ...]]) -> dict[str, Any]:
        """What a recovery with the loss accepted may have lost: for each
        partition rebuilt from fewer replicas than a safe rebuild needs, the
        writes that only the replicas which lost their data had accepted."""
        lost_nodes = sorted({n for nodes in self.lost.values() for n in nodes})
        by_sources: dict[tuple[int, ...], list[int]] = {}
        for partition, sources in sorted(short.items()):
            by_sources.setdefault(sources, []).append(partition)
        parts = []
        for sources, partitions in sorted(by_sources.items()):
            ranges = lifecycle.partition_ranges(partitions)
            if sources:
                names = ", ".join(self.names[n] for n in sources)
                parts.append(f"partitions {ranges} rebuilt from {names} alone")
            else:
                parts.append(f"partitions {ranges}: every replica lost its data; they start empty")
        lost_names = ", ".join(self.names[n] for n in lost_nodes)
        if parts:
            message = (
                "; ".join(parts)
                + f". Writes acknowledged only by replicas that lost their data ({lost_names}) "
                "may be lost, and a write whose outcome was unknown may not have happened."
            )
        else:
            message = "enough replicas were ready by then: rebuilt in full, nothing lost here"
        return {
            "message": message,
            "partitions": {str(p): [self.names[n] for n in s] for p, s in short.items()},
            "lost_data": [self.names[n] for n in lost_nodes],
            "rows_rebuilt": self.rebuild.rows_rebuilt,
        }

    async def recover(self, accept_data_loss: bool) -> dict[str, Any]:
        """`kvsvr recover`: a node that needs an operator rebuilds from the
        replicas that kept their data, and says what may have been lost."""
        if not accept_data_loss:
            raise InvalidRequest("recovery may lose acknowledged writes: it needs accept_data_loss")
        if self.state != NEEDS_OPERATOR:
            await trio.lowlevel.checkpoint()
            return {"node": self.names[self.me], "recovered": False, "state": self.state}
        self.accept_data_loss = True
        self._changed.set()
        await self.ready_event.wait()
        return {
            "node": self.names[self.me],
            "recovered": True,
            "state": self.state,
            "loss": self.loss_report,
        }

    async def _rebuild_all(self, sources: list[int]) -> None:
        self.rebuild.tables_total = len(self.config.tables)
        self.rebuild.tables_done = 0
        for table in self.config.tables:
            await self._rebuild_table(table.name, sources)
            self.rebuild.tables_done += 1

    async def _rebuild_table(self, table: str, sources: list[int]) -> None:
        eventual = self._eventual(table)
        start = b""
        while True:
            pages: dict[int, tuple[list[tuple[bytes, bytes]], bool]] = {}
            async with trio.open_nursery() as nursery:
                for peer in sources:
                    nursery.start_soon(self._fetch_page, table, peer, start, pages)
            if len(pages) < len(sources):
                raise Unavailable(f"heard from {len(pages)} of {len(sources)} peers")
            boundary: bytes | None = None
            for items, more in pages.values():
                if more and items and (boundary is None or items[-1][0] < boundary):
                    boundary = items[-1][0]
            by_key: dict[bytes, list[bytes]] = {}
            for items, _ in pages.values():
                for key, raw in items:
                    if boundary is None or key <= boundary:
                        by_key.setdefault(key, []).append(raw)
            ops: list[tuple[str, bytes, Row | None]] = []
            copies: list[tuple[bytes, bytes]] = []
            for key, raws in sorted(by_key.items()):
                partition_key, _ = decode_key(key)
                partition = partition_of(table, partition_key, self.partitions)
                # Peers that hold the partition and did not send the key have no row.
                holders = sum(1 for peer in self.replica_sets[partition] if peer in pages)
                try:
                    local = self.storage.read_row(table, key)
                except CorruptRow:
                    local = None
                if local is None and len(raws) == holders and all(r == raws[0] for r in raws):
                    copies.append((key, raws[0]))  # every peer agrees: copy as stored
                    continue
                rows = [decode_row(raw) for raw in raws]
                everything = [*rows, *([EMPTY_ROW] * (holders - len(rows))), local or EMPTY_ROW]
                merged = (
                    max(everything, key=lambda r: r.version)
                    if eventual
                    else replica.merge_rows(everything)
                )
                if merged != local:
                    ops.append((table, key, merged))
            for at in range(0, len(copies), 4000):
                await self.storage.write_row_bytes(table, copies[at : at + 4000])
            for at in range(0, len(ops), 1000):
                await self.storage.write(ops[at : at + 1000])
            ops += [(table, key, None) for key, _ in copies]
            self.rebuild.rows_rebuilt += len(ops)
            if boundary is None:
                return
            start = boundary + b"\x00"

    async def _fetch_page(
        self,
        table: str,
        peer: int,
        start: bytes,
        pages: dict[int, tuple[list[tuple[bytes, bytes]], bool]],
    ) -> None:
        # A task of a nursery: an error escaping it would reach the rebuild as
        # an exception group, past its retry (a peer still rebuilding itself
        # answers Unavailable: two replicas wiped at once killed the node).
        # A missing page makes the caller's round fail, and the rebuild retry.
        try:
            with trio.fail_after(RPC_TIMEOUT_S):
                reply = await self.node.peers[peer].call(
                    PAGE, [table, self.me, start, REBUILD_PAGE_ROWS]
                )
            if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[0], list):
                raise FrameError("ae_page answers [[[key, row], ...], more]")
            items = [(bytes(k), bytes(r)) for k, r in reply[0]]
        except (KvsvrError, trio.TooSlowError, TypeError, ValueError) as error:
            log.info("rebuild: no page of %s from replica %d: %s", table, peer, error)
            return
        pages[peer] = (items, bool(reply[1]))

    # ------------------------------------------------------------ anti-entropy

    async def _anti_entropy_loop(self) -> None:
        await trio.sleep(AE_FIRST_PASS_AFTER_S)
        while True:
            started = trio.current_time()
            await self.anti_entropy_pass()
            await trio.sleep_until(started + self.config.anti_entropy_interval_s)

    async def anti_entropy_pass(self) -> None:
        self.ae.passes += 1
        self._digest_cache.clear()
        for table in self.config.tables:
            try:
                await self.digests(table.name, purge=True)
            except KvsvrError as error:
                log.warning("anti-entropy scan of %s failed: %s", table.name, error)
        for peer, shared in self._shared.items():
            if not shared or not self.is_up(peer):
                continue
            try:
                for table in self.config.tables:
                    await self._compare_with(peer, table.name, shared)
                wall = time.time()
                for partition in shared:
                    self.ae.last_pass.setdefault(partition, {})[peer] = wall
            except (KvsvrError, trio.TooSlowError) as error:
                self.ae.failures += 1
                log.info("anti-entropy with %d stopped: %s", peer, error)
        for table in self.config.tables:
            if table.consistency == "eventual":
                try:
                    await self._purge_tombstones(table.name)
                except (KvsvrError, trio.TooSlowError) as error:
                    log.info("tombstone purge in %s paused: %s", table.name, error)

    async def _compare_with(self, peer: int, table: str, shared: list[int]) -> None:
        mine = await self.digests(table)
        with trio.fail_after(DIGEST_TIMEOUT_S):
            theirs = await self.node.peers[peer].call(DIGEST, [table, self.me])
        if not isinstance(theirs, list):
            raise FrameError("ae_digest answers [[partition, [digest, ...]], ...]")
        their_digests: dict[int, list[int]] = {}
        for item in theirs:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], int)
                or not isinstance(item[1], list)
                or len(item[1]) != DIGEST_BUCKETS
            ):
                raise FrameError("ae_digest answers [[partition, [digest, ...]], ...]")
            their_digests[item[0]] = item[1]
        empty = [0] * DIGEST_BUCKETS
        differing: list[list[int]] = []
        for p in shared:
            ours, other = mine.get(p, empty), their_digests.get(p, empty)
            differing += [[p, b] for b in range(DIGEST_BUCKETS) if ours[b] != other[b]]
        if not differing:
            return
        self.ae.buckets_differing += len(differing)
        start = b""
        eventual = self._eventual(table)
        while True:
            with trio.fail_after(DIGEST_TIMEOUT_S):
                reply = await self.node.peers[peer].call(KEYS, [table, self.me, differing, start])
            if not isinstance(reply, list) or len(reply) != 2:
                raise FrameError("ae_keys answers [[[key, version], ...], more]")
            pairs, more = reply
            wanted: list[bytes] = []
            for key, version in pairs:
                try:
                    local = self.storage.read_row(table, key)
                except CorruptRow:
                    continue  # the corrupt-row repair owns it
                if version > (0 if local is None else newest_version(local)):
                    wanted.append(key)
            for at in range(0, len(wanted), ROWS_PER_REQUEST_MAX):
                chunk = wanted[at : at + ROWS_PER_REQUEST_MAX]
                with trio.fail_after(RPC_TIMEOUT_S):
                    rows = await self.node.peers[peer].call(ROWS, [table, chunk])
                if not isinstance(rows, list) or len(rows) != len(chunk):
                    raise FrameError("ae_rows answers one row (or None) per key")
                learned = [
                    (key, raw) for key, raw in zip(chunk, rows, strict=True) if raw is not None
                ]
                await self.apply(table, learned, eventual=eventual)
                self.ae.rows_pulled += len(learned)
                if not eventual:
                    await self._settle_in_flight(table, learned)
                await trio.sleep(len(chunk) / self.config.anti_entropy_rows_per_s)
            if not more or not pairs:
                return
            start = pairs[-1][0] + b"\x00"

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
                await self.node.client_get({"table": table, "key": key})
                self.ae.keys_settled += 1
            except KvsvrError as error:
                log.info("anti-entropy could not settle %r yet: %s", key, error)

    async def digests(self, table: str, *, purge: bool = False) -> dict[int, list[int]]:
        """Bucket digests of every partition of `table` this node holds, from one
        scan taken in steps of SCAN_PAGE_ROWS at `anti_entropy_scan_rows_per_s`
        at most, so a pass over a large table costs a bounded share of a core.
        With `purge` (this node's own pass), expired rows found on the way are
        purged. A peer asking for digests gets those of our last pass while
        they are younger than the pass interval: a digest a little old only
        delays a difference to the next pass."""
        cached = self._digest_cache.get(table)
        # A digest older than a moment differs from a fresh one under any write
        # load, and every difference costs a key listing: peers get fresh ones.
        if cached is not None and time.monotonic() - cached[0] < DIGEST_CACHE_S:
            return cached[1]
        eventual = self._eventual(table)
        grace_ms = int(self.config.tombstone_grace_s * 1000)
        result: dict[int, list[int]] = {}
        candidates: list[tuple[bytes, int]] = []
        start: bytes | None = b""
        while start is not None:
            page, start = _local_page(self.storage, table, start)
            now = now_ms()
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
                        self.ae.rows_purged += 1
                        if outcome is None:
                            continue
                        row = outcome
                if row.version == 0 or is_dead(row, eventual, now, grace_ms):
                    continue
                partition = partition_of(table, decode_key(key)[0], self.partitions)
                buckets = result.get(partition)
                if buckets is None:
                    buckets = result[partition] = [0] * DIGEST_BUCKETS
                buckets[bucket_of(key)] ^= row_hash(key, newest_version(row))
            if start is not None:
                await trio.sleep(len(page) / SCAN_ROWS_PER_S)
        self._digest_cache[table] = (time.monotonic(), result)
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
                partition = partition_of(table, decode_key(key)[0], self.partitions)
                for peer in self.replica_sets[partition]:
                    if peer != self.me:
                        by_peer.setdefault(peer, []).append(key)
            versions = dict(chunk)
            answered: dict[bytes, int] = {}
            keep: set[bytes] = set()
            for peer, keys in by_peer.items():
                with trio.fail_after(RPC_TIMEOUT_S):
                    rows = await self.node.peers[peer].call(ROWS, [table, keys])
                if not isinstance(rows, list) or len(rows) != len(keys):
                    raise FrameError("ae_rows answers one row (or None) per key")
                for key, raw in zip(keys, rows, strict=True):
                    answered[key] = answered.get(key, 0) + 1
                    other = EMPTY_ROW if raw is None else decode_row(raw)
                    # Safe only if the peer has this tombstone or nothing at all.
                    if other.version != 0 and (
                        other.version != versions[key] or other.value is not None
                    ):
                        keep.add(key)
            for key, version in chunk:
                partition = partition_of(table, decode_key(key)[0], self.partitions)
                if key in keep or answered.get(key, 0) < len(self.replica_sets[partition]) - 1:
                    continue
                current = self.storage.read_row(table, key)
                if current is not None and current.version == version and current.value is None:
                    self.storage.stage(table, key, None, lazy=True)
                    self.ae.tombstones_purged += 1

    # ------------------------------------------------------------ applying rows

    async def apply(self, table: str, items: list[tuple[bytes, bytes]], *, eventual: bool) -> int:
        """Learn chosen rows (hints, anti-entropy, eventual writes); durable on return."""
        now = now_ms()
        grace_ms = int(self.config.tombstone_grace_s * 1000)
        ticket = None
        applied = 0
        for key, raw in items:
            incoming = decode_row(raw)
            if eventual:
                self.node.hlc.observe(incoming.version)
                if is_dead(incoming, True, now, grace_ms):
                    continue
            try:
                current = self.storage.read_row(table, key) or EMPTY_ROW
            except CorruptRow:
                continue
            new_row = learn(current, incoming, eventual)
            if new_row is not None:
                ticket = self.storage.stage(table, key, new_row)
                applied += 1
        if ticket is not None:
            await self.storage.wait_durable(ticket)
        return applied

    # ------------------------------------------------------------ serving peers

    async def handle(self, method: str, body: object) -> object:
        if method == PING:
            await trio.lowlevel.checkpoint()
            return self._answer_hello(body)
        if not isinstance(body, list) or not body or not isinstance(body[0], str):
            raise InvalidRequest(f"{method} takes [table, ...]")
        table = body[0]
        if table not in self.node.tables:
            raise InvalidRequest(f"unknown table {table!r}")
        eventual = self._eventual(table)
        if method == APPLY:
            items = _pairs(body, 1)
            if not eventual and not self.ready:
                raise Unavailable("this replica is rebuilding")
            return await self.apply(table, items, eventual=eventual)
        if not self.ready:
            # Our rows are not to be trusted by anyone until rebuilt.
            raise Unavailable("this replica is rebuilding")
        if method == DIGEST:
            requester = _int(body, 1)
            mine = await self.digests(table)
            shared = self._shared.get(requester, [])
            return [[p, mine[p]] for p in shared if p in mine]
        if method == KEYS:
            requester = _int(body, 1)
            return await self._serve_keys(table, requester, body)
        if method == ROWS:
            keys = body[1] if len(body) == 2 else None
            if not isinstance(keys, list) or len(keys) > ROWS_PER_REQUEST_MAX:
                raise InvalidRequest(f"ae_rows takes [table, [key]] ({ROWS_PER_REQUEST_MAX} max)")
            out: list[bytes | None] = []
            for key in keys:
                if not isinstance(key, bytes):
                    raise InvalidRequest("keys must be bytes")
                row = self.node.read_row_for_peer(table, key)
                out.append(None if row is None else encode_row(row))
            return out
        if method == PAGE:
            return self._serve_page(table, body)
        raise InvalidRequest(f"unknown method {method!r}")

    async def _serve_keys(self, table: str, requester: int, body: list[Any]) -> object:
        if len(body) != 4 or not isinstance(body[2], list) or not isinstance(body[3], bytes):
            raise InvalidRequest("ae_keys takes [table, requester, [[partition, bucket]], start]")
        wanted = {(int(p), int(b)) for p, b in body[2]}
        shared = set(self._shared.get(requester, []))
        eventual = self._eventual(table)
        grace_ms = int(self.config.tombstone_grace_s * 1000)
        pairs: list[list[Any]] = []
        start: bytes | None = body[3]
        while start is not None and len(pairs) < KEYS_PAGE_MAX:
            page, start = _local_page(self.storage, table, start)
            now = now_ms()
            for key, raw in page:
                partition = partition_of(table, decode_key(key)[0], self.partitions)
                if partition not in shared or (partition, bucket_of(key)) not in wanted:
                    continue
                try:
                    row = decode_row(raw)
                except CorruptRow:
                    continue
                if row.version == 0 or is_dead(row, eventual, now, grace_ms):
                    continue
                pairs.append([key, newest_version(row)])
            if start is not None:
                await trio.sleep(len(page) / SCAN_ROWS_PER_S)
        return [pairs, start is not None]

    def _serve_page(self, table: str, body: list[Any]) -> object:
        if (
            len(body) != 4
            or not isinstance(body[1], int)
            or not isinstance(body[2], bytes)
            or not isinstance(body[3], int)
            or not 1 <= body[3] <= REBUILD_PAGE_ROWS
        ):
            raise InvalidRequest("ae_page takes [table, requester, start, limit]")
        shared = set(self._shared.get(body[1], []))
        items: list[list[bytes]] = []
        start: bytes | None = body[2]
        while start is not None:
            page, start = _local_page(self.storage, table, start)
            for key, raw in page:
                partition = partition_of(table, decode_key(key)[0], self.partitions)
                if partition not in shared:
                    continue
                if not crc_ok(raw):
                    self.node.schedule_repair(table, key)
                    raise Unavailable(f"row {key!r} is corrupt here and being rebuilt") from None
                items.append([key, raw])
                if len(items) >= body[3]:
                    return [items, True]
        return [items, False]

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = time.time()
        names = {n.index: n.id for n in self.config.nodes}
        last: dict[str, float | None] = {}
        for partition, replicas in enumerate(self.replica_sets):
            if self.me not in replicas:
                continue
            peers = self.ae.last_pass.get(partition, {})
            times = [peers.get(p) for p in replicas if p != self.me]
            known = [t for t in times if t is not None]
            last[str(partition)] = (
                round(wall - min(known), 1) if known and len(known) == len(times) else None
            )
        return {
            "state": self.state,
            "cluster_id": self.cluster_id,
            "rows_rebuilt": self.rebuild.rows_rebuilt,
            "rebuild": {
                "tables_done": self.rebuild.tables_done,
                "tables_total": self.rebuild.tables_total,
                "rows_rebuilt": self.rebuild.rows_rebuilt,
                "sources": list(self.rebuild.sources),
                "waiting_for": list(self.rebuild.waiting_for),
            },
            "needs_operator": self._operator_message(self.lost)
            if self.state == NEEDS_OPERATOR
            else None,
            "loss_report": self.loss_report,
            "peers": {
                names[p]: {
                    "up": d.is_up(now),
                    "phi": None if d.last_arrival is None else round(d.phi(now), 2),
                }
                for p, d in self.detectors.items()
            },
            "hints": {
                names[p]: {
                    "pending": h.count,
                    "bytes": h.bytes,
                    "stored": h.stored,
                    "replayed": h.replayed,
                    "dropped_full": h.dropped_full,
                    "dropped_expired": h.dropped_expired,
                }
                for p, h in self.hints.targets.items()
            },
            "anti_entropy": {
                "passes": self.ae.passes,
                "buckets_differing": self.ae.buckets_differing,
                "rows_pulled": self.ae.rows_pulled,
                "keys_settled": self.ae.keys_settled,
                "rows_purged": self.ae.rows_purged,
                "tombstones_purged": self.ae.tombstones_purged,
                "failures": self.ae.failures,
                "last_pass_s_ago": last,
            },
        }


def _read_members(raw: bytes | None) -> set[str]:
    if raw is None:
        return set()
    try:
        members = msgpack.unpackb(raw, raw=False)
    except ValueError:
        members = None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise CorruptRow("unreadable member list in meta")
    return set(members)


def _hint_carries(data: bytes, row_bytes: bytes) -> bool:
    try:
        return bool(msgpack.unpackb(data, raw=False)[1] == row_bytes)
    except (ValueError, TypeError, IndexError):
        return True  # unreadable: drop it


def _pairs(body: list[Any], at: int) -> list[tuple[bytes, bytes]]:
    if len(body) != at + 1 or not isinstance(body[at], list):
        raise InvalidRequest("expected [table, [[key, row], ...]]")
    items = body[at]
    if len(items) > ROWS_PER_REQUEST_MAX:
        raise InvalidRequest(f"at most {ROWS_PER_REQUEST_MAX} rows per request")
    out: list[tuple[bytes, bytes]] = []
    for item in items:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or not isinstance(item[1], bytes)
        ):
            raise InvalidRequest("rows travel as [key, row bytes]")
        out.append((item[0], item[1]))
    return out


def _int(body: list[Any], at: int) -> int:
    if len(body) <= at or not isinstance(body[at], int) or isinstance(body[at], bool):
        raise InvalidRequest(f"field {at} must be an int")
    value: int = body[at]
    return value
