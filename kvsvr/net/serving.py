"""The server end of RPC over TCP: `serve` accepts connections and runs each
with a `Handler`. A connection's receive loop decodes requests and hands each
to the handler in a task (or, for handlers that take it, without one), up to
`SERVER_REQUESTS_IN_FLIGHT_MAX` at a time; its send loop (`kvsvr.net.stream`)
writes the replies in batches."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from functools import partial
from typing import Final, Protocol

import trio

from kvsvr.errors import FrameError, KvsvrError
from kvsvr.net.auth import ServerHandshake
from kvsvr.net.framing import FrameDecoder, encode_frame
from kvsvr.net.messages import (
    CONNECTION_REQUEST_ID,
    OneWay,
    Reply,
    Request,
    encode_message,
    error_reply,
    error_reply_for,
    from_wire,
    ok_reply,
)
from kvsvr.net.stream import (
    RECEIVE_BYTES_MAX,
    ConnectionStats,
    OutgoingQueue,
    ReplyCallback,
    peer_of,
    receive_frame,
    send_queued_frames,
    set_nodelay,
)
from kvsvr.net.tls import refusal_reason, start_server_tls

logger = logging.getLogger(__name__)

# Requests one server connection runs at once. Past it the server stops reading
# that connection until a handler finishes: TCP flow control then pushes back on
# the client instead of the server queueing work without limit.
SERVER_REQUESTS_IN_FLIGHT_MAX: Final = 256

# Connections one server holds. Each costs buffers and tasks; past the limit new
# connections are closed at once rather than degrading every existing one.
SERVER_CONNECTIONS_MAX: Final = 1024

# Time a new connection gets to authenticate (TLS and HMAC), so a peer that connects and then
# stays silent does not hold a connection slot forever.
HANDSHAKE_TIMEOUT_S: Final = 5.0

# Time a closing server connection gets to flush its last replies (such as the
# error about a bad frame) to a peer that may not be reading.
CLOSE_FLUSH_TIMEOUT_S: Final = 1.0


# `handle_request_nowait(peer, method, body, respond) -> bool`, optional on a
# Handler: True when it took the request and will call `respond(body, None)` or
# `respond(None, error)` exactly once, on the trio thread; False to have
# `handle_request` run in a task as usual.
NowaitHandler = Callable[[str, str, object, ReplyCallback], bool]


class Handler(Protocol):
    """What a server does with what clients send. `peer` is "host:port"."""

    async def handle_request(self, peer: str, method: str, body: object) -> object:
        """The reply body; raise a `KvsvrError` to answer with its code."""
        ...

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        """Take a message that gets no reply. Must not block."""
        ...


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    secret: bytes | None,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever, serving each with `handler`.

    Reports the bound port through `task_status` (so port 0 works):
    `port = await nursery.start(serve, host, 0, handler, secret=...)`. With a
    `host` that resolves to several addresses and port 0, each listener gets its
    own port and only the first is reported. `secret=None` serves an open
    cluster. With `tls` (`kvsvr.net.tls.server_context`) every connection
    must run TLS, with a certificate the context trusts. No connection's
    failure, however malformed its input, stops the server.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = int(listeners[0].socket.getsockname()[1])
    server = _Server(handler, secret, tls)
    task_status.started(bound_port)
    await trio.serve_listeners(server.serve_connection, listeners)


class _Server:
    def __init__(self, handler: Handler, secret: bytes | None, tls: ssl.SSLContext | None) -> None:
        self._handler = handler
        self._secret = secret
        self._tls = tls
        self._connections = 0

    async def serve_connection(self, socket_stream: trio.SocketStream) -> None:
        peer = peer_of(socket_stream)
        if self._connections >= SERVER_CONNECTIONS_MAX:
            logger.warning("refusing %s: already serving %d connections", peer, self._connections)
            await trio.aclose_forcefully(socket_stream)
            return
        self._connections += 1
        stream: trio.abc.Stream = socket_stream
        try:
            set_nodelay(socket_stream)
            decoder: FrameDecoder | None = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as handshake_scope:
                if self._tls is not None:
                    stream = await self._start_tls(socket_stream, peer)
                decoder = await self._handshake(stream, peer)
            if handshake_scope.cancelled_caught:
                logger.info("handshake with %s timed out after %s s", peer, HANDSHAKE_TIMEOUT_S)
            elif decoder is not None:
                await _ServerConnection(stream, decoder, self._handler, peer).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("connection from %s broke: %s", peer, exc)
        except Exception:
            logger.exception("connection from %s failed", peer)
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _start_tls(
        self, stream: trio.SocketStream, peer: str
    ) -> trio.SSLStream[trio.SocketStream]:
        assert self._tls is not None
        try:
            return await start_server_tls(stream, self._tls)
        except trio.BrokenResourceError as exc:
            logger.warning("refused %s: %s", peer, refusal_reason(exc))
            raise

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> FrameDecoder | None:
        """The decoder (holding any bytes read past the handshake) if the peer
        authenticated, else None."""
        handshake = ServerHandshake(self._secret, os.urandom)
        decoder = FrameDecoder()
        await stream.send_all(encode_frame(handshake.hello()))
        try:
            auth: object = await receive_frame(stream, decoder)
        except FrameError as exc:
            logger.info("bad handshake frame from %s: %s", peer, exc)
            auth = None  # denied below as malformed
        verdict = handshake.receive_auth(auth)
        await stream.send_all(encode_frame(verdict))
        if handshake.authenticated:
            return decoder
        logger.warning("denied %s: %s", peer, handshake.denial_reason)
        return None


class _ServerConnection:
    def __init__(
        self, stream: trio.abc.Stream, decoder: FrameDecoder, handler: Handler, peer: str
    ) -> None:
        self._stream = stream
        self._decoder = decoder
        self._handler = handler
        self._peer = peer
        self._outgoing = OutgoingQueue()
        self._in_flight = trio.Semaphore(SERVER_REQUESTS_IN_FLIGHT_MAX)
        self.stats = ConnectionStats()
        # Optional: a handler may answer some requests without a task of ours.
        self._handle_nowait: NowaitHandler | None = getattr(handler, "handle_request_nowait", None)
        self._handler_nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as connection_nursery:
            connection_nursery.start_soon(self._send_loop, connection_nursery.cancel_scope)
            async with trio.open_nursery() as handler_nursery:
                self._handler_nursery = handler_nursery
                frame_error = await self._receive_requests(handler_nursery)
                # The peer is gone or has broken the framing: nobody will read
                # the answers of requests still running.
                handler_nursery.cancel_scope.cancel()
            if frame_error is not None:
                report = error_reply(CONNECTION_REQUEST_ID, FrameError.code, str(frame_error))
                self._outgoing.put_nowait(encode_message(report))
            self._outgoing.close()
            connection_nursery.cancel_scope.deadline = trio.current_time() + CLOSE_FLUSH_TIMEOUT_S

    async def _send_loop(self, connection_scope: trio.CancelScope) -> None:
        try:
            await send_queued_frames(self._stream, self._outgoing, self.stats)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("sending to %s failed: %s", self._peer, exc)
            connection_scope.cancel()

    async def _receive_requests(self, handler_nursery: trio.Nursery) -> FrameError | None:
        """Read and dispatch until the peer leaves (None) or breaks the framing."""
        try:
            while True:
                while (frame := self._decoder.next_frame()) is not None:
                    await self._dispatch(from_wire(frame), handler_nursery)
                data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    return None
                self._decoder.feed(data)
        except FrameError as exc:
            logger.warning("bad frame from %s, closing the connection: %s", self._peer, exc)
            return exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("receiving from %s failed: %s", self._peer, exc)
            return None

    async def _dispatch(
        self, message: Request | Reply | OneWay, handler_nursery: trio.Nursery
    ) -> None:
        if isinstance(message, Request):
            # Waiting here for a free slot is the backpressure: no reads until then.
            # A free slot is taken without a checkpoint: `acquire` yields to
            # the scheduler per request, and the loop checkpoints per read anyway.
            try:
                self._in_flight.acquire_nowait()
            except trio.WouldBlock:
                await self._in_flight.acquire()
            if self._handle_nowait is not None and self._try_nowait(message):
                return
            handler_nursery.start_soon(self._answer, message)
        elif isinstance(message, OneWay):
            self._deliver_oneway(message)
        else:
            raise FrameError("a client sent a reply; clients send requests and one-way messages")

    def _try_nowait(self, request: Request) -> bool:
        """Offer `request` to the handler's `handle_request_nowait`; True if it
        took it (it answers through `_respond`, which frees the slot)."""
        assert self._handle_nowait is not None
        try:
            return self._handle_nowait(
                self._peer, request.method, request.body, partial(self._respond, request)
            )
        except Exception as exc:
            logger.exception("handler for %r from %s failed", request.method, self._peer)
            self._respond(request, None, KvsvrError(f"internal error: {exc!r}"))
            return True

    def _respond(self, request: Request, body: object, error: KvsvrError | None) -> None:
        """Queue the answer of a request handled without a task; free its slot."""
        if error is None:
            reply = ok_reply(request.request_id, body)
        else:
            reply = error_reply_for(request.request_id, error)
        frame = self._encode_reply(request, reply)
        if self._outgoing.put_nowait(frame) or self._outgoing.closed:
            self._in_flight.release()  # queued, or nobody will read it
            return
        # The queue is full: wait for room in a task, as `_answer` would.
        assert self._handler_nursery is not None
        self._handler_nursery.start_soon(self._queue_reply, frame)

    def _encode_reply(self, request: Request, reply: Reply) -> bytes:
        """The reply's frame; an internal-error reply if it cannot be encoded."""
        try:
            return encode_message(reply)
        except FrameError as exc:
            logger.error("reply to %r from %s not sent: %s", request.method, self._peer, exc)
            return encode_message(
                error_reply(request.request_id, KvsvrError.code, f"internal error: {exc}")
            )

    async def _queue_reply(self, frame: bytes) -> None:
        try:
            await self._outgoing.put(frame)
        except trio.ClosedResourceError:
            pass  # the connection is closing; nobody will read the reply
        finally:
            self._in_flight.release()

    async def _answer(self, request: Request) -> None:
        try:
            frame = self._encode_reply(request, await self._call_handler(request))
            # Queued without a checkpoint when there is room (the task ends
            # here; `put` would yield to the scheduler once more per request).
            if not self._outgoing.put_nowait(frame) and not self._outgoing.closed:
                try:
                    await self._outgoing.put(frame)
                except trio.ClosedResourceError:
                    pass  # the connection is closing; nobody will read the reply
        finally:
            self._in_flight.release()

    async def _call_handler(self, request: Request) -> Reply:
        try:
            body = await self._handler.handle_request(self._peer, request.method, request.body)
        except KvsvrError as exc:
            return error_reply_for(request.request_id, exc)
        except Exception as exc:
            logger.exception("handler for %r from %s failed", request.method, self._peer)
            return error_reply(request.request_id, KvsvrError.code, f"internal error: {exc!r}")
        return ok_reply(request.request_id, body)

    def _deliver_oneway(self, message: OneWay) -> None:
        try:
            self._handler.handle_oneway(self._peer, message.method, message.body)
        except Exception:
            logger.exception("one-way handler for %r from %s failed", message.method, self._peer)
