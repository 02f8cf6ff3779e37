"""The replica state machine: one key's Paxos acceptor and learner, as pure functions.

Each handler takes the key's current row and a message and returns the row to
persist (None when nothing changed) and the reply. The caller must make the
new row durable before sending the reply: a promise or an accept that was
answered and then forgotten in a crash breaks Paxos.

All transitions, in one place:

Prepare  ballot > promised                    -> promised = ballot; Promise ok
Prepare  otherwise                            -> unchanged; Promise refused
Accept   ballot >= promised, version > chosen,
         and (ballot, version) not below the
         accepted proposal's                  -> promised = ballot, accepted = it; ok
Accept   otherwise                            -> (piggy-backed commit only); refused
Commit   version > chosen, value known (sent,
         or the proposal accepted under ballot) -> chosen = (version, value)
Read     always                               -> unchanged; ReadReply
Accept   held back by a read lease (the IO
         layer's `Grants.wait_s` > 0)          -> (piggy-backed commit only);
                                                 refused with wait_s

Prepare needs a strictly higher ballot so that a coordinator that restarted
and reuses a ballot can never collect a second set of promises for it.
Accept takes an equal ballot (that is ordinary phase 2) but refuses a proposal
older than the one it holds under the same ballot: a delayed duplicate must
not overwrite a newer proposal that may already be chosen.
"""

from __future__ import annotations

from dataclasses import fields

from kvsvr.protocol.messages import (
    Accept,
    AcceptReply,
    Commit,
    Prepare,
    Promise,
    Read,
    ReadReply,
    Reply,
    ScanEntry,
)
from kvsvr.protocol.state import RECENT_OPS_MAX, Accepted, Ballot, Row


def check_row(row: Row) -> None:
    """Invariants every stored row satisfies."""
    assert row.version >= 0
    assert row.version > 0 or row.value is None
    for version, _ in row.recent_ops:  # a loop: cheaper than all() over a generator
        assert version < row.version
    if row.accepted is not None:
        assert row.accepted.version > row.version, "an accepted proposal is above chosen"
        assert row.accepted.ballot <= row.promised, "accepted under a ballot we promised"


def _check_transition(old: Row, new: Row) -> Row:
    assert new.version >= old.version, "a chosen version never decreases"
    assert new.promised >= old.promised, "a promise never goes below an earlier promise"
    if new.version == old.version and old.version > 0:
        assert new.value == old.value, "a chosen version never changes its value"
    check_row(new)
    return new


def apply_commit(
    row: Row,
    version: int,
    ballot: Ballot,
    has_value: bool,
    value: bytes | None,
    expires_at_ms: int | None,
    op_id: int,
) -> Row | None:
    """Learn that `version` is chosen. None when the row does not change."""
    if version <= row.version:
        return None
    accepted = row.accepted
    if not has_value:
        if accepted is None or accepted.version != version or accepted.ballot != ballot:
            return None  # we never saw that proposal; repair will bring the value
        value = accepted.value
        expires_at_ms = accepted.expires_at_ms
        op_id = accepted.op_id
    if accepted is not None and accepted.version <= version:
        accepted = None
    recent_ops = row.recent_ops
    if row.version > 0:
        recent_ops = ((row.version, row.op_id), *recent_ops)[:RECENT_OPS_MAX]
    # Rows are built field by field rather than with dataclasses.replace,
    # which walks the fields at run time (several times the cost).
    return _check_transition(
        row,
        Row(
            version=version,
            value=value,
            expires_at_ms=expires_at_ms,
            promised=row.promised,
            accepted=accepted,
            hlc=row.hlc,
            op_id=op_id,
            recent_ops=recent_ops,
        ),
    )


# The rows built below name every field; a field added to Row must be added
# there too, or a transition would silently reset it.
assert [field.name for field in fields(Row)] == [
    "version",
    "value",
    "expires_at_ms",
    "promised",
    "accepted",
    "hlc",
    "op_id",
    "recent_ops",
], "update the Row constructions in kvsvr/protocol/replica.py"


def _with_promise(row: Row, promised: Ballot, accepted: Accepted | None) -> Row:
    """`row` with a new promise and proposal in flight (its chosen part kept)."""
    return Row(
        version=row.version,
        value=row.value,
        expires_at_ms=row.expires_at_ms,
        promised=promised,
        accepted=accepted,
        hlc=row.hlc,
        op_id=row.op_id,
        recent_ops=row.recent_ops,
    )


def on_prepare(row: Row, message: Prepare) -> tuple[Row | None, Promise]:
    if message.ballot <= row.promised:
        return None, Promise(
            ok=False,
            promised=row.promised,
            version=row.version,
            has_value=False,
            value=None,
            expires_at_ms=None,
            accepted=None,
            op_id=row.op_id,
        )
    new_row = _check_transition(row, _with_promise(row, message.ballot, row.accepted))
    include_value = row.version > message.known_version
    return new_row, Promise(
        ok=True,
        promised=message.ballot,
        version=row.version,
        has_value=include_value,
        value=row.value if include_value else None,
        expires_at_ms=row.expires_at_ms if include_value else None,
        accepted=row.accepted,
        op_id=row.op_id,
        recent_ops=row.recent_ops,
    )


