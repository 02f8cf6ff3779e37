"""Local clusters: `kvsvr node` processes on 127.0.0.1, for trying kvsvr out,
demos, benchmarks, the fault harness and tests.

    with LocalCluster.create(directory, local_config(3, secret="s")) as cluster:
        cluster.start_all()        # returns once every node is ready
        with kvsvr.SyncClient(cluster.addresses, secret=cluster.secret) as client:
            ...
        cluster.kill("n2")         # SIGKILL, a crash
        cluster.start("n2")        # and wait until it answers
        cluster.stop("n1")         # SIGTERM, wait (SIGKILL past a deadline)
        cluster.pause("n3"); cluster.resume("n3")  # SIGSTOP / SIGCONT

`local_config` picks the ports (`free_base_port`: one run of free ports below
the kernel's ephemeral range) and `write_config` writes the file the nodes
read; `LocalCluster(config_path)` runs the nodes of a config already written
(as `kvsvr up` does). Each node runs as `python -m kvsvr node --config FILE
--id ID`, its output appended to `log_dir/<id>.log` with a marker line per
start.

Ready means what `kvsvr status` shows as "ready": the node answers, its
replica votes (a node that starts empty first asks its peers whether the
cluster is new, or rebuilds what it lost) and it sees every running peer up.
`start` waits only until the node answers (a replacement node answers while
it rebuilds); `start_all`, `wait_ready` and `temporary_cluster` wait until
ready.

Leaving the `with` block stops every node that still runs (SIGTERM, SIGKILL
past `stop_timeout_s`); nodes of a cluster not closed are killed when the
interpreter exits. The blocking methods poll with short sleeps bounded by
generous deadlines (a loaded 2-core machine can be ten times slower than an
idle one); from trio code use the `a*` methods, which do not stall the
event loop.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from kvsvr import net
from kvsvr.client import connect
from kvsvr.clock import TEST_CLOCK_RATE_METHOD
from kvsvr.config import ClusterConfig, TableConfig, load_config, local_cluster, render_config
from kvsvr.errors import KvsvrError

LOOPBACK: Final = "127.0.0.1"
CONFIG_FILE_NAME: Final = "cluster.toml"

# A node imports, opens LMDB and binds within a second on an idle machine; a
# loaded CI box running other nodes can be ten times slower, and a fresh
# cluster's nodes must then also exchange hellos before they vote.
READY_TIMEOUT_S: Final = 60.0
# Between two looks at a starting node: short against the start-up itself.
READY_POLL_S: Final = 0.05
# One status request while waiting: connect, handshake and the round trip.
STATUS_TIMEOUT_S: Final = 5.0
# A node asked to stop (SIGTERM) commits what is staged and exits; past this it is killed.
STOP_TIMEOUT_S: Final = 15.0
# Between two looks at stopping nodes: a stop takes a fraction of a second.
STOP_POLL_S: Final = 0.05
# Node ports are taken below the kernel's ephemeral range, so that an outgoing
# connection (of a client, or of another node) can never take a node's port as
# its local port while that node is down between a kill and a restart.
NODE_PORT_LOW: Final = 20000
# Random tries for a run of free ports; a busy machine rarely needs more than a few.
PORT_PICK_ATTEMPTS_MAX: Final = 2000
# Lines of a node's log quoted when it fails.
LOG_TAIL_LINES: Final = 40

_PR_SET_PDEATHSIG: Final = 1

_LIVE_CLUSTERS: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


class LocalClusterError(Exception):
    """A node could not be started, readied or stopped; the message says which and why."""


# --- ports --------------------------------------------------------------------------


def _ephemeral_port_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a listener could bind `host:port` now (with SO_REUSEADDR, as the
    node's listener: a previous run's TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
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
        if all(port_is_free(base + offset) for offset in range(1, count + 1)):
            return base
    raise LocalClusterError(f"no {count} consecutive free ports found in [{low}, {high}]")


def free_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` consecutive ports free on 127.0.0.1 now (`free_base_port`'s run)."""
    base = free_base_port(count, rng)
    return list(range(base + 1, base + 1 + count))


