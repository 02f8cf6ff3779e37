"""Cluster control: real `kvsvr node` processes behind link proxies.

`open_cluster(directory, node_count)` picks free loopback ports, starts the
proxies of every directed link, writes a config whose `peer_addresses` point
at them, starts the nodes and waits until each answers a `status` request.
On the way out (normal exit, error, Ctrl-C, cancellation) every node is
resumed if paused, sent SIGTERM, given `STOP_TIMEOUT_S`, then SIGKILLed.

Each node's stderr goes to `directory/logs/<id>.log`, appended across
restarts with a marker line per start, so one file tells a node's whole story.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import trio

from jepsen_like.harness.proxy import Network
from kvsvr import net
from kvsvr.config import ClusterConfig, NodeConfig, TableConfig, local_cluster, render_config
from kvsvr.errors import KvsvrError

# --- limits -------------------------------------------------------------------

# A node answers `status` within this after its process starts. Python start-up,
# imports and LMDB open take well under a second on an idle machine; a loaded
# 2-core CI box running other nodes can be ten times slower.
READY_TIMEOUT_S: Final = 60.0
# Time between attempts while waiting for a node to answer.
READY_POLL_S: Final = 0.05
# One attempt's connect + handshake + status round trip.
READY_ATTEMPT_TIMEOUT_S: Final = 2.0
# A node asked to stop (SIGTERM) commits what is staged and exits; past this it
# is killed.
STOP_TIMEOUT_S: Final = 10.0
# Ports for nodes come from below the kernel's ephemeral range, so an outgoing
# connection can never take a node's port while the node is down between a
# kill and its restart.
NODE_PORT_LOW: Final = 20000
PORT_PICK_ATTEMPTS_MAX: Final = 1000
# Lines of a node's log quoted when it fails to start.
LOG_TAIL_LINES: Final = 30

CONFIG_FILE_NAME: Final = "cluster.toml"
PIDS_FILE_NAME: Final = "pids"
DEFAULT_SECRET: Final = "jepsen-like harness secret"
LOOPBACK: Final = "127.0.0.1"


class ClusterError(Exception):
    """A node could not be started or controlled; the message says which and why."""


def _ephemeral_port_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_free_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` distinct loopback ports that are free now, below the ephemeral range."""
    rng = rng if rng is not None else random.Random()
    high = _ephemeral_port_low() - 1
    low = min(NODE_PORT_LOW, high - 1000)
    ports: list[int] = []
    for _ in range(PORT_PICK_ATTEMPTS_MAX):
        if len(ports) == count:
            return ports
        port = rng.randint(low, high)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
        ports.append(port)
    raise ClusterError(f"found only {len(ports)} of {count} free ports in [{low}, {high}]")


def node_command() -> list[str]:
    """The argv prefix that runs a node (`--config FILE --id ID` style or positional)."""
    if importlib.util.find_spec("kvsvr.__main__") is not None:
        return [sys.executable, "-m", "kvsvr", "node"]
    return [
        sys.executable,
        "-c",
        "import sys; from kvsvr.node.server import run_node; "
        "sys.exit(run_node(sys.argv[1], sys.argv[2]))",
    ]


def node_argv(config_path: Path, node_id: str) -> list[str]:
    command = node_command()
    if "-m" in command:
        return [*command, "--config", str(config_path), "--id", node_id]
    return [*command, str(config_path), node_id]


@dataclass(slots=True)
class NodeEvent:
    """Something that happened to a node process, for the report."""

    node: str
    what: str  # start, kill, stop, pause, resume, exit
    at_s: float  # seconds since the cluster started
    detail: str = ""


@dataclass(slots=True)
class _NodeProcess:
    config: NodeConfig
    log_path: Path
    process: trio.Process | None = None
    paused: bool = False
    starts: int = 0
    expected_exit: bool = False


