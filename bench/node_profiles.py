"""py-spy on the nodes during a measured phase (`Profiler`) and the summary
of its collapsed stacks by code area (`summarize_collapsed`)."""

from __future__ import annotations

import math
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Final

from bench.profiling import py_spy_path
from kvsvr.local import die_with_parent

# py-spy sampling rate: its default. One sampler per node stops it briefly
# for each sample and all of them take CPU on the same machine, so a profiled
# run's rates are a little lower than an unprofiled one's.
PROFILE_RATE_HZ: Final = 100


class Profiler:
    """py-spy attached to some node processes for one window, three samplers
    per node: collapsed stacks of every thread that is not idle ("active":
    includes a thread in a system call or runnable but preempted, so on a
    busy machine it overweights syscalls such as send), collapsed stacks of
    the thread holding the GIL only ("gil": Python CPU), and a flame graph
    SVG of the active stacks."""

    def __init__(self, pids: dict[str, int], out_dir: Path, label: str, duration_s: float) -> None:
        self.pids = pids
        self.out_dir = out_dir
        self.label = label
        self.duration_s = max(1, math.ceil(duration_s))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.raw_paths: dict[str, Path] = {}
        self.gil_paths: dict[str, Path] = {}
        self.svg_paths: dict[str, Path] = {}
        self.error: str | None = None

    def start(self) -> None:
        executable = py_spy_path()
        if executable is None:
            self.error = "py-spy not found (pip install py-spy into the venv)"
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for node, pid in self.pids.items():
            # The GIL sampler stops the node for each sample (consistent
            # stacks: this is the view the summary leans on); the other two
            # read its memory while it runs (only one tracer can stop a
            # process, and a stack read on the run is now and then garbled:
            # such samples land in "trio scheduler, other").
            for fmt, suffix, extra, paths in (
                ("raw", "txt", ["--nonblocking"], self.raw_paths),
                ("raw", "gil.txt", ["--gil"], self.gil_paths),
                ("flamegraph", "svg", ["--nonblocking"], self.svg_paths),
            ):
                path = self.out_dir / f"{self.label}-{node}.{suffix}"
                paths[node] = path
                command = [
                    executable,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(self.duration_s),
                    "--rate",
                    str(PROFILE_RATE_HZ),
                    "--format",
                    fmt,
                    "--threads",
                    *extra,
                    "--output",
                    str(path),
                ]
                self.processes.append(
                    subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        preexec_fn=die_with_parent,
                    )
                )

    def finish(self) -> None:
        errors = []
        for process in self.processes:
            try:
                _, stderr = process.communicate(timeout=self.duration_s + 30)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            if process.returncode != 0:
                errors.append(stderr.decode(errors="replace").strip()[-500:])
        if errors:
            self.error = "; ".join(errors)

    def summaries(self, top: int = 25) -> dict[str, dict[str, Any]]:
        """Per node: the active-stack summary, with the GIL-only one under "gil"."""
        result = {}
        for node, path in self.raw_paths.items():
            if not path.exists():
                continue
            summary = summarize_collapsed(path.read_text(encoding="utf-8"), top)
            gil_path = self.gil_paths.get(node)
            if gil_path is not None and gil_path.exists():
                summary["gil"] = summarize_collapsed(gil_path.read_text(encoding="utf-8"), top)
            result[node] = summary
        return result


# Where the trio thread's samples go, by what the stack is doing. A sample goes
# to the first bucket (in this order) with a matching frame anywhere in its
# stack, so e.g. row decoding inside a replica handler counts as "row read".
PROFILE_BUCKETS: Final = (
    ("send replies/requests (send_all)", ("send_queued_frames",)),
    ("receive + frame decode + dispatch", ("_receive_requests", "RpcConnection._receive_loop")),
    ("row read + decode (Storage.read_row)", ("Storage.read_row",)),
    ("row encode + stage (Storage.stage)", ("Storage.stage",)),
    (
        "group-commit writer, trio side",
        ("Storage.run", "Storage._commit", "Storage._finish", "CommitThread."),
    ),
    ("Paxos logic (kvsvr/protocol)", ("(kvsvr/protocol/",)),
    ("peer RPC (PeerLink, to/from_wire)", ("PeerLink.", "kvsvr/protocol/messages.py")),
    ("engine: rounds, timers, collectors (kvsvr/node/rounds.py)", ("(kvsvr/node/rounds.py",)),
    (
        "engine: drives and write turns (node/engine.py, writes.py)",
        ("(kvsvr/node/engine.py", "(kvsvr/node/writes.py"),
    ),
    ("client request handling (Node.client_*)", ("(kvsvr/node/",)),
    ("RPC server (_answer: reply encode, queue)", ("(kvsvr/net/",)),
    ("waiting in epoll", ("EpollIOManager.get_events",)),
    ("trio scheduler, other", ("",)),
)


