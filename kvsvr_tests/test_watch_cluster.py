"""Watches on a 3-node cluster of real processes.

* A watcher sees every version of a key, in order, with its value.
* A partition watch sees the new rows of its partition key.
* The node a watcher is connected to is SIGKILLed mid-stream: the watcher
  goes on from another replica with no gap and no duplicate.
* A watcher that stops reading holds nothing on the node: the node's memory
  stays bounded while the key is rewritten, and when the watcher reads again
  past the kept history it gets `WatchCompacted`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.api import WatchEvent
from kvsvr.client import Client
from kvsvr.protocol.changes import HISTORY_PER_KEY_MAX
from kvsvr_tests.cluster_util import LocalCluster

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 10.0
DEADLINE_S = 60.0


async def _collect(client: Client, key: object, count: int, into: list[WatchEvent]) -> None:
    async with client.watch(key, start_version=0) as events:  # type: ignore[arg-type]
        async for event in events:
            into.append(event)
            if len(into) == count:
                return


def _check_run(events: list[WatchEvent], first: int, last: int) -> None:
    """Versions first..last, each once, each following the one before."""
    assert [e.version for e in events] == list(range(first, last + 1))
    previous = first - 1
    for event in events:
        assert event.previous_version == previous
        previous = event.version


async def test_a_watcher_sees_every_version_in_order(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            await client.wait_ready(timeout_s=DEADLINE_S)
            seen: list[WatchEvent] = []
            with trio.fail_after(DEADLINE_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_collect, client, "k", 30, seen)
                    for i in range(1, 31):
                        await client.put("k", b"v%d" % i)
            _check_run(seen, 1, 30)
            assert [e.value for e in seen] == [b"v%d" % i for i in range(1, 31)]
            # Without a start version a watch begins at the current version.
            async with client.watch("k") as events:
                assert events.version == 30
                await client.delete("k")
                with trio.fail_after(DEADLINE_S):
                    event = await events.__anext__()
            assert (event.version, event.deleted) == (31, True)
            # Resuming from a version delivers what follows it, once.
            async with client.watch("k", start_version=28) as events:
                resumed = [await events.__anext__() for _ in range(3)]
            assert [(e.version, e.deleted) for e in resumed] == [
                (29, False),
                (30, False),
                (31, True),
            ]


async def test_a_partition_watch_sees_new_rows(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            await client.wait_ready(timeout_s=DEADLINE_S)
            await client.put(("box", "old"), b"before")
            with trio.fail_after(DEADLINE_S):
                async with client.watch("box", partition=True) as events:
                    assert events.versions == {b"old": 1}
                    await client.put(("box", "m1"), b"hello")
                    await client.put(("other", "m1"), b"not this partition")
                    await client.put(("box", "old"), b"after")
                    got = [await events.__anext__() for _ in range(2)]
            assert sorted((e.key, e.version, e.value) for e in got) == [
                (b"m1", 1, b"hello"),
                (b"old", 2, b"after"),
            ]


async def test_a_watcher_resumes_on_another_node_when_its_node_dies(tmp_path: Path) -> None:
    total = 120
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            await client.wait_ready(timeout_s=DEADLINE_S)
            partition_map = await client.partition_map()
            victim = partition_map.replicas("default", b"k")[0].id  # the watcher's node
            seen: list[WatchEvent] = []
            written: list[int] = []
            seen_before_kill: list[int] = []

            async def write() -> None:
                i = 0
                while len(written) < total:
                    i += 1
                    try:
                        written.append(await client.put("k", b"v%d" % i))
                    except kvsvr.Unavailable:
                        await trio.sleep(0.05)  # outcome unknown: the watch tells
                    if len(written) == total // 3 and cluster.pid(victim) is not None:
                        # The watcher's requests were answered by the victim.
                        assert (await client.status(victim))["watches"]["answers"] > 0
                        seen_before_kill.append(len(seen))
                        await cluster.akill(victim)

            def caught_up() -> bool:
                """Every write done and its version seen (the event may come
                before the put's reply, so both sides ask)."""
                return len(written) >= total and bool(seen) and seen[-1].version >= max(written)

            async def read(events: kvsvr.Watch, done: trio.CancelScope) -> None:
                async for event in events:
                    seen.append(event)
                    if caught_up():
                        done.cancel()

            async def write_then_stop(done: trio.CancelScope) -> None:
                await write()
                if caught_up():
                    done.cancel()

            with trio.fail_after(DEADLINE_S * 2):
                async with client.watch("k", start_version=0) as events:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read, events, nursery.cancel_scope)
                        nursery.start_soon(write_then_stop, nursery.cancel_scope)
            assert caught_up()
            assert cluster.pid(victim) is None
            assert 0 < seen_before_kill[0] < len(seen)  # killed mid-stream
            others = [node for node in cluster.ids if node != victim]
            answered = [(await client.status(node))["watches"]["answers"] for node in others]
            assert sum(answered) > 0  # resumed on another node
            final = await client.get("k")
            assert final is not None
            _check_run(seen, 1, final.version)
            assert set(written) <= {e.version for e in seen}


