"""Operations driven without a task (`kvsvr.node.engine.Drive`, and client
writes queued per key, `kvsvr.node.writes.TurnWrite`): the
next step after a round runs once the round's collector settles or its time
is up, never inside the callback that ended the wait; `done` is called
exactly once, with the outcome, with `Timeout` past the operation's
deadline, or with an internal error when a step raised.

A fake stands in for the node's `Rounds`: it records the requests a round
sends, so a test answers them (or not) itself."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from kvsvr.clock import ManualClock
from kvsvr.errors import KvsvrError, Timeout, Unavailable
from kvsvr.keys import encode_key
from kvsvr.node.engine import Drive, StrongReads
from kvsvr.node.rounds import (
    ROUND_TIMEOUT_S,
    ROUND_TIMER_TICK_S,
    Deadline,
    RoundCollector,
    RoundTimer,
    Soon,
)
from kvsvr.node.write_queue import KeyWriteQueues, Operation
from kvsvr.node.writes import Writes
from kvsvr.protocol.coordinator import Mutation, Outcome, Replies, Round, Status
from kvsvr.protocol.messages import Read, ReadReply
from kvsvr.protocol.read_lease import Holds
from kvsvr_tests.build_mode import COMPILED

ME = 1


# A FakeNode stands in for the Rounds these helpers are typed to take; compiled
# (`dev.py compile`), they check that type at the call and refuse it.
pytestmark = pytest.mark.skipif(
    COMPILED, reason="drives the compiled helpers with a FakeNode; runs in the pure-Python suite"
)


class FakeNode:
    """What `Drive` uses of the node's rounds. Peers 2 and 3 are asked only
    after the hedge delay when `thrifty`; the local replica (1) never answers
    by itself."""

    def __init__(self) -> None:
        self.soon = Soon()
        self.round_timer = RoundTimer()
        self.round_time_s = 0.01
        self.rounds_thrifty = 0
        self.rounds_hedged = 0
        self.sent: list[tuple[int, RoundCollector]] = []
        self.oneway: list[int] = []
        self.thrifty = False
        self.slow: list[int] = []
        # Read leases off: `Drive` and `TurnWrite` skip their lease bookkeeping.
        self.holds: Holds | None = None

    def send_oneway(self, target: int, message: object) -> None:
        self.oneway.append(target)

    def thrifty_split(self, current: Round) -> tuple[list[int], list[int]]:
        targets = list(current.requests)
        if not self.thrifty:
            return targets, []
        return targets[: current.quorum], targets[current.quorum :]

    def hedge_s(self) -> float:
        return 0.05

    def mark_slow(self, asked: list[int], collector: RoundCollector) -> None:
        self.slow.extend(t for t in asked if t not in collector.replies)

    def send_for_round(self, target: int, message: object, collector: RoundCollector) -> None:
        self.sent.append((target, collector))


def _read_round() -> Round:
    message = Read("t", b"k", -1)
    return Round({1: message, 2: message, 3: message}, quorum=2, oneway=[])


def _reply(version: int) -> ReadReply:
    return ReadReply(version, True, b"v%d" % version, None, None, 0, (0, 0), version)


def _two_rounds(seen: list[Replies]) -> Generator[Round, Replies, Outcome]:
    replies = yield _read_round()
    seen.append(replies)
    replies = yield _read_round()
    seen.append(replies)
    return Outcome(Status.OK, version=len(seen))


def _run(test: Any, make_node: Any = None) -> None:
    async def main() -> None:
        node = (make_node or FakeNode)()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.soon.run)
            nursery.start_soon(node.round_timer.run)
            await trio.lowlevel.checkpoint()
            await test(node)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _recorder() -> tuple[list[tuple[Outcome | None, KvsvrError | None]], Any]:
    calls: list[tuple[Outcome | None, KvsvrError | None]] = []

    def done(outcome: Outcome | None, error: KvsvrError | None) -> None:
        calls.append((outcome, error))

    return calls, done


def test_rounds_advance_when_their_quorum_answers_and_not_inside_the_answer() -> None:
    async def test(node: FakeNode) -> None:
        seen: list[Replies] = []
        calls, done = _recorder()
        Drive(node, _two_rounds(seen), Deadline(4.0), done).start()  # type: ignore[arg-type]
        assert [t for t, _ in node.sent] == [1, 2, 3]
        collector = node.sent[0][1]
        collector.add(1, _reply(1))
        collector.add(2, _reply(2))
        # Settled, but the next step is queued for the runner, not run here.
        assert collector.settled and seen == []
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert seen == [{1: _reply(1), 2: _reply(2)}]
        assert not collector.open  # closed: a late answer is dropped
        collector.add(3, _reply(3))
        assert 3 not in seen[0]
        second = node.sent[3][1]
        second.add(3, _reply(3))
        second.add(1, _reply(1))
        await trio.sleep(0.001)
        assert calls == [(Outcome(Status.OK, version=2), None)]

    _run(test)


def test_a_round_nobody_answers_ends_by_its_own_timeout_then_the_next_round_runs() -> None:
    async def test(node: FakeNode) -> None:
        seen: list[Replies] = []
        calls, done = _recorder()
        start = trio.current_time()
        Drive(node, _two_rounds(seen), Deadline(10.0), done).start()  # type: ignore[arg-type]
        await trio.sleep(ROUND_TIMEOUT_S - 0.01)
        assert seen == []
        await trio.sleep(0.01 + ROUND_TIMER_TICK_S + 0.001)
        assert seen == [{}]  # no quorum: the operation sees what arrived (nothing)
        assert len(node.sent) == 6
        node.sent[3][1].add(1, _reply(1))
        node.sent[4][1].add(2, _reply(1))
        await trio.sleep(0.001)
        assert calls == [(Outcome(Status.OK, version=2), None)]
        assert trio.current_time() - start < ROUND_TIMEOUT_S + 0.1

    _run(test)


def test_past_its_deadline_an_operation_ends_once_with_timeout() -> None:
    async def test(node: FakeNode) -> None:
        calls, done = _recorder()
        start = trio.current_time()
        drive = Drive(node, _two_rounds([]), Deadline(0.3), done)  # type: ignore[arg-type]
        drive.start()
        await trio.sleep(2 * ROUND_TIMEOUT_S)
        (call,) = calls
        assert call[0] is None and isinstance(call[1], Timeout)
        # The round's own deadline was the operation's: it ended on time.
        assert not node.sent[0][1].open
        # A late answer to the closed round changes nothing.
        node.sent[0][1].add(1, _reply(1))
        await trio.sleep(0.01)
        assert len(calls) == 1
        assert trio.current_time() - start >= 0.3

    _run(test)


def test_a_step_that_raises_answers_an_internal_error_once() -> None:
    def broken() -> Generator[Round, Replies, Outcome]:
        yield _read_round()
        raise ValueError("a bug")

    async def test(node: FakeNode) -> None:
        calls, done = _recorder()
        Drive(node, broken(), Deadline(4.0), done).start()  # type: ignore[arg-type]
        collector = node.sent[0][1]
        collector.add(1, _reply(1))
        collector.add(2, _reply(1))
        await trio.sleep(0.001)
        (call,) = calls
        assert call[0] is None and call[1] is not None
        assert "internal error" in str(call[1]) and "a bug" in str(call[1])

    _run(test)


def test_a_hedged_round_asks_the_others_after_the_hedge_delay() -> None:
    async def test(node: FakeNode) -> None:
        node.thrifty = True
        seen: list[Replies] = []
        _calls, done = _recorder()
        Drive(node, _two_rounds(seen), Deadline(4.0), done).start()  # type: ignore[arg-type]
        assert [t for t, _ in node.sent] == [1, 2]
        node.sent[0][1].add(1, _reply(1))  # peer 2 stays silent
        await trio.sleep(0.05 + ROUND_TIMER_TICK_S + 0.001)
        assert [t for t, _ in node.sent] == [1, 2, 3] and node.rounds_hedged == 1
        assert node.slow == [2]
        node.sent[2][1].add(3, _reply(1))
        await trio.sleep(0.001)
        assert seen == [{1: _reply(1), 3: _reply(1)}]
        assert math.isfinite(node.round_time_s)

    _run(test)


def test_a_delayed_round_waits_its_delay() -> None:
    def backoff() -> Generator[Round, Replies, Outcome]:
        message = Read("t", b"k", -1)
        yield Round({1: message}, quorum=1, delay_s=0.2)
        return Outcome(Status.OK, version=7)

    async def test(node: FakeNode) -> None:
        calls, done = _recorder()
        Drive(node, backoff(), Deadline(4.0), done).start()  # type: ignore[arg-type]
        assert node.sent == []
        await trio.sleep(0.19)
        assert node.sent == []
        await trio.sleep(0.01 + ROUND_TIMER_TICK_S + 0.001)
        assert [t for t, _ in node.sent] == [1]
        node.sent[0][1].add(1, _reply(7))
        await trio.sleep(0.001)
        assert calls == [(Outcome(Status.OK, version=7), None)]

    _run(test)


# --------------------------------------------------------------- queued writes


class FakeWriteNode(FakeNode):
    """The node's `Writes` on a FakeNode's rounds: a key's write queue and
    the group bookkeeping are the real ones; a write asks replica 1 in rounds
    until it answers, then takes the next versions of the key."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0
        self.values: list[bytes | None] = []
        self.writes = FakeWrites(self)
        self.write_queues: KeyWriteQueues = self.writes.queues


