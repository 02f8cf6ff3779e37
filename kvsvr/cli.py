"""The `kvsvr` command: run a local cluster, run a node, read and write keys.

    kvsvr up [--nodes 3] [--dir ./kvsvr-data] [--base-port 7100] [--secret S] [--partitions P]
    kvsvr node --config FILE --id ID [--initial-cluster-state new|existing]
    kvsvr get    KEY [--sort-key SK] [--consistency strong|stale|local] [--max-age-s S] [--raw]
    kvsvr put    KEY VALUE [--sort-key SK] [--if-version V | --if-absent]
    kvsvr cas    KEY VALUE --if-version V [--sort-key SK]
    kvsvr del    KEY [--sort-key SK] [--if-version V]
    kvsvr scan   PARTITION_KEY [--start S] [--end E] [--limit N]
    kvsvr status [--node ID|HOST:PORT] [--json]
    kvsvr recover --accept-data-loss

The key commands say which cluster with `--cluster HOST:PORT[,HOST:PORT...]`
or `--config FILE` (its nodes and secret), else the `KVSVR_CLUSTER`
environment variable. The secret comes from `--secret`, else `KVSVR_SECRET`,
else the config file. Every one also takes `--table` and `--timeout-s`.
KEY is a partition key; add `--sort-key` for a row under it. A VALUE of `-`
is read from standard input. Keys and values are the exact bytes of the
arguments.

`kvsvr up` keeps everything in DIR: `cluster.toml` (node i listens on
127.0.0.1:base-port+i; its `data_dir = "."` puts node i's LMDB in `DIR/ni/`),
`ni.log` (node i's output) and `ni.pid`. Started again with the same DIR,
node count and ports, it reuses `cluster.toml`, so the data persists. It
runs in the foreground; Ctrl-C or SIGTERM stops every node (SIGTERM, then
SIGKILL after `NODE_STOP_TIMEOUT_S`). A node that dies on its own is reported
and the others keep running (a cluster is meant to survive that); once every
node has died, `up` exits with 5.

Exit codes:
    0  done
    1  not found (get)
    2  usage error
    3  conflict: a condition (--if-version, --if-absent) did not hold; nothing written
    4  unavailable or timed out: the outcome of a write is unknown
    5  any other error (authentication failed, invalid request, bad config, ...)

`kvsvr node` exits with 5 when its data directory or its peers belong to
another cluster (or its directory to another node), and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, TypeAlias, cast

import trio

from kvsvr.apps import app_tables
from kvsvr.client import (
    CONSISTENCIES,
    DEFAULT_TABLE,
    SCAN_LIMIT_MAX,
    Client,
    SyncClient,
    connect,
    format_address,
    parse_address,
)
from kvsvr.config import (
    ClusterConfig,
    ConfigError,
    TableConfig,
    load_config,
    local_cluster,
    new_cluster_id,
    render_config,
)
from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    CorruptRow,
    InvalidRequest,
    KvsvrError,
    Timeout,
    Unavailable,
)
from kvsvr.keys import UserKey
from kvsvr.protocol.lifecycle import INITIAL_STATES
from kvsvr.protocol.placement import PARTITIONS_MAX

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFLICT: Final = 3
EXIT_UNAVAILABLE: Final = 4
EXIT_ERROR: Final = 5

EXIT_CODES_HELP: Final = """\
exit codes:
  0  done
  1  not found (get)
  2  usage error
  3  conflict: a condition (--if-version, --if-absent) did not hold; nothing written
  4  unavailable or timed out: the outcome of a write is unknown
  5  any other error (authentication failed, invalid request, bad config, ...)
