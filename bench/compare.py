"""`python -m bench compare`: kvsvr against etcd, same machine, same run.

Each system is driven by its own client at its best: kvsvr by kvsvr's client
(`kvsvr.connect`, in `--kvsvr-processes` load processes), etcd by etcd's Go
client (bench/etcdload on clientv3, built on first use, see bench.etcd_go).
Where the Go driver cannot be built, etcd falls back to bench's Python driver
through its HTTP/JSON gateway, and every table marks etcd's figures as a lower
bound; the `etcd-http` target runs that driver on purpose, side by side.

Order of a run:

1. start every cluster the targets need (kvsvr 3 nodes, etcd 3 members, ...)
   in one temporary directory, on free ports of 127.0.0.1;
2. load `keys` keys into each (through the client, as YCSB's load phase;
   timed and reported, not compared);
3. for each value size, key distribution and workload, run every target back
   to back, closed loop with `clients` clients: interleaving the targets keeps
   a noisy neighbour on the machine from favouring whichever ran first;
4. the open-loop sweep: one workload at fractions of etcd's closed-loop rate
   (of the reference target's, without etcd), every target at each point;
5. stop every cluster (also on error and Ctrl-C) and write the results.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from bench.driver import Histogram, PhaseResult, RunSpec, TargetSpec, run_phase
from bench.targets import (
    Cluster,
    KvsvrCluster,
    TargetInfo,
    cpu_probe,
    environment,
    make_cluster,
)
from bench.workloads import DISTRIBUTIONS, Workload

DEFAULT_SWEEP_FRACTIONS: Final = (0.25, 0.5, 0.75, 1.0)
# Load phases: writers in flight (enough to fill group commit and etcd's batching).
LOAD_CLIENTS: Final = 256
# The targets the ratio compares, numerator first. kvsvr / etcd-http is shown
# marked as against a lower bound (bench's Python driver sets etcd's rate there).
RATIO_PAIRS: Final = (
    ("kvsvr", "etcd"),
    ("kvsvr-stale", "etcd-serializable"),
    ("kvsvr", "etcd-http"),
)
# The targets: (workload, ratio at least) on closed-loop throughput,
# kvsvr over etcd (etcd on its Go client).
THROUGHPUT_TARGETS: Final = (("W", 1.0), ("A", 1.0), ("B", 1.0), ("C", 2.0))
# At this fraction of etcd's maximum rate on this workload (open loop, both at
# the same offered load), kvsvr's p99 must not exceed etcd's.
LATENCY_TARGET_FRACTION: Final = 0.5
LATENCY_TARGET_WORKLOAD: Final = "W"
# Short names of the drivers, as recorded per run.
DRIVER_KVSVR: Final = "kvsvr-client"
DRIVER_ETCD_GO: Final = "etcd-go"
DRIVER_ETCD_HTTP: Final = "etcd-python-http"
# Longest measured window of a profiled run: enough samples, little extra time.
PROFILE_TIME_S: Final = 10.0
# Per-run slack added to the progress estimate: process start, connect, drain.
RUN_OVERHEAD_S: Final = 1.5


@dataclass
class CompareOptions:
    workloads: list[Workload]
    targets: list[TargetInfo]
    time_s: float = 30.0
    warmup_s: float = 3.0
    clients: int = 64
    processes: int = 2
    key_count: int = 100_000
    value_sizes: list[int] = field(default_factory=lambda: [100])
    distributions: list[str] = field(default_factory=lambda: ["zipfian"])
    sweep_workload: Workload | None = None
    sweep_fractions: tuple[float, ...] = DEFAULT_SWEEP_FRACTIONS
    sweep_time_s: float = 10.0
    open_clients: int = 256
    out_dir: Path = Path("bench-results")
    work_dir: Path | None = None
    etcd_binary: str = "etcd"
    load_mode: str = "client"  # "client" | "bulk"
    progress: bool = True
    seed: int = 1
    keep_data: bool = False
    profile_workloads: list[Workload] = field(default_factory=list)
    # "go": etcd targets whose driver is Go use bench/etcdload (built on first
    # use; if it cannot be, the Python driver, labelled a lower bound);
    # "python": every etcd target on the Python HTTP driver (a lower bound).
    etcd_driver: str = "go"
    etcd_connections: int = 8  # the Go driver's gRPC connections
    # kvsvr's load processes (None: `processes`). One by default: with all 64
    # clients on one kvsvr client, requests share connections and batches, and
    # the nodes spend less CPU per operation (RESULTS.md, 2026-12-07: C 3,045-
    # 3,817/s with one process against 2,010-2,137 with two or three; W level).
    kvsvr_processes: int | None = 1
    go_driver_binary: str = ""  # set by run_compare once built

    def __post_init__(self) -> None:
        for distribution in self.distributions:
            if distribution not in DISTRIBUTIONS:
                raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
        if self.load_mode not in ("client", "bulk"):
            raise ValueError("load mode must be client or bulk")
        if self.etcd_driver not in ("go", "python"):
            raise ValueError("etcd driver must be go or python")


# --- drivers ------------------------------------------------------------------------------


def resolve_drivers(
    options: CompareOptions, build: Callable[[], tuple[Path | None, str]] | None = None
) -> dict[str, Any]:
    """Give every etcd target that wants the Go driver either its binary or,
    where it cannot be built, the Python driver (a lower bound). Rewrites
    `options.targets`; returns what happened, for the results."""
    wanting = [t for t in options.targets if t.system == "etcd" and t.driver == "go"]
    record: dict[str, Any] = {"etcd_driver": options.etcd_driver, "go": None, "fallback": []}
    if not wanting:
        return record
    reason = ""
    if options.etcd_driver == "python":
        reason = "--etcd-driver python"
    else:
        if build is None:
            from bench.etcd_go import go_driver

            build = go_driver
        binary, reason = build()
        if binary is not None:
            options.go_driver_binary = str(binary)
            record["go"] = {"binary": str(binary)}
            return record
    options.targets = [
        replace(
            t,
            driver="python",
            description=t.description.replace(
                "etcd's Go client", "bench's Python HTTP driver (a lower bound)"
            ),
        )
        if t in wanting
        else t
        for t in options.targets
    ]
    record["fallback"] = [t.name for t in wanting]
    record["fallback_reason"] = reason
    return record


def processes_for(target: TargetInfo, options: CompareOptions) -> int:
    """Load processes a target's runs use: one Go process (its own threads) for
    etcd's Go driver, `kvsvr_processes` for kvsvr, `processes` otherwise."""
    if target.system == "etcd" and target.driver == "go":
        return 1
    if target.system == "kvsvr" and options.kvsvr_processes:
        return options.kvsvr_processes
    return options.processes


