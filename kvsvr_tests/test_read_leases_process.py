"""Read leases on real node processes: what a holder may answer alone, how
soon other writers get through when it dies, and the harness catching the
stale reads a clock far outside `clock_drift_max` allows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

import kvsvr
from jepsen_like.checker import NOT_LINEARIZABLE
from jepsen_like.harness.run import RunConfig, run_test
from kvsvr_tests.cluster_util import LocalCluster, node_connection

pytestmark = pytest.mark.slow

LEASE_S = 2.0
# "Writes to its keys through another coordinator resume within lease_s + 1 s."
RESUME_SLACK_S = 1.0


async def _home_key(client: kvsvr.Client, node_id: str, prefix: str) -> str:
    """A key whose preferred coordinator is `node_id` (the client sends its
    requests there)."""
    partition_map = await client.partition_map()
    for i in range(10_000):
        key = f"{prefix}-{i}"
        if partition_map.replicas("default", key.encode())[0].id == node_id:
            return key
    raise AssertionError(f"no key prefers {node_id}")


async def _leases(cluster: LocalCluster, node_id: str) -> dict[str, Any]:
    async with cluster.connect() as client:
        status = await client.status(node_id)
    leases: dict[str, Any] = status["read_leases"]
    return leases


async def test_writes_through_another_node_resume_within_a_lease_of_killing_the_holder(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path, nodes=3, settings={"lease_s": LEASE_S}) as cluster:
        await cluster.astart_all()
        async with cluster.connect() as client:
            key = await _home_key(client, "n1", "held")
            await client.put(key, b"before")
            item = await client.get(key)  # takes n1's lease on the key
            assert item is not None and item.value == b"before"
        leases = await _leases(cluster, "n1")
        assert leases["held"] >= 1 and leases["taken"] >= 1, leases
        killed_at = time.monotonic()
        await cluster.akill("n1")
        async with node_connection(cluster.address("n2"), cluster.secret) as n2:
            version = await n2.put(key, b"after")
            resumed_s = time.monotonic() - killed_at
            assert await n2.get(key) == (version, b"after")
        # The replicas held back n2's accept for what was left of n1's lease.
        assert (await _leases(cluster, "n2"))["write_waits"] >= 1
        assert resumed_s <= LEASE_S + RESUME_SLACK_S, f"writes resumed after {resumed_s:.2f} s"
        print(f"writes resumed {resumed_s:.2f} s after the holder was killed (lease {LEASE_S} s)")


async def test_a_holder_answers_strong_reads_alone_only_while_its_lease_lasts(
    tmp_path: Path,
) -> None:
    """With both of its peers frozen, a holder still answers a strong read of
    a leased key (the peers could choose nothing new meanwhile), and stops
    once the lease is over: then it needs a majority, which it lacks."""
    with LocalCluster(tmp_path, nodes=3, settings={"lease_s": LEASE_S}) as cluster:
        await cluster.astart_all()
        async with cluster.connect() as client:
            key = await _home_key(client, "n1", "alone")
            version = await client.put(key, b"v")
        async with node_connection(cluster.address("n1"), cluster.secret) as n1:
            assert await n1.get(key) == (version, b"v")  # takes the lease
            for node_id in ("n2", "n3"):
                cluster.pause(node_id)
            try:
                assert await n1.get(key) == (version, b"v")
                await trio.sleep(LEASE_S * 1.1)
                with pytest.raises(kvsvr.Unavailable):
                    await n1.get(key)
            finally:
                for node_id in ("n2", "n3"):
                    cluster.resume(node_id)
        assert (await _leases(cluster, "n1"))["local_reads"] >= 1


async def test_the_harness_finds_the_stale_reads_of_a_clock_five_times_slow(
    tmp_path: Path,
) -> None:
    """The clock-rate assumption, broken: a holder whose clock runs 5x slow
    reads locally long after the replicas let other writers through. The
    harness's checker must find it (a seed or two of a short run); within
    the bound the same runs are linearizable (the README's harness runs)."""
    verdicts = []
    for seed in (1, 2, 3):
        config = RunConfig(
            out_dir=tmp_path / f"run-{seed}",
            node_count=3,
            time_s=30.0,
            nemeses=("clock",),
            clock_rate=0.2,
            lease_s=0.5,
            key_affinity=0.9,
            read_fraction=0.9,
            workload="register",
            seed=seed,
            clients_per_node=3,
        )
        with trio.fail_after(600):
            result = await run_test(config)
        verdicts.append(result.verdict)
        if result.valid and result.verdict == NOT_LINEARIZABLE:
            return
    raise AssertionError(f"no stale read found with a 5x slow clock: {verdicts}")
