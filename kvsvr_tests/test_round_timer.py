"""The shared timer that ends a node's round waits (`kvsvr.node.rounds`):
a wait ends when its round settles or when its time is up, whichever comes
first, exactly once; a cancelled wait leaves nothing behind; waits added
earlier than the one the timer sleeps towards are not overslept."""

from __future__ import annotations

import trio
import trio.testing

from kvsvr.node.rounds import ROUND_TIMER_TICK_S, RoundCollector, RoundTimer, Wait


async def _wait_until_ended(timer: RoundTimer, deadline: float, ended: list[float]) -> None:
    wait = Wait(trio.lowlevel.current_task())
    timer.add(deadline, wait)

    def abort(_: object) -> trio.lowlevel.Abort:
        wait.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)
    ended.append(trio.current_time())


def test_waits_end_at_their_time_within_a_tick_even_when_added_out_of_order() -> None:
    async def main() -> None:
        timer = RoundTimer()
        ended: dict[str, list[float]] = {"late": [], "early": [], "later": []}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer.run)
            await trio.sleep(0.01)
            start = trio.current_time()
            nursery.start_soon(_wait_until_ended, timer, start + 1.0, ended["late"])
            await trio.sleep(0.001)
            # Earlier than what the timer sleeps towards: it must wake sooner.
            nursery.start_soon(_wait_until_ended, timer, start + 0.05, ended["early"])
            nursery.start_soon(_wait_until_ended, timer, start + 0.5, ended["later"])
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
        for name, at in (("early", 0.05), ("later", 0.5), ("late", 1.0)):
            (when,) = ended[name]
            assert start + at <= when <= start + at + ROUND_TIMER_TICK_S + 1e-9, name
        assert not timer.running

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_settled_round_ends_its_wait_once_and_the_timer_then_does_nothing() -> None:
    async def main() -> None:
        timer = RoundTimer()
        collector = RoundCollector(quorum=1)
        collector.expect(1)
        woke: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer.run)

            async def waiter() -> None:
                wait = Wait(trio.lowlevel.current_task())
                collector.wait = wait
                timer.add(trio.current_time() + 0.1, wait)
                await trio.lowlevel.wait_task_rescheduled(
                    lambda _: trio.lowlevel.Abort.FAILED  # never cancelled here
                )
                woke.append(trio.current_time())

            start = trio.current_time()
            nursery.start_soon(waiter)
            await trio.sleep(0.01)
            collector.no_answer(1)  # settles: every request sent has finished
            assert collector.settled
            await trio.sleep(0.5)  # past the wait's time: the timer must not wake it again
            nursery.cancel_scope.cancel()
        assert woke == [start + 0.01]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_cancelled_wait_is_not_woken_by_the_timer() -> None:
    async def main() -> None:
        timer = RoundTimer()
        ended: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer.run)
            with trio.move_on_after(0.01):
                await _wait_until_ended(timer, trio.current_time() + 0.05, ended)
            await trio.sleep(0.1)  # the timer pops the dead entry without error
            nursery.cancel_scope.cancel()
        assert ended == []

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
