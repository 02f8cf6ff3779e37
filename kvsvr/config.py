"""Cluster configuration: a TOML file every node and tool reads.

    [cluster]
    id = "0b6e0f9e-..."       # the cluster's id, a UUID made when the config is written
    initial_state = "new"     # "new": a node with an empty data directory founds the
                              # cluster; "existing": it replaces a member and rebuilds first
    secret = "change-me"      # optional; absent = open cluster (a warning is logged)
    partitions = 64           # a power of two, fixed at cluster creation
    replication = 3           # replicas per partition
    data_dir = "kvsvr-data"   # each node keeps its LMDB in data_dir/<node id>
    map_size_mb = 1024        # LMDB map size per node
    cache_bytes_max = 67108864  # each node's row cache; 0 turns it off
    watch_history_bytes_max = 33554432  # each node's change log for watches; 0: no watches
    # Catching up (hinted handoff, anti-entropy, tombstones); these are the defaults.
    hint_bytes_max = 268435456    # hints kept per unreachable target, in bytes ...
    hints_max = 2000000           # ... and in count; beyond either, anti-entropy catches up
    hint_ttl_s = 10800            # a hint older than this is dropped (3 h, as Cassandra)
    hint_replay_rows_per_s = 2500  # per coordinator holding hints
    anti_entropy_interval_s = 600  # a digest comparison with every peer this often (and at start)
    anti_entropy_rows_per_s = 2500
    tombstone_grace_s = 14400     # eventual tables: tombstones purged after this (> hint_ttl_s)
    # Read leases (docs/DESIGN.md, "Read leases"); these are the defaults.
    read_leases = true            # a strong read may take a lease and later ones read locally
    lease_s = 2.0                 # a lease's length; a write via another node may wait this long
    clock_drift_max = 0.01        # the assumed bound on any node's clock-rate error (1%)
    # For benchmarks only (as etcd's --unsafe-no-fsync): commits skip fsync, so
    # an acknowledged write can be lost to a machine crash or power cut.
    unsafe_no_fsync = false

    [[nodes]]
    id = "n1"
    host = "127.0.0.1"        # what peers and clients are told and dial; or, in one
    port = 7101               # key, advertise = "10.0.0.5:7101"
    listen = "0.0.0.0:7101"   # optional: what the node binds (default: host:port)
    zone = "z1"
    tls_cert = "tls/n1.pem"   # optional: this node's certificate and key, over [tls]'s
    tls_key = "tls/n1.key"
    # Optional: how *this* node reaches a peer (the fault harness puts proxies here).
    peer_addresses = { n2 = "127.0.0.1:17102" }
    # Optional: serve /metrics, /healthz and /readyz over HTTP here (off when unset).
    metrics_address = "127.0.0.1:9101"

    [[tables]]
    name = "default"
    consistency = "strong"    # or "eventual"
    ttl_s = 0                 # 0: rows never expire
    read_leases = true        # false: this table's strong reads never take leases

    [tls]                     # optional: absent = plain TCP (kvsvr.net.tls)
    ca = "tls/ca.pem"         # the CA every node and client certificate is signed by
    cert = "tls/node.pem"     # the nodes' certificate and key, unless a node names its own
    key = "tls/node.key"
    client_cert = "tls/client.pem"  # what tools reading this file present as clients
    client_key = "tls/client.key"

Relative `data_dir` and TLS paths are taken relative to the config file's folder.
A node needs `id` (`kvsvr/protocol/lifecycle.py` says what it and
`initial_state` decide); clients do not read either.
"""

from __future__ import annotations

import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kvsvr.protocol.changes import HISTORY_BYTES_MAX as WATCH_HISTORY_BYTES_DEFAULT
from kvsvr.protocol.lifecycle import CLUSTER_ID_CHARS_MAX, INITIAL_STATES, NEW
from kvsvr.protocol.placement import PARTITIONS_MAX, NodePlace, replica_sets
from kvsvr.protocol.read_lease import CLOCK_DRIFT_MAX_MAX, LEASE_S_MAX, LeaseTiming

