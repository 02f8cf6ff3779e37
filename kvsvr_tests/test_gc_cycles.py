"""The hot paths leave no reference cycles behind.

A node raises the cyclic collector's threshold (`server.tune_gc`) on the
premise that requests die by reference count. A put once left a cycle of ~20
objects (the task-free write and its queued write's wake-up callback), and
the collector's runs took ~4% of a node's CPU under strong writes; an error
reply raised in the client (a Conflict) left one too. Here three nodes and a
client share one process: puts, strong and stale gets, failed conditions,
deletes, with the collector off, then one collection saving what it finds."""

from __future__ import annotations

import dataclasses
import gc
from collections import Counter
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.config import local_cluster
from kvsvr.node.server import serve_node
from kvsvr_tests.cluster_util import free_base_port

CLIENTS = 8
OPERATIONS = 40  # per client, each a put, two gets, a failed conditional put
KEYS = 10  # per client, so keys are written again (the fast path) and read back


def test_puts_and_gets_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    base = free_base_port(3)
    config = dataclasses.replace(local_cluster(3, base, secret="s"), data_dir=tmp_path)
    addresses = [f"127.0.0.1:{base + i}" for i in (1, 2, 3)]
    garbage: Counter[str] = Counter()

    async def work(client: kvsvr.Client, worker: int) -> None:
        for index in range(OPERATIONS):
            key = b"k%d-%d" % (worker, index % KEYS)
            await client.put(key, b"v" * 100)
            item = await client.get(b"k%d-%d" % (worker, (index * 7) % KEYS))
            assert item is None or item.value == b"v" * 100
            await client.get(b"k%d-%d" % (worker, (index * 3) % KEYS), consistency="stale")
            # A condition that fails: the Conflict travels back as an error
            # reply and is raised in the client; then a delete.
            with pytest.raises(kvsvr.Conflict):
                await client.put(key, b"w", if_version=10**9)
            if index % 4 == 3:
                await client.delete(key)

    async def load(client: kvsvr.Client) -> None:
        async with trio.open_nursery() as nursery:
            for worker in range(CLIENTS):
                nursery.start_soon(work, client, worker)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for node in ("n1", "n2", "n3"):
                await nursery.start(serve_node, config, node)
            async with kvsvr.connect(addresses, secret="s") as client:
                await client.wait_ready()
                await load(client)  # warm: connections, leases, caches
                gc.collect()
                gc.disable()
                gc.set_debug(gc.DEBUG_SAVEALL)
                try:
                    await load(client)
                    gc.collect()
                    garbage.update(type(o).__qualname__ for o in gc.garbage)
                finally:
                    gc.set_debug(0)
                    gc.garbage.clear()
                    gc.enable()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not garbage, f"cyclic garbage by type: {garbage.most_common(12)}"