class FakeWrites(Writes):
    def __init__(self, node: FakeWriteNode) -> None:
        super().__init__(
            node,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            _NoCache(),  # type: ignore[arg-type]
            ManualClock(),
            lambda table, partition_key: [1],
            lambda table, key, replicas: -1,
        )
        self.node = node

    def operation(
        self, table: str, key: bytes, replicas: list[int], mutation: Mutation, now_ms: int
    ) -> Operation:
        node = self.node
        while not (yield Round({1: Read(table, key, -1)}, quorum=1)):
            pass  # no answer in the round's time: ask again (until the deadline)
        node.version += mutation.versions
        node.values.append(mutation.value)
        return Outcome(Status.OK, version=node.version)


class _NoCache:
    def put(self, *args: object) -> None:
        pass


class _Put:
    """A client put of key b"k": started with `start`, answered through `respond`
    with the version as a put's reply carries it."""

    def __init__(self, value: bytes, *, if_version: int | None = None) -> None:
        self.mutation = Mutation(value, None, if_version=if_version)

    def start(self, node: FakeWriteNode, deadline: Deadline, respond: Any) -> None:
        def done(outcome: Outcome | None, error: KvsvrError | None) -> None:
            respond(None if outcome is None else {"version": outcome.version}, error)

        node.writes.start("t", encode_key(b"k"), [1], self.mutation, 0, deadline, done)


