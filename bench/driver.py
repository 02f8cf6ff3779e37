"""The load generator: several processes, each a trio loop of many concurrent
clients, driving one target (kvsvr or etcd) through the same code.

Modes:

- closed loop: `clients` concurrent clients, each issuing its next operation as
  soon as the previous one answered; latency is each operation's own time.
- open loop: operations are *scheduled* at a constant total rate; a pool of
  workers (`clients` of them: the most that can be in flight) takes them in
  order, and latency is measured from the scheduled start, so an operation
  that had to wait for a free worker or a slow server pays that wait
  (coordinated omission is not hidden). Operations still unfinished when the
  drain ends are recorded with the time they had waited so far (a lower bound)
  and counted as unfinished.
- load: write keys 0..key_count-1 once (not measured, but timed).

Every run has a warm-up (operations run, nothing recorded) and a measured
window; all processes start at one wall-clock instant the parent hands out.
The parent samples CPU counters (servers, machine) at the window's edges
through a probe it is given, and shows progress through a callback.
"""

from __future__ import annotations

import math
import multiprocessing
import queue as queue_module
import random
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import trio

from bench.workloads import (
    Workload,
    intended_start_times,
    key_chooser,
    key_name,
    split_evenly,
    value_pool,
)
from kvsvr.node.server import tune_gc

# --- limits and timings ------------------------------------------------------------

# Time one operation may take before it counts as an error. Above both
# systems' own timeouts (kvsvr's node gives up at 4 s), so theirs fire first.
OPERATION_TIMEOUT_S: Final = 10.0
# Closed loop: how much longer than OPERATION_TIMEOUT_S an operation may get.
# Each client keeps one cancel scope and moves its deadline forward (to this
# much past OPERATION_TIMEOUT_S from now) only when it would end within
# OPERATION_TIMEOUT_S of an operation's start: a `trio.fail_after` per
# operation costs the load generator ~10 us of the cores the target needs.
OPERATION_BOUND_SLACK_S: Final = 1.0
# Time spawned load processes get to import, connect and report ready.
READY_TIMEOUT_S: Final = 60.0
# Gap between "go" and the common start instant, so every process starts together.
START_DELAY_S: Final = 0.3
# How often each process reports its operation count to the parent.
PROGRESS_INTERVAL_S: Final = 0.25
# Open loop: after the window, time given to operations already scheduled.
DRAIN_S: Final = 2.0
# After an error a closed-loop client pauses, so a down target is not spun on.
ERROR_PAUSE_S: Final = 0.01
# Error messages kept per run (the first ones; the count is always complete).
ERROR_SAMPLES_MAX: Final = 5
# A process that has not finished this long after its window ended is stuck.
FINISH_GRACE_S: Final = OPERATION_TIMEOUT_S + DRAIN_S + 30.0


# --- the latency histogram -----------------------------------------------------------