"""

# --- limits for `kvsvr up` ----------------------------------------------------------

# `up` runs every node on this machine; past a handful they only compete for
# its cores and disk. Real clusters are started node by node with `kvsvr node`.
UP_NODES_MAX: Final = 16

# A node's first start imports, opens LMDB and binds its port; on a loaded CI
# machine that can take seconds, so the wait is generous.
NODE_START_TIMEOUT_S: Final = 60.0

# Time the nodes get to finish after SIGTERM (flush, close LMDB) before SIGKILL.
NODE_STOP_TIMEOUT_S: Final = 10.0

# One probe of a node's port while waiting for it to listen.
PORT_PROBE_TIMEOUT_S: Final = 0.5

# How often `up` looks at its nodes: the delay before it notices a dead node or
# a stop request.
SUPERVISE_POLL_S: Final = 0.2

# Lines of a dead node's log shown, so the reason is on screen.
LOG_TAIL_LINES: Final = 10

CONFIG_FILE_NAME: Final = "cluster.toml"
DEFAULT_UP_DIR: Final = "kvsvr-data"
DEFAULT_BASE_PORT: Final = 7100
DEFAULT_TIMEOUT_S: Final = 5.0
# `kvsvr recover` waits this long for the nodes to rebuild and the cluster to be ready.
RECOVER_WAIT_S: Final = 300.0


class UsageError(Exception):
    """A command line that parses but does not make sense; exit code 2."""


# --- argument types -----------------------------------------------------------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {text!r}"
            ) from None
        if not (0 <= value if allow_zero else 0 < value) or value == float("inf"):
            bound = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


def _partition_count(text: str) -> int:
    value = _int_in(1, PARTITIONS_MAX)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def _addresses(text: str) -> list[str]:
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("expected HOST:PORT[,HOST:PORT...]")
    for address in addresses:
        try:
            parse_address(address)
        except InvalidRequest as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return addresses


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
    _add_status(commands, client_options)
    _add_recover(commands, client_options)
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
        _cmd_up,
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
        "--nodes", type=_int_in(1, UP_NODES_MAX), default=3, help="node count (default 3)"
    )
    parser.add_argument(
        "--dir", default=DEFAULT_UP_DIR, help=f"data, config and logs (default ./{DEFAULT_UP_DIR})"
    )
    parser.add_argument(
        "--base-port",
        type=_int_in(1, 65535 - UP_NODES_MAX),
        default=DEFAULT_BASE_PORT,
        help=f"node i listens on BASE_PORT+i (default {DEFAULT_BASE_PORT})",
    )
    parser.add_argument("--secret", help="cluster secret (default: none, an open cluster)")
    parser.add_argument(
        "--partitions",
        type=_partition_count,
        help="partition count, a power of two (default 64); fixed once the cluster has data",
    )
    parser.add_argument(
        "--apps",
        action="store_true",
        help="also declare the tables of the example apps (chat, moments), adding them "
        "to a reused cluster.toml that lacks them",
    )


def _add_node(commands: _Commands) -> None:
    parser = _command(commands, "node", "run one node (what `up` starts)", _cmd_node)
    parser.add_argument("--config", required=True, help="the cluster's config file (TOML)")
    parser.add_argument("--id", required=True, help="this node's id in the config")
    parser.add_argument(
        "--initial-cluster-state",
        choices=INITIAL_STATES,
        help="with an empty data directory: 'new' founds the cluster (unless a peer knows "
        "this node as a member), 'existing' replaces a member and rebuilds from its peers "
        "before voting (default: the config's initial_state, else new)",
    )


def _client_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    target = options.add_mutually_exclusive_group()
    target.add_argument(
        "--cluster",
        type=_addresses,
        metavar="HOST:PORT[,...]",
        help="node addresses (default: $KVSVR_CLUSTER)",
    )
    target.add_argument("--config", help="a cluster config file: its nodes and secret")
    options.add_argument("--secret", help="cluster secret (default: $KVSVR_SECRET, or --config's)")
    options.add_argument(
        "--table", default=DEFAULT_TABLE, help=f"table name (default {DEFAULT_TABLE!r})"
    )
    options.add_argument(
        "--timeout-s",
        type=_seconds(allow_zero=False),
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
        commands, "get", "print a key's value and version", _cmd_client, parents=[options]
    )
    parser.set_defaults(operation=_get)
    _add_key(parser)
    parser.add_argument(
        "--consistency",
        choices=CONSISTENCIES,
        default="strong",
        help="strong (linearizable, default), or stale/local (one replica, no quorum)",
    )
    parser.add_argument(
        "--max-age-s", type=_seconds(allow_zero=True), help="stale reads: the oldest acceptable"
    )
    parser.add_argument(
        "--raw", action="store_true", help="write only the value's bytes, without a newline"
    )


def _add_put(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(commands, "put", "write a value", _cmd_client, parents=[options])
    parser.set_defaults(operation=_put)
    _add_key(parser)
    parser.add_argument("value", metavar="VALUE", help="the value ('-': read standard input)")
    condition = parser.add_mutually_exclusive_group()
    condition.add_argument(
        "--if-version",
        type=_int_in(0, 2**63 - 1),
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
        _cmd_client,
        parents=[options],
    )
    parser.set_defaults(operation=_cas)
    _add_key(parser)
    parser.add_argument("value", metavar="VALUE", help="the value ('-': read standard input)")
    parser.add_argument(
        "--if-version",
        type=_int_in(0, 2**63 - 1),
        metavar="V",
        required=True,
        help="the version the key must be at",
    )


def _add_del(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(commands, "del", "delete a key", _cmd_client, parents=[options])
    parser.set_defaults(operation=_delete)
    _add_key(parser)
    parser.add_argument(
        "--if-version",
        type=_int_in(0, 2**63 - 1),
        metavar="V",
        help="delete only if the key is at version V",
    )


def _add_scan(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "scan",
        "list the rows of one partition key, in sort-key order",
        _cmd_client,
        parents=[options],
        description=(
            "List the rows of one partition key with sort keys in [START, END), one per\n"
            "line: SORT_KEY <tab> VALUE <tab> (version N)."
        ),
    )
    parser.set_defaults(operation=_scan)
    parser.add_argument("partition_key", metavar="PARTITION_KEY")
    parser.add_argument("--start", help="first sort key (inclusive)")
    parser.add_argument("--end", help="last sort key (exclusive)")
    parser.add_argument(
        "--limit",
        type=_int_in(1, SCAN_LIMIT_MAX),
        default=1000,
        help="at most this many rows (default 1000)",
    )


def _add_status(commands: _Commands, options: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "status",
        "every node's health, partitions held and row cache figures "
        "(or one node's full status with --node)",
        _cmd_client,
        parents=[options],
    )
    parser.set_defaults(operation=_status)
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
        _cmd_client,
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
    parser.set_defaults(operation=_recover, validate=_check_recover)
    parser.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="required: acknowledged writes held only by the lost replicas are gone",
    )
    parser.add_argument(
        "--wait-s",
        type=_seconds(allow_zero=False),
        default=RECOVER_WAIT_S,
        help=f"how long to wait for the recovery and readiness (default {RECOVER_WAIT_S:g})",
    )


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
        _complain(f"{args.command}: {exc}")
        return EXIT_USAGE


def _complain(message: str) -> None:
    """One line on stderr."""
    print(f"kvsvr: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _say(message: str = "") -> None:
    print(message, flush=True)


# --- key commands -------------------------------------------------------------------

_ERROR_NAMES: Final[tuple[tuple[type[KvsvrError], str, int], ...]] = (
    (Conflict, "conflict", EXIT_CONFLICT),
    (Timeout, "timed out", EXIT_UNAVAILABLE),
    (Unavailable, "unavailable", EXIT_UNAVAILABLE),
    (AuthenticationFailed, "authentication failed", EXIT_ERROR),
    (InvalidRequest, "invalid request", EXIT_ERROR),
    (CorruptRow, "corrupt row", EXIT_ERROR),
    (KvsvrError, "error", EXIT_ERROR),
)


def exit_code_for(error: KvsvrError) -> int:
    return next(code for kind, _, code in _ERROR_NAMES if isinstance(error, kind))


def _error_name(error: KvsvrError) -> str:
    return next(name for kind, name, _ in _ERROR_NAMES if isinstance(error, kind))


Operation = Callable[[Client, argparse.Namespace], Awaitable[int]]


def _cmd_client(args: argparse.Namespace) -> int:
    validate = getattr(args, "validate", None)
    if validate is not None:
        validate(args)  # a UsageError before anything is sent
    try:
        addresses, secret = _cluster_target(args)
        value_from_stdin = getattr(args, "value", None) == "-"
        if value_from_stdin:
            args.value_bytes = sys.stdin.buffer.read()
        elif getattr(args, "value", None) is not None:
            args.value_bytes = os.fsencode(args.value)
        operation = cast(Operation, args.operation)
        return trio.run(_run_operation, operation, args, addresses, secret)
    except KvsvrError as exc:
        _complain(f"{_error_name(exc)}: {exc}")
        return exit_code_for(exc)
    except ConfigError as exc:
        _complain(f"bad config: {exc}")
        return EXIT_ERROR


def _cluster_target(args: argparse.Namespace) -> tuple[list[str], str | bytes | None]:
    """The addresses to try and the secret, from the options and environment."""
    secret: str | bytes | None = args.secret
    if secret is None:
        secret = os.environ.get("KVSVR_SECRET") or None
    if args.cluster:
        return cast(list[str], args.cluster), secret
    if args.config:
        config = load_config(args.config)
        return [node.address for node in config.nodes], secret or config.secret
    from_environment = os.environ.get("KVSVR_CLUSTER", "")
    if from_environment.strip():
        try:
            return _addresses(from_environment), secret
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"KVSVR_CLUSTER: {exc}") from None
    raise UsageError("say which cluster: --cluster HOST:PORT[,...] or --config FILE")


async def _run_operation(
    operation: Operation,
    args: argparse.Namespace,
    addresses: list[str],
    secret: str | bytes | None,
) -> int:
    async with connect(addresses, secret=secret, timeout_s=args.timeout_s) as client:
        return await operation(client, args)


def _user_key(args: argparse.Namespace) -> UserKey:
    key = os.fsencode(args.key)
    if args.sort_key is None:
        return key
    return key, os.fsencode(args.sort_key)


def _show(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


async def _get(client: Client, args: argparse.Namespace) -> int:
    item = await client.get(
        _user_key(args),
        table=args.table,
        consistency=args.consistency,
        max_age_s=args.max_age_s,
    )
    if item is None:
        shown = args.key if args.sort_key is None else f"{args.key} / {args.sort_key}"
        _complain(f"not found: {shown}")
        return EXIT_NOT_FOUND
    if args.raw:
        sys.stdout.buffer.write(item.value)
        sys.stdout.buffer.flush()
    else:
        _say(f"{_show(item.value)}  (version {item.version})")
    return EXIT_OK


async def _put(client: Client, args: argparse.Namespace) -> int:
    version = await client.put(
        _user_key(args),
        args.value_bytes,
        table=args.table,
        if_version=args.if_version,
        if_absent=args.if_absent,
    )
    _say(f"ok  (version {version})")
    return EXIT_OK


async def _cas(client: Client, args: argparse.Namespace) -> int:
    version = await client.cas(
        _user_key(args), args.value_bytes, if_version=args.if_version, table=args.table
    )
    _say(f"ok  (version {version})")
    return EXIT_OK


async def _delete(client: Client, args: argparse.Namespace) -> int:
    version = await client.delete(_user_key(args), table=args.table, if_version=args.if_version)
    _say(f"deleted  (version {version})")
    return EXIT_OK


async def _scan(client: Client, args: argparse.Namespace) -> int:
    items = await client.scan(
        os.fsencode(args.partition_key),
        table=args.table,
        start=None if args.start is None else os.fsencode(args.start),
        end=None if args.end is None else os.fsencode(args.end),
        limit=args.limit,
    )
    for item in items:
        assert item.key is not None
        _say(f"{_show(item.key)}\t{_show(item.value)}\t(version {item.version})")
    return EXIT_OK


async def _status(client: Client, args: argparse.Namespace) -> int:
    if args.node is not None:
        status = await client.status(args.node)
        if args.json:
            _say(json.dumps(status, indent=2, sort_keys=True, default=_json_default))
        else:
            for line in format_status(status):
                _say(line)
        return EXIT_OK
    statuses = await client.cluster_status()
    if args.json:
        _say(json.dumps(statuses, indent=2, sort_keys=True, default=_json_default))
    else:
        for line in format_cluster_status(statuses):
            _say(line)
        for line in format_operator_messages(statuses):
            _say(line)
        _say()
        for line in format_cache_status(statuses):
            _say(line)
        _say()
        for line in format_catch_up(statuses):
            _say(line)
    return EXIT_OK if all(s.get("health") == "ready" for s in statuses) else EXIT_UNAVAILABLE


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return _show(value)
    return str(value)


def _check_recover(args: argparse.Namespace) -> None:
    if not args.accept_data_loss:
        raise UsageError(
            "recovery may lose acknowledged writes; say --accept-data-loss to go ahead"
        )


async def _recover(client: Client, args: argparse.Namespace) -> int:
    statuses = await client.cluster_status()
    waiting = [s for s in statuses if s.get("health") == "needs_operator"]
    for line in format_operator_messages(statuses):
        _say(line)
    if not waiting:
        _say("no node needs an operator")
    answers: dict[str, Any] = {}

    async def recover(node: str) -> None:
        answers[node] = await client.recover(node, accept_data_loss=True, timeout_s=args.wait_s)

    async with trio.open_nursery() as nursery:
        for status in waiting:
            nursery.start_soon(recover, str(status.get("node")))
    for node, answer in sorted(answers.items()):
        loss = answer.get("loss") if isinstance(answer, dict) else None
        if isinstance(loss, dict):
            _say(f"{node}: recovered; {loss.get('message')}")
        else:
            _say(f"{node}: {answer.get('state') if isinstance(answer, dict) else answer}")
    await client.wait_ready(timeout_s=args.wait_s)
    _say("cluster ready")
    return EXIT_OK


def format_operator_messages(statuses: list[dict[str, Any]]) -> list[str]:
    """The 'needs operator' lines of the nodes that wait for one."""
    lines: list[str] = []
    for status in statuses:
        replication = status.get("replication")
        message = replication.get("needs_operator") if isinstance(replication, dict) else None
        if message:
            lines.append(
                f"{status.get('node', '?')}: {message} "
                "(kvsvr recover --accept-data-loss brings it back from the rest)"
            )
    return lines


def describe_health(status: dict[str, Any]) -> str:
    """A node's state in words, with a rebuild's progress."""
    health = str(status.get("health"))
    if health == "rebuilding":
        replication = status.get("replication")
        rebuild = replication.get("rebuild") if isinstance(replication, dict) else None
        if isinstance(rebuild, dict):
            waiting = rebuild.get("waiting_for") or []
            if waiting:
                return f"rebuilding, waiting for {', '.join(map(str, waiting))}"
            return (
                f"rebuilding ({rebuild.get('tables_done', 0)}/{rebuild.get('tables_total', '?')} "
                f"tables, {rebuild.get('rows_rebuilt', 0)} rows)"
            )
    return health.replace("_", " ")


def format_cluster_status(statuses: list[dict[str, Any]]) -> list[str]:
    """One line per node: partitions held and preferred, uptime, and its state
    (ready, starting, waiting for peers, rebuilding, needs operator, or why it
    could not be asked)."""
    header = (
        f"{'node':<6} {'address':<21} {'zone':<8} {'held':>5} {'pref':>5} {'uptime':>8}  health"
    )
    lines = [header]
    for status in statuses:
        held = status.get("partitions_held", "-")
        preferred = status.get("partitions_preferred", "-")
        uptime = status.get("uptime_s")
        uptime_text = f"{uptime:.0f}s" if isinstance(uptime, int | float) else "-"
        lines.append(
            f"{status.get('node', '?')!s:<6} {status.get('address', '?')!s:<21} "
            f"{status.get('zone', '?')!s:<8} {held!s:>5} {preferred!s:>5} {uptime_text:>8}  "
            f"{describe_health(status)}"
            + (", UNSAFE: no fsync" if status.get("fsync") is False else "")
        )
    return lines


def format_catch_up(statuses: list[dict[str, Any]]) -> list[str]:
    """Per node: replica state, hints it holds for each peer, and the age of the
    oldest anti-entropy pass among the partitions it holds."""
    lines: list[str] = []
    for status in statuses:
        replication = status.get("replication")
        if not isinstance(replication, dict):
            continue
        hints = replication.get("hints", {})
        pending = " ".join(
            f"{peer}={info.get('pending', '?')}" for peer, info in sorted(hints.items())
        )
        ages = replication.get("anti_entropy", {}).get("last_pass_s_ago", {})
        known = [age for age in ages.values() if isinstance(age, int | float)]
        if not ages:
            oldest = "-"
        elif len(known) < len(ages):
            oldest = f"not yet for {len(ages) - len(known)} of {len(ages)} partitions"
        else:
            oldest = f"{max(known):.0f}s ago"
        lines.append(
            f"{status.get('node', '?')!s:<6} {replication.get('state', '?')!s:<10} "
            f"hints pending: {pending or '-'}  anti-entropy, oldest pass: {oldest}"
        )
    if lines:
        lines.insert(0, "catch-up (--node ID shows per-partition passes and hint counters):")
    return lines


def format_cache_status(statuses: list[dict[str, Any]]) -> list[str]:
    """One line per node about its row cache: hit ratio (strong reads whose
    value came from the cache), bytes used / limit, evictions, stale reads
    served without a quorum round and stale reads that fell back to strong."""
    header = (
        f"{'cache':<6} {'hit ratio':>9} {'used / limit':>21} {'evictions':>10} "
        f"{'stale served':>12} {'fallbacks':>10}"
    )
    lines = [header]
    for status in statuses:
        node = f"{status.get('node', '?')!s:<6}"
        cache = status.get("cache")
        if not isinstance(cache, dict):
            lines.append(f"{node} -")
            continue
        limit = cache.get("bytes_max", 0)
        ratio = cache.get("hit_ratio", 0.0)
        ratio_text = f"{100 * ratio:.1f}%" if isinstance(ratio, int | float) else "-"
        used = f"{_size(cache.get('bytes_used', 0))} / {_size(limit)}" if limit else "off"
        lines.append(
            f"{node} {ratio_text:>9} {used:>21} {cache.get('evictions', 0)!s:>10} "
            f"{cache.get('stale_served', 0)!s:>12} {cache.get('fallbacks', 0)!s:>10}"
        )
    return lines


def _size(size_bytes: object) -> str:
    if not isinstance(size_bytes, int | float):
        return "?"
    if size_bytes < 1 << 20:
        return f"{size_bytes / (1 << 10):.1f} KiB"
    return f"{size_bytes / (1 << 20):.1f} MiB"


def format_status(status: dict[str, Any], indent: int = 0) -> list[str]:
    """A status dict as indented `name: value` lines, names sorted."""
    lines: list[str] = []
    pad = "  " * indent
    for name in sorted(status, key=str):
        value = status[name]
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{name}:")
            lines.extend(format_status(value, indent + 1))
        else:
            lines.append(f"{pad}{name}: {_format_scalar(value)}")
    return lines


def _format_scalar(value: object) -> str:
    if isinstance(value, bytes):
        return _show(value)
    if isinstance(value, list | tuple):
        return ", ".join(_format_scalar(item) for item in value) or "(none)"
    if isinstance(value, dict):
        return "(none)"
    return str(value)


# --- node ---------------------------------------------------------------------------


def _cmd_node(args: argparse.Namespace) -> int:
    # Imported here so every other command works without (or before) the node code.
    try:
        server = importlib.import_module("kvsvr.node.server")
    except ModuleNotFoundError as exc:
        if exc.name not in ("kvsvr.node", "kvsvr.node.server"):
            raise
        _complain(f"this kvsvr has no node implementation ({exc})")
        return EXIT_ERROR
    run_node = cast(Callable[[str, str, str | None], int], server.run_node)
    try:
        return run_node(args.config, args.id, args.initial_cluster_state)
    except ConfigError as exc:
        _complain(f"bad config: {exc}")
        return EXIT_ERROR


# --- up -----------------------------------------------------------------------------


@dataclass
class _StopRequest:
    """Set by SIGINT/SIGTERM: the first asks for a clean stop, a second for SIGKILL."""

    requested: bool = False
    forced: bool = False

    def __call__(self, signal_number: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
        self.requested = True


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopRequest]:
    stop = _StopRequest()
    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass
class _LocalNode:
    id: str
    host: str
    port: int
    log_path: Path
    pid_path: Path
    process: subprocess.Popen[bytes] | None = None
    exit_reported: bool = field(default=False)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


def _cmd_up(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    if args.base_port + args.nodes > 65535:
        raise UsageError(f"--base-port {args.base_port} leaves no room for {args.nodes} nodes")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        config_path, config, reused = prepare_up_config(
            directory,
            nodes=args.nodes,
            base_port=args.base_port,
            secret=args.secret,
            partitions=args.partitions,
            apps=args.apps,
        )
    except (ConfigError, OSError) as exc:
        _complain(str(exc))
        return EXIT_ERROR
    busy = [node.address for node in config.nodes if not _port_is_free(node.host, node.port)]
    if busy:
        _complain(
            f"already in use: {', '.join(busy)} (is another `kvsvr up` running?); "
            "choose another --base-port"
        )
        return EXIT_ERROR
    _say(f"kvsvr up: {'reusing' if reused else 'wrote'} {config_path}")
    nodes = [
        _LocalNode(
            id=node.id,
            host=node.host,
            port=node.port,
            log_path=directory / f"{node.id}.log",
            pid_path=directory / f"{node.id}.pid",
        )
        for node in config.nodes
    ]
    with _stop_signals() as stop:
        try:
            for node in nodes:
                if not stop.requested:
                    _start_node(node, config_path)
            code = _wait_until_listening(nodes, stop)
            if code is None:
                code = _wait_until_voting(nodes, config, stop)
            if code is not None:
                return code
            _print_banner(nodes, config, config_path, directory)
            return _supervise(nodes, stop)
        finally:
            _stop_nodes(nodes, stop)


def prepare_up_config(
    directory: Path,
    *,
    nodes: int,
    base_port: int,
    secret: str | None,
    partitions: int | None,
    apps: bool = False,
) -> tuple[Path, ClusterConfig, bool]:
    """The config `up` runs: `directory/cluster.toml` if it describes the same
    nodes and ports (then True: reused), else a new one written there. Raises
    ConfigError if the existing file would be contradicted (other nodes, ports,
    partitions or secret), since that would strand the data it describes.
    `apps` declares the example apps' tables too: in a new file, or appended
    to a reused one that lacks them (its other lines are kept as they are)."""
    path = directory / CONFIG_FILE_NAME
    tables = (TableConfig("default"), *app_tables()) if apps else (TableConfig("default"),)
    wanted = local_cluster(
        nodes,
        base_port,
        secret=secret,
        partitions=partitions if partitions is not None else 64,
        tables=tables,
    )
    if path.exists():
        existing = load_config(path)
        layout = [(node.id, node.host, node.port) for node in existing.nodes]
        if layout != [(node.id, node.host, node.port) for node in wanted.nodes]:
            raise ConfigError(
                f"{path} describes another cluster ({len(existing.nodes)} nodes from "
                f"{existing.nodes[0].address}); use the same --nodes and --base-port, "
                f"another --dir, or remove {directory}"
            )
        if partitions is not None and partitions != existing.partitions:
            raise ConfigError(
                f"{path} has {existing.partitions} partitions, and its data is placed by them; "
                f"drop --partitions, use another --dir, or remove {directory}"
            )
        if secret is not None and secret.encode() != existing.secret:
            raise ConfigError(
                f"{path} has a different secret; drop --secret, edit the file, or use another --dir"
            )
        if apps:
            existing = _add_missing_tables(path, existing, app_tables())
        if existing.cluster_id is None:
            existing = _add_cluster_id(path)
        return path, existing, True
    # data_dir "." is relative to the config file: node i keeps its data in directory/ni.
    path.write_text(render_config(wanted, data_dir="."), encoding="utf-8")
    if secret is not None:
        path.chmod(0o600)
    return path, load_config(path), False


def _add_cluster_id(path: Path) -> ClusterConfig:
    """Give a config written before cluster ids one (its nodes' directories
    adopt it on their next start: they hold data, so they are not new)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if "[cluster]\n" not in lines:
        raise ConfigError(f"{path} has no [cluster] table to add the cluster id to")
    at = lines.index("[cluster]\n") + 1
    lines.insert(at, f'id = "{new_cluster_id()}"  # added by `kvsvr up`\n')
    path.write_text("".join(lines), encoding="utf-8")
    _say(f"kvsvr up: gave {path} a cluster id")
    return load_config(path)


