"""The row cache: bounded by bytes, LRU, never older than a quorum for strong reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from kvsvr.config import local_cluster
from kvsvr.keys import encode_key
from kvsvr.node.cache import ENTRY_OVERHEAD_BYTES, RowCache
from kvsvr.node.server import Node, serve_node
from kvsvr.protocol.coordinator import Mutation
from kvsvr_tests.build_mode import pure_python_only
from kvsvr_tests.cluster_util import free_base_port
from kvsvr_tests.test_protocol import KEY, Cluster, coordinator


def test_cache_evicts_least_recently_used_within_its_bytes() -> None:
    entry_bytes = 3 + 100 + ENTRY_OVERHEAD_BYTES
    cache = RowCache(bytes_max=entry_bytes * 3)
    for name in (b"aaa", b"bbb", b"ccc"):
        cache.put("t", name, 1, b"x" * 100, None, 0.0)
    assert cache.get("t", b"aaa") is not None  # now the most recent
    cache.put("t", b"ddd", 1, b"x" * 100, None, 0.0)
    assert cache.get("t", b"bbb") is None, "the least recently used went"
    assert {cache.get("t", k) is not None for k in (b"aaa", b"ccc", b"ddd")} == {True}
    assert cache.bytes_used <= cache.bytes_max
    assert cache.stats.evictions == 1


def test_the_budget_never_used_shrinks_with_the_peak_not_back() -> None:
    entry_bytes = 3 + 100 + ENTRY_OVERHEAD_BYTES
    cache = RowCache(bytes_max=entry_bytes * 4)
    assert cache.budget_never_used() == entry_bytes * 4
    cache.put("t", b"aaa", 1, b"x" * 100, None, 0.0)
    cache.put("t", b"bbb", 1, b"x" * 100, None, 0.0)
    assert cache.budget_never_used() == entry_bytes * 2
    cache.invalidate("t", b"aaa")
    cache.invalidate("t", b"bbb")
    # Emptied, but the memory may still be the process's: nothing comes back.
    assert cache.bytes_used == 0 and cache.budget_never_used() == entry_bytes * 2
    for name in (b"ccc", b"ddd", b"eee", b"fff", b"ggg"):
        cache.put("t", name, 1, b"x" * 100, None, 0.0)
    assert cache.bytes_peak == cache.bytes_max and cache.budget_never_used() == 0
    assert RowCache(bytes_max=0).budget_never_used() == 0


def test_cache_never_goes_back_a_version_and_can_be_off() -> None:
    cache = RowCache(bytes_max=1 << 20)
    cache.put("t", b"k", 5, b"new", None, 0.0)
    cache.put("t", b"k", 4, b"old", None, 0.0)
    entry = cache.get("t", b"k")
    assert entry is not None and (entry.version, entry.value) == (5, b"new")
    off = RowCache(bytes_max=0)
    off.put("t", b"k", 1, b"v", None, 0.0)
    assert off.get("t", b"k") is None and len(off) == 0


@given(
    versions=st.integers(1, 6),
    cached_version=st.integers(0, 8),
    reach=st.sampled_from([{1, 2}, {2, 3}, {1, 3}, {1, 2, 3}]),
)
def test_strong_read_is_never_answered_from_an_older_cache_entry(
    versions: int, cached_version: int, reach: set[int]
) -> None:
    """Whatever the coordinator has cached, the read answers the quorum's latest
    chosen version, and uses the cache only when it holds exactly that version."""
    cluster = Cluster()
    writer = coordinator(1)
    for n in range(1, versions + 1):
        cluster.run(writer.write("t", KEY, [1, 2, 3], Mutation(b"v%d" % n), 0), {1, 2, 3})
    cached = (cached_version, b"cached-%d" % cached_version, None)
    outcome = cluster.run(coordinator(2).read("t", KEY, [1, 2, 3], 0, -1, cached), reach)
    assert outcome.status == "ok"
    assert outcome.version == versions
    if outcome.cache_hit:
        assert cached_version == versions
        assert outcome.value == cached[1]
    else:
        assert outcome.value == b"v%d" % versions
    if cached_version == versions:
        assert outcome.cache_hit, "a matching entry is used, so no value moves"


@pure_python_only
async def test_a_cache_hit_skips_the_coordinators_own_version_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node (replication 1, in process): a strong get with the key cached
    reads the local row once (as the replica), not twice (also as the
    coordinator looking up the version it knows), and answers the same.
    Read leases are off: with one, the warm get reads nothing (next test)."""
    config = dataclasses.replace(
        local_cluster(1, free_base_port(1), secret="s"), data_dir=tmp_path, read_leases=False
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(serve_node, config, "n1")
        reads = 0
        read_row = node.storage.read_row

        def counting_read_row(table: str, key: bytes) -> Any:
            nonlocal reads
            reads += 1
            return read_row(table, key)

        monkeypatch.setattr(node.storage, "read_row", counting_read_row)
        key = encode_key(b"k")
        await node.client_put({"table": "default", "key": key, "value": b"v"})
        node.cache.invalidate("default", key)
        reads = 0
        cold = await node.client_get({"table": "default", "key": key})
        assert reads == 2 and node.cache.stats.misses == 1
        reads = 0
        warm = await node.client_get({"table": "default", "key": key})
        assert reads == 1 and node.cache.stats.hits == 1
        assert cold == warm == {"version": 1, "value": b"v"}
        nursery.cancel_scope.cancel()


@pure_python_only
async def test_a_leased_key_is_read_from_the_cache_with_no_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strong get that took a read lease leaves the key's value in the
    cache; the next strong get is answered from it without reading a row or
    sending a message, until a write of this node ends the lease."""
    config = dataclasses.replace(local_cluster(1, free_base_port(1), secret="s"), data_dir=tmp_path)
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(serve_node, config, "n1")
        reads = 0
        read_row = node.storage.read_row

        def counting_read_row(table: str, key: bytes) -> Any:
            nonlocal reads
            reads += 1
            return read_row(table, key)

        monkeypatch.setattr(node.storage, "read_row", counting_read_row)
        key = encode_key(b"k")
        await node.client_put({"table": "default", "key": key, "value": b"v"})
        cold = await node.client_get({"table": "default", "key": key})
        assert node.coordinator.stats.leases_taken == 1
        reads = 0  # the replica reads its row for every request of a round
        warm = await node.client_get({"table": "default", "key": key})
        assert reads == 0 and node.api.leased_reads == 1
        assert cold == warm == {"version": 1, "value": b"v"}
        await node.client_put({"table": "default", "key": key, "value": b"w"})
        after = await node.client_get({"table": "default", "key": key})
        assert after == {"version": 2, "value": b"w"} and node.api.leased_reads == 1
        assert node.lease_status()["held"] == 1  # the read after the write took a new one
        nursery.cancel_scope.cancel()
