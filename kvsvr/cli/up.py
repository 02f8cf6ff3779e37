"""`kvsvr up`: a local cluster in the foreground, kept in one directory.

DIR holds `cluster.toml` (reused when it describes the same nodes and ports,
so the data persists), node i's data in `DIR/ni/`, its log in `DIR/ni.log`
and its pid in `DIR/ni.pid`. The nodes run as `kvsvr.local.LocalCluster`
starts them; `up` waits until every one is ready, then watches them until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Final

from kvsvr.apps import app_tables
from kvsvr.cli.common import EXIT_ERROR, EXIT_OK, UsageError, complain, say
from kvsvr.config import (
    ClusterConfig,
    ConfigError,
    TableConfig,
    load_config,
    local_cluster,
    new_cluster_id,
    render_config,
)
from kvsvr.local import CONFIG_FILE_NAME, LocalCluster, port_is_free
from kvsvr.tls import with_local_tls

# `up` runs every node on this machine; past a handful they only compete for
# its cores and disk. Real clusters are started node by node with `kvsvr node`.
UP_NODES_MAX: Final = 16

# A node's first start imports, opens LMDB and binds its port, then the nodes
# exchange hellos before they vote; on a loaded CI machine that can take
# seconds, so the wait is generous.
NODE_START_TIMEOUT_S: Final = 60.0

# Time the nodes get to finish after SIGTERM (flush, close LMDB) before SIGKILL.
NODE_STOP_TIMEOUT_S: Final = 10.0

# How often `up` looks at its nodes: the delay before it notices a dead node or
# a stop request.
SUPERVISE_POLL_S: Final = 0.2

# Lines of a dead node's log shown, so the reason is on screen.
LOG_TAIL_LINES: Final = 10

DEFAULT_UP_DIR: Final = "kvsvr-data"
# `up --tls` keeps its CA, certificates and keys in DIR/tls.
TLS_DIR_NAME: Final = "tls"
DEFAULT_BASE_PORT: Final = 7100


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


def run_up(args: argparse.Namespace) -> int:
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
            tls=args.tls,
        )
    except (ConfigError, OSError) as exc:
        complain(str(exc))
        return EXIT_ERROR
    busy = [
        f"{host}:{port}"
        for host, port in (node.listen_address for node in config.nodes)
        if not port_is_free(port, host)
    ]
    if busy:
        complain(
            f"already in use: {', '.join(busy)} (is another `kvsvr up` running?); "
            "choose another --base-port"
        )
        return EXIT_ERROR
    say(f"kvsvr up: {'reusing' if reused else 'wrote'} {config_path}")
    cluster = LocalCluster(config_path, log_dir=directory, stop_timeout_s=NODE_STOP_TIMEOUT_S)
    with _stop_signals() as stop:
        try:
            for node_id in cluster.ids:
                if not stop.requested:
                    cluster.start(node_id, wait=False, extra_args=_node_args(args))
                    _pid_path(cluster, node_id).write_text(
                        f"{cluster.pid(node_id)}\n", encoding="utf-8"
                    )
            code = _wait_until_ready(cluster, stop)
            if code is not None:
                return code
            _print_banner(cluster, config, config_path, directory)
            return _supervise(cluster, stop)
        finally:
            _stop_nodes(cluster, stop)


def _node_args(args: argparse.Namespace) -> tuple[str, ...]:
    """What `up` passes on to every `kvsvr node`."""
    return ("--log-format", args.log_format)


def prepare_up_config(
    directory: Path,
    *,
    nodes: int,
    base_port: int,
    secret: str | None,
    partitions: int | None,
    apps: bool = False,
    tls: bool = False,
) -> tuple[Path, ClusterConfig, bool]:
    """The config `up` runs: `directory/cluster.toml` if it describes the same
    nodes and ports (then True: reused), else a new one written there. Raises
    ConfigError if the existing file would be contradicted (other nodes, ports,
    partitions or secret), since that would strand the data it describes.
    `apps` declares the example apps' tables too: in a new file, or appended
    to a reused one that lacks them (its other lines are kept as they are).
    `tls` makes a new file's cluster run TLS, with a local CA and
    certificates made in `directory/tls` (a reused file must have [tls])."""
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
        if tls and existing.tls is None:
            raise ConfigError(
                f"{path} describes a cluster without TLS; drop --tls, or use another --dir"
            )
        if apps:
            existing = _add_missing_tables(path, existing, app_tables())
        if existing.cluster_id is None:
            existing = _add_cluster_id(path)
        return path, existing, True
    if tls:
        wanted = with_local_tls(wanted, directory / TLS_DIR_NAME, relative_to=directory)
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
    say(f"kvsvr up: gave {path} a cluster id")
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
    say(f"kvsvr up: declared {len(missing)} app table(s) in {path}")
    return load_config(path)


def _pid_path(cluster: LocalCluster, node_id: str) -> Path:
    return cluster.directory / f"{node_id}.pid"


def _wait_until_ready(cluster: LocalCluster, stop: _StopRequest) -> int | None:
    """None once every node is ready (it votes and sees its peers up: a node
    that starts empty first asks its peers whether the cluster is new, or
    rebuilds what it lost); else the exit code to leave with."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    waiting = cluster.ids
    while waiting:
        if stop.requested:
            return EXIT_OK
        node_id = waiting[0]
        code = cluster.exit_code(node_id)
        if code is not None:
            complain(f"node {node_id} exited with code {code} while starting")
            _print_log_tail(cluster, node_id)
            return EXIT_ERROR
        reason = cluster.not_ready(node_id)
        if reason is None:
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            complain(f"node {node_id} not ready after {NODE_START_TIMEOUT_S} s: {reason}")
            _print_log_tail(cluster, node_id)
            return EXIT_ERROR
        time.sleep(SUPERVISE_POLL_S)
    return None