# --- configs ------------------------------------------------------------------------


def local_config(
    nodes: int,
    *,
    secret: str | None = None,
    partitions: int = 64,
    replication: int = 3,
    tables: tuple[TableConfig, ...] = (TableConfig("default"),),
    settings: dict[str, Any] | None = None,
    rng: random.Random | None = None,
) -> ClusterConfig:
    """A new cluster of `nodes` nodes on free ports of 127.0.0.1; `settings`
    sets other `[cluster]` fields (ClusterConfig's, e.g. `hints_max`)."""
    config = local_cluster(
        nodes,
        free_base_port(nodes, rng),
        secret=secret,
        partitions=partitions,
        replication=replication,
        tables=tables,
    )
    return dataclasses.replace(config, **(settings or {}))


def write_config(config: ClusterConfig, path: Path, *, data_dir: str = "data") -> Path:
    """Write `config` to `path` for the nodes to read, readable only by its owner
    when it holds a secret. `data_dir` is relative to the file's folder: "data"
    keeps node i's LMDB in `data/ni`, "." in `ni` next to the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_config(config, data_dir=data_dir), encoding="utf-8")
    if config.secret is not None:
        path.chmod(0o600)
    return path


def node_argv(
    config_path: Path,
    node_id: str,
    *,
    extra_args: Sequence[str] = (),
    python_args: Sequence[str] = (),
) -> list[str]:
    """The command that runs one node; `python_args` go to the interpreter
    before `-m kvsvr` (`-m cProfile -o FILE`), `extra_args` to `kvsvr node`."""
    return [
        sys.executable,
        *python_args,
        "-m",
        "kvsvr",
        "node",
        "--config",
        str(config_path),
        "--id",
        node_id,
        *extra_args,
    ]


def die_with_parent() -> None:
    """A `preexec_fn` (Linux): the child gets SIGKILL when the thread that
    started it ends, so a parent killed outright leaves no process behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# --- readiness ----------------------------------------------------------------------


async def node_status(address: str, node_id: str, secret: str | None) -> dict[str, Any]:
    """One node's status, asked of that node (`KvsvrError` if it does not answer)."""
    with trio.fail_after(STATUS_TIMEOUT_S):
        async with connect([address], secret=secret, timeout_s=STATUS_TIMEOUT_S) as client:
            return await client.status(node_id)


async def set_clock_rate(address: str, secret: str | None, rate: float) -> float:
    """Set the rate of a node's monotonic clock (a node started with
    `--test-clock-control`); the rate it runs at now."""
    host, _, port = address.rpartition(":")
    with trio.fail_after(STATUS_TIMEOUT_S):
        connection = await net.connect(
            host,
            int(port),
            secret=secret.encode() if secret else None,
            connect_timeout_s=STATUS_TIMEOUT_S,
        )
        async with connection:
            reply = await connection.request(TEST_CLOCK_RATE_METHOD, {"rate": rate})
    if not isinstance(reply, dict) or not isinstance(reply.get("rate"), float):
        raise KvsvrError(f"unexpected answer to a clock-rate request: {reply!r}")
    return float(reply["rate"])


def not_ready_because(status: dict[str, Any], running_peers: Iterable[str]) -> str | None:
    """Why a node with this status is not ready; None if its replica votes and
    it sees every peer of `running_peers` up."""
    replication = status.get("replication")
    if not isinstance(replication, dict):
        return "no replication status"
    state = str(replication.get("state"))
    peers = replication.get("peers")
    seen = peers if isinstance(peers, dict) else {}
    down = [
        peer
        for peer in running_peers
        if peer in seen and not (isinstance(seen[peer], dict) and seen[peer].get("up"))
    ]
    if state != "ready":
        return state
    if down:
        return f"sees {', '.join(down)} down"
    return None


