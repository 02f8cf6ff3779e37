"""The checker against someone else's answers: every file of the shared corpus.

The corpus (Porcupine's test data: Jepsen etcd logs and ``kv`` histories)
lives beside the repository clone, in ``../shared/checker-corpus``; it is not
copied into the repository.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from jepsen_like.check import choose_model
from jepsen_like.checker import LINEARIZABLE, check, read_history

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "checker-corpus"

#: The time bound for checking the whole corpus on a 2-core machine.
CORPUS_BUDGET_S = 60.0


def _expected() -> dict[str, bool]:
    verdicts: dict[str, bool] = {}
    for line in (CORPUS / "verdicts.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, verdict = line.split()
        verdicts[name] = verdict == "true"
    return verdicts


@pytest.fixture(scope="module")
def expected() -> dict[str, bool]:
    if not (CORPUS / "verdicts.txt").is_file():
        pytest.skip(f"checker corpus not found at {CORPUS} (expected beside the repo clone)")
    return _expected()


def test_corpus_verdicts_match(expected: dict[str, bool]) -> None:
    assert len(expected) == 108
    timings: dict[str, float] = {}
    wrong: list[str] = []
    start = time.monotonic()
    for name, linearizable in expected.items():
        history, fmt = read_history(CORPUS / name)
        model = choose_model(None, fmt, {op.f for op in history})
        t0 = time.monotonic()
        result = check(history, model, timeout_s=CORPUS_BUDGET_S)
        timings[name] = time.monotonic() - t0
        if (result.verdict == LINEARIZABLE) != linearizable or result.verdict == "unknown":
            wrong.append(f"{name}: got {result.verdict}, expected linearizable={linearizable}")
    total = time.monotonic() - start
    slowest = max(timings, key=lambda k: timings[k])
    print(
        f"\ncorpus: {len(timings)} files in {total:.2f} s; per file max "
        f"{timings[slowest]:.3f} s ({slowest}), median {statistics.median(timings.values()):.4f} s"
    )
    assert not wrong, "\n".join(wrong)
    assert total < CORPUS_BUDGET_S


def test_corpus_bad_files_name_bad_keys(expected: dict[str, bool]) -> None:
    """A violation names its keys, a prefix and where it breaks."""
    history, fmt = read_history(CORPUS / "kv" / "c10-bad.txt")
    result = check(history, choose_model(None, fmt, set()))
    assert result.verdict == "not linearizable"
    assert result.bad_keys
    for key in result.bad_keys:
        key_result = result.keys[key]
        assert key_result.failed_op is not None
        assert len(key_result.states) == len(key_result.prefix)
        assert len(key_result.prefix) < len(key_result.ops)
