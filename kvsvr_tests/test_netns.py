"""Three hosts for real: each node in its own Linux network namespace, joined
by veth pairs to a bridge in a fifth namespace, on private addresses this
test makes (and removes after). Every node listens on 0.0.0.0:7101 (one port
for all: they are separate hosts) and advertises its namespace's address; the
client, in a fourth namespace, reaches them only through those addresses. It
runs the fault harness's register workload (`kvsvr_tests/netns_client.py`),
and taking one node's link down (`ip link set ... down` on its bridge port)
is a real partition: operations go on through the majority while that node
serves none, and after the link comes back up it serves again and catches
up. The history is checked for linearizability.

Needs root and iproute2 (`ip netns`); skips, saying why, where either is
missing or namespaces are not permitted.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import pytest

from jepsen_like.checker import RegisterModel, check, without_stale_reads
from jepsen_like.harness.history import checker_ops, read_history
from kvsvr.config import NodeConfig, local_cluster
from kvsvr.local import node_argv, write_config
from kvsvr_tests.netns_client import CATCH_UP_TIMEOUT_S

SUBNET: Final = "10.77.0"  # private, and only inside this test's namespaces
NODE_PORT: Final = 7101
SECRET: Final = "netns-test-secret"
# Generous: node start-up, elections and catch-up on a loaded 2-core machine.
STEP_TIMEOUT_S: Final = 120.0
# Successful operations a phase waits for: enough to show the cluster serving.
OPS_PER_PHASE: Final = 150
CHECK_TIMEOUT_S: Final = 120.0
REPO: Final = Path(__file__).resolve().parent.parent


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _why_namespaces_cannot_be_used() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command: install iproute2"
    probe = f"kvprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        return f"`ip netns add` is not permitted here: {detail}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Hosts:
    """The namespaces: `names[host]` is a namespace; `port[host]` its bridge port."""

    tag: str
    names: dict[str, str]
    bridge: str
    address: dict[str, str]

    def port(self, host: str) -> str:
        return f"{self.tag}{host}b"

    def link(self, host: str, state: str) -> None:
        _ip("-n", self.bridge, "link", "set", self.port(host), state)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _why_namespaces_cannot_be_used()
    if reason is not None:
        pytest.skip(reason)
    # Names unique to this run, so copies running at once do not collide;
    # interface names ("kv" + 8 + "n1v") stay within Linux's 15 characters.
    tag = f"kv{secrets.token_hex(4)}"
    members = ["n1", "n2", "n3", "c"]
    made = Hosts(
        tag,
        {host: f"{tag}-{host}" for host in members},
        f"{tag}-br",
        {host: f"{SUBNET}.{index}" for index, host in enumerate(members, start=2)},
    )
    created: list[str] = []  # namespaces
    pairs: list[str] = []  # veth pairs, by the end made in this namespace
    try:
        _ip("netns", "add", made.bridge)
        created.append(made.bridge)
        _ip("-n", made.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", made.bridge, "link", "set", "br0", "up")
        for host in members:
            namespace = made.names[host]
            _ip("netns", "add", namespace)
            created.append(namespace)
            inside, outside = f"{tag}{host}v", made.port(host)
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            pairs.append(inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "netns", made.bridge)
            _ip("-n", namespace, "link", "set", inside, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{made.address[host]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", made.bridge, "link", "set", outside, "master", "br0")
            _ip("-n", made.bridge, "link", "set", outside, "up")
        yield made
    finally:
        for namespace in reversed(created):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        for inside in pairs:  # a pair still here failed before it moved: delete it
            subprocess.run(["ip", "link", "del", inside], capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
        assert tag not in left.stdout, f"namespaces left behind: {left.stdout}"


class _Lines:
    """A child's stdout, line by line, read by a thread so waits have deadlines."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.strip())
        self._lines.put("<eof>")

    def wait_for(self, wanted: str | tuple[str, ...], deadline: float | None = None) -> str:
        """The next line starting with `wanted`, read before `deadline` (a
        `time.monotonic()`; `STEP_TIMEOUT_S` from now if None)."""
        if deadline is None:
            deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {wanted!r} in time: {self.seen[-5:]}") from None
            self.seen.append(line)
            if line == "<eof>":
                raise AssertionError(f"the client exited before {wanted!r}: {self.seen[-5:]}")
            if line.startswith(wanted):
                return line

    def counts(self, deadline: float) -> list[int]:
        """The client's next `ok` line: successful operations through each node."""
        return [int(each) for each in self.wait_for("ok ", deadline).split()[1:]]

    def wait_for_ok(self, at_least: list[int]) -> list[int]:
        """Wait until the client's `ok` counts reach `at_least`, node by node."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            counts = self.counts(deadline)
            if all(count >= least for count, least in zip(counts, at_least, strict=True)):
                return counts

    def wait_while_silent(self, silent: int, ops: int) -> list[int]:
        """Wait until node `silent`'s count stays unchanged while the other
        nodes complete `ops` more operations: a node cut off serves nothing
        once the operations in flight at the cut (and any read lease it held)
        have ended. Fails if it keeps serving for `STEP_TIMEOUT_S`."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        mark = self.counts(deadline)
        while True:
            try:
                counts = self.counts(deadline)
            except AssertionError:
                raise AssertionError(
                    f"node {silent + 1} kept serving, or the others stalled: {self.seen[-5:]}"
                ) from None
            if counts[silent] != mark[silent]:
                mark = counts
                continue
            others = sum(counts) - counts[silent] - (sum(mark) - mark[silent])
            if others >= ops:
                return counts


