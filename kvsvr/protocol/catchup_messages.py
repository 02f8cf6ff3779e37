"""Catch-up messages between nodes, and their wire form.

Each catch-up RPC (`kvsvr.node.replication` dispatches them) takes one
request message and answers one reply message. On the wire a message is a
msgpack list of its fields in order, the table first in every request; the
RPC method name says which message it is. Both ends use the same
`to_wire`/`from_wire` pair. A malformed request raises `InvalidRequest` (the
asker sent something wrong); a malformed reply raises `FrameError` (the
answerer did).

    method     request / reply
    ping       Hello (kvsvr.protocol.lifecycle)
               HelloReply
    apply      ApplyRows      [table, [[key, row], ...]]
               rows applied (an int)
    ae_digest  DigestRequest  [table, requester]
               DigestReply    [[partition, [digest, ...]], ...]
    ae_keys    KeysRequest    [table, requester, [[partition, bucket], ...], start]
               KeysReply      [[[key, version], ...], more]
    ae_rows    RowsRequest    [table, [key, ...]]
               RowsReply      [row or None, ...]
    ae_page    PageRequest    [table, requester, start, limit]
               PageReply      [[[key, row], ...], more]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from kvsvr.errors import FrameError, InvalidRequest
from kvsvr.protocol.catchup import DIGEST_BUCKETS

PING: Final = "ping"
APPLY: Final = "apply"
DIGEST: Final = "ae_digest"
KEYS: Final = "ae_keys"
ROWS: Final = "ae_rows"  # rows by key
PAGE: Final = "ae_page"  # rows by key range: rebuilding
METHODS: Final = frozenset({PING, APPLY, DIGEST, KEYS, ROWS, PAGE})

# Rows (or keys) per apply or rows request: a request of 64 KiB values stays
# far below the frame limit, and one request holds the replica's write path
# for a bounded time.
ROWS_PER_REQUEST_MAX: Final = 1000
# (key, version) pairs per keys answer: about 1 MiB of short keys.
KEYS_PAGE_MAX: Final = 20_000
# Rows per rebuild page: large pages make a rebuild fast, and a page is held
# in memory whole on both ends.
REBUILD_PAGE_ROWS: Final = 4000


def _is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def _request(body: object, method: str, fields: str, count: int) -> list[Any]:
    """`body` as a request list of `count` fields, the table first."""
    if not isinstance(body, list) or not body or not isinstance(body[0], str):
        raise InvalidRequest(f"{method} takes [table, ...]")
    if len(body) != count:
        raise InvalidRequest(f"{method} takes {fields}")
    return body


def _pairs_in(
    raw: object, second: type, error: type[Exception], what: str
) -> tuple[tuple[bytes, Any], ...]:
    """A list of [key bytes, `second`] pairs (bools are not ints here)."""
    if not isinstance(raw, list):
        raise error(what)
    pairs = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or not isinstance(item[1], second)
            or isinstance(item[1], bool)
        ):
            raise error(what)
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def _more_in(raw: object, what: str) -> bool:
    if not isinstance(raw, bool):
        raise FrameError(what)
    return raw


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ApplyRows:
    """Learn these chosen rows (key, stored row bytes): hints, eventual writes."""

    table: str
    rows: tuple[tuple[bytes, bytes], ...]

    def to_wire(self) -> list[Any]:
        return [self.table, [[key, row] for key, row in self.rows]]

    @staticmethod
    def from_wire(body: object) -> ApplyRows:
        fields = _request(body, APPLY, "[table, [[key, row], ...]]", 2)
        if not isinstance(fields[1], list):
            raise InvalidRequest("expected [table, [[key, row], ...]]")
        if len(fields[1]) > ROWS_PER_REQUEST_MAX:
            raise InvalidRequest(f"at most {ROWS_PER_REQUEST_MAX} rows per request")
        rows = _pairs_in(fields[1], bytes, InvalidRequest, "rows travel as [key, row bytes]")
        return ApplyRows(fields[0], rows)


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Your bucket digests of `table`, for the partitions you share with `requester`."""

    table: str
    requester: int

    def to_wire(self) -> list[Any]:
        return [self.table, self.requester]

    @staticmethod
    def from_wire(body: object) -> DigestRequest:
        fields = _request(body, DIGEST, "[table, requester]", 2)
        if not _is_int(fields[1]):
            raise InvalidRequest("field 1 must be an int")
        return DigestRequest(fields[0], fields[1])


@dataclass(frozen=True, slots=True)
class KeysRequest:
    """The (key, newest version) pairs of these (partition, bucket)s of
    `table`, from key `start` on, that you share with `requester`."""

    table: str
    requester: int
    buckets: tuple[tuple[int, int], ...]
    start: bytes

    def to_wire(self) -> list[Any]:
        return [self.table, self.requester, [[p, b] for p, b in self.buckets], self.start]

    @staticmethod
    def from_wire(body: object) -> KeysRequest:
        what = "[table, requester, [[partition, bucket]], start]"
        fields = _request(body, KEYS, what, 4)
        if not _is_int(fields[1]):
            raise InvalidRequest("field 1 must be an int")
        if not isinstance(fields[2], list) or not isinstance(fields[3], bytes):
            raise InvalidRequest(f"ae_keys takes {what}")
        buckets = []
        for item in fields[2]:
            if not isinstance(item, list) or len(item) != 2 or not all(map(_is_int, item)):
                raise InvalidRequest(f"ae_keys takes {what}")
            buckets.append((item[0], item[1]))
        return KeysRequest(fields[0], fields[1], tuple(buckets), fields[3])


