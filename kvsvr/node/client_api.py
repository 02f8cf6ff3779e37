"""The client API of a node: get, put and scan, parsed and answered.

Each method has one parse function here (`parse_get`, `parse_put`,
`parse_scan`): the request's own `from_wire` (`kvsvr.api`, shared with the
client) checks the body, and the parse function adds what needs the node
(the table exists, its replicas, its TTL). Each has one implementation that
answers it through a `Respond` callback, whichever way the request came in
(see `kvsvr.node.engine`); replies are `kvsvr.api`'s too. Strong operations
run on the engine without a task; an eventual table's get and put talk to
the replicas in a task of the node's nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from kvsvr.api import (
    OPERATION_TIMEOUT_S,
    GetReply,
    GetRequest,
    PutReply,
    PutRequest,
    ReadConsistency,
    ScanReply,
    ScanRequest,
    TableConsistency,
)
from kvsvr.clock import Clock
from kvsvr.config import NodeConfig, TableConfig
from kvsvr.errors import Conflict, InvalidRequest, KvsvrError, Unavailable
from kvsvr.keys import decode_key, partition_prefix
from kvsvr.node.cache import CachedRow, RowCache
from kvsvr.node.engine import Drive, OperationDone, Respond, StrongReads
from kvsvr.node.replica_side import ReplicaSide
from kvsvr.node.replication import Replication
from kvsvr.node.rounds import ROUND_TIMEOUT_S, Deadline, Rounds
from kvsvr.node.write_queue import Operation
from kvsvr.node.writes import Writes
from kvsvr.protocol.catchup_messages import APPLY, ROWS, ApplyRows, RowsReply, RowsRequest
from kvsvr.protocol.coordinator import Coordinator, Mutation, Outcome, Status
from kvsvr.protocol.eventual import HybridClock, eventual_row
from kvsvr.protocol.read_lease import Holds
from kvsvr.protocol.state import EMPTY_ROW
from kvsvr.storage import decode_row, encode_row

log = logging.getLogger("kvsvr.node")


@dataclass(slots=True)
class GetQuery:
    """A client get, validated, with what the node adds."""

    table: str
    key: bytes
    replicas: list[int]
    consistency: ReadConsistency
    min_version: int
    max_age_s: float | None
    timeout_s: float
    cached_version: int | None  # the version the client's near cache holds


@dataclass(slots=True)
class PutQuery:
    """A client put, validated, with what the node adds."""

    table: str
    key: bytes
    replicas: list[int]
    value: bytes | None
    expires_at_ms: int | None
    now_ms: int
    mutation: Mutation
    timeout_s: float


@dataclass(slots=True)
class ScanQuery:
    """A client scan of one partition, validated, with what the node adds."""

    table: str
    prefix: bytes
    start: bytes
    end: bytes  # b"": to the end of the partition
    limit: int
    replicas: list[int]
    timeout_s: float


def _timeout_s(asked_s: float | None) -> float:
    """The time a request asked for, or the node's default."""
    return OPERATION_TIMEOUT_S if asked_s is None else asked_s


def raise_for(outcome: Outcome) -> None:
    """An outcome that is not ok, as the error the client gets."""
    if outcome.status == Status.OK:
        return
    if outcome.status == Status.CONFLICT:
        raise Conflict.of_version(outcome.version)
    raise Unavailable(outcome.detail or "no majority of replicas answered; outcome unknown")


