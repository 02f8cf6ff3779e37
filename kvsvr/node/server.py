"""The node process: the protocol core wired to LMDB and TCP.

A node is at once a replica (it answers Paxos messages about the keys it
holds, making every promise and accept durable through the group-commit
writer before it answers) and a coordinator (it runs client operations as the
protocol's generators, fanning each round out to the key's replicas and
collecting until a quorum answered, then cancelling the rest).
"""

from __future__ import annotations

import gc
import heapq
import logging
import math
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import trio

from kvsvr import _build
from kvsvr.clock import SYSTEM_CLOCK
from kvsvr.config import ClusterConfig, ConfigError, NodeConfig, load_config, new_cluster_id
from kvsvr.errors import (
    Conflict,
    CorruptRow,
    FrameError,
    InvalidRequest,
    KvsvrError,
    Timeout,
    Unavailable,
)
from kvsvr.keys import decode_key, partition_prefix
from kvsvr.net import RpcConnection, connect, serve
from kvsvr.node import replication
from kvsvr.node.cache import RowCache
from kvsvr.node.read_share import SharedRead, SharedReads
from kvsvr.node.replication import Collaborators, Replication
from kvsvr.node.write_queue import (
    KeyWriteQueues,
    Operation,
    QueuedWrite,
    Slot,
    answer_group,
    fail_group,
    folded_mutation,
)
from kvsvr.protocol import lifecycle, replica
from kvsvr.protocol.coordinator import (
    Coordinator,
    Mutation,
    Outcome,
    Replies,
    Round,
    is_positive,
)
from kvsvr.protocol.eventual import NODE_INDEX_MAX, HybridClock, eventual_row
from kvsvr.protocol.messages import (
    Accept,
    AcceptReply,
    Commit,
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
from kvsvr.protocol.placement import partition_of
from kvsvr.protocol.state import EMPTY_ROW, Row
from kvsvr.storage import Storage, decode_row, encode_row
from kvsvr.storage.engine import CommitTicket, prefix_end
from kvsvr.storage.residency import ResidencyGuard

log = logging.getLogger("kvsvr.node")

# A round waits this long for a quorum before the operation decides what to do
# (retry with a new ballot, or give up). Long enough for a loaded 2-core
# machine's fsync, short enough that a dead replica costs little.
ROUND_TIMEOUT_S = 1.0
# A client operation that has not finished in this time answers Timeout
# (outcome unknown). Below the client's default of 5 s so the client hears why.
OPERATION_TIMEOUT_S = 4.0
OPERATION_TIMEOUT_MAX_S = 60.0
# A round asks a majority first (see `Node._thrifty_split`) and the other
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
# Round waits end by one shared timer (see `_RoundTimer`), which wakes at
# most this often: a wait may end this much late (hedges are >= 20 ms).
ROUND_TIMER_TICK_S = 0.005
# Connecting to a peer: give up after this, and do not try again for a while,
# so that rounds do not keep paying for a dead peer.
PEER_CONNECT_TIMEOUT_S = 0.5
PEER_RETRY_AFTER_S = 0.25
# Largest value a client may store; frames are bounded at 16 MiB.
VALUE_BYTES_MAX = 1 << 20
SCAN_LIMIT_MAX = 10_000

# A replica that finds a corrupt row rebuilds it from its peers in the
# background. Bounded so a badly damaged file cannot flood the node; a failed
# rebuild is retried on a later touch of the key, not sooner than this.
REPAIRS_IN_FLIGHT_MAX = 64
REPAIR_TIMEOUT_S = 2.0
REPAIR_RETRY_AFTER_S = 1.0
REPAIR_FAILURES_REMEMBERED_MAX = 10_000

PAXOS_METHOD = "px"
# How a replica request handled without a task answers: (reply, None) or (None, error).
ReplicaAnswer = Callable[[Reply | None, KvsvrError | None], None]
ROW_METHOD = "row"
PAXOS_ONEWAY_METHOD = "px1"

_REPLY_TYPES: dict[type, type] = {
    Prepare: Promise,
    Accept: AcceptReply,
    Read: ReadReply,
    ScanRequest: ScanReply,
}


def now_ms() -> int:
    return int(time.time() * 1000)


class _Deadline:
    """When a client operation must have finished (trio time). Passed down to
    the waits of the operation instead of a cancel scope around all of it:
    entering a scope with a deadline costs about 8 us on this machine, and
    every round ends by a deadline of its own anyway (see `quorum_round`)."""

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
        self.slow_until = 0.0  # trio time; see Node._mark_slow

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


class _Wait:
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


class _Soon:
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


class _RoundTimer:
    """Ends the round waits whose time is up: one task for every round of the
    node, instead of a cancel scope per wait. Entering and leaving a scope
    with a deadline (trio registers each one) was ~7% of a node's samples on
    puts and ~10% on gets (py-spy).

    Waits are kept in buckets of one ROUND_TIMER_TICK_S each (a timing
    wheel): adding one is a dict lookup and an append, and only a new
    bucket's tick goes into a heap (at most one per tick, instead of a heap
    push per round). A wait ends at the end of its bucket: up to one tick
    late, never early. Ended waits stay in their bucket until its time (a
    `_Wait` is tiny: it holds no replies), and the task wakes at most once
    per tick."""

    def __init__(self) -> None:
        self._buckets: dict[int, list[_Wait]] = {}
        self._ticks: list[int] = []  # heap of the buckets' ticks
        self._idle = trio.lowlevel.ParkingLot()
        self._sleep: trio.CancelScope | None = None
        self._woke_at = -math.inf
        self.running = False

    def add(self, deadline: float, wait: _Wait) -> None:
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


class _RoundCollector:
    """The replies of one quorum round, gathered by callbacks; `settled` is set
    once `quorum` are positive, or enough refused that the quorum is out of
    reach among the requests sent so far (`expect`), or every one sent
    answered or failed. Closed when the round ends: later replies are dropped
    and requests still out are forgotten. A task waits for it to settle
    through `wait` (see `Node._wait_settled`)."""

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
        self.wait: _Wait | None = None
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
        self, target: int, expected: type, raw: object, error: KvsvrError | None
    ) -> None:
        if error is None:
            try:
                reply = from_wire(raw)
                if not isinstance(reply, expected) or not isinstance(
                    reply, Promise | AcceptReply | ReadReply | ScanReply
                ):
                    raise FrameError(f"expected {expected.__name__}, got {type(reply).__name__}")
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


# Answers a client request handled without a task (the connection's `_respond`).
Respond = Callable[[object, KvsvrError | None], None]


@dataclass(slots=True)
class _PutRequest:
    """A client put, validated."""

    table: str
    key: bytes
    replicas: list[int]
    value: bytes | None
    expires_at_ms: int | None
    now_ms: int
    mutation: Mutation


@dataclass(slots=True)
class _GetRequest:
    """A client get, validated."""

    table: str
    key: bytes
    replicas: list[int]
    consistency: str
    min_version: int
    max_age_s: float | None


# How a task-free operation ends: its outcome, or the error to answer with.
OperationDone = Callable[[Outcome | None, KvsvrError | None], None]


