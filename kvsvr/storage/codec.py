"""The on-disk encoding of a `Row`: crc32c, then msgpack of a compact list.

Layout: 4-byte little-endian crc32c of the body, then the body, msgpack of

    [format_version, version, value, expires_at_ms, promised_round,
     promised_node, accepted, hlc, op_id, recent_ops]

where `accepted` is None or
`[ballot_round, ballot_node, version, value, expires_at_ms, op_id]` and
`recent_ops` a list of at most RECENT_OPS_MAX `[version, op_id]` pairs.

`decode_row` checks everything (crc, msgpack, field count, every field's type
and range, the format version) and raises `CorruptRow` for anything wrong:
a damaged row is never served as data, and a caller never has to catch
anything but `CorruptRow`.
"""

from __future__ import annotations

import struct
import threading

import crc32c
import msgpack

from kvsvr.errors import CorruptRow
from kvsvr.protocol.state import RECENT_OPS_MAX, Accepted, Row

# Bumped when the layout changes, so an old node reading a new row (or the
# reverse) reports a clear error instead of misreading fields.
ROW_FORMAT_VERSION = 1

# Every integer field is stored as a msgpack uint (versions, ballots, hlc and
# unix milliseconds are never negative); 2**64 - 1 is msgpack's largest uint.
ROW_INT_MAX = (1 << 64) - 1

_CRC = struct.Struct("<I")
CRC_BYTES = _CRC.size

# Fields of the top-level list and of the `accepted` list. The unpacker is told
# no array may be longer, so a damaged length prefix cannot make it allocate.
ROW_FIELD_COUNT = 10
ACCEPTED_FIELD_COUNT = 6

# `msgpack.packb` builds a Packer (and its buffer) per call, about 40% of a
# row's packing time; a Packer is reused instead, one per thread, as it is not
# thread-safe (encode_row runs on the trio thread, but it is public).
_packers = threading.local()


def _packer() -> msgpack.Packer:
    try:
        packer: msgpack.Packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode_row(row: Row) -> bytes:
    """The stored bytes of `row`. Raises ValueError for a row that could not be
    decoded again (wrong types, out-of-range integers): that is a caller bug,
    and it must not reach the disk."""
    if not _row_ok(row):
        # _row_ok wants exact types; row_problem also takes subclasses.
        problem = row_problem(row)
        if problem is not None:
            raise ValueError(f"cannot encode row: {problem}")
    # msgpack packs a tuple as the array a list would be, byte for byte, so the
    # row's own tuples (ballots, recent ops) go out without copying to lists.
    accepted = row.accepted
    promised = row.promised
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = _packer().pack
    body: bytes = pack(
        (
            ROW_FORMAT_VERSION,
            row.version,
            row.value,
            row.expires_at_ms,
            promised[0],
            promised[1],
            None
            if accepted is None
            else (
                accepted.ballot[0],
                accepted.ballot[1],
                accepted.version,
                accepted.value,
                accepted.expires_at_ms,
                accepted.op_id,
            ),
            row.hlc,
            row.op_id,
            row.recent_ops,
        )
    )
    return _CRC.pack(crc32c.crc32c(body)) + body


def crc_ok(data: bytes) -> bool:
    """Whether stored row bytes pass their crc32c (cheap: no decoding)."""
    return len(data) > CRC_BYTES and _CRC.unpack_from(data)[0] == crc32c.crc32c(
        memoryview(data)[CRC_BYTES:]
    )


_crc32c = crc32c.crc32c
_unpackb = msgpack.unpackb
_crc_unpack_from = _CRC.unpack_from


def decode_row(data: bytes) -> Row:
    """The `Row` stored as `data`; `CorruptRow` if `data` is not exactly one
    intact row of a known format version."""
    if type(data) is not bytes and not isinstance(data, bytes):
        raise CorruptRow(f"row data must be bytes, not {type(data).__name__}")
    if len(data) <= CRC_BYTES:
        raise CorruptRow(f"row truncated: {len(data)} bytes")
    (crc_stored,) = _crc_unpack_from(data)
    body = data[CRC_BYTES:]
    crc_computed = _crc32c(body)
    if crc_stored != crc_computed:
        raise CorruptRow(
            f"row crc32c mismatch: stored {crc_stored:#010x}, computed {crc_computed:#010x}"
        )
    try:
        # Arrays come back as tuples: the recent ops are then the Row's field
        # as they are, and ballots need no conversion.
        fields = _unpackb(
            body, use_list=False, max_array_len=ROW_FIELD_COUNT, max_map_len=0, max_ext_len=0
        )
    except Exception as error:  # msgpack raises many types; all mean "not a row"
        raise CorruptRow(f"row body is not valid msgpack: {error!r}") from error
    row = _fast_row(fields)
    if row is not None:
        return row
    return _row_from_fields(fields)


