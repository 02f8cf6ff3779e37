"""The keys whose promise a coordinator holds: its write leases.

A coordinator whose last proposal on a key was chosen still holds a
majority's promise for the key and skips phase 1 on its next write (the fast
path). `WriteLeases` remembers those keys, compactly and bounded in bytes.
(Not to be confused with read leases, `kvsvr.protocol.read_lease`.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvsvr.protocol.state import Ballot

# Keys for which a coordinator remembers that it holds the promise (fast path),
# bounded in bytes so that a node writing millions of distinct keys does not
# grow without end (a forgotten lease only costs one extra round trip). An
# entry is the key, its slot in an OrderedDict and one packed int: about
# LEASE_ENTRY_BYTES + len(key), so 16 MiB remember ~80,000 short keys. A
# bound in bytes, not entries, counts long keys at their size.
LEASES_BYTES_MAX = 16 << 20
LEASE_ENTRY_BYTES = 160
_U64 = (1 << 64) - 1


@dataclass(slots=True)
class Lease:
    """This coordinator's last proposal on a key was chosen under `ballot`."""

    ballot: Ballot
    version: int
    present: bool | None  # None: not known (then if_absent takes the full path)


_PRESENT_CODES: dict[bool | None, int] = {None: 0, False: 1, True: 2}
_PRESENT_OF_CODE: tuple[bool | None, ...] = (None, False, True)


def _pack_lease(lease: Lease) -> int | None:
    """A lease as one int (version, ballot round, ballot node, presence in
    64-bit fields): a quarter of the memory of the objects, for many keys. None
    if a field does not fit (a ballot past 2**64 - 1, as only a peer that sent
    one could make us reach): that key then goes without a lease."""
    round_, node = lease.ballot
    if not (0 <= lease.version <= _U64 and 0 <= round_ <= _U64 and 0 <= node <= _U64):
        return None
    return lease.version | round_ << 64 | node << 128 | _PRESENT_CODES[lease.present] << 192


def _unpack_lease(packed: int) -> Lease:
    return Lease(
        ((packed >> 64) & _U64, (packed >> 128) & _U64),
        packed & _U64,
        _PRESENT_OF_CODE[packed >> 192],
    )


class WriteLeases:
    """table -> key -> packed `Lease`, least recently put first."""

    def __init__(self) -> None:
        # table -> key -> packed Lease (see `_pack_lease`), least recently put first.
        self._leases: dict[str, OrderedDict[bytes, int]] = {}
        self.lease_bytes = 0

    def has_lease(self, table: str, key: bytes) -> bool:
        leases = self._leases.get(table)
        return leases is not None and key in leases

    def lease_count(self) -> int:
        return sum(len(leases) for leases in self._leases.values())

    def take_lease(self, table: str, key: bytes) -> Lease | None:
        leases = self._leases.get(table)
        if leases is None:
            return None
        packed = leases.pop(key, None)
        if packed is None:
            return None
        self.lease_bytes -= LEASE_ENTRY_BYTES + len(key)
        return _unpack_lease(packed)

    def drop_lease(self, table: str, key: bytes) -> None:
        self.take_lease(table, key)

    def put_lease(self, table: str, key: bytes, lease: Lease) -> None:
        leases = self._leases.get(table)
        if leases is None:
            leases = self._leases[table] = OrderedDict()
        packed = _pack_lease(lease)
        if leases.pop(key, None) is None:
            if packed is None:
                return
            self.lease_bytes += LEASE_ENTRY_BYTES + len(key)
        elif packed is None:
            self.lease_bytes -= LEASE_ENTRY_BYTES + len(key)
            return
        leases[key] = packed
        while self.lease_bytes > LEASES_BYTES_MAX:
            # The oldest of this table first; another table's when this one
            # holds nothing else (a table's dict only grows by one per put).
            victim = leases if len(leases) > 1 else self._largest_other(table)
            old_key, _ = victim.popitem(last=False)
            self.lease_bytes -= LEASE_ENTRY_BYTES + len(old_key)
        assert self.lease_bytes >= 0

    def _largest_other(self, table: str) -> OrderedDict[bytes, int]:
        return max(
            (leases for name, leases in self._leases.items() if name != table),
            key=len,
        )
