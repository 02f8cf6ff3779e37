"""Measured phases on a local cluster, shared by `bench.single_node` and
`bench.cluster`: `bench_cluster` starts the nodes (`kvsvr.local`), and node
CPU, node counters and machine CPU are read at each window's edges, so
every figure of a phase covers the same interval."""

from __future__ import annotations

import argparse
import contextlib
import math
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import kvsvr
from bench.load import (
    BENCH_SECRET,
    CLIENT_TIMEOUT_S,
    LoadGenerator,
    PhaseSpec,
    WorkerResult,
    load_generator,
)
from bench.node_profiles import Profiler, summarize_cprofile
from bench.output import phase_amount
from bench.proc import RssSampler, cpu_seconds, cpu_times, machine_cpu_times, status_kib
from kvsvr.local import LocalCluster, local_config, temporary_cluster
from kvsvr.tls import with_local_tls

# A node gets this long to stop after SIGTERM before it is killed.
NODE_STOP_TIMEOUT_S: Final = 10.0


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
    tls: bool = False,
) -> Iterator[LocalCluster]:
    """`node_count` nodes with `replication`, ready, in a fresh scratch
    directory under `scratch_root` (on the disk being measured: not a tmpfs);
    stopped (SIGTERM, then SIGKILL) on the way out and the directory deleted
    unless `keep`. The nodes also die with the benchmark if it is killed
    outright. With `cprofile_dir`, each node runs under cProfile, which
    writes `<directory name>-<node>.prof` there when the node stops. With
    `tls`, every link runs TLS, with a local CA made for the run."""
    if cprofile_dir is not None:
        cprofile_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"kvsvr-{node_count}n-{secrets.token_hex(4)}"

    def python_args(node_id: str) -> list[str]:
        if cprofile_dir is None:
            return []
        return ["-m", "cProfile", "-o", str(cprofile_dir / f"{run_name}-{node_id}.prof")]

    config = local_config(
        node_count, secret=BENCH_SECRET, replication=replication, settings=settings
    )
    with contextlib.ExitStack() as cleanup:
        if tls:
            tls_dir = Path(tempfile.mkdtemp(prefix=f"{run_name}-tls-", dir=scratch_root))
            if not keep:
                cleanup.callback(shutil.rmtree, tls_dir, ignore_errors=True)
            config = with_local_tls(config, tls_dir)
        with temporary_cluster(
            config,
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
    tls: bool = False,
) -> dict[str, Any]:
    """Start a cluster, load it (populate, then one measured phase per
    operation, in order, then one paced phase per (operation, rate) of
    `paced`, named "<operation>-paced"), stop it: each phase's summary,
    node RSS, status. `settings` override `ClusterConfig` fields (such as
    `unsafe_no_fsync`); `tls` runs every link with TLS."""
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
        tls=tls,
    ) as cluster:
        rss_at_start_kib = {node: status_kib(pid, "VmRSS") for node, pid in cluster.pids.items()}
        with (
            RssSampler(cluster.pids) as rss,
            kvsvr.SyncClient(
                cluster.addresses,
                secret=cluster.secret,
                timeout_s=CLIENT_TIMEOUT_S,
                tls=cluster.tls,
            ) as status_client,
            load_generator(cluster.addresses, cluster.secret, args, cluster.tls) as load,
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
        "tls": tls,
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


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN if empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]
