"""What the node's row cache and read leases buy: YCSB B (95% read, zipfian)
on 3 nodes, 1 KiB values.

    .venv/bin/python -m bench.cache                     # 10 s per phase
    .venv/bin/python -m bench.cache --time-s 30 --clients 64 --rounds 3

Three 3-node clusters, started side by side and loaded with the same keys:
the default one (row cache of 64 MiB, read leases on), the same with read
leases off, and one with neither (`cache_bytes_max` 0). Four closed-loop
phases, one after the other, all with the same driver (`bench.driver`, the
same one `bench compare` uses):

  strong, leases       strong reads: the read that takes a key's lease runs
                       a quorum round; the reads after it, while the lease
                       lasts, are answered from the coordinator's cache
                       with no message
  strong, cache on     without leases: a quorum answers versions; the
                       coordinator's cache supplies the value when it holds
                       the chosen version, so replicas send no value
  strong, cache off    the same reads and writes without the cache
  stale, cache on      stale reads: the coordinator's cache or its replica
                       answers alone, no quorum round (never below the
                       client's session version)

It prints ops/s, p50 and p99 (ms), the servers' CPU per 1000 operations and
each node's cache and lease figures, then the target ratios: strong reads
with leases / without (target >= 2x), the servers' CPU per leased strong
read over a stale read's (target <= 1.3x), strong cache on / off (target >=
1.3x) and stale / strong without cache (target >= 3x), and the ratios of
server CPU per operation (what the ratios would be if the load generator
did not share the machine's cores with the nodes).

`--workload C` runs the same phases with reads only: the read paths alone,
without the 5% of writes that cost B's servers most of their CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.driver import RunSpec, run_phase
from bench.targets import KvsvrCluster, cpu_probe
from bench.workloads import WORKLOADS
from kvsvr.config import TableConfig

# The targets for the two ratios.
LEASES_ON_OVER_OFF_TARGET: Final = 2.0
LEASED_CPU_OVER_STALE_TARGET: Final = 1.3
CACHE_ON_OVER_OFF_TARGET: Final = 1.3
STALE_OVER_STRONG_TARGET: Final = 3.0
CACHE_BYTES_ON: Final = 64 << 20


@dataclasses.dataclass
class CachedKvsvrCluster(KvsvrCluster):
    """`bench.targets.KvsvrCluster` with only the `default` table and the node
    config's cache budget chosen by the caller; started and stopped the same way."""

    cache_bytes_max: int = CACHE_BYTES_ON
    read_leases: bool = True
    tables: tuple[TableConfig, ...] = (TableConfig("default"),)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "cache_bytes_max": self.cache_bytes_max,
            "read_leases": self.read_leases,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    time_s: float = 10.0
    warmup_s: float = 2.0
    clients: int = 64
    processes: int = 2
    keys: int = 10_000
    value_bytes: int = 1024
    distribution: str = "zipfian"
    seed: int = 1
    workload: str = "B"  # YCSB B's 95% read mix; "C" reads only
    # Each round runs the three phases once, in a rotated order; the ratios
    # come from the medians, so one phase hit by a noisy neighbour sways less.
    rounds: int = 1


def node_statuses(cluster: KvsvrCluster) -> list[dict[str, Any]]:
    import kvsvr

    with kvsvr.SyncClient(cluster.addresses, secret=cluster.secret, timeout_s=10) as client:
        return [client.status(address) for address in cluster.addresses]


def cache_totals(statuses: list[dict[str, Any]]) -> dict[str, int]:
    names = ("hits", "misses", "evictions", "stale_served", "fallbacks")
    totals = {name: sum(int(s["cache"].get(name, 0)) for s in statuses) for name in names}
    for name in ("taken", "local_reads", "write_waits"):
        totals[f"leases_{name}"] = sum(int(s["read_leases"][name]) for s in statuses)
    return totals


