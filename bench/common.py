"""Shared machinery of `bench.single_node` and `bench.cluster`.

- `bench_cluster`: `kvsvr.local`'s node processes in a scratch directory,
  always stopped and removed on the way out; the node processes also die
  with the benchmark (PR_SET_PDEATHSIG) if it is killed outright.
- `LoadGenerator`: the clients. The Python client costs about as much CPU per
  operation as the node, so on a small machine one client process would
  measure itself; the load runs in `processes` spawned worker processes, each
  with its own event loop, its own `kvsvr.connect` and `tasks` concurrent
  client tasks. Each task owns its keys.
- Phases are timed windows on the system-wide monotonic clock: every worker
  starts at the same instant, runs a warm-up that is not counted, then a
  measured window; node CPU, node counters and machine CPU are read by the
  parent at the window's edges, so every figure covers the same interval.
- `/proc` readers (RSS, CPU time), `RssSampler`, py-spy profiling and the
  summary of its collapsed stacks, latency percentiles, table printing and
  result files.

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

import kvsvr
from kvsvr import _build
from kvsvr.local import LocalCluster, die_with_parent, temporary_cluster
from kvsvr.node.server import tune_gc

# --- limits and defaults --------------------------------------------------------

BENCH_SECRET: Final = "bench-secret"
# A node must answer on its port within this after it is started (imports,
# LMDB open); past it the benchmark fails with the node's log tail.
NODE_START_TIMEOUT_S: Final = 20.0
# A node gets this long to stop after SIGTERM before it is killed.
NODE_STOP_TIMEOUT_S: Final = 10.0
# How often the RSS sampler reads /proc: often enough to see a short peak,
# rarely enough to cost nothing measurable.
RSS_SAMPLE_INTERVAL_S: Final = 0.05
# Client timeout: the node answers Timeout itself after 4 s, so 10 s only
# catches a node that stopped answering altogether.
CLIENT_TIMEOUT_S: Final = 10.0
# Workers must be connected and idle within this; a phase's results must
# arrive within its own length plus this.
WORKER_REPLY_GRACE_S: Final = 60.0
# All workers start a phase this long after the parent sends it, so that the
# last worker to receive it does not start late.
PHASE_START_DELAY_S: Final = 0.3
# Latencies kept per phase and worker for percentiles: a sample beyond this
# is reservoir-sampled, so a long run does not grow memory without bound.
LATENCY_SAMPLES_MAX: Final = 200_000
# Ports are probed in this range (clear of the usual ephemeral range start
# on Linux, 32768, and of well-known ports).
PORT_RANGE: Final = (20_000, 32_000)
PORT_PROBE_ATTEMPTS: Final = 200
# py-spy sampling rate: its default. One sampler per node stops it briefly
# for each sample and all of them take CPU on the same machine, so a profiled
# run's rates are a little lower than an unprofiled one's.
PROFILE_RATE_HZ: Final = 100

_CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG: Final = 1


# --- /proc ----------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        text = file.read()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return utime / _CLOCK_TICKS_PER_S, stime / _CLOCK_TICKS_PER_S


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    return sum(cpu_times(pid))


def status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM...), in KiB; 0 if absent."""
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def machine_cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores."""
    with open("/proc/stat", encoding="ascii") as file:
        fields = [int(part) for part in file.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / _CLOCK_TICKS_PER_S, total / _CLOCK_TICKS_PER_S


class RssSampler:
    """Samples VmRSS of some processes in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = dict(pids)
        self.peak_kib: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pid in self._pids.items():
                with contextlib.suppress(OSError):
                    self.peak_kib[name] = max(self.peak_kib[name], status_kib(pid, "VmRSS"))
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)


# --- the cluster -------------------------------------------------------------------


