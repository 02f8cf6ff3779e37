"""The fault-injection harness: proxies over real loopback TCP, partition shapes,
LMDB corruption, workload outcome rules, and (slow) a real cluster under faults."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from jepsen_like.checker import LINEARIZABLE, check
from jepsen_like.harness import (
    SHAPES,
    History,
    LinkMode,
    LinkProxy,
    NotSent,
    RegisterWorkload,
    RunConfig,
    all_links,
    bridge,
    checker_ops,
    corrupt_file,
    find_rows,
    isolate,
    majorities_ring,
    majority,
    majority_minority,
    open_cluster,
    reachable,
    run_test,
    shape_cut,
)
from jepsen_like.harness.client import NodeClient
from jepsen_like.harness.workload import KvWorkload, PlannedOp, Worker
from kvsvr.errors import Conflict, CorruptRow, Timeout, Unavailable
from kvsvr.keys import encode_key
from kvsvr.protocol.state import EMPTY_ROW
from kvsvr.storage.codec import decode_row, encode_row
from kvsvr.storage.engine import open_environment

# Generous: these run on loaded 2-core CI machines.
DEADLINE_S = 30.0
# How long "nothing arrives" is watched for. Not a sleep before an assertion
# that something happened: a blackhole's whole point is that nothing does.
SILENCE_S = 0.5
PROXY_DELAY_S = 0.25
POLL_S = 0.01

# --- proxies over real loopback TCP -------------------------------------------------


class EchoServer:
    """Echoes every byte back; counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


@asynccontextmanager
async def echo_behind_proxy() -> AsyncIterator[tuple[EchoServer, LinkProxy]]:
    echo = EchoServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, echo.handle, 0)
        echo.port = listeners[0].socket.getsockname()[1]
        proxy = LinkProxy(("a", "b"), ("127.0.0.1", echo.port), random.Random(1))
        await nursery.start(proxy.run)
        yield echo, proxy
        nursery.cancel_scope.cancel()


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll until `condition` holds; the caller's `fail_after` bounds the wait."""
    while True:
        if condition():
            return
        await trio.sleep(POLL_S)