# Table names become LMDB sub-database names; keep them short and plain.
TABLE_NAME_BYTES_MAX = 64
TABLES_MAX = 100  # each table is an LMDB sub-database; LMDB wants a fixed maximum
# Read leases. A lease saves the quorum round of every strong read of a key
# for `lease_s` after the read that took it; it costs a write to that key
# through another node (or any write in the first `lease_s` after a replica
# restarts) a wait of up to `lease_s`. 2 s keeps that wait short next to the
# client's operation timeout while a hot key is read thousands of times per lease.
LEASE_S_DEFAULT = 2.0
# Quartz oscillators are off by tens of parts per million; 1% is a wide margin.
CLOCK_DRIFT_MAX_DEFAULT = 0.01


class ConfigError(ValueError):
    """The cluster configuration is malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    id: str
    index: int  # 1-based position in the file; a node's number in ballots
    host: str
    port: int
    zone: str
    peer_addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Where the node serves /metrics, /healthz and /readyz over HTTP; None: off.
    metrics_address: tuple[str, int] | None = None
    # What the node binds; None: its advertised host:port (`host`, `port`).
    listen: tuple[str, int] | None = None
    tls_cert: Path | None = None  # None: [tls]'s cert and key
    tls_key: Path | None = None

    @property
    def address(self) -> str:
        """The advertised address: what peers and clients are told and dial."""
        return f"{self.host}:{self.port}"

    @property
    def listen_address(self) -> tuple[str, int]:
        return self.listen if self.listen is not None else (self.host, self.port)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The [tls] table: TLS on every client and peer link, certificates
    checked both ways against `ca`."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True, slots=True)
class TableConfig:
    name: str
    consistency: str = "strong"
    ttl_s: float = 0.0
    write_quorum: int = 1  # eventual tables: replicas that must acknowledge a write
    read_leases: bool = True  # strong tables: strong reads may take read leases


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    nodes: tuple[NodeConfig, ...]
    tables: tuple[TableConfig, ...]
    partitions: int = 64
    replication: int = 3
    secret: bytes | None = None
    data_dir: Path = Path("kvsvr-data")
    map_size_bytes: int = 1 << 30
    source: Path | None = None
    cache_bytes_max: int = 64 << 20
    hint_bytes_max: int = 256 << 20
    hints_max: int = 2_000_000
    hint_ttl_s: float = 10_800.0
    hint_replay_rows_per_s: int = 2_500
    anti_entropy_interval_s: float = 600.0
    anti_entropy_rows_per_s: int = 2_500
    tombstone_grace_s: float = 14_400.0
    unsafe_no_fsync: bool = False
    watch_history_bytes_max: int = WATCH_HISTORY_BYTES_DEFAULT
    cluster_id: str | None = None  # None: a config only clients read
    initial_state: str = NEW
    tls: TLSConfig | None = None  # None: plain TCP
    read_leases: bool = True
    lease_s: float = LEASE_S_DEFAULT
    clock_drift_max: float = CLOCK_DRIFT_MAX_DEFAULT

    @property
    def lease_timing(self) -> LeaseTiming | None:
        """The read-lease timing, None when leases are off."""
        if not self.read_leases:
            return None
        return LeaseTiming(self.lease_s, self.clock_drift_max)

    def node(self, node_id: str) -> NodeConfig:
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(n.id for n in self.nodes)
        raise ConfigError(f"no node {node_id!r} in the config (nodes: {known})")

    def node_by_index(self, index: int) -> NodeConfig:
        return self.nodes[index - 1]

    def table(self, name: str) -> TableConfig | None:
        for table in self.tables:
            if table.name == name:
                return table
        return None

    def replica_sets(self) -> list[list[int]]:
        """For each partition, the 1-based indexes of its replicas, preferred first."""
        places = [NodePlace(n.index, n.zone) for n in self.nodes]
        return replica_sets(places, self.partitions, self.replication)

    def node_data_dir(self, node_id: str) -> Path:
        return self.data_dir / node_id

    def node_tls_files(self, node_id: str) -> tuple[Path, Path, Path] | None:
        """(ca, cert, key) of a node's TLS, or None when the cluster has none."""
        if self.tls is None:
            return None
        node = self.node(node_id)
        cert = node.tls_cert or self.tls.cert
        key = node.tls_key or self.tls.key
        assert cert is not None and key is not None, "parse_config requires both"
        return self.tls.ca, cert, key


