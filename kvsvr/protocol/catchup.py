"""The rules of catching up, sans-IO: digests, purges, learning rows, hints.

Replicas that missed a write catch up in the background (hinted handoff,
anti-entropy, rebuild: `kvsvr.node.replication`). What they compare and what
they keep is decided here, from rows and the time passed in:

- **Digests.** Each partition's rows fall in DIGEST_BUCKETS buckets by key; a
  bucket's digest is the xor of `row_hash(key, newest_version(row))` over its
  live rows. Two replicas whose bucket digests differ list that bucket's
  (key, version) pairs and pull the rows where the other is ahead.
- **Dead rows.** An eventual row that expired, or an eventual tombstone past
  its grace, is *dead*: no replica needs to copy it, and digests leave it out.
- **Purges.** An expired eventual row is deleted; an expired strong row keeps
  its version and promise and loses its value (`purge_row`).
- **Learning.** A chosen row from elsewhere only ever raises a key's version
  (`learn`), which is what makes every catch-up path idempotent.
- **Hints.** A hint is stored under (target, table, key), so a hot key keeps
  one hint, not one per write; its record is (created_ms, stored row).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from hashlib import blake2b
from typing import Final

import crc32c
import msgpack

from kvsvr.errors import CorruptRow
from kvsvr.protocol import replica
from kvsvr.protocol.eventual import lww_apply, stamp_ms
from kvsvr.protocol.state import ZERO_BALLOT, Row

# Buckets per partition in a digest: a difference lists the keys of 1/16 of
# the partition, and a digest answer stays small (16 ints per partition).
DIGEST_BUCKETS: Final = 16
# A table name in a hint key is prefixed by its length in one byte.
HINT_KEY_TABLE_BYTES_MAX: Final = 255

_VERSION = struct.Struct(">Q")


def newest_version(row: Row) -> int:
    """The version a row knows of: chosen, or proposed above it. Digests use
    it, so that a replica that has not even seen a proposal the others
    accepted (the last write of a key is committed lazily, on the next write
    or read) differs from them and gets the key settled."""
    return row.version if row.accepted is None else max(row.version, row.accepted.version)


def row_hash(key: bytes, version: int) -> int:
    # Not crc32c: a crc is linear, so crc(k1, v) ^ crc(k1, v') equals
    # crc(k2, v) ^ crc(k2, v') and two keys a version apart in one bucket would
    # cancel out of the xor. A cryptographic hash has no such structure.
    return int.from_bytes(blake2b(key + _VERSION.pack(version), digest_size=8).digest(), "big")


def bucket_of(key: bytes) -> int:
    return crc32c.crc32c(key) % DIGEST_BUCKETS


def is_dead(row: Row, eventual: bool, now: int, grace_ms: int) -> bool:
    """A row no replica needs to copy: an eventual row that expired, or an
    eventual tombstone past its grace. Left out of digests, so replicas that
    purged it and replicas that have not yet agree."""
    if not eventual:
        return False
    if row.expires_at_ms is not None and row.expires_at_ms <= now:
        return True
    return row.value is None and row.version > 0 and stamp_ms(row.version) + grace_ms < now


def purge_row(row: Row, eventual: bool, now: int) -> Row | bool | None:
    """What a background purge does to one row: False, nothing; None, delete
    it; a Row, rewrite it. Only expiry is decided here (tombstones need the
    other replicas' word, see `tombstone_purgeable`).

    A strong row that expired keeps its version, promise and any proposal and
    drops only the value: deleting the row would let the key's version start
    again from 0 on this replica while others remember the higher one, and a
    new write chosen at a lower version would then lose to the old version on
    every read that met such a replica. Expiry is part of the chosen value, so
    every replica drops the same value."""
    if row.expires_at_ms is None or row.expires_at_ms > now:
        return False
    if eventual:
        return None
    if row.value is None:
        return False
    return replace(row, value=None, expires_at_ms=None)


def tombstone_purgeable(version: int, other: Row) -> bool:
    """Whether another replica's row for a key lets us delete our tombstone at
    `version`: it holds the same tombstone, or nothing at all. Anything else
    (a newer write, or an older value a late hint could bring back) keeps it."""
    return other.version == 0 or (other.version == version and other.value is None)


def learn(current: Row, incoming: Row, eventual: bool) -> Row | None:
    """Fold a chosen row from elsewhere into ours; None when ours is as new."""
    if incoming.version <= current.version:
        return None
    if eventual:
        return lww_apply(current, incoming)
    return replica.apply_commit(
        current,
        incoming.version,
        ZERO_BALLOT,
        True,
        incoming.value,
        incoming.expires_at_ms,
        incoming.op_id,
    )


def hint_key(target: int, table: str, key: bytes) -> bytes:
    name = table.encode()
    assert 0 < target < 256 and len(name) <= HINT_KEY_TABLE_BYTES_MAX
    return bytes((target, len(name))) + name + key


def parse_hint_key(raw: bytes) -> tuple[int, str, bytes]:
    if len(raw) < 2 or len(raw) < 2 + raw[1]:
        raise CorruptRow(f"bad hint key {raw!r}")
    try:
        table = raw[2 : 2 + raw[1]].decode()
    except UnicodeDecodeError:
        raise CorruptRow(f"bad hint key {raw!r}") from None
    return raw[0], table, raw[2 + raw[1] :]


def pack_hint(created_ms: int, row_bytes: bytes) -> bytes:
    """A hint's record: when it was made (wall ms) and the stored row."""
    data: bytes = msgpack.packb([created_ms, row_bytes])
    return data


def unpack_hint(data: bytes) -> tuple[int, bytes]:
    """(created_ms, row bytes) of a hint record; CorruptRow if unreadable."""
    try:
        fields = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise CorruptRow("unreadable hint") from None
    if (
        not isinstance(fields, list)
        or len(fields) != 2
        or not isinstance(fields[0], int)
        or isinstance(fields[0], bool)
        or not isinstance(fields[1], bytes)
    ):
        raise CorruptRow("bad hint")
    return fields[0], fields[1]
