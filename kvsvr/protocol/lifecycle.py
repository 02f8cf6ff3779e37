"""Cluster lifecycle, sans-IO: how a node starts, when it may vote, and from
whom an empty replica rebuilds.

Every decision is a pure function of what the node holds and what its peers
said; the node (`kvsvr/node/replication.py`) gathers those facts and acts.

**Identity.** A cluster has an id (a UUID) made once, when its config is
written. A node keeps `Identity(cluster_id, node_id)` in its LMDB `meta`, in
the same environment as its rows: a directory either holds both or neither
(a deleted or replaced `data.mdb` takes the identity with it; a copied one
brings it along), and it is committed with the same fsync discipline. A node
refuses to start on another cluster's or another node's directory.

**Start.** `decide_start` from the directory alone:

    identity of another cluster/node           -> refuse (exit)
    identity of this cluster and node          -> ready (a restart: it votes)
    ... and a rebuild that had not finished    -> replacement (take the rebuild up again)
    rows but no identity (older directory)     -> adopt: write the identity, ready
    empty, initial state "existing"            -> replacement: rebuild before voting
    empty, initial state "new"                 -> ask the peers (`decide_new`)

**A founding node or a wiped one** (empty, "new"): every node records the
peers it has seen *ready* (voting) in its `meta` (`members`). `decide_new`:
a peer of another cluster -> refuse; a peer that knows this node as a member
-> it was wiped: replacement; every peer answered and none knows it ->
founding: write the identity and vote at once. When some peers do not answer,
a majority of the cluster (this node included) that answered and
`FOUNDING_WAIT_S` of waiting found it too, so that two nodes of three can
found a cluster. What a peer holds (rows, which a failed write leaves) never
enters the decision. Peers answer hellos whatever their own state, so
nobody waits on another's decision.

**Rebuild.** `plan_rebuild`: a replacement copies each partition it holds
from `peers_needed_to_rebuild` of its other replicas that are *ready*
(for 3 replicas both others, with 5 three of the four: a majority of the
partition), merging promises and proposals. A peer that is itself
rebuilding or waiting for an operator is never a source and never waited
on: when too few of a partition's replicas kept their data to make that
count, the node says which (needs operator) and does not guess, until an
operator accepts the loss (`kvsvr recover --accept-data-loss`): it then
rebuilds from the replicas that kept their data, and reports the
partitions that had fewer than a full set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

import msgpack

from kvsvr.errors import FrameError
from kvsvr.protocol.replica import peers_needed_to_rebuild

NEW: Final = "new"
EXISTING: Final = "existing"
INITIAL_STATES: Final = (NEW, EXISTING)


class ReplicaState(StrEnum):
    """A node's replica state, as its status and its hellos report it."""

    STARTING = "starting"  # the process is up; nothing decided yet
    WAITING_FOR_PEERS = "waiting_for_peers"  # empty, "new": asking whether it founds
    REBUILDING = "rebuilding"  # a replacement copying its rows; it does not vote
    NEEDS_OPERATOR = "needs_operator"  # too few replicas kept their data
    READY = "ready"  # it votes


STARTING: Final = ReplicaState.STARTING
WAITING_FOR_PEERS: Final = ReplicaState.WAITING_FOR_PEERS
REBUILDING: Final = ReplicaState.REBUILDING
NEEDS_OPERATOR: Final = ReplicaState.NEEDS_OPERATOR
READY: Final = ReplicaState.READY
STATES: Final = tuple(ReplicaState)
# States of a node that lost its data: never a rebuild source.
LOST_DATA_STATES: Final = frozenset({REBUILDING, NEEDS_OPERATOR})

# A founding node that hears from a majority of the cluster but not from
# everyone waits this long for the rest: one of them may know it as a member
# (then it was wiped, not new). Long enough for a loaded machine's peers to
# answer a hello (they answer whatever their state), short enough that two of
# three nodes found a cluster without the third.
FOUNDING_WAIT_S: Final = 5.0

CLUSTER_ID_CHARS_MAX: Final = 64  # a UUID is 36; room for a hand-made id


