"""The node's one clock.

Everything in a node that reads time reads it through a `Clock`: the wall
clock (row expiry, eventual-table stamps, rebuild and uptime reports) and the
monotonic clock (failure detection, repair back-off, cache ages, deadlines).
A node is given its clock when it is built, so a test or a fault injector can
hand it one that runs fast, slow, or by hand.

`SYSTEM_CLOCK` reads the operating system's clocks and is the default.
`ManualClock` is for sans-IO tests: time moves only when the test moves it.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall_s(self) -> float:
        """Seconds since the Unix epoch (may jump: never use for intervals)."""
        ...

    def wall_ms(self) -> int:
        """`wall_s` in whole milliseconds, as rows and stamps store it."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...


class SystemClock:
    """The operating system's clocks."""

    def wall_s(self) -> float:
        return time.time()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, wall_s: float = 1_700_000_000.0, monotonic: float = 1000.0) -> None:
        self._wall_s = wall_s
        self._monotonic = monotonic

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a manual clock only moves forward"
        self._wall_s += seconds
        self._monotonic += seconds

    def wall_s(self) -> float:
        return self._wall_s

    def wall_ms(self) -> int:
        return int(self._wall_s * 1000)

    def monotonic(self) -> float:
        return self._monotonic


SYSTEM_CLOCK: Clock = SystemClock()
