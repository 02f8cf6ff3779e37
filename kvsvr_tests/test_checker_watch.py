"""The watch-stream checker (`jepsen_like.checker.watch`) on fixed histories:
it passes a true stream (including a folded group's skip and a reset after
`WatchCompacted`) and catches a planted gap, a planted duplicate, a reordering,
a wrong value and a false `previous`."""

from __future__ import annotations

from typing import Any

from jepsen_like.checker.watch import check_watch_streams


def _op(process: int, type_: str, f: str, value: Any, version: int | None = None) -> dict[str, Any]:
    return {
        "process": process,
        "type": type_,
        "f": f,
        "key": "r0",
        "value": value,
        "version": version,
    }


# Versions 1-5 of key r0: 1 written and read, 2 and 3 a folded group (2 never
# visible), 4 taken by a cas, 5 written and read.
HISTORY = [
    _op(0, "invoke", "write", 10),
    _op(0, "ok", "write", 10, 1),
    _op(1, "invoke", "read", None),
    _op(1, "ok", "read", 10, 1),
    _op(0, "invoke", "write", 20),
    _op(2, "invoke", "write", 30),
    _op(0, "ok", "write", 20, 2),
    _op(2, "ok", "write", 30, 3),
    _op(1, "invoke", "cas", [30, 40]),
    _op(1, "ok", "cas", [30, 40], 4),
    _op(0, "invoke", "write", 50),
    _op(0, "ok", "write", 50, 5),
    _op(1, "invoke", "read", None),
    _op(1, "ok", "read", 50, 5),
]


def _event(version: int, previous: int, value: Any, watcher: int = 0) -> dict[str, Any]:
    return {
        "watcher": watcher,
        "key": "r0",
        "version": version,
        "previous": previous,
        "value": value,
    }


TRUE_STREAM = [_event(1, 0, 10), _event(3, 1, 30), _event(4, 3, 40), _event(5, 4, 50)]


def test_a_true_stream_passes_with_a_folded_skip() -> None:
    assert check_watch_streams(HISTORY, TRUE_STREAM) == []
    every_version = [_event(1, 0, 10), _event(2, 1, 20), *TRUE_STREAM[1:]]
    every_version[2] = _event(3, 2, 30)
    assert check_watch_streams(HISTORY, every_version) == []


def test_a_reset_after_compaction_starts_a_new_segment() -> None:
    stream = [
        _event(1, 0, 10),
        {"watcher": 0, "key": "r0", "version": 4, "reset": True},
        _event(5, 4, 50),
    ]
    assert check_watch_streams(HISTORY, stream) == []


def test_a_planted_gap_is_caught() -> None:
    # The watcher went from 3 to 5: version 4 (a cas, so visible) is missing.
    stream = [_event(1, 0, 10), _event(3, 1, 30), _event(5, 3, 50)]
    (problem,) = check_watch_streams(HISTORY, stream)
    assert "skipped from 3 to 5 past visible versions [4]" in str(problem)


def test_a_planted_gap_over_a_read_version_is_caught() -> None:
    (problem,) = check_watch_streams(HISTORY, [_event(3, 0, 30), *TRUE_STREAM[2:]])
    assert "past visible versions [1]" in str(problem)


def test_a_planted_duplicate_is_caught() -> None:
    stream = [*TRUE_STREAM[:3], _event(4, 4, 40), TRUE_STREAM[3]]
    problems = check_watch_streams(HISTORY, stream)
    assert any("version 4 after 4: a duplicate" in str(p) for p in problems)


def test_out_of_order_a_false_previous_and_a_wrong_value_are_caught() -> None:
    reordered = [TRUE_STREAM[0], TRUE_STREAM[2], TRUE_STREAM[1], TRUE_STREAM[3]]
    assert any("out of order" in str(p) for p in check_watch_streams(HISTORY, reordered))
    false_previous = [TRUE_STREAM[0], _event(3, 2, 30), *TRUE_STREAM[2:]]
    assert any("follows version 2" in str(p) for p in check_watch_streams(HISTORY, false_previous))
    wrong = [*TRUE_STREAM[:3], _event(5, 4, 40)]
    assert any("the history saw 50" in str(p) for p in check_watch_streams(HISTORY, wrong))
    invented = [*TRUE_STREAM, _event(6, 5, 99)]
    assert any("never written" in str(p) for p in check_watch_streams(HISTORY, invented))


def test_each_watcher_is_checked_on_its_own() -> None:
    other = [_event(1, 0, 10, watcher=1), _event(5, 1, 50, watcher=1)]
    problems = check_watch_streams(HISTORY, TRUE_STREAM + other)
    assert [p.watcher for p in problems] == [1]
