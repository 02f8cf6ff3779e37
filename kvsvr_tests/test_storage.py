"""Storage tests: the row codec (property tests) and the LMDB engine on a temporary
directory (group commit, pending overlay, scans, corruption, fail-stop)."""

from __future__ import annotations

import copy
import dataclasses
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import crc32c
import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsvr.errors import CorruptRow, InvalidRequest
from kvsvr.protocol.state import Accepted, Row
from kvsvr.storage import (
    HINTS_DB,
    CommitTicket,
    Storage,
    StorageClosed,
    StorageFailed,
    StorageOverloaded,
    decode_row,
    encode_row,
    engine,
)
from kvsvr.storage.codec import ROW_FORMAT_VERSION, ROW_INT_MAX
from kvsvr.storage.commit import Op
from kvsvr.storage.engine import MAP_SIZE_BYTES_MIN, prefix_end
from kvsvr_tests.build_mode import COMPILED, pure_python_only

TABLES = ["users", "posts"]

# --- Strategies -------------------------------------------------------------------

uints = st.integers(min_value=0, max_value=ROW_INT_MAX)
small_uints = st.integers(min_value=0, max_value=1000)
values = st.none() | st.binary(max_size=64)
ballots = st.tuples(uints, uints)
accepted_proposals = st.builds(
    Accepted,
    ballot=ballots,
    version=uints,
    value=values,
    expires_at_ms=st.none() | uints,
    op_id=uints,
)
rows = st.builds(
    Row,
    version=uints,
    value=values,
    expires_at_ms=st.none() | uints,
    promised=ballots,
    accepted=st.none() | accepted_proposals,
    hlc=uints,
    op_id=uints,
).flatmap(
    lambda row: st.lists(
        st.tuples(st.integers(0, max(row.version - 1, 0)), uints),
        max_size=8 if row.version > 0 else 0,
    ).map(lambda ops: dataclasses.replace(row, recent_ops=tuple(ops)))
)
# Anything msgpack can carry, to feed the decoder well-formed but wrong bodies.
msgpack_objects = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=ROW_INT_MAX)
    | st.floats(allow_nan=False)
    | st.binary(max_size=8)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=9),
    max_leaves=20,
)


def with_crc(body: bytes) -> bytes:
    return struct.pack("<I", crc32c.crc32c(body)) + body


def row_of(n: int) -> Row:
    return Row(version=n, value=b"value-%d" % n, promised=(n, 1), hlc=n)


# --- Codec ------------------------------------------------------------------------


@given(rows)
def test_codec_round_trips_every_row(row: Row) -> None:
    assert decode_row(encode_row(row)) == row


@given(rows, st.data())
def test_codec_detects_any_flipped_byte(row: Row, data: st.DataObject) -> None:
    encoded = encode_row(row)
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    damaged = bytearray(encoded)
    damaged[index] ^= mask
    with pytest.raises(CorruptRow):
        decode_row(bytes(damaged))


@given(rows, st.data())
def test_codec_detects_truncation(row: Row, data: st.DataObject) -> None:
    encoded = encode_row(row)
    length = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(CorruptRow):
        decode_row(encoded[:length])


@given(st.binary(max_size=200))
def test_codec_random_bytes_are_corrupt_or_a_row(data: bytes) -> None:
    try:
        assert isinstance(decode_row(data), Row)
    except CorruptRow:
        pass


@given(st.binary(max_size=200))
def test_codec_random_body_with_valid_crc_is_corrupt_or_a_row(body: bytes) -> None:
    try:
        assert isinstance(decode_row(with_crc(body)), Row)
    except CorruptRow:
        pass


@given(st.lists(msgpack_objects, min_size=8, max_size=8) | msgpack_objects)
def test_codec_wrong_shapes_with_valid_crc_are_corrupt_or_valid(fields: object) -> None:
    data = with_crc(msgpack.packb(fields, use_bin_type=True))
    try:
        row = decode_row(data)
    except CorruptRow:
        return
    assert decode_row(encode_row(row)) == row  # whatever decodes is a valid row


def good_fields() -> list[object]:
    return [1, 3, b"v", None, 4, 2, [5, 1, 4, b"w", 99, 11], 7, 12, [[2, 13]]]


