"""What the catch-up mechanisms are built from, and what they share.

Catch-up does not see the node: it is given the node's peers, storage,
config, replica sets, hybrid clock and clock, and three callables (read a row
for a peer, schedule a corrupt row's repair, settle a strong key with a
Paxos read). `Readiness` is the replica's start state, which every mechanism
reads and only `rebuild` changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from kvsvr.clock import Clock
from kvsvr.config import ClusterConfig, NodeConfig, TableConfig
from kvsvr.errors import CorruptRow
from kvsvr.protocol.catchup import is_dead, learn
from kvsvr.protocol.eventual import HybridClock
from kvsvr.protocol.lifecycle import READY, STARTING, ReplicaState
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import Storage, decode_row

RPC_TIMEOUT_S: Final = 10.0
SCAN_PAGE_ROWS: Final = 1000  # rows per step of a local scan (then other tasks run)
# ... and at most about this many bytes: a page is held in memory whole, and
# 1000 rows of 64 KiB values would be 64 MiB, and a node's RSS is bounded.
SCAN_PAGE_BYTES: Final = 4 << 20
# Rows per second a digest or key scan reads: about a tenth of a core for
# decoding and hashing, so 1,000,000 rows take 20 s per pass.
SCAN_ROWS_PER_S: Final = 50_000


class PeerLink(Protocol):
    """A connection to one peer node."""

    @property
    def up(self) -> bool:
        """Whether the connection is open (a crashed peer's kernel closes it)."""
        ...

    async def call(self, method: str, body: object) -> Any: ...


@dataclass(frozen=True, slots=True)
class Collaborators:
    """Everything catch-up uses of its node."""

    config: ClusterConfig
    me: NodeConfig
    initial_state: str  # "new" or "existing"
    storage: Storage
    # Peer index -> link; filled in when the node links its peers.
    peers: Mapping[int, PeerLink]
    tables: Mapping[str, TableConfig]
    replica_sets: Sequence[Sequence[int]]  # by partition: the replicas' node indexes
    hlc: HybridClock
    clock: Clock
    # Our row for a peer that copies it; a corrupt row raises (and is
    # scheduled for repair), never travels.
    read_row: Callable[[str, bytes], Row | None]
    # Rebuild one corrupt row from its other replicas (in the background).
    schedule_repair: Callable[[str, bytes], object]
    # A Paxos read of a strong key: settles a proposal in flight on a majority
    # and repairs this replica. Raises a KvsvrError when it cannot yet.
    settle: Callable[[str, bytes], Awaitable[object]]

    def eventual(self, table: str) -> bool:
        return self.tables[table].consistency == "eventual"

    def grace_ms(self) -> int:
        return int(self.config.tombstone_grace_s * 1000)


class Readiness:
    """Whether this replica votes on strong keys, and the state its hellos
    and status report."""

    def __init__(self) -> None:
        self.state: ReplicaState = STARTING
        self.ready = False
        self.ready_event = trio.Event()
        # Set (and replaced) when the replica becomes ready: every heartbeat
        # says hello at once, so that peers record it as a member within a
        # round trip of its first vote, not a beat later (see
        # `lifecycle.decide_new`).
        self.announce = trio.Event()
        # Called when the replica becomes ready after rebuilding its rows
        # (the node's read-lease grants start a quiet period then).
        self.on_rebuilt: Callable[[], None] | None = None

    def become_ready(self, *, rebuilt: bool = False) -> None:
        if rebuilt and self.on_rebuilt is not None:
            self.on_rebuilt()
        self.ready = True
        self.ready_event.set()
        self.state = READY
        self.announce.set()
        self.announce = trio.Event()


def _page_full(page: list[tuple[bytes, bytes]]) -> bool:
    """Whether a local scan page ended at its row or byte limit (more may
    follow) rather than at the end of the table."""
    return len(page) >= SCAN_PAGE_ROWS or sum(len(k) + len(r) for k, r in page) >= SCAN_PAGE_BYTES


def local_page(
    storage: Storage, table: str, start: bytes
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """One step of a local table scan: the stored rows from `start` (bounded in
    rows and bytes) and where the next step starts (None: the table ended)."""
    page = storage.scan_table_raw(table, start, None, SCAN_PAGE_ROWS, bytes_max=SCAN_PAGE_BYTES)
    return page, (page[-1][0] + b"\x00" if _page_full(page) else None)


async def apply_rows(
    context: Collaborators, table: str, items: Sequence[tuple[bytes, bytes]], *, eventual: bool
) -> int:
    """Learn chosen rows (hints, anti-entropy, eventual writes); durable on
    return. Returns how many raised a key's version here."""
    storage = context.storage
    now = context.clock.wall_ms()
    grace_ms = context.grace_ms()
    ticket = None
    applied = 0
    for key, raw in items:
        incoming = decode_row(raw)
        if eventual:
            context.hlc.observe(incoming.version)
            if is_dead(incoming, True, now, grace_ms):
                continue
        try:
            current = storage.read_row(table, key) or EMPTY_ROW
        except CorruptRow:
            continue
        new_row = learn(current, incoming, eventual)
        if new_row is not None:
            ticket = storage.stage(table, key, new_row)
            applied += 1
    if ticket is not None:
        await storage.wait_durable(ticket)
    return applied
