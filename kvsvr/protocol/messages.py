"""Messages between coordinators and replicas, and their wire form.

Every message names its key as (table, encoded key). On the wire a message is a
msgpack list: its tag first, then its fields in order. `from_wire` checks every
field's type and raises `FrameError` on anything else, so a malformed message
never reaches the replica state machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from kvsvr.errors import FrameError
from kvsvr.protocol.state import RECENT_OPS_MAX, Accepted, Ballot

# Bounds on the read-lease fields: a node index, and how long an Accept may
# be told to wait (a replica's hold is well under a minute).
LEASE_FOR_MAX: Final = 65535
WAIT_S_MAX: Final = 3600.0

# ---------------------------------------------------------------- requests


# Messages are values: nobody changes one after building it. They are not
# `frozen` dataclasses all the same, because a frozen __init__ sets every field
# through object.__setattr__ (about 5x the cost of a plain one), and every
# operation builds several messages; `unsafe_hash` keeps them hashable.
@dataclass(slots=True, unsafe_hash=True)
class Prepare:
    """Phase 1: promise `ballot` for every version of the key above your chosen one."""

    table: str
    key: bytes
    ballot: Ballot
    # The coordinator already holds the value of this version: replicas at it
    # (or below) send versions only, not values.
    known_version: int


@dataclass(slots=True, unsafe_hash=True)
class Accept:
    """Phase 2: accept `value` as the proposal for `version` under `ballot`."""

    table: str
    key: bytes
    ballot: Ballot
    version: int
    value: bytes | None
    expires_at_ms: int | None
    op_id: int
    # Piggy-backed commit of the previous version: (version, ballot it was chosen
    # under). A replica that accepted exactly that proposal learns it is chosen.
    commit_version: int = 0
    commit_ballot: Ballot = (0, 0)


@dataclass(slots=True, unsafe_hash=True)
class Commit:
    """`version` is chosen. With `has_value`, the value travels along (read
    repair, replicas that missed the accept); without it, a replica commits the
    proposal it accepted under `ballot`, if it has it."""

    table: str
    key: bytes
    version: int
    ballot: Ballot
    has_value: bool
    value: bytes | None
    expires_at_ms: int | None
    op_id: int


@dataclass(slots=True, unsafe_hash=True)
class Read:
    """Report your chosen version and any proposal in flight. With
    `lease_for` (a node index; 0: none), also grant that node a read lease
    on the key (see `kvsvr.protocol.read_lease`)."""

    table: str
    key: bytes
    known_version: int
    lease_for: int = 0


@dataclass(slots=True, unsafe_hash=True)
class ScanRequest:
    """Report every row in [start, end) (end empty: to the end of the prefix)."""

    table: str
    prefix: bytes
    start: bytes
    end: bytes
    limit: int


# ---------------------------------------------------------------- replies


@dataclass(slots=True, unsafe_hash=True)
class Promise:
    ok: bool
    promised: Ballot  # on a refusal: the higher ballot already promised
    version: int
    has_value: bool  # False when version <= the coordinator's known_version
    value: bytes | None
    expires_at_ms: int | None
    accepted: Accepted | None
    op_id: int  # of the chosen value at `version`
    # (version, op_id) of earlier chosen versions the replica remembers.
    recent_ops: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True, unsafe_hash=True)
class AcceptReply:
    ok: bool
    promised: Ballot
    version: int  # the replica's chosen version
    # > 0: refused only because another node holds a read lease on the key
    # (or the replica restarted lately); the Accept may go ahead after this long.
    wait_s: float = 0.0


@dataclass(slots=True, unsafe_hash=True)
class ReadReply:
    version: int
    has_value: bool
    value: bytes | None
    expires_at_ms: int | None
    accepted_ballot: Ballot | None
    accepted_version: int  # 0 when nothing is in flight
    promised: Ballot
    op_id: int  # of the chosen value at `version`
    lease: bool = False  # the read lease `Read.lease_for` asked for was granted


@dataclass(slots=True, unsafe_hash=True)
class ScanEntry:
    key: bytes
    version: int
    value: bytes | None
    expires_at_ms: int | None
    accepted_version: int


@dataclass(slots=True, unsafe_hash=True)
class ScanReply:
    entries: tuple[ScanEntry, ...]
    truncated: bool  # the replica stopped at the limit


Request: TypeAlias = Prepare | Accept | Commit | Read | ScanRequest
Reply: TypeAlias = Promise | AcceptReply | ReadReply | ScanReply


# ---------------------------------------------------------------- wire form


def _ballot_out(ballot: Ballot) -> list[int]:
    return [ballot[0], ballot[1]]


def _ballot_in(raw: Any) -> Ballot:
    if (
        not isinstance(raw, list | tuple)
        or len(raw) != 2
        or not all(isinstance(part, int) and not isinstance(part, bool) for part in raw)
    ):
        raise FrameError(f"bad ballot: {raw!r}")
    return (raw[0], raw[1])


def _int(raw: Any, what: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise FrameError(f"{what} must be an int")
    return raw


def _opt_int(raw: Any, what: str) -> int | None:
    return None if raw is None else _int(raw, what)


def _bool(raw: Any, what: str) -> bool:
    if not isinstance(raw, bool):
        raise FrameError(f"{what} must be a bool")
    return raw


def _bytes(raw: Any, what: str) -> bytes:
    if not isinstance(raw, bytes):
        raise FrameError(f"{what} must be bytes")
    return raw


def _opt_bytes(raw: Any, what: str) -> bytes | None:
    return None if raw is None else _bytes(raw, what)


def _str(raw: Any, what: str) -> str:
    if not isinstance(raw, str):
        raise FrameError(f"{what} must be a str")
    return raw


def _recent_ops_in(raw: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list) or len(raw) > RECENT_OPS_MAX:
        raise FrameError("recent ops must be a short list")
    pairs = []
    for pair in raw:
        if not isinstance(pair, list) or len(pair) != 2:
            raise FrameError("a recent op is [version, op_id]")
        pairs.append((_int(pair[0], "recent version"), _int(pair[1], "recent op id")))
    return tuple(pairs)


def _accepted_out(accepted: Accepted | None) -> list[Any] | None:
    if accepted is None:
        return None
    return [
        _ballot_out(accepted.ballot),
        accepted.version,
        accepted.value,
        accepted.expires_at_ms,
        accepted.op_id,
    ]


def _accepted_in(raw: Any) -> Accepted | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 5:
        raise FrameError("bad accepted proposal")
    return Accepted(
        ballot=_ballot_in(raw[0]),
        version=_int(raw[1], "accepted version"),
        value=_opt_bytes(raw[2], "accepted value"),
        expires_at_ms=_opt_int(raw[3], "accepted expiry"),
        op_id=_int(raw[4], "op id"),
    )


def to_wire(message: Request | Reply) -> list[Any]:
    """The msgpack-ready list form of a message."""
    # The messages of every operation first, by exact class: a `type() is`
    # test costs a fraction of a class pattern, and the ballots are spelled out
    # rather than built by a call each. Anything else goes through `match`.
    if type(message) is Accept:
        ballot = message.ballot
        commit = message.commit_ballot
        return [
            "accept",
            message.table,
            message.key,
            [ballot[0], ballot[1]],
            message.version,
            message.value,
            message.expires_at_ms,
            message.op_id,
            message.commit_version,
            [commit[0], commit[1]],
        ]
    if type(message) is AcceptReply:
        promised = message.promised
        return ["accepted", message.ok, [promised[0], promised[1]], message.version, message.wait_s]
    if type(message) is Commit:
        ballot = message.ballot
        return [
            "commit",
            message.table,
            message.key,
            message.version,
            [ballot[0], ballot[1]],
            message.has_value,
            message.value,
            message.expires_at_ms,
            message.op_id,
        ]
    if type(message) is Read:
        return ["read", message.table, message.key, message.known_version, message.lease_for]
    if type(message) is ReadReply:
        accepted = message.accepted_ballot
        promised = message.promised
        return [
            "readreply",
            message.version,
            message.has_value,
            message.value,
            message.expires_at_ms,
            None if accepted is None else [accepted[0], accepted[1]],
            message.accepted_version,
            [promised[0], promised[1]],
            message.op_id,
            message.lease,
        ]
    match message:
        case Prepare():
            return [
                "prepare",
                message.table,
                message.key,
                _ballot_out(message.ballot),
                message.known_version,
            ]
        case Accept():
            return [
                "accept",
                message.table,
                message.key,
                _ballot_out(message.ballot),
                message.version,
                message.value,
                message.expires_at_ms,
                message.op_id,
                message.commit_version,
                _ballot_out(message.commit_ballot),
            ]
        case Commit():
            return [
                "commit",
                message.table,
                message.key,
                message.version,
                _ballot_out(message.ballot),
                message.has_value,
                message.value,
                message.expires_at_ms,
                message.op_id,
            ]
        case Read():
            return ["read", message.table, message.key, message.known_version, message.lease_for]
        case ScanRequest():
            return [
                "scan",
                message.table,
                message.prefix,
                message.start,
                message.end,
                message.limit,
            ]
        case Promise():
            return [
                "promise",
                message.ok,
                _ballot_out(message.promised),
                message.version,
                message.has_value,
                message.value,
                message.expires_at_ms,
                _accepted_out(message.accepted),
                message.op_id,
                [[version, op_id] for version, op_id in message.recent_ops],
            ]
        case AcceptReply():
            return [
                "accepted",
                message.ok,
                _ballot_out(message.promised),
                message.version,
                message.wait_s,
            ]
        case ReadReply():
            return [
                "readreply",
                message.version,
                message.has_value,
                message.value,
                message.expires_at_ms,
                None if message.accepted_ballot is None else _ballot_out(message.accepted_ballot),
                message.accepted_version,
                _ballot_out(message.promised),
                message.op_id,
                message.lease,
            ]
        case ScanReply():
            return [
                "scanreply",
                [
                    [e.key, e.version, e.value, e.expires_at_ms, e.accepted_version]
                    for e in message.entries
                ],
                message.truncated,
            ]
    raise AssertionError(f"not a message: {message!r}")


_FIELD_COUNTS = {
    "prepare": 5,
    "accept": 10,
    "commit": 9,
    "read": 5,
    "scan": 6,
    "promise": 10,
    "accepted": 5,
    "readreply": 10,
    "scanreply": 3,
}


def _fast_from_wire(raw: list[Any]) -> Request | Reply | None:
    """The messages of every operation (accept, its reply, commit, read, its
    reply) and promises, parsed when every field has exactly the type msgpack
    gives it; None sends anything else through `_checked_from_wire`'s
    field-by-field checks (and their error messages). The same checks, spelled
    out in one expression per message, ballots included: a call per field (or
    per ballot) cost more than the rest of the parse."""
    tag = raw[0]
    size = len(raw)
    if tag == "accept":
        if size != 10:
            return None
        _, table, key, ballot, version, value, expires, op_id, commit_version, commit = raw
        if (
            type(table) is str
            and type(key) is bytes
            and type(ballot) is list
            and len(ballot) == 2
            and type(ballot[0]) is int
            and type(ballot[1]) is int
            and type(version) is int
            and (value is None or type(value) is bytes)
            and (expires is None or type(expires) is int)
            and type(op_id) is int
            and type(commit_version) is int
            and type(commit) is list
            and len(commit) == 2
            and type(commit[0]) is int
            and type(commit[1]) is int
        ):
            return Accept(
                table,
                key,
                (ballot[0], ballot[1]),
                version,
                value,
                expires,
                op_id,
                commit_version,
                (commit[0], commit[1]),
            )
    elif tag == "accepted":
        if size != 5:
            return None
        _, ok, promised, version, wait_s = raw
        if (
            type(ok) is bool
            and type(promised) is list
            and len(promised) == 2
            and type(promised[0]) is int
            and type(promised[1]) is int
            and type(version) is int
            and type(wait_s) is float
            and 0.0 <= wait_s <= WAIT_S_MAX
        ):
            return AcceptReply(ok, (promised[0], promised[1]), version, wait_s)
    elif tag == "commit":
        if size != 9:
            return None
        _, table, key, version, ballot, has_value, value, expires, op_id = raw
        if (
            type(table) is str
            and type(key) is bytes
            and type(version) is int
            and type(ballot) is list
            and len(ballot) == 2
            and type(ballot[0]) is int
            and type(ballot[1]) is int
            and type(has_value) is bool
            and (value is None or type(value) is bytes)
            and (expires is None or type(expires) is int)
            and type(op_id) is int
        ):
            return Commit(
                table, key, version, (ballot[0], ballot[1]), has_value, value, expires, op_id
            )
    elif tag == "read":
        if size != 5:
            return None
        _, table, key, known, lease_for = raw
        if (
            type(table) is str
            and type(key) is bytes
            and type(known) is int
            and type(lease_for) is int
            and 0 <= lease_for <= LEASE_FOR_MAX
        ):
            return Read(table, key, known, lease_for)
    elif tag == "readreply":
        if size != 10:
            return None
        (
            _,
            version,
            has_value,
            value,
            expires,
            accepted,
            accepted_version,
            promised,
            op_id,
            lease,
        ) = raw
        if (
            type(version) is int
            and type(has_value) is bool
            and (value is None or type(value) is bytes)
            and (expires is None or type(expires) is int)
            and (
                accepted is None
                or (
                    type(accepted) is list
                    and len(accepted) == 2
                    and type(accepted[0]) is int
                    and type(accepted[1]) is int
                )
            )
            and type(accepted_version) is int
            and type(promised) is list
            and len(promised) == 2
            and type(promised[0]) is int
            and type(promised[1]) is int
            and type(op_id) is int
            and type(lease) is bool
        ):
            return ReadReply(
                version,
                has_value,
                value,
                expires,
                None if accepted is None else (accepted[0], accepted[1]),
                accepted_version,
                (promised[0], promised[1]),
                op_id,
                lease,
            )
    elif tag == "promise":
        if size != 10:
            return None
        return _fast_promise(raw)
    return None


def _fast_promise(raw: list[Any]) -> Promise | None:
    """`_fast_from_wire` for a promise (phase 1: not on every operation)."""
    _, ok, promised, version, has_value, value, expires, accepted_raw, op_id, recent_raw = raw
    if not (
        type(ok) is bool
        and type(promised) is list
        and len(promised) == 2
        and type(promised[0]) is int
        and type(promised[1]) is int
        and type(version) is int
        and type(has_value) is bool
        and (value is None or type(value) is bytes)
        and (expires is None or type(expires) is int)
        and type(op_id) is int
        and type(recent_raw) is list
        and len(recent_raw) <= RECENT_OPS_MAX
    ):
        return None
    accepted: Accepted | None = None
    if accepted_raw is not None:
        if type(accepted_raw) is not list or len(accepted_raw) != 5:
            return None
        ballot, accepted_version, accepted_value, accepted_expires, accepted_op_id = accepted_raw
        if not (
            type(ballot) is list
            and len(ballot) == 2
            and type(ballot[0]) is int
            and type(ballot[1]) is int
            and type(accepted_version) is int
            and (accepted_value is None or type(accepted_value) is bytes)
            and (accepted_expires is None or type(accepted_expires) is int)
            and type(accepted_op_id) is int
        ):
            return None
        accepted = Accepted(
            (ballot[0], ballot[1]),
            accepted_version,
            accepted_value,
            accepted_expires,
            accepted_op_id,
        )
    recent_ops = []
    for pair in recent_raw:
        if type(pair) is not list or len(pair) != 2:
            return None
        recent_version, recent_op_id = pair
        if type(recent_version) is not int or type(recent_op_id) is not int:
            return None
        recent_ops.append((recent_version, recent_op_id))
    return Promise(
        ok,
        (promised[0], promised[1]),
        version,
        has_value,
        value,
        expires,
        accepted,
        op_id,
        tuple(recent_ops),
    )


def from_wire(raw: Any) -> Request | Reply:
    """Parse and type-check a message; anything malformed raises `FrameError`."""
    if type(raw) is list and raw:
        message = _fast_from_wire(raw)
        if message is not None:
            return message
    return _checked_from_wire(raw)


def _checked_from_wire(raw: Any) -> Request | Reply:
    """`from_wire` field by field, with a message for whatever is wrong."""
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise FrameError("a message must be a list starting with its tag")
    tag = raw[0]
    count = _FIELD_COUNTS.get(tag)
    if count is None:
        raise FrameError(f"unknown message type {tag!r}")
    if len(raw) != count:
        raise FrameError(f"{tag} takes {count - 1} fields, got {len(raw) - 1}")
    match tag:
        case "prepare":
            return Prepare(
                _str(raw[1], "table"),
                _bytes(raw[2], "key"),
                _ballot_in(raw[3]),
                _int(raw[4], "known version"),
            )
        case "accept":
            return Accept(
                _str(raw[1], "table"),
                _bytes(raw[2], "key"),
                _ballot_in(raw[3]),
                _int(raw[4], "version"),
                _opt_bytes(raw[5], "value"),
                _opt_int(raw[6], "expiry"),
                _int(raw[7], "op id"),
                _int(raw[8], "commit version"),
                _ballot_in(raw[9]),
            )
        case "commit":
            return Commit(
                _str(raw[1], "table"),
                _bytes(raw[2], "key"),
                _int(raw[3], "version"),
                _ballot_in(raw[4]),
                _bool(raw[5], "has value"),
                _opt_bytes(raw[6], "value"),
                _opt_int(raw[7], "expiry"),
                _int(raw[8], "op id"),
            )
        case "read":
            lease_for = _int(raw[4], "lease for")
            if not 0 <= lease_for <= LEASE_FOR_MAX:
                raise FrameError(f"lease for {lease_for} is not a node index")
            return Read(
                _str(raw[1], "table"), _bytes(raw[2], "key"), _int(raw[3], "known"), lease_for
            )
        case "scan":
            return ScanRequest(
                _str(raw[1], "table"),
                _bytes(raw[2], "prefix"),
                _bytes(raw[3], "start"),
                _bytes(raw[4], "end"),
                _int(raw[5], "limit"),
            )
        case "promise":
            return Promise(
                _bool(raw[1], "ok"),
                _ballot_in(raw[2]),
                _int(raw[3], "version"),
                _bool(raw[4], "has value"),
                _opt_bytes(raw[5], "value"),
                _opt_int(raw[6], "expiry"),
                _accepted_in(raw[7]),
                _int(raw[8], "op id"),
                _recent_ops_in(raw[9]),
            )
        case "accepted":
            wait_s = raw[4]
            if type(wait_s) is not float or not 0.0 <= wait_s <= WAIT_S_MAX:
                raise FrameError(f"wait_s must be a float in [0, {WAIT_S_MAX}]")
            return AcceptReply(
                _bool(raw[1], "ok"), _ballot_in(raw[2]), _int(raw[3], "version"), wait_s
            )
        case "readreply":
            return ReadReply(
                _int(raw[1], "version"),
                _bool(raw[2], "has value"),
                _opt_bytes(raw[3], "value"),
                _opt_int(raw[4], "expiry"),
                None if raw[5] is None else _ballot_in(raw[5]),
                _int(raw[6], "accepted version"),
                _ballot_in(raw[7]),
                _int(raw[8], "op id"),
                _bool(raw[9], "lease"),
            )
        case "scanreply":
            if not isinstance(raw[1], list):
                raise FrameError("scan entries must be a list")
            entries = []
            for item in raw[1]:
                if not isinstance(item, list) or len(item) != 5:
                    raise FrameError("bad scan entry")
                entries.append(
                    ScanEntry(
                        _bytes(item[0], "key"),
                        _int(item[1], "version"),
                        _opt_bytes(item[2], "value"),
                        _opt_int(item[3], "expiry"),
                        _int(item[4], "accepted version"),
                    )
                )
            return ScanReply(tuple(entries), _bool(raw[2], "truncated"))
    raise AssertionError(tag)
