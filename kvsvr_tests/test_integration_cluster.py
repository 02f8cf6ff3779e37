"""A 3-node cluster of real processes: node failures, catch-up, conditional puts.

* With one node SIGKILLed the cluster keeps serving reads and writes; after
  the node restarts, what was written meanwhile is readable, and its own
  replica catches up once strong reads have repaired it.
* With two of three nodes down, operations fail with `Unavailable` (or its
  subclass `Timeout`) within a bounded time, and no acknowledged write is
  lost once the nodes are back.
* Many clients racing `put(..., if_version=v)` on one key: per version,
  exactly one wins and the others get `Conflict`.

Seeds are printed; rerun one with KVSVR_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio

import kvsvr
from kvsvr.api import OPERATION_TIMEOUT_S
from kvsvr.client import Client
from kvsvr_tests.cluster_util import LocalCluster, NodeConnection, node_connection

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 10.0
# Client timeout for the operations expected to fail when no majority is up.
UNAVAILABLE_TIMEOUT_S = 2.0
# A failing operation may take its timeout plus scheduling on a loaded machine.
UNAVAILABLE_SLACK_S = 5.0
CATCH_UP_DEADLINE_S = 30.0


def _seed() -> int:
    seed = int(os.environ.get("KVSVR_TEST_SEED", random.randrange(1 << 32)))
    print(f"KVSVR_TEST_SEED={seed}")
    return seed


async def _keys_by_preference(
    client: Client, node_id: str, prefix: str, count: int
) -> tuple[list[str], list[str]]:
    """`count` keys whose preferred coordinator is `node_id`, and `count` whose is not."""
    partition_map = await client.partition_map()
    preferred: list[str] = []
    others: list[str] = []
    i = 0
    while len(preferred) < count or len(others) < count:
        key = f"{prefix}-{i}"
        i += 1
        first = partition_map.replicas("default", key.encode())[0].id
        target = preferred if first == node_id else others
        if len(target) < count:
            target.append(key)
    return preferred, others


async def _local_values(
    cluster: LocalCluster, node_id: str, keys: list[str]
) -> dict[str, bytes | None]:
    """What `node_id`'s own replica holds for each key (consistency="local",
    asked of that node alone)."""
    async with node_connection(cluster.address(node_id), cluster.secret) as node:
        return {key: (await node.get(key, consistency="local"))[1] for key in keys}


async def test_wait_ready_waits_for_every_node_and_names_one_that_is_down(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        victim = cluster.ids[-1]
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            await client.wait_ready(timeout_s=60.0)
            await cluster.akill(victim)
            started = trio.current_time()
            with pytest.raises(kvsvr.Timeout, match=f"{victim}: unreachable"):
                await client.wait_ready(timeout_s=1.0)
            # Bounded by its timeout (plus one status round of the client's).
            assert trio.current_time() - started < 1.0 + CLIENT_TIMEOUT_S + 5.0
            await cluster.astart(victim)
            await client.wait_ready(timeout_s=60.0)
            statuses = await client.cluster_status()
        assert [status["replication"]["state"] for status in statuses] == ["ready"] * 3
        assert all(
            seen["up"] for status in statuses for seen in status["replication"]["peers"].values()
        )


async def test_one_node_down_keeps_serving_and_restarted_node_catches_up(tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        victim = rng.choice(cluster.ids)
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            preferred, others = await _keys_by_preference(client, victim, "k", 25)
            partition_map = await client.partition_map()
            keys = preferred + others
            for key in keys:
                await client.put(key, f"before {key}".encode())

        await cluster.akill(victim)
        expected: dict[str, bytes] = {}
        # A fresh client: its first try of the dead node is refused, and it moves on.
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for key in keys:
                item = await client.get(key)
                assert item is not None and item.value == f"before {key}".encode(), (key, item)
            for key in keys:
                expected[key] = f"while {victim} was down: {key}".encode()
                version = await client.put(key, expected[key])
                assert version == 2, (key, version)
            new_keys = [f"new-{i}" for i in range(20)]
            for key in new_keys:
                expected[key] = f"new {key}".encode()
                assert await client.put(key, expected[key]) == 1
            for key, value in expected.items():
                item = await client.get(key)
                assert item is not None and item.value == value, (key, item)

        await cluster.astart(victim)
        lagging_at_restart = await _local_values(cluster, victim, list(expected))
        stale = sum(lagging_at_restart[k] != v for k, v in expected.items())
        print(
            f"seed {seed}: {victim} restarted; {stale} of {len(expected)} of its local rows stale"
        )

        # Strong reads, routed as the client routes them (to each key's preferred coordinator).
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for key, value in expected.items():
                item = await client.get(key)
                assert item is not None and item.value == value, (key, item)

        # Keys the victim coordinates: its strong read saw its own replica lag and
        # repaired it (the commit is applied asynchronously, hence the deadline).
        victim_keys = [
            k for k in expected if partition_map.replicas("default", k.encode())[0].id == victim
        ]
        assert set(preferred) <= set(victim_keys)
        await _wait_local_catch_up(cluster, victim, {k: expected[k] for k in victim_keys})

        # The same seen through the client: a fresh client (no session versions,
        # so nothing is forced to a strong read) routes these keys to the victim,
        # which answers a "local" read from its own replica.
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for key in victim_keys:
                item = await client.get(key, consistency="local")
                assert item is not None and item.value == expected[key], (key, item)

        # Keys other nodes coordinate: their reads repair the victim only when its
        # reply is among the quorum they waited for, a race. Without hinted
        # handoff or anti-entropy (not in the node yet) nothing else repairs it.
        # Reported, not asserted; then a strong read coordinated by the victim
        # itself (asked directly) must repair every one of them.
        local = await _local_values(cluster, victim, list(expected))
        still = [k for k, v in expected.items() if local[k] != v]
        print(f"seed {seed}: after routed strong reads, {len(still)} rows of {victim} still stale")
        async with node_connection(cluster.address(victim), cluster.secret) as node:
            for key in still:
                _, got = await node.get(key, consistency="strong")
                assert got == expected[key], key
        await _wait_local_catch_up(cluster, victim, expected)


async def _wait_local_catch_up(
    cluster: LocalCluster, node_id: str, expected: dict[str, bytes]
) -> None:
    deadline = trio.current_time() + CATCH_UP_DEADLINE_S
    while True:
        local = await _local_values(cluster, node_id, list(expected))
        stale = {k: local[k] for k, v in expected.items() if local[k] != v}
        if not stale:
            return
        if trio.current_time() > deadline:
            raise AssertionError(
                f"{len(stale)} of {len(expected)} rows of {node_id} still stale after "
                f"{CATCH_UP_DEADLINE_S} s: {list(stale.items())[:5]}"
            )
        await trio.sleep(0.1)


async def _expect_unavailable(
    what: str, operation: Awaitable[object], timeout_s: float = UNAVAILABLE_TIMEOUT_S
) -> float:
    start = time.monotonic()
    with pytest.raises(kvsvr.Unavailable) as caught:
        await operation
    elapsed = time.monotonic() - start
    print(f"{what}: {type(caught.value).__name__} after {elapsed:.2f} s: {caught.value}")
    assert elapsed < timeout_s + UNAVAILABLE_SLACK_S, (what, elapsed)
    return elapsed


async def test_two_of_three_down_is_unavailable_and_loses_nothing(tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        acked: dict[str, tuple[bytes, int]] = {}
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for i in range(60):
                key = f"acked-{i}"
                value = f"value {i}".encode()
                acked[key] = (value, await client.put(key, value))

        down = rng.sample(cluster.ids, 2)
        survivor = next(n for n in cluster.ids if n not in down)
        for node_id in down:
            await cluster.akill(node_id)

        # Keys the survivor coordinates and keys a dead node would.
        async with cluster.connect(UNAVAILABLE_TIMEOUT_S) as client:
            own, foreign = await _keys_by_preference(client, survivor, "acked", 2)
            attempted: dict[str, bytes] = {}
            for key in (own[0], foreign[0]):
                await _expect_unavailable(f"get {key}", client.get(key))
            for key in (own[1], foreign[1]):
                attempted[key] = b"attempted while no majority was up"
                await _expect_unavailable(f"put {key}", client.put(key, attempted[key]))
            await _expect_unavailable("put fresh", client.put("fresh-key", b"nope"))
            value, version = acked[own[0]]
            attempted[own[0]] = b"cas while no majority was up"
            await _expect_unavailable(
                f"cas {own[0]}", client.cas(own[0], attempted[own[0]], if_version=version)
            )

        for node_id in down:
            await cluster.astart(node_id)

        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for key, (value, version) in acked.items():
                item = await client.get(key)
                assert item is not None, f"seed {seed}: acknowledged {key} lost"
                if key in attempted:
                    # Outcome unknown: the failed write may or may not have happened.
                    assert (item.value, item.version) in (
                        (value, version),
                        (attempted[key], version + 1),
                    ), (key, item)
                else:
                    assert (item.value, item.version) == (value, version), (key, item)
            fresh = await client.get("fresh-key")
            assert fresh is None or fresh.value == b"nope"
            assert await client.put("after", b"back") == 1


async def test_two_of_three_paused_times_out_in_bounded_time(tmp_path: Path) -> None:
    """SIGSTOPped nodes accept connections but never answer: the operations
    must still end, with Timeout (an Unavailable), close to the client's timeout."""
    seed = _seed()
    rng = random.Random(seed)
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        acked: dict[str, tuple[bytes, int]] = {}
        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for i in range(30):
                key = f"acked-{i}"
                value = f"value {i}".encode()
                acked[key] = (value, await client.put(key, value))

        paused = rng.sample(cluster.ids, 2)
        survivor = next(n for n in cluster.ids if n not in paused)
        # Connected before the pause: a client's connect is bounded by its timeout too.
        async with (
            cluster.connect(UNAVAILABLE_TIMEOUT_S) as client,
            cluster.connect(CLIENT_TIMEOUT_S) as patient,
        ):
            own, foreign = await _keys_by_preference(client, survivor, "acked", 3)
            # Opens its connection to the survivor, with a key of its own: the
            # read takes a read lease on it, under which the survivor would
            # answer it alone.
            assert await patient.get(own[2]) is not None
            for node_id in paused:
                cluster.pause(node_id)
            try:
                # The survivor coordinates this key; with a client that waits longer
                # than the node does, the node's own bound shows: it gives up first.
                elapsed = await _expect_unavailable(
                    f"get {own[0]} (patient)", patient.get(own[0]), CLIENT_TIMEOUT_S
                )
                assert elapsed < OPERATION_TIMEOUT_S + UNAVAILABLE_SLACK_S < CLIENT_TIMEOUT_S
                attempted: dict[str, bytes] = {}
                await _expect_unavailable(f"get {own[0]}", client.get(own[0]))
                await _expect_unavailable(f"get {foreign[0]}", client.get(foreign[0]))
                attempted[foreign[1]] = b"attempted while two nodes were paused"
                await _expect_unavailable(
                    f"put {foreign[1]}", client.put(foreign[1], attempted[foreign[1]])
                )
                value, version = acked[own[1]]
                attempted[own[1]] = b"cas while two nodes were paused"
                await _expect_unavailable(
                    f"cas {own[1]}", client.cas(own[1], attempted[own[1]], if_version=version)
                )
            finally:
                for node_id in paused:
                    cluster.resume(node_id)

        async with cluster.connect(CLIENT_TIMEOUT_S) as client:
            for key, (value, version) in acked.items():
                item = await client.get(key)
                assert item is not None, f"seed {seed}: acknowledged {key} lost"
                allowed = {(value, version)}
                if key in attempted:
                    allowed.add((attempted[key], version + 1))
                assert (item.value, item.version) in allowed, (key, item)
            assert await client.put("after", b"back") == 1


