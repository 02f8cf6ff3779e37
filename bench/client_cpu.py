"""The client's CPU per operation: CPU-ms of the load-generating process per op.

    python -m bench.client_cpu                          # starts a 1-node cluster
    python -m bench.client_cpu --addresses 127.0.0.1:7101 --secret s
    python -m bench.client_cpu --compare-file /tmp/client_base.py   # A/B, interleaved

One process, `--tasks` trio tasks sharing one `kvsvr.connect(...)` client, runs
`--ops` operations of each kind (stale get, strong get, put) over `--keys`
preloaded keys, and reports `time.process_time()` of this process per 1,000
operations (the nodes run in processes of their own and are not counted).
Each kind is measured `--repeat` times and the median is quoted: the machine is
shared with the nodes and is noisy, so CPU time, not wall time, is the figure
(and the minimum is shown too). CPU per op still depends on the nodes' speed:
the slower they answer, the fewer replies each receive and wake-up carries.

`--compare-file` loads another copy of the module that defines `connect`,
`kvsvr/client_async.py` (say, the one on main:
`git show main:kvsvr/client_async.py > /tmp/client_base.py`), as a second
module and runs both against the same cluster, interleaved per repetition, so
the two are measured back to back under the same conditions. The copy shares
the rest of the client (`kvsvr.api`, routing, caches) with the current one.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

import kvsvr.client_async
from bench.load import BENCH_SECRET
from bench.phases import bench_cluster
from kvsvr.node.server import tune_gc

KINDS = ("stale", "strong", "put")


def load_client_module(path: str) -> ModuleType:
    """A copy of kvsvr/client_async.py loaded as a module of its own."""
    spec = importlib.util.spec_from_file_location("kvsvr_client_compare", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def measure(
    module: ModuleType, addresses: list[str], secret: str, args: argparse.Namespace, kind: str
) -> tuple[float, float]:
    """(client CPU-ms per op, wall-ms per op) for `args.ops` operations of `kind`."""
    keys = [b"cpu-%06d" % index for index in range(args.keys)]
    value = b"v" * args.value_bytes
    async with module.connect(addresses, secret=secret, timeout_s=10.0) as client:
        # Warm up: connections made, keys present, session entries filled.
        async with trio.open_nursery() as nursery:
            for start in range(args.tasks):

                async def load(start: int = start) -> None:
                    for key in keys[start :: args.tasks]:
                        await client.put(key, value)

                nursery.start_soon(load)
        per_task = args.ops // args.tasks

        async def worker(seed: int) -> None:
            chooser = random.Random(seed)
            choice = chooser.choice
            if kind == "put":
                for _ in range(per_task):
                    await client.put(choice(keys), value)
            else:
                for _ in range(per_task):
                    await client.get(choice(keys), consistency=kind)

        cpu_before, wall_before = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for seed in range(args.tasks):
                nursery.start_soon(worker, seed)
        cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    ops = per_task * args.tasks
    return cpu * 1000 / ops, wall * 1000 / ops


def run(addresses: list[str], secret: str, args: argparse.Namespace) -> dict[str, Any]:
    modules: dict[str, ModuleType] = {"current": kvsvr.client_async}
    if args.compare_file:
        modules = {"compare": load_client_module(args.compare_file), **modules}
    kinds = [kind for kind in KINDS if kind in args.kinds.split(",")]
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {
        (name, kind): [] for name in modules for kind in kinds
    }
    for repetition in range(args.repeat):
        for kind in kinds:
            for name, module in modules.items():
                result = trio.run(measure, module, addresses, secret, args, kind)
                samples[name, kind].append(result)
                print(
                    f"  rep {repetition + 1} {kind:6} {name:8} "
                    f"cpu {result[0] * 1000:7.1f} us/op  wall {result[1] * 1000:7.1f} us/op",
                    flush=True,
                )
    print(
        f"\nmedian of {args.repeat}, client CPU-ms per 1,000 ops ({args.ops} ops, "
        f"{args.tasks} tasks):"
    )
    summary: dict[str, Any] = {}
    for kind in kinds:
        row = []
        for name in modules:
            cpus = [sample[0] * 1000 for sample in samples[name, kind]]
            cpu = statistics.median(cpus)
            summary[f"{name}.{kind}"] = cpu
            row.append(f"{name} {cpu:7.1f} (min {min(cpus):6.1f})")
        print(f"  {kind:6}  " + "   ".join(row))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", help="an existing cluster (else a 1-node one is started)")
    parser.add_argument("--secret", default=BENCH_SECRET)
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--compare-file", help="another kvsvr/client_async.py to measure alongside")
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    parser.add_argument("--no-tune-gc", action="store_true")
    parser.add_argument("--cprofile", help="write a cProfile (CPU-time clock) of the runs here")
    args = parser.parse_args(argv)
    if not args.no_tune_gc:
        tune_gc()  # as the benchmark's load generators do
    profiler = cProfile.Profile(time.process_time) if args.cprofile else None
    with contextlib.ExitStack() as stack:
        if args.addresses:
            addresses, secret = args.addresses.split(","), args.secret
        else:
            cluster = stack.enter_context(bench_cluster(1, 1, scratch_root=Path(args.scratch)))
            addresses, secret = cluster.addresses, cluster.secret
        if profiler is not None:
            profiler.enable()
        run(addresses, secret, args)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
