"""The node's one clock.

Everything in a node that reads time reads it through a `Clock`: the wall
clock (row expiry, eventual-table stamps, rebuild and uptime reports) and the
monotonic clock (failure detection, repair back-off, cache ages, deadlines).
A node is given its clock when it is built, so a test or a fault injector can
hand it one that runs fast, slow, or by hand.

`SYSTEM_CLOCK` reads the operating system's clocks and is the default.
`ManualClock` is for sans-IO tests: time moves only when the test moves it.
`RateClock` runs the monotonic clock at a chosen rate of real time: the
fault injector's clock-rate fault (read leases assume rates stay within
`clock_drift_max` of real time; a test must be able to break that).
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


class RateClock:
    """The system clocks, with the monotonic one running at `rate` times
    real time (1.0: real time). The rate may change at any moment; the clock
    stays continuous and never goes back. The wall clock is left as it is:
    only rates matter to leases, and the wall clock may jump anyway."""

    RATE_MIN = 0.01
    RATE_MAX = 100.0

    def __init__(self, rate: float = 1.0) -> None:
        self._base_real = time.monotonic()
        self._base = self._base_real
        self.rate = 1.0
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        assert self.RATE_MIN <= rate <= self.RATE_MAX, "clock rate out of range"
        now_real = time.monotonic()
        self._base = self._base + (now_real - self._base_real) * self.rate
        self._base_real = now_real
        self.rate = rate

    def wall_s(self) -> float:
        return time.time()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return self._base + (time.monotonic() - self._base_real) * self.rate


SYSTEM_CLOCK: Clock = SystemClock()

# The request that sets a node's clock rate, `{"rate": r}`: served only by a
# node started with `kvsvr node --test-clock-control` (the fault harness's
# `clock` nemesis), which runs on a `RateClock`.
TEST_CLOCK_RATE_METHOD = "test_clock_rate"
