"""The `kvsvr` command line: its parser, every command's options and help,
and the entry point that runs a command and returns its exit code."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable
from typing import TypeAlias, cast

from kvsvr.cli.backup import add_backup_commands
from kvsvr.cli.common import (
    DEFAULT_TIMEOUT_S,
    EXIT_CODES_HELP,
    EXIT_USAGE,
    UsageError,
    add_tls_flags,
    addresses,
    complain,
    int_in,
    partition_count,
    seconds,
)
from kvsvr.cli.keys import cas, delete, get, put, run_client, scan
from kvsvr.cli.node import run_node_command
from kvsvr.cli.status import RECOVER_WAIT_S, check_recover, recover_cluster, show_status
from kvsvr.cli.top import INTERVAL_S_DEFAULT, INTERVAL_S_MAX, INTERVAL_S_MIN, show_top
from kvsvr.cli.up import DEFAULT_BASE_PORT, DEFAULT_UP_DIR, UP_NODES_MAX, run_up
from kvsvr.cli.watch import watch
from kvsvr.client import CONSISTENCIES, DEFAULT_TABLE, SCAN_LIMIT_MAX
from kvsvr.logs import LOG_FORMATS, TEXT
from kvsvr.protocol.lifecycle import INITIAL_STATES

# --- the parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsvr",
        description="kvsvr: a distributed, strongly consistent key-value store.",
        epilog=EXIT_CODES_HELP + "\nRun `kvsvr COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvsvr {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_up(commands)
    _add_node(commands)
    client_options = _client_options()
    _add_get(commands, client_options)
    _add_put(commands, client_options)
    _add_cas(commands, client_options)
    _add_del(commands, client_options)
    _add_scan(commands, client_options)
    _add_watch(commands, client_options)
    _add_status(commands, client_options)
    _add_recover(commands, client_options)
    add_backup_commands(commands, client_options, _command)
    _add_top(commands, client_options)
    return parser


def _version() -> str:
    # From the package metadata, not `kvsvr.__version__`, so the command works even
    # where `kvsvr` resolves as a namespace package (a stale editable install).
    try:
        return importlib.metadata.version("kvsvr")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(
    commands: _Commands,
    name: str,
    summary: str,
    handler: Callable[[argparse.Namespace], int],
    parents: list[argparse.ArgumentParser] | None = None,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=summary,
        description=description or summary,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=parents or [],
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_up(commands: _Commands) -> None:
    parser = _command(
        commands,
        "up",
        "run a local cluster in the foreground (Ctrl-C stops it)",
        run_up,
        description=(
            "Run a cluster of N node processes on 127.0.0.1 in the foreground; node i listens\n"
            "on BASE_PORT+i. DIR holds cluster.toml (reused when it describes the same nodes\n"
            "and ports, so data persists across restarts), each node's data in DIR/nI/, its\n"
            "log in DIR/nI.log and its pid in DIR/nI.pid. Ctrl-C or SIGTERM stops every node\n"
            "(SIGTERM, then SIGKILL after a timeout) and exits 0. A node that dies on its own\n"
            "is reported and the others keep running; once all have died, up exits with 5."
        ),
    )
    parser.add_argument(
        "--nodes", type=int_in(1, UP_NODES_MAX), default=3, help="node count (default 3)"
    )
    parser.add_argument(
        "--dir", default=DEFAULT_UP_DIR, help=f"data, config and logs (default ./{DEFAULT_UP_DIR})"
    )
    parser.add_argument(
        "--base-port",
        type=int_in(1, 65535 - UP_NODES_MAX),
        default=DEFAULT_BASE_PORT,
        help=f"node i listens on BASE_PORT+i (default {DEFAULT_BASE_PORT})",
    )
    parser.add_argument("--secret", help="cluster secret (default: none, an open cluster)")
    parser.add_argument(
        "--partitions",
        type=partition_count,
        help="partition count, a power of two (default 64); fixed once the cluster has data",
    )
    parser.add_argument(
        "--apps",
        action="store_true",
        help="also declare the tables of the example apps (chat, moments), adding them "
        "to a reused cluster.toml that lacks them",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="run TLS on every link: a new cluster gets a local CA and node and client "
        "certificates in DIR/tls, and clients use them through --config",
    )
    _add_log_format(parser)


def _add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=TEXT,
        help="node logs as text lines (default) or one JSON object per line "
        "(time, level, node, event, fields)",
    )


def _add_node(commands: _Commands) -> None:
    parser = _command(commands, "node", "run one node (what `up` starts)", run_node_command)
    parser.add_argument("--config", required=True, help="the cluster's config file (TOML)")
    parser.add_argument("--id", required=True, help="this node's id in the config")
    parser.add_argument(
        "--initial-cluster-state",
        choices=INITIAL_STATES,
        help="with an empty data directory: 'new' founds the cluster (unless a peer knows "
        "this node as a member), 'existing' replaces a member and rebuilds from its peers "
        "before voting (default: the config's initial_state, else new)",
    )
    _add_log_format(parser)
    # For the fault harness only: the node's monotonic clock runs at a rate a
    # test may set (`kvsvr.clock.TEST_CLOCK_RATE_METHOD`), to break the
    # clock-rate assumption read leases make.
    parser.add_argument("--test-clock-control", action="store_true", help=argparse.SUPPRESS)


def _client_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    target = options.add_mutually_exclusive_group()
    target.add_argument(
        "--cluster",
        type=addresses,
        metavar="HOST:PORT[,...]",
        help="node addresses (default: $KVSVR_CLUSTER)",
    )
    target.add_argument("--config", help="a cluster config file: its nodes and secret")
    options.add_argument("--secret", help="cluster secret (default: $KVSVR_SECRET, or --config's)")
    add_tls_flags(options)
    options.add_argument(
        "--table", default=DEFAULT_TABLE, help=f"table name (default {DEFAULT_TABLE!r})"
    )
    options.add_argument(
        "--timeout-s",
        type=seconds(allow_zero=False),
        default=DEFAULT_TIMEOUT_S,
        help=f"time limit of each operation, seconds (default {DEFAULT_TIMEOUT_S})",
    )
    return options


def _add_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="KEY", help="the partition key")
    parser.add_argument(
        "--sort-key", metavar="SK", help="a sort key: the row (KEY, SK) instead of KEY"
    )


def _add_get(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands, "get", "print a key's value and version", run_client, parents=[options]
    )
    parser.set_defaults(operation=get)
    _add_key(parser)
    parser.add_argument(
        "--consistency",
        choices=CONSISTENCIES,
        default="strong",
        help="strong (linearizable, default), or stale/local (one replica, no quorum)",
    )
    parser.add_argument(
        "--max-age-s", type=seconds(allow_zero=True), help="stale reads: the oldest acceptable"
    )
    parser.add_argument(
        "--raw", action="store_true", help="write only the value's bytes, without a newline"
    )


def _add_put(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(commands, "put", "write a value", run_client, parents=[options])
    parser.set_defaults(operation=put)
    _add_key(parser)
    parser.add_argument("value", metavar="VALUE", help="the value ('-': read standard input)")
    condition = parser.add_mutually_exclusive_group()
    condition.add_argument(
        "--if-version",
        type=int_in(0, 2**63 - 1),
        metavar="V",
        help="write only if the key is at version V",
    )
    condition.add_argument(
        "--if-absent", action="store_true", help="write only if the key holds no value"
    )


def _add_cas(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "cas",
        "compare-and-set: write only if the key is at a given version",
        run_client,
        parents=[options],
    )
    parser.set_defaults(operation=cas)
    _add_key(parser)
    parser.add_argument("value", metavar="VALUE", help="the value ('-': read standard input)")
    parser.add_argument(
        "--if-version",
        type=int_in(0, 2**63 - 1),
        metavar="V",
        required=True,
        help="the version the key must be at",
    )


def _add_del(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(commands, "del", "delete a key", run_client, parents=[options])
    parser.set_defaults(operation=delete)
    _add_key(parser)
    parser.add_argument(
        "--if-version",
        type=int_in(0, 2**63 - 1),
        metavar="V",
        help="delete only if the key is at version V",
    )


def _add_watch(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands, "watch", "print a key's changes as they happen", run_client, parents=[options]
    )
    parser.set_defaults(operation=watch)
    _add_key(parser)
    parser.add_argument(
        "--partition", action="store_true", help="every row of the partition key KEY"
    )
    parser.add_argument(
        "--start-version",
        type=int_in(0, 2**63 - 1),
        metavar="V",
        help="the changes after version V (default: from the current version)",
    )
    parser.add_argument("--count", type=int_in(1, 2**31), metavar="N", help="stop after N changes")


def _add_scan(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "scan",
        "list the rows of one partition key, in sort-key order",
        run_client,
        parents=[options],
        description=(
            "List the rows of one partition key with sort keys in [START, END), one per\n"
            "line: SORT_KEY <tab> VALUE <tab> (version N)."
        ),
    )
    parser.set_defaults(operation=scan)
    parser.add_argument("partition_key", metavar="PARTITION_KEY")
    parser.add_argument("--start", help="first sort key (inclusive)")
    parser.add_argument("--end", help="last sort key (exclusive)")
    parser.add_argument(
        "--limit",
        type=int_in(1, SCAN_LIMIT_MAX),
        default=1000,
        help="at most this many rows (default 1000)",
    )


def _add_status(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "status",
        "every node's health, partitions held and row cache figures "
        "(or one node's full status with --node)",
        run_client,
        parents=[options],
    )
    parser.set_defaults(operation=show_status)
    parser.add_argument(
        "--node",
        metavar="ID|HOST:PORT",
        help="show this node's full status (default: a line per node)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the statuses as JSON (exit code as without)"
    )


def _add_recover(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "recover",
        "bring back a cluster where a majority of some partition's replicas lost their data",
        run_client,
        parents=[options],
        description=(
            "Nodes whose data directories were lost rebuild from their peers by themselves,\n"
            "but when too few replicas of a partition kept their data they wait, saying\n"
            "'needs operator'. This tells each such node to rebuild from the replicas\n"
            "that kept their data, then waits for the cluster to be ready and prints\n"
            "what may have been lost: writes acknowledged only by replicas that lost\n"
            "their data. It needs --accept-data-loss."
        ),
    )
    parser.set_defaults(operation=recover_cluster, validate=check_recover)
    parser.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="required: acknowledged writes held only by the lost replicas are gone",
    )
    parser.add_argument(
        "--wait-s",
        type=seconds(allow_zero=False),
        default=RECOVER_WAIT_S,
        help=f"how long to wait for the recovery and readiness (default {RECOVER_WAIT_S:g})",
    )


def _add_top(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "top",
        "a live view of every node's metrics (nodes need a metrics_address)",
        run_client,
        parents=[options],
        description=(
            "Scrape every node's /metrics endpoint (the metrics_address its status names)\n"
            "twice, INTERVAL apart, and show per node: requests per second, get and put\n"
            "latency p50/p99, the fast path's share of writes, quorum rounds per second,\n"
            "fsync p99 and batch size, hints pending, anti-entropy lag, rebuild progress,\n"
            "cache size and hit ratio, read leases held and leased reads per second, RSS\n"
            "and CPU. Redrawn until Ctrl-C, or once with --once."
        ),
    )
    parser.set_defaults(operation=show_top)
    parser.add_argument(
        "--once", action="store_true", help="print one frame and exit (4 if a node is not ready)"
    )
    parser.add_argument(
        "--interval-s",
        type=_interval,
        default=INTERVAL_S_DEFAULT,
        help=f"refresh interval and the span of the rates shown (default {INTERVAL_S_DEFAULT:g})",
    )


def _interval(text: str) -> float:
    value = seconds(allow_zero=False)(text)
    if not INTERVAL_S_MIN <= value <= INTERVAL_S_MAX:
        raise argparse.ArgumentTypeError(
            f"must be between {INTERVAL_S_MIN:g} and {INTERVAL_S_MAX:g} seconds"
        )
    return value


# --- entry point --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the `kvsvr` command; returns its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version, or argparse's usage error
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    handler = cast(Callable[[argparse.Namespace], int], args.handler)
    try:
        return handler(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        complain(f"{args.command}: {exc}")
        return EXIT_USAGE
