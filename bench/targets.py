"""What the comparison runs against: local clusters `bench` starts and stops
itself (kvsvr and etcd, on free ports of 127.0.0.1, data in a temporary
directory), the targets named on the command line, and CPU accounting.

Target names:

  kvsvr              kvsvr cluster (3 nodes), strong table, strong reads
  kvsvr-stale        the same cluster, stale reads (one replica, no quorum)
  kvsvr-eventual     kvsvr cluster (3 nodes), an eventual table (write_quorum 1, LWW)
  etcd               etcd cluster (3 members), linearizable reads (etcd's default),
                     driven by etcd's own Go client (bench/etcdload, clientv3)
  etcd-serializable  the same cluster, serializable reads (etcd's stale read), Go client
  etcd-http          the same cluster, linearizable reads, driven by bench's Python
                     driver through etcd's HTTP/JSON gateway: a lower bound on etcd
  single             kvsvr on one node (replication 1): a ceiling for the cluster
  lmdb               raw LMDB in one process: the ceiling under every write
"""

from __future__ import annotations

import os
import platform
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import kvsvr
from bench.driver import TargetSpec
from bench.etcd import EtcdCluster, etcd_version, find_etcd
from bench.proc import cpu_times, machine_cpu_times
from kvsvr.config import ClusterConfig, TableConfig, load_config
from kvsvr.local import CONFIG_FILE_NAME, LocalCluster, free_ports, local_config, write_config

# Time a kvsvr cluster gets to be ready (every node votes and sees its peers).
KVSVR_START_TIMEOUT_S: Final = 60.0
KVSVR_STOP_TIMEOUT_S: Final = 15.0
# Partitions per kvsvr cluster: the node's default.
PARTITIONS: Final = 64
# LMDB map per kvsvr node: address space, not disk; room for 10^6 keys of 1 KiB
# on every replica with copy-on-write slack.
MAP_SIZE_BYTES: Final = 8 << 30
# Rows per bulk-load transaction: the store's own commit batch bound.
BULK_LOAD_BATCH: Final = 4096


# The eventual table every kvsvr cluster of the comparison declares next to `default`.
EVENTUAL_TABLE: Final = "eventual"


@dataclass(frozen=True, slots=True)
class TargetInfo:
    name: str
    system: str  # "kvsvr" | "etcd" | "lmdb"
    nodes: int
    read_consistency: str
    description: str
    skip_reason: str = ""
    table: str = "default"
    # "python": bench's own load processes (kvsvr's client; for etcd, its HTTP/JSON
    # gateway); "go": etcd's Go client (bench/etcdload), etcd only.
    driver: str = "python"

    @property
    def lower_bound(self) -> bool:
        """etcd through bench's Python HTTP driver: the driver, not etcd, sets
        the rate, so the figures are a lower bound on etcd's."""
        return self.system == "etcd" and self.driver == "python"


TARGETS: Final = {
    "kvsvr": TargetInfo("kvsvr", "kvsvr", 3, "strong", "kvsvr 3 nodes, strong reads"),
    "kvsvr-stale": TargetInfo(
        "kvsvr-stale", "kvsvr", 3, "stale", "kvsvr 3 nodes, stale reads, strong writes"
    ),
    "kvsvr-eventual": TargetInfo(
        "kvsvr-eventual",
        "kvsvr",
        3,
        "strong",
        "kvsvr 3 nodes, eventual table (acknowledged by 1 replica, read from 1)",
        table=EVENTUAL_TABLE,
    ),
    "etcd": TargetInfo(
        "etcd",
        "etcd",
        3,
        "strong",
        "etcd 3 members, linearizable reads, etcd's Go client",
        driver="go",
    ),
    "etcd-serializable": TargetInfo(
        "etcd-serializable",
        "etcd",
        3,
        "stale",
        "etcd 3 members, serializable reads, etcd's Go client",
        driver="go",
    ),
    "etcd-http": TargetInfo(
        "etcd-http",
        "etcd",
        3,
        "strong",
        "etcd 3 members, linearizable reads, bench's Python driver via the HTTP/JSON "
        "gateway (a lower bound)",
    ),
    "single": TargetInfo("single", "kvsvr", 1, "strong", "kvsvr 1 node (replication 1)"),
    "lmdb": TargetInfo("lmdb", "lmdb", 1, "strong", "raw LMDB, one process, no network"),
}


