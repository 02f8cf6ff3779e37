"""Catching up with real node processes: hinted handoff, anti-entropy, rebuilding
a wiped replica, deletes that stay deleted, eventual tables across a partition.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import kvsvr
from kvsvr.config import TableConfig
from kvsvr.keys import encode_key
from kvsvr.protocol.state import Row
from kvsvr.storage import Storage
from kvsvr_tests.cluster_util import LocalCluster, node_connection

pytestmark = pytest.mark.slow

TABLES = (TableConfig("default"), TableConfig("feed", consistency="eventual"))
CLIENTS = 64


async def _write_all(
    client: kvsvr.Client, keys: list[str], value_of: Any, *, table: str = "default"
) -> None:
    pending = list(keys)

    async def worker() -> None:
        while pending:
            key = pending.pop()
            for attempt in range(20):
                try:
                    await client.put(key, value_of(key), table=table)
                    break
                except kvsvr.Unavailable:
                    if attempt == 19:
                        raise
                    await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(worker)


async def _local_rows(
    cluster: LocalCluster, node_id: str, keys: list[str], *, table: str = "default"
) -> dict[str, bytes | None]:
    """What `node_id`'s own replica holds for each key ("local" reads)."""
    found: dict[str, bytes | None] = {}
    pending = list(keys)
    async with node_connection(cluster.address(node_id), cluster.secret) as node:

        async def worker() -> None:
            while pending:
                key = pending.pop()
                _, found[key] = await node.get(key, table=table, consistency="local")

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(worker)
    return found


async def _status(cluster: LocalCluster, node_id: str) -> dict[str, Any]:
    async with cluster.connect() as client:
        return await client.status(node_id)


async def _wait_until_holds(
    cluster: LocalCluster,
    node_id: str,
    expected: dict[str, bytes | None],
    deadline_s: float,
    *,
    table: str = "default",
) -> float:
    """Seconds until `node_id`'s replica holds every expected value; fails with
    what is still missing after `deadline_s`."""
    started = time.monotonic()
    missing = dict(expected)
    while True:
        local = await _local_rows(cluster, node_id, list(missing), table=table)
        missing = {k: v for k, v in missing.items() if local[k] != v}
        if not missing:
            return time.monotonic() - started
        if time.monotonic() - started > deadline_s:
            status = await _status(cluster, node_id)
            raise AssertionError(
                f"{node_id} still misses {len(missing)} of {len(expected)} rows after "
                f"{deadline_s} s, e.g. {list(missing)[:3]}; replication: {status['replication']}"
            )
        await trio.sleep(0.5)


async def test_a_restarted_node_gets_every_write_it_missed_from_hints(tmp_path: Path) -> None:
    """Kill one of three nodes, write 10,000 keys, restart it: within 30 s its
    own replica holds all of them, and the hints for it are drained. Anti-entropy
    is slowed to once an hour so that only hints can do it."""
    settings = {"anti_entropy_interval_s": 3600.0}
    with LocalCluster(tmp_path, nodes=3, tables=TABLES, settings=settings) as cluster:
        cluster.start_all()
        keys = [f"k{i:05d}" for i in range(10_000)]
        async with cluster.connect() as client:
            await cluster.akill("n3")
            await _write_all(client, keys, lambda k: k.encode())
            pending = 0
            for node_id in ("n1", "n2"):
                hints = (await client.status(node_id))["replication"]["hints"]["n3"]
                pending += hints["pending"]
            assert pending >= len(keys), f"only {pending} hints kept for n3"
            shown = await trio.run_process(
                [sys.executable, "-m", "kvsvr", "status", "--config", str(cluster.config_path)],
                capture_stdout=True,
                check=False,
            )
            text = shown.stdout.decode()
            assert "hints pending:" in text and "n3=0" not in text.split("catch-up")[1], text
            await cluster.astart("n3")
            took = await _wait_until_holds(cluster, "n3", {k: k.encode() for k in keys}, 30.0)
            print(f"n3 held all {len(keys)} keys {took:.1f} s after its restart")
            deadline = time.monotonic() + 30.0
            while True:
                left = 0
                for node_id in ("n1", "n2"):
                    status = await client.status(node_id)
                    left += status["replication"]["hints"]["n3"]["pending"]
                if left == 0:
                    break
                assert time.monotonic() < deadline, f"{left} hints for n3 never drained"
                await trio.sleep(0.2)


