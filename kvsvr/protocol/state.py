"""The durable per-key replica state: PaxosStore's "log as value".

A row keeps only the latest chosen entry (version, value) and the proposal in
flight for a later version (accepted ballot, version, value), plus the highest
ballot this replica promised. Nothing older is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

# How many earlier chosen versions a row remembers the operation ids of, so a
# coordinator overtaken by other writers can still learn whether its attempt
# was chosen (instead of answering "outcome unknown"). 8 pairs are 16 integers
# per row; duels rarely push a key more than a few versions past an attempt.
RECENT_OPS_MAX = 8

# (round, node_index). Tuples compare lexicographically, which is the ballot order.
Ballot: TypeAlias = tuple[int, int]
ZERO_BALLOT: Ballot = (0, 0)


# Rows are values, never changed after they are built (the replica makes a
# new one per transition); not `frozen` only because a frozen __init__ costs
# about 5x a plain one, and every row change builds one. `unsafe_hash`
# keeps them hashable.
@dataclass(slots=True, unsafe_hash=True)
class Accepted:
    """A proposal this replica accepted and has not yet learned as chosen."""

    ballot: Ballot
    version: int
    value: bytes | None  # None: the proposal is a delete (tombstone)
    expires_at_ms: int | None = None
    # Identifies the client operation that proposed it, so a coordinator that
    # recovers its own earlier, partly accepted attempt knows it took effect.
    op_id: int = 0


@dataclass(slots=True, unsafe_hash=True)
class Row:
    """One key's replica state. `version == 0` means never written."""

    version: int = 0
    value: bytes | None = None  # None: absent or deleted (tombstone when version > 0)
    expires_at_ms: int | None = None  # absolute unix time in ms; None: never expires
    promised: Ballot = ZERO_BALLOT
    accepted: Accepted | None = None
    # Hybrid logical clock stamp of the value (eventual tables, last writer wins).
    hlc: int = 0
    # The operation whose value was chosen at `version`: lets a coordinator that
    # lost track of its own attempt learn whether it was chosen.
    op_id: int = 0
    # (version, op_id) of earlier chosen versions this replica saw, newest first.
    recent_ops: tuple[tuple[int, int], ...] = ()


EMPTY_ROW = Row()
