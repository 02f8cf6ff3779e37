"""Read leases, as pure bookkeeping: who granted what to whom, until when.

A strong read that runs its quorum round may ask for a lease on the key. Each
replica that answers grants it, and from then until `received_at + hold_s`
on its own monotonic clock refuses an Accept of that key from any coordinator
other than the holders. The holder counts its lease from *before* it sent the
read, `sent_at + lease_s` on its own monotonic clock, and holds it only with
grants from a majority of the key's replicas, none of which reported a
proposal accepted above the version the read returned. Every accept quorum
meets that majority, so while the lease holds only a holder can get a new
version chosen, and a holder that has no write of its own in flight on the
key may answer a strong read of it locally, with no message.

The one assumption: each node's monotonic clock runs at a rate within
`clock_drift_max` of real time (a fraction, 0.01 = 1%). Clocks need not
agree on the time. The replica's hold is the holder's lease stretched by the
worst ratio of two such rates (`LeaseTiming.hold_s`), so the replica refuses
other coordinators' Accepts for at least as long, in real time, as the
holder still reads locally.

Nothing here is durable. A replica that restarts has forgotten its grants,
so it refuses every Accept for one hold period after it starts
(`Grants.accepts_open`).

Two tables, both bounded (a full table refuses new grants or holds, which
costs a quorum round per read and nothing else):

- `Grants`, on every replica: (table, key) -> {holder node index: until}.
- `Holds`, on every coordinator: (table, key) -> until, plus the keys with a
  write of this coordinator in flight.

A key whose writes keep waiting for leases should not be leased: the
writers pay up to `lease_s` each time. So `Grants` remembers, for
`contended_s` after each Accept of a key, which coordinator wrote it, and
grants a lease only to that coordinator: a key written through one node
(kvsvr's client sends every request for a key to its preferred
coordinator) is leased by that node and its writes never wait, while a key
written through several nodes at once, or one on which an Accept had to
wait (contended), is not leased by anyone until `contended_s` passes with
no such write.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

# Bounds. A grant entry costs ~250 B (key, tuple, dict); 100,000 of them are
# ~25 MiB at most, and a node leases only keys read through a quorum round in
# the last `lease_s`.
GRANTS_MAX: Final = 100_000
HOLDS_MAX: Final = 100_000
# Recent writers remembered, ~150 B each: ~15 MiB at most. A key forgotten
# may be leased to a node that is not its writer, which costs that writer one
# wait, never safety.
WRITERS_MAX: Final = 100_000
# `_writers`' entry for a key written by several coordinators (or contended).
SEVERAL: Final = -1
# Holders of one key at once: at most one per node of its replica set.
HOLDERS_PER_KEY_MAX: Final = 16
# How many lease periods a write's writer is remembered (and a contended key
# goes without leases).
CONTENDED_PERIODS: Final = 10

LEASE_S_MAX: Final = 60.0
CLOCK_DRIFT_MAX_MAX: Final = 0.5


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """`lease_s`: how long a holder reads locally after it sent the read that
    took the lease. `clock_drift_max`: the bound on clock-rate differences."""

    lease_s: float
    clock_drift_max: float

    def __post_init__(self) -> None:
        assert 0 < self.lease_s <= LEASE_S_MAX, "lease_s out of range"
        assert 0 <= self.clock_drift_max <= CLOCK_DRIFT_MAX_MAX, "clock_drift_max out of range"

    @property
    def hold_s(self) -> float:
        """How long a replica keeps a grant, on its clock. Each clock runs at
        a rate within `clock_drift_max` (rho) of real time, so the holder's
        `lease_s` lasts at most lease_s / (1 - rho) of real time and the
        replica's `hold_s` at least hold_s / (1 + rho): holding
        lease_s * (1 + rho) / (1 - rho) covers the lease whatever the two
        rates are within the bound."""
        rho = self.clock_drift_max
        return self.lease_s * (1 + rho) / (1 - rho)

    @property
    def contended_s(self) -> float:
        return self.lease_s * CONTENDED_PERIODS


Key = tuple[str, bytes]


class Grants:
    """One replica's grants. `now` is always this node's monotonic clock."""

    def __init__(self, timing: LeaseTiming, started_at: float) -> None:
        self.timing = timing
        # Until this moment the replica may have forgotten grants it made
        # before a restart: it accepts nothing.
        self.accepts_open_at = started_at + timing.hold_s
        # Insertion (= grant) order: the front lapses first, since every
        # grant lasts the same `hold_s` (a renewal moves the key to the back).
        self._grants: OrderedDict[Key, dict[int, float]] = OrderedDict()
        # Key -> (the coordinator that last wrote it, or SEVERAL; until when
        # that is remembered). Oldest first: every entry lasts `contended_s`.
        self._writers: OrderedDict[Key, tuple[int, float]] = OrderedDict()

    def open_accepts(self) -> None:
        """This replica never granted a lease before it started (it founds a
        new cluster with an empty data directory): no quiet period."""
        self.accepts_open_at = float("-inf")

    def restart(self, now: float) -> None:
        """Forget every grant and accept nothing for one hold period from
        `now`: this replica's rows were rebuilt, and the node index it votes
        with may have granted leases in an earlier life that still hold."""
        self._grants.clear()
        self.accepts_open_at = now + self.timing.hold_s

    def accepts_open(self, now: float) -> bool:
        return now >= self.accepts_open_at

    def grant(self, table: str, key: bytes, holder: int, now: float) -> bool:
        """Grant `holder` a lease on the key, from `now` (when the read
        arrived). False when refused: the key was written lately by another
        coordinator or is contended, or a table is full."""
        self._expire(now)
        entry: Key = (table, key)
        writer = self._writers.get(entry)
        if writer is not None and writer[0] != holder and now < writer[1]:
            return False
        holders = self._grants.get(entry)
        if holders is None:
            if len(self._grants) >= GRANTS_MAX:
                return False
            holders = {}
            self._grants[entry] = holders
        else:
            self._grants.move_to_end(entry)
        if holder not in holders and len(holders) >= HOLDERS_PER_KEY_MAX:
            return False
        holders[holder] = now + self.timing.hold_s
        return True

    def wait_s(self, table: str, key: bytes, coordinator: int, now: float) -> float:
        """How long an Accept of the key from `coordinator` must wait: 0 when
        it may go ahead now. Covers the restart quiet period and the leases
        other nodes hold. Remembers the key's writer; a positive answer
        marks the key contended."""
        entry: Key = (table, key)
        wait = max(0.0, self.accepts_open_at - now)
        holders = self._grants.get(entry)
        if holders:
            for holder, until in holders.items():
                if holder != coordinator and until > now:
                    wait = max(wait, until - now)
        if wait > 0 and not self.accepts_open(now):
            return wait  # the restart's quiet period says nothing of the key
        writers = self._writers
        previous = writers.pop(entry, None)
        if wait > 0 or (previous is not None and previous[0] != coordinator and now < previous[1]):
            coordinator = SEVERAL
        if len(writers) >= WRITERS_MAX:
            writers.popitem(last=False)
        writers[entry] = (coordinator, now + self.timing.contended_s)
        return wait

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._grants)

    def _expire(self, now: float) -> None:
        grants = self._grants
        while grants:
            entry, holders = next(iter(grants.items()))
            if max(holders.values()) > now:
                break
            del grants[entry]
        writers = self._writers
        while writers:
            entry, (_, until) = next(iter(writers.items()))
            if until > now:
                break
            del writers[entry]


class Holds:
    """One coordinator's leases. `now` and `sent_at` are this node's
    monotonic clock."""

    def __init__(self, timing: LeaseTiming) -> None:
        self.timing = timing
        self._holds: OrderedDict[Key, float] = OrderedDict()
        # Writes of this coordinator in flight, per key (a count: writes to
        # one key may overlap while they queue).
        self._writing: dict[Key, int] = {}
        # Every start and end of a write of ours bumps `_write_events`; each
        # key remembers the count at its last one (bounded: a key forgotten
        # counts as written at `_forgotten_at`, which errs towards no lease).
        self._write_events = 0
        self._last_write: OrderedDict[Key, int] = OrderedDict()
        self._forgotten_at = 0

    def read_started(self, table: str, key: bytes) -> int:
        """Call as a read that asks for a lease starts; pass what it returns
        to `took`. A read's value may be held only if no write of ours to
        the key was in flight at any moment of the read: one that ended
        during it may have chosen a later version than the read returns."""
        return -1 if (table, key) in self._writing else self._write_events

    def took(self, table: str, key: bytes, sent_at: float, now: float, started: int) -> bool:
        """A read sent at `sent_at` (which `read_started` numbered `started`)
        came back with grants from a majority and no proposal above the
        version it returned: hold the key until `sent_at + lease_s`, unless a
        write of ours overlapped the read. True when the key is held."""
        assert sent_at <= now, "a reply cannot come back before its request left"
        entry: Key = (table, key)
        if started < 0 or self._last_write.get(entry, self._forgotten_at) > started:
            return False
        assert entry not in self._writing, "a write that started meanwhile is an event"
        until = sent_at + self.timing.lease_s
        if until <= now:
            return False
        self._expire(now)
        if entry in self._holds:
            self._holds[entry] = max(self._holds[entry], until)
            self._holds.move_to_end(entry)
            return True
        if len(self._holds) >= HOLDS_MAX:
            return False
        self._holds[entry] = until
        return True

    def reads_locally(self, table: str, key: bytes, now: float) -> bool:
        """May a strong read of the key be answered from this node's own
        copy at `now`? Only while the lease holds and no write of ours is in
        flight on the key."""
        entry: Key = (table, key)
        until = self._holds.get(entry)
        return until is not None and now < until and entry not in self._writing

    def remaining_s(self, table: str, key: bytes, now: float) -> float:
        until = self._holds.get((table, key))
        return 0.0 if until is None else max(0.0, until - now)

    def write_started(self, table: str, key: bytes) -> None:
        """Call before the write's first Accept leaves."""
        entry: Key = (table, key)
        self._writing[entry] = self._writing.get(entry, 0) + 1
        self._write_event(entry)

    def write_finished(self, table: str, key: bytes, outcome_known: bool) -> None:
        """Call once the write's outcome is known and the local copy holds
        it, or once it is known to be unknown. An unknown outcome ends the
        lease: the next read runs a round (and may take a new one)."""
        entry: Key = (table, key)
        count = self._writing.get(entry, 0)
        assert count > 0, "a write finished that never started"
        if count == 1:
            del self._writing[entry]
        else:
            self._writing[entry] = count - 1
        self._write_event(entry)
        if not outcome_known:
            self._holds.pop(entry, None)

    def _write_event(self, entry: Key) -> None:
        self._write_events += 1
        last = self._last_write
        last.pop(entry, None)
        last[entry] = self._write_events
        if len(last) > HOLDS_MAX:
            _, self._forgotten_at = last.popitem(last=False)

    def accept_sent(self, table: str, key: bytes) -> None:
        """Call whenever this coordinator sends an Accept of the key: a write,
        or a read's or another write's recovery of a proposal in flight. Any
        of them may get a new version chosen, which the held copy does not
        have: the lease ends, and a read running meanwhile takes none."""
        entry: Key = (table, key)
        self._holds.pop(entry, None)
        self._write_event(entry)

    def writing(self, table: str, key: bytes) -> bool:
        return (table, key) in self._writing

    def drop(self, table: str, key: bytes) -> None:
        self._holds.pop((table, key), None)

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._holds)

    def _expire(self, now: float) -> None:
        holds = self._holds
        while holds:
            entry, until = next(iter(holds.items()))
            if until > now:
                break
            del holds[entry]
