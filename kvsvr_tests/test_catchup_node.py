"""Catch-up built from its collaborators alone (no `Node`, no sockets): two
replicas on temporary LMDB stores whose peer links call each other's handler
in memory, on a clock the test moves by hand."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from kvsvr.clock import ManualClock
from kvsvr.config import ClusterConfig, TableConfig, local_cluster
from kvsvr.errors import Unavailable
from kvsvr.keys import encode_key
from kvsvr.node.replication import IDENTITY_KEY, Collaborators, Replication
from kvsvr.protocol.eventual import HybridClock
from kvsvr.protocol.lifecycle import READY, Identity
from kvsvr.protocol.state import Accepted, Row
from kvsvr.storage import Storage


class _Link:
    """A peer link that hands the message to the peer's handler, through
    msgpack as the wire would."""

    def __init__(self) -> None:
        self.peer: Replication | None = None
        self.up = True

    async def call(self, method: str, body: object) -> Any:
        assert self.peer is not None
        wire = msgpack.unpackb(msgpack.packb(body), raw=False)
        reply = await self.peer.handle(method, wire)
        return msgpack.unpackb(msgpack.packb(reply), raw=False)


class _Settle:
    """The strong-read callable: records the keys it was asked to settle."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, bytes]] = []

    async def __call__(self, table: str, key: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.keys.append((table, key))


@dataclasses.dataclass
class _Replica:
    replication: Replication
    storage: Storage
    settled: list[tuple[str, bytes]]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[_Replica, _Replica, ManualClock]]:
    config: ClusterConfig = local_cluster(
        2, 1, tables=(TableConfig("default"), TableConfig("feed", consistency="eventual"))
    )
    clock = ManualClock()
    links = {1: {2: _Link()}, 2: {1: _Link()}}
    replicas: dict[int, _Replica] = {}
    for node in config.nodes:
        storage = Storage.open(
            tmp_path / node.id, tables=["default", "feed"], map_size_bytes=1 << 24
        )
        assert config.cluster_id is not None
        storage.stage_meta(IDENTITY_KEY, Identity(config.cluster_id, node.id).to_bytes())
        settle = _Settle()

        context = Collaborators(
            config=config,
            me=node,
            initial_state=config.initial_state,
            storage=storage,
            peers=links[node.index],
            tables={t.name: t for t in config.tables},
            replica_sets=config.replica_sets(),
            hlc=HybridClock(node.index),
            clock=clock,
            read_row=storage.read_row,
            schedule_repair=lambda table, key: None,
            settle=settle,
        )
        replicas[node.index] = _Replica(Replication(context), storage, settle.keys)
    for peers in links.values():
        for peer, link in peers.items():
            link.peer = replicas[peer].replication
    for replica in replicas.values():
        for detector in replica.replication.liveness.detectors.values():
            detector.arrived(clock.monotonic())
    async with trio.open_nursery() as nursery:
        for replica in replicas.values():
            await nursery.start(replica.storage.run)
        yield replicas[1], replicas[2], clock
        nursery.cancel_scope.cancel()
    for replica in replicas.values():
        replica.storage.close()


async def test_anti_entropy_pulls_what_the_peer_has_and_settles_proposals(
    pair: tuple[_Replica, _Replica, ManualClock],
) -> None:
    ahead, behind, _ = pair
    assert ahead.replication.state == READY and behind.replication.ready
    keys = [encode_key(b"k%d" % i) for i in range(50)]
    for key in keys:
        ahead.storage.stage("default", key, Row(version=3, value=b"v"))
    in_flight = Row(version=3, value=b"v", promised=(4, 1), accepted=Accepted((4, 1), 4, b"w"))
    ahead.storage.stage("default", keys[0], in_flight)
    await behind.replication.anti_entropy.run_pass()
    for key in keys:
        row = behind.storage.read_row("default", key)
        assert row is not None and (row.version, row.value) == (3, b"v")
    assert behind.settled == [("default", keys[0])], "a proposal above ours is settled"
    stats = behind.replication.status()["anti_entropy"]
    assert stats["rows_pulled"] == 50 and stats["keys_settled"] == 1


async def test_hints_for_a_down_peer_are_replayed_when_it_is_back(
    pair: tuple[_Replica, _Replica, ManualClock],
) -> None:
    coordinator, target, clock = pair
    replication = coordinator.replication
    replication.liveness.detectors[2].fail()
    key = encode_key(b"hot")
    for version in (1, 2, 3):
        replication.hint_after_write("default", key, [1, 2], version, b"v%d" % version, None)
    hints = replication.status()["hints"]["n2"]
    assert (hints["pending"], hints["stored"]) == (1, 3), "one hint per key, the newest"
    assert replication.liveness.detectors[2].arrived(clock.monotonic())
    assert await replication.handoff.replay_batch(2) == 1
    assert replication.status()["hints"]["n2"]["pending"] == 0
    row = target.storage.read_row("default", key)
    assert row is not None and (row.version, row.value) == (3, b"v3")


async def test_a_replica_that_is_not_ready_refuses_to_serve_its_rows(
    pair: tuple[_Replica, _Replica, ManualClock],
) -> None:
    replica, _, _ = pair
    replica.replication.readiness.ready = False
    with pytest.raises(Unavailable):
        await replica.replication.handle("ae_rows", ["default", [encode_key(b"k")]])
    # An eventual table still takes rows: they are chosen by last-writer-wins.
    assert await replica.replication.handle("apply", ["feed", []]) == 0
