"""Cluster control: real `kvsvr node` processes behind link proxies.

`open_cluster(directory, node_count)` picks free loopback ports, starts the
proxies of every directed link, writes a config whose `peer_addresses` point
at them, starts the nodes (`kvsvr.local.LocalCluster`) and waits until each
is ready. On the way out (normal exit, error, Ctrl-C, cancellation) every
node is resumed if paused, sent SIGTERM, given `STOP_TIMEOUT_S`, then
SIGKILLed.

Each node's output goes to `directory/logs/<id>.log`, appended across
restarts with a marker line per start, so one file tells a node's whole story.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import trio

from jepsen_like.harness.proxy import Network
from kvsvr.config import ClusterConfig, TableConfig, local_cluster
from kvsvr.errors import KvsvrError
from kvsvr.local import (
    CONFIG_FILE_NAME,
    LOOPBACK,
    READY_POLL_S,
    READY_TIMEOUT_S,
    LocalCluster,
    NodeEvent,
    free_ports,
    node_status,
    set_clock_rate,
    write_config,
)
from kvsvr.local import LocalClusterError as ClusterError

__all__ = ["Cluster", "ClusterError", "NodeEvent", "cluster_config", "open_cluster"]

# A node asked to stop (SIGTERM) commits what is staged and exits; past this it
# is killed.
STOP_TIMEOUT_S: Final = 10.0
# How often a watcher looks whether a node exited, for the report's timeline.
EXIT_POLL_S: Final = 0.1

PIDS_FILE_NAME: Final = "pids"
DEFAULT_SECRET: Final = "jepsen-like harness secret"


class Cluster:
    """Node processes of one cluster; use `open_cluster` to get one."""

    def __init__(self, local: LocalCluster, network: Network | None) -> None:
        self.local = local
        self.directory = local.directory
        self.config = local.config
        self.config_path = local.config_path
        self.network = network
        self.events: list[NodeEvent] = local.events

    # --- what there is ------------------------------------------------------------

    @property
    def node_ids(self) -> list[str]:
        return self.local.ids

    @property
    def secret(self) -> bytes | None:
        return self.config.secret

    def address(self, node_id: str) -> tuple[str, int]:
        return self.local.host_port(node_id)

    def data_dir(self, node_id: str) -> Path:
        return self.local.data_dir(node_id)

    def data_file(self, node_id: str) -> Path:
        return self.data_dir(node_id) / "data.mdb"

    def log_path(self, node_id: str) -> Path:
        return self.local.log_path(node_id)

    def log_text(self, node_id: str) -> str:
        return self.local.log_text(node_id)

    def is_running(self, node_id: str) -> bool:
        return self.local.is_running(node_id)

    def is_paused(self, node_id: str) -> bool:
        return self.local.is_paused(node_id)

    def unexpected_exits(self) -> list[NodeEvent]:
        """Nodes that exited without being told to: crashes worth a look."""
        return [e for e in self.events if e.what == "exit" and "unexpected" in e.detail]

    # --- control ------------------------------------------------------------------

    async def start(self, node_id: str, *, wait: bool = True) -> None:
        """Start a node that is not running; by default wait until it answers."""
        self.local.start(node_id, wait=False)
        self._write_pids()
        if wait:
            await self.wait_ready(node_id)

    async def wait_ready(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the node answers a `status` request (raises ClusterError)."""
        await self.local.await_answering(node_id, timeout_s)

    async def replica_state(self, node_id: str) -> str:
        """The node's replica state ("ready", "starting", "waiting_for_peers",
        "rebuilding", "needs_operator"), or why it could not be asked."""
        if not self.is_running(node_id):
            return "not running"
        try:
            status = await node_status(self.local.address(node_id), node_id, self.local.secret)
            return str(status["replication"]["state"])
        except (KvsvrError, trio.TooSlowError, OSError, KeyError, TypeError) as error:
            return f"no answer ({error})"

    async def wait_replica_ready(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the node's replica votes: a node that starts empty does so
        once its peers told it the cluster is new (or once it rebuilt itself)."""
        state = "not asked"
        with trio.move_on_after(timeout_s):
            while True:
                state = await self.replica_state(node_id)
                if state == "ready":
                    return
                await trio.sleep(READY_POLL_S)
        raise ClusterError(f"node {node_id} not ready within {timeout_s:g} s ({state})")

    async def kill(self, node_id: str) -> None:
        """SIGKILL the node and wait until it is gone."""
        if self.is_running(node_id):
            await self.local.akill(node_id)

    async def stop(self, node_id: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean stop), SIGKILL if it has not exited within `timeout_s`."""
        if not self.is_running(node_id):
            return
        try:
            await self.local.astop(node_id, timeout_s)
        except ClusterError:
            pass  # killed past the timeout: stopped all the same, as the events say

    async def restart(self, node_id: str, *, wait: bool = True) -> None:
        """Start a node again (killing it first if it still runs)."""
        await self.kill(node_id)
        await self.start(node_id, wait=wait)

    def pause(self, node_id: str) -> None:
        """SIGSTOP: the process freezes with its sockets open."""
        if not self.is_running(node_id):
            raise ClusterError(f"node {node_id} is not running; cannot pause it")
        self.local.pause(node_id)

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node (a no-op for one that is not paused)."""
        self.local.resume(node_id)

    async def set_clock_rate(self, node_id: str, rate: float) -> float:
        """Run the node's monotonic clock at `rate` times real time (nodes of
        `open_cluster` run with `--test-clock-control`); raises KvsvrError
        (or trio.TooSlowError) if the node does not answer."""
        return await set_clock_rate(self.local.address(node_id), self.local.secret, rate)

    async def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every node: resume the paused, SIGTERM all, SIGKILL the stragglers."""
        await self.local.astop_all(timeout_s)

    # --- logs -----------------------------------------------------------------------

    def log_tail(self, node_id: str, lines: int = 30) -> str:
        return self.local.log_tail(node_id, lines)

    def grep_logs(self, needle: str) -> dict[str, list[str]]:
        """Log lines containing `needle`, per node."""
        return {
            node_id: [line for line in self.log_text(node_id).splitlines() if needle in line]
            for node_id in self.node_ids
        }

    # --- internals ------------------------------------------------------------------

    def _write_pids(self) -> None:
        # For a person cleaning up after a harness that was SIGKILLed (and so
        # could not stop its nodes): `kill $(cat pids)`.
        pids = [str(pid) for pid in self.local.pids.values()]
        (self.directory / PIDS_FILE_NAME).write_text(" ".join(pids) + "\n")

    async def watch_exits(self) -> None:
        """Keep the events' "exit" entries current: a crash shows within `EXIT_POLL_S`."""
        while True:
            self.local.note_exits()
            await trio.sleep(EXIT_POLL_S)


