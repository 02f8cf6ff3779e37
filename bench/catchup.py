"""Catching up under load: client throughput while a restarted replica catches
up, and how big the hints of an outage get.

    python -m bench.catchup [--clients 64] [--time-s 10] [--outage-s 30]
                            [--keys-per-client 1000] [--value-bytes 100]

One 3-node cluster, strong puts from `--clients` clients over
clients x keys-per-client keys (300 each by default; populated first), in four windows:

1. baseline: every node up (`--time-s`);
2. outage: n3 SIGKILLed, the load goes on for `--outage-s` (its writes
   become hints on n1 and n2);
3. catch-up: n3 restarted on its data, the load goes on for `--time-s`
   while n1 and n2 replay their hints and anti-entropy runs;
4. the hints drained and how long that took.

Reports ops/s and p50/p99 of each window, the catch-up/baseline throughput
ratio (target >= 0.70), the hints kept per second of outage and bytes per
hint, and what a 10-minute outage at the measured write rate needs in the
worst case (every write to a distinct key: no two hints merge) against the
configured bound (`hint_bytes_max`, `hints_max`). A JSON result goes to `--out`.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from typing import Any

import kvsvr
from bench.load import LoadGenerator, load_generator
from bench.output import (
    add_load_options,
    environment,
    name_run,
    print_table,
    target,
    terminate_on_sigterm,
    write_result,
)
from bench.phases import bench_cluster, percentile
from kvsvr.config import ClusterConfig

RATIO_TARGET = 0.70
OUTAGE_PROJECTED_S = 600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.catchup", description=__doc__.split("\n\n")[0]
    )
    add_load_options(parser)
    parser.set_defaults(keys_per_client=300)
    parser.add_argument("--outage-s", type=float, default=30.0, help="seconds n3 is down (30)")
    parser.add_argument(
        "--replay-rows-per-s",
        type=int,
        default=None,
        help="the nodes' hint_replay_rows_per_s (default: the config default)",
    )
    return parser


def _window(load: LoadGenerator, warmup_s: float, duration_s: float) -> dict[str, Any]:
    spec = load.start_phase("put", warmup_s=warmup_s, duration_s=duration_s, ops=None)
    results = load.finish_phase(spec)
    latencies = sorted(ms for r in results for ms in r.latencies_ms)
    ops = sum(r.ops for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for name, count in r.errors.items():
            errors[name] = errors.get(name, 0) + count
    return {
        "ops": ops,
        "ops_per_s": ops / duration_s,
        "p50_ms": percentile(latencies, 0.50) if latencies else math.nan,
        "p99_ms": percentile(latencies, 0.99) if latencies else math.nan,
        "errors": errors,
    }


def _hints_for(client: kvsvr.SyncClient, holders: list[str], target: str) -> tuple[int, int]:
    count = size = 0
    for node_id in holders:
        hints = client.status(node_id)["replication"]["hints"][target]
        count += hints["pending"]
        size += hints["bytes"]
    return count, size


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name_run(args, "catchup")
    duration_s = args.time_s if args.time_s is not None else 10.0
    defaults = ClusterConfig(nodes=(), tables=())
    windows: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    if args.replay_rows_per_s is not None:
        settings["hint_replay_rows_per_s"] = args.replay_rows_per_s
    with (
        terminate_on_sigterm(),
        bench_cluster(
            3, 3, scratch_root=args.scratch, keep=args.keep, settings=settings
        ) as cluster,
        kvsvr.SyncClient(cluster.addresses, secret=cluster.secret, timeout_s=10.0) as client,
        load_generator(cluster.addresses, cluster.secret, args) as load,
    ):
        print(f"populating {args.clients * args.keys_per_client} keys ...", flush=True)
        load.populate()
        print("baseline ...", flush=True)
        windows["baseline"] = _window(load, args.warmup_s, duration_s)
        cluster.kill("n3")
        print(f"n3 killed; outage of {args.outage_s:g} s ...", flush=True)
        windows["outage"] = _window(load, 0.0, args.outage_s)
        hints, hint_bytes = _hints_for(client, ["n1", "n2"], "n3")
        cluster.restart("n3")
        restarted = time.monotonic()
        drained: list[float] = []

        def watch_hints() -> None:
            with kvsvr.SyncClient(cluster.addresses, secret=cluster.secret) as watcher:
                while time.monotonic() < restarted + 120.0:
                    if _hints_for(watcher, ["n1", "n2"], "n3")[0] == 0:
                        drained.append(time.monotonic() - restarted)
                        return
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch_hints, daemon=True)
        watcher.start()
        print("n3 restarted; catch-up window ...", flush=True)
        # The window starts at once: catching up is what it measures.
        windows["catch_up"] = _window(load, 0.0, duration_s)
        watcher.join()
        drained_after_s = drained[0] if drained else math.nan
        final = {node_id: client.status(node_id)["replication"] for node_id in cluster.ids}
    base = windows["baseline"]["ops_per_s"]
    ratio = windows["catch_up"]["ops_per_s"] / base if base else math.nan
    writes = windows["outage"]["ops"]
    bytes_per_hint = hint_bytes / hints if hints else math.nan
    rate = writes / args.outage_s
    worst_hints = rate * OUTAGE_PROJECTED_S
    worst_bytes = worst_hints * bytes_per_hint
    result = {
        "benchmark": "catchup",
        "args": {k: str(v) for k, v in vars(args).items()},
        "environment": environment(),
        "windows": windows,
        "hints_after_outage": hints,
        "hint_bytes_after_outage": hint_bytes,
        "bytes_per_hint": bytes_per_hint,
        "hints_drained_after_s": drained_after_s,
        "outage_write_rate": rate,
        "ten_minute_outage_worst_case": {
            "hints": worst_hints,
            "bytes": worst_bytes,
            "hints_max": defaults.hints_max,
            "hint_bytes_max": defaults.hint_bytes_max,
            "fits": worst_hints <= defaults.hints_max and worst_bytes <= defaults.hint_bytes_max,
        },
        "targets": {
            "catch_up_over_baseline": target(ratio, ">=", RATIO_TARGET),
        },
        "final_replication_status": final,
    }
    print_table(
        "strong puts, 3 nodes",
        ["window", "ops/s", "p50 ms", "p99 ms", "errors"],
        [
            [name, f"{w['ops_per_s']:.0f}", f"{w['p50_ms']:.1f}", f"{w['p99_ms']:.1f}", w["errors"]]
            for name, w in windows.items()
        ],
    )
    print(f"\ncatch-up / baseline throughput: {ratio:.2f} (target >= {RATIO_TARGET})")
    print(
        f"hints for n3 after {args.outage_s:g} s of outage: {hints} ({hint_bytes} bytes, "
        f"{bytes_per_hint:.0f} B each); {writes} writes in the outage (hints merge per key)"
    )
    print(f"hints drained {drained_after_s:.1f} s after the restart")
    fits = "fits" if result["ten_minute_outage_worst_case"]["fits"] else "DOES NOT FIT"
    print(
        f"10-minute outage at {rate:.0f} writes/s, every write a new key: {worst_hints:.0f} "
        f"hints, {worst_bytes / 2**20:.0f} MiB; bound {defaults.hints_max} hints, "
        f"{defaults.hint_bytes_max / 2**20:.0f} MiB per target: {fits}"
    )
    path = write_result(args, result)
    print(f"\nresult: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
