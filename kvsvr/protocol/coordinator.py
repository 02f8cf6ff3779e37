"""Coordinators for strong tables: read, write (put / delete / compare-and-set), scan.

Each operation is a generator. It yields a `Round` (messages to send to some
replicas, how many positive replies it needs, one-way messages to fire, and a
delay to wait first) and receives back the replies that came in, as a dict
from replica to reply. It returns an `Outcome`. It never touches a socket, a
clock or a disk: the node drives it over TCP and LMDB, the tests and the
simulator drive it in memory. The values it exchanges with its driver, and the
pure reading of one round's replies, are in `kvsvr.protocol.rounds`; this
module is the state machine. The driver's duties, all of them:

- wait `delay_s`, then send every one-way message, and the requests: all of
  them, or first only to enough replicas to make the quorum and to the others
  when those do not (safety never depends on which replicas answer);
- return as soon as `quorum` replies are positive (`is_positive`), or enough
  refusals came that the quorum is out of reach, or the round timed out;
- run at most one operation per (table, key) at a time on one coordinator
  (the fast path's correctness does not rely on it; its speed does).

Per key, per version, single-decree Paxos; a ballot promised for a key holds
for every later version, so a coordinator whose last proposal on a key was
chosen still holds a majority's promise and skips phase 1 (the fast path).
"""

from __future__ import annotations

import random
from collections.abc import Generator
from dataclasses import dataclass

from kvsvr.protocol.messages import (
    Accept,
    AcceptReply,
    Commit,
    Prepare,
    Promise,
    Read,
    ReadReply,
    Request,
    ScanEntry,
    ScanReply,
    ScanRequest,
)
from kvsvr.protocol.rounds import CachedValue as CachedValue
from kvsvr.protocol.rounds import (
    Chosen,
    chosen_on_its_base,
    commit_messages,
    fetch_value,
    highest_proposal,
    is_present,
    latest_chosen,
    majority,
)
from kvsvr.protocol.rounds import Mutation as Mutation
from kvsvr.protocol.rounds import NodeId as NodeId
from kvsvr.protocol.rounds import Outcome as Outcome
from kvsvr.protocol.rounds import Replies as Replies
from kvsvr.protocol.rounds import Round as Round
from kvsvr.protocol.rounds import Status as Status
from kvsvr.protocol.rounds import is_positive as is_positive
from kvsvr.protocol.state import Ballot
from kvsvr.protocol.write_leases import LEASE_ENTRY_BYTES as LEASE_ENTRY_BYTES
from kvsvr.protocol.write_leases import LEASES_BYTES_MAX as LEASES_BYTES_MAX
from kvsvr.protocol.write_leases import Lease as Lease
from kvsvr.protocol.write_leases import WriteLeases

# Rounds one operation may try before giving up with Unavailable. Each failed
# round means a duel with another coordinator or a missing majority; beyond a
# handful, the client is better served by an answer ("outcome unknown") than
# by more waiting.
ATTEMPTS_MAX = 8
# A strong read that finds a proposal in flight under this coordinator's own
# ballot (most often its own write of the key, accepted and about to be
# committed) reads again after READ_WAIT_S, up to READ_WAITS_MAX times, before
# recovering it: recovery's phase 1 takes the key's promise from that write,
# whose next write then loses the fast path (a hot key read and written
# through one coordinator recovered ~1 in 2 writes). Each read attempt is a
# read on its own, so reading again is as linearizable as reading once.
READ_WAIT_S = 0.004
READ_WAITS_MAX = 3
# Backoff between attempts after a duel, in seconds, doubled per attempt,
# randomised so that duelling coordinators fall out of step.
BACKOFF_BASE_S = 0.002
BACKOFF_MAX_S = 0.2


@dataclass(slots=True)
class CoordinatorStats:
    writes: int = 0
    fast_path_writes: int = 0
    fast_path_failures: int = 0
    recoveries: int = 0
    reads: int = 0
    conflicts: int = 0
    unavailable: int = 0
    duels: int = 0
    read_waits: int = 0  # reads that found their own proposal in flight and read again
    lease_waits: int = 0  # accept rounds held back by another node's read lease
    leases_taken: int = 0  # strong reads that took a read lease


