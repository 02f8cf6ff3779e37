"""The change log a node keeps for watches: the rules, without IO.

A replica keeps only its latest chosen row, so a watch needs history. Each
node records, in memory, every chosen version its replica learns, per key: a
*base* (the version the replica held when the log began following the key)
and after it each `Change`: the version, its value (None: deleted) and
`previous`, the version the replica held just before. So the log knows
everything its replica learned about the key since the base.

A replica's versions are not always consecutive: a group of k folded blind
puts takes k versions and only the last has a value (the others are never
chosen on their own, see docs/DESIGN.md "Coordinator concurrency"), and a
replica that missed a commit learns a later version directly. From its own
log a node cannot tell the two apart, so a change that skips versions is
*unchecked* until the node has asked the other replicas for what their logs
hold between (`between`, answered by every peer, and `fill`): once enough
of them answered, the versions they knew are inserted and the skip is
*checked*: what is left was folded (or learned by no replica that answered).

A watch asks for the changes of a key after its cursor (the last version it
delivered) and gets, in version order, those it may deliver (`after`):

- nothing at or below the cursor (no duplicate), nothing past an unchecked
  skip (the node asks its peers first: `Answer.gap`);
- when the cursor is below the base, or the log does not follow the key
  while the replica's row is newer than the cursor, the history is gone
  (`after` answers None; the node raises `WatchCompacted`) and the client
  re-reads.

Bounds: `HISTORY_PER_KEY_MAX` changes per key (dropping the oldest moves the
base up), `HISTORY_BYTES_MAX` in all (the least recently changed keys are
forgotten whole). Forgetting only ever turns a resume into `WatchCompacted`,
never into a gap or a duplicate.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

# Changes kept per key: a watcher that falls further behind one key than this
# re-reads it. 64 covers a mailbox key rewritten in bursts between two reads.
HISTORY_PER_KEY_MAX: Final = 64
# Bytes of history per node (keys, values and `CHANGE_OVERHEAD_BYTES` each):
# memory the node spends on watches whether or not anyone watches.
HISTORY_BYTES_MAX: Final = 32 * 1024 * 1024
# Python's cost of one change (or a key's entry) beyond its key and value.
CHANGE_OVERHEAD_BYTES: Final = 160
# Changes one answer to a watch (or to a peer) carries at most: bounds a
# reply's size along with the frame limit (values are at most RECORD_BYTES_MAX).
CHANGES_PER_ANSWER_MAX: Final = 256
# Bytes of changes (`Change.size_bytes`) one answer gathers before it stops:
# one change always fits, and a partition watch's answer adds no more keys
# past it, so an answer stays under twice this plus one value, well within
# the 16 MiB frame limit.
ANSWER_BYTES_MAX: Final = 4 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class Change:
    key: bytes
    version: int
    previous: int  # the replica's version before this one
    value: bytes | None  # None: the key was deleted
    # The versions between `previous` and `version` were asked of the other
    # replicas (and what they knew was inserted before this change).
    checked: bool = False

    @property
    def skips(self) -> bool:
        """Whether versions between `previous` and this one are unaccounted for."""
        return self.version > self.previous + 1 and not self.checked

    @property
    def size_bytes(self) -> int:
        return len(self.key) + len(self.value or b"") + CHANGE_OVERHEAD_BYTES


@dataclass(slots=True)
class _KeyLog:
    base: int  # the replica's version when the log began following the key
    group: bytes
    changes: deque[Change] = field(default_factory=deque)

    @property
    def latest(self) -> int:
        return self.changes[-1].version if self.changes else self.base


@dataclass(frozen=True, slots=True)
class Answer:
    """What a watcher at a cursor may be given now."""

    changes: list[Change]
    # (previous, version) of the first unchecked skip the watch reached: the
    # node asks its peers about it before the watch may pass it.
    gap: tuple[int, int] | None = None


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
        self.changes_filled = 0
        self.keys_forgotten = 0
        # Least recently changed key first.
        self._keys: OrderedDict[LogKey, _KeyLog] = OrderedDict()
        # The followed keys of each (sub-database, group): a partition watch's
        # keys without a walk over the whole log.
        self._groups: dict[LogKey, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def follows(self, db: bytes, key: bytes) -> bool:
        return (db, key) in self._keys

    def latest(self, db: bytes, key: bytes) -> int:
        """The newest version logged for a key (its base if none); -1 when the
        log does not follow the key."""
        log = self._keys.get((db, key))
        return -1 if log is None else log.latest

    def record(
        self,
        db: bytes,
        key: bytes,
        version: int,
        value: bytes | None,
        group: bytes = b"",
        *,
        old_version: Callable[[], int | None],
        settled: bool = False,
    ) -> Change | None:
        """The replica's row of `key` (one of `group`, its partition key's
        prefix) is now at chosen `version`. `old_version` reads the version
        it held before (None: unreadable), asked only when the log does not
        follow the key yet. `settled`: the change never counts as a skip (an
        eventual table's versions are clock stamps, never consecutive).
        Returns the new change, or None when this is not news (a promise or
        an accept rewrote the row)."""
        log_key = (db, key)
        log = self._keys.get(log_key)
        if log is None:
            base = old_version()
            if base is None:
                return None  # unreadable: the next readable change starts the log
            log = _KeyLog(base, group)
            self._keys[log_key] = log
            self._groups.setdefault((db, group), set()).add(key)
            self.size_bytes += len(key) + CHANGE_OVERHEAD_BYTES
        else:
            self._keys.move_to_end(log_key)
        previous = log.latest
        if version <= previous:
            self._shrink()
            return None
        change = Change(key, version, previous, value, checked=settled)
        log.changes.append(change)
        self.size_bytes += change.size_bytes
        self.changes_recorded += 1
        self._trim(log)
        self._shrink()
        return change

    def _trim(self, log: _KeyLog) -> None:
        while len(log.changes) > self.per_key_max:
            dropped = log.changes.popleft()
            self.size_bytes -= dropped.size_bytes
            log.base = dropped.version

    def _shrink(self) -> None:
        while self.size_bytes > self.bytes_max and self._keys:
            (db, key), log = self._keys.popitem(last=False)
            self.size_bytes -= len(key) + CHANGE_OVERHEAD_BYTES
            self.size_bytes -= sum(change.size_bytes for change in log.changes)
            members = self._groups[(db, log.group)]
            members.discard(key)
            if not members:
                del self._groups[(db, log.group)]
            self.keys_forgotten += 1
        assert self.size_bytes >= 0

    def after(
        self, db: bytes, key: bytes, cursor: int, row_version: Callable[[], int]
    ) -> Answer | None:
        """What to deliver to a watcher at `cursor`, in version order (no
        changes: wait, or ask the peers about `gap`), or None when the history
        is gone. `row_version` reads the replica's current chosen version of
        the key, asked only when the log does not follow the key."""
        assert cursor >= 0
        log = self._keys.get((db, key))
        if log is None:
            return None if row_version() > cursor else Answer([])
        if cursor < log.base:
            return None
        found: list[Change] = []
        answer_bytes = 0
        for change in log.changes:
            if change.version <= cursor:
                continue
            if change.skips:
                return Answer(found, (change.previous, change.version))
            answer_bytes += change.size_bytes
            if found and (len(found) >= CHANGES_PER_ANSWER_MAX or answer_bytes > ANSWER_BYTES_MAX):
                break
            found.append(change)
        return Answer(found)

    def between(self, db: bytes, key: bytes, low: int, high: int) -> list[Change] | None:
        """For a peer settling a skip: the logged changes strictly between
        `low` and `high`, or None when this log cannot vouch for the range
        (it began following the key above `low`)."""
        log = self._keys.get((db, key))
        if log is None or log.base > low:
            return None
        inside = [change for change in log.changes if low < change.version < high]
        return inside[:CHANGES_PER_ANSWER_MAX]

    def fill(
        self,
        db: bytes,
        key: bytes,
        low: int,
        high: int,
        found: Iterable[tuple[int, bytes | None]],
    ) -> bool:
        """The peers' answer about the skip (low, high): insert the versions
        they knew and mark the skip checked. False when the log no longer
        holds that skip (trimmed, forgotten or settled meanwhile)."""
        log = self._keys.get((db, key))
        if log is None:
            return False
        position = next(
            (
                i
                for i, c in enumerate(log.changes)
                if c.version == high and c.previous == low and not c.checked
            ),
            None,
        )
        if position is None:
            return False
        versions = sorted({version: value for version, value in found}.items())
        inserted: list[Change] = []
        previous = low
        for version, value in versions:
            if not low < version < high:
                continue
            inserted.append(Change(key, version, previous, value, checked=True))
            previous = version
        old = log.changes[position]
        replaced = Change(key, old.version, previous, old.value, checked=True)
        changes = list(log.changes)
        changes[position : position + 1] = [*inserted, replaced]
        log.changes = deque(changes)
        self.size_bytes += sum(change.size_bytes for change in inserted)
        self.changes_filled += len(inserted)
        self._trim(log)
        self._shrink()
        return True

    def keys_in_group(self, db: bytes, group: bytes) -> list[bytes]:
        """The followed keys of one group, in key order."""
        return sorted(self._groups.get((db, group), ()))