def _put(value: bytes, *, if_version: int | None = None) -> _Put:
    return _Put(value, if_version=if_version)


def _answers() -> tuple[list[tuple[object, KvsvrError | None]], Any]:
    answers: list[tuple[object, KvsvrError | None]] = []

    def respond(body: object, error: KvsvrError | None) -> None:
        answers.append((body, error))

    return answers, respond


def _answer_round(node: FakeWriteNode, index: int) -> None:
    node.sent[index][1].add(1, _reply(0))


def test_writes_queued_behind_one_key_lead_in_turn_and_blind_ones_fold() -> None:
    async def test(node: FakeWriteNode) -> None:
        a, respond_a = _answers()
        b, respond_b = _answers()
        c, respond_c = _answers()
        d, respond_d = _answers()
        _put(b"a").start(node, Deadline(4.0), respond_a)
        # Queued behind it: two blind puts, then a conditional one (never folded).
        _put(b"b").start(node, Deadline(4.0), respond_b)
        _put(b"c").start(node, Deadline(4.0), respond_c)
        cas = _put(b"d", if_version=3)
        cas.start(node, Deadline(4.0), respond_d)
        assert len(node.sent) == 1  # one write at a time per key
        _answer_round(node, 0)
        await trio.sleep(0.001)
        assert a == [({"version": 1}, None)]
        assert len(node.sent) == 2  # b leads a group of b and c
        _answer_round(node, 1)
        await trio.sleep(0.001)
        assert b == [({"version": 2}, None)] and c == [({"version": 3}, None)]
        assert node.values == [b"a", b"c"]  # the group wrote its last value once
        assert len(node.sent) == 3 and d == []
        _answer_round(node, 2)
        await trio.sleep(0.001)
        assert d == [({"version": 4}, None)]
        assert len(node.write_queues) == 0  # the key is idle again

    _run(test, FakeWriteNode)


def test_a_queued_write_past_its_deadline_answers_timeout_and_is_skipped() -> None:
    async def test(node: FakeWriteNode) -> None:
        a, respond_a = _answers()
        b, respond_b = _answers()
        c, respond_c = _answers()
        _put(b"a").start(node, Deadline(4.0), respond_a)
        cas = _put(b"b", if_version=1)  # not folded with c: leads alone
        cas.start(node, Deadline(0.5), respond_b)
        _put(b"c").start(node, Deadline(4.0), respond_c)
        await trio.sleep(0.5 + ROUND_TIMER_TICK_S + 0.001)
        (answer,) = b
        assert answer[0] is None and isinstance(answer[1], Timeout)
        _answer_round(node, 0)
        await trio.sleep(0.001)
        assert a == [({"version": 1}, None)]
        # b was skipped: c leads, and b's value is never written.
        assert len(node.sent) == 2
        _answer_round(node, 1)
        await trio.sleep(0.001)
        assert c == [({"version": 2}, None)] and node.values == [b"a", b"c"]
        assert len(b) == 1 and len(node.write_queues) == 0

    _run(test, FakeWriteNode)


