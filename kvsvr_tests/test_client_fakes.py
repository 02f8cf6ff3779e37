"""Fake kvsvr nodes for the client and CLI tests (this module holds no tests).

Each fake node is a real `kvsvr.net.serve` server on 127.0.0.1 answering the
client protocol (map, get, put, scan, status) from a dict shared by the whole
fake cluster, so the client's routing, connections, errors and timeouts run for
real without the node implementation. Every node records the requests it got,
and can be told to hang, or to drop every connection, on a method.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from kvsvr.errors import Conflict, InvalidRequest
from kvsvr.keys import decode_key, encode_key, partition_prefix, to_bytes
from kvsvr.local import free_ports
from kvsvr.net import serve
from kvsvr.protocol.placement import NodePlace, replica_sets

SECRET = b"fake cluster secret"
PARTITIONS = 8
TABLES = ("default", "events")


def unused_port() -> int:
    """A port nothing listens on (connecting to it is refused)."""
    return free_ports(1)[0]


@dataclass
class FakeStore:
    """What the whole fake cluster holds: (table, encoded key) -> (version, value)."""

    rows: dict[tuple[str, bytes], tuple[int, bytes | None]] = field(default_factory=dict)

    def get(self, table: str, key: bytes) -> tuple[int, bytes | None]:
        return self.rows.get((table, key), (0, None))

    def put(self, body: dict[str, Any]) -> int:
        table, key = body["table"], body["key"]
        version, value = self.get(table, key)
        if body["if_absent"] and value is not None:
            raise Conflict(f"key exists at version {version}")
        if body["if_version"] is not None and body["if_version"] != version:
            raise Conflict(f"key is at version {version}, not {body['if_version']}")
        self.rows[(table, key)] = (version + 1, body["value"])
        return version + 1

    def scan(self, body: dict[str, Any]) -> list[list[object]]:
        prefix = partition_prefix(body["partition_key"])
        found: list[list[object]] = []
        for (table, key), (version, value) in sorted(self.rows.items()):
            if table != body["table"] or not key.startswith(prefix) or value is None:
                continue
            _, sort_key = decode_key(key)
            if body["start"] is not None and sort_key < body["start"]:
                continue
            if body["end"] is not None and sort_key >= body["end"]:
                continue
            found.append([sort_key, value, version])
        return found[: body["limit"]]


@dataclass
class FakeNode:
    id: str
    index: int
    store: FakeStore
    port: int = 0
    map: dict[str, Any] = field(default_factory=dict)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    hang_on: set[str] = field(default_factory=set)  # methods that never answer
    drop_on: set[str] = field(default_factory=set)  # methods that stop the node mid-request
    stale_version_lag: bool = False  # stale reads answer as a replica that saw nothing
    scope: trio.CancelScope | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def methods(self) -> list[str]:
        return [method for method, _ in self.requests]

    async def handle_request(self, peer: str, method: str, body: Any) -> object:
        await trio.lowlevel.checkpoint()
        self.requests.append((method, body))
        if method in self.drop_on:
            assert self.scope is not None
            self.scope.cancel()  # the node "crashes": every connection closes
            await trio.sleep_forever()
        if method in self.hang_on:
            await trio.sleep_forever()
        if method == "map":
            return self.map
        if method == "status":
            return {"node": self.id, "partitions": [0, 1], "counters": {"requests": 1}}
        if body.get("table") not in TABLES:
            raise InvalidRequest(f"no table {body.get('table')!r}")
        if method == "get":
            if body["consistency"] != "strong" and self.stale_version_lag:
                return {"version": 0, "value": None}
            version, value = self.store.get(body["table"], body["key"])
            return {"version": version, "value": value}
        if method == "put":
            return {"version": self.store.put(body)}
        if method == "scan":
            return {"items": self.store.scan(body)}
        raise InvalidRequest(f"unknown method {method!r}")

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        pass


@dataclass
class FakeCluster:
    nodes: list[FakeNode]
    dead_ports: dict[int, int]  # node index -> a port nobody listens on
    secret: bytes | None

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes if node.index not in self.dead_ports]

    def node(self, index: int) -> FakeNode:
        return next(node for node in self.nodes if node.index == index)

    def preferred_order(self, table: str, partition_key: bytes) -> list[int]:
        from kvsvr.protocol.placement import partition_of

        sets = self.nodes[0].map["replica_sets"]
        return list(sets[partition_of(table, partition_key, PARTITIONS)])

    def key_preferring(self, index: int, table: str = "default") -> bytes:
        """A partition key whose preferred coordinator is node `index`."""
        for number in range(10_000):
            key = f"key-{number}".encode()
            if self.preferred_order(table, key)[0] == index:
                return key
        raise AssertionError(f"no key prefers node {index}")


def _partition_map(cluster: FakeCluster, replication: int) -> dict[str, Any]:
    places = [NodePlace(node.index, f"z{node.index}") for node in cluster.nodes]
    return {
        "partitions": PARTITIONS,
        "replication": replication,
        "nodes": [
            {
                "id": node.id,
                "index": node.index,
                "host": "127.0.0.1",
                "port": cluster.dead_ports.get(node.index, node.port),
                "zone": f"z{node.index}",
            }
            for node in cluster.nodes
        ],
        "replica_sets": replica_sets(places, PARTITIONS, replication),
        "tables": [{"name": name, "consistency": "strong", "ttl_s": 0.0} for name in TABLES],
    }


async def _serve_node(
    node: FakeNode,
    secret: bytes | None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        node.scope = scope
        await serve("127.0.0.1", 0, node, secret=secret, task_status=task_status)


@asynccontextmanager
async def fake_cluster(
    node_count: int = 3,
    *,
    secret: bytes | None = SECRET,
    dead: tuple[int, ...] = (),
    replication: int = 3,
) -> AsyncIterator[FakeCluster]:
    """Nodes 1..node_count; those in `dead` are in the map but never listen."""
    store = FakeStore()
    nodes = [FakeNode(f"n{index}", index, store) for index in range(1, node_count + 1)]
    cluster = FakeCluster(nodes, dict(zip(dead, free_ports(len(dead)), strict=True)), secret)
    async with trio.open_nursery() as nursery:
        for node in nodes:
            if node.index not in dead:
                node.port = await nursery.start(_serve_node, node, secret)
        partition_map = _partition_map(cluster, min(replication, node_count))
        for node in nodes:
            node.map = partition_map
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


@contextmanager
def fake_cluster_in_thread(**options: Any) -> Iterator[FakeCluster]:
    """A fake cluster served by trio in a background thread, for blocking callers
    (SyncClient, the CLI's `main`)."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def run() -> None:
        async with fake_cluster(**options) as cluster:
            state["stop"] = trio.Event()
            state["token"] = trio.lowlevel.current_trio_token()
            state["cluster"] = cluster
            ready.set()
            await state["stop"].wait()

    def thread_main() -> None:
        try:
            trio.run(run)
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name="fake-cluster", daemon=True)
    thread.start()
    assert ready.wait(10), "the fake cluster did not start"
    assert "cluster" in state, "the fake cluster failed to start"
    try:
        yield state["cluster"]
    finally:
        trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])
        thread.join(10)
        assert not thread.is_alive(), "the fake cluster did not stop"


def encoded(partition_key: bytes | str, sort_key: bytes | str = b"") -> bytes:
    return encode_key(to_bytes(partition_key), to_bytes(sort_key))
