"""Read-lease bookkeeping (kvsvr/protocol/read_lease.py): grants, holds, and
the clock-rate assumption they rest on."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsvr.protocol import replica
from kvsvr.protocol.coordinator import Coordinator, Mutation, Outcome, Status
from kvsvr.protocol.messages import Accept, AcceptReply, Prepare, Promise, Read, ReadReply
from kvsvr.protocol.read_lease import (
    GRANTS_MAX,
    HOLDERS_PER_KEY_MAX,
    WRITERS_MAX,
    Grants,
    Holds,
    LeaseTiming,
)
from kvsvr.protocol.state import Accepted, Row

TIMING = LeaseTiming(lease_s=2.0, clock_drift_max=0.01)
OPEN = 100.0  # a moment after every test's restart quiet period


def open_grants(timing: LeaseTiming = TIMING) -> Grants:
    grants = Grants(timing, started_at=OPEN - timing.hold_s)
    assert grants.accepts_open(OPEN)
    return grants


def test_a_restarted_replica_accepts_nothing_for_one_hold_period() -> None:
    grants = Grants(TIMING, started_at=10.0)
    assert not grants.accepts_open(10.0)
    assert grants.wait_s("t", b"k", 1, 10.0) == pytest.approx(TIMING.hold_s)
    assert grants.wait_s("t", b"k", 1, 10.0 + TIMING.hold_s) == 0.0


def test_a_grant_blocks_other_coordinators_until_it_lapses() -> None:
    grants = open_grants()
    assert grants.grant("t", b"k", holder=1, now=OPEN)
    assert grants.wait_s("t", b"k", coordinator=1, now=OPEN + 0.5) == 0.0
    assert grants.wait_s("t", b"k", coordinator=2, now=OPEN + 0.5) == pytest.approx(
        TIMING.hold_s - 0.5
    )
    assert grants.wait_s("t", b"other", coordinator=2, now=OPEN + 0.5) == 0.0
    assert grants.wait_s("t2", b"k", coordinator=2, now=OPEN + 0.5) == 0.0
    assert grants.wait_s("t", b"k", coordinator=2, now=OPEN + TIMING.hold_s) == 0.0


def test_two_holders_block_each_other() -> None:
    grants = open_grants()
    assert grants.grant("t", b"k", holder=1, now=OPEN)
    assert grants.grant("t", b"k", holder=2, now=OPEN + 1)
    assert grants.wait_s("t", b"k", coordinator=1, now=OPEN + 1.5) == pytest.approx(
        TIMING.hold_s - 0.5
    )
    assert grants.wait_s("t", b"k", coordinator=2, now=OPEN + 1.5) == pytest.approx(
        TIMING.hold_s - 1.5
    )


def test_a_key_whose_writes_waited_is_not_leased_for_a_while() -> None:
    grants = open_grants()
    assert grants.grant("t", b"k", holder=1, now=OPEN)
    assert grants.wait_s("t", b"k", coordinator=2, now=OPEN + 0.1) > 0
    later = OPEN + TIMING.hold_s + 0.1
    assert not grants.grant("t", b"k", holder=1, now=later)
    assert grants.grant("t", b"other", holder=1, now=later)
    assert grants.grant("t", b"k", holder=1, now=OPEN + 0.1 + TIMING.contended_s)


def test_a_key_is_leased_only_to_the_coordinator_that_writes_it() -> None:
    grants = open_grants()
    assert grants.wait_s("t", b"k", coordinator=1, now=OPEN) == 0
    assert not grants.grant("t", b"k", holder=2, now=OPEN + 0.1)
    assert grants.grant("t", b"k", holder=1, now=OPEN + 0.1)
    # Its writes never wait for its own lease.
    assert grants.wait_s("t", b"k", coordinator=1, now=OPEN + 0.2) == 0
    # Once nobody wrote it for `contended_s`, anyone may lease it.
    quiet = OPEN + 0.2 + TIMING.contended_s
    assert grants.grant("t", b"k", holder=2, now=quiet)


def test_a_key_written_through_several_coordinators_is_not_leased() -> None:
    grants = open_grants()
    assert grants.wait_s("t", b"k", coordinator=1, now=OPEN) == 0
    assert grants.wait_s("t", b"k", coordinator=2, now=OPEN + 0.1) == 0
    for holder in (1, 2, 3):
        assert not grants.grant("t", b"k", holder=holder, now=OPEN + 0.2)
    # ... while the writes go on (each write extends it).
    assert grants.wait_s("t", b"k", coordinator=1, now=OPEN + TIMING.contended_s) == 0
    assert not grants.grant("t", b"k", holder=1, now=OPEN + TIMING.contended_s + 0.1)


def test_a_restart_quiet_period_marks_no_writer() -> None:
    grants = Grants(TIMING, started_at=0.0)
    assert grants.wait_s("t", b"k", coordinator=2, now=0.1) > 0
    assert grants.grant("t", b"k", holder=1, now=OPEN)


def test_recent_writers_are_bounded() -> None:
    grants = open_grants()
    for i in range(WRITERS_MAX + 10):
        grants.wait_s("t", i.to_bytes(4, "big"), coordinator=1, now=OPEN)
    assert len(grants._writers) == WRITERS_MAX
    # The oldest were forgotten: their keys may be leased to anyone.
    assert grants.grant("t", (0).to_bytes(4, "big"), holder=2, now=OPEN)
    assert not grants.grant("t", (WRITERS_MAX + 9).to_bytes(4, "big"), holder=2, now=OPEN)


def test_grants_are_bounded_and_lapsed_ones_make_room() -> None:
    grants = open_grants()
    for i in range(GRANTS_MAX):
        assert grants.grant("t", i.to_bytes(4, "big"), holder=1, now=OPEN)
    assert not grants.grant("t", b"one too many", holder=1, now=OPEN)
    assert grants.count(OPEN) == GRANTS_MAX
    after = OPEN + TIMING.hold_s
    assert grants.grant("t", b"one too many", holder=1, now=after)
    assert grants.count(after) == 1


def test_holders_per_key_are_bounded() -> None:
    grants = open_grants()
    for holder in range(1, HOLDERS_PER_KEY_MAX + 1):
        assert grants.grant("t", b"k", holder=holder, now=OPEN)
    assert not grants.grant("t", b"k", holder=HOLDERS_PER_KEY_MAX + 1, now=OPEN)
    assert grants.grant("t", b"k", holder=1, now=OPEN + 0.1), "a renewal is not a new holder"


def test_a_hold_counts_from_when_the_read_was_sent() -> None:
    holds = Holds(TIMING)
    holds.took("t", b"k", sent_at=10.0, now=10.3, started=holds.read_started("t", b"k"))
    assert holds.reads_locally("t", b"k", 11.9)
    assert not holds.reads_locally("t", b"k", 12.0)
    assert holds.count(12.0) == 0
    holds.took("t", b"late", sent_at=10.0, now=12.5, started=holds.read_started("t", b"late"))
    assert not holds.reads_locally("t", b"late", 12.5), "a reply later than the lease holds nothing"


def test_no_local_read_while_our_own_write_is_in_flight() -> None:
    holds = Holds(TIMING)
    holds.took("t", b"k", sent_at=10.0, now=10.0, started=holds.read_started("t", b"k"))
    holds.write_started("t", b"k")
    holds.write_started("t", b"k")
    assert not holds.reads_locally("t", b"k", 10.5)
    holds.write_finished("t", b"k", outcome_known=True)
    assert not holds.reads_locally("t", b"k", 10.5), "one write is still in flight"
    holds.write_finished("t", b"k", outcome_known=True)
    assert holds.reads_locally("t", b"k", 10.5)


def test_a_write_of_unknown_outcome_ends_the_lease() -> None:
    holds = Holds(TIMING)
    holds.took("t", b"k", sent_at=10.0, now=10.0, started=holds.read_started("t", b"k"))
    holds.write_started("t", b"k")
    holds.write_finished("t", b"k", outcome_known=False)
    assert not holds.reads_locally("t", b"k", 10.5)


def test_finishing_a_write_that_never_started_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        Holds(TIMING).write_finished("t", b"k", outcome_known=True)


def test_timing_limits() -> None:
    with pytest.raises(AssertionError):
        LeaseTiming(lease_s=0, clock_drift_max=0.01)
    with pytest.raises(AssertionError):
        LeaseTiming(lease_s=1, clock_drift_max=0.9)


# ------------------------------------------------ the clock-rate assumption


def _last_local_read_is_covered(
    timing: LeaseTiming, holder_rate: float, replica_rate: float, sent_real: float, delay: float
) -> bool:
    """Drive a holder and a granting replica whose clocks run at the given
    rates (clock = offset + rate * real time) and report whether, at the
    last real moment the holder still reads locally, the replica still
    refuses another coordinator's Accept."""
    holder_offset, replica_offset = 1000.0, 5000.0

    def holder_clock(real: float) -> float:
        return holder_offset + holder_rate * real

    def replica_clock(real: float) -> float:
        return replica_offset + replica_rate * real

    grants = Grants(timing, started_at=replica_clock(0.0) - timing.hold_s)
    holds = Holds(timing)
    received_real = sent_real + delay
    assert grants.grant("t", b"k", holder=1, now=replica_clock(received_real))
    holds.took(
        "t",
        b"k",
        holder_clock(sent_real),
        holder_clock(received_real),
        holds.read_started("t", b"k"),
    )
    # The holder reads locally while holder_clock(t) < holder_clock(sent) + lease_s.
    last_local_real = sent_real + timing.lease_s / holder_rate - 1e-9
    if not holds.reads_locally("t", b"k", holder_clock(last_local_real)):
        return True  # the lease was already over when the reply came back
    return grants.wait_s("t", b"k", coordinator=2, now=replica_clock(last_local_real)) > 0


