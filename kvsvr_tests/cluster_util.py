"""Real kvsvr node processes for integration tests.

    with LocalCluster(tmp_path, nodes=3) as cluster:
        cluster.start_all()                      # starts every node, waits until each answers
        async with kvsvr.connect(cluster.addresses, secret=cluster.secret) as client:
            ...
        cluster.kill("n2")                       # SIGKILL
        cluster.start("n2")                      # and waits until its port answers
        cluster.stop("n1")                       # SIGTERM, wait (SIGKILL past a deadline)
        cluster.pause("n3"); cluster.resume("n3")  # SIGSTOP / SIGCONT

`cluster.connect()` is `kvsvr.connect` to every node with the cluster secret.
`node_connection(address, secret)` sends requests to one node only (the
client routes each key to its preferred coordinator, whatever address it was
given): for "local" reads of that node's replica, or to make it coordinate.

Each node runs as `python -m kvsvr node --config CONFIG --id ID` from a config
written into the test's directory, with a cluster secret, its LMDB in
`directory/data/<id>` and its output appended to `directory/logs/<id>.log`
(a marker line per start). Leaving the `with` block SIGKILLs every node that
still runs; if the block raised, the tail of every node's log is printed (to
stderr, which pytest shows with the failure).

The methods block (they poll with short sleeps, bounded by generous deadlines
for a loaded 2-core CI machine). From trio code call them through
`trio.to_thread.run_sync` (or the `a*` helpers here) so that clients running
in the same event loop are not stalled.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trio

import kvsvr
from kvsvr import net
from kvsvr.config import ClusterConfig, TableConfig, local_cluster, render_config
from kvsvr.keys import encode_key, split_user_key

LOOPBACK: Final = "127.0.0.1"

# A node imports, opens LMDB and binds within a second on an idle machine; a
# loaded CI box running other tests' nodes can be ten times slower.
READY_TIMEOUT_S: Final = 60.0
READY_POLL_S: Final = 0.05
# A node asked to stop (SIGTERM) commits what is staged and exits; past this it is killed.
STOP_TIMEOUT_S: Final = 15.0
# Node ports are taken below the kernel's ephemeral range, so that an outgoing
# connection (of a client, or of another node) can never take a node's port as
# its local port while that node is down between a kill and a restart.
NODE_PORT_LOW: Final = 20000
PORT_PICK_ATTEMPTS_MAX: Final = 2000
LOG_TAIL_LINES: Final = 40
DEFAULT_SECRET: Final = "integration-test-secret"

_LIVE_CLUSTERS: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


class ClusterError(Exception):
    """A node could not be started or stopped; the message says which and why."""


def _ephemeral_port_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_base_port(count: int, rng: random.Random | None = None) -> int:
    """A base port B such that B+1 .. B+count are free on 127.0.0.1 now (the
    layout of `kvsvr.config.local_cluster`), below the ephemeral range."""
    rng = rng if rng is not None else random.Random()
    high = _ephemeral_port_low() - 1 - count
    low = min(NODE_PORT_LOW, high - 1000)
    for _ in range(PORT_PICK_ATTEMPTS_MAX):
        base = rng.randint(low, high)
        if all(_port_is_free(base + i) for i in range(1, count + 1)):
            return base
    raise ClusterError(f"no {count} consecutive free ports found in [{low}, {high}]")


def port_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class LocalCluster:
    """N `kvsvr node` processes on 127.0.0.1 for one test. Not started until
    `start_all()` / `start(id)`."""

    def __init__(
        self,
        directory: Path,
        nodes: int = 3,
        *,
        secret: str = DEFAULT_SECRET,
        partitions: int = 16,
        replication: int = 3,
        tables: tuple[TableConfig, ...] = (TableConfig("default"),),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """`settings`: other `[cluster]` fields (ClusterConfig's), e.g. hints_max."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        base = free_base_port(nodes)
        self.config: ClusterConfig = dataclasses.replace(
            local_cluster(
                nodes,
                base,
                secret=secret,
                partitions=partitions,
                replication=replication,
                tables=tables,
            ),
            data_dir=self.directory / "data",
            **(settings or {}),
        )
        self.config_path = self.directory / "cluster.toml"
        self.config_path.write_text(
            render_config(self.config, data_dir=str(self.directory / "data")), encoding="utf-8"
        )
        (self.directory / "logs").mkdir(exist_ok=True)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self.events: list[tuple[float, str, str]] = []  # (monotonic s, node, what)
        _LIVE_CLUSTERS.add(self)

    # --- what there is --------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return [node.id for node in self.config.nodes]

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.config.nodes]

    def address(self, node_id: str) -> str:
        return self.config.node(node_id).address

    def host_port(self, node_id: str) -> tuple[str, int]:
        node = self.config.node(node_id)
        return node.host, node.port

    def log_path(self, node_id: str) -> Path:
        return self.directory / "logs" / f"{node_id}.log"

    def log_tail(self, node_id: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path(node_id).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self, node_id: str) -> bool:
        process = self._processes.get(node_id)
        return process is not None and process.poll() is None

    def pid(self, node_id: str) -> int | None:
        process = self._processes.get(node_id)
        return process.pid if process is not None and process.poll() is None else None

    # --- control --------------------------------------------------------------------

    def start(
        self,
        node_id: str,
        *,
        wait: bool = True,
        extra_args: tuple[str, ...] = (),
        config_path: Path | None = None,
    ) -> None:
        """Start a node that is not running; by default wait until its port
        answers. `extra_args` go to `kvsvr node` (`--initial-cluster-state
        existing`); `config_path` replaces the cluster's config for this start."""
        self.config.node(node_id)  # a clear error for an unknown id
        if self.is_running(node_id):
            raise ClusterError(f"node {node_id} is already running")
        argv = [
            sys.executable,
            "-m",
            "kvsvr",
            "node",
            "--config",
            str(config_path or self.config_path),
            "--id",
            node_id,
            *extra_args,
        ]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path(node_id).open("ab") as log:
            log.write(f"--- cluster_util: starting {node_id} at {time.ctime()} ---\n".encode())
            log.flush()
            self._processes[node_id] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )
        self._event(node_id, "start")
        if wait:
            self.wait_ready(node_id)

    def start_all(self) -> None:
        """Start every node that is not running, then wait for all of them."""
        started = [node_id for node_id in self.ids if not self.is_running(node_id)]
        for node_id in started:
            self.start(node_id, wait=False)
        for node_id in started:
            self.wait_ready(node_id)
        self.wait_replicas_ready(started)

    def wait_replicas_ready(self, node_ids: list[str], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until each node's replica state is "ready" and it sees every
        running peer up: a node starting with an empty store votes only once its
        peers told it the cluster is new (or it rebuilt what it lost), and peer
        links come up a moment after all ports answer."""
        deadline = time.monotonic() + timeout_s
        for node_id in node_ids:
            while True:
                try:
                    status = _status_in_thread(self.address(node_id), self.secret)
                    state = str(status["replication"]["state"])
                    down = [
                        peer
                        for peer, seen in status["replication"]["peers"].items()
                        if not seen["up"] and self.is_running(peer)
                    ]
                except (kvsvr.KvsvrError, OSError, KeyError, TypeError) as error:
                    state, down = f"no answer: {error}", []
                if state == "ready" and not down:
                    break
                if down:
                    state = f"{state}, sees {down} down"
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"node {node_id} not ready within {timeout_s} s ({state}); log tail:\n"
                        + self.log_tail(node_id)
                    )
                time.sleep(READY_POLL_S)

    def wait_ready(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the node's port accepts connections (it binds only once its
        storage is open). ClusterError, with its log tail, if it exits or takes
        longer than `timeout_s`."""
        host, port = self.host_port(node_id)
        deadline = time.monotonic() + timeout_s
        while True:
            process = self._processes.get(node_id)
            if process is None:
                raise ClusterError(f"node {node_id} was never started")
            code = process.poll()
            if code is not None:
                raise ClusterError(
                    f"node {node_id} exited with code {code} while starting; log tail:\n"
                    + self.log_tail(node_id)
                )
            if port_answers(host, port):
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"node {node_id} did not answer on {host}:{port} within {timeout_s} s; "
                    "log tail:\n" + self.log_tail(node_id)
                )
            time.sleep(READY_POLL_S)

    def wait_exit(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Wait for a node that should exit by itself; its exit code."""
        process = self._processes.get(node_id)
        if process is None:
            raise ClusterError(f"node {node_id} was never started")
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ClusterError(
                f"node {node_id} still runs after {timeout_s} s; log tail:\n"
                + self.log_tail(node_id)
            ) from None

    def kill(self, node_id: str) -> None:
        """SIGKILL the node (a crash) and reap it."""
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            raise ClusterError(f"node {node_id} is not running")
        process.send_signal(signal.SIGKILL)
        process.wait()
        self._event(node_id, "kill")

    def stop(self, node_id: str, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the node and wait for it to exit (SIGKILL past `timeout_s`);
        returns its exit code (negative: killed by that signal)."""
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            raise ClusterError(f"node {node_id} is not running")
        process.terminate()
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self._event(node_id, "stop timed out; killed")
            raise ClusterError(
                f"node {node_id} did not stop within {timeout_s} s of SIGTERM; killed it"
            ) from None
        self._event(node_id, f"stop (exit {code})")
        return code

    def pause(self, node_id: str) -> None:
        """SIGSTOP the node: its ports still accept connections (the kernel does
        that), but it answers nothing until `resume`."""
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            raise ClusterError(f"node {node_id} is not running")
        process.send_signal(signal.SIGSTOP)
        self._event(node_id, "pause")

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node."""
        process = self._processes.get(node_id)
        if process is None or process.poll() is not None:
            raise ClusterError(f"node {node_id} is not running")
        process.send_signal(signal.SIGCONT)
        self._event(node_id, "resume")

    def close(self) -> None:
        """SIGKILL every node that still runs. Idempotent."""
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()  # SIGKILL ends a paused (SIGSTOPped) process too
        for process in self._processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _LIVE_CLUSTERS.discard(self)

    def describe(self) -> str:
        """Node logs' tails and the start/kill events, for a failure report."""
        parts = [f"cluster in {self.directory} (config {self.config_path})"]
        parts += [f"  {at:.3f} {node} {what}" for at, node, what in self.events]
        for node_id in self.ids:
            parts.append(f"----- {node_id} log tail ({self.log_path(node_id)}) -----")
            parts.append(self.log_tail(node_id))
        return "\n".join(parts)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:
                print(self.describe(), file=sys.stderr, flush=True)
        finally:
            self.close()

    def _event(self, node_id: str, what: str) -> None:
        self.events.append((time.monotonic(), node_id, what))

    def connect(self, timeout_s: float = 10.0) -> AbstractAsyncContextManager[kvsvr.Client]:
        """`async with cluster.connect() as client:` — `kvsvr.connect` to every node."""
        return kvsvr.connect(self.addresses, secret=self.secret, timeout_s=timeout_s)

    # --- from trio code ---------------------------------------------------------------

    async def astart(self, node_id: str) -> None:
        await trio.to_thread.run_sync(self.start, node_id)

    async def akill(self, node_id: str) -> None:
        await trio.to_thread.run_sync(self.kill, node_id)

    async def astop(self, node_id: str) -> int:
        return await trio.to_thread.run_sync(self.stop, node_id)

    async def astart_all(self) -> None:
        await trio.to_thread.run_sync(self.start_all)


def _status_in_thread(address: str, secret: str | bytes | None) -> dict[str, Any]:
    """One node's status, asked from a thread of its own (so that it also works
    when called from inside a trio test, as the blocking methods here are)."""
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def ask() -> None:
        async with node_connection(address, secret, connect_timeout_s=2.0) as node:
            with trio.fail_after(5.0):
                reply = await node.connection.request("status", {})
        assert isinstance(reply, dict)
        result.update(reply)

    def run() -> None:
        try:
            trio.run(ask)
        except BaseException as error:  # reported to the caller
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if failure:
        error = failure[0]
        if isinstance(error, trio.TooSlowError):
            raise kvsvr.Timeout("status took too long")
        raise error
    return result


@atexit.register
def _kill_leftovers() -> None:
    for cluster in list(_LIVE_CLUSTERS):
        cluster.close()


# --- talking to one node in particular ----------------------------------------------------
#
# `kvsvr.connect` routes every key to its partition's preferred coordinator
# whatever address it was given, so a test that must ask *one* node (its local
# replica, or it as the coordinator) talks to it over a raw RPC connection.


class NodeConnection:
    """Client requests sent to one node only; that node serves or coordinates them."""

    def __init__(self, connection: net.RpcConnection) -> None:
        self.connection = connection

    async def get(
        self, key: Any, *, table: str = "default", consistency: str = "strong"
    ) -> tuple[int, bytes | None]:
        """(version, value) as the node answers; value None when absent."""
        body = {
            "table": table,
            "key": _encoded(key),
            "consistency": consistency,
            "max_age_s": None,
            "min_version": 0,
        }
        reply = await self.connection.request("get", body)
        assert isinstance(reply, dict), reply
        return reply["version"], reply["value"]

    async def put(
        self,
        key: Any,
        value: bytes | None,
        *,
        table: str = "default",
        if_version: int | None = None,
        if_absent: bool = False,
    ) -> int:
        body = {
            "table": table,
            "key": _encoded(key),
            "value": value,
            "if_version": if_version,
            "if_absent": if_absent,
        }
        reply = await self.connection.request("put", body)
        assert isinstance(reply, dict), reply
        version: int = reply["version"]
        return version


def _encoded(key: Any) -> bytes:
    return encode_key(*split_user_key(key))


@asynccontextmanager
async def node_connection(
    address: str, secret: str | bytes | None, *, connect_timeout_s: float = 5.0
) -> AsyncIterator[NodeConnection]:
    """`async with node_connection("127.0.0.1:7101", secret) as node:` — raises
    `kvsvr.Unavailable` if the node cannot be reached."""
    host, _, port = address.rpartition(":")
    secret_bytes = secret.encode() if isinstance(secret, str) else secret
    connection = await net.connect(
        host, int(port), secret=secret_bytes, connect_timeout_s=connect_timeout_s
    )
    async with connection:
        yield NodeConnection(connection)
