"""Placement: which replicas hold a key.

A row's partition is a hash of its table and partition key, modulo a fixed,
power-of-two partition count. Each partition has an ordered replica set of N
nodes. The nodes are laid on a ring interleaved by zone (a1 b1 c1 a2 b2 c2 ...);
partition p starts at ring position p and takes the next nodes, skipping any
whose zone is already used until every zone is, so replicas spread across
zones first and the preferred coordinator (the first replica) rotates evenly
over the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import crc32c

# Partition counts above this buy nothing on a cluster we can run and cost
# memory in every partition map a client fetches.
PARTITIONS_MAX = 1 << 16


@dataclass(frozen=True, slots=True)
class NodePlace:
    node_id: int
    zone: str


def partition_of(table: str, partition_key: bytes, partitions: int) -> int:
    assert partitions > 0 and partitions & (partitions - 1) == 0, "a power of two"
    return crc32c.crc32c(table.encode("utf-8") + b"\x00" + partition_key) & (partitions - 1)


def zone_ring(nodes: list[NodePlace]) -> list[NodePlace]:
    """Nodes interleaved by zone, each zone's nodes in id order, zones by name."""
    by_zone: dict[str, list[NodePlace]] = {}
    for node in sorted(nodes, key=lambda n: n.node_id):
        by_zone.setdefault(node.zone, []).append(node)
    zones = [by_zone[name] for name in sorted(by_zone)]
    ring: list[NodePlace] = []
    for index in range(max((len(z) for z in zones), default=0)):
        ring.extend(zone[index] for zone in zones if index < len(zone))
    return ring


def replica_sets(nodes: list[NodePlace], partitions: int, replication: int) -> list[list[int]]:
    """For each partition, its ordered replica node ids."""
    assert 0 < partitions <= PARTITIONS_MAX and partitions & (partitions - 1) == 0
    assert len({n.node_id for n in nodes}) == len(nodes), "node ids are unique"
    assert 1 <= replication <= len(nodes), "cannot place more replicas than nodes"
    ring = zone_ring(nodes)
    zone_count = len({n.zone for n in nodes})
    sets: list[list[int]] = []
    for partition in range(partitions):
        chosen: list[NodePlace] = []
        used_zones: set[str] = set()
        position = partition % len(ring)
        # First pass prefers unused zones; later passes take any unused node.
        for prefer_new_zone in (True, False):
            for step in range(len(ring)):
                if len(chosen) == replication:
                    break
                node = ring[(position + step) % len(ring)]
                if node in chosen:
                    continue
                if prefer_new_zone and node.zone in used_zones and len(used_zones) < zone_count:
                    continue
                chosen.append(node)
                used_zones.add(node.zone)
        assert len(chosen) == replication
        sets.append([n.node_id for n in chosen])
    return sets
