"""The replica side of a node: answering the Paxos requests of coordinators
(our own and our peers') from the rows in storage.

Every promise and accept is durable before its answer leaves: a forgotten
promise breaks Paxos. A replica still joining the cluster (after losing its
data) does not vote until catch-up says it may (`VoteGate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from kvsvr.api import SCAN_LIMIT_MAX
from kvsvr.clock import SYSTEM_CLOCK, Clock
from kvsvr.config import TableConfig
from kvsvr.errors import CorruptRow, InvalidRequest, KvsvrError, Unavailable
from kvsvr.node.rounds import ReplicaAnswer
from kvsvr.protocol import replica
from kvsvr.protocol.messages import Accept, Commit, Read, Reply, Request, ScanReply, ScanRequest
from kvsvr.protocol.read_lease import Grants
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import Storage, encode_row
from kvsvr.storage.engine import CommitTicket, prefix_end

log = logging.getLogger("kvsvr.node")


class VoteGate(Protocol):
    """Whether this replica may vote yet (the node's catch-up decides)."""

    @property
    def ready(self) -> bool: ...

    @property
    def state(self) -> str: ...

    async def wait_to_vote(self) -> None: ...


class ReplicaSide:
    """Applies requests to this node's rows and answers them."""

    def __init__(
        self,
        storage: Storage,
        tables: dict[str, TableConfig],
        schedule_repair: Callable[[str, bytes], bool],
    ) -> None:
        self.storage = storage
        self.tables = tables
        self.schedule_repair = schedule_repair
        self.gate: VoteGate | None = None  # set once catch-up exists: see `Node`
        self.nursery: trio.Nursery | None = None
        self.corrupt_rows_seen = 0
        # The read leases this replica granted (None: leases are off), timed
        # on `clock`. Set by the node.
        self.grants: Grants | None = None
        self.clock: Clock = SYSTEM_CLOCK

    def check_table(self, table: str) -> None:
        if table not in self.tables:
            raise InvalidRequest(f"unknown table {table!r}")

    def eventual(self, table: str) -> bool:
        return self.tables[table].consistency == "eventual"

    def _ready(self) -> bool:
        return self.gate is None or self.gate.ready

    def read_row(self, table: str, key: bytes) -> Row:
        try:
            return self.storage.read_row(table, key) or EMPTY_ROW
        except CorruptRow:
            self.corrupt_rows_seen += 1
            if self.schedule_repair(table, key):
                log.error("corrupt row in table %s key %r: refused; rebuilding it", table, key)
            raise

    def read_row_for_peer(self, table: str, key: bytes) -> Row | None:
        """Our row for a peer that copies it; a corrupt row raises (and is
        scheduled for rebuilding), never travels."""
        try:
            return self.storage.read_row(table, key)
        except CorruptRow:
            self.corrupt_rows_seen += 1
            self.schedule_repair(table, key)
            raise

    def local_version(self, me: int, table: str, key: bytes, replicas: list[int]) -> int:
        """The version of our row of a key, -1 when we hold no replica of it
        or cannot read it."""
        if me not in replicas:
            return -1
        try:
            return self.read_row(table, key).version
        except CorruptRow:
            return -1

    def serve_row(self, body: object) -> bytes | None:
        """A peer rebuilding a row asks for ours, as stored (crc included)."""
        if (
            not isinstance(body, list)
            or len(body) != 2
            or not isinstance(body[0], str)
            or not isinstance(body[1], bytes)
        ):
            raise InvalidRequest("row takes [table, key]")
        table, key = body
        self.check_table(table)
        if not self._ready():
            raise Unavailable("this replica is rebuilding; its rows cannot help yet")
        row = self.storage.read_row(table, key)  # a corrupt row here raises, never travels
        return None if row is None else encode_row(row)

    def _step(self, message: Request) -> tuple[Reply, CommitTicket | None]:
        """Apply a request to the replica: the reply, and the ticket of the row
        change it must wait for (None: nothing changed) before it may leave."""
        self.check_table(message.table)
        if not self._ready() and not self.eventual(message.table):
            # Empty after losing its data: a vote now could contradict one it
            # made before the loss. The other replicas form the majority.
            assert self.gate is not None
            raise Unavailable(f"this replica is {self.gate.state}; no vote yet")
        if isinstance(message, ScanRequest):
            return self._scan(message), None
        if isinstance(message, Commit):
            raise InvalidRequest("commit is a one-way message")
        if self.eventual(message.table):
            raise InvalidRequest(f"table {message.table!r} is eventual: no Paxos rounds")
        row = self.read_row(message.table, message.key)
        if self.grants is not None and type(message) in (Read, Accept):
            return self._with_leases(row, message, self.grants)
        new_row, reply = replica.handle(row, message)
        assert reply is not None
        if new_row is None:
            return reply, None
        # Durable before the answer leaves: a forgotten promise breaks Paxos.
        return reply, self.storage.stage(message.table, message.key, new_row)

    def _with_leases(
        self, row: Row, message: Request, grants: Grants
    ) -> tuple[Reply, CommitTicket | None]:
        """A read that asks for a lease is granted one (unless the table takes
        none, or `Grants` refuses); an Accept from a node other than the
        key's lease holders waits for their leases to lapse."""
        now = self.clock.monotonic()
        if isinstance(message, Read):
            granted = (
                message.lease_for > 0
                and self.tables[message.table].read_leases
                and grants.grant(message.table, message.key, message.lease_for, now)
            )
            return replica.on_read(row, message, granted), None
        assert isinstance(message, Accept)
        wait_s = grants.wait_s(message.table, message.key, message.ballot[1], now)
        new_row, reply = replica.on_accept(row, message, wait_s)
        if new_row is None:
            return reply, None
        return reply, self.storage.stage(message.table, message.key, new_row)

    def _must_wait_to_vote(self, message: Request) -> bool:
        return (
            not self._ready() and message.table in self.tables and not self.eventual(message.table)
        )

    def nowait(self, message: Request, answer: ReplicaAnswer) -> None:
        """Answer `message` without a task: `answer(reply, None)` once the reply
        may leave (its row change is durable), or `answer(None, error)`."""
        if self._must_wait_to_vote(message) and self.nursery is not None:
            self.nursery.start_soon(self._after_joining, message, answer)
            return
        try:
            reply, ticket = self._step(message)
        except KvsvrError as error:
            answer(None, error)
            return
        if ticket is None:
            answer(reply, None)
            return

        def durable(failure: KvsvrError | None) -> None:
            if failure is None:
                answer(reply, None)
            else:
                answer(None, failure)

        self.storage.when_durable(ticket, durable)

    async def _after_joining(self, message: Request, answer: ReplicaAnswer) -> None:
        """A message that reached a replica still joining: held until it may
        vote (briefly: see `Replication.wait_to_vote`) or refused."""
        assert self.gate is not None
        try:
            await self.gate.wait_to_vote()
        except KvsvrError as error:
            answer(None, error)
            return
        self.nowait(message, answer)

    def oneway(self, message: Request) -> None:
        if not isinstance(message, Commit):
            raise InvalidRequest("only commits travel one way")
        self.check_table(message.table)
        if self.eventual(message.table) or not self._ready():
            return
        try:
            row = self.read_row(message.table, message.key)
        except CorruptRow:
            return
        new_row = replica.on_commit(row, message)
        if new_row is not None:
            # Nobody waits on a commit: it is a hint that a value is chosen,
            # and losing it in a crash only means another repair later. So it
            # shares the next fsync instead of costing one of its own.
            self.storage.stage(message.table, message.key, new_row, lazy=True)

    def _scan(self, message: ScanRequest) -> ScanReply:
        limit = max(1, min(message.limit, SCAN_LIMIT_MAX))
        start = max(message.start, message.prefix)
        end = message.end if message.end else prefix_end(message.prefix)
        rows = self.storage.scan(message.table, start, end, limit + 1)
        entries = tuple(replica.scan_entry(key, row) for key, row in rows[:limit])
        return ScanReply(entries, len(rows) > limit)
