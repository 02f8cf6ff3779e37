"""A deterministic world for the sans-IO protocol core.

Replicas, coordinators and clients live in one process; a seeded random source
decides every delay, loss, duplication, partition and crash, so a seed replays
exactly. Time is simulated (an event heap), never read from a clock.

The replicas run `kvsvr.protocol.replica`, the coordinators run
`kvsvr.protocol.coordinator` operations: the very code the real node runs.
A replica makes its row durable as it handles a message (before replying), as
the node does through its group commit; a crash therefore loses the node's
coordinator state (leases, ballots seen, operations in flight) and the
messages in flight, never an answered promise or accept.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from kvsvr.protocol import replica
from kvsvr.protocol.coordinator import (
    Coordinator,
    Mutation,
    Outcome,
    Replies,
    Round,
    Status,
    is_positive,
)
from kvsvr.protocol.messages import Accept, Read, Reply, Request, ScanRequest
from kvsvr.protocol.read_lease import Grants, Holds, LeaseTiming
from kvsvr.protocol.state import EMPTY_ROW, Row

# A round the driver has waited this long for is answered with what came in.
# Drawn per round between these multiples of the network's worst round trip
# (and at least ROUND_TIMEOUT_S): sometimes below it, so that late replies land
# in later rounds; mostly above it, so that operations can finish.
ROUND_TIMEOUT_S = 0.05
ROUND_TIMEOUT_RTT_FACTORS = (0.5, 3.0)
LOCAL_DELAY_S = 0.0001


@dataclass
class NetworkFaults:
    """Per-message fault probabilities and delays, in seconds."""

    delay_min_s: float = 0.0005
    delay_max_s: float = 0.005
    loss: float = 0.0
    duplication: float = 0.0


@dataclass
class SimNode:
    node_id: int
    rows: dict[tuple[str, bytes], Row] = field(default_factory=dict)
    coordinator: Coordinator | None = None
    up: bool = True
    incarnation: int = 0
    # The node's monotonic clock: clock_offset + clock_rate * simulated time.
    clock_rate: float = 1.0
    clock_offset: float = 0.0
    # Read leases (None when the world runs without them): the grants this
    # replica made, the leases this coordinator holds, and the value each
    # held key had when it was read or written under the lease.
    grants: Grants | None = None
    holds: Holds | None = None
    leased_values: dict[tuple[str, bytes], tuple[int, bytes | None]] = field(default_factory=dict)


@dataclass
class _RunningOp:
    op_token: int
    node_id: int
    incarnation: int
    generator: Generator[Round, Replies, Outcome]
    on_done: Callable[[Outcome | None], None]
    round_number: int = 0
    current: Round | None = None
    replies: Replies = field(default_factory=dict)
    finished: bool = False


class World:
    def __init__(
        self,
        seed: int,
        node_count: int = 3,
        faults: NetworkFaults | None = None,
        trace: Callable[[str], None] | None = None,
        leases: LeaseTiming | None = None,
        clock_rates: dict[int, float] | None = None,
    ) -> None:
        """`leases`: run with read leases. `clock_rates`: node -> the rate of
        its monotonic clock against simulated time (1.0 when not named)."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.now_s = 0.0
        self.faults = faults or NetworkFaults()
        self.leases = leases
        self.nodes = {i: SimNode(i) for i in range(1, node_count + 1)}
        for node in self.nodes.values():
            node.coordinator = Coordinator(node.node_id, random.Random(self.rng.getrandbits(64)))
            node.clock_rate = (clock_rates or {}).get(node.node_id, 1.0)
            node.clock_offset = 1000.0 * node.node_id
            self._start_leases(node)
        self.replicas = sorted(self.nodes)
        self.blocked: set[tuple[int, int]] = set()  # directed links that drop everything
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = 0
        self._op_tokens = 0
        self._ops: dict[int, _RunningOp] = {}
        self._trace = trace
        # Every value ever chosen per (table, key, version), across all replicas.
        self.chosen: dict[tuple[str, bytes, int], bytes | None] = {}
        self.messages_sent = 0
        self.local_reads = 0  # strong reads a lease holder answered with no message

    # ------------------------------------------------------------ events

    def at(self, delay_s: float, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (self.now_s + delay_s, self._sequence, action))

    def run_until(self, time_s: float) -> None:
        while self._events and self._events[0][0] <= time_s:
            when, _, action = heapq.heappop(self._events)
            self.now_s = when
            action()
        self.now_s = max(self.now_s, time_s)

    def run_until_idle(self, limit_s: float = 3600.0) -> None:
        while self._events and self._events[0][0] <= limit_s:
            when, _, action = heapq.heappop(self._events)
            self.now_s = when
            action()

    def clock(self, node: SimNode) -> float:
        return node.clock_offset + node.clock_rate * self.now_s

    def _start_leases(self, node: SimNode) -> None:
        """A node starting up: no grants remembered (so none made for one
        hold period), no leases held."""
        node.leased_values = {}
        if self.leases is None:
            return
        node.grants = Grants(self.leases, started_at=self.clock(node))
        node.holds = Holds(self.leases)

    def log(self, text: str) -> None:
        if self._trace is not None:
            self._trace(f"{self.now_s:10.6f} {text}")

    # ------------------------------------------------------------ faults

    def partition(self, groups: list[set[int]]) -> None:
        """Only nodes within one group can talk."""
        self.blocked = {
            (a, b)
            for a in self.nodes
            for b in self.nodes
            if a != b and not any(a in g and b in g for g in groups)
        }
        self.log(f"partition {groups}")

    def heal(self) -> None:
        self.blocked = set()
        self.log("heal")

    def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if not node.up:
            return
        node.up = False
        node.incarnation += 1
        node.coordinator = None
        self.log(f"crash n{node_id}")
        for op in list(self._ops.values()):
            if op.node_id == node_id and not op.finished:
                op.finished = True
                del self._ops[op.op_token]
                op.on_done(None)

    def restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if node.up:
            return
        node.up = True
        node.coordinator = Coordinator(node_id, random.Random(self.rng.getrandbits(64)))
        self._start_leases(node)
        self.log(f"restart n{node_id}")

    # ------------------------------------------------------------ network

    def _send(self, src: int, dst: int, payload: tuple[Any, ...]) -> None:
        self.messages_sent += 1
        if src == dst:
            self.at(LOCAL_DELAY_S, lambda: self._deliver(dst, payload))
            return
        if (src, dst) in self.blocked or self.rng.random() < self.faults.loss:
            return
        copies = 2 if self.rng.random() < self.faults.duplication else 1
        for _ in range(copies):
            delay = self.rng.uniform(self.faults.delay_min_s, self.faults.delay_max_s)
            self.at(delay, lambda: self._deliver(dst, payload))

    def _deliver(self, dst: int, payload: tuple[Any, ...]) -> None:
        node = self.nodes[dst]
        if not node.up:
            return
        kind = payload[0]
        if kind == "request":
            _, src, op_token, round_number, message = payload
            reply = self._handle(node, message)
            if reply is not None and op_token:
                self._send(dst, src, ("reply", dst, op_token, round_number, reply))
        elif kind == "reply":
            _, src, op_token, round_number, reply = payload
            self._on_reply(op_token, round_number, src, reply)

    def _handle(self, node: SimNode, message: Request) -> Reply | None:
        if isinstance(message, ScanRequest):
            prefix = message.prefix
            keys = sorted(
                k
                for (t, k) in node.rows
                if t == message.table
                and k.startswith(prefix)
                and k >= message.start
                and (not message.end or k < message.end)
            )
            entries = tuple(
                replica.scan_entry(k, node.rows[(message.table, k)]) for k in keys[: message.limit]
            )
            from kvsvr.protocol.messages import ScanReply

            return ScanReply(entries, len(keys) > message.limit)
        slot = (message.table, message.key)
        row = node.rows.get(slot, EMPTY_ROW)
        grants = node.grants
        new_row: Row | None
        reply: Reply | None
        if grants is not None and isinstance(message, Read) and message.lease_for:
            granted = grants.grant(message.table, message.key, message.lease_for, self.clock(node))
            return replica.on_read(row, message, granted)
        if grants is not None and isinstance(message, Accept):
            wait_s = grants.wait_s(message.table, message.key, message.ballot[1], self.clock(node))
            new_row, reply = replica.on_accept(row, message, wait_s)
        else:
            new_row, reply = replica.handle(row, message)
        if new_row is not None:
            node.rows[slot] = new_row
            self._record_chosen(message.table, message.key, new_row)
        return reply

    def _record_chosen(self, table: str, key: bytes, row: Row) -> None:
        if row.version == 0:
            return
        slot = (table, key, row.version)
        if slot in self.chosen:
            assert self.chosen[slot] == row.value, (
                f"seed {self.seed}: two values chosen for {key!r} version {row.version}: "
                f"{self.chosen[slot]!r} and {row.value!r}"
            )
        else:
            self.chosen[slot] = row.value

    # ------------------------------------------------------------ operations

    def start(
        self,
        node_id: int,
        make: Callable[[Coordinator], Generator[Round, Replies, Outcome]],
        on_done: Callable[[Outcome | None], None],
    ) -> None:
        """Run an operation coordinated by `node_id`; `on_done(None)` if it crashed."""
        node = self.nodes[node_id]
        if not node.up or node.coordinator is None:
            on_done(None)
            return
        self._op_tokens += 1
        op = _RunningOp(self._op_tokens, node_id, node.incarnation, make(node.coordinator), on_done)
        self._ops[op.op_token] = op
        self._advance(op, {})

    def _advance(self, op: _RunningOp, replies: Replies) -> None:
        while True:
            try:
                current = op.generator.send(replies) if op.round_number else next(op.generator)
            except StopIteration as stop:
                op.finished = True
                del self._ops[op.op_token]
                self.log(f"op{op.op_token}@n{op.node_id} done {stop.value!r} after {replies!r}")
                op.on_done(stop.value)
                return
            op.round_number += 1
            if self._trace is not None:
                kinds = {type(m).__name__ for m in current.requests.values()}
                self.log(
                    f"op{op.op_token}@n{op.node_id} round {op.round_number} {sorted(kinds)} "
                    f"got {replies!r} -> {list(current.requests.values())[:1]!r}"
                )
            for dst, message in current.oneway:
                self._send(op.node_id, dst, ("request", op.node_id, 0, 0, message))
            if not current.requests:
                replies = {}
                continue
            op.current = current
            op.replies = {}
            round_number = op.round_number
            if current.delay_s > 0:
                self.at(
                    current.delay_s,
                    lambda op=op, number=round_number: self._send_round(op, number),  # type: ignore[misc]
                )
            else:
                self._send_round(op, round_number)
            return

    def _send_round(self, op: _RunningOp, round_number: int) -> None:
        if op.finished or op.round_number != round_number or op.current is None:
            return
        holds = self.nodes[op.node_id].holds
        if holds is not None:
            for message in op.current.requests.values():
                if isinstance(message, Accept):
                    holds.accept_sent(message.table, message.key)
                    break  # one key per round
        for dst, message in op.current.requests.items():
            self._send(op.node_id, dst, ("request", op.node_id, op.op_token, round_number, message))
        worst_rtt_s = 2 * self.faults.delay_max_s
        timeout_s = max(ROUND_TIMEOUT_S, worst_rtt_s * self.rng.uniform(*ROUND_TIMEOUT_RTT_FACTORS))
        self.at(timeout_s, lambda: self._round_timeout(op.op_token, round_number))

    def _round_timeout(self, op_token: int, round_number: int) -> None:
        op = self._ops.get(op_token)
        if op is None or op.round_number != round_number:
            return
        self._advance(op, op.replies)

    def _on_reply(self, op_token: int, round_number: int, src: int, reply: Reply) -> None:
        op = self._ops.get(op_token)
        if op is None or op.round_number != round_number or op.current is None:
            return
        if src in op.replies or src not in op.current.requests:
            return
        op.replies[src] = reply
        positive = sum(1 for r in op.replies.values() if is_positive(r))
        negative = len(op.replies) - positive
        total = len(op.current.requests)
        if (
            positive >= op.current.quorum
            or negative > total - op.current.quorum
            or len(op.replies) == total
        ):
            self._advance(op, op.replies)

    # ------------------------------------------------------------ conveniences

    def write(
        self,
        node_id: int,
        key: bytes,
        mutation: Mutation,
        on_done: Callable[[Outcome | None], None],
    ) -> None:
        table = "default"
        now_ms = int(self.now_s * 1000)
        node = self.nodes[node_id]
        holds = node.holds
        if holds is not None and node.up:
            slot = (table, key)
            holds.write_started(table, key)
            incarnation = node.incarnation

            def done(outcome: Outcome | None) -> None:
                if node.incarnation == incarnation:
                    known = outcome is not None and outcome.status != Status.UNAVAILABLE
                    if outcome is not None and outcome.status == Status.OK:
                        node.leased_values[slot] = (outcome.version, mutation.value)
                    holds.write_finished(table, key, known)
                on_done(outcome)

            self.start(
                node_id,
                lambda c: c.write(
                    table, key, self.replicas, mutation, now_ms, self._known(node_id, key)
                ),
                done,
            )
            return
        self.start(
            node_id,
            lambda c: c.write(
                table, key, self.replicas, mutation, now_ms, self._known(node_id, key)
            ),
            on_done,
        )

    def read(self, node_id: int, key: bytes, on_done: Callable[[Outcome | None], None]) -> None:
        table = "default"
        now_ms = int(self.now_s * 1000)
        node = self.nodes[node_id]
        holds = node.holds
        if holds is None or not node.up:
            self.start(
                node_id,
                lambda c: c.read(table, key, self.replicas, now_ms, self._known(node_id, key)),
                on_done,
            )
            return
        slot = (table, key)
        leased = node.leased_values.get(slot)
        if leased is not None and holds.reads_locally(table, key, self.clock(node)):
            # Answered from the holder's own copy, with no message.
            version, value = leased
            self.local_reads += 1
            self.log(f"n{node_id} reads {key!r} locally at version {version}")
            self.at(LOCAL_DELAY_S, lambda: on_done(Outcome(Status.OK, version, value)))
            return
        sent_at = self.clock(node)
        started = holds.read_started(table, key)
        incarnation = node.incarnation

        def done(outcome: Outcome | None) -> None:
            if (
                outcome is not None
                and outcome.leased
                and node.incarnation == incarnation
                and holds.took(table, key, sent_at, self.clock(node), started)
            ):
                node.leased_values[slot] = (outcome.version, outcome.value)
            on_done(outcome)

        self.start(
            node_id,
            lambda c: c.read(
                table, key, self.replicas, now_ms, self._known(node_id, key), lease=True
            ),
            done,
        )

    def _known(self, node_id: int, key: bytes) -> int:
        return self.nodes[node_id].rows.get(("default", key), EMPTY_ROW).version