def _address(text: Any, where: str) -> tuple[str, int]:
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{where}: expected 'host:port', got {text!r}")
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: bad port in {text!r}")
    return host, int(port)


def _require(mapping: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing '{key}'")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def parse_config(data: dict[str, Any], source: Path | None = None) -> ClusterConfig:
    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError("[cluster] must be a table")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError("the config needs at least one [[nodes]] entry")
    nodes: list[NodeConfig] = []
    for position, raw in enumerate(raw_nodes, start=1):
        where = f"nodes[{position}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        node_id = _require(raw, "id", str, where)
        host, port = _advertised(raw, where)
        peers_raw = raw.get("peer_addresses", {})
        if not isinstance(peers_raw, dict):
            raise ConfigError(f"{where}: peer_addresses must be a table")
        peers = {
            str(peer): _address(address, f"{where}.peer_addresses.{peer}")
            for peer, address in peers_raw.items()
        }
        metrics_raw = raw.get("metrics_address")
        metrics = None if metrics_raw is None else _address(metrics_raw, f"{where}.metrics_address")
        nodes.append(
            NodeConfig(
                id=node_id,
                index=position,
                host=host,
                port=port,
                zone=str(raw.get("zone", f"zone-{node_id}")),
                peer_addresses=peers,
                metrics_address=metrics,
                listen=_address(raw["listen"], f"{where}.listen") if "listen" in raw else None,
                tls_cert=_path(raw, "tls_cert", source, where),
                tls_key=_path(raw, "tls_key", source, where),
            )
        )
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"node ids must be unique: {ids}")
    _check_metrics_addresses(nodes)
    tls = _tls_config(data.get("tls"), nodes, source)
    for node in nodes:
        for peer in node.peer_addresses:
            if peer not in ids:
                raise ConfigError(f"node {node.id}: peer_addresses names unknown node {peer!r}")

    raw_tables = data.get("tables", [{"name": "default"}])
    if not isinstance(raw_tables, list) or not raw_tables:
        raise ConfigError("[[tables]] must list at least one table")
    if len(raw_tables) > TABLES_MAX:
        raise ConfigError(f"at most {TABLES_MAX} tables")
    tables: list[TableConfig] = []
    for position, raw in enumerate(raw_tables, start=1):
        where = f"tables[{position}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        name = _require(raw, "name", str, where)
        if not name or len(name.encode()) > TABLE_NAME_BYTES_MAX or not name.isprintable():
            raise ConfigError(f"{where}: bad table name {name!r}")
        consistency = raw.get("consistency", "strong")
        if consistency not in ("strong", "eventual"):
            raise ConfigError(f"{where}: consistency must be 'strong' or 'eventual'")
        ttl_s = raw.get("ttl_s", 0)
        if not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool) or ttl_s < 0:
            raise ConfigError(f"{where}: ttl_s must be a number >= 0")
        write_quorum = raw.get("write_quorum", 1)
        if not isinstance(write_quorum, int) or write_quorum < 1:
            raise ConfigError(f"{where}: write_quorum must be an int >= 1")
        table_leases = raw.get("read_leases", True)
        if not isinstance(table_leases, bool):
            raise ConfigError(f"{where}: read_leases must be true or false")
        tables.append(TableConfig(name, consistency, float(ttl_s), write_quorum, table_leases))
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ConfigError(f"table names must be unique: {names}")

    partitions = cluster.get("partitions", 64)
    if (
        not isinstance(partitions, int)
        or partitions <= 0
        or partitions & (partitions - 1)
        or partitions > PARTITIONS_MAX
    ):
        raise ConfigError(f"partitions must be a power of two up to {PARTITIONS_MAX}")
    replication = cluster.get("replication", min(3, len(nodes)))
    if not isinstance(replication, int) or not 1 <= replication <= len(nodes):
        raise ConfigError(f"replication must be between 1 and the node count ({len(nodes)})")
    secret_raw = cluster.get("secret")
    if secret_raw is not None and (not isinstance(secret_raw, str) or not secret_raw):
        raise ConfigError("secret must be a non-empty string")
    data_dir = Path(str(cluster.get("data_dir", "kvsvr-data")))
    if source is not None and not data_dir.is_absolute():
        data_dir = source.parent / data_dir
    cache_bytes_max = cluster.get("cache_bytes_max", 64 << 20)
    if (
        not isinstance(cache_bytes_max, int)
        or isinstance(cache_bytes_max, bool)
        or cache_bytes_max < 0
    ):
        raise ConfigError("cache_bytes_max must be an int >= 0 (0 turns the cache off)")
    watch_history_bytes_max = cluster.get("watch_history_bytes_max", WATCH_HISTORY_BYTES_DEFAULT)
    if (
        not isinstance(watch_history_bytes_max, int)
        or isinstance(watch_history_bytes_max, bool)
        or watch_history_bytes_max < 0
    ):
        raise ConfigError("watch_history_bytes_max must be an int >= 0 (0 turns watches off)")
    catch_up = _catch_up_settings(cluster)
    map_size_mb = cluster.get("map_size_mb", 1024)
    if not isinstance(map_size_mb, int) or map_size_mb < 1:
        raise ConfigError("map_size_mb must be a positive int")
    unsafe_no_fsync = cluster.get("unsafe_no_fsync", False)
    if not isinstance(unsafe_no_fsync, bool):
        raise ConfigError("unsafe_no_fsync must be true or false")
    cluster_id = cluster.get("id")
    if cluster_id is not None and (
        not isinstance(cluster_id, str)
        or not cluster_id
        or len(cluster_id) > CLUSTER_ID_CHARS_MAX
        or not cluster_id.isprintable()
    ):
        raise ConfigError(f"id must be a non-empty string of at most {CLUSTER_ID_CHARS_MAX} chars")
    initial_state = cluster.get("initial_state", NEW)
    if initial_state not in INITIAL_STATES:
        raise ConfigError(f"initial_state must be one of {', '.join(INITIAL_STATES)}")
    return ClusterConfig(
        nodes=tuple(nodes),
        tables=tuple(tables),
        **_lease_settings(cluster),
        cluster_id=cluster_id,
        initial_state=initial_state,
        partitions=partitions,
        replication=replication,
        secret=secret_raw.encode() if secret_raw else None,
        data_dir=data_dir,
        map_size_bytes=map_size_mb << 20,
        source=source,
        cache_bytes_max=cache_bytes_max,
        unsafe_no_fsync=unsafe_no_fsync,
        tls=tls,
        watch_history_bytes_max=watch_history_bytes_max,
        **catch_up,
    )


