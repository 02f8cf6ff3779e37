"""Crash durability with real processes: an acknowledged put survives SIGKILL.

A writer process puts distinct keys from several concurrent tasks and prints
each key as soon as its put returned (so a printed key is an acknowledged
write). At a seeded random moment, after some acknowledgements, the test
SIGKILLs the node(s), then the writer, restarts the node(s) and reads every
acknowledged key back through a fresh client: each must hold its value.

The seed is printed; rerun one with KVSVR_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kvsvr
from kvsvr_tests.cluster_util import LocalCluster

pytestmark = pytest.mark.slow

# Concurrent put tasks in the writer: several writes in flight at once is what
# the group-commit writer batches, so a kill can land inside a batch.
WRITER_TASKS = 8
# A writer imports kvsvr and connects in about a second; on a loaded machine
# much longer. This bounds the wait for its first acknowledgements.
ACK_WAIT_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 10.0

WRITER_SCRIPT = r"""
import sys
import trio
import kvsvr

addresses, secret, prefix, tasks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

async def writer(client, task):
    n = 0
    while True:
        key = f"{prefix}-t{task}-{n}"
        value = f"value of {key} " + "x" * (n % 200)
        try:
            await client.put(key, value.encode())
        except kvsvr.KvsvrError as exc:
            print(f"put {key} failed: {exc!r}", file=sys.stderr, flush=True)
            await trio.sleep(0.05)
        else:
            # Printed only once the put returned: an acknowledged write.
            sys.stdout.write(f"ACK {key} {len(value)}\n")
            sys.stdout.flush()
        n += 1

async def main():
    async with kvsvr.connect(addresses.split(","), secret=secret, timeout_s=5.0) as client:
        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(writer, client, task)

trio.run(main)
"""


def _expected_value(key: str, length: int) -> bytes:
    n = int(key.rsplit("-", 1)[1])
    value = f"value of {key} " + "x" * (n % 200)
    assert len(value) == length
    return value.encode()


class Writer:
    """The writer process and a thread collecting its acknowledged keys."""

    def __init__(self, script: Path, cluster: LocalCluster, prefix: str, log: Path) -> None:
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(script),
                ",".join(cluster.addresses),
                cluster.secret,
                prefix,
                str(WRITER_TASKS),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.acked: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode()
            if not line.endswith("\n"):
                continue  # a line cut by the kill: not an acknowledgement we saw whole
            tag, key, length = line.split()
            assert tag == "ACK"
            with self._lock:
                self.acked[key] = _expected_value(key, int(length))

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_for_acks(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count() < count:
            if self.process.poll() is not None:
                raise AssertionError(f"the writer exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.count()} of {count} acknowledgements in {timeout_s} s"
                )
            time.sleep(0.01)

    def kill(self) -> dict[str, bytes]:
        """SIGKILL the writer; every acknowledgement it printed."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=30)
        assert not self._reader.is_alive(), "the writer's stdout did not close"
        self._log.close()
        with self._lock:
            return dict(self.acked)


def _seed() -> int:
    seed = int(os.environ.get("KVSVR_TEST_SEED", random.randrange(1 << 32)))
    print(f"KVSVR_TEST_SEED={seed}")
    return seed


def _check_all_present(cluster: LocalCluster, acked: dict[str, bytes], context: str) -> None:
    missing: list[str] = []
    wrong: list[tuple[str, bytes, bytes]] = []
    addresses, secret = cluster.addresses, cluster.secret
    with kvsvr.SyncClient(addresses, secret=secret, timeout_s=CLIENT_TIMEOUT_S) as client:
        for key, value in acked.items():
            item = client.get(key)
            if item is None:
                missing.append(key)
            elif item.value != value:
                wrong.append((key, value, item.value))
    assert not missing and not wrong, (
        f"{context}: {len(missing)} acknowledged keys lost (first: {missing[:10]}), "
        f"{len(wrong)} with a wrong value (first: {wrong[:3]}) of {len(acked)} acknowledged"
    )


def _crash_rounds(tmp_path: Path, nodes: int, rounds: int) -> None:
    seed = _seed()
    rng = random.Random(seed)
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT, encoding="utf-8")
    all_acked: dict[str, bytes] = {}
    with LocalCluster(tmp_path / "cluster", nodes=nodes) as cluster:
        cluster.start_all()
        for round_number in range(rounds):
            min_acks = rng.randint(20, 200)
            extra_delay_s = rng.uniform(0.0, 0.5)
            kill_order = rng.sample(cluster.ids, len(cluster.ids))
            context = (
                f"seed {seed}, {nodes} node(s), round {round_number}: killed "
                f"{kill_order} after >= {min_acks} acks + {extra_delay_s:.3f} s"
            )
            writer = Writer(
                script, cluster, f"r{round_number}", tmp_path / f"writer{round_number}.log"
            )
            try:
                writer.wait_for_acks(min_acks, ACK_WAIT_TIMEOUT_S)
                time.sleep(extra_delay_s)
                acks_at_kill = writer.count()
                for node_id in kill_order:
                    cluster.kill(node_id)
            finally:
                acked = writer.kill()
            print(f"{context}: {len(acked)} acknowledged ({acks_at_kill} seen at the kill)")
            assert len(acked) >= min_acks
            all_acked.update(acked)
            cluster.start_all()
            _check_all_present(cluster, all_acked, context)
        # A clean stop (SIGTERM) exits 0 and keeps everything too.
        for node_id in cluster.ids:
            assert cluster.stop(node_id) == 0, cluster.log_tail(node_id)
        cluster.start_all()
        _check_all_present(cluster, all_acked, f"seed {seed}: after a clean stop")


def test_acknowledged_puts_survive_sigkill_single_node(tmp_path: Path) -> None:
    _crash_rounds(tmp_path, nodes=1, rounds=3)


def test_acknowledged_puts_survive_sigkill_of_every_node_of_three(tmp_path: Path) -> None:
    _crash_rounds(tmp_path, nodes=3, rounds=2)