def parse_targets(text: str) -> list[TargetInfo]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("name at least one target")
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    return [TARGETS[name] for name in dict.fromkeys(names)]


# --- clusters ------------------------------------------------------------------------------


class Cluster(Protocol):
    system: str
    node_count: int

    @property
    def addresses(self) -> list[str]: ...
    @property
    def pids(self) -> list[int]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def spec(self, label: str, read_consistency: str, table: str = "default") -> TargetSpec: ...


@dataclass
class KvsvrCluster:
    """kvsvr nodes as their users run them: `python -m kvsvr node`, one process
    per node, fsync on (the only mode the node has), a cluster secret; node i
    keeps its data in `directory/ni` and its log in `directory/ni.log`."""

    node_count: int
    directory: Path
    replication: int = 3
    partitions: int = PARTITIONS
    system: str = "kvsvr"
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    # (key_count, value_bytes, seed): rows written straight into every
    # replica's LMDB before the nodes start (see `bulk_load_kvsvr`).
    preload: tuple[int, int, int] | None = None
    tables: tuple[TableConfig, ...] = (
        TableConfig("default"),
        TableConfig(EVENTUAL_TABLE, consistency="eventual"),
    )
    map_size_bytes: int = MAP_SIZE_BYTES
    cluster: LocalCluster | None = None

    @property
    def addresses(self) -> list[str]:
        assert self.cluster is not None
        return self.cluster.addresses

    @property
    def pids(self) -> list[int]:
        return list(self.cluster.pids.values()) if self.cluster is not None else []

    def settings(self) -> dict[str, Any]:
        """`ClusterConfig` fields set over `local_config`'s."""
        return {"map_size_bytes": self.map_size_bytes}

    def start(self) -> None:
        config = local_config(
            self.node_count,
            secret=self.secret,
            partitions=self.partitions,
            replication=self.replication,
            tables=self.tables,
            settings=self.settings(),
        )
        path = write_config(config, self.directory / CONFIG_FILE_NAME, data_dir=".")
        if self.preload is not None:
            bulk_load_kvsvr(load_config(path), *self.preload)
        self.cluster = LocalCluster(
            path,
            log_dir=self.directory,
            new_session=True,  # Ctrl-C reaches bench, which stops it in order
            die_with_parent=True,
            stop_timeout_s=KVSVR_STOP_TIMEOUT_S,
        )
        self.cluster.start_all(KVSVR_START_TIMEOUT_S)
        # Ready is not yet serving every partition at full speed: a write
        # through a quorum on several partitions, so every node answers.
        with kvsvr.SyncClient(self.addresses, secret=self.secret, timeout_s=5) as client:
            for index in range(8):
                client.put(f"bench-probe-{index}", b"ok")

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop_all()
            self.cluster.close()

    def spec(self, label: str, read_consistency: str, table: str = "default") -> TargetSpec:
        return TargetSpec(
            kind="kvsvr",
            label=label,
            addresses=tuple(self.addresses),
            secret=self.secret,
            table=table,
            read_consistency=read_consistency,
        )


@dataclass
class EtcdDeployment:
    """An `EtcdCluster` behind the `Cluster` interface."""

    node_count: int
    directory: Path
    binary: str = "etcd"
    system: str = "etcd"
    cluster: EtcdCluster | None = None

    @property
    def addresses(self) -> list[str]:
        assert self.cluster is not None
        return self.cluster.addresses

    @property
    def pids(self) -> list[int]:
        return self.cluster.pids if self.cluster is not None else []

    def start(self) -> None:
        binary = find_etcd(self.binary)
        ports = free_ports(2 * self.node_count)
        self.cluster = EtcdCluster(self.node_count, self.directory, ports, binary)
        self.cluster.start()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def spec(self, label: str, read_consistency: str, table: str = "default") -> TargetSpec:
        return TargetSpec(
            kind="etcd",
            label=label,
            addresses=tuple(self.addresses),
            read_consistency=read_consistency,
        )