def target_spec(
    cluster: Cluster, target: TargetInfo, options: CompareOptions, label: str | None = None
) -> TargetSpec:
    spec = cluster.spec(label or target.name, target.read_consistency, target.table)
    if target.system == "etcd" and target.driver == "go":
        spec = replace(
            spec,
            driver="go",
            driver_binary=options.go_driver_binary,
            connections=options.etcd_connections,
        )
    return spec


def driver_record(spec: RunSpec) -> dict[str, Any]:
    """Which driver a run used, in words, and whether its figures are a lower bound."""
    target = spec.target
    if target.driver == "go":
        connections = min(target.connections or 8, spec.clients)
        return {
            "driver": DRIVER_ETCD_GO,
            "driver_detail": "etcd's Go client (bench/etcdload, clientv3 over gRPC): "
            f"1 process, {connections} connections",
            "lower_bound": False,
        }
    if target.kind == "etcd":
        return {
            "driver": DRIVER_ETCD_HTTP,
            "driver_detail": f"bench's Python driver via etcd's HTTP/JSON gateway: "
            f"{spec.processes} process{'es' if spec.processes != 1 else ''}; the driver sets "
            "the rate, a lower bound on etcd",
            "lower_bound": True,
        }
    return {
        "driver": DRIVER_KVSVR,
        "driver_detail": "kvsvr's own client (kvsvr.connect, trio): "
        f"{spec.processes} process{'es' if spec.processes != 1 else ''}",
        "lower_bound": False,
    }


# --- planning --------------------------------------------------------------------------


