"""Linearizability of a real 3-node cluster through a node crash and restart.

16 clients run read / write (unique values) / cas on 3 keys for
`RUN_S` seconds while one node is SIGKILLed and later restarted; the
Jepsen-style history they record is checked against a register model.

Half the clients use `kvsvr.connect` (each key routed to its preferred
coordinator); the other half send every request to one node, so all three
nodes coordinate every key and duel for its version slots.

Recording: `invoke` just before a request is sent; `ok` with the result,
`fail` when it certainly did not take effect (any failed read) or found its
condition false (Conflict, recorded with the version the node reported as
current, which the checker holds it to), and `info` when the outcome is
unknown (Unavailable/Timeout or anything else on a write), after which the
client continues as a new process, as in Jepsen.
A cas is `[expected, new]` and is sent as `put(key, new, if_version=v)`,
where v is the version at which this client last saw `expected`; since every
written value is unique, "the version is v" and "the value is expected" are
the same condition.

Seeds are printed; rerun one with KVSVR_TEST_SEED=<seed>. The history is
written to the test's tmp dir as history.jsonl (and report.html on failure).
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

import kvsvr
from jepsen_like.checker import (
    LINEARIZABLE,
    NOT_LINEARIZABLE,
    Op,
    RegisterModel,
    check,
    write_html_report,
    write_jsonl,
)
from kvsvr_tests.cluster_util import LocalCluster, NodeConnection, node_connection

pytestmark = pytest.mark.slow

CLIENTS = 16
KEYS = ("x", "y", "z")
RUN_S = 16.0
KILL_AT_S = 5.0
RESTART_AT_S = 10.0
# The run goes on at least this long after the restarted node answers (its start
# can take seconds on a loaded machine).
AFTER_RESTART_MIN_S = 5.0
CLIENT_TIMEOUT_S = 5.0
# A client whose pinned node is down tries to reconnect this often.
RECONNECT_PAUSE_S = 0.2
# Time between a client's operations: keeps the per-key histories small enough
# for the checker to decide in seconds, while leaving plenty of concurrency.
THINK_S = 0.01
CHECK_TIMEOUT_S = 90.0
# What a run must at least achieve for its verdict to mean anything.
# (An idle 2-core machine does ~1800 ok operations, ~800 while the node is down,
# ~500 after, ~200 of them cas; with 5 times as many runnable processes as
# cores, a third of that.)
MIN_OK_OPS = 200
MIN_OK_PER_F = 15  # ok reads, ok writes and ok cas, each
MIN_OK_WHILE_DOWN = 30
MIN_OK_AFTER_RESTART = 30


class Recorder:
    def __init__(self) -> None:
        self.history: list[Op] = []
        self._index = itertools.count()
        self._process_ids = itertools.count(CLIENTS)

    def event(
        self,
        process: int,
        type_: str,
        f: str,
        key: str,
        value: Any,
        error: str = "",
        **extra: int | None,
    ) -> Op:
        op = Op(process, type_, f, key, value, time.monotonic_ns(), next(self._index))
        if error:
            op.extra["error"] = error
        op.extra.update((name, field) for name, field in extra.items() if field is not None)
        self.history.append(op)
        return op

    def new_process(self) -> int:
        return next(self._process_ids)


def _decode(value: bytes | None) -> int | None:
    return None if value is None else int(value)


class Worker:
    """One client process of the workload."""

    def __init__(self, number: int, recorder: Recorder, rng: random.Random) -> None:
        self.process = number
        self.recorder = recorder
        self.rng = rng
        self.values = (number * 1_000_000 + n for n in itertools.count(1))
        # key -> (value, version) as this client last saw it.
        self.seen: dict[str, tuple[int | None, int]] = {}

    async def step(self, get: Any, put: Any) -> None:
        """One operation (a cas: a read, then the cas of what it saw).
        `get(key) -> (version, value|None)`, `put(key, value, if_version) -> version`."""
        key = self.rng.choice(KEYS)
        roll = self.rng.random()
        if roll < 0.35:
            await self._read(get, key)
            await self._cas(put, key)
        elif roll < 0.7:
            await self._write(put, key)
        else:
            await self._read(get, key)

    async def _read(self, get: Any, key: str) -> None:
        rec = self.recorder
        rec.event(self.process, "invoke", "read", key, None)
        try:
            version, raw = await get(key)
        except Exception as exc:
            rec.event(self.process, "fail", "read", key, None, repr(exc))
            raise
        value = _decode(raw)
        rec.event(self.process, "ok", "read", key, value, version=version)
        self.seen[key] = (value, version)

    async def _write(self, put: Any, key: str) -> None:
        rec = self.recorder
        new = next(self.values)
        rec.event(self.process, "invoke", "write", key, new)
        try:
            got = await put(key, str(new).encode(), None)
        except Exception as exc:
            rec.event(self.process, "info", "write", key, new, repr(exc))
            self._crashed()
            raise
        rec.event(self.process, "ok", "write", key, new, version=got)
        self.seen[key] = (new, got)

    async def _cas(self, put: Any, key: str) -> None:
        rec = self.recorder
        expected, version = self.seen[key]
        new = next(self.values)
        rec.event(self.process, "invoke", "cas", key, [expected, new], if_version=version)
        try:
            got = await put(key, str(new).encode(), version)
        except kvsvr.Conflict as exc:
            rec.event(
                self.process,
                "fail",
                "cas",
                key,
                [expected, new],
                repr(exc),
                current_version=exc.current_version,
            )
            return
        except Exception as exc:
            rec.event(self.process, "info", "cas", key, [expected, new], repr(exc))
            self._crashed()
            raise
        rec.event(self.process, "ok", "cas", key, [expected, new], version=got)
        self.seen[key] = (new, got)

    def _crashed(self) -> None:
        self.process = self.recorder.new_process()
        self.seen.clear()


async def _routed_worker(
    worker: Worker, cluster: LocalCluster, home: int, stop: trio.Event
) -> None:
    addresses = cluster.addresses[home:] + cluster.addresses[:home]

    async def get(key: str) -> tuple[int, bytes | None]:
        item = await client.get(key)
        return (0, None) if item is None else (item.version, item.value)

    async def put(key: str, value: bytes, if_version: int | None) -> int:
        return await client.put(key, value, if_version=if_version)

    async with kvsvr.connect(
        addresses, secret=cluster.secret, timeout_s=CLIENT_TIMEOUT_S
    ) as client:
        while not stop.is_set():
            try:
                await worker.step(get, put)
            except kvsvr.KvsvrError:
                pass
            await trio.sleep(worker.rng.uniform(0, THINK_S))


async def _pinned_worker(
    worker: Worker, cluster: LocalCluster, node_id: str, stop: trio.Event
) -> None:
    while not stop.is_set():
        try:
            async with node_connection(
                cluster.address(node_id), cluster.secret, connect_timeout_s=2.0
            ) as node:
                await _pinned_loop(worker, node, stop)
        except kvsvr.Unavailable:
            await trio.sleep(RECONNECT_PAUSE_S)  # the node is down; not an operation


async def _pinned_loop(worker: Worker, node: NodeConnection, stop: trio.Event) -> None:
    async def get(key: str) -> tuple[int, bytes | None]:
        with trio.fail_after(CLIENT_TIMEOUT_S):
            return await node.get(key)

    async def put(key: str, value: bytes, if_version: int | None) -> int:
        with trio.fail_after(CLIENT_TIMEOUT_S):
            return await node.put(key, value, if_version=if_version)

    while not stop.is_set():
        if node.connection.closed:
            raise kvsvr.Unavailable("connection lost")
        try:
            await worker.step(get, put)
        except kvsvr.Unavailable:
            raise
        except (kvsvr.KvsvrError, trio.TooSlowError):
            pass
        await trio.sleep(worker.rng.uniform(0, THINK_S))


async def test_history_with_a_node_crash_is_linearizable(tmp_path: Path) -> None:
    seed = int(os.environ.get("KVSVR_TEST_SEED", random.randrange(1 << 32)))
    print(f"KVSVR_TEST_SEED={seed}")
    rng = random.Random(seed)
    recorder = Recorder()
    with LocalCluster(tmp_path / "cluster", nodes=3) as cluster:
        await cluster.astart_all()
        victim = rng.choice(cluster.ids)
        stop = trio.Event()
        started = time.monotonic_ns()
        marks: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            for number in range(CLIENTS):
                worker = Worker(number, recorder, random.Random(rng.random()))
                if number % 2 == 0:
                    nursery.start_soon(_routed_worker, worker, cluster, number % 3, stop)
                else:
                    node_id = cluster.ids[number % 3]
                    nursery.start_soon(_pinned_worker, worker, cluster, node_id, stop)
            await trio.sleep(KILL_AT_S)
            await cluster.akill(victim)
            marks["kill"] = time.monotonic_ns()
            await trio.sleep(RESTART_AT_S - KILL_AT_S)
            await cluster.astart(victim)
            marks["restart"] = time.monotonic_ns()
            elapsed_s = (time.monotonic_ns() - started) / 1e9
            await trio.sleep(max(AFTER_RESTART_MIN_S, RUN_S - elapsed_s))
            stop.set()
            # Workers finish their current operation; a stuck one is cut off (its
            # operation then stays open, which the checker treats as unknown).
            nursery.cancel_scope.deadline = trio.current_time() + 2 * CLIENT_TIMEOUT_S

    history = recorder.history
    history_path = tmp_path / "history.jsonl"
    write_jsonl(history, history_path)
    oks = [op for op in history if op.type == "ok"]
    by_type = Counter((op.f, op.type) for op in history if op.type != "invoke")
    while_down = sum(1 for op in oks if marks["kill"] < op.time_ns < marks["restart"])
    after = sum(1 for op in oks if op.time_ns > marks["restart"])
    summary = (
        f"seed {seed}, victim {victim}: {len(history)} events, {len(oks)} ok "
        f"({while_down} while {victim} was down, {after} after its restart); "
        f"{dict(sorted(by_type.items()))}; history in {history_path}"
    )
    print(summary)

    start = time.monotonic()
    result = check(history, RegisterModel(), timeout_s=CHECK_TIMEOUT_S)
    print(f"check: {result.verdict} in {time.monotonic() - start:.1f} s")
    if result.verdict != LINEARIZABLE:
        report = write_html_report(result, tmp_path / "report.html")
        pytest.fail(
            f"{summary}: verdict {result.verdict} (bad keys {result.bad_keys}, "
            f"undecided {result.unknown_keys}); report {report}"
        )
    assert len(oks) >= MIN_OK_OPS, summary
    for f in ("read", "write", "cas"):
        assert by_type[(f, "ok")] >= MIN_OK_PER_F, summary
    assert while_down >= MIN_OK_WHILE_DOWN, summary
    assert after >= MIN_OK_AFTER_RESTART, summary

    # The checker is not blind to this history: the last ok read of a key made
    # to return that key's first written value (long overwritten) must fail.
    first_write: dict[str, int] = {}
    for op in history:
        if op.type == "ok" and op.f == "write":
            first_write.setdefault(op.key, op.value)  # type: ignore[arg-type]
    tampered = [replace(op) for op in history]
    victim_read = next(
        op
        for op in reversed(tampered)
        if op.type == "ok" and op.f == "read" and op.value != first_write[op.key]  # type: ignore[index]
    )
    victim_read.value = first_write[victim_read.key]  # type: ignore[index]
    assert check(tampered, RegisterModel(), timeout_s=CHECK_TIMEOUT_S).verdict == NOT_LINEARIZABLE