@pytest.mark.parametrize(
    ("index", "bad_value", "message"),
    [
        (0, 2, "unknown row format version 2"),
        (0, True, "format version is not an integer"),
        (1, True, "version"),
        (1, -1, "version"),
        (1, 1.0, "version"),
        (2, "text", "value"),
        (3, "soon", "expires_at_ms"),
        (4, None, "promised"),
        (6, [5, 1, 4, b"w", 99], "accepted"),
        (6, [5, 1, 4, "w", 99, 11], "accepted.value"),
        (6, [5, 1, 4, b"w", 99, -1], "accepted.op_id"),
        (6, {"a": 1}, "not valid msgpack"),  # maps are refused by the unpacker
        (7, b"\x00", "hlc"),
        (8, "id", "op_id"),
        (9, [[3, 13]], "recent_ops"),
        (9, [[2]], "recent ops"),
    ],
)
def test_codec_rejects_each_bad_field(index: int, bad_value: object, message: str) -> None:
    fields = good_fields()
    assert isinstance(decode_row(with_crc(msgpack.packb(fields, use_bin_type=True))), Row)
    fields[index] = bad_value
    with pytest.raises(CorruptRow, match=message):
        decode_row(with_crc(msgpack.packb(fields, use_bin_type=True)))


def test_codec_rejects_wrong_lengths_and_trailing_data() -> None:
    body = msgpack.packb(good_fields(), use_bin_type=True)
    for bad in [b"", b"\x00\x00\x00\x00", with_crc(body + b"\x00"), with_crc(body[:-1])]:
        with pytest.raises(CorruptRow):
            decode_row(bad)
    for fields in [good_fields()[:9], [*good_fields(), 0]]:
        with pytest.raises(CorruptRow):
            decode_row(with_crc(msgpack.packb(fields, use_bin_type=True)))


@given(rows)
def test_codec_encodes_the_documented_list_layout(row: Row) -> None:
    """encode_row packs tuples; the bytes must be those of the documented lists."""
    accepted = row.accepted
    fields = [
        ROW_FORMAT_VERSION,
        row.version,
        row.value,
        row.expires_at_ms,
        row.promised[0],
        row.promised[1],
        None
        if accepted is None
        else [
            accepted.ballot[0],
            accepted.ballot[1],
            accepted.version,
            accepted.value,
            accepted.expires_at_ms,
            accepted.op_id,
        ],
        row.hlc,
        row.op_id,
        [[version, op_id] for version, op_id in row.recent_ops],
    ]
    assert encode_row(row) == with_crc(msgpack.packb(fields, use_bin_type=True))


@st.composite
def _field_variants(draw: st.DrawFn) -> list[object]:
    """Row bodies with a few fields (at any depth) replaced by anything msgpack
    can carry, or by an edge case of the integer checks."""
    replacements = (
        st.sampled_from(
            [0, 1, -1, ROW_INT_MAX, -(1 << 63), True, False, 1.0, None, b"", "", [], [0, 0]]
        )
        | st.integers(min_value=-(1 << 63), max_value=ROW_INT_MAX)
        | msgpack_objects
    )

    fields = good_fields()
    for _ in range(draw(st.integers(0, 2))):
        index = draw(st.integers(1, len(fields) - 1) | st.just(0))
        target: list[object] = fields
        inner = fields[index]
        if isinstance(inner, list) and inner and draw(st.booleans()):
            target, index = inner, draw(st.integers(0, len(inner) - 1))
            pair = target[index]
            if isinstance(pair, list) and pair and draw(st.booleans()):
                target, index = pair, draw(st.integers(0, len(pair) - 1))
        target[index] = copy.deepcopy(draw(replacements))  # sampled lists are shared
    return fields


@settings(max_examples=1000)
@given(_field_variants())
def test_codec_fast_decode_agrees_with_the_field_by_field_checks(fields: list[object]) -> None:
    """decode_row's one-expression check of a body accepts exactly what the
    field-by-field path (`_row_from_fields`, `row_problem`) accepts."""
    from kvsvr.storage import codec

    body = msgpack.packb(fields, use_bin_type=True)
    try:
        unpacked = msgpack.unpackb(body, use_list=False, max_array_len=10)
        expected: Row | None = codec._row_from_fields(unpacked)
        if codec.row_problem(expected) is not None:  # type: ignore[arg-type]
            expected = None
    except (CorruptRow, ValueError):
        expected = None
    try:
        got: Row | None = decode_row(with_crc(body))
    except CorruptRow:
        got = None
    assert got == expected


@pytest.mark.skipif(COMPILED, reason="compiled, Row cannot be subclassed outside compiled code")
def test_codec_encodes_a_row_subclass_like_its_row() -> None:
    """The exact-type fast check refuses subclasses; the full check takes them."""

    class MyRow(Row):
        pass

    fields = dict(version=3, value=b"v", promised=(4, 2), hlc=7, op_id=12, recent_ops=((2, 13),))
    assert encode_row(MyRow(**fields)) == encode_row(Row(**fields))  # type: ignore[arg-type]


