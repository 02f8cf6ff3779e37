"""Operations driven without a task (`kvsvr.node.server._TaskFreeDrive`): the
next step after a round runs once the round's collector settles or its time
is up, never inside the callback that ended the wait; `done` is called
exactly once, with the outcome, with `Timeout` past the operation's
deadline, or with an internal error when a step raised.

A fake node stands in for `Node`: it records the requests a round sends, so
a test answers them (or not) itself."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from kvsvr.errors import KvsvrError, Timeout
from kvsvr.node.server import (
    ROUND_TIMEOUT_S,
    ROUND_TIMER_TICK_S,
    _Deadline,
    _RoundCollector,
    _RoundTimer,
    _Soon,
    _TaskFreeDrive,
)
from kvsvr.protocol.coordinator import Outcome, Replies, Round
from kvsvr.protocol.messages import Read, ReadReply

ME = 1


class FakeNode:
    """What `_TaskFreeDrive` uses of a node. Peers 2 and 3 are asked only
    after the hedge delay when `thrifty`; the local replica (1) never answers
    by itself."""

    def __init__(self) -> None:
        self.soon = _Soon()
        self.round_timer = _RoundTimer()
        self.round_time_s = 0.01
        self.rounds_thrifty = 0
        self.rounds_hedged = 0
        self.sent: list[tuple[int, _RoundCollector]] = []
        self.oneway: list[int] = []
        self.thrifty = False
        self.slow: list[int] = []

    def send_oneway(self, target: int, message: object) -> None:
        self.oneway.append(target)

    def _thrifty_split(self, current: Round) -> tuple[list[int], list[int]]:
        targets = list(current.requests)
        if not self.thrifty:
            return targets, []
        return targets[: current.quorum], targets[current.quorum :]

    def _hedge_s(self) -> float:
        return 0.05

    def _mark_slow(self, asked: list[int], collector: _RoundCollector) -> None:
        self.slow.extend(t for t in asked if t not in collector.replies)

    def _send_for_round(self, target: int, message: object, collector: _RoundCollector) -> None:
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
    return Outcome("ok", version=len(seen))


def _run(test: Any) -> None:
    async def main() -> None:
        node = FakeNode()
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
        _TaskFreeDrive(node, _two_rounds(seen), _Deadline(4.0), done).start()  # type: ignore[arg-type]
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
        assert calls == [(Outcome("ok", version=2), None)]

    _run(test)


def test_a_round_nobody_answers_ends_by_its_own_timeout_then_the_next_round_runs() -> None:
    async def test(node: FakeNode) -> None:
        seen: list[Replies] = []
        calls, done = _recorder()
        start = trio.current_time()
        _TaskFreeDrive(node, _two_rounds(seen), _Deadline(10.0), done).start()  # type: ignore[arg-type]
        await trio.sleep(ROUND_TIMEOUT_S - 0.01)
        assert seen == []
        await trio.sleep(0.01 + ROUND_TIMER_TICK_S + 0.001)
        assert seen == [{}]  # no quorum: the operation sees what arrived (nothing)
        assert len(node.sent) == 6
        node.sent[3][1].add(1, _reply(1))
        node.sent[4][1].add(2, _reply(1))
        await trio.sleep(0.001)
        assert calls == [(Outcome("ok", version=2), None)]
        assert trio.current_time() - start < ROUND_TIMEOUT_S + 0.1

    _run(test)


def test_past_its_deadline_an_operation_ends_once_with_timeout() -> None:
    async def test(node: FakeNode) -> None:
        calls, done = _recorder()
        start = trio.current_time()
        drive = _TaskFreeDrive(node, _two_rounds([]), _Deadline(0.3), done)  # type: ignore[arg-type]
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
        _TaskFreeDrive(node, broken(), _Deadline(4.0), done).start()  # type: ignore[arg-type]
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
        _TaskFreeDrive(node, _two_rounds(seen), _Deadline(4.0), done).start()  # type: ignore[arg-type]
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
        return Outcome("ok", version=7)

    async def test(node: FakeNode) -> None:
        calls, done = _recorder()
        _TaskFreeDrive(node, backoff(), _Deadline(4.0), done).start()  # type: ignore[arg-type]
        assert node.sent == []
        await trio.sleep(0.19)
        assert node.sent == []
        await trio.sleep(0.01 + ROUND_TIMER_TICK_S + 0.001)
        assert [t for t, _ in node.sent] == [1]
        node.sent[0][1].add(1, _reply(7))
        await trio.sleep(0.001)
        assert calls == [(Outcome("ok", version=7), None)]

    _run(test)