def applies(target: TargetInfo, workload: Workload) -> bool:
    """Stale-read targets differ from their strong twin only in reads: skip them
    for workloads without plain reads."""
    if target.table != "default" and workload.cas > 0:
        return False  # no compare-and-set on an eventual table
    return target.read_consistency == "strong" or workload.read > 0


def runnable(targets: list[TargetInfo]) -> tuple[list[TargetInfo], list[TargetInfo]]:
    """(targets driven over the network, skipped ones); `lmdb` is neither."""
    driven = [t for t in targets if t.system in ("kvsvr", "etcd") and not t.skip_reason]
    skipped = [t for t in targets if t.skip_reason]
    return driven, skipped


def deployment_key(target: TargetInfo) -> tuple[str, int]:
    return target.system, target.nodes


def reference_target(driven: list[TargetInfo]) -> TargetInfo:
    """Whose closed-loop rate the sweep's fractions are of: etcd's if it runs."""
    for target in driven:
        if target.name == "etcd":
            return target
    return driven[0]


def run_order(driven: list[TargetInfo]) -> list[TargetInfo]:
    """etcd first (the sweep needs its rate), then the rest in the order given."""
    return sorted(driven, key=lambda t: t.system != "etcd")


def planned_seconds(options: CompareOptions, driven: list[TargetInfo]) -> float:
    per_run = options.warmup_s + options.time_s + RUN_OVERHEAD_S
    closed = sum(
        1
        for _ in options.value_sizes
        for _ in options.distributions
        for workload in options.workloads
        for target in driven
        if applies(target, workload)
    )
    total = closed * per_run
    if options.sweep_workload is not None:
        per_point = options.warmup_s + options.sweep_time_s + RUN_OVERHEAD_S
        points = len(options.sweep_fractions) * sum(
            1 for t in driven if applies(t, options.sweep_workload)
        )
        total += points * per_point
    return total


# --- results ------------------------------------------------------------------------------


def summarize(result: PhaseResult, target: TargetInfo, **extra: Any) -> dict[str, Any]:
    """A run as plain data: throughput, latency percentiles, CPU by whom."""
    spec = result.spec
    window_s = result.duration_s
    summary: dict[str, Any] = {
        "target": target.name,
        "system": target.system,
        "mode": spec.mode,
        "workload": spec.workload.name if spec.workload else None,
        "distribution": spec.distribution,
        "value_bytes": spec.value_bytes,
        "key_count": spec.key_count,
        "clients": spec.clients,
        "processes": spec.processes,
        "rate_per_s": spec.rate_per_s or None,
        "duration_s": window_s,
        "ops": result.ok,
        "ops_per_s": result.ops_per_s,
        "conflicts": result.conflicts,
        "unfinished": result.unfinished,
        "errors": dict(result.errors),
        "error_samples": result.error_samples[:3],
        "latency": {op: h.summary_ms() for op, h in sorted(result.latency.items())},
        "histogram": result.latency["all"].to_dict() if "all" in result.latency else None,
    }
    if result.service.total:
        summary["service_time"] = result.service.summary_ms()
    summary.update(driver_record(spec))
    summary.update(cpu_figures(result))
    summary.update(extra)
    return summary