class WrongCluster(Exception):
    """A node was given another cluster's (or another node's) data directory,
    or its peers belong to another cluster: it refuses to run."""


@dataclass(frozen=True, slots=True)
class Identity:
    cluster_id: str
    node_id: str

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb([self.cluster_id, self.node_id])
        return packed

    @staticmethod
    def from_bytes(raw: bytes) -> Identity:
        try:
            fields = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as error:
            raise FrameError(f"unreadable identity in meta: {error}") from None
        if (
            not isinstance(fields, list)
            or len(fields) != 2
            or not all(isinstance(f, str) and f for f in fields)
        ):
            raise FrameError(f"unreadable identity in meta: {fields!r}")
        return Identity(fields[0], fields[1])


# --------------------------------------------------------------------- start


Start = Literal["ready", "adopt", "replacement", "ask_peers", "refuse"]


@dataclass(frozen=True, slots=True)
class StartDecision:
    kind: Start
    reason: str


def decide_start(
    stored: Identity | None,
    has_rows: bool,
    cluster_id: str,
    node_id: str,
    initial_state: str,
    *,
    rebuild_pending: bool = False,
) -> StartDecision:
    """What a node does with its data directory (see the module docstring).
    `rebuild_pending`: a replacement's rebuild started here and did not end."""
    assert initial_state in INITIAL_STATES
    if stored is not None:
        if stored.cluster_id != cluster_id:
            return StartDecision(
                "refuse",
                f"this data directory belongs to cluster {stored.cluster_id}, "
                f"not to cluster {cluster_id} of the config",
            )
        if stored.node_id != node_id:
            return StartDecision(
                "refuse", f"this data directory holds node {stored.node_id}'s data, not {node_id}'s"
            )
    if rebuild_pending:
        return StartDecision("replacement", "its rebuild was cut short: taking it up again")
    if stored is not None:
        return StartDecision("ready", "restarted with its data")
    if has_rows:
        return StartDecision("adopt", "data present from before cluster ids; adopting the config's")
    if initial_state == EXISTING:
        return StartDecision("replacement", "empty data directory in an existing cluster")
    return StartDecision("ask_peers", "empty data directory in a new cluster")


@dataclass(frozen=True, slots=True)
class Hello:
    """A heartbeat: who sends it, of which cluster, in which state."""

    cluster_id: str
    node_id: str
    state: ReplicaState

    def to_wire(self) -> list[Any]:
        return [self.cluster_id, self.node_id, self.state]

    @staticmethod
    def from_wire(body: object) -> Hello:
        if (
            not isinstance(body, list)
            or len(body) != 3
            or not all(isinstance(f, str) for f in body)
            or len(body[0]) > CLUSTER_ID_CHARS_MAX
        ):
            raise FrameError("a hello is [cluster id, node id, state]")
        return Hello(body[0], body[1], _state_in(body[2]))


@dataclass(frozen=True, slots=True)
class HelloReply:
    """The answer: the peer's cluster and state, and whether it has seen the
    sender ready (voting) before."""

    cluster_id: str
    state: ReplicaState
    knows_you: bool

    def to_wire(self) -> list[Any]:
        return [self.cluster_id, self.state, self.knows_you]

    @staticmethod
    def from_wire(body: object) -> HelloReply:
        if (
            not isinstance(body, list)
            or len(body) != 3
            or not isinstance(body[0], str)
            or not isinstance(body[1], str)
            or not isinstance(body[2], bool)
        ):
            raise FrameError("a hello reply is [cluster id, state, knows you]")
        return HelloReply(body[0], _state_in(body[1]), body[2])


def _state_in(raw: str) -> ReplicaState:
    try:
        return ReplicaState(raw)
    except ValueError:
        raise FrameError(f"unknown replica state {raw!r}") from None


New = Literal["found", "replacement", "wait", "refuse"]


@dataclass(frozen=True, slots=True)
class NewDecision:
    kind: New
    reason: str


