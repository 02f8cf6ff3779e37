"""Failure detection, sans-IO: phi accrual over a peer's answers.

Every node pings each peer every HEARTBEAT_S and keeps the recent
inter-arrival times; a peer is *down* when a ping failed or when the silence
since its last answer is improbable (phi accrual, as Cassandra and Akka do,
with an exponential model of the arrivals). The detector is given the time;
it reads no clock.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

HEARTBEAT_S: Final = 0.5
# phi = -log10(P(a silence this long)); 4 means a 1-in-10,000 silence. With
# 0.5 s pings that is about 4.6 s of silence; a refused connection is faster.
PHI_DOWN: Final = 4.0
ARRIVALS_KEPT: Final = 100  # enough for a stable mean; a minute of pings at most


class PhiDetector:
    """Phi accrual failure detection for one peer (time passed in)."""

    def __init__(self) -> None:
        self.intervals: deque[float] = deque(maxlen=ARRIVALS_KEPT)
        self.last_arrival: float | None = None
        self.failed = True  # until the first answer: unknown counts as down
        self.transitions_up = 0
        self.mean = HEARTBEAT_S  # of the intervals kept (updated on each arrival)

    def arrived(self, now: float) -> bool:
        """Record an answer. True when the peer was down and is now up."""
        if self.last_arrival is not None:
            self.intervals.append(now - self.last_arrival)
            self.mean = max(sum(self.intervals) / len(self.intervals), HEARTBEAT_S / 2)
        self.last_arrival = now
        was_down = self.failed
        self.failed = False
        if was_down:
            self.transitions_up += 1
        return was_down

    def fail(self) -> None:
        self.failed = True

    def phi(self, now: float) -> float:
        if self.last_arrival is None:
            return math.inf
        return (now - self.last_arrival) / self.mean * math.log10(math.e)

    def is_up(self, now: float) -> bool:
        return not self.failed and self.phi(now) < PHI_DOWN
