"""The watch workload: watchers follow every key the clients use, through
kills, pauses and partitions, and record what they are told.

`watchers_per_node` watchers start on each node. A watcher watches each key
of the workload from version 0 (keys are fresh) over its own connection to
one node; when that node fails it (no answer, connection lost, unavailable)
it resumes from its last version on the next node, as kvsvr's client does.
`WatchCompacted` (the history it needs is gone) is recorded as a *reset*: the
watcher reads the key (strong) and goes on from that version. Every event
goes into `events` (and `watch.jsonl`), for
`jepsen_like.checker.watch.check_watch_streams` to judge against the run's
history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import trio

from jepsen_like.harness.client import NodeClient
from jepsen_like.harness.cluster import Cluster
from jepsen_like.harness.workload import Workload, decode_value
from kvsvr.errors import KvsvrError, WatchCompacted

# Watchers on each node at most: each watches every key the run uses.
WATCHERS_PER_NODE_MAX: Final = 8
# How long a node holds a watch with nothing to say: well inside the harness
# client's 5 s wait for an answer, so a held watch is never taken for a dead node.
WATCH_WAIT_S: Final = 2.0
# How often a watcher looks for keys the workload started using.
NEW_KEYS_CHECK_S: Final = 0.2
# Pause before a watcher asks the next node after a failure.
RETRY_PAUSE_S: Final = 0.1


class WatchRecorder:
    """Runs the watchers and keeps their events."""

    def __init__(self, watchers_per_node: int, path: Path | None = None) -> None:
        if not 1 <= watchers_per_node <= WATCHERS_PER_NODE_MAX:
            raise ValueError(f"watchers per node must be within [1, {WATCHERS_PER_NODE_MAX}]")
        self.watchers_per_node = watchers_per_node
        self.events: list[dict[str, Any]] = []
        self.switches = 0
        self.resets = 0
        self._file = None if path is None else path.open("w", encoding="utf-8")

    def _record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def run(self, cluster: Cluster, workload: Workload, stop: trio.Event) -> None:
        """Watch until `stop`, then end every watch."""
        nodes = cluster.node_ids
        async with trio.open_nursery() as nursery:
            for watcher in range(len(nodes) * self.watchers_per_node):
                nursery.start_soon(self._watcher, cluster, workload, watcher)
            await stop.wait()
            nursery.cancel_scope.cancel()

    async def _watcher(self, cluster: Cluster, workload: Workload, watcher: int) -> None:
        watched: set[str] = set()
        async with trio.open_nursery() as nursery:
            while True:
                for key in workload.used_keys():
                    if key not in watched:
                        watched.add(key)
                        nursery.start_soon(self._watch_key, cluster, watcher, key)
                await trio.sleep(NEW_KEYS_CHECK_S)

    async def _watch_key(self, cluster: Cluster, watcher: int, key: str) -> None:
        nodes = cluster.node_ids
        position = watcher % len(nodes)
        cursor = 0
        async with trio.open_nursery() as nursery:
            client = self._client(cluster, nodes[position], nursery)
            while True:
                try:
                    events = await client.watch(key, cursor, WATCH_WAIT_S)
                except WatchCompacted:
                    cursor = await self._reset(client, watcher, key, cursor)
                    continue
                except KvsvrError:
                    # This node cannot serve the watch now: the next one resumes it.
                    await client.aclose()
                    position = (position + 1) % len(nodes)
                    client = self._client(cluster, nodes[position], nursery)
                    self.switches += 1
                    await trio.sleep(RETRY_PAUSE_S)
                    continue
                for event in events:
                    self._record(
                        {
                            "watcher": watcher,
                            "key": key,
                            "node": client.node_id,
                            "version": event.version,
                            "previous": event.previous_version,
                            "value": decode_value(event.value),
                        }
                    )
                    cursor = event.version

    def _client(self, cluster: Cluster, node: str, nursery: trio.Nursery) -> NodeClient:
        return NodeClient(node, cluster.address(node), cluster.secret, nursery)

    async def _reset(self, client: NodeClient, watcher: int, key: str, cursor: int) -> int:
        """Read the key again and record the version the watch goes on from."""
        try:
            _, version = await client.get(key)
        except KvsvrError:
            await trio.sleep(RETRY_PAUSE_S)
            return cursor  # asked again: compacted again, or served
        self.resets += 1
        self._record({"watcher": watcher, "key": key, "version": version, "reset": True})
        return version
