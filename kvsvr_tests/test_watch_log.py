"""The change log's rules (`kvsvr.protocol.changes`), without IO: what a
watcher at a cursor is given, skips and how the peers' logs settle them, what
counts as history gone, and the bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvsvr.protocol.changes import CHANGES_PER_ANSWER_MAX, Answer, ChangeLog

DB = b"t"


def _record(
    log: ChangeLog,
    version: int,
    value: bytes | None = b"x",
    *,
    key: bytes = b"k",
    old: int | None = 0,
    group: bytes = b"",
) -> object:
    return log.record(DB, key, version, value, group, old_version=lambda: old)


def _versions(answer: Answer | None) -> list[int]:
    assert answer is not None
    return [change.version for change in answer.changes]


def test_a_watcher_gets_every_later_version_in_order_with_its_previous() -> None:
    log = ChangeLog()
    for version in range(1, 6):
        _record(log, version, b"v%d" % version)
    answer = log.after(DB, b"k", 2, lambda: 5)
    assert answer is not None and answer.gap is None
    assert [(c.version, c.previous, c.value) for c in answer.changes] == [
        (3, 2, b"v3"),
        (4, 3, b"v4"),
        (5, 4, b"v5"),
    ]


def test_the_log_follows_a_key_from_the_version_the_replica_held() -> None:
    log = ChangeLog()
    assert _record(log, 8, old=7) is not None  # first seen at 7 -> 8: base 7
    assert _versions(log.after(DB, b"k", 7, lambda: 8)) == [8]
    assert log.after(DB, b"k", 6, lambda: 8) is None  # 7 came before the log
    # A promise or accept restaging the row is not news; it starts the log too.
    assert _record(log, 3, key=b"new", old=3) is None
    assert log.latest(DB, b"new") == 3
    assert _record(log, 9, key=b"unreadable", old=None) is None
    assert not log.follows(DB, b"unreadable")


def test_nothing_newer_means_wait_unless_the_row_is_newer() -> None:
    log = ChangeLog()
    _record(log, 1)
    assert log.after(DB, b"k", 1, lambda: 1) == Answer([])
    assert log.after(DB, b"other", 0, lambda: 0) == Answer([])
    # The replica holds version 4 of a key the log does not follow: gone.
    assert log.after(DB, b"other", 0, lambda: 4) is None


def test_a_rewrite_of_an_old_version_is_not_news() -> None:
    log = ChangeLog()
    assert _record(log, 3, old=2) is not None
    assert _record(log, 3) is None
    assert _record(log, 2) is None


def test_a_skip_stops_the_watch_until_the_peers_settle_it() -> None:
    log = ChangeLog()
    _record(log, 1)
    _record(log, 4)  # a folded group, or versions 2-3 this replica missed
    answer = log.after(DB, b"k", 0, lambda: 4)
    assert answer is not None and _versions(answer) == [1] and answer.gap == (1, 4)
    # A peer logged version 3 (2 was folded into it): inserted, skip checked.
    assert log.fill(DB, b"k", 1, 4, [(3, b"three")])
    answer = log.after(DB, b"k", 1, lambda: 4)
    assert answer is not None and answer.gap is None
    assert [(c.version, c.previous, c.value) for c in answer.changes] == [
        (3, 1, b"three"),
        (4, 3, b"x"),
    ]
    # A watcher that already had 3 (from another node) gets 4, not 3 again.
    assert _versions(log.after(DB, b"k", 3, lambda: 4)) == [4]
    assert log.fill(DB, b"k", 1, 4, []) is False  # no such skip any more


def test_a_peer_vouches_only_for_ranges_its_log_covers() -> None:
    log = ChangeLog()
    _record(log, 6, old=5)
    _record(log, 7)
    _record(log, 9)
    assert log.between(DB, b"k", 4, 8) is None  # the log began at 5
    inside = log.between(DB, b"k", 5, 9)
    assert inside is not None and [c.version for c in inside] == [6, 7]
    assert log.between(DB, b"unknown", 0, 3) is None


def test_history_older_than_the_log_is_compacted() -> None:
    log = ChangeLog(per_key_max=3)
    for version in range(1, 11):
        _record(log, version)
    assert log.after(DB, b"k", 6, lambda: 10) is None  # 7 was dropped
    assert _versions(log.after(DB, b"k", 7, lambda: 10)) == [8, 9, 10]


def test_the_byte_bound_forgets_the_least_recently_changed_keys() -> None:
    log = ChangeLog(bytes_max=4000)
    for i in range(50):
        _record(log, 1, b"x" * 100, key=b"key%d" % i, group=b"g")
    assert log.size_bytes <= 4000
    assert log.keys_forgotten > 0
    assert log.latest(DB, b"key0") == -1
    assert log.latest(DB, b"key49") == 1
    assert set(log.keys_in_group(DB, b"g")) == {
        key for key in (b"key%d" % i for i in range(50)) if log.follows(DB, key)
    }


def test_an_answer_is_bounded() -> None:
    log = ChangeLog(per_key_max=CHANGES_PER_ANSWER_MAX * 2)
    for version in range(1, CHANGES_PER_ANSWER_MAX * 2):
        _record(log, version)
    assert len(_versions(log.after(DB, b"k", 0, lambda: 1))) == CHANGES_PER_ANSWER_MAX


@given(
    steps=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=60),
    peer_knows=st.sets(st.integers(min_value=1, max_value=240)),
    resume_every=st.integers(min_value=1, max_value=7),
)
def test_resuming_never_duplicates_reorders_or_passes_what_a_peer_knew(
    steps: list[int], peer_knows: set[int], resume_every: int
) -> None:
    log = ChangeLog(per_key_max=1000)
    version = 0
    logged = set()
    for step in steps:
        version += step
        _record(log, version)
        logged.add(version)
    known_elsewhere = {v for v in peer_knows if v < version} - logged
    delivered: list[int] = []
    cursor = 0
    while True:
        answer = log.after(DB, b"k", cursor, lambda: version)
        assert answer is not None
        if not answer.changes and answer.gap is None:
            break
        for change in answer.changes[:resume_every]:  # a reader that drops off
            delivered.append(change.version)
            cursor = change.version
        if answer.gap is not None and len(answer.changes) <= resume_every:
            low, high = answer.gap
            assert log.fill(
                DB, b"k", low, high, [(v, b"p") for v in known_elsewhere if low < v < high]
            )
    assert delivered == sorted(set(delivered))
    assert delivered[-1] == version
    assert set(delivered) == logged | known_elsewhere
