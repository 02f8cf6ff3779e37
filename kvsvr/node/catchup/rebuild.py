"""How a node starts, and rebuilding a replica that lost its data.

How a node starts is decided by `kvsvr.protocol.lifecycle` (identity in
`meta`, "new" or "existing", founding or replacing). A replacement must not
vote on any strong key until its rows are rebuilt, merging promises and
proposals as well as values from enough *ready* replicas of each partition it
holds (`replica.peers_needed_to_rebuild`: a majority of the partition), or it
could forget a promise it made and let two values be chosen. Until then it
refuses Paxos messages on strong tables (the other replicas still form a
majority). It never waits on a peer that lost its data too: when too few
replicas of a partition kept theirs, it reports "needs operator" and waits
for `kvsvr recover --accept-data-loss`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import trio

from kvsvr.errors import CorruptRow, InvalidRequest, KvsvrError, Unavailable
from kvsvr.keys import decode_key
from kvsvr.node.catchup.context import (
    RPC_TIMEOUT_S,
    Collaborators,
    Readiness,
    local_page,
)
from kvsvr.node.catchup.liveness import Liveness
from kvsvr.protocol import lifecycle, replica
from kvsvr.protocol.catchup_messages import PAGE, REBUILD_PAGE_ROWS, PageReply, PageRequest
from kvsvr.protocol.lifecycle import (
    NEEDS_OPERATOR,
    REBUILDING,
    STARTING,
    WAITING_FOR_PEERS,
    Identity,
)
from kvsvr.protocol.placement import partition_of
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import decode_row
from kvsvr.storage.codec import crc_ok

log = logging.getLogger("kvsvr.replication")

JOIN_WAIT_S: Final = 0.8  # below the coordinators' round timeout (1 s)
REBUILD_RETRY_S: Final = 0.5
COPY_BATCH_ROWS: Final = 4000  # rows every source agrees on, written as stored
MERGE_BATCH_ROWS: Final = 1000  # merged rows per write

# `meta` keys. The identity (cluster id, node id) is written before the node
# first votes; `rebuild_pending` from the start of a replacement's rebuild to
# its end, so that a rebuild cut short is taken up again, never mistaken for
# a directory that holds its data. `initialized` is what directories made
# before cluster ids carry.
IDENTITY_KEY: Final = b"identity"
REBUILD_PENDING_KEY: Final = b"rebuild_pending"
OLD_MARKER_KEY: Final = b"initialized"


@dataclass
class RebuildStats:
    rows_rebuilt: int = 0
    tables_done: int = 0
    tables_total: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    waiting_for: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


class Startup:
    """Decides how this node starts and, for a replacement, rebuilds it
    before it votes. The only writer of `Readiness`."""

    def __init__(self, context: Collaborators, readiness: Readiness, liveness: Liveness) -> None:
        self.context = context
        self.storage = context.storage
        self.readiness = readiness
        self.liveness = liveness
        self.me = context.me.index
        self.names = liveness.names
        self.cluster_id = liveness.cluster_id
        self.stats = RebuildStats()
        # Set by `kvsvr recover --accept-data-loss`; what the rebuild then lost.
        self.accept_data_loss = False
        self.lost: dict[int, tuple[int, ...]] = {}
        self.loss_report: dict[str, Any] | None = None
        stored_raw = self.storage.read_meta(IDENTITY_KEY)
        stored = None if stored_raw is None else Identity.from_bytes(stored_raw)
        self.start = lifecycle.decide_start(
            stored,
            self.storage.read_meta(OLD_MARKER_KEY) is not None or self._has_rows(),
            self.cluster_id,
            context.me.id,
            context.initial_state,
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

    def _has_rows(self) -> bool:
        tables = self.context.config.tables
        return any(self.storage.scan_table_raw(t.name, b"", None, 1) for t in tables)

    def _identity(self) -> Identity:
        return Identity(self.cluster_id, self.names[self.me])

    def _become_ready(self, why: str, *, rebuilt: bool = False) -> None:
        self.readiness.become_ready(rebuilt=rebuilt)
        log.info("replica ready (%s)", why)

    async def wait_to_vote(self) -> None:
        """Return when this replica may vote on strong keys; raise Unavailable
        if it may not. A node still deciding how to start (asking its peers
        whether it founds the cluster, which takes a moment after a fresh
        start) holds the message up to JOIN_WAIT_S rather than refusing it; a
        rebuilding one refuses at once."""
        readiness = self.readiness
        if readiness.ready:
            return
        if readiness.state in (STARTING, WAITING_FOR_PEERS):
            with trio.move_on_after(JOIN_WAIT_S):
                await readiness.ready_event.wait()
            if readiness.ready:
                return
        raise Unavailable(f"this replica is {readiness.state} and does not vote yet")

    # ------------------------------------------------------------ starting

    async def bootstrap(self) -> None:
        """Found the cluster, or rebuild this replica before it votes (see
        `kvsvr.protocol.lifecycle`)."""
        if self.start.kind == "ask_peers":
            self.readiness.state = WAITING_FOR_PEERS
            started = trio.current_time()
            liveness = self.liveness
            peers = [self.names[p] for p in liveness.detectors]
            while True:
                replies = {
                    self.names[p]: r
                    for p, r in liveness.peer_replies.items()
                    if liveness.is_up(p) or r.cluster_id != self.cluster_id
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
                await liveness.decide_again()
        await self._rebuild_before_voting()

    async def _rebuild_before_voting(self) -> None:
        readiness = self.readiness
        liveness = self.liveness
        readiness.state = REBUILDING
        self.stats.started_at = self.context.clock.wall_s()
        # Pending first: a directory with the identity and no pending mark is
        # one that holds its data.
        self.storage.stage_meta(REBUILD_PENDING_KEY, b"1")
        await self.storage.wait_durable(
            self.storage.stage_meta(IDENTITY_KEY, self._identity().to_bytes())
        )
        log.warning("this replica is empty but its peers hold data: rebuilding before voting")
        while True:
            plan = lifecycle.plan_rebuild(
                self.context.replica_sets,
                self.me,
                {p: r.state for p, r in liveness.peer_replies.items() if liveness.is_up(p)},
                accept_data_loss=self.accept_data_loss,
            )
            self.stats.waiting_for = tuple(self.names[p] for p in plan.waiting_for)
            if plan.needs_operator:
                if readiness.state != NEEDS_OPERATOR:
                    log.error("%s", self.operator_message(plan.lost))
                readiness.state = NEEDS_OPERATOR
                self.lost = plan.lost
                await liveness.decide_again()
                continue
            readiness.state = REBUILDING
            if plan.sources is None:
                await liveness.decide_again()
                continue
            self.stats.sources = tuple(self.names[p] for p in sorted(plan.sources))
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
        self.stats.finished_at = self.context.clock.wall_s()
        self.stats.waiting_for = ()
        self._become_ready(f"rebuilt {self.stats.rows_rebuilt} rows from peers", rebuilt=True)

    def operator_message(self, lost: dict[int, tuple[int, ...]]) -> str:
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
            "rows_rebuilt": self.stats.rows_rebuilt,
        }

    async def recover(self, accept_data_loss: bool) -> dict[str, Any]:
        """`kvsvr recover`: a node that needs an operator rebuilds from the
        replicas that kept their data, and says what may have been lost."""
        if not accept_data_loss:
            raise InvalidRequest("recovery may lose acknowledged writes: it needs accept_data_loss")
        readiness = self.readiness
        if readiness.state != NEEDS_OPERATOR:
            await trio.lowlevel.checkpoint()
            return {"node": self.names[self.me], "recovered": False, "state": readiness.state}
        self.accept_data_loss = True
        self.liveness.changed()
        await readiness.ready_event.wait()
        return {
            "node": self.names[self.me],
            "recovered": True,
            "state": readiness.state,
            "loss": self.loss_report,
        }

    # ------------------------------------------------------------ rebuilding

    async def _rebuild_all(self, sources: list[int]) -> None:
        tables = self.context.config.tables
        self.stats.tables_total = len(tables)
        self.stats.tables_done = 0
        for table in tables:
            await self._rebuild_table(table.name, sources)
            self.stats.tables_done += 1

    async def _rebuild_table(self, table: str, sources: list[int]) -> None:
        eventual = self.context.eventual(table)
        partitions = self.context.config.partitions
        start = b""
        while True:
            pages: dict[int, PageReply] = {}
            async with trio.open_nursery() as nursery:
                for peer in sources:
                    nursery.start_soon(self._fetch_page, table, peer, start, pages)
            if len(pages) < len(sources):
                raise Unavailable(f"heard from {len(pages)} of {len(sources)} peers")
            boundary: bytes | None = None
            for page in pages.values():
                if page.more and page.rows and (boundary is None or page.rows[-1][0] < boundary):
                    boundary = page.rows[-1][0]
            by_key: dict[bytes, list[bytes]] = {}
            for page in pages.values():
                for key, raw in page.rows:
                    if boundary is None or key <= boundary:
                        by_key.setdefault(key, []).append(raw)
            ops: list[tuple[str, bytes, Row | None]] = []
            copies: list[tuple[bytes, bytes]] = []
            for key, raws in sorted(by_key.items()):
                partition = partition_of(table, decode_key(key)[0], partitions)
                # Peers that hold the partition and did not send the key have no row.
                holders = sum(1 for peer in self.context.replica_sets[partition] if peer in pages)
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
            for at in range(0, len(copies), COPY_BATCH_ROWS):
                await self.storage.write_row_bytes(table, copies[at : at + COPY_BATCH_ROWS])
            for at in range(0, len(ops), MERGE_BATCH_ROWS):
                await self.storage.write(ops[at : at + MERGE_BATCH_ROWS])
            self.stats.rows_rebuilt += len(ops) + len(copies)
            if boundary is None:
                return
            start = boundary + b"\x00"

    async def _fetch_page(
        self, table: str, peer: int, start: bytes, pages: dict[int, PageReply]
    ) -> None:
        # A task of a nursery: an error escaping it would reach the rebuild as
        # an exception group, past its retry, and stop the node (a peer still
        # rebuilding itself answers Unavailable, as when two replicas were
        # wiped at once). A missing page makes the caller's round fail, and
        # the rebuild retry.
        request = PageRequest(table, self.me, start, REBUILD_PAGE_ROWS)
        try:
            with trio.fail_after(RPC_TIMEOUT_S):
                raw = await self.context.peers[peer].call(PAGE, request.to_wire())
            pages[peer] = PageReply.from_wire(raw)
        except (KvsvrError, trio.TooSlowError) as error:
            log.info("rebuild: no page of %s from replica %d: %s", table, peer, error)

    # ------------------------------------------------------------ serving peers

    def serve_page(self, request: PageRequest, shared: list[int]) -> PageReply:
        """Stored rows for a rebuilding peer, of the partitions it shares with us
        (`shared`). A corrupt row never travels: it is scheduled for repair
        and the page refused, so the peer asks again later."""
        table = request.table
        partitions = self.context.config.partitions
        wanted = set(shared)
        rows: list[tuple[bytes, bytes]] = []
        start: bytes | None = request.start
        while start is not None:
            page, start = local_page(self.storage, table, start)
            for key, raw in page:
                if partition_of(table, decode_key(key)[0], partitions) not in wanted:
                    continue
                if not crc_ok(raw):
                    self.context.schedule_repair(table, key)
                    raise Unavailable(f"row {key!r} is corrupt here and being rebuilt") from None
                rows.append((key, raw))
                if len(rows) >= request.limit:
                    return PageReply(tuple(rows), True)
        return PageReply(tuple(rows), False)

    def status(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "tables_done": stats.tables_done,
            "tables_total": stats.tables_total,
            "rows_rebuilt": stats.rows_rebuilt,
            "sources": list(stats.sources),
            "waiting_for": list(stats.waiting_for),
        }
