"""The `kvsvr` command: run a local cluster, run a node, read and write keys.

    kvsvr up [--nodes 3] [--dir ./kvsvr-data] [--base-port 7100] [--secret S] [--partitions P]
             [--log-format text|json]
    kvsvr node --config FILE --id ID [--initial-cluster-state new|existing] [--log-format text|json]
    kvsvr get    KEY [--sort-key SK] [--consistency strong|stale|local] [--max-age-s S] [--raw]
    kvsvr put    KEY VALUE [--sort-key SK] [--if-version V | --if-absent]
    kvsvr cas    KEY VALUE --if-version V [--sort-key SK]
    kvsvr del    KEY [--sort-key SK] [--if-version V]
    kvsvr scan   PARTITION_KEY [--start S] [--end E] [--limit N]
    kvsvr status [--node ID|HOST:PORT] [--json]
    kvsvr recover --accept-data-loss
    kvsvr backup --out DIR [--rate-mib-s R]
    kvsvr verify-backup DIR
    kvsvr restore --from DIR --dir NEWDIR [--nodes N] [--base-port P] [--secret S]
    kvsvr top    [--once] [--interval-s S]

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

The commands live by concern: `kvsvr.cli.main` (the parser and entry point),
`keys` (get, put, cas, del, scan), `status` (status, recover), `top`, `up`
and `node`, `backup` (backup, verify-backup, restore); `common` holds the
exit codes and argument types they share.
"""

from kvsvr.cli.common import (
    EXIT_CODES_HELP,
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
)
from kvsvr.cli.keys import exit_code_for
from kvsvr.cli.main import build_parser, main
from kvsvr.cli.status import (
    describe_health,
    format_cache_status,
    format_catch_up,
    format_cluster_status,
    format_operator_messages,
    format_status,
)
from kvsvr.cli.up import prepare_up_config

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "describe_health",
    "exit_code_for",
    "format_cache_status",
    "format_catch_up",
    "format_cluster_status",
    "format_operator_messages",
    "format_status",
    "main",
    "prepare_up_config",
]