def test_codec_fast_decode_agrees_for_every_single_change() -> None:
    """Every item of a row body, at any depth, replaced by each confusing value
    or dropped: decode_row accepts exactly what the field-by-field path does."""
    from kvsvr.storage import codec

    confusing: list[object] = [
        *(None, True, False, 0, 1, -1, 2, 3, 13, ROW_INT_MAX, -(1 << 63), 1.0, b"", "x"),
        *([], [1], [1, 2], [1, 2, 3], [True, 1], [1, -1], [[2, 13]], [[2, 13]] * 9),
    ]

    def paths(value: list[object], prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
        out = []
        for index, item in enumerate(value):
            out.append((*prefix, index))
            if isinstance(item, list):
                out += paths(item, (*prefix, index))
        return out

    goods = [good_fields(), [1, 3, b"v", None, 4, 2, None, 7, 12, []]]
    for good in goods:
        for path in paths(good):
            for change in [*confusing, "drop"]:
                fields = copy.deepcopy(good)
                target: list[object] = fields
                for index in path[:-1]:
                    inner = target[index]
                    assert isinstance(inner, list)
                    target = inner
                if change == "drop":
                    del target[path[-1]]
                else:
                    target[path[-1]] = copy.deepcopy(change)
                body = msgpack.packb(fields, use_bin_type=True)
                try:
                    expected: Row | None = codec._row_from_fields(
                        msgpack.unpackb(body, use_list=False)
                    )
                    if codec.row_problem(expected) is not None:  # type: ignore[arg-type]
                        expected = None
                except CorruptRow:
                    expected = None
                try:
                    got: Row | None = decode_row(with_crc(body))
                except CorruptRow:
                    got = None
                assert got == expected, (path, change)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Row(version=-1),
        lambda: Row(version=1 << 64),
        lambda: Row(value="text"),  # type: ignore[arg-type]
        lambda: Row(promised=(1,)),  # type: ignore[arg-type]
        pytest.param(
            lambda: Row(hlc=True),
            marks=pytest.mark.skipif(
                COMPILED, reason="compiled, a Row stores True as the int 1: a valid hlc"
            ),
        ),
        lambda: Row(op_id=-1),
        lambda: Row(promised=(1 << 64, 0)),
        lambda: Row(expires_at_ms=1 << 64),
        lambda: Row(version=5, recent_ops=((1, 1 << 64),)),
        lambda: Row(version=5, recent_ops=((-1, 1),)),
        lambda: Row(version=5, recent_ops=((True, 1),)),
        lambda: Row(version=5, recent_ops=((5, 1),)),
        lambda: Row(version=5, recent_ops=([1, 1],)),  # type: ignore[arg-type]
        lambda: Row(accepted=Accepted(ballot=(1, -1), version=2, value=b"x")),
        lambda: Row(accepted=Accepted(ballot=(1, 1), version=2, value=b"x", op_id=1 << 64)),
        lambda: Row(accepted=Accepted(ballot=(1, 1), version=2, value=b"x", expires_at_ms=-5)),
    ],
)
def test_codec_refuses_to_encode_invalid_rows(make: Callable[[], Row]) -> None:
    try:
        row = make()
    except TypeError:
        # A compiled Row checks its fields' types as it is built: refused
        # even earlier. Pure Python builds it, and encode_row must refuse it.
        assert COMPILED
        return
    with pytest.raises(ValueError, match="cannot encode row"):
        encode_row(row)


# --- Engine helpers -----------------------------------------------------------------