def _add_missing_tables(
    path: Path, config: ClusterConfig, tables: tuple[TableConfig, ...]
) -> ClusterConfig:
    """Append to the config file the tables it lacks (a new table is a new,
    empty LMDB sub-database on each node; nothing else changes). A table it
    declares differently is an error: its rows were written under those rules."""
    declared = {table.name: table for table in config.tables}
    missing = []
    for table in tables:
        current = declared.get(table.name)
        if current is None:
            missing.append(table)
        elif current != table:
            raise ConfigError(
                f"{path} declares table {table.name!r} differently from the apps "
                f"({current} vs {table}); edit it or use another --dir"
            )
    if not missing:
        return config
    blocks = render_config(replace(config, tables=tuple(missing))).split("[[tables]]")[1:]
    with path.open("a", encoding="utf-8") as out:
        out.write("\n# added by `kvsvr up --apps`\n")
        out.write("".join(f"[[tables]]{block}" for block in blocks))
    _say(f"kvsvr up: declared {len(missing)} app table(s) in {path}")
    return load_config(path)


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the node's listener will: TIME_WAIT leftovers of a previous run are fine.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError:
            return False
    return True


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PORT_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _start_node(node: _LocalNode, config_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "kvsvr",
        "node",
        "--config",
        str(config_path),
        "--id",
        node.id,
    ]
    with node.log_path.open("ab") as log:
        log.write(f"--- kvsvr up: starting {node.id} at {time.ctime()} ---\n".encode())
        log.flush()
        node.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    node.pid_path.write_text(f"{node.process.pid}\n", encoding="utf-8")


