"""`kvsvr backup`, `kvsvr verify-backup` and `kvsvr restore`.

    kvsvr backup --cluster ... --out DIR [--rate-mib-s R]
    kvsvr verify-backup DIR
    kvsvr restore --from DIR --dir NEWDIR [--nodes N] [--base-port P] [--secret S]

Exit codes as the other commands: 0 done, 2 usage, 4 the backup could not
reach enough of the cluster (a node lost with too few copies left, or keys
it could not read through the cluster), 5 any other error (a bad backup,
an output directory that is not empty, bad config).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from kvsvr.backup.format import BadBackup
from kvsvr.backup.messages import (
    RATE_BYTES_PER_S_DEFAULT,
    RATE_BYTES_PER_S_MAX,
    RATE_BYTES_PER_S_MIN,
)
from kvsvr.backup.restore import RestoreRefused, restore_backup
from kvsvr.backup.take import BackupFailed, BackupRefused, take_backup
from kvsvr.backup.verify import read_manifest, verify_backup
from kvsvr.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    complain,
    int_in,
    say,
)
from kvsvr.cli.keys import _cluster_target, exit_code_for
from kvsvr.cli.up import DEFAULT_BASE_PORT, UP_NODES_MAX
from kvsvr.config import ConfigError
from kvsvr.errors import KvsvrError

MIB = 1024 * 1024

Command = Callable[..., argparse.ArgumentParser]


def add_backup_commands(
    commands: Any, client_options: argparse.ArgumentParser, command: Command
) -> None:
    """Register the three commands; `command` is the parser's `_command`."""
    parser = command(
        commands,
        "backup",
        "take a consistent backup of a serving cluster into DIR",
        run_backup,
        parents=[client_options],
        description=(
            "Copy every node's data (a compacted LMDB copy from one read transaction,\n"
            "streamed in checked chunks at a limited rate) and keep, for every key, its\n"
            "latest version known chosen when the backup started (or a later one). Writes\n"
            "DIR/manifest.json and one data file per partition. The cluster keeps serving.\n"
            "A node lost mid-backup is left out if every partition still has copies from\n"
            "a majority of its replicas."
        ),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")
    parser.add_argument(
        "--rate-mib-s",
        type=int_in(max(1, RATE_BYTES_PER_S_MIN // MIB), RATE_BYTES_PER_S_MAX // MIB),
        default=RATE_BYTES_PER_S_DEFAULT // MIB,
        help=f"each node sends its copy at most this fast, MiB/s "
        f"(default {RATE_BYTES_PER_S_DEFAULT // MIB})",
    )
    parser.add_argument(
        "--rate-kib-s",
        type=int_in(RATE_BYTES_PER_S_MIN // 1024, RATE_BYTES_PER_S_MAX // 1024),
        help=argparse.SUPPRESS,
    )

    parser = command(
        commands,
        "verify-backup",
        "check a backup: its manifest, every file's size, crc32c and record count",
        run_verify,
    )
    parser.add_argument("directory", metavar="DIR", help="the backup's directory")

    parser = command(
        commands,
        "restore",
        "build a new local cluster (new cluster id) from a backup",
        run_restore,
        description=(
            "Verify the backup, then write NEWDIR/cluster.toml and each node's data\n"
            "(NEWDIR/nI/) as `kvsvr up` lays them out: start it with\n"
            "`kvsvr up --dir NEWDIR --nodes N --base-port P`. Refuses a bad backup or a\n"
            "non-empty NEWDIR without writing anything."
        ),
    )
    parser.add_argument("--from", dest="source", required=True, metavar="DIR")
    parser.add_argument("--dir", required=True, metavar="NEWDIR", help="a new or empty directory")
    parser.add_argument(
        "--nodes",
        type=int_in(1, UP_NODES_MAX),
        help="node count (default: as many as the backed-up cluster had)",
    )
    parser.add_argument(
        "--base-port",
        type=int_in(1, 65535 - UP_NODES_MAX),
        default=DEFAULT_BASE_PORT,
        help=f"node i listens on BASE_PORT+i (default {DEFAULT_BASE_PORT})",
    )
    parser.add_argument("--secret", help="the new cluster's secret (default: none)")


def run_backup(args: argparse.Namespace) -> int:
    rate = args.rate_mib_s * MIB
    if args.rate_kib_s is not None:  # tests: a slow backup to interrupt
        rate = args.rate_kib_s * 1024
    try:
        addresses, secret, tls = _cluster_target(args)
        result = trio.run(
            lambda: take_backup(
                addresses, secret, Path(args.out), rate_bytes_per_s=rate, progress=say, tls=tls
            )
        )
    except BackupRefused as exc:
        complain(f"backup refused: {exc}")
        return EXIT_ERROR
    except BackupFailed as exc:
        complain(f"backup failed: {exc}")
        return EXIT_UNAVAILABLE
    except KvsvrError as exc:
        complain(f"backup failed: {exc}")
        return exit_code_for(exc)
    except ConfigError as exc:
        complain(f"bad config: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        complain(f"backup failed: {exc}")
        return EXIT_ERROR
    manifest = result.manifest
    for node, why in sorted(result.nodes_lost.items()):
        say(f"note: node {node} gave no copy ({why}); the other replicas' copies sufficed")
    say(
        f"backup of cluster {manifest.cluster_id}: {manifest.rows} rows in "
        f"{manifest.partitions} partitions, {manifest.keys_read_through_cluster} keys read "
        f"through the cluster, in {(manifest.finished_at_ms - manifest.started_at_ms) / 1000:.1f} s"
    )
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    try:
        manifest = verify_backup(Path(args.directory))
    except BadBackup as exc:
        complain(f"bad backup: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        complain(f"cannot read the backup: {exc}")
        return EXIT_ERROR
    say(
        f"backup of cluster {manifest.cluster_id} is intact: {manifest.rows} rows in "
        f"{len(manifest.files)} partition files"
    )
    return EXIT_OK


def run_restore(args: argparse.Namespace) -> int:
    source = Path(args.source)
    try:
        nodes = args.nodes or len(read_manifest(source).nodes)
        if nodes > UP_NODES_MAX:
            raise RestoreRefused(
                f"the backed-up cluster had {nodes} nodes and restore makes at most "
                f"{UP_NODES_MAX} local ones: pass --nodes"
            )
        config, written = restore_backup(
            source, Path(args.dir), nodes=nodes, base_port=args.base_port, secret=args.secret
        )
    except BadBackup as exc:
        complain(f"bad backup, nothing written: {exc}")
        return EXIT_ERROR
    except RestoreRefused as exc:
        complain(f"restore refused, nothing written: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        complain(f"restore failed: {exc}")
        return EXIT_ERROR
    rows = ", ".join(f"{node} {count}" for node, count in written.items())
    say(
        f"restored into {args.dir} as cluster {config.cluster_id}, replication "
        f"{config.replication} (rows per node: {rows})"
    )
    say(f"start it with: kvsvr up --dir {args.dir} --nodes {nodes} --base-port {args.base_port}")
    return EXIT_OK
