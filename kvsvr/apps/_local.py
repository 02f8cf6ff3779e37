"""A throwaway local cluster with the applications' tables, for the demos and
`bench.apps`: 3 `kvsvr node` processes on free ports of 127.0.0.1, data in a
temporary directory, ready (every node votes and sees its peers: `wait_ready`)
when yielded, stopped (SIGTERM, then SIGKILL) and removed on exit.

    with local_app_cluster() as (addresses, secret):
        ...
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import trio

from kvsvr.apps._tables import app_tables, tables_toml
from kvsvr.client import Client, SyncClient
from kvsvr.config import TableConfig, local_cluster, render_config
from kvsvr.errors import KvsvrError

NODE_START_TIMEOUT_S: Final = 60.0  # a loaded 2-core machine can take many seconds
# From the ports answering to every node voting: a fresh cluster decides at
# once, but a loaded machine's processes can be slow to exchange hellos.
CLUSTER_READY_TIMEOUT_S: Final = 60.0
STATUS_TIMEOUT_S: Final = 5.0
NODE_STOP_TIMEOUT_S: Final = 15.0
PORT_LOW: Final = 20000  # below the kernel's ephemeral range, as the test clusters do
PORT_HIGH: Final = 30000
PORT_PICK_ATTEMPTS_MAX: Final = 1000
LOCAL_SECRET: Final = "apps-demo-secret"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_base_port(count: int) -> int:
    rng = random.Random()
    for _ in range(PORT_PICK_ATTEMPTS_MAX):
        base = rng.randrange(PORT_LOW, PORT_HIGH - count)
        if all(_port_is_free(base + offset) for offset in range(1, count + 1)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in [{PORT_LOW}, {PORT_HIGH})")


class ClusterStartError(RuntimeError):
    """The local cluster did not become ready; `.logs` holds the nodes' log tails."""

    def __init__(self, message: str, logs: str) -> None:
        super().__init__(message)
        self.logs = logs

    def __str__(self) -> str:
        return f"{self.args[0]}\n{self.logs}"


@contextmanager
def local_app_cluster(
    nodes: int = 3, *, secret: str = LOCAL_SECRET
) -> Iterator[tuple[list[str], str]]:
    """Start a local cluster with the `default` table and every application
    table; yield (addresses, secret); stop it and delete its data on exit."""
    directory = Path(tempfile.mkdtemp(prefix="kvsvr-apps-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        config = local_cluster(
            nodes,
            _free_base_port(nodes),
            secret=secret,
            partitions=16,
            tables=(TableConfig("default"), *app_tables()),
        )
        config_path = directory / "cluster.toml"
        config_path.write_text(
            render_config(config, data_dir=str(directory / "data")), encoding="utf-8"
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for node in config.nodes:
            with (directory / f"{node.id}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "kvsvr",
                            "node",
                            "--config",
                            str(config_path),
                            "--id",
                            node.id,
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        for node, process in zip(config.nodes, processes, strict=True):
            while not _port_answers(node.port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (directory / f"{node.id}.log").read_text(errors="replace")
                    raise ClusterStartError(f"node {node.id} did not start", log_text[-2000:])
                time.sleep(0.05)
        addresses = [node.address for node in config.nodes]
        with SyncClient(addresses, secret=secret, timeout_s=STATUS_TIMEOUT_S) as client:
            try:
                client.wait_ready(timeout_s=CLUSTER_READY_TIMEOUT_S)
            except KvsvrError as error:
                tails = "\n".join(
                    (directory / f"{n.id}.log").read_text(errors="replace")[-1000:]
                    for n in config.nodes
                )
                raise ClusterStartError(str(error), tails) from None
        yield addresses, secret
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def demo_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a scripted session and print a transcript")
    demo.add_argument(
        "--cluster",
        help="HOST:PORT,... of a running cluster that declares the app tables "
        "(default: start a local 3-node cluster and stop it afterwards)",
    )
    demo.add_argument("--secret", help="the cluster secret (with --cluster)")
    demo.add_argument("--timeout-s", type=float, default=10.0, help="per-operation timeout")
    return parser


@contextmanager
def demo_cluster(args: argparse.Namespace) -> Iterator[tuple[list[str], str | None]]:
    """The cluster a demo runs against: `--cluster`, or a local one."""
    if args.cluster:
        yield [a.strip() for a in args.cluster.split(",") if a.strip()], args.secret
        return
    print("starting a local 3-node cluster with the app tables...", flush=True)
    with local_app_cluster() as (addresses, secret):
        print(f"cluster up: {', '.join(addresses)}", flush=True)
        yield addresses, secret
    print("local cluster stopped", flush=True)


async def missing_tables(client: Client, tables: tuple[TableConfig, ...]) -> list[str]:
    """The names of `tables` the cluster does not declare."""
    partition_map = await client.partition_map()
    return [table.name for table in tables if partition_map.table(table.name) is None]


def missing_tables_message(missing: list[str]) -> str:
    declarations = tuple(table for table in app_tables() if table.name in missing)
    return (
        f"the cluster does not declare the tables {', '.join(missing)}; add these to its "
        f"config (every node) and restart it:\n\n{tables_toml(declarations)}"
    )


Demo = Callable[[list[str], str | None, float], Awaitable[int]]

# Exit codes of a demo that could not run, as the `kvsvr` command's.
EXIT_UNAVAILABLE: Final = 4
EXIT_ERROR: Final = 5


def run_demo(prog: str, args: argparse.Namespace, demo: Demo) -> int:
    """Run a demo against `--cluster` or a local cluster (ready before the
    demo's first operation). A cluster that cannot be reached or started is
    one line on stderr and a non-zero exit, not a traceback."""
    try:
        with demo_cluster(args) as (addresses, secret):
            return trio.run(demo, addresses, secret, args.timeout_s)
    except ClusterStartError as error:
        _fail(prog, f"the local cluster did not start: {error.args[0]}")
        return EXIT_ERROR
    except Exception as error:
        errors = _kvsvr_errors(error)
        if errors is None:
            raise
        first = errors[0]
        _fail(prog, f"cannot reach the cluster: {type(first).__name__}: {first}")
        return EXIT_UNAVAILABLE


def _kvsvr_errors(error: BaseException) -> list[KvsvrError] | None:
    """The KvsvrErrors that `error` is (or is a group of only), else None."""
    if isinstance(error, KvsvrError):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        found: list[KvsvrError] = []
        for inner in error.exceptions:
            errors = _kvsvr_errors(inner)
            if errors is None:
                return None
            found += errors
        return found
    return None


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr, flush=True)
