"""`python -m bench scale`: how cost and latency grow.

1. CPU-seconds of all server processes per 1000 operations, closed loop, for
   clusters of 3 and 5 nodes (kvsvr with replication 3, its default, and with
   replication 5, every node holding every key as every etcd member does;
   etcd with 3 and 5 members).
2. get and put latency with one client (no queueing) at 10^4, 10^5 and 10^6
   keys. Keys are bulk-loaded (kvsvr: written into each replica's LMDB before
   the nodes start; etcd: transactions of 128 puts). Gets read random keys;
   puts write a random sample of keys twice and time the second pass, so every
   timed kvsvr put has its coordinator's promise (the fast path), as in steady
   state, whatever the key count.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from bench.compare import Progress, cpu_figures
from bench.driver import Histogram, RunSpec, TargetSpec, open_sessions, run_phase
from bench.targets import Cluster, KvsvrCluster, cpu_probe, environment, make_cluster
from bench.workloads import Workload, key_name, value_pool

# Keys loaded for the CPU runs: enough that hot keys do not dominate, quick to load.
CPU_RUN_KEYS: Final = 10_000
LOAD_CLIENTS: Final = 256


@dataclass
class ScaleOptions:
    systems: list[str] = field(default_factory=lambda: ["kvsvr", "etcd"])
    node_counts: list[int] = field(default_factory=lambda: [3, 5])
    key_counts: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    workloads: list[Workload] = field(default_factory=list)
    time_s: float = 10.0
    warmup_s: float = 2.0
    clients: int = 64
    processes: int = 2
    value_bytes: int = 100
    samples: int = 2000
    out_dir: Path = Path("bench-results")
    work_dir: Path | None = None
    etcd_binary: str = "etcd"
    progress: bool = True
    seed: int = 1
    cpu: bool = True
    latency: bool = True


def cpu_configurations(options: ScaleOptions) -> list[tuple[str, int, int]]:
    """(system, nodes, replication) for the CPU runs."""
    configurations = []
    for system in options.systems:
        for nodes in options.node_counts:
            if system == "kvsvr":
                replications = sorted({min(3, nodes), nodes})
            else:
                replications = [nodes]  # every etcd member holds everything
            configurations += [(system, nodes, replication) for replication in replications]
    return configurations


def run_scale(options: ScaleOptions) -> dict[str, Any]:
    base = options.work_dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=base))
    results: dict[str, Any] = {
        "command": "scale",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(work_dir, options.etcd_binary),
        "options": {
            "systems": options.systems,
            "node_counts": options.node_counts,
            "key_counts": options.key_counts,
            "workloads": [w.name for w in options.workloads],
            "time_s": options.time_s,
            "clients": options.clients,
            "processes": options.processes,
            "value_bytes": options.value_bytes,
            "samples": options.samples,
        },
        "cpu": [],
        "latency": [],
        "notes": [],
    }
    configurations = cpu_configurations(options) if options.cpu else []
    per_run = options.warmup_s + options.time_s + 1.5
    progress = Progress(len(configurations) * len(options.workloads) * per_run, options.progress)
    try:
        for number, (system, nodes, replication) in enumerate(configurations):
            directory = work_dir / f"cpu-{number}-{system}-{nodes}-r{replication}"
            results["cpu"] += _cpu_runs(options, system, nodes, replication, directory, progress)
        if options.latency:
            for system in options.systems:
                for key_count in options.key_counts:
                    directory = work_dir / f"latency-{system}-{key_count}"
                    results["latency"].append(
                        _latency_run(options, system, key_count, directory, progress)
                    )
                    shutil.rmtree(directory, ignore_errors=True)
    finally:
        progress.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["notes"] = scale_notes(results, options)
    return results


def _cpu_runs(
    options: ScaleOptions,
    system: str,
    nodes: int,
    replication: int,
    directory: Path,
    progress: Progress,
) -> list[dict[str, Any]]:
    cluster = make_cluster(
        system, nodes, directory, replication=replication, etcd_binary=options.etcd_binary
    )
    rows = []
    try:
        progress.note(f"starting {system} {nodes} nodes r{replication}")
        cluster.start()
        target = cluster.spec(system, "strong")
        progress.note(f"loading {CPU_RUN_KEYS} keys into {system} {nodes} nodes")
        run_phase(_load_spec(target, options, CPU_RUN_KEYS, batch=1))
        for workload in options.workloads:
            spec = RunSpec(
                target=target,
                mode="closed",
                workload=workload,
                distribution="uniform",
                key_count=CPU_RUN_KEYS,
                value_bytes=options.value_bytes,
                clients=options.clients,
                warmup_s=options.warmup_s,
                duration_s=options.time_s,
                processes=options.processes,
                seed=options.seed,
            )
            label = f"CPU {system} {nodes}n r{replication} {workload.name}"
            on_progress = progress.phase(label, options.warmup_s + options.time_s + 1.5)
            result = run_phase(spec, probe=lambda: cpu_probe(cluster.pids), on_progress=on_progress)
            progress.finish_phase()
            row = {
                "system": system,
                "nodes": nodes,
                "replication": replication,
                "workload": workload.name,
                "ops_per_s": result.ops_per_s,
                "ops": result.ok,
                "errors": result.errors,
                "latency": result.latency["all"].summary_ms(),
                **cpu_figures(result),
            }
            progress.write(
                f"  {label}: {row['ops_per_s']:.0f} ops/s, server "
                f"{row.get('server_cpu_s_per_1000_ops') or 0:.2f} CPU-s per 1000 ops"
            )
            rows.append(row)
    finally:
        cluster.stop()
    return rows


def _load_spec(target: TargetSpec, options: ScaleOptions, key_count: int, batch: int) -> RunSpec:
    return RunSpec(
        target=target,
        mode="load",
        key_count=key_count,
        value_bytes=options.value_bytes,
        clients=LOAD_CLIENTS if batch == 1 else 4 * options.processes,
        processes=options.processes,
        seed=options.seed,
        load_batch=batch,
    )


def _latency_run(
    options: ScaleOptions, system: str, key_count: int, directory: Path, progress: Progress
) -> dict[str, Any]:
    cluster: Cluster = make_cluster(system, 3, directory, etcd_binary=options.etcd_binary)
    started = time.monotonic()
    try:
        progress.note(f"latency {system}: bulk-loading {key_count} keys")
        if isinstance(cluster, KvsvrCluster):
            cluster.preload = (key_count, options.value_bytes, options.seed)
            cluster.start()
        else:
            cluster.start()
            run_phase(_load_spec(cluster.spec(system, "strong"), options, key_count, batch=128))
        load_s = time.monotonic() - started
        progress.note(f"latency {system} at {key_count} keys: {options.samples} gets and puts")
        gets, puts = trio.run(_measure_latency, cluster.spec(system, "strong"), key_count, options)
        counters = kvsvr_counters(cluster) if isinstance(cluster, KvsvrCluster) else {}
    finally:
        cluster.stop()
    get, put = gets.summary_ms(), puts.summary_ms()
    row = {"system": system, "keys": key_count, "load_s": load_s, "get": get, "put": put}
    if counters:
        row["coordinator"] = counters
    progress.write(
        f"  latency {system} {key_count:>8} keys: get p50 {get['p50_ms']:.2f} ms "
        f"p99 {get['p99_ms']:.2f} ms, put p50 {put['p50_ms']:.2f} ms p99 {put['p99_ms']:.2f} ms"
    )
    return row


async def _measure_latency(
    target: TargetSpec, key_count: int, options: ScaleOptions
) -> tuple[Histogram, Histogram]:
    rng = random.Random(options.seed)
    values = value_pool(options.value_bytes, options.seed + 1)
    gets, puts = Histogram(), Histogram()
    async with open_sessions(target, 1) as (session,):
        for _ in range(min(200, options.samples)):  # connections, caches, code paths warm
            await session.read(key_name(rng.randrange(key_count)))
        for _ in range(options.samples):
            key = key_name(rng.randrange(key_count))
            started = time.perf_counter()
            await session.read(key)
            gets.record_s(time.perf_counter() - started)
        sample = [key_name(rng.randrange(key_count)) for _ in range(options.samples)]
        for number, key in enumerate(sample):  # first pass: takes the promise, not timed
            await session.update(key, values[number % len(values)])
        for number, key in enumerate(sample):
            started = time.perf_counter()
            await session.update(key, values[(number + 1) % len(values)])
            puts.record_s(time.perf_counter() - started)
    return gets, puts


def kvsvr_counters(cluster: KvsvrCluster) -> dict[str, int]:
    """The nodes' coordinator counters, summed (writes, fast-path writes, ...)."""
    import kvsvr

    totals: dict[str, int] = {}
    with kvsvr.SyncClient(cluster.addresses, secret=cluster.secret, timeout_s=5) as client:
        for address in cluster.addresses:
            stats = client.status(address).get("coordinator", {})
            for name, value in stats.items():
                if isinstance(value, int):
                    totals[name] = totals.get(name, 0) + value
    return totals


