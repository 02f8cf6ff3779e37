"""The change log's rules (`kvsvr.protocol.changes`), without IO: what a
watcher at a cursor is given, what counts as history gone, and the bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvsvr.protocol.changes import CHANGES_PER_ANSWER_MAX, ChangeLog

DB = b"t"


def test_a_watcher_gets_every_later_version_in_order_with_its_previous() -> None:
    log = ChangeLog()
    for version in range(1, 6):
        log.record(DB, b"k", version, b"v%d" % version)
    changes = log.after(DB, b"k", 2, lambda: 5)
    assert changes is not None
    assert [(c.version, c.previous, c.value) for c in changes] == [
        (3, 2, b"v3"),
        (4, 3, b"v4"),
        (5, 4, b"v5"),
    ]


def test_nothing_newer_means_wait_unless_the_row_is_newer() -> None:
    log = ChangeLog()
    log.record(DB, b"k", 1, b"a")
    assert log.after(DB, b"k", 1, lambda: 1) == []
    assert log.after(DB, b"other", 0, lambda: 0) == []
    # The replica holds version 4 but the log knows nothing after 1: gone.
    assert log.after(DB, b"other", 0, lambda: 4) is None


def test_a_rewrite_of_the_same_version_is_not_news() -> None:
    log = ChangeLog()
    assert log.record(DB, b"k", 3, b"a") is not None
    assert log.record(DB, b"k", 3, b"a") is None  # a promise or accept restaged the row
    assert log.record(DB, b"k", 2, b"old") is None
    assert log.record(DB, b"k", 0, None) is None


def test_a_jump_is_delivered_with_its_previous_version_and_never_twice() -> None:
    log = ChangeLog()
    log.record(DB, b"k", 1, b"a")
    log.record(DB, b"k", 4, b"d")  # a folded group of 3, or versions this replica missed
    changes = log.after(DB, b"k", 1, lambda: 4)
    assert changes is not None and [(c.version, c.previous) for c in changes] == [(4, 1)]
    # A watcher that already had 2 (from another node) gets 4, not 2 again.
    changes = log.after(DB, b"k", 2, lambda: 4)
    assert changes is not None and [c.version for c in changes] == [4]
    assert log.after(DB, b"k", 4, lambda: 4) == []


def test_history_older_than_the_log_is_compacted() -> None:
    log = ChangeLog(per_key_max=3)
    for version in range(1, 11):
        log.record(DB, b"k", version, b"x")
    assert log.after(DB, b"k", 6, lambda: 10) is None  # 7 was dropped
    changes = log.after(DB, b"k", 7, lambda: 10)
    assert changes is not None and [c.version for c in changes] == [8, 9, 10]


def test_an_unknown_previous_only_chains_to_the_version_just_below() -> None:
    log = ChangeLog()
    log.record(DB, b"k", 5, b"e")  # the first this node logged: previous unknown
    assert log.after(DB, b"k", 3, lambda: 5) is None
    changes = log.after(DB, b"k", 4, lambda: 5)
    assert changes is not None and [c.version for c in changes] == [5]


def test_the_byte_bound_forgets_the_least_recently_changed_keys() -> None:
    log = ChangeLog(bytes_max=2000)
    for i in range(50):
        log.record(DB, b"key%d" % i, 1, b"x" * 100, group=b"g")
    assert log.size_bytes <= 2000
    assert log.keys_forgotten > 0
    assert log.latest(DB, b"key0") == -1
    assert log.latest(DB, b"key49") == 1
    assert set(log.keys_in_group(DB, b"g")) == {
        key for key in (b"key%d" % i for i in range(50)) if log.latest(DB, key) == 1
    }


def test_an_answer_is_bounded() -> None:
    log = ChangeLog(per_key_max=CHANGES_PER_ANSWER_MAX * 2)
    for version in range(1, CHANGES_PER_ANSWER_MAX * 2):
        log.record(DB, b"k", version, b"x")
    changes = log.after(DB, b"k", 0, lambda: 1)
    assert changes is not None and len(changes) == CHANGES_PER_ANSWER_MAX


@given(
    steps=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=60),
    resume_every=st.integers(min_value=1, max_value=7),
)
def test_resuming_from_any_delivered_version_never_duplicates_or_reorders(
    steps: list[int], resume_every: int
) -> None:
    log = ChangeLog(per_key_max=1000)
    version = 1
    log.record(DB, b"k", version, b"1")  # the log saw the key from its first version
    for step in steps:
        version += step
        log.record(DB, b"k", version, b"%d" % version)
    delivered: list[int] = []
    cursor = 0
    rounds = 0
    while True:
        changes = log.after(DB, b"k", cursor, lambda: version)
        assert changes is not None
        if not changes:
            break
        for change in changes[:resume_every]:  # a reader that drops off mid-answer
            assert change.previous <= cursor < change.version
            delivered.append(change.version)
            cursor = change.version
        rounds += 1
    assert delivered == sorted(set(delivered))
    assert delivered[-1] == version
    assert rounds >= 1
