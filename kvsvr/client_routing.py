"""Where a client sends a request: node addresses, a key's replicas in the
partition map (preferred coordinator first), and nodes marked down moved to
the end. Pure: the client passes the time and what it marked down."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import crc32c

from kvsvr.api import NodeInfo, PartitionMap
from kvsvr.errors import InvalidRequest
from kvsvr.protocol.placement import PARTITIONS_MAX, partition_of


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6 host]:port"; InvalidRequest if malformed."""
    host, separator, port_text = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidRequest(f"bad node address {address!r}: expected HOST:PORT")
    return host, int(port_text)


def address_list(addresses: list[str] | str) -> list[tuple[str, int]]:
    """The seeds `connect` is given: a list of "host:port", or one string of
    them comma-separated."""
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    parsed = [parse_address(address) for address in addresses if address.strip()]
    if not parsed:
        raise InvalidRequest("give at least one node address (HOST:PORT)")
    return parsed


def node_address(node: str) -> tuple[str, int]:
    """The address of a node the partition map does not list, given as HOST:PORT."""
    try:
        return parse_address(node)
    except InvalidRequest:
        raise InvalidRequest(
            f"no node {node!r} in the partition map (give a node id or HOST:PORT)"
        ) from None


def route(
    partition_map: PartitionMap,
    table: str,
    partition_key: bytes,
    *,
    down_until: Mapping[str, float],
    now: float,
) -> list[NodeInfo]:
    """The nodes to try for a key, in order: its replicas, preferred coordinator
    first, with those marked down (by address, until a time) moved to the end so
    they are still tried when nothing else answers."""
    replicas = partition_map.replicas(table, partition_key)
    live = [node for node in replicas if down_until.get(node.address, -math.inf) <= now]
    down = [node for node in replicas if node not in live]
    return live + down


# Probe keys on which `partition_hash_seed` checks its shortcut against `partition_of`.
_PARTITION_PROBES: Final = (b"\x00", b"k", b"kvsvr partition probe", bytes(range(256)))

_crc32c = crc32c.crc32c


def partition_hash_seed(table: str) -> int | None:
    """The crc32c of `table`'s prefix in the hash `partition_of` takes, so that
    a key's partition is `crc32c(partition_key, seed) & (partitions - 1)`
    without building `table + NUL + partition_key` per operation. None if
    `partition_of` does not hash that way (checked on probe keys at the widest
    mask): the client then calls `partition_of` itself."""
    seed: int = _crc32c(table.encode("utf-8") + b"\x00")
    mask = PARTITIONS_MAX - 1
    for probe in _PARTITION_PROBES:
        if _crc32c(probe, seed) & mask != partition_of(table, probe, PARTITIONS_MAX):
            return None
    return seed


def not_ready_because(status: Mapping[str, Any]) -> str | None:
    """Why a node (its `cluster_status` entry) is not ready yet; None if it is."""
    if status.get("health") != "ready":
        return str(status.get("health"))
    replication = status.get("replication")
    if not isinstance(replication, Mapping):
        return "no replication status"
    state = replication.get("state")
    if state != "ready":
        return f"replica {state}"
    peers = replication.get("peers")
    down = sorted(
        str(peer)
        for peer, seen in (peers.items() if isinstance(peers, Mapping) else ())
        if not (isinstance(seen, Mapping) and seen.get("up"))
    )
    if down:
        return f"sees {', '.join(down)} down"
    return None
