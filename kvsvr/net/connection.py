"""RPC over TCP with trio: one connection carries many requests at once.

The client side is `connect` + `RpcConnection`; the server side is `serve` with
a `Handler`. Both sides run the same shape on a connection: a receive loop
that decodes frames and dispatches them, and a send loop that writes, in one
`send_all`, every frame queued since its previous write (so the messages bound
for one peer are batched). Everything that runs in the background lives in a
nursery; every queue and count has a limit below.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Final, Protocol

import trio

from kvsvr.errors import AuthenticationFailed, FrameError, KvsvrError, Unavailable
from kvsvr.net._hosting import hosted
from kvsvr.net.auth import ClientHandshake, ServerHandshake
from kvsvr.net.framing import FEED_BYTES_MAX, FrameDecoder, encode_frame
from kvsvr.net.messages import (
    CONNECTION_REQUEST_ID,
    REPLY,
    REQUEST_ID_MAX,
    OneWay,
    Reply,
    Request,
    encode_message,
    encode_request,
    error_reply,
    error_reply_for,
    from_wire,
    ok_reply,
)

logger = logging.getLogger(__name__)

# --- limits -------------------------------------------------------------------

# Bytes asked of the socket per read: what the frame decoder is sized to take.
RECEIVE_BYTES_MAX: Final = FEED_BYTES_MAX

# Frames waiting for a connection's send loop. A full queue makes `request` and
# handler replies wait (backpressure) and makes `send_oneway` drop, so a slow or
# stuck peer costs a bounded amount of memory.
OUTGOING_FRAMES_MAX: Final = 1024

# Bytes waiting for a connection's send loop: 8 MiB keeps a 10 Gbit/s link busy
# for several milliseconds of round trip, and bounds memory per peer. A single
# frame is always admitted to an empty queue, even one of `MAX_FRAME_BYTES`.
OUTGOING_BYTES_MAX: Final = 8 * 1024 * 1024

# Bytes joined into one `send_all`: enough to carry hundreds of small messages
# per system call, little enough that joining them is a cheap copy. A frame
# larger than this is sent on its own.
SEND_BATCH_BYTES_MAX: Final = 1024 * 1024

# Requests one client connection keeps outstanding. Past it, `request` waits for
# a reply to free a slot, so a caller in a loop cannot build an unbounded table
# of waiters (or flood the server).
REQUESTS_IN_FLIGHT_MAX: Final = 1024

# Deadline entries of finished requests one client connection keeps (they are
# dropped lazily) beyond twice its requests in flight: past it the heap is
# rebuilt from the waiting requests, so its memory stays bounded and the
# rebuild's cost is spread over at least this many requests.
DEADLINES_STALE_MAX: Final = 1024

# Requests one server connection runs at once. Past it the server stops reading
# that connection until a handler finishes: TCP flow control then pushes back on
# the client instead of the server queueing work without limit.
SERVER_REQUESTS_IN_FLIGHT_MAX: Final = 256

# Connections one server holds. Each costs buffers and tasks; past the limit new
# connections are closed at once rather than degrading every existing one.
SERVER_CONNECTIONS_MAX: Final = 1024

# Time a new connection gets to authenticate, so a peer that connects and then
# stays silent does not hold a connection slot forever.
HANDSHAKE_TIMEOUT_S: Final = 5.0

# Time a closing server connection gets to flush its last replies (such as the
# error about a bad frame) to a peer that may not be reading.
CLOSE_FLUSH_TIMEOUT_S: Final = 1.0


# --- shared machinery -----------------------------------------------------------


@dataclass(slots=True)
class ConnectionStats:
    frames_sent: int = 0
    send_calls: int = 0  # one per coalesced batch: frames_sent / send_calls is the batching
    oneway_dropped: int = 0


class _OutgoingQueue:
    """Encoded frames waiting for the send loop, bounded in count and bytes."""

    def __init__(self) -> None:
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._closed = False
        self._room = trio.lowlevel.ParkingLot()  # producers waiting for space
        self._frames_ready = trio.lowlevel.ParkingLot()  # the send loop waiting for frames
        self._sender_parked = False  # whether anyone is parked in `_frames_ready`

    def _has_room(self, size: int) -> bool:
        if not self._frames:
            return True
        return len(self._frames) < OUTGOING_FRAMES_MAX and self._bytes + size <= OUTGOING_BYTES_MAX

    def _append(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._bytes += len(frame)
        if self._sender_parked:  # most frames join a batch the sender will take anyway
            self._sender_parked = False
            self._frames_ready.unpark_all()

    def put_nowait(self, frame: bytes) -> bool:
        """Queue `frame` if there is room; False if the queue is full or closed."""
        if self._closed or not self._has_room(len(frame)):
            return False
        self._append(frame)
        return True

    async def wait_for_room(self, size: int) -> None:
        """Wait until a frame of `size` bytes would be admitted, or the queue
        is closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._closed and not self._has_room(size):
            await self._room.park()

    async def put(self, frame: bytes) -> None:
        """Queue `frame`, waiting while the queue is full. Raises
        `trio.ClosedResourceError` once the queue is closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._closed and not self._has_room(len(frame)):
            await self._room.park()
        if self._closed:
            raise trio.ClosedResourceError("the connection is closed")
        self._append(frame)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def take_batch(self) -> list[bytes]:
        """The frames queued since the last call (at least one, up to
        `SEND_BATCH_BYTES_MAX`), waiting for one if none is; empty once the queue
        is closed and drained."""
        if self._frames or self._closed:
            await trio.lowlevel.checkpoint()
        while not self._frames and not self._closed:
            # Parking is the checkpoint: a yield first would only find the queue
            # still empty one scheduler pass later (the frames it could gather
            # then wake the parked loop just as well).
            self._sender_parked = True
            await self._frames_ready.park()
        batch: list[bytes] = []
        batch_bytes = 0
        while self._frames and (
            not batch or batch_bytes + len(self._frames[0]) <= SEND_BATCH_BYTES_MAX
        ):
            frame = self._frames.popleft()
            batch.append(frame)
            batch_bytes += len(frame)
        self._bytes -= batch_bytes
        self._room.unpark_all()
        return batch

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new frames; the send loop still drains those already queued."""
        self._closed = True
        self._room.unpark_all()
        self._sender_parked = False
        self._frames_ready.unpark_all()


