"""The decoded-row cache in front of LMDB reads (see `DecodedRows`)."""

from __future__ import annotations

from collections import OrderedDict

from kvsvr.protocol.state import Row

# What a cached row costs beyond its encoded bytes (the Row, its tuples, the
# dict entry), so that tiny rows are not undercounted.
DECODED_ROW_OVERHEAD_BYTES = 400


class DecodedRows:
    """Rows as `Storage.read_row` returns them, by (database, key), least
    recently used first; bounded by `bytes_max` (the engine passes
    `DECODED_ROWS_BYTES_MAX`). Saves the LMDB read and the
    decode (crc32c, msgpack, field checks) of rows touched again soon.

    Coherent because it is write-through: every `stage` of a table row puts
    the new row (or drops the key), so it always holds what the overlay or
    LMDB would return; a fail-stop clears it with the overlay (it may hold
    writes that never reached the disk). Nothing but the `Storage` that owns it writes
    the file while it is open (a second writer would break the overlay too)."""

    def __init__(self, bytes_max: int) -> None:
        self._rows: OrderedDict[tuple[bytes, bytes], tuple[Row, int]] = OrderedDict()
        self._bytes = 0
        self._bytes_max = bytes_max

    def get(self, db_name: bytes, key: bytes) -> Row | None:
        entry = self._rows.get((db_name, key))
        if entry is None:
            return None
        self._rows.move_to_end((db_name, key))
        return entry[0]

    def put(self, db_name: bytes, key: bytes, row: Row, data_bytes: int) -> None:
        slot = (db_name, key)
        size = len(key) + data_bytes + DECODED_ROW_OVERHEAD_BYTES
        old = self._rows.pop(slot, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self._bytes_max:
            return
        self._rows[slot] = (row, size)
        self._bytes += size
        while self._bytes > self._bytes_max:
            _, (_, evicted) = self._rows.popitem(last=False)
            self._bytes -= evicted

    def drop(self, db_name: bytes, key: bytes) -> None:
        old = self._rows.pop((db_name, key), None)
        if old is not None:
            self._bytes -= old[1]

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0
