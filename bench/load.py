"""The load generator of `bench.single_node`, `bench.cluster` and `bench.catchup`.

The Python client costs about as much CPU per operation as the node, so on
a small machine one client process would measure itself; the load runs in
`processes` spawned worker processes, each with its own event loop, its own
`kvsvr.connect` and `tasks` concurrent client tasks. Each task owns its
keys. Phases are timed windows on the system-wide monotonic clock: every
worker starts at the same instant, runs a warm-up that is not counted, then
a measured window."""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import trio

import kvsvr
from kvsvr.node.server import tune_gc

BENCH_SECRET: Final = "bench-secret"
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
    tls: kvsvr.TLSOptions | None = None


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
        tls: kvsvr.TLSOptions | None = None,
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
                    tls,
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


def load_generator(
    addresses: list[str],
    secret: str | None,
    args: argparse.Namespace,
    tls: kvsvr.TLSOptions | None = None,
) -> LoadGenerator:
    """The load generator that `bench.output.add_load_options`' options describe."""
    return LoadGenerator(
        addresses,
        clients=args.clients,
        processes=args.processes,
        keys_per_task=args.keys_per_client,
        value_bytes=args.value_bytes,
        secret=secret,
        tls=tls,
    )


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
        spec.addresses, secret=spec.secret, timeout_s=CLIENT_TIMEOUT_S, tls=spec.tls
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
