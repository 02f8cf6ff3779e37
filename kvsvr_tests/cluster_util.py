"""Real kvsvr node processes for integration tests: `kvsvr.local.LocalCluster`
in a test's directory, with a cluster secret.

    with LocalCluster(tmp_path, nodes=3) as cluster:
        cluster.start_all()                      # starts every node, waits until each is ready
        async with cluster.connect() as client:
            ...
        cluster.kill("n2")                       # SIGKILL
        cluster.start("n2")                      # and waits until it answers
        cluster.stop("n1")                       # SIGTERM, wait (SIGKILL past a deadline)
        cluster.pause("n3"); cluster.resume("n3")  # SIGSTOP / SIGCONT

`cluster.connect()` is `kvsvr.connect` to every node with the cluster secret.
`node_connection(address, secret)` sends requests to one node only (the
client routes each key to its preferred coordinator, whatever address it was
given): for "local" reads of that node's replica, or to make it coordinate.

Leaving the `with` block SIGKILLs every node that still runs; if the block
raised, the tail of every node's log is printed (to stderr, which pytest
shows with the failure). From trio code call the blocking methods through
`trio.to_thread.run_sync` (or the `a*` methods) so that clients running in
the same event loop are not stalled.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import kvsvr
from kvsvr import net
from kvsvr.keys import encode_key, split_user_key
from kvsvr.local import LocalCluster as _LocalCluster
from kvsvr.local import LocalClusterError as ClusterError
from kvsvr.local import free_base_port, local_config, write_config

__all__ = ["ClusterError", "LocalCluster", "NodeConnection", "free_base_port", "node_connection"]

DEFAULT_SECRET: Final = "integration-test-secret"


class LocalCluster(_LocalCluster):
    """N `kvsvr node` processes on 127.0.0.1 for one test, their config in
    `directory/cluster.toml`. Not started until `start_all()` / `start(id)`."""

    def __init__(
        self,
        directory: Path,
        nodes: int = 3,
        *,
        secret: str = DEFAULT_SECRET,
        partitions: int = 16,
        **config_options: Any,
    ) -> None:
        """`config_options`: `kvsvr.local.local_config`'s (replication, tables,
        settings: other `[cluster]` fields, e.g. hints_max)."""
        config = local_config(nodes, secret=secret, partitions=partitions, **config_options)
        super().__init__(write_config(config, Path(directory) / "cluster.toml"))

    def __exit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is not None:
                print(self.describe(), file=sys.stderr, flush=True)
        finally:
            self.close()

    def connect(self, timeout_s: float = 10.0) -> AbstractAsyncContextManager[kvsvr.Client]:
        """`async with cluster.connect() as client:` — `kvsvr.connect` to every node."""
        return kvsvr.connect(self.addresses, secret=self.secret, timeout_s=timeout_s)


# --- talking to one node in particular ----------------------------------------------------
#
# `kvsvr.connect` routes every key to its partition's preferred coordinator
# whatever address it was given, so a test that must ask *one* node (its local
# replica, or it as the coordinator) talks to it over a raw RPC connection.


class NodeConnection:
    """Client requests sent to one node only; that node serves or coordinates them."""

    def __init__(self, connection: net.RpcConnection) -> None:
        self.connection = connection

    async def get(
        self, key: Any, *, table: str = "default", consistency: str = "strong"
    ) -> tuple[int, bytes | None]:
        """(version, value) as the node answers; value None when absent."""
        body = {
            "table": table,
            "key": _encoded(key),
            "consistency": consistency,
            "max_age_s": None,
            "min_version": 0,
        }
        reply = await self.connection.request("get", body)
        assert isinstance(reply, dict), reply
        return reply["version"], reply["value"]

    async def put(
        self,
        key: Any,
        value: bytes | None,
        *,
        table: str = "default",
        if_version: int | None = None,
        if_absent: bool = False,
    ) -> int:
        body = {
            "table": table,
            "key": _encoded(key),
            "value": value,
            "if_version": if_version,
            "if_absent": if_absent,
        }
        reply = await self.connection.request("put", body)
        assert isinstance(reply, dict), reply
        version: int = reply["version"]
        return version


def _encoded(key: Any) -> bytes:
    return encode_key(*split_user_key(key))


@asynccontextmanager
async def node_connection(
    address: str, secret: str | bytes | None, *, connect_timeout_s: float = 5.0
) -> AsyncIterator[NodeConnection]:
    """`async with node_connection("127.0.0.1:7101", secret) as node:` — raises
    `kvsvr.Unavailable` if the node cannot be reached."""
    host, _, port = address.rpartition(":")
    secret_bytes = secret.encode() if isinstance(secret, str) else secret
    connection = await net.connect(
        host, int(port), secret=secret_bytes, connect_timeout_s=connect_timeout_s
    )
    async with connection:
        yield NodeConnection(connection)