class Coordinator(WriteLeases):
    """One node's coordinator state, shared by all the operations it runs
    (the promises it holds, `WriteLeases`, included)."""

    def __init__(self, node_id: NodeId, rng: random.Random) -> None:
        assert node_id > 0, "node ids start at 1 so that ballot (0, 0) is below all"
        super().__init__()
        self.node_id = node_id
        self.rng = rng
        self.round_seen = 0
        self.stats = CoordinatorStats()
        self._op_counter = 0

    # ------------------------------------------------------------ helpers

    def next_op_id(self) -> int:
        self._op_counter += 1
        # Unique across nodes and restarts with overwhelming probability.
        return (self.node_id << 48) ^ (self.rng.getrandbits(40) << 8) ^ self._op_counter

    def next_ballot(self) -> Ballot:
        self.round_seen += 1
        return (self.round_seen, self.node_id)

    def observe(self, ballot: Ballot) -> None:
        self.round_seen = max(self.round_seen, ballot[0])

    def known_for(self, node: NodeId, known_version: int) -> int:
        """The version to tell `node` we already hold. Our own replica sends its
        value anyway (it costs nothing in-process); remote ones leave it out
        when it is the version our replica holds."""
        return -1 if node == self.node_id else known_version

    def backoff_s(self, attempt: int) -> float:
        ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2**attempt))
        return self.rng.uniform(0, ceiling)

    # ------------------------------------------------------------ operations

    def write(
        self,
        table: str,
        key: bytes,
        replicas: list[NodeId],
        mutation: Mutation,
        now_ms: int,
        known_version: int = -1,
    ) -> Generator[Round, Replies, Outcome]:
        """put / delete / compare-and-set on one key."""
        return _write(self, table, key, replicas, mutation, now_ms, known_version)

    def read(
        self,
        table: str,
        key: bytes,
        replicas: list[NodeId],
        now_ms: int,
        known_version: int = -1,
        cached: CachedValue | None = None,
        lease: bool = False,
    ) -> Generator[Round, Replies, Outcome]:
        """A linearizable read of one key. With `cached` (a version and its value
        the caller holds), no replica sends that version's value, and the cached
        value answers only if a majority's latest chosen version is exactly it.
        With `lease`, the read asks its replicas for a read lease on the key;
        `Outcome.leased` says whether it holds one (counted from before the
        read's first round left, by the caller's clock)."""
        return _read(self, table, key, replicas, now_ms, known_version, cached, lease)

    def scan(
        self,
        table: str,
        prefix: bytes,
        start: bytes,
        end: bytes,
        limit: int,
        replicas: list[NodeId],
        now_ms: int,
    ) -> Generator[Round, Replies, Outcome]:
        """Rows of one partition key in [start, end); each key read as by `read`."""
        return _scan(self, table, prefix, start, end, limit, replicas, now_ms)


def _unknown(
    coordinator: Coordinator, pending_oneway: list[tuple[NodeId, Request]], detail: str
) -> Generator[Round, Replies, Outcome]:
    """A write that gives up with its outcome unknown: the commits it still
    owes go out first (one-way), then `Unavailable`."""
    if pending_oneway:
        yield Round({}, quorum=0, oneway=pending_oneway)
    coordinator.stats.unavailable += 1
    return Outcome(Status.UNAVAILABLE, detail=detail)


def _accept_round(
    coordinator: Coordinator,
    table: str,
    key: bytes,
    replicas: list[NodeId],
    ballot: Ballot,
    version: int,
    proposal: Mutation,
    op_id: int,
    commit: tuple[int, Ballot] | None,
    oneway: list[tuple[NodeId, Request]],
) -> Generator[Round, Replies, tuple[set[NodeId] | None, float]]:
    """Phase 2. Returns the acceptors when a majority accepted, else None;
    and how long to wait before trying again when replicas held the accept
    back for a read lease (0.0 otherwise)."""
    commit_version, commit_ballot = commit if commit is not None else (0, (0, 0))
    message = Accept(
        table,
        key,
        ballot,
        version,
        proposal.value,
        proposal.expires_at_ms,
        op_id,
        commit_version,
        commit_ballot,
    )
    replies = yield Round(
        {node: message for node in replicas}, quorum=majority(replicas), oneway=oneway
    )
    acceptors = {n for n, r in replies.items() if isinstance(r, AcceptReply) and r.ok}
    wait_s = 0.0
    for reply in replies.values():
        if isinstance(reply, AcceptReply) and not reply.ok:
            coordinator.observe(reply.promised)
            wait_s = max(wait_s, reply.wait_s)
    if len(acceptors) >= majority(replicas):
        return acceptors, 0.0
    if wait_s > 0:
        coordinator.stats.lease_waits += 1
    return None, wait_s