@contextlib.contextmanager
def bench_cluster(
    node_count: int,
    replication: int,
    *,
    scratch_root: Path,
    keep: bool = False,
    cprofile_dir: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> Iterator[LocalCluster]:
    """`node_count` nodes with `replication`, ready, in a fresh scratch
    directory under `scratch_root` (on the disk being measured: not a tmpfs);
    stopped (SIGTERM, then SIGKILL) on the way out and the directory deleted
    unless `keep`. The nodes also die with the benchmark if it is killed
    outright. With `cprofile_dir`, each node runs under cProfile, which
    writes `<directory name>-<node>.prof` there when the node stops."""
    if cprofile_dir is not None:
        cprofile_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"kvsvr-{node_count}n-{secrets.token_hex(4)}"

    def python_args(node_id: str) -> list[str]:
        if cprofile_dir is None:
            return []
        return ["-m", "cProfile", "-o", str(cprofile_dir / f"{run_name}-{node_id}.prof")]

    with temporary_cluster(
        node_count,
        secret=BENCH_SECRET,
        partitions=64,
        replication=replication,
        settings=settings,
        root=scratch_root,
        prefix=f"{run_name}-",
        keep=keep,
        die_with_parent=True,
        python_args=python_args,
        stop_timeout_s=NODE_STOP_TIMEOUT_S,
    ) as cluster:
        yield cluster


def cprofile_paths(cluster: LocalCluster, cprofile_dir: Path) -> dict[str, Path]:
    """The cProfile files `bench_cluster` had the nodes write."""
    prefix = cluster.directory.name.rsplit("-", 1)[0]
    return {node_id: cprofile_dir / f"{prefix}-{node_id}.prof" for node_id in cluster.ids}


# --- the load generator ---------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs to start (picklable: sent to a spawned process)."""

    index: int
    tasks: int
    first_client: int  # the global index of this worker's first client task
    clients: int  # client tasks over all workers
    addresses: list[str]
    secret: str | None
    keys_per_task: int
    value_bytes: int
    key_tag: str


@dataclass(frozen=True)
class PhaseSpec:
    """One phase for every worker: operation and window (monotonic seconds)."""

    operation: str  # "put" | "get" | "cas"
    start_at: float
    measure_from: float
    measure_until: float  # time mode: the end; ops mode: math.inf
    ops_per_task: int  # ops mode: measured ops per task; time mode: 0
    # Paced (open loop): the offered rate over all clients, each client
    # issuing its share on a fixed schedule; latency is measured from each
    # operation's scheduled start. 0: closed loop (each client issues its
    # next operation when the last one finished).
    rate_per_s: float = 0.0


def paced_start(phase: PhaseSpec, clients: int, client: int, number: int) -> float:
    """When client `client` (0-based, of `clients`) should start its
    `number`-th operation of a paced phase: every client issues one per
    `clients / rate` seconds, the clients staggered evenly across that
    interval, so the whole load arrives at `rate` per second, evenly spread."""
    assert phase.rate_per_s > 0 and 0 <= client < clients and number >= 0
    interval_s = clients / phase.rate_per_s
    return phase.start_at + (number + client / clients) * interval_s


@dataclass
class WorkerResult:
    worker: int
    ops: int = 0  # completed in the measured window
    errors: Counter[str] = field(default_factory=Counter)
    conflicts: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_done_at: float = 0.0  # monotonic time the last measured op finished
    warmup_ops: int = 0


def split_clients(clients: int, processes: int) -> list[int]:
    """Client tasks per worker process, as even as possible, none empty."""
    processes = max(1, min(processes, clients))
    base, extra = divmod(clients, processes)
    return [base + (1 if index < extra else 0) for index in range(processes)]


class LoadGenerator:
    """`processes` spawned workers with `clients` client tasks between them.

    `populate()` writes every key once (so puts later overwrite keys whose
    Paxos promise the coordinator already holds, and gets find values);
    `start_phase(...)` starts one timed or counted phase of one operation on
    every task and `finish_phase(...)` collects its results.
    """

    def __init__(
        self,
        addresses: list[str],
        *,
        clients: int,
        processes: int,
        keys_per_task: int,
        value_bytes: int,
        secret: str | None = BENCH_SECRET,
    ) -> None:
        self.clients = clients
        self.task_counts = split_clients(clients, processes)
        self.processes = len(self.task_counts)
        context = multiprocessing.get_context("spawn")
        key_tag = f"{os.getpid():x}{random.getrandbits(24):06x}"
        self._workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        try:
            for index, tasks in enumerate(self.task_counts):
                parent_end, child_end = context.Pipe()
                spec = WorkerSpec(
                    index,
                    tasks,
                    sum(self.task_counts[:index]),
                    clients,
                    addresses,
                    secret,
                    keys_per_task,
                    value_bytes,
                    key_tag,
                )
                process = context.Process(
                    target=_worker_main, args=(spec, child_end), name=f"bench-worker-{index}"
                )
                process.daemon = True
                process.start()
                child_end.close()
                self._workers.append((process, parent_end))
            self._collect("ready", WORKER_REPLY_GRACE_S)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers]

    def populate(self) -> float:
        """Write every task's keys once; returns the seconds it took."""
        started = time.monotonic()
        for _, connection in self._workers:
            connection.send(("populate", None))
        self._collect("populated", WORKER_REPLY_GRACE_S)
        return time.monotonic() - started

    def start_phase(
        self,
        operation: str,
        *,
        warmup_s: float,
        duration_s: float | None,
        ops: int | None,
        rate_per_s: float = 0.0,
    ) -> PhaseSpec:
        """Send a phase to every worker; returns its window. Exactly one of
        `duration_s` (timed) and `ops` (measured ops over all clients) is
        given. `rate_per_s` > 0 paces the phase (see `PhaseSpec.rate_per_s`);
        a paced phase must be timed."""
        assert (duration_s is None) != (ops is None)
        assert rate_per_s >= 0 and (rate_per_s == 0 or duration_s is not None)
        start_at = time.monotonic() + PHASE_START_DELAY_S
        measure_from = start_at + warmup_s
        if duration_s is not None:
            spec = PhaseSpec(
                operation, start_at, measure_from, measure_from + duration_s, 0, rate_per_s
            )
        else:
            assert ops is not None
            per_task = max(1, math.ceil(ops / self.clients))
            spec = PhaseSpec(operation, start_at, measure_from, math.inf, per_task)
        for _, connection in self._workers:
            connection.send(("phase", spec))
        return spec

    def finish_phase(self, spec: PhaseSpec) -> list[WorkerResult]:
        wait_s = WORKER_REPLY_GRACE_S
        if spec.measure_until != math.inf:
            wait_s += max(0.0, spec.measure_until - time.monotonic())
        results: list[WorkerResult] = self._collect("phase-done", wait_s)
        return results

    def _collect(self, expected: str, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        payloads = []
        for process, connection in self._workers:
            if not connection.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"worker {process.name} did not answer {expected!r} in time")
            kind, payload = connection.recv()
            if kind == "error":
                raise RuntimeError(f"worker {process.name} failed:\n{payload}")
            assert kind == expected, (kind, expected)
            payloads.append(payload)
        return payloads

    def close(self) -> None:
        for _, connection in self._workers:
            with contextlib.suppress(OSError, ValueError):
                connection.send(("stop", None))
        for process, connection in self._workers:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self._workers = []


def _worker_main(spec: WorkerSpec, connection: multiprocessing.connection.Connection) -> None:
    """A worker process: one trio loop, one client, `spec.tasks` client tasks."""
    import traceback

    # Ctrl-C reaches the whole process group; the parent stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The same collector tuning as a node (kvsvr.node.server.tune_gc): a load
    # generator allocates per operation too, and shares the cores with the target.
    tune_gc()
    try:
        trio.run(_worker_loop, spec, connection)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            connection.send(("error", traceback.format_exc()))
        raise