class ClientApi:
    """Answers clients' gets, puts and scans; see the module's docstring."""

    def __init__(
        self,
        me: NodeConfig,
        tables: dict[str, TableConfig],
        replicas_of: Callable[[str, bytes], list[int]],
        replica_side: ReplicaSide,
        rounds: Rounds,
        writes: Writes,
        coordinator: Coordinator,
        cache: RowCache,
        hlc: HybridClock,
        clock: Clock,
    ) -> None:
        self.me = me
        self.tables = tables
        self.replicas_of = replicas_of
        self.replica_side = replica_side
        self.rounds = rounds
        self.writes = writes
        self.strong_reads = StrongReads(rounds)
        self.coordinator = coordinator
        self.cache = cache
        self.hlc = hlc
        self.clock = clock
        self.replication: Replication | None = None  # set by the node once built
        self.leased_reads = 0  # strong reads answered under a read lease, with no message
        self.nursery: trio.Nursery | None = None

    def _eventual(self, table: str) -> bool:
        return self.tables[table].consistency == TableConsistency.EVENTUAL

    def _local_version(self, table: str, key: bytes, replicas: list[int]) -> int:
        return self.replica_side.local_version(self.me.index, table, key, replicas)

    # ------------------------------------------------------------ parsing

    def _known_table(self, table: str) -> str:
        if table not in self.tables:
            raise InvalidRequest(f"unknown table {table!r}")
        return table

    def parse_get(self, body: object) -> GetQuery:
        request = GetRequest.from_wire(body)
        table = self._known_table(request.table)
        return GetQuery(
            table,
            request.key,
            self.replicas_of(table, request.partition_key()),
            request.consistency,
            request.min_version,
            request.max_age_s,
            _timeout_s(request.timeout_s),
            request.cached_version,
        )

    def parse_put(self, body: object) -> PutQuery:
        request = PutRequest.from_wire(body)
        table = self._known_table(request.table)
        value, if_version, if_absent = request.value, request.if_version, request.if_absent
        ttl_s = self.tables[table].ttl_s
        now_ms = self.clock.wall_ms()
        expires = now_ms + int(ttl_s * 1000) if ttl_s > 0 and value is not None else None
        replicas = self.replicas_of(table, request.partition_key())
        if self._eventual(table) and (if_version is not None or if_absent):
            raise InvalidRequest(
                f"table {table!r} is eventual: conditional writes need a strong table"
            )
        mutation = Mutation(value, expires, if_version, if_absent)
        return PutQuery(
            table,
            request.key,
            replicas,
            value,
            expires,
            now_ms,
            mutation,
            _timeout_s(request.timeout_s),
        )

    def parse_scan(self, body: object) -> ScanQuery:
        request = ScanRequest.from_wire(body)
        table = self._known_table(request.table)
        partition_key = request.partition_key
        return ScanQuery(
            table,
            partition_prefix(partition_key),
            request.start or b"",
            request.end or b"",
            request.limit,
            self.replicas_of(table, partition_key),
            _timeout_s(request.timeout_s),
        )

    # ------------------------------------------------------------ get

    def get(self, body: object, respond: Respond) -> None:
        try:
            request = self.parse_get(body)
        except KvsvrError as error:
            respond(None, error)
            return
        self.read(request, respond)

    def read(self, get: GetQuery, respond: Respond) -> None:
        """Answer a parsed get: an eventual table's from one replica, a local or
        stale read without a round when it can, else a strong read round
        (shared with the other strong reads of the key: `StrongReads`)."""
        if self._eventual(get.table):
            self._answer_in_task(respond, self._eventual_get(get))
            return
        try:
            answer = self._get_without_quorum(get)
        except KvsvrError as error:
            respond(None, error)
            return
        if answer is not None:
            respond(answer, None)
            return
        table, key, replicas = get.table, get.key, get.replicas
        holds = self.rounds.holds
        if holds is not None and holds.reads_locally(table, key, self.clock.monotonic()):
            entry = self.cache.get(table, key)
            if entry is not None:
                # A read lease of ours holds: no other node can get a version
                # chosen, and we have none in flight (`kvsvr.protocol.read_lease`).
                self.leased_reads += 1
                respond(self._leased_answer(entry, get.cached_version), None)
                return

        def make() -> Operation:
            return self._strong_read_operation(table, key, replicas)

        def reply_of(outcome: Outcome) -> object:
            return self._strong_get_reply(table, key, outcome, get.cached_version)

        done = _answering(respond, reply_of)

        self.strong_reads.start((table, key), make, Deadline(get.timeout_s), done)

    def _get_without_quorum(self, get: GetQuery) -> dict[str, Any] | None:
        """The answer of a strong table's local or stale read, when it needs
        no quorum round; None when it does (strong, or a stale read the cache
        and this replica cannot honour: counted as a fallback)."""
        if get.consistency is ReadConsistency.LOCAL:
            if self.me.index not in get.replicas:
                raise InvalidRequest(f"node {self.me.id} holds no replica of this key")
            row = self.replica_side.read_row(get.table, get.key)
            return self._answer(row.version, row.value, row.expires_at_ms)
        if get.consistency is ReadConsistency.STALE:
            answer = self._stale_answer(get)
            if answer is not None:
                return answer
            self.cache.stats.fallbacks += 1
        return None

    def _stale_answer(self, get: GetQuery) -> dict[str, Any] | None:
        """A stale read without a quorum round: the cache (within `max_age_s`),
        else this node's replica (no age bound given), never older than the
        version the client's session already saw. None: a strong read is needed."""
        cached = self.cache.get(get.table, get.key)
        if (
            cached is not None
            and cached.version >= get.min_version
            and (
                get.max_age_s is None
                or self.clock.monotonic() - cached.cached_at_s <= get.max_age_s
            )
        ):
            self.cache.stats.stale_served += 1
            return self._answer(cached.version, cached.value, cached.expires_at_ms)
        if get.max_age_s is None and self.me.index in get.replicas:
            row = self.replica_side.read_row(get.table, get.key)
            if row.version >= get.min_version:
                self.cache.stats.stale_served += 1
                return self._answer(row.version, row.value, row.expires_at_ms)
        return None

    def _strong_read_operation(self, table: str, key: bytes, replicas: list[int]) -> Operation:
        # Made when the round starts (it may serve later readers too).
        entry = self.cache.get(table, key)
        cached = None if entry is None else (entry.version, entry.value, entry.expires_at_ms)
        # Replicas compare against the cached version when there is one.
        known = -1 if cached is not None else self._local_version(table, key, replicas)
        holds = self.rounds.holds
        if holds is None or not self.cache.enabled or not self.tables[table].read_leases:
            return self.coordinator.read(table, key, replicas, self.clock.wall_ms(), known, cached)
        return self._leasing_read(holds, table, key, replicas, known, cached)

    def _leasing_read(
        self,
        holds: Holds,
        table: str,
        key: bytes,
        replicas: list[int],
        known: int,
        cached: tuple[int, bytes | None, int | None] | None,
    ) -> Operation:
        """A strong read that asks for a read lease, counted from before its
        first request leaves; once held, the key's value waits in the cache
        for the reads the lease answers."""
        clock = self.clock
        sent_at = clock.monotonic()
        started = holds.read_started(table, key)
        outcome: Outcome = yield from self.coordinator.read(
            table, key, replicas, clock.wall_ms(), known, cached, lease=True
        )
        if outcome.leased and outcome.status == Status.OK:
            now = clock.monotonic()
            if holds.took(table, key, sent_at, now, started):
                self.cache.put(
                    table, key, outcome.version, outcome.value, outcome.expires_at_ms, now
                )
        return outcome

    def _leased_answer(self, entry: CachedRow, client_version: int | None) -> dict[str, Any]:
        if client_version is not None and entry.version == client_version:
            if entry.value is not None:
                self.cache.stats.unchanged += 1
                return GetReply(entry.version, None, unchanged=True).to_wire()
        return self._answer(entry.version, entry.value, entry.expires_at_ms)

    def _strong_get_reply(
        self, table: str, key: bytes, outcome: Outcome, client_version: int | None
    ) -> dict[str, Any]:
        raise_for(outcome)
        if outcome.cache_hit:
            self.cache.stats.hits += 1
        else:
            self.cache.stats.misses += 1
            self.cache.put(
                table,
                key,
                outcome.version,
                outcome.value,
                outcome.expires_at_ms,
                self.clock.monotonic(),
            )
        if client_version is None:
            return GetReply(outcome.version, outcome.value).to_wire()
        # A client near cache holds `client_version`: the quorum decided, and if
        # it chose exactly that version (value present) the value need not travel.
        if outcome.version == client_version and outcome.value is not None:
            self.cache.stats.unchanged += 1
            return GetReply(outcome.version, None, unchanged=True).to_wire()
        return GetReply(outcome.version, outcome.value, outcome.expires_at_ms).to_wire()

    def _answer(
        self, version: int, value: bytes | None, expires_at_ms: int | None
    ) -> dict[str, Any]:
        present = value is not None and (
            expires_at_ms is None or expires_at_ms > self.clock.wall_ms()
        )
        return GetReply(version, value if present else None).to_wire()

    # ------------------------------------------------------------ put

    def put(self, body: object, respond: Respond) -> None:
        try:
            put = self.parse_put(body)
        except KvsvrError as error:
            respond(None, error)
            return
        if self._eventual(put.table):
            self._answer_in_task(respond, self._eventual_put(put))
            return

        done = _answering(respond, partial(self._put_reply, put))

        self.writes.start(
            put.table,
            put.key,
            put.replicas,
            put.mutation,
            put.now_ms,
            Deadline(put.timeout_s),
            done,
        )

    def _put_reply(self, put: PutQuery, outcome: Outcome) -> dict[str, Any]:
        raise_for(outcome)
        self.cache.put(
            put.table,
            put.key,
            outcome.version,
            put.value,
            put.expires_at_ms,
            self.clock.monotonic(),
        )
        assert self.replication is not None
        self.replication.hint_after_write(
            put.table, put.key, put.replicas, outcome.version, put.value, put.expires_at_ms
        )
        return PutReply(outcome.version).to_wire()

    # ------------------------------------------------------------ scan

    def scan(self, body: object, respond: Respond) -> None:
        try:
            scan = self.parse_scan(body)
        except KvsvrError as error:
            respond(None, error)
            return
        prefix = scan.prefix
        end_key = prefix + scan.end if scan.end else b""
        operation = self.coordinator.scan(
            scan.table,
            prefix,
            prefix + scan.start,
            end_key,
            scan.limit,
            scan.replicas,
            self.clock.wall_ms(),
        )

        done = _answering(respond, _scan_reply)

        Drive(self.rounds, operation, Deadline(scan.timeout_s), done).start()

    # ------------------------------------------------------------ eventual tables

    def _answer_in_task(
        self, respond: Respond, answer: Coroutine[Any, Any, dict[str, Any]]
    ) -> None:
        """Answer a request that needs a task (an eventual table's)."""
        assert self.nursery is not None
        self.nursery.start_soon(_answer_task, respond, answer)

    async def _eventual_get(self, get: GetQuery) -> dict[str, Any]:
        """An eventual table is read from one replica: this node's when it holds
        one, else the first that answers. Every consistency reads the same way."""
        table, key, replicas = get.table, get.key, get.replicas
        if self.me.index in replicas:
            row = self.replica_side.read_row(table, key)
            return self._answer(row.version, row.value, row.expires_at_ms)
        if get.consistency is ReadConsistency.LOCAL:
            raise InvalidRequest(f"node {self.me.id} holds no replica of this key")
        last_error: KvsvrError = Unavailable("no replica answered")
        for target in replicas:
            try:
                with trio.fail_after(ROUND_TIMEOUT_S):
                    body = await self.rounds.peers[target].call(
                        ROWS, RowsRequest(table, (key,)).to_wire()
                    )
            except trio.TooSlowError:
                continue
            except KvsvrError as error:
                last_error = error
                continue
            (raw,) = RowsReply.from_wire(body, 1).rows
            row = EMPTY_ROW if raw is None else decode_row(raw)
            return self._answer(row.version, row.value, row.expires_at_ms)
        raise Unavailable(f"no replica of the key answered: {last_error}")

    async def _eventual_put(self, put: PutQuery) -> dict[str, Any]:
        """Stamp the write, send it to every replica, answer after `write_quorum`
        acknowledged. The others keep receiving it in the background; one that
        fails gets a hint."""
        assert self.nursery is not None and self.replication is not None
        catch_up = self.replication
        table, key, replicas = put.table, put.key, put.replicas
        row = eventual_row(self.hlc.now(self.clock.wall_ms()), put.value, put.expires_at_ms)
        raw = encode_row(row)
        need = min(self.tables[table].write_quorum, len(replicas))
        acked = 0
        failed = 0
        enough = trio.Event()

        async def send(target: int) -> None:
            nonlocal acked, failed
            try:
                if target == self.me.index:
                    await catch_up.apply(table, [(key, raw)], eventual=True)
                else:
                    with trio.fail_after(OPERATION_TIMEOUT_S):
                        await self.rounds.peers[target].call(
                            APPLY, ApplyRows(table, ((key, raw),)).to_wire()
                        )
                acked += 1
            except (KvsvrError, trio.TooSlowError):
                failed += 1
                catch_up.hint(target, table, key, row)
            if acked >= need or failed > len(replicas) - need:
                enough.set()

        for target in replicas:
            self.nursery.start_soon(send, target)
        with trio.move_on_after(put.timeout_s):
            await enough.wait()
        if acked < need:
            raise Unavailable(
                f"{acked} of the {need} replicas needed acknowledged; the write may still land"
            )
        return PutReply(row.version).to_wire()


