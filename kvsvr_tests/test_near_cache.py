"""The client's near cache: bounded by bytes, never older than what the quorum
chose. A strong read sends the cached version; the node still runs the quorum
read and answers "unchanged" (no value) only when the quorum chose exactly it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.api import GetReply
from kvsvr.client import NEAR_CACHE_ENTRY_OVERHEAD_BYTES, NearCache, NearEntry
from kvsvr.client_cache import near_reply
from kvsvr.errors import InvalidRequest, KvsvrError
from kvsvr.keys import encode_key
from kvsvr_tests.cluster_util import LocalCluster, node_connection

CLIENT_TIMEOUT_S = 20.0
NEAR_CACHE_BYTES = 1 << 20


def test_near_cache_is_lru_by_bytes_and_never_goes_back() -> None:
    entry_bytes = 3 + 100 + NEAR_CACHE_ENTRY_OVERHEAD_BYTES
    cache = NearCache(entry_bytes * 2)
    cache.put("t", b"aaa", 1, b"a" * 100)
    cache.put("t", b"bbb", 1, b"b" * 100)
    assert cache.get("t", b"aaa", 0) is not None  # now the most recent
    cache.put("t", b"ccc", 1, b"c" * 100)
    assert cache.get("t", b"bbb", 0) is None and cache.stats.evictions == 1
    assert cache.bytes_used <= cache.bytes_max and len(cache) == 2
    cache.put("t", b"aaa", 3, b"new")
    cache.put("t", b"aaa", 2, b"old")
    assert cache.get("t", b"aaa", 0) == NearEntry(3, b"new", None)
    cache.put("t", b"aaa", 4, None)  # a delete: nothing to keep
    assert cache.get("t", b"aaa", 0) is None
    cache.put("t", b"big", 5, b"x" * (entry_bytes * 2))  # larger than the budget
    assert cache.get("t", b"big", 0) is None and cache.bytes_used <= cache.bytes_max
    cache.put("t", b"ttl", 1, b"v", expires_at_ms=1000)
    assert cache.get("t", b"ttl", 999) is not None and len(cache) == 2
    assert cache.get("t", b"ttl", 1000) is None and len(cache) == 1  # expired: dropped


def test_an_unchanged_reply_must_name_the_cached_version() -> None:
    near = NearEntry(4, b"cached", None)
    assert near_reply(GetReply.from_wire({"version": 4, "unchanged": True}), near) == (
        4,
        b"cached",
        None,
    )
    assert near_reply(GetReply.from_wire({"version": 5, "value": b"new"}), near) == (
        5,
        b"new",
        None,
    )
    with pytest.raises(KvsvrError, match="unchanged"):
        near_reply(GetReply.from_wire({"version": 5, "unchanged": True}), near)


def test_near_cache_budget_is_checked() -> None:
    with pytest.raises(InvalidRequest):
        kvsvr.SyncClient("127.0.0.1:1", near_cache_bytes=-1)


async def _node_unchanged(cluster: LocalCluster) -> int:
    total = 0
    async with cluster.connect(CLIENT_TIMEOUT_S) as client:
        for status in await client.cluster_status():
            total += status["cache"]["unchanged"]
    return total


async def test_near_cache_sees_other_clients_writes_and_saves_values(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        with trio.fail_after(120):
            async with (
                kvsvr.connect(
                    cluster.addresses,
                    secret=cluster.secret,
                    timeout_s=CLIENT_TIMEOUT_S,
                    near_cache_bytes=NEAR_CACHE_BYTES,
                ) as cached,
                kvsvr.connect(
                    cluster.addresses, secret=cluster.secret, timeout_s=CLIENT_TIMEOUT_S
                ) as other,
            ):
                near = cached.near_cache
                assert near is not None and other.near_cache is None
                first = await cached.put("k", b"v1")
                assert await cached.get("k") == kvsvr.Item(b"v1", first)
                assert near.stats.unchanged == 1, "its own write is cached: no value moved"

                # Another client's writes are seen at once: the quorum decides.
                for round_ in range(20):
                    value = f"from other {round_}".encode()
                    version = await other.put("k", value)
                    assert await cached.get("k") == kvsvr.Item(value, version)
                    assert await cached.get("k") == kvsvr.Item(value, version)
                assert near.stats.transferred == 20
                assert near.stats.unchanged == 21

                await other.delete("k")
                assert await cached.get("k") is None
                assert near.get("default", encode_key(b"k"), 0) is None

                # Stale reads and other keys fill it too; a miss is counted.
                await other.put("s", b"stale")
                assert (await cached.get("s", consistency="stale")) is not None
                assert (await cached.get("s")) == kvsvr.Item(b"stale", 1)
                assert near.stats.unchanged == 22
                assert await _node_unchanged(cluster) == near.stats.unchanged

        # The node refuses a malformed cached version (before any quorum work).
        async with node_connection(cluster.address("n1"), cluster.secret) as node:
            body = {"table": "default", "key": encode_key(b"k"), "cached_version": "7"}
            with pytest.raises(InvalidRequest, match="cached_version"):
                await node.connection.request("get", body)