@asynccontextmanager
async def running(path: Path, **kwargs: int) -> AsyncIterator[Storage]:
    """A store with its writer running; closed (everything committed) on exit."""
    storage = Storage.open(path, tables=TABLES, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            yield storage
            await storage.aclose()
    finally:
        await storage.aclose()


def gate_commits(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    """Make every commit wait for one release of the returned semaphore."""
    permits = threading.Semaphore(0)
    commit = storage._commit_in_thread

    def gated(ops: list[Op]) -> None:
        assert permits.acquire(timeout=10), "test never released the commit"
        commit(ops)

    monkeypatch.setattr(storage, "_commit_in_thread", gated)
    return permits


# --- Engine: basics ------------------------------------------------------------------


def test_every_commit_is_fsynced_unless_the_benchmark_only_flag_says_not(tmp_path: Path) -> None:
    """`fsync=False` (the config's `unsafe_no_fsync`) turns off exactly LMDB's
    two flushes; the default keeps both on."""
    storage = Storage.open(tmp_path / "safe", tables=TABLES)
    try:
        flags = storage._env.flags()
        assert flags["sync"] is True and flags["metasync"] is True
    finally:
        storage.close()
    storage = Storage.open(tmp_path / "unsafe", tables=TABLES, fsync=False)
    try:
        flags = storage._env.flags()
        assert flags["sync"] is False and flags["metasync"] is False
        assert flags["writemap"] is False and flags["map_async"] is False
    finally:
        storage.close()


async def test_write_read_and_survive_reopen(tmp_path: Path) -> None:
    async with running(tmp_path / "db") as storage:
        await storage.write([("users", b"alice", row_of(1)), ("posts", b"p1", row_of(2))])
        assert storage.read_row("users", b"alice") == row_of(1)
        assert storage.read_row("posts", b"alice") is None  # tables are separate
        await storage.wait_durable(storage.stage_meta(b"epoch", b"7"))
        await storage.wait_durable(storage.stage_raw(HINTS_DB, b"h1", b"hint"))
    async with running(tmp_path / "db") as storage:
        assert storage.read_row("users", b"alice") == row_of(1)
        assert storage.read_row("posts", b"p1") == row_of(2)
        assert storage.read_meta(b"epoch") == b"7"
        assert storage.read_raw(HINTS_DB, b"h1") == b"hint"
        assert storage.scan_raw(HINTS_DB, b"", None, 10) == [(b"h1", b"hint")]
        await storage.write([("users", b"alice", None)])  # delete
        assert storage.read_row("users", b"alice") is None
    storage = Storage.open(tmp_path / "db", tables=TABLES)
    assert storage.read_row("users", b"alice") is None
    storage.close()


async def test_sync_close_commits_staged_writes(tmp_path: Path) -> None:
    storage = Storage.open(tmp_path / "db", tables=TABLES)
    ticket = storage.stage("users", b"k", row_of(3))
    storage.close()
    assert ticket.is_durable
    storage = Storage.open(tmp_path / "db", tables=TABLES)
    assert storage.read_row("users", b"k") == row_of(3)
    storage.close()


async def test_aclose_commits_staged_writes_and_refuses_new_ones(tmp_path: Path) -> None:
    async with running(tmp_path / "db") as storage:
        tickets = [storage.stage("users", b"k%d" % n, row_of(n)) for n in range(10)]
        await storage.aclose()
        assert all(ticket.is_durable for ticket in tickets)
        with pytest.raises(StorageClosed):
            storage.stage("users", b"late", row_of(1))
        with pytest.raises(StorageClosed):
            storage.read_row("users", b"k1")
    async with running(tmp_path / "db") as storage:
        assert [key for key, _ in storage.scan("users", b"", None, 100)] == sorted(
            b"k%d" % n for n in range(10)
        )


async def test_unknown_table_and_bad_arguments(tmp_path: Path) -> None:
    async with running(tmp_path / "db") as storage:
        with pytest.raises(InvalidRequest, match="unknown table 'x'"):
            storage.read_row("x", b"k")
        with pytest.raises(InvalidRequest, match="unknown table 'x'"):
            storage.stage("x", b"k", row_of(1))
        with pytest.raises(InvalidRequest, match="unknown table 'x'"):
            storage.scan("x", b"", None, 10)
        with pytest.raises(InvalidRequest, match="unknown table 'x'"):
            await storage.write([("users", b"ok", row_of(1)), ("x", b"k", row_of(1))])
        assert storage.read_row("users", b"ok") is None  # nothing of that write was staged
        for key in [b"", b"k" * 512]:
            with pytest.raises(InvalidRequest, match="stored key"):
                storage.stage("users", key, row_of(1))
        with pytest.raises(InvalidRequest, match="cannot encode row"):
            storage.stage("users", b"k", Row(version=-1))
        with pytest.raises(InvalidRequest, match="scan limit"):
            storage.scan("users", b"", None, 10_001)
        with pytest.raises(InvalidRequest, match="raw database"):
            storage.stage_raw(b"t:users", b"k", b"v")
        assert storage.staged_ops == 0
    with pytest.raises(InvalidRequest, match="declared twice"):
        Storage.open(tmp_path / "db2", tables=["a", "a"])


# --- Engine: group commit and the overlay ----------------------------------------------


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    writer_count = 200
    async with running(tmp_path / "db") as storage:
        async with trio.open_nursery() as nursery:
            for n in range(writer_count):
                nursery.start_soon(storage.write, [("users", b"key-%03d" % n, row_of(n))])
        stats = storage.stats
        assert stats.ops_committed == writer_count
        assert stats.batches_committed < writer_count
        assert stats.max_batch_ops > 1
        for n in range(writer_count):
            assert storage.read_row("users", b"key-%03d" % n) == row_of(n)
        assert storage.overlay_size == 0
        assert storage.staged_ops == 0


async def test_lazy_writes_share_the_next_fsync_or_flush_soon(tmp_path: Path) -> None:
    """A lazy write (a learned commit) rides along with the next urgent write
    instead of costing its own fsync, and alone is still committed promptly."""
    async with running(tmp_path / "db") as storage:
        lazy = storage.stage("users", b"lazy-1", row_of(1), lazy=True)
        await storage.write([("users", b"urgent", row_of(2))])
        assert lazy.is_durable
        assert storage.stats.batches_committed == 1, "one fsync for both"
        alone = storage.stage("users", b"lazy-2", row_of(3), lazy=True)
        with trio.fail_after(5):
            await storage.wait_durable(alone)
        assert storage.stats.batches_committed == 2
        assert storage.overlay_size == 0


async def test_a_lazy_write_waits_far_longer_than_an_fsync_for_company(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A quiet node's learned commit shares the next put's fsync even when
    that put comes tens of milliseconds later (the clock only moves when the
    test moves it), and is committed alone once the delay is over."""
    async with running(tmp_path / "db") as storage:
        lazy = storage.stage("users", b"lazy-1", row_of(1), lazy=True)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.02)  # one client's next put, 20 ms later
        await trio.testing.wait_all_tasks_blocked()
        assert not lazy.is_durable and storage.stats.batches_committed == 0
        await storage.write([("users", b"urgent", row_of(2))])
        assert lazy.is_durable
        assert storage.stats.batches_committed == 1, "one fsync for both"
        alone = storage.stage("users", b"lazy-2", row_of(3), lazy=True)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(engine.LAZY_COMMIT_DELAY_S)
        with trio.fail_after(3600):  # virtual time: the clock does not move by itself
            await storage.wait_durable(alone)
        assert storage.stats.batches_committed == 2


@pure_python_only
async def test_writes_staged_during_a_commit_form_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path / "db") as storage:
        permits = gate_commits(storage, monkeypatch)
        try:
            await check_next_batch(storage, permits)
        finally:
            permits.release(100)  # never leave aclose waiting on the gate


async def check_next_batch(storage: Storage, permits: threading.Semaphore) -> None:
    first = storage.stage("users", b"k", row_of(1))
    await trio.testing.wait_all_tasks_blocked()  # the writer is inside commit 1
    # A second message for the key, handled while commit 1 runs, sees row 1.
    assert storage.read_row("users", b"k") == row_of(1)
    second = storage.stage("users", b"k", row_of(2))
    others = [storage.stage("users", b"o%d" % n, row_of(n)) for n in range(5)]
    assert storage.read_row("users", b"k") == row_of(2)
    permits.release()
    await storage.wait_durable(first)
    # Commit 1 is done but a later write to the key is staged: it stays visible.
    assert not second.is_durable
    assert storage.read_row("users", b"k") == row_of(2)
    assert storage.overlay_size == 6
    permits.release()
    await storage.wait_durable(second)
    assert all(ticket.is_durable for ticket in others)
    assert storage.overlay_size == 0
    assert storage.read_row("users", b"k") == row_of(2)
    assert storage.stats.batches_committed == 2
    assert storage.stats.max_batch_ops == 6


async def test_read_your_staged_write_and_overlay_cleanup(tmp_path: Path) -> None:
    async with running(tmp_path / "db") as storage:
        await storage.write([("users", b"gone", row_of(1))])
        ticket = storage.stage("users", b"new", row_of(2))
        delete = storage.stage("users", b"gone", None)
        assert not ticket.is_durable  # no checkpoint since stage: cannot be committed yet
        assert storage.read_row("users", b"new") == row_of(2)
        assert storage.read_row("users", b"gone") is None
        assert storage.overlay_size == 2
        await storage.wait_durable(ticket)
        await storage.wait_durable(delete)
        assert storage.overlay_size == 0
        assert storage.read_row("users", b"new") == row_of(2)
        assert storage.read_row("users", b"gone") is None


async def test_write_commits_its_ops_in_one_batch(tmp_path: Path) -> None:
    async with running(tmp_path / "db") as storage:
        await storage.write([("users", b"k%d" % n, row_of(n)) for n in range(50)])
        assert storage.stats.batches_committed == 1
        assert storage.stats.max_batch_ops == 50


@pure_python_only
async def test_full_batches_are_sealed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "BATCH_OPS_MAX", 4)
    async with running(tmp_path / "db") as storage:
        tickets = [storage.stage("users", b"k%02d" % n, row_of(n)) for n in range(10)]
        for ticket in tickets:
            await storage.wait_durable(ticket)
        assert storage.stats.batches_committed == 3
        assert storage.stats.max_batch_ops == 4


@pure_python_only
async def test_stage_refuses_past_the_staged_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "STAGED_OPS_MAX", 3)
    async with running(tmp_path / "db") as storage:
        tickets = [storage.stage("users", b"k%d" % n, row_of(n)) for n in range(3)]
        with pytest.raises(StorageOverloaded):
            storage.stage("users", b"k9", row_of(9))
        assert storage.read_row("users", b"k9") is None
        for ticket in tickets:
            await storage.wait_durable(ticket)
        await storage.write([("users", b"k9", row_of(9))])  # room again


# --- Engine: scans ---------------------------------------------------------------------


async def test_scan_order_bounds_limit_and_overlay_merge(tmp_path: Path) -> None:
    async with running(tmp_path / "db") as storage:
        await storage.write([("users", bytes([k]), row_of(k)) for k in [1, 3, 5, 7, 9]])
        await storage.write([("posts", bytes([k]), row_of(k)) for k in [2, 4]])

        def keys(found: list[tuple[bytes, Row]]) -> list[int]:
            return [key[0] for key, _ in found]

        assert keys(storage.scan("users", b"", None, 100)) == [1, 3, 5, 7, 9]
        assert keys(storage.scan("users", b"\x03", b"\x07", 100)) == [3, 5]
        assert keys(storage.scan("users", b"\x04", None, 100)) == [5, 7, 9]
        assert keys(storage.scan("users", b"", None, 2)) == [1, 3]
        assert keys(storage.scan("users", b"\x05", b"\x05", 10)) == []
        assert storage.scan("users", b"", None, 0) == []
        # Staged, uncommitted: an insert, an overwrite, a delete, one out of range.
        storage.stage("users", b"\x04", row_of(40))
        storage.stage("users", b"\x05", row_of(50))
        storage.stage("users", b"\x07", None)
        storage.stage("users", b"\x0a", row_of(100))
        for _ in range(2):  # staged, then committed: the same answer
            found = storage.scan("users", b"\x02", b"\x0a", 100)
            assert keys(found) == [3, 4, 5, 9]
            assert [row.version for _, row in found] == [3, 40, 50, 9]
            assert keys(storage.scan("users", b"", None, 3)) == [1, 3, 4]
            assert keys(storage.scan("users", b"\x06", None, 100)) == [9, 10]
            await storage.write([])
            await storage.write([("posts", b"\x01", row_of(1))])  # flushes the batch before
        assert storage.overlay_size == 0
        assert keys(storage.scan("posts", b"", None, 100)) == [1, 2, 4]


async def test_scan_prefix(tmp_path: Path) -> None:
    keys = [b"a", b"ab", b"ab\xff", b"ab\xff\x00", b"ac", b"b", b"\xff", b"\xff\xff"]
    async with running(tmp_path / "db") as storage:
        await storage.write([("users", key, row_of(1)) for key in keys])
        assert [k for k, _ in storage.scan_prefix("users", b"ab", 100)] == keys[1:4]
        assert [k for k, _ in storage.scan_prefix("users", b"ab\xff", 100)] == keys[2:4]
        assert [k for k, _ in storage.scan_prefix("users", b"\xff", 100)] == keys[6:]
        assert [k for k, _ in storage.scan_prefix("users", b"", 100)] == keys
        assert [k for k, _ in storage.scan_prefix("users", b"a", 2)] == keys[:2]
    assert prefix_end(b"ab") == b"ac"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") is None
    assert prefix_end(b"") is None


key_space = st.binary(min_size=1, max_size=2)
model_ops = st.lists(st.tuples(key_space, st.none() | small_uints), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    committed=model_ops,
    staged=model_ops,
    start=st.binary(max_size=2),
    end=st.none() | st.binary(max_size=2),
    limit=st.integers(min_value=0, max_value=40),
)
async def test_scan_matches_a_model(
    committed: list[tuple[bytes, int | None]],
    staged: list[tuple[bytes, int | None]],
    start: bytes,
    end: bytes | None,
    limit: int,
) -> None:
    model: dict[bytes, Row | None] = {}

    def expected() -> list[tuple[bytes, Row]]:
        found = [
            (key, row)
            for key, row in sorted(model.items())
            if row is not None and start <= key and (end is None or key < end)
        ]
        return found[:limit]

    with tempfile.TemporaryDirectory() as directory:
        async with running(Path(directory)) as storage:
            for key, version in committed:
                model[key] = None if version is None else row_of(version)
                await storage.write([("users", key, model[key])])
            tickets: list[CommitTicket] = []
            for key, version in staged:
                model[key] = None if version is None else row_of(version)
                tickets.append(storage.stage("users", key, model[key]))
            assert storage.scan("users", start, end, limit) == expected()
            for ticket in tickets:
                await storage.wait_durable(ticket)
            assert storage.overlay_size == 0
            assert storage.scan("users", start, end, limit) == expected()


batch_ops = st.lists(
    st.tuples(
        st.sampled_from(["users", "posts", "meta"]),
        st.sampled_from([b"a", b"b", b"c"]),  # few keys: each is written often
        st.none() | small_uints,
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(committed=batch_ops, batch=batch_ops)
async def test_one_batch_of_mixed_writes_lands_in_order(
    committed: list[tuple[str, bytes, int | None]], batch: list[tuple[str, bytes, int | None]]
) -> None:
    """Puts and deletes over two tables and `meta`, keys repeated, all in one
    commit (the writer groups runs of puts per database): after a reopen, LMDB
    holds exactly the last write of every key, as a model says."""
    model: dict[tuple[str, bytes], int | None] = {}

    async def stage_all(ops: list[tuple[str, bytes, int | None]]) -> list[CommitTicket]:
        tickets = []
        for table, key, version in ops:
            model[table, key] = version
            if table == "meta":
                value = None if version is None else str(version).encode()
                tickets.append(storage.stage_meta(key, value))
            else:
                tickets.append(
                    storage.stage(table, key, None if version is None else row_of(version))
                )
        return tickets

    with tempfile.TemporaryDirectory() as directory:
        async with running(Path(directory)) as storage:
            for ticket in await stage_all(committed):
                await storage.wait_durable(ticket)
            before = storage.stats.batches_committed
            tickets = await stage_all(batch)
            for ticket in tickets:
                await storage.wait_durable(ticket)
            assert storage.stats.batches_committed == before + 1  # one transaction
        storage = Storage.open(Path(directory), tables=TABLES)
        try:
            for (table, key), version in model.items():
                if table == "meta":
                    expected = None if version is None else str(version).encode()
                    assert storage.read_meta(key) == expected
                else:
                    assert storage.read_row(table, key) == (
                        None if version is None else row_of(version)
                    )
        finally:
            storage.close()


# --- Engine: corruption and failure ----------------------------------------------------


async def test_flipped_byte_on_disk_is_never_served(tmp_path: Path) -> None:
    row = Row(version=5, value=b"distinctive-value-" * 4, promised=(3, 2))
    encoded = encode_row(row)
    async with running(tmp_path / "db") as storage:
        await storage.write([("users", b"victim", row), ("users", b"bystander", row_of(1))])
    data_file = tmp_path / "db" / "data.mdb"
    contents = bytearray(data_file.read_bytes())
    position = contents.find(encoded)
    assert position >= 0, "the encoded row must be in the data file"
    while position >= 0:  # every copy LMDB may hold
        contents[position + 4 + len(encoded) // 2] ^= 0x01  # a byte of the body
        position = contents.find(encoded, position + 1)
    data_file.write_bytes(bytes(contents))

    async with running(tmp_path / "db") as storage:
        with pytest.raises(CorruptRow, match=r"table 'users' key b'victim'.*crc32c"):
            storage.read_row("users", b"victim")
        with pytest.raises(CorruptRow, match="victim"):
            storage.scan("users", b"", None, 10)
        assert storage.read_row("users", b"bystander") == row_of(1)
        # Repair (as read repair would) replaces the damaged row.
        await storage.write([("users", b"victim", row)])
        assert storage.read_row("users", b"victim") == row


async def test_commit_failure_is_fail_stop(tmp_path: Path) -> None:
    path = tmp_path / "db"
    storage = Storage.open(path, tables=TABLES, map_size_bytes=MAP_SIZE_BYTES_MIN)
    too_big = Row(version=1, value=b"x" * (2 * MAP_SIZE_BYTES_MIN))
    with pytest.RaisesGroup(StorageFailed):  # run() raises: the node goes down loudly
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            await storage.write([("users", b"small", row_of(1))])
            with pytest.raises(StorageFailed, match="MapFullError") as failed:
                await storage.write([("users", b"big", too_big)])
            assert failed.value.__cause__ is not None
            assert storage.failure is not None
            assert storage.overlay_size == 0  # nothing claims data that is not on disk
            assert storage.read_row("users", b"big") is None
            assert storage.read_row("users", b"small") == row_of(1)
            with pytest.raises(StorageFailed):
                storage.stage("users", b"after", row_of(2))
            await trio.sleep_forever()  # until run()'s failure cancels us
    await storage.aclose()
    storage = Storage.open(path, tables=TABLES, map_size_bytes=16 * MAP_SIZE_BYTES_MIN)
    assert storage.read_row("users", b"small") == row_of(1)
    assert storage.read_row("users", b"big") is None
    storage.close()


@pure_python_only
async def test_failure_fails_every_queued_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage.open(tmp_path / "db", tables=TABLES)
    permits = gate_commits(storage, monkeypatch)

    def failing(ops: list[Op]) -> None:
        raise OSError(5, "Input/output error")

    outcomes: list[str] = []

    async def write_one(key: bytes) -> None:
        try:
            await storage.write([("users", key, row_of(1))])
            outcomes.append("ok")
        except StorageFailed:
            outcomes.append("failed")

    with pytest.RaisesGroup(StorageFailed):
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            nursery.start_soon(write_one, b"a")
            await trio.testing.wait_all_tasks_blocked()  # commit of a is gated
            monkeypatch.setattr(storage, "_commit_in_thread", failing)
            for key in [b"b", b"c"]:
                nursery.start_soon(write_one, key)
            await trio.testing.wait_all_tasks_blocked()
            assert storage.overlay_size == 3
            permits.release()
    assert outcomes == ["ok", "failed", "failed"]
    assert storage.overlay_size == 0 and storage.staged_ops == 0
    await storage.aclose()


@pure_python_only
async def test_decoded_rows_follow_every_write_eviction_and_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoded-row cache behind `read_row` never answers other than the
    overlay and LMDB would: writes, deletes, eviction, and a fail-stop that
    drops a staged row it held."""
    bound = 3 * (engine.DECODED_ROW_OVERHEAD_BYTES + 64)
    monkeypatch.setattr(engine, "DECODED_ROWS_BYTES_MAX", bound)
    storage = Storage.open(tmp_path / "db", tables=TABLES)
    keys = [b"k%d" % n for n in range(10)]
    with pytest.RaisesGroup(StorageFailed):
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            await storage.write([("users", key, row_of(n + 1)) for n, key in enumerate(keys)])
            for n, key in enumerate(keys):  # most were evicted: read back from LMDB
                assert storage.read_row("users", key) == row_of(n + 1)
            assert 0 < storage._decoded._bytes <= bound
            await storage.write([("users", keys[0], row_of(20))])
            assert storage.read_row("users", keys[0]) == row_of(20)
            await storage.write([("users", keys[0], None)])
            assert storage.read_row("users", keys[0]) is None

            def failing(ops: list[Op]) -> None:
                raise OSError(5, "Input/output error")

            monkeypatch.setattr(storage, "_commit_in_thread", failing)
            ticket = storage.stage("users", keys[1], row_of(99))
            assert storage.read_row("users", keys[1]) == row_of(99)  # staged: readable at once
            with pytest.raises(StorageFailed):
                await storage.wait_durable(ticket)
            assert storage.read_row("users", keys[1]) == row_of(2), "only what is on disk"
            await trio.sleep_forever()  # until run()'s failure cancels us
    await storage.aclose()


@pure_python_only
async def test_when_durable_calls_back_after_the_fsync_or_with_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage.open(tmp_path / "db", tables=TABLES)
    permits = gate_commits(storage, monkeypatch)
    heard: list[tuple[str, object]] = []
    with pytest.RaisesGroup(StorageFailed):
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            ticket = storage.stage("users", b"a", row_of(1))
            storage.when_durable(ticket, lambda failure: heard.append(("a", failure)))
            await trio.testing.wait_all_tasks_blocked()  # the commit of a is gated
            assert heard == [], "not before the commit"
            permits.release()
            await storage.wait_durable(ticket)
            assert heard == [("a", None)]
            storage.when_durable(ticket, lambda failure: heard.append(("again", failure)))
            assert heard[-1] == ("again", None), "at once when already durable"

            def failing(ops: list[Op]) -> None:
                raise OSError(5, "Input/output error")

            monkeypatch.setattr(storage, "_commit_in_thread", failing)
            doomed = storage.stage("users", b"b", row_of(2))
            storage.when_durable(doomed, lambda failure: heard.append(("b", failure)))
            await trio.sleep_forever()  # until run()'s failure cancels us
    name, failure = heard[-1]
    assert name == "b" and isinstance(failure, StorageFailed)
    await storage.aclose()
