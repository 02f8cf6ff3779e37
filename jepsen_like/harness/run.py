"""A whole test: cluster, clients, nemesis schedule, final reads, check, report.

`run_test(RunConfig(...))` (async) or `run(RunConfig(...))` (blocking) does
everything the command line does. The pieces compose for tests that want
their own arrangement:

    async with open_cluster(directory, node_count=3) as cluster:
        workload = RegisterWorkload(key_count=4)
        nemeses = [make_nemesis("kill", cluster, rng), make_nemesis("partition", cluster, rng)]
        outcome = await drive(cluster, workload, nemeses, Timing(30.0), History())
    result = check_history(outcome.history, workload)

Phases, by an operation's invoke time: `before` (warm-up, no fault yet),
`during` (from the first fault to the end of the final heal), `after` (the
quiet tail), `final` (the final reads of every key).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from jepsen_like.checker import (
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    CheckResult,
    StaleReadProblem,
    check,
    check_stale_reads_monotonic,
    without_stale_reads,
    write_html_report,
)
from jepsen_like.checker.watch import check_watch_streams
from jepsen_like.harness.client import NodeClient
from jepsen_like.harness.cluster import Cluster, open_cluster
from jepsen_like.harness.history import History, checker_ops
from jepsen_like.harness.nemesis import (
    NEMESES,
    CorruptNemesis,
    FaultWindow,
    Nemesis,
    Schedule,
    heal_everything,
    make_nemesis,
    run_schedule,
)
from jepsen_like.harness.watchers import WatchRecorder
from jepsen_like.harness.workload import (
    Completion,
    PlannedOp,
    Worker,
    Workload,
    decode_value,
    make_workload,
)
from kvsvr import net
from kvsvr.errors import CorruptRow, KvsvrError

# Clients per node: at least two so operations on one node interleave, at most
# ten so a 2-core machine is not measuring its own scheduler.
CLIENTS_PER_NODE_MIN: Final = 2
CLIENTS_PER_NODE_MAX: Final = 10
# The warm-up and the quiet tail take this share of the run, within bounds: long
# enough to measure the healthy throughput and to see the cluster recover.
WARMUP_FRACTION: Final = 0.15
WARMUP_MIN_S: Final = 3.0
WARMUP_MAX_S: Final = 15.0
TAIL_FRACTION: Final = 0.2
TAIL_MIN_S: Final = 5.0
TAIL_MAX_S: Final = 20.0
# A run whose healthy throughput (ok operations per second before any fault)
# is below this measured a broken or starved cluster, not kvsvr: invalid.
MIN_OPS_PER_S: Final = 5.0
# Longest pause of a client after an operation that could not be sent (drawn
# uniformly): a client of a dead node would otherwise fill the history with
# instant connection failures.
RETRY_PAUSE_MAX_S: Final = 0.2
# Final reads: each key is read until one succeeds, this many times at most,
# a few at once.
FINAL_READ_ATTEMPTS_MAX: Final = 10
FINAL_READ_CONCURRENCY: Final = 8
# The checker's budget; past it the verdict is unknown.
CHECK_TIMEOUT_S: Final = 300.0
CHECK_WORKERS: Final = 2
# Time a progress line waits between updates.
PROGRESS_INTERVAL_S: Final = 1.0
# The `status` request every node answers at the end, for the results file.
STATUS_TIMEOUT_S: Final = 5.0

PHASES: Final = ("before", "during", "after", "final")

EXIT_LINEARIZABLE: Final = 0
EXIT_ANOMALY: Final = 1
EXIT_UNKNOWN: Final = 2
EXIT_INVALID: Final = 3


@dataclass(frozen=True, slots=True)
class Timing:
    """How long the workload runs and how it splits (seconds)."""

    time_s: float
    warmup_s: float | None = None
    tail_s: float | None = None

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(WARMUP_MAX_S, max(WARMUP_MIN_S, self.time_s * WARMUP_FRACTION))

    @property
    def tail(self) -> float:
        if self.tail_s is not None:
            return self.tail_s
        return min(TAIL_MAX_S, max(TAIL_MIN_S, self.time_s * TAIL_FRACTION))

    @property
    def faults_end(self) -> float:
        return max(self.warmup, self.time_s - self.tail)


@dataclass(slots=True)
class DriveOutcome:
    """What `drive` leaves behind: the history and when things happened
    (seconds on the history's clock)."""

    history: History
    windows: list[FaultWindow]
    workload_start_s: float
    faults_start_s: float
    healed_s: float
    tail_end_s: float
    final_end_s: float
    keys: list[str]


@dataclass(slots=True)
class RunConfig:
    """Everything a run needs; the command line's flags, one to one."""

    out_dir: Path
    node_count: int = 3
    time_s: float = 60.0
    nemeses: tuple[str, ...] = ("kill", "pause", "partition", "corrupt")
    # The `clock` nemesis's rate (None: 1 +/- the cluster's clock_drift_max).
    clock_rate: float | None = None
    # Read leases: on or off, and their length (None: the config's default).
    read_leases: bool = True
    lease_s: float | None = None
    workload: str = "register"
    # The share of the register workload's reads sent as stale reads (0: all
    # strong). They are checked for per-process monotonicity, not linearizability.
    stale_reads: float = 0.0
    # Register strong reads send the version of the value the client holds;
    # the node may answer "unchanged" (kvsvr's client near cache).
    near_cache: bool = False
    # Watchers per node following every key (0: none); their streams are
    # checked against the history (`jepsen_like.checker.watch`).
    watchers_per_node: int = 0
    # Register workload: the share of a client's operations on the keys homed
    # at its node (as kvsvr's client routes them); read leases need it.
    key_affinity: float = 0.0
    # Register workload: the share of reads (None: the workload's 0.4).
    read_fraction: float | None = None
    seed: int = 0
    clients_per_node: int = 3
    key_count: int = 4
    warmup_s: float | None = None
    tail_s: float | None = None
    min_ops_per_s: float = MIN_OPS_PER_S
    check_timeout_s: float = CHECK_TIMEOUT_S
    progress: bool = False
    # Delete an earlier run's outputs in out_dir first (else such a directory
    # is refused: its old LMDB data would make the new history meaningless).
    overwrite: bool = False
    # Every client and peer link runs TLS (a local CA made for the run).
    tls: bool = False


@dataclass(slots=True)
class RunResult:
    verdict: str  # linearizable, not linearizable, unknown
    valid: bool
    invalid_reasons: list[str]
    exit_code: int
    counts: dict[str, dict[str, int]]
    ops_per_s: dict[str, float]
    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


# --- clients --------------------------------------------------------------------------


def _record_completion(
    history: History, worker: Worker, op: PlannedOp, completion: Completion
) -> None:
    history.record(
        worker.process,
        completion.type,
        op.f,
        op.key,
        completion.value if completion.type == "ok" else op.value,
        node=worker.node,
        consistency=_consistency_field(op),
        version=completion.version,
        error=completion.error,
        unchanged=completion.unchanged or None,
        current_version=completion.current_version,
    )


def _consistency_field(op: PlannedOp) -> str | None:
    """Recorded for stale reads only, so strong histories read as before."""
    return None if op.consistency == "strong" else op.consistency


async def _perform(
    history: History, worker: Worker, op: PlannedOp, workload: Workload, client: NodeClient
) -> Completion:
    history.record(
        worker.process,
        "invoke",
        op.f,
        op.key,
        op.value,
        node=worker.node,
        consistency=_consistency_field(op),
        if_version=op.if_version,
    )
    try:
        completion = await workload.execute(op, worker, client)
    except BaseException:
        # Cancelled (or broken) mid-operation: the outcome is unknown.
        history.record(
            worker.process,
            "info",
            op.f,
            op.key,
            op.value,
            node=worker.node,
            consistency=_consistency_field(op),
            error="abandoned",
        )
        raise
    _record_completion(history, worker, op, completion)
    return completion


async def _client_loop(
    cluster: Cluster,
    worker: Worker,
    workload: Workload,
    history: History,
    rng: random.Random,
    stop: trio.Event,
    process_stride: int,
) -> None:
    async with trio.open_nursery() as nursery:
        client = NodeClient(
            worker.node, cluster.address(worker.node), cluster.secret, nursery, tls=cluster.tls
        )
        try:
            while not stop.is_set():
                op = workload.next_op(worker, rng)
                completion = await _perform(history, worker, op, workload, client)
                if completion.type == "info":
                    worker.process += process_stride  # as Jepsen: a new process
                if not completion.sent:
                    # Do not spin on a dead node: a refused connection fails fast.
                    await trio.sleep(rng.uniform(0.0, RETRY_PAUSE_MAX_S))
        finally:
            # Not shielded: when cancelled, the nursery's cancellation closes
            # the connection anyway.
            await client.aclose()


async def _final_reads(
    cluster: Cluster,
    workload: Workload,
    history: History,
    keys: Sequence[str],
    first_process: int,
) -> None:
    """Read every key until one read succeeds (or the attempts run out)."""
    limiter = trio.CapacityLimiter(FINAL_READ_CONCURRENCY)
    processes = iter(range(first_process, first_process + len(keys) * FINAL_READ_ATTEMPTS_MAX))
    nodes = cluster.node_ids

    async def read_key(position: int, key: str) -> None:
        async with limiter, trio.open_nursery() as nursery:
            for attempt in range(FINAL_READ_ATTEMPTS_MAX):
                node = nodes[(position + attempt) % len(nodes)]
                worker = Worker(thread=-1, process=next(processes), node=node)
                client = NodeClient(
                    node, cluster.address(node), cluster.secret, nursery, tls=cluster.tls
                )
                try:
                    completion = await _perform(
                        history, worker, workload.final_read(key), workload, client
                    )
                finally:
                    await client.aclose()
                if completion.type == "ok":
                    return

    async with trio.open_nursery() as nursery:
        for position, key in enumerate(keys):
            nursery.start_soon(read_key, position, key)


async def _progress(
    history: History, total_s: float, begin: float, windows: list[FaultWindow]
) -> None:
    from tqdm import tqdm

    bar = tqdm(total=round(total_s), unit="s", desc="run", leave=True, file=sys.stderr)
    counts = {"ok": 0, "fail": 0, "info": 0}
    counted = 0
    try:
        while True:
            await trio.sleep(PROGRESS_INTERVAL_S)
            for event in history.events[counted:]:
                if event["type"] in counts and isinstance(event["process"], int):
                    counts[event["type"]] += 1
            counted = len(history.events)
            active = [w.nemesis for w in windows if w.end_s is None]
            bar.n = min(round(trio.current_time() - begin), round(total_s))
            bar.set_postfix(**counts, fault=",".join(active) or "-", refresh=False)
            bar.refresh()
    finally:
        bar.close()


async def drive(
    cluster: Cluster,
    workload: Workload,
    nemeses: Sequence[Nemesis],
    timing: Timing,
    history: History,
    *,
    seed: int = 0,
    clients_per_node: int = 3,
    progress: bool = False,
    watchers: WatchRecorder | None = None,
) -> DriveOutcome:
    """Run clients on every node while the nemeses strike, heal, let the tail
    run, stop the clients, then read every key once more."""
    if not CLIENTS_PER_NODE_MIN <= clients_per_node <= CLIENTS_PER_NODE_MAX:
        raise ValueError(
            f"clients per node must be within [{CLIENTS_PER_NODE_MIN}, {CLIENTS_PER_NODE_MAX}]"
        )
    nodes = cluster.node_ids
    threads = len(nodes) * clients_per_node
    windows: list[FaultWindow] = []
    workers = [Worker(thread=t, process=t, node=nodes[t % len(nodes)]) for t in range(threads)]
    stop_clients = trio.Event()
    begin = trio.current_time()
    workload_start_s = history.now_s()
    history.nemesis(
        "workload-start", {"nodes": nodes, "clients": threads, "nemeses": [n.name for n in nemeses]}
    )
    healed_s = workload_start_s
    async with trio.open_nursery() as nursery:
        if progress:
            nursery.start_soon(_progress, history, timing.time_s, begin, windows)
        async with trio.open_nursery() as clients:
            if watchers is not None:
                clients.start_soon(watchers.run, cluster, workload, stop_clients)
            for worker in workers:
                clients.start_soon(
                    _client_loop,
                    cluster,
                    worker,
                    workload,
                    history,
                    random.Random(f"{seed}-client-{worker.thread}"),
                    stop_clients,
                    threads,
                )
            schedule = Schedule(timing.warmup, timing.faults_end)
            await run_schedule(
                nemeses,
                schedule,
                history,
                random.Random(f"{seed}-nemesis"),
                windows,
                begin=begin,
            )
            # Without nemeses (or after an early last fault) the phases keep
            # their scheduled lengths, so runs compare.
            await trio.sleep_until(max(trio.current_time(), begin + timing.faults_end))
            if nemeses:
                await heal_everything(cluster, history)
            healed_s = history.now_s()
            await trio.sleep_until(max(trio.current_time() + timing.tail, begin + timing.time_s))
            stop_clients.set()
        tail_end_s = history.now_s()
        keys = workload.used_keys()
        first_process = max(w.process for w in workers) + threads
        await _final_reads(cluster, workload, history, keys, first_process)
        nursery.cancel_scope.cancel()
    faults_start_s = windows[0].start_s if windows else workload_start_s + timing.warmup
    return DriveOutcome(
        history=history,
        windows=windows,
        workload_start_s=workload_start_s,
        faults_start_s=faults_start_s,
        healed_s=healed_s,
        tail_end_s=tail_end_s,
        final_end_s=history.now_s(),
        keys=keys,
    )


# --- checking and counting --------------------------------------------------------------


def check_history(
    history: History, workload: Workload, timeout_s: float = CHECK_TIMEOUT_S
) -> CheckResult:
    """Linearizability of the history's strong operations (stale reads may lag
    by design; `check_stale_reads` checks them)."""
    ops = without_stale_reads(checker_ops(history.events))
    return check(ops, workload.model, timeout_s=timeout_s, workers=CHECK_WORKERS)


def check_stale_reads(history: History) -> list[StaleReadProblem]:
    """Stale reads that went back in time for their own process."""
    return check_stale_reads_monotonic(checker_ops(history.events))


def count_stale_reads(events: Sequence[Event]) -> dict[str, int]:
    """Stale reads by outcome (ok / fail / info), from their completions."""
    counts = {"ok": 0, "fail": 0, "info": 0}
    for invoke, completion in paired_ops(events):
        if invoke["f"] == "read" and invoke.get("consistency") == "stale":
            counts["info" if completion is None else completion["type"]] += 1
    return counts


def final_verdict(
    linearizability: str, corrupt_data_served: bool, stale_read_problems: bool
) -> str:
    """Damaged data served, or a stale read that went back in time for its
    own process, is an anomaly whatever the linearizability check says."""
    if corrupt_data_served or stale_read_problems:
        return NOT_LINEARIZABLE
    return linearizability


def phase_of(time_s: float, outcome: DriveOutcome) -> str:
    if time_s >= outcome.tail_end_s:
        return "final"
    if time_s >= outcome.healed_s:
        return "after"
    if time_s >= outcome.faults_start_s:
        return "during"
    return "before"


Event = dict[str, Any]


def paired_ops(events: Sequence[Event]) -> list[tuple[Event, Event | None]]:
    """Client (invoke, completion) pairs in invoke order; completion None if missing."""
    pending: dict[int, Event] = {}
    pairs: list[tuple[Event, Event | None]] = []
    for event in events:
        process = event["process"]
        if not isinstance(process, int):
            continue
        if event["type"] == "invoke":
            pending[process] = event
            continue
        invoke = pending.pop(process, None)
        if invoke is not None:
            pairs.append((invoke, event))
    pairs.extend((invoke, None) for invoke in pending.values())
    pairs.sort(key=lambda pair: int(pair[0]["index"]))
    return pairs


def count_by_phase(outcome: DriveOutcome) -> dict[str, dict[str, int]]:
    counts = {phase: {"ok": 0, "fail": 0, "info": 0} for phase in PHASES}
    for invoke, completion in paired_ops(outcome.history.events):
        phase = phase_of(invoke["time_ns"] / 1e9, outcome)
        kind = "info" if completion is None else completion["type"]
        counts[phase][kind] += 1
    return counts


def ops_per_s(outcome: DriveOutcome, counts: dict[str, dict[str, int]]) -> dict[str, float]:
    spans = {
        "before": outcome.faults_start_s - outcome.workload_start_s,
        "during": outcome.healed_s - outcome.faults_start_s,
        "after": outcome.tail_end_s - outcome.healed_s,
    }
    rates = {
        phase: counts[phase]["ok"] / span if span > 0 else 0.0 for phase, span in spans.items()
    }
    total_span = outcome.tail_end_s - outcome.workload_start_s
    ok = sum(counts[phase]["ok"] for phase in spans)
    rates["overall"] = ok / total_span if total_span > 0 else 0.0
    return rates


def invalid_reasons(
    counts: dict[str, dict[str, int]], rates: dict[str, float], min_ops_per_s: float
) -> list[str]:
    reasons = []
    if rates["before"] < min_ops_per_s:
        reasons.append(
            f"throughput before faults was {rates['before']:.1f} ok ops/s, "
            f"below the floor of {min_ops_per_s:g}"
        )
    if counts["after"]["ok"] == 0:
        reasons.append("no operation succeeded after the faults were healed")
    return reasons


def exit_code_for(verdict: str, valid: bool) -> int:
    if not valid:
        return EXIT_INVALID
    if verdict == LINEARIZABLE:
        return EXIT_LINEARIZABLE
    if verdict == NOT_LINEARIZABLE:
        return EXIT_ANOMALY
    return EXIT_UNKNOWN


# --- the whole run -------------------------------------------------------------------------


async def node_statuses(cluster: Cluster) -> dict[str, Any]:
    """Each node's `status` answer (or the error it gave)."""
    statuses: dict[str, Any] = {}
    for node_id in cluster.node_ids:
        try:
            with trio.fail_after(STATUS_TIMEOUT_S):
                connection = await net.connect(
                    *cluster.address(node_id),
                    secret=cluster.secret,
                    connect_timeout_s=STATUS_TIMEOUT_S,
                    tls=cluster.tls,
                )
                async with connection:
                    statuses[node_id] = await connection.request("status", {})
        except (KvsvrError, trio.TooSlowError, OSError) as error:
            statuses[node_id] = {"error": str(error)}
    return statuses


def written_values(events: Sequence[Event]) -> dict[str, set[Any]]:
    """Per key, every value some client tried to write (whatever the outcome)."""
    written: dict[str, set[Any]] = {}
    for event in events:
        if event["type"] != "invoke" or not isinstance(event["process"], int):
            continue
        if event["f"] in ("write", "put"):
            written.setdefault(event["key"], set()).add(event["value"])
        elif event["f"] == "cas":
            written.setdefault(event["key"], set()).add(event["value"][1])
        elif event["f"] == "delete":
            written.setdefault(event["key"], set()).add(None)
    return written


async def probe_corruption(
    cluster: Cluster, nemeses: Sequence[Nemesis], history: History
) -> list[dict[str, Any]]:
    """Read every damaged row back from its own replica (a `local` read, no
    quorum to hide behind). Refusing is right; so is a value some client wrote
    (the row was repaired). Anything else is damaged data served: `served_bad`."""
    written = written_values(history.events)
    probes: list[dict[str, Any]] = []
    for nemesis in nemeses:
        if not isinstance(nemesis, CorruptNemesis):
            continue
        for node_id, keys in nemesis.corrupted.items():
            async with trio.open_nursery() as nursery:
                client = NodeClient(
                    node_id, cluster.address(node_id), cluster.secret, nursery, tls=cluster.tls
                )
                for key in keys:
                    probe: dict[str, Any] = {"node": node_id, "key": key}
                    try:
                        raw, version = await client.get(key, consistency="local")
                    except CorruptRow as error:
                        probe.update(outcome="refused", error=str(error))
                    except KvsvrError as error:
                        probe.update(outcome="error", error=f"{type(error).__name__}: {error}")
                    else:
                        value = decode_value(raw)
                        damaged = raw in nemesis.damaged_values.get((node_id, key), [])
                        was_written = value in written.get(key, set()) or (
                            value is None and version == 0
                        )
                        good = was_written and not damaged
                        probe.update(
                            outcome="served" if good else "served_bad", value=value, version=version
                        )
                    probes.append(probe)
                await client.aclose()
    return probes


LOG_NEEDLES: Final = {
    "errors": " ERROR ",
    "warnings": " WARNING ",
    "tracebacks": "Traceback",
    "corrupt_rows_refused": "corrupt row",
}
LOG_SAMPLES_MAX: Final = 5


def log_findings(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Per node: how many log lines of each kind, and a few examples."""
    findings: dict[str, dict[str, Any]] = {}
    for node_id in cluster.node_ids:
        lines = cluster.log_text(node_id).splitlines()
        entry: dict[str, Any] = {}
        for name, needle in LOG_NEEDLES.items():
            hits = [line for line in lines if needle in line]
            entry[name] = len(hits)
            if hits and name != "warnings":
                entry[f"{name}_samples"] = hits[:LOG_SAMPLES_MAX]
        findings[node_id] = entry
    return findings


OUTPUT_NAMES: Final = (
    "cluster",
    "history.jsonl",
    "results.json",
    "summary.txt",
    "timeline.png",
    "report.html",
)


def _clear_outputs(out: Path, overwrite: bool) -> None:
    present = [out / name for name in OUTPUT_NAMES if (out / name).exists()]
    if present and not overwrite:
        raise ValueError(
            f"{out} already holds a run ({present[0].name}); use another directory, or overwrite it"
        )
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunInterrupted(Exception):
    """SIGTERM stopped the run; the cluster was shut down, nothing was checked."""


async def _cancel_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def run_test(config: RunConfig, workload: Workload | None = None) -> RunResult:
    """A full run as the command line does it; writes everything into `out_dir`.

    `workload` replaces the one `config.workload` names (a custom workload)."""
    from jepsen_like.harness.report import write_outputs

    resolved = await trio.Path(config.out_dir).resolve()
    await resolved.mkdir(parents=True, exist_ok=True)
    out = Path(resolved)
    await trio.to_thread.run_sync(_clear_outputs, out, config.overwrite)
    unknown = sorted(set(config.nemeses) - set(NEMESES))
    if unknown:
        raise ValueError(f"unknown nemeses {unknown}; expected some of {', '.join(NEMESES)}")
    if workload is None:
        keys_rng = random.Random(f"{config.seed}-keys")
        workload = make_workload(
            config.workload,
            config.key_count,
            keys_rng,
            stale_reads=config.stale_reads,
            near_cache=config.near_cache,
            key_affinity=config.key_affinity,
            read_fraction=config.read_fraction,
            node_ids=[f"n{i}" for i in range(1, config.node_count + 1)],
        )
    history = History(out / "history.jsonl")
    watchers = None
    if config.watchers_per_node:
        if workload.name != "register":
            raise ValueError("watchers check register histories: use the register workload")
        watchers = WatchRecorder(config.watchers_per_node, out / "watch.jsonl")
    timing = Timing(config.time_s, config.warmup_s, config.tail_s)
    statuses: dict[str, Any] = {}
    probes: list[dict[str, Any]] = []
    outcome: DriveOutcome | None = None
    try:
        async with trio.open_nursery() as guard:
            guard.start_soon(_cancel_on_sigterm, guard.cancel_scope)
            settings: dict[str, Any] = {"read_leases": config.read_leases}
            if config.lease_s is not None:
                settings["lease_s"] = config.lease_s
            async with open_cluster(
                out / "cluster",
                config.node_count,
                rng=random.Random(f"{config.seed}-network"),
                tls=config.tls,
                settings=settings,
            ) as cluster:
                nemesis_rng = random.Random(f"{config.seed}-nemesis-choices")
                nemeses = [
                    make_nemesis(
                        name,
                        cluster,
                        nemesis_rng,
                        keys=workload.active_keys,
                        clock_rate=config.clock_rate,
                    )
                    for name in config.nemeses
                ]
                outcome = await drive(
                    cluster,
                    workload,
                    nemeses,
                    timing,
                    history,
                    seed=config.seed,
                    clients_per_node=config.clients_per_node,
                    progress=config.progress,
                    watchers=watchers,
                )
                probes = await probe_corruption(cluster, nemeses, history)
                statuses = await node_statuses(cluster)
            guard.cancel_scope.cancel()
    finally:
        history.close()
        if watchers is not None:
            watchers.close()
    if outcome is None:
        raise RunInterrupted("the run was stopped (SIGTERM) before it finished; nodes are stopped")
    result = check_history(history, workload, config.check_timeout_s)
    stale = check_stale_reads(history)
    counts = count_by_phase(outcome)
    rates = ops_per_s(outcome, counts)
    reasons = invalid_reasons(counts, rates, config.min_ops_per_s)
    served_bad = [p for p in probes if p["outcome"] == "served_bad"]
    watch_problems = (
        [] if watchers is None else check_watch_streams(history.events, watchers.events)
    )
    verdict = final_verdict(result.verdict, bool(served_bad), bool(stale) or bool(watch_problems))
    files = {"history": str(out / "history.jsonl")}
    if result.verdict == NOT_LINEARIZABLE:
        files["report"] = str(
            write_html_report(result, out / "report.html", title=f"kvsvr run, seed {config.seed}")
        )
    summary: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "verdict": verdict,
        "linearizability": result.verdict,
        "valid": not reasons,
        "invalid_reasons": reasons,
        "counts": counts,
        "ops_per_s": rates,
        "bad_keys": result.bad_keys,
        "unknown_keys": result.unknown_keys,
        "check_elapsed_s": result.elapsed_s,
        "stale_reads": count_stale_reads(history.events),
        "unchanged_reads": sum(1 for e in history.client_events() if e.get("unchanged")),
        "stale_read_problems": [str(p) for p in stale],
        "watch": None
        if watchers is None
        else {
            "events": len(watchers.events),
            "resets": watchers.resets,
            "node_switches": watchers.switches,
            "problems": [str(p) for p in watch_problems],
        },
        "corruption_probes": probes,
        "corrupt_data_served": served_bad,
        "faults": [asdict(w) for w in outcome.windows],
        "node_events": [asdict(e) for e in cluster.events],
        "unexpected_exits": [asdict(e) for e in cluster.unexpected_exits()],
        "log_findings": log_findings(cluster),
        "node_status": statuses,
        "keys": outcome.keys,
        "phases_s": {
            "workload_start": outcome.workload_start_s,
            "faults_start": outcome.faults_start_s,
            "healed": outcome.healed_s,
            "tail_end": outcome.tail_end_s,
            "final_end": outcome.final_end_s,
        },
    }
    files["results"] = str(out / "results.json")
    summary["files"] = files
    files.update(write_outputs(out, outcome, summary))
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return RunResult(
        verdict=verdict,
        valid=not reasons,
        invalid_reasons=reasons,
        exit_code=exit_code_for(verdict, not reasons),
        counts=counts,
        ops_per_s=rates,
        out_dir=out,
        files=files,
        summary=summary,
    )


def run(config: RunConfig, workload: Workload | None = None) -> RunResult:
    """`run_test` from synchronous code."""
    return trio.run(run_test, config, workload)
