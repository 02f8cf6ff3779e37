"""The node process: the protocol core wired to LMDB and TCP.

A node is at once a replica (it answers Paxos messages about the keys it
holds, making every promise and accept durable through the group-commit
writer before it answers) and a coordinator (it runs client operations as the
protocol's generators, fanning each round out to the key's replicas and
collecting until a quorum answered, then cancelling the rest).

This module wires the parts together and dispatches requests to them:

- `kvsvr.node.rounds`: peer links and the quorum rounds' collectors and timers;
- `kvsvr.node.engine`: the one engine every operation runs on (`Drive`), with
  shared strong reads and `until_answered` for callers that await;
- `kvsvr.node.writes`: writes in turn per key, blind ones folded;
- `kvsvr.node.client_api`: parsing and answering clients' gets, puts, scans;
- `kvsvr.node.replica_side`: answering Paxos requests from storage;
- `kvsvr.node.repair`: rebuilding corrupt rows from peers;
- `kvsvr.node.replication`: catch-up (hints, anti-entropy, rebuild).
"""

from __future__ import annotations

import gc
import logging
import random
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import trio

from kvsvr import _build, logs
from kvsvr.api import (
    OPERATION_TIMEOUT_S,
    Method,
    NodeInfo,
    PartitionMap,
    ReadConsistency,
    RecoverRequest,
    TableConsistency,
    TableInfo,
)
from kvsvr.backup import messages as backup_messages
from kvsvr.clock import SYSTEM_CLOCK, TEST_CLOCK_RATE_METHOD, Clock, RateClock
from kvsvr.config import ClusterConfig, ConfigError, load_config, new_cluster_id
from kvsvr.errors import FrameError, InvalidRequest, KvsvrError
from kvsvr.keys import decode_key
from kvsvr.net import serve
from kvsvr.node import replication
from kvsvr.node.backup_side import BackupSide
from kvsvr.node.cache import RowCache
from kvsvr.node.client_api import ClientApi, GetQuery
from kvsvr.node.engine import Respond, until_answered
from kvsvr.node.http_endpoint import Endpoint, serve_http
from kvsvr.node.metrics import NodeMetrics
from kvsvr.node.repair import ROW_METHOD, Repairs
from kvsvr.node.replica_side import ReplicaSide
from kvsvr.node.replication import Collaborators, Replication
from kvsvr.node.rounds import PAXOS_METHOD, PAXOS_ONEWAY_METHOD, PeerLink, Rounds
from kvsvr.node.watch import HISTORY_METHOD, PeerHistory, WatchHub
from kvsvr.node.writes import Writes
from kvsvr.protocol import lifecycle
from kvsvr.protocol.changes import ChangeLog
from kvsvr.protocol.coordinator import Coordinator
from kvsvr.protocol.eventual import NODE_INDEX_MAX, HybridClock
from kvsvr.protocol.messages import (
    Accept,
    Commit,
    Prepare,
    Read,
    Reply,
    Request,
    ScanRequest,
    from_wire,
    to_wire,
)
from kvsvr.protocol.placement import partition_of
from kvsvr.protocol.read_lease import Grants, Holds
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import Storage
from kvsvr.storage.residency import ResidencyGuard
from kvsvr.tls import node_contexts

log = logging.getLogger("kvsvr.node")


