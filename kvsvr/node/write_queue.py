"""Per-key write queues of one coordinator, with blind puts folded together.

A coordinator runs at most one write per key at a time (the others would only
duel with it for the key's promise). Writes that arrive while one is in
flight wait in the key's queue, first come first served. When the write in
flight ends, the head of the queue leads the next *group*: a conditional
write (if_version / if_absent) or an opaque operation goes alone; a blind put
or delete takes along every blind write queued right behind it (up to
`WRITE_BATCH_MAX`), and the group is proposed as one write that takes one
version per member (`Mutation.versions`), carrying the last member's value.
The i-th member answers the i-th of those versions: all members were in
flight together, so they are linearized one after the other at the moment the
proposal is chosen, and the members before the last are overwritten before
anyone can read them. A hot key then costs one Paxos round per group instead
of one per put, and a closed-loop load cannot pile up behind it.

Only the bookkeeping lives here (queues, groups, hand-over); the node runs the
operations. No timeouts here either: a waiter that gives up marks itself
`abandoned` and the hand-over skips it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import TypeAlias

from kvsvr.protocol.coordinator import Mutation, Outcome, Replies, Round, Status

# Blind writes of one key folded into one proposal, at most. Bounds the work
# one leader does for others and the versions one proposal skips; 64 is the
# closed-loop client count the benchmarks use, so a fully piled-up hot key
# drains in one round.
WRITE_BATCH_MAX = 64

Slot: TypeAlias = tuple[str, bytes]
Operation: TypeAlias = Generator[Round, Replies, Outcome]


class QueuedWrite:
    """One write waiting for (or holding) its key's turn on this coordinator."""

    __slots__ = (
        "abandoned",
        "failure",
        "group",
        "make",
        "mutation",
        "on_wake",
        "outcome",
    )

    def __init__(
        self,
        make: Callable[[], Operation],
        mutation: Mutation | None,
        on_wake: Callable[[], None],
    ) -> None:
        self.make = make  # runs it alone
        # A blind write (no condition) that may be folded with its neighbours.
        self.mutation = mutation if mutation is not None and _foldable(mutation) else None
        # How its waiter learns that it leads or was answered (see `notify`);
        # called inside the hand-over or the answer of another write.
        self.on_wake = on_wake
        self.group: list[QueuedWrite] | None = None  # set on the leader of a group
        self.outcome: Outcome | None = None  # set on a member its leader answered
        self.failure: str | None = None  # set on a member whose leader failed
        self.abandoned = False  # the waiter gave up (timeout, cancellation)

    def notify(self) -> None:
        """Wake its waiter: it leads `group`, or `outcome`/`failure` is set."""
        self.on_wake()


def _foldable(mutation: Mutation) -> bool:
    return mutation.if_version is None and not mutation.if_absent


class KeyWriteQueues:
    """Per key, the writes waiting behind the one this coordinator runs. A key
    has an entry only while a write of it runs: an idle key costs nothing."""

    def __init__(self) -> None:
        self._queues: dict[Slot, deque[QueuedWrite]] = {}
        self.groups_folded = 0  # groups of more than one write
        self.writes_folded = 0  # writes that rode in such a group

    def __len__(self) -> int:
        return len(self._queues)

    def __contains__(self, slot: Slot) -> bool:
        """Whether a write of `slot` runs on this coordinator."""
        return slot in self._queues

    def enter(self, slot: Slot, write: QueuedWrite) -> bool:
        """True: nothing runs on the key, `write` leads now (alone). False: it
        was queued; it is woken through `write.notify`."""
        queue = self._queues.get(slot)
        if queue is None:
            self._queues[slot] = deque()
            write.group = [write]
            return True
        queue.append(write)
        return False

    def hand_over(self, slot: Slot) -> None:
        """The group in flight on `slot` is done: wake the next group's leader,
        or forget the key when nobody waits."""
        queue = self._queues[slot]
        while queue and queue[0].abandoned:
            queue.popleft()
        if not queue:
            del self._queues[slot]
            return
        leader = queue.popleft()
        group = [leader]
        if leader.mutation is not None:
            while queue and len(group) < WRITE_BATCH_MAX:
                head = queue[0]
                if head.abandoned:
                    queue.popleft()
                elif head.mutation is not None:
                    group.append(queue.popleft())
                else:
                    break
        if len(group) > 1:
            self.groups_folded += 1
            self.writes_folded += len(group)
        leader.group = group
        leader.notify()


def folded_mutation(group: list[QueuedWrite]) -> Mutation:
    """The one write a group of blind writes is proposed as: the last member's
    value, one version per member."""
    last = group[-1].mutation
    assert last is not None
    versions = 0
    for member in group:
        assert member.mutation is not None
        versions += member.mutation.versions
    return Mutation(last.value, last.expires_at_ms, versions=versions)


def answer_group(group: list[QueuedWrite], outcome: Outcome) -> None:
    """Give every member but the leader its answer and wake it. On success the
    members take the group's versions in queue order, ending at
    `outcome.version`; any other outcome is every member's."""
    if outcome.status == Status.OK:
        version = outcome.version
        for member in reversed(group):
            assert member.mutation is not None
            member.outcome = Outcome(Status.OK, version=version)
            version -= member.mutation.versions
    else:
        for member in group:
            member.outcome = outcome
    for member in group[1:]:
        member.notify()


def fail_group(group: list[QueuedWrite], reason: str) -> None:
    """The leader could not finish: members not yet answered learn that their
    outcome is unknown."""
    for member in group[1:]:
        if member.outcome is None:
            member.failure = reason
            member.notify()
