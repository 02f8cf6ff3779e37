"""RPC over TCP with trio, the client end: one connection carries many
requests at once.

`connect` opens an `RpcConnection`; the server end is `serve` with a `Handler`
(`kvsvr.net.serving`, re-exported here). Both ends run the same shape on a
connection: a receive loop that decodes frames and dispatches them, and a
send loop that writes, in one `send_all`, every frame queued since its
previous write (so the messages bound for one peer are batched; the queue
and the loop are `kvsvr.net.stream`'s). Everything that runs in the
background lives in a nursery; every queue and count has a limit.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import ssl
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import Final

import trio

from kvsvr.errors import AuthenticationFailed, FrameError, KvsvrError, Unavailable
from kvsvr.net._hosting import hosted
from kvsvr.net.auth import ClientHandshake
from kvsvr.net.framing import FrameDecoder, encode_frame
from kvsvr.net.messages import (
    CONNECTION_REQUEST_ID,
    REPLY,
    REQUEST_ID_MAX,
    OneWay,
    Reply,
    encode_message,
    encode_request,
    from_wire,
)
from kvsvr.net.serving import Handler as Handler
from kvsvr.net.serving import serve as serve
from kvsvr.net.stream import (
    RECEIVE_BYTES_MAX,
    OutgoingQueue,
    format_peer,
    receive_frame,
    send_queued_frames,
    set_nodelay,
)
from kvsvr.net.stream import ConnectionStats as ConnectionStats
from kvsvr.net.stream import ReplyCallback as ReplyCallback
from kvsvr.net.tls import client_failure, start_client_tls

logger = logging.getLogger(__name__)

# Requests one client connection keeps outstanding. Past it, `request` waits for
# a reply to free a slot, so a caller in a loop cannot build an unbounded table
# of waiters (or flood the server).
REQUESTS_IN_FLIGHT_MAX: Final = 1024

# Deadline entries of finished requests one client connection keeps (they are
# dropped lazily) beyond twice its requests in flight: past it the heap is
# rebuilt from the waiting requests, so its memory stays bounded and the
# rebuild's cost is spread over at least this many requests.
DEADLINES_STALE_MAX: Final = 1024


# --- client -----------------------------------------------------------------------


async def connect(
    host: str,
    port: int,
    *,
    secret: bytes | None,
    connect_timeout_s: float,
    tls: ssl.SSLContext | None = None,
    tls_server_name: str | None = None,
) -> RpcConnection:
    """Open a TCP connection to a kvsvr node and authenticate.

    `connect_timeout_s` bounds the TCP connect and the handshakes together.
    With `tls` (`kvsvr.net.tls.client_context`) the connection runs TLS, and
    the node's certificate must name `tls_server_name` (default: `host`).
    Raises `Unavailable` if the node cannot be reached, times out, or does not
    speak the protocol, and `AuthenticationFailed` if the secrets do not match
    or TLS fails (one end uses it and the other not, or a certificate is
    refused).
    The returned connection must be started before use: `async with connection:`
    or `await nursery.start(connection.run)`.
    """
    peer = format_peer(host, port)
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(connect_timeout_s):
            stream = socket_stream = await trio.open_tcp_stream(host, port)
            set_nodelay(socket_stream)
            decoder = FrameDecoder()
            if tls is not None:
                server_name = tls_server_name or host
                stream = await start_client_tls(socket_stream, decoder, tls, server_name)
            await _client_handshake(stream, decoder, secret)
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
    tls_failure = client_failure(exc)
    if tls_failure is not None:
        message, certain = tls_failure
        if certain:
            return AuthenticationFailed(f"connecting to {peer}: {message}")
        return Unavailable(f"cannot connect to {peer}: {message}")
    if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        return Unavailable(f"cannot connect to {peer}: {exc}")
    return exc


async def _client_handshake(
    stream: trio.abc.Stream, decoder: FrameDecoder, secret: bytes | None
) -> None:
    handshake = ClientHandshake(secret, os.urandom)
    auth = handshake.receive_hello(await receive_frame(stream, decoder))
    await stream.send_all(encode_frame(auth))
    handshake.receive_verdict(await receive_frame(stream, decoder))


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

    def __init__(self, stream: trio.abc.Stream, decoder: FrameDecoder, peer: str) -> None:
        self.peer = peer
        self.stats = ConnectionStats()
        self._stream = stream
        self._decoder = decoder
        self._outgoing = OutgoingQueue()
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
            await stack.enter_async_context(
                hosted(self.run, partial(self._shutdown, "closed by its owner"))
            )
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
            await send_queued_frames(self._stream, self._outgoing, self.stats)
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
