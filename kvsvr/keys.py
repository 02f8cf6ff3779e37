"""Keys: a partition key plus an optional sort key, encoded to one byte string.

All rows of one partition key sort together, in sort-key order, so a scan over
a partition key is one contiguous LMDB range. Encoding: 2-byte big-endian
length of the partition key, the partition key, then the sort key.
"""

from __future__ import annotations

import struct
from typing import TypeAlias

from kvsvr.errors import InvalidRequest

# LMDB's default maximum key size is 511 bytes; keep room for the 2-byte prefix.
KEY_BYTES_MAX = 500

KeyPart: TypeAlias = bytes | str
UserKey: TypeAlias = KeyPart | tuple[KeyPart, KeyPart]

_LENGTH = struct.Struct(">H")


def to_bytes(part: KeyPart) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode("utf-8")
    raise InvalidRequest(f"a key part must be bytes or str, not {type(part).__name__}")


def split_user_key(key: UserKey) -> tuple[bytes, bytes]:
    """(partition_key, sort_key) from what a user passed."""
    if isinstance(key, tuple):
        if len(key) != 2:
            raise InvalidRequest("a tuple key must be (partition_key, sort_key)")
        return to_bytes(key[0]), to_bytes(key[1])
    return to_bytes(key), b""


def encode_key(partition_key: bytes, sort_key: bytes = b"") -> bytes:
    if not partition_key:
        raise InvalidRequest("the partition key must not be empty")
    encoded = _LENGTH.pack(len(partition_key)) + partition_key + sort_key
    if len(encoded) > KEY_BYTES_MAX:
        raise InvalidRequest(f"key is {len(encoded)} bytes encoded; the limit is {KEY_BYTES_MAX}")
    return encoded


def decode_key(encoded: bytes) -> tuple[bytes, bytes]:
    if len(encoded) < 2:
        raise InvalidRequest("encoded key too short")
    (length,) = _LENGTH.unpack_from(encoded)
    if len(encoded) < 2 + length:
        raise InvalidRequest("encoded key truncated")
    return encoded[2 : 2 + length], encoded[2 + length :]


def partition_prefix(partition_key: bytes) -> bytes:
    """The common prefix of every encoded key of one partition key."""
    return _LENGTH.pack(len(partition_key)) + partition_key