def _write(
    coordinator: Coordinator,
    table: str,
    key: bytes,
    replicas: list[NodeId],
    mutation: Mutation,
    now_ms: int,
    known_version: int,
) -> Generator[Round, Replies, Outcome]:
    """Fast path if we hold the key's promise, else phase 1 + recovery + phase 2.

    Every proposal of this operation carries its `op_id`. Once an accept round
    was sent for version V, that proposal may be chosen later, even by another
    coordinator's recovery; so before proposing again we must learn its fate:
    chosen (done), lost (V went to another operation: try again), or unknowable
    (a later version is chosen on top of V: answer "unavailable", outcome unknown,
    rather than risk applying the operation twice).
    """
    assert replicas, "a key has at least one replica"
    stats = coordinator.stats
    stats.writes += 1
    op_id = coordinator.next_op_id()
    quorum = majority(replicas)
    pending_oneway: list[tuple[NodeId, Request]] = []
    delay_s = 0.0
    attempted: int | None = None  # the version our last accept round proposed at

    lease = coordinator.take_lease(table, key)
    if lease is not None and (
        (lease.present is None and mutation.if_absent)
        or not mutation.allows(lease.version, lease.present)
    ):
        # A lease is what this coordinator last chose, not what the key holds
        # now: another coordinator may have written since. Only an accept that
        # a majority takes proves the lease current, so a condition that fails
        # against it proves nothing; phase 1 asks a majority (see
        # docs/DESIGN.md, "Coordinators", the fast path).
        lease = None
    if lease is not None:
        attempted = lease.version + mutation.versions
        acceptors, delay_s = yield from _accept_round(
            coordinator,
            table,
            key,
            replicas,
            lease.ballot,
            attempted,
            mutation,
            op_id,
            (lease.version, lease.ballot),
            [],
        )
        if acceptors is not None:
            stats.fast_path_writes += 1
            return (
                yield from _finish_write(
                    coordinator,
                    table,
                    key,
                    replicas,
                    acceptors,
                    lease.ballot,
                    attempted,
                    mutation,
                    op_id,
                )
            )
        stats.fast_path_failures += 1

    for attempt in range(ATTEMPTS_MAX):
        ballot = coordinator.next_ballot()
        replies = yield Round(
            {
                node: Prepare(table, key, ballot, coordinator.known_for(node, known_version))
                for node in replicas
            },
            quorum=quorum,
            oneway=pending_oneway,
            delay_s=delay_s,
        )
        pending_oneway = []
        promised = {n: r for n, r in replies.items() if isinstance(r, Promise) and r.ok}
        for reply in replies.values():
            if isinstance(reply, Promise) and not reply.ok:
                coordinator.observe(reply.promised)
        if len(promised) < quorum:
            stats.duels += 1
            delay_s = coordinator.backoff_s(attempt)
            continue

        chosen = latest_chosen(dict(promised))
        in_flight = highest_proposal(list(promised.values()), chosen.version)
        if in_flight is not None:
            # Recovery: a proposal may have been chosen that we have not seen
            # committed. Finish it under our ballot before anything else.
            stats.recoveries += 1
            proposal = Mutation(in_flight.value, in_flight.expires_at_ms)
            acceptors, wait_s = yield from _accept_round(
                coordinator,
                table,
                key,
                replicas,
                ballot,
                in_flight.version,
                proposal,
                in_flight.op_id,
                None,
                [],
            )
            if acceptors is None:
                if wait_s == 0:
                    stats.duels += 1
                delay_s = max(coordinator.backoff_s(attempt), wait_s)
                continue
            pending_oneway = commit_messages(
                table,
                key,
                replicas,
                acceptors,
                in_flight.version,
                ballot,
                in_flight.value,
                in_flight.expires_at_ms,
                in_flight.op_id,
            )
            chosen = Chosen(
                in_flight.version,
                in_flight.value,
                in_flight.expires_at_ms,
                True,
                in_flight.op_id,
                {**chosen.ops, in_flight.version: in_flight.op_id},
            )

        if attempted is not None and chosen.version >= attempted:
            winner = chosen.ops.get(attempted)
            if winner == op_id and not chosen_on_its_base(chosen.ops, attempted, mutation):
                # Ours was chosen, but a recovery chose it on top of another
                # operation's version: a folded group's members cannot be
                # given versions of their own. Applied, but say so as unknown.
                return (
                    yield from _unknown(
                        coordinator,
                        pending_oneway,
                        "chosen on top of another write; the members' versions are unknown",
                    )
                )
            if winner == op_id:
                # Our earlier attempt was chosen: that is our answer.
                if chosen.version == attempted:
                    coordinator.put_lease(
                        table, key, Lease(ballot, attempted, mutation.value is not None)
                    )
                yield Round({}, quorum=0, oneway=pending_oneway)
                return Outcome(Status.OK, version=attempted)
            if winner is None:
                # Versions were chosen on top of ours and no replica remembers
                # which operation won it: ours may have. Never guess.
                return (
                    yield from _unknown(
                        coordinator,
                        pending_oneway,
                        "lost track of an attempt that may have been chosen; outcome unknown",
                    )
                )
            attempted = None  # version `attempted` went to another operation

        if attempted is not None and chosen.version + mutation.versions != attempted:
            # Our last attempt was proposed on top of an older chosen version
            # and is still undecided: a replica outside this quorum may hold it
            # for a later recovery to choose. Proposing again at another
            # version could get both chosen and apply the write twice (a
            # folded group, whose base another write has since taken). A new
            # attempt at the same version is safe: one version, one value.
            return (
                yield from _unknown(
                    coordinator,
                    pending_oneway,
                    "an earlier attempt may still be chosen; outcome unknown",
                )
            )

        if not chosen.value_known and mutation.if_absent:
            # Only `if_absent` needs the value itself; `if_version` needs the version.
            fetched = yield from fetch_value(table, key, chosen, replies)
            if fetched is None or fetched.version != chosen.version:
                delay_s = coordinator.backoff_s(attempt)
                continue
            chosen = fetched

        present = (
            is_present(chosen.value, chosen.expires_at_ms, now_ms) if chosen.value_known else None
        )
        if not mutation.allows(chosen.version, present):
            coordinator.put_lease(table, key, Lease(ballot, chosen.version, present))
            if pending_oneway:
                yield Round({}, quorum=0, oneway=pending_oneway)
            stats.conflicts += 1
            return Outcome(Status.CONFLICT, version=chosen.version, detail="condition failed")

        attempted = chosen.version + mutation.versions
        acceptors, wait_s = yield from _accept_round(
            coordinator,
            table,
            key,
            replicas,
            ballot,
            attempted,
            mutation,
            op_id,
            None,
            pending_oneway,
        )
        pending_oneway = []
        if acceptors is None:
            if wait_s == 0:
                stats.duels += 1
            delay_s = max(coordinator.backoff_s(attempt), wait_s)
            continue
        return (
            yield from _finish_write(
                coordinator, table, key, replicas, acceptors, ballot, attempted, mutation, op_id
            )
        )

    return (
        yield from _unknown(coordinator, pending_oneway, "no majority of replicas accepted in time")
    )