rates_within = st.floats(min_value=1 - TIMING.clock_drift_max, max_value=1 + TIMING.clock_drift_max)


@settings(max_examples=500, deadline=None)
@given(
    holder_rate=rates_within,
    replica_rate=rates_within,
    sent_real=st.floats(min_value=0, max_value=1e4),
    delay=st.floats(min_value=0, max_value=5.0),
)
def test_within_the_drift_bound_the_replica_outlasts_the_lease(
    holder_rate: float, replica_rate: float, sent_real: float, delay: float
) -> None:
    assert _last_local_read_is_covered(TIMING, holder_rate, replica_rate, sent_real, delay)


def test_at_the_worst_rates_in_the_bound_the_replica_still_outlasts_the_lease() -> None:
    rho = TIMING.clock_drift_max
    assert _last_local_read_is_covered(TIMING, 1 - rho, 1 + rho, 10.0, 0.0)


def test_a_replica_clock_five_times_fast_breaks_the_lease() -> None:
    """The assumption is real: far outside it, another coordinator's Accept
    gets through while the holder still reads locally (a stale read)."""
    assert not _last_local_read_is_covered(TIMING, 1.0, 5.0, 10.0, 0.0)


def test_a_holder_clock_five_times_slow_breaks_the_lease() -> None:
    assert not _last_local_read_is_covered(TIMING, 0.2, 1.0, 10.0, 0.0)


