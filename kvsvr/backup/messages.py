"""The backup's requests between the `kvsvr backup` client and a node, each
with one `to_wire` and one `from_wire` used by both ends.

    backup_begin {rate_bytes_per_s}  -> {session, bytes, cluster_id, node}
    backup_chunk {session, offset}   -> {data, crc32c}
    backup_end   {session}           -> {}

`backup_begin` makes the node's compacted LMDB copy (one read transaction);
the client then pulls it chunk by chunk, each at most `CHUNK_BYTES_MAX` and
checked by its crc32c, and ends the session, which removes the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import crc32c

from kvsvr.errors import InvalidRequest, KvsvrError

BEGIN_METHOD: Final = "backup_begin"
CHUNK_METHOD: Final = "backup_chunk"
END_METHOD: Final = "backup_end"
METHODS: Final = frozenset({BEGIN_METHOD, CHUNK_METHOD, END_METHOD})

# One chunk travels in one frame (`net.MAX_FRAME_BYTES`, 16 MiB) and is held
# in memory once on each end: 1 MiB keeps both small and the frames few.
CHUNK_BYTES_MAX: Final = 1024 * 1024

# The rate a node sends a copy at unless the client asks for another: enough
# for a GiB in under 20 s, while leaving a node's disk and link to its clients.
RATE_BYTES_PER_S_DEFAULT: Final = 64 * 1024 * 1024
# Bounds on the rate a client may ask for: below 4 KiB/s a backup of even a
# small node would take hours; above 1 GiB/s is no limit at all.
RATE_BYTES_PER_S_MIN: Final = 4 * 1024
RATE_BYTES_PER_S_MAX: Final = 1024 * 1024 * 1024


def _body(body: object, method: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{method}: the body must be a map")
    return body


def _int(body: dict[str, Any], name: str, method: str, low: int = 0, high: int = 1 << 62) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise InvalidRequest(f"{method}: {name} must be an int in [{low}, {high}], not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class BeginRequest:
    rate_bytes_per_s: int

    def to_wire(self) -> dict[str, Any]:
        return {"rate_bytes_per_s": self.rate_bytes_per_s}

    @staticmethod
    def from_wire(body: object) -> BeginRequest:
        fields = _body(body, BEGIN_METHOD)
        return BeginRequest(
            _int(
                fields, "rate_bytes_per_s", BEGIN_METHOD, RATE_BYTES_PER_S_MIN, RATE_BYTES_PER_S_MAX
            )
        )


@dataclass(frozen=True, slots=True)
class BeginReply:
    session: int
    size_bytes: int
    cluster_id: str
    node: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "bytes": self.size_bytes,
            "cluster_id": self.cluster_id,
            "node": self.node,
        }

    @staticmethod
    def from_wire(body: object) -> BeginReply:
        try:
            fields = _body(body, BEGIN_METHOD)
            cluster_id, node = fields.get("cluster_id"), fields.get("node")
            if type(cluster_id) is not str or type(node) is not str:
                raise InvalidRequest("cluster_id and node must be strings")
            return BeginReply(
                _int(fields, "session", BEGIN_METHOD),
                _int(fields, "bytes", BEGIN_METHOD),
                cluster_id,
                node,
            )
        except InvalidRequest as error:
            raise KvsvrError(f"malformed {BEGIN_METHOD} reply: {error}") from None


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    session: int
    offset: int

    def to_wire(self) -> dict[str, Any]:
        return {"session": self.session, "offset": self.offset}

    @staticmethod
    def from_wire(body: object) -> ChunkRequest:
        fields = _body(body, CHUNK_METHOD)
        return ChunkRequest(
            _int(fields, "session", CHUNK_METHOD), _int(fields, "offset", CHUNK_METHOD)
        )


@dataclass(frozen=True, slots=True)
class ChunkReply:
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"data": self.data, "crc32c": crc32c.crc32c(self.data)}

    @staticmethod
    def from_wire(body: object) -> ChunkReply:
        """The chunk, its crc32c checked: `KvsvrError` for a damaged one."""
        if not isinstance(body, dict):
            raise KvsvrError(f"malformed {CHUNK_METHOD} reply: expected a map")
        data, crc = body.get("data"), body.get("crc32c")
        if type(data) is not bytes or len(data) > CHUNK_BYTES_MAX or type(crc) is not int:
            raise KvsvrError(f"malformed {CHUNK_METHOD} reply")
        if crc32c.crc32c(data) != crc:
            raise KvsvrError(f"{CHUNK_METHOD} reply: the chunk fails its crc32c")
        return ChunkReply(data)


@dataclass(frozen=True, slots=True)
class EndRequest:
    session: int

    def to_wire(self) -> dict[str, Any]:
        return {"session": self.session}

    @staticmethod
    def from_wire(body: object) -> EndRequest:
        return EndRequest(_int(_body(body, END_METHOD), "session", END_METHOD))
