"""Writes in turn: one write per key at a time on this coordinator.

A write waits for its key's turn in the key's queue
(`kvsvr.node.write_queue`), woken through `QueuedWrite.notify` and bounded by
a round-timer wait at its deadline; then it leads its group as a `Drive`, or
takes the answer of the group it was folded into. Blind writes queued next to
each other are proposed as one (the queue's module says why that is safe).
"""

from __future__ import annotations

from collections.abc import Callable

from kvsvr.clock import Clock
from kvsvr.errors import KvsvrError, Timeout
from kvsvr.keys import decode_key
from kvsvr.node.cache import RowCache
from kvsvr.node.engine import Drive, OperationDone
from kvsvr.node.rounds import Deadline, Rounds, Wait
from kvsvr.node.write_queue import (
    KeyWriteQueues,
    Operation,
    QueuedWrite,
    Slot,
    answer_group,
    fail_group,
    folded_mutation,
)
from kvsvr.protocol.coordinator import Coordinator, Mutation, Outcome, Status


class Writes:
    """The write operations of this coordinator and their per-key turns."""

    def __init__(
        self,
        rounds: Rounds,
        coordinator: Coordinator,
        cache: RowCache,
        clock: Clock,
        replicas_of: Callable[[str, bytes], list[int]],
        local_version: Callable[[str, bytes, list[int]], int],
    ) -> None:
        self.rounds = rounds
        self.coordinator = coordinator
        self.cache = cache
        self.clock = clock
        self.replicas_of = replicas_of
        self.local_version = local_version
        self.queues = KeyWriteQueues()

    def start(
        self,
        table: str,
        key: bytes,
        replicas: list[int],
        mutation: Mutation,
        now_ms: int,
        deadline: Deadline,
        done: OperationDone,
    ) -> None:
        """Write `mutation` to the key in its turn; `done` once, with the outcome
        (ok, conflict, unavailable) or the error."""

        def make() -> Operation:
            return self.operation(table, key, replicas, mutation, now_ms)

        TurnWrite(self, (table, key), make, mutation, deadline, done).start()

    def operation(
        self, table: str, key: bytes, replicas: list[int], mutation: Mutation, now_ms: int
    ) -> Operation:
        # The local version only helps phase 1 (replicas leave out a value we
        # hold); a write that holds the key's lease takes the fast path without it.
        known = (
            -1
            if self.coordinator.has_lease(table, key)
            else self.local_version(table, key, replicas)
        )
        return self.coordinator.write(table, key, replicas, mutation, now_ms, known)

    def group_operation(
        self, slot: Slot, group: list[QueuedWrite]
    ) -> tuple[Operation, Mutation | None]:
        """The operation a write group's leader runs: its own write alone, or
        the group's blind writes folded into one (returned too)."""
        if len(group) == 1:
            return group[0].make(), None
        table, key = slot
        mutation = folded_mutation(group)
        partition_key, _ = decode_key(key)
        replicas = self.replicas_of(table, partition_key)
        return self.operation(table, key, replicas, mutation, self.clock.wall_ms()), mutation

    def answer_folded(
        self, slot: Slot, group: list[QueuedWrite], folded: Mutation, outcome: Outcome
    ) -> Outcome:
        """A folded group's write ended with `outcome`: answer its members;
        the leader's own outcome."""
        if outcome.status == Status.OK:
            # The group's value, before the members' own (older) versions reach the cache.
            table, key = slot
            self.cache.put(
                table,
                key,
                outcome.version,
                folded.value,
                folded.expires_at_ms,
                self.clock.monotonic(),
            )
        answer_group(group, outcome)
        assert group[0].outcome is not None
        return group[0].outcome


def _ignore_wake() -> None:
    pass


class TurnWrite:
    """One write from its key's queue to its answer. The members of a group
    share the queue with the writes still waiting. `done` is called exactly once."""

    __slots__ = ("deadline", "done", "folded", "over", "slot", "timer", "write", "writes")

    def __init__(
        self,
        writes: Writes,
        slot: Slot,
        make: Callable[[], Operation],
        mutation: Mutation,
        deadline: Deadline,
        done: OperationDone,
    ) -> None:
        self.writes = writes
        self.slot = slot
        self.deadline = deadline
        self.done = done
        self.over = False
        self.timer: Wait | None = None
        self.folded: Mutation | None = None  # the group's write when it leads several
        self.write = QueuedWrite(make, mutation, self._woken)

    def start(self) -> None:
        writes = self.writes
        if writes.queues.enter(self.slot, self.write):
            self._lead()
            return
        soon = writes.rounds.soon
        self.timer = Wait(None, lambda: soon.call(self._time_up))
        writes.rounds.round_timer.add(self.deadline.at, self.timer)

    def _woken(self) -> None:
        # Called inside another write's hand-over or answer: run later.
        self.writes.rounds.soon.call(self._turn)

    def _end(self) -> None:
        self.over = True
        if self.timer is not None:
            self.timer.then = None
        # The queued write calls back into us (`_woken`, a bound method) and we
        # hold it: a reference cycle, left to the cyclic collector, of ~20
        # objects per put, the collector's main work under load (~4% of a
        # node's CPU). Once over, a wake-up has nothing to do (`_turn` returns).
        self.write.on_wake = _ignore_wake

    def _time_up(self) -> None:
        write = self.write
        if self.over or write.group is not None or write.outcome is not None:
            return  # answered, or woken with its `_turn` queued: that decides
        if write.failure is not None:
            return
        write.abandoned = True  # the hand-over skips it
        self._end()
        self.done(None, self.deadline.error())

    def _turn(self) -> None:
        if self.over:
            return
        write = self.write
        group = write.group
        if group is None:  # folded into another write's group, which answered
            self._end()
            if write.outcome is not None:
                self.done(write.outcome, None)
            else:
                self.done(None, Timeout(write.failure or "outcome unknown"))
            return
        if self.deadline.passed():  # made leader past its time: as a cancelled leader
            write.abandoned = True
            self._end()
            fail_group(group, "its group's leader timed out; outcome unknown")
            self.writes.queues.hand_over(self.slot)
            group.clear()
            self.done(None, self.deadline.error())
            return
        self._lead()

    def _lead(self) -> None:
        writes = self.writes
        group = self.write.group
        assert group is not None and group[0] is self.write
        if self.timer is not None:
            self.timer.then = None
        operation, self.folded = writes.group_operation(self.slot, group)
        holds = writes.rounds.holds
        if holds is not None:
            holds.write_started(*self.slot)
        Drive(writes.rounds, operation, self.deadline, self._group_done).start()

    def _group_done(self, outcome: Outcome | None, error: KvsvrError | None) -> None:
        """Answer the members, hand the key over, answer our own caller."""
        writes = self.writes
        group = self.write.group
        assert group is not None
        holds = writes.rounds.holds
        if holds is not None:
            known = outcome is not None and outcome.status != Status.UNAVAILABLE
            holds.write_finished(*self.slot, known)
        try:
            if outcome is None:
                fail_group(group, "the write it was folded with did not finish; outcome unknown")
            elif self.folded is not None:
                outcome = writes.answer_folded(self.slot, group, self.folded, outcome)
        finally:
            writes.queues.hand_over(self.slot)
            # The leader heads its own group: a reference cycle, which would
            # keep the value until the cyclic collector's next sweep.
            group.clear()
        self._end()
        self.done(outcome, error)
