"""Backup and restore against real node processes: a backup taken during a
write load and restored into a new cluster holds every write acknowledged
before it started (at its version or a later one); a node lost mid-backup is
left out when the other replicas' copies suffice; too few copies, or only a
node that does not vote yet, is a clear error."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.backup.restore import restore_backup
from kvsvr.backup.take import BackupFailed, take_backup
from kvsvr.backup.verify import verify_backup
from kvsvr.errors import Unavailable
from kvsvr.keys import encode_key
from kvsvr.local import LocalCluster, free_base_port, local_config, temporary_cluster
from kvsvr.protocol.state import Accepted, Row
from kvsvr.storage import Storage

pytestmark = pytest.mark.slow

SECRET = "backup-secret"
KEYS = 400
WRITERS = 12
# The backup starts once this many distinct keys were written, and the load
# goes on until it ends.
KEYS_BEFORE_BACKUP = 300
DEADLINE_S = 120.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with temporary_cluster(local_config(3, secret=SECRET), root=tmp_path) as running:
        yield running


def test_backup_during_a_write_load_restores_every_acknowledged_write(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    acked: dict[tuple[bytes, int], tuple[bytes, float]] = {}  # (key, version) -> value, ack time
    during: list[int] = []  # puts acknowledged while the backup ran

    enough_keys = trio.Event()

    async def load(client: kvsvr.Client, stop: trio.Event, seed: int) -> None:
        rng = random.Random(seed)
        serial = 0
        while not stop.is_set():
            key = b"key%d" % rng.randrange(KEYS)
            serial += 1
            value = b"w%d-%d" % (seed, serial)
            try:
                version = await client.put(key, value)
            except Unavailable:
                continue  # outcome unknown: not acknowledged
            acked[(key, version)] = (value, time.time())
            if not enough_keys.is_set() and len({k for k, _ in acked}) >= KEYS_BEFORE_BACKUP:
                enough_keys.set()

    async def main() -> kvsvr.backup.Manifest:
        async with kvsvr.connect(cluster.addresses, secret=SECRET) as client:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for seed in range(WRITERS):
                    nursery.start_soon(load, client, stop, seed)
                with trio.fail_after(DEADLINE_S):
                    await enough_keys.wait()
                before = len(acked)
                with trio.fail_after(DEADLINE_S):
                    result = await take_backup(
                        cluster.addresses, SECRET, tmp_path / "backup", rate_bytes_per_s=1 << 26
                    )
                during.append(len(acked) - before)
                stop.set()
        return result.manifest

    manifest = trio.run(main)
    assert during[0] > 0, "no write was acknowledged while the backup ran"
    assert verify_backup(tmp_path / "backup") == manifest
    started_s = manifest.started_at_ms / 1000
    required: dict[bytes, int] = {}
    for (key, version), (_, acked_at) in acked.items():
        if acked_at < started_s:
            required[key] = max(required.get(key, 0), version)
    assert len(required) >= KEYS_BEFORE_BACKUP
    print(
        f"{len(acked)} puts, {during[0]} during the backup; {len(required)} keys checked; "
        f"{manifest.keys_read_through_cluster} keys read through the cluster"
    )

    new = tmp_path / "restored"
    config, _ = restore_backup(
        tmp_path / "backup", new, nodes=3, base_port=free_base_port(3), secret=None
    )
    assert config.cluster_id != cluster.config.cluster_id
    with LocalCluster(new / "cluster.toml") as restored:
        restored.start_all()
        with kvsvr.SyncClient(restored.addresses) as client:
            for key, version in sorted(required.items()):
                item = client.get(key)
                assert item is not None, f"{key!r} (acknowledged at version {version}) is missing"
                assert item.version >= version, (key, item.version, version)
                if (key, item.version) in acked:
                    assert item.value == acked[(key, item.version)][0]
            assert client.put(b"key1", b"after restore") > 0


def test_a_write_only_a_majority_accepted_is_in_the_backup(tmp_path: Path) -> None:
    """The state an acknowledged write leaves when its commit has reached no
    replica yet: a majority holds it accepted above the chosen version. Rows
    are planted in the nodes' LMDB before they start."""
    majority = Row(1, b"old", promised=(5, 3), accepted=Accepted((5, 3), 2, b"acked", None, 9))
    minority = Row(1, b"old", promised=(6, 3), accepted=Accepted((6, 3), 2, b"maybe", None, 10))
    plain = Row(version=1, value=b"old")
    planted = {"n1": [majority, minority], "n2": [majority, plain], "n3": [plain, plain]}
    with LocalCluster.create(tmp_path / "cluster", local_config(3, secret=SECRET)) as cluster:
        for node_id, (row_a, row_b) in planted.items():
            cluster.data_dir(node_id).mkdir(parents=True)
            storage = Storage.open(cluster.data_dir(node_id), tables=["default"])
            storage.stage("default", encode_key(b"a"), row_a)
            storage.stage("default", encode_key(b"b"), row_b)
            storage.close()
        cluster.start_all()
        result = trio.run(
            lambda: take_backup(
                cluster.addresses, SECRET, tmp_path / "backup", rate_bytes_per_s=1 << 26
            )
        )
    assert result.manifest.keys_read_through_cluster == 1  # b: accepted on one of three
    config, _ = restore_backup(
        tmp_path / "backup", tmp_path / "new", nodes=1, base_port=free_base_port(1), secret=None
    )
    assert config.replication == 1
    with LocalCluster(tmp_path / "new" / "cluster.toml") as restored:
        restored.start_all()
        with kvsvr.SyncClient(restored.addresses) as client:
            a = client.get(b"a")
            assert a is not None and (a.version, a.value) == (2, b"acked")
            # b was read through the cluster: whichever its read settled on
            # (a majority without n1 answers 1; with n1 it recovers 2).
            b = client.get(b"b")
            assert b is not None and (b.version, b.value) in ((1, b"old"), (2, b"maybe"))