def measure(
    cluster: KvsvrCluster, label: str, consistency: str, options: Options
) -> dict[str, Any]:
    spec = RunSpec(
        target=cluster.spec(label, consistency),
        mode="closed",
        workload=WORKLOADS[options.workload],
        distribution=options.distribution,
        key_count=options.keys,
        value_bytes=options.value_bytes,
        clients=options.clients,
        warmup_s=options.warmup_s,
        duration_s=options.time_s,
        processes=options.processes,
        seed=options.seed,
    )
    before = cache_totals(node_statuses(cluster))
    result = run_phase(spec, probe=lambda: cpu_probe(cluster.pids))
    after = cache_totals(node_statuses(cluster))
    latency = result.latency["all"].summary_ms() if "all" in result.latency else {}
    server_cpu_s = result.probe_end.get("servers_cpu_s", 0.0) - result.probe_start.get(
        "servers_cpu_s", 0.0
    )
    busy = result.probe_end.get("machine_busy_s", 0.0) - result.probe_start.get(
        "machine_busy_s", 0.0
    )
    window_ops = result.ok + result.error_count
    return {
        "label": label,
        "read_consistency": consistency,
        "ops_per_s": result.ops_per_s,
        "ok": result.ok,
        "errors": result.errors,
        "latency_ms": latency,
        "read_latency_ms": result.latency["read"].summary_ms() if "read" in result.latency else {},
        "servers_cpu_s_per_1000_ops": 1000 * server_cpu_s / window_ops if window_ops else 0.0,
        "driver_cpu_s": result.driver_cpu_s,
        "machine_busy_cores": busy / result.duration_s if result.duration_s else 0.0,
        "cache": {name: after[name] - before[name] for name in after},
    }


STRONG_LEASES: Final = "strong, leases"
STRONG_ON: Final = "strong, cache on"
STRONG_OFF: Final = "strong, cache off"
STALE_ON: Final = "stale, cache on"


def ratios(phases: list[dict[str, Any]]) -> dict[str, float]:
    """The two target ratios, from each phase's median ops/s over its runs;
    and the same two of the servers' CPU per operation (cheaper = higher)."""

    def median(label: str, figure: str) -> float:
        return float(statistics.median(p[figure] for p in phases if p["label"] == label))

    off = median(STRONG_OFF, "ops_per_s")
    cpu_off = median(STRONG_OFF, "servers_cpu_s_per_1000_ops")
    cpu_on = median(STRONG_ON, "servers_cpu_s_per_1000_ops")
    cpu_stale = median(STALE_ON, "servers_cpu_s_per_1000_ops")
    unleased = median(STRONG_ON, "ops_per_s")
    cpu_leased = median(STRONG_LEASES, "servers_cpu_s_per_1000_ops")
    return {
        "strong_leases_on_over_off": median(STRONG_LEASES, "ops_per_s") / unleased
        if unleased
        else 0.0,
        "cpu_leased_over_stale": cpu_leased / cpu_stale if cpu_stale else 0.0,
        "strong_cache_on_over_off": median(STRONG_ON, "ops_per_s") / off if off else 0.0,
        "stale_over_strong_cache_off": median(STALE_ON, "ops_per_s") / off if off else 0.0,
        "cpu_strong_cache_on_over_off": cpu_off / cpu_on if cpu_on else 0.0,
        "cpu_stale_over_strong_cache_off": cpu_off / cpu_stale if cpu_stale else 0.0,
    }


