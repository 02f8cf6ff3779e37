"""The client side of `test_netns.py`, run in the client's network namespace
(`ip netns exec NS python -m kvsvr_tests.netns_client ...`): the fault
harness's register workload against nodes it reaches only through their
advertised addresses, driven by the test over stdin and stdout.

It prints `ready` once every node is ready, then runs the workload (three
client threads per node) and prints `ok N1 N2 N3` (successful operations
through each node so far) every `PROGRESS_INTERVAL_S`. On the line `stop` it
stops the workload, reads every key until a read succeeds, and writes the
history (JSON Lines) to `--history`. On `catchup NODE` it waits until NODE's
own replica (a `local` read) holds every key at the version a strong read
finds, and prints `caught-up` (or `not-caught-up KEY...` past
`CATCH_UP_TIMEOUT_S`). `quit` ends it.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Final

import trio

from jepsen_like.harness.client import NodeClient
from jepsen_like.harness.history import History
from jepsen_like.harness.run import _perform
from jepsen_like.harness.workload import RegisterWorkload, Worker
from kvsvr.client_routing import parse_address
from kvsvr.errors import KvsvrError
from kvsvr.local import node_status, not_ready_because

CLIENTS_PER_NODE: Final = 3
PROGRESS_INTERVAL_S: Final = 0.25
READY_TIMEOUT_S: Final = 120.0
CATCH_UP_TIMEOUT_S: Final = 120.0
FINAL_READ_ATTEMPTS_MAX: Final = 30
RETRY_PAUSE_S: Final = 0.05


class _Run:
    def __init__(self, nodes: dict[str, tuple[str, int]], secret: bytes, history_path: str):
        self.nodes = nodes
        self.secret = secret
        self.history = History(history_path)
        self.workload = RegisterWorkload(key_count=4, rng=random.Random(1))
        self.ok = dict.fromkeys(nodes, 0)
        self.processes = iter(range(1_000_000))

    def client(self, node: str, nursery: trio.Nursery) -> NodeClient:
        return NodeClient(node, self.nodes[node], self.secret, nursery)

    async def wait_ready(self) -> None:
        with trio.fail_after(READY_TIMEOUT_S):
            for node, (host, port) in self.nodes.items():
                while True:
                    try:
                        status = await node_status(f"{host}:{port}", node, self.secret.decode())
                        if not_ready_because(status, self.nodes) is None:
                            break
                    except (KvsvrError, trio.TooSlowError, OSError):
                        pass
                    await trio.sleep(0.1)

    async def client_loop(self, node: str, thread: int, rng: random.Random) -> None:
        worker = Worker(thread=thread, process=next(self.processes), node=node)
        async with trio.open_nursery() as nursery:
            client = self.client(node, nursery)
            try:
                while True:
                    op = self.workload.next_op(worker, rng)
                    completion = await _perform(self.history, worker, op, self.workload, client)
                    if completion.type == "ok":
                        self.ok[node] += 1
                    elif completion.type == "info":
                        worker.process = next(self.processes)
                    if not completion.sent:
                        await trio.sleep(RETRY_PAUSE_S)
            finally:
                await client.aclose()

    async def final_reads(self) -> None:
        nodes = list(self.nodes)
        for position, key in enumerate(self.workload.used_keys()):
            for attempt in range(FINAL_READ_ATTEMPTS_MAX):
                node = nodes[(position + attempt) % len(nodes)]
                worker = Worker(thread=-1, process=next(self.processes), node=node)
                async with trio.open_nursery() as nursery:
                    client = self.client(node, nursery)
                    try:
                        op = self.workload.final_read(key)
                        completion = await _perform(self.history, worker, op, self.workload, client)
                    finally:
                        await client.aclose()
                if completion.type == "ok":
                    break

    async def caught_up(self, node: str) -> list[str]:
        """Keys whose version on `node`'s replica is below a strong read's."""
        behind: list[str] = []
        async with trio.open_nursery() as nursery:
            local = self.client(node, nursery)
            strong = self.client(next(n for n in self.nodes if n != node), nursery)
            try:
                for key in self.workload.used_keys():
                    _, chosen = await strong.get(key, "strong")
                    _, held = await local.get(key, "local")
                    if held < chosen:
                        behind.append(key)
            finally:
                await local.aclose()
                await strong.aclose()
        return behind


def say(line: str) -> None:
    print(line, flush=True)


async def main(nodes: dict[str, tuple[str, int]], secret: bytes, history_path: str) -> None:
    run = _Run(nodes, secret, history_path)
    await run.wait_ready()
    say("ready")
    receive_line = trio.wrap_file(sys.stdin).readline
    async with trio.open_nursery() as workload_nursery:
        rng = random.Random(7)
        for node in nodes:
            for thread in range(CLIENTS_PER_NODE):
                seed = rng.random()
                workload_nursery.start_soon(run.client_loop, node, thread, random.Random(seed))

        async def report() -> None:
            while True:
                say("ok " + " ".join(str(run.ok[node]) for node in nodes))
                await trio.sleep(PROGRESS_INTERVAL_S)

        workload_nursery.start_soon(report)
        while (await receive_line()).strip() != "stop":
            pass
        workload_nursery.cancel_scope.cancel()
    await run.final_reads()
    run.history.close()
    say("stopped")
    while (line := (await receive_line()).strip()) not in ("quit", ""):
        command, _, node = line.partition(" ")
        if command != "catchup":
            continue
        behind = ["(not asked yet)"]
        with trio.move_on_after(CATCH_UP_TIMEOUT_S):
            while True:  # asks the node again: nothing here could signal it
                behind = await run.caught_up(node)
                if not behind:
                    break
                await trio.sleep(0.2)
        say("caught-up" if not behind else "not-caught-up " + " ".join(behind))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kvsvr_tests.netns_client")
    parser.add_argument("--node", action="append", required=True, metavar="ID=HOST:PORT")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--history", required=True)
    args = parser.parse_args()
    node_addresses = {
        node_id: parse_address(address)
        for node_id, _, address in (each.partition("=") for each in args.node)
    }
    trio.run(main, node_addresses, args.secret.encode(), args.history)