class Histogram:
    """Latencies in whole microseconds, log-linear buckets (HdrHistogram's
    layout): exact below 256 us, then 128 buckets per power of two, so a
    reported percentile is within 0.4% of the true value. Mergeable; the max
    and min are kept exactly."""

    SUB_BITS: Final = 7
    SUB_COUNT: Final = 1 << SUB_BITS  # buckets per power of two

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum_us = 0
        self.min_us = 0
        self.max_us = 0

    @classmethod
    def bucket_of(cls, value_us: int) -> int:
        if value_us < 2 * cls.SUB_COUNT:
            return value_us
        shift = value_us.bit_length() - (cls.SUB_BITS + 1)
        return shift * cls.SUB_COUNT + (value_us >> shift)

    @classmethod
    def bucket_range(cls, bucket: int) -> tuple[int, int]:
        """The smallest and largest value a bucket holds."""
        if bucket < 2 * cls.SUB_COUNT:
            return bucket, bucket
        shift, top = divmod(bucket, cls.SUB_COUNT)
        top += cls.SUB_COUNT
        # bucket = shift * SUB + top with top in [SUB, 2 SUB): undo bucket_of.
        shift -= 1
        return top << shift, ((top + 1) << shift) - 1

    def record_us(self, value_us: int, count: int = 1) -> None:
        value_us = max(0, value_us)
        bucket = self.bucket_of(value_us)
        self.counts[bucket] = self.counts.get(bucket, 0) + count
        if self.total == 0 or value_us < self.min_us:
            self.min_us = value_us
        self.max_us = max(self.max_us, value_us)
        self.total += count
        self.sum_us += value_us * count

    def record_s(self, seconds: float) -> None:
        self.record_us(round(seconds * 1e6))

    def merge(self, other: Histogram) -> None:
        if other.total == 0:
            return
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.min_us = other.min_us if self.total == 0 else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)
        self.total += other.total
        self.sum_us += other.sum_us

    def percentile_us(self, fraction: float) -> float:
        """Nearest-rank percentile (`fraction` in (0, 1]); 0 when empty."""
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if self.total == 0:
            return 0.0
        rank = max(1, math.ceil(fraction * self.total))
        if rank >= self.total:
            return float(self.max_us)
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                low, high = self.bucket_range(bucket)
                middle = (low + high) / 2
                return float(min(max(middle, self.min_us), self.max_us))
        return float(self.max_us)

    @property
    def mean_us(self) -> float:
        return self.sum_us / self.total if self.total else 0.0

    def summary_ms(self) -> dict[str, float]:
        return {
            "count": self.total,
            "mean_ms": self.mean_us / 1000,
            "p50_ms": self.percentile_us(0.50) / 1000,
            "p90_ms": self.percentile_us(0.90) / 1000,
            "p99_ms": self.percentile_us(0.99) / 1000,
            "p999_ms": self.percentile_us(0.999) / 1000,
            "max_ms": self.max_us / 1000,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {str(bucket): count for bucket, count in sorted(self.counts.items())},
            "total": self.total,
            "sum_us": self.sum_us,
            "min_us": self.min_us,
            "max_us": self.max_us,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        histogram = cls()
        histogram.counts = {int(bucket): int(count) for bucket, count in data["counts"].items()}
        histogram.total = int(data["total"])
        histogram.sum_us = int(data["sum_us"])
        histogram.min_us = int(data["min_us"])
        histogram.max_us = int(data["max_us"])
        return histogram


# --- what to run -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """How a load process reaches a target. Picklable (it crosses `spawn`).

    kind "kvsvr": `read_consistency` is "strong" or "stale";
    kind "etcd": "strong" (linearizable, etcd's default) or "stale" (etcd's
    serializable read, answered by the member alone)."""

    kind: str
    label: str
    addresses: tuple[str, ...]
    secret: str | None = None
    table: str = "default"
    read_consistency: str = "strong"
    # Who drives it: "python" (this module's load processes; for etcd, its
    # HTTP/JSON gateway) or "go" (etcd only: bench/etcdload on clientv3, the
    # binary at `driver_binary`, `connections` gRPC connections; 0: its default).
    driver: str = "python"
    driver_binary: str = ""
    connections: int = 0

    def __post_init__(self) -> None:
        if self.driver not in ("python", "go"):
            raise ValueError(f"driver must be python or go, not {self.driver!r}")
        if self.driver == "go" and (self.kind != "etcd" or not self.driver_binary):
            raise ValueError("the go driver drives etcd, and needs its binary")


@dataclass(frozen=True, slots=True)
class RunSpec:
    target: TargetSpec
    mode: str  # "closed" | "open" | "load"
    workload: Workload | None = None
    distribution: str = "zipfian"
    key_count: int = 100_000
    value_bytes: int = 100
    clients: int = 64  # closed: concurrent clients; open: most in flight; load: writers
    rate_per_s: float = 0.0  # open loop: total offered rate
    warmup_s: float = 3.0
    duration_s: float = 30.0
    processes: int = 2
    seed: int = 1
    load_batch: int = 1  # load: keys per request (etcd txn); 1 = one put each

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open", "load"):
            raise ValueError(f"mode must be closed, open or load, not {self.mode!r}")
        if self.mode != "load" and self.workload is None:
            raise ValueError("a closed- or open-loop run needs a workload")
        if self.mode == "open" and self.rate_per_s <= 0:
            raise ValueError("an open-loop run needs rate_per_s > 0")
        if self.processes < 1 or self.clients < self.processes:
            raise ValueError("need at least one process and one client per process")


@dataclass
class PhaseResult:
    """A run's merged outcome, as the parent saw it."""

    spec: RunSpec
    duration_s: float  # the measured window (load: the time loading took)
    ok: int = 0  # operations that completed (conflicts included)
    conflicts: int = 0  # cas operations that lost their race (wrote nothing)
    unfinished: int = 0  # open loop: scheduled in the window, not done by the drain's end
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    latency: dict[str, Histogram] = field(default_factory=dict)  # by op, and "all"
    service: Histogram = field(default_factory=Histogram)  # open loop: from actual issue
    driver_cpu_s: float = 0.0
    probe_start: dict[str, float] = field(default_factory=dict)
    probe_end: dict[str, float] = field(default_factory=dict)

    @property
    def ops_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# --- sessions: one interface over both systems ------------------------------------------


class Session(Protocol):
    async def read(self, key: bytes) -> int: ...
    async def update(self, key: bytes, value: bytes) -> None: ...
    async def cas(self, key: bytes, value: bytes) -> bool: ...
    async def load(self, items: list[tuple[bytes, bytes]]) -> None: ...


class KvsvrSession:
    """All of a process's clients share one kvsvr Client (it multiplexes many
    requests per node connection, as an application's client would)."""

    def __init__(self, client: Any, table: str, read_consistency: str) -> None:
        import kvsvr

        self._client = client
        self._table = table
        self._consistency = read_consistency
        self._conflict = kvsvr.Conflict

    async def read(self, key: bytes) -> int:
        item = await self._client.get(key, table=self._table, consistency=self._consistency)
        return 0 if item is None else int(item.version)

    async def update(self, key: bytes, value: bytes) -> None:
        await self._client.put(key, value, table=self._table)

    async def cas(self, key: bytes, value: bytes) -> bool:
        item = await self._client.get(key, table=self._table)
        version = 0 if item is None else int(item.version)
        try:
            await self._client.cas(key, value, if_version=version, table=self._table)
        except self._conflict:
            return False
        return True

    async def load(self, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            await self._client.put(key, value, table=self._table)


class EtcdSessionAdapter:
    """One HTTP connection per client (HTTP/1.1 carries one request at a time)."""

    def __init__(self, address: str, read_consistency: str) -> None:
        from bench.etcd import EtcdSession

        self._reads = EtcdSession(address, serializable=read_consistency == "stale")

    async def read(self, key: bytes) -> int:
        revision, _ = await self._reads.get(key)
        return revision

    async def update(self, key: bytes, value: bytes) -> None:
        await self._reads.put(key, value)

    async def cas(self, key: bytes, value: bytes) -> bool:
        # The read of a read-modify-write is linearizable, as kvsvr's is.
        revision, _ = await self._reads.get(key, serializable=False)
        return await self._reads.cas(key, value, revision)

    async def load(self, items: list[tuple[bytes, bytes]]) -> None:
        if len(items) == 1:
            await self._reads.put(*items[0])
        else:
            await self._reads.put_many(items)

    async def aclose(self) -> None:
        await self._reads.aclose()


@asynccontextmanager
async def open_sessions(
    target: TargetSpec, count: int, offset: int = 0
) -> AsyncIterator[list[Session]]:
    """`count` sessions on `target`; etcd sessions spread over the members
    round-robin starting at member `offset`."""
    if target.kind == "kvsvr":
        import kvsvr

        async with kvsvr.connect(
            list(target.addresses), secret=target.secret, timeout_s=OPERATION_TIMEOUT_S
        ) as client:
            shared = KvsvrSession(client, target.table, target.read_consistency)
            yield [shared] * count
        return
    if target.kind == "etcd":
        sessions = [
            EtcdSessionAdapter(
                target.addresses[(offset + index) % len(target.addresses)],
                target.read_consistency,
            )
            for index in range(count)
        ]
        try:
            yield list(sessions)
        finally:
            for session in sessions:
                await session.aclose()
        return
    raise ValueError(f"unknown target kind {target.kind!r}")


# --- one load process ----------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, Histogram] = {}
        self.service = Histogram()
        self.ok = 0
        self.conflicts = 0
        self.unfinished = 0
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.completed = 0  # every finished operation, warm-up included (progress)

    def record(self, operation: str, latency_s: float) -> None:
        histogram = self.latency.get(operation)
        if histogram is None:
            histogram = self.latency[operation] = Histogram()
        histogram.record_s(latency_s)

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        if len(self.error_samples) < ERROR_SAMPLES_MAX:
            self.error_samples.append(f"{name}: {str(exc)[:300]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency": {op: h.to_dict() for op, h in self.latency.items()},
            "service": self.service.to_dict(),
            "ok": self.ok,
            "conflicts": self.conflicts,
            "unfinished": self.unfinished,
            "errors": self.errors,
            "error_samples": self.error_samples,
        }


class _Operation:
    """Chooses and runs one operation of a workload."""

    def __init__(self, spec: RunSpec, process_index: int) -> None:
        assert spec.workload is not None
        self.workload: Workload = spec.workload
        self.rng = random.Random(spec.seed * 1_000_003 + process_index)
        self.keys = key_chooser(spec.distribution, spec.key_count, self.rng)
        self.values = value_pool(spec.value_bytes, spec.seed * 7919 + process_index)
        self._value_index = 0

    def next(self) -> tuple[str, bytes]:
        return self.workload.choose(self.rng), key_name(self.keys.next_index())

    def next_value(self) -> bytes:
        self._value_index = (self._value_index + 1) % len(self.values)
        return self.values[self._value_index]

    async def run(self, session: Session, operation: str, key: bytes) -> bool:
        """Run it; False when a cas lost its race. Raises on errors and on
        taking longer than `OPERATION_TIMEOUT_S` (trio.TooSlowError)."""
        with trio.fail_after(OPERATION_TIMEOUT_S):
            return await self.run_unbounded(session, operation, key)

    async def run_unbounded(self, session: Session, operation: str, key: bytes) -> bool:
        """`run` for a caller that bounds its time itself."""
        if operation == "read":
            await session.read(key)
            return True
        if operation == "update":
            await session.update(key, self.next_value())
            return True
        return await session.cas(key, self.next_value())


async def _closed_loop(
    spec: RunSpec,
    process_index: int,
    sessions: list[Session],
    recorder: _Recorder,
    window_start: float,
    window_end: float,
) -> None:
    operations = _Operation(spec, process_index)

    async def client(session: Session) -> None:
        while True:
            failure: BaseException | None = None
            # One bound for many operations (see OPERATION_BOUND_SLACK_S); when
            # it runs out, the operation in flight took too long.
            with trio.CancelScope() as bound:
                while True:
                    started = time.perf_counter()
                    if started >= window_end:
                        return
                    now = trio.current_time()
                    if bound.deadline < now + OPERATION_TIMEOUT_S:
                        bound.deadline = now + OPERATION_TIMEOUT_S + OPERATION_BOUND_SLACK_S
                    operation, key = operations.next()
                    try:
                        written = await operations.run_unbounded(session, operation, key)
                    except Exception as exc:
                        failure = exc
                        break
                    finished = time.perf_counter()
                    recorder.completed += 1
                    if window_start <= finished < window_end:
                        recorder.ok += 1
                        recorder.conflicts += not written
                        recorder.record(operation, finished - started)
            if bound.cancelled_caught:
                failure = trio.TooSlowError()
            assert failure is not None
            finished = time.perf_counter()
            if window_start <= finished < window_end:
                recorder.error(failure)
            await trio.sleep(ERROR_PAUSE_S)

    async with trio.open_nursery() as nursery:
        for session in sessions:
            nursery.start_soon(client, session)


async def _open_loop(
    spec: RunSpec,
    process_index: int,
    sessions: list[Session],
    recorder: _Recorder,
    run_start: float,
    window_start: float,
    window_end: float,
) -> None:
    operations = _Operation(spec, process_index)
    schedule = intended_start_times(
        spec.rate_per_s, run_start, window_end, process_index, spec.processes
    )
    drain_end = window_end + DRAIN_S
    late: list[float] = []  # scheduled in the window, cut off by the drain's end

    async def worker(session: Session) -> None:
        for intended in schedule:
            now = time.perf_counter()
            if intended > now:
                await trio.sleep(intended - now)
            measured = intended >= window_start
            issued = time.perf_counter()
            if issued >= drain_end:
                if measured:
                    late.append(intended)
                continue
            operation, key = operations.next()
            written = False
            failure: BaseException | None = None
            with trio.move_on_after(drain_end - issued) as scope:
                try:
                    written = await operations.run(session, operation, key)
                except (Exception, trio.TooSlowError) as exc:
                    failure = exc
            finished = time.perf_counter()
            recorder.completed += 1
            if not measured:
                continue
            if scope.cancelled_caught:
                late.append(intended)
            elif failure is not None:
                recorder.error(failure)
            else:
                recorder.ok += 1
                recorder.conflicts += not written
                recorder.record(operation, finished - intended)
                recorder.service.record_s(finished - issued)

    async with trio.open_nursery() as nursery:
        for session in sessions:
            nursery.start_soon(worker, session)
    for intended in late:
        recorder.unfinished += 1
        recorder.record("unfinished", drain_end - intended)


async def _load(
    spec: RunSpec, process_index: int, sessions: list[Session], recorder: _Recorder
) -> None:
    values = value_pool(spec.value_bytes, spec.seed)
    # Process i loads keys i, i + P, i + 2P, ...; its sessions pull batches in order.
    indexes = iter(range(process_index, spec.key_count, spec.processes))

    def next_batch() -> list[tuple[bytes, bytes]]:
        batch = []
        for index in indexes:
            batch.append((key_name(index), values[index % len(values)]))
            if len(batch) >= spec.load_batch:
                break
        return batch

    async def writer(session: Session) -> None:
        while batch := next_batch():
            for attempt in range(3):
                try:
                    with trio.fail_after(OPERATION_TIMEOUT_S):
                        await session.load(batch)
                    break
                except (Exception, trio.TooSlowError) as exc:
                    recorder.error(exc)
                    if attempt == 2:
                        raise
            recorder.ok += len(batch)
            recorder.completed += len(batch)

    async with trio.open_nursery() as nursery:
        for session in sessions:
            nursery.start_soon(writer, session)


async def _process_main(
    spec: RunSpec, index: int, messages: Any, go: Any, start_at: Any
) -> dict[str, Any]:
    counts = split_evenly(spec.clients, spec.processes)
    recorder = _Recorder()
    async with open_sessions(spec.target, counts[index], offset=sum(counts[:index])) as sessions:
        messages.put(("ready", index, None))
        await trio.to_thread.run_sync(go.wait)
        # One wall-clock instant for all processes, mapped onto this process's clock.
        run_start = time.perf_counter() + (start_at.value - time.time())
        await trio.sleep(max(0.0, run_start - time.perf_counter()))
        window_start = run_start + spec.warmup_s
        window_end = window_start + spec.duration_s
        cpu = {"start": time.process_time(), "end": 0.0}

        async def report_progress() -> None:
            while True:
                messages.put(("progress", index, recorder.completed))
                await trio.sleep(PROGRESS_INTERVAL_S)

        async def sample_cpu() -> None:
            await trio.sleep(max(0.0, window_start - time.perf_counter()))
            cpu["start"] = time.process_time()
            await trio.sleep(max(0.0, window_end - time.perf_counter()))
            cpu["end"] = time.process_time()

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_progress)
            if spec.mode != "load":
                nursery.start_soon(sample_cpu)
            if spec.mode == "closed":
                await _closed_loop(spec, index, sessions, recorder, window_start, window_end)
            elif spec.mode == "open":
                await _open_loop(
                    spec, index, sessions, recorder, run_start, window_start, window_end
                )
            else:
                await _load(spec, index, sessions, recorder)
                cpu["end"] = time.process_time()
            nursery.cancel_scope.cancel()
        result = recorder.as_dict()
        result["cpu_s"] = (cpu["end"] or time.process_time()) - cpu["start"]
        result["elapsed_s"] = time.perf_counter() - started
        return result


def _process_entry(spec: RunSpec, index: int, messages: Any, go: Any, start_at: Any) -> None:
    # The same collector tuning as a node (kvsvr.node.server.tune_gc): a load
    # generator allocates per operation too, and shares the cores with the target.
    tune_gc()
    try:
        result = trio.run(_process_main, spec, index, messages, go, start_at)
    except BaseException:  # reported to the parent, which decides
        messages.put(("error", index, traceback.format_exc(limit=8)))
        return
    messages.put(("result", index, result))


# --- the parent side -------------------------------------------------------------------------


class DriverError(RuntimeError):
    """A load process failed; the message carries its traceback."""


Probe = Callable[[], dict[str, float]]
Progress = Callable[[int], None]  # operations completed so far (all processes)


def run_phase(
    spec: RunSpec, *, probe: Probe | None = None, on_progress: Progress | None = None
) -> PhaseResult:
    """Run `spec` in `spec.processes` fresh processes and merge what they measured
    (for a target driven by Go, in the one Go driver process instead)."""
    if spec.target.driver == "go":
        from bench.etcd_go import run_go_phase

        return run_go_phase(spec, spec.target.driver_binary, probe=probe, on_progress=on_progress)
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold trio
    messages = context.Queue()
    go = context.Event()
    start_at = context.Value("d", 0.0)
    processes = [
        context.Process(
            target=_process_entry,
            args=(spec, index, messages, go, start_at),
            name=f"bench-load-{index}",
            daemon=True,
        )
        for index in range(spec.processes)
    ]
    try:
        for process in processes:
            process.start()
        _wait_ready(processes, messages)
        run_start = time.time() + START_DELAY_S
        start_at.value = run_start
        go.set()
        return collect_phase(spec, processes, messages, run_start, probe, on_progress)
    finally:
        started = [process for process in processes if process.pid is not None]
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(5)


def _wait_ready(processes: list[Any], messages: Any) -> None:
    ready: set[int] = set()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(ready) < len(processes):
        try:
            kind, index, payload = messages.get(timeout=0.2)
        except queue_module.Empty:
            _check_alive(processes, ready)
            if time.monotonic() > deadline:
                raise DriverError(f"load processes not ready after {READY_TIMEOUT_S} s") from None
            continue
        if kind == "error":
            raise DriverError(f"load process {index} failed while connecting:\n{payload}")
        if kind == "ready":
            ready.add(index)


def _check_alive(processes: list[Any], done: set[int]) -> None:
    for index, process in enumerate(processes):
        if index not in done and process.exitcode is not None:
            raise DriverError(f"load process {index} exited with code {process.exitcode}")


def collect_phase(
    spec: RunSpec,
    processes: list[Any],
    messages: Any,
    run_start: float,
    probe: Probe | None,
    on_progress: Progress | None,
) -> PhaseResult:
    window_start = run_start + spec.warmup_s
    window_end = window_start + spec.duration_s
    probes: dict[str, dict[str, float]] = {}
    progress = [0] * len(processes)
    results: dict[int, dict[str, Any]] = {}
    while len(results) < len(processes):
        now = time.time()
        if spec.mode != "load" and probe is not None:
            if "start" not in probes and now >= window_start:
                probes["start"] = probe()
            if "end" not in probes and now >= window_end:
                probes["end"] = probe()
        next_probe = window_start if "start" not in probes else window_end
        wait_s = 0.05 if "end" in probes or probe is None else min(0.05, next_probe - now)
        try:
            kind, index, payload = messages.get(timeout=max(0.001, wait_s))
        except queue_module.Empty:
            _check_alive(processes, set(results))
            if spec.mode != "load" and time.time() > window_end + FINISH_GRACE_S:
                raise DriverError("load processes did not finish after their window") from None
            continue
        if kind == "progress":
            progress[index] = payload
            if on_progress is not None:
                on_progress(sum(progress))
        elif kind == "result":
            results[index] = payload
        elif kind == "error":
            raise DriverError(f"load process {index} failed:\n{payload}")
    if spec.mode != "load" and probe is not None and "end" not in probes:
        # The drivers stop at the window's end, so the last result can arrive
        # before this loop's end probe came due: take it now, a moment late
        # (the probe records its own wall time).
        probes["end"] = probe()
    return _merge(spec, list(results.values()), probes)


def _merge(
    spec: RunSpec, results: list[dict[str, Any]], probes: dict[str, dict[str, float]]
) -> PhaseResult:
    duration_s = max(r["elapsed_s"] for r in results) if spec.mode == "load" else spec.duration_s
    merged = PhaseResult(spec=spec, duration_s=duration_s)
    everything = Histogram()
    for result in results:
        merged.ok += result["ok"]
        merged.conflicts += result["conflicts"]
        merged.unfinished += result["unfinished"]
        merged.driver_cpu_s += result["cpu_s"]
        for name, count in result["errors"].items():
            merged.errors[name] = merged.errors.get(name, 0) + count
        merged.error_samples.extend(result["error_samples"][:ERROR_SAMPLES_MAX])
        for operation, data in result["latency"].items():
            histogram = Histogram.from_dict(data)
            merged.latency.setdefault(operation, Histogram()).merge(histogram)
            everything.merge(histogram)
        merged.service.merge(Histogram.from_dict(result["service"]))
    merged.latency["all"] = everything
    merged.probe_start = probes.get("start", {})
    merged.probe_end = probes.get("end", {})
    return merged


def with_rate(spec: RunSpec, rate_per_s: float) -> RunSpec:
    return replace(spec, mode="open", rate_per_s=rate_per_s)


def schedule_preview(spec: RunSpec, process_index: int) -> Iterator[float]:
    """The open-loop schedule a process of `spec` follows, from time 0 (for tests)."""
    end_s = spec.warmup_s + spec.duration_s
    return intended_start_times(spec.rate_per_s, 0.0, end_s, process_index, spec.processes)