async def test_a_watcher_that_stops_reading_costs_the_node_nothing(tmp_path: Path) -> None:
    # 50 MiB go through the key: more than the node keeps for watches in all
    # (watch_history_bytes_max, 32 MiB), so memory that followed the watcher's
    # lag instead of the bounds would show in the node's RSS.
    rewrites = 200
    value = b"x" * 256 * 1024
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            await client.wait_ready(timeout_s=DEADLINE_S)
            partition_map = await client.partition_map()
            node = partition_map.replicas("default", b"slow")[0].id
            await client.put("slow", b"first")
            before = (await client.status(node))["memory"]
            async with client.watch("slow", start_version=0) as events:
                with trio.fail_after(DEADLINE_S):
                    assert (await events.__anext__()).version == 1
                # The watcher stops reading while the key is rewritten.
                for _ in range(rewrites):
                    await client.put("slow", value)
                status = await client.status(node)
                grown = status["memory"]["rss_anon_bytes"] - before["rss_anon_bytes"]
                assert grown < 32 * 1024 * 1024
                assert status["watches"]["held"] == 0
                assert status["watches"]["log_bytes"] <= HISTORY_PER_KEY_MAX * (len(value) + 1024)
                with trio.fail_after(DEADLINE_S), pytest.raises(kvsvr.WatchCompacted):
                    await events.__anext__()


async def test_the_sync_iterator_and_the_command_line(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            await client.wait_ready(timeout_s=DEADLINE_S)
            await client.put("k", b"one")
            await client.put("k", b"two")
            await client.delete("k")

        def sync_watch() -> list[tuple[int, int, bytes | None]]:
            with kvsvr.SyncClient(cluster.addresses, secret=cluster.secret) as sync:
                with sync.watch("k", start_version=0) as events:
                    return [
                        (e.version, e.previous_version, e.value)
                        for _, e in zip(range(3), events, strict=False)
                    ]

        with trio.fail_after(DEADLINE_S):
            got = await trio.to_thread.run_sync(sync_watch)
        assert got == [(1, 0, b"one"), (2, 1, b"two"), (3, 2, None)]
        command = [
            sys.executable,
            "-m",
            "kvsvr",
            "watch",
            "--cluster",
            ",".join(cluster.addresses),
            "--secret",
            cluster.secret,
            "k",
            "--start-version",
            "1",
            "--count",
            "2",
        ]
        with trio.fail_after(DEADLINE_S):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
        assert done.stdout.decode().splitlines() == ["two\t(version 2)", "(deleted)\t(version 3)"]
        bad = await trio.run_process(
            [*command[:-2], "--count", "0"], capture_stderr=True, check=False
        )
        assert bad.returncode == 2 and b"--count" in bad.stderr
