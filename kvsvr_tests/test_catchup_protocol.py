"""The pure parts of catching up (`kvsvr.protocol.catchup`, `.failure`,
`.catchup_messages`): failure detection, digests, purges, learning rows, hint
keys and records, and the catch-up messages' wire form. No sockets, no LMDB,
no clock."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvsvr.errors import CorruptRow, FrameError, InvalidRequest
from kvsvr.protocol.catchup import (
    DIGEST_BUCKETS,
    bucket_of,
    hint_key,
    is_dead,
    learn,
    newest_version,
    pack_hint,
    parse_hint_key,
    purge_row,
    row_hash,
    tombstone_purgeable,
    unpack_hint,
)
from kvsvr.protocol.catchup_messages import (
    APPLY,
    KEYS,
    PAGE,
    REBUILD_PAGE_ROWS,
    ROWS,
    ROWS_PER_REQUEST_MAX,
    ApplyRows,
    DigestReply,
    DigestRequest,
    KeysReply,
    KeysRequest,
    PageReply,
    PageRequest,
    RowsReply,
    RowsRequest,
    request_from_wire,
)
from kvsvr.protocol.eventual import eventual_row
from kvsvr.protocol.failure import PHI_DOWN, PhiDetector
from kvsvr.protocol.state import Accepted, Row


def test_a_silent_peer_goes_down_and_a_refused_one_at_once() -> None:
    detector = PhiDetector()
    assert not detector.is_up(0.0)  # unknown until heard from
    for i in range(10):
        detector.arrived(i * 0.5)
    assert detector.is_up(4.6)
    assert detector.phi(4.5 + 10.0) > PHI_DOWN and not detector.is_up(14.5)
    detector.fail()
    assert not detector.is_up(4.6)
    assert detector.arrived(5.0), "coming back is reported once"
    assert not detector.arrived(5.5)


def test_digests_see_two_keys_a_version_apart_in_one_bucket() -> None:
    """Regression: with crc32c as the row hash, crc(k1,1)^crc(k1,2) equals
    crc(k2,1)^crc(k2,2) (a crc is linear), so two lagging keys in one bucket
    cancelled out and anti-entropy never saw them."""
    keys = [b"\x00\x04d%03d" % i for i in range(200)]
    same_bucket = [k for k in keys if bucket_of(k) == bucket_of(keys[0])][:2]
    assert len(same_bucket) == 2
    k1, k2 = same_bucket
    ahead = row_hash(k1, 2) ^ row_hash(k2, 2)
    behind = row_hash(k1, 1) ^ row_hash(k2, 1)
    assert ahead != behind


def test_newest_version_counts_a_proposal_above_the_chosen_one() -> None:
    row = Row(version=3, value=b"x", promised=(5, 1), accepted=Accepted((5, 1), 4, None))
    assert newest_version(row) == 4
    assert newest_version(Row(version=3, value=b"x")) == 3


def test_a_strong_row_that_expired_keeps_its_version_and_promise() -> None:
    row = Row(version=7, value=b"v", expires_at_ms=1000, promised=(9, 2))
    assert purge_row(row, False, 999) is False
    purged = purge_row(row, False, 1000)
    assert isinstance(purged, Row)
    assert (purged.version, purged.value, purged.promised) == (7, None, (9, 2))
    assert purge_row(row, True, 1000) is None  # an eventual row just goes
    assert purge_row(Row(version=2, value=b"v"), False, 10**15) is False


def test_dead_rows_are_only_eventual_ones() -> None:
    old_tombstone = eventual_row((1000 << 22) | 1, None, None)
    assert is_dead(old_tombstone, True, now=1000 + 5000, grace_ms=1000)
    assert not is_dead(old_tombstone, True, now=1000 + 500, grace_ms=1000)
    assert not is_dead(Row(version=1, value=None), False, now=10**15, grace_ms=0)


def test_learning_a_chosen_row_only_moves_forward() -> None:
    current = Row(version=5, value=b"new", promised=(3, 1))
    assert learn(current, Row(version=4, value=b"old"), eventual=False) is None
    newer = learn(current, Row(version=6, value=None), eventual=False)
    assert newer is not None and (newer.version, newer.value, newer.promised) == (6, None, (3, 1))


def test_hint_keys_round_trip() -> None:
    raw = hint_key(3, "feed", b"\x00\x01k\xff")
    assert parse_hint_key(raw) == (3, "feed", b"\x00\x01k\xff")
    assert raw.startswith(bytes((3,)))


def test_hint_keys_refuse_a_truncated_table_name() -> None:
    with pytest.raises(CorruptRow):
        parse_hint_key(bytes((3, 9)) + b"feed")
    with pytest.raises(CorruptRow):
        parse_hint_key(bytes((3, 2)) + b"\xff\xfe")


def test_hint_records_round_trip_and_refuse_anything_else() -> None:
    assert unpack_hint(pack_hint(1234, b"row")) == (1234, b"row")
    for bad in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb(["x", b"r"]), msgpack.packb([1])):
        with pytest.raises(CorruptRow):
            unpack_hint(bad)


def test_a_tombstone_goes_only_when_the_other_replica_has_it_or_nothing() -> None:
    assert tombstone_purgeable(5, Row(version=0, value=None))
    assert tombstone_purgeable(5, Row(version=5, value=None))
    assert not tombstone_purgeable(5, Row(version=6, value=None)), "a newer write"
    assert not tombstone_purgeable(5, Row(version=4, value=b"old")), "a late hint's value"
    assert not tombstone_purgeable(5, Row(version=5, value=b"v"))


# ---------------------------------------------------------------- messages

_keys = st.binary(min_size=1, max_size=12)
_rows = st.lists(st.tuples(_keys, st.binary(max_size=12)), max_size=5).map(tuple)
_uint = st.integers(0, 2**64 - 1)
_requests = st.one_of(
    st.builds(ApplyRows, st.text(max_size=8), _rows),
    st.builds(DigestRequest, st.text(max_size=8), st.integers(1, 255)),
    st.builds(
        KeysRequest,
        st.text(max_size=8),
        st.integers(1, 255),
        st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 15)), max_size=4).map(tuple),
        st.binary(max_size=8),
    ),
    st.builds(RowsRequest, st.text(max_size=8), st.lists(_keys, max_size=5).map(tuple)),
    st.builds(
        PageRequest,
        st.text(max_size=8),
        st.integers(1, 255),
        st.binary(max_size=8),
        st.integers(1, REBUILD_PAGE_ROWS),
    ),
)
_METHOD = {ApplyRows: APPLY, DigestRequest: "ae_digest", KeysRequest: KEYS}
_METHOD.update({RowsRequest: ROWS, PageRequest: PAGE})


@given(_requests)
def test_requests_round_trip_through_msgpack(request: Any) -> None:
    wire = msgpack.unpackb(msgpack.packb(request.to_wire()), raw=False)
    assert request_from_wire(_METHOD[type(request)], wire) == request


@given(
    st.dictionaries(st.integers(0, 1023), st.lists(_uint, min_size=16, max_size=16), max_size=3),
    st.lists(st.tuples(_keys, _uint), max_size=5).map(tuple),
    st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=5).map(tuple),
    _rows,
    st.booleans(),
)
def test_replies_round_trip_through_msgpack(
    digests: dict[int, list[int]],
    pairs: tuple[tuple[bytes, int], ...],
    rows: tuple[bytes | None, ...],
    page: tuple[tuple[bytes, bytes], ...],
    more: bool,
) -> None:
    def trip(message: Any) -> Any:
        return msgpack.unpackb(msgpack.packb(message.to_wire()), raw=False)

    assert DigestReply.from_wire(trip(DigestReply(digests))) == DigestReply(digests)
    assert KeysReply.from_wire(trip(KeysReply(pairs, more))) == KeysReply(pairs, more)
    assert RowsReply.from_wire(trip(RowsReply(rows)), len(rows)) == RowsReply(rows)
    assert PageReply.from_wire(trip(PageReply(page, more))) == PageReply(page, more)


def test_the_wire_form_is_the_positional_lists_of_before() -> None:
    """Nodes of one version talk to each other, but server code still sends
    `ae_rows` and `apply` bodies as plain lists: they must parse the same."""
    assert RowsRequest.from_wire(["t", [b"k"]]) == RowsRequest("t", (b"k",))
    assert ApplyRows.from_wire(["t", [[b"k", b"r"]]]) == ApplyRows("t", ((b"k", b"r"),))
    assert KeysRequest("t", 2, ((1, 3),), b"").to_wire() == ["t", 2, [[1, 3]], b""]
    assert PageReply(((b"k", b"r"),), True).to_wire() == [[[b"k", b"r"]], True]


@pytest.mark.parametrize(
    ("method", "body"),
    [
        (APPLY, "t"),
        (APPLY, []),
        (APPLY, [1, []]),
        (APPLY, ["t", [[b"k"]]]),
        (APPLY, ["t", [[b"k", "r"]]]),
        (APPLY, ["t", [[b"k", b"r"]] * (ROWS_PER_REQUEST_MAX + 1)]),
        ("ae_digest", ["t", "n2"]),
        ("ae_digest", ["t", True]),
        (KEYS, ["t", 2, [[1]], b""]),
        (KEYS, ["t", 2, [[1, 2]], "start"]),
        (ROWS, ["t", [b"k", "k"]]),
        (ROWS, ["t", [b"k"] * (ROWS_PER_REQUEST_MAX + 1)]),
        (PAGE, ["t", 2, b"", 0]),
        (PAGE, ["t", 2, b"", REBUILD_PAGE_ROWS + 1]),
        ("ae_nothing", ["t"]),
    ],
)
def test_a_malformed_request_is_an_invalid_request(method: str, body: object) -> None:
    with pytest.raises(InvalidRequest):
        request_from_wire(method, body)


def test_a_malformed_reply_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        DigestReply.from_wire([[1, [0] * (DIGEST_BUCKETS - 1)]])
    with pytest.raises(FrameError):
        KeysReply.from_wire([[[b"k", "1"]], False])
    with pytest.raises(FrameError):
        RowsReply.from_wire([b"r"], 2)
    with pytest.raises(FrameError):
        PageReply.from_wire([[[b"k", b"r"]], 1])
