"""The node's row cache: chosen (version, value) per key, bounded by bytes.

Filled by the strong reads and the writes this node coordinates, evicting the
least recently used. A strong read still asks a majority for versions; the
cache only supplies the value when the quorum's version equals the cached one,
so it can make a read cheaper but never older. Stale reads may be served from
it directly (within the caller's age bound and session version).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# Default budget. The cache holds values a node serves often; 64 MiB keeps a
# node within a small container next to LMDB's page cache.
CACHE_BYTES_DEFAULT = 64 << 20
# Bookkeeping per entry beyond key and value (the OrderedDict node, the entry
# object, the tuple key): counted so that many tiny rows cannot overrun the budget.
ENTRY_OVERHEAD_BYTES = 200


# Never changed once built; not `frozen` only because a frozen __init__ costs
# about 5x a plain one, paid by every write and read this node coordinates.
@dataclass(slots=True, unsafe_hash=True)
class CachedRow:
    version: int
    value: bytes | None
    expires_at_ms: int | None
    cached_at_s: float  # monotonic seconds, when the node learned this version

    def size_bytes(self, key: bytes) -> int:
        return len(key) + (len(self.value) if self.value else 0) + ENTRY_OVERHEAD_BYTES


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stale_served: int = 0
    fallbacks: int = 0  # stale reads that had to become strong reads
    # Strong reads whose quorum chose the version the client's near cache
    # holds: answered "unchanged", without the value.
    unchanged: int = 0


class RowCache:
    def __init__(self, bytes_max: int = CACHE_BYTES_DEFAULT) -> None:
        assert bytes_max >= 0
        self.bytes_max = bytes_max
        self.bytes_used = 0
        # The most `bytes_used` has ever been: memory the process may still
        # hold after entries go (freed memory is not always given back).
        self.bytes_peak = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, bytes], CachedRow] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.bytes_max > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, table: str, key: bytes) -> CachedRow | None:
        entry = self._entries.get((table, key))
        if entry is None:
            return None
        self._entries.move_to_end((table, key))
        return entry

    def put(
        self,
        table: str,
        key: bytes,
        version: int,
        value: bytes | None,
        expires_at_ms: int | None,
        now_s: float,
    ) -> None:
        """Remember a chosen version; an older version never replaces a newer one."""
        if not self.enabled:
            return
        slot = (table, key)
        current = self._entries.get(slot)
        if current is not None:
            if current.version > version:
                return
            self.bytes_used -= current.size_bytes(key)
            del self._entries[slot]
        entry = CachedRow(version, value, expires_at_ms, now_s)
        size = entry.size_bytes(key)
        if size > self.bytes_max:
            return
        self._entries[slot] = entry
        self.bytes_used += size
        while self.bytes_used > self.bytes_max:
            (_, old_key), old = self._entries.popitem(last=False)
            self.bytes_used -= old.size_bytes(old_key)
            self.stats.evictions += 1
        assert self.bytes_used >= 0
        if self.bytes_used > self.bytes_peak:
            self.bytes_peak = self.bytes_used

    def budget_never_used(self) -> int:
        """Bytes of the budget the cache has never filled (`bytes_max` less the
        peak): memory the node's bound allows but the cache has not taken,
        which the residency guard lends to LMDB's map meanwhile."""
        return max(0, self.bytes_max - self.bytes_peak)

    def invalidate(self, table: str, key: bytes) -> None:
        entry = self._entries.pop((table, key), None)
        if entry is not None:
            self.bytes_used -= entry.size_bytes(key)

    def hit_ratio(self) -> float:
        total = self.stats.hits + self.stats.misses
        return self.stats.hits / total if total else 0.0
