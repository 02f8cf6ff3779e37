"""The deterministic simulator: seeds replay exactly, and a batch of seeds of the
real protocol core under faults is linearizable (CI runs at least 200)."""

from __future__ import annotations

import sys

import pytest

from jepsen_like.sim.__main__ import main
from jepsen_like.sim.check import check_seed
from jepsen_like.sim.run import SimConfig, simulate

# CI runs this many seeds of 500 operations each (at least 200 keeps the
# sweep meaningful; 10,000 run outside CI: `python -m jepsen_like.sim`).
CI_SEEDS = 240


def test_a_seed_replays_exactly() -> None:
    first: list[str] = []
    second: list[str] = []
    simulate(7, SimConfig(operations=300), first.append)
    simulate(7, SimConfig(operations=300), second.append)
    assert len(first) > 1000
    assert first == second


def test_different_seeds_differ() -> None:
    assert simulate(1).history != simulate(2).history


def test_seeds_inject_faults_and_make_progress() -> None:
    verdict = check_seed(3)
    assert verdict.ok
    assert verdict.sim.faults, "the nemesis acted"
    assert verdict.sim.counts.get("ok", 0) > 100, "operations succeeded despite the faults"
    assert verdict.sim.counts.get("info", 0) > 0, "some outcomes were unknown"


@pytest.mark.parametrize("nodes", [3, 5])
def test_many_seeds_are_linearizable(nodes: int, capsys: pytest.CaptureFixture[str]) -> None:
    seeds = CI_SEEDS if nodes == 3 else CI_SEEDS // 4
    code = main(["--seeds", str(seeds), "--nodes", str(nodes), "--start-seed", str(nodes * 100000)])
    out = capsys.readouterr().out
    sys.stdout.write(out)
    assert code == 0, out
    assert f"{seeds} seeds" in out
    assert "0 not linearizable, 0 unknown" in out


# ------------------------------------------------ read leases and clock rates


def test_lease_holders_answer_strong_reads_with_no_message() -> None:
    verdict = check_seed(8)
    assert verdict.ok
    assert verdict.sim.local_reads > 10
    assert simulate(8, SimConfig(read_leases=False)).local_reads == 0


@pytest.mark.parametrize("seed", [19, 300017])
def test_a_holder_never_serves_a_version_its_own_accepts_moved_past(seed: int) -> None:
    """Regressions. Seed 19: a holder kept the version a read returned
    while its own write, which ended during that read, had chosen a later
    one. Seed 300017: a holder's read recovered another coordinator's
    proposal (an Accept of its own) and kept serving the version before it.
    Both served stale local reads."""
    assert check_seed(seed).ok


# A holder whose clock runs 5x slow believes its lease lasts 5x longer than
# the replicas hold their grants: far outside `clock_drift_max`. These seeds
# then end in stale local reads; within the bound the same seeds are clean.
OUT_OF_BOUND_SEEDS = (20, 30)


@pytest.mark.parametrize("seed", OUT_OF_BOUND_SEEDS)
def test_a_holder_clock_five_times_slow_is_caught(seed: int) -> None:
    assert check_seed(seed).ok
    broken = check_seed(seed, SimConfig(clock_rates={1: 0.2}))
    assert not broken.ok, "the checker finds the stale reads a broken clock allows"
