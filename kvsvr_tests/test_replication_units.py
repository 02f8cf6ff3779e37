"""The pure rules of eventual tables: the hybrid clock and last-writer-wins
(no sockets, no LMDB). The catch-up rules are tested in test_catchup_protocol.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvsvr.protocol.eventual import HybridClock, eventual_row, lww_apply, stamp_ms
from kvsvr.protocol.state import EMPTY_ROW


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
