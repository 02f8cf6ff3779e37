"""The node's one engine for client operations: callbacks, no task per operation.

An operation is the protocol's generator (`kvsvr.protocol.coordinator`): it
yields rounds and returns an outcome. `Drive` runs its rounds from callbacks:
each round is sent through `Rounds`, and when its collector settles or its
time is up, the next step is queued on the node's `Soon` runner (never run
inside the callback that ended the wait). A client request then costs no
task, no coroutine chain to resume per round and no wake-up of its own
(`bench.single_node`, `bench.compare`: see DESIGN "Node").

Every caller starts operations this way. One that must await the answer
(a request the connection runs in a task, repair, catch-up) starts the same
operation and awaits its answer through `until_answered`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from kvsvr.api import OPERATION_TIMEOUT_S
from kvsvr.errors import KvsvrError, Timeout, Unavailable
from kvsvr.node.read_share import SharedRead, SharedReads
from kvsvr.node.rounds import (
    ROUND_TIME_WEIGHT,
    ROUND_TIMEOUT_S,
    Deadline,
    RoundCollector,
    Rounds,
    Wait,
)
from kvsvr.node.write_queue import Operation, Slot
from kvsvr.protocol.coordinator import Outcome, Replies, Round
from kvsvr.protocol.messages import Accept

log = logging.getLogger("kvsvr.node")

# Answers a client request: (reply, None) or (None, error), exactly once.
Respond = Callable[[object, KvsvrError | None], None]
# How an operation ends: its outcome, or the error to answer with.
OperationDone = Callable[[Outcome | None, KvsvrError | None], None]


async def until_answered(start: Callable[[Respond], None]) -> Any:
    """Start an operation that answers through a `Respond` callback and await
    its answer: the reply, or the error raised. A cancelled caller stops
    waiting; the operation goes on to its own end (its deadline bounds it)."""
    answered = trio.Event()
    answer: list[tuple[object, KvsvrError | None]] = []

    def respond(reply: object, error: KvsvrError | None) -> None:
        answer.append((reply, error))
        answered.set()

    start(respond)
    await answered.wait()
    reply, error = answer.pop()
    if error is not None:
        try:
            raise error
        finally:
            del error  # the traceback holds this frame: no cycle through it
    return reply


class Drive:
    """Runs an operation's rounds from callbacks. `done` is called exactly
    once: with the outcome, with the operation's `Timeout` past its deadline,
    or with an internal error if a step raised."""

    __slots__ = ("deadline", "done", "finished", "operation", "rounds")

    def __init__(
        self, rounds: Rounds, operation: Operation, deadline: Deadline, done: OperationDone
    ) -> None:
        self.rounds = rounds
        self.operation = operation
        self.deadline = deadline
        self.done = done
        self.finished = False

    def start(self) -> None:
        self._guarded(self._step, None)

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        if self.finished:
            return
        try:
            step(*args)
        except Exception as exc:
            log.exception("a task-free operation failed")
            self._finish(None, KvsvrError(f"internal error: {exc!r}"))

    def _finish(self, outcome: Outcome | None, error: KvsvrError | None) -> None:
        if self.finished:
            return
        self.finished = True
        if outcome is None:
            self.operation.close()
        self.done(outcome, error)

    def _later(self, step: Callable[..., None], *args: Any) -> Callable[[], None]:
        """`step(*args)` as the next step of this operation, run by the node's
        `Soon` runner when a wait ends."""
        call = self.rounds.soon.call
        return lambda: call(lambda: self._guarded(step, *args))

    def _step(self, replies: Replies | None) -> None:
        rounds = self.rounds
        operation = self.operation
        while True:
            try:
                current = next(operation) if replies is None else operation.send(replies)
            except StopIteration as stop:
                self._finish(stop.value, None)
                return
            except KvsvrError as error:
                self._finish(None, error)
                return
            for target, message in current.oneway:
                rounds.send_oneway(target, message)
            if not current.requests:
                replies = {}
                continue
            if self.deadline.passed():
                self._finish(None, self.deadline.error())
                return
            if current.delay_s > 0:
                wake_at = min(trio.current_time() + current.delay_s, self.deadline.at)
                rounds.round_timer.add(wake_at, Wait(None, self._later(self._after_delay, current)))
                return
            self._start_round(current)
            return

    def _after_delay(self, current: Round) -> None:
        if self.deadline.passed():
            self._finish(None, self.deadline.error())
            return
        self._start_round(current)

    def _start_round(self, current: Round) -> None:
        rounds = self.rounds
        holds = rounds.holds
        if holds is not None:
            # An Accept of ours may get a version chosen that a read lease
            # of ours does not hold: the lease ends before it leaves.
            message = next(iter(current.requests.values()))
            if type(message) is Accept:
                holds.accept_sent(message.table, message.key)
        round_deadline = min(trio.current_time() + ROUND_TIMEOUT_S, self.deadline.at)
        collector = RoundCollector(current.quorum)
        first, rest = rounds.thrifty_split(current)
        collector.expect(len(first))
        for target in first:
            rounds.send_for_round(target, current.requests[target], collector)
        if rest:
            rounds.rounds_thrifty += 1
            started = trio.current_time()
            self._wait(
                collector,
                min(started + rounds.hedge_s(), round_deadline),
                self._after_first,
                current,
                collector,
                first,
                rest,
                started,
                round_deadline,
            )
        else:
            self._wait(collector, round_deadline, self._round_done, collector)

    def _wait(
        self, collector: RoundCollector, until: float, step: Callable[..., None], *args: Any
    ) -> None:
        """Run `step(*args)` once `collector` settles or `until` passes."""
        if collector.settled:
            step(*args)
            return
        wait = Wait(None, self._later(step, *args))
        collector.wait = wait
        self.rounds.round_timer.add(until, wait)

    def _after_first(
        self,
        current: Round,
        collector: RoundCollector,
        first: list[int],
        rest: list[int],
        started: float,
        round_deadline: float,
    ) -> None:
        """The majority asked first answered, or did not in the hedge time:
        ask the others then."""
        rounds = self.rounds
        collector.wait = None
        now = trio.current_time()
        rounds.round_time_s += ROUND_TIME_WEIGHT * (now - started - rounds.round_time_s)
        if collector.has_quorum or now >= round_deadline:
            self._round_done(collector)
            return
        rounds.rounds_hedged += 1
        rounds.mark_slow(first, collector)
        collector.expect(len(rest))
        for target in rest:
            rounds.send_for_round(target, current.requests[target], collector)
        self._wait(collector, round_deadline, self._round_done, collector)

    def _round_done(self, collector: RoundCollector) -> None:
        collector.wait = None
        collector.close()
        if self.deadline.passed():
            self._finish(None, self.deadline.error())
            return
        self._step(collector.replies)


class StrongReads:
    """Strong reads of one key share rounds (see `kvsvr.node.read_share`):
    the first reader of an idle key runs its own `Drive`; readers that arrive
    while it runs wait for the next round, started when it ends, and all
    take that round's outcome."""

    def __init__(self, rounds: Rounds) -> None:
        self.rounds = rounds
        self.shared = SharedReads()

    def start(
        self, slot: Slot, make: Callable[[], Operation], deadline: Deadline, done: OperationDone
    ) -> None:
        """Read `slot` with the operation `make` builds; `done` once."""
        reads = self.shared
        if slot in reads.running:
            _SharedReader(self.rounds, reads.join_next(slot, make), deadline, done)
            return
        reads.running.add(slot)

        def finished(outcome: Outcome | None, error: KvsvrError | None) -> None:
            self._start_next(slot)
            done(outcome, error)

        try:
            operation = make()
        except BaseException:
            self._start_next(slot)
            raise
        Drive(self.rounds, operation, deadline, finished).start()

    def _start_next(self, slot: Slot) -> None:
        shared = self.shared.take_next(slot)
        if shared is None:
            return

        def finished(outcome: Outcome | None, error: KvsvrError | None) -> None:
            if error is not None and not isinstance(error, Timeout):
                log.warning("a shared read of %r failed: %s", slot[1], error)
            for waiter in shared.waiters:
                waiter(outcome)
            self._start_next(slot)

        try:
            operation = shared.make()
        except KvsvrError as error:
            finished(None, error)
            return
        Drive(self.rounds, operation, Deadline(OPERATION_TIMEOUT_S), finished).start()


class _SharedReader:
    """A reader waiting for a shared round: answered once, by the round's
    outcome or at its own deadline, whichever comes first."""

    __slots__ = ("deadline", "done", "over", "timer")

    def __init__(
        self, rounds: Rounds, shared: SharedRead, deadline: Deadline, done: OperationDone
    ) -> None:
        self.deadline = deadline
        self.done = done
        self.over = False
        shared.waiters.append(self.answer)
        soon = rounds.soon
        self.timer = Wait(None, lambda: soon.call(self._time_up))
        rounds.round_timer.add(deadline.at, self.timer)

    def answer(self, outcome: Outcome | None) -> None:
        if self.over:
            return
        self.over = True
        self.timer.then = None
        if outcome is None:
            self.done(None, Unavailable("the read round this read shared did not finish; retry"))
        else:
            self.done(outcome, None)

    def _time_up(self) -> None:
        if self.over:
            return
        self.over = True
        self.done(None, self.deadline.error())