@dataclass(frozen=True, slots=True)
class RowsRequest:
    """Your stored rows of these keys of `table`."""

    table: str
    keys: tuple[bytes, ...]

    def to_wire(self) -> list[Any]:
        return [self.table, list(self.keys)]

    @staticmethod
    def from_wire(body: object) -> RowsRequest:
        what = f"[table, [key]] ({ROWS_PER_REQUEST_MAX} max)"
        fields = _request(body, ROWS, what, 2)
        keys = fields[1]
        if not isinstance(keys, list) or len(keys) > ROWS_PER_REQUEST_MAX:
            raise InvalidRequest(f"ae_rows takes {what}")
        if not all(isinstance(key, bytes) for key in keys):
            raise InvalidRequest("keys must be bytes")
        return RowsRequest(fields[0], tuple(keys))


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Up to `limit` stored rows of `table` from key `start` on, of the
    partitions you share with `requester` (a rebuilding replica)."""

    table: str
    requester: int
    start: bytes
    limit: int

    def to_wire(self) -> list[Any]:
        return [self.table, self.requester, self.start, self.limit]

    @staticmethod
    def from_wire(body: object) -> PageRequest:
        what = "[table, requester, start, limit]"
        fields = _request(body, PAGE, what, 4)
        if (
            not _is_int(fields[1])
            or not isinstance(fields[2], bytes)
            or not _is_int(fields[3])
            or not 1 <= fields[3] <= REBUILD_PAGE_ROWS
        ):
            raise InvalidRequest(f"ae_page takes {what}")
        return PageRequest(fields[0], fields[1], fields[2], fields[3])


# A request that names a table (every catch-up request but the hello).
TableRequest: TypeAlias = "ApplyRows | DigestRequest | KeysRequest | RowsRequest | PageRequest"


def request_from_wire(method: str, body: object) -> TableRequest:
    """Parse the request of catch-up method `method` (not `ping`)."""
    parse = _REQUESTS.get(method)
    if parse is None:
        raise InvalidRequest(f"unknown method {method!r}")
    return parse(body)


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class DigestReply:
    """Bucket digests (DIGEST_BUCKETS each) by partition."""

    digests: dict[int, list[int]]

    def to_wire(self) -> list[Any]:
        return [[partition, buckets] for partition, buckets in self.digests.items()]

    @staticmethod
    def from_wire(body: object) -> DigestReply:
        what = "ae_digest answers [[partition, [digest, ...]], ...]"
        if not isinstance(body, list):
            raise FrameError(what)
        digests: dict[int, list[int]] = {}
        for item in body:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not _is_int(item[0])
                or not isinstance(item[1], list)
                or len(item[1]) != DIGEST_BUCKETS
                or not all(map(_is_int, item[1]))
            ):
                raise FrameError(what)
            digests[item[0]] = item[1]
        return DigestReply(digests)


@dataclass(frozen=True, slots=True)
class KeysReply:
    """(key, newest version) pairs in key order; `more`: the listing goes on
    after the last key."""

    pairs: tuple[tuple[bytes, int], ...]
    more: bool

    def to_wire(self) -> list[Any]:
        return [[[key, version] for key, version in self.pairs], self.more]

    @staticmethod
    def from_wire(body: object) -> KeysReply:
        what = "ae_keys answers [[[key, version], ...], more]"
        if not isinstance(body, list) or len(body) != 2:
            raise FrameError(what)
        pairs = _pairs_in(body[0], int, FrameError, what)
        return KeysReply(tuple(pairs), _more_in(body[1], what))


@dataclass(frozen=True, slots=True)
class RowsReply:
    """One stored row (or None: no row) per key asked for, in order."""

    rows: tuple[bytes | None, ...]

    def to_wire(self) -> list[Any]:
        return list(self.rows)

    @staticmethod
    def from_wire(body: object, keys_asked: int) -> RowsReply:
        if (
            not isinstance(body, list)
            or len(body) != keys_asked
            or not all(row is None or isinstance(row, bytes) for row in body)
        ):
            raise FrameError("ae_rows answers one row (or None) per key")
        return RowsReply(tuple(body))


@dataclass(frozen=True, slots=True)
class PageReply:
    """Stored rows (key, row bytes) in key order; `more`: the page ended at
    its limit, not at the end of the table."""

    rows: tuple[tuple[bytes, bytes], ...]
    more: bool

    def to_wire(self) -> list[Any]:
        return [[[key, row] for key, row in self.rows], self.more]

    @staticmethod
    def from_wire(body: object) -> PageReply:
        what = "ae_page answers [[[key, row], ...], more]"
        if not isinstance(body, list) or len(body) != 2:
            raise FrameError(what)
        return PageReply(_pairs_in(body[0], bytes, FrameError, what), _more_in(body[1], what))


_REQUESTS: dict[str, Callable[[object], TableRequest]] = {
    APPLY: ApplyRows.from_wire,
    DIGEST: DigestRequest.from_wire,
    KEYS: KeysRequest.from_wire,
    ROWS: RowsRequest.from_wire,
    PAGE: PageRequest.from_wire,
}
