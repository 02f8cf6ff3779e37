"""The change log a node keeps for watches: the rules, without IO.

A replica keeps only its latest chosen row, so a watch needs history. Each
node records, in memory, every chosen version its replica learns, as a
`Change`: the key, the version, its value (None: deleted) and `previous`, the
version the replica held just before (-1 when the log does not know it). A
watch asks for the changes of a key after its cursor (the last version it
delivered) and gets, in version order, the changes the log can chain from
that cursor:

- a change is deliverable after cursor `c` when `previous <= c < version`: the
  node's replica went from `previous` (at or below what the watcher has) to
  `version`, so nothing is delivered twice and nothing older than the cursor;
- when the first change above `c` has `previous > c`, or an unknown previous
  with `version > c + 1`, or the log holds nothing above `c` although the
  replica's row is newer, the history the watcher needs is gone (`after`
  answers None; the node raises `WatchCompacted`), and the client re-reads.

Versions between `previous` and `version` were either folded into one write
(a group of blind puts takes k versions and only the last has a value, see
docs/DESIGN.md "Coordinator concurrency") or chosen while this replica
learned nothing; an event carries `previous` so the watcher sees them.

Bounds: `HISTORY_PER_KEY_MAX` changes per key, `HISTORY_BYTES_MAX` in all
(the least recently changed keys go first). Forgetting history only ever
turns a resume into `COMPACTED`, never into a gap or a duplicate.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# Changes kept per key: a watcher that falls further behind one key than this
# re-reads it. 64 covers a mailbox key rewritten in bursts between two reads.
HISTORY_PER_KEY_MAX: Final = 64
# Bytes of history per node (keys, values and `CHANGE_OVERHEAD_BYTES` each):
# memory the node spends on watches whether or not anyone watches.
HISTORY_BYTES_MAX: Final = 32 * 1024 * 1024
# Python's cost of one change beyond its key and value (object, deque slot).
CHANGE_OVERHEAD_BYTES: Final = 160
# Changes one answer to a watch carries at most: bounds a reply's size along
# with the frame limit (values are at most `RECORD_BYTES_MAX`).
CHANGES_PER_ANSWER_MAX: Final = 256
# Bytes of values one answer carries at most (one change always fits).
ANSWER_BYTES_MAX: Final = 4 * 1024 * 1024

UNKNOWN_PREVIOUS: Final = -1


@dataclass(slots=True, frozen=True)
class Change:
    key: bytes
    version: int
    previous: int  # the replica's version before this one; -1: unknown
    value: bytes | None  # None: the key was deleted

    @property
    def size_bytes(self) -> int:
        return len(self.key) + len(self.value or b"") + CHANGE_OVERHEAD_BYTES


LogKey = tuple[bytes, bytes]  # (sub-database name, encoded key)


class ChangeLog:
    """Recent chosen versions per key, bounded per key and in bytes."""

    def __init__(
        self,
        per_key_max: int = HISTORY_PER_KEY_MAX,
        bytes_max: int = HISTORY_BYTES_MAX,
    ) -> None:
        assert per_key_max >= 1 and bytes_max >= 0
        self.per_key_max = per_key_max
        self.bytes_max = bytes_max
        self.size_bytes = 0
        self.changes_recorded = 0
        self.keys_forgotten = 0
        # Least recently changed key first.
        self._keys: OrderedDict[LogKey, deque[Change]] = OrderedDict()
        # The logged keys of each (sub-database, group): a partition watch's
        # keys without a walk over the whole log.
        self._groups: dict[LogKey, set[bytes]] = {}
        self._group_of: dict[LogKey, bytes] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def latest(self, db: bytes, key: bytes) -> int:
        """The newest version logged for a key; -1 when none is."""
        changes = self._keys.get((db, key))
        return changes[-1].version if changes else UNKNOWN_PREVIOUS

    def record(
        self, db: bytes, key: bytes, version: int, value: bytes | None, group: bytes = b""
    ) -> Change | None:
        """Log that the replica's row of `key` (one of `group`, its partition
        key's prefix) is at chosen `version`. Returns
        the new change, or None when it is not news (the version is not above
        the newest logged: a promise or an accept rewrote the row)."""
        log_key = (db, key)
        changes = self._keys.get(log_key)
        if changes is None:
            if version <= 0:
                return None
            previous = 0 if version == 1 else UNKNOWN_PREVIOUS
            changes = deque()
            self._keys[log_key] = changes
            self._group_of[log_key] = group
            self._groups.setdefault((db, group), set()).add(key)
        else:
            previous = changes[-1].version
            if version <= previous:
                return None
            self._keys.move_to_end(log_key)
        change = Change(key, version, previous, value)
        changes.append(change)
        self.size_bytes += change.size_bytes
        self.changes_recorded += 1
        if len(changes) > self.per_key_max:
            self.size_bytes -= changes.popleft().size_bytes
        self._shrink()
        return change

    def _shrink(self) -> None:
        while self.size_bytes > self.bytes_max and self._keys:
            log_key, changes = self._keys.popitem(last=False)
            self.size_bytes -= sum(change.size_bytes for change in changes)
            group_key = (log_key[0], self._group_of.pop(log_key))
            members = self._groups[group_key]
            members.discard(log_key[1])
            if not members:
                del self._groups[group_key]
            self.keys_forgotten += 1
        assert self.size_bytes >= 0

    def after(
        self, db: bytes, key: bytes, cursor: int, row_version: Callable[[], int]
    ) -> list[Change] | None:
        """The changes of `key` to deliver to a watcher at `cursor`, in version
        order (empty: wait), or None when the history is gone (COMPACTED in
        the module docstring). `row_version` reads the replica's current
        chosen version of the key, asked only when the log has nothing newer."""
        assert cursor >= 0
        changes = self._keys.get((db, key))
        if not changes or changes[-1].version <= cursor:
            return None if row_version() > cursor else []
        found: list[Change] = []
        answer_bytes = 0
        for change in changes:
            if change.version <= cursor:
                continue
            if not found and not _chains(change, cursor):
                return None
            answer_bytes += change.size_bytes
            if found and (len(found) >= CHANGES_PER_ANSWER_MAX or answer_bytes > ANSWER_BYTES_MAX):
                break
            found.append(change)
        return found

    def keys_in_group(self, db: bytes, group: bytes) -> list[bytes]:
        """The logged keys of one group, in key order."""
        return sorted(self._groups.get((db, group), ()))


def _chains(change: Change, cursor: int) -> bool:
    """Whether `change` follows a watcher at `cursor` with nothing in between
    that the log knows of (see the module docstring)."""
    if change.previous == UNKNOWN_PREVIOUS:
        return change.version == cursor + 1
    return change.previous <= cursor
