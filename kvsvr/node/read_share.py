"""Strong reads of one key share quorum rounds on a coordinator.

While a strong read round of a key runs, the strong reads of that key that
arrive join one *next* round, started as soon as the running one ends, and
all get its outcome. Each of them is answered by a round whose messages left
after it was invoked, so it sees every write completed before it started:
linearizable, as if it had run its own round then. A hot key then costs one
read round per round trip instead of one per reader.

Only the bookkeeping lives here; the node's engine runs the rounds
(`kvsvr.node.engine.StrongReads`), none of them in a reader's task, so that
no reader's cancellation or timeout takes the others down.
"""

from __future__ import annotations

from collections.abc import Callable

from kvsvr.node.write_queue import Operation, Slot
from kvsvr.protocol.coordinator import Outcome


class SharedRead:
    """A read round that several readers of one key wait for."""

    __slots__ = ("make", "readers", "waiters")

    def __init__(self, make: Callable[[], Operation]) -> None:
        self.make = make  # the first reader's operation; any reader's would do
        # Each reader's answer: the round's outcome, or None if it failed.
        self.waiters: list[Callable[[Outcome | None], None]] = []
        self.readers = 1


class SharedReads:
    """Per key: whether a read round runs, and the round the next readers wait for."""

    def __init__(self) -> None:
        self.running: set[Slot] = set()
        self.next: dict[Slot, SharedRead] = {}
        self.rounds_shared = 0  # rounds that answered more than one reader
        self.reads_shared = 0  # readers answered by such rounds

    def join_next(self, slot: Slot, make: Callable[[], Operation]) -> SharedRead:
        """A round runs on `slot`: wait for the next one (made if needed)."""
        shared = self.next.get(slot)
        if shared is None:
            shared = self.next[slot] = SharedRead(make)
        else:
            shared.readers += 1
        return shared

    def take_next(self, slot: Slot) -> SharedRead | None:
        """The running round of `slot` ended: the next one to start, or None
        (then the key is idle)."""
        shared = self.next.pop(slot, None)
        if shared is None:
            self.running.discard(slot)
            return None
        if shared.readers > 1:
            self.rounds_shared += 1
            self.reads_shared += shared.readers
        return shared