def _fast_row(fields: object) -> Row | None:
    """The row of a body whose every field is right, checked in one expression
    (the checks of `_row_ok`, on the fields as unpacked); None sends anything
    else through `_row_from_fields` and `row_problem` for its error message.

    `(a | b) >> 64` is zero exactly when both ints are in [0, 2**64): one test
    for several fields once their types are known to be int (not bool)."""
    if type(fields) is not tuple or len(fields) != ROW_FIELD_COUNT:
        return None
    (
        format_version,
        version,
        value,
        expires,
        promised_round,
        promised_node,
        accepted_fields,
        hlc,
        op_id,
        recent_ops,
    ) = fields
    if not (
        type(format_version) is int
        and format_version == ROW_FORMAT_VERSION
        and type(version) is int
        and type(promised_round) is int
        and type(promised_node) is int
        and type(hlc) is int
        and type(op_id) is int
        and not (version | promised_round | promised_node | hlc | op_id) >> 64
        and (value is None or type(value) is bytes)
        and (expires is None or (type(expires) is int and not expires >> 64))
        and _recent_ops_ok(recent_ops, version)
    ):
        return None
    accepted: Accepted | None = None
    if accepted_fields is not None:
        if type(accepted_fields) is not tuple or len(accepted_fields) != ACCEPTED_FIELD_COUNT:
            return None
        (
            ballot_round,
            ballot_node,
            accepted_version,
            accepted_value,
            accepted_expires,
            accepted_op_id,
        ) = accepted_fields
        if not (
            type(ballot_round) is int
            and type(ballot_node) is int
            and type(accepted_version) is int
            and type(accepted_op_id) is int
            and not (ballot_round | ballot_node | accepted_version | accepted_op_id) >> 64
            and (accepted_value is None or type(accepted_value) is bytes)
            and (
                accepted_expires is None
                or (type(accepted_expires) is int and not accepted_expires >> 64)
            )
        ):
            return None
        accepted = Accepted(
            (ballot_round, ballot_node),
            accepted_version,
            accepted_value,
            accepted_expires,
            accepted_op_id,
        )
    return Row(
        version,
        value,
        expires,
        (promised_round, promised_node),
        accepted,
        hlc,
        op_id,
        recent_ops,
    )


def _row_from_fields(fields: object) -> Row:
    """Assemble a Row from decoded fields, or raise CorruptRow naming the bad one."""
    # (decode_row unpacks arrays as tuples)
    if not isinstance(fields, tuple) or len(fields) != ROW_FIELD_COUNT:
        raise CorruptRow(f"row body is not a list of {ROW_FIELD_COUNT} fields")
    format_version = fields[0]
    if not _is_uint(format_version):
        raise CorruptRow("row format version is not an integer")
    if format_version != ROW_FORMAT_VERSION:
        raise CorruptRow(f"unknown row format version {format_version}")
    (
        _,
        version,
        value,
        expires_at_ms,
        promised_round,
        promised_node,
        accepted_fields,
        hlc,
        op_id,
        recent_fields,
    ) = fields
    if accepted_fields is not None and (
        not isinstance(accepted_fields, tuple) or len(accepted_fields) != ACCEPTED_FIELD_COUNT
    ):
        raise CorruptRow(f"row accepted is not a list of {ACCEPTED_FIELD_COUNT} fields")
    if not isinstance(recent_fields, tuple) or not all(
        isinstance(pair, tuple) and len(pair) == 2 for pair in recent_fields
    ):
        raise CorruptRow("row recent ops is not a list of pairs")
    recent_ops = tuple((pair[0], pair[1]) for pair in recent_fields)
    # Judge the fields before building: compiled (`dev.py compile`), Row and
    # Accepted check their fields' types as they are built (and store a bool
    # as the int it equals), so a bad field must be named here, as it is in
    # pure Python.
    problem = _fields_problem(
        version,
        value,
        expires_at_ms,
        (promised_round, promised_node),
        hlc,
        op_id,
        recent_ops,
        None
        if accepted_fields is None
        else (
            (accepted_fields[0], accepted_fields[1]),
            accepted_fields[2],
            accepted_fields[3],
            accepted_fields[4],
            accepted_fields[5],
        ),
    )
    if problem is not None:
        raise CorruptRow(f"row has a bad field: {problem}")
    accepted: Accepted | None = None
    if accepted_fields is not None:
        (
            ballot_round,
            ballot_node,
            accepted_version,
            accepted_value,
            accepted_expires,
            accepted_op_id,
        ) = accepted_fields
        accepted = Accepted(
            ballot=(ballot_round, ballot_node),
            version=accepted_version,
            value=accepted_value,
            expires_at_ms=accepted_expires,
            op_id=accepted_op_id,
        )
    return Row(
        version=version,
        value=value,
        expires_at_ms=expires_at_ms,
        promised=(promised_round, promised_node),
        accepted=accepted,
        hlc=hlc,
        op_id=op_id,
        recent_ops=recent_ops,
    )


def _recent_ops_ok(recent_ops: object, version: object) -> bool:
    if type(recent_ops) is not tuple or len(recent_ops) > RECENT_OPS_MAX:
        return False
    if not recent_ops:
        return True
    if type(version) is not int:
        return False
    for pair in recent_ops:
        if type(pair) is not tuple or len(pair) != 2:
            return False
        recent_version, recent_op_id = pair
        # `>> 64` is zero exactly for ints in [0, 2**64), both at once.
        if (
            type(recent_version) is not int
            or type(recent_op_id) is not int
            or (recent_version | recent_op_id) >> 64
            or recent_version >= version
        ):
            return False
    return True