async def _worker_loop(spec: WorkerSpec, connection: multiprocessing.connection.Connection) -> None:
    value = random.Random(spec.index).randbytes(spec.value_bytes)
    keys = [
        [
            f"b{spec.key_tag}-{spec.index}-{task}-{number}".encode()
            for number in range(spec.keys_per_task)
        ]
        for task in range(spec.tasks)
    ]
    versions: dict[bytes, int] = {}  # the last version each key was seen at
    async with kvsvr.connect(
        spec.addresses, secret=spec.secret, timeout_s=CLIENT_TIMEOUT_S
    ) as client:
        connection.send(("ready", None))
        while True:
            kind, payload = await trio.to_thread.run_sync(connection.recv)
            if kind == "stop":
                return
            if kind == "populate":

                async def populate(task_keys: list[bytes]) -> None:
                    for key in task_keys:
                        versions[key] = await client.put(key, value)

                async with trio.open_nursery() as nursery:
                    for task_keys in keys:
                        nursery.start_soon(populate, task_keys)
                connection.send(("populated", None))
            elif kind == "phase":
                result = await _run_phase(
                    client,
                    payload,
                    spec.index,
                    keys,
                    versions,
                    value,
                    spec.first_client,
                    spec.clients,
                )
                connection.send(("phase-done", result))


async def _run_phase(
    client: Any,
    phase: PhaseSpec,
    worker: int,
    keys: list[list[bytes]],
    versions: dict[bytes, int],
    value: bytes,
    first_client: int = 0,
    clients: int = 0,
) -> WorkerResult:
    """Run one phase on this worker's client tasks (`keys[task]` are task's
    keys). Paced phases need `first_client` and `clients` (see `paced_start`)."""
    result = WorkerResult(worker)
    paced = phase.rate_per_s > 0
    assert not paced or first_client + len(keys) <= clients
    sampler = random.Random(worker)
    seen_latencies = 0
    measured_ops_left = [phase.ops_per_task] * len(keys)

    def to_trio(monotonic_s: float) -> float:
        # trio's clock has its own origin; convert a system-wide monotonic time.
        return trio.current_time() + (monotonic_s - time.monotonic())

    def record(started: float, finished: float) -> None:
        nonlocal seen_latencies
        # Closed loop: operations wholly inside the window. Paced: every
        # operation scheduled inside it, however late it finished (dropping
        # the late ones would hide exactly the queueing a paced run is for).
        late = finished > phase.measure_until and not paced
        if started < phase.measure_from or late:
            result.warmup_ops += 1
            return
        result.ops += 1
        result.last_done_at = max(result.last_done_at, finished)
        latency_ms = (finished - started) * 1000
        seen_latencies += 1
        if len(result.latencies_ms) < LATENCY_SAMPLES_MAX:
            result.latencies_ms.append(latency_ms)
        else:  # reservoir sampling keeps a uniform sample
            slot = sampler.randrange(seen_latencies)
            if slot < LATENCY_SAMPLES_MAX:
                result.latencies_ms[slot] = latency_ms

    async def one_op(key: bytes) -> None:
        if phase.operation == "put":
            versions[key] = await client.put(key, value)
        elif phase.operation == "get":
            item = await client.get(key)
            if item is None:
                raise RuntimeError(f"key {key!r} was written but reads as absent")
            versions[key] = item.version
        elif phase.operation == "cas":
            try:
                versions[key] = await client.cas(key, value, if_version=versions.get(key, 0))
            except kvsvr.Conflict:
                result.conflicts += 1
                item = await client.get(key)
                versions[key] = 0 if item is None else item.version
                raise
        else:
            raise ValueError(f"unknown operation {phase.operation!r}")

    async def run_task(task: int) -> None:
        task_keys = keys[task]
        position = task % len(task_keys)
        number = 0
        scheduled = 0.0
        while True:
            now = time.monotonic()
            if paced:
                # Latency runs from the scheduled start: an operation issued
                # late, because this client's previous one was slow, counts
                # its wait (no coordinated omission).
                scheduled = paced_start(phase, clients, first_client + task, number)
                number += 1
                if scheduled >= phase.measure_until:
                    return
                if scheduled > now:
                    await trio.sleep_until(to_trio(scheduled))
            elif now >= phase.measure_until:
                return
            if now >= phase.measure_from and phase.ops_per_task:
                if measured_ops_left[task] == 0:
                    return
                measured_ops_left[task] -= 1
            key = task_keys[position]
            position = (position + 1) % len(task_keys)
            started = scheduled if paced else time.monotonic()
            try:
                await one_op(key)
            except kvsvr.Conflict:
                continue
            except kvsvr.KvsvrError as error:
                if started >= phase.measure_from:
                    result.errors[type(error).__name__] += 1
                continue
            record(started, time.monotonic())

    await trio.sleep_until(to_trio(phase.start_at))
    async with trio.open_nursery() as nursery:
        for task in range(len(keys)):
            nursery.start_soon(run_task, task)
    return result


# --- snapshots of nodes over a window ----------------------------------------------------


@dataclass
class NodeSnapshot:
    cpu_s: dict[str, float]  # per node
    system_cpu_s: dict[str, float]  # per node, the kernel's part of cpu_s
    load_cpu_s: float  # the load generator's worker processes, together
    own_cpu_s: float  # this process (the status client and the samplers)
    status: dict[str, dict[str, Any]]
    machine_busy_s: float
    machine_total_s: float
    at: float


