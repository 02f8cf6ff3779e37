"""A node's RSS stays within its cache budget + 100 MiB while far more distinct
data than that goes through it (the node's memory bound, literally on VmRSS, scaled
down for CI: 256 MiB through a 16 MiB cache; `python -m bench.cache_memory`
runs the full 1 GiB through 64 MiB)."""

from __future__ import annotations

import pytest

from bench.cache_memory import HEADROOM_BYTES, measure, report

TOTAL_BYTES = 256 << 20
CACHE_BYTES_MAX = 16 << 20


@pytest.mark.slow
def test_node_rss_stays_within_cache_budget_plus_headroom() -> None:
    # Without a bounded cache the node would hold all of it, and without the
    # residency guard VmRSS would count every LMDB page read (RssFile): the
    # data is more than twice the bound, so the assertions below could fail.
    assert TOTAL_BYTES > 2 * (CACHE_BYTES_MAX + HEADROOM_BYTES)
    result = measure(TOTAL_BYTES, CACHE_BYTES_MAX, seed=7)
    print("\n".join(report(result)))
    assert result.total_bytes >= TOTAL_BYTES
    assert result.cache["evictions"] > 0
    assert result.cache["bytes_used"] <= CACHE_BYTES_MAX
    # The guard did the work: it trimmed the map, more than once.
    assert result.memory["trims"] > 1, report(result)
    bound_kib = (CACHE_BYTES_MAX + HEADROOM_BYTES) >> 10
    # The cache's memory bound on VmRSS (peak of samples every 50 ms), LMDB's mapped
    # file pages included; RssAnon (the node's own memory) is below it too.
    assert result.peak.vm_rss_kib <= bound_kib, report(result)
    assert result.peak.rss_anon_kib <= bound_kib, report(result)
    assert result.within_bound and result.anon_within_bound
