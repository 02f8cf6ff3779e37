"""The client API of a node: get, put and scan, parsed and answered.

Each method has one parse function here (`parse_get`, `parse_put`,
`parse_scan`) that validates a request body, and one implementation that
answers it through a `Respond` callback, whichever way the request came in
(see `kvsvr.node.engine`). Strong operations run on the engine without a
task; an eventual table's get and put talk to the replicas in a task of the
node's nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from kvsvr.clock import Clock
from kvsvr.config import NodeConfig, TableConfig
from kvsvr.errors import Conflict, FrameError, InvalidRequest, KvsvrError, Unavailable
from kvsvr.keys import decode_key, partition_prefix
from kvsvr.node import replication
from kvsvr.node.cache import RowCache
from kvsvr.node.engine import (
    OPERATION_TIMEOUT_MAX_S,
    OPERATION_TIMEOUT_S,
    Drive,
    OperationDone,
    Respond,
    StrongReads,
)
from kvsvr.node.replica_side import SCAN_LIMIT_MAX, ReplicaSide
from kvsvr.node.replication import Replication
from kvsvr.node.rounds import ROUND_TIMEOUT_S, Deadline, Rounds
from kvsvr.node.write_queue import Operation
from kvsvr.node.writes import Writes
from kvsvr.protocol.coordinator import Coordinator, Mutation, Outcome
from kvsvr.protocol.eventual import HybridClock, eventual_row
from kvsvr.protocol.state import EMPTY_ROW
from kvsvr.storage import decode_row, encode_row

log = logging.getLogger("kvsvr.node")

# Largest value a client may store; frames are bounded at 16 MiB.
VALUE_BYTES_MAX = 1 << 20
SCAN_LIMIT_DEFAULT = 1000
CONSISTENCIES = ("strong", "stale", "local")


@dataclass(slots=True)
class GetRequest:
    """A client get, validated."""

    table: str
    key: bytes
    replicas: list[int]
    consistency: str
    min_version: int
    max_age_s: float | None
    timeout_s: float
    cached_version: int | None  # the version the client's near cache holds


@dataclass(slots=True)
class PutRequest:
    """A client put, validated."""

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
    """A client scan of one partition, validated."""

    table: str
    prefix: bytes
    start: bytes
    end: bytes  # b"": to the end of the partition
    limit: int
    replicas: list[int]
    timeout_s: float


def _body_map(method: str, body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{method}: the body must be a map")
    return body


def _timeout(body: dict[str, Any]) -> float:
    timeout = body.get("timeout_s", OPERATION_TIMEOUT_S)
    if not isinstance(timeout, int | float) or not 0 < timeout <= OPERATION_TIMEOUT_MAX_S:
        raise InvalidRequest(f"timeout_s must be in (0, {OPERATION_TIMEOUT_MAX_S}]")
    return float(timeout)


def _table(body: dict[str, Any], tables: dict[str, TableConfig]) -> str:
    table = body.get("table", "default")
    if not isinstance(table, str):
        raise InvalidRequest("table must be a str")
    if table not in tables:
        raise InvalidRequest(f"unknown table {table!r}")
    return table


def _key(body: dict[str, Any]) -> tuple[bytes, bytes]:
    key = body.get("key")
    if not isinstance(key, bytes):
        raise InvalidRequest("key must be bytes (an encoded key)")
    partition_key, _ = decode_key(key)
    if not partition_key:
        raise InvalidRequest("the partition key must not be empty")
    return key, partition_key


def _cached_version(body: dict[str, Any]) -> int | None:
    """The version a strong get's client holds in its near cache (optional)."""
    version = body.get("cached_version")
    if version is None:
        return None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidRequest("cached_version must be an int >= 1 or None")
    return version