# ------------------------------------------------ the replica state machine


def test_an_accept_held_back_by_a_lease_is_refused_with_the_wait() -> None:
    row = Row(version=3, value=b"v", promised=(5, 1))
    accept = Accept("t", b"k", (6, 2), 4, b"new", None, 9)
    changed, reply = replica.on_accept(row, accept, wait_s=1.25)
    assert changed is None
    assert reply == AcceptReply(ok=False, promised=(5, 1), version=3, wait_s=1.25)
    changed, reply = replica.on_accept(row, accept)
    assert reply.ok and reply.wait_s == 0.0 and changed is not None


def test_a_held_back_accept_still_learns_the_commit_it_carries() -> None:
    proposal = Accepted((5, 1), 4, b"w", None, 7)
    row = Row(version=3, value=b"v", promised=(5, 1), accepted=proposal)
    accept = Accept("t", b"k", (5, 1), 5, b"x", None, 8, 4, (5, 1))
    changed, reply = replica.on_accept(row, accept, wait_s=0.5)
    assert not reply.ok and reply.wait_s == 0.5
    assert changed is not None and changed.version == 4 and changed.value == b"w"
    assert changed.accepted is None, "the new proposal was not accepted"


def test_a_read_reply_says_whether_its_lease_was_granted() -> None:
    row = Row(version=2, value=b"v")
    assert not replica.on_read(row, Read("t", b"k", -1)).lease
    assert replica.on_read(row, Read("t", b"k", -1, lease_for=3), lease=True).lease
    with pytest.raises(AssertionError):
        replica.on_read(row, Read("t", b"k", -1), lease=True)


# ------------------------------------------------ the coordinator


def _reply(version: int, lease: bool, accepted_version: int = 0) -> ReadReply:
    return ReadReply(
        version,
        True,
        b"v%d" % version,
        None,
        None if accepted_version == 0 else (9, 3),
        accepted_version,
        (1, 1),
        0,
        lease,
    )


def _read_once(replies: dict[int, ReadReply]) -> tuple[Read, Outcome]:
    coordinator = Coordinator(1, random.Random(0))
    operation = coordinator.read("t", b"k", [1, 2, 3], now_ms=0, lease=True)
    first = next(operation)
    request = first.requests[1]
    assert isinstance(request, Read)
    try:
        operation.send(dict(replies))
        while True:
            operation.send({})
    except StopIteration as stop:
        outcome = stop.value
    assert isinstance(outcome, Outcome)
    return request, outcome