class _TaskFreeDrive:
    """`Node.drive` without a task: runs an operation's rounds from callbacks.

    Each round is sent as `quorum_round` sends it; when its collector settles
    or its time is up, the next step is queued on the node's `_Soon` runner
    (never run inside the callback that ended the wait). `done` is called
    exactly once: with the outcome, with the operation's `Timeout` past its
    deadline, or with an internal error if a step raised. A client request
    then costs no task, no coroutine chain to resume per round and no wake-up
    of its own (`bench.single_node`, `bench.compare`: see DESIGN "Node")."""

    __slots__ = ("deadline", "done", "finished", "node", "operation")

    def __init__(
        self, node: Node, operation: Operation, deadline: _Deadline, done: OperationDone
    ) -> None:
        self.node = node
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
        `_Soon` runner when a wait ends."""
        call = self.node.soon.call
        return lambda: call(lambda: self._guarded(step, *args))

    def _step(self, replies: Replies | None) -> None:
        node = self.node
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
                node.send_oneway(target, message)
            if not current.requests:
                replies = {}
                continue
            if self.deadline.passed():
                self._finish(None, self.deadline.error())
                return
            if current.delay_s > 0:
                wake_at = min(trio.current_time() + current.delay_s, self.deadline.at)
                node.round_timer.add(wake_at, _Wait(None, self._later(self._after_delay, current)))
                return
            self._start_round(current)
            return

    def _after_delay(self, current: Round) -> None:
        if self.deadline.passed():
            self._finish(None, self.deadline.error())
            return
        self._start_round(current)

    def _start_round(self, current: Round) -> None:
        node = self.node
        round_deadline = min(trio.current_time() + ROUND_TIMEOUT_S, self.deadline.at)
        collector = _RoundCollector(current.quorum)
        first, rest = node._thrifty_split(current)
        collector.expect(len(first))
        for target in first:
            node._send_for_round(target, current.requests[target], collector)
        if rest:
            node.rounds_thrifty += 1
            started = trio.current_time()
            self._wait(
                collector,
                min(started + node._hedge_s(), round_deadline),
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
        self, collector: _RoundCollector, until: float, step: Callable[..., None], *args: Any
    ) -> None:
        """Run `step(*args)` once `collector` settles or `until` passes."""
        if collector.settled:
            step(*args)
            return
        wait = _Wait(None, self._later(step, *args))
        collector.wait = wait
        self.node.round_timer.add(until, wait)

    def _after_first(
        self,
        current: Round,
        collector: _RoundCollector,
        first: list[int],
        rest: list[int],
        started: float,
        round_deadline: float,
    ) -> None:
        """The majority asked first answered, or did not in the hedge time:
        as `Node.quorum_round`, ask the others then."""
        node = self.node
        collector.wait = None
        now = trio.current_time()
        node.round_time_s += ROUND_TIME_WEIGHT * (now - started - node.round_time_s)
        if collector.has_quorum or now >= round_deadline:
            self._round_done(collector)
            return
        node.rounds_hedged += 1
        node._mark_slow(first, collector)
        collector.expect(len(rest))
        for target in rest:
            node._send_for_round(target, current.requests[target], collector)
        self._wait(collector, round_deadline, self._round_done, collector)

    def _round_done(self, collector: _RoundCollector) -> None:
        collector.wait = None
        collector.close()
        if self.deadline.passed():
            self._finish(None, self.deadline.error())
            return
        self._step(collector.replies)


def _ignore_wake() -> None:
    pass


class _TaskFreeWrite:
    """`Node._write_in_turn` without a task: a client put waits for its key's
    turn in the write queue (woken through `QueuedWrite.notify`, bounded by
    a round-timer wait at its deadline), then leads its group as a
    `_TaskFreeDrive`, or takes the answer of the group it was folded into.
    The same queue as the task path: a key's writes may wait in either form
    and be folded together. `respond` is called exactly once."""

    __slots__ = ("deadline", "folded", "node", "over", "put", "respond", "slot", "timer", "write")

    def __init__(self, node: Node, put: _PutRequest, deadline: _Deadline, respond: Respond) -> None:
        self.node = node
        self.put = put
        self.slot = (put.table, put.key)
        self.deadline = deadline
        self.respond = respond
        self.over = False
        self.timer: _Wait | None = None
        self.folded: Mutation | None = None  # the group's write when it leads several
        table, key, replicas, mutation = put.table, put.key, put.replicas, put.mutation
        self.write = QueuedWrite(
            lambda: node._write_operation(table, key, replicas, mutation, put.now_ms),
            mutation,
            self._woken,
        )

    def start(self) -> None:
        node = self.node
        if node.write_queues.enter(self.slot, self.write):
            self._lead()
            return
        self.timer = _Wait(None, lambda: node.soon.call(self._time_up))
        node.round_timer.add(self.deadline.at, self.timer)

    def _woken(self) -> None:
        # Called inside another write's hand-over or answer: run later.
        self.node.soon.call(self._turn)

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
        self.respond(None, self.deadline.error())

    def _turn(self) -> None:
        if self.over:
            return
        write = self.write
        group = write.group
        if group is None:  # folded into another write's group, which answered
            self._end()
            if write.outcome is not None:
                self._reply(write.outcome)
            else:
                self.respond(None, Timeout(write.failure or "outcome unknown"))
            return
        if self.deadline.passed():  # made leader past its time: as a cancelled leader
            write.abandoned = True
            self._end()
            fail_group(group, "its group's leader timed out; outcome unknown")
            self.node.write_queues.hand_over(self.slot)
            group.clear()
            self.respond(None, self.deadline.error())
            return
        self._lead()

    def _lead(self) -> None:
        node = self.node
        group = self.write.group
        assert group is not None and group[0] is self.write
        if self.timer is not None:
            self.timer.then = None
        operation, self.folded = node._group_operation(self.slot, group)
        _TaskFreeDrive(node, operation, self.deadline, self._group_done).start()

    def _group_done(self, outcome: Outcome | None, error: KvsvrError | None) -> None:
        """As `_run_group` and the end of `_write_in_turn`: answer the members,
        hand the key over, answer the client."""
        node = self.node
        group = self.write.group
        assert group is not None
        try:
            if outcome is None:
                fail_group(group, "the write it was folded with did not finish; outcome unknown")
            elif self.folded is not None:
                outcome = node._answer_folded(self.slot, group, self.folded, outcome)
        finally:
            node.write_queues.hand_over(self.slot)
            group.clear()  # the leader heads its own group: see `_write_in_turn`
        self._end()
        if outcome is not None:
            self._reply(outcome)
        else:
            self.respond(None, error)

    def _reply(self, outcome: Outcome) -> None:
        try:
            reply = self.node._put_reply(self.put, outcome)
        except KvsvrError as error:
            self.respond(None, error)
        else:
            self.respond(reply, None)


class Node:
    def __init__(
        self,
        config: ClusterConfig,
        node_id: str,
        storage: Storage,
        *,
        initial_state: str | None = None,
    ) -> None:
        """`initial_state` ("new" or "existing") overrides the config's."""
        self.config = config
        self.me = config.node(node_id)
        self.initial_state = initial_state or config.initial_state
        self.storage = storage
        self.coordinator = Coordinator(self.me.index, random.Random())
        self.replica_sets = config.replica_sets()
        self.tables = {t.name: t for t in config.tables}
        self.peers: dict[int, PeerLink] = {}
        self.write_queues = KeyWriteQueues()
        self.shared_reads = SharedReads()
        self.rounds_thrifty = 0  # rounds that asked a majority first
        self.rounds_hedged = 0  # ... and then had to ask the others too
        self.round_time_s = ROUND_HEDGE_MIN_S  # moving average of thrifty rounds
        self.started_at = time.time()
        self.cache = RowCache(config.cache_bytes_max)
        self.residency = ResidencyGuard(
            config.node_data_dir(node_id), storage, lent_bytes=self.cache.budget_never_used
        )
        self.corrupt_rows_seen = 0
        self.requests_served = 0
        self.nursery: trio.Nursery | None = None
        self.repairing: set[tuple[str, bytes]] = set()
        self.repair_failed_at: dict[tuple[str, bytes], float] = {}
        self.rows_repaired = 0
        self.repairs_failed = 0
        assert self.me.index <= NODE_INDEX_MAX, "eventual-table stamps hold 6 bits of node index"
        self.hlc = HybridClock(self.me.index)
        self.replication = Replication(
            Collaborators(
                config=config,
                me=self.me,
                initial_state=self.initial_state,
                storage=storage,
                peers=self.peers,
                tables=self.tables,
                replica_sets=self.replica_sets,
                hlc=self.hlc,
                clock=SYSTEM_CLOCK,
                read_row=self.read_row_for_peer,
                schedule_repair=self.schedule_repair,
                settle=self.settle_key,
            )
        )
        self.round_timer = _RoundTimer()
        self.soon = _Soon()

    def link_peers(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        nursery.start_soon(self.round_timer.run)
        nursery.start_soon(self.soon.run)
        for peer in self.config.nodes:
            if peer.index == self.me.index:
                continue
            host, port = self.me.peer_addresses.get(peer.id, (peer.host, peer.port))
            self.peers[peer.index] = PeerLink(peer, host, port, self.config.secret, nursery)

    async def settle_key(self, table: str, key: bytes) -> None:
        """A strong read of `key` (for catch-up): settles a proposal in flight
        on a majority and repairs this replica."""
        await self.client_get({"table": table, "key": key})

    # ------------------------------------------------------------ replica side

    def _check_table(self, table: str) -> None:
        if table not in self.tables:
            raise InvalidRequest(f"unknown table {table!r}")

    def _eventual(self, table: str) -> bool:
        return self.tables[table].consistency == "eventual"

    def read_row_for_peer(self, table: str, key: bytes) -> Row | None:
        """Our row for a peer that copies it; a corrupt row raises (and is
        scheduled for rebuilding), never travels."""
        try:
            return self.storage.read_row(table, key)
        except CorruptRow:
            self.corrupt_rows_seen += 1
            self._schedule_repair(table, key)
            raise

    def schedule_repair(self, table: str, key: bytes) -> bool:
        return self._schedule_repair(table, key)

    def _read_row(self, table: str, key: bytes) -> Row:
        try:
            return self.storage.read_row(table, key) or EMPTY_ROW
        except CorruptRow:
            self.corrupt_rows_seen += 1
            if self._schedule_repair(table, key):
                log.error("corrupt row in table %s key %r: refused; rebuilding it", table, key)
            raise

    # ------------------------------------------------------------ repair

    def _schedule_repair(self, table: str, key: bytes) -> bool:
        slot = (table, key)
        failed_at = self.repair_failed_at.get(slot)
        if (
            self.nursery is None
            or slot in self.repairing
            or len(self.repairing) >= REPAIRS_IN_FLIGHT_MAX
            or (failed_at is not None and time.monotonic() - failed_at < REPAIR_RETRY_AFTER_S)
        ):
            return False
        self.repairing.add(slot)
        self.nursery.start_soon(self._repair_row, table, key)
        return True

    async def _repair_row(self, table: str, key: bytes) -> None:
        """Rebuild a corrupt row from enough peers that the rebuilt promise and
        proposal cover whatever the lost row had promised or accepted."""
        slot = (table, key)
        try:
            partition_key, _ = decode_key(key)
            replicas = self.replicas_of(table, partition_key)
            others = [r for r in replicas if r != self.me.index]
            needed = replica.peers_needed_to_rebuild(len(replicas))
            rows: list[Row] = []

            async def fetch(target: int) -> None:
                try:
                    raw = await self.peers[target].call(ROW_METHOD, [table, key])
                    if raw is not None and not isinstance(raw, bytes):
                        raise FrameError("a row must come as bytes")
                    rows.append(EMPTY_ROW if raw is None else decode_row(raw))
                except KvsvrError as error:
                    log.warning("repair of %r: replica %d could not help: %s", key, target, error)

            with trio.move_on_after(REPAIR_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for target in others:
                        nursery.start_soon(fetch, target)
            if len(rows) < needed:
                raise Unavailable(f"heard from {len(rows)} of the {needed} peers needed")
            merged = replica.merge_rows(rows)
            await self.storage.wait_durable(self.storage.stage(table, key, merged))
            self.rows_repaired += 1
            self.repair_failed_at.pop(slot, None)
            log.info("rebuilt row %r of table %s from %d peers", key, table, len(rows))
        except KvsvrError as error:
            self.repairs_failed += 1
            if len(self.repair_failed_at) >= REPAIR_FAILURES_REMEMBERED_MAX:
                self.repair_failed_at.clear()
            self.repair_failed_at[slot] = time.monotonic()
            log.warning("could not rebuild row %r of table %s yet: %s", key, table, error)
        finally:
            self.repairing.discard(slot)

    def serve_row(self, body: object) -> bytes | None:
        """A peer rebuilding a row asks for ours, as stored (crc included)."""
        if (
            not isinstance(body, list)
            or len(body) != 2
            or not isinstance(body[0], str)
            or not isinstance(body[1], bytes)
        ):
            raise InvalidRequest("row takes [table, key]")
        table, key = body
        self._check_table(table)
        if not self.replication.ready:
            raise Unavailable("this replica is rebuilding; its rows cannot help yet")
        row = self.storage.read_row(table, key)  # a corrupt row here raises, never travels
        return None if row is None else encode_row(row)

    def _replica_step(self, message: Request) -> tuple[Reply, CommitTicket | None]:
        """Apply a request to the replica: the reply, and the ticket of the row
        change it must wait for (None: nothing changed) before it may leave."""
        self._check_table(message.table)
        if not self.replication.ready and not self._eventual(message.table):
            # Empty after losing its data: a vote now could contradict one it
            # made before the loss. The other replicas form the majority.
            raise Unavailable(f"this replica is {self.replication.state}; no vote yet")
        if isinstance(message, ScanRequest):
            return self._replica_scan(message), None
        if isinstance(message, Commit):
            raise InvalidRequest("commit is a one-way message")
        if self._eventual(message.table):
            raise InvalidRequest(f"table {message.table!r} is eventual: no Paxos rounds")
        new_row, reply = replica.handle(self._read_row(message.table, message.key), message)
        assert reply is not None
        if new_row is None:
            return reply, None
        # Durable before the answer leaves: a forgotten promise breaks Paxos.
        return reply, self.storage.stage(message.table, message.key, new_row)

    def _must_wait_to_vote(self, message: Request) -> bool:
        return (
            not self.replication.ready
            and message.table in self.tables
            and not self._eventual(message.table)
        )

    async def replica_request(self, message: Request) -> Reply:
        if self._must_wait_to_vote(message):
            await self.replication.wait_to_vote()
        reply, ticket = self._replica_step(message)
        if ticket is not None:
            await self.storage.wait_durable(ticket)
        return reply

    def replica_nowait(self, message: Request, answer: ReplicaAnswer) -> None:
        """`replica_request` without a task: `answer(reply, None)` once the reply
        may leave (its row change is durable), or `answer(None, error)`."""
        if self._must_wait_to_vote(message) and self.nursery is not None:
            self.nursery.start_soon(self._replica_after_joining, message, answer)
            return
        try:
            reply, ticket = self._replica_step(message)
        except KvsvrError as error:
            answer(None, error)
            return
        if ticket is None:
            answer(reply, None)
            return

        def durable(failure: KvsvrError | None) -> None:
            if failure is None:
                answer(reply, None)
            else:
                answer(None, failure)

        self.storage.when_durable(ticket, durable)

    async def _replica_after_joining(self, message: Request, answer: ReplicaAnswer) -> None:
        """A message that reached a replica still joining: held until it may
        vote (briefly: see `Replication.wait_to_vote`) or refused."""
        try:
            await self.replication.wait_to_vote()
        except KvsvrError as error:
            answer(None, error)
            return
        self.replica_nowait(message, answer)

    def replica_oneway(self, message: Request) -> None:
        if not isinstance(message, Commit):
            raise InvalidRequest("only commits travel one way")
        self._check_table(message.table)
        if self._eventual(message.table) or not self.replication.ready:
            return
        try:
            row = self._read_row(message.table, message.key)
        except CorruptRow:
            return
        new_row = replica.on_commit(row, message)
        if new_row is not None:
            # Nobody waits on a commit: it is a hint that a value is chosen,
            # and losing it in a crash only means another repair later. So it
            # shares the next fsync instead of costing one of its own.
            self.storage.stage(message.table, message.key, new_row, lazy=True)

    def _replica_scan(self, message: ScanRequest) -> ScanReply:
        limit = max(1, min(message.limit, SCAN_LIMIT_MAX))
        start = max(message.start, message.prefix)
        end = message.end if message.end else prefix_end(message.prefix)
        rows = self.storage.scan(message.table, start, end, limit + 1)
        entries = tuple(replica.scan_entry(key, row) for key, row in rows[:limit])
        return ScanReply(entries, len(rows) > limit)

    # ------------------------------------------------------------ coordinator side

    async def ask(self, target: int, message: Request) -> Reply:
        if target == self.me.index:
            return await self.replica_request(message)
        raw = await self.peers[target].request(to_wire(message))
        reply = from_wire(raw)
        expected = _REPLY_TYPES[type(message)]
        if not isinstance(reply, expected) or not isinstance(
            reply, Promise | AcceptReply | ReadReply | ScanReply
        ):
            raise FrameError(f"expected {expected.__name__}, got {type(reply).__name__}")
        return reply

    def send_oneway(self, target: int, message: Request) -> None:
        if target == self.me.index:
            try:
                self.replica_oneway(message)
            except KvsvrError as error:
                log.warning("local one-way message refused: %s", error)
            return
        self.peers[target].send_oneway(to_wire(message))

    async def quorum_round(self, current: Round, deadline: float = math.inf) -> Replies:
        """Fan out, collect until a quorum answered (or cannot), cancel the rest.
        Ends by ROUND_TIMEOUT_S, or by `deadline` (trio time) if sooner. A
        round of one request (replication 1, a value fetch) runs the same way."""
        round_deadline = min(trio.current_time() + ROUND_TIMEOUT_S, deadline)
        collector = _RoundCollector(current.quorum)
        first, rest = self._thrifty_split(current)
        if rest:
            self.rounds_thrifty += 1
        try:
            collector.expect(len(first))
            for target in first:
                self._send_for_round(target, current.requests[target], collector)
            if rest:
                started = trio.current_time()
                await self._wait_settled(collector, min(started + self._hedge_s(), round_deadline))
                now = trio.current_time()
                self.round_time_s += ROUND_TIME_WEIGHT * (now - started - self.round_time_s)
                if collector.has_quorum or now >= round_deadline:
                    return collector.replies
                self.rounds_hedged += 1
                self._mark_slow(first, collector)
                collector.expect(len(rest))
                for target in rest:
                    self._send_for_round(target, current.requests[target], collector)
            await self._wait_settled(collector, round_deadline)
        finally:
            collector.close()
        return collector.replies

    async def _wait_settled(self, collector: _RoundCollector, deadline: float) -> None:
        """Wait until `collector` settles or `deadline` (trio time) passes."""
        if collector.settled:
            return
        wait = _Wait(trio.lowlevel.current_task())

        def abort(_: object) -> trio.lowlevel.Abort:
            wait.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        collector.wait = wait
        try:
            if self.round_timer.running:
                self.round_timer.add(deadline, wait)
                await trio.lowlevel.wait_task_rescheduled(abort)
            else:  # no timer task (not linked to a nursery yet): a scope of its own
                with trio.CancelScope(deadline=deadline):
                    await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            collector.wait = None

    def _thrifty_split(self, current: Round) -> tuple[list[int], list[int]]:
        """The replicas to ask first, and the ones asked only if those do not
        make a quorum (a refusal, a failure, or no quorum in ROUND_HEDGE_S).

        A quorum needs any majority's answers, never a particular one, so a
        round asks just a majority: our own replica (free: no message) and the
        first connected, not recently slow peers in replica order (so the same
        peer answers a key's rounds and its rows stay current; the others
        learn every chosen value from the commits, which carry it to replicas
        that did not accept). That spares the other replicas a request, an
        fsync'd row change and a reply per operation. With too few healthy
        peers known, everyone is asked at once, as before."""
        targets = list(current.requests)
        if len(targets) <= current.quorum:
            return targets, []
        now = trio.current_time()
        first = [self.me.index] if self.me.index in current.requests else []
        for target in targets:
            if len(first) >= current.quorum:
                break
            if target == self.me.index:
                continue
            link = self.peers[target]
            if link.up and link.slow_until <= now:
                first.append(target)
        if len(first) < current.quorum:
            return targets, []
        return first, [target for target in targets if target not in first]

    def _hedge_s(self) -> float:
        return min(
            ROUND_HEDGE_MAX_S, max(ROUND_HEDGE_MIN_S, HEDGE_ROUNDS_FACTOR * self.round_time_s)
        )

    def _mark_slow(self, asked: list[int], collector: _RoundCollector) -> None:
        """Peers asked first that have not answered when the round had to ask
        the others: ask everyone in rounds for a while rather than pay the
        hedge delay per operation (a paused or overloaded peer)."""
        until = trio.current_time() + PEER_SLOW_S
        for target in asked:
            if target != self.me.index and target not in collector.replies:
                self.peers[target].slow_until = until

    def _send_for_round(self, target: int, message: Request, collector: _RoundCollector) -> None:
        """Send one request of a round; its reply (or failure) goes to
        `collector`, without a task: the local replica answers through a
        durability callback, a connected peer through a reply callback."""
        if target == self.me.index:
            self.replica_nowait(message, partial(collector.local_answer, target))
            return
        connection = self.peers[target].connection
        request_id = None
        if connection is not None and not connection.closed:
            request_id = connection.request_nowait(
                PAXOS_METHOD,
                to_wire(message),
                partial(collector.remote_answer, target, _REPLY_TYPES[type(message)]),
            )
        if request_id is not None:
            assert connection is not None
            collector.outstanding.append((connection, request_id))
            return
        # Not connected yet (or its queue is full): the ordinary path, in a task
        # of the node's nursery, bounded by the round's timeout.
        assert self.nursery is not None
        self.nursery.start_soon(self._ask_for_round, target, message, collector)

    async def _ask_for_round(
        self, target: int, message: Request, collector: _RoundCollector
    ) -> None:
        # A task of the node's nursery: nothing may escape it but cancellation.
        with trio.move_on_after(ROUND_TIMEOUT_S):
            try:
                collector.add(target, await self.ask(target, message))
                return
            except KvsvrError as error:
                log.debug("replica %d did not answer: %s", target, error)
            except Exception:
                log.exception("asking replica %d failed", target)
        collector.no_answer(target)

    async def drive(
        self, operation: Generator[Round, Replies, Outcome], deadline: _Deadline | None = None
    ) -> Outcome:
        """Run `operation`'s rounds; past `deadline`, raise its `Timeout`."""
        replies: Replies | None = None
        until = math.inf if deadline is None else deadline.at
        while True:
            try:
                current = next(operation) if replies is None else operation.send(replies)
            except StopIteration as stop:
                outcome: Outcome = stop.value
                return outcome
            for target, message in current.oneway:
                self.send_oneway(target, message)
            if not current.requests:
                replies = {}
                continue
            if current.delay_s > 0:
                await trio.sleep_until(min(trio.current_time() + current.delay_s, until))
            if deadline is not None and deadline.passed():
                raise deadline.error()
            replies = await self.quorum_round(current, until)
            if deadline is not None and deadline.passed():
                raise deadline.error()

    async def coordinate(
        self,
        table: str,
        key: bytes,
        make: Any,
        timeout_s: float,
        *,
        exclusive: bool = True,
        mutation: Mutation | None = None,
    ) -> Outcome:
        """Run one operation on a key, bounded in time. Writes (`exclusive`) run
        one at a time per key on this coordinator, so they do not duel with
        each other for the key's promise; reads need no promise and run freely
        (serialising them queued every reader of a hot key behind the others).
        A write that passes its blind `mutation` may be folded with the blind
        writes queued next to it (see `kvsvr.node.write_queue`). Past
        `timeout_s` it raises `Timeout` (outcome unknown)."""
        deadline = _Deadline(timeout_s)
        if not exclusive:
            return await self.drive(make(), deadline)
        return await self._write_in_turn((table, key), QueuedWrite(make, mutation), deadline)

    async def _write_in_turn(self, slot: Slot, write: QueuedWrite, deadline: _Deadline) -> Outcome:
        """Wait for the key's turn, then run `write` (leading the group the
        hand-over gave it), or take the answer of the leader it was folded into."""
        queues = self.write_queues
        if not queues.enter(slot, write):
            with trio.CancelScope(deadline=deadline.at) as waiting:
                try:
                    assert write.wake is not None, "a task waits on an Event"
                    await write.wake.wait()
                except BaseException:
                    write.abandoned = True
                    if write.group is not None:  # made leader as it was cancelled
                        fail_group(write.group, "its group's leader was cancelled; outcome unknown")
                        queues.hand_over(slot)
                        write.group.clear()  # see below
                    raise
            if waiting.cancelled_caught:
                raise deadline.error()
            if write.group is None:  # folded into another write's group
                if write.outcome is not None:
                    return write.outcome
                raise Timeout(write.failure or "outcome unknown")
        group = write.group
        assert group is not None and group[0] is write
        try:
            return await self._run_group(slot, group, deadline)
        except BaseException:
            fail_group(group, "the write it was folded with did not finish; outcome unknown")
            raise
        finally:
            queues.hand_over(slot)
            # The leader heads its own group: a reference cycle, which would
            # keep the value until the cyclic collector's next sweep.
            group.clear()

    async def _run_group(
        self, slot: Slot, group: list[QueuedWrite], deadline: _Deadline
    ) -> Outcome:
        operation, folded = self._group_operation(slot, group)
        outcome = await self.drive(operation, deadline)
        if folded is None:
            return outcome
        return self._answer_folded(slot, group, folded, outcome)

    def _group_operation(
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
        return self._write_operation(table, key, replicas, mutation, now_ms()), mutation

    def _answer_folded(
        self, slot: Slot, group: list[QueuedWrite], folded: Mutation, outcome: Outcome
    ) -> Outcome:
        """A folded group's write ended with `outcome`: answer its members;
        the leader's own outcome."""
        if outcome.status == "ok":
            # The group's value, before the members' own (older) versions reach the cache.
            table, key = slot
            self.cache.put(
                table, key, outcome.version, folded.value, folded.expires_at_ms, time.monotonic()
            )
        answer_group(group, outcome)
        assert group[0].outcome is not None
        return group[0].outcome

    def _write_operation(
        self, table: str, key: bytes, replicas: list[int], mutation: Mutation, now: int
    ) -> Operation:
        # The local version only helps phase 1 (replicas leave out a value we
        # hold); a write that holds the key's lease takes the fast path without it.
        known = (
            -1
            if self.coordinator.has_lease(table, key)
            else self.local_version(table, key, replicas)
        )
        return self.coordinator.write(table, key, replicas, mutation, now, known)

    async def _shared_strong_read(
        self, slot: Slot, make: Callable[[], Operation], timeout_s: float
    ) -> Outcome:
        """A strong read that runs its own round if the key is idle here, else
        shares the next round with the other reads of the key that arrive
        meanwhile (see `kvsvr.node.read_share`)."""
        reads = self.shared_reads
        deadline = _Deadline(timeout_s)
        if slot not in reads.running or self.nursery is None:
            reads.running.add(slot)
            try:
                return await self.drive(make(), deadline)
            finally:
                self._start_next_read(slot)
        shared = reads.join_next(slot, make)
        with trio.CancelScope(deadline=deadline.at) as waiting:
            await shared.done.wait()
        if waiting.cancelled_caught:
            raise deadline.error()
        if shared.outcome is None:
            raise Unavailable("the read round this read shared did not finish; retry")
        return shared.outcome

    def _start_next_read(self, slot: Slot) -> None:
        shared = self.shared_reads.take_next(slot)
        if shared is not None:
            assert self.nursery is not None
            self.nursery.start_soon(self._run_shared_read, slot, shared)

    async def _run_shared_read(self, slot: Slot, shared: SharedRead) -> None:
        # A task of the node's nursery: nothing may escape it but cancellation.
        try:
            shared.outcome = await self.drive(shared.make(), _Deadline(OPERATION_TIMEOUT_S))
        except Timeout:
            pass  # its readers learn that it did not finish
        except KvsvrError as error:
            log.warning("a shared read of %r failed: %s", slot[1], error)
        except Exception:
            log.exception("a shared read of %r failed", slot[1])
        finally:
            shared.done.set()
            self._start_next_read(slot)

    def replicas_of(self, table: str, partition_key: bytes) -> list[int]:
        return self.replica_sets[partition_of(table, partition_key, self.config.partitions)]

    def local_version(self, table: str, key: bytes, replicas: list[int]) -> int:
        if self.me.index not in replicas:
            return -1
        try:
            return self._read_row(table, key).version
        except CorruptRow:
            return -1

    # ------------------------------------------------------------ client API

    async def client_get(self, body: dict[str, Any]) -> dict[str, Any]:
        get = self._parse_get(body)
        if self._eventual(get.table):
            return await self._eventual_get(get.table, get.key, get.replicas, get.consistency)
        answer = self._get_without_quorum(get)
        if answer is not None:
            return answer
        return await self._strong_get(get.table, get.key, get.replicas, body)

    def _parse_get(self, body: dict[str, Any]) -> _GetRequest:
        table, key, partition_key = self._table_and_key(body)
        consistency = body.get("consistency", "strong")
        if consistency not in ("strong", "stale", "local"):
            raise InvalidRequest("consistency must be 'strong', 'stale' or 'local'")
        min_version = body.get("min_version") or 0
        if not isinstance(min_version, int):
            raise InvalidRequest("min_version must be an int")
        max_age_s = body.get("max_age_s")
        if max_age_s is not None and (
            not isinstance(max_age_s, int | float) or isinstance(max_age_s, bool) or max_age_s < 0
        ):
            raise InvalidRequest("max_age_s must be a number >= 0 or None")
        replicas = self.replicas_of(table, partition_key)
        return _GetRequest(table, key, replicas, consistency, min_version, max_age_s)

    def _get_without_quorum(self, get: _GetRequest) -> dict[str, Any] | None:
        """The answer of a strong table's local or stale read, when it needs
        no quorum round; None when it does (strong, or a stale read the cache
        and this replica cannot honour: counted as a fallback)."""
        if get.consistency == "local":
            if self.me.index not in get.replicas:
                raise InvalidRequest(f"node {self.me.id} holds no replica of this key")
            row = self._read_row(get.table, get.key)
            return self._answer(row.version, row.value, row.expires_at_ms)
        if get.consistency == "stale":
            answer = self._stale_answer(
                get.table, get.key, get.replicas, get.min_version, get.max_age_s
            )
            if answer is not None:
                return answer
            self.cache.stats.fallbacks += 1
        return None

    def _get_nowait(self, body: object, respond: Respond) -> bool:
        """A get without a task: local and stale reads answer at once; a strong
        read of a key with no read round running here runs as a
        `_TaskFreeDrive` (as `_shared_strong_read` runs the first reader of an
        idle key); the others join the next round the ordinary way, in a task."""
        if not isinstance(body, dict):
            return False
        self.requests_served += 1
        try:
            get = self._parse_get(body)
            if self._eventual(get.table):
                self._answer_in_task(
                    respond,
                    self._eventual_get(get.table, get.key, get.replicas, get.consistency),
                )
                return True
            answer = self._get_without_quorum(get)
            if answer is not None:
                respond(answer, None)
                return True
            client_version = _client_cached_version(body)
            timeout_s = self._timeout(body)
        except KvsvrError as error:
            respond(None, error)
            return True
        table, key, replicas = get.table, get.key, get.replicas
        slot = (table, key)
        reads = self.shared_reads
        if slot in reads.running:
            self._answer_in_task(respond, self._strong_get(table, key, replicas, body))
            return True
        reads.running.add(slot)

        def done(outcome: Outcome | None, error: KvsvrError | None) -> None:
            self._start_next_read(slot)
            if outcome is not None:
                try:
                    reply = self._strong_get_reply(table, key, outcome, client_version)
                except KvsvrError as failure:
                    error = failure
                else:
                    respond(reply, None)
                    return
            respond(None, error)

        operation = self._strong_read_operation(table, key, replicas)
        _TaskFreeDrive(self, operation, _Deadline(timeout_s), done).start()
        return True

    async def _eventual_get(
        self, table: str, key: bytes, replicas: list[int], consistency: str
    ) -> dict[str, Any]:
        """An eventual table is read from one replica: this node's when it holds
        one, else the first that answers. Every consistency reads the same way."""
        if self.me.index in replicas:
            row = self._read_row(table, key)
            return self._answer(row.version, row.value, row.expires_at_ms)
        if consistency == "local":
            raise InvalidRequest(f"node {self.me.id} holds no replica of this key")
        last_error: KvsvrError = Unavailable("no replica answered")
        for target in replicas:
            try:
                with trio.fail_after(ROUND_TIMEOUT_S):
                    rows = await self.peers[target].call(replication.ROWS, [table, [key]])
            except trio.TooSlowError:
                continue
            except KvsvrError as error:
                last_error = error
                continue
            if not isinstance(rows, list) or len(rows) != 1:
                raise FrameError("ae_rows answers one row per key")
            row = EMPTY_ROW if rows[0] is None else decode_row(rows[0])
            return self._answer(row.version, row.value, row.expires_at_ms)
        raise Unavailable(f"no replica of the key answered: {last_error}")

    async def _eventual_put(
        self,
        table: str,
        key: bytes,
        replicas: list[int],
        value: bytes | None,
        expires: int | None,
        timeout_s: float,
    ) -> dict[str, Any]:
        """Stamp the write, send it to every replica, answer after `write_quorum`
        acknowledged. The others keep receiving it in the background; one that
        fails gets a hint."""
        assert self.nursery is not None
        row = eventual_row(self.hlc.now(now_ms()), value, expires)
        raw = encode_row(row)
        need = min(self.tables[table].write_quorum, len(replicas))
        acked = 0
        failed = 0
        enough = trio.Event()

        async def send(target: int) -> None:
            nonlocal acked, failed
            try:
                if target == self.me.index:
                    await self.replication.apply(table, [(key, raw)], eventual=True)
                else:
                    with trio.fail_after(OPERATION_TIMEOUT_S):
                        await self.peers[target].call(replication.APPLY, [table, [[key, raw]]])
                acked += 1
            except (KvsvrError, trio.TooSlowError):
                failed += 1
                self.replication.hint(target, table, key, row)
            if acked >= need or failed > len(replicas) - need:
                enough.set()

        for target in replicas:
            self.nursery.start_soon(send, target)
        with trio.move_on_after(timeout_s):
            await enough.wait()
        if acked < need:
            raise Unavailable(
                f"{acked} of the {need} replicas needed acknowledged; the write may still land"
            )
        return {"version": row.version}

    def _stale_answer(
        self,
        table: str,
        key: bytes,
        replicas: list[int],
        min_version: int,
        max_age_s: float | None,
    ) -> dict[str, Any] | None:
        """A stale read without a quorum round: the cache (within `max_age_s`),
        else this node's replica (no age bound given), never older than the
        version the client's session already saw. None: a strong read is needed."""
        cached = self.cache.get(table, key)
        if (
            cached is not None
            and cached.version >= min_version
            and (max_age_s is None or time.monotonic() - cached.cached_at_s <= max_age_s)
        ):
            self.cache.stats.stale_served += 1
            return self._answer(cached.version, cached.value, cached.expires_at_ms)
        if max_age_s is None and self.me.index in replicas:
            row = self._read_row(table, key)
            if row.version >= min_version:
                self.cache.stats.stale_served += 1
                return self._answer(row.version, row.value, row.expires_at_ms)
        return None

    async def _strong_get(
        self, table: str, key: bytes, replicas: list[int], body: dict[str, Any]
    ) -> dict[str, Any]:
        client_version = _client_cached_version(body)
        outcome = await self._shared_strong_read(
            (table, key),
            lambda: self._strong_read_operation(table, key, replicas),
            self._timeout(body),
        )
        return self._strong_get_reply(table, key, outcome, client_version)

    def _strong_read_operation(self, table: str, key: bytes, replicas: list[int]) -> Operation:
        # Made when the round starts (it may serve later readers too).
        entry = self.cache.get(table, key)
        cached = None if entry is None else (entry.version, entry.value, entry.expires_at_ms)
        # Replicas compare against the cached version when there is one.
        known = -1 if cached is not None else self.local_version(table, key, replicas)
        return self.coordinator.read(table, key, replicas, now_ms(), known, cached)

    def _strong_get_reply(
        self, table: str, key: bytes, outcome: Outcome, client_version: int | None
    ) -> dict[str, Any]:
        self._raise_for(outcome)
        if outcome.cache_hit:
            self.cache.stats.hits += 1
        else:
            self.cache.stats.misses += 1
            self.cache.put(
                table, key, outcome.version, outcome.value, outcome.expires_at_ms, time.monotonic()
            )
        if client_version is None:
            return {"version": outcome.version, "value": outcome.value}
        # A client near cache holds `client_version`: the quorum decided, and if
        # it chose exactly that version (value present) the value need not travel.
        if outcome.version == client_version and outcome.value is not None:
            self.cache.stats.unchanged += 1
            return {"version": outcome.version, "unchanged": True}
        return {
            "version": outcome.version,
            "value": outcome.value,
            "expires_at_ms": outcome.expires_at_ms,
        }

    @staticmethod
    def _answer(version: int, value: bytes | None, expires_at_ms: int | None) -> dict[str, Any]:
        present = value is not None and (expires_at_ms is None or expires_at_ms > now_ms())
        return {"version": version, "value": value if present else None}

    async def client_put(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._put_parsed(self._parse_put(body), self._timeout(body))

    def _parse_put(self, body: dict[str, Any]) -> _PutRequest:
        table, key, partition_key = self._table_and_key(body)
        value = body.get("value")
        if value is not None and not isinstance(value, bytes):
            raise InvalidRequest("value must be bytes (or None to delete)")
        if value is not None and len(value) > VALUE_BYTES_MAX:
            raise InvalidRequest(f"value is {len(value)} bytes; the limit is {VALUE_BYTES_MAX}")
        if_version = body.get("if_version")
        if if_version is not None and (not isinstance(if_version, int) or if_version < 0):
            raise InvalidRequest("if_version must be an int >= 0")
        if_absent = body.get("if_absent", False)
        if not isinstance(if_absent, bool):
            raise InvalidRequest("if_absent must be a bool")
        ttl_s = self.tables[table].ttl_s
        now = now_ms()
        expires = now + int(ttl_s * 1000) if ttl_s > 0 and value is not None else None
        replicas = self.replicas_of(table, partition_key)
        if self._eventual(table) and (if_version is not None or if_absent):
            raise InvalidRequest(
                f"table {table!r} is eventual: conditional writes need a strong table"
            )
        return _PutRequest(
            table,
            key,
            replicas,
            value,
            expires,
            now,
            Mutation(value, expires, if_version, if_absent),
        )

    async def _put_parsed(self, put: _PutRequest, timeout_s: float) -> dict[str, Any]:
        table, key, replicas, mutation = put.table, put.key, put.replicas, put.mutation
        if self._eventual(table):
            return await self._eventual_put(
                table, key, replicas, put.value, put.expires_at_ms, timeout_s
            )
        outcome = await self.coordinate(
            table,
            key,
            lambda: self._write_operation(table, key, replicas, mutation, put.now_ms),
            timeout_s,
            mutation=mutation,
        )
        return self._put_reply(put, outcome)

    def _put_reply(self, put: _PutRequest, outcome: Outcome) -> dict[str, Any]:
        self._raise_for(outcome)
        self.cache.put(
            put.table, put.key, outcome.version, put.value, put.expires_at_ms, time.monotonic()
        )
        self.replication.hint_after_write(
            put.table, put.key, put.replicas, outcome.version, put.value, put.expires_at_ms
        )
        return {"version": outcome.version}

    def _put_nowait(self, body: object, respond: Respond) -> bool:
        """A put without a task (`_TaskFreeWrite`); an eventual table's put
        runs the ordinary way, in a task."""
        if not isinstance(body, dict):
            return False
        self.requests_served += 1
        try:
            put = self._parse_put(body)
            timeout_s = self._timeout(body)
        except KvsvrError as error:
            respond(None, error)
            return True
        if self._eventual(put.table):
            self._answer_in_task(respond, self._put_parsed(put, timeout_s))
            return True
        _TaskFreeWrite(self, put, _Deadline(timeout_s), respond).start()
        return True

    def _answer_in_task(
        self, respond: Respond, answer: Coroutine[Any, Any, dict[str, Any]]
    ) -> None:
        """Answer a request a task-free handler took but cannot finish without
        a task (a busy key, an eventual table)."""
        assert self.nursery is not None
        self.nursery.start_soon(self._answer_task, respond, answer)

    @staticmethod
    async def _answer_task(respond: Respond, answer: Coroutine[Any, Any, dict[str, Any]]) -> None:
        # A task of the node's nursery: nothing may escape it but cancellation.
        try:
            reply = await answer
        except KvsvrError as error:
            respond(None, error)
        except Exception as exc:
            log.exception("a client request failed")
            respond(None, KvsvrError(f"internal error: {exc!r}"))
        else:
            respond(reply, None)

    async def client_scan(self, body: dict[str, Any]) -> dict[str, Any]:
        table = body.get("table", "default")
        if not isinstance(table, str):
            raise InvalidRequest("table must be a str")
        self._check_table(table)
        partition_key = body.get("partition_key")
        if not isinstance(partition_key, bytes) or not partition_key:
            raise InvalidRequest("partition_key must be non-empty bytes")
        start = body.get("start") or b""
        end = body.get("end") or b""
        if not isinstance(start, bytes) or not isinstance(end, bytes):
            raise InvalidRequest("start and end must be bytes")
        limit = body.get("limit", 1000)
        if not isinstance(limit, int) or not 1 <= limit <= SCAN_LIMIT_MAX:
            raise InvalidRequest(f"limit must be between 1 and {SCAN_LIMIT_MAX}")
        prefix = partition_prefix(partition_key)
        replicas = self.replicas_of(table, partition_key)
        now = now_ms()
        end_key = prefix + end if end else b""
        outcome = await self.coordinate(
            table,
            prefix,
            lambda: self.coordinator.scan(
                table, prefix, prefix + start, end_key, limit, replicas, now
            ),
            self._timeout(body),
            exclusive=False,
        )
        self._raise_for(outcome)
        items = []
        for entry in outcome.entries:
            _, sort_key = decode_key(entry.key)
            items.append([sort_key, entry.value, entry.version])
        return {"items": items}

    def client_map(self) -> dict[str, Any]:
        return {
            "partitions": self.config.partitions,
            "replication": self.config.replication,
            "nodes": [
                {"id": n.id, "index": n.index, "host": n.host, "port": n.port, "zone": n.zone}
                for n in self.config.nodes
            ],
            "replica_sets": self.replica_sets,
            "tables": [
                {"name": t.name, "consistency": t.consistency, "ttl_s": t.ttl_s}
                for t in self.config.tables
            ],
        }

    def client_status(self) -> dict[str, Any]:
        held = sum(1 for s in self.replica_sets if self.me.index in s)
        preferred = sum(1 for s in self.replica_sets if s and s[0] == self.me.index)
        return {
            "node": self.me.id,
            "address": self.me.address,
            "zone": self.me.zone,
            "uptime_s": round(time.time() - self.started_at, 1),
            # False only under the config's unsafe_no_fsync (benchmarks).
            "fsync": not self.config.unsafe_no_fsync,
            # Modules compiled by mypyc (`python3 dev.py compile`); [] = pure Python.
            "compiled_modules": _build.compiled_modules(),
            "partitions": self.config.partitions,
            "partitions_held": held,
            "partitions_preferred": preferred,
            "peers": {
                link.peer.id: ("connected" if link.up else "not connected")
                for link in self.peers.values()
            },
            "coordinator": asdict(self.coordinator.stats),
            "storage": asdict(self.storage.stats),
            "rounds": {"thrifty": self.rounds_thrifty, "hedged": self.rounds_hedged},
            "read_sharing": {
                "rounds_shared": self.shared_reads.rounds_shared,
                "reads_shared": self.shared_reads.reads_shared,
            },
            "write_batching": {
                "groups_folded": self.write_queues.groups_folded,
                "writes_folded": self.write_queues.writes_folded,
            },
            "cache": {
                **asdict(self.cache.stats),
                "hit_ratio": round(self.cache.hit_ratio(), 4),
                "bytes_used": self.cache.bytes_used,
                "bytes_max": self.cache.bytes_max,
                "entries": len(self.cache),
            },
            "memory": self.residency.status(),
            "corrupt_rows_seen": self.corrupt_rows_seen,
            "rows_repaired": self.rows_repaired,
            "repairs_failed": self.repairs_failed,
            "requests_served": self.requests_served,
            "replication": self.replication.status(),
        }

    def _timeout(self, body: dict[str, Any]) -> float:
        timeout = body.get("timeout_s", OPERATION_TIMEOUT_S)
        if not isinstance(timeout, int | float) or not 0 < timeout <= OPERATION_TIMEOUT_MAX_S:
            raise InvalidRequest(f"timeout_s must be in (0, {OPERATION_TIMEOUT_MAX_S}]")
        return float(timeout)

    def _table_and_key(self, body: dict[str, Any]) -> tuple[str, bytes, bytes]:
        table = body.get("table", "default")
        if not isinstance(table, str):
            raise InvalidRequest("table must be a str")
        self._check_table(table)
        key = body.get("key")
        if not isinstance(key, bytes):
            raise InvalidRequest("key must be bytes (an encoded key)")
        partition_key, _ = decode_key(key)
        if not partition_key:
            raise InvalidRequest("the partition key must not be empty")
        return table, key, partition_key

    @staticmethod
    def _raise_for(outcome: Outcome) -> None:
        if outcome.status == "ok":
            return
        if outcome.status == "conflict":
            raise Conflict.of_version(outcome.version)
        raise Unavailable(outcome.detail or "no majority of replicas answered; outcome unknown")

    # ------------------------------------------------------------ the handler

    async def handle_request(self, peer: str, method: str, body: object) -> object:
        self.requests_served += 1
        if method == PAXOS_METHOD:
            return to_wire(await self.replica_request(_as_request(body)))
        if method == ROW_METHOD:
            return self.serve_row(body)
        if method in replication.METHODS:
            return await self.replication.handle(method, body)
        if method == "map":
            return self.client_map()
        if method == "status":
            return self.client_status()
        if method == "recover":
            if not isinstance(body, dict):
                raise InvalidRequest("recover: the body must be a map")
            return await self.replication.recover(body.get("accept_data_loss") is True)
        if not isinstance(body, dict):
            raise InvalidRequest(f"{method}: the body must be a map")
        if method == "get":
            return await self.client_get(body)
        if method == "put":
            return await self.client_put(body)
        if method == "scan":
            return await self.client_scan(body)
        raise InvalidRequest(f"unknown method {method!r}")

    def handle_request_nowait(
        self,
        peer: str,
        method: str,
        body: object,
        respond: Respond,
    ) -> bool:
        """Peers' Paxos requests, answered without a task of their own (see
        `replica_nowait`), and clients' gets and puts (see `_get_nowait`,
        `_put_nowait`) once the node's runners are up; False for every other
        method (`handle_request`)."""
        if method != PAXOS_METHOD:
            if not self.soon.running or not self.round_timer.running:
                return False
            if method == "put":
                return self._put_nowait(body, respond)
            if method == "get":
                return self._get_nowait(body, respond)
            return False
        self.requests_served += 1
        try:
            message = _as_request(body)
        except KvsvrError as error:
            respond(None, error)
            return True

        def answer(reply: Reply | None, error: KvsvrError | None) -> None:
            if reply is None:
                respond(None, error)
            else:
                respond(to_wire(reply), None)

        self.replica_nowait(message, answer)
        return True

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        if method != PAXOS_ONEWAY_METHOD:
            log.warning("unknown one-way method %r from %s", method, peer)
            return
        try:
            self.replica_oneway(_as_request(body))
        except KvsvrError as error:
            log.warning("one-way message from %s refused: %s", peer, error)


def _client_cached_version(body: dict[str, Any]) -> int | None:
    """The version a strong get's client holds in its near cache (optional)."""
    version = body.get("cached_version")
    if version is None:
        return None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidRequest("cached_version must be an int >= 1 or None")
    return version


def _as_request(body: object) -> Request:
    message = from_wire(body)
    if not isinstance(message, Prepare | Accept | Commit | Read | ScanRequest):
        raise FrameError(f"{type(message).__name__} is not a request")
    return message


async def serve_node(
    config: ClusterConfig,
    node_id: str,
    *,
    initial_state: str | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until cancelled; on cancellation, commit what is staged and
    close. Raises `WrongCluster` (in an exception group) when the data
    directory or the peers belong to another cluster."""
    me = config.node(node_id)
    _require_cluster_id(config)
    data_dir = config.node_data_dir(node_id)
    data_dir.mkdir(parents=True, exist_ok=True)
    storage = Storage.open(
        data_dir,
        tables=[t.name for t in config.tables],
        map_size_bytes=config.map_size_bytes,
        fsync=not config.unsafe_no_fsync,
    )
    if config.unsafe_no_fsync:
        log.warning(
            "unsafe_no_fsync is set: commits are not flushed to disk, so acknowledged "
            "writes can be lost if the machine crashes; for benchmarks only"
        )
    if config.secret is None:
        log.warning("no cluster secret configured: anyone who can reach %s can use it", me.address)
    try:
        async with trio.open_nursery() as storage_nursery:
            await storage_nursery.start(storage.run)
            node = Node(config, node_id, storage, initial_state=initial_state)
            async with trio.open_nursery() as nursery:
                node.link_peers(nursery)
                await nursery.start(partial(serve, me.host, me.port, node, secret=config.secret))
                await nursery.start(node.replication.run)
                nursery.start_soon(node.residency.run)
                log.info("node %s serving on %s", me.id, me.address)
                task_status.started(node)
                await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await storage.aclose()
        log.info("node %s stopped; storage closed", me.id)


def _require_cluster_id(config: ClusterConfig) -> None:
    if config.cluster_id is None:
        raise ConfigError(
            "the config has no cluster id; give every node the same one, e.g. "
            f'id = "{new_cluster_id()}" under [cluster]'
        )


async def _main(config: ClusterConfig, node_id: str, initial_state: str | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_node, config, node_id, initial_state=initial_state))
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


# A request allocates a few dozen short-lived containers (messages, rows,
# dicts, trio's task and scope objects); they die by reference count (the
# hot path makes no reference cycles: see `_write_in_turn` and
# `_TaskFreeWrite._end`; kvsvr_tests/test_gc_cycles.py checks it). At CPython's
# default gen-0 threshold (700) the cyclic collector still ran every few
# requests and walked the young objects each time, for nothing: about a
# fifth of a node's CPU on durable puts (bench.single_node: 0.39-0.46 ->
# 0.33-0.35 CPU-ms per put). A larger threshold keeps cycles collected, in
# rarer sweeps; not much larger, as a cycle made on an error path can hold
# a value of up to 1 MiB until then (kvsvr_tests/test_cache_memory.py bounds
# the node's RSS). Freezing moves what startup built out of later sweeps.
GC_GEN0_THRESHOLD = 10_000
GC_OLDER_THRESHOLD = 20


def tune_gc() -> None:
    """Tune the cyclic collector for a long-running node process (see above)."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)


# `kvsvr node` exits with this when its data directory or peers belong to
# another cluster (the CLI's "any other error").
EXIT_WRONG_CLUSTER = 5


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def run_node(config_path: str, node_id: str, initial_state: str | None = None) -> int:
    """`kvsvr node`: serve until SIGTERM or SIGINT. Returns the exit code.
    `initial_state` ("new" or "existing") overrides the config's."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {node_id} %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(config_path)
    config.node(node_id)  # fail early, with the list of known ids
    _require_cluster_id(config)
    log.info("build: %s", _build.describe(_build.compiled_modules()))
    tune_gc()
    try:
        trio.run(_main, config, node_id, initial_state)
    except (lifecycle.WrongCluster, BaseExceptionGroup) as failure:
        refused = _leaves(failure)
        if not all(isinstance(leaf, lifecycle.WrongCluster) for leaf in refused):
            raise
    else:
        return 0
    for reason in refused:
        log.error("refusing to run: %s", reason)
        print(f"kvsvr node {node_id}: refusing to run: {reason}", file=sys.stderr, flush=True)
    return EXIT_WRONG_CLUSTER
