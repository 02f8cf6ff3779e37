"""LMDB storage: the row codec and the group-commit engine."""

from kvsvr.storage.codec import ROW_FORMAT_VERSION, decode_row, encode_row
from kvsvr.storage.engine import (
    HINTS_DB,
    META_DB,
    CommitTicket,
    Storage,
    StorageClosed,
    StorageFailed,
    StorageOverloaded,
    StorageStats,
)

__all__ = [
    "HINTS_DB",
    "META_DB",
    "ROW_FORMAT_VERSION",
    "CommitTicket",
    "Storage",
    "StorageClosed",
    "StorageFailed",
    "StorageOverloaded",
    "StorageStats",
    "decode_row",
    "encode_row",
]
