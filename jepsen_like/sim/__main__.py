"""`python -m jepsen_like.sim`: run many seeds of the deterministic simulator.

    python -m jepsen_like.sim --seeds 1000 [--start-seed S] [--nodes 3|5] [--ops 500]
    python -m jepsen_like.sim --seed S --trace     # replay one seed, printing every event

Every failing seed is printed; a seed replays exactly. Exit 0 when every seed
was linearizable, 1 when any was not, 2 when any check was inconclusive.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import time
from collections.abc import Iterable
from dataclasses import replace

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE
from jepsen_like.sim.check import check_seed, run_seed_summary
from jepsen_like.sim.run import SimConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jepsen_like.sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start-seed", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run exactly this seed")
    parser.add_argument("--trace", action="store_true", help="print every event of --seed")
    parser.add_argument("--nodes", type=int, default=3, choices=[3, 5])
    parser.add_argument("--ops", type=int, default=500, help="client operations per seed")
    parser.add_argument("--workers", type=int, default=2, help="processes running seeds")
    args = parser.parse_args(argv)
    config = replace(SimConfig(), nodes=args.nodes, operations=args.ops)

    if args.seed is not None:
        verdict = check_seed(args.seed, config, print if args.trace else None)
        print(
            f"seed {args.seed}: {verdict.verdict}; {verdict.sim.counts}; "
            f"{len(verdict.sim.faults)} faults; {verdict.sim.messages} messages"
        )
        for key in verdict.result.bad_keys:
            print(f"  bad key {key}")
        return 0 if verdict.ok else (1 if verdict.verdict == NOT_LINEARIZABLE else 2)

    seeds = range(args.start_seed, args.start_seed + args.seeds)
    started = time.monotonic()
    failing: list[int] = []
    unknown: list[int] = []
    operations = faults = 0
    jobs = [(seed, config) for seed in seeds]
    results: Iterable[tuple[int, str, int, int, dict[str, int]]]
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(args.workers))
            results = pool.imap_unordered(run_seed_summary, jobs)
        else:
            results = map(run_seed_summary, jobs)
        for seed, seed_verdict, ops, fault_count, counts in results:
            operations += ops
            faults += fault_count
            if seed_verdict == NOT_LINEARIZABLE:
                failing.append(seed)
                print(f"FAIL seed {seed}: not linearizable ({counts})", flush=True)
            elif seed_verdict != LINEARIZABLE:
                unknown.append(seed)
                print(f"UNKNOWN seed {seed}: {seed_verdict}", flush=True)
    elapsed = time.monotonic() - started
    print(
        f"{len(seeds)} seeds ({args.nodes} nodes, {args.ops} ops each) in {elapsed:.1f} s "
        f"({len(seeds) / elapsed * 60:.0f} seeds/min): {operations} operations checked, "
        f"{faults} faults injected, {len(failing)} not linearizable, {len(unknown)} unknown"
    )
    if failing:
        print("failing seeds:", " ".join(map(str, sorted(failing))))
        return 1
    return 2 if unknown else 0


if __name__ == "__main__":
    sys.exit(main())