def _row_ok(row: Row) -> bool:
    """The common case of `row_problem` in one expression: every row is checked
    on every write, so this is on the hot path (the integer checks are spelled
    out rather than calls of `_is_uint`, which cost as much again; once several
    fields are known to be ints, `(a | b | ...) >> 64` is zero exactly when
    every one is in [0, 2**64))."""
    if type(row) is not Row:
        return False
    version = row.version
    value = row.value
    expires = row.expires_at_ms
    promised = row.promised
    hlc = row.hlc
    op_id = row.op_id
    if not (
        type(promised) is tuple
        and len(promised) == 2
        and type(version) is int
        and type(promised[0]) is int
        and type(promised[1]) is int
        and type(hlc) is int
        and type(op_id) is int
        and not (version | promised[0] | promised[1] | hlc | op_id) >> 64
        and (value is None or type(value) is bytes)
        and (expires is None or (type(expires) is int and not expires >> 64))
        and _recent_ops_ok(row.recent_ops, version)
    ):
        return False
    accepted = row.accepted
    if accepted is None:
        return True
    if type(accepted) is not Accepted:
        return False
    ballot = accepted.ballot
    accepted_version = accepted.version
    accepted_value = accepted.value
    accepted_expires = accepted.expires_at_ms
    accepted_op_id = accepted.op_id
    return (
        type(ballot) is tuple
        and len(ballot) == 2
        and type(ballot[0]) is int
        and type(ballot[1]) is int
        and type(accepted_version) is int
        and type(accepted_op_id) is int
        and not (ballot[0] | ballot[1] | accepted_version | accepted_op_id) >> 64
        and (accepted_value is None or type(accepted_value) is bytes)
        and (
            accepted_expires is None
            or (type(accepted_expires) is int and not accepted_expires >> 64)
        )
    )


def row_problem(row: Row) -> str | None:
    """What makes `row` unstorable, or None. Shared by encode and decode, so
    every row that encodes also decodes."""
    if _row_ok(row):
        return None
    if not isinstance(row, Row):
        return f"not a Row: {type(row).__name__}"
    accepted = row.accepted
    if accepted is not None and not isinstance(accepted, Accepted):
        return f"accepted: not an Accepted: {type(accepted).__name__}"
    return _fields_problem(
        row.version,
        row.value,
        row.expires_at_ms,
        row.promised,
        row.hlc,
        row.op_id,
        row.recent_ops,
        None
        if accepted is None
        else (
            accepted.ballot,
            accepted.version,
            accepted.value,
            accepted.expires_at_ms,
            accepted.op_id,
        ),
    )


def _fields_problem(
    version: object,
    value: object,
    expires_at_ms: object,
    promised: object,
    hlc: object,
    op_id: object,
    recent_ops: object,
    accepted: tuple[object, object, object, object, object] | None,
) -> str | None:
    """`row_problem` of a row's fields, whether or not they made a Row;
    `accepted` is (ballot, version, value, expires_at_ms, op_id)."""
    checks: list[tuple[str, str | None]] = [
        ("version", _uint_problem(version)),
        ("value", _value_problem(value)),
        ("expires_at_ms", _optional_uint_problem(expires_at_ms)),
        ("promised", _ballot_problem(promised)),
        ("hlc", _uint_problem(hlc)),
        ("op_id", _uint_problem(op_id)),
        (
            "recent_ops",
            None
            if _recent_ops_ok(recent_ops, version)
            else f"expected at most {RECENT_OPS_MAX} (version < {version!r}, op id) pairs",
        ),
    ]
    if accepted is not None:
        ballot, accepted_version, accepted_value, accepted_expires, accepted_op_id = accepted
        checks += [
            ("accepted.ballot", _ballot_problem(ballot)),
            ("accepted.version", _uint_problem(accepted_version)),
            ("accepted.value", _value_problem(accepted_value)),
            ("accepted.expires_at_ms", _optional_uint_problem(accepted_expires)),
            ("accepted.op_id", _uint_problem(accepted_op_id)),
        ]
    for name, problem in checks:
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _is_uint(value: object) -> bool:
    # bool is an int subclass; a stored True is damage, not the integer 1.
    return type(value) is int and 0 <= value <= ROW_INT_MAX


def _uint_problem(value: object) -> str | None:
    if _is_uint(value):
        return None
    return f"expected an integer in [0, 2**64), got {value!r:.80}"


def _optional_uint_problem(value: object) -> str | None:
    return None if value is None else _uint_problem(value)


def _value_problem(value: object) -> str | None:
    if value is None or type(value) is bytes:
        return None
    return f"expected bytes or None, got {type(value).__name__}"


def _ballot_problem(ballot: object) -> str | None:
    if not isinstance(ballot, tuple) or len(ballot) != 2:
        return f"expected a (round, node_index) tuple, got {ballot!r:.80}"
    return _uint_problem(ballot[0]) or _uint_problem(ballot[1])
