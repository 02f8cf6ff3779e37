"""A throwaway local cluster with the applications' tables, for the demos and
`bench.apps`: `kvsvr.local.temporary_cluster` with 3 nodes, 16 partitions,
the `default` table and every application table, ready when yielded.

    with local_app_cluster() as (addresses, secret):
        ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Final

import trio

from kvsvr.apps._tables import app_tables, tables_toml
from kvsvr.client import Client
from kvsvr.config import TableConfig
from kvsvr.errors import KvsvrError
from kvsvr.local import LocalClusterError, local_config, temporary_cluster

LOCAL_SECRET: Final = "apps-demo-secret"


@contextmanager
def local_app_cluster(
    nodes: int = 3, *, secret: str = LOCAL_SECRET
) -> Iterator[tuple[list[str], str]]:
    """Start a local cluster with the `default` table and every application
    table; yield (addresses, secret); stop it and delete its data on exit."""
    tables = (TableConfig("default"), *app_tables())
    config = local_config(nodes, secret=secret, partitions=16, tables=tables)
    with temporary_cluster(config, prefix="kvsvr-apps-") as cluster:
        yield cluster.addresses, secret


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
    except LocalClusterError as error:
        _fail(prog, f"the local cluster did not start: {str(error).splitlines()[0]}")
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