CAS_TASKS = 20
CAS_ROUNDS = 8


async def _contend(
    target: Client | NodeConnection,
    key: str,
    value: bytes,
    version: int,
    go: trio.Event,
    outcomes: dict[int, tuple[str, object]],
    task: int,
    rng: random.Random,
) -> None:
    await trio.sleep(rng.uniform(0, 0.005))
    await go.wait()
    try:
        got = await target.put(key, value, if_version=version)
    except kvsvr.Conflict as exc:
        outcomes[task] = ("conflict", str(exc))
    except kvsvr.Unavailable as exc:
        outcomes[task] = ("unknown", repr(exc))
    else:
        outcomes[task] = ("ok", got)


async def test_concurrent_conditional_puts_one_winner_per_version(tmp_path: Path) -> None:
    """Half the tasks use the client (routed to the key's preferred
    coordinator); the others send to one node each, so three coordinators
    duel for the same version slots."""
    seed = _seed()
    rng = random.Random(seed)
    key = "contended"
    with LocalCluster(tmp_path, nodes=3) as cluster:
        await cluster.astart_all()
        async with (
            cluster.connect(CLIENT_TIMEOUT_S) as client,
            node_connection(cluster.address("n1"), cluster.secret) as n1,
            node_connection(cluster.address("n2"), cluster.secret) as n2,
            node_connection(cluster.address("n3"), cluster.secret) as n3,
        ):
            pinned = [n1, n2, n3]
            successes = 0
            unknown_total = 0
            for round_number in range(CAS_ROUNDS):
                current = await client.get(key)
                version = 0 if current is None else current.version
                go = trio.Event()
                outcomes: dict[int, tuple[str, object]] = {}

                async with trio.open_nursery() as nursery:
                    for task in range(CAS_TASKS):
                        target = client if task % 2 == 0 else pinned[task % 3]
                        value = f"round {round_number} task {task}".encode()
                        nursery.start_soon(
                            _contend, target, key, value, version, go, outcomes, task, rng
                        )
                    await trio.sleep(0.02)
                    go.set()

                kinds = Counter(kind for kind, _ in outcomes.values())
                winners = [t for t, (kind, _) in outcomes.items() if kind == "ok"]
                unknown = [t for t, (kind, _) in outcomes.items() if kind == "unknown"]
                print(f"seed {seed} round {round_number} at version {version}: {dict(kinds)}")
                assert len(outcomes) == CAS_TASKS
                assert len(winners) <= 1, (round_number, outcomes)
                after = await client.get(key)
                assert after is not None
                if winners:
                    (winner,) = winners
                    assert outcomes[winner][1] == version + 1, outcomes[winner]
                    assert after.version == version + 1, (round_number, after, outcomes)
                    assert after.value == f"round {round_number} task {winner}".encode()
                    successes += 1
                else:
                    # Nobody was told they won: only an unknown outcome may have.
                    assert unknown, f"round {round_number}: every put conflicted: {outcomes}"
                    assert after.version in (version, version + 1)
                    if after.version == version + 1:
                        assert after.value in {
                            f"round {round_number} task {t}".encode() for t in unknown
                        }, after
                        successes += 1
                unknown_total += len(unknown)
            final = await client.get(key)
            assert final is not None and final.version == successes
            # An Unavailable in an idle 3-node cluster means the duel outlasted the
            # operation timeout: allowed by the contract, but it should be rare.
            assert unknown_total <= CAS_TASKS * CAS_ROUNDS // 10, unknown_total