def test_a_leader_that_fails_fails_its_members_and_hands_the_key_over() -> None:
    async def test(node: FakeWriteNode) -> None:
        a, respond_a = _answers()
        b, respond_b = _answers()
        c, respond_c = _answers()
        d, respond_d = _answers()
        _put(b"a").start(node, Deadline(4.0), respond_a)
        _put(b"b").start(node, Deadline(1.5), respond_b)
        _put(b"c").start(node, Deadline(4.0), respond_c)
        _answer_round(node, 0)
        await trio.sleep(0.001)
        assert a == [({"version": 1}, None)]
        # b leads {b, c}; nobody answers its round: it ends at b's deadline.
        await trio.sleep(1.5 + ROUND_TIMER_TICK_S + 0.01)
        (answer_b,) = b
        assert answer_b[0] is None and isinstance(answer_b[1], Timeout)
        (answer_c,) = c
        assert answer_c[0] is None and isinstance(answer_c[1], Timeout)
        assert "outcome unknown" in str(answer_c[1])
        assert len(node.write_queues) == 0
        # The key takes writes again.
        _put(b"d").start(node, Deadline(4.0), respond_d)
        _answer_round(node, len(node.sent) - 1)
        await trio.sleep(0.001)
        assert d == [({"version": 2}, None)]

    _run(test, FakeWriteNode)


# --------------------------------------------------------------- shared strong reads


def _one_round_read(version: int) -> Generator[Round, Replies, Outcome]:
    replies = yield _read_round()
    return Outcome(Status.OK, version=version) if replies else Outcome(Status.UNAVAILABLE)


def test_reads_of_a_busy_key_share_the_next_round_and_each_ends_once() -> None:
    async def test(node: FakeNode) -> None:
        reads = StrongReads(node)  # type: ignore[arg-type]
        slot = ("t", b"k")
        first, done_first = _recorder()
        second, done_second = _recorder()
        third, done_third = _recorder()
        late, done_late = _recorder()
        reads.start(slot, lambda: _one_round_read(1), Deadline(4.0), done_first)
        # The key's round runs: these wait for the next one, which starts when it ends.
        reads.start(slot, lambda: _one_round_read(2), Deadline(4.0), done_second)
        reads.start(slot, lambda: _one_round_read(3), Deadline(4.0), done_third)
        reads.start(slot, lambda: _one_round_read(4), Deadline(0.5), done_late)
        assert len(node.sent) == 3  # one round so far
        await trio.sleep(0.5 + ROUND_TIMER_TICK_S + 0.001)
        (answer,) = late
        assert answer[0] is None and isinstance(answer[1], Timeout)
        node.sent[0][1].add(1, _reply(1))
        node.sent[1][1].add(2, _reply(1))
        await trio.sleep(0.001)
        assert first == [(Outcome(Status.OK, version=1), None)]
        assert len(node.sent) == 6 and second == third == []  # the next round, shared
        node.sent[3][1].add(1, _reply(2))
        node.sent[4][1].add(2, _reply(2))
        await trio.sleep(0.001)
        # The first waiter's operation ran for all of them.
        assert second == third == [(Outcome(Status.OK, version=2), None)]
        assert len(late) == 1 and reads.shared.reads_shared == 3
        assert slot not in reads.shared.running  # idle again

    _run(test)


def test_readers_of_a_shared_round_that_fails_hear_unavailable() -> None:
    async def test(node: FakeNode) -> None:
        reads = StrongReads(node)  # type: ignore[arg-type]
        slot = ("t", b"k")
        first, done_first = _recorder()
        waiting, done_waiting = _recorder()
        reads.start(slot, lambda: _one_round_read(1), Deadline(4.0), done_first)
        reads.start(slot, _broken_read, Deadline(4.0), done_waiting)
        node.sent[0][1].add(1, _reply(1))
        node.sent[1][1].add(2, _reply(1))
        await trio.sleep(0.001)
        node.sent[3][1].add(1, _reply(1))
        node.sent[4][1].add(2, _reply(1))
        await trio.sleep(0.001)
        assert first == [(Outcome(Status.OK, version=1), None)]
        (answer,) = waiting
        assert answer[0] is None and isinstance(answer[1], Unavailable)
        assert "did not finish" in str(answer[1])

    _run(test)


def _broken_read() -> Generator[Round, Replies, Outcome]:
    yield _read_round()
    raise ValueError("a bug")
