"""The checker's size bound: 20,000 operations, 200 keys, 20 processes, < 30 s."""

from __future__ import annotations

import random
import time

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, RegisterModel, check
from jepsen_like.checker.gen import corrupt_read, sequential_history

BOUND_S = 30.0


def test_20000_ops_200_keys_20_processes_under_30_s() -> None:
    rng = random.Random(20_000)
    history = sequential_history(
        rng, 20_000, keys=200, processes=20, info_rate=0.02, ghost_rate=0.01
    )
    assert len({op.key for op in history}) == 200
    assert len({op.process for op in history if op.process < 20}) == 20
    start = time.monotonic()
    result = check(history, RegisterModel(), timeout_s=BOUND_S)
    elapsed = time.monotonic() - start
    print(f"\n20,000 ops / 200 keys / 20 processes: {result.verdict} in {elapsed:.2f} s")
    assert result.verdict == LINEARIZABLE
    assert elapsed < BOUND_S

    corrupted = corrupt_read(rng, history)
    assert corrupted is not None
    start = time.monotonic()
    bad = check(corrupted, RegisterModel(), timeout_s=BOUND_S)
    elapsed = time.monotonic() - start
    print(f"same with one corrupted read: {bad.verdict} in {elapsed:.2f} s")
    assert bad.verdict == NOT_LINEARIZABLE and len(bad.bad_keys) == 1
    assert elapsed < BOUND_S