def test_a_node_killed_mid_backup_is_left_out(cluster: LocalCluster, tmp_path: Path) -> None:
    rows = 1500
    with kvsvr.SyncClient(cluster.addresses, secret=SECRET) as client:
        for index in range(rows):
            client.put(b"row%d" % index, b"x" * 100)
    out = tmp_path / "backup"
    # 64 KiB/s: each node's copy takes a few seconds, time to kill one mid-way.
    backup = subprocess.Popen(
        [
            *(sys.executable, "-m", "kvsvr", "backup"),
            *("--cluster", ",".join(cluster.addresses), "--secret", SECRET),
            *("--out", str(out), "--rate-kib-s", "64"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        partial = out / ".copies" / "n3" / "data.mdb"
        deadline = time.monotonic() + DEADLINE_S
        while not (partial.exists() and partial.stat().st_size > 0):
            assert backup.poll() is None, backup.communicate()
            assert time.monotonic() < deadline, "the backup never started copying n3"
            time.sleep(0.05)
        cluster.kill("n3")
        stdout, stderr = backup.communicate(timeout=DEADLINE_S)
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.wait()
    assert backup.returncode == 0, stderr
    assert "node n3 gave no copy" in stdout
    manifest = verify_backup(out)
    assert manifest.copies_from == ("n1", "n2") and manifest.rows == rows
    assert not (out / ".copies").exists()


def test_too_few_copies_is_a_clear_error(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.kill("n2")
    cluster.kill("n3")
    out = tmp_path / "backup"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "kvsvr", "backup"),
            *("--cluster", cluster.address("n1"), "--secret", SECRET, "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert done.returncode == 4, done.stderr
    assert "a backup needs a majority" in done.stderr and "n2" in done.stderr
    assert list(out.iterdir()) == []


def test_a_node_that_does_not_vote_gives_no_copy(tmp_path: Path) -> None:
    """A founding node alone (its peers down) waits for them and does not
    vote: its copy would be no replica's whole state, so it refuses and the
    backup, with no other copy, fails naming why."""
    with LocalCluster.create(tmp_path / "cluster", local_config(3, secret=SECRET)) as cluster:
        cluster.start("n1")
        assert cluster.not_ready("n1") is not None
        with pytest.raises(BackupFailed, match="n1: node n1 does not vote yet"):
            trio.run(
                lambda: take_backup(
                    cluster.addresses, SECRET, tmp_path / "backup", rate_bytes_per_s=1 << 26
                )
            )
        assert cluster.not_ready("n1") is not None
        assert not (cluster.data_dir("n1") / "backup-copy").exists()
    assert list((tmp_path / "backup").iterdir()) == []
