"""`python -m jepsen_like`: run a fault-injection test against real kvsvr nodes.

    python -m jepsen_like run --nodes 3 --time-s 60 --nemesis kill,pause,partition,corrupt \
        --workload register --seed 7 --out runs/seed7

Exit codes: 0 valid and linearizable, 1 anomaly (not linearizable), 2 unknown
(the checker ran out of time), 3 invalid run (too little throughput before the
faults, or nothing succeeded after healing), 4 the harness itself failed
(a node would not start, bad arguments...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from jepsen_like.harness.cluster import ClusterError
from jepsen_like.harness.nemesis import NEMESES, NemesisError
from jepsen_like.harness.report import format_summary
from jepsen_like.harness.run import (
    CHECK_TIMEOUT_S,
    CLIENTS_PER_NODE_MAX,
    CLIENTS_PER_NODE_MIN,
    MIN_OPS_PER_S,
    RunConfig,
    RunInterrupted,
    run,
)
from jepsen_like.harness.watchers import WATCHERS_PER_NODE_MAX
from jepsen_like.harness.workload import DEFAULT_KEY_COUNT, WORKLOADS

EXIT_HARNESS_FAILED: Final = 4
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED: Final = 143  # 128 + SIGTERM
NODE_COUNTS: Final = (1, 3, 5)


def _nemesis_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if text.strip() in ("", "none"):
        return ()
    unknown = [n for n in names if n not in NEMESES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown nemesis {', '.join(unknown)}; choose from {', '.join(NEMESES)} or 'none'"
        )
    return names


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m jepsen_like",
        description="Fault-injection tests of kvsvr: real nodes, link proxies, nemeses, "
        "a linearizability check. See jepsen_like/README.md.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runner = commands.add_parser(
        "run",
        help="start a cluster, run a workload under faults, check the history",
        description="Start a cluster in OUT/cluster, run clients on every node while the "
        "nemeses strike, heal, read every key, check linearizability, write the outputs. "
        "Exit 0: valid and linearizable; 1: not linearizable; 2: unknown; 3: invalid run; "
        "4: harness failure.",
    )
    runner.add_argument(
        "--nodes", type=int, choices=NODE_COUNTS, default=3, help="cluster size (default 3)"
    )
    runner.add_argument(
        "--time-s",
        type=_positive,
        default=60.0,
        metavar="S",
        help="workload duration: warm-up + faults + quiet tail (default 60)",
    )
    runner.add_argument(
        "--nemesis",
        type=_nemesis_list,
        default=("kill", "pause", "partition", "corrupt"),
        metavar="LIST",
        help="comma-separated faults from: "
        + ", ".join(NEMESES)
        + "; or 'none' (default kill,pause,partition,corrupt)",
    )
    runner.add_argument(
        "--clock-rate",
        type=_positive,
        metavar="R",
        help="the clock nemesis runs clocks at this rate (e.g. 0.2: 5x slow, far outside "
        "the assumed bound, to show the checker finds the stale reads it allows); "
        "default: 1 +/- the cluster's clock_drift_max",
    )
    runner.add_argument(
        "--lease-s",
        type=_positive,
        metavar="S",
        help="the cluster's read-lease length (default: the config's default)",
    )
    runner.add_argument(
        "--no-read-leases",
        dest="read_leases",
        action="store_false",
        help="run the cluster with read leases off",
    )
    runner.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="register",
        help="register: read/write/cas; kv: get/put/delete (default register)",
    )
    runner.add_argument(
        "--stale-reads",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="register workload: the share of reads sent as stale reads (no quorum round; "
        "checked for never going back in time within a client, not for linearizability), "
        "e.g. 0.5 (default 0)",
    )
    runner.add_argument(
        "--near-cache",
        action="store_true",
        help="register workload: strong reads send the version of the value the client "
        "holds (kvsvr's client near cache); the node answers 'unchanged' without the value "
        "when its quorum chose that version",
    )
    runner.add_argument(
        "--watchers",
        type=int,
        choices=range(0, WATCHERS_PER_NODE_MAX + 1),
        default=0,
        metavar="N",
        help="register workload: N watchers per node follow every key through the faults; "
        "each watcher's stream must be in order, without duplicates or a skipped visible "
        f"version (0-{WATCHERS_PER_NODE_MAX}, default 0)",
    )
    runner.add_argument(
        "--key-affinity",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="register workload: the share of a client's operations on the keys homed at "
        "its node, as kvsvr's client sends a key's requests to its preferred coordinator "
        "(read leases need it: a node leases only keys it alone writes); the rest go to "
        "any key, e.g. 0.9 (default 0: every key alike)",
    )
    runner.add_argument(
        "--reads",
        type=_fraction,
        metavar="F",
        help="register workload: the share of reads; the rest are writes and "
        "compare-and-sets, half each (default 0.4)",
    )
    runner.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the schedule, the faults and the operations (default 0)",
    )
    runner.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output directory (created; reuse only for the same seed)",
    )
    runner.add_argument(
        "--clients-per-node",
        type=int,
        default=3,
        metavar="N",
        choices=range(CLIENTS_PER_NODE_MIN, CLIENTS_PER_NODE_MAX + 1),
        help=f"client threads per node, {CLIENTS_PER_NODE_MIN}-{CLIENTS_PER_NODE_MAX} (default 3)",
    )
    runner.add_argument(
        "--keys",
        type=int,
        default=DEFAULT_KEY_COUNT,
        metavar="K",
        help=f"keys in use at once (default {DEFAULT_KEY_COUNT})",
    )
    runner.add_argument(
        "--warmup-s",
        type=_positive,
        metavar="S",
        help="quiet time before the first fault (default: 15%% of --time-s, 3-15 s)",
    )
    runner.add_argument(
        "--tail-s",
        type=_positive,
        metavar="S",
        help="quiet time after the final heal (default: 20%% of --time-s, 5-20 s)",
    )
    runner.add_argument(
        "--min-ops-s",
        type=float,
        default=MIN_OPS_PER_S,
        metavar="R",
        help="the run is invalid if ok ops/s before faults fall below this "
        f"(default {MIN_OPS_PER_S:g})",
    )
    runner.add_argument(
        "--check-timeout-s",
        type=_positive,
        default=CHECK_TIMEOUT_S,
        metavar="S",
        help=f"checker budget; past it the verdict is unknown (default {CHECK_TIMEOUT_S:g})",
    )
    runner.add_argument(
        "--tls",
        action="store_true",
        help="run every client and peer link with TLS (a local CA made for the run); "
        "the partition proxies forward its bytes",
    )
    runner.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's outputs in --out first (else refused)",
    )
    progress = runner.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    config = RunConfig(
        out_dir=args.out,
        node_count=args.nodes,
        time_s=args.time_s,
        nemeses=args.nemesis,
        clock_rate=args.clock_rate,
        lease_s=args.lease_s,
        read_leases=args.read_leases,
        workload=args.workload,
        stale_reads=args.stale_reads,
        near_cache=args.near_cache,
        watchers_per_node=args.watchers,
        key_affinity=args.key_affinity,
        read_fraction=args.reads,
        seed=args.seed,
        clients_per_node=args.clients_per_node,
        key_count=args.keys,
        warmup_s=args.warmup_s,
        tail_s=args.tail_s,
        min_ops_per_s=args.min_ops_s,
        check_timeout_s=args.check_timeout_s,
        progress=show_progress,
        overwrite=args.overwrite,
        tls=args.tls,
    )
    try:
        result = run(config)
    except BaseException as error:  # sorted by kind below, re-raised if unknown
        leaves = list(_leaves(error))
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print("interrupted; every node was stopped", file=sys.stderr)
            return EXIT_INTERRUPTED
        if any(isinstance(leaf, RunInterrupted) for leaf in leaves):
            print(f"{error}", file=sys.stderr)
            return EXIT_TERMINATED
        expected = (ClusterError, NemesisError, ValueError, OSError)
        if leaves and all(isinstance(leaf, expected) for leaf in leaves):
            for leaf in leaves:
                print(f"harness failed: {leaf}", file=sys.stderr)
            return EXIT_HARNESS_FAILED
        raise
    print(format_summary(result.summary))
    return result.exit_code


def _leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, or the error itself."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