def _wait_until_voting(
    nodes: list[_LocalNode], config: ClusterConfig, stop: _StopRequest
) -> int | None:
    """None once every node's replica votes: a node that starts empty first asks
    its peers whether the cluster is new (or rebuilds what it lost)."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    addresses = [node.address for node in nodes]
    with SyncClient(addresses, secret=config.secret, timeout_s=5.0) as client:
        for node in nodes:
            while True:
                if stop.requested:
                    return EXIT_OK
                try:
                    state = client.status(node.id)["replication"]["state"]
                except KvsvrError as error:
                    state = f"no answer ({error})"
                if state == "ready":
                    break
                if time.monotonic() > deadline:
                    _complain(f"node {node.id} not ready after {NODE_START_TIMEOUT_S} s: {state}")
                    _print_log_tail(node)
                    return EXIT_ERROR
                time.sleep(SUPERVISE_POLL_S)
    return None


def _wait_until_listening(nodes: list[_LocalNode], stop: _StopRequest) -> int | None:
    """None once every node's port answers; else the exit code to leave with."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    waiting = list(nodes)
    while waiting:
        if stop.requested:
            return EXIT_OK
        for node in list(waiting):
            code = node.exit_code()
            if code is not None:
                node.exit_reported = True
                _complain(f"node {node.id} exited with code {code} while starting")
                _print_log_tail(node)
                return EXIT_ERROR
            if _port_answers(node.host, node.port):
                waiting.remove(node)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(f"{node.id} ({node.address})" for node in waiting)
            _complain(f"{names} did not start listening within {NODE_START_TIMEOUT_S} s")
            return EXIT_ERROR
        if waiting:
            time.sleep(SUPERVISE_POLL_S)
    return None


