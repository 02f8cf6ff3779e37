"""The harness's stale-read workload: reads mixed strong / stale, the stale ones
left out of the linearizability check and checked per process for never going
back in time; a run that sees one go back is an anomaly (exit 1)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, check
from jepsen_like.harness import History, RegisterWorkload, RunConfig, checker_ops, run_test
from jepsen_like.harness.cli import parser
from jepsen_like.harness.run import (
    check_history,
    check_stale_reads,
    count_stale_reads,
    exit_code_for,
    final_verdict,
)
from jepsen_like.harness.workload import Completion, PlannedOp, Worker, make_workload


class FakeNode:
    """Answers as a NodeClient would, from a script; records what was asked."""

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.calls: list[tuple[Any, ...]] = []

    async def get(
        self, key: str, consistency: str = "strong", *, min_version: int = 0
    ) -> tuple[bytes | None, int]:
        await trio.lowlevel.checkpoint()
        self.calls.append(("get", key, consistency, min_version))
        result: tuple[bytes | None, int] = self.results.pop(0)
        return result

    async def get_if_changed(self, key: str, cached_version: int) -> tuple[bytes | None, int, bool]:
        await trio.lowlevel.checkpoint()
        self.calls.append(("get_if_changed", key, cached_version))
        result: tuple[bytes | None, int, bool] = self.results.pop(0)
        return result

    async def put(self, key: str, value: bytes | None, if_version: int | None = None) -> int:
        await trio.lowlevel.checkpoint()
        self.calls.append(("put", key, value, if_version))
        result: int = self.results.pop(0)
        return result


def test_reads_split_between_strong_and_stale() -> None:
    workload = RegisterWorkload(key_count=2, rng=random.Random(1), stale_read_fraction=0.5)
    worker = Worker(thread=0, process=0, node="n1")
    rng = random.Random(2)
    reads = [op for op in (workload.next_op(worker, rng) for _ in range(4000)) if op.f == "read"]
    stale = sum(op.consistency == "stale" for op in reads)
    assert 0.4 < stale / len(reads) < 0.6
    plain = RegisterWorkload(key_count=2, rng=random.Random(1))
    assert all(plain.next_op(worker, rng).consistency == "strong" for _ in range(500))
    with pytest.raises(ValueError):
        make_workload("kv", 2, random.Random(0), stale_reads=0.5)
    with pytest.raises(ValueError):
        make_workload("kv", 2, random.Random(0), near_cache=True)


async def test_stale_reads_ask_for_at_least_the_version_the_client_saw() -> None:
    workload = RegisterWorkload(key_count=1, rng=random.Random(0), stale_read_fraction=1.0)
    worker = Worker(thread=0, process=0, node="n1")
    node = FakeNode([5, (b"7", 5), (b"9", 8), (b"9", 8)])
    assert (await workload.execute(PlannedOp("write", "r0", 7), worker, node)).version == 5
    stale = PlannedOp("read", "r0", None, consistency="stale")
    await workload.execute(stale, worker, node)
    await workload.execute(PlannedOp("read", "r0", None), worker, node)  # strong: saw 8
    completion = await workload.execute(stale, worker, node)
    assert completion == Completion("ok", 9, 8)
    assert node.calls == [
        ("put", "r0", b"7", None),
        ("get", "r0", "stale", 5),
        ("get", "r0", "strong", 0),
        ("get", "r0", "stale", 8),
    ]


async def test_near_cache_reads_send_the_held_version_and_keep_its_value() -> None:
    workload = RegisterWorkload(key_count=1, rng=random.Random(0), near_cache=True)
    worker = Worker(thread=0, process=0, node="n1")
    read = PlannedOp("read", "r0", None)
    node = FakeNode([(None, 0), 5, (None, 5, True), (b"9", 8, False)])
    assert await workload.execute(read, worker, node) == Completion("ok", None, 0)
    await workload.execute(PlannedOp("write", "r0", 7), worker, node)
    assert await workload.execute(read, worker, node) == Completion("ok", 7, 5, unchanged=True)
    assert await workload.execute(read, worker, node) == Completion("ok", 9, 8)
    assert node.calls == [
        ("get", "r0", "strong", 0),  # nothing held yet: a plain read
        ("put", "r0", b"7", None),
        ("get_if_changed", "r0", 5),
        ("get_if_changed", "r0", 5),
    ]
    assert worker.last_seen["r0"] == (9, 8)


def _stale_history(backwards: bool) -> History:
    """p0 writes 1 then 2; p2, which saw nothing, reads 1 stale (lagging is
    allowed); p1 reads 2 strong, then stale: 2 again, or 1 if `backwards`."""
    history = History()
    history.record(0, "invoke", "write", "r0", 1, node="n1")
    history.record(0, "ok", "write", "r0", 1, node="n1", version=1)
    history.record(0, "invoke", "write", "r0", 2, node="n1")
    history.record(0, "ok", "write", "r0", 2, node="n1", version=2)
    # p2 never saw the key: a stale read may lag behind p0's write (not
    # linearizable, and allowed).
    history.record(2, "invoke", "read", "r0", None, node="n2", consistency="stale")
    history.record(2, "ok", "read", "r0", 1, node="n2", consistency="stale", version=1)
    history.record(1, "invoke", "read", "r0", None, node="n3")
    history.record(1, "ok", "read", "r0", 2, node="n3", version=2)
    history.record(1, "invoke", "read", "r0", None, node="n3", consistency="stale")
    seen = (1, 1) if backwards else (2, 2)
    history.record(1, "ok", "read", "r0", seen[0], node="n3", consistency="stale", version=seen[1])
    return history


def test_stale_reads_are_left_out_of_the_linearizability_check() -> None:
    history = _stale_history(backwards=False)
    workload = RegisterWorkload()
    everything = check(checker_ops(history.events), workload.model)
    assert everything.verdict == NOT_LINEARIZABLE, "p2's lagging read is no linearizable read"
    assert check_history(history, workload).verdict == LINEARIZABLE
    assert check_stale_reads(history) == []
    assert count_stale_reads(history.events) == {"ok": 2, "fail": 0, "info": 0}
    assert final_verdict(LINEARIZABLE, False, False) == LINEARIZABLE


def test_a_stale_read_going_back_in_its_process_is_an_anomaly() -> None:
    history = _stale_history(backwards=True)
    problems = check_stale_reads(history)
    assert [(p.process, p.version, p.seen_version) for p in problems] == [(1, 1, 2)]
    assert check_history(history, RegisterWorkload()).verdict == LINEARIZABLE
    verdict = final_verdict(LINEARIZABLE, False, bool(problems))
    assert verdict == NOT_LINEARIZABLE
    assert exit_code_for(verdict, True) == 1


def test_command_line_takes_the_stale_read_share() -> None:
    args = parser().parse_args(["run", "--out", "x", "--stale-reads", "0.5", "--near-cache"])
    assert args.stale_reads == 0.5 and args.near_cache
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--out", "x", "--stale-reads", "1.5"])


# --- real clusters (slow) ------------------------------------------------------------------------


@pytest.mark.slow
async def test_stale_and_near_cache_run_under_kill_and_partition_is_valid(
    tmp_path: Path,
) -> None:
    """Half the reads stale, the strong ones sent with the version the client
    holds: the strong history is linearizable (so "unchanged" answers were
    right), no stale read went back, and both kinds of answer happened."""
    config = RunConfig(
        out_dir=tmp_path / "run",
        node_count=3,
        time_s=25.0,
        nemeses=("kill", "partition"),
        workload="register",
        stale_reads=0.5,
        near_cache=True,
        seed=5,
        clients_per_node=3,
    )
    with trio.fail_after(600):
        result = await run_test(config)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert result.valid, summary
    assert result.verdict == LINEARIZABLE, summary
    assert result.exit_code == 0
    assert result.summary["faults"], "the nemesis never struck"
    assert result.summary["stale_read_problems"] == []
    stale = result.summary["stale_reads"]
    strong = sum(c["ok"] for c in result.counts.values())
    assert stale["ok"] > 0, summary
    assert stale["ok"] < strong, "strong operations happened too"
    served = sum(
        s["cache"]["stale_served"]
        for s in result.summary["node_status"].values()
        if isinstance(s.get("cache"), dict)
    )
    assert served > 0, "the nodes answered stale reads without a quorum round"
    assert "stale reads:" in summary
    assert result.summary["unchanged_reads"] > 0, summary


class BackwardsStaleWorkload(RegisterWorkload):
    """Reports every 20th stale read as one version older than its client's
    floor: the run must call that an anomaly and exit 1."""

    def __init__(self) -> None:
        super().__init__(key_count=2, rng=random.Random(0), stale_read_fraction=0.5)
        self.stale_reads = 0

    async def execute(self, op: PlannedOp, worker: Worker, client: Any) -> Any:
        floor = worker.session_versions.get(op.key, 0)
        completion = await super().execute(op, worker, client)
        if op.consistency == "stale" and completion.type == "ok" and floor > 1:
            self.stale_reads += 1
            if self.stale_reads % 20 == 0:
                return dataclasses.replace(completion, version=floor - 1)
        return completion


@pytest.mark.slow
async def test_a_run_reports_a_stale_read_going_back(tmp_path: Path) -> None:
    config = RunConfig(
        out_dir=tmp_path / "run",
        time_s=6.0,
        warmup_s=2.0,
        tail_s=2.0,
        nemeses=(),
        seed=3,
        clients_per_node=2,
        stale_reads=0.5,
    )
    with trio.fail_after(600):
        result = await run_test(config, BackwardsStaleWorkload())
    assert result.valid, result.invalid_reasons
    assert result.summary["stale_read_problems"]
    assert result.verdict == NOT_LINEARIZABLE
    assert result.exit_code == 1
    assert "STALE READ WENT BACK" in (tmp_path / "run" / "summary.txt").read_text()
