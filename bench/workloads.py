"""YCSB-like workloads, as pure data and seeded generators (no IO, no clock).

A workload is an operation mix (read / update / cas); a run picks keys from
`key_count` loaded keys, uniformly or by a scrambled zipfian (YCSB's: hot keys
spread over the key space, so over partitions and etcd's B-tree alike), and
writes values of a fixed size. The open-loop schedule says when each operation
is *meant* to start, so latency can be measured from that instant and queueing
in the client is never hidden (coordinated omission).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

# YCSB's default skew: a few keys take most of the traffic.
ZIPFIAN_THETA: Final = 0.99
# Distinct random values each load process cycles through; consecutive writes
# differ (nothing can deduplicate them) and no value is generated per operation.
VALUE_POOL_SIZE: Final = 64
# Key count beyond which computing zeta(n) exactly costs more than a second;
# the zipfian generator refuses it rather than stall a run's start.
ZIPFIAN_KEYS_MAX: Final = 50_000_000
KEY_PREFIX: Final = b"user"

OPERATIONS: Final = ("read", "update", "cas")


@dataclass(frozen=True, slots=True)
class Workload:
    """Fractions of each operation; they sum to 1.

    `cas` is a read-modify-write: a strong read for the version, then a
    compare-and-set on it (YCSB F's shape); a lost race counts as a conflict,
    a completed operation that wrote nothing."""

    name: str
    read: float
    update: float
    cas: float
    description: str

    def __post_init__(self) -> None:
        fractions = (self.read, self.update, self.cas)
        if any(not 0 <= f <= 1 for f in fractions) or not math.isclose(sum(fractions), 1.0):
            raise ValueError(f"workload {self.name}: fractions must be in [0, 1] and sum to 1")

    @property
    def reads(self) -> bool:
        return self.read > 0

    @property
    def writes(self) -> bool:
        return self.update > 0 or self.cas > 0

    def choose(self, rng: random.Random) -> str:
        """One operation name, drawn by the mix."""
        draw = rng.random()
        if draw < self.read:
            return "read"
        if draw < self.read + self.update:
            return "update"
        return "cas" if self.cas > 0 else "update"


WORKLOADS: Final = {
    "A": Workload("A", 0.50, 0.50, 0.0, "update heavy: 50% read, 50% update"),
    "B": Workload("B", 0.95, 0.05, 0.0, "read mostly: 95% read, 5% update"),
    "C": Workload("C", 1.00, 0.00, 0.0, "read only"),
    "W": Workload("W", 0.00, 1.00, 0.0, "write only: 100% update"),
    "CAS": Workload("CAS", 0.50, 0.00, 0.50, "cas heavy: 50% read, 50% read-then-cas"),
}


def parse_workloads(text: str) -> list[Workload]:
    """`"A,B,C,W"` -> workloads, in the order given; ValueError names the unknown."""
    names = [name.strip().upper() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("name at least one workload")
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    return [WORKLOADS[name] for name in dict.fromkeys(names)]


# --- keys and values ---------------------------------------------------------------


def key_name(index: int) -> bytes:
    """The key loaded at `index`: fixed width, so every key has the same size."""
    return b"%s%010d" % (KEY_PREFIX, index)


def value_pool(value_bytes: int, seed: int, size: int = VALUE_POOL_SIZE) -> list[bytes]:
    """`size` distinct random values of `value_bytes` each."""
    rng = random.Random(seed)
    return [rng.randbytes(value_bytes) for _ in range(size)]


_FNV_OFFSET_64: Final = 0xCBF29CE484222325
_FNV_PRIME_64: Final = 0x100000001B3
_MASK_64: Final = (1 << 64) - 1


def fnv1a_64(number: int) -> int:
    """FNV-1a over the 8 little-endian bytes of `number` (YCSB scrambles with FNV)."""
    hashed = _FNV_OFFSET_64
    for _ in range(8):
        hashed ^= number & 0xFF
        hashed = (hashed * _FNV_PRIME_64) & _MASK_64
        number >>= 8
    return hashed


def zeta(count: int, theta: float) -> float:
    """sum_{i=1..count} 1 / i^theta."""
    return math.fsum(1.0 / (i**theta) for i in range(1, count + 1))


class UniformKeys:
    """Key indexes uniformly in [0, count)."""

    name = "uniform"

    def __init__(self, count: int, rng: random.Random) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self._rng = rng

    def next_index(self) -> int:
        return self._rng.randrange(self.count)


class ZipfianKeys:
    """Zipfian ranks in [0, count), rank 0 the most popular (Gray et al., "Quickly
    generating billion-record synthetic databases", as YCSB implements it):
    ranks 0 and 1 are drawn with their exact probabilities, later ones by a
    closed form that is within ~20% of the law per rank.

    With `scrambled`, a rank maps to index fnv1a_64(rank) % count, so the hot
    keys are scattered over the key space instead of being its first keys; as
    in YCSB, colliding hashes make a few keys slightly hotter."""

    name = "zipfian"

    def __init__(
        self,
        count: int,
        rng: random.Random,
        theta: float = ZIPFIAN_THETA,
        *,
        scrambled: bool = True,
    ) -> None:
        if not 1 <= count <= ZIPFIAN_KEYS_MAX:
            raise ValueError(f"count must be in [1, {ZIPFIAN_KEYS_MAX}]")
        if not 0 < theta < 1:
            raise ValueError("theta must be in (0, 1)")
        self.count = count
        self.theta = theta
        self.scrambled = scrambled
        self._rng = rng
        self.zeta_n = zeta(count, theta)
        zeta_2 = zeta(2, theta)
        self._alpha = 1.0 / (1.0 - theta)
        self._eta = (1 - (2.0 / count) ** (1 - theta)) / (1 - zeta_2 / self.zeta_n)
        self._half_pow_theta = 1 + 0.5**theta

    def probability(self, rank: int) -> float:
        """The exact probability of `rank` under the zipfian law."""
        return 1.0 / float((rank + 1) ** self.theta) / self.zeta_n

    def next_rank(self) -> int:
        u = self._rng.random()
        uz = u * self.zeta_n
        if uz < 1.0:
            return 0
        if uz < self._half_pow_theta:
            return min(1, self.count - 1)
        rank = int(self.count * (self._eta * u - self._eta + 1) ** self._alpha)
        return min(rank, self.count - 1)

    def next_index(self) -> int:
        rank = self.next_rank()
        return fnv1a_64(rank) % self.count if self.scrambled else rank


KeyChooser = UniformKeys | ZipfianKeys
DISTRIBUTIONS: Final = ("uniform", "zipfian")


def key_chooser(distribution: str, count: int, rng: random.Random) -> KeyChooser:
    if distribution == "uniform":
        return UniformKeys(count, rng)
    if distribution == "zipfian":
        return ZipfianKeys(count, rng)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, not {distribution!r}")


# --- the open-loop schedule --------------------------------------------------------


def intended_start_times(
    rate_per_s: float,
    start_s: float,
    end_s: float,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[float]:
    """When each of this process's operations is meant to start.

    The whole run offers `rate_per_s` evenly spaced operations over
    [start_s, end_s) (constant rate, as wrk2); process `i` of `n` takes every
    n-th of them, starting with the i-th, so the processes together offer
    exactly the rate and never bunch up."""
    if rate_per_s <= 0 or not math.isfinite(rate_per_s):
        raise ValueError("rate_per_s must be a positive number")
    if not 0 <= process_index < process_count:
        raise ValueError("process_index must be in [0, process_count)")
    interval_s = 1.0 / rate_per_s
    number = process_index
    while True:
        # Multiplying (not adding up intervals) keeps rounding from drifting.
        intended_s = start_s + number * interval_s
        if intended_s >= end_s:
            return
        yield intended_s
        number += process_count


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger first."""
    if parts < 1 or total < 0:
        raise ValueError("parts must be >= 1 and total >= 0")
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]
