"""Command-line options, tables, result files and run bookkeeping of
`bench.single_node`, `bench.cluster` and their siblings."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from kvsvr import _build

_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")


# --- command line --------------------------------------------------------------------


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """Options both benchmarks share."""
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument(
        "--processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="load-generator processes the clients are spread over (default: min(2, cores))",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--time-s", type=float, default=None, help="measured seconds per phase")
    amount.add_argument("--ops", type=int, default=None, help="measured ops per phase")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured warm-up (2 s)")
    parser.add_argument("--value-bytes", type=int, default=100, help="value size (100)")
    parser.add_argument(
        "--keys-per-client", type=int, default=50, help="keys each client cycles through (50)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="result folder")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where node data goes: must be the disk to measure, not a tmpfs",
    )
    parser.add_argument(
        "--profile", action="store_true", help="run py-spy on the node(s) in measured windows"
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="run the nodes under cProfile (slow; for call counts) and print the top",
    )
    parser.add_argument("--keep", action="store_true", help="keep node data and logs")


def phase_amount(args: argparse.Namespace) -> tuple[float | None, int | None]:
    """(duration_s, ops) of a measured phase; 10 s when neither is given."""
    if args.ops is not None:
        return None, args.ops
    return (args.time_s if args.time_s is not None else 10.0), None


def check_scratch(path: Path) -> str | None:
    """A warning if `path` is on a RAM file system (fsync would cost nothing)."""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    resolved = str(path.resolve())
    best = max(
        (
            entry
            for entry in entries
            if resolved.startswith(entry[1].rstrip("/") + "/") or resolved == entry[1]
        ),
        key=lambda entry: len(entry[1]),
        default=None,
    )
    if best is not None and best[2] in ("tmpfs", "ramfs"):
        return f"{path} is on {best[2]}: fsync is free there and the figures mean little"
    return None


# --- output ----------------------------------------------------------------------------------


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max([len(header[column]), *(len(row[column]) for row in cells)])
        for column in range(len(header))
    ]
    print(f"\n{title}")
    print("  ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in cells:
        print(
            "  ".join(
                value.rjust(width) if index else value.ljust(width)
                for index, (value, width) in enumerate(zip(row, widths, strict=True))
            )
        )


def target(value: float, relation: str, bound: float) -> dict[str, Any]:
    """A figure against its target: `relation` is ">=" or "<"."""
    met = value >= bound if relation == ">=" else value < bound
    return {
        "value": value,
        "rule": f"{relation} {bound:g}",
        "met": bool(met),
        "verdict": "met" if met else "NOT met",
    }


def print_setup(title: str, args: argparse.Namespace, run: dict[str, Any]) -> None:
    env = environment()
    with open("/proc/loadavg", encoding="ascii") as file:
        load_average = file.read().split()[0]
    duration_s, ops = phase_amount(args)
    window = f"{duration_s:g} s" if duration_s is not None else f"{ops} ops"
    print(
        f"\n{title}: {args.clients} clients in {run['load_processes']} load-generator "
        f"processes {run['load_tasks_per_process']}, on {env['cpus']} cores ({env['cpu_model']}); "
        f"{args.value_bytes}-byte values, {args.keys_per_client} keys per client (written "
        f"once before), warm-up {args.warmup_s:g} s excluded, measured {window} per phase; "
        f"load average now {load_average}; kvsvr build: {env['kvsvr_build']}"
    )


def print_phases(
    phases: dict[str, dict[str, Any]],
    names: dict[str, str],
    extra_rows: Sequence[Sequence[object]] = (),
) -> None:
    """One row per phase: rate, latency, and where the CPU went (cores busy
    on average in the window: nodes, load generator, everything else)."""
    rows: list[Sequence[object]] = []
    for row in extra_rows:
        rows.append([*row, *["-"] * (11 - len(row))])
    for operation, phase in phases.items():
        node_cpu = sum(phase["node_cpu_s"].values())
        rows.append(
            [
                names.get(operation, operation),
                phase["ops"],
                phase["ops_per_s"],
                phase["p50_ms"],
                phase["p99_ms"],
                node_cpu / phase["ops"] * 1000 if phase["ops"] else math.nan,
                sum(phase["node_cpu_cores"].values()),
                _mean(phase["node_system_cpu_fraction"].values()) * 100,
                phase["load_cpu_cores"],
                phase["other_cpu_cores"],
                sum(phase["errors"].values()) + phase["conflicts"],
            ]
        )
    print_table(
        "throughput, latency, CPU (cores = CPU seconds per second of the window)",
        [
            "operation",
            "ops",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "node cpu s/1k ops",
            "node cores",
            "node sys %",
            "load cores",
            "other cores",
            "errors+conflicts",
        ],
        rows,
    )
    for operation, phase in phases.items():
        if len(phase["node_cpu_s"]) > 1:
            per_node = ", ".join(
                f"{node} {cpu / phase['ops'] * 1000 if phase['ops'] else math.nan:.3f}"
                for node, cpu in phase["node_cpu_s"].items()
            )
            print(f"  {operation}: node CPU s per 1000 ops: {per_node}")
        if phase["errors"]:
            print(f"  {operation}: errors {phase['errors']}")


def _mean(values: Iterable[float]) -> float:
    listed = list(values)
    return sum(listed) / len(listed) if listed else math.nan


def print_batching(phases: dict[str, dict[str, Any]]) -> None:
    rows = []
    for operation, phase in phases.items():
        for node, stats in phase["storage"].items():
            rows.append(
                [
                    f"{operation} {node}",
                    stats["batches"],
                    stats["ops"],
                    stats["ops_per_batch"],
                    stats["batches"] / phase["window_s"] if phase["window_s"] else math.nan,
                    stats["max_batch_ops_ever"],
                ]
            )
    print_table(
        "group commit in the window (a fast-path put stages 2 rows: accept, then commit)",
        ["phase node", "txns", "rows", "rows/txn", "txns/s", "max rows/txn (ever)"],
        rows,
    )


def print_cprofiles(run: dict[str, Any], label: str, top: int = 25) -> None:
    for node, summary in run.get("cprofile", {}).items():
        if "error" in summary:
            print(f"\ncProfile {label} {node}: {summary['error']}")
            continue
        rows = [
            [entry["function"], entry["calls"], entry["own_s"], entry["own_share"] * 100]
            for entry in summary["top_own_time"][:top]
        ]
        print_table(
            f"cProfile {label} {node} (whole run, {summary['total_own_s']:.1f} s profiled)",
            ["function", "calls", "own s", "% own"],
            rows,
        )


def print_profiles(
    phases: dict[str, dict[str, Any]],
    label: str,
    operations: Sequence[str] | None = None,
    nodes: Sequence[str] | None = None,
) -> None:
    """The py-spy summaries of some phases and nodes (all by default); the
    JSON result holds every one, and the flame graphs are beside it."""
    for operation, phase in phases.items():
        profile = phase.get("profile")
        if not profile:
            continue
        if profile["error"]:
            print(f"\npy-spy ({operation}): {profile['error']}")
        if operations is None or operation in operations:
            summaries = {
                node: summary
                for node, summary in profile["summary"].items()
                if nodes is None or node in nodes
            }
            print_profile(f"{label} {operation}", summaries)
        print(f"{operation} flame graphs: {', '.join(profile['svg'].values())}")


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def print_profile(label: str, summaries: dict[str, dict[str, Any]], top: int = 15) -> None:
    for node, summary in summaries.items():
        threads = ", ".join(f"{name} {share:.0%}" for name, share in summary["threads"].items())
        heading = f"py-spy {label} {node}"
        print(f"\n{heading}: {summary['samples']} active samples ({threads})")
        gil = summary.get("gil")
        tables: list[tuple[str, list[tuple[str, float]]]] = [
            ("trio thread, active samples, by activity", summary["main_buckets"]),
        ]
        if gil:
            tables += [
                ("trio thread, GIL-holding samples, by activity", gil["main_buckets"]),
                ("trio thread, GIL-holding samples, self time", gil["main_self"]),
                ("trio thread, GIL-holding samples, kvsvr inclusive", gil["main_kvsvr_inclusive"]),
            ]
        else:
            tables += [
                ("trio thread, active samples, self time", summary["main_self"]),
                ("trio thread, active samples, kvsvr inclusive", summary["main_kvsvr_inclusive"]),
            ]
        tables.append(("worker threads (commits), active samples", summary["other_threads_self"]))
        for what, shares in tables:
            rows = [(name, share * 100) for name, share in shares[:top]]
            print_table(f"{heading}: {what}", ["function", "% of thread samples"], rows)


def environment() -> dict[str, Any]:
    """What the figures depend on besides the code."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "kvsvr"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.splitlines()
    except OSError:
        commit, dirty = "", []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
            model = next(
                (line.split(":", 1)[1].strip() for line in file if line.startswith("model name")),
                "",
            )
    except OSError:
        model = ""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        # Uncommitted changes under kvsvr/ when this ran (others edit the tree).
        "kvsvr_uncommitted_files": [line[3:] for line in dirty],
        "memory_page_bytes": _PAGE_BYTES,
        # The build the nodes and clients run (`python3 dev.py compile` or not).
        "kvsvr_build": _build.describe(_build.compiled_modules()),
    }


def name_run(args: argparse.Namespace, benchmark: str) -> str:
    """Give this run its name, `BENCHMARK-YYYYmmdd-HHMMSS` (`args.run_id`):
    its JSON result is `--out/NAME.json` and profiles go to `--out/NAME-profiles/`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.run_id = f"{benchmark}-{stamp}"
    return str(args.run_id)


def write_result(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    """`result` as `--out/RUN_ID.json` (NaN and inf become null)."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{args.run_id}.json"
    text = json.dumps(_plain(result), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_results(args: argparse.Namespace, name: str, results: list[dict[str, Any]]) -> Path:
    """`args.out/<name>-<time>.json` with the arguments and `results`; prints its path."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    body = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    path.write_text(json.dumps(body, indent=2), encoding="utf-8")
    print(f"\nwrote {path}")
    return path


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so `finally` blocks stop the nodes."""

    def handler(signal_number: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal_number}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
