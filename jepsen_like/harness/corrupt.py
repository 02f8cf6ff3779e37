"""Flip bytes of stored rows in a stopped node's LMDB file (`data.mdb`).

Only the value bytes of rows are damaged, inside leaf pages, never LMDB's own
structure (page headers, node headers, keys, branch and meta pages): the file
stays a valid LMDB file whose rows fail their crc32c, which is what kvsvr
must detect. A row's value is made of ASCII digits in the harness workloads,
and a digit is turned into another digit, so a node that skipped the check
would serve a plausible wrong value, which the checker would then catch.

LMDB is copy-on-write, so old copies of a row can linger in free pages; every
copy of a chosen key's row is damaged, which makes sure the live one is.

The page layout read here is LMDB 0.9's on a 64-bit little-endian machine:
a 16-byte page header (pgno u64, pad u16, flags u16, lower u16, upper u16),
then `lower - 16` bytes of u16 node offsets; a leaf node is lo u16, hi u16
(data size = lo | hi << 16), flags u16, key size u16, the key, the data.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack

from kvsvr.errors import CorruptRow, InvalidRequest
from kvsvr.keys import decode_key
from kvsvr.storage.codec import CRC_BYTES, decode_row

PAGE_HEADER_BYTES: Final = 16
NODE_HEADER_BYTES: Final = 8
P_BRANCH: Final = 0x01
P_LEAF: Final = 0x02
P_OVERFLOW: Final = 0x04
P_META: Final = 0x08
P_LEAF2: Final = 0x20
F_BIGDATA: Final = 0x01
F_SUBDATA: Final = 0x02
F_DUPDATA: Final = 0x04
# The page size sits in the first meta page: header, magic u32, version u32,
# address u64, map size u64, then the free-list db record whose first u32
# (md_pad) holds the page size.
META_PAGE_SIZE_OFFSET: Final = PAGE_HEADER_BYTES + 4 + 4 + 8 + 8
LMDB_MAGIC: Final = 0xBEEFC0DE
DEFAULT_PAGE_SIZE: Final = 4096
PAGE_SIZE_MAX: Final = 1 << 16
# Keys whose rows one corruption damages, at most: a few is enough to see
# detection, and each damaged key is a key this replica can no longer serve.
CORRUPT_KEYS_MAX: Final = 3


class CorruptionError(Exception):
    """The file is not an LMDB file this module can read."""


@dataclass(frozen=True, slots=True)
class RowSite:
    """Where one stored copy of a row lies in the file."""

    key: bytes  # the encoded kvsvr key
    data_offset: int  # file offset of the row's bytes
    data_size: int


@dataclass(frozen=True, slots=True)
class Corruption:
    """What was damaged: the keys (as the workload names them) and byte offsets."""

    path: str
    keys: list[str]
    offsets: list[int]
    # Per key, the value bytes of each damaged copy (those that still parse):
    # what a node that skipped the crc check would serve.
    damaged_values: dict[str, list[bytes]]

    def describe(self) -> dict[str, object]:
        return {"file": self.path, "keys": self.keys, "copies": len(self.offsets)}


def page_size_of(data: bytes) -> int:
    if len(data) < META_PAGE_SIZE_OFFSET + 4:
        raise CorruptionError("file too short to be an LMDB data file")
    (magic,) = struct.unpack_from("<I", data, PAGE_HEADER_BYTES)
    if magic != LMDB_MAGIC:
        raise CorruptionError(f"no LMDB magic in the first page (found {magic:#x})")
    (size,) = struct.unpack_from("<I", data, META_PAGE_SIZE_OFFSET)
    if size < 512 or size > PAGE_SIZE_MAX or size & (size - 1):
        return DEFAULT_PAGE_SIZE
    return int(size)


def _leaf_nodes(data: bytes, page_start: int, page_size: int) -> Iterable[tuple[int, int, int]]:
    """(key offset, key size, data size) of each plain node of a leaf page."""
    _, _, flags, lower, upper = struct.unpack_from("<QHHHH", data, page_start)
    if not flags & P_LEAF or flags & (P_BRANCH | P_OVERFLOW | P_META | P_LEAF2):
        return
    if not PAGE_HEADER_BYTES <= lower <= upper <= page_size:
        return
    for slot in range((lower - PAGE_HEADER_BYTES) // 2):
        (node_offset,) = struct.unpack_from("<H", data, page_start + PAGE_HEADER_BYTES + 2 * slot)
        if not upper <= node_offset <= page_size - NODE_HEADER_BYTES:
            continue
        lo, hi, node_flags, key_size = struct.unpack_from("<HHHH", data, page_start + node_offset)
        if node_flags & (F_BIGDATA | F_SUBDATA | F_DUPDATA):
            continue
        data_size = lo | (hi << 16)
        key_offset = page_start + node_offset + NODE_HEADER_BYTES
        if node_offset + NODE_HEADER_BYTES + key_size + data_size > page_size:
            continue
        yield key_offset, key_size, data_size


def find_rows(data: bytes) -> list[RowSite]:
    """Every stored copy of an intact kvsvr row in an LMDB data file's bytes."""
    page_size = page_size_of(data)
    sites: list[RowSite] = []
    for page_start in range(0, len(data) - page_size + 1, page_size):
        for key_offset, key_size, data_size in _leaf_nodes(data, page_start, page_size):
            row_offset = key_offset + key_size
            row = data[row_offset : row_offset + data_size]
            try:
                decode_row(row)
                decode_key(data[key_offset : key_offset + key_size])
            except (CorruptRow, InvalidRequest):
                continue  # not a row: a sub-database record, meta, hints, damage
            sites.append(RowSite(data[key_offset : key_offset + key_size], row_offset, data_size))
    return sites