def cpu_figures(result: PhaseResult) -> dict[str, Any]:
    """Cores used in the measured window by the servers, the driver and the rest."""
    window_s = result.duration_s
    start, end = result.probe_start, result.probe_end
    figures: dict[str, Any] = {"driver_cores": result.driver_cpu_s / window_s if window_s else 0}
    if not start or not end:
        return figures
    wall_s = end["wall_s"] - start["wall_s"]
    servers_s = end["servers_cpu_s"] - start["servers_cpu_s"]
    system_s = end["servers_system_s"] - start["servers_system_s"]
    busy_s = end["machine_busy_s"] - start["machine_busy_s"]
    total_s = end["machine_total_s"] - start["machine_total_s"]
    figures.update(
        {
            "server_cores": servers_s / wall_s,
            # Kernel time of the servers: syscalls, loopback TCP, fsync bookkeeping.
            "server_system_fraction": system_s / servers_s if servers_s else None,
            "machine_busy_cores": busy_s / wall_s,
            "machine_cores": total_s / wall_s,
            # Everything else on the machine: other users' processes, the kernel's
            # own threads, this benchmark's parent. Large values mean noise.
            "other_cores": max(0.0, (busy_s - servers_s - result.driver_cpu_s) / wall_s),
            "server_cpu_s_per_1000_ops": 1000 * servers_s / result.ok if result.ok else None,
            "driver_cpu_s_per_1000_ops": 1000 * result.driver_cpu_s / result.ok
            if result.ok
            else None,
        }
    )
    return figures


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """numerator/denominator of ops/s (and the p99s) for each pair that both ran."""
    by_key = {
        (r["target"], r["workload"], r["distribution"], r["value_bytes"]): r
        for r in runs
        if r["mode"] == "closed"
    }
    rows = []
    for (target, workload, distribution, value_bytes), run in by_key.items():
        for numerator, denominator in RATIO_PAIRS:
            if target != numerator:
                continue
            other = by_key.get((denominator, workload, distribution, value_bytes))
            if other is None:
                continue
            rows.append(
                {
                    "workload": workload,
                    "distribution": distribution,
                    "value_bytes": value_bytes,
                    "numerator": numerator,
                    "denominator": denominator,
                    "numerator_ops_per_s": run["ops_per_s"],
                    "denominator_ops_per_s": other["ops_per_s"],
                    "ratio": run["ops_per_s"] / other["ops_per_s"] if other["ops_per_s"] else None,
                    "numerator_p99_ms": run["latency"]["all"]["p99_ms"],
                    "denominator_p99_ms": other["latency"]["all"]["p99_ms"],
                    "denominator_driver": other.get("driver"),
                    # Against a lower bound, the ratio is an upper bound: not a fair ratio.
                    "lower_bound": bool(other.get("lower_bound")),
                }
            )
    return rows


def target_checks(
    ratio_rows: list[dict[str, Any]], sweep: list[dict[str, Any]], clients: int
) -> list[dict[str, Any]]:
    """The targets (`THROUGHPUT_TARGETS`), each met / missed / not measured, with the numbers.
    Against etcd on the Python driver (a fallback), a check says so."""
    checks: list[dict[str, Any]] = []
    for workload, bound in THROUGHPUT_TARGETS:
        rows = [
            r
            for r in ratio_rows
            if r["workload"] == workload
            and (r["numerator"], r["denominator"]) == ("kvsvr", "etcd")
            and r["value_bytes"] == 100
        ]
        name = f"{workload}: kvsvr >= {bound:.1f}x etcd ops/s (100 B, {clients} clients)"
        if not rows:
            checks.append({"target": name, "status": "not measured"})
            continue
        for row in rows:
            ratio = row["ratio"] or 0.0
            detail = f"{row['numerator_ops_per_s']:.0f} vs {row['denominator_ops_per_s']:.0f} ops/s"
            if row.get("lower_bound"):
                detail += " (etcd on the Python driver: a lower bound, so not a fair ratio)"
            checks.append(
                {
                    "target": f"{name}, {row['distribution']}",
                    "status": "met" if ratio >= bound else "missed",
                    "value": ratio,
                    "detail": detail,
                    "lower_bound": bool(row.get("lower_bound")),
                }
            )
    at_half = {
        r["target"]: r
        for r in sweep
        if abs(r["fraction"] - LATENCY_TARGET_FRACTION) < 1e-9
        and r["workload"] == LATENCY_TARGET_WORKLOAD
    }
    name = (
        f"p99 at {LATENCY_TARGET_FRACTION:.0%} of etcd's max {LATENCY_TARGET_WORKLOAD} rate: "
        "kvsvr <= etcd"
    )
    if "kvsvr" in at_half and "etcd" in at_half:
        mine, theirs = at_half["kvsvr"], at_half["etcd"]
        mine_p99 = mine["latency"]["all"]["p99_ms"]
        theirs_p99 = theirs["latency"]["all"]["p99_ms"]
        detail = (
            f"p99 {mine_p99:.1f} ms vs {theirs_p99:.1f} ms "
            f"(achieved {mine['ops_per_s']:.0f} vs {theirs['ops_per_s']:.0f} ops/s)"
        )
        if theirs.get("lower_bound"):
            detail += " (etcd on the Python driver: its max rate is a lower bound)"
        checks.append(
            {
                "target": f"{name} (open loop, {mine['rate_per_s']:.0f} ops/s offered to both)",
                "status": "met" if mine_p99 <= theirs_p99 else "missed",
                "value": mine_p99 / theirs_p99 if theirs_p99 else None,
                "detail": detail,
                "lower_bound": bool(theirs.get("lower_bound")),
            }
        )
    else:
        checks.append({"target": name, "status": "not measured"})
    return checks


