"""Three-node benchmark: strong operations with replication 3.

    python -m bench.cluster [--clients 64] [--processes 2] [--time-s 10 | --ops N]
                            [--value-bytes 100] [--profile] [--out bench-results]

In one run, on the same disk and with the same load generator:

(a) a 1-node cluster (replication 1): durable puts, the single-node rate
    (as `bench.single_node` measures it) that the cluster is compared with;
(b) a 3-node cluster (replication 3, one process per node, all on this
    machine): strong puts, strong gets, then compare-and-set, each client on
    its own keys (`--keys-per-client`, written once before) and cas-ing with
    the version it last saw, so conflicts are rare. Clients route every key to
    its partition's preferred coordinator, as `kvsvr.connect` does.

(c) on the same 3-node cluster, paced puts and paced compare-and-sets: the
    64 clients offer together `--paced-fraction` (default 0.4, the target
    ratio) of the 1-node put rate of (a), on a fixed schedule, and latency
    is measured from each operation's scheduled start. This is p99 "at that
    load" read as "at the rate the throughput target asks for"; the closed
    loop of (b) is the other reading, the clients' own saturation, where
    latency is the queue that 64 clients make (Little's law: 64 / rate).

Reports ops/s and p50/p99 latency of each, the ratio of cluster puts to
single-node puts (target >= 40%), p99 (target < 25 ms, both readings), the fast-path
fraction (sum over nodes of `fast_path_writes / writes` from `status`, target
>= 95%), CPU seconds per 1000 ops of each node, batching per node, and peak
RSS per node. `--profile` runs py-spy on every node during the measured
windows. A JSON result goes to `--out`.

`--tls` then runs (b) again on a fresh 3-node cluster whose every link (client
and peer) runs TLS, with a local CA made for the run, and reports each
operation's TLS throughput and latency beside the plain run's: the cost of
TLS, measured in one run on one machine.

`--paced-rate N` paces (c) at N ops/s instead (to compare two builds or
settings at one load). `--no-read-leases` runs the nodes with read leases
off. `--unsafe-no-fsync` runs every node with commits that
skip fsync: a ceiling that shows how much of a figure the disk costs, printed
as such and never a result.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from bench.output import (
    add_load_options,
    check_scratch,
    environment,
    name_run,
    print_batching,
    print_cprofiles,
    print_phases,
    print_profiles,
    print_setup,
    print_table,
    target,
    terminate_on_sigterm,
    write_result,
)
from bench.phases import check_fsync_setting, run_cluster_phases

# The targets these figures are judged against.
PUT_RATIO_TARGET = 0.40
P99_TARGET_MS = 25.0
FAST_PATH_TARGET = 0.95
NAMES = {"put": "put (strong)", "get": "get (strong)", "cas": "cas (strong)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster", description=__doc__.split("\n\n")[0]
    )
    add_load_options(parser)
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the 1-node put baseline (and the ratio and paced phases that need it)",
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=PUT_RATIO_TARGET,
        help=(
            "paced put and cas phases at this fraction of the 1-node put rate "
            f"(default {PUT_RATIO_TARGET}, the target ratio); 0 skips them"
        ),
    )
    parser.add_argument(
        "--unsafe-no-fsync",
        action="store_true",
        help=(
            "run every node with unsafe_no_fsync (commits skip fsync): a ceiling "
            "that shows what the disk costs, never a result to quote as kvsvr's"
        ),
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run the closed-loop phases on a TLS cluster and report TLS's cost",
    )
    parser.add_argument(
        "--no-watch-log",
        action="store_true",
        help=(
            "run every node with watch_history_bytes_max = 0 (no change log, no "
            "watches): the write path's cost of the log, side by side with a run without it"
        ),
    )
    parser.add_argument(
        "--no-read-leases",
        dest="read_leases",
        action="store_false",
        help="run every node with read leases off (to measure what they cost writes)",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=None,
        metavar="OPS_PER_S",
        help=(
            "paced put and cas phases at this fixed offered rate instead of a "
            "fraction of the baseline (for comparing two builds or settings at "
            "one load; runs without the baseline too)"
        ),
    )
    return parser


def fast_path_fraction(phase: dict[str, Any]) -> float:
    """Writes that took the fast path, over all writes any node coordinated,
    over the whole phase (warm-up included: counters read at the window's
    edges would count operations in flight there on one side only)."""
    counters = phase["coordinator_whole_phase"].values()
    writes = sum(each["writes"] for each in counters)
    fast = sum(each["fast_path_writes"] for each in counters)
    return fast / writes if writes else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.paced_fraction <= 10:
        parser.error(f"--paced-fraction must be 0 to 10, not {args.paced_fraction}")
    if args.paced_rate is not None and not 0 < args.paced_rate <= 1_000_000:
        parser.error(f"--paced-rate must be above 0 and at most 1,000,000, not {args.paced_rate}")
    name_run(args, "cluster")
    args.scratch.mkdir(parents=True, exist_ok=True)
    warning = check_scratch(args.scratch)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    settings: dict[str, Any] = {"unsafe_no_fsync": True} if args.unsafe_no_fsync else {}
    if args.no_watch_log:
        settings["watch_history_bytes_max"] = 0
    if not args.read_leases:
        settings["read_leases"] = False
    with terminate_on_sigterm():
        baseline = None
        if not args.no_baseline:
            baseline = run_cluster_phases(args, 1, 1, ["put"], "baseline", settings=settings)
            check_fsync_setting(baseline, fsync=not args.unsafe_no_fsync)
        rate = args.paced_rate
        if rate is None:
            rate = args.paced_fraction * baseline["phases"]["put"]["ops_per_s"] if baseline else 0.0
        paced = [("put", rate), ("cas", rate)] if rate > 0 else []
        cluster = run_cluster_phases(
            args, 3, 3, ["put", "get", "cas"], "cluster", paced=paced, settings=settings
        )
        check_fsync_setting(cluster, fsync=not args.unsafe_no_fsync)
        cluster_tls = None
        if args.tls:
            cluster_tls = run_cluster_phases(
                args, 3, 3, ["put", "get", "cas"], "cluster-tls", settings=settings, tls=True
            )
    phases = cluster["phases"]
    single_put_rate = baseline["phases"]["put"]["ops_per_s"] if baseline else math.nan
    targets = {
        "put_ratio_cluster_over_single": target(
            phases["put"]["ops_per_s"] / single_put_rate, ">=", PUT_RATIO_TARGET
        ),
        **{
            f"{operation}_p99_ms": target(phases[operation]["p99_ms"], "<", P99_TARGET_MS)
            for operation in ("put", "get", "cas")
        },
        **{
            f"{operation}_p99_ms_paced": target(
                phases[f"{operation}-paced"]["p99_ms"], "<", P99_TARGET_MS
            )
            for operation in ("put", "cas")
            if f"{operation}-paced" in phases
        },
        "put_fast_path_fraction": target(fast_path_fraction(phases["put"]), ">=", FAST_PATH_TARGET),
        "cas_fast_path_fraction": target(fast_path_fraction(phases["cas"]), ">=", FAST_PATH_TARGET),
    }
    result = {
        "benchmark": "cluster",
        "args": vars(args),
        "environment": environment(),
        "single_node_baseline": baseline,
        "cluster": cluster,
        "targets": targets,
    }
    if cluster_tls is not None:
        result["cluster_tls"] = cluster_tls
        result["tls_cost"] = tls_cost(cluster, cluster_tls)
    print_report(args, baseline, cluster, targets)
    if cluster_tls is not None:
        print_tls_cost(cluster_tls, result["tls_cost"])
    path = write_result(args, result)
    print(f"\nresult: {path}")
    return 0


def tls_cost(plain: dict[str, Any], tls: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per operation: TLS ops/s over plain ops/s, and both runs' p50 and p99."""
    cost = {}
    for operation in ("put", "get", "cas"):
        a, b = plain["phases"][operation], tls["phases"][operation]
        cost[operation] = {
            "plain_ops_per_s": a["ops_per_s"],
            "tls_ops_per_s": b["ops_per_s"],
            "throughput_ratio_tls_over_plain": b["ops_per_s"] / a["ops_per_s"]
            if a["ops_per_s"]
            else math.nan,
            "plain_p50_ms": a["p50_ms"],
            "tls_p50_ms": b["p50_ms"],
            "plain_p99_ms": a["p99_ms"],
            "tls_p99_ms": b["p99_ms"],
            # CPU per operation holds better than throughput on a shared machine.
            "plain_node_cpu_s_per_1k_ops": _cpu_per_1k_ops(a),
            "tls_node_cpu_s_per_1k_ops": _cpu_per_1k_ops(b),
        }
    return cost


