"""Nemeses: faults that start, hold, and heal, each recorded in the history.

Every nemesis has `start` (inject the fault, return what it did, for the
history) and `heal` (undo it). The schedule (`run_schedule`) keeps a quiet
warm-up, then starts a fault every 3-10 s (seeded), holds each for a share of
its interval and heals it, and finally heals everything.

Names (for `--nemesis`):

* `kill`: SIGKILL a random minority of nodes; heal restarts them.
* `pause`: SIGSTOP a random minority; heal sends SIGCONT.
* `partition`: cut links through the proxies in one of the shapes of
  `partitions.SHAPES` (nodes shuffled), blackholing them by holding or by
  dropping bytes; heal restores every link.
* `corrupt`: SIGKILL one node, flip bytes in the stored rows of a few keys in
  use in its `data.mdb` (see `corrupt.py`), restart it at once. The damage
  stays: the node must refuse those rows (crc32c) for the rest of the run.
* `delay`: every link delays bytes by 75 +/- 50 ms; heal removes the delay.
* `flaky`: every link closes a connection on 5 % of the chunks it carries.
* `reset`: reset (RST) every node-to-node connection at once; nothing to heal.
* `clock`: the monotonic clock of a random minority runs fast or slow, at the
  edge of the cluster's `clock_drift_max` (1 +/- the bound), or at a fixed
  rate far outside it (`ClockNemesis(rate=...)`, `--clock-rate`: the test that
  the harness finds the stale reads a broken assumption allows); heal sets
  rate 1. A node restarted meanwhile runs at rate 1 anyway.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import trio

from jepsen_like.harness.cluster import Cluster
from jepsen_like.harness.corrupt import Corruption, corrupt_file
from jepsen_like.harness.history import History
from jepsen_like.harness.partitions import SHAPES, describe_cut, shape_cut
from jepsen_like.harness.proxy import Blackhole, Network
from kvsvr.errors import KvsvrError

# Time between the starts of two faults, drawn uniformly (seconds).
FAULT_INTERVAL_MIN_S: Final = 3.0
FAULT_INTERVAL_MAX_S: Final = 10.0
# Share of each interval the fault is held; the rest is healed time, in which
# the cluster shows it recovers between faults.
FAULT_HOLD_FRACTION: Final = 0.7
# Link delay of the `delay` nemesis: what a congested cross-zone link shows.
DELAY_S: Final = 0.075
DELAY_JITTER_S: Final = 0.050
# Chance per chunk that the `flaky` nemesis closes the connection carrying it.
FLAKY_CLOSE_FRACTION: Final = 0.05

NEMESES: Final = (
    "kill",
    "pause",
    "partition",
    "corrupt",
    "delay",
    "flaky",
    "reset",
    "wipe",
    "clock",
)


class NemesisError(Exception):
    """A nemesis cannot run on this cluster (no proxies, too few nodes)."""


class Nemesis(Protocol):
    name: str

    async def start(self) -> dict[str, Any]: ...

    async def heal(self) -> dict[str, Any]: ...


def _minority(nodes: Sequence[str], rng: random.Random) -> list[str]:
    """A random non-empty minority of `nodes` (one node of a single-node cluster)."""
    largest = max(1, (len(nodes) - 1) // 2)
    return sorted(rng.sample(list(nodes), rng.randint(1, largest)))


class KillNemesis:
    name = "kill"

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.killed: list[str] = []

    async def start(self) -> dict[str, Any]:
        self.killed = _minority(self.cluster.node_ids, self.rng)
        for node_id in self.killed:
            await self.cluster.kill(node_id)
        return {"killed": self.killed}

    async def heal(self) -> dict[str, Any]:
        restarted, self.killed = self.killed, []
        for node_id in restarted:
            await self.cluster.restart(node_id)
        return {"restarted": restarted}


class PauseNemesis:
    name = "pause"

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.paused: list[str] = []

    async def start(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.paused = _minority(self.cluster.node_ids, self.rng)
        for node_id in self.paused:
            self.cluster.pause(node_id)
        return {"paused": self.paused}

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        resumed, self.paused = self.paused, []
        for node_id in resumed:
            self.cluster.resume(node_id)
        return {"resumed": resumed}


def _network_of(cluster: Cluster) -> Network:
    if cluster.network is None:
        raise NemesisError("network nemeses need a cluster with proxies")
    return cluster.network


class PartitionNemesis:
    name = "partition"

    def __init__(
        self, cluster: Cluster, rng: random.Random, shapes: Sequence[str] = SHAPES
    ) -> None:
        self.network = _network_of(cluster)
        self.nodes = cluster.node_ids
        self.rng = rng
        self.shapes = [s for s in shapes if len(self.nodes) >= 3 or s == "isolate"]
        if len(self.nodes) < 2 or not self.shapes:
            raise NemesisError("a partition needs at least two nodes")

    async def start(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        shape = self.rng.choice(self.shapes)
        order = list(self.nodes)
        self.rng.shuffle(order)
        cut = shape_cut(shape, order)
        blackhole: Blackhole = "hold" if self.rng.random() < 0.5 else "drop"
        self.network.cut(cut, blackhole)
        return {
            "shape": shape,
            "blackhole": blackhole,
            "sees": describe_cut(self.nodes, cut),
            "cut": sorted(f"{a}->{b}" for a, b in cut),
        }

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.network.heal()
        return {"healed": "all links"}


class CorruptNemesis:
    """SIGKILL a node, damage rows of keys in use in its `data.mdb`, restart it
    at once (so clients meet the damage while those keys are still in use).
    A key is damaged on one replica at most over the run. The damage is never
    undone by the harness; `corrupted` lists it for later probes."""

    name = "corrupt"

    def __init__(
        self, cluster: Cluster, rng: random.Random, keys: Callable[[], Sequence[str]] | None = None
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.keys = keys
        self.corrupted: dict[str, list[str]] = {}  # node -> keys damaged so far
        # (node, key) -> value bytes of the damaged copies
        self.damaged_values: dict[tuple[str, str], list[bytes]] = {}

    async def start(self) -> dict[str, Any]:
        node_id = self.rng.choice(self.cluster.node_ids)
        await self.cluster.kill(node_id)
        path = self.cluster.data_file(node_id)
        keys = None if self.keys is None else list(self.keys())
        # One damaged replica per key at most: damage on a majority of a key's
        # replicas is data loss that kvsvr does not claim to survive.
        exclude = {key for damaged in self.corrupted.values() for key in damaged}
        damage_rng = random.Random(self.rng.random())

        def damage() -> Corruption:
            corruption = corrupt_file(path, damage_rng, keys=keys, exclude=exclude)
            if not corruption.keys and keys is not None:
                # None of the keys in use has a row here yet: damage older ones.
                corruption = corrupt_file(path, damage_rng, exclude=exclude)
            return corruption

        corruption = await trio.to_thread.run_sync(damage)
        await self.cluster.start(node_id)
        known = self.corrupted.setdefault(node_id, [])
        known.extend(k for k in corruption.keys if k not in known)
        for key, values in corruption.damaged_values.items():
            self.damaged_values.setdefault((node_id, key), []).extend(values)
        return {"node": node_id, **corruption.describe(), "restarted": True}

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {}


class WipeNemesis:
    """SIGKILL a node, delete its whole data directory, start it again: a lost
    disk. The node must rebuild every row from its peers before it votes
    (kvsvr/node/replication.py), or the checker finds the promises it forgot.
    It strikes only while every node is "ready": two replicas wiped at once is
    a lost majority, which needs an operator (`kvsvr recover`) and may lose
    acknowledged writes. Nothing to heal: the node rebuilds itself (it is
    restarted with the same config; its peers know it as a member, so it
    does not found the cluster again)."""

    name = "wipe"

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.wiped: list[str] = []

    async def start(self) -> dict[str, Any]:
        states = {n: await self.cluster.replica_state(n) for n in self.cluster.node_ids}
        if any(state != "ready" for state in states.values()):
            return {"skipped": "a node is not ready", "states": states}
        node_id = self.rng.choice(self.cluster.node_ids)
        await self.cluster.kill(node_id)
        directory = self.cluster.data_dir(node_id)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))
        await self.cluster.start(node_id)
        self.wiped.append(node_id)
        return {"node": node_id, "wiped": str(directory), "restarted": True}

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {}


class DelayNemesis:
    name = "delay"

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.network = _network_of(cluster)

    async def start(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.network.delay(DELAY_S, DELAY_JITTER_S)
        return {"delay_ms": DELAY_S * 1000, "jitter_ms": DELAY_JITTER_S * 1000}

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.network.heal()
        return {"healed": "all links"}


class FlakyNemesis:
    name = "flaky"

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.network = _network_of(cluster)

    async def start(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.network.flaky(FLAKY_CLOSE_FRACTION)
        return {"close_fraction": FLAKY_CLOSE_FRACTION}

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.network.heal()
        return {"healed": "all links"}


class ResetNemesis:
    name = "reset"

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.network = _network_of(cluster)

    async def start(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"connections_reset": self.network.reset()}

    async def heal(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {}


class ClockNemesis:
    name = "clock"

    def __init__(self, cluster: Cluster, rng: random.Random, rate: float | None = None) -> None:
        """`rate`: the rate every clock it changes runs at; None: 1 +/- the
        cluster's `clock_drift_max`, drawn per node."""
        self.cluster = cluster
        self.rng = rng
        self.rate = rate
        self.changed: list[str] = []

    async def start(self) -> dict[str, Any]:
        drift = self.cluster.config.clock_drift_max
        rates: dict[str, float | str] = {}
        for node_id in _minority(self.cluster.node_ids, self.rng):
            rate = self.rate if self.rate is not None else self.rng.choice((1 - drift, 1 + drift))
            try:
                rates[node_id] = await self.cluster.set_clock_rate(node_id, rate)
                self.changed.append(node_id)
            except (KvsvrError, trio.TooSlowError, OSError) as error:
                rates[node_id] = f"not set: {error}"
        return {"rates": rates}

    async def heal(self) -> dict[str, Any]:
        changed, self.changed = self.changed, []
        restored: dict[str, float | str] = {}
        for node_id in changed:
            try:
                restored[node_id] = await self.cluster.set_clock_rate(node_id, 1.0)
            except (KvsvrError, trio.TooSlowError, OSError) as error:
                restored[node_id] = f"not set: {error}"
        return {"rates": restored}