# --- running ---------------------------------------------------------------------------------


class Progress:
    """One bar over the whole comparison, in planned seconds; load phases show
    keys loaded instead of moving it."""

    def __init__(self, total_s: float, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            import tqdm

            tqdm.tqdm.monitor_interval = 0  # no monitor thread: servers are forked later
            interactive = sys.stderr.isatty()
            self._bar = tqdm.tqdm(
                total=round(total_s),
                unit="s",
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}] {postfix}",
                dynamic_ncols=True,
                # Into a log file, a line every few seconds is plenty.
                mininterval=0.5 if interactive else 10.0,
            )
        self._phase_started = 0.0
        self._phase_budget = 0.0
        self._credited = 0.0

    def phase(self, label: str, budget_s: float) -> Callable[[int], None]:
        """Start a phase; returns the driver's progress callback."""
        self._phase_started = time.monotonic()
        self._phase_budget = budget_s
        self._credited = 0.0
        self._label = label
        self.note(label)
        started = time.monotonic()

        def on_progress(ops: int) -> None:
            elapsed = time.monotonic() - started
            if budget_s > 0:
                self._advance(min(elapsed, budget_s))
            rate = ops / elapsed if elapsed > 0 else 0.0
            self.note(f"{label}: {ops} ops ({rate:.0f}/s incl. warm-up)")

        return on_progress

    def _advance(self, credit_s: float) -> None:
        if self._bar is not None and credit_s > self._credited:
            step = credit_s - self._credited
            # The plan is an estimate (load phases, stragglers); tqdm drops its
            # total once n passes it, which breaks the "{total:.0f}" format.
            if self._bar.n + step >= self._bar.total:
                self._bar.total = self._bar.n + step + 1
            self._bar.update(step)
            self._credited = credit_s

    def finish_phase(self) -> None:
        self._advance(self._phase_budget)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def running_clusters(
    driven: list[TargetInfo], work_dir: Path, options: CompareOptions, progress: Progress
) -> Iterator[dict[tuple[str, int], Cluster]]:
    """Every cluster the targets need, started; always stopped on the way out."""
    clusters: dict[tuple[str, int], Cluster] = {}
    try:
        for target in run_order(driven):
            key = deployment_key(target)
            if key in clusters:
                continue
            system, nodes = key
            progress.note(f"starting {system} ({nodes} node{'s' if nodes > 1 else ''})")
            cluster = make_cluster(
                system,
                nodes,
                work_dir / f"{system}-{nodes}",
                replication=3,
                etcd_binary=options.etcd_binary,
            )
            if options.load_mode == "bulk" and isinstance(cluster, KvsvrCluster):
                cluster.preload = (options.key_count, options.value_sizes[0], options.seed)
            clusters[key] = cluster
            cluster.start()
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.stop()


def load_cluster(
    cluster: Cluster,
    target: TargetInfo,
    options: CompareOptions,
    value_bytes: int,
    progress: Progress,
    first: bool,
) -> dict[str, Any]:
    if (
        isinstance(cluster, KvsvrCluster)
        and cluster.preload is not None
        and first
        and target.table == "default"
    ):
        return {
            "system": target.system,
            "nodes": cluster.node_count,
            "keys": options.key_count,
            "value_bytes": value_bytes,
            "method": "bulk: rows written into each replica's LMDB before the nodes started",
        }
    processes = processes_for(target, options)
    spec = RunSpec(
        target=target_spec(cluster, target, options, f"load {target.system}"),
        mode="load",
        key_count=options.key_count,
        value_bytes=value_bytes,
        clients=max(LOAD_CLIENTS, processes),
        processes=processes,
        seed=options.seed,
        load_batch=128 if options.load_mode == "bulk" and target.system == "etcd" else 1,
    )
    label = f"loading {options.key_count} keys of {value_bytes} B into {target.system}"
    on_progress = progress.phase(label, 0.0)

    def show(ops: int) -> None:
        on_progress(ops)
        progress.note(f"{label}: {ops}/{options.key_count}")

    result = run_phase(spec, on_progress=show)
    if result.error_count:
        progress.write(f"  load of {target.system}: {result.error_count} retried errors")
    return {
        "system": target.system,
        "nodes": cluster.node_count,
        "keys": options.key_count,
        "value_bytes": value_bytes,
        "seconds": result.duration_s,
        "puts_per_s": result.ops_per_s,
        "in_flight": spec.clients,
        "method": f"{spec.load_batch} put(s) per request, {driver_record(spec)['driver']}",
        "errors": result.errors,
    }


