"""Compare-and-set through a node that is not the key's preferred coordinator.

Each node in turn writes the key once (so it holds the key's promise, the
fast path's lease), then the client writes it several times through the
key's preferred coordinator, which takes the promise over. A cas sent to
the first node with the version just read must be written, and a cas with
an older version must report the version that is current, never the one
the node last wrote itself (a Conflict answered from the coordinator's
lease would name a "current version" older than the one just read).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kvsvr
from kvsvr_tests.cluster_util import LocalCluster, node_connection

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 10.0
ROUTED_WRITES = 3


async def test_cas_through_a_node_whose_lease_went_stale(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for node_id in cluster.ids:
                key = f"cas-through-{node_id}"
                async with node_connection(cluster.address(node_id), cluster.secret) as node:
                    first = await node.put(key, b"from the node")
                    for n in range(ROUTED_WRITES):
                        await client.put(key, f"routed {n}".encode())
                    version, value = await node.get(key)
                    assert (version, value) == (first + ROUTED_WRITES, b"routed 2"), node_id

                    won = await node.put(key, b"cas by the node", if_version=version)
                    assert won == version + 1, node_id

                    latest = await client.put(key, b"routed again")
                    with pytest.raises(kvsvr.Conflict) as caught:
                        await node.put(key, b"stale cas", if_version=won)
                    assert caught.value.current_version == latest, (node_id, str(caught.value))
                    item = await client.get(key)
                    assert item is not None and (item.version, item.value) == (
                        latest,
                        b"routed again",
                    )
