"""`kvsvr restore`: build a new cluster from a backup.

The backup is verified in full first; a bad one is refused before anything
is written. The new cluster gets a new cluster id and the backup's layout
(partitions, replication, tables) on N local nodes, in the directory layout
`kvsvr up` uses (`NEWDIR/cluster.toml`, node i's LMDB in `NEWDIR/ni/`), so
`kvsvr up --dir NEWDIR --nodes N --base-port P` (or `kvsvr node`) starts it.
Each node's LMDB receives, as chosen rows, the records of every partition
it replicates under the new placement, and the node's identity in `meta`,
so it starts as a member with its data (not as an empty replacement).
"""

from __future__ import annotations

import dataclasses
import shutil
import tomllib
from pathlib import Path
from typing import Final

from kvsvr.backup.format import Manifest
from kvsvr.backup.verify import partition_records, verify_backup
from kvsvr.config import (
    ClusterConfig,
    ConfigError,
    TableConfig,
    local_cluster,
    parse_config,
    render_config,
)
from kvsvr.local import CONFIG_FILE_NAME
from kvsvr.node.catchup.rebuild import IDENTITY_KEY
from kvsvr.protocol.lifecycle import Identity
from kvsvr.protocol.state import Row
from kvsvr.storage import encode_row
from kvsvr.storage.snapshot import Filler

# A restored node's map holds its share of the backup with room to grow:
# LMDB needs the map reserved up front (see `kvsvr.storage.environment`).
MAP_GROWTH_FACTOR: Final = 4


class RestoreRefused(Exception):
    """The restore was refused before anything was written; the message says why."""


def plan_restore(
    manifest: Manifest, *, nodes: int, base_port: int, secret: str | None
) -> ClusterConfig:
    """The new cluster's config: the backup's layout on `nodes` local nodes,
    with a new cluster id (replication at most `nodes`). `RestoreRefused` if
    the result is not a config a node accepts (checked by parsing the text
    `restore` writes, as `kvsvr node` will)."""
    config = local_cluster(
        nodes,
        base_port,
        secret=secret,
        partitions=manifest.partitions,
        replication=manifest.replication,
        tables=tuple(TableConfig(t.name, t.consistency, t.ttl_s) for t in manifest.tables),
    )
    data_bytes = sum(entry.bytes for entry in manifest.files)
    share = data_bytes * config.replication // max(1, nodes)
    map_size = max(config.map_size_bytes, _round_up_mib(share * MAP_GROWTH_FACTOR))
    config = dataclasses.replace(config, map_size_bytes=map_size, data_dir=Path("."))
    try:
        parse_config(tomllib.loads(render_config(config, data_dir=".")))
    except (ConfigError, tomllib.TOMLDecodeError) as error:
        raise RestoreRefused(
            f"the backup's layout makes no valid cluster config: {error}"
        ) from None
    return config


def _round_up_mib(size: int) -> int:
    mib = 1 << 20
    return (size + mib - 1) // mib * mib


def restore_backup(
    source: Path, new_dir: Path, *, nodes: int, base_port: int, secret: str | None
) -> tuple[ClusterConfig, dict[str, int]]:
    """Verify `source`, then build the new cluster in `new_dir` (absent or
    empty). Returns its config and the rows written per node."""
    manifest = verify_backup(source)
    if new_dir.exists() and (not new_dir.is_dir() or any(new_dir.iterdir())):
        raise RestoreRefused(f"{new_dir} exists and is not an empty directory")
    config = plan_restore(manifest, nodes=nodes, base_port=base_port, secret=secret)
    assert config.cluster_id is not None
    created = not new_dir.exists()
    new_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        written = _write_cluster(source, new_dir, manifest, config)
    except BaseException:
        if created:
            shutil.rmtree(new_dir, ignore_errors=True)
        else:
            for child in new_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        raise
    return config, written


def _write_cluster(
    source: Path, new_dir: Path, manifest: Manifest, config: ClusterConfig
) -> dict[str, int]:
    """Fill every node's environment in one pass over the backup: each
    partition's file is read once and each row encoded once, then added to
    every node that replicates the partition."""
    assert config.cluster_id is not None
    replica_sets = config.replica_sets()
    tables = [t.name for t in config.tables]
    manifest_tables = {table.name for table in manifest.tables}
    fillers: dict[int, Filler] = {}
    try:
        for node in config.nodes:
            identity = Identity(config.cluster_id, node.id).to_bytes()
            fillers[node.index] = Filler(
                new_dir / node.id,
                tables=tables,
                meta=[(IDENTITY_KEY, identity)],
                map_size_bytes=config.map_size_bytes,
            )
        for entry in manifest.files:
            holders = [fillers[index] for index in replica_sets[entry.partition]]
            for record in partition_records(source, manifest, entry, manifest_tables):
                stored = encode_row(
                    Row(
                        version=record.version,
                        value=record.value,
                        expires_at_ms=record.expires_at_ms,
                        hlc=record.hlc,
                        op_id=record.op_id,
                    )
                )
                for filler in holders:
                    filler.add(record.table, record.key, stored)
        written = {node.id: fillers.pop(node.index).close() for node in config.nodes}
    finally:
        for filler in fillers.values():  # those not closed above: a failure
            filler.close(commit=False)
    config_path = new_dir / CONFIG_FILE_NAME
    config_path.write_text(render_config(config, data_dir="."), encoding="utf-8")
    if config.secret is not None:
        config_path.chmod(0o600)
    return written
