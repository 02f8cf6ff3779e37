"""Which version of a key a backup keeps, from the copies of its replicas.

Pure: rows in, a decision out. The argument that it keeps every write
acknowledged before the backup started is in docs/DESIGN.md ("Backup and
restore"); in short, for a strong table:

- a version some replica holds chosen is chosen: the highest one is a
  candidate;
- a proposal above it that a majority of the replica set holds accepted, by
  the same (ballot, version), was accepted by a majority, so it is chosen:
  the highest such proposal wins;
- any other proposal above the highest chosen version may or may not be
  chosen: the key is `AMBIGUOUS` and the caller settles it with a strong
  read through the cluster.

An eventual table's rows are merged as anti-entropy merges them: the highest
stamp (which is the row's version) wins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from enum import Enum
from typing import Final

from kvsvr.backup.format import Record
from kvsvr.protocol.state import Ballot, Row


class Settle(Enum):
    # The copies cannot tell whether a proposal in flight was chosen.
    AMBIGUOUS = "ambiguous"
    # Absent or deleted everywhere the copies can tell.
    ABSENT = "absent"


# A copy of a row that failed its crc32c: it may have hidden a proposal, so
# a key with one is settled through the cluster.
CORRUPT: Final = "corrupt"

Copy = Row | None | str  # a row, no row in that copy, or CORRUPT


def quorum(replication: int) -> int:
    return replication // 2 + 1


def settle_strong(
    table: str, key: bytes, copies: Sequence[Copy], replication: int
) -> Record | Settle:
    """The record a backup keeps for a strong table's key, from the rows of
    the replicas whose copies the backup has (at most `replication` of them;
    `None` where a copy holds no row)."""
    assert len(copies) <= replication, "more copies than replicas"
    if any(copy == CORRUPT for copy in copies):
        return Settle.AMBIGUOUS
    rows = [copy for copy in copies if isinstance(copy, Row)]
    chosen = max(rows, key=_version, default=None)
    chosen_version = chosen.version if chosen is not None else 0
    if all(row.accepted is None for row in rows):  # the common case: nothing in flight
        return _chosen_record(table, key, chosen)
    in_flight: Counter[tuple[int, Ballot]] = Counter()
    proposals: dict[tuple[int, Ballot], Row] = {}
    for row in rows:
        accepted = row.accepted
        if accepted is not None and accepted.version > chosen_version:
            name = (accepted.version, accepted.ballot)
            in_flight[name] += 1
            proposals[name] = row
    if not in_flight:
        return _chosen_record(table, key, chosen)
    held = [name for name, count in in_flight.items() if count >= quorum(replication)]
    if not held:
        return Settle.AMBIGUOUS
    row = proposals[max(held)]
    accepted = row.accepted
    assert accepted is not None
    if accepted.value is None:
        return Settle.ABSENT
    return Record(
        table, key, accepted.version, accepted.value, accepted.expires_at_ms, 0, accepted.op_id
    )


def _version(row: Row) -> int:
    return row.version


def settle_eventual(table: str, key: bytes, copies: Sequence[Copy]) -> Record | Settle:
    """The record a backup keeps for an eventual table's key: the copy with
    the highest stamp. A corrupt copy is skipped; the others still hold every
    write each of them took."""
    rows = [copy for copy in copies if isinstance(copy, Row)]
    latest = max(rows, key=lambda row: (row.version, row.hlc), default=None)
    return _chosen_record(table, key, latest)


def _chosen_record(table: str, key: bytes, row: Row | None) -> Record | Settle:
    if row is None or row.version == 0 or row.value is None:
        return Settle.ABSENT
    return Record(table, key, row.version, row.value, row.expires_at_ms, row.hlc, row.op_id)