class Node:
    def __init__(
        self,
        config: ClusterConfig,
        node_id: str,
        storage: Storage,
        *,
        initial_state: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`initial_state` ("new" or "existing") overrides the config's;
        `clock` is the node's one clock (see `kvsvr.clock`)."""
        self.config = config
        self.me = config.node(node_id)
        self.initial_state = initial_state or config.initial_state
        self.storage = storage
        self.clock = clock
        self.coordinator = Coordinator(self.me.index, random.Random())
        self.replica_sets = config.replica_sets()
        self.tables = {t.name: t for t in config.tables}
        self.started_at = clock.wall_s()
        self.cache = RowCache(config.cache_bytes_max)
        self.residency = ResidencyGuard(
            config.node_data_dir(node_id), storage, lent_bytes=self.cache.budget_never_used
        )
        self.requests_served = 0
        self.nursery: trio.Nursery | None = None
        assert self.me.index <= NODE_INDEX_MAX, "eventual-table stamps hold 6 bits of node index"
        self.hlc = HybridClock(self.me.index)
        me = self.me.index
        self.replica_side = ReplicaSide(storage, self.tables, self.schedule_repair)
        self.watches = WatchHub(
            self.tables,
            lambda table, key: (storage.read_row(table, key) or EMPTY_ROW).version,
            lambda table, partition_key: me in self.replicas_of(table, partition_key),
            ChangeLog(bytes_max=config.watch_history_bytes_max),
            PeerHistory(
                me, self.replicas_of, lambda peer, method, body: self.peers[peer].call(method, body)
            ).ask,
        )
        if config.watch_history_bytes_max > 0:
            storage.row_placed = self.watches.row_placed
        self.rounds = Rounds(me, self.replica_side.nowait, self.replica_side.oneway)
        self.peers: dict[int, PeerLink] = self.rounds.peers
        self.repairs = Repairs(me, storage, self.peers, self.replicas_of, clock)
        self.writes = Writes(
            self.rounds,
            self.coordinator,
            self.cache,
            clock,
            self.replicas_of,
            partial(self.replica_side.local_version, me),
        )
        self.api = ClientApi(
            self.me,
            self.tables,
            self.replicas_of,
            self.replica_side,
            self.rounds,
            self.writes,
            self.coordinator,
            self.cache,
            self.hlc,
            clock,
        )
        self.replication = Replication(
            Collaborators(
                config=config,
                me=self.me,
                initial_state=self.initial_state,
                storage=storage,
                peers=self.peers,
                tables=self.tables,
                replica_sets=self.replica_sets,
                hlc=self.hlc,
                clock=clock,
                read_row=self.read_row_for_peer,
                schedule_repair=self.schedule_repair,
                settle=self.strong_read,
            )
        )
        self.replica_side.gate = self.replication
        self.backup = BackupSide(
            storage.copy_committed,
            config.node_data_dir(node_id),
            config.cluster_id or "",
            node_id,
            votes=lambda: self.replication.ready,
        )
        self.api.replication = self.replication
        self._start_read_leases()
        # The client requests every entry point starts on the engine.
        self._client_methods: dict[str, Callable[[object, Respond], None]] = {
            Method.GET: self.api.get,
            Method.PUT: self.api.put,
            Method.SCAN: self.api.scan,
        }
        # Prometheus metrics, when the node has a metrics_address (see `kvsvr.node.metrics`).
        self.metrics: NodeMetrics | None = None
        if self.me.metrics_address is not None:
            self.metrics = NodeMetrics(self.client_status)
            requests = self.metrics.requests
            self._client_methods = {
                method: requests.timed(str(method), start)
                for method, start in self._client_methods.items()
            }
            storage.commit_observer = requests.observe_commit

    def _start_read_leases(self) -> None:
        """Read leases (`kvsvr.protocol.read_lease`): the grants this replica
        makes, the leases this coordinator holds. A replica accepts nothing
        for one hold period after it starts, or after its rows are rebuilt,
        since it may have forgotten grants it made before; a node with an
        empty data directory founding a new cluster made none."""
        timing = self.config.lease_timing
        if timing is None:
            return
        clock = self.clock
        grants = Grants(timing, started_at=clock.monotonic())
        if self.replication.start.kind == "ask_peers":
            grants.open_accepts()
        self.replication.readiness.on_rebuilt = lambda: grants.restart(clock.monotonic())
        self.replica_side.grants = grants
        self.replica_side.clock = clock
        self.rounds.holds = Holds(timing)

    def lease_status(self) -> dict[str, Any]:
        grants, holds = self.replica_side.grants, self.rounds.holds
        now = self.clock.monotonic()
        stats = self.coordinator.stats
        return {
            "enabled": holds is not None,
            "lease_s": self.config.lease_s,
            "clock_drift_max": self.config.clock_drift_max,
            "held": 0 if holds is None else holds.count(now),
            "granted": 0 if grants is None else grants.count(now),
            "accepts_open": grants is None or grants.accepts_open(now),
            "taken": stats.leases_taken,
            "local_reads": self.api.leased_reads,
            "write_waits": stats.lease_waits,
        }

    def link_peers(self, nursery: trio.Nursery, tls: ssl.SSLContext | None = None) -> None:
        self.nursery = nursery
        links = {}
        for peer in self.config.nodes:
            if peer.index == self.me.index:
                continue
            host, port = self.me.peer_addresses.get(peer.id, (peer.host, peer.port))
            links[peer.index] = PeerLink(peer, host, port, self.config.secret, nursery, tls)
        self.rounds.link(nursery, links)
        self.replica_side.nursery = nursery
        self.repairs.nursery = nursery
        self.api.nursery = nursery

    def replicas_of(self, table: str, partition_key: bytes) -> list[int]:
        return self.replica_sets[partition_of(table, partition_key, self.config.partitions)]

    # ------------------------------------------------------------ for catch-up

    def read_row_for_peer(self, table: str, key: bytes) -> Row | None:
        return self.replica_side.read_row_for_peer(table, key)

    def schedule_repair(self, table: str, key: bytes) -> bool:
        return self.repairs.schedule(table, key)

    def serve_row(self, body: object) -> bytes | None:
        return self.replica_side.serve_row(body)

    async def strong_read(self, table: str, key: bytes) -> tuple[int, bytes | None]:
        """Read `(table, key)` through a quorum round, as a strong client get
        does (settling any proposal in flight on a majority and repairing the
        replicas it reaches): the chosen version and value."""
        partition_key, _ = decode_key(key)
        replicas = self.replicas_of(table, partition_key)
        get = GetQuery(
            table, key, replicas, ReadConsistency.STRONG, 0, None, OPERATION_TIMEOUT_S, None
        )
        reply = await until_answered(partial(self.api.read, get))
        return reply["version"], reply["value"]

    # ------------------------------------------------------------ client API

    async def client_get(self, body: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await until_answered(partial(self.api.get, body))
        return reply

    async def client_put(self, body: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await until_answered(partial(self.api.put, body))
        return reply

    async def client_scan(self, body: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await until_answered(partial(self.api.scan, body))
        return reply

    def client_map(self) -> dict[str, Any]:
        return PartitionMap(
            self.config.partitions,
            self.config.replication,
            tuple(NodeInfo(n.id, n.index, n.host, n.port, n.zone) for n in self.config.nodes),
            tuple(tuple(replicas) for replicas in self.replica_sets),
            tuple(
                TableInfo(t.name, TableConsistency(t.consistency), t.ttl_s)
                for t in self.config.tables
            ),
        ).to_wire()

    def client_status(self) -> dict[str, Any]:
        held = sum(1 for s in self.replica_sets if self.me.index in s)
        preferred = sum(1 for s in self.replica_sets if s and s[0] == self.me.index)
        return {
            "node": self.me.id,
            "address": self.me.address,
            "metrics_address": _address_text(self.me.metrics_address),
            "zone": self.me.zone,
            "uptime_s": round(self.clock.wall_s() - self.started_at, 1),
            # False only under the config's unsafe_no_fsync (benchmarks).
            "fsync": not self.config.unsafe_no_fsync,
            # Modules compiled by mypyc (`python3 dev.py compile`); [] = pure Python.
            "compiled_modules": _build.compiled_modules(),
            "partitions": self.config.partitions,
            "partitions_held": held,
            "partitions_preferred": preferred,
            "peers": {
                link.peer.id: ("connected" if link.up else "not connected")
                for link in self.peers.values()
            },
            "coordinator": asdict(self.coordinator.stats),
            "storage": asdict(self.storage.stats),
            "rounds": {
                "started": self.rounds.rounds_started,
                "thrifty": self.rounds.rounds_thrifty,
                "hedged": self.rounds.rounds_hedged,
            },
            "read_sharing": {
                "rounds_shared": self.api.strong_reads.shared.rounds_shared,
                "reads_shared": self.api.strong_reads.shared.reads_shared,
            },
            "write_batching": {
                "groups_folded": self.writes.queues.groups_folded,
                "writes_folded": self.writes.queues.writes_folded,
            },
            "read_leases": self.lease_status(),
            "cache": {
                **asdict(self.cache.stats),
                "hit_ratio": round(self.cache.hit_ratio(), 4),
                "bytes_used": self.cache.bytes_used,
                "bytes_max": self.cache.bytes_max,
                "entries": len(self.cache),
            },
            "memory": self.residency.status(),
            "corrupt_rows_seen": self.replica_side.corrupt_rows_seen,
            "rows_repaired": self.repairs.rows_repaired,
            "repairs_failed": self.repairs.repairs_failed,
            "requests_served": self.requests_served,
            "replication": self.replication.status(),
            "watches": self.watches.status(),
        }

    # ------------------------------------------------------------ the handler

    async def handle_request(self, peer: str, method: str, body: object) -> object:
        self.requests_served += 1
        if method == PAXOS_METHOD:
            return await until_answered(partial(self._answer_paxos, body))
        if method == ROW_METHOD:
            return self.serve_row(body)
        if method == HISTORY_METHOD:
            return self.watches.serve_history(body)
        if method in replication.METHODS:
            return await self.replication.handle(method, body)
        if method in backup_messages.METHODS:
            return await self.backup.handle(method, body)
        if method == Method.MAP:
            return self.client_map()
        if method == Method.STATUS:
            return self.client_status()
        if method == Method.WATCH:
            return await self.watches.watch(peer, body)
        if method == TEST_CLOCK_RATE_METHOD:
            return self._set_clock_rate(body)
        if method == Method.RECOVER:
            request = RecoverRequest.from_wire(body)
            return await self.replication.recover(request.accept_data_loss)
        start = self._client_methods.get(method)
        if start is not None:
            return await until_answered(partial(start, body))
        if not isinstance(body, dict):
            raise InvalidRequest(f"{method}: the body must be a map")
        raise InvalidRequest(f"unknown method {method!r}")

    def _set_clock_rate(self, body: object) -> dict[str, Any]:
        clock = self.clock
        if not isinstance(clock, RateClock):
            raise InvalidRequest(
                "this node's clock rate cannot be set (start it with --test-clock-control)"
            )
        rate = body.get("rate") if isinstance(body, dict) else None
        if (
            not isinstance(rate, int | float)
            or isinstance(rate, bool)
            or not RateClock.RATE_MIN <= rate <= RateClock.RATE_MAX
        ):
            raise InvalidRequest(
                f"rate must be a number from {RateClock.RATE_MIN} to {RateClock.RATE_MAX}"
            )
        clock.set_rate(float(rate))
        log.warning("test clock control: the monotonic clock now runs at %.3fx real time", rate)
        return {"rate": clock.rate}

    def handle_request_nowait(
        self,
        peer: str,
        method: str,
        body: object,
        respond: Respond,
    ) -> bool:
        """Peers' Paxos requests and clients' gets, puts and scans, answered
        without a task of their own (see `kvsvr.node.engine`) once the node's
        runners are up; False for every other method (`handle_request`)."""
        if method == PAXOS_METHOD:
            self.requests_served += 1
            self._answer_paxos(body, respond)
            return True
        start = self._client_methods.get(method)
        if start is None or not self.rounds.running:
            return False
        self.requests_served += 1
        start(body, respond)
        return True

    def _answer_paxos(self, body: object, respond: Respond) -> None:
        try:
            message = _as_request(body)
        except KvsvrError as error:
            respond(None, error)
            return

        def answer(reply: Reply | None, error: KvsvrError | None) -> None:
            if reply is None:
                respond(None, error)
            else:
                respond(to_wire(reply), None)

        self.replica_side.nowait(message, answer)

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        if method != PAXOS_ONEWAY_METHOD:
            log.warning("unknown one-way method %r from %s", method, peer)
            return
        try:
            self.replica_side.oneway(_as_request(body))
        except KvsvrError as error:
            log.warning("one-way message from %s refused: %s", peer, error)


def _address_text(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


def _as_request(body: object) -> Request:
    message = from_wire(body)
    if not isinstance(message, Prepare | Accept | Commit | Read | ScanRequest):
        raise FrameError(f"{type(message).__name__} is not a request")
    return message


async def serve_node(
    config: ClusterConfig,
    node_id: str,
    *,
    initial_state: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until cancelled; on cancellation, commit what is staged and
    close. Raises `WrongCluster` (in an exception group) when the data
    directory or the peers belong to another cluster."""
    me = config.node(node_id)
    _require_cluster_id(config)
    tls = node_contexts(config, node_id)
    data_dir = config.node_data_dir(node_id)
    data_dir.mkdir(parents=True, exist_ok=True)
    storage = Storage.open(
        data_dir,
        tables=[t.name for t in config.tables],
        map_size_bytes=config.map_size_bytes,
        fsync=not config.unsafe_no_fsync,
    )
    if config.unsafe_no_fsync:
        log.warning(
            "unsafe_no_fsync is set: commits are not flushed to disk, so acknowledged "
            "writes can be lost if the machine crashes; for benchmarks only"
        )
    if config.secret is None:
        log.warning("no cluster secret configured: anyone who can reach %s can use it", me.address)
    try:
        async with trio.open_nursery() as storage_nursery:
            await storage_nursery.start(storage.run)
            node = Node(config, node_id, storage, initial_state=initial_state, clock=clock)
            async with trio.open_nursery() as nursery:
                node.link_peers(nursery, tls.client if tls else None)
                listen_host, listen_port = me.listen_address
                await nursery.start(
                    partial(
                        serve,
                        listen_host,
                        listen_port,
                        node,
                        secret=config.secret,
                        tls=tls.server if tls else None,
                    )
                )
                await nursery.start(node.replication.run)
                nursery.start_soon(node.residency.run)
                if node.metrics is not None and me.metrics_address is not None:
                    host, port = me.metrics_address
                    endpoint = Endpoint(node.metrics, lambda: node.replication.state)
                    await nursery.start(serve_http, host, port, endpoint)
                    log.info("node %s serving metrics on %s:%d", me.id, host, port)
                log.info(
                    "node %s serving on %s:%s (advertised as %s)%s",
                    me.id,
                    listen_host,
                    listen_port,
                    me.address,
                    " with TLS" if tls else "",
                )
                task_status.started(node)
                await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await storage.aclose()
        log.info("node %s stopped; storage closed", me.id)


def _require_cluster_id(config: ClusterConfig) -> None:
    if config.cluster_id is None:
        raise ConfigError(
            "the config has no cluster id; give every node the same one, e.g. "
            f'id = "{new_cluster_id()}" under [cluster]'
        )


async def _main(
    config: ClusterConfig, node_id: str, initial_state: str | None, clock: Clock
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(serve_node, config, node_id, initial_state=initial_state, clock=clock)
            )
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


# A request allocates a few dozen short-lived containers (messages, rows,
# dicts, trio's task and scope objects); they die by reference count (the
# hot path makes no reference cycles: see `TurnWrite._end` in
# `kvsvr.node.writes`; kvsvr_tests/test_gc_cycles.py checks it). At CPython's
# default gen-0 threshold (700) the cyclic collector runs every few requests
# and walks the young objects each time, for nothing: about a fifth of a
# node's CPU on durable puts (bench.single_node: 0.39-0.46 CPU-ms per put at
# 700, 0.33-0.35 at this threshold). A larger threshold keeps cycles collected, in
# rarer sweeps; not much larger, as a cycle made on an error path can hold
# a value of up to 1 MiB until then (kvsvr_tests/test_cache_memory.py bounds
# the node's RSS). Freezing moves what startup built out of later sweeps.
GC_GEN0_THRESHOLD = 10_000
GC_OLDER_THRESHOLD = 20


def tune_gc() -> None:
    """Tune the cyclic collector for a long-running node process (see above)."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)


# `kvsvr node` exits with this when its data directory or peers belong to
# another cluster (the CLI's "any other error").
EXIT_WRONG_CLUSTER = 5


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def run_node(
    config_path: str,
    node_id: str,
    initial_state: str | None = None,
    log_format: str = logs.TEXT,
    *,
    test_clock_control: bool = False,
) -> int:
    """`kvsvr node`: serve until SIGTERM or SIGINT. Returns the exit code.
    `initial_state` ("new" or "existing") overrides the config's; `log_format`
    is "text" or "json" (see `kvsvr.logs`); `test_clock_control`: run on a
    `RateClock` a test may set (see `kvsvr.clock.TEST_CLOCK_RATE_METHOD`)."""
    logs.configure(node_id, log_format)
    config = load_config(config_path)
    config.node(node_id)  # fail early, with the list of known ids
    _require_cluster_id(config)
    log.info("build: %s", _build.describe(_build.compiled_modules()))
    tune_gc()
    try:
        clock: Clock = RateClock() if test_clock_control else SYSTEM_CLOCK
        if test_clock_control:
            log.warning("test clock control is on: for the fault harness only")
        trio.run(_main, config, node_id, initial_state, clock)
    except (lifecycle.WrongCluster, BaseExceptionGroup) as failure:
        refused = _leaves(failure)
        if not all(isinstance(leaf, lifecycle.WrongCluster) for leaf in refused):
            raise
    else:
        return 0
    for reason in refused:
        log.error("refusing to run: %s", reason)
        print(f"kvsvr node {node_id}: refusing to run: {reason}", file=sys.stderr, flush=True)
    return EXIT_WRONG_CLUSTER
