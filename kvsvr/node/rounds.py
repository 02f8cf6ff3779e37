"""Quorum rounds: peer links, the round collector and the waits that end it.

A round sends one request per replica (our own replica answers through a
durability callback, a peer through a reply callback on its connection) and
gathers the replies in a `RoundCollector` until a quorum answered, or cannot.
No task waits for a round: the `RoundTimer` ends the waits whose time is up,
and `Soon` runs the next step of the operation that waited, so one task of
each serves every round of the node (see `kvsvr.node.engine`).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from kvsvr.config import NodeConfig
from kvsvr.errors import FrameError, KvsvrError, Timeout, Unavailable
from kvsvr.net import RpcConnection, connect
from kvsvr.protocol.coordinator import Replies, Round, is_positive
from kvsvr.protocol.messages import (
    Accept,
    AcceptReply,
    Prepare,
    Promise,
    Read,
    ReadReply,
    Reply,
    Request,
    ScanReply,
    ScanRequest,
    from_wire,
    to_wire,
)
from kvsvr.protocol.read_lease import Holds

log = logging.getLogger("kvsvr.node")


# A round waits this long for a quorum before the operation decides what to do
# (retry with a new ballot, or give up). Long enough for a loaded 2-core
# machine's fsync, short enough that a dead replica costs little.
ROUND_TIMEOUT_S = 1.0
# A round asks a majority first (see `Rounds.thrifty_split`) and the other
# replicas only if that majority has not made a quorum after a hedge delay:
# HEDGE_ROUNDS_FACTOR times the recent round time (a moving average, weight
# ROUND_TIME_WEIGHT per round), so that a loaded node does not hedge every
# round, within [ROUND_HEDGE_MIN_S, ROUND_HEDGE_MAX_S], well below
# ROUND_TIMEOUT_S. A peer that made a round wait that long is asked along with
# everyone for PEER_SLOW_S, so a paused or overloaded peer costs the delay once.
ROUND_HEDGE_MIN_S = 0.02
ROUND_HEDGE_MAX_S = 0.25
HEDGE_ROUNDS_FACTOR = 4.0
ROUND_TIME_WEIGHT = 0.05
PEER_SLOW_S = 1.0
# Round waits end by one shared timer (see `RoundTimer`), which wakes at
# most this often: a wait may end this much late (hedges are >= 20 ms).
ROUND_TIMER_TICK_S = 0.005
# Connecting to a peer: give up after this, and do not try again for a while,
# so that rounds do not keep paying for a dead peer.
PEER_CONNECT_TIMEOUT_S = 0.5
PEER_RETRY_AFTER_S = 0.25

PAXOS_METHOD = "px"
PAXOS_ONEWAY_METHOD = "px1"
# How a replica request handled without a task answers: (reply, None) or (None, error).
ReplicaAnswer = Callable[[Reply | None, KvsvrError | None], None]

_REPLY_TYPES: dict[type, type] = {
    Prepare: Promise,
    Accept: AcceptReply,
    Read: ReadReply,
    ScanRequest: ScanReply,
}


def reply_of(message: Request, raw: object) -> Reply:
    """A peer's raw answer to `message`, decoded; FrameError when it is not
    the reply that kind of request takes."""
    expected = _REPLY_TYPES[type(message)]
    reply = from_wire(raw)
    if not isinstance(reply, expected) or not isinstance(
        reply, Promise | AcceptReply | ReadReply | ScanReply
    ):
        raise FrameError(f"expected {expected.__name__}, got {type(reply).__name__}")
    return reply


class Deadline:
    """When a client operation must have finished (trio time). Passed down to
    the waits of the operation instead of a cancel scope around all of it:
    entering a scope with a deadline costs about 8 us on this machine, and
    every round ends by a deadline of its own anyway (see `Drive`)."""

    __slots__ = ("at", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = trio.current_time() + timeout_s

    def passed(self) -> bool:
        return trio.current_time() >= self.at

    def error(self) -> Timeout:
        return Timeout(f"operation did not finish in {self.timeout_s:g} s; outcome unknown")


class PeerLink:
    """One multiplexed connection to a peer node, reconnected on demand."""

    def __init__(
        self, peer: NodeConfig, host: str, port: int, secret: bytes | None, nursery: trio.Nursery
    ) -> None:
        self.peer = peer
        self.host = host
        self.port = port
        self.secret = secret
        self.nursery = nursery
        self.connection: RpcConnection | None = None
        self.down_until = 0.0
        self.connecting = trio.Lock()
        self.oneway_dropped = 0
        self.slow_until = 0.0  # trio time; see Rounds.mark_slow

    @property
    def up(self) -> bool:
        return self.connection is not None and not self.connection.closed

    async def get(self) -> RpcConnection:
        connection = self.connection
        if connection is not None and not connection.closed:
            return connection
        async with self.connecting:
            connection = self.connection
            if connection is not None and not connection.closed:
                return connection
            if trio.current_time() < self.down_until:
                raise Unavailable(f"peer {self.peer.id} is down")
            try:
                connection = await connect(
                    self.host,
                    self.port,
                    secret=self.secret,
                    connect_timeout_s=PEER_CONNECT_TIMEOUT_S,
                )
            except KvsvrError:
                self.down_until = trio.current_time() + PEER_RETRY_AFTER_S
                raise
            await self.nursery.start(connection.run)
            self.connection = connection
            return connection

    async def request(self, body: list[Any]) -> Any:
        return await self.call(PAXOS_METHOD, body)

    async def call(self, method: str, body: object) -> Any:
        connection = await self.get()
        return await connection.request(method, body)

    def send_oneway(self, body: list[Any]) -> None:
        connection = self.connection
        if connection is not None and not connection.closed:
            connection.send_oneway(PAXOS_ONEWAY_METHOD, body)
        elif not self.connecting.locked() and trio.current_time() >= self.down_until:
            self.nursery.start_soon(self._connect_and_send, body)
        else:
            self.oneway_dropped += 1

    async def _connect_and_send(self, body: list[Any]) -> None:
        try:
            connection = await self.get()
        except KvsvrError:
            self.oneway_dropped += 1
            return
        connection.send_oneway(PAXOS_ONEWAY_METHOD, body)


class Wait:
    """One task (or one task-free operation's next step, `then`) waiting for
    its round to settle or its time to be up; whoever comes first (the
    collector, the timer, a cancellation) ends it, once."""

    __slots__ = ("task", "then")

    def __init__(
        self, task: trio.lowlevel.Task | None, then: Callable[[], None] | None = None
    ) -> None:
        self.task = task
        self.then = then  # called instead of rescheduling a task; must not raise

    def end(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)
            return
        then = self.then
        if then is not None:
            self.then = None
            then()


class Soon:
    """Runs the next steps of task-free operations, in order, in one task.

    A step is never run from inside the callback that made it due (a reply
    callback in a connection's receive loop, a durability callback in the
    storage's commit hand-over, the round timer's sweep): those are in the
    middle of their own work, and a step sends messages, stages rows and
    answers clients. It is queued here instead, and this task runs the queue
    at its next turn: one task switch per batch of steps rather than one
    task per operation."""

    # Steps run per turn before the task yields to the others.
    STEPS_PER_TURN = 256

    def __init__(self) -> None:
        self._ready: deque[Callable[[], None]] = deque()
        self._parked: trio.lowlevel.Task | None = None
        self.running = False

    def call(self, step: Callable[[], None]) -> None:
        self._ready.append(step)
        parked = self._parked
        if parked is not None:
            self._parked = None
            trio.lowlevel.reschedule(parked)

    async def run(self) -> None:
        ready = self._ready

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        self.running = True
        try:
            while True:
                if not ready:
                    self._parked = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                for _ in range(min(len(ready), self.STEPS_PER_TURN)):
                    step = ready.popleft()
                    try:
                        step()
                    except Exception:  # a step guards itself; this is the last net
                        log.exception("a task-free operation's step failed")
                await trio.lowlevel.checkpoint()
        finally:
            self.running = False
            self._parked = None


class RoundTimer:
    """Ends the round waits whose time is up: one task for every round of the
    node, instead of a cancel scope per wait: entering and leaving a scope
    with a deadline (trio registers each one) costs ~7% of a node's samples
    on puts and ~10% on gets (py-spy).

    Waits are kept in buckets of one ROUND_TIMER_TICK_S each (a timing
    wheel): adding one is a dict lookup and an append, and only a new
    bucket's tick goes into a heap (at most one per tick, instead of a heap
    push per round). A wait ends at the end of its bucket: up to one tick
    late, never early. Ended waits stay in their bucket until its time (a
    `Wait` is tiny: it holds no replies), and the task wakes at most once
    per tick."""

    def __init__(self) -> None:
        self._buckets: dict[int, list[Wait]] = {}
        self._ticks: list[int] = []  # heap of the buckets' ticks
        self._idle = trio.lowlevel.ParkingLot()
        self._sleep: trio.CancelScope | None = None
        self._woke_at = -math.inf
        self.running = False

    def add(self, deadline: float, wait: Wait) -> None:
        assert math.isfinite(deadline), "a round wait has a deadline"
        # The first tick strictly after `deadline`: rounding never ends it early.
        tick = int(deadline / ROUND_TIMER_TICK_S) + 1
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.append(wait)
            return
        self._buckets[tick] = [wait]
        heapq.heappush(self._ticks, tick)
        sleep = self._sleep
        if sleep is None:
            self._idle.unpark_all()
        else:
            wake_at = max(tick * ROUND_TIMER_TICK_S, self._woke_at + ROUND_TIMER_TICK_S)
            if wake_at < sleep.deadline:
                sleep.deadline = wake_at

    async def run(self) -> None:
        self.running = True
        ticks = self._ticks
        buckets = self._buckets
        try:
            while True:
                if not ticks:
                    await self._idle.park()
                    continue
                wake_at = max(ticks[0] * ROUND_TIMER_TICK_S, self._woke_at + ROUND_TIMER_TICK_S)
                with trio.CancelScope(deadline=wake_at) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
                now = self._woke_at = trio.current_time()
                while ticks and ticks[0] * ROUND_TIMER_TICK_S <= now:
                    for wait in buckets.pop(heapq.heappop(ticks)):
                        wait.end()
        finally:
            self.running = False
            self._sleep = None


class RoundCollector:
    """The replies of one quorum round, gathered by callbacks; `settled` is set
    once `quorum` are positive, or enough refused that the quorum is out of
    reach among the requests sent so far (`expect`), or every one sent
    answered or failed. Closed when the round ends: later replies are dropped
    and requests still out are forgotten. Whoever waits for it to settle
    hangs a `Wait` on `wait` (see `kvsvr.node.engine.Drive`)."""

    __slots__ = (
        "finished",
        "negative",
        "open",
        "outstanding",
        "positive",
        "quorum",
        "replies",
        "settled",
        "total",
        "wait",
    )

    def __init__(self, quorum: int) -> None:
        self.quorum = quorum
        self.total = 0
        self.replies: Replies = {}
        self.positive = 0
        self.negative = 0
        self.finished = 0
        self.open = True
        self.settled = False
        self.wait: Wait | None = None
        self.outstanding: list[tuple[RpcConnection, int]] = []

    @property
    def has_quorum(self) -> bool:
        return self.positive >= self.quorum

    def expect(self, count: int) -> None:
        """`count` more requests are about to be sent (call before sending)."""
        self.total += count
        self.settled = False

    def add(self, target: int, reply: Reply) -> None:
        if not self.open:
            return
        self.replies[target] = reply
        if is_positive(reply):
            self.positive += 1
        else:
            self.negative += 1
        self._finish_one()

    def no_answer(self, target: int) -> None:
        if self.open:
            self._finish_one()

    def _finish_one(self) -> None:
        self.finished += 1
        if (
            self.positive >= self.quorum
            or self.negative > self.total - self.quorum
            or self.finished == self.total
        ):
            self.settled = True
            if self.wait is not None:
                self.wait.end()

    def local_answer(self, target: int, reply: Reply | None, error: KvsvrError | None) -> None:
        if reply is not None:
            self.add(target, reply)
        else:
            log.debug("local replica did not answer: %s", error)
            self.no_answer(target)

    def remote_answer(
        self, target: int, message: Request, raw: object, error: KvsvrError | None
    ) -> None:
        if error is None:
            try:
                reply = reply_of(message, raw)
            except FrameError as bad:
                error = bad
            else:
                self.add(target, reply)
                return
        log.debug("replica %d did not answer: %s", target, error)
        self.no_answer(target)

    def close(self) -> None:
        self.open = False
        for connection, request_id in self.outstanding:
            connection.forget(request_id)
        self.outstanding.clear()


class Rounds:
    """Sends the rounds of this node's operations: which replicas to ask
    first, the hedge to the others, and each request's way to its replica
    (our own through `replica_nowait`, a peer through its `PeerLink`)."""

    def __init__(
        self,
        me: int,
        replica_nowait: Callable[[Request, ReplicaAnswer], None],
        replica_oneway: Callable[[Request], None],
    ) -> None:
        self.me = me
        self.replica_nowait = replica_nowait
        self.replica_oneway = replica_oneway
        self.peers: dict[int, PeerLink] = {}
        self.nursery: trio.Nursery | None = None
        self.round_timer = RoundTimer()
        self.soon = Soon()
        self.rounds_thrifty = 0  # rounds that asked a majority first
        self.rounds_hedged = 0  # ... and then had to ask the others too
        self.round_time_s = ROUND_HEDGE_MIN_S  # moving average of thrifty rounds
        # The read leases this coordinator holds (None: leases are off): every
        # Accept round it sends ends its lease on the key (`Drive`).
        self.holds: Holds | None = None

    def link(self, nursery: trio.Nursery, peers: dict[int, PeerLink]) -> None:
        """Start the runners in `nursery` and reach the peers through `peers`."""
        self.nursery = nursery
        nursery.start_soon(self.round_timer.run)
        nursery.start_soon(self.soon.run)
        self.peers.update(peers)

    @property
    def running(self) -> bool:
        return self.soon.running and self.round_timer.running

    def send_oneway(self, target: int, message: Request) -> None:
        if target == self.me:
            try:
                self.replica_oneway(message)
            except KvsvrError as error:
                log.warning("local one-way message refused: %s", error)
            return
        self.peers[target].send_oneway(to_wire(message))

    def thrifty_split(self, current: Round) -> tuple[list[int], list[int]]:
        """The replicas to ask first, and the ones asked only if those do not
        make a quorum (a refusal, a failure, or no quorum in the hedge time).

        A quorum needs any majority's answers, never a particular one, so a
        round asks just a majority: our own replica (free: no message) and the
        first connected, not recently slow peers in replica order (so the same
        peer answers a key's rounds and its rows stay current; the others
        learn every chosen value from the commits, which carry it to replicas
        that did not accept). That spares the other replicas a request, an
        fsync'd row change and a reply per operation. With too few healthy
        peers known, everyone is asked at once."""
        targets = list(current.requests)
        if len(targets) <= current.quorum:
            return targets, []
        now = trio.current_time()
        first = [self.me] if self.me in current.requests else []
        for target in targets:
            if len(first) >= current.quorum:
                break
            if target == self.me:
                continue
            link = self.peers[target]
            if link.up and link.slow_until <= now:
                first.append(target)
        if len(first) < current.quorum:
            return targets, []
        return first, [target for target in targets if target not in first]

    def hedge_s(self) -> float:
        return min(
            ROUND_HEDGE_MAX_S, max(ROUND_HEDGE_MIN_S, HEDGE_ROUNDS_FACTOR * self.round_time_s)
        )

    def mark_slow(self, asked: list[int], collector: RoundCollector) -> None:
        """Peers asked first that have not answered when the round had to ask
        the others: ask everyone in rounds for a while rather than pay the
        hedge delay per operation (a paused or overloaded peer)."""
        until = trio.current_time() + PEER_SLOW_S
        for target in asked:
            if target != self.me and target not in collector.replies:
                self.peers[target].slow_until = until

    def send_for_round(self, target: int, message: Request, collector: RoundCollector) -> None:
        """Send one request of a round; its reply (or failure) goes to
        `collector`, without a task: the local replica answers through a
        durability callback, a connected peer through a reply callback."""
        if target == self.me:
            self.replica_nowait(message, partial(collector.local_answer, target))
            return
        connection = self.peers[target].connection
        request_id = None
        if connection is not None and not connection.closed:
            request_id = connection.request_nowait(
                PAXOS_METHOD,
                to_wire(message),
                partial(collector.remote_answer, target, message),
            )
        if request_id is not None:
            assert connection is not None
            collector.outstanding.append((connection, request_id))
            return
        # Not connected yet (or its queue is full): connect in a task of the
        # node's nursery, bounded by the round's timeout.
        assert self.nursery is not None
        self.nursery.start_soon(self._ask_peer, target, message, collector)

    async def _ask_peer(self, target: int, message: Request, collector: RoundCollector) -> None:
        # A task of the node's nursery: nothing may escape it but cancellation.
        with trio.move_on_after(ROUND_TIMEOUT_S):
            try:
                raw = await self.peers[target].request(to_wire(message))
                collector.add(target, reply_of(message, raw))
                return
            except KvsvrError as error:
                log.debug("replica %d did not answer: %s", target, error)
            except Exception:
                log.exception("asking replica %d failed", target)
        collector.no_answer(target)
