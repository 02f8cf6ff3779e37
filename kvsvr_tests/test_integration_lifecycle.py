"""A cluster's lifecycle with real node processes: a fresh cluster written to
before it is ready, two wiped replicas and `kvsvr recover`, a data directory
or a peer of another cluster."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import kvsvr
from kvsvr import cli
from kvsvr.config import load_config, new_cluster_id, render_config
from kvsvr_tests.cluster_util import LocalCluster, node_connection

pytestmark = pytest.mark.slow

# A fresh cluster written to at once is ready
# within READY_WITHIN_S, every time, over BOOTSTRAP_RUNS fresh clusters.
BOOTSTRAP_RUNS = int(os.environ.get("KVSVR_BOOTSTRAP_RUNS", "20"))
READY_WITHIN_S = 30.0
WRITERS = 8
KEYS_PER_WRITER = 5
# A writer retries an unanswered write (the cluster may not listen yet) this long.
WRITE_DEADLINE_S = 30.0
RETRY_PAUSE_S = 0.05


async def _writer(
    cluster: LocalCluster, writer: int, acknowledged: dict[str, bytes], deadline: float
) -> None:
    """Write KEYS_PER_WRITER keys, each one value, retrying through
    connection failures and outcome-unknown answers until `deadline`."""
    keys = [f"w{writer}-k{j}" for j in range(KEYS_PER_WRITER)]
    while keys and time.monotonic() < deadline:
        try:
            async with cluster.connect(timeout_s=3.0) as client:
                while keys:
                    value = keys[0].encode() * 3
                    await client.put(keys[0], value)
                    acknowledged[keys.pop(0)] = value
        except (kvsvr.KvsvrError, OSError):
            await trio.sleep(RETRY_PAUSE_S)


async def test_a_fresh_cluster_written_at_once_is_ready_every_time(tmp_path: Path) -> None:
    """Start three nodes and, at once, before any readiness wait, eight
    clients write. The cluster is ready within 30 s every time, and every
    acknowledged write reads back."""
    took: list[float] = []
    for run in range(BOOTSTRAP_RUNS):
        with LocalCluster(tmp_path / f"run{run}", nodes=3) as cluster:
            started = time.monotonic()
            for node_id in cluster.ids:
                cluster.start(node_id, wait=False)
            acknowledged: dict[str, bytes] = {}
            async with trio.open_nursery() as nursery:
                for writer in range(WRITERS):
                    nursery.start_soon(
                        _writer, cluster, writer, acknowledged, started + WRITE_DEADLINE_S
                    )
            async with cluster.connect() as client:
                await client.wait_ready(
                    timeout_s=max(0.1, started + READY_WITHIN_S - time.monotonic())
                )
                took.append(time.monotonic() - started)
                assert acknowledged, "no write was acknowledged within 30 s"
                for key, value in acknowledged.items():
                    item = await client.get(key)
                    assert item is not None and item.value == value, (run, key, item)
        shutil.rmtree(tmp_path / f"run{run}", ignore_errors=True)
    print(f"ready after {', '.join(f'{t:.1f}' for t in took)} s")


async def _states(cluster: LocalCluster) -> dict[str, str]:
    async with cluster.connect() as client:
        return {s["node"]: s["health"] for s in await client.cluster_status()}


async def _wait_states(cluster: LocalCluster, wanted: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = await _states(cluster)
        if all(states.get(node) == state for node, state in wanted.items()):
            return
        await trio.sleep(0.2)
    raise AssertionError(f"wanted {wanted}, still {states}")


def _cli(*argv: str) -> int:
    return cli.main(list(argv))


async def test_two_wiped_replicas_need_an_operator_and_recover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two of three replicas lose their data. Neither waits on the other:
    both say "needs operator", `kvsvr status` says so and exits 4, and
    `kvsvr recover --accept-data-loss` brings the cluster back from the one
    replica that kept its data, saying what may have been lost."""
    with LocalCluster(tmp_path, nodes=3) as cluster:
        cluster.start_all()
        # n1 coordinates, so its own replica accepts every write: the writes
        # survive the loss of n2 and n3 (the left-out replica of a round may
        # learn a key's last write only later, and that loss would be real).
        async with node_connection(cluster.address("n1"), cluster.secret) as n1:
            for i in range(30):
                await n1.put(f"k{i}", b"v%d" % i)
        for node_id in ("n2", "n3"):
            await cluster.astop(node_id)
            shutil.rmtree(cluster.config.node_data_dir(node_id))
        # One told it replaces a member, one left to find out from n1.
        await trio.to_thread.run_sync(
            lambda: cluster.start("n2", extra_args=("--initial-cluster-state", "existing"))
        )
        await cluster.astart("n3")
        wanted = {"n1": "ready", "n2": "needs_operator", "n3": "needs_operator"}
        await _wait_states(cluster, wanted, 60.0)
        for node_id in ("n2", "n3"):
            assert cluster.is_running(node_id)
            status = (await _states(cluster))[node_id]
            assert status == "needs_operator"
        config = str(cluster.config_path)
        capsys.readouterr()
        assert await trio.to_thread.run_sync(_cli, "status", "--config", config) == 4
        out = capsys.readouterr().out
        assert "needs operator: n2, n3 lost data for partitions 0-15" in out, out
        json_code = await trio.to_thread.run_sync(_cli, "status", "--config", config, "--json")
        assert json_code == 4 and '"needs_operator"' in capsys.readouterr().out
        # Without the flag: a usage error, and nothing changes.
        assert await trio.to_thread.run_sync(_cli, "recover", "--config", config) == 2
        assert "--accept-data-loss" in capsys.readouterr().err
        code = await trio.to_thread.run_sync(
            _cli, "recover", "--config", config, "--accept-data-loss"
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "rebuilt from n1 alone" in out and "may be lost" in out, out
        assert "cluster ready" in out
        async with cluster.connect() as client:
            await client.wait_ready(timeout_s=30.0)
            assert await client.put("after", b"recovery") >= 1
            for i in range(30):
                item = await client.get(f"k{i}")
                assert item is not None and item.value == b"v%d" % i
            report: Any = (await client.status("n2"))["replication"]["loss_report"]
            assert report["lost_data"] == ["n2", "n3"]


async def test_a_node_refuses_another_clusters_data_directory(tmp_path: Path) -> None:
    """n1's data directory of cluster A, given to n1 of cluster B: it exits
    with code 5 and says whose directory it is."""
    with LocalCluster(tmp_path / "a", nodes=3) as first:
        first.start_all()
        await first.astop("n1")
        with LocalCluster(tmp_path / "b", nodes=3) as second:
            target = second.config.node_data_dir("n1")
            shutil.copytree(first.config.node_data_dir("n1"), target)
            second.start("n1", wait=False)
            code = await trio.to_thread.run_sync(second.wait_exit, "n1")
            log = second.log_path("n1").read_text()
            assert code == 5, log
            assert f"belongs to cluster {first.config.cluster_id}" in log, log
            assert f"not to cluster {second.config.cluster_id}" in log, log


async def test_a_node_whose_peers_are_of_another_cluster_refuses_to_start(
    tmp_path: Path,
) -> None:
    """An empty n3 whose config names another cluster id than its running
    peers': it hears their hellos, exits with code 5 and says why."""
    with LocalCluster(tmp_path, nodes=3) as cluster:
        for node_id in ("n1", "n2"):
            cluster.start(node_id)
        other = tmp_path / "other.toml"
        config = load_config(cluster.config_path)
        stranger = new_cluster_id()
        text = render_config(config, data_dir=str(tmp_path / "data"))
        assert config.cluster_id is not None
        other.write_text(text.replace(config.cluster_id, stranger), encoding="utf-8")
        cluster.start("n3", wait=False, config_path=other)
        code = await trio.to_thread.run_sync(cluster.wait_exit, "n3")
        log = cluster.log_path("n3").read_text()
        assert code == 5, log
        assert f"belongs to cluster {config.cluster_id}, not {stranger}" in log, log


async def test_a_rebuild_cut_short_is_taken_up_again_after_a_restart(tmp_path: Path) -> None:
    """A replacement that is killed before its rebuild ends holds its
    identity but not its rows: started again (as "new", even), it must
    rebuild, never count as a node that restarted with its data."""
    with LocalCluster(tmp_path, nodes=3) as cluster:
        cluster.start_all()
        async with node_connection(cluster.address("n1"), cluster.secret) as n1:
            for i in range(20):
                await n1.put(f"k{i}", b"v%d" % i)
        for node_id in ("n2", "n3"):
            await cluster.astop(node_id)
        shutil.rmtree(cluster.config.node_data_dir("n2"))
        # n3 is down: n2 cannot rebuild yet (it needs both other replicas).
        await trio.to_thread.run_sync(
            lambda: cluster.start("n2", extra_args=("--initial-cluster-state", "existing"))
        )
        await _wait_replica_state(cluster, "n2", "rebuilding", 60.0)
        await cluster.akill("n2")
        await cluster.astart("n2")
        await _wait_replica_state(cluster, "n2", "rebuilding", 60.0)
        await cluster.astart("n3")
        await _wait_states(cluster, {"n1": "ready", "n2": "ready", "n3": "ready"}, 60.0)
        async with node_connection(cluster.address("n2"), cluster.secret) as n2:
            for i in range(20):
                assert await n2.get(f"k{i}", consistency="local") == (1, b"v%d" % i)
        log = cluster.log_path("n2").read_text()
        assert "its rebuild was cut short" in log, log


async def _wait_replica_state(
    cluster: LocalCluster, node_id: str, state: str, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    seen = "no answer"
    while time.monotonic() < deadline:
        try:
            async with cluster.connect() as client:
                seen = (await client.status(node_id))["replication"]["state"]
        except kvsvr.KvsvrError as error:
            seen = f"no answer ({error})"
        if seen == state:
            return
        await trio.sleep(0.2)
    raise AssertionError(f"{node_id} still {seen}, not {state}")
