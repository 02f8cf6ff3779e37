"""What a coordinator operation exchanges with its driver, and the pure
reasoning over one round's replies.

`Round` is what an operation asks of its driver, `Replies` what comes back,
`Outcome` what the operation ends with, `Mutation` the write it carries out.
The functions below read a round's replies (the latest chosen version, the
proposal in flight, whether a folded write landed on its base) and build the
commits to send; none holds state. The state machine that runs the rounds,
with its ballots and leases, is `kvsvr.protocol.coordinator`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeAlias

from kvsvr.protocol.messages import (
    AcceptReply,
    Commit,
    Promise,
    Read,
    ReadReply,
    Reply,
    Request,
    ScanEntry,
)
from kvsvr.protocol.state import Accepted, Ballot

NodeId: TypeAlias = int
# (version, value, expires_at_ms) of a chosen version the caller has cached.
CachedValue: TypeAlias = tuple[int, bytes | None, int | None]


def is_positive(reply: Reply) -> bool:
    """Whether a reply counts toward a round's quorum."""
    if isinstance(reply, Promise | AcceptReply):
        return reply.ok
    return True


# Rounds, outcomes and mutations are values, never changed once built; not
# `frozen` only for the cost of a frozen __init__ (about 5x a plain one) on
# every operation. `unsafe_hash` keeps them hashable.
@dataclass(slots=True, unsafe_hash=True)
class Round:
    requests: dict[NodeId, Request]
    quorum: int
    oneway: list[tuple[NodeId, Request]] = field(default_factory=list)
    delay_s: float = 0.0


Replies: TypeAlias = dict[NodeId, Reply]


class Status(StrEnum):
    """How an operation ended."""

    OK = "ok"
    CONFLICT = "conflict"  # a condition failed; nothing written
    UNAVAILABLE = "unavailable"  # no majority in time: the outcome is unknown


@dataclass(slots=True, unsafe_hash=True)
class Outcome:
    """What an operation ended with. For reads `value` is None when the key
    is absent."""

    status: Status
    version: int = 0
    value: bytes | None = None
    expires_at_ms: int | None = None
    detail: str = ""
    entries: tuple[ScanEntry, ...] = ()
    cache_hit: bool = False  # a read whose value came from the caller's cache
    leased: bool = False  # a read that took a read lease (`Coordinator.read(lease=True)`)


@dataclass(slots=True, unsafe_hash=True)
class Mutation:
    """A write: the new value (None deletes) and its conditions."""

    value: bytes | None
    expires_at_ms: int | None = None
    if_version: int | None = None
    if_absent: bool = False
    # How many versions the write takes: the node folds k queued blind puts of
    # one key into one proposal at chosen + k, answering the i-th put with
    # chosen + i (see docs/DESIGN.md, "Write batching"). Conditional writes
    # take exactly one.
    versions: int = 1

    def __post_init__(self) -> None:
        assert self.versions >= 1, "a write takes at least one version"
        assert self.versions == 1 or (self.if_version is None and not self.if_absent), (
            "only blind writes are folded together"
        )

    def allows(self, version: int, present: bool | None) -> bool:
        """Whether the conditions hold; `present` None means not known, which
        only `if_absent` needs (the caller fetches the value first)."""
        if self.if_version is not None and self.if_version != version:
            return False
        if self.if_absent:
            assert present is not None, "if_absent needs to know whether the key is present"
            return not present
        return True


def is_present(value: bytes | None, expires_at_ms: int | None, now_ms: int) -> bool:
    """Whether a row with this value and expiry exists at `now_ms`."""
    return value is not None and (expires_at_ms is None or expires_at_ms > now_ms)


def majority(replicas: list[NodeId]) -> int:
    return len(replicas) // 2 + 1


def commit_messages(
    table: str,
    key: bytes,
    replicas: list[NodeId],
    acceptors: set[NodeId],
    version: int,
    ballot: Ballot,
    value: bytes | None,
    expires_at_ms: int | None,
    op_id: int,
) -> list[tuple[NodeId, Request]]:
    """Commit to every replica: by reference to those that accepted, with the
    value to the others (they may have missed the accept)."""
    messages: list[tuple[NodeId, Request]] = []
    for node in replicas:
        has_value = node not in acceptors
        messages.append(
            (
                node,
                Commit(
                    table,
                    key,
                    version,
                    ballot,
                    has_value,
                    value if has_value else None,
                    expires_at_ms if has_value else None,
                    op_id,
                ),
            )
        )
    return messages


@dataclass(slots=True)
class Chosen:
    """The latest chosen value a phase 1 or a read round found."""

    version: int
    value: bytes | None
    expires_at_ms: int | None
    value_known: bool
    op_id: int = 0
    # version -> op id of chosen versions the replies remembered (the latest too).
    ops: dict[int, int] = field(default_factory=dict)


def latest_chosen(replies: Replies) -> Chosen:
    version = max(
        (r.version for r in replies.values() if isinstance(r, Promise | ReadReply)), default=0
    )
    ops: dict[int, int] = {}
    for reply in replies.values():
        if isinstance(reply, Promise):
            ops.update(reply.recent_ops)
        if isinstance(reply, Promise | ReadReply) and reply.version > 0:
            ops[reply.version] = reply.op_id
    op_id = ops.get(version, 0)
    for reply in replies.values():
        if isinstance(reply, Promise | ReadReply) and reply.version == version and reply.has_value:
            return Chosen(version, reply.value, reply.expires_at_ms, True, op_id, ops)
    return Chosen(version, None, None, version == 0, op_id, ops)


def fetch_value(
    table: str, key: bytes, chosen: Chosen, replies: Replies
) -> Generator[Round, Replies, Chosen | None]:
    """Ask the replicas that hold the latest version for its value (they left it
    out because they thought we had it)."""
    holders = [
        node
        for node, reply in replies.items()
        if isinstance(reply, Promise | ReadReply) and reply.version == chosen.version
    ]
    fetched = yield Round({node: Read(table, key, -1) for node in holders}, quorum=1)
    for reply in fetched.values():
        if isinstance(reply, ReadReply) and reply.version >= chosen.version and reply.has_value:
            return Chosen(reply.version, reply.value, reply.expires_at_ms, True, reply.op_id)
    return None


def highest_proposal(promises: list[Promise], above: int) -> Accepted | None:
    """The proposal phase 1 must finish first: the highest version in flight
    above the latest chosen one, and for that version the highest ballot."""
    best: Accepted | None = None
    for promise in promises:
        accepted = promise.accepted
        if accepted is None or accepted.version <= above:
            continue
        if best is None or (accepted.version, accepted.ballot) > (best.version, best.ballot):
            best = accepted
    return best


def chosen_on_its_base(ops: dict[int, int], version: int, mutation: Mutation) -> bool:
    """Whether a write chosen at `version` was chosen on top of the version
    it was proposed on (`version - mutation.versions`), as far as the replicas'
    remembered ops (`ops`: version -> op id) show: no other operation chosen
    in between, and the memory reaching back to that base. Always true for a
    write of one version; False when it cannot be told."""
    if mutation.versions == 1:
        return True
    base = version - mutation.versions
    if any(base < v < version for v in ops):
        return False
    return base == 0 or any(v <= base for v in ops)
