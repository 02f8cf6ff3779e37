"""The floor under every write: raw LMDB, one fsynced write transaction per put.

The single-node benchmark compares the store's group-committed write rate with
this: without batching, every put pays a whole fsync.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from kvsvr.storage.engine import open_environment

# Enough for `count` puts of small values and LMDB's copy-on-write pages;
# the map is address space, not disk.
BENCH_MAP_SIZE_BYTES = 1 << 30
# Fixed seed: every run writes the same bytes.
VALUE_SEED = 20240601
# A single put's value bigger than this is not what this benchmark measures.
VALUE_BYTES_MAX = 1 << 20


def raw_lmdb_put_rate(path: str | Path, count: int, value_bytes: int = 100) -> dict[str, Any]:
    """Put `count` distinct keys into a fresh environment at directory `path`
    (same flags as `Storage`), each in its own write transaction (one fsync each).

    Returns ops, seconds, ops_per_s, p50_ms, p99_ms, max_ms and value_bytes.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if not 0 <= value_bytes <= VALUE_BYTES_MAX:
        raise ValueError(f"value_bytes must be in [0, {VALUE_BYTES_MAX}]")
    value = random.Random(VALUE_SEED).randbytes(value_bytes)
    env = open_environment(path, map_size_bytes=BENCH_MAP_SIZE_BYTES)
    latencies_s: list[float] = []
    try:
        db = env.open_db(b"t:bench", create=True)
        started_s = time.perf_counter()
        for index in range(count):
            key = b"key-%012d" % index
            put_started_s = time.perf_counter()
            with env.begin(write=True, db=db) as txn:
                txn.put(key, value)
            latencies_s.append(time.perf_counter() - put_started_s)
        elapsed_s = time.perf_counter() - started_s
    finally:
        env.close()
    assert len(latencies_s) == count
    latencies_s.sort()
    return {
        "ops": count,
        "seconds": elapsed_s,
        "ops_per_s": count / elapsed_s if elapsed_s > 0 else math.inf,
        "p50_ms": _percentile(latencies_s, 0.50) * 1000,
        "p99_ms": _percentile(latencies_s, 0.99) * 1000,
        "max_ms": latencies_s[-1] * 1000,
        "value_bytes": value_bytes,
    }


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    assert sorted_values and 0 < fraction <= 1
    rank = math.ceil(fraction * len(sorted_values))
    return sorted_values[rank - 1]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        print(raw_lmdb_put_rate(directory, 2000))