def _cpu_per_1k_ops(phase: dict[str, Any]) -> float:
    return sum(phase["node_cpu_s"].values()) / phase["ops"] * 1000 if phase["ops"] else math.nan


def print_tls_cost(cluster_tls: dict[str, Any], cost: dict[str, dict[str, float]]) -> None:
    print_phases(cluster_tls["phases"], {op: f"{name}, TLS" for op, name in NAMES.items()}, [])
    rows = [
        [
            operation,
            figures["plain_ops_per_s"],
            figures["tls_ops_per_s"],
            figures["throughput_ratio_tls_over_plain"],
            figures["plain_p99_ms"],
            figures["tls_p99_ms"],
            figures["plain_node_cpu_s_per_1k_ops"],
            figures["tls_node_cpu_s_per_1k_ops"],
        ]
        for operation, figures in cost.items()
    ]
    print_table(
        "TLS cost (same run, same machine)",
        [
            "op",
            "plain ops/s",
            "TLS ops/s",
            "TLS / plain",
            "plain p99 ms",
            "TLS p99 ms",
            "plain node cpu s/1k ops",
            "TLS node cpu s/1k ops",
        ],
        rows,
    )


def print_report(
    args: argparse.Namespace,
    baseline: dict[str, Any] | None,
    cluster: dict[str, Any],
    targets: dict[str, dict[str, Any]],
) -> None:
    print_setup("kvsvr 3-node cluster (replication 3, one machine)", args, cluster)
    if args.unsafe_no_fsync:
        print(
            "UNSAFE: every node ran with unsafe_no_fsync (commits skip fsync); these "
            "figures are a ceiling that shows what the disk costs, not kvsvr's results"
        )
    extra: list[list[object]] = []
    if baseline is not None:
        put = baseline["phases"]["put"]
        extra.append(
            [
                "1-node put (no fsync)" if args.unsafe_no_fsync else "1-node put (durable)",
                put["ops"],
                put["ops_per_s"],
                put["p50_ms"],
                put["p99_ms"],
                sum(put["node_cpu_s"].values()) / put["ops"] * 1000 if put["ops"] else math.nan,
                sum(put["node_cpu_cores"].values()),
                sum(put["node_system_cpu_fraction"].values()) * 100,
                put["load_cpu_cores"],
                put["other_cpu_cores"],
                sum(put["errors"].values()),
            ]
        )
    names = dict(NAMES)
    for operation in ("put", "cas"):
        phase = cluster["phases"].get(f"{operation}-paced")
        if phase is not None:
            names[f"{operation}-paced"] = f"{operation}, offered {phase['offered_per_s']:.0f}/s"
    print_phases(cluster["phases"], names, extra)
    print_batching(cluster["phases"])
    rows = [
        [
            node,
            cluster["rss_at_start_mb"][node],
            max(cluster["rss_peak_sampled_mb"][node], cluster["rss_hwm_mb"][node]),
        ]
        for node in cluster["rss_hwm_mb"]
    ]
    print_table("node memory", ["node", "RSS at start MB", "RSS peak MB"], rows)
    print("\ntargets")
    labels = {
        "put_ratio_cluster_over_single": "strong puts / 1-node puts",
        "put_p99_ms": "put p99 ms (closed loop, 64 clients)",
        "get_p99_ms": "get p99 ms (closed loop, 64 clients)",
        "cas_p99_ms": "cas p99 ms (closed loop, 64 clients)",
        **{
            f"{operation}_p99_ms_paced": f"{names[f'{operation}-paced']}: p99 ms"
            for operation in ("put", "cas")
            if f"{operation}-paced" in names
        },
        "put_fast_path_fraction": "fast-path fraction of puts",
        "cas_fast_path_fraction": "fast-path fraction of cas",
    }
    for name, label in labels.items():
        if name not in targets:
            continue
        figure = targets[name]
        print(f"  {label}: {figure['value']:.3f} (target {figure['rule']}): {figure['verdict']}")
    # One node's put profile in print (the nodes look alike); all in the JSON.
    print_profiles(cluster["phases"], "cluster", operations=["put"], nodes=["n1"])
    print_cprofiles(cluster, "cluster")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:
        # Everything started was stopped on the way out (`with` blocks).
        print(
            f"\ninterrupted ({interrupt or 'Ctrl-C'}); nodes and workers stopped", file=sys.stderr
        )
        sys.exit(130)
