"""The coordinator's lease table: compact, least recently put first, bounded
in bytes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvsvr.protocol import write_leases as write_leases_module
from kvsvr.protocol.coordinator import LEASE_ENTRY_BYTES, Coordinator, Lease
from kvsvr_tests.build_mode import pure_python_only

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(u64, u64, st.integers(min_value=1, max_value=1 << 16), st.sampled_from([None, False, True]))
def test_a_lease_comes_back_as_it_was_put(
    version: int, round_: int, node: int, present: bool | None
) -> None:
    coordinator = Coordinator(1, random.Random(0))
    lease = Lease((round_, node), version, present)
    coordinator.put_lease("t", b"k", lease)
    assert coordinator.has_lease("t", b"k")
    assert not coordinator.has_lease("other", b"k")
    assert coordinator.take_lease("t", b"k") == lease
    assert not coordinator.has_lease("t", b"k")
    assert coordinator.take_lease("t", b"k") is None
    assert coordinator.lease_bytes == 0


@pure_python_only
def test_the_table_is_bounded_in_bytes_and_forgets_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = LEASE_ENTRY_BYTES + len(b"k000")
    monkeypatch.setattr(write_leases_module, "LEASES_BYTES_MAX", 10 * entry)
    coordinator = Coordinator(1, random.Random(0))
    for index in range(10):
        coordinator.put_lease("t", b"k%03d" % index, Lease((1, 1), index, True))
    assert coordinator.lease_count() == 10 and coordinator.lease_bytes == 10 * entry
    coordinator.put_lease("t", b"k000", Lease((2, 1), 99, True))  # now the newest
    coordinator.put_lease("t", b"k010", Lease((1, 1), 10, True))  # one too many
    assert coordinator.lease_count() == 10 and coordinator.lease_bytes == 10 * entry
    assert not coordinator.has_lease("t", b"k001")  # the least recently put went
    assert coordinator.take_lease("t", b"k000") == Lease((2, 1), 99, True)
    # A table holding only the newest key makes room in the others.
    coordinator.put_lease("t", b"k000", Lease((1, 1), 0, True))
    coordinator.put_lease("u", b"k000", Lease((1, 1), 0, None))
    assert coordinator.has_lease("u", b"k000") and not coordinator.has_lease("t", b"k002")
    assert coordinator.lease_bytes <= 10 * entry
    coordinator.drop_lease("u", b"k000")
    coordinator.drop_lease("u", b"k000")
    assert coordinator.lease_count() == 9 and coordinator.lease_bytes == 9 * entry


def test_a_lease_that_does_not_fit_is_not_kept() -> None:
    coordinator = Coordinator(1, random.Random(0))
    coordinator.put_lease("t", b"k", Lease((1, 1), 1, True))
    coordinator.put_lease("t", b"k", Lease((1 << 64, 1), 2, True))  # a ballot past 2**64 - 1
    assert not coordinator.has_lease("t", b"k") and coordinator.lease_bytes == 0
    coordinator.put_lease("t", b"k", Lease((1, 1), -1, True))
    assert coordinator.lease_count() == 0
