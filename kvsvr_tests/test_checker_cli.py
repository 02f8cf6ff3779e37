"""``python -m jepsen_like.check``: verdict lines and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jepsen_like.checker import Op, write_edn, write_jsonl

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "checker-corpus"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jepsen_like.check", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _history(read_value: object) -> list[Op]:
    return [
        Op(0, "invoke", "write", "k", 1, 0, 0),
        Op(0, "ok", "write", "k", 1, 1, 1),
        Op(1, "invoke", "read", "k", None, 2, 2),
        Op(1, "ok", "read", "k", read_value, 3, 3),
    ]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_jsonl(_history(1), good)
    write_jsonl(_history(2), bad)
    edn = tmp_path / "good.edn"
    write_edn(_history(1), edn)
    return {"good": good, "bad": bad, "edn": edn}


def test_all_linearizable_exits_0(files: dict[str, Path]) -> None:
    proc = run(files["good"], files["edn"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{files['good']}: linearizable",
        f"{files['edn']}: linearizable",
    ]


def test_any_violation_exits_1(files: dict[str, Path], tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    proc = run("--format", "jsonl", "--report-dir", reports, files["good"], files["bad"])
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{files['good']}: linearizable",
        f"{files['bad']}: not linearizable",
    ]
    assert (reports / "bad.jsonl.html").is_file()


def test_unknown_exits_2(files: dict[str, Path]) -> None:
    proc = run("--timeout-s", "0", files["good"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.splitlines() == [f"{files['good']}: unknown"]


def test_violation_beats_unknown(files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    proc = run(files["bad"], missing)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{files['bad']}: not linearizable",
        f"{missing}: unknown",
    ]
    assert "error" in proc.stderr


def test_model_option(files: dict[str, Path]) -> None:
    proc = run("--model", "kv", "-v", files["good"])
    assert proc.returncode == 0
    assert "kv model" in proc.stderr


def test_corpus_files_with_detected_formats() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"checker corpus not found at {CORPUS} (expected beside the repo clone)")
    proc = run(CORPUS / "etcd" / "etcd_002.log", CORPUS / "kv" / "c10-ok.txt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("--format", "kv", CORPUS / "kv" / "c10-bad.txt")
    assert proc.returncode == 1
    assert proc.stdout.strip().endswith("c10-bad.txt: not linearizable")


def _stale_history(stale_version: int) -> list[Op]:
    """Process 0 writes 1 then 2 (versions 1, 2); process 1 reads 2 strongly,
    then makes a stale read that returns value 1 at `stale_version`."""
    strong = {"consistency": "strong"}
    stale = {"consistency": "stale"}
    return [
        Op(0, "invoke", "write", "k", 1, 0, 0),
        Op(0, "ok", "write", "k", 1, 1, 1, {"version": 1}),
        Op(0, "invoke", "write", "k", 2, 2, 2),
        Op(0, "ok", "write", "k", 2, 3, 3, {"version": 2}),
        Op(1, "invoke", "read", "k", None, 4, 4, strong),
        Op(1, "ok", "read", "k", 2, 5, 5, {"version": 2, **strong}),
        Op(1, "invoke", "read", "k", None, 6, 6, stale),
        Op(1, "ok", "read", "k", 1, 7, 7, {"version": stale_version, **stale}),
    ]


def test_stale_reads_are_left_out_of_linearizability(tmp_path: Path) -> None:
    # A lagging stale read of another process's write is allowed: the same
    # history with the read made strong would not be linearizable.
    lagging = _stale_history(stale_version=2)
    lagging[-2] = Op(2, "invoke", "read", "k", None, 6, 6, {"consistency": "stale"})
    lagging[-1] = Op(2, "ok", "read", "k", 1, 7, 7, {"version": 1, "consistency": "stale"})
    path = tmp_path / "lagging.jsonl"
    write_jsonl(lagging, path)
    proc = run("-v", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: linearizable"
    assert "2 stale-read events checked for monotonicity only" in proc.stderr

    as_strong = [
        Op(
            op.process,
            op.type,
            op.f,
            op.key,
            op.value,
            op.time_ns,
            op.index,
            {**op.extra, "consistency": "strong"},
        )
        for op in lagging
    ]
    strong_path = tmp_path / "strong.jsonl"
    write_jsonl(as_strong, strong_path)
    assert run(strong_path).returncode == 1


def test_a_stale_read_going_backwards_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "backwards.jsonl"
    write_jsonl(_stale_history(stale_version=1), path)
    proc = run(path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == f"{path}: not linearizable"
    assert "stale read went backwards" in proc.stderr
