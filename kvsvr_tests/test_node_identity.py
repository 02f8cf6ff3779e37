"""A node's identity in its data directory, with a one-node cluster run in
process: written on first start, adopted by a directory from before cluster
ids, refused when it names another cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from kvsvr.config import ClusterConfig, local_cluster
from kvsvr.keys import encode_key
from kvsvr.node import replication
from kvsvr.node.server import Node, serve_node
from kvsvr.protocol.lifecycle import Identity, WrongCluster
from kvsvr.protocol.state import Row
from kvsvr.storage import Storage
from kvsvr_tests.cluster_util import free_base_port


def _config(tmp_path: Path) -> ClusterConfig:
    return dataclasses.replace(local_cluster(1, free_base_port(1), secret="s"), data_dir=tmp_path)


def _stored_identity(config: ClusterConfig) -> Identity | None:
    storage = Storage.open(config.node_data_dir("n1"), tables=["default"], map_size_bytes=1 << 24)
    try:
        raw = storage.read_meta(replication.IDENTITY_KEY)
    finally:
        storage.close()
    return None if raw is None else Identity.from_bytes(raw)


async def _run_once(config: ClusterConfig) -> str:
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(serve_node, config, "n1")
        await node.replication.ready_event.wait()
        reason = node.replication.start.reason
        nursery.cancel_scope.cancel()
    return reason


async def test_a_founding_node_writes_its_identity_and_keeps_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert "new cluster" in await _run_once(config)
    assert config.cluster_id is not None
    assert _stored_identity(config) == Identity(config.cluster_id, "n1")
    assert await _run_once(config) == "restarted with its data"


async def test_a_directory_from_before_cluster_ids_is_adopted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    directory = config.node_data_dir("n1")
    directory.mkdir(parents=True)
    storage = Storage.open(directory, tables=["default"], map_size_bytes=1 << 24)
    try:
        storage.stage_meta(replication.OLD_MARKER_KEY, b"1")
        storage.stage("default", encode_key(b"k"), Row(version=1, value=b"v"))
    finally:
        storage.close()
    assert "adopting" in await _run_once(config)
    assert config.cluster_id is not None
    assert _stored_identity(config) == Identity(config.cluster_id, "n1")


async def test_another_clusters_directory_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    await _run_once(config)
    other = dataclasses.replace(config, cluster_id="another-cluster")
    with pytest.RaisesGroup(WrongCluster, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_node, other, "n1")