def _bulk_load(cluster: LocalCluster, rows: int) -> dict[str, bytes]:
    """Write `rows` chosen rows straight into every replica's LMDB (the nodes
    are not running): the state a long-running cluster would have."""
    expected = {f"r{i:06d}": f"value-{i}".encode() for i in range(rows)}
    for node in cluster.config.nodes:
        directory = cluster.config.node_data_dir(node.id)
        directory.mkdir(parents=True, exist_ok=True)
        storage = Storage.open(
            directory, tables=[t.name for t in cluster.config.tables], map_size_bytes=1 << 30
        )
        try:

            async def load(storage: Storage = storage) -> None:
                async with trio.open_nursery() as nursery:
                    await nursery.start(storage.run)
                    items = list(expected.items())
                    for at in range(0, len(items), 4000):
                        await storage.write(
                            [
                                ("default", encode_key(k.encode()), Row(version=1, value=v))
                                for k, v in items[at : at + 4000]
                            ]
                        )
                    await storage.aclose()

            trio.run(load)
        finally:
            storage.close()
    return expected


async def test_a_wiped_node_is_rebuilt_from_its_peers(tmp_path: Path) -> None:
    """Stop a node, delete its data directory, start it: every one of 100,000
    rows is back in its replica within 60 s, and it voted on nothing before."""
    with LocalCluster(tmp_path, nodes=3) as cluster:
        expected = await trio.to_thread.run_sync(_bulk_load, cluster, 100_000)
        cluster.start_all()
        async with cluster.connect() as client:
            await _write_all(client, ["r000007"], lambda _: b"changed")  # a version 2
            expected["r000007"] = b"changed"
        await cluster.astop("n2")
        shutil.rmtree(cluster.config.node_data_dir("n2"))
        started = time.monotonic()
        await trio.to_thread.run_sync(lambda: cluster.start("n2"))
        deadline = started + 60.0
        while True:
            state = (await _status(cluster, "n2"))["replication"]["state"]
            if state == "ready":
                break
            assert time.monotonic() < deadline, f"n2 still {state} after 60 s"
            await trio.sleep(0.2)
        took = time.monotonic() - started
        print(f"n2 rebuilt and ready {took:.1f} s after its start")
        sample = [*list(expected)[::97], "r000007"]
        local = await _local_rows(cluster, "n2", sample)
        wrong = {k: local[k] for k in sample if local[k] != expected[k]}
        assert not wrong, f"{len(wrong)} rows differ on the rebuilt n2: {list(wrong.items())[:3]}"
        status = await _status(cluster, "n2")
        assert status["replication"]["rows_rebuilt"] >= len(expected)
        # Every row: stop the node and read its LMDB (a local read of each of
        # 100,000 keys over RPC would take longer than the rebuild).
        await cluster.astop("n2")
        held = await trio.to_thread.run_sync(_read_all, cluster, "n2", list(expected))
        wrong = {k: held[k] for k, v in expected.items() if held[k] != v}
        assert not wrong, f"{len(wrong)} rows differ on the rebuilt n2: {list(wrong.items())[:3]}"


def _read_all(cluster: LocalCluster, node_id: str, keys: list[str]) -> dict[str, bytes | None]:
    storage = Storage.open(
        cluster.config.node_data_dir(node_id),
        tables=[t.name for t in cluster.config.tables],
        map_size_bytes=1 << 30,
    )
    try:
        held: dict[str, bytes | None] = {}
        for key in keys:
            row = storage.read_row("default", encode_key(key.encode()))
            held[key] = None if row is None else row.value
        return held
    finally:
        storage.close()


@pytest.mark.parametrize("table", ["default", "feed"])
@pytest.mark.parametrize("hints_max", [2_000_000, 0])
async def test_a_delete_stays_deleted_when_a_node_that_missed_it_rejoins(
    tmp_path: Path, table: str, hints_max: int
) -> None:
    """n3 holds the keys, misses their deletion (down), comes back: the keys
    stay deleted in every read and on n3's own replica, whether the delete
    reaches it by hint or (hints off) by anti-entropy."""
    settings = {"hints_max": hints_max, "anti_entropy_interval_s": 1.0}
    with LocalCluster(tmp_path, nodes=3, tables=TABLES, settings=settings) as cluster:
        cluster.start_all()
        keys = [f"d{i:03d}" for i in range(200)]
        async with cluster.connect() as client:
            await _write_all(client, keys, lambda k: b"old " + k.encode(), table=table)
            await _wait_until_holds(
                cluster, "n3", {k: b"old " + k.encode() for k in keys}, 30.0, table=table
            )
            await cluster.astop("n3")
            for key in keys:
                await client.delete(key, table=table)
            await cluster.astart("n3")
            await _wait_until_holds(cluster, "n3", dict.fromkeys(keys), 30.0, table=table)
            # And it stays so: a few anti-entropy passes later, from every node.
            await trio.sleep(3.0)
            for node_id in cluster.ids:
                local = await _local_rows(cluster, node_id, keys, table=table)
                back = [k for k in keys if local[k] is not None]
                assert not back, f"{len(back)} deleted keys came back on {node_id}: {back[:3]}"
            for key in keys[:50]:
                assert await client.get(key, table=table) is None


