"""The op layer: one harness client's connection to ONE node.

kvsvr's own `Client` routes every key to its preferred coordinator, so with it
"this client talks to node X" would not hold, and a fault on X would not be
what the client sees. Harness clients therefore speak the raw RPC to a single
node, which coordinates every operation it is sent. Swapping in another
transport means reimplementing the three methods of `NodeClient`.

Errors follow kvsvr's: `Conflict` (nothing written), `Unavailable` and
`Timeout` (outcome unknown), `InvalidRequest`. One more, `NotSent`, says the
connection could not be made, so the request never left: a write that raised
it certainly did not happen.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

import trio

from kvsvr import net
from kvsvr.api import (
    DEFAULT_TABLE,
    GetReply,
    GetRequest,
    Method,
    PutReply,
    PutRequest,
    WatchEvent,
    WatchRequest,
    read_consistency,
    watch_reply_from_wire,
)
from kvsvr.errors import FrameError, InvalidRequest, Timeout, Unavailable
from kvsvr.keys import encode_key

# The node gives up on an operation after this and answers Timeout. Longer
# than a few of the node's 1 s quorum rounds, so a single lost round does not
# end an operation, short enough that a blocked client soon tries again.
OPERATION_TIMEOUT_S: Final = 3.0
# The client gives up this much later than the node would (a paused or
# partitioned node never answers at all). Generous for a loaded machine.
CLIENT_GRACE_S: Final = 2.0
# Connecting (TCP + handshake) to a live loopback node takes milliseconds; a
# paused node accepts in the kernel and then never answers the handshake.
CONNECT_TIMEOUT_S: Final = 1.0

# Closing a connection is local work; past this something is wrong with it,
# and the socket is closed anyway.
CLOSE_TIMEOUT_S: Final = 2.0

TABLE: Final = DEFAULT_TABLE


class NotSent(Unavailable):
    """The connection could not be made: the request was never sent."""


class NodeClient:
    """Requests to one node over one connection, reconnecting on demand.

    The connection's loops run in `nursery`, which the caller owns; `aclose`
    ends them.
    """

    def __init__(
        self,
        node_id: str,
        address: tuple[str, int],
        secret: bytes | None,
        nursery: trio.Nursery,
        *,
        operation_timeout_s: float = OPERATION_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.secret = secret
        self.tls = tls
        self.operation_timeout_s = operation_timeout_s
        self._nursery = nursery
        self._connection: net.RpcConnection | None = None

    async def get(
        self, key: str, consistency: str = "strong", *, min_version: int = 0
    ) -> tuple[bytes | None, int]:
        """A read (strong: linearizable; stale: the node's cache or replica, no
        quorum, never below `min_version`; local: this node's replica only, no
        quorum): (value or None if absent, version)."""
        read = read_consistency(consistency)
        if read is None:
            raise InvalidRequest(f"no read consistency {consistency!r}")
        request = GetRequest(
            TABLE,
            encode_key(key.encode()),
            read,
            min_version=min_version,
            timeout_s=self.operation_timeout_s,
        )
        reply = GetReply.from_wire(await self._request(Method.GET, request.to_wire()))
        return reply.value, reply.version

    async def get_if_changed(self, key: str, cached_version: int) -> tuple[bytes | None, int, bool]:
        """A strong read for a client holding the key's value at `cached_version`
        (kvsvr's near cache): (value, version, unchanged). When the quorum chose
        exactly that version the node answers "unchanged" and sends no value."""
        request = GetRequest(
            TABLE,
            encode_key(key.encode()),
            cached_version=cached_version,
            timeout_s=self.operation_timeout_s,
        )
        reply = GetReply.from_wire(await self._request(Method.GET, request.to_wire()))
        if reply.unchanged and reply.version != cached_version:
            raise FrameError(f"unchanged at version {reply.version}, asked with {cached_version}")
        return reply.value, reply.version, reply.unchanged

    async def put(self, key: str, value: bytes | None, if_version: int | None = None) -> int:
        """Write `value` (None deletes), if the version is `if_version`; the new version."""
        request = PutRequest(
            TABLE,
            encode_key(key.encode()),
            value,
            if_version=if_version,
            timeout_s=self.operation_timeout_s,
        )
        return PutReply.from_wire(await self._request(Method.PUT, request.to_wire())).version

    async def watch(self, key: str, cursor: int, wait_s: float) -> list[WatchEvent]:
        """The key's changes after version `cursor` that this node can chain
        from it, held up to `wait_s` while there are none (kvsvr's watch)."""
        request = WatchRequest(TABLE, key.encode(), b"", {b"": cursor}, wait_s)
        return watch_reply_from_wire(await self._request(Method.WATCH, request.to_wire()))

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            await trio.lowlevel.checkpoint()
            return
        # Bounded: kvsvr's RpcConnection.aclose waits for its run task to mark
        # itself finished, which it never does if that task was cancelled from
        # outside (its `finally` awaits before setting the flag).
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await connection.aclose()

    async def _connect(self) -> net.RpcConnection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        try:
            connection = await net.connect(
                *self.address, secret=self.secret, connect_timeout_s=CONNECT_TIMEOUT_S, tls=self.tls
            )
        except Unavailable as error:
            raise NotSent(str(error)) from error
        await self._nursery.start(connection.run)
        self._connection = connection
        return connection

    async def _request(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        connection = await self._connect()
        with trio.move_on_after(self.operation_timeout_s + CLIENT_GRACE_S):
            reply = await connection.request(method, body)
            if not isinstance(reply, dict):
                raise FrameError(f"malformed {method} reply {reply!r:.200}")
            return reply
        # The node is paused or cut off: drop the connection, as a real client
        # would, so late replies and piled-up requests go with it.
        await self.aclose()
        waited_s = self.operation_timeout_s + CLIENT_GRACE_S
        raise Timeout(f"no answer from {self.node_id} in {waited_s:g} s; outcome unknown")