def scale_notes(results: dict[str, Any], options: ScaleOptions) -> list[str]:
    env = results["environment"]
    notes = [
        f"Machine: {env['cpu_count']} cores shared by servers, {options.processes} load "
        f"processes and anything else running (load average at start "
        f"{', '.join(f'{v:.1f}' for v in env['load_average_at_start'])}).",
        f"CPU runs: {CPU_RUN_KEYS} keys loaded through the client, uniform keys, "
        f"{options.clients} clients, {options.time_s} s measured; CPU from /proc of the "
        "server processes only (the load generator's is listed apart).",
        f"Latency runs: 3 nodes, one client, {options.samples} gets of random keys and "
        f"{options.samples} puts (second write of a random sample); {options.value_bytes} B.",
        "etcd through its JSON gateway: its CPU includes JSON and the gateway's gRPC hop.",
    ]
    for system in options.systems:
        rows = sorted((r for r in results["latency"] if r["system"] == system),
                      key=lambda r: r["keys"])  # fmt: skip
        if len(rows) >= 2:
            first, last = rows[0], rows[-1]
            growth = ", ".join(
                f"{operation} p50 x{last[operation]['p50_ms'] / first[operation]['p50_ms']:.2f}"
                for operation in ("get", "put")
                if first[operation]["p50_ms"] > 0
            )
            factor = last["keys"] // first["keys"]
            notes.append(
                f"{system}: from {first['keys']} to {last['keys']} keys ({factor}x): {growth}."
            )
    return notes


def default_workloads() -> list[Workload]:
    from bench.workloads import WORKLOADS

    return [WORKLOADS["W"], WORKLOADS["C"]]