def bulk_load_kvsvr(config: ClusterConfig, key_count: int, value_bytes: int, seed: int) -> None:
    """Write keys 0..key_count-1 into every replica's LMDB, as chosen at version 1,
    with the nodes stopped: what a completed load leaves, minus the promises.

    Only for key counts too large to load through the client in a benchmark's
    time (the scale figures). A coordinator holds no promise on such a key, so
    its first write runs full Paxos (prepare + accept), as after a restart;
    `bench scale` writes its sample keys once before timing puts."""
    import trio

    from bench.workloads import key_name, value_pool
    from kvsvr.keys import encode_key
    from kvsvr.protocol.placement import partition_of
    from kvsvr.protocol.state import Row
    from kvsvr.storage import Storage

    values = value_pool(value_bytes, seed)
    replica_sets = config.replica_sets()
    table = config.tables[0].name

    def rows_of(node_index: int) -> Iterator[tuple[str, bytes, Row]]:
        for index in range(key_count):
            name = key_name(index)
            if node_index in replica_sets[partition_of(table, name, config.partitions)]:
                yield table, encode_key(name), Row(version=1, value=values[index % len(values)])

    async def load_node(node_id: str, node_index: int) -> None:
        directory = config.node_data_dir(node_id)
        directory.mkdir(parents=True, exist_ok=True)
        storage = Storage.open(
            directory, tables=[t.name for t in config.tables], map_size_bytes=config.map_size_bytes
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(storage.run)
                batch: list[tuple[str, bytes, Row]] = []
                for row in rows_of(node_index):
                    batch.append(row)
                    if len(batch) >= BULK_LOAD_BATCH:
                        await storage.write(batch)
                        batch = []
                await storage.write(batch)
                await storage.aclose()
        finally:
            storage.close()

    for node in config.nodes:
        trio.run(load_node, node.id, node.index)


def make_cluster(
    system: str,
    node_count: int,
    directory: Path,
    *,
    replication: int = 3,
    etcd_binary: str = "etcd",
) -> Cluster:
    if system == "kvsvr":
        return KvsvrCluster(node_count, directory, replication=min(replication, node_count))
    if system == "etcd":
        return EtcdDeployment(node_count, directory, binary=etcd_binary)
    raise ValueError(f"no cluster for system {system!r}")


# --- CPU accounting ------------------------------------------------------------------------


def _live_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, (0, 0) once it is gone."""
    try:
        return cpu_times(pid)
    except OSError:
        return 0.0, 0.0


def cpu_probe(pids: list[int]) -> dict[str, float]:
    busy, total = machine_cpu_times()
    times = [_live_cpu_times(pid) for pid in pids]
    user_s = sum(user for user, _ in times)
    system_s = sum(system for _, system in times)
    return {
        "servers_cpu_s": user_s + system_s,
        "servers_system_s": system_s,
        "machine_busy_s": busy,
        "machine_total_s": total,
        "wall_s": time.monotonic(),
    }


# --- the machine -----------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(work_dir: Path, etcd_binary: str | None) -> dict[str, object]:
    from kvsvr import _build

    etcd = None
    if etcd_binary is not None:
        try:
            etcd = etcd_version(find_etcd(etcd_binary))
        except RuntimeError:
            etcd = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kvsvr_version": kvsvr.__version__,
        "kvsvr_compiled_modules": _build.compiled_modules(),
        "etcd_version": etcd,
        "data_filesystem": filesystem_of(work_dir),
        "data_dir": str(work_dir),
    }
