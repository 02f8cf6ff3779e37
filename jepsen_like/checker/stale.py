"""Monotonicity of stale reads, per process.

kvsvr lets a client read from a replica without a Paxos round
(``consistency == "stale"``).  Such a read may lag, so it is exempt from
linearizability, but it must not go back in time for the client that issued
it: it never returns a version older than one that process already wrote or
read for that key.  Events carry the version in ``extra["version"]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .history import Op


@dataclass(frozen=True, slots=True)
class StaleReadProblem:
    """A stale read that returned an older version than its process had seen."""

    process: int
    key: str | None
    index: int
    version: int
    seen_version: int
    seen_index: int

    def __str__(self) -> str:
        return (
            f"process {self.process} key {self.key!r}: stale read (event {self.index}) "
            f"returned version {self.version} after seeing version {self.seen_version} "
            f"(event {self.seen_index})"
        )


def _field(name: str, *ops: Op) -> Any:
    for op in ops:
        if name in op.extra:
            return op.extra[name]
    return None


def is_stale_read(op: Op, invoke: Op | None = None) -> bool:
    """A stale read event (``consistency`` on it or on its invoke)."""
    if op.f != "read":
        return False
    consistency = _field("consistency", op, *(() if invoke is None else (invoke,)))
    return isinstance(consistency, str) and consistency == "stale"


def without_stale_reads(history: Iterable[Op]) -> list[Op]:
    """The history minus its stale reads (invokes and completions), for the
    linearizability check: a stale read may lag by design, so it is checked
    by :func:`check_stale_reads_monotonic` instead."""
    pending: dict[int, Op] = {}
    kept: list[Op] = []
    for op in history:
        if op.type == "invoke":
            pending[op.process] = op
            if not is_stale_read(op):
                kept.append(op)
            continue
        invoke = pending.pop(op.process, None)
        if not is_stale_read(op, invoke):
            kept.append(op)
    return kept


def check_stale_reads_monotonic(history: Iterable[Op]) -> list[StaleReadProblem]:
    """Report stale reads that went back in time for their own process.

    Only ``ok`` completions count, both for what a process has seen (writes
    and reads of any consistency) and for the reads checked.  ``version`` and
    ``consistency`` may sit on the invoke or the completion.
    """
    pending: dict[int, Op] = {}
    seen: dict[tuple[int, str | None], tuple[int, int]] = {}
    problems: list[StaleReadProblem] = []
    for op in history:
        if op.type == "invoke":
            pending[op.process] = op
            continue
        invoke = pending.pop(op.process, None)
        if op.type != "ok":
            continue
        version = _field("version", op, *(() if invoke is None else (invoke,)))
        if not isinstance(version, int) or isinstance(version, bool):
            continue
        slot = (op.process, op.key)
        consistency = _field("consistency", op, *(() if invoke is None else (invoke,)))
        previous = seen.get(slot)
        if op.f == "read" and consistency == "stale" and previous is not None:
            if version < previous[0]:
                problems.append(StaleReadProblem(op.process, op.key, op.index, version, *previous))
                continue
        if previous is None or version > previous[0]:
            seen[slot] = (version, op.index)
    return problems