def _check_metrics_addresses(nodes: list[NodeConfig]) -> None:
    """A metrics endpoint needs a port of its own: not a node's, not another's."""
    taken = {(node.host, node.port): f"node {node.id}'s address" for node in nodes}
    taken.update({node.listen_address: f"node {node.id}'s listen address" for node in nodes})
    for node in nodes:
        if node.metrics_address is None:
            continue
        other = taken.get(node.metrics_address)
        if other is not None:
            host, port = node.metrics_address
            raise ConfigError(f"node {node.id}: metrics_address {host}:{port} is {other}")
        taken[node.metrics_address] = f"node {node.id}'s metrics_address"


def _advertised(raw: dict[str, Any], where: str) -> tuple[str, int]:
    """A node's advertised host and port: `advertise`, or `host` and `port`."""
    if "advertise" in raw:
        if "host" in raw or "port" in raw:
            raise ConfigError(f"{where}: give either 'advertise' or 'host' and 'port', not both")
        return _address(raw["advertise"], f"{where}.advertise")
    port = _require(raw, "port", int, where)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} out of range")
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}: 'host' must be a non-empty string")
    return host, port


def _path(table: dict[str, Any], key: str, source: Path | None, where: str) -> Path | None:
    """An optional file path, relative to the config file's folder."""
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty path")
    path = Path(value)
    return source.parent / path if source is not None and not path.is_absolute() else path