def _answering(respond: Respond, reply_of: Callable[[Outcome], object]) -> OperationDone:
    """How an operation's end answers its client: the reply `reply_of` makes of
    the outcome, or the error it raises, or the operation's error."""

    def done(outcome: Outcome | None, error: KvsvrError | None) -> None:
        if outcome is None:
            respond(None, error)
            return
        try:
            reply = reply_of(outcome)
        except KvsvrError as failure:  # answered here: no cycle through the frame
            respond(None, failure)
        else:
            respond(reply, None)

    return done


def _scan_reply(outcome: Outcome) -> dict[str, Any]:
    raise_for(outcome)
    rows: list[tuple[bytes, bytes, int]] = []
    for entry in outcome.entries:
        _, sort_key = decode_key(entry.key)
        assert entry.value is not None, "a scan returns live rows only"
        rows.append((sort_key, entry.value, entry.version))
    return ScanReply(tuple(rows)).to_wire()


async def _answer_task(respond: Respond, answer: Coroutine[Any, Any, dict[str, Any]]) -> None:
    # A task of the node's nursery: nothing may escape it but cancellation.
    try:
        reply = await answer
    except KvsvrError as error:
        respond(None, error)
    except Exception as exc:
        log.exception("a client request failed")
        respond(None, KvsvrError(f"internal error: {exc!r}"))
    else:
        respond(reply, None)