def snapshot(cluster: LocalCluster, load: LoadGenerator, status_client: Any) -> NodeSnapshot:
    """CPU seconds of every node and load worker, node status counters and
    machine CPU, now. The CPU figures are read first, together, so they
    cover the same instant; the status requests come after."""
    at = time.monotonic()
    times = {node_id: cpu_times(pid) for node_id, pid in cluster.pids.items()}
    load_cpu = sum(cpu_seconds(pid) for pid in load.pids)
    own = time.process_time()
    busy, total = machine_cpu_times()
    status = {node_id: status_client.status(node_id) for node_id in cluster.ids}
    cpu = {node: user + system for node, (user, system) in times.items()}
    system_cpu = {node: system for node, (_, system) in times.items()}
    return NodeSnapshot(cpu, system_cpu, load_cpu, own, status, busy, total, at)


def wait_until(monotonic_s: float) -> None:
    delay = monotonic_s - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def counter_delta(before: dict[str, Any], after: dict[str, Any], section: str, name: str) -> int:
    return int(after[section][name]) - int(before[section][name])


def summarize_phase(
    operation: str,
    spec: PhaseSpec,
    results: list[WorkerResult],
    before: NodeSnapshot,
    after: NodeSnapshot,
) -> dict[str, Any]:
    """Throughput, latency percentiles, errors and node costs of one phase."""
    ops = sum(result.ops for result in results)
    if spec.measure_until != math.inf:
        seconds = spec.measure_until - spec.measure_from
    else:
        seconds = max(result.last_done_at for result in results) - spec.measure_from
    latencies = sorted(latency for result in results for latency in result.latencies_ms)
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.errors)
    node_window_s = after.at - before.at
    node_cpu = {node: after.cpu_s[node] - before.cpu_s[node] for node in before.cpu_s}
    machine_busy = after.machine_busy_s - before.machine_busy_s
    machine_total = after.machine_total_s - before.machine_total_s
    load_cpu = after.load_cpu_s - before.load_cpu_s
    own_cpu = after.own_cpu_s - before.own_cpu_s
    # Whatever else ran on the machine meanwhile (other users, the kernel's
    # own threads): it competes with the node for cores.
    other_cpu = machine_busy - sum(node_cpu.values()) - load_cpu - own_cpu
    storage = {}
    for node in before.status:
        batches = counter_delta(
            before.status[node], after.status[node], "storage", "batches_committed"
        )
        committed = counter_delta(
            before.status[node], after.status[node], "storage", "ops_committed"
        )
        storage[node] = {
            "batches": batches,
            "ops": committed,
            "ops_per_batch": committed / batches if batches else 0.0,
            "max_batch_ops_ever": after.status[node]["storage"]["max_batch_ops"],
        }
    coordinator = {
        node: {
            name: counter_delta(before.status[node], after.status[node], "coordinator", name)
            for name in after.status[node]["coordinator"]
        }
        for node in before.status
    }
    return {
        "operation": operation,
        "offered_per_s": spec.rate_per_s,  # 0: closed loop
        "ops": ops,
        "seconds": seconds,
        "ops_per_s": ops / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else math.nan,
        "errors": dict(errors),
        "conflicts": sum(result.conflicts for result in results),
        "node_cpu_s": node_cpu,
        "node_system_cpu_fraction": {
            node: (after.system_cpu_s[node] - before.system_cpu_s[node]) / cpu if cpu else math.nan
            for node, cpu in node_cpu.items()
        },
        "node_cpu_s_per_1000_ops": {
            node: cpu / ops * 1000 if ops else math.nan for node, cpu in node_cpu.items()
        },
        "node_cpu_cores": {
            node: cpu / node_window_s if node_window_s > 0 else math.nan
            for node, cpu in node_cpu.items()
        },
        "load_cpu_s": load_cpu,
        "load_cpu_s_per_1000_ops": load_cpu / ops * 1000 if ops else math.nan,
        "load_cpu_cores": load_cpu / node_window_s if node_window_s > 0 else math.nan,
        "other_cpu_cores": other_cpu / node_window_s if node_window_s > 0 else math.nan,
        "machine_cpu_busy_fraction": machine_busy / machine_total if machine_total else math.nan,
        "window_s": node_window_s,
        "storage": storage,
        "coordinator": coordinator,
    }


def run_measured_phase(
    cluster: LocalCluster,
    load: LoadGenerator,
    status_client: Any,
    operation: str,
    *,
    warmup_s: float,
    duration_s: float | None,
    ops: int | None,
    profile_dir: Path | None = None,
    profile_label: str = "",
    rate_per_s: float = 0.0,
) -> dict[str, Any]:
    """Run one phase on every worker, reading the nodes at the window's edges,
    optionally under py-spy for the measured window; its summary.
    `rate_per_s` > 0 paces it (see `PhaseSpec.rate_per_s`)."""
    # Counters read while no operation is in flight (before the phase and
    # after its last operation) count every operation whole; the window's
    # edges cut through operations in flight.
    status_before_phase = {node_id: status_client.status(node_id) for node_id in cluster.ids}
    spec = load.start_phase(
        operation, warmup_s=warmup_s, duration_s=duration_s, ops=ops, rate_per_s=rate_per_s
    )
    wait_until(spec.measure_from)
    before = snapshot(cluster, load, status_client)
    profiler: Profiler | None = None
    if profile_dir is not None:
        expected_s = duration_s if duration_s is not None else 10.0
        profiler = Profiler(cluster.pids, profile_dir, profile_label or operation, expected_s)
        profiler.start()
    if spec.measure_until != math.inf:
        wait_until(spec.measure_until)
        after = snapshot(cluster, load, status_client)
        results = load.finish_phase(spec)
    else:
        results = load.finish_phase(spec)
        after = snapshot(cluster, load, status_client)
    status_after_phase = {node_id: status_client.status(node_id) for node_id in cluster.ids}
    cluster.check_alive()
    summary = summarize_phase(operation, spec, results, before, after)
    summary["coordinator_whole_phase"] = {
        node: {
            name: counter_delta(
                status_before_phase[node], status_after_phase[node], "coordinator", name
            )
            for name in status_after_phase[node]["coordinator"]
        }
        for node in status_before_phase
    }
    if profiler is not None:
        profiler.finish()
        summary["profile"] = {
            "error": profiler.error,
            "svg": {node: str(path) for node, path in profiler.svg_paths.items()},
            "collapsed": {node: str(path) for node, path in profiler.raw_paths.items()},
            "collapsed_gil": {node: str(path) for node, path in profiler.gil_paths.items()},
            "summary": profiler.summaries(),
        }
    return summary


