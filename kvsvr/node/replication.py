"""Catching up: hinted handoff, anti-entropy, rebuilding a wiped replica, purges.

A write waits for a quorum; the replicas that missed it catch up here, in the
background, each mechanism bounded and in its own module of
`kvsvr.node.catchup`:

- **Failure detection** (`liveness`): hellos every heartbeat, a phi accrual
  detector per peer (`kvsvr.protocol.failure`).
- **Hinted handoff** (`hints`): a coordinator keeps the chosen row for a
  replica that is down, bounded in count, bytes and age, and replays it when
  the replica is back.
- **Anti-entropy** (`anti_entropy`): bucket digests per shared partition,
  compared with each peer; the rows where the peer is ahead are pulled. Its
  scan also purges expired rows and old tombstones.
- **Start and rebuild** (`rebuild`): how a node starts (`kvsvr.protocol.
  lifecycle`), and a replacement's rebuild from enough ready replicas before
  it votes on any strong key.

What they compare and keep (digests, dead rows, purges, learning a row, hint
keys) is decided by the pure rules of `kvsvr.protocol.catchup`; their RPC
bodies are the typed messages of `kvsvr.protocol.catchup_messages`.

All learned rows travel as stored rows (the codec, crc included) and are
applied as *chosen* values: for a strong table as a commit with its value
(`replica.apply_commit`), for an eventual table by last-writer-wins. Both only
ever raise a key's version, which is what makes every path idempotent.

`Replication` wires the mechanisms from the node's collaborators
(`Collaborators`: peers, storage, config, a clock and three callables, never
the node itself) and answers the catch-up RPC methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from kvsvr.errors import InvalidRequest, Unavailable
from kvsvr.node.catchup.anti_entropy import AntiEntropy
from kvsvr.node.catchup.context import Collaborators, Readiness, apply_rows
from kvsvr.node.catchup.hints import HintedHandoff
from kvsvr.node.catchup.liveness import Liveness
from kvsvr.node.catchup.rebuild import IDENTITY_KEY, OLD_MARKER_KEY, Startup
from kvsvr.protocol.catchup_messages import (
    APPLY,
    METHODS,
    PING,
    ROWS,
    ApplyRows,
    DigestRequest,
    KeysRequest,
    RowsRequest,
    request_from_wire,
)
from kvsvr.protocol.lifecycle import NEEDS_OPERATOR, ReplicaState, StartDecision

__all__ = [
    "APPLY",
    "IDENTITY_KEY",
    "METHODS",
    "OLD_MARKER_KEY",
    "ROWS",
    "Collaborators",
    "Replication",
]


class Replication:
    def __init__(self, context: Collaborators) -> None:
        self.context = context
        self.readiness = Readiness()
        # Liveness tells the handoff when a peer comes back, and the handoff
        # asks liveness whether a peer is up: the callback binds them.
        self.liveness = Liveness(context, self.readiness, self._peer_up)
        self.handoff = HintedHandoff(context, self.readiness, self.liveness.is_up)
        # The write path's hooks: keep hints for replicas that are down.
        self.hint_after_write = self.handoff.after_write
        self.hint = self.handoff.hint
        self.anti_entropy = AntiEntropy(context, self.liveness.is_up)
        self.startup = Startup(context, self.readiness, self.liveness)

    def _peer_up(self, peer: int) -> None:
        self.handoff.peer_up(peer)

    # ------------------------------------------------------------ queries

    @property
    def ready(self) -> bool:
        """Whether this replica votes on strong keys."""
        return self.readiness.ready

    @property
    def state(self) -> ReplicaState:
        return self.readiness.state

    @property
    def ready_event(self) -> trio.Event:
        return self.readiness.ready_event

    @property
    def start(self) -> StartDecision:
        """How this node started (`lifecycle.decide_start`)."""
        return self.startup.start

    async def wait_to_vote(self) -> None:
        await self.startup.wait_to_vote()

    async def recover(self, accept_data_loss: bool) -> dict[str, Any]:
        return await self.startup.recover(accept_data_loss)

    # ------------------------------------------------------------ write hooks

    async def apply(
        self, table: str, items: Sequence[tuple[bytes, bytes]], *, eventual: bool
    ) -> int:
        """Learn chosen rows (hints, anti-entropy, eventual writes); durable on return."""
        return await apply_rows(self.context, table, items, eventual=eventual)

    # ------------------------------------------------------------ background tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self.liveness.detectors:
                nursery.start_soon(self.liveness.heartbeat, peer)
                nursery.start_soon(self.handoff.replay_loop, peer)
            task_status.started()
            if not self.ready:
                await self.startup.bootstrap()
            nursery.start_soon(self.anti_entropy.run)

    # ------------------------------------------------------------ serving peers

    async def handle(self, method: str, body: object) -> object:
        if method == PING:
            await trio.lowlevel.checkpoint()
            return self.liveness.answer_hello(body)
        request = request_from_wire(method, body)
        if request.table not in self.context.tables:
            raise InvalidRequest(f"unknown table {request.table!r}")
        if isinstance(request, ApplyRows):
            eventual = self.context.eventual(request.table)
            if not eventual and not self.ready:
                raise Unavailable("this replica is rebuilding")
            return await self.apply(request.table, request.rows, eventual=eventual)
        if not self.ready:
            # Our rows are not to be trusted by anyone until rebuilt.
            raise Unavailable("this replica is rebuilding")
        anti_entropy = self.anti_entropy
        if isinstance(request, DigestRequest):
            return (await anti_entropy.serve_digests(request)).to_wire()
        if isinstance(request, KeysRequest):
            return (await anti_entropy.serve_keys(request)).to_wire()
        if isinstance(request, RowsRequest):
            return anti_entropy.serve_rows(request).to_wire()
        shared = anti_entropy.shared.get(request.requester, [])
        return self.startup.serve_page(request, shared).to_wire()

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        startup = self.startup
        names = self.liveness.names
        return {
            "state": self.state,
            "cluster_id": self.liveness.cluster_id,
            "rows_rebuilt": startup.stats.rows_rebuilt,
            "rebuild": startup.status(),
            "needs_operator": startup.operator_message(startup.lost)
            if self.state == NEEDS_OPERATOR
            else None,
            "loss_report": startup.loss_report,
            "peers": self.liveness.status(),
            "hints": self.handoff.store.status(names),
            "anti_entropy": self.anti_entropy.status(),
        }