def make_nemesis(
    name: str,
    cluster: Cluster,
    rng: random.Random,
    *,
    keys: Callable[[], Sequence[str]] | None = None,
    clock_rate: float | None = None,
) -> Nemesis:
    """A nemesis by name (see `NEMESES`); `keys` tells `corrupt` which keys to
    aim at; `clock_rate` is the `clock` nemesis's rate (None: within bound)."""
    if name == "kill":
        return KillNemesis(cluster, rng)
    if name == "pause":
        return PauseNemesis(cluster, rng)
    if name == "partition":
        return PartitionNemesis(cluster, rng)
    if name == "corrupt":
        return CorruptNemesis(cluster, rng, keys)
    if name == "delay":
        return DelayNemesis(cluster, rng)
    if name == "flaky":
        return FlakyNemesis(cluster, rng)
    if name == "reset":
        return ResetNemesis(cluster, rng)
    if name == "wipe":
        return WipeNemesis(cluster, rng)
    if name == "clock":
        return ClockNemesis(cluster, rng, clock_rate)
    raise ValueError(f"unknown nemesis {name!r}; expected some of {', '.join(NEMESES)}")


@dataclass(slots=True)
class FaultWindow:
    """One fault, from the start of its injection to the end of its heal."""

    nemesis: str
    start_s: float
    end_s: float | None = None
    started: dict[str, Any] = field(default_factory=dict)
    healed: dict[str, Any] = field(default_factory=dict)