def on_accept(row: Row, message: Accept, wait_s: float = 0.0) -> tuple[Row | None, AcceptReply]:
    """`wait_s` > 0: another node holds a read lease on the key (or this
    replica restarted less than a lease ago), so the proposal is refused,
    whatever its ballot, and the coordinator told how long to wait. A commit
    it carries is still learned: a chosen value never hurts a lease."""
    changed: Row | None = None
    if message.commit_version > 0:
        changed = apply_commit(
            row, message.commit_version, message.commit_ballot, False, None, None, 0
        )
        if changed is not None:
            row = changed
    if wait_s > 0:
        return changed, AcceptReply(
            ok=False, promised=row.promised, version=row.version, wait_s=wait_s
        )
    accepted = row.accepted
    refused = (
        message.ballot < row.promised
        or message.version <= row.version
        or (
            accepted is not None
            and (message.ballot, message.version) < (accepted.ballot, accepted.version)
        )
    )
    if refused:
        return changed, AcceptReply(ok=False, promised=row.promised, version=row.version)
    proposal = Accepted(
        ballot=message.ballot,
        version=message.version,
        value=message.value,
        expires_at_ms=message.expires_at_ms,
        op_id=message.op_id,
    )
    new_row = _check_transition(row, _with_promise(row, message.ballot, proposal))
    return new_row, AcceptReply(ok=True, promised=message.ballot, version=row.version)


def on_commit(row: Row, message: Commit) -> Row | None:
    return apply_commit(
        row,
        message.version,
        message.ballot,
        message.has_value,
        message.value,
        message.expires_at_ms,
        message.op_id,
    )


def on_read(row: Row, message: Read, lease: bool = False) -> ReadReply:
    """`lease`: the IO layer granted the read lease `message.lease_for` asked for."""
    assert not lease or message.lease_for > 0, "a lease is granted only when asked for"
    include_value = row.version > message.known_version
    accepted = row.accepted
    return ReadReply(
        version=row.version,
        has_value=include_value,
        value=row.value if include_value else None,
        expires_at_ms=row.expires_at_ms if include_value else None,
        accepted_ballot=None if accepted is None else accepted.ballot,
        accepted_version=0 if accepted is None else accepted.version,
        promised=row.promised,
        op_id=row.op_id,
        lease=lease,
    )


def scan_entry(key: bytes, row: Row) -> ScanEntry:
    return ScanEntry(
        key=key,
        version=row.version,
        value=row.value,
        expires_at_ms=row.expires_at_ms,
        accepted_version=0 if row.accepted is None else row.accepted.version,
    )


def peers_needed_to_rebuild(replica_count: int) -> int:
    """How many *other* replicas a replica that lost a row (corruption, a wiped
    disk) must hear from before it rebuilds that row and votes on it again.

    Any majority that counted this replica's lost promise or accept holds at
    least `replica_count // 2` others; the peers heard must meet every such set,
    so that the rebuilt row's promise and proposal are at least what was lost.
    With 3 replicas that is both others; with 5, three of the four.
    """
    others = replica_count - 1
    return others - replica_count // 2 + 1


def merge_rows(rows: list[Row]) -> Row:
    """Rebuild a lost row from its peers' rows: the latest chosen value, the
    highest promise, and the highest proposal in flight above that value."""
    assert rows, "nothing to rebuild from"
    latest = max(rows, key=lambda row: row.version)
    promised = max(row.promised for row in rows)
    in_flight = [
        row.accepted
        for row in rows
        if row.accepted is not None and row.accepted.version > latest.version
    ]
    accepted = max(in_flight, key=lambda a: (a.version, a.ballot)) if in_flight else None
    recent: dict[int, int] = {}
    for row in rows:
        recent.update(row.recent_ops)
        if 0 < row.version < latest.version:
            recent[row.version] = row.op_id
    recent_ops = tuple(sorted(recent.items(), reverse=True))[:RECENT_OPS_MAX]
    merged = Row(
        version=latest.version,
        value=latest.value,
        expires_at_ms=latest.expires_at_ms,
        promised=promised,
        accepted=accepted,
        hlc=max(row.hlc for row in rows),
        op_id=latest.op_id,
        recent_ops=recent_ops,
    )
    check_row(merged)
    return merged


def handle(row: Row, message: Prepare | Accept | Commit | Read) -> tuple[Row | None, Reply | None]:
    """Dispatch one message: the row to persist (None: unchanged) and the reply
    (None for a commit, which travels one way)."""
    match message:
        case Prepare():
            return on_prepare(row, message)
        case Accept():
            return on_accept(row, message)
        case Commit():
            return on_commit(row, message), None
        case Read():
            return None, on_read(row, message)
    raise AssertionError(f"not a replica request: {message!r}")