def decide_new(
    replies: Mapping[str, HelloReply],
    peers: Sequence[str],
    cluster_id: str,
    waited_s: float,
) -> NewDecision:
    """An empty node of a "new" cluster: found it, or rebuild as a replacement?
    `replies`: the latest answer of each peer that answered (by node id);
    `waited_s`: how long it has been asking."""
    for peer, reply in sorted(replies.items()):
        if reply.cluster_id != cluster_id:
            return NewDecision(
                "refuse", f"peer {peer} belongs to cluster {reply.cluster_id}, not {cluster_id}"
            )
    knowing = sorted(peer for peer, reply in replies.items() if reply.knows_you)
    if knowing:
        return NewDecision(
            "replacement",
            f"{', '.join(knowing)} knew this node as a member: its data directory was lost",
        )
    answered = sum(1 for peer in peers if peer in replies)
    if answered == len(peers):
        return NewDecision("found", "new cluster: no peer knew this node")
    cluster_size = len(peers) + 1
    if 1 + answered > cluster_size // 2 and waited_s >= FOUNDING_WAIT_S:
        return NewDecision(
            "found",
            f"new cluster: {answered} of {len(peers)} peers answered and none knew this node",
        )
    return NewDecision("wait", f"{answered} of {len(peers)} peers answered")


# --------------------------------------------------------------------- rebuild


@dataclass(frozen=True, slots=True)
class RebuildPlan:
    """`sources`: the ready peers to copy from (None: not yet). `lost`: when
    an operator is needed, partition -> the replicas (this node included) that
    lost their data. `short`: partitions rebuilt from fewer replicas than a
    full rebuild takes (only with the loss accepted) -> the sources used."""

    sources: frozenset[int] | None
    waiting_for: tuple[int, ...] = ()
    lost: dict[int, tuple[int, ...]] = field(default_factory=dict)
    short: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def needs_operator(self) -> bool:
        return bool(self.lost)


def plan_rebuild(
    replica_sets: Sequence[Sequence[int]],
    me: int,
    peer_states: Mapping[int, str],
    *,
    accept_data_loss: bool = False,
) -> RebuildPlan:
    """Where a replacement rebuilds from. `peer_states`: the last state each
    peer reported (a peer absent has not answered). A partition needs
    `peers_needed_to_rebuild` ready replicas besides this one; peers that lost
    their data are never waited on."""
    sources: set[int] = set()
    waiting: set[int] = set()
    lost: dict[int, tuple[int, ...]] = {}
    short: dict[int, tuple[int, ...]] = {}
    for partition, replicas in enumerate(replica_sets):
        if me not in replicas:
            continue
        others = [r for r in replicas if r != me]
        needed = min(peers_needed_to_rebuild(len(replicas)), len(others))
        ready = [r for r in others if peer_states.get(r) == READY]
        gone = [r for r in others if peer_states.get(r) in LOST_DATA_STATES]
        if len(ready) >= needed:
            sources.update(ready)
            continue
        if accept_data_loss:
            sources.update(ready)
            short[partition] = tuple(ready)
        elif len(others) - len(gone) < needed:
            lost[partition] = tuple(sorted([me, *gone]))
        else:
            waiting.update(r for r in others if r not in ready and r not in gone)
    if lost:
        return RebuildPlan(None, tuple(sorted(waiting)), lost)
    if waiting:
        return RebuildPlan(None, tuple(sorted(waiting)))
    return RebuildPlan(frozenset(sources), short=short)


def needs_operator_message(lost: Mapping[int, Sequence[str]]) -> str:
    """'needs operator: n1, n2 lost data for partitions 0-3, 7'."""
    by_nodes: dict[tuple[str, ...], list[int]] = {}
    for partition, nodes in sorted(lost.items()):
        by_nodes.setdefault(tuple(nodes), []).append(partition)
    parts = [
        f"{', '.join(nodes)} lost data for partitions {partition_ranges(partitions)}"
        for nodes, partitions in sorted(by_nodes.items())
    ]
    return "needs operator: " + "; ".join(parts)


def partition_ranges(partitions: Sequence[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    runs: list[list[int]] = []
    for partition in sorted(partitions):
        if runs and partition == runs[-1][1] + 1:
            runs[-1][1] = partition
        else:
            runs.append([partition, partition])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
