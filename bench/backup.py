"""Backup, verify and restore of a cluster holding many rows, timed.

    .venv/bin/python -m bench.backup                 # 1,000,000 rows
    .venv/bin/python -m bench.backup --rows 100000

A 3-node local cluster (replication 3, 64 partitions) is loaded by writing
the rows straight into each node's LMDB before it starts, as chosen rows of
version 1 with 16-byte values (`kvsvr.storage.snapshot.fill_environment`,
what `kvsvr restore` uses): about 60x faster here than a million puts
through the cluster, and it yields the same rows a quiet cluster holds after
its puts were committed everywhere. Then, with the cluster serving, it times
the three commands as an operator runs them (`python -m kvsvr backup`,
`verify-backup`, `restore`, each its own process, from start to exit),
starts the restored cluster and reads a sample of keys back from it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import kvsvr
from kvsvr.keys import encode_key
from kvsvr.local import LocalCluster, free_base_port, local_config
from kvsvr.node.catchup.rebuild import IDENTITY_KEY
from kvsvr.protocol.lifecycle import Identity
from kvsvr.protocol.state import Row
from kvsvr.storage.snapshot import fill_environment

VALUE_BYTES: Final = 16
SAMPLE_KEYS: Final = 1000
COMMAND_TIMEOUT_S: Final = 3600.0


def _rows(count: int) -> Iterator[tuple[str, bytes, Row]]:
    for index in range(count):
        yield "default", encode_key(b"k%09d" % index), Row(version=1, value=_value(index))


def _value(index: int) -> bytes:
    return (b"%016d" % index)[:VALUE_BYTES]


def _timed(argv: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kvsvr", *argv],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"kvsvr {argv[0]} exited {done.returncode}: {done.stderr}")
    print(f"  kvsvr {argv[0]}: {elapsed:.1f} s  ({done.stdout.strip().splitlines()[-1]})")
    return elapsed


def run(rows: int, root: Path) -> dict[str, float]:
    config = local_config(3)
    assert config.cluster_id is not None
    with LocalCluster.create(root / "source", config) as cluster:
        started = time.monotonic()
        for node in config.nodes:
            directory = cluster.data_dir(node.id)
            directory.mkdir(parents=True)
            fill_environment(
                directory,
                tables=["default"],
                rows=_rows(rows),
                meta=[(IDENTITY_KEY, Identity(config.cluster_id, node.id).to_bytes())],
                map_size_bytes=config.map_size_bytes,
            )
        load_s = time.monotonic() - started
        print(f"  loaded {rows} rows into 3 nodes' LMDB in {load_s:.1f} s")
        cluster.start_all()
        out = root / "backup"
        figures = {"rows": float(rows), "load_s": load_s}
        figures["backup_s"] = _timed(
            ["backup", "--cluster", ",".join(cluster.addresses), "--out", str(out)]
        )
    figures["verify_s"] = _timed(["verify-backup", str(out)])
    base_port = free_base_port(3)
    figures["restore_s"] = _timed(
        [
            "restore",
            "--from",
            str(out),
            "--dir",
            str(root / "restored"),
            "--base-port",
            str(base_port),
        ]
    )
    figures["backup_mib"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    with LocalCluster(root / "restored" / "cluster.toml") as restored:
        restored.start_all()
        with kvsvr.SyncClient(restored.addresses) as client:
            for index in random.Random(7).sample(range(rows), min(SAMPLE_KEYS, rows)):
                item = client.get(b"k%09d" % index)
                assert item is not None and item.value == _value(index), index
    print(f"  the restored cluster answers {min(SAMPLE_KEYS, rows)} sampled keys correctly")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvsvr-bench-backup-", dir=args.dir) as work:
        figures = run(args.rows, Path(work))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