async def test_eventual_writes_on_both_sides_of_a_partition_converge(tmp_path: Path) -> None:
    """Writers on both sides of a partition ({n1} | {n2, n3}) write the same
    keys of an eventual table; after healing every replica holds the same
    value for every key, the last writer's by the hybrid clock."""
    from jepsen_like.harness.cluster import open_cluster
    from jepsen_like.harness.partitions import cut_between

    settings = {"anti_entropy_interval_s": 2.0}
    keys = [f"e{i:03d}" for i in range(300)]
    async with open_cluster(tmp_path, 3, tables=TABLES, settings=settings) as cluster:
        assert cluster.network is not None
        cluster.network.cut(cut_between([["n1"], ["n2", "n3"]]))
        secret = cluster.secret

        async def write(node_id: str, round_: int) -> None:
            host, port = cluster.address(node_id)
            async with node_connection(f"{host}:{port}", secret) as node:
                for key in keys:
                    await node.put(key, f"{node_id} round {round_}".encode(), table="feed")

        for round_ in range(3):
            async with trio.open_nursery() as nursery:
                for node_id in ("n1", "n2"):
                    nursery.start_soon(write, node_id, round_)
        cluster.network.heal()
        deadline = time.monotonic() + 60.0
        while True:
            views: dict[str, dict[str, bytes | None]] = {}
            for node_id in cluster.node_ids:
                host, port = cluster.address(node_id)
                async with node_connection(f"{host}:{port}", secret) as node:
                    views[node_id] = {}
                    for key in keys:
                        views[node_id][key] = (await node.get(key, table="feed"))[1]
            differing = [k for k in keys if len({views[n][k] for n in views}) > 1]
            if not differing:
                break
            assert time.monotonic() < deadline, (
                f"{len(differing)} keys still differ 60 s after healing, e.g. "
                f"{[(k, {n: views[n][k] for n in views}) for k in differing[:2]]}"
            )
            await trio.sleep(0.5)
        values = {views["n1"][k] for k in keys}
        assert values <= {b"n1 round 2", b"n2 round 2"}, values


async def test_expired_rows_and_old_tombstones_are_purged_and_stay_gone(tmp_path: Path) -> None:
    """Rows of tables with a TTL read as absent once expired and are purged in
    the background (a strong row keeps its version, an eventual one goes); an
    eventual tombstone older than its grace is deleted once every replica has
    it, and the deleted key does not come back."""
    tables = (
        TableConfig("default", ttl_s=1.0),
        TableConfig("feed", consistency="eventual", ttl_s=1.0),
        TableConfig("log", consistency="eventual"),
    )
    settings = {"anti_entropy_interval_s": 0.5, "hint_ttl_s": 1.0, "tombstone_grace_s": 2.0}
    with LocalCluster(tmp_path, nodes=3, tables=tables, settings=settings) as cluster:
        cluster.start_all()
        keys = [f"t{i:03d}" for i in range(50)]
        async with cluster.connect() as client:
            await _write_all(client, keys, lambda k: k.encode(), table="default")
            await _write_all(client, keys, lambda k: k.encode(), table="feed")
            await _write_all(client, keys, lambda k: k.encode(), table="log")
            for key in keys[:25]:
                await client.delete(key, table="log")
            deadline = time.monotonic() + 60.0
            while True:
                purged = tombstones = 0
                for node_id in cluster.ids:
                    ae = (await client.status(node_id))["replication"]["anti_entropy"]
                    purged += ae["rows_purged"]
                    tombstones += ae["tombstones_purged"]
                # 50 strong + 50 eventual expired rows and 25 tombstones, on 3 replicas.
                if purged >= 3 * 100 and tombstones >= 3 * 25:
                    break
                assert time.monotonic() < deadline, (purged, tombstones)
                await trio.sleep(0.5)
            for table in ("default", "feed"):
                for node_id in cluster.ids:
                    local = await _local_rows(cluster, node_id, keys, table=table)
                    assert all(v is None for v in local.values())
                assert await client.get(keys[0], table=table) is None
            await trio.sleep(2.0)  # more passes: nothing comes back
            for node_id in cluster.ids:
                local = await _local_rows(cluster, node_id, keys, table="log")
                assert [k for k in keys if local[k] is not None] == keys[25:]
            # A strong expired key keeps its version: a new write goes above it.
            assert await client.put(keys[0], b"again", table="default") == 2
