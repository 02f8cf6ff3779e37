"""`python -m bench`: kvsvr against etcd.

    python -m bench compare --workloads A,B,C,W --targets kvsvr,etcd --time-s 30
    python -m bench compare --quick                 # a smoke run: seconds, 10,000 keys
    python -m bench scale                           # CPU per 1000 ops; latency vs keys

Results go to --out (default ./bench-results/): JSON, Markdown and PNG charts.
etcd must be installed (Debian: `apt-get install etcd-server`); bench starts and
stops its own clusters in a temporary directory. compare drives etcd with etcd's
own Go client (bench/etcdload), built on first use from Debian's packages
(`apt-get install golang-go golang-etcd-server-dev`); without them it falls back
to bench's Python HTTP driver and marks etcd's figures as a lower bound.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.workloads import DISTRIBUTIONS, WORKLOADS, parse_workloads

QUICK_KEYS = 10_000
QUICK_TIME_S = 5.0
QUICK_WARMUP_S = 1.0
QUICK_SWEEP_TIME_S = 4.0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, not {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, not {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError("fractions must be > 0")
    return values


def _distributions(text: str) -> list[str]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in DISTRIBUTIONS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"distributions are {', '.join(DISTRIBUTIONS)}")
    return names


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes",
        type=_positive_int,
        default=min(2, os.cpu_count() or 1),
        help="load generator processes (default: 2, or 1 on one core)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for JSON, Markdown and PNG results",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the clusters' temporary data goes (default: the system "
        "temp dir); use a real disk, not tmpfs, or fsync means nothing",
    )
    parser.add_argument("--etcd-binary", default="etcd", help="the etcd executable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=1)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="kvsvr against etcd on this machine."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser(
        "compare",
        help="throughput and latency of kvsvr and etcd, same run, each on its own client",
        description="Start the clusters, load the keys, run each workload on each target "
        "back to back (closed loop), then an open-loop sweep; print a table and write "
        "compare.json, compare.md, throughput.png and latency_vs_load.png to --out.",
    )
    compare.add_argument(
        "--workloads",
        default="A,B,C,W",
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default A,B,C,W)",
    )
    compare.add_argument(
        "--targets",
        default="kvsvr,etcd",
        help="comma-separated, of kvsvr, kvsvr-stale, kvsvr-eventual, etcd, "
        "etcd-serializable, etcd-http, single, lmdb (default kvsvr,etcd); etcd-http is "
        "etcd through bench's Python HTTP driver (a lower bound)",
    )
    compare.add_argument(
        "--time-s",
        type=_positive_float,
        default=30.0,
        help="measured seconds per target per workload (default 30)",
    )
    compare.add_argument(
        "--warmup-s",
        type=_non_negative_float,
        default=3.0,
        help="warm-up seconds before each measured window (default 3)",
    )
    compare.add_argument(
        "--clients",
        type=_positive_int,
        default=64,
        help="closed loop: concurrent clients (default 64)",
    )
    compare.add_argument(
        "--keys",
        type=_positive_int,
        default=100_000,
        help="keys loaded before the runs (default 100000)",
    )
    compare.add_argument(
        "--value-bytes",
        type=_int_list,
        default=[100],
        help="value sizes, comma-separated (default 100; e.g. 100,1024)",
    )
    compare.add_argument(
        "--distribution",
        type=_distributions,
        default=["zipfian"],
        help="key choice: zipfian (theta 0.99, YCSB's), uniform, or both "
        "comma-separated (default zipfian)",
    )
    compare.add_argument(
        "--sweep",
        default="W",
        help="workload of the open-loop latency-vs-load sweep, or 'none' (default W: "
        "the latency target is on W)",
    )
    compare.add_argument(
        "--sweep-fractions",
        type=_fractions,
        default=(0.25, 0.5, 0.75, 1.0),
        help="offered loads as fractions of etcd's closed-loop rate (default 0.25,0.5,0.75,1.0)",
    )
    compare.add_argument(
        "--sweep-time-s",
        type=_positive_float,
        default=None,
        help="measured seconds per sweep point (default: --time-s / 2)",
    )
    compare.add_argument(
        "--open-clients",
        type=_positive_int,
        default=256,
        help="open loop: most operations in flight (default 256)",
    )
    compare.add_argument(
        "--load",
        choices=("client", "bulk"),
        default="client",
        help="client: load through the clients, one put each (YCSB's load, "
        "default); bulk: kvsvr rows written into LMDB before start, etcd "
        "128-put transactions (fast; kvsvr's first write of a key then "
        "runs full Paxos)",
    )
    compare.add_argument(
        "--etcd-driver",
        choices=("go", "python"),
        default="go",
        help="go: etcd and etcd-serializable run on etcd's Go client (bench/etcdload, "
        "built on first use; default); python: on bench's Python HTTP driver (a lower bound)",
    )
    compare.add_argument(
        "--etcd-conns",
        type=_positive_int,
        default=8,
        help="gRPC connections of etcd's Go driver, spread over the members (default 8)",
    )
    compare.add_argument(
        "--kvsvr-processes",
        type=_positive_int,
        default=1,
        help="load processes driving kvsvr's client (default 1: one client for all "
        "clients batches best; more processes measured slower on 2 cores)",
    )
    compare.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_KEYS} keys, {QUICK_TIME_S:g} s per run, "
        f"{QUICK_WARMUP_S:g} s warm-up, short sweep",
    )
    compare.add_argument(
        "--profile",
        default="",
        metavar="WORKLOADS",
        help="after the comparison, run these workloads (e.g. W,C) once more on kvsvr "
        "with py-spy sampling every node, and report where the CPU goes",
    )
    compare.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the clusters' data directory (and logs) afterwards",
    )
    _common(compare)  # fmt: skip

    scale = commands.add_parser(
        "scale",
        help="CPU-seconds per 1000 ops at 3 and 5 nodes; latency at 10^4..10^6 keys",
        description="Write scale.json, scale.md, cpu_per_1000_ops.png and latency_vs_keys.png.",
    )
    scale.add_argument("--systems", default="kvsvr,etcd", help="kvsvr, etcd or both")
    scale.add_argument("--nodes", type=_int_list, default=[3, 5], help="cluster sizes")
    scale.add_argument(
        "--keys",
        type=_int_list,
        default=[10_000, 100_000, 1_000_000],
        help="key counts for the latency figures",
    )
    scale.add_argument("--workloads", default="W,C", help="workloads of the CPU runs")
    scale.add_argument("--time-s", type=_positive_float, default=10.0)
    scale.add_argument("--warmup-s", type=_non_negative_float, default=2.0)
    scale.add_argument("--clients", type=_positive_int, default=64)
    scale.add_argument(
        "--samples", type=_positive_int, default=2000, help="gets and puts timed per key count"
    )
    scale.add_argument("--value-bytes", type=_positive_int, default=100)
    scale.add_argument("--no-cpu", action="store_true", help="skip the CPU runs")
    scale.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    _common(scale)  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            return _compare(args)
        return _scale(args)
    except KeyboardInterrupt:
        print("\ninterrupted: clusters stopped, nothing written", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace) -> int:
    from bench.compare import CompareOptions, run_compare
    from bench.etcd import EtcdMissing
    from bench.report import compare_text, write_compare
    from bench.targets import parse_targets

    workloads = parse_workloads(args.workloads)
    if args.quick:
        args.keys = min(args.keys, QUICK_KEYS)
        args.time_s = min(args.time_s, QUICK_TIME_S)
        args.warmup_s = min(args.warmup_s, QUICK_WARMUP_S)
        args.sweep_time_s = min(args.sweep_time_s or QUICK_SWEEP_TIME_S, QUICK_SWEEP_TIME_S)
    sweep = None if args.sweep.lower() == "none" else parse_workloads(args.sweep)[0]
    options = CompareOptions(
        workloads=workloads,
        targets=parse_targets(args.targets),
        time_s=args.time_s,
        warmup_s=args.warmup_s,
        clients=max(args.clients, args.processes, args.kvsvr_processes or 1),
        processes=args.processes,
        key_count=args.keys,
        value_sizes=args.value_bytes,
        distributions=args.distribution,
        sweep_workload=sweep,
        sweep_fractions=args.sweep_fractions,
        sweep_time_s=args.sweep_time_s or max(1.0, args.time_s / 2),
        open_clients=max(args.open_clients, args.processes, args.kvsvr_processes or 1),
        out_dir=args.out,
        work_dir=args.work_dir,
        etcd_binary=args.etcd_binary,
        load_mode=args.load,
        progress=not args.no_progress,
        seed=args.seed,
        keep_data=args.keep_data,
        profile_workloads=parse_workloads(args.profile) if args.profile else [],
        etcd_driver=args.etcd_driver,
        etcd_connections=args.etcd_conns,
        kvsvr_processes=args.kvsvr_processes,
    )
    try:
        results = run_compare(options)
    except EtcdMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print()
    print(compare_text(results))
    for path in write_compare(results, args.out):
        print(f"wrote {path}")
    if results.get("work_dir"):
        print(f"cluster data and logs kept in {results['work_dir']}")
    return 0


def _scale(args: argparse.Namespace) -> int:
    from bench.etcd import EtcdMissing
    from bench.report import scale_text, write_scale
    from bench.scale import ScaleOptions, run_scale

    systems = [s.strip().lower() for s in args.systems.split(",") if s.strip()]
    if not systems or any(s not in ("kvsvr", "etcd") for s in systems):
        raise ValueError("--systems takes kvsvr, etcd or both")
    if "etcd" in systems:
        from bench.etcd import find_etcd

        try:
            find_etcd(args.etcd_binary)
        except EtcdMissing as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    options = ScaleOptions(
        systems=systems,
        node_counts=args.nodes,
        key_counts=args.keys,
        workloads=parse_workloads(args.workloads),
        time_s=args.time_s,
        warmup_s=args.warmup_s,
        clients=max(args.clients, args.processes),
        processes=args.processes,
        value_bytes=args.value_bytes,
        samples=args.samples,
        out_dir=args.out,
        work_dir=args.work_dir,
        etcd_binary=args.etcd_binary,
        progress=not args.no_progress,
        seed=args.seed,
        cpu=not args.no_cpu,
        latency=not args.no_latency,
    )
    results = run_scale(options)
    print()
    print(scale_text(results))
    for path in write_scale(results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