def _task_frames(frames: list[str]) -> list[str]:
    """The frames below trio's run loop: what a task is doing. Above it sits
    the entry point (run_node...), on every stack."""
    start = 0
    for index, frame in enumerate(frames):
        if frame.startswith(("run (trio/_core/_run.py", "unrolled_run (")):
            start = index + 1
    return frames[start:]


def _bucket(frames: list[str]) -> str:
    task_frames = _task_frames(frames)
    for name, patterns in PROFILE_BUCKETS:
        if any(pattern in frame for pattern in patterns for frame in task_frames):
            return name
    return PROFILE_BUCKETS[-1][0]  # the run loop itself, between tasks


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Shares of py-spy's collapsed stacks (`thread;frame;... count` a line).

    The node's CPU goes to its trio thread ("MainThread"); its other threads
    are trio's worker threads, which run LMDB commits and mostly wait in
    fsync (py-spy counts a thread blocked in I/O as active). So the trio
    thread is summarised on its own: top functions by self time, by module,
    and kvsvr functions by inclusive time; other threads by self time.
    Shares are of the thread's samples."""
    per_thread: dict[str, list[tuple[list[str], int]]] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = "(unknown)"
        if frames[0].startswith("thread"):
            thread = frames.pop(0).partition(": ")[2] or frames[0]
        per_thread.setdefault(thread, []).append((frames, int(count_text)))
    totals = {thread: sum(count for _, count in stacks) for thread, stacks in per_thread.items()}
    all_samples = sum(totals.values())
    summary: dict[str, Any] = {
        "samples": all_samples,
        "threads": {thread: total / all_samples for thread, total in totals.items()},
    }
    main = per_thread.get("MainThread", [])
    main_total = totals.get("MainThread", 0)
    self_counts: Counter[str] = Counter()
    module_counts: Counter[str] = Counter()
    inclusive_counts: Counter[str] = Counter()
    bucket_counts: Counter[str] = Counter()
    for frames, count in main:
        if not frames:
            continue
        bucket_counts[_bucket(frames)] += count
        leaf = _short_frame(frames[-1])
        self_counts[leaf] += count
        module_counts[leaf.rpartition(" (")[2].rstrip(")")] += count
        for name in {_short_frame(frame) for frame in _task_frames(frames)}:
            if "(kvsvr/" in name:
                inclusive_counts[name] += count
    other_counts: Counter[str] = Counter()
    other_total = 0
    for thread, stacks in per_thread.items():
        if thread == "MainThread":
            continue
        for frames, count in stacks:
            if frames:
                other_counts[_short_frame(frames[-1])] += count
                other_total += count

    def shares(counter: Counter[str], total: int) -> list[tuple[str, float]]:
        return [(name, count / total) for name, count in counter.most_common(top)]

    summary["main_thread_samples"] = main_total
    summary["main_buckets"] = shares(bucket_counts, main_total) if main_total else []
    summary["main_self"] = shares(self_counts, main_total) if main_total else []
    summary["main_by_module"] = shares(module_counts, main_total) if main_total else []
    summary["main_kvsvr_inclusive"] = shares(inclusive_counts, main_total) if main_total else []
    summary["other_threads_samples"] = other_total
    summary["other_threads_self"] = shares(other_counts, other_total) if other_total else []
    return summary


def _short_path(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("kvsvr", "trio", "lmdb", "msgpack"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) :])
    return Path(path).name


def _short_frame(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`; lines merged."""
    name, _, location = frame.partition(" (")
    if not location:
        return frame
    return f"{name} ({_short_path(location.rstrip(')').rsplit(':', 1)[0])})"


def summarize_cprofile(path: Path, top: int = 30) -> dict[str, Any]:
    """The functions with the most own time in a node's cProfile file (written
    when the node stopped), with call counts; the whole run, populate included."""
    import pstats

    if not path.exists():
        return {"error": f"{path} was not written (did the node exit cleanly?)"}
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total_s = sum(entry[2] for entry in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "file": str(path),
        "total_own_s": total_s,
        "top_own_time": [
            {
                "function": f"{name} ({_short_path(filename)}:{line})",
                "calls": entry[1],
                "own_s": entry[2],
                "cumulative_s": entry[3],
                "own_share": entry[2] / total_s if total_s else 0.0,
            }
            for (filename, line, name), entry in rows
        ],
    }
