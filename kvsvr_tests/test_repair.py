"""A corrupt row on one replica is refused, never served, and rebuilt from its
peers (real node processes, a real LMDB file damaged on disk)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from jepsen_like.harness.client import NodeClient
from jepsen_like.harness.cluster import open_cluster
from jepsen_like.harness.corrupt import corrupt_file
from kvsvr.errors import CorruptRow, KvsvrError

pytestmark = pytest.mark.slow

# Generous: the machine running the tests may be loaded.
REPAIR_DEADLINE_S = 60.0
KEYS = [f"row-{i}" for i in range(20)]


async def test_corrupt_row_is_refused_then_rebuilt_from_peers(tmp_path: Path) -> None:
    rng = random.Random(5)
    async with open_cluster(tmp_path / "cluster", 3, proxies=False, rng=rng) as cluster:
        async with trio.open_nursery() as nursery:
            clients = {
                node: NodeClient(node, cluster.address(node), cluster.secret, nursery)
                for node in cluster.node_ids
            }
            for index, key in enumerate(KEYS):
                await clients["n1"].put(key, b"value-%d" % index)
                await clients["n2"].put(key, b"value-%d-again" % index)

            # Every replica has every row (strong reads repair laggards).
            for key in KEYS:
                await clients["n3"].get(key)
            await cluster.stop("n3")
            damage = corrupt_file(cluster.data_file("n3"), rng, keys=KEYS, keys_max=3)
            damaged = list(damage.keys)
            assert damaged, "the corruption found rows to damage"
            await cluster.start("n3")

            # Strong reads through the damaged node stay correct (its copy is refused).
            for key in KEYS:
                value, version = await clients["n3"].get(key)
                assert value is not None and value.endswith(b"-again") and version == 2

            # Its own copy is never served damaged, and comes back whole.
            with trio.fail_after(REPAIR_DEADLINE_S):
                for key in damaged:
                    while True:
                        try:
                            value, version = await clients["n3"].get(key, "local")
                        except CorruptRow:
                            await trio.sleep(0.2)
                            continue
                        except KvsvrError as error:
                            if "corrupt" in str(error) or "crc" in str(error):
                                await trio.sleep(0.2)
                                continue
                            raise
                        assert value is not None and value.endswith(b"-again"), value
                        assert version == 2
                        break

            # And it votes again: writes with n3 as one of the two live replicas work.
            await cluster.stop("n1")
            for key in damaged:
                assert await clients["n3"].put(key, b"after-repair") == 3
            for client in clients.values():
                await client.aclose()
            nursery.cancel_scope.cancel()
        assert "rebuilt row" in cluster.log_text("n3")