def _tls_config(raw: object, nodes: list[NodeConfig], source: Path | None) -> TLSConfig | None:
    if raw is None:
        for node in nodes:
            if node.tls_cert is not None or node.tls_key is not None:
                raise ConfigError(f"node {node.id} names a TLS certificate but there is no [tls]")
        return None
    if not isinstance(raw, dict):
        raise ConfigError("[tls] must be a table")
    unknown = set(raw) - {"ca", "cert", "key", "client_cert", "client_key"}
    if unknown:
        raise ConfigError(f"[tls]: unknown keys {sorted(unknown)}")
    ca = _path(raw, "ca", source, "[tls]")
    if ca is None:
        raise ConfigError("[tls]: missing 'ca'")
    tls = TLSConfig(
        ca=ca,
        **{name: _path(raw, name, source, "[tls]") for name in _TLS_PAIRED},
    )
    if (tls.client_cert is None) != (tls.client_key is None):
        raise ConfigError("[tls]: give both client_cert and client_key, or neither")
    for node in nodes:
        cert, key = node.tls_cert or tls.cert, node.tls_key or tls.key
        if cert is None or key is None:
            raise ConfigError(
                f"node {node.id}: TLS is on but it has no certificate and key "
                "(tls_cert and tls_key, or cert and key under [tls])"
            )
    return tls


# [tls]'s paths besides the CA, in TLSConfig's order.
_TLS_PAIRED: Final = ("cert", "key", "client_cert", "client_key")


# [cluster] settings of hinted handoff and anti-entropy: name -> (kind, default, minimum).
_CATCH_UP: dict[str, tuple[type, float, float]] = {
    "hint_bytes_max": (int, 256 << 20, 0),
    "hints_max": (int, 2_000_000, 0),
    "hint_ttl_s": (float, 10_800.0, 1.0),
    "hint_replay_rows_per_s": (int, 2_500, 1),
    "anti_entropy_interval_s": (float, 600.0, 0.1),
    "anti_entropy_rows_per_s": (int, 2_500, 1),
    "tombstone_grace_s": (float, 14_400.0, 1.0),
}


def _catch_up_settings(cluster: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name, (kind, default, minimum) in _CATCH_UP.items():
        value = cluster.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number")
        if kind is int and not isinstance(value, int):
            raise ConfigError(f"{name} must be an int")
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum:g}")
        settings[name] = kind(value)
    if settings["tombstone_grace_s"] <= settings["hint_ttl_s"]:
        raise ConfigError(
            "tombstone_grace_s must be longer than hint_ttl_s, or a late hint could "
            "bring a purged delete's old value back"
        )
    return settings


def _lease_settings(cluster: dict[str, Any]) -> dict[str, Any]:
    read_leases = cluster.get("read_leases", True)
    if not isinstance(read_leases, bool):
        raise ConfigError("read_leases must be true or false")
    lease_s = cluster.get("lease_s", LEASE_S_DEFAULT)
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float):
        raise ConfigError("lease_s must be a number")
    if not 0.01 <= lease_s <= LEASE_S_MAX:
        raise ConfigError(f"lease_s must be between 0.01 and {LEASE_S_MAX:g} seconds")
    drift = cluster.get("clock_drift_max", CLOCK_DRIFT_MAX_DEFAULT)
    if isinstance(drift, bool) or not isinstance(drift, int | float):
        raise ConfigError("clock_drift_max must be a number")
    if not 0 <= drift < CLOCK_DRIFT_MAX_MAX:
        raise ConfigError(
            f"clock_drift_max must be at least 0 and below {CLOCK_DRIFT_MAX_MAX:g} "
            "(a fraction: 0.01 is 1%)"
        )
    return {"read_leases": read_leases, "lease_s": float(lease_s), "clock_drift_max": float(drift)}


