"""Eventual tables: hybrid logical clock stamps and last-writer-wins, as pure code.

A write to an eventual table is stamped by its coordinator with a hybrid
logical clock (HLC) value and sent to every replica; each replica keeps the
row with the highest stamp. The stamp is also the row's version, so the same
machinery that moves strong rows between replicas (hints, anti-entropy,
rebuild: "take the higher version") moves eventual rows.

Stamp layout (63 bits, so it fits msgpack's and LMDB's int64 comfortably):

    physical milliseconds (41 bits) | logical counter (16 bits) | node index (6 bits)

The node index makes stamps from different nodes distinct, so two concurrent
writes never tie. The logical part lets a node that has *seen* a stamp from
a node whose wall clock runs ahead issue stamps above it at once: a fast
clock wins only until the others hear from it, not forever (plain wall-clock
last-writer-wins lets it win until real time catches up).
"""

from __future__ import annotations

from kvsvr.protocol.state import Row

NODE_BITS = 6
LOGICAL_BITS = 16
NODE_INDEX_MAX = (1 << NODE_BITS) - 1
LOGICAL_MAX = (1 << LOGICAL_BITS) - 1
_SHIFT_MS = NODE_BITS + LOGICAL_BITS


def stamp_ms(stamp: int) -> int:
    """The physical milliseconds of a stamp (when, roughly, it was written)."""
    return stamp >> _SHIFT_MS


def make_stamp(ms: int, logical: int, node_index: int) -> int:
    assert 0 <= logical <= LOGICAL_MAX
    assert 0 < node_index <= NODE_INDEX_MAX
    assert ms >= 0
    return (ms << _SHIFT_MS) | (logical << NODE_BITS) | node_index


class HybridClock:
    """One node's HLC. `now(wall_ms)` issues a stamp above every stamp this
    clock issued or observed; `observe(stamp)` folds in a stamp from elsewhere.
    The wall clock is passed in (sans-IO: tests drive it)."""

    def __init__(self, node_index: int) -> None:
        assert 0 < node_index <= NODE_INDEX_MAX, "node index must fit in the stamp"
        self.node_index = node_index
        self.last_ms = 0
        self.logical = 0

    def now(self, wall_ms: int) -> int:
        if wall_ms > self.last_ms:
            self.last_ms = wall_ms
            self.logical = 0
        else:
            self._tick()
        return make_stamp(self.last_ms, self.logical, self.node_index)

    def observe(self, stamp: int) -> None:
        ms = stamp >> _SHIFT_MS
        logical = (stamp >> NODE_BITS) & LOGICAL_MAX
        if ms > self.last_ms:
            self.last_ms = ms
            self.logical = logical
        elif ms == self.last_ms and logical > self.logical:
            self.logical = logical

    def _tick(self) -> None:
        if self.logical < LOGICAL_MAX:
            self.logical += 1
        else:  # 65,536 stamps in one millisecond: borrow the next millisecond
            self.last_ms += 1
            self.logical = 0


def eventual_row(stamp: int, value: bytes | None, expires_at_ms: int | None) -> Row:
    """The row an eventual write stores: its stamp is its version."""
    assert stamp > 0
    return Row(version=stamp, value=value, expires_at_ms=expires_at_ms, hlc=stamp)


def lww_apply(current: Row, incoming: Row) -> Row | None:
    """Last writer wins: the incoming row replaces the current one only when its
    stamp is higher. None: keep the current row (an older or duplicate write,
    a replayed hint). Idempotent and commutative, so replicas converge
    whatever order the writes, hints and anti-entropy copies arrive in."""
    if incoming.version <= current.version:
        return None
    assert incoming.accepted is None, "eventual rows carry no Paxos proposal"
    return Row(
        version=incoming.version,
        value=incoming.value,
        expires_at_ms=incoming.expires_at_ms,
        hlc=incoming.version,
    )
