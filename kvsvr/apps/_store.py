"""Store patterns the applications share, built on `kvsvr.Client` only.

- Records are msgpack maps (`pack` / `unpack`), checked below the value limit.
- `put_retrying`: a blind put of a row whose value never changes (a unique
  key, append-only), retried when its outcome is unknown, which is safe
  because writing the same value twice leaves the same row.
- `claim`: put-if-absent that returns whichever value won, retried when its
  outcome is unknown: the basis of idempotent message ids.
- `advance_counter`: compare-and-set on a counter row, with a nonce in the
  value so that an attempt whose outcome was unknown learns whether it won.
- `contiguous`: which rows of a sequence-numbered log a reader may consume,
  stopping at a gap that may still be filled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import trio

from kvsvr.client import VALUE_BYTES_MAX, Client, Item
from kvsvr.errors import Conflict, KvsvrError, Unavailable
from kvsvr.keys import UserKey

Clock = Callable[[], float]  # seconds since the epoch; `time.time` unless a test injects one

# A write whose outcome is unknown (a node died mid-request) is tried again up
# to this many times; each attempt is bounded by the client's timeout, so a
# write gives up after at most this many timeouts.
WRITE_ATTEMPTS_MAX: Final = 6
RETRY_BACKOFF_FIRST_S: Final = 0.05
RETRY_BACKOFF_MAX_S: Final = 1.0

# Compare-and-set rounds on one counter before giving up: each lost round
# means another writer advanced it, so this bounds the wait under contention.
COUNTER_ATTEMPTS_MAX: Final = 200

# Sequence numbers are zero-padded to this many digits so that sort keys sort
# in sequence order (20 digits hold any unsigned 64-bit number).
SEQ_DIGITS: Final = 20
SEQ_MAX: Final = 10**SEQ_DIGITS - 1

# A reader skips a gap in a log (a sequence number that was allocated but has
# no row) only when a later row was stored at least this long ago: a writer
# allocates its number before the later writer allocates theirs, and every
# write gives up within WRITE_ATTEMPTS_MAX client timeouts (30 s with the
# default 5 s), so a gap this old is a writer that died, or an expired row.
GAP_SETTLE_S: Final = 60.0

NONCE_BYTES: Final = 8


def pack(record: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(record, use_bin_type=True)
    assert len(data) <= VALUE_BYTES_MAX, f"record of {len(data)} bytes exceeds the value limit"
    return data


def unpack(data: bytes) -> dict[str, Any]:
    record = msgpack.unpackb(data, raw=False)
    if not isinstance(record, dict):
        raise KvsvrError(f"an application row holds {type(record).__name__}, not a map")
    return record


def seq_key(prefix: str, seq: int) -> str:
    assert 0 <= seq <= SEQ_MAX, seq
    return f"{prefix}{seq:0{SEQ_DIGITS}d}"


def seq_of(sort_key: bytes, prefix: str) -> int:
    text = sort_key.decode()
    assert text.startswith(prefix), (text, prefix)
    return int(text[len(prefix) :])


def now_ms(clock: Clock) -> int:
    return int(clock() * 1000)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


async def _backoff(attempt: int) -> None:
    await trio.sleep(min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_FIRST_S * 2**attempt))


async def get_retrying(client: Client, key: UserKey, *, table: str) -> Item | None:
    """A strong read, tried again while no majority answers."""
    for attempt in range(WRITE_ATTEMPTS_MAX - 1):
        try:
            return await client.get(key, table=table)
        except Unavailable:
            await _backoff(attempt)
    return await client.get(key, table=table)


async def scan_retrying(
    client: Client, partition_key: str, *, table: str, start: str, end: str, limit: int
) -> list[Item]:
    for attempt in range(WRITE_ATTEMPTS_MAX - 1):
        try:
            return await client.scan(partition_key, table=table, start=start, end=end, limit=limit)
        except Unavailable:
            await _backoff(attempt)
    return await client.scan(partition_key, table=table, start=start, end=end, limit=limit)


async def put_retrying(client: Client, key: UserKey, value: bytes, *, table: str) -> None:
    """Put a row whose value is fixed (so a repeat is harmless), trying again
    while the outcome is unknown. Raises the last `Unavailable` past the limit."""
    for attempt in range(WRITE_ATTEMPTS_MAX - 1):
        try:
            await client.put(key, value, table=table)
            return
        except Unavailable:
            await _backoff(attempt)
    await client.put(key, value, table=table)


async def delete_retrying(client: Client, key: UserKey, *, table: str) -> None:
    for attempt in range(WRITE_ATTEMPTS_MAX - 1):
        try:
            await client.delete(key, table=table)
            return
        except Unavailable:
            await _backoff(attempt)
    await client.delete(key, table=table)


async def claim(client: Client, key: UserKey, value: bytes, *, table: str) -> bytes:
    """Write `value` if the key is absent; return the value the key holds
    afterwards (ours, or an earlier claim's). An attempt whose outcome is
    unknown is repeated: if it had won, the repeat finds our own value."""
    for attempt in range(WRITE_ATTEMPTS_MAX):
        try:
            await client.put(key, value, table=table, if_absent=True)
            return value
        except Conflict:
            existing = await get_retrying(client, key, table=table)
            if existing is not None:
                return existing.value
            # Claimed and then expired or deleted between the two calls: claim again.
        except Unavailable:
            if attempt == WRITE_ATTEMPTS_MAX - 1:
                raise
            await _backoff(attempt)
    raise Unavailable(f"could not claim {key!r} in {WRITE_ATTEMPTS_MAX} attempts")


@dataclass(frozen=True, slots=True)
class Counter:
    value: int
    version: int | None  # None: the row does not exist yet


def _decode_counter(item: Item | None) -> tuple[Counter, bytes]:
    if item is None:
        return Counter(0, None), b""
    value, nonce = msgpack.unpackb(item.value, raw=False)
    assert isinstance(value, int) and value >= 0, value
    return Counter(value, item.version), bytes(nonce)


async def read_counter(client: Client, key: UserKey, *, table: str) -> int:
    counter, _ = _decode_counter(await get_retrying(client, key, table=table))
    return counter.value


async def advance_counter(client: Client, key: UserKey, *, table: str, step: int = 1) -> int:
    """Add `step` to a counter with compare-and-set and return its new value:
    the caller owns the numbers (new - step, new]. Exactly once even when an
    attempt's outcome is unknown: the value carries a nonce of this call, so a
    re-read tells whether that attempt won."""
    assert step >= 1
    nonce = new_nonce()
    for attempt in range(COUNTER_ATTEMPTS_MAX):
        counter, _ = _decode_counter(await get_retrying(client, key, table=table))
        new = counter.value + step
        assert new <= SEQ_MAX, f"counter {key!r} would pass {SEQ_MAX}"
        value = msgpack.packb([new, nonce], use_bin_type=True)
        try:
            if counter.version is None:
                await client.put(key, value, table=table, if_absent=True)
            else:
                await client.cas(key, value, if_version=counter.version, table=table)
            return new
        except Conflict:
            continue  # another writer advanced it first; read and try again
        except Unavailable:
            await _backoff(min(attempt, 5))
            _, latest_nonce = _decode_counter(await get_retrying(client, key, table=table))
            if latest_nonce == nonce:
                # Our attempt won (and possibly later writers built on it).
                # The counter only grows by whole steps, so ours ended at `new`.
                return new
    raise Unavailable(f"counter {key!r}: lost {COUNTER_ATTEMPTS_MAX} compare-and-set rounds")


@dataclass(frozen=True, slots=True)
class LogRow:
    seq: int
    record: dict[str, Any]


def contiguous(
    items: Sequence[Item], *, prefix: str, after_seq: int, now_ms: int
) -> tuple[list[LogRow], int]:
    """The rows a reader at `after_seq` may consume, in order, and the new
    cursor. Rows follow on without gaps; a gap (a number allocated but not
    yet written, or written and expired) is skipped only when the next row was
    stored at least `GAP_SETTLE_S` ago (its `stored_ms`), else reading stops
    before it and the gap is looked at again next time."""
    rows: list[LogRow] = []
    cursor = after_seq
    for item in items:
        assert item.key is not None
        seq = seq_of(item.key, prefix)
        assert seq > cursor, (seq, cursor)
        record = unpack(item.value)
        if seq != cursor + 1 and int(record["stored_ms"]) + GAP_SETTLE_S * 1000 > now_ms:
            break
        rows.append(LogRow(seq, record))
        cursor = seq
    return rows, cursor


class AppError(Exception):
    """An application rule was broken (a full group, a non-member...); the
    message says which. Nothing was written."""