def run_closed(
    cluster: Cluster,
    target: TargetInfo,
    workload: Workload,
    options: CompareOptions,
    distribution: str,
    value_bytes: int,
    progress: Progress,
) -> dict[str, Any]:
    spec = RunSpec(
        target=target_spec(cluster, target, options),
        mode="closed",
        workload=workload,
        distribution=distribution,
        key_count=options.key_count,
        value_bytes=value_bytes,
        clients=options.clients,
        warmup_s=options.warmup_s,
        duration_s=options.time_s,
        processes=processes_for(target, options),
        seed=options.seed,
    )
    label = f"{workload.name} {distribution} {value_bytes}B {target.name}"
    on_progress = progress.phase(label, options.warmup_s + options.time_s + RUN_OVERHEAD_S)
    result = run_phase(spec, probe=lambda: cpu_probe(cluster.pids), on_progress=on_progress)
    progress.finish_phase()
    summary = summarize(result, target)
    progress.write(one_line(summary))
    return summary


def run_open(
    cluster: Cluster,
    target: TargetInfo,
    workload: Workload,
    options: CompareOptions,
    rate_per_s: float,
    fraction: float,
    progress: Progress,
) -> dict[str, Any]:
    spec = RunSpec(
        target=target_spec(cluster, target, options),
        mode="open",
        workload=workload,
        distribution=options.distributions[0],
        key_count=options.key_count,
        value_bytes=options.value_sizes[0],
        clients=options.open_clients,
        rate_per_s=rate_per_s,
        warmup_s=options.warmup_s,
        duration_s=options.sweep_time_s,
        processes=processes_for(target, options),
        seed=options.seed,
    )
    label = f"sweep {workload.name} {fraction:.0%} ({rate_per_s:.0f}/s) {target.name}"
    on_progress = progress.phase(label, options.warmup_s + options.sweep_time_s + RUN_OVERHEAD_S)
    result = run_phase(spec, probe=lambda: cpu_probe(cluster.pids), on_progress=on_progress)
    progress.finish_phase()
    summary = summarize(result, target, fraction=fraction)
    progress.write(one_line(summary))
    return summary


def one_line(run: dict[str, Any]) -> str:
    latency = run["latency"].get("all", {})
    what = (
        f"{run['workload']} {run['distribution']} {run['value_bytes']}B"
        if run["mode"] == "closed"
        else f"{run['workload']} open {run['rate_per_s']:.0f}/s"
    )
    errors = sum(run["errors"].values())
    return (
        f"  {what:<24} {run['target']:<18} {run['ops_per_s']:8.0f} ops/s  "
        f"p50 {latency.get('p50_ms', 0):7.2f} ms  p99 {latency.get('p99_ms', 0):8.2f} ms"
        + (f"  errors {errors}" if errors else "")
        + (f"  unfinished {run['unfinished']}" if run["unfinished"] else "")
    )


