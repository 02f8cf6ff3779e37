"""What a client remembers between operations: per key, the highest version
its session saw (`SessionVersions`, the floor of its stale reads), and the
near cache of recent values (`NearCache`). Both are bounded and pure: no IO,
no clock of their own."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from kvsvr.api import GetReply
from kvsvr.errors import KvsvrError

# Keys whose versions the session remembers for stale reads (least recently used
# forgotten first). An entry costs up to ~1 KiB (a 500-byte key and overhead), so
# this bounds the memory to ~16 MiB; a forgotten key's stale reads lose only the
# "never backwards" promise, and only for keys the session has not touched in
# its last 16 Ki operations.
SESSION_KEYS_MAX: Final = 16 * 1024

# Bookkeeping per near-cache entry beyond key and value (the OrderedDict node,
# the entry, the tuple key): counted so tiny values cannot overrun the budget.
NEAR_CACHE_ENTRY_OVERHEAD_BYTES: Final = 200


# --- session versions ---------------------------------------------------------------


class SessionVersions:
    """Per (table, encoded key), the highest version this session wrote or read;
    least recently used entries beyond `capacity` are forgotten."""

    def __init__(self, capacity: int = SESSION_KEYS_MAX) -> None:
        assert capacity > 0
        self._capacity = capacity
        self._versions: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._versions)

    def observe(self, table: str, encoded_key: bytes, version: int) -> None:
        entry = (table, encoded_key)
        versions = self._versions
        known = versions.get(entry)
        if known is None:  # a new entry goes in last: the most recently used
            versions[entry] = version
            if len(versions) > self._capacity:
                versions.popitem(last=False)
            return
        if version > known:
            versions[entry] = version
        versions.move_to_end(entry)

    def version(self, table: str, encoded_key: bytes) -> int:
        """The version a read of this key must at least return (0: no constraint)."""
        entry = (table, encoded_key)
        version = self._versions.get(entry)
        if version is None:
            return 0
        self._versions.move_to_end(entry)
        return version


# --- the near cache -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NearEntry:
    version: int
    value: bytes
    expires_at_ms: int | None  # the node's clock; None: no TTL (or not told)

    def size_bytes(self, encoded_key: bytes) -> int:
        return len(encoded_key) + len(self.value) + NEAR_CACHE_ENTRY_OVERHEAD_BYTES


@dataclass(slots=True)
class NearCacheStats:
    unchanged: int = 0  # strong reads answered "unchanged": the value did not travel
    transferred: int = 0  # strong reads sent with a cached version that got a value back
    misses: int = 0  # strong reads with nothing cached for the key
    evictions: int = 0


class NearCache:
    """(table, encoded key) -> the latest (version, value) this client saw,
    least recently used first out, bounded by bytes. Never holds an older
    version in place of a newer one; absent values are not kept."""

    def __init__(self, bytes_max: int) -> None:
        assert bytes_max > 0
        self.bytes_max = bytes_max
        self.bytes_used = 0
        self.stats = NearCacheStats()
        self._entries: OrderedDict[tuple[str, bytes], NearEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, table: str, encoded_key: bytes, now_ms: int) -> NearEntry | None:
        """The entry, unless its value has expired by `now_ms` (then it goes:
        the node would answer "absent", never "unchanged", for it)."""
        slot = (table, encoded_key)
        entry = self._entries.get(slot)
        if entry is None:
            return None
        if entry.expires_at_ms is not None and entry.expires_at_ms <= now_ms:
            self.discard(table, encoded_key)
            return None
        self._entries.move_to_end(slot)
        return entry

    def put(
        self,
        table: str,
        encoded_key: bytes,
        version: int,
        value: bytes | None,
        expires_at_ms: int | None = None,
    ) -> None:
        slot = (table, encoded_key)
        current = self._entries.get(slot)
        if current is not None and current.version > version:
            return
        self.discard(table, encoded_key)
        if value is None:
            return
        entry = NearEntry(version, value, expires_at_ms)
        size = entry.size_bytes(encoded_key)
        if size > self.bytes_max:
            return
        self._entries[slot] = entry
        self.bytes_used += size
        while self.bytes_used > self.bytes_max:
            (_, old_key), old = self._entries.popitem(last=False)
            self.bytes_used -= old.size_bytes(old_key)
            self.stats.evictions += 1
        assert self.bytes_used >= 0

    def discard(self, table: str, encoded_key: bytes) -> None:
        entry = self._entries.pop((table, encoded_key), None)
        if entry is not None:
            self.bytes_used -= entry.size_bytes(encoded_key)


def near_reply(reply: GetReply, near: NearEntry) -> tuple[int, bytes | None, int | None]:
    """(version, value, expires_at_ms) of a strong get sent with `near`'s version."""
    if reply.unchanged:
        if reply.version != near.version:
            raise KvsvrError(
                f"malformed 'get' reply: unchanged at version {reply.version}, "
                f"but the client holds version {near.version}"
            )
        return reply.version, near.value, near.expires_at_ms
    return reply.version, reply.value, reply.expires_at_ms