async def connect(proxy: LinkProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(*proxy.address)


async def test_proxy_passes_bytes_both_ways() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        with trio.fail_after(DEADLINE_S):
            stream = await connect(proxy)
            payload = bytes(range(256)) * 1000
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                assert await receive_exactly(stream, len(payload)) == payload
            await stream.aclose()
        assert echo.accepted == 1
        assert proxy.stats.bytes_forwarded == 2 * len(payload)


async def test_blackhole_hold_delivers_after_heal() -> None:
    async with echo_behind_proxy() as (_, proxy):
        with trio.fail_after(DEADLINE_S):
            stream = await connect(proxy)
            await stream.send_all(b"before")
            assert await receive_exactly(stream, 6) == b"before"
            proxy.set_mode(LinkMode(blackhole="hold"))
            await stream.send_all(b"held")
            with trio.move_on_after(SILENCE_S) as silence:
                await stream.receive_some(100)
            assert silence.cancelled_caught, "bytes crossed a blackhole"
            proxy.set_mode(LinkMode())
            assert await receive_exactly(stream, 4) == b"held"
            await stream.aclose()


async def test_blackhole_drop_loses_bytes_and_resets_at_heal() -> None:
    async with echo_behind_proxy() as (_, proxy):
        with trio.fail_after(DEADLINE_S):
            stream = await connect(proxy)
            await stream.send_all(b"x")
            assert await receive_exactly(stream, 1) == b"x"
            proxy.set_mode(LinkMode(blackhole="drop"))
            await stream.send_all(b"lost")
            with trio.move_on_after(SILENCE_S) as silence:
                await stream.receive_some(100)
            assert silence.cancelled_caught, "bytes crossed a blackhole"
            await eventually(lambda: proxy.stats.bytes_dropped >= 4)
            proxy.set_mode(LinkMode())
            # The damaged connection is reset, never resumed mid-stream.
            with pytest.raises((trio.BrokenResourceError, EOFError)):
                await receive_exactly(stream, 1)
            await stream.aclose()


async def test_blackhole_holds_new_connections() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        with trio.fail_after(DEADLINE_S):
            proxy.set_mode(LinkMode(blackhole="hold"))
            stream = await connect(proxy)  # the kernel accepts; the proxy holds it
            await stream.send_all(b"hello")
            with trio.move_on_after(SILENCE_S):
                await stream.receive_some(100)
            assert echo.accepted == 0
            proxy.set_mode(LinkMode())
            assert await receive_exactly(stream, 5) == b"hello"
            assert echo.accepted == 1
            await stream.aclose()


async def test_delay_adds_latency() -> None:
    async with echo_behind_proxy() as (_, proxy):
        with trio.fail_after(DEADLINE_S):
            stream = await connect(proxy)
            proxy.set_mode(LinkMode(delay_s=PROXY_DELAY_S))
            started = time.monotonic()
            await stream.send_all(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
            elapsed = time.monotonic() - started
            # Both directions go through the proxy, each delayed.
            assert elapsed >= 2 * PROXY_DELAY_S * 0.95
            proxy.set_mode(LinkMode())
            await stream.aclose()


async def test_delay_with_jitter_keeps_order() -> None:
    async with echo_behind_proxy() as (_, proxy):
        with trio.fail_after(DEADLINE_S):
            stream = await connect(proxy)
            proxy.set_mode(LinkMode(delay_s=0.02, jitter_s=0.02))
            sent = b""
            for i in range(30):
                piece = f"<{i}>".encode()
                sent += piece
                await stream.send_all(piece)
                await trio.sleep(0.001)
            assert await receive_exactly(stream, len(sent)) == sent
            await stream.aclose()


async def test_reset_closes_connections() -> None:
    async with echo_behind_proxy() as (_, proxy):
        with trio.fail_after(DEADLINE_S):
            stream = await connect(proxy)
            await stream.send_all(b"x")
            assert await receive_exactly(stream, 1) == b"x"
            assert proxy.reset() == 1
            with pytest.raises((trio.BrokenResourceError, EOFError)):
                await receive_exactly(stream, 1)
            await stream.aclose()
            await eventually(lambda: proxy.open_connections == 0)
            assert proxy.stats.connections_reset == 1
            # The link itself still works for new connections.
            again = await connect(proxy)
            await again.send_all(b"y")
            assert await receive_exactly(again, 1) == b"y"
            await again.aclose()


async def test_flaky_closes_connections() -> None:
    async with echo_behind_proxy() as (_, proxy):
        with trio.fail_after(DEADLINE_S):
            proxy.set_mode(LinkMode(close_fraction=1.0))
            stream = await connect(proxy)
            await stream.send_all(b"doomed")
            with pytest.raises((trio.BrokenResourceError, EOFError)):
                await receive_exactly(stream, 6)
            await stream.aclose()


# --- partition shapes (pure) ----------------------------------------------------------------

CLUSTERS = [["n1", "n2", "n3"], ["n1", "n2", "n3", "n4", "n5"]]


def sees(nodes: Sequence[str], cut: frozenset[tuple[str, str]]) -> dict[str, frozenset[str]]:
    return {node: reachable(nodes, cut, node) for node in nodes}


@pytest.mark.parametrize("nodes", CLUSTERS)
def test_isolate_cuts_one_node_both_ways(nodes: list[str]) -> None:
    for lonely in nodes:
        cut = isolate(nodes, lonely)
        others = [n for n in nodes if n != lonely]
        assert cut == {(lonely, o) for o in others} | {(o, lonely) for o in others}
        view = sees(nodes, cut)
        assert view[lonely] == {lonely}
        for other in others:
            assert view[other] == frozenset(others)


@pytest.mark.parametrize("nodes", CLUSTERS)
def test_majority_minority(nodes: list[str]) -> None:
    for order in itertools.permutations(nodes):
        cut = majority_minority(order)
        minority = set(order[: len(nodes) // 2])
        majority_side = set(nodes) - minority
        assert len(majority_side) >= majority(len(nodes)) > len(minority) >= 1
        for a, b in all_links(nodes):
            crosses = (a in minority) != (b in minority)
            assert ((a, b) in cut) == crosses
        view = sees(nodes, cut)
        assert all(view[n] == frozenset(majority_side) for n in majority_side)
        assert all(view[n] == frozenset(minority) for n in minority)


@pytest.mark.parametrize("nodes", CLUSTERS)
def test_majorities_ring(nodes: list[str]) -> None:
    for order in itertools.permutations(nodes):
        cut = majorities_ring(order)
        view = sees(nodes, cut)
        # Every node sees exactly a majority (itself included) ...
        assert all(len(view[n]) == majority(len(nodes)) for n in nodes)
        # ... and no two nodes see the same one.
        assert len(set(view.values())) == len(nodes)
        # Nobody sees everybody: no node can take over the whole cluster.
        assert all(len(view[n]) < len(nodes) for n in nodes)
    if len(nodes) == 5:
        cut = majorities_ring(nodes)
        assert all((b, a) in cut for a, b in cut), "with 5 nodes the ring cut is symmetric"


@pytest.mark.parametrize("nodes", CLUSTERS)
def test_bridge(nodes: list[str]) -> None:
    for order in itertools.permutations(nodes):
        cut = bridge(order)
        middle = order[len(nodes) // 2]
        left = set(order[: len(nodes) // 2])
        right = set(order[len(nodes) // 2 + 1 :])
        view = sees(nodes, cut)
        assert view[middle] == frozenset(nodes), "the bridge node sees everyone"
        assert not any(middle in link for link in cut)
        for a in left:
            for b in right:
                assert (a, b) in cut and (b, a) in cut
        # Every node still sees a majority, through the bridge's side.
        assert all(len(view[n]) >= majority(len(nodes)) for n in nodes)
        assert all((b, a) in cut for a, b in cut), "a bridge cut is symmetric"


@pytest.mark.parametrize("nodes", CLUSTERS)
def test_every_shape_leaves_some_majority_and_cuts_something(nodes: list[str]) -> None:
    for shape in SHAPES:
        cut = shape_cut(shape, nodes)
        assert cut, shape
        assert cut <= all_links(nodes), shape
        view = sees(nodes, cut)
        assert any(len(view[n]) >= majority(len(nodes)) for n in nodes), shape


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown partition shape"):
        shape_cut("donut", ["n1", "n2", "n3"])


# --- corruption of a real LMDB file ------------------------------------------------------------


def write_rows(directory: Path, count: int) -> None:
    env = open_environment(directory, map_size_bytes=1 << 24)
    try:
        table = env.open_db(b"t:default")
        with env.begin(write=True) as txn:
            for i in range(count):
                row = dataclasses.replace(EMPTY_ROW, version=i + 1, value=str(1000 + i).encode())
                txn.put(encode_key(f"r{i}".encode()), encode_row(row), db=table)
    finally:
        env.close()


def read_rows(directory: Path) -> dict[bytes, Any]:
    env = open_environment(directory, map_size_bytes=1 << 24)
    rows: dict[bytes, Any] = {}
    try:
        table = env.open_db(b"t:default")
        with env.begin() as txn:
            for key, data in txn.cursor(db=table):
                try:
                    rows[bytes(key)] = decode_row(bytes(data))
                except CorruptRow as error:
                    rows[bytes(key)] = error
    finally:
        env.close()
    return rows


def test_corruption_damages_only_chosen_rows_and_crc_catches_it(tmp_path: Path) -> None:
    write_rows(tmp_path, 60)
    assert len(find_rows((tmp_path / "data.mdb").read_bytes())) >= 60
    wanted = ["r3", "r10", "r42", "r59"]
    corruption = corrupt_file(tmp_path / "data.mdb", random.Random(7), keys=wanted, keys_max=3)
    assert len(corruption.keys) == 3 and set(corruption.keys) <= set(wanted)
    rows = read_rows(tmp_path)  # LMDB still opens and walks the file
    assert len(rows) == 60
    damaged = {k for k, v in rows.items() if isinstance(v, CorruptRow)}
    assert damaged == {encode_key(k.encode()) for k in corruption.keys}
    for key, row in rows.items():
        if key not in damaged:
            index = int(key[2:].decode()[1:])
            assert row.value == str(1000 + index).encode()
    # The damaged value would have been a plausible number.
    for values in corruption.damaged_values.values():
        assert all(v.isdigit() for v in values)


def test_corruption_respects_exclusions(tmp_path: Path) -> None:
    write_rows(tmp_path, 5)
    corruption = corrupt_file(
        tmp_path / "data.mdb", random.Random(1), exclude=["r0", "r1", "r2", "r3"]
    )
    assert corruption.keys == ["r4"]


# --- workload outcome rules ----------------------------------------------------------------------


class FakeNode:
    """Answers as a NodeClient would, from a script of results."""

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.calls: list[tuple[str, Any]] = []

    def _next(self) -> Any:
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    async def get(self, key: str, consistency: str = "strong") -> tuple[bytes | None, int]:
        await trio.lowlevel.checkpoint()
        self.calls.append(("get", key))
        result: tuple[bytes | None, int] = self._next()
        return result

    async def put(self, key: str, value: bytes | None, if_version: int | None = None) -> int:
        await trio.lowlevel.checkpoint()
        self.calls.append(("put", (key, value, if_version)))
        result: int = self._next()
        return result


async def execute(workload: Any, op: PlannedOp, worker: Worker, results: list[Any]) -> Any:
    node = FakeNode(results)
    completion = await workload.execute(op, worker, node)
    return completion, node.calls


async def test_register_cas_uses_the_version_the_value_was_seen_at() -> None:
    workload = RegisterWorkload(key_count=1, rng=random.Random(0))
    worker = Worker(thread=0, process=0, node="n1")
    completion, _ = await execute(workload, PlannedOp("read", "r0", None), worker, [(b"7", 3)])
    assert (completion.type, completion.value) == ("ok", 7)
    completion, calls = await execute(workload, PlannedOp("cas", "r0", [7, 8]), worker, [4])
    assert completion.type == "ok"
    assert calls == [("put", ("r0", b"8", 3))]
    assert worker.last_seen["r0"] == (8, 4)


async def test_register_outcomes() -> None:
    workload = RegisterWorkload(key_count=1, rng=random.Random(0))
    worker = Worker(thread=0, process=0, node="n1")
    cas = PlannedOp("cas", "r0", [None, 5])
    write = PlannedOp("write", "r0", 6)
    read = PlannedOp("read", "r0", None)
    cases = [
        (cas, Conflict("no"), "fail"),
        (cas, Unavailable("maybe"), "info"),
        (cas, Timeout("maybe"), "info"),
        (write, NotSent("never sent"), "fail"),
        (write, Timeout("maybe"), "info"),
        (read, Unavailable("no majority"), "fail"),
        (read, Timeout("slow"), "fail"),
    ]
    for op, error, expected in cases:
        completion, _ = await execute(workload, op, worker, [error])
        assert completion.type == expected, (op, error)
    # A cas before anything was seen expects nil at version 0 (absent).
    _, calls = await execute(workload, cas, worker, [1])
    assert calls == [("put", ("r0", b"5", 0))]


async def test_kv_outcomes() -> None:
    workload = KvWorkload(key_count=1, rng=random.Random(0))
    worker = Worker(thread=0, process=0, node="n1")
    completion, calls = await execute(workload, PlannedOp("delete", "kv0", None), worker, [2])
    assert completion.type == "ok" and calls == [("put", ("kv0", None, None))]
    completion, _ = await execute(workload, PlannedOp("get", "kv0", None), worker, [(None, 2)])
    assert (completion.type, completion.value) == ("ok", None)
    completion, _ = await execute(workload, PlannedOp("put", "kv0", 3), worker, [Unavailable("?")])
    assert completion.type == "info"


def test_keys_rotate_after_their_cap() -> None:
    workload = RegisterWorkload(key_count=2, rng=random.Random(3))
    worker = Worker(thread=0, process=0, node="n1")
    rng = random.Random(4)
    counts: dict[str, int] = {}
    for _ in range(2000):
        op = workload.next_op(worker, rng)
        counts[op.key] = counts.get(op.key, 0) + 1
    retired = [k for k in workload.used_keys() if k not in workload.active_keys()]
    assert len(retired) >= 5
    assert all(100 <= counts[k] <= 200 for k in retired)
    assert len(workload.active_keys()) == 2


def test_history_events_feed_the_checker() -> None:
    history = History()
    history.nemesis("start-kill", {"killed": ["n1"]})
    history.record(0, "invoke", "write", "r0", 1, node="n1")
    history.record(0, "ok", "write", "r0", 1, node="n1", version=1)
    history.record(1, "invoke", "read", "r0", None, node="n2")
    history.record(1, "ok", "read", "r0", 1, node="n2", version=1)
    ops = checker_ops(history.events)
    assert [op.process for op in ops] == [0, 0, 1, 1]
    assert ops[1].extra == {"node": "n1", "version": 1}
    assert check(ops, RegisterWorkload().model).verdict == LINEARIZABLE


# --- real clusters (slow) ------------------------------------------------------------------------


@pytest.mark.slow
async def test_cluster_control(tmp_path: Path) -> None:
    """Start, kill, restart, pause and resume real nodes; logs are kept."""
    async with open_cluster(tmp_path, node_count=3, rng=random.Random(5)) as cluster:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                n1 = NodeClient("n1", cluster.address("n1"), cluster.secret, nursery)
                assert await n1.put("k", b"1") == 1
                await cluster.kill("n2")
                assert not cluster.is_running("n2")
                assert await n1.put("k", b"2") == 2  # a majority is left
                cluster.pause("n3")
                with pytest.raises(Unavailable):  # n1 alone is no majority
                    await n1.put("k", b"3")
                cluster.resume("n3")
                await cluster.restart("n2")
                value, version = await n1.get("k")
                assert version >= 2 and value in (b"2", b"3")
                n3 = NodeClient("n3", cluster.address("n3"), cluster.secret, nursery)
                assert (await n3.get("k"))[1] == version  # connected before the pause
                cluster.pause("n3")
                with pytest.raises(Timeout):
                    await n3.get("k")
                cluster.resume("n3")
                assert (await n3.get("k"))[1] == version
                await n1.aclose()
                await n3.aclose()
        assert cluster.unexpected_exits() == []
    assert not any(cluster.is_running(n) for n in cluster.node_ids)
    assert "start #2 of n2" in cluster.log_text("n2")
    assert "serving on" in cluster.log_text("n1")


@pytest.mark.slow
async def test_short_run_with_kill_and_partition_is_valid_and_linearizable(
    tmp_path: Path,
) -> None:
    config = RunConfig(
        out_dir=tmp_path / "run",
        node_count=3,
        time_s=45.0,  # about 60 s in all with start-up, final reads and the check
        nemeses=("kill", "partition"),
        workload="register",
        seed=11,
        clients_per_node=3,
    )
    with trio.fail_after(600):
        result = await run_test(config)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert result.valid, summary
    assert result.verdict == LINEARIZABLE, summary
    assert result.exit_code == 0
    assert result.summary["faults"], "the nemesis never struck"
    assert result.counts["after"]["ok"] > 0 and result.counts["final"]["ok"] > 0
    for name in ("history.jsonl", "results.json", "summary.txt", "timeline.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert result.summary["unexpected_exits"] == []


@pytest.mark.slow
async def test_wiped_disks_under_partitions_stay_linearizable(tmp_path: Path) -> None:
    """The `wipe` nemesis deletes a node's data directory and restarts it. The
    node must rebuild its rows (promises included) from its peers before it
    votes. With that rebuild disabled (the node voting at once, as if the
    cluster were new), this seed's history is not linearizable: the checker
    and this nemesis catch a replica that forgot its promises."""
    config = RunConfig(
        out_dir=tmp_path / "run",
        node_count=3,
        time_s=40.0,
        nemeses=("wipe", "partition"),
        workload="register",
        seed=4,
        clients_per_node=3,
    )
    with trio.fail_after(600):
        result = await run_test(config)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert result.valid and result.verdict == LINEARIZABLE, summary
    history = (tmp_path / "run" / "history.jsonl").read_text()
    assert '"wiped"' in history, "the wipe nemesis never struck"
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "cluster" / "logs").glob("*.log"))
    assert "rebuilding before voting" in logs and "rebuilt" in logs


class LyingWorkload(RegisterWorkload):
    """Reports one read per 50 as having returned a value nobody wrote: the
    run must call that an anomaly, exit 1 and write the HTML report."""

    def __init__(self) -> None:
        super().__init__(key_count=2, rng=random.Random(0))
        self.reads = 0

    async def execute(self, op: PlannedOp, worker: Worker, client: Any) -> Any:
        completion = await super().execute(op, worker, client)
        if op.f == "read" and completion.type == "ok":
            self.reads += 1
            if self.reads % 50 == 0:
                return dataclasses.replace(completion, value=-1)
        return completion


@pytest.mark.slow
async def test_a_run_catches_an_anomaly_and_reports_it(tmp_path: Path) -> None:
    config = RunConfig(
        out_dir=tmp_path / "run",
        time_s=6.0,
        warmup_s=2.0,
        tail_s=2.0,
        nemeses=(),
        seed=3,
        clients_per_node=2,
    )
    with trio.fail_after(600):
        result = await run_test(config, LyingWorkload())
    assert result.valid, result.invalid_reasons
    assert result.verdict == "not linearizable"
    assert result.exit_code == 1
    assert (tmp_path / "run" / "report.html").stat().st_size > 0