def run(options: Options, work_dir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvsvr-bench-cache-", dir=work_dir) as directory:
        # Both loaded the same way before they start (rows written straight
        # into every replica's LMDB): the reads, not the load, are measured.
        preload = (options.keys, options.value_bytes, options.seed)
        leases = CachedKvsvrCluster(3, Path(directory) / "leases", preload=preload)
        on = CachedKvsvrCluster(3, Path(directory) / "cache-on", preload=preload, read_leases=False)
        off = CachedKvsvrCluster(
            3, Path(directory) / "cache-off", preload=preload, cache_bytes_max=0, read_leases=False
        )
        try:
            leases.start()
            on.start()
            off.start()
            plan = [
                (leases, STRONG_LEASES, "strong"),
                (on, STRONG_ON, "strong"),
                (off, STRONG_OFF, "strong"),
                (on, STALE_ON, "stale"),
            ]
            phases = []
            for round_ in range(options.rounds):
                turn = round_ % len(plan)
                for cluster, label, consistency in plan[turn:] + plan[:turn]:
                    phase = measure(cluster, label, consistency, options)
                    phases.append({**phase, "round": round_})
            statuses = {
                "leases": node_statuses(leases),
                "cache on": node_statuses(on),
                "cache off": node_statuses(off),
            }
        finally:
            leases.stop()
            on.stop()
            off.stop()
    return {
        "options": dataclasses.asdict(options),
        "load": "bulk (rows written into every replica's LMDB before the nodes start)",
        "phases": phases,
        "ratios": ratios(phases),
        "ratios_per_round": [
            ratios([p for p in phases if p["round"] == round_]) for round_ in range(options.rounds)
        ],
        "node_cache": {
            name: [{"node": s["node"], **s["cache"]} for s in cluster_statuses]
            for name, cluster_statuses in statuses.items()
        },
    }


def report(results: dict[str, Any]) -> list[str]:
    options = results["options"]
    workload = WORKLOADS[options.get("workload", "B")]
    lines = [
        f"YCSB {workload.name} ({workload.description.split(': ')[-1]}), "
        f"{options['distribution']}, {options['keys']} keys of "
        f"{options['value_bytes']} B, 3 nodes, {options['clients']} clients in "
        f"{options['processes']} processes, {options['time_s']:g} s per phase, "
        f"{options.get('rounds', 1)} round(s)",
        f"{'phase':<22}{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'srv CPU-s/1k':>14}"
        f"{'hits':>8}{'misses':>8}{'stale':>8}{'fallback':>9}{'leased':>8}{'busy cores':>11}",
    ]
    for phase in results["phases"]:
        latency = phase["latency_ms"]
        cache = phase["cache"]
        name = (
            phase["label"]
            if options.get("rounds", 1) == 1
            else (f"{phase['label']} #{phase['round'] + 1}")
        )
        lines.append(
            f"{name:<22}{phase['ops_per_s']:>9.0f}{latency.get('p50_ms', 0):>9.2f}"
            f"{latency.get('p99_ms', 0):>9.2f}{phase['servers_cpu_s_per_1000_ops']:>14.3f}"
            f"{cache['hits']:>8}{cache['misses']:>8}{cache['stale_served']:>8}"
            f"{cache['fallbacks']:>9}{cache.get('leases_local_reads', 0):>8}"
            f"{phase['machine_busy_cores']:>11.2f}"
        )
    on_off = results["ratios"]["strong_cache_on_over_off"]
    stale = results["ratios"]["stale_over_strong_cache_off"]
    per_round = results.get("ratios_per_round", [])
    if len(per_round) > 1:
        lines.append(
            "per round, on / off and stale / off: "
            + ", ".join(
                f"{r['strong_cache_on_over_off']:.2f}x {r['stale_over_strong_cache_off']:.2f}x"
                for r in per_round
            )
        )
    leased = results["ratios"]["strong_leases_on_over_off"]
    leased_cpu = results["ratios"]["cpu_leased_over_stale"]
    lines += [
        f"strong reads, leases on / off (cache on): {leased:.2f}x "
        f"(target >= {LEASES_ON_OVER_OFF_TARGET}x: {_met(leased, LEASES_ON_OVER_OFF_TARGET)})",
        f"servers' CPU per leased strong read / per stale read: {leased_cpu:.2f}x (target <= "
        f"{LEASED_CPU_OVER_STALE_TARGET}x: "
        f"{_met(LEASED_CPU_OVER_STALE_TARGET, leased_cpu)})",
        f"strong reads, cache on / off: {on_off:.2f}x "
        f"(target >= {CACHE_ON_OVER_OFF_TARGET}x: {_met(on_off, CACHE_ON_OVER_OFF_TARGET)})",
        f"stale (cache on) / strong (cache off): {stale:.2f}x "
        f"(target >= {STALE_OVER_STRONG_TARGET}x: {_met(stale, STALE_OVER_STRONG_TARGET)})",
        "servers' CPU per operation, strong cache off over each (not the targets' measure: "
        "throughput with the load generator on the same cores is): "
        f"strong cache on {results['ratios']['cpu_strong_cache_on_over_off']:.2f}x, "
        f"stale {results['ratios']['cpu_stale_over_strong_cache_off']:.2f}x",
    ]
    for name, nodes in results["node_cache"].items():
        figures = ", ".join(
            f"{n['node']} {n['bytes_used'] / (1 << 20):.1f}/{n['bytes_max'] / (1 << 20):.0f} MiB "
            f"hit {100 * n['hit_ratio']:.0f}%"
            for n in nodes
        )
        lines.append(f"{name}: {figures}")
    return lines


def _met(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Options()
    parser.add_argument("--time-s", type=float, default=defaults.time_s)
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument("--keys", type=int, default=defaults.keys)
    parser.add_argument("--value-bytes", type=int, default=defaults.value_bytes)
    parser.add_argument(
        "--distribution", choices=("zipfian", "uniform"), default=defaults.distribution
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--workload",
        choices=("B", "C"),
        default=defaults.workload,
        help="B: YCSB B, 95%% read / 5%% update (default); C: reads only",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="run the three phases this many times, rotating their order; "
        "ratios from the medians (default 1)",
    )
    parser.add_argument("--work-dir", type=Path, help="node data goes here (a real disk)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    options = Options(
        time_s=args.time_s,
        warmup_s=args.warmup_s,
        clients=args.clients,
        processes=args.processes,
        keys=args.keys,
        value_bytes=args.value_bytes,
        distribution=args.distribution,
        seed=args.seed,
        workload=args.workload,
        rounds=max(1, args.rounds),
    )
    results = run(options, args.work_dir)
    for line in report(results):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