def test_three_namespaced_hosts_serve_linearizably_through_a_real_partition(
    hosts: Hosts, tmp_path: Path
) -> None:
    base = local_cluster(3, 0, secret=SECRET, partitions=8)
    nodes = tuple(
        NodeConfig(
            id=node.id,
            index=node.index,
            host=hosts.address[node.id],
            port=NODE_PORT,
            zone=node.zone,
            listen=("0.0.0.0", NODE_PORT),
        )
        for node in base.nodes
    )
    config_path = write_config(dataclasses.replace(base, nodes=nodes), tmp_path / "cluster.toml")
    processes: list[subprocess.Popen[str]] = []
    logs = {node.id: (tmp_path / f"{node.id}.log").open("w") for node in nodes}
    try:
        for node in nodes:
            argv = ["ip", "netns", "exec", hosts.names[node.id], *node_argv(config_path, node.id)]
            processes.append(
                subprocess.Popen(argv, stdout=logs[node.id], stderr=subprocess.STDOUT, cwd=REPO)
            )
        history_path = tmp_path / "history.jsonl"
        client_argv = [
            "ip",
            "netns",
            "exec",
            hosts.names["c"],
            sys.executable,
            "-m",
            "kvsvr_tests.netns_client",
            *(f"--node={node.id}={node.address}" for node in nodes),
            f"--secret={SECRET}",
            f"--history={history_path}",
        ]
        client = subprocess.Popen(
            client_argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        processes.append(client)
        assert client.stdin is not None and client.stdout is not None
        lines = _Lines(client.stdout)
        lines.wait_for("ready")
        before = lines.wait_for_ok([OPS_PER_PHASE // 3] * 3)

        hosts.link("n3", "down")  # n3 cut off: the majority n1, n2 goes on, n3 falls silent
        during = lines.wait_while_silent(2, 2 * OPS_PER_PHASE)

        hosts.link("n3", "up")  # healed: n3 serves again, and catches up
        lines.wait_for_ok([0, 0, during[2] + OPS_PER_PHASE // 3])
        client.stdin.write("stop\n")
        client.stdin.flush()
        lines.wait_for("stopped")
        client.stdin.write("catchup n3\n")
        client.stdin.flush()
        answer = lines.wait_for(
            ("caught-up", "not-caught-up"), time.monotonic() + CATCH_UP_TIMEOUT_S + STEP_TIMEOUT_S
        )
        assert answer == "caught-up", answer
        client.stdin.write("quit\n")
        client.stdin.flush()
        assert client.wait(timeout=STEP_TIMEOUT_S) == 0

        ops = without_stale_reads(checker_ops(read_history(history_path)))
        assert sum(1 for op in ops if op.type == "ok") >= 3 * OPS_PER_PHASE
        result = check(ops, RegisterModel(), timeout_s=CHECK_TIMEOUT_S, workers=2)
        assert result.verdict == "linearizable", result
        assert before[2] > 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs.values():
            log.close()
    text = (tmp_path / "n1.log").read_text()
    assert f"serving on 0.0.0.0:{NODE_PORT} (advertised as {SUBNET}.2:{NODE_PORT})" in text
