"""Read repair: a replica that finds a corrupt row rebuilds it from its peers.

The rebuild runs in the background, in a task of the node's nursery, and is
bounded so that a badly damaged file cannot flood the node; a failed rebuild
is retried on a later touch of the key, not sooner than REPAIR_RETRY_AFTER_S.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from kvsvr.clock import Clock
from kvsvr.errors import FrameError, KvsvrError, Unavailable
from kvsvr.keys import decode_key
from kvsvr.node.rounds import PeerLink
from kvsvr.protocol import replica
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import Storage, decode_row

log = logging.getLogger("kvsvr.node")

REPAIRS_IN_FLIGHT_MAX = 64
REPAIR_TIMEOUT_S = 2.0
REPAIR_RETRY_AFTER_S = 1.0
REPAIR_FAILURES_REMEMBERED_MAX = 10_000

# A peer rebuilding a row asks for ours through this method (`ReplicaSide.serve_row`).
ROW_METHOD = "row"


class Repairs:
    """The rows being rebuilt, and the ones whose rebuild failed lately."""

    def __init__(
        self,
        me: int,
        storage: Storage,
        peers: dict[int, PeerLink],
        replicas_of: Callable[[str, bytes], list[int]],
        clock: Clock,
    ) -> None:
        self.me = me
        self.storage = storage
        self.peers = peers
        self.replicas_of = replicas_of
        self.clock = clock
        self.nursery: trio.Nursery | None = None
        self.repairing: set[tuple[str, bytes]] = set()
        self.failed_at: dict[tuple[str, bytes], float] = {}
        self.rows_repaired = 0
        self.repairs_failed = 0

    def schedule(self, table: str, key: bytes) -> bool:
        """Start rebuilding a row unless that is running, failed just now, or
        too many are; True when it started."""
        slot = (table, key)
        failed_at = self.failed_at.get(slot)
        if (
            self.nursery is None
            or slot in self.repairing
            or len(self.repairing) >= REPAIRS_IN_FLIGHT_MAX
            or (failed_at is not None and self.clock.monotonic() - failed_at < REPAIR_RETRY_AFTER_S)
        ):
            return False
        self.repairing.add(slot)
        self.nursery.start_soon(self._repair_row, table, key)
        return True

    async def _repair_row(self, table: str, key: bytes) -> None:
        """Rebuild a corrupt row from enough peers that the rebuilt promise and
        proposal cover whatever the lost row had promised or accepted."""
        slot = (table, key)
        try:
            partition_key, _ = decode_key(key)
            replicas = self.replicas_of(table, partition_key)
            others = [r for r in replicas if r != self.me]
            needed = replica.peers_needed_to_rebuild(len(replicas))
            rows: list[Row] = []

            async def fetch(target: int) -> None:
                try:
                    raw = await self.peers[target].call(ROW_METHOD, [table, key])
                    if raw is not None and not isinstance(raw, bytes):
                        raise FrameError("a row must come as bytes")
                    rows.append(EMPTY_ROW if raw is None else decode_row(raw))
                except KvsvrError as error:
                    log.warning("repair of %r: replica %d could not help: %s", key, target, error)

            with trio.move_on_after(REPAIR_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for target in others:
                        nursery.start_soon(fetch, target)
            if len(rows) < needed:
                raise Unavailable(f"heard from {len(rows)} of the {needed} peers needed")
            merged = replica.merge_rows(rows)
            await self.storage.wait_durable(self.storage.stage(table, key, merged))
            self.rows_repaired += 1
            self.failed_at.pop(slot, None)
            log.info("rebuilt row %r of table %s from %d peers", key, table, len(rows))
        except KvsvrError as error:
            self.repairs_failed += 1
            if len(self.failed_at) >= REPAIR_FAILURES_REMEMBERED_MAX:
                self.failed_at.clear()
            self.failed_at[slot] = self.clock.monotonic()
            log.warning("could not rebuild row %r of table %s yet: %s", key, table, error)
        finally:
            self.repairing.discard(slot)