def _finish_write(
    coordinator: Coordinator,
    table: str,
    key: bytes,
    replicas: list[NodeId],
    acceptors: set[NodeId],
    ballot: Ballot,
    version: int,
    mutation: Mutation,
    op_id: int,
) -> Generator[Round, Replies, Outcome]:
    coordinator.put_lease(table, key, Lease(ballot, version, mutation.value is not None))
    commits = commit_messages(
        table,
        key,
        replicas,
        acceptors,
        version,
        ballot,
        mutation.value,
        mutation.expires_at_ms,
        op_id,
    )
    yield Round({}, quorum=0, oneway=commits)
    return Outcome(Status.OK, version=version)


def _read(
    coordinator: Coordinator,
    table: str,
    key: bytes,
    replicas: list[NodeId],
    now_ms: int,
    known_version: int,
    cached: CachedValue | None = None,
    lease: bool = False,
) -> Generator[Round, Replies, Outcome]:
    stats = coordinator.stats
    stats.reads += 1
    lease_for = coordinator.node_id if lease else 0
    cache_hit = False
    quorum = majority(replicas)
    delay_s = 0.0
    waits = 0
    for attempt in range(ATTEMPTS_MAX + READ_WAITS_MAX):
        if attempt - waits >= ATTEMPTS_MAX:
            break  # as many attempts as ever, besides the waits
        replies = yield Round(
            {
                node: Read(
                    table,
                    key,
                    cached[0] if cached is not None else coordinator.known_for(node, known_version),
                    lease_for,
                )
                for node in replicas
            },
            quorum=quorum,
            delay_s=delay_s,
        )
        if len(replies) < quorum:
            delay_s = coordinator.backoff_s(attempt - waits)
            continue
        chosen = latest_chosen(replies)
        in_flight = [
            r
            for r in replies.values()
            if isinstance(r, ReadReply) and r.accepted_version > chosen.version
        ]
        if (
            in_flight
            and waits < READ_WAITS_MAX
            and all(
                r.accepted_ballot is not None and r.accepted_ballot[1] == coordinator.node_id
                for r in in_flight
            )
        ):
            waits += 1
            stats.read_waits += 1
            delay_s = READ_WAIT_S
            continue
        if in_flight:
            # A proposal above the latest chosen version may or may not be
            # chosen: settle it with a full Paxos round, then read again.
            coordinator.drop_lease(table, key)
            outcome, wait_s = yield from _recover(coordinator, table, key, replicas)
            if outcome is None:
                delay_s = max(coordinator.backoff_s(attempt - waits), wait_s)
                continue
            chosen = outcome
        elif not chosen.value_known and cached is not None and cached[0] == chosen.version:
            # The latest chosen version is the one cached: no value moved.
            chosen = Chosen(chosen.version, cached[1], cached[2], True, chosen.op_id, chosen.ops)
            cache_hit = True
        elif not chosen.value_known:
            fetched = yield from fetch_value(table, key, chosen, replies)
            if fetched is None:
                delay_s = coordinator.backoff_s(attempt - waits)
                continue
            chosen = fetched
        repairs: list[tuple[NodeId, Request]] = [
            (
                node,
                Commit(
                    table,
                    key,
                    chosen.version,
                    (0, 0),
                    True,
                    chosen.value,
                    chosen.expires_at_ms,
                    chosen.op_id,
                ),
            )
            for node, reply in replies.items()
            if isinstance(reply, ReadReply) and reply.version < chosen.version
        ]
        if repairs:
            yield Round({}, quorum=0, oneway=repairs)
        present = is_present(chosen.value, chosen.expires_at_ms, now_ms)
        # A read lease holds with grants from a majority none of which holds
        # a proposal above the version read: any other proposal then needs
        # an accept from a granting replica, which it refuses until the
        # lease lapses. A read that recovered a proposal takes no lease.
        leased = (
            lease
            and not in_flight
            and sum(
                1
                for reply in replies.values()
                if isinstance(reply, ReadReply)
                and reply.lease
                and reply.accepted_version <= chosen.version
            )
            >= quorum
        )
        if leased:
            stats.leases_taken += 1
        return Outcome(
            Status.OK,
            version=chosen.version,
            value=chosen.value if present else None,
            expires_at_ms=chosen.expires_at_ms if present else None,
            cache_hit=cache_hit,
            leased=leased,
        )
    stats.unavailable += 1
    return Outcome(Status.UNAVAILABLE, detail="no majority of replicas answered in time")


