"""Workloads: what clients ask, and how each answer becomes a history event.

`RegisterWorkload`: read / write (unique values) / cas on a few keys, each key
retired after a cap of operations (drawn from 100-200) for a fresh one, so
every key's history stays small enough to check quickly. With
`stale_read_fraction`, that share of its reads are stale reads (no quorum
round), sent with the client's session floor (the highest version it wrote or
read for the key) and recorded with `consistency: "stale"`: they are left out
of the linearizability check and checked for never going back in time within
their process instead. `KvWorkload`: get / put / delete, with the same key
rotation.

kvsvr's compare-and-set is on versions (`put(key, v, if_version=n)`). A
register `cas [expected, new]` is made by a client from the last value it saw
for the key and the version it saw it at: values are unique per write, so a
version names exactly one value, and the put succeeds exactly when the
register still holds `expected`.

Outcomes: ok; `Conflict` is fail, recorded with the version the node reported
as current (`current_version`): the checker takes it as an operation that
happened and found the condition false, so an untrue Conflict is caught; a
request that was never sent (`NotSent`) is fail (it did not happen);
`Unavailable` / `Timeout` / anything else on a write is info (outcome
unknown); a read that raised is fail (a read changes nothing). A cas invoke
records the `if_version` it sends.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from jepsen_like.checker import KvModel, Model, RegisterModel
from jepsen_like.harness.client import NodeClient, NotSent
from kvsvr.errors import Conflict, KvsvrError

# Keys in use at once: enough for concurrency between keys, few enough that
# every key sees contention.
DEFAULT_KEY_COUNT: Final = 4
# Operations one key gets before a fresh key replaces it (drawn per key): long
# enough for interesting interleavings, short enough that the checker's search
# per key stays fast even with many operations of unknown outcome.
KEY_OPS_MIN: Final = 100
KEY_OPS_MAX: Final = 200


@dataclass(frozen=True, slots=True)
class PlannedOp:
    f: str
    key: str
    value: Any
    # "strong" (linearizable) or "stale" (a read answered without a quorum
    # round, checked for per-process monotonicity instead of linearizability).
    consistency: str = "strong"
    # A cas's condition: the version its expected value was seen at.
    if_version: int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    type: str  # ok, fail, info
    value: Any = None
    version: int | None = None
    error: str | None = None
    # False when the request never reached the node (no connection).
    sent: bool = True
    # A near-cache read the node answered "unchanged": the value is the one
    # the client held at this version, not sent again.
    unchanged: bool = False
    # A Conflict's claim: the key's version at some moment during the call.
    current_version: int | None = None


@dataclass(slots=True)
class Worker:
    """One client thread. Its process id changes after an `info`, as in Jepsen."""

    thread: int
    process: int
    node: str
    # Per key: the last value this client saw and the version it saw it at.
    last_seen: dict[str, tuple[Any, int]] = field(default_factory=dict)
    # Per key: the highest version this client wrote or read, sent with its
    # stale reads as their floor (kvsvr's session guarantee; what the real
    # client's SessionVersions does).
    session_versions: dict[str, int] = field(default_factory=dict)

    def observe(self, key: str, value: Any, version: int) -> None:
        self.last_seen[key] = (value, version)
        self.session_versions[key] = max(version, self.session_versions.get(key, 0))


class Workload(Protocol):
    name: str

    @property
    def model(self) -> Model: ...

    def next_op(self, worker: Worker, rng: random.Random) -> PlannedOp: ...

    async def execute(self, op: PlannedOp, worker: Worker, client: NodeClient) -> Completion: ...

    def final_read(self, key: str) -> PlannedOp: ...

    def used_keys(self) -> list[str]: ...

    def active_keys(self) -> list[str]: ...


def encode_value(value: int) -> bytes:
    return str(value).encode()


def decode_value(raw: bytes | None) -> Any:
    """An int for the harness's own values; anything else is shown as text, so
    the checker sees a value nobody wrote."""
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return f"<unexpected {raw!r:.60}>"


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _failed_read(error: KvsvrError) -> Completion:
    return Completion("fail", error=_error_text(error), sent=not isinstance(error, NotSent))


def _failed_write(error: KvsvrError) -> Completion:
    if isinstance(error, NotSent):
        return Completion("fail", error=_error_text(error), sent=False)
    if isinstance(error, Conflict):
        return Completion("fail", error=_error_text(error), current_version=error.current_version)
    return Completion("info", error=_error_text(error))


class KeyRotation:
    """`count` keys in use; each is replaced after its drawn share of operations."""

    def __init__(self, prefix: str, count: int, rng: random.Random) -> None:
        if count < 1:
            raise ValueError("a workload needs at least one key")
        self.prefix = prefix
        self.rng = rng
        self.used: list[str] = []
        self.active: list[str] = []
        self._left: dict[str, int] = {}
        for _ in range(count):
            self.active.append(self._fresh())

    def _fresh(self) -> str:
        key = f"{self.prefix}{len(self.used)}"
        self.used.append(key)
        self._left[key] = self.rng.randint(KEY_OPS_MIN, KEY_OPS_MAX)
        return key

    def pick(self, rng: random.Random, home: tuple[int, int] | None = None) -> str:
        """A key in use; with `home = (i, n)`, one of the keys at positions
        i, i + n, i + 2n... (the keys homed at node i of n), if there is one."""
        if home is not None and home[0] < len(self.active):
            first, step = home
            position = rng.randrange(first, len(self.active), step)
        else:
            position = rng.randrange(len(self.active))
        key = self.active[position]
        self._left[key] -= 1
        if self._left[key] <= 0:
            self.active[position] = self._fresh()
        return key


class RegisterWorkload:
    """read / write / cas on rotating register keys."""

    name = "register"

    def __init__(
        self,
        key_count: int = DEFAULT_KEY_COUNT,
        rng: random.Random | None = None,
        *,
        read_fraction: float = 0.4,
        write_fraction: float = 0.3,
        stale_read_fraction: float = 0.0,
        near_cache: bool = False,
        key_affinity: float = 0.0,
        node_ids: Sequence[str] = (),
    ) -> None:
        """`key_affinity`: the share of a client's operations on the keys
        homed at its node (key position modulo the node count, `node_ids` in
        order), as kvsvr's client sends a key's requests to its preferred
        coordinator; the rest go to any key (0: every key alike). Read leases
        need it: a node leases only keys that it alone writes."""
        if not 0.0 <= stale_read_fraction <= 1.0:
            raise ValueError(f"stale_read_fraction {stale_read_fraction} is not within [0, 1]")
        if not 0.0 <= key_affinity <= 1.0:
            raise ValueError(f"key_affinity {key_affinity} is not within [0, 1]")
        if key_affinity > 0 and not node_ids:
            raise ValueError("key_affinity needs the node ids")
        self.key_affinity = key_affinity
        self.homes = {node: index for index, node in enumerate(node_ids)}
        self.keys = KeyRotation("r", key_count, rng if rng is not None else random.Random(0))
        self.read_fraction = read_fraction
        self.write_fraction = write_fraction
        # The share of reads sent as stale reads (the rest are strong).
        self.stale_read_fraction = stale_read_fraction
        # Strong reads send the version of the value the client last saw (as
        # kvsvr's client near cache does) and take that value back when the
        # node answers "unchanged": linearizable only if the node's quorum
        # read, not the client's copy, decides.
        self.near_cache = near_cache
        self._next_value = 0

    @property
    def model(self) -> Model:
        return RegisterModel()

    def _value(self) -> int:
        self._next_value += 1
        return self._next_value

    def next_op(self, worker: Worker, rng: random.Random) -> PlannedOp:
        home = None
        # Drawn only with an affinity, so the runs of a seed without one keep
        # their sequence of operations.
        if self.key_affinity > 0 and rng.random() < self.key_affinity:
            home = (self.homes[worker.node], len(self.homes))
        key = self.keys.pick(rng, home)
        roll = rng.random()
        if roll < self.read_fraction:
            # Drawn only when asked for, so the runs of a seed without stale
            # reads keep their sequence of operations.
            if self.stale_read_fraction > 0 and rng.random() < self.stale_read_fraction:
                return PlannedOp("read", key, None, consistency="stale")
            return PlannedOp("read", key, None)
        if roll < self.read_fraction + self.write_fraction:
            return PlannedOp("write", key, self._value())
        expected, seen_version = worker.last_seen.get(key, (None, 0))
        return PlannedOp("cas", key, [expected, self._value()], if_version=seen_version)

    def final_read(self, key: str) -> PlannedOp:
        return PlannedOp("read", key, None)

    def used_keys(self) -> list[str]:
        """Every key operated on so far (the final reads read them all)."""
        return list(self.keys.used)

    def active_keys(self) -> list[str]:
        """The keys clients operate on now."""
        return list(self.keys.active)

    async def execute(self, op: PlannedOp, worker: Worker, client: NodeClient) -> Completion:
        if op.f == "read":
            try:
                if op.consistency == "stale":
                    floor = worker.session_versions.get(op.key, 0)
                    raw, version = await client.get(op.key, "stale", min_version=floor)
                elif self.near_cache and worker.last_seen.get(op.key, (None, 0))[0] is not None:
                    held, held_version = worker.last_seen[op.key]
                    raw, version, unchanged = await client.get_if_changed(op.key, held_version)
                    if unchanged:
                        worker.observe(op.key, held, version)
                        return Completion("ok", held, version, unchanged=True)
                else:
                    raw, version = await client.get(op.key)
            except KvsvrError as error:
                return _failed_read(error)
            value = decode_value(raw)
            worker.observe(op.key, value, version)
            return Completion("ok", value, version)
        if op.f == "write":
            new = op.value
            if_version = None
        else:
            expected, new = op.value
            seen_value, if_version = worker.last_seen.get(op.key, (None, 0))
            assert seen_value == expected, "cas is planned from the last value seen"
            assert op.if_version in (None, if_version), "and at the version it was seen at"
        try:
            version = await client.put(op.key, encode_value(new), if_version=if_version)
        except KvsvrError as error:
            return _failed_write(error)
        worker.observe(op.key, new, version)
        return Completion("ok", op.value, version)


class KvWorkload:
    """get / put / delete on rotating keys (absent reads as nil)."""

    name = "kv"

    def __init__(
        self,
        key_count: int = DEFAULT_KEY_COUNT,
        rng: random.Random | None = None,
        *,
        get_fraction: float = 0.5,
        put_fraction: float = 0.35,
    ) -> None:
        self.keys = KeyRotation("kv", key_count, rng if rng is not None else random.Random(0))
        self.get_fraction = get_fraction
        self.put_fraction = put_fraction
        self._next_value = 0

    @property
    def model(self) -> Model:
        return KvModel(missing=None)

    def next_op(self, worker: Worker, rng: random.Random) -> PlannedOp:
        key = self.keys.pick(rng)
        roll = rng.random()
        if roll < self.get_fraction:
            return PlannedOp("get", key, None)
        if roll < self.get_fraction + self.put_fraction:
            self._next_value += 1
            return PlannedOp("put", key, self._next_value)
        return PlannedOp("delete", key, None)

    def final_read(self, key: str) -> PlannedOp:
        return PlannedOp("get", key, None)

    def used_keys(self) -> list[str]:
        """Every key operated on so far (the final reads read them all)."""
        return list(self.keys.used)

    def active_keys(self) -> list[str]:
        """The keys clients operate on now."""
        return list(self.keys.active)

    async def execute(self, op: PlannedOp, worker: Worker, client: NodeClient) -> Completion:
        if op.f == "get":
            try:
                raw, version = await client.get(op.key)
            except KvsvrError as error:
                return _failed_read(error)
            value = decode_value(raw)
            worker.observe(op.key, value, version)
            return Completion("ok", value, version)
        value = None if op.f == "delete" else encode_value(op.value)
        try:
            version = await client.put(op.key, value)
        except KvsvrError as error:
            return _failed_write(error)
        worker.observe(op.key, op.value, version)
        return Completion("ok", op.value, version)


WORKLOADS: Final = ("register", "kv")


def make_workload(
    name: str,
    key_count: int,
    rng: random.Random,
    *,
    stale_reads: float = 0.0,
    near_cache: bool = False,
    key_affinity: float = 0.0,
    node_ids: Sequence[str] = (),
    read_fraction: float | None = None,
) -> Workload:
    """The named workload; `stale_reads` is the share of register reads sent
    stale, `near_cache` makes its strong reads send the version they hold,
    `key_affinity` the share of a client's operations on its node's keys,
    `read_fraction` the share of register reads (the rest are writes and
    compare-and-sets, half each; None: 0.4, 0.3, 0.3)."""
    if read_fraction is not None and name != "register":
        raise ValueError("the read fraction is a register workload option")
    if name == "register":
        fractions: dict[str, float] = (
            {}
            if read_fraction is None
            else {"read_fraction": read_fraction, "write_fraction": (1 - read_fraction) / 2}
        )
        return RegisterWorkload(
            key_count,
            rng,
            **fractions,
            stale_read_fraction=stale_reads,
            near_cache=near_cache,
            key_affinity=key_affinity,
            node_ids=node_ids,
        )
    if stale_reads or near_cache or key_affinity:
        raise ValueError(
            "stale reads, the near cache and key affinity are register workload options"
        )
    if name == "kv":
        return KvWorkload(key_count, rng)
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")
