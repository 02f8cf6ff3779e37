"""The residency guard: /proc parsing on sample text, and a real trim of an LMDB
map in this process (RssFile drops; every row reads back intact, also while
trims run concurrently with the reads)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from kvsvr.protocol.state import Row
from kvsvr.storage import Storage, residency
from kvsvr.storage.residency import (
    Mapping,
    MemoryFigures,
    ResidencyGuard,
    data_file_mappings,
    parse_maps,
    parse_status,
)

SAMPLE_STATUS = """\
Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t  412345 kB
VmSize:\t  401234 kB
VmHWM:\t  123456 kB
VmRSS:\t  109312 kB
RssAnon:\t   40960 kB
RssFile:\t   68352 kB
RssShmem:\t       0 kB
VmData:\t   61234 kB
Threads:\t4
"""

SAMPLE_MAPS = """\
55d0c8a00000-55d0c8a2c000 r--p 00000000 08:01 1048601                    /usr/bin/python3.11
7f3a10000000-7f3a50000000 r--s 00000000 08:01 2097153                    /tmp/kvsvr x/n1/data.mdb
7f3a50000000-7f3a50002000 rw-s 00000000 08:01 2097154                    /tmp/kvsvr x/n1/lock.mdb
7f3a60000000-7f3a60100000 rw-s 00000000 08:01 2097155                    /tmp/kvsvr x/n2/data.mdb
7f3a70000000-7f3a70100000 r--p 00000000 08:01 2097153                    /tmp/kvsvr x/n1/data.mdb
7f3a80000000-7f3a80021000 rw-p 00000000 00:00 0
7ffc1a2b3000-7ffc1a2d4000 rw-p 00000000 00:00 0                          [stack]
"""


def test_parse_status_reads_the_three_figures_in_bytes() -> None:
    assert parse_status(SAMPLE_STATUS) == MemoryFigures(
        vm_rss_bytes=109312 << 10, rss_anon_bytes=40960 << 10, rss_file_bytes=68352 << 10
    )
    # A kernel without the split fields (before 4.5) gives zeros, not an error.
    assert parse_status("VmRSS:\t 2048 kB\n") == MemoryFigures(vm_rss_bytes=2048 << 10)


def test_parse_maps_keeps_paths_with_spaces_and_anonymous_mappings() -> None:
    mappings = parse_maps(SAMPLE_MAPS)
    assert len(mappings) == 7
    assert mappings[1] == Mapping(
        0x7F3A10000000, 0x7F3A50000000, "r--s", "/tmp/kvsvr x/n1/data.mdb"
    )
    assert mappings[1].length == 1 << 30
    assert mappings[5].path == ""
    assert mappings[6].path == "[stack]"
    # Only the lines holding a path, the others skipped unparsed.
    assert parse_maps(SAMPLE_MAPS, "/n1/") == [mappings[1], mappings[2], mappings[4]]


def test_only_the_read_only_shared_map_of_this_data_file_is_trimmable() -> None:
    found = data_file_mappings(parse_maps(SAMPLE_MAPS), "/tmp/kvsvr x/n1/data.mdb")
    # Not lock.mdb, not another node's file, not a writable shared map, not a
    # private (copy-on-write) map of the same file.
    assert [(m.start, m.permissions) for m in found] == [(0x7F3A10000000, "r--s")]
    assert data_file_mappings(parse_maps(SAMPLE_MAPS), "/tmp/kvsvr x/n2/data.mdb") == []


VALUE_BYTES = 60 << 10
ROWS = 1100  # ~64 MiB of values
BATCH_ROWS = 200


def _row(index: int) -> Row:
    value = index.to_bytes(4, "big") * (VALUE_BYTES // 4)
    return Row(version=1, value=value)


async def _write_rows(storage: Storage) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        for first in range(0, ROWS, BATCH_ROWS):
            tickets = [
                storage.stage("t", b"k%06d" % index, _row(index))
                for index in range(first, min(first + BATCH_ROWS, ROWS))
            ]
            for ticket in tickets:
                await storage.wait_durable(ticket)
        await storage.aclose()


def _read_all(storage: Storage) -> None:
    for index in range(ROWS):
        assert storage.read_row("t", b"k%06d" % index) == _row(index), index


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and madvise")
def test_trim_lowers_rss_file_and_rows_read_back_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage.open(tmp_path, tables=["t"], map_size_bytes=256 << 20)
    trio.run(_write_rows, storage)
    # Reopen, so the reads below fault the map in from the page cache.
    storage = Storage.open(tmp_path, tables=["t"], map_size_bytes=256 << 20)
    try:
        [mapping] = residency.mapped_data_files(tmp_path)
        assert mapping.permissions == "r--s"  # writemap off: never a writable map

        _read_all(storage)
        before = residency.read_memory().rss_file_bytes
        assert residency.trim_data_file(tmp_path) == mapping.length
        after = residency.read_memory().rss_file_bytes
        # The reads mapped ~64 MiB of the file in; the trim gives at least half back.
        assert before - after >= 32 << 20, (before, after)

        # Reads after a trim re-fault the pages: same bytes. And trims racing
        # reads (as the node's guard may, against the writer thread) are safe.
        stop = threading.Event()
        trims = 0

        def trim_forever() -> None:
            nonlocal trims
            while not stop.is_set():
                residency.trim_data_file(tmp_path)
                trims += 1

        thread = threading.Thread(target=trim_forever)
        thread.start()
        try:
            _read_all(storage)
            _read_all(storage)
        finally:
            stop.set()
            thread.join()
        assert trims > 0

        # The guard trims above its limit and counts it; below, it does nothing.
        _read_all(storage)
        guard = ResidencyGuard(tmp_path, mapped_rss_max_bytes=1 << 20)
        assert guard.check()
        assert guard.trims == 1 and guard.trimmed_bytes >= 32 << 20
        idle = ResidencyGuard(tmp_path, mapped_rss_max_bytes=1 << 40)
        assert not idle.check() and idle.trims == 0
        # What another part lends (the cache's never-used budget) raises the
        # limit: the same RssFile trims only once the loan is gone.
        _read_all(storage)
        loan = [1 << 40]
        lending = ResidencyGuard(tmp_path, mapped_rss_max_bytes=1 << 20, lent_bytes=lambda: loan[0])
        assert lending.limit_bytes() == (1 << 40) + (1 << 20)
        assert not lending.check() and lending.trims == 0
        loan[0] = 0
        assert lending.check() and lending.trims == 1
        assert lending.status()["mapped_rss_limit_bytes"] == 1 << 20
        assert guard.status()["trims"] == 1

        # While it runs, the guard also checks after every read_check_bytes
        # read through the store: a burst of reads between two timer ticks
        # (one tick an hour here) is trimmed as it happens.
        # A guard with its store looks the map up once, not per trim.
        lookups: list[int] = []
        look_up = residency.mapped_data_files

        def counted(data_dir: str | Path) -> list[Mapping]:
            lookups.append(1)
            return look_up(data_dir)

        monkeypatch.setattr(residency, "mapped_data_files", counted)

        async def burst() -> ResidencyGuard:
            hourly = ResidencyGuard(
                tmp_path,
                storage,
                mapped_rss_max_bytes=1 << 20,
                check_s=3600,
                read_check_bytes=8 << 20,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hourly.run)
                await trio.testing.wait_all_tasks_blocked()
                first_checks = hourly.checks
                _read_all(storage)
                assert hourly.checks - first_checks >= 7  # ~64 MiB / 8 MiB
                nursery.cancel_scope.cancel()
            return hourly

        hourly = trio.run(burst)
        assert hourly.trims >= 7, hourly.status()
        assert len(lookups) == 1
        assert storage._read_hook is None  # removed when the guard stops
    finally:
        trio.run(storage.aclose)


def test_scan_pages_end_at_bytes_max_and_reads_call_the_hook(tmp_path: Path) -> None:
    async def main() -> None:
        storage = Storage.open(tmp_path, tables=["t"])
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            for index in range(10):
                await storage.wait_durable(
                    storage.stage("t", b"k%d" % index, Row(version=1, value=bytes(1000)))
                )
            await storage.aclose()
        storage = Storage.open(tmp_path, tables=["t"])
        try:
            row_bytes = sum(len(k) + len(r) for k, r in storage.scan_table_raw("t", b"", None, 1))
            assert row_bytes > 1000
            page = storage.scan_table_raw("t", b"", None, 100, bytes_max=2 * row_bytes + 1)
            assert len(page) == 3  # the row that reaches bytes_max is the last
            assert len(storage.scan_table_raw("t", b"", None, 100, bytes_max=1)) == 1
            assert len(storage.scan_table_raw("t", b"", None, 100)) == 10

            calls: list[int] = []
            storage.set_read_hook(lambda: calls.append(1), every_bytes=4 * row_bytes)
            storage.scan_table_raw("t", b"", None, 100)  # 10 rows: 2 calls
            assert len(calls) == 2
            for index in range(8):  # 8 more rows: 10 + 8 = 18 -> 4 calls in all
                assert storage.read_row("t", b"k%d" % index) is not None
            assert len(calls) == 4
            storage.set_read_hook(None, 0)
            storage.scan_table_raw("t", b"", None, 100)
            assert len(calls) == 4
        finally:
            await storage.aclose()

    trio.run(main)


def test_the_guard_is_a_no_op_when_nothing_is_mapped(tmp_path: Path) -> None:
    assert residency.mapped_data_files(tmp_path) == []
    assert residency.trim_data_file(tmp_path) == 0
    guard = ResidencyGuard(tmp_path, mapped_rss_max_bytes=1)
    assert not guard.check()
    assert guard.trims == 0