def _print_banner(
    nodes: list[_LocalNode], config: ClusterConfig, config_path: Path, directory: Path
) -> None:
    _say(f"kvsvr up: {len(nodes)} node(s) running; data, config and logs in {directory}")
    for node in nodes:
        pid = node.process.pid if node.process else "?"
        _say(f"  {node.id}  {node.address}  pid {pid}  log {node.log_path}")
    if config.secret is None:
        target = "--cluster " + ",".join(node.address for node in nodes)
    else:
        target = f"--config {config_path}"  # carries the secret; not echoed here
    _say("talk to it:")
    _say(f"  kvsvr put {target} greeting hello")
    _say(f"  kvsvr get {target} greeting")
    app_names = {table.name for table in app_tables()}
    if app_names <= {table.name for table in config.tables}:
        demo_target = "--cluster " + ",".join(node.address for node in nodes)
        if config.secret is not None:
            demo_target += " --secret SECRET"
        _say(f"  python -m kvsvr.apps.chat demo {demo_target}")
        _say(f"  python -m kvsvr.apps.moments demo {demo_target}")
    _say("press Ctrl-C to stop every node")


def _supervise(nodes: list[_LocalNode], stop: _StopRequest) -> int:
    while not stop.requested:
        time.sleep(SUPERVISE_POLL_S)
        if stop.requested:
            # A terminal's Ctrl-C reaches the nodes too (one process group): they
            # exit at once, and that is the stop, not a crash to report.
            break
        for node in nodes:
            code = node.exit_code()
            if code is not None and not node.exit_reported:
                node.exit_reported = True
                _complain(
                    f"node {node.id} exited on its own with code {code} (log {node.log_path}); "
                    "the other nodes keep running"
                )
                _print_log_tail(node)
        if all(node.exit_code() is not None for node in nodes):
            _complain("every node has exited; stopping")
            return EXIT_ERROR
    return EXIT_OK


def _stop_nodes(nodes: list[_LocalNode], stop: _StopRequest) -> None:
    running = [node for node in nodes if node.process and node.process.poll() is None]
    if running:
        _say(f"kvsvr up: stopping {len(running)} node(s)...")
    for node in running:
        assert node.process is not None
        node.process.terminate()
    deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
    while any(node.exit_code() is None for node in running):
        if stop.forced or time.monotonic() > deadline:
            break
        time.sleep(SUPERVISE_POLL_S / 4)
    for node in running:
        assert node.process is not None
        if node.process.poll() is None:
            _complain(f"node {node.id} did not stop within {NODE_STOP_TIMEOUT_S} s; killing it")
            node.process.kill()
        node.process.wait()
    for node in nodes:
        node.pid_path.unlink(missing_ok=True)
    if running:
        _say("kvsvr up: stopped")


def _print_log_tail(node: _LocalNode) -> None:
    try:
        lines = node.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    stream: IO[str] = sys.stderr
    for line in lines[-LOG_TAIL_LINES:]:
        print(f"  {node.id}| {line}", file=stream)
    stream.flush()
