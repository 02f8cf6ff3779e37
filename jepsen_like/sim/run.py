"""One simulated run: clients, a register workload, a seeded nemesis, a history.

`simulate(seed)` builds a `World`, lets client processes issue read / write /
cas operations on a few keys while the nemesis partitions the network and
crashes and restarts nodes, then heals everything and reads every key one
last time. The result carries the history (Jepsen-style operation dicts) for
the checker.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from jepsen_like.sim.world import NetworkFaults, World
from kvsvr.protocol.coordinator import Mutation, Outcome, Status
from kvsvr.protocol.read_lease import LeaseTiming

# Final reads after healing: each is retried until one succeeds, at most this often.
FINAL_READ_ATTEMPTS = 20


@dataclass
class SimConfig:
    nodes: int = 3
    keys: int = 3
    processes: int = 6
    operations: int = 500
    loss: float = 0.05
    duplication: float = 0.05
    delay_min_s: float = 0.0005
    delay_max_s: float = 0.01
    # Mean gap between nemesis actions, and how long a fault lasts, in simulated seconds.
    nemesis_every_s: float = 0.15
    fault_duration_s: float = 0.3
    # Chance a client sends to a random node rather than the key's preferred one.
    stray_coordinator: float = 0.3
    # Chance a blind write is proposed as a folded group (2 to 4 versions at
    # once), as a node does with the blind puts queued on a hot key; drawn from
    # a separate generator, so seeds keep their schedules.
    folded_writes: float = 0.25
    # Let each seed draw its own network profile (loss, duplication, delays up
    # to beyond the round timeout, so that late replies land in later rounds).
    vary_network: bool = True
    # Read leases, in simulated seconds (a lease spans many operations and
    # several nemesis actions), and the clock-rate bound they assume: each
    # node's clock runs at a rate drawn within the bound, from a generator of
    # its own so that seeds keep their schedules.
    read_leases: bool = True
    lease_s: float = 0.05
    clock_drift_max: float = 0.01
    # node -> clock rate, overriding the drawn ones (to break the assumption).
    clock_rates: dict[int, float] | None = None


@dataclass
class SimResult:
    seed: int
    history: list[dict[str, Any]]
    faults: list[str] = field(default_factory=list)
    messages: int = 0
    sim_time_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    local_reads: int = 0


def _decode(value: bytes | None) -> int | None:
    return None if value is None else int(value)


class _Client:
    """One client thread: issues operations one after another."""

    def __init__(self, run: _Run, thread: int) -> None:
        self.run = run
        self.thread = thread
        self.process = thread
        # value -> version this client last saw it at, per key (for cas).
        self.seen: dict[bytes, tuple[int | None, int]] = {}

    def next_op(self) -> None:
        run = self.run
        if run.issued >= run.config.operations:
            return
        run.issued += 1
        world = run.world
        rng = run.rng
        key_index = rng.randrange(run.config.keys)
        key = f"k{key_index}".encode()
        node = run.preferred_node(key)
        if rng.random() < run.config.stray_coordinator:
            node = rng.choice(world.replicas)
        roll = rng.random()
        if roll < 0.4:
            self._invoke("read", key, None)
            world.read(node, key, lambda o: self._done_read(key, o))
        elif roll < 0.75:
            run.next_value += 1
            value = run.next_value
            self._invoke("write", key, value)
            versions = (
                run.fold_rng.randint(2, 4)
                if run.fold_rng.random() < run.config.folded_writes
                else 1
            )
            world.write(
                node,
                key,
                Mutation(str(value).encode(), versions=versions),
                lambda o: self._done_write(key, value, o),
            )
        else:
            run.next_value += 1
            new = run.next_value
            expected, version = self.seen.get(key, (None, 0))
            self._invoke("cas", key, [expected, new], if_version=version)
            world.write(
                node,
                key,
                Mutation(str(new).encode(), if_version=version),
                lambda o: self._done_cas(key, expected, new, o),
            )

    def _invoke(self, f: str, key: bytes, value: Any, **extra: Any) -> None:
        self.run.record(self.process, "invoke", f, key, value, **extra)

    def _complete(self, kind: str, f: str, key: bytes, value: Any, **extra: Any) -> None:
        self.run.record(self.process, kind, f, key, value, **extra)
        if kind == "info":
            # As in Jepsen: a process whose operation is in doubt is retired.
            self.process += self.run.config.processes
        self.run.world.at(self.run.rng.uniform(0, 0.002), self.next_op)

    def _done_read(self, key: bytes, outcome: Outcome | None) -> None:
        if outcome is None or outcome.status != Status.OK:
            self._complete("fail", "read", key, None)  # a read that failed changed nothing
            return
        value = _decode(outcome.value)
        self.seen[key] = (value, outcome.version)
        self._complete("ok", "read", key, value, version=outcome.version)

    def _done_write(self, key: bytes, value: int, outcome: Outcome | None) -> None:
        if outcome is None or outcome.status != Status.OK:
            self._complete("info", "write", key, value)
            return
        self.seen[key] = (value, outcome.version)
        self._complete("ok", "write", key, value, version=outcome.version)

    def _done_cas(
        self, key: bytes, expected: int | None, new: int, outcome: Outcome | None
    ) -> None:
        if outcome is None or outcome.status == Status.UNAVAILABLE:
            self._complete("info", "cas", key, [expected, new])
        elif outcome.status == Status.CONFLICT:
            # A Conflict is a claim about the key (the checker holds it to it):
            # the condition was false, at the version reported.
            self._complete(
                "fail",
                "cas",
                key,
                [expected, new],
                error=f"Conflict: {outcome.detail}",
                current_version=outcome.version,
            )
        else:
            self.seen[key] = (new, outcome.version)
            self._complete("ok", "cas", key, [expected, new], version=outcome.version)


class _Run:
    def __init__(self, seed: int, config: SimConfig, trace: Callable[[str], None] | None) -> None:
        if config.vary_network:
            profile = random.Random(seed ^ 0x5EED)
            config = replace(
                config,
                loss=profile.choice([0.0, 0.02, 0.05, 0.15]),
                duplication=profile.choice([0.0, 0.05, 0.2]),
                delay_max_s=profile.choice([0.002, 0.01, 0.04, 0.12]),
                stray_coordinator=profile.choice([0.0, 0.3, 1.0]),
            )
        self.config = config
        faults = NetworkFaults(
            delay_min_s=config.delay_min_s,
            delay_max_s=config.delay_max_s,
            loss=config.loss,
            duplication=config.duplication,
        )
        leases = LeaseTiming(config.lease_s, config.clock_drift_max) if config.read_leases else None
        rate_rng = random.Random(seed ^ 0xC10C)
        rho = config.clock_drift_max
        clock_rates = {
            node: rate_rng.uniform(1 - rho, 1 + rho) for node in range(1, config.nodes + 1)
        }
        clock_rates.update(config.clock_rates or {})
        self.world = World(seed, config.nodes, faults, trace, leases, clock_rates)
        self.rng = self.world.rng
        self.fold_rng = random.Random(seed ^ 0xF01D)
        self.history: list[dict[str, Any]] = []
        self.issued = 0
        self.next_value = 0
        self.faults: list[str] = []

    def preferred_node(self, key: bytes) -> int:
        replicas = self.world.replicas
        return replicas[sum(key) % len(replicas)]

    def record(self, process: int, kind: str, f: str, key: bytes, value: Any, **extra: Any) -> None:
        """One event; `extra` (version, if_version, current_version, error) as
        the harness records them."""
        self.history.append(
            {
                "process": process,
                "type": kind,
                "f": f,
                "key": key.decode(),
                "value": value,
                "time": int(self.world.now_s * 1e9),
                "index": len(self.history),
                **extra,
            }
        )
        shown = "".join(f" {name}={field}" for name, field in extra.items())
        self.world.log(f"p{process} {kind} {f} {key.decode()} {value}{shown}")

    def nemesis(self) -> None:
        if self.issued >= self.config.operations:
            return
        world = self.world
        rng = self.rng
        action = rng.choice(["partition", "crash", "isolate", "none"])
        nodes = list(world.replicas)
        if action == "partition":
            rng.shuffle(nodes)
            cut = rng.randrange(1, len(nodes))
            groups = [set(nodes[:cut]), set(nodes[cut:])]
            world.partition(groups)
            world.at(self.config.fault_duration_s, world.heal)
            self.faults.append(f"{world.now_s:.3f} partition {groups}")
        elif action == "isolate":
            victim = rng.choice(nodes)
            world.partition([{victim}, set(nodes) - {victim}])
            world.at(self.config.fault_duration_s, world.heal)
            self.faults.append(f"{world.now_s:.3f} isolate n{victim}")
        elif action == "crash":
            victim = rng.choice(nodes)
            world.crash(victim)
            world.at(self.config.fault_duration_s, lambda: world.restart(victim))
            self.faults.append(f"{world.now_s:.3f} crash n{victim}")
        world.at(rng.expovariate(1 / self.config.nemesis_every_s), self.nemesis)


def simulate(
    seed: int, config: SimConfig | None = None, trace: Callable[[str], None] | None = None
) -> SimResult:
    config = config or SimConfig()
    run = _Run(seed, config, trace)
    world = run.world
    clients = [_Client(run, thread) for thread in range(config.processes)]
    for client in clients:
        world.at(run.rng.uniform(0, 0.001), client.next_op)
    world.at(config.nemesis_every_s, run.nemesis)
    world.run_until_idle()
    # Heal, bring every node back, and read every key once more.
    world.heal()
    for node_id in world.replicas:
        world.restart(node_id)
    final_process = 10**6
    for key_index in range(config.keys):
        key = f"k{key_index}".encode()
        # Like Jepsen's final reads: retried (a bounded number of times) until
        # one succeeds, since a round can still time out on a slow network.
        for _ in range(FINAL_READ_ATTEMPTS):
            final_process += 1
            process = final_process
            run.record(process, "invoke", "read", key, None)
            result: list[Outcome | None] = []
            world.read(run.preferred_node(key), key, result.append)
            world.run_until_idle()
            outcome = result[0] if result else None
            if outcome is not None and outcome.status == Status.OK:
                run.record(process, "ok", "read", key, _decode(outcome.value))
                break
            run.record(process, "fail", "read", key, None)
    counts: dict[str, int] = {}
    for op in run.history:
        if op["type"] != "invoke":
            counts[op["type"]] = counts.get(op["type"], 0) + 1
    return SimResult(
        seed=seed,
        history=run.history,
        faults=run.faults,
        messages=world.messages_sent,
        sim_time_s=world.now_s,
        counts=counts,
        local_reads=world.local_reads,
    )