async def apply_fault(
    nemesis: Nemesis,
    history: History,
    hold: Callable[[], Awaitable[None]],
    windows: list[FaultWindow] | None = None,
) -> FaultWindow:
    """Start `nemesis`, `await hold()`, heal; both actions are recorded in
    `history`, and the window is appended to `windows` at once.

    Cancelled or failed on the way, the fault is not healed: the run is ending,
    and closing the cluster stops (and first resumes) every node anyway."""
    history.nemesis(f"start-{nemesis.name}", None, phase="begin")
    window = FaultWindow(nemesis.name, history.now_s())
    if windows is not None:
        windows.append(window)
    try:
        window.started = await nemesis.start()
        history.nemesis(f"start-{nemesis.name}", window.started, phase="done")
        await hold()
    except BaseException:
        window.end_s = history.now_s()
        history.nemesis(f"stop-{nemesis.name}", {"abandoned": True}, phase="done")
        raise
    history.nemesis(f"stop-{nemesis.name}", None, phase="begin")
    window.healed = await nemesis.heal()
    history.nemesis(f"stop-{nemesis.name}", window.healed, phase="done")
    window.end_s = history.now_s()
    return window


@dataclass(slots=True)
class Schedule:
    """When faults happen, in seconds from the start of the workload."""

    warmup_s: float
    faults_end_s: float
    interval_min_s: float = FAULT_INTERVAL_MIN_S
    interval_max_s: float = FAULT_INTERVAL_MAX_S
    hold_fraction: float = FAULT_HOLD_FRACTION


async def heal_everything(cluster: Cluster, history: History) -> None:
    """Every link passes, every node runs and is resumed: the end of the faults."""
    history.nemesis("heal-all", None, phase="begin")
    if cluster.network is not None:
        cluster.network.heal()
    restarted = []
    for node_id in cluster.node_ids:
        cluster.resume(node_id)
        if not cluster.is_running(node_id):
            await cluster.start(node_id)
            restarted.append(node_id)
    history.nemesis("heal-all", {"restarted": restarted}, phase="done")


async def run_schedule(
    nemeses: Sequence[Nemesis],
    schedule: Schedule,
    history: History,
    rng: random.Random,
    windows: list[FaultWindow],
    *,
    begin: float,
) -> None:
    """Faults from `begin + warmup_s` to `begin + faults_end_s` (trio clock);
    each fault's window goes to `windows`. Returns once the last one is healed."""
    if not nemeses:
        return
    await trio.sleep_until(begin + schedule.warmup_s)
    end = begin + schedule.faults_end_s
    shortest_hold_s = schedule.interval_min_s * schedule.hold_fraction
    while True:
        now = trio.current_time()
        if now + shortest_hold_s > end:
            return
        interval_s = rng.uniform(schedule.interval_min_s, schedule.interval_max_s)
        hold_s = min(interval_s * schedule.hold_fraction, end - now)
        nemesis = rng.choice(list(nemeses))
        await apply_fault(nemesis, history, partial(trio.sleep, hold_s), windows)
        await trio.sleep_until(min(now + interval_s, end))
