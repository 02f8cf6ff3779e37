"""Where a kvsvr node's time goes: py-spy attached to running nodes, its raw
(collapsed) stacks summarised by code area, by leaf function and by kvsvr
function (inclusive).

py-spy samples with `--gil`: only the thread holding the GIL, i.e. Python
code running on a CPU, not threads waiting in fsync or on a lock. Time in
system calls made without the GIL (socket sends, the LMDB commit) shows as
the runs' system-CPU share instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

SAMPLE_RATE_HZ: Final = 100
# After its duration, py-spy gets this long to write its file.
PY_SPY_EXIT_TIMEOUT_S: Final = 30.0
TOP_FRAMES: Final = 15

# Leaf-frame file -> code area, first match wins.
AREAS: Final = (
    ("kvsvr/net/", "kvsvr.net (frames, connections)"),
    ("kvsvr/storage/", "kvsvr.storage (LMDB engine, codec)"),
    ("kvsvr/protocol/", "kvsvr.protocol (Paxos core)"),
    ("kvsvr/node/", "kvsvr.node (server glue)"),
    ("kvsvr/", "kvsvr (other)"),
    ("trio/", "trio runtime"),
    ("outcome/", "trio runtime"),
    ("msgpack/", "msgpack"),
    ("lmdb/", "lmdb binding"),
    ("<string>", "dataclass __init__/__eq__"),
    ("dataclasses.py", "dataclasses"),
)


@dataclass
class Profile:
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def py_spy_path() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else None


@contextmanager
def profile_processes(
    pids: list[int], out_dir: Path, name: str, seconds: float
) -> Iterator[Profile]:
    """Sample each pid for `seconds` while the body runs; fill `summary` after."""
    profile = Profile()
    binary = py_spy_path()
    if binary is None:
        profile.summary = {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
        yield profile
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    samplers = []
    for number, pid in enumerate(pids, start=1):
        path = out_dir / f"{name}-node{number}.txt"
        profile.files.append(path)
        command = [
            binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--output", str(path),
            "--nonblocking", "--gil",
        ]  # fmt: skip
        samplers.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    try:
        yield profile
    finally:
        errors = []
        for sampler in samplers:
            try:
                _, stderr = sampler.communicate(timeout=PY_SPY_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, stderr = sampler.communicate()
            if sampler.returncode != 0:
                errors.append(stderr.decode(errors="replace").strip()[-300:])
    texts = [path.read_text() for path in profile.files if path.exists()]
    profile.summary = summarize_collapsed("\n".join(texts))
    profile.summary["files"] = [str(path) for path in profile.files]
    if errors:
        profile.summary["errors"] = errors


def area_of(frame: str) -> str:
    for marker, area in AREAS:
        if marker in frame:
            return area
    return "python stdlib / other"


def summarize_collapsed(text: str, top: int = TOP_FRAMES) -> dict[str, Any]:
    """Shares of samples by area (of the leaf frame), by leaf frame, and by
    kvsvr frame anywhere on the stack (inclusive)."""
    leaf: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf[frames[-1]] += count
        areas[area_of(frames[-1])] += count
        for frame in set(frames):
            if "kvsvr/" in frame and "kvsvr/__main__" not in frame and "kvsvr/cli" not in frame:
                inclusive[frame] += count
    if total == 0:
        return {"samples": 0}

    def shares(counter: Counter[str], limit: int) -> list[list[object]]:
        return [[name, round(100 * count / total, 1)] for name, count in counter.most_common(limit)]

    return {
        "samples": total,
        "by_area_percent": shares(areas, len(areas)),
        "top_self_percent": shares(leaf, top),
        "top_kvsvr_inclusive_percent": shares(inclusive, top),
    }