def _blocking(function: Callable[[], Awaitable[None]]) -> None:
    """Run `function` in trio in a thread of its own and wait for it: works both
    outside trio and from inside a trio test (which it then blocks)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            trio.run(function)
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="kvsvr-local-wait", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


# --- the cluster --------------------------------------------------------------------


@dataclass(slots=True)
class NodeEvent:
    """Something done to (or seen of) a node process, for a report."""

    node: str
    what: str  # start, kill, stop, pause, resume, exit
    at_s: float  # seconds since the cluster object was made
    detail: str = ""


@dataclass(slots=True)
class _Node:
    id: str
    host: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    paused: bool = False
    expected_exit: bool = False
    exit_noted: bool = False


class LocalCluster:
    """The node processes of one local cluster, run from `config_path`; none
    runs until `start_all()` / `start(id)`."""

    def __init__(
        self,
        config_path: Path,
        *,
        log_dir: Path | None = None,
        new_session: bool = False,
        die_with_parent: bool = False,
        python_args: Callable[[str], Sequence[str]] | None = None,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        node_args: Sequence[str] = (),
    ) -> None:
        """`log_dir`: where `<id>.log` go (default `logs/` next to the config).
        `new_session`: the nodes get a session of their own, so a terminal's
        Ctrl-C reaches only this process (which then stops them in order).
        `die_with_parent`: the kernel kills a node when the thread that started
        it ends (PR_SET_PDEATHSIG; start nodes from the main thread then).
        `python_args(node_id)`: interpreter arguments before `-m kvsvr`.
        `node_args`: arguments to `kvsvr node` at every start."""
        self.config_path = Path(config_path).resolve()
        self.directory = self.config_path.parent
        self.config: ClusterConfig = load_config(self.config_path)
        self.log_dir = log_dir if log_dir is not None else self.directory / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.events: list[NodeEvent] = []
        self._new_session = new_session
        self._die_with_parent = die_with_parent
        self._python_args = python_args
        self._stop_timeout_s = stop_timeout_s
        self._node_args = tuple(node_args)
        self._created_at = time.monotonic()
        self._nodes = {
            node.id: _Node(node.id, node.host, node.port, self.log_dir / f"{node.id}.log")
            for node in self.config.nodes
        }
        _LIVE_CLUSTERS.add(self)

    @classmethod
    def create(
        cls, directory: Path, config: ClusterConfig, *, data_dir: str = "data", **options: Any
    ) -> LocalCluster:
        """`config` written to `directory/cluster.toml` (see `write_config`), and
        the cluster that runs it; `options` as for `LocalCluster`."""
        return cls(
            write_config(config, Path(directory) / CONFIG_FILE_NAME, data_dir=data_dir), **options
        )

    # --- what there is ----------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return list(self._nodes)

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.config.nodes]

    @property
    def secret(self) -> str | None:
        """The cluster secret, as `kvsvr.connect` takes it."""
        return None if self.config.secret is None else self.config.secret.decode()

    @property
    def pids(self) -> dict[str, int]:
        """The running nodes' process ids."""
        return {node_id: pid for node_id in self._nodes if (pid := self.pid(node_id)) is not None}

    def address(self, node_id: str) -> str:
        return self.config.node(node_id).address

    def host_port(self, node_id: str) -> tuple[str, int]:
        node = self._node(node_id)
        return node.host, node.port

    def data_dir(self, node_id: str) -> Path:
        return self.config.node_data_dir(node_id)

    def log_path(self, node_id: str) -> Path:
        return self._node(node_id).log_path

    def log_text(self, node_id: str) -> str:
        try:
            return self.log_path(node_id).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, node_id: str, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text(node_id).splitlines()[-lines:]) or "(no log)"

    def is_running(self, node_id: str) -> bool:
        process = self._node(node_id).process
        return process is not None and process.poll() is None

    def is_paused(self, node_id: str) -> bool:
        return self._node(node_id).paused

    def exit_code(self, node_id: str) -> int | None:
        """The node's exit code once it has exited; None while it runs or before its start."""
        process = self._node(node_id).process
        return None if process is None else process.poll()

    def pid(self, node_id: str) -> int | None:
        process = self._node(node_id).process
        return process.pid if process is not None and process.poll() is None else None

    def check_alive(self) -> None:
        """LocalClusterError, with its log tail, if a started node has exited."""
        for node_id in self.ids:
            code = self.exit_code(node_id)
            if code is not None:
                raise LocalClusterError(
                    f"node {node_id} died (code {code}); log tail:\n{self.log_tail(node_id)}"
                )

    def describe(self) -> str:
        """Node logs' tails and the start/kill events, for a failure report."""
        parts = [f"cluster in {self.directory} (config {self.config_path})"]
        parts += [f"  {e.at_s:.3f} {e.node} {e.what} {e.detail}" for e in self.events]
        for node_id in self.ids:
            parts.append(f"----- {node_id} log tail ({self.log_path(node_id)}) -----")
            parts.append(self.log_tail(node_id))
        return "\n".join(parts)

    # --- control ----------------------------------------------------------------

    def start(
        self,
        node_id: str,
        *,
        wait: bool = True,
        extra_args: Sequence[str] = (),
        config_path: Path | None = None,
    ) -> None:
        """Start a node that is not running; by default wait until it answers.
        `extra_args` go to `kvsvr node` (`--initial-cluster-state existing`);
        `config_path` replaces the cluster's config for this start."""
        node = self._node(node_id)
        if self.is_running(node_id):
            raise LocalClusterError(f"node {node_id} is already running")
        self._note_exit(node)
        node.starts += 1
        argv = node_argv(
            config_path or self.config_path,
            node_id,
            extra_args=(*self._node_args, *extra_args),
            python_args=self._python_args(node_id) if self._python_args else (),
        )
        with node.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"=== kvsvr.local: start #{node.starts} of {node_id} at {stamp} ===\n".encode()
            )
            log.flush()
            node.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                cwd=self.directory,
                start_new_session=self._new_session,
                preexec_fn=die_with_parent if self._die_with_parent else None,
            )
        node.paused = False
        node.expected_exit = False
        node.exit_noted = False
        self._event(node_id, "start", f"pid {node.process.pid}")
        if wait:
            self.wait_answering(node_id)

    def start_all(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start every node that is not running, then wait until all of them are ready."""
        started = [node_id for node_id in self.ids if not self.is_running(node_id)]
        for node_id in started:
            self.start(node_id, wait=False)
        self.wait_ready(started, timeout_s)

    def restart(self, node_id: str, *, wait: bool = True) -> None:
        """Start a node again on its data, killing it first if it still runs."""
        if self.is_running(node_id):
            self.kill(node_id)
        self.start(node_id, wait=wait)

    def wait_answering(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the node answers a status request (LocalClusterError, with
        its log tail, if it exits or takes longer than `timeout_s`)."""
        _blocking(lambda: self.await_answering(node_id, timeout_s))

    def wait_ready(
        self, node_ids: Sequence[str] | None = None, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Wait until each node (default: every one) is ready: its replica votes
        and it sees every running peer up."""
        _blocking(lambda: self.await_ready(node_ids, timeout_s))

    def not_ready(self, node_id: str) -> str | None:
        """Why the node is not ready, asked once; None if it is ready."""
        reason: list[str | None] = []

        async def ask() -> None:
            reason.append(await self._not_ready_because(node_id))

        _blocking(ask)
        return reason[0]

    def wait_exit(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Wait for a node that should exit by itself; its exit code."""
        process = self._process(node_id, running=False)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LocalClusterError(
                f"node {node_id} still runs after {timeout_s} s; log tail:\n"
                + self.log_tail(node_id)
            ) from None

    def kill(self, node_id: str) -> None:
        """SIGKILL the node (a crash) and reap it."""
        process = self._process(node_id)
        self._node(node_id).expected_exit = True
        process.kill()  # SIGKILL ends a paused (SIGSTOPped) process too
        self._node(node_id).paused = False
        self._event(node_id, "kill")
        process.wait()
        self._note_exit(self._node(node_id))

    def stop(self, node_id: str, timeout_s: float | None = None) -> int:
        """SIGTERM the node and wait for it to exit; returns its exit code.
        Past `timeout_s` (default the cluster's) it is killed and
        LocalClusterError says so."""
        process = self._process(node_id)
        node = self._node(node_id)
        node.expected_exit = True
        process.terminate()
        if node.paused:
            process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            node.paused = False
        self._event(node_id, "stop")
        timeout_s = self._stop_timeout_s if timeout_s is None else timeout_s
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self._event(node_id, "kill", f"still running {timeout_s:g} s after SIGTERM")
            self._note_exit(node)
            raise LocalClusterError(
                f"node {node_id} did not stop within {timeout_s} s of SIGTERM; killed it"
            ) from None
        self._note_exit(node)
        return code

    def pause(self, node_id: str) -> None:
        """SIGSTOP the node: its ports still accept connections (the kernel does
        that), but it answers nothing until `resume`."""
        self._process(node_id).send_signal(signal.SIGSTOP)
        self._node(node_id).paused = True
        self._event(node_id, "pause")

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node (a no-op for one that is not paused)."""
        node = self._node(node_id)
        if node.paused and self.is_running(node_id):
            self._process(node_id).send_signal(signal.SIGCONT)
            self._event(node_id, "resume")
        node.paused = False

    def stop_all(
        self, timeout_s: float | None = None, *, kill_now: Callable[[], bool] | None = None
    ) -> list[str]:
        """Stop every running node at once: SIGTERM (paused ones resumed), then
        SIGKILL those still running past `timeout_s` or once `kill_now()` says
        so (a second Ctrl-C). Returns the ids of the nodes it had to kill."""
        running = [node_id for node_id in self.ids if self.is_running(node_id)]
        for node_id in running:
            node = self._node(node_id)
            node.expected_exit = True
            self._process(node_id).terminate()
            if node.paused:
                self._process(node_id).send_signal(signal.SIGCONT)
                node.paused = False
            self._event(node_id, "stop")
        timeout_s = self._stop_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while any(self.is_running(node_id) for node_id in running):
            if time.monotonic() > deadline or (kill_now is not None and kill_now()):
                break
            time.sleep(STOP_POLL_S)
        killed = [node_id for node_id in running if self.is_running(node_id)]
        for node_id in killed:
            self._process(node_id).kill()
            self._event(node_id, "kill", f"still running {timeout_s:g} s after SIGTERM")
        for node_id in running:
            self._process(node_id, running=False).wait()
            self._note_exit(self._node(node_id))
        return killed

    def close(self) -> None:
        """SIGKILL every node that still runs and reap them. Idempotent."""
        for node in self._nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.expected_exit = True
                node.process.kill()
        for node in self._nodes.values():
            if node.process is not None:
                try:
                    node.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                self._note_exit(node)
        _LIVE_CLUSTERS.discard(self)

    def note_exits(self) -> None:
        """Add an "exit" event for each node that exited since it was last
        looked at, saying "(unexpected)" unless it was killed or stopped; the
        control methods do this themselves, so call it to see crashes."""
        for node in self._nodes.values():
            self._note_exit(node)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_all()
        finally:
            self.close()

    # --- from trio code ---------------------------------------------------------

    async def await_answering(self, node_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """`wait_answering` for trio code."""
        last = "not asked yet"
        with trio.move_on_after(timeout_s):
            while True:
                self._check_started(node_id)
                try:
                    await node_status(self.address(node_id), node_id, self.secret)
                    return
                except (KvsvrError, trio.TooSlowError, OSError) as error:
                    last = str(error) or type(error).__name__
                await trio.sleep(READY_POLL_S)
        raise LocalClusterError(
            f"node {node_id} did not answer within {timeout_s:g} s ({last}); log tail:\n"
            + self.log_tail(node_id)
        )

    async def await_ready(
        self, node_ids: Sequence[str] | None = None, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """`wait_ready` for trio code."""
        waiting = list(self.ids if node_ids is None else node_ids)
        reason: str | None = "not asked yet"
        with trio.move_on_after(timeout_s):
            while waiting:
                self._check_started(waiting[0])
                reason = await self._not_ready_because(waiting[0])
                if reason is None:
                    waiting.pop(0)
                else:
                    await trio.sleep(READY_POLL_S)
        if waiting:
            raise LocalClusterError(
                f"node {waiting[0]} not ready within {timeout_s:g} s ({reason}); log tail:\n"
                + self.log_tail(waiting[0])
            )

    async def _not_ready_because(self, node_id: str) -> str | None:
        try:
            status = await node_status(self.address(node_id), node_id, self.secret)
        except (KvsvrError, trio.TooSlowError, OSError) as error:
            return f"no answer: {error or type(error).__name__}"
        running = [peer for peer in self.ids if self.is_running(peer)]
        return not_ready_because(status, running)

    async def astart(self, node_id: str, *, wait: bool = True) -> None:
        self.start(node_id, wait=False)
        if wait:
            await self.await_answering(node_id)

    async def astart_all(self) -> None:
        started = [node_id for node_id in self.ids if not self.is_running(node_id)]
        for node_id in started:
            self.start(node_id, wait=False)
        await self.await_ready(started)

    async def akill(self, node_id: str) -> None:
        await trio.to_thread.run_sync(self.kill, node_id)

    async def astop(self, node_id: str, timeout_s: float | None = None) -> int:
        return await trio.to_thread.run_sync(self.stop, node_id, timeout_s)

    async def astop_all(self, timeout_s: float | None = None) -> None:
        await trio.to_thread.run_sync(self.stop_all, timeout_s)

    # --- internals --------------------------------------------------------------

    def _node(self, node_id: str) -> _Node:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise LocalClusterError(f"no node {node_id!r}; nodes: {self.ids}") from None

    def _process(self, node_id: str, *, running: bool = True) -> subprocess.Popen[bytes]:
        process = self._node(node_id).process
        if process is None:
            raise LocalClusterError(f"node {node_id} was never started")
        if running and process.poll() is not None:
            raise LocalClusterError(f"node {node_id} is not running")
        return process

    def _check_started(self, node_id: str) -> None:
        code = self._process(node_id, running=False).poll()
        if code is not None:
            raise LocalClusterError(
                f"node {node_id} exited with code {code} while starting; log tail:\n"
                + self.log_tail(node_id)
            )

    def _note_exit(self, node: _Node) -> None:
        code = None if node.process is None else node.process.poll()
        if code is None or node.exit_noted:
            return
        node.exit_noted = True
        self._event(
            node.id, "exit", f"code {code}" + ("" if node.expected_exit else " (unexpected)")
        )

    def _event(self, node_id: str, what: str, detail: str = "") -> None:
        self.events.append(NodeEvent(node_id, what, time.monotonic() - self._created_at, detail))


@contextmanager
def temporary_cluster(
    config: ClusterConfig | None = None,
    *,
    root: Path | None = None,
    prefix: str = "kvsvr-",
    keep: bool = False,
    **options: Any,
) -> Iterator[LocalCluster]:
    """A cluster running `config` (default: `local_config(3)`) in a fresh
    directory under `root` (default: the system's temporary folder), every
    node ready when yielded; on exit the nodes are stopped and, unless `keep`,
    the directory removed. `options` as for `LocalCluster`."""
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        config = config if config is not None else local_config(3)
        with LocalCluster.create(directory, config, **options) as cluster:
            cluster.start_all()
            yield cluster
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


@atexit.register
def _kill_leftovers() -> None:
    for cluster in list(_LIVE_CLUSTERS):
        cluster.close()