def run_cluster_phases(
    args: argparse.Namespace,
    node_count: int,
    replication: int,
    operations: Sequence[str],
    label: str,
    paced: Sequence[tuple[str, float]] = (),
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start a cluster, load it (populate, then one measured phase per
    operation, in order, then one paced phase per (operation, rate) of
    `paced`, named "<operation>-paced"), stop it: each phase's summary,
    node RSS, status. `settings` override `ClusterConfig` fields (such as
    `unsafe_no_fsync`)."""
    duration_s, ops = phase_amount(args)
    phases: dict[str, Any] = {}
    cprofile_dir = args.out / f"{args.run_id}-profiles" if args.cprofile else None
    with bench_cluster(
        node_count,
        replication,
        scratch_root=args.scratch,
        keep=args.keep,
        cprofile_dir=cprofile_dir,
        settings=settings,
    ) as cluster:
        rss_at_start_kib = {node: status_kib(pid, "VmRSS") for node, pid in cluster.pids.items()}
        with (
            RssSampler(cluster.pids) as rss,
            kvsvr.SyncClient(
                cluster.addresses, secret=cluster.secret, timeout_s=CLIENT_TIMEOUT_S
            ) as status_client,
            LoadGenerator(
                cluster.addresses,
                clients=args.clients,
                processes=args.processes,
                keys_per_task=args.keys_per_client,
                value_bytes=args.value_bytes,
                secret=cluster.secret,
            ) as load,
        ):
            populate_s = load.populate()
            for operation in operations:
                phases[operation] = run_measured_phase(
                    cluster,
                    load,
                    status_client,
                    operation,
                    warmup_s=args.warmup_s,
                    duration_s=duration_s,
                    ops=ops,
                    profile_dir=args.out / f"{args.run_id}-profiles" if args.profile else None,
                    profile_label=f"{label}-{operation}",
                )
            for operation, rate_per_s in paced:
                # Paced phases are timed: with --ops, as long as the rate
                # needs for that many.
                paced_s = duration_s if duration_s is not None else (ops or 0) / rate_per_s
                phases[f"{operation}-paced"] = run_measured_phase(
                    cluster,
                    load,
                    status_client,
                    operation,
                    warmup_s=args.warmup_s,
                    duration_s=paced_s,
                    ops=None,
                    rate_per_s=rate_per_s,
                    profile_dir=args.out / f"{args.run_id}-profiles" if args.profile else None,
                    profile_label=f"{label}-{operation}-paced",
                )
            hwm_kib = {node: status_kib(pid, "VmHWM") for node, pid in cluster.pids.items()}
            final_status = {node_id: status_client.status(node_id) for node_id in cluster.ids}
        if args.keep:
            print(f"node data and logs kept in {cluster.directory}")
    profiled = cprofile_paths(cluster, cprofile_dir) if cprofile_dir is not None else {}
    cprofiles = {node: summarize_cprofile(path) for node, path in profiled.items()}
    return {
        "nodes": node_count,
        "replication": replication,
        "settings": settings or {},
        "phases": phases,
        "load_processes": load.processes,
        "load_tasks_per_process": load.task_counts,
        "populate_s": populate_s,
        "rss_at_start_mb": {node: kib / 1024 for node, kib in rss_at_start_kib.items()},
        "rss_peak_sampled_mb": {node: kib / 1024 for node, kib in rss.peak_kib.items()},
        "rss_hwm_mb": {node: kib / 1024 for node, kib in hwm_kib.items()},
        "final_status": final_status,
        "cprofile": cprofiles,
    }


def check_fsync_setting(run: dict[str, Any], *, fsync: bool) -> None:
    """Refuse a run whose nodes did not (or did) fsync as the benchmark meant:
    the figures would be labelled wrongly."""
    for node, status in run["final_status"].items():
        if status.get("fsync") is not fsync:
            raise SystemExit(
                f"benchmark error: node {node} reports fsync={status.get('fsync')!r}, "
                f"this run needs fsync={fsync}"
            )


def summarize_cprofile(path: Path, top: int = 30) -> dict[str, Any]:
    """The functions with the most own time in a node's cProfile file (written
    when the node stopped), with call counts; the whole run, populate included."""
    import pstats

    if not path.exists():
        return {"error": f"{path} was not written (did the node exit cleanly?)"}
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total_s = sum(entry[2] for entry in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "file": str(path),
        "total_own_s": total_s,
        "top_own_time": [
            {
                "function": f"{name} ({_short_path(filename)}:{line})",
                "calls": entry[1],
                "own_s": entry[2],
                "cumulative_s": entry[3],
                "own_share": entry[2] / total_s if total_s else 0.0,
            }
            for (filename, line, name), entry in rows
        ],
    }


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN if empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


# --- profiling with py-spy ------------------------------------------------------------------


def py_spy_path() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class Profiler:
    """py-spy attached to some node processes for one window, three samplers
    per node: collapsed stacks of every thread that is not idle ("active":
    includes a thread in a system call or runnable but preempted, so on a
    busy machine it overweights syscalls such as send), collapsed stacks of
    the thread holding the GIL only ("gil": Python CPU), and a flame graph
    SVG of the active stacks."""

    def __init__(self, pids: dict[str, int], out_dir: Path, label: str, duration_s: float) -> None:
        self.pids = pids
        self.out_dir = out_dir
        self.label = label
        self.duration_s = max(1, math.ceil(duration_s))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.raw_paths: dict[str, Path] = {}
        self.gil_paths: dict[str, Path] = {}
        self.svg_paths: dict[str, Path] = {}
        self.error: str | None = None

    def start(self) -> None:
        executable = py_spy_path()
        if executable is None:
            self.error = "py-spy not found (pip install py-spy into the venv)"
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for node, pid in self.pids.items():
            # The GIL sampler stops the node for each sample (consistent
            # stacks: this is the view the summary leans on); the other two
            # read its memory while it runs (only one tracer can stop a
            # process, and a stack read on the run is now and then garbled:
            # such samples land in "trio scheduler, other").
            for fmt, suffix, extra, paths in (
                ("raw", "txt", ["--nonblocking"], self.raw_paths),
                ("raw", "gil.txt", ["--gil"], self.gil_paths),
                ("flamegraph", "svg", ["--nonblocking"], self.svg_paths),
            ):
                path = self.out_dir / f"{self.label}-{node}.{suffix}"
                paths[node] = path
                command = [
                    executable,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(self.duration_s),
                    "--rate",
                    str(PROFILE_RATE_HZ),
                    "--format",
                    fmt,
                    "--threads",
                    *extra,
                    "--output",
                    str(path),
                ]
                self.processes.append(
                    subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        preexec_fn=die_with_parent,
                    )
                )

    def finish(self) -> None:
        errors = []
        for process in self.processes:
            try:
                _, stderr = process.communicate(timeout=self.duration_s + 30)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            if process.returncode != 0:
                errors.append(stderr.decode(errors="replace").strip()[-500:])
        if errors:
            self.error = "; ".join(errors)

    def summaries(self, top: int = 25) -> dict[str, dict[str, Any]]:
        """Per node: the active-stack summary, with the GIL-only one under "gil"."""
        result = {}
        for node, path in self.raw_paths.items():
            if not path.exists():
                continue
            summary = summarize_collapsed(path.read_text(encoding="utf-8"), top)
            gil_path = self.gil_paths.get(node)
            if gil_path is not None and gil_path.exists():
                summary["gil"] = summarize_collapsed(gil_path.read_text(encoding="utf-8"), top)
            result[node] = summary
        return result


# Where the trio thread's samples go, by what the stack is doing. A sample goes
# to the first bucket (in this order) with a matching frame anywhere in its
# stack, so e.g. row decoding inside a replica handler counts as "row read".
PROFILE_BUCKETS: Final = (
    ("send replies/requests (send_all)", ("_send_queued_frames",)),
    ("receive + frame decode + dispatch", ("_receive_requests", "RpcConnection._receive_loop")),
    ("row read + decode (Storage.read_row)", ("Storage.read_row",)),
    ("row encode + stage (Storage.stage)", ("Storage.stage",)),
    ("group-commit writer, trio side", ("Storage.run", "Storage._commit", "Storage._finish")),
    ("Paxos logic (kvsvr/protocol)", ("(kvsvr/protocol/",)),
    ("peer RPC (PeerLink, to/from_wire)", ("PeerLink.", "kvsvr/protocol/messages.py")),
    ("quorum round (tasks, nursery, events)", ("Node.quorum_round",)),
    ("coordinate (key lock, fail_after)", ("Node.coordinate",)),
    ("client request handling (Node.client_*)", ("(kvsvr/node/",)),
    ("RPC server (_answer: reply encode, queue)", ("(kvsvr/net/",)),
    ("waiting in epoll", ("EpollIOManager.get_events",)),
    ("trio scheduler, other", ("",)),
)


def _task_frames(frames: list[str]) -> list[str]:
    """The frames below trio's run loop: what a task is doing. Above it sits
    the entry point (run_node...), on every stack."""
    start = 0
    for index, frame in enumerate(frames):
        if frame.startswith(("run (trio/_core/_run.py", "unrolled_run (")):
            start = index + 1
    return frames[start:]


def _bucket(frames: list[str]) -> str:
    task_frames = _task_frames(frames)
    for name, patterns in PROFILE_BUCKETS:
        if any(pattern in frame for pattern in patterns for frame in task_frames):
            return name
    return PROFILE_BUCKETS[-1][0]  # the run loop itself, between tasks


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Shares of py-spy's collapsed stacks (`thread;frame;... count` a line).

    The node's CPU goes to its trio thread ("MainThread"); its other threads
    are trio's worker threads, which run LMDB commits and mostly wait in
    fsync (py-spy counts a thread blocked in I/O as active). So the trio
    thread is summarised on its own: top functions by self time, by module,
    and kvsvr functions by inclusive time; other threads by self time.
    Shares are of the thread's samples."""
    per_thread: dict[str, list[tuple[list[str], int]]] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = "(unknown)"
        if frames[0].startswith("thread"):
            thread = frames.pop(0).partition(": ")[2] or frames[0]
        per_thread.setdefault(thread, []).append((frames, int(count_text)))
    totals = {thread: sum(count for _, count in stacks) for thread, stacks in per_thread.items()}
    all_samples = sum(totals.values())
    summary: dict[str, Any] = {
        "samples": all_samples,
        "threads": {thread: total / all_samples for thread, total in totals.items()},
    }
    main = per_thread.get("MainThread", [])
    main_total = totals.get("MainThread", 0)
    self_counts: Counter[str] = Counter()
    module_counts: Counter[str] = Counter()
    inclusive_counts: Counter[str] = Counter()
    bucket_counts: Counter[str] = Counter()
    for frames, count in main:
        if not frames:
            continue
        bucket_counts[_bucket(frames)] += count
        leaf = _short_frame(frames[-1])
        self_counts[leaf] += count
        module_counts[leaf.rpartition(" (")[2].rstrip(")")] += count
        for name in {_short_frame(frame) for frame in _task_frames(frames)}:
            if "(kvsvr/" in name:
                inclusive_counts[name] += count
    other_counts: Counter[str] = Counter()
    other_total = 0
    for thread, stacks in per_thread.items():
        if thread == "MainThread":
            continue
        for frames, count in stacks:
            if frames:
                other_counts[_short_frame(frames[-1])] += count
                other_total += count

    def shares(counter: Counter[str], total: int) -> list[tuple[str, float]]:
        return [(name, count / total) for name, count in counter.most_common(top)]

    summary["main_thread_samples"] = main_total
    summary["main_buckets"] = shares(bucket_counts, main_total) if main_total else []
    summary["main_self"] = shares(self_counts, main_total) if main_total else []
    summary["main_by_module"] = shares(module_counts, main_total) if main_total else []
    summary["main_kvsvr_inclusive"] = shares(inclusive_counts, main_total) if main_total else []
    summary["other_threads_samples"] = other_total
    summary["other_threads_self"] = shares(other_counts, other_total) if other_total else []
    return summary