def lmdb_ceiling(work_dir: Path, value_bytes: int, count: int) -> dict[str, Any]:
    """Raw LMDB in this process: one fsynced transaction per put (bench.lmdb_raw),
    and gets each in their own read transaction."""
    import random

    from bench.lmdb_raw import raw_lmdb_put_rate
    from bench.workloads import key_name
    from kvsvr.storage.engine import open_environment

    puts = raw_lmdb_put_rate(work_dir / "lmdb-puts", count, value_bytes)
    env = open_environment(work_dir / "lmdb-gets", map_size_bytes=1 << 30)
    try:
        db = env.open_db(b"t:bench", create=True)
        value = random.Random(1).randbytes(value_bytes)
        with env.begin(write=True, db=db) as txn:
            for index in range(count):
                txn.put(key_name(index), value)
        rng = random.Random(2)
        latencies = Histogram()
        started = time.perf_counter()
        for _ in range(count):
            key = key_name(rng.randrange(count))
            get_started = time.perf_counter()
            with env.begin(db=db) as txn:
                txn.get(key)
            latencies.record_s(time.perf_counter() - get_started)
        elapsed = time.perf_counter() - started
    finally:
        env.close()
    return {
        "value_bytes": value_bytes,
        "put_ops_per_s": puts["ops_per_s"],
        "put_p50_ms": puts["p50_ms"],
        "put_p99_ms": puts["p99_ms"],
        "get_ops_per_s": count / elapsed,
        "get_p50_ms": latencies.percentile_us(0.5) / 1000,
        "get_p99_ms": latencies.percentile_us(0.99) / 1000,
        "operations": count,
    }


def run_compare(options: CompareOptions) -> dict[str, Any]:
    """Run the whole comparison; returns the results (also written by the caller)."""
    driven, skipped = runnable(options.targets)
    drivers: dict[str, Any] = {}
    if any(t.system == "etcd" for t in driven):
        from bench.etcd import find_etcd

        find_etcd(options.etcd_binary)  # fail before starting anything, with the hint
        drivers = resolve_drivers(options)
        if drivers.get("fallback"):
            print(
                f"bench: etcd's Go driver is not available, so {', '.join(drivers['fallback'])} "
                f"{'runs' if len(drivers['fallback']) == 1 else 'run'} on bench's Python HTTP "
                "driver, and its figures are a lower bound on etcd's (marked so in every "
                f"table):\n  {drivers['fallback_reason']}",
                file=sys.stderr,
            )
        driven, skipped = runnable(options.targets)
    base = options.work_dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=base))
    results: dict[str, Any] = {
        "command": "compare",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(work_dir, options.etcd_binary if driven else None),
        "options": options_record(options),
        "targets": {t.name: {**asdict(t), "lower_bound": t.lower_bound} for t in options.targets},
        "drivers": drivers,
        "skipped": [{"target": t.name, "reason": t.skip_reason} for t in skipped],
        "loads": [],
        "runs": [],
        "sweep": [],
        "ceilings": [],
        "profiles": [],
    }
    progress = Progress(planned_seconds(options, driven), options.progress)
    try:
        for target in skipped:
            progress.write(f"skipping {target.name}: {target.skip_reason}")
        if driven:
            _run_driven(options, driven, work_dir, results, progress)
        if any(t.system == "lmdb" for t in options.targets):
            progress.note("raw LMDB ceiling")
            for value_bytes in options.value_sizes:
                results["ceilings"].append(
                    lmdb_ceiling(work_dir, value_bytes, min(options.key_count, 20_000))
                )
    finally:
        progress.close()
        if not options.keep_data:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["ratios"] = ratios(results["runs"])
    results["checks"] = target_checks(results["ratios"], results["sweep"], options.clients)
    results["work_dir"] = str(work_dir) if options.keep_data else None
    return results


def _run_driven(
    options: CompareOptions,
    driven: list[TargetInfo],
    work_dir: Path,
    results: dict[str, Any],
    progress: Progress,
) -> None:
    ordered = run_order(driven)
    with running_clusters(ordered, work_dir, options, progress) as clusters:
        for number, value_bytes in enumerate(options.value_sizes):
            loaded: set[tuple[tuple[str, int], str]] = set()
            for target in ordered:
                key = deployment_key(target)
                if (key, target.table) not in loaded:
                    loaded.add((key, target.table))
                    results["loads"].append(
                        load_cluster(
                            clusters[key], target, options, value_bytes, progress, number == 0
                        )
                    )
            for distribution in options.distributions:
                for workload in options.workloads:
                    for target in ordered:
                        if applies(target, workload):
                            results["runs"].append(
                                run_closed(
                                    clusters[deployment_key(target)],
                                    target,
                                    workload,
                                    options,
                                    distribution,
                                    value_bytes,
                                    progress,
                                )
                            )
        if options.sweep_workload is not None:
            _sweep(options, ordered, clusters, results, progress)
        if options.profile_workloads:
            kvsvr = [t for t in ordered if t.name == "kvsvr"]
            for target in kvsvr:
                for workload in options.profile_workloads:
                    results["profiles"].append(
                        _profiled_run(clusters[deployment_key(target)], target, workload,
                                      options, progress)
                    )  # fmt: skip