def load_config(path: str | Path) -> ClusterConfig:
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return parse_config(data, source=path.resolve())


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(config: ClusterConfig, data_dir: str | None = None) -> str:
    """The TOML text of a config (what `kvsvr up` writes)."""
    lines = ["[cluster]"]
    if config.cluster_id is not None:
        lines.append(f"id = {_toml_string(config.cluster_id)}")
    lines.append(f"initial_state = {_toml_string(config.initial_state)}")
    if config.secret is not None:
        lines.append(f"secret = {_toml_string(config.secret.decode())}")
    lines += [
        f"partitions = {config.partitions}",
        f"replication = {config.replication}",
        f"data_dir = {_toml_string(data_dir if data_dir is not None else str(config.data_dir))}",
        f"map_size_mb = {config.map_size_bytes >> 20}",
        f"cache_bytes_max = {config.cache_bytes_max}",
        *(f"{name} = {getattr(config, name)!r}" for name in _CATCH_UP),
        f"read_leases = {'true' if config.read_leases else 'false'}",
        f"lease_s = {config.lease_s!r}",
        f"clock_drift_max = {config.clock_drift_max!r}",
        # Written only when set, so that a config never mentions it by accident.
        *(["unsafe_no_fsync = true"] if config.unsafe_no_fsync else []),
        *(
            [f"watch_history_bytes_max = {config.watch_history_bytes_max}"]
            if config.watch_history_bytes_max != WATCH_HISTORY_BYTES_DEFAULT
            else []
        ),
        "",
    ]
    for node in config.nodes:
        lines += [
            "[[nodes]]",
            f"id = {_toml_string(node.id)}",
            f"host = {_toml_string(node.host)}",
            f"port = {node.port}",
            f"zone = {_toml_string(node.zone)}",
        ]
        if node.peer_addresses:
            inner = ", ".join(
                f"{peer} = {_toml_string(f'{h}:{p}')}"
                for peer, (h, p) in node.peer_addresses.items()
            )
            lines.append(f"peer_addresses = {{ {inner} }}")
        if node.metrics_address is not None:
            host, port = node.metrics_address
            lines.append(f"metrics_address = {_toml_string(f'{host}:{port}')}")
        if node.listen is not None:
            lines.append(f"listen = {_toml_string(f'{node.listen[0]}:{node.listen[1]}')}")
        lines += _path_lines(tls_cert=node.tls_cert, tls_key=node.tls_key)
        lines.append("")
    for table in config.tables:
        lines += [
            "[[tables]]",
            f"name = {_toml_string(table.name)}",
            f"consistency = {_toml_string(table.consistency)}",
            f"ttl_s = {table.ttl_s}",
            f"write_quorum = {table.write_quorum}",
            *([] if table.read_leases else ["read_leases = false"]),
            "",
        ]
    if config.tls is not None:
        tls = config.tls
        lines += ["[tls]", *_path_lines(ca=tls.ca, **{n: getattr(tls, n) for n in _TLS_PAIRED})]
        lines.append("")
    return "\n".join(lines)


def _path_lines(**paths: Path | None) -> list[str]:
    return [f"{name} = {_toml_string(str(path))}" for name, path in paths.items() if path]


def local_cluster(
    node_count: int,
    base_port: int,
    *,
    secret: str | None = None,
    partitions: int = 64,
    replication: int = 3,
    tables: tuple[TableConfig, ...] = (TableConfig("default"),),
) -> ClusterConfig:
    """A new cluster on 127.0.0.1: node i (from 1) on base_port + i, each in its
    own zone, with a fresh cluster id."""
    nodes = tuple(
        NodeConfig(id=f"n{i}", index=i, host="127.0.0.1", port=base_port + i, zone=f"z{i}")
        for i in range(1, node_count + 1)
    )
    return ClusterConfig(
        nodes=nodes,
        tables=tables,
        cluster_id=new_cluster_id(),
        partitions=partitions,
        replication=min(replication, node_count),
        secret=secret.encode() if secret else None,
    )


def new_cluster_id() -> str:
    """A fresh cluster id: made once, when a cluster's config is first written."""
    return str(uuid.uuid4())