def test_a_read_with_grants_from_a_majority_holds_a_lease() -> None:
    request, outcome = _read_once({1: _reply(4, True), 2: _reply(4, True)})
    assert request.lease_for == 1, "the read asks for the lease for its own node"
    assert outcome.status == Status.OK and outcome.version == 4 and outcome.leased


def test_one_grant_short_of_a_majority_holds_none() -> None:
    _, outcome = _read_once({1: _reply(4, True), 2: _reply(4, False)})
    assert outcome.status == Status.OK and not outcome.leased


def test_a_grant_from_a_replica_behind_still_counts() -> None:
    _, outcome = _read_once({1: _reply(4, True), 2: _reply(3, True)})
    assert outcome.version == 4 and outcome.leased


def test_a_read_without_lease_asks_for_none() -> None:
    coordinator = Coordinator(1, random.Random(0))
    first = next(coordinator.read("t", b"k", [1, 2, 3], now_ms=0))
    assert all(isinstance(r, Read) and r.lease_for == 0 for r in first.requests.values())


def test_a_read_that_recovers_a_proposal_takes_no_lease() -> None:
    coordinator = Coordinator(1, random.Random(0))
    operation = coordinator.read("t", b"k", [1, 2, 3], now_ms=0, lease=True)
    next(operation)
    step = operation.send({1: _reply(4, True, accepted_version=5), 2: _reply(4, True)})
    assert all(isinstance(r, Prepare) for r in step.requests.values()), "recovery's phase 1"
    proposal = Accepted((9, 3), 5, b"new", None, 77)
    promise = Promise(True, step.requests[1].ballot, 4, True, b"v4", None, proposal, 0)
    step = operation.send({1: promise, 2: promise})
    assert all(isinstance(r, Accept) for r in step.requests.values())
    ok = AcceptReply(True, step.requests[1].ballot, 4)
    try:
        operation.send({1: ok, 2: ok})
        while True:
            operation.send({})
    except StopIteration as stop:
        outcome = stop.value
    assert outcome.status == Status.OK and outcome.version == 5 and not outcome.leased


def test_a_write_held_back_by_a_lease_waits_it_out_instead_of_duelling() -> None:
    coordinator = Coordinator(1, random.Random(0))
    operation = coordinator.write("t", b"k", [1, 2, 3], Mutation(b"x"), now_ms=0)
    prepare_round = next(operation)
    ballot = prepare_round.requests[1].ballot
    promise = Promise(True, ballot, 4, False, None, None, None, 0)
    accept_round = operation.send({1: promise, 2: promise})
    held = AcceptReply(False, (1, 1), 4, wait_s=1.5)
    next_round = operation.send({1: AcceptReply(True, ballot, 4), 2: held, 3: held})
    assert next_round.delay_s >= 1.5, "the next attempt waits for the lease to lapse"
    assert coordinator.stats.lease_waits == 1 and coordinator.stats.duels == 0
    assert all(isinstance(r, Accept) for r in accept_round.requests.values())


def test_a_read_overlapping_our_own_write_takes_no_lease() -> None:
    """The write may have chosen a later version than the read returned."""
    holds = Holds(TIMING)
    holds.write_started("t", b"k")
    during = holds.read_started("t", b"k")
    holds.write_finished("t", b"k", outcome_known=True)
    assert not holds.took("t", b"k", 10.0, 10.1, during), "a write was in flight as it started"
    before = holds.read_started("t", b"k")
    holds.write_started("t", b"k")
    holds.write_finished("t", b"k", outcome_known=True)
    assert not holds.took("t", b"k", 10.0, 10.1, before), "a write ran while it ran"
    clean = holds.read_started("t", b"k")
    holds.write_started("t", b"other")
    assert holds.took("t", b"k", 10.0, 10.1, clean), "a write to another key is no matter"
    assert holds.reads_locally("t", b"k", 10.2)


def test_any_accept_we_send_ends_the_lease() -> None:
    """A read's recovery of another coordinator's proposal gets a version
    chosen as surely as a write (the simulator found seed 300017)."""
    holds = Holds(TIMING)
    started = holds.read_started("t", b"k")
    assert holds.took("t", b"k", 10.0, 10.0, started)
    running = holds.read_started("t", b"k")
    holds.accept_sent("t", b"k")
    assert not holds.reads_locally("t", b"k", 10.1)
    assert not holds.took("t", b"k", 10.0, 10.2, running), "a read that ran across it takes none"