def _print_banner(
    cluster: LocalCluster, config: ClusterConfig, config_path: Path, directory: Path
) -> None:
    say(f"kvsvr up: {len(cluster.ids)} node(s) running; data, config and logs in {directory}")
    for node_id in cluster.ids:
        pid = cluster.pid(node_id) or "?"
        say(f"  {node_id}  {cluster.address(node_id)}  pid {pid}  log {cluster.log_path(node_id)}")
    if config.secret is None and config.tls is None:
        target = "--cluster " + ",".join(cluster.addresses)
    else:
        target = f"--config {config_path}"  # carries the secret and TLS; not echoed here
    say("talk to it:")
    say(f"  kvsvr put {target} greeting hello")
    say(f"  kvsvr get {target} greeting")
    app_names = {table.name for table in app_tables()}
    # The example apps connect without TLS options.
    if app_names <= {table.name for table in config.tables} and config.tls is None:
        demo_target = "--cluster " + ",".join(cluster.addresses)
        if config.secret is not None:
            demo_target += " --secret SECRET"
        say(f"  python -m kvsvr.apps.chat demo {demo_target}")
        say(f"  python -m kvsvr.apps.moments demo {demo_target}")
    say("press Ctrl-C to stop every node")


def _supervise(cluster: LocalCluster, stop: _StopRequest) -> int:
    reported: set[str] = set()
    while not stop.requested:
        time.sleep(SUPERVISE_POLL_S)
        if stop.requested:
            # A terminal's Ctrl-C reaches the nodes too (one process group): they
            # exit at once, and that is the stop, not a crash to report.
            break
        for node_id in cluster.ids:
            code = cluster.exit_code(node_id)
            if code is not None and node_id not in reported:
                reported.add(node_id)
                complain(
                    f"node {node_id} exited on its own with code {code} "
                    f"(log {cluster.log_path(node_id)}); the other nodes keep running"
                )
                _print_log_tail(cluster, node_id)
        if all(cluster.exit_code(node_id) is not None for node_id in cluster.ids):
            complain("every node has exited; stopping")
            return EXIT_ERROR
    return EXIT_OK


def _stop_nodes(cluster: LocalCluster, stop: _StopRequest) -> None:
    running = [node_id for node_id in cluster.ids if cluster.is_running(node_id)]
    if running:
        say(f"kvsvr up: stopping {len(running)} node(s)...")
    for node_id in cluster.stop_all(kill_now=lambda: stop.forced):
        complain(f"node {node_id} did not stop within {NODE_STOP_TIMEOUT_S} s; killing it")
    cluster.close()
    for node_id in cluster.ids:
        _pid_path(cluster, node_id).unlink(missing_ok=True)
    if running:
        say("kvsvr up: stopped")


def _print_log_tail(cluster: LocalCluster, node_id: str) -> None:
    for line in cluster.log_tail(node_id, LOG_TAIL_LINES).splitlines():
        print(f"  {node_id}| {line}", file=sys.stderr)
    sys.stderr.flush()