def _recover(
    coordinator: Coordinator, table: str, key: bytes, replicas: list[NodeId]
) -> Generator[Round, Replies, tuple[Chosen | None, float]]:
    """Phase 1 plus, if a proposal is in flight, phase 2 for it. Returns the
    latest chosen value afterwards, or None if this attempt lost a duel; and
    how long a read lease held its accept back (0.0 if none did)."""
    coordinator.stats.recoveries += 1
    quorum = majority(replicas)
    ballot = coordinator.next_ballot()
    prepare = Prepare(table, key, ballot, -1)
    replies = yield Round({node: prepare for node in replicas}, quorum=quorum)
    promises = [r for r in replies.values() if isinstance(r, Promise) and r.ok]
    for reply in replies.values():
        if isinstance(reply, Promise) and not reply.ok:
            coordinator.observe(reply.promised)
    if len(promises) < quorum:
        return None, 0.0
    chosen = latest_chosen({n: r for n, r in replies.items() if isinstance(r, Promise) and r.ok})
    in_flight = highest_proposal(promises, chosen.version)
    if in_flight is None:
        return (chosen if chosen.value_known else None), 0.0
    acceptors, wait_s = yield from _accept_round(
        coordinator,
        table,
        key,
        replicas,
        ballot,
        in_flight.version,
        Mutation(in_flight.value, in_flight.expires_at_ms),
        in_flight.op_id,
        None,
        [],
    )
    if acceptors is None:
        return None, wait_s
    commits = commit_messages(
        table,
        key,
        replicas,
        acceptors,
        in_flight.version,
        ballot,
        in_flight.value,
        in_flight.expires_at_ms,
        in_flight.op_id,
    )
    coordinator.put_lease(table, key, Lease(ballot, in_flight.version, in_flight.value is not None))
    yield Round({}, quorum=0, oneway=commits)
    return (
        Chosen(in_flight.version, in_flight.value, in_flight.expires_at_ms, True, in_flight.op_id),
        0.0,
    )


