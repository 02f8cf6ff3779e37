"""The async kvsvr client (`Client`, made by `connect`): routes each key to
its partition's preferred coordinator, keeps one connection per node, and
builds and reads the messages of `kvsvr.api`. See `kvsvr.client` for the
whole client's guarantees."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Final

import crc32c
import trio

from kvsvr import net
from kvsvr.api import (
    DEFAULT_TABLE,
    SCAN_LIMIT_DEFAULT,
    GetReply,
    GetRequest,
    MapRequest,
    Method,
    NodeInfo,
    PartitionMap,
    PutReply,
    PutRequest,
    ReadConsistency,
    RecoverRequest,
    ScanReply,
    ScanRequest,
    StatusRequest,
    format_address,
    report_from_wire,
)
from kvsvr.client_cache import NearCache, SessionVersions, near_reply
from kvsvr.client_item import Item as Item
from kvsvr.client_item import item_of
from kvsvr.client_options import (
    check_consistency,
    check_limit,
    check_max_age,
    check_near_cache_bytes,
    check_timeout,
    check_value,
    check_version,
    secret_bytes,
    tls_context,
)
from kvsvr.client_routing import (
    address_list,
    node_address,
    not_ready_because,
    parse_address,
    partition_hash_seed,
    route,
)
from kvsvr.client_watch import StartVersion, Watch
from kvsvr.errors import InvalidRequest, KvsvrError, Timeout, Unavailable
from kvsvr.keys import KeyPart, UserKey, encode_key, split_user_key, to_bytes
from kvsvr.net.tls import TLSOptions
from kvsvr.protocol.placement import partition_of

logger = logging.getLogger(__name__)

# How long a node that could not be connected to is skipped in favour of the
# next replica. Short, because a restarted node should get its keys back soon;
# long enough that every operation meanwhile does not pay a failed connect.
NODE_DOWN_S: Final = 3.0

# Time one connection attempt (TCP connect and handshake) gets. A live node on
# the same network answers in milliseconds; past this it is down or drowning,
# and the next replica should get a try while the operation still has time.
CONNECT_ATTEMPT_TIMEOUT_S: Final = 2.0

# How often `wait_ready` asks the nodes again.
READY_POLL_S: Final = 0.1

_crc32c = crc32c.crc32c


# --- the async client ---------------------------------------------------------------


class Client:
    """An async kvsvr client. Make one with `kvsvr.connect(...)`, which hosts its
    connections' background tasks and closes it on exit."""

    def __init__(
        self,
        nursery: trio.Nursery,
        partition_map: PartitionMap,
        *,
        secret: bytes | None,
        timeout_s: float,
        home_address: str | None = None,
        near_cache_bytes: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._nursery = nursery
        # Per partition, its replicas with their addresses (see `_candidates`),
        # the map's table names, and the partition hash's mask and per-table
        # seeds (`partition_hash_seed`): all follow `_set_map`.
        self._replicas: dict[int, tuple[tuple[NodeInfo, str], ...]] = {}
        self._table_names: frozenset[str] = frozenset()
        self._partition_mask = 0
        self._hash_seeds: dict[str, int] = {}
        self._set_map(partition_map)
        self._secret = secret
        self._tls = tls
        self._timeout_s = check_timeout(timeout_s)
        self._home_address = home_address  # the node `status()` asks by default
        self._connections: dict[str, net.RpcConnection] = {}
        self._connect_locks: dict[str, trio.Lock] = {}
        self._down_until: dict[str, float] = {}
        self._session = SessionVersions()
        bytes_max = check_near_cache_bytes(near_cache_bytes)
        self._near_cache = NearCache(bytes_max) if bytes_max else None
        self._closed = False

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def near_cache(self) -> NearCache | None:
        """The client's near cache (None when off): its figures are in `.stats`."""
        return self._near_cache

    # --- public operations ---

    async def get(
        self,
        key: UserKey,
        *,
        table: str = DEFAULT_TABLE,
        consistency: str = "strong",
        max_age_s: float | None = None,
    ) -> Item | None:
        """The key's value and version, or None if it is absent.

        `consistency="strong"` (the default) is linearizable. `"stale"` and
        `"local"` are answered by one replica without a quorum round, possibly
        older than the latest write (at most `max_age_s` old if given) but never
        older than what this client last wrote or read for the key."""
        # The hot path: everything an operation needs is done here, in this
        # coroutine, down to `RpcConnection.request` (each layer of coroutines
        # costs on every suspension and resumption); `_get` and `_call` do the
        # rest (near cache, no open connection yet, a replica lost).
        if type(table) is not str or table not in self._table_names:
            self._check_table(table)
        if type(key) is bytes:  # the common case, without split_user_key's checks
            partition_key = key
            encoded = encode_key(key)
        else:
            partition_key, sort_key = split_user_key(key)
            encoded = encode_key(partition_key, sort_key)
        read = check_consistency(consistency)
        max_age = check_max_age(max_age_s)
        min_version = 0 if read is ReadConsistency.STRONG else self._session.version(table, encoded)
        if self._closed:
            raise RuntimeError("the kvsvr client is closed")
        deadline = trio.current_time() + self._timeout_s
        try:
            if self._near_cache is None:
                body = GetRequest(table, encoded, read, max_age, min_version).to_wire()
                candidates = self._candidates(table, partition_key)
                connection = self._connections.get(candidates[0][1])
                if connection is not None and not connection.closed:
                    try:
                        reply = await connection.request(Method.GET, body, deadline=deadline)
                    except Unavailable as exc:
                        if not connection.closed:
                            raise
                        # A read is repeatable: on to the next replicas, as in `_call`.
                        self._mark_down(candidates[0][1])
                        reply = await self._call_from(
                            candidates, 1, [str(exc)], Method.GET, body, True, deadline
                        )
                else:
                    reply = await self._call_from(
                        candidates, 0, [], Method.GET, body, True, deadline
                    )
                answer = GetReply.from_wire(reply)
                version, value = answer.version, answer.value
            else:
                version, value = await self._get(
                    table, partition_key, encoded, read, max_age, min_version, deadline
                )
            if version < min_version:
                # The node should have fallen back to a strong read itself; if it
                # did not, do it here rather than let the session go backwards.
                logger.warning(
                    "a %s read returned version %d < %d", consistency, version, min_version
                )
                version, value = await self._get(
                    table, partition_key, encoded, ReadConsistency.STRONG, None, 0, deadline
                )
        except trio.TooSlowError:
            raise self._timed_out("get") from None
        self._session.observe(table, encoded, version)
        return None if value is None else item_of(value, version)

    async def put(
        self,
        key: UserKey,
        value: bytes,
        *,
        table: str = DEFAULT_TABLE,
        if_version: int | None = None,
        if_absent: bool = False,
    ) -> int:
        """Write `value`; returns the version it was written at. With
        `if_version`, only if the key's current version is that one; with
        `if_absent`, only if the key holds no value. Otherwise `Conflict`, and
        nothing is written."""
        # `_write`, inlined (as `get`, the hot path is one coroutine down to
        # `RpcConnection.request`).
        value = check_value(value)
        partition_key, encoded, body = self._write_request(key, value, table, if_version, if_absent)
        deadline = self._operation_deadline()
        try:
            candidates = self._candidates(table, partition_key)
            connection = self._connections.get(candidates[0][1])
            if connection is not None and not connection.closed:
                reply = await connection.request(Method.PUT, body, deadline=deadline)
            else:
                reply = await self._call_from(candidates, 0, [], Method.PUT, body, False, deadline)
        except trio.TooSlowError:
            raise self._timed_out("put") from None
        return self._written(table, encoded, value, reply)

    async def delete(
        self, key: UserKey, *, table: str = DEFAULT_TABLE, if_version: int | None = None
    ) -> int:
        """Delete the key (a tombstone at a new version, which is returned)."""
        return await self._write(
            "delete", key, None, table=table, if_version=if_version, if_absent=False
        )

    async def cas(
        self, key: UserKey, value: bytes, *, if_version: int, table: str = DEFAULT_TABLE
    ) -> int:
        """Compare-and-set: `put(key, value, if_version=if_version)`."""
        if if_version is None:
            raise InvalidRequest("cas needs if_version")
        return await self.put(key, value, table=table, if_version=if_version)

    async def scan(
        self,
        partition_key: KeyPart,
        *,
        table: str = DEFAULT_TABLE,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
        limit: int = SCAN_LIMIT_DEFAULT,
    ) -> list[Item]:
        """The rows of one partition key with sort keys in [start, end), in
        sort-key order, at most `limit` of them. Each `Item.key` is a sort key."""
        self._check_table(table)
        partition = to_bytes(partition_key)
        encode_key(partition)  # checks the partition key's size
        start_key = None if start is None else to_bytes(start)
        end_key = None if end is None else to_bytes(end)
        body = ScanRequest(table, partition, start_key, end_key, check_limit(limit)).to_wire()
        deadline = self._operation_deadline()
        try:
            reply = await self._call(
                table, partition, Method.SCAN, body, repeatable=True, deadline=deadline
            )
        except trio.TooSlowError:
            raise self._timed_out("scan") from None
        items: list[Item] = []
        for sort_key, value, version in ScanReply.from_wire(reply).rows:
            self._session.observe(table, encode_key(partition, sort_key), version)
            items.append(Item(value=value, version=version, key=sort_key))
        return items

    def watch(
        self,
        key: UserKey,
        *,
        table: str = DEFAULT_TABLE,
        start_version: StartVersion = None,
        partition: bool = False,
        start: KeyPart | None = None,
        end: KeyPart | None = None,
    ) -> Watch:
        """The changes of a key (`partition=True`: of the rows of a partition key
        with sort keys in [start, end)) after `start_version` (None: from the
        current version): see `Watch`."""
        return Watch(self, key, self._check_table(table), start_version, partition, start, end)

    async def status(self, node: str | None = None) -> dict[str, Any]:
        """A node's status (id, partitions held, counters...). `node` is a node
        id or "host:port"; None asks the node the client first reached."""
        with self._deadline("status"):
            connection = await self._status_connection(node)
            reply = await connection.request(Method.STATUS, StatusRequest().to_wire())
            return report_from_wire(reply, Method.STATUS)

    async def recover(
        self, node: str, *, accept_data_loss: bool, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """Tell a node that waits for an operator (a majority of some partition's
        replicas lost their data) to rebuild from the replicas that kept theirs.
        Returns once it is ready, with what may have been lost (`"loss"`);
        a node that needs no operator answers `"recovered": False`."""
        if not accept_data_loss:
            raise InvalidRequest("recovery may lose acknowledged writes: pass accept_data_loss")
        if not timeout_s > 0:
            raise InvalidRequest(f"timeout_s must be > 0, not {timeout_s!r}")
        try:
            with trio.fail_after(timeout_s):
                connection = await self._status_connection(node)
                reply = await connection.request(
                    Method.RECOVER,
                    RecoverRequest(accept_data_loss=True).to_wire(),
                    deadline=trio.current_time() + timeout_s,
                )
        except trio.TooSlowError:
            raise Timeout(f"node {node} did not finish recovering in {timeout_s:g} s") from None
        return report_from_wire(reply, Method.RECOVER)

    async def cluster_status(self) -> list[dict[str, Any]]:
        """Every node of the map, asked at once: its status with `"health"`
        set to its replica's state ("ready", "starting", "waiting_for_peers",
        "rebuilding", "needs_operator"; only "ready" serves), or only its id,
        address and zone with `"health"` saying why it could not be asked."""
        results: dict[str, dict[str, Any]] = {}

        async def ask(node: NodeInfo) -> None:
            try:
                with trio.fail_after(self._timeout_s):
                    status = await self.status(node.id)
                replication = status.get("replication")
                state = replication.get("state") if isinstance(replication, Mapping) else None
                status["health"] = str(state) if state is not None else "answering"
            except (KvsvrError, trio.TooSlowError) as error:
                status = {"node": node.id, "health": f"unreachable ({error})"}
            status.setdefault("address", f"{node.host}:{node.port}")
            status.setdefault("zone", node.zone)
            results[node.id] = status

        async with trio.open_nursery() as nursery:
            for node in self._map.nodes:
                nursery.start_soon(ask, node)
        return [results[node.id] for node in self._map.nodes]

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every node of the map answers, its replica is "ready"
        (it votes: a node with an empty data directory first founds the
        cluster or rebuilds what it lost; see `cluster_status` for the other
        states) and it sees every other node up. Raises `Timeout` after
        `timeout_s`, saying which nodes were not ready and why (a node that
        needs an operator says so)."""
        if not timeout_s > 0:
            raise InvalidRequest(f"timeout_s must be > 0, not {timeout_s!r}")
        waiting = {node.id: "not asked yet" for node in self._map.nodes}
        with trio.move_on_after(timeout_s):
            while True:
                for status in await self.cluster_status():
                    reason = not_ready_because(status)
                    if reason is None:
                        waiting.pop(str(status.get("node")), None)
                    else:
                        waiting[str(status.get("node"))] = reason
                if not waiting:
                    return
                await trio.sleep(READY_POLL_S)
        detail = "; ".join(f"{node}: {reason}" for node, reason in sorted(waiting.items()))
        raise Timeout(f"cluster not ready after {timeout_s:g} s ({detail})")

    async def partition_map(self, *, refresh: bool = False) -> PartitionMap:
        """The partition map the client routes by; `refresh=True` fetches it anew."""
        if refresh:
            with self._deadline("map"):
                connection = await self._status_connection(None)
                self._set_map(await _fetch_map(connection))
        else:
            await trio.lowlevel.checkpoint()
        return self._map

    async def aclose(self) -> None:
        """Close every connection. Operations after this raise RuntimeError."""
        self._closed = True
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            await connection.aclose()
        await trio.lowlevel.checkpoint()

    # --- internals ---

    @contextmanager
    def _deadline(self, operation: str) -> Iterator[None]:
        """Bound an operation that is not on the hot path by the client's timeout."""
        deadline = self._operation_deadline()
        try:
            with trio.fail_at(deadline):
                yield
        except trio.TooSlowError:
            raise self._timed_out(operation) from None

    def _operation_deadline(self) -> float:
        """The time (trio's clock) by which an operation starting now must end.
        The hot path passes it down (`_call`, `RpcConnection.request`) instead of
        opening a cancel scope per operation; a `trio.TooSlowError` raised from
        there means it has passed."""
        if self._closed:
            raise RuntimeError("the kvsvr client is closed")
        return trio.current_time() + self._timeout_s

    def _timed_out(self, operation: str) -> Timeout:
        return Timeout(f"{operation} timed out after {self._timeout_s} s; the outcome is unknown")

    def _check_table(self, table: object) -> str:
        if type(table) is str and table in self._table_names:
            return table
        if not isinstance(table, str):
            raise InvalidRequest(f"a table name must be a str, not {type(table).__name__}")
        if self._map.tables and self._map.table(table) is None:
            known = ", ".join(t.name for t in self._map.tables)
            raise InvalidRequest(f"no table {table!r} in this cluster (tables: {known})")
        return table

    def _key(self, table: str, key: UserKey) -> tuple[bytes, bytes]:
        """(partition key, encoded key), checked."""
        self._check_table(table)
        if type(key) is bytes:  # the common case, without split_user_key's checks
            return key, encode_key(key)
        partition_key, sort_key = split_user_key(key)
        return partition_key, encode_key(partition_key, sort_key)

    async def _get(
        self,
        table: str,
        partition_key: bytes,
        encoded: bytes,
        consistency: ReadConsistency,
        max_age_s: float | None,
        min_version: int,
        deadline: float,
    ) -> tuple[int, bytes | None]:
        """A get off `get`'s hot path: through the near cache, or with no
        connection open yet."""
        near_cache = self._near_cache
        near = None
        if near_cache is not None and consistency is ReadConsistency.STRONG:
            near = near_cache.get(table, encoded, int(time.time() * 1000))
            if near is None:
                near_cache.stats.misses += 1
        request = GetRequest(
            table,
            encoded,
            consistency,
            max_age_s,
            min_version,
            cached_version=None if near is None else near.version,
        )
        reply = GetReply.from_wire(
            await self._call(
                table,
                partition_key,
                Method.GET,
                request.to_wire(),
                repeatable=True,
                deadline=deadline,
            )
        )
        if near_cache is None:
            return reply.version, reply.value
        if near is None:
            version, value, expires_at_ms = reply.version, reply.value, reply.expires_at_ms
        else:
            version, value, expires_at_ms = near_reply(reply, near)
            if reply.unchanged:
                near_cache.stats.unchanged += 1
            else:
                near_cache.stats.transferred += 1
        near_cache.put(table, encoded, version, value, expires_at_ms)
        return version, value

    async def _write(
        self,
        operation: str,
        key: UserKey,
        value: bytes | None,
        *,
        table: str,
        if_version: int | None,
        if_absent: bool,
    ) -> int:
        partition_key, encoded, body = self._write_request(key, value, table, if_version, if_absent)
        deadline = self._operation_deadline()
        try:
            reply = await self._call(
                table, partition_key, Method.PUT, body, repeatable=False, deadline=deadline
            )
        except trio.TooSlowError:
            raise self._timed_out(operation) from None
        return self._written(table, encoded, value, reply)

    def _write_request(
        self,
        key: UserKey,
        value: bytes | None,
        table: str,
        if_version: int | None,
        if_absent: bool,
    ) -> tuple[bytes, bytes, dict[str, Any]]:
        """A write's (partition key, encoded key, request body), checked; the
        near cache forgets the key."""
        partition_key, encoded = self._key(table, key)
        if not isinstance(if_absent, bool):
            raise InvalidRequest(f"if_absent must be a bool, not {if_absent!r}")
        if if_version is not None and check_version(if_version) is not None and if_absent:
            raise InvalidRequest("give if_version or if_absent, not both")
        body = PutRequest(table, encoded, value, if_version, if_absent).to_wire()
        if self._near_cache is not None:
            # Whatever happens to this write, what the cache holds may be old.
            self._near_cache.discard(table, encoded)
        return partition_key, encoded, body

    def _written(self, table: str, encoded: bytes, value: bytes | None, reply: object) -> int:
        """The version a write's reply names, remembered by the session (and
        the near cache)."""
        version = PutReply.from_wire(reply).version
        self._session.observe(table, encoded, version)
        if self._near_cache is not None:
            self._near_cache.put(table, encoded, version, value)
        return version

    async def _call(
        self,
        table: str,
        partition_key: bytes,
        method: str,
        body: object,
        *,
        repeatable: bool,
        deadline: float,
    ) -> object:
        """Send to the first replica that can be reached. A request whose
        connection is lost after sending goes to the next replica only if
        `repeatable` (a read); a write's outcome is then unknown: Unavailable.
        Raises `trio.TooSlowError` once `deadline` (trio's clock) has passed."""
        return await self._call_from(
            self._candidates(table, partition_key), 0, [], method, body, repeatable, deadline
        )

    async def _call_from(
        self,
        candidates: Sequence[tuple[NodeInfo, str]],
        start: int,
        failures: list[str],
        method: str,
        body: object,
        repeatable: bool,
        deadline: float,
    ) -> object:
        """`_call` from `candidates[start]` on, after `failures` with those before."""
        for node, address in candidates[start:]:
            connection = self._connections.get(address)
            if connection is None or connection.closed:
                try:
                    connection = await self._connection_by(node, deadline)
                except Unavailable as exc:
                    failures.append(str(exc))
                    continue
            try:
                return await connection.request(method, body, deadline=deadline)
            except Unavailable as exc:
                if not (repeatable and connection.closed):
                    raise
                self._mark_down(address)
                failures.append(str(exc))
        raise Unavailable(
            f"no replica of the key's partition could be reached: {'; '.join(failures)}"
        )

    def _candidates(self, table: str, partition_key: bytes) -> Sequence[tuple[NodeInfo, str]]:
        """`route`'s nodes for a key, each with its address. While no node is
        marked down (the usual case) they are a partition's replicas in map
        order, kept per partition rather than looked up anew per operation."""
        if self._down_until:
            nodes = route(
                self._map,
                table,
                partition_key,
                down_until=self._down_until,
                now=trio.current_time(),
            )
            return [(node, node.address) for node in nodes]
        seed = self._hash_seeds.get(table)
        if seed is None:
            partition = partition_of(table, partition_key, self._map.partitions)
        else:
            partition = _crc32c(partition_key, seed) & self._partition_mask
        replicas = self._replicas.get(partition)
        if replicas is None:  # at most `PARTITIONS_MAX` entries
            replicas = tuple(
                (node, node.address) for node in self._map.replicas_of_partition(partition)
            )
            self._replicas[partition] = replicas
        return replicas

    def _set_map(self, partition_map: PartitionMap) -> None:
        self._map = partition_map
        self._replicas.clear()
        self._table_names = frozenset(table.name for table in partition_map.tables)
        self._partition_mask = partition_map.partitions - 1
        self._hash_seeds = {
            table: seed
            for table in self._table_names | {DEFAULT_TABLE}
            if (seed := partition_hash_seed(table)) is not None
        }

    async def _connection_by(self, node: NodeInfo, deadline: float) -> net.RpcConnection:
        """`_connection` to `node`, bounded by `deadline` (then `trio.TooSlowError`)."""
        with trio.CancelScope(deadline=deadline):
            return await self._connection(node.host, node.port)
        raise trio.TooSlowError  # reached only when the deadline cut the connect short

    async def _status_connection(self, node: str | None) -> net.RpcConnection:
        if node is not None:
            known = self._map.find_node(node)
            host, port = (known.host, known.port) if known else node_address(node)
            return await self._connection(host, port)
        addresses = [node.address for node in self._map.nodes]
        if self._home_address is not None:
            addresses.insert(0, self._home_address)
        failures: list[str] = []
        for address in addresses:
            try:
                return await self._connection(*parse_address(address))
            except Unavailable as exc:
                failures.append(str(exc))
        raise Unavailable(f"no node could be reached: {'; '.join(failures)}")

    async def _connection(self, host: str, port: int) -> net.RpcConnection:
        """An open connection to a node, made on first use. Unavailable if it
        cannot be reached (and the node is then skipped for `NODE_DOWN_S`)."""
        address = format_address(host, port)
        lock = self._connect_locks.setdefault(address, trio.Lock())
        async with lock:  # one connect per node at a time; the others reuse it
            existing = self._connections.get(address)
            if existing is not None and not existing.closed:
                return existing
            if self._closed:
                raise RuntimeError("the kvsvr client is closed")
            try:
                connection = await net.connect(
                    host,
                    port,
                    secret=self._secret,
                    connect_timeout_s=min(CONNECT_ATTEMPT_TIMEOUT_S, self._timeout_s),
                    tls=self._tls,
                )
            except Unavailable:
                self._mark_down(address)
                raise
            await self._nursery.start(connection.run)
            self._connections[address] = connection
            self._down_until.pop(address, None)
            return connection

    def _mark_down(self, address: str) -> None:
        self._down_until[address] = trio.current_time() + NODE_DOWN_S


@dataclass(frozen=True, slots=True)
class _Link:
    """How a client's connections authenticate: the secret, and TLS if any."""

    secret: bytes | None
    tls: ssl.SSLContext | None


async def _fetch_map(connection: net.RpcConnection) -> PartitionMap:
    return PartitionMap.from_wire(await connection.request(Method.MAP, MapRequest().to_wire()))


@asynccontextmanager
async def connect(
    addresses: list[str] | str,
    *,
    secret: str | bytes | None = None,
    timeout_s: float = 5.0,
    near_cache_bytes: int | None = None,
    tls: TLSOptions | None = None,
) -> AsyncIterator[Client]:
    """Connect to a kvsvr cluster: `async with kvsvr.connect(...) as client:`.

    `addresses` is a list of "host:port" (or one string, comma-separated); the
    first that answers supplies the partition map. `secret` is the cluster
    secret (None for an open cluster). `near_cache_bytes` turns on the
    client's near cache with that budget (None or 0: off). `tls` connects with
    TLS to a cluster that runs it (`TLSOptions(cafile, certfile, keyfile)`). Raises
    `Unavailable` if no address answers, `AuthenticationFailed` if the secret
    is refused, and `Timeout` if all that takes longer than `timeout_s`.
    """
    seeds = address_list(addresses)
    secret_checked = secret_bytes(secret)
    timeout = check_timeout(timeout_s)
    near_bytes = check_near_cache_bytes(near_cache_bytes)
    link = _Link(secret_checked, tls_context(tls))
    # As in RpcConnection._hosted: the body's exception is carried out of the
    # nursery and re-raised as is, not wrapped in an ExceptionGroup.
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client: Client | None = None
        try:
            client = await _bootstrap(nursery, seeds, link, timeout, near_bytes)
            yield client
        except BaseException as exc:
            body_error = exc
        finally:
            if client is not None:
                await client.aclose()
    if body_error is not None:
        raise body_error


async def _bootstrap(
    nursery: trio.Nursery,
    seeds: list[tuple[str, int]],
    link: _Link,
    timeout_s: float,
    near_cache_bytes: int = 0,
) -> Client:
    """A client around the first seed that answers with a partition map."""
    failures: list[str] = []
    try:
        with trio.fail_after(timeout_s):
            for host, port in seeds:
                try:
                    return await _client_from_seed(
                        nursery, host, port, link, timeout_s, near_cache_bytes
                    )
                except Unavailable as exc:
                    failures.append(str(exc))
    except trio.TooSlowError:
        raise Timeout(
            f"connecting to the cluster timed out after {timeout_s} s "
            f"({'; '.join(failures) or 'no node answered'})"
        ) from None
    raise Unavailable(f"no node of the cluster could be reached: {'; '.join(failures)}")


async def _client_from_seed(
    nursery: trio.Nursery,
    host: str,
    port: int,
    link: _Link,
    timeout_s: float,
    near_cache_bytes: int = 0,
) -> Client:
    connect_timeout_s = min(CONNECT_ATTEMPT_TIMEOUT_S, timeout_s)
    connection = await net.connect(
        host, port, secret=link.secret, connect_timeout_s=connect_timeout_s, tls=link.tls
    )
    await nursery.start(connection.run)
    try:
        partition_map = await _fetch_map(connection)
    except BaseException:
        # Closing cancels the connection's task at once; the wait may be cut short.
        with trio.CancelScope(shield=True):
            await connection.aclose()
        raise
    address = format_address(host, port)
    client = Client(
        nursery,
        partition_map,
        secret=link.secret,
        tls=link.tls,
        timeout_s=timeout_s,
        home_address=address,
        near_cache_bytes=near_cache_bytes,
    )
    client._connections[address] = connection
    return client
