"""kvsvr/clock.py: the clocks a node can be given."""

from __future__ import annotations

import time

import pytest

from kvsvr.clock import SYSTEM_CLOCK, Clock, ManualClock, RateClock


def test_the_system_clock_reads_the_system() -> None:
    assert abs(SYSTEM_CLOCK.wall_s() - time.time()) < 5
    assert abs(SYSTEM_CLOCK.wall_ms() - time.time() * 1000) < 5000
    first = SYSTEM_CLOCK.monotonic()
    assert SYSTEM_CLOCK.monotonic() >= first


def test_a_manual_clock_moves_only_when_told() -> None:
    clock: Clock = ManualClock(wall_s=100.0, monotonic=5.0)
    assert (clock.wall_s(), clock.wall_ms(), clock.monotonic()) == (100.0, 100_000, 5.0)
    assert isinstance(clock, ManualClock)
    clock.advance(1.5)
    assert (clock.wall_ms(), clock.monotonic()) == (101_500, 6.5)
    with pytest.raises(AssertionError):
        clock.advance(-1)


def _elapsed_bounds(clock: RateClock) -> tuple[float, float, float]:
    """The rate clock's elapsed time over a short sleep, and the least and
    most real time that can have passed meanwhile (bracketing reads, so a
    preempted test still gets true bounds)."""
    r0 = time.monotonic()
    c0 = clock.monotonic()
    r1 = time.monotonic()
    time.sleep(0.05)
    r2 = time.monotonic()
    c1 = clock.monotonic()
    r3 = time.monotonic()
    return c1 - c0, r2 - r1, r3 - r0


def test_a_rate_clock_runs_at_its_rate_and_stays_continuous() -> None:
    clock = RateClock(rate=5.0)
    elapsed, real_least, real_most = _elapsed_bounds(clock)
    assert 5 * real_least <= elapsed <= 5 * real_most
    before = clock.monotonic()
    clock.set_rate(0.2)
    assert clock.monotonic() >= before, "changing the rate never moves the clock back"
    elapsed, real_least, real_most = _elapsed_bounds(clock)
    assert 0.2 * real_least <= elapsed <= 0.2 * real_most
    with pytest.raises(AssertionError):
        clock.set_rate(0)
