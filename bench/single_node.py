"""Single-node benchmark: group commit against one fsync per put.

    python -m bench.single_node [--clients 64] [--processes 2] [--time-s 10 | --ops N]
                                [--value-bytes 100] [--no-ceiling] [--profile] [--out bench-results]

In one run, on the same disk:

(a) raw LMDB, one fsynced write transaction per put (`bench.lmdb_raw`): the
    floor every durable write pays without batching;
(b) a 1-node kvsvr cluster (replication 1, a real `python -m kvsvr node`
    process) with `--clients` concurrent clients (spread over `--processes`
    spawned worker processes, each with its own client) doing durable puts
    of `--value-bytes` bytes to keys they wrote before (each client owns
    `--keys-per-client` keys), then strong gets of the same keys;
(c) the ceiling: the same puts on a fresh 1-node cluster whose commits skip
    fsync (`unsafe_no_fsync`, never for real data). No group commit can beat
    a disk that costs nothing, so c/a is the highest ratio (b) could reach on
    this machine: when c/a is under the target, the node's CPU per put, not
    the batching, is what misses it. `--no-ceiling` skips it.

Reports ops/s, p50/p99 latency, the put ratio b/a (target >= 4), the node's
peak RSS (target < 150 MB), its CPU seconds per 1000 ops (where the cost
is), its group-commit batching (ops per LMDB transaction) and the machine's
CPU use during each window. `--profile` runs py-spy on the node during both
measured windows and prints the top functions. A JSON result goes to `--out`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.lmdb_raw import raw_lmdb_put_rate
from bench.output import (
    add_load_options,
    check_scratch,
    environment,
    name_run,
    phase_amount,
    print_batching,
    print_cprofiles,
    print_phases,
    print_profiles,
    print_setup,
    target,
    terminate_on_sigterm,
    write_result,
)
from bench.phases import check_fsync_setting, run_cluster_phases

# The targets these figures are judged against.
PUT_RATIO_TARGET = 4.0
NODE_RSS_TARGET_MB = 150.0
# Raw LMDB puts when no count is given: enough for --time-s seconds at the
# rate a short probe measured, within these bounds.
LMDB_PROBE_PUTS = 300
LMDB_PUTS_MIN = 500
LMDB_PUTS_MAX = 200_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.single_node", description=__doc__.split("\n\n")[0]
    )
    add_load_options(parser)
    parser.add_argument(
        "--lmdb-puts",
        type=int,
        default=0,
        help="raw LMDB puts (default: as many as fit in --time-s, or --ops)",
    )
    parser.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip (c), the puts on a node that does not fsync",
    )
    return parser


def measure_raw_lmdb(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    duration_s, ops = phase_amount(args)
    count = args.lmdb_puts or ops
    with tempfile.TemporaryDirectory(prefix="lmdb-raw-", dir=scratch) as directory:
        if not count:
            probe = raw_lmdb_put_rate(Path(directory) / "probe", LMDB_PROBE_PUTS, args.value_bytes)
            assert duration_s is not None
            count = int(min(LMDB_PUTS_MAX, max(LMDB_PUTS_MIN, probe["ops_per_s"] * duration_s)))
        return raw_lmdb_put_rate(Path(directory) / "main", count, args.value_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name_run(args, "single_node")
    args.scratch.mkdir(parents=True, exist_ok=True)
    warning = check_scratch(args.scratch)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    with terminate_on_sigterm():
        raw = measure_raw_lmdb(args, args.scratch)
        node = run_cluster_phases(args, 1, 1, ["put", "get"], "single")
        check_fsync_setting(node, fsync=True)
        ceiling = None
        if not args.no_ceiling:
            ceiling = run_cluster_phases(
                args, 1, 1, ["put"], "ceiling", settings={"unsafe_no_fsync": True}
            )
            check_fsync_setting(ceiling, fsync=False)
    put = node["phases"]["put"]
    ratio = put["ops_per_s"] / raw["ops_per_s"] if raw["ops_per_s"] else math.nan
    rss_mb = max(*node["rss_peak_sampled_mb"].values(), *node["rss_hwm_mb"].values())
    targets = {
        "put_ratio_node_over_raw": target(ratio, ">=", PUT_RATIO_TARGET),
        "node_rss_mb": target(rss_mb, "<", NODE_RSS_TARGET_MB),
    }
    result = {
        "benchmark": "single_node",
        "args": vars(args),
        "environment": environment(),
        "raw_lmdb": raw,
        "node": node,
        "ceiling_no_fsync": ceiling,
        "ceiling_ratio_over_raw": ceiling_ratio(ceiling, raw),
        "targets": targets,
    }
    print_report(args, raw, node, targets, ceiling)
    path = write_result(args, result)
    print(f"\nresult: {path}")
    return 0


def ceiling_ratio(ceiling: dict[str, Any] | None, raw: dict[str, Any]) -> float | None:
    if ceiling is None:
        return None
    rate = float(ceiling["phases"]["put"]["ops_per_s"])
    return rate / raw["ops_per_s"] if raw["ops_per_s"] else math.nan


def print_report(
    args: argparse.Namespace,
    raw: dict[str, Any],
    node: dict[str, Any],
    targets: dict[str, dict[str, Any]],
    ceiling: dict[str, Any] | None = None,
) -> None:
    print_setup("kvsvr single node (replication 1)", args, node)
    raw_row: list[object] = [
        "raw LMDB put, 1 fsync/put",
        raw["ops"],
        raw["ops_per_s"],
        raw["p50_ms"],
        raw["p99_ms"],
    ]
    phases = dict(node["phases"])
    if ceiling is not None:
        phases["put-no-fsync"] = ceiling["phases"]["put"]
    names = {
        "put": "put (durable)",
        "get": "get (strong)",
        "put-no-fsync": "(c) put, no fsync (UNSAFE)",
    }
    print_phases(phases, names, [raw_row])
    print_batching(phases)
    print()
    ratio = targets["put_ratio_node_over_raw"]
    print(
        f"durable puts: node {node['phases']['put']['ops_per_s']:,.0f}/s vs raw LMDB "
        f"{raw['ops_per_s']:,.0f}/s = {ratio['value']:.2f}x "
        f"(target {ratio['rule']}): {ratio['verdict']}"
    )
    bound = ceiling_ratio(ceiling, raw)
    if ceiling is not None and bound is not None:
        rate = ceiling["phases"]["put"]["ops_per_s"]
        print(
            f"ceiling (c): node puts with fsync off {rate:,.0f}/s = {bound:.2f}x raw LMDB: "
            "no group commit can do better on this machine"
            + (
                f"; under {PUT_RATIO_TARGET:g}x, so the node's CPU per put, not the "
                "batching, is what misses the target"
                if bound < PUT_RATIO_TARGET
                else ""
            )
        )
    rss = targets["node_rss_mb"]
    start_mb = next(iter(node["rss_at_start_mb"].values()))
    print(
        f"node RSS peak {rss['value']:.1f} MB (at start {start_mb:.1f} MB; target "
        f"{rss['rule']}): {rss['verdict']}"
    )
    print_profiles(node["phases"], "single node")
    print_cprofiles(node, "single node")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:
        # Everything started was stopped on the way out (`with` blocks).
        print(
            f"\ninterrupted ({interrupt or 'Ctrl-C'}); nodes and workers stopped", file=sys.stderr
        )
        sys.exit(130)