async def _send_queued_frames(
    stream: trio.abc.SendStream, queue: _OutgoingQueue, stats: ConnectionStats
) -> None:
    """Write batches until the queue is closed and drained."""
    while batch := await queue.take_batch():
        await stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
        stats.send_calls += 1
        stats.frames_sent += len(batch)


async def _receive_frame(stream: trio.abc.ReceiveStream, decoder: FrameDecoder) -> object:
    """One frame, reading as needed (handshake only: later reads use the loops)."""
    await trio.lowlevel.checkpoint()
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(RECEIVE_BYTES_MAX)
        if not data:
            raise trio.BrokenResourceError("the peer closed the connection")
        decoder.feed(data)
    return frame


def _set_nodelay(stream: trio.SocketStream) -> None:
    # Requests and replies are small and latency-bound; batching is done above, by
    # the send loop, so Nagle's delay would only add latency.
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    return _format_peer(str(address[0]), int(address[1]))


# --- client -----------------------------------------------------------------------


async def connect(
    host: str, port: int, *, secret: bytes | None, connect_timeout_s: float
) -> RpcConnection:
    """Open a TCP connection to a kvsvr node and authenticate.

    `connect_timeout_s` bounds the TCP connect and the handshake together.
    Raises `Unavailable` if the node cannot be reached, times out, or does not
    speak the protocol, and `AuthenticationFailed` if the secrets do not match.
    The returned connection must be started before use: `async with connection:`
    or `await nursery.start(connection.run)`.
    """
    peer = _format_peer(host, port)
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(connect_timeout_s):
            stream = await trio.open_tcp_stream(host, port)
            _set_nodelay(stream)
            decoder = await _client_handshake(stream, secret)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        error = _connect_error(peer, connect_timeout_s, exc)
        if error is exc:
            raise
        raise error from exc
    return RpcConnection(stream, decoder, peer)


def _connect_error(peer: str, connect_timeout_s: float, exc: BaseException) -> BaseException:
    if isinstance(exc, trio.TooSlowError):
        return Unavailable(f"connecting to {peer} timed out after {connect_timeout_s} s")
    if isinstance(exc, AuthenticationFailed):
        return AuthenticationFailed(f"authenticating with {peer} failed: {exc}")
    if isinstance(exc, FrameError):
        return Unavailable(f"{peer} does not speak the kvsvr protocol: {exc}")
    if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        return Unavailable(f"cannot connect to {peer}: {exc}")
    return exc