def _scan(
    coordinator: Coordinator,
    table: str,
    prefix: bytes,
    start: bytes,
    end: bytes,
    limit: int,
    replicas: list[NodeId],
    now_ms: int,
) -> Generator[Round, Replies, Outcome]:
    """Merge a majority's rows; a key whose replicas disagree about an in-flight
    proposal is read on its own, with recovery, before it is reported."""
    quorum = majority(replicas)
    request = ScanRequest(table, prefix, start, end, limit)
    replies: Replies = {}
    for attempt in range(ATTEMPTS_MAX):
        replies = yield Round(
            {node: request for node in replicas},
            quorum=quorum,
            delay_s=coordinator.backoff_s(attempt) if attempt else 0.0,
        )
        if len(replies) >= quorum:
            break
    else:
        coordinator.stats.unavailable += 1
        return Outcome(Status.UNAVAILABLE, detail="no majority of replicas answered in time")

    scan_replies = [r for r in replies.values() if isinstance(r, ScanReply)]
    # Keys past the last key of a replica that stopped at its limit may be
    # missing from its answer: report only up to the smallest such key.
    cutoff: bytes | None = None
    for reply in scan_replies:
        if reply.truncated and reply.entries:
            last = reply.entries[-1].key
            cutoff = last if cutoff is None else min(cutoff, last)
    latest: dict[bytes, ScanEntry] = {}
    unsettled: set[bytes] = set()
    for reply in scan_replies:
        for entry in reply.entries:
            if cutoff is not None and entry.key > cutoff:
                continue
            current = latest.get(entry.key)
            if current is None or entry.version > current.version:
                latest[entry.key] = entry
            if entry.accepted_version > 0:
                unsettled.add(entry.key)
    for key in sorted(unsettled):
        entry = latest[key]
        if not any(
            e.key == key and e.accepted_version > entry.version
            for reply in scan_replies
            for e in reply.entries
        ):
            continue
        outcome = yield from _read(coordinator, table, key, replicas, now_ms, -1)
        if outcome.status != Status.OK:
            return outcome
        latest[key] = ScanEntry(key, outcome.version, outcome.value, outcome.expires_at_ms, 0)
    # A key seen on only part of the quorum with a lower version everywhere else
    # is as settled as a read: the highest chosen version wins.
    entries = tuple(
        latest[key]
        for key in sorted(latest)
        if is_present(latest[key].value, latest[key].expires_at_ms, now_ms)
    )[:limit]
    return Outcome(Status.OK, entries=entries)
