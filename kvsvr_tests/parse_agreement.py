"""Shared by the tests that hold a parser's shortcut to its checked path."""

from __future__ import annotations

from collections.abc import Callable

from kvsvr.errors import FrameError


def assert_parses_alike(
    checked: Callable[[object], object],
    fast: Callable[[object], object],
    raw: object,
    context: object = None,
) -> object:
    """Both parsers give an equal message of the same type, or both raise
    `FrameError`; returns what the checked one gave (`FrameError` if it raised).
    A failure shows `context`, or `raw` without one."""
    try:
        expected: object = checked(raw)
    except FrameError:
        expected = FrameError
    try:
        got: object = fast(raw)
    except FrameError:
        got = FrameError
    shown = raw if context is None else context
    assert got == expected, shown
    assert type(got) is type(expected), shown
    return expected