def raise_for(outcome: Outcome) -> None:
    """An outcome that is not ok, as the error the client gets."""
    if outcome.status == "ok":
        return
    if outcome.status == "conflict":
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
        self.nursery: trio.Nursery | None = None

    def _eventual(self, table: str) -> bool:
        return self.tables[table].consistency == "eventual"

    def _local_version(self, table: str, key: bytes, replicas: list[int]) -> int:
        return self.replica_side.local_version(self.me.index, table, key, replicas)

    # ------------------------------------------------------------ parsing

    def parse_get(self, body: object) -> GetRequest:
        request = _body_map("get", body)
        table = _table(request, self.tables)
        key, partition_key = _key(request)
        consistency = request.get("consistency", "strong")
        if consistency not in CONSISTENCIES:
            raise InvalidRequest("consistency must be 'strong', 'stale' or 'local'")
        min_version = request.get("min_version") or 0
        if not isinstance(min_version, int):
            raise InvalidRequest("min_version must be an int")
        max_age_s = request.get("max_age_s")
        if max_age_s is not None and (
            not isinstance(max_age_s, int | float) or isinstance(max_age_s, bool) or max_age_s < 0
        ):
            raise InvalidRequest("max_age_s must be a number >= 0 or None")
        replicas = self.replicas_of(table, partition_key)
        return GetRequest(
            table,
            key,
            replicas,
            consistency,
            min_version,
            max_age_s,
            _timeout(request),
            _cached_version(request),
        )

    def parse_put(self, body: object) -> PutRequest:
        request = _body_map("put", body)
        table = _table(request, self.tables)
        key, partition_key = _key(request)
        value = request.get("value")
        if value is not None and not isinstance(value, bytes):
            raise InvalidRequest("value must be bytes (or None to delete)")
        if value is not None and len(value) > VALUE_BYTES_MAX:
            raise InvalidRequest(f"value is {len(value)} bytes; the limit is {VALUE_BYTES_MAX}")
        if_version = request.get("if_version")
        if if_version is not None and (not isinstance(if_version, int) or if_version < 0):
            raise InvalidRequest("if_version must be an int >= 0")
        if_absent = request.get("if_absent", False)
        if not isinstance(if_absent, bool):
            raise InvalidRequest("if_absent must be a bool")
        ttl_s = self.tables[table].ttl_s
        now_ms = self.clock.wall_ms()
        expires = now_ms + int(ttl_s * 1000) if ttl_s > 0 and value is not None else None
        replicas = self.replicas_of(table, partition_key)
        if self._eventual(table) and (if_version is not None or if_absent):
            raise InvalidRequest(
                f"table {table!r} is eventual: conditional writes need a strong table"
            )
        mutation = Mutation(value, expires, if_version, if_absent)
        return PutRequest(table, key, replicas, value, expires, now_ms, mutation, _timeout(request))

    def parse_scan(self, body: object) -> ScanQuery:
        request = _body_map("scan", body)
        table = _table(request, self.tables)
        partition_key = request.get("partition_key")
        if not isinstance(partition_key, bytes) or not partition_key:
            raise InvalidRequest("partition_key must be non-empty bytes")
        start = request.get("start") or b""
        end = request.get("end") or b""
        if not isinstance(start, bytes) or not isinstance(end, bytes):
            raise InvalidRequest("start and end must be bytes")
        limit = request.get("limit", SCAN_LIMIT_DEFAULT)
        if not isinstance(limit, int) or not 1 <= limit <= SCAN_LIMIT_MAX:
            raise InvalidRequest(f"limit must be between 1 and {SCAN_LIMIT_MAX}")
        replicas = self.replicas_of(table, partition_key)
        return ScanQuery(
            table,
            partition_prefix(partition_key),
            start,
            end,
            limit,
            replicas,
            _timeout(request),
        )

    # ------------------------------------------------------------ get

    def get(self, body: object, respond: Respond) -> None:
        try:
            request = self.parse_get(body)
        except KvsvrError as error:
            respond(None, error)
            return
        self.read(request, respond)

    def read(self, get: GetRequest, respond: Respond) -> None:
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

        def make() -> Operation:
            return self._strong_read_operation(table, key, replicas)

        def reply_of(outcome: Outcome) -> object:
            return self._strong_get_reply(table, key, outcome, get.cached_version)

        done = _answering(respond, reply_of)

        self.strong_reads.start((table, key), make, Deadline(get.timeout_s), done)

    def _get_without_quorum(self, get: GetRequest) -> dict[str, Any] | None:
        """The answer of a strong table's local or stale read, when it needs
        no quorum round; None when it does (strong, or a stale read the cache
        and this replica cannot honour: counted as a fallback)."""
        if get.consistency == "local":
            if self.me.index not in get.replicas:
                raise InvalidRequest(f"node {self.me.id} holds no replica of this key")
            row = self.replica_side.read_row(get.table, get.key)
            return self._answer(row.version, row.value, row.expires_at_ms)
        if get.consistency == "stale":
            answer = self._stale_answer(get)
            if answer is not None:
                return answer
            self.cache.stats.fallbacks += 1
        return None

    def _stale_answer(self, get: GetRequest) -> dict[str, Any] | None:
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
        return self.coordinator.read(table, key, replicas, self.clock.wall_ms(), known, cached)

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
            return {"version": outcome.version, "value": outcome.value}
        # A client near cache holds `client_version`: the quorum decided, and if
        # it chose exactly that version (value present) the value need not travel.
        if outcome.version == client_version and outcome.value is not None:
            self.cache.stats.unchanged += 1
            return {"version": outcome.version, "unchanged": True}
        return {
            "version": outcome.version,
            "value": outcome.value,
            "expires_at_ms": outcome.expires_at_ms,
        }

    def _answer(
        self, version: int, value: bytes | None, expires_at_ms: int | None
    ) -> dict[str, Any]:
        present = value is not None and (
            expires_at_ms is None or expires_at_ms > self.clock.wall_ms()
        )
        return {"version": version, "value": value if present else None}

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

    def _put_reply(self, put: PutRequest, outcome: Outcome) -> dict[str, Any]:
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
        return {"version": outcome.version}

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

    async def _eventual_get(self, get: GetRequest) -> dict[str, Any]:
        """An eventual table is read from one replica: this node's when it holds
        one, else the first that answers. Every consistency reads the same way."""
        table, key, replicas = get.table, get.key, get.replicas
        if self.me.index in replicas:
            row = self.replica_side.read_row(table, key)
            return self._answer(row.version, row.value, row.expires_at_ms)
        if get.consistency == "local":
            raise InvalidRequest(f"node {self.me.id} holds no replica of this key")
        last_error: KvsvrError = Unavailable("no replica answered")
        for target in replicas:
            try:
                with trio.fail_after(ROUND_TIMEOUT_S):
                    rows = await self.rounds.peers[target].call(replication.ROWS, [table, [key]])
            except trio.TooSlowError:
                continue
            except KvsvrError as error:
                last_error = error
                continue
            if not isinstance(rows, list) or len(rows) != 1:
                raise FrameError("ae_rows answers one row per key")
            row = EMPTY_ROW if rows[0] is None else decode_row(rows[0])
            return self._answer(row.version, row.value, row.expires_at_ms)
        raise Unavailable(f"no replica of the key answered: {last_error}")

    async def _eventual_put(self, put: PutRequest) -> dict[str, Any]:
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
                            replication.APPLY, [table, [[key, raw]]]
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
        return {"version": row.version}


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
    items = []
    for entry in outcome.entries:
        _, sort_key = decode_key(entry.key)
        items.append([sort_key, entry.value, entry.version])
    return {"items": items}


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