def _stored_value(row: bytes) -> bytes | None:
    """The value field of an encoded row, read without any check."""
    try:
        fields = msgpack.unpackb(row[CRC_BYTES:], raw=False)
    except Exception:  # msgpack raises many types; damage may make it unreadable
        return None
    value = fields[2] if isinstance(fields, list) and len(fields) > 2 else None
    return value if isinstance(value, bytes) else None


def _value_span(row: bytes) -> tuple[int, int] | None:
    """(offset, length) of the value bytes inside an encoded row, if it has a value."""
    fields = msgpack.unpackb(row[CRC_BYTES:], raw=False)
    value = fields[2] if isinstance(fields, list) and len(fields) > 2 else None
    if not isinstance(value, bytes) or not value:
        return None
    position = row.find(value, CRC_BYTES)
    return (position, len(value)) if position >= 0 else None


def damage_row(row: bytes, rng: random.Random) -> bytes:
    """The row with one byte changed: a digit of its value into another digit
    when the value has one, else any byte of its body. The crc32c no longer
    matches either way (a one-byte change always changes a crc)."""
    damaged = bytearray(row)
    span = _value_span(row)
    digits = (
        []
        if span is None
        else [span[0] + i for i in range(span[1]) if chr(row[span[0] + i]).isdigit()]
    )
    if digits:
        position = rng.choice(digits)
        damaged[position] = ord(rng.choice([d for d in "0123456789" if ord(d) != row[position]]))
    else:
        position = rng.randrange(CRC_BYTES, len(row))
        damaged[position] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def workload_key_name(encoded: bytes) -> str:
    partition_key, sort_key = decode_key(encoded)
    return (partition_key + sort_key).decode("utf-8", errors="replace")


def corrupt_file(
    path: str | os.PathLike[str],
    rng: random.Random,
    *,
    keys: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    keys_max: int = CORRUPT_KEYS_MAX,
) -> Corruption:
    """Damage every stored copy of the rows of up to `keys_max` keys.

    Keys are drawn from those found in the file (only those in `keys`, if
    given, and never those in `exclude`). The node owning the file must be
    stopped.
    """
    file_path = Path(path)
    data = file_path.read_bytes()
    sites = find_rows(data)
    wanted = None if keys is None else set(keys)
    unwanted = set(exclude)

    def eligible(name: str) -> bool:
        return (wanted is None or name in wanted) and name not in unwanted

    found = sorted({s.key for s in sites if eligible(workload_key_name(s.key))})
    chosen = set(rng.sample(found, min(keys_max, len(found))))
    offsets: list[int] = []
    damaged_values: dict[str, list[bytes]] = {}
    with file_path.open("r+b") as file:
        for site in sites:
            if site.key not in chosen:
                continue
            row = data[site.data_offset : site.data_offset + site.data_size]
            damaged = damage_row(row, rng)
            file.seek(site.data_offset)
            file.write(damaged)
            offsets.append(site.data_offset)
            value = _stored_value(damaged)
            if value is not None:
                damaged_values.setdefault(workload_key_name(site.key), []).append(value)
        file.flush()
        os.fsync(file.fileno())
    return Corruption(
        str(file_path), sorted(workload_key_name(k) for k in chosen), offsets, damaged_values
    )
