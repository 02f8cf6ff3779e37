"""The pure parts of catching up: hybrid clock, last-writer-wins, failure
detection, digests, purges and hint keys (no sockets, no LMDB)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvsvr.node.replication import (
    PHI_DOWN,
    PhiDetector,
    bucket_of,
    hint_key,
    is_dead,
    learn,
    newest_version,
    parse_hint_key,
    purge_row,
    row_hash,
)
from kvsvr.protocol.eventual import HybridClock, eventual_row, lww_apply, stamp_ms
from kvsvr.protocol.state import EMPTY_ROW, Accepted, Row


def test_a_clock_never_goes_back_even_when_the_wall_clock_does() -> None:
    clock = HybridClock(3)
    stamps = [clock.now(ms) for ms in (1000, 1000, 999, 500, 1001, 1001)]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert stamp_ms(stamps[0]) == 1000 and stamp_ms(stamps[-1]) == 1001


def test_a_fast_clock_wins_only_until_the_others_hear_of_it() -> None:
    fast, slow = HybridClock(1), HybridClock(2)
    ahead = fast.now(10_000_000)  # an hour ahead of the slow node's wall clock
    slow.observe(ahead)
    later = slow.now(6_400_000)
    assert later > ahead, "after observing it, the slow node's next write wins"


@given(st.lists(st.tuples(st.integers(1, 2**40), st.booleans()), min_size=1, max_size=8))
def test_last_writer_wins_converges_in_any_order(writes: list[tuple[int, bool]]) -> None:
    rows = [
        eventual_row((ms << 22) | (i % 63 + 1), None if dead else b"v%d" % i, None)
        for i, (ms, dead) in enumerate(writes)
    ]
    finals = set()
    for order in (rows, list(reversed(rows)), rows[1:] + rows[:1]):
        current = EMPTY_ROW
        for row in order + order:  # duplicates too
            current = lww_apply(current, row) or current
        finals.add((current.version, current.value))
    assert len(finals) == 1
    assert finals.pop()[0] == max(r.version for r in rows)


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