def cluster_config(
    directory: Path,
    ports: Sequence[int],
    network: Network | None,
    *,
    secret: str | None,
    partitions: int,
    replication: int,
    tables: tuple[TableConfig, ...] = (TableConfig("default"),),
    settings: dict[str, Any] | None = None,
) -> ClusterConfig:
    """The config of a loopback cluster on `ports`, peers reached through `network`;
    `settings` sets other `[cluster]` fields (ClusterConfig's)."""
    base = local_cluster(
        len(ports),
        0,
        secret=secret,
        partitions=partitions,
        replication=replication,
        tables=tables,
    )
    base = replace(base, **(settings or {}))
    nodes = tuple(
        replace(
            node,
            port=port,
            peer_addresses=network.peer_addresses(node.id) if network is not None else {},
        )
        for node, port in zip(base.nodes, ports, strict=True)
    )
    return replace(
        base, nodes=nodes, data_dir=directory / "data", source=directory / CONFIG_FILE_NAME
    )


@asynccontextmanager
async def open_cluster(
    directory: str | os.PathLike[str],
    node_count: int = 3,
    *,
    proxies: bool = True,
    secret: str | None = DEFAULT_SECRET,
    partitions: int = 64,
    replication: int = 3,
    rng: random.Random | None = None,
    tables: tuple[TableConfig, ...] = (TableConfig("default"),),
    settings: dict[str, Any] | None = None,
) -> AsyncIterator[Cluster]:
    """A running cluster in `directory` (created; should be fresh); stopped on exit.

    With `proxies` every node-to-node link goes through a `LinkProxy`
    (`cluster.network`); clients always reach nodes directly.
    """
    if node_count < 1:
        raise ValueError("a cluster needs at least one node")
    resolved = await trio.Path(directory).resolve()
    await resolved.mkdir(parents=True, exist_ok=True)
    root = Path(resolved)
    rng = rng if rng is not None else random.Random()
    ports = free_ports(node_count, random.Random(rng.random()))
    node_ids = [f"n{i}" for i in range(1, node_count + 1)]
    network = (
        Network({n: (LOOPBACK, p) for n, p in zip(node_ids, ports, strict=True)}, rng)
        if proxies
        else None
    )
    async with trio.open_nursery() as nursery:
        if network is not None:
            await nursery.start(network.run)
        config = cluster_config(
            root,
            ports,
            network,
            secret=secret,
            partitions=partitions,
            replication=replication,
            tables=tables,
            settings=settings,
        )
        local = LocalCluster(
            write_config(config, root / CONFIG_FILE_NAME),
            # Own session: a terminal's Ctrl-C reaches the harness only, which
            # then stops every node in order (paused ones included).
            new_session=True,
            stop_timeout_s=STOP_TIMEOUT_S,
            # The `clock` nemesis sets the nodes' clock rates.
            node_args=("--test-clock-control",),
        )
        cluster = Cluster(local, network)
        nursery.start_soon(cluster.watch_exits)
        try:
            for node_id in cluster.node_ids:
                await cluster.start(node_id, wait=False)
            await local.await_ready()
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()
                local.close()
                local.note_exits()
            nursery.cancel_scope.cancel()
