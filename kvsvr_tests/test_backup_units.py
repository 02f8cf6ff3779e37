"""Backup and restore without a cluster: which version a backup keeps (the
merge rules), the file format, `verify-backup` refusing damaged backups,
`restore` refusing bad input and writing what nodes read, and a node's
backup side (copies, chunks, one backup at a time, the rate limit)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import lmdb
import pytest
import trio
import trio.testing

from kvsvr.api import NodeInfo, PartitionMap, TableConsistency, TableInfo
from kvsvr.backup.format import (
    MANIFEST_NAME,
    BadBackup,
    Manifest,
    NodeEntry,
    Record,
    TableEntry,
    partition_file_name,
    read_records,
)
from kvsvr.backup.merge import CORRUPT, Settle, settle_eventual, settle_strong
from kvsvr.backup.messages import (
    BEGIN_METHOD,
    CHUNK_METHOD,
    END_METHOD,
    BeginReply,
    BeginRequest,
    ChunkReply,
    ChunkRequest,
    EndRequest,
)
from kvsvr.backup.restore import RestoreRefused, restore_backup
from kvsvr.backup.take import _merge, _PartitionFiles
from kvsvr.backup.verify import verify_backup
from kvsvr.cli import main
from kvsvr.errors import InvalidRequest, KvsvrError, Unavailable
from kvsvr.keys import encode_key
from kvsvr.node import backup_side
from kvsvr.node.backup_side import SESSION_IDLE_S, BackupSide
from kvsvr.node.catchup.rebuild import IDENTITY_KEY
from kvsvr.protocol.lifecycle import Identity
from kvsvr.protocol.placement import partition_of
from kvsvr.protocol.state import Accepted, Row
from kvsvr.storage import Storage
from kvsvr.storage.snapshot import CopyReader, fill_environment

# --- merge rules ------------------------------------------------------------------------

K = b"\x00\x01k"


def chosen(version: int, value: bytes | None = b"v") -> Row:
    return Row(version=version, value=value)


def in_flight(chosen_version: int, ballot: tuple[int, int], version: int, value: bytes) -> Row:
    return Row(
        version=chosen_version,
        value=b"old" if chosen_version else None,
        accepted=Accepted(ballot, version, value, None, 7),
    )


def test_the_highest_chosen_version_wins() -> None:
    decision = settle_strong("t", K, [chosen(3, b"a"), chosen(5, b"b"), None], 3)
    assert decision == Record("t", K, 5, b"b", None, 0, 0)


def test_a_proposal_a_majority_accepted_is_chosen() -> None:
    copies = [in_flight(2, (4, 1), 3, b"new"), in_flight(2, (4, 1), 3, b"new"), chosen(2)]
    decision = settle_strong("t", K, copies, 3)
    assert isinstance(decision, Record) and decision.version == 3 and decision.value == b"new"


def test_a_proposal_on_a_minority_is_ambiguous() -> None:
    copies = [in_flight(2, (4, 1), 3, b"new"), chosen(2), chosen(2)]
    assert settle_strong("t", K, copies, 3) is Settle.AMBIGUOUS


def test_same_version_under_different_ballots_is_not_a_majority() -> None:
    copies = [in_flight(2, (4, 1), 3, b"new"), in_flight(2, (5, 2), 3, b"new"), chosen(2)]
    assert settle_strong("t", K, copies, 3) is Settle.AMBIGUOUS


def test_a_proposal_below_a_chosen_version_is_ignored() -> None:
    copies = [in_flight(2, (4, 1), 3, b"x"), chosen(4, b"later"), None]
    decision = settle_strong("t", K, copies, 3)
    assert isinstance(decision, Record) and (decision.version, decision.value) == (4, b"later")


def test_with_two_copies_of_three_a_lone_proposal_is_ambiguous() -> None:
    # A replica's copy is missing: one copy holding the proposal is not a majority of 3.
    assert settle_strong("t", K, [in_flight(1, (2, 1), 2, b"x"), chosen(1)], 3) is Settle.AMBIGUOUS


def test_corrupt_copy_makes_the_key_ambiguous() -> None:
    assert settle_strong("t", K, [chosen(3), chosen(3), CORRUPT], 3) is Settle.AMBIGUOUS


def test_tombstones_and_missing_keys_are_absent() -> None:
    assert settle_strong("t", K, [chosen(4, None), chosen(4, None), None], 3) is Settle.ABSENT
    assert settle_strong("t", K, [None, None, None], 3) is Settle.ABSENT


def test_eventual_rows_take_the_highest_stamp() -> None:
    newer = Row(version=900, value=b"new", hlc=900)
    decision = settle_eventual("t", K, [Row(version=500, value=b"old", hlc=500), newer, CORRUPT])
    assert isinstance(decision, Record) and decision.value == b"new"


# --- a backup on disk -------------------------------------------------------------------

PARTITIONS = 4


def record(index: int) -> Record:
    return Record(
        "default", encode_key(f"key{index}".encode()), index + 1, b"v%d" % index, None, 0, 0
    )


def write_backup(directory: Path, records: list[Record]) -> Manifest:
    directory.mkdir()
    files = _PartitionFiles(directory, PARTITIONS)
    for item in records:
        files.add(partition_of(item.table, item.key[2:], PARTITIONS), item)
    manifest = Manifest(
        cluster_id="source-cluster",
        started_at_ms=1,
        finished_at_ms=2,
        partitions=PARTITIONS,
        replication=3,
        nodes=tuple(NodeEntry(f"n{i}", i, f"127.0.0.1:{7100 + i}", f"z{i}") for i in (1, 2, 3)),
        replica_sets=((1, 2, 3),) * PARTITIONS,
        tables=(TableEntry("default", "strong", 0.0),),
        files=tuple(files.finish()),
        copies_from=("n1", "n2", "n3"),
        keys_read_through_cluster=0,
    )
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


@pytest.fixture
def backup(tmp_path: Path) -> Path:
    write_backup(tmp_path / "backup", [record(i) for i in range(200)])
    return tmp_path / "backup"


def biggest_file(backup: Path) -> Path:
    return max((backup / "data").iterdir(), key=lambda p: p.stat().st_size)


def test_a_written_backup_verifies(backup: Path) -> None:
    manifest = verify_backup(backup)
    assert manifest.rows == 200 and manifest.cluster_id == "source-cluster"
    assert main(["verify-backup", str(backup)]) == 0


def test_a_flipped_byte_is_refused(backup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = biggest_file(backup)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BadBackup, match=path.name):
        verify_backup(backup)
    assert main(["verify-backup", str(backup)]) == 5
    assert path.name in capsys.readouterr().err


def test_a_truncated_file_is_refused(backup: Path) -> None:
    path = biggest_file(backup)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(BadBackup, match=rf"{path.name}: \d+ bytes, the manifest says"):
        verify_backup(backup)


def test_a_deleted_file_is_refused(backup: Path) -> None:
    path = biggest_file(backup)
    path.unlink()
    with pytest.raises(BadBackup, match=f"{path.name} is missing"):
        verify_backup(backup)


def test_bad_manifest_json_is_refused(backup: Path) -> None:
    (backup / MANIFEST_NAME).write_text('{"format": "kvsvr-backup", ')
    with pytest.raises(BadBackup, match="not valid JSON"):
        verify_backup(backup)


def test_a_missing_manifest_is_refused(backup: Path) -> None:
    (backup / MANIFEST_NAME).unlink()
    with pytest.raises(BadBackup, match="unfinished"):
        verify_backup(backup)


def test_an_altered_manifest_count_is_refused(backup: Path) -> None:
    body = json.loads((backup / MANIFEST_NAME).read_text())
    body["files"][0]["rows"] += 1
    (backup / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(BadBackup, match="records, the manifest says"):
        verify_backup(backup)


def test_another_format_version_is_refused(backup: Path) -> None:
    body = json.loads((backup / MANIFEST_NAME).read_text())
    body["format_version"] = 99
    (backup / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(BadBackup, match="format version 99"):
        verify_backup(backup)


def test_a_file_the_manifest_does_not_list_is_refused(backup: Path) -> None:
    (backup / "data" / "p99999.rows").write_bytes(b"")
    with pytest.raises(BadBackup, match="does not list"):
        verify_backup(backup)


def test_a_record_in_the_wrong_partition_is_refused(tmp_path: Path) -> None:
    write_backup(tmp_path / "b", [record(1)])
    body = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    right = partition_of("default", b"key1", PARTITIONS)
    wrong = (right + 1) % PARTITIONS
    data = (tmp_path / "b" / partition_file_name(right)).read_bytes()
    (tmp_path / "b" / partition_file_name(right)).write_bytes(b"")
    (tmp_path / "b" / partition_file_name(wrong)).write_bytes(data)
    for entry in body["files"]:
        placed = data if entry["partition"] == wrong else b""
        entry.update(rows=1 if placed else 0, bytes=len(placed), crc32c=crc32c.crc32c(placed))
    (tmp_path / "b" / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(BadBackup, match="belongs to another partition"):
        verify_backup(tmp_path / "b")


def test_records_cut_mid_way_are_refused() -> None:
    packed = record(1).pack() + record(2).pack()
    assert len(list(read_records(iter([packed[:5], packed[5:]]), "f"))) == 2
    with pytest.raises(BadBackup, match="truncated"):
        list(read_records(iter([packed[:-2]]), "f"))


# --- restore ----------------------------------------------------------------------------


def test_restore_writes_each_node_its_partitions_and_identity(backup: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    config, written = restore_backup(backup, new, nodes=3, base_port=7100, secret=None)
    assert config.cluster_id not in (None, "source-cluster")
    assert written == {"n1": 200, "n2": 200, "n3": 200}  # 3 replicas on 3 nodes
    assert (new / "cluster.toml").read_text().count("[[nodes]]") == 3
    storage = Storage.open(new / "n2", tables=["default"])
    try:
        row = storage.read_row("default", record(7).key)
        assert row is not None and (row.version, row.value, row.accepted) == (8, b"v7", None)
        identity = storage.read_meta(IDENTITY_KEY)
        assert identity is not None
        assert Identity.from_bytes(identity) == Identity(str(config.cluster_id), "n2")
    finally:
        storage.close()


def test_restore_onto_five_nodes_places_by_the_new_layout(backup: Path, tmp_path: Path) -> None:
    config, written = restore_backup(backup, tmp_path / "new", nodes=5, base_port=7100, secret="s")
    assert sum(written.values()) == 200 * 3
    assert set(written) == {"n1", "n2", "n3", "n4", "n5"}
    assert config.secret == b"s"


def test_restore_refuses_a_bad_backup_and_writes_nothing(backup: Path, tmp_path: Path) -> None:
    path = biggest_file(backup)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BadBackup):
        restore_backup(backup, tmp_path / "new", nodes=3, base_port=7100, secret=None)
    assert not (tmp_path / "new").exists()
    assert main(["restore", "--from", str(backup), "--dir", str(tmp_path / "new")]) == 5
    assert not (tmp_path / "new").exists()


def test_restore_refuses_a_non_empty_directory(backup: Path, tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("mine")
    with pytest.raises(RestoreRefused, match="not an empty directory"):
        restore_backup(backup, tmp_path / "new", nodes=3, base_port=7100, secret=None)
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["keep.txt"]


# --- a node's backup side ---------------------------------------------------------------


def node_store(path: Path, rows: int) -> Storage:
    storage = Storage.open(path, tables=["default"])
    for index in range(rows):
        storage.stage("default", encode_key(b"k%d" % index), Row(version=1, value=b"x" * 100))
    storage.close()
    return Storage.open(path, tables=["default"])


async def pull(side: BackupSide, rate: int) -> tuple[BeginReply, bytes]:
    begun = await side.handle(BEGIN_METHOD, BeginRequest(rate).to_wire())
    reply = BeginReply.from_wire(begun)
    data = b""
    while len(data) < reply.size_bytes:
        body = await side.handle(CHUNK_METHOD, ChunkRequest(reply.session, len(data)).to_wire())
        data += ChunkReply.from_wire(body).data
    await side.handle(END_METHOD, EndRequest(reply.session).to_wire())
    return reply, data


def test_a_node_serves_a_consistent_copy_in_chunks(tmp_path: Path) -> None:
    storage = node_store(tmp_path / "node", 3000)
    side = BackupSide(storage.copy_committed, tmp_path / "node", "cid", "n1")
    try:
        reply, data = trio.run(pull, side, 64 * 1024 * 1024)
    finally:
        storage.close()
    assert reply.cluster_id == "cid" and len(data) == reply.size_bytes > 300_000
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "data.mdb").write_bytes(data)
    reader = CopyReader(tmp_path / "copy")
    try:
        assert sum(1 for _ in reader.rows("default")) == 3000
    finally:
        reader.close()
    assert not (tmp_path / "node" / "backup-copy").exists()


def test_a_node_sends_at_the_rate_asked(tmp_path: Path) -> None:
    storage = node_store(tmp_path / "node", 3000)
    side = BackupSide(storage.copy_committed, tmp_path / "node", "cid", "n1")
    clock = trio.testing.MockClock(autojump_threshold=0)
    rate = 64 * 1024

    async def timed() -> float:
        started = trio.current_time()
        _, data = await pull(side, rate)
        return (trio.current_time() - started) / (len(data) / rate)

    try:
        ratio = trio.run(timed, clock=clock)
    finally:
        storage.close()
    # The last chunk's send time is not waited for: a little under one.
    assert 0.8 <= ratio <= 1.1


def test_one_backup_at_a_time_and_chunks_need_a_session(tmp_path: Path) -> None:
    storage = node_store(tmp_path / "node", 10)
    side = BackupSide(storage.copy_committed, tmp_path / "node", "cid", "n1")

    async def run() -> None:
        await side.handle(BEGIN_METHOD, BeginRequest(1 << 20).to_wire())
        with pytest.raises(Unavailable, match="already running"):
            await side.handle(BEGIN_METHOD, BeginRequest(1 << 20).to_wire())
        with pytest.raises(InvalidRequest, match="no backup session"):
            await side.handle(CHUNK_METHOD, ChunkRequest(12345, 0).to_wire())
        with pytest.raises(InvalidRequest, match="rate_bytes_per_s"):
            await side.handle(BEGIN_METHOD, {"rate_bytes_per_s": 1})

    try:
        trio.run(run)
    finally:
        storage.close()


def test_a_damaged_chunk_is_refused() -> None:
    body = ChunkReply(b"abc").to_wire()
    body["data"] = b"abd"
    with pytest.raises(KvsvrError, match="crc32c"):
        ChunkReply.from_wire(body)


def test_copy_reader_lists_tables(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "e"), max_dbs=4)
    env.open_db(b"t:alpha")
    env.close()
    reader = CopyReader(tmp_path / "e")
    try:
        assert reader.tables == {"alpha"} and list(reader.rows("missing")) == []
    finally:
        reader.close()


def test_backup_refuses_a_non_empty_out_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    # Refused before any node is asked: no cluster listens on port 9.
    assert main(["backup", "--cluster", "127.0.0.1:9", "--out", str(tmp_path / "out")]) == 5
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_merging_copies_reads_every_replicas_row(tmp_path: Path) -> None:
    """Three copies disagreeing on each key: the merge must see all three."""
    a, b, c = (encode_key(name) for name in (b"a", b"b", b"c"))
    proposal = Accepted((2, 1), 2, b"new", None, 5)
    planted = {
        "n1": [(a, Row(version=3, value=b"3")), (b, Row(version=1, value=b"1", accepted=proposal))],
        "n2": [(a, Row(version=5, value=b"5")), (b, Row(version=1, value=b"1", accepted=proposal))],
        "n3": [(a, Row(version=4, value=b"4")), (b, Row(version=1, value=b"1")), (c, Row(1, b"c"))],
    }
    for node_id, rows in planted.items():
        fill_environment(
            tmp_path / node_id,
            tables=["default"],
            rows=[("default", key, row) for key, row in rows],
            meta=[],
            map_size_bytes=1 << 24,
        )
    layout = PartitionMap(
        PARTITIONS,
        3,
        tuple(NodeInfo(f"n{i}", i, "127.0.0.1", 9, f"z{i}") for i in (1, 2, 3)),
        ((1, 2, 3),) * PARTITIONS,
        (TableInfo("default", TableConsistency.STRONG, 0),),
    )
    (tmp_path / "out").mkdir()
    files = _PartitionFiles(tmp_path / "out", PARTITIONS)
    copies = {node_id: tmp_path / node_id for node_id in planted}
    assert trio.run(_merge, layout, copies, files, None) == 0  # nothing read through a cluster
    files.finish()
    kept = {
        record.key: (record.version, record.value)
        for path in sorted((tmp_path / "out" / "data").iterdir())
        for record in read_records(iter([path.read_bytes()]), path.name)
    }
    assert kept == {a: (5, b"5"), b: (2, b"new"), c: (1, b"c")}


# --- bad input: manifests, layouts, arguments -------------------------------------------


def edit_manifest(backup: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    body = json.loads((backup / MANIFEST_NAME).read_text())
    edit(body)
    (backup / MANIFEST_NAME).write_text(json.dumps(body))


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda b: b["tables"][0].update(consistency="bogus"), "consistency 'bogus'"),
        (lambda b: b["tables"][0].update(ttl_s="soon"), "'ttl_s' is not a number"),
        (lambda b: b.update(replication=4), "replication 4 with 3 nodes"),
        (lambda b: b.update(nodes=[]), "replication 3 with 0 nodes"),
        (lambda b: b.update(partitions=3), "not a power of two"),
        (lambda b: b.update(cluster_id=7), "'cluster_id' missing or not a str"),
        (lambda b: b["files"].pop(), "one file for each of partitions"),
    ],
)
def test_a_manifest_that_makes_no_sense_is_refused(
    backup: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, Any]], None],
    complaint: str,
) -> None:
    edit_manifest(backup, edit)
    with pytest.raises(BadBackup, match=re.escape(complaint)):
        verify_backup(backup)
    new = tmp_path / "new"
    assert main(["restore", "--from", str(backup), "--dir", str(new), "--nodes", "3"]) == 5
    assert complaint in capsys.readouterr().err
    assert not new.exists()


def test_a_layout_no_node_would_accept_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every file checks out, but a table name the config refuses (over 64
    # bytes) would make a cluster.toml no node starts from.
    write_backup(tmp_path / "b", [record(i) for i in range(10)])
    edit_manifest(
        tmp_path / "b",
        lambda b: b["tables"].append({"name": "t" * 65, "consistency": "strong", "ttl_s": 0}),
    )
    verify_backup(tmp_path / "b")
    with pytest.raises(RestoreRefused, match="bad table name"):
        restore_backup(tmp_path / "b", tmp_path / "new", nodes=3, base_port=7100, secret=None)
    assert not (tmp_path / "new").exists()
    assert main(["restore", "--from", str(tmp_path / "b"), "--dir", str(tmp_path / "new")]) == 5
    assert "no valid cluster config" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_restore_refuses_more_local_nodes_than_up_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_backup(tmp_path / "b", [record(1)])
    edit_manifest(
        tmp_path / "b",
        lambda b: b.update(
            nodes=[
                {"id": f"n{i}", "index": i, "address": f"10.0.0.{i}:7100", "zone": "z"}
                for i in range(1, 41)
            ]
        ),
    )
    assert main(["restore", "--from", str(tmp_path / "b"), "--dir", str(tmp_path / "new")]) == 5
    assert "had 40 nodes" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["backup", "--cluster", "127.0.0.1:9"], "--out"),
        (["backup", "--cluster", "127.0.0.1:9", "--out", "X", "--rate-mib-s", "0"], "must be"),
        (["backup", "--cluster", "127.0.0.1:9", "--out", "X", "--rate-mib-s", "x"], "integer"),
        (["backup", "--cluster", "127.0.0.1:9", "--out", "X", "--rate-kib-s", "-5"], "must be"),
        (["verify-backup"], "DIR"),
        (["restore", "--from", "B"], "--dir"),
        (["restore", "--dir", "N"], "--from"),
        (["restore", "--from", "B", "--dir", "N", "--nodes", "0"], "must be from 1"),
        (["restore", "--from", "B", "--dir", "N", "--nodes", "17"], "must be from 1"),
        (["restore", "--from", "B", "--dir", "N", "--base-port", "70000"], "must be from 1"),
    ],
)
def test_bad_arguments_are_usage_errors_that_change_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    complaint: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert complaint in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_verify_backup_of_a_missing_directory_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify-backup", str(tmp_path / "nowhere")]) == 5
    assert "is not a directory" in capsys.readouterr().err


# --- a node's backup side protects itself -----------------------------------------------


def test_a_node_that_does_not_vote_gives_no_copy(tmp_path: Path) -> None:
    storage = node_store(tmp_path / "node", 10)
    side = BackupSide(storage.copy_committed, tmp_path / "node", "cid", "n1", votes=lambda: False)

    async def run() -> None:
        with pytest.raises(Unavailable, match="does not vote"):
            await side.handle(BEGIN_METHOD, BeginRequest(1 << 20).to_wire())

    try:
        trio.run(run)
    finally:
        storage.close()
    assert not (tmp_path / "node" / "backup-copy").exists()


def test_a_copy_still_being_made_is_never_replaced(tmp_path: Path) -> None:
    """However long a copy takes, a second backup is refused meanwhile (it
    would remove the copy under the first)."""
    storage = node_store(tmp_path / "node", 10)
    release = threading.Event()
    calls: list[Path] = []

    def slow_copy(directory: Path) -> Path:
        calls.append(directory)
        if len(calls) == 1:
            release.wait(timeout=60)
        return storage.copy_committed(directory)

    side = BackupSide(slow_copy, tmp_path / "node", "cid", "n1")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side.handle, BEGIN_METHOD, BeginRequest(1 << 20).to_wire())
            await trio.sleep(SESSION_IDLE_S * 3)  # the mock clock jumps while the copy blocks
            try:
                with pytest.raises(Unavailable, match="making its copy"):
                    await side.handle(BEGIN_METHOD, BeginRequest(1 << 20).to_wire())
            finally:
                release.set()

    try:
        trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        storage.close()
    assert len(calls) == 1


def test_a_node_reads_one_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunk requests at once (a client pipelining them) hold one chunk
    in memory at a time, and together still keep to the rate."""
    storage = node_store(tmp_path / "node", 3000)
    side = BackupSide(storage.copy_committed, tmp_path / "node", "cid", "n1")
    reading = [0, 0]  # now, most at once

    def counted_read(path: Path, offset: int, size: int) -> bytes:
        reading[0] += 1
        reading[1] = max(reading)
        time.sleep(0.02)
        reading[0] -= 1
        return real_read(path, offset, size)

    real_read = backup_side._read_at
    monkeypatch.setattr(backup_side, "_read_at", counted_read)
    rate = 16 * 1024
    requests = 8

    async def run() -> float:
        begun = BeginReply.from_wire(await side.handle(BEGIN_METHOD, BeginRequest(rate).to_wire()))
        assert begun.size_bytes >= requests * rate
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for index in range(requests):
                body = ChunkRequest(begun.session, index * rate).to_wire()
                nursery.start_soon(side.handle, CHUNK_METHOD, body)
        return trio.current_time() - started

    try:
        elapsed = trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        storage.close()
    assert reading[1] == 1
    # Eight chunks of a second's worth each: the last may go at 7 s.
    assert elapsed >= requests - 1.5