def _sweep(
    options: CompareOptions,
    ordered: list[TargetInfo],
    clusters: dict[tuple[str, int], Cluster],
    results: dict[str, Any],
    progress: Progress,
) -> None:
    workload = options.sweep_workload
    assert workload is not None
    reference = reference_target(ordered)
    reference_runs = [
        r
        for r in results["runs"]
        if r["target"] == reference.name
        and r["workload"] == workload.name
        and r["distribution"] == options.distributions[0]
        and r["value_bytes"] == options.value_sizes[0]
    ]
    if reference_runs:
        maximum = reference_runs[0]["ops_per_s"]
    else:  # the sweep's workload was not among the closed-loop runs: measure it
        maximum = run_closed(
            clusters[deployment_key(reference)],
            reference,
            workload,
            options,
            options.distributions[0],
            options.value_sizes[0],
            progress,
        )["ops_per_s"]
    results["sweep_reference"] = {
        "target": reference.name,
        "workload": workload.name,
        "max_ops_per_s": maximum,
    }
    if maximum <= 0:
        progress.write("sweep skipped: the reference target completed no operations")
        return
    for fraction in options.sweep_fractions:
        for target in ordered:
            if applies(target, workload):
                results["sweep"].append(
                    run_open(
                        clusters[deployment_key(target)],
                        target,
                        workload,
                        options,
                        fraction * maximum,
                        fraction,
                        progress,
                    )
                )


def _profiled_run(
    cluster: Cluster,
    target: TargetInfo,
    workload: Workload,
    options: CompareOptions,
    progress: Progress,
) -> dict[str, Any]:
    """An extra closed-loop run with py-spy sampling every kvsvr node (its
    numbers are not in the comparison: sampling costs the nodes CPU)."""
    from bench.profiling import profile_processes

    time_s = min(options.time_s, PROFILE_TIME_S)
    spec = RunSpec(
        target=target_spec(cluster, target, options),
        mode="closed",
        workload=workload,
        distribution=options.distributions[0],
        key_count=options.key_count,
        value_bytes=options.value_sizes[0],
        clients=options.clients,
        warmup_s=options.warmup_s,
        duration_s=time_s,
        processes=processes_for(target, options),
        seed=options.seed,
    )
    label = f"profile {workload.name} {target.name}"
    on_progress = progress.phase(label, 0.0)
    out = options.out_dir / "profiles"
    with profile_processes(
        cluster.pids, out, f"{target.name}-{workload.name}", options.warmup_s + time_s
    ) as profile:
        result = run_phase(spec, probe=lambda: cpu_probe(cluster.pids), on_progress=on_progress)
    summary = summarize(result, target)
    summary["profile"] = profile.summary
    progress.write(one_line(summary) + "  (profiled: py-spy on every node)")
    return summary


def options_record(options: CompareOptions) -> dict[str, Any]:
    return {
        "workloads": [w.name for w in options.workloads],
        "targets": [t.name for t in options.targets],
        "time_s": options.time_s,
        "warmup_s": options.warmup_s,
        "clients": options.clients,
        "processes": options.processes,
        "keys": options.key_count,
        "value_sizes": options.value_sizes,
        "distributions": options.distributions,
        "sweep_workload": options.sweep_workload.name if options.sweep_workload else None,
        "sweep_fractions": list(options.sweep_fractions),
        "sweep_time_s": options.sweep_time_s,
        "open_clients": options.open_clients,
        "load_mode": options.load_mode,
        "etcd_driver": options.etcd_driver,
        "etcd_connections": options.etcd_connections,
        "kvsvr_processes": options.kvsvr_processes or options.processes,
        "seed": options.seed,
        "profile_workloads": [w.name for w in options.profile_workloads],
    }