class Cluster:
    """Node processes of one cluster; use `open_cluster` to get one."""

    def __init__(
        self,
        directory: Path,
        config: ClusterConfig,
        config_path: Path,
        network: Network | None,
        nursery: trio.Nursery,
    ) -> None:
        self.directory = directory
        self.config = config
        self.config_path = config_path
        self.network = network
        self.events: list[NodeEvent] = []
        self._nursery = nursery
        self._started_at = time.monotonic()
        logs = directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._nodes = {n.id: _NodeProcess(n, logs / f"{n.id}.log") for n in config.nodes}

    # --- what there is ------------------------------------------------------------

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.config.nodes]

    @property
    def secret(self) -> bytes | None:
        return self.config.secret

    def address(self, node_id: str) -> tuple[str, int]:
        node = self._node(node_id).config
        return node.host, node.port

    def data_dir(self, node_id: str) -> Path:
        return self.config.node_data_dir(node_id)

    def data_file(self, node_id: str) -> Path:
        return self.data_dir(node_id) / "data.mdb"

    def log_path(self, node_id: str) -> Path:
        return self._node(node_id).log_path

    def log_text(self, node_id: str) -> str:
        try:
            return self.log_path(node_id).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self, node_id: str) -> bool:
        process = self._node(node_id).process
        return process is not None and process.returncode is None

    def is_paused(self, node_id: str) -> bool:
        return self._node(node_id).paused

    def unexpected_exits(self) -> list[NodeEvent]:
        """Nodes that exited without being told to: crashes worth a look."""
        return [e for e in self.events if e.what == "exit" and "unexpected" in e.detail]

    # --- control ------------------------------------------------------------------

    async def start(self, node_id: str, *, wait: bool = True) -> None:
        """Start a node that is not running; by default wait until it answers."""
        node = self._node(node_id)
        if self.is_running(node_id):
            raise ClusterError(f"node {node_id} is already running")
        node.starts += 1
        argv = node_argv(self.config_path, node_id)
        with node.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== harness: start #{node.starts} of {node_id} at {stamp} ===\n".encode())
            log.flush()
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log.fileno(),
                stderr=log.fileno(),
                # Own session: a terminal's Ctrl-C reaches the harness only, which
                # then stops every node in order (paused ones included).
                start_new_session=True,
                cwd=str(self.directory),
            )
        node.process = process
        node.paused = False
        node.expected_exit = False
        self._event(node_id, "start", f"pid {process.pid}")
        self._write_pids()
        self._nursery.start_soon(self._watch, node, process)
        if wait:
            await self.wait_ready(node_id)

    async def wait_ready(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the node answers a `status` request (raises ClusterError)."""
        node = self._node(node_id)
        host, port = node.config.host, node.config.port
        last_error = "no attempt made"
        with trio.move_on_after(timeout_s):
            while True:
                if not self.is_running(node_id):
                    raise ClusterError(
                        f"node {node_id} exited while starting:\n{self.log_tail(node_id)}"
                    )
                try:
                    with trio.fail_after(READY_ATTEMPT_TIMEOUT_S):
                        connection = await net.connect(
                            host,
                            port,
                            secret=self.config.secret,
                            connect_timeout_s=READY_ATTEMPT_TIMEOUT_S,
                        )
                        async with connection:
                            await connection.request("status", {})
                    return
                except (KvsvrError, trio.TooSlowError, OSError) as error:
                    last_error = str(error)
                await trio.sleep(READY_POLL_S)
        raise ClusterError(
            f"node {node_id} did not answer within {timeout_s:g} s ({last_error}):\n"
            f"{self.log_tail(node_id)}"
        )

    async def replica_state(self, node_id: str) -> str:
        """The node's replica state ("ready", "starting", "waiting_for_peers",
        "rebuilding", "needs_operator"), or why it could not be asked."""
        if not self.is_running(node_id):
            return "not running"
        node = self._node(node_id)
        try:
            with trio.fail_after(READY_ATTEMPT_TIMEOUT_S):
                connection = await net.connect(
                    node.config.host,
                    node.config.port,
                    secret=self.config.secret,
                    connect_timeout_s=READY_ATTEMPT_TIMEOUT_S,
                )
                async with connection:
                    status = await connection.request("status", {})
            return str(status["replication"]["state"])  # type: ignore[index]
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
        await self._end(node_id, signal.SIGKILL, "kill")

    async def stop(self, node_id: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean stop), SIGKILL if it has not exited within `timeout_s`."""
        node = self._node(node_id)
        if node.process is None or node.process.returncode is not None:
            return
        with trio.move_on_after(timeout_s):
            await self._end(node_id, signal.SIGTERM, "stop")
            return
        await self.kill(node_id)

    async def restart(self, node_id: str, *, wait: bool = True) -> None:
        """Start a node again (killing it first if it still runs)."""
        if self.is_running(node_id):
            await self.kill(node_id)
        await self.start(node_id, wait=wait)

    def pause(self, node_id: str) -> None:
        """SIGSTOP: the process freezes with its sockets open."""
        node = self._node(node_id)
        if node.process is None or node.process.returncode is not None:
            raise ClusterError(f"node {node_id} is not running; cannot pause it")
        node.process.send_signal(signal.SIGSTOP)
        node.paused = True
        self._event(node_id, "pause")

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node (a no-op for one that is not paused)."""
        node = self._node(node_id)
        if node.process is not None and node.process.returncode is None and node.paused:
            node.process.send_signal(signal.SIGCONT)
            self._event(node_id, "resume")
        node.paused = False

    async def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every node: resume the paused, SIGTERM all, SIGKILL the stragglers."""
        for node_id in self.node_ids:
            self.resume(node_id)
        async with trio.open_nursery() as nursery:
            for node_id in self.node_ids:
                nursery.start_soon(self.stop, node_id, timeout_s)

    # --- logs -----------------------------------------------------------------------

    def log_tail(self, node_id: str, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text(node_id).splitlines()[-lines:])

    def grep_logs(self, needle: str) -> dict[str, list[str]]:
        """Log lines containing `needle`, per node."""
        return {
            node_id: [line for line in self.log_text(node_id).splitlines() if needle in line]
            for node_id in self.node_ids
        }

    # --- internals ------------------------------------------------------------------

    def _node(self, node_id: str) -> _NodeProcess:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise ClusterError(f"no node {node_id!r}; nodes: {self.node_ids}") from None

    def _write_pids(self) -> None:
        # For a person cleaning up after a harness that was SIGKILLed (and so
        # could not stop its nodes): `kill $(cat pids)`.
        pids = [str(n.process.pid) for n in self._nodes.values() if n.process is not None]
        (self.directory / PIDS_FILE_NAME).write_text(" ".join(pids) + "\n")

    def _event(self, node_id: str, what: str, detail: str = "") -> None:
        self.events.append(NodeEvent(node_id, what, time.monotonic() - self._started_at, detail))

    async def _end(self, node_id: str, signum: signal.Signals, what: str) -> None:
        node = self._node(node_id)
        process = node.process
        if process is None or process.returncode is not None:
            return
        node.expected_exit = True
        process.send_signal(signum)
        if node.paused and signum != signal.SIGKILL:
            process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        node.paused = False
        self._event(node_id, what)
        # Waited for here, not through the watcher: the watcher is cancelled
        # with the cluster's nursery, and a stop must still see the exit.
        await process.wait()

    async def _watch(self, node: _NodeProcess, process: trio.Process) -> None:
        code = await process.wait()
        detail = f"code {code}" + ("" if node.expected_exit else " (unexpected)")
        self._event(node.config.id, "exit", detail)


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
    ports = pick_free_ports(node_count, random.Random(rng.random()))
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
        config_path = root / CONFIG_FILE_NAME
        config_path.write_text(render_config(config, data_dir="data"))
        cluster = Cluster(root, config, config_path, network, nursery)
        try:
            for node_id in cluster.node_ids:
                await cluster.start(node_id, wait=False)
            for node_id in cluster.node_ids:
                await cluster.wait_ready(node_id)
            for node_id in cluster.node_ids:
                await cluster.wait_replica_ready(node_id)
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()
            nursery.cancel_scope.cancel()