async def _client_handshake(stream: trio.SocketStream, secret: bytes | None) -> FrameDecoder:
    handshake = ClientHandshake(secret, os.urandom)
    decoder = FrameDecoder()
    auth = handshake.receive_hello(await _receive_frame(stream, decoder))
    await stream.send_all(encode_frame(auth))
    handshake.receive_verdict(await _receive_frame(stream, decoder))
    return decoder


class _ReplyWaiter:
    """A task in `RpcConnection.request` waiting for its reply. Woken once, on
    the trio thread, by whoever takes it out of `_pending`: the receive loop
    (reply), the deadline loop (too late) or the shutdown (connection lost).
    Lighter than an Event per request: no lot, no second wake-up."""

    __slots__ = ("_body", "_error", "_task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self._task = task
        self._body: object = None
        self._error: Exception | None = None

    def resolve_ok(self, body: object) -> None:
        self._body = body
        trio.lowlevel.reschedule(self._task)

    def resolve(self, reply: Reply) -> None:
        if reply.ok:
            self.resolve_ok(reply.body)
        else:
            self.fail(reply.error())

    def fail(self, error: Exception) -> None:
        self._error = error
        trio.lowlevel.reschedule(self._task)

    def result(self) -> object:
        error = self._error
        if error is None:
            return self._body
        # Raised, the error's traceback holds this frame: neither the frame
        # (`error`) nor the waiter (`_error`) may hold the error back, or the
        # three make a cycle left to the cyclic collector.
        self._error = None
        try:
            raise error
        finally:
            del error


# What a request sent with `RpcConnection.request_nowait` ends with: the reply's
# body, or the error it failed with (an error reply, or the connection lost).
ReplyCallback = Callable[[object, KvsvrError | None], None]


class _CallbackRequest:
    """A request sent by `request_nowait`: its callback runs once, on the trio
    thread, from the receive loop or the connection's shutdown (whichever
    takes it out of `_pending`)."""

    __slots__ = ("_callback", "_peer")

    def __init__(self, peer: str, callback: ReplyCallback) -> None:
        self._peer = peer
        self._callback = callback

    def resolve_ok(self, body: object) -> None:
        self._run(body, None)

    def resolve(self, reply: Reply) -> None:
        if reply.ok:
            self._run(reply.body, None)
        else:
            self._run(None, reply.error())

    def fail(self, error: KvsvrError) -> None:
        self._run(None, error)

    def _run(self, body: object, error: KvsvrError | None) -> None:
        try:
            self._callback(body, error)
        except Exception:
            logger.exception("reply callback for a request to %s failed", self._peer)


class RpcConnection:
    """A client connection that multiplexes many requests over one TCP stream.

    Made by `connect`. Its send and receive loops run inside `run`, which must
    be hosted in a nursery, in one of two ways:

        async with await connect(...) as connection:   # hosts its own nursery
            await connection.request("get", body)

        connection = await connect(...)
        await nursery.start(connection.run)             # hosted by the caller
        ...
        await connection.aclose()

    When the connection breaks, `run` returns (it does not raise), `closed`
    becomes True, and every waiting and later `request` raises `Unavailable`.
    A closed connection stays closed: reconnecting is the caller's business.
    """

    def __init__(self, stream: trio.SocketStream, decoder: FrameDecoder, peer: str) -> None:
        self.peer = peer
        self.stats = ConnectionStats()
        self._stream = stream
        self._decoder = decoder
        self._outgoing = _OutgoingQueue()
        # Requests holding one of the `REQUESTS_IN_FLIGHT_MAX` slots, and the
        # tasks waiting for one: a freed slot passes to the first waiter, as with
        # a trio.Semaphore, but a request that finds one free takes it without
        # a checkpoint (its wait for the reply is the checkpoint). Tasks wait
        # only while every slot is taken, and a slot freed while any waits is
        # handed over, so `_in_flight < REQUESTS_IN_FLIGHT_MAX` means nobody waits.
        self._in_flight = 0
        self._slot_waiters = trio.lowlevel.ParkingLot()
        # Every request holding a slot, by id; taking an entry out of it frees
        # the slot and obliges the taker to resolve or fail it.
        self._pending: dict[int, _ReplyWaiter | _CallbackRequest] = {}
        # (deadline, request id) of requests sent with a deadline, earliest
        # first; entries of requests that have finished are dropped lazily.
        self._deadlines: list[tuple[float, int]] = []
        self._deadline_scope = trio.CancelScope()  # the deadline loop's sleep
        self._request_ids = itertools.count(1)
        self._started = False
        self._run_scope: trio.CancelScope | None = None
        self._finished = trio.Event()
        self._close_reason: str | None = None
        self._exit_stack: AsyncExitStack | None = None

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the send, receive and deadline loops until the connection closes."""
        if self._started:
            raise RuntimeError("RpcConnection.run() may be called only once")
        self._started = True
        try:
            with trio.CancelScope() as scope:
                self._run_scope = scope
                if self.closed:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop)
                    nursery.start_soon(self._receive_loop)
                    nursery.start_soon(self._deadline_loop)
                    task_status.started()
        finally:
            self._shutdown("the connection's task ended")
            try:
                # Raises Cancelled when `run` was cancelled from outside (the
                # stream is closed all the same); `_finished` must be set anyway,
                # or a later `aclose()` waits forever.
                await trio.aclose_forcefully(self._stream)
            finally:
                self._finished.set()

    async def request(self, method: str, body: object, *, deadline: float = math.inf) -> object:
        """Send a request and wait for its reply's body.

        A failed reply raises the error class its code names (`Conflict`...).
        Raises `Unavailable` if the connection is or becomes closed before the
        reply arrives, `FrameError` if the request cannot be encoded, and
        `trio.TooSlowError` if it has no reply by `deadline` (trio's clock), as
        `trio.fail_at(deadline)` around it would, but without a cancel scope per
        request: the connection's deadline loop wakes it. A late reply is dropped.
        """
        if not self._started:
            raise RuntimeError(
                "RpcConnection is not running: use `async with connection:` "
                "or `await nursery.start(connection.run)`"
            )
        # A caller cancelled already sends nothing (cheap when it is not).
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._close_reason is None and self._in_flight < REQUESTS_IN_FLIGHT_MAX:
            # The common case: a free slot and room in the queue, so the only
            # wait is for the reply.
            request_id = next(self._request_ids)
            try:
                frame = encode_request(request_id, method, body)
            except FrameError:
                await trio.lowlevel.checkpoint()
                raise
            if self._outgoing.put_nowait(frame):
                self._in_flight += 1
                return await self._wait_for_reply(request_id, deadline)
        return await self._request_after_waiting(method, body, deadline)

    async def _request_after_waiting(self, method: str, body: object, deadline: float) -> object:
        """`request` when it may have to wait before sending: for a slot, for
        room in the outgoing queue (or only for a checkpoint before it raises)."""
        with trio.CancelScope(deadline=deadline) as scope:
            await self._acquire_slot()
            try:
                if self._close_reason is not None:
                    raise self._lost_error()
                request_id = next(self._request_ids)
                frame = encode_request(request_id, method, body)
                while not self._outgoing.put_nowait(frame):
                    if self._outgoing.closed:
                        raise self._lost_error()
                    await self._outgoing.wait_for_room(len(frame))
            except BaseException:
                self._release_slot()
                raise
        if scope.cancelled_caught:
            raise trio.TooSlowError
        return await self._wait_for_reply(request_id, deadline)

    async def _wait_for_reply(self, request_id: int, deadline: float) -> object:
        """Wait for the reply to a request just queued, holding its slot. Nothing
        may await between queueing the frame and this: whoever takes the waiter
        out of `_pending` reschedules its task, which must be waiting by then."""
        waiter = _ReplyWaiter(trio.lowlevel.current_task())
        self._pending[request_id] = waiter
        if deadline != math.inf:
            self._add_deadline(deadline, request_id)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Cancelled: forget the request; its reply, if it comes, is dropped.
            self._take_pending(request_id)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return waiter.result()

    async def _acquire_slot(self) -> None:
        # As trio.Semaphore.acquire: a checkpoint whether or not it waits.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._in_flight < REQUESTS_IN_FLIGHT_MAX:
            self._in_flight += 1
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._slot_waiters.park()  # woken holding a slot passed on to it

    def _release_slot(self) -> None:
        if self._in_flight >= REQUESTS_IN_FLIGHT_MAX and self._slot_waiters:
            self._slot_waiters.unpark()  # the slot passes to the longest waiter
        else:
            self._in_flight -= 1
            assert self._in_flight >= 0, "a slot released twice"

    def _take_pending(self, request_id: int) -> _ReplyWaiter | _CallbackRequest | None:
        """Take a request out of `_pending`, freeing its slot; None if it is not
        there (finished, cancelled or forgotten)."""
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._release_slot()
        return pending

    def _add_deadline(self, deadline: float, request_id: int) -> None:
        heap = self._deadlines
        if len(heap) >= 2 * len(self._pending) + DEADLINES_STALE_MAX:
            heap[:] = [entry for entry in heap if entry[1] in self._pending]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, request_id))
        if deadline < self._deadline_scope.deadline:
            self._deadline_scope.deadline = deadline

    async def _deadline_loop(self) -> None:
        """Fail with TooSlowError each waiting request whose deadline has passed."""
        heap = self._deadlines
        while True:
            while heap and heap[0][1] not in self._pending:
                heapq.heappop(heap)  # that request has finished
            self._deadline_scope = trio.CancelScope(deadline=heap[0][0] if heap else math.inf)
            with self._deadline_scope:
                await trio.sleep_forever()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, request_id = heapq.heappop(heap)
                waiter = self._pending.get(request_id)
                if isinstance(waiter, _ReplyWaiter):
                    self._take_pending(request_id)
                    waiter.fail(trio.TooSlowError(f"no reply from {self.peer} by the deadline"))

    def request_nowait(self, method: str, body: object, callback: ReplyCallback) -> int | None:
        """Send a request without waiting for its reply, and without a task:
        `callback(body, None)` runs when the reply comes, `callback(None, error)`
        when it fails (error reply, connection lost); never from inside this
        call. Returns the request id (for `forget`), or None when the request
        could not be sent at once (closed, `REQUESTS_IN_FLIGHT_MAX` requests in
        flight, outgoing queue full): then the callback never runs. Raises
        `FrameError` if the request cannot be encoded."""
        if not self._started or self._close_reason is not None:
            return None
        if self._in_flight >= REQUESTS_IN_FLIGHT_MAX:
            return None
        request_id = next(self._request_ids)
        frame = encode_request(request_id, method, body)
        if not self._outgoing.put_nowait(frame):
            return None
        self._in_flight += 1
        self._pending[request_id] = _CallbackRequest(self.peer, callback)
        return request_id

    def forget(self, request_id: int) -> None:
        """Stop waiting for a `request_nowait` reply: its callback will not run
        and a late reply is dropped."""
        if isinstance(self._pending.get(request_id), _CallbackRequest):
            self._take_pending(request_id)

    def send_oneway(self, method: str, body: object) -> None:
        """Queue a message that gets no reply, without waiting. It is dropped
        (and counted in `stats.oneway_dropped`) if the connection is closed or its
        outgoing queue is full. Raises `FrameError` if it cannot be encoded."""
        frame = encode_message(OneWay(method, body))
        if not self._outgoing.put_nowait(frame):
            self.stats.oneway_dropped += 1

    async def aclose(self) -> None:
        """Close the connection; waiting requests raise `Unavailable`."""
        self._shutdown("closed by its owner")
        if self._started:
            await self._finished.wait()
        else:
            await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> RpcConnection:
        if not self._started:
            stack = AsyncExitStack()
            await stack.enter_async_context(hosted(self))
            self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        stack, self._exit_stack = self._exit_stack, None
        if stack is None:
            await self.aclose()
            return None
        return await stack.__aexit__(exc_type, exc_value, traceback)

    def _shutdown(self, reason: str) -> None:
        if self._close_reason is not None:
            return
        logger.debug("connection to %s closing: %s", self.peer, reason)
        self._close_reason = reason
        self._outgoing.close()
        for request_id in list(self._pending):
            pending = self._take_pending(request_id)
            if pending is not None:  # None: a callback before it forgot the request
                pending.fail(self._lost_error())
        if self._run_scope is not None:
            self._run_scope.cancel()

    def _lost_error(self) -> Unavailable:
        return Unavailable(f"connection to {self.peer} lost ({self._close_reason})")

    async def _send_loop(self) -> None:
        try:
            await _send_queued_frames(self._stream, self._outgoing, self.stats)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._shutdown(f"sending failed: {exc}")

    async def _receive_loop(self) -> None:
        try:
            while True:
                while (frame := self._decoder.next_frame()) is not None:
                    self._dispatch(frame)
                data = await self._stream.receive_some(RECEIVE_BYTES_MAX)
                if not data:
                    self._shutdown("the peer closed the connection")
                    return
                self._decoder.feed(data)
        except FrameError as exc:
            self._shutdown(f"bad frame from the peer: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._shutdown(f"receiving failed: {exc}")

    def _dispatch(self, frame: object) -> None:
        if (
            type(frame) is list
            and len(frame) == 4
            and frame[0] == REPLY
            and frame[2] is True
            and type(frame[0]) is int
            and type(frame[1]) is int
            and CONNECTION_REQUEST_ID < frame[1] <= REQUEST_ID_MAX
        ):
            # A successful reply (almost every frame a client gets), checked as
            # `from_wire` would, without building a Reply.
            pending = self._take_pending(frame[1])
            if pending is not None:  # None: the request was cancelled; drop its reply
                pending.resolve_ok(frame[3])
            return
        message = from_wire(frame)
        if not isinstance(message, Reply):
            raise FrameError("the server sent a request or one-way message; only replies expected")
        if message.request_id == CONNECTION_REQUEST_ID and not message.ok:
            self._shutdown(f"the peer reported: {message.error()!r}")
            return
        pending = self._take_pending(message.request_id)
        if pending is not None:  # None: the request was cancelled; drop its reply
            pending.resolve(message)


# --- server -------------------------------------------------------------------------


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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever, serving each with `handler`.

    Reports the bound port through `task_status` (so port 0 works):
    `port = await nursery.start(serve, host, 0, handler, secret=...)`. With a
    `host` that resolves to several addresses and port 0, each listener gets its
    own port and only the first is reported. `secret=None` serves an open
    cluster. No connection's failure, however malformed its input, stops the
    server.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = int(listeners[0].socket.getsockname()[1])
    server = _Server(handler, secret)
    task_status.started(bound_port)
    await trio.serve_listeners(server.serve_connection, listeners)


class _Server:
    def __init__(self, handler: Handler, secret: bytes | None) -> None:
        self._handler = handler
        self._secret = secret
        self._connections = 0

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_of(stream)
        if self._connections >= SERVER_CONNECTIONS_MAX:
            logger.warning("refusing %s: already serving %d connections", peer, self._connections)
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        try:
            _set_nodelay(stream)
            decoder = await self._handshake(stream, peer)
            if decoder is not None:
                await _ServerConnection(stream, decoder, self._handler, peer).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("connection from %s broke: %s", peer, exc)
        except Exception:
            logger.exception("connection from %s failed", peer)
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.SocketStream, peer: str) -> FrameDecoder | None:
        """The decoder (holding any bytes read past the handshake) if the peer
        authenticated, else None."""
        handshake = ServerHandshake(self._secret, os.urandom)
        decoder = FrameDecoder()
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            await stream.send_all(encode_frame(handshake.hello()))
            try:
                auth: object = await _receive_frame(stream, decoder)
            except FrameError as exc:
                logger.info("bad handshake frame from %s: %s", peer, exc)
                auth = None  # denied below as malformed
            verdict = handshake.receive_auth(auth)
            await stream.send_all(encode_frame(verdict))
            if handshake.authenticated:
                return decoder
            logger.warning("denied %s: %s", peer, handshake.denial_reason)
            return None
        logger.info("handshake with %s timed out after %s s", peer, HANDSHAKE_TIMEOUT_S)
        return None


class _ServerConnection:
    def __init__(
        self, stream: trio.SocketStream, decoder: FrameDecoder, handler: Handler, peer: str
    ) -> None:
        self._stream = stream
        self._decoder = decoder
        self._handler = handler
        self._peer = peer
        self._outgoing = _OutgoingQueue()
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
            await _send_queued_frames(self._stream, self._outgoing, self.stats)
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
