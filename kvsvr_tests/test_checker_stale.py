"""Stale reads never go back in time for their own process."""

from __future__ import annotations

from jepsen_like.checker import (
    Op,
    check_stale_reads_monotonic,
    is_stale_read,
    without_stale_reads,
)


def ev(i: int, process: int, type_: str, f: str, **extra: object) -> Op:
    return Op(process, type_, f, "k", None, i, i, dict(extra))


def test_monotonic_stale_reads_pass() -> None:
    history = [
        ev(0, 0, "invoke", "write"), ev(1, 0, "ok", "write", version=2),
        ev(2, 0, "invoke", "read", consistency="stale"), ev(3, 0, "ok", "read", version=2),
        ev(4, 1, "invoke", "read", consistency="stale"), ev(5, 1, "ok", "read", version=1),
    ]  # fmt: skip
    assert check_stale_reads_monotonic(history) == []


def test_stale_read_older_than_own_write_or_read() -> None:
    history = [
        ev(0, 0, "invoke", "write"), ev(1, 0, "ok", "write", version=5),
        ev(2, 0, "invoke", "read", consistency="stale"), ev(3, 0, "ok", "read", version=4),
        ev(4, 1, "invoke", "read"), ev(5, 1, "ok", "read", version=7),
        ev(6, 1, "invoke", "read", consistency="stale"), ev(7, 1, "fail", "read", version=1),
        ev(8, 1, "invoke", "read", consistency="stale"), ev(9, 1, "ok", "read", version=6),
    ]  # fmt: skip
    problems = check_stale_reads_monotonic(history)
    assert [(p.process, p.index, p.version, p.seen_version, p.seen_index) for p in problems] == [
        (0, 3, 4, 5, 1),
        (1, 9, 6, 7, 5),
    ]
    assert "went" not in str(problems[0]) and "version 4" in str(problems[0])


def test_other_keys_and_linearizable_reads_are_not_checked() -> None:
    history = [
        ev(0, 0, "invoke", "write"), ev(1, 0, "ok", "write", version=5),
        Op(0, "invoke", "read", "other", None, 2, 2, {"consistency": "stale"}),
        Op(0, "ok", "read", "other", None, 3, 3, {"version": 1}),
        ev(4, 0, "invoke", "read"), ev(5, 0, "ok", "read", version=3),
    ]  # fmt: skip
    assert check_stale_reads_monotonic(history) == []


def test_stale_reads_are_dropped_for_the_linearizability_check() -> None:
    history = [
        ev(0, 0, "invoke", "write"), ev(1, 0, "ok", "write", version=1),
        ev(2, 1, "invoke", "read", consistency="stale"),  # only the invoke says so
        ev(3, 2, "invoke", "read"),
        ev(4, 1, "ok", "read", version=0),
        ev(5, 2, "ok", "read", version=1),
        ev(6, 1, "invoke", "read", consistency="stale"), ev(7, 1, "info", "read"),
    ]  # fmt: skip
    kept = without_stale_reads(history)
    assert [op.index for op in kept] == [0, 1, 3, 5]
    assert is_stale_read(history[4], history[2]) and not is_stale_read(history[5], history[3])