def _short_path(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("kvsvr", "trio", "lmdb", "msgpack"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) :])
    return Path(path).name


def _short_frame(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`; lines merged."""
    name, _, location = frame.partition(" (")
    if not location:
        return frame
    return f"{name} ({_short_path(location.rstrip(')').rsplit(':', 1)[0])})"


# --- command line --------------------------------------------------------------------


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """Options both benchmarks share."""
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument(
        "--processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="load-generator processes the clients are spread over (default: min(2, cores))",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--time-s", type=float, default=None, help="measured seconds per phase")
    amount.add_argument("--ops", type=int, default=None, help="measured ops per phase")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured warm-up (2 s)")
    parser.add_argument("--value-bytes", type=int, default=100, help="value size (100)")
    parser.add_argument(
        "--keys-per-client", type=int, default=50, help="keys each client cycles through (50)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="result folder")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where node data goes: must be the disk to measure, not a tmpfs",
    )
    parser.add_argument(
        "--profile", action="store_true", help="run py-spy on the node(s) in measured windows"
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="run the nodes under cProfile (slow; for call counts) and print the top",
    )
    parser.add_argument("--keep", action="store_true", help="keep node data and logs")


def phase_amount(args: argparse.Namespace) -> tuple[float | None, int | None]:
    """(duration_s, ops) of a measured phase; 10 s when neither is given."""
    if args.ops is not None:
        return None, args.ops
    return (args.time_s if args.time_s is not None else 10.0), None


def check_scratch(path: Path) -> str | None:
    """A warning if `path` is on a RAM file system (fsync would cost nothing)."""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    resolved = str(path.resolve())
    best = max(
        (
            entry
            for entry in entries
            if resolved.startswith(entry[1].rstrip("/") + "/") or resolved == entry[1]
        ),
        key=lambda entry: len(entry[1]),
        default=None,
    )
    if best is not None and best[2] in ("tmpfs", "ramfs"):
        return f"{path} is on {best[2]}: fsync is free there and the figures mean little"
    return None


# --- output ----------------------------------------------------------------------------------


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max([len(header[column]), *(len(row[column]) for row in cells)])
        for column in range(len(header))
    ]
    print(f"\n{title}")
    print("  ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in cells:
        print(
            "  ".join(
                value.rjust(width) if index else value.ljust(width)
                for index, (value, width) in enumerate(zip(row, widths, strict=True))
            )
        )


def target(value: float, relation: str, bound: float) -> dict[str, Any]:
    """A figure against its target: `relation` is ">=" or "<"."""
    met = value >= bound if relation == ">=" else value < bound
    return {
        "value": value,
        "rule": f"{relation} {bound:g}",
        "met": bool(met),
        "verdict": "met" if met else "NOT met",
    }


def print_setup(title: str, args: argparse.Namespace, run: dict[str, Any]) -> None:
    env = environment()
    with open("/proc/loadavg", encoding="ascii") as file:
        load_average = file.read().split()[0]
    duration_s, ops = phase_amount(args)
    window = f"{duration_s:g} s" if duration_s is not None else f"{ops} ops"
    print(
        f"\n{title}: {args.clients} clients in {run['load_processes']} load-generator "
        f"processes {run['load_tasks_per_process']}, on {env['cpus']} cores ({env['cpu_model']}); "
        f"{args.value_bytes}-byte values, {args.keys_per_client} keys per client (written "
        f"once before), warm-up {args.warmup_s:g} s excluded, measured {window} per phase; "
        f"load average now {load_average}; kvsvr build: {env['kvsvr_build']}"
    )


def print_phases(
    phases: dict[str, dict[str, Any]],
    names: dict[str, str],
    extra_rows: Sequence[Sequence[object]] = (),
) -> None:
    """One row per phase: rate, latency, and where the CPU went (cores busy
    on average in the window: nodes, load generator, everything else)."""
    rows: list[Sequence[object]] = []
    for row in extra_rows:
        rows.append([*row, *["-"] * (11 - len(row))])
    for operation, phase in phases.items():
        node_cpu = sum(phase["node_cpu_s"].values())
        rows.append(
            [
                names.get(operation, operation),
                phase["ops"],
                phase["ops_per_s"],
                phase["p50_ms"],
                phase["p99_ms"],
                node_cpu / phase["ops"] * 1000 if phase["ops"] else math.nan,
                sum(phase["node_cpu_cores"].values()),
                _mean(phase["node_system_cpu_fraction"].values()) * 100,
                phase["load_cpu_cores"],
                phase["other_cpu_cores"],
                sum(phase["errors"].values()) + phase["conflicts"],
            ]
        )
    print_table(
        "throughput, latency, CPU (cores = CPU seconds per second of the window)",
        [
            "operation",
            "ops",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "node cpu s/1k ops",
            "node cores",
            "node sys %",
            "load cores",
            "other cores",
            "errors+conflicts",
        ],
        rows,
    )
    for operation, phase in phases.items():
        if len(phase["node_cpu_s"]) > 1:
            per_node = ", ".join(
                f"{node} {cpu / phase['ops'] * 1000 if phase['ops'] else math.nan:.3f}"
                for node, cpu in phase["node_cpu_s"].items()
            )
            print(f"  {operation}: node CPU s per 1000 ops: {per_node}")
        if phase["errors"]:
            print(f"  {operation}: errors {phase['errors']}")


def _mean(values: Iterable[float]) -> float:
    listed = list(values)
    return sum(listed) / len(listed) if listed else math.nan


def print_batching(phases: dict[str, dict[str, Any]]) -> None:
    rows = []
    for operation, phase in phases.items():
        for node, stats in phase["storage"].items():
            rows.append(
                [
                    f"{operation} {node}",
                    stats["batches"],
                    stats["ops"],
                    stats["ops_per_batch"],
                    stats["batches"] / phase["window_s"] if phase["window_s"] else math.nan,
                    stats["max_batch_ops_ever"],
                ]
            )
    print_table(
        "group commit in the window (a fast-path put stages 2 rows: accept, then commit)",
        ["phase node", "txns", "rows", "rows/txn", "txns/s", "max rows/txn (ever)"],
        rows,
    )


def print_cprofiles(run: dict[str, Any], label: str, top: int = 25) -> None:
    for node, summary in run.get("cprofile", {}).items():
        if "error" in summary:
            print(f"\ncProfile {label} {node}: {summary['error']}")
            continue
        rows = [
            [entry["function"], entry["calls"], entry["own_s"], entry["own_share"] * 100]
            for entry in summary["top_own_time"][:top]
        ]
        print_table(
            f"cProfile {label} {node} (whole run, {summary['total_own_s']:.1f} s profiled)",
            ["function", "calls", "own s", "% own"],
            rows,
        )


def print_profiles(
    phases: dict[str, dict[str, Any]],
    label: str,
    operations: Sequence[str] | None = None,
    nodes: Sequence[str] | None = None,
) -> None:
    """The py-spy summaries of some phases and nodes (all by default); the
    JSON result holds every one, and the flame graphs are beside it."""
    for operation, phase in phases.items():
        profile = phase.get("profile")
        if not profile:
            continue
        if profile["error"]:
            print(f"\npy-spy ({operation}): {profile['error']}")
        if operations is None or operation in operations:
            summaries = {
                node: summary
                for node, summary in profile["summary"].items()
                if nodes is None or node in nodes
            }
            print_profile(f"{label} {operation}", summaries)
        print(f"{operation} flame graphs: {', '.join(profile['svg'].values())}")


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def print_profile(label: str, summaries: dict[str, dict[str, Any]], top: int = 15) -> None:
    for node, summary in summaries.items():
        threads = ", ".join(f"{name} {share:.0%}" for name, share in summary["threads"].items())
        heading = f"py-spy {label} {node}"
        print(f"\n{heading}: {summary['samples']} active samples ({threads})")
        gil = summary.get("gil")
        tables: list[tuple[str, list[tuple[str, float]]]] = [
            ("trio thread, active samples, by activity", summary["main_buckets"]),
        ]
        if gil:
            tables += [
                ("trio thread, GIL-holding samples, by activity", gil["main_buckets"]),
                ("trio thread, GIL-holding samples, self time", gil["main_self"]),
                ("trio thread, GIL-holding samples, kvsvr inclusive", gil["main_kvsvr_inclusive"]),
            ]
        else:
            tables += [
                ("trio thread, active samples, self time", summary["main_self"]),
                ("trio thread, active samples, kvsvr inclusive", summary["main_kvsvr_inclusive"]),
            ]
        tables.append(("worker threads (commits), active samples", summary["other_threads_self"]))
        for what, shares in tables:
            rows = [(name, share * 100) for name, share in shares[:top]]
            print_table(f"{heading}: {what}", ["function", "% of thread samples"], rows)


def environment() -> dict[str, Any]:
    """What the figures depend on besides the code."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "kvsvr"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.splitlines()
    except OSError:
        commit, dirty = "", []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
            model = next(
                (line.split(":", 1)[1].strip() for line in file if line.startswith("model name")),
                "",
            )
    except OSError:
        model = ""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        # Uncommitted changes under kvsvr/ when this ran (others edit the tree).
        "kvsvr_uncommitted_files": [line[3:] for line in dirty],
        "memory_page_bytes": _PAGE_BYTES,
        # The build the nodes and clients run (`python3 dev.py compile` or not).
        "kvsvr_build": _build.describe(_build.compiled_modules()),
    }


def name_run(args: argparse.Namespace, benchmark: str) -> str:
    """Give this run its name, `BENCHMARK-YYYYmmdd-HHMMSS` (`args.run_id`):
    its JSON result is `--out/NAME.json` and profiles go to `--out/NAME-profiles/`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.run_id = f"{benchmark}-{stamp}"
    return str(args.run_id)


def write_result(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    """`result` as `--out/RUN_ID.json` (NaN and inf become null)."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{args.run_id}.json"
    text = json.dumps(_plain(result), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so `finally` blocks stop the nodes."""

    def handler(signal_number: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal_number}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
