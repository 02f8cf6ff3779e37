"""RPC over real TCP on 127.0.0.1: `connect` and `RpcConnection` against
`serve`, concurrency, errors, limits, deadlines and shutdown. The wire's
sans-IO parts are test_net.py."""

from __future__ import annotations

import random
import struct
from functools import partial

import pytest
import trio

from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    FrameError,
    InvalidRequest,
    KvsvrError,
    Unavailable,
)
from kvsvr.net import connection, serving
from kvsvr.net import stream as stream_module
from kvsvr.net.auth import ClientHandshake
from kvsvr.net.connection import ReplyCallback, RpcConnection, connect, serve
from kvsvr.net.framing import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    encode_frame,
)
from kvsvr.net.messages import Reply, from_wire
from kvsvr_tests.build_mode import pure_python_only
from kvsvr_tests.test_net import SECRET, frame_with_body, seeded_random_bytes


class RecordingHandler:
    def __init__(self, seed: int = 0) -> None:
        self.random = random.Random(seed)
        self.requests: list[tuple[str, object]] = []
        self.completion_order: list[object] = []
        self.oneways: list[tuple[str, object]] = []
        self.peers: set[str] = set()
        self.oneways_expected = 0
        self.all_oneways_arrived = trio.Event()
        self.release = trio.Event()
        self.running = 0
        self.running_max = 0
        self.running_wanted = 1
        self.enough_running = trio.Event()  # set once `running_wanted` run at once

    async def handle_request(self, peer: str, method: str, body: object) -> object:
        self.requests.append((method, body))
        self.peers.add(peer)
        self.running += 1
        self.running_max = max(self.running_max, self.running)
        if self.running >= self.running_wanted:
            self.enough_running.set()
        try:
            return await self._handle(method, body)
        finally:
            self.running -= 1

    async def _handle(self, method: str, body: object) -> object:
        if method == "echo":
            await trio.sleep(self.random.uniform(0, 0.02))
            self.completion_order.append(body)
            return body
        if method == "conflict":
            raise Conflict(f"version {body} is stale")
        if method == "invalid":
            raise InvalidRequest("no such table")
        if method == "crash":
            raise ZeroDivisionError("oops")
        if method == "unencodable":
            return {"value": object()}
        if method == "wait":
            await self.release.wait()
            return "released"
        raise InvalidRequest(f"unknown method {method!r}")

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        if method == "crash":
            raise RuntimeError("one-way handler bug")
        self.oneways.append((method, body))
        if len(self.oneways) >= self.oneways_expected:
            self.all_oneways_arrived.set()


async def start_server(
    nursery: trio.Nursery, handler: RecordingHandler, secret: bytes | None = SECRET
) -> int:
    port: int = await nursery.start(partial(serve, "127.0.0.1", 0, handler, secret=secret))
    return port


async def open_client(port: int, secret: bytes | None = SECRET) -> RpcConnection:
    return await connect("127.0.0.1", port, secret=secret, connect_timeout_s=5)


async def test_concurrent_requests_share_one_connection_and_finish_out_of_order() -> None:
    handler = RecordingHandler(seed=7)
    results: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:

            async def one(i: int) -> None:
                results[i] = await conn.request("echo", {"n": i, "blob": bytes([i % 256]) * i})

            async with trio.open_nursery() as requests:
                for i in range(200):
                    requests.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert results == {i: {"n": i, "blob": bytes([i % 256]) * i} for i in range(200)}
    assert len(handler.peers) == 1
    arrival_order = [body for _, body in handler.requests]
    assert handler.completion_order != arrival_order
    assert handler.running_max > 1


async def test_errors_arrive_as_their_own_class() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            with pytest.raises(Conflict, match="version 4 is stale"):
                await conn.request("conflict", 4)
            with pytest.raises(InvalidRequest, match="no such table"):
                await conn.request("invalid", None)
            with pytest.raises(KvsvrError, match="internal error: ZeroDivisionError") as crash:
                await conn.request("crash", None)
            assert type(crash.value) is KvsvrError
            with pytest.raises(KvsvrError, match="internal error"):
                await conn.request("unencodable", None)
            conn.send_oneway("crash", None)
            assert await conn.request("echo", "still serving") == "still serving"
            assert not conn.closed
        nursery.cancel_scope.cancel()


async def test_wrong_or_missing_secret_fails_and_never_reaches_the_handler() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        with pytest.raises(AuthenticationFailed, match="denied"):
            await open_client(port, secret=b"wrong")
        with pytest.raises(AuthenticationFailed, match="requires a cluster secret"):
            await open_client(port, secret=None)
        async with await open_client(port) as conn:
            assert await conn.request("echo", 1) == 1
        nursery.cancel_scope.cancel()
    assert handler.requests == [("echo", 1)]


async def test_open_server_accepts_clients_without_a_secret() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler, secret=None)
        async with await open_client(port, secret=None) as conn:
            assert await conn.request("echo", "open") == "open"
        nursery.cancel_scope.cancel()


async def test_unreachable_and_silent_servers_are_unavailable() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    # A listener that never accepts or speaks: TCP connects, the hello never comes.
    with pytest.raises(Unavailable, match="timed out"):
        await connect("127.0.0.1", port, secret=SECRET, connect_timeout_s=0.2)
    await listener.aclose()
    with pytest.raises(Unavailable, match="cannot connect"):
        await connect("127.0.0.1", port, secret=SECRET, connect_timeout_s=5)


async def read_until_eof(stream: trio.SocketStream) -> list[object]:
    decoder = FrameDecoder()
    frames: list[object] = []
    with trio.fail_after(5):
        while data := await stream.receive_some(65536):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    return frames


async def raw_authenticated_stream(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = ClientHandshake(SECRET, seeded_random_bytes(3))
    decoder = FrameDecoder()
    while (hello := decoder.next_frame()) is None:
        decoder.feed(await stream.receive_some(65536))
    await stream.send_all(encode_frame(client.receive_hello(hello)))
    while (verdict := decoder.next_frame()) is None:
        decoder.feed(await stream.receive_some(65536))
    client.receive_verdict(verdict)
    return stream


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: kvsvr\r\n\r\n",
        struct.pack(">II", 0xFFFFFFFF, 0),
        frame_with_body(b"\xc1"),
        encode_frame(["not", "an", "envelope"]),
        encode_frame([0, "seven", "echo", None]),
        encode_frame([1, 1, True, None]),
    ],
)
async def test_garbage_closes_the_connection_and_the_server_keeps_serving(
    garbage: bytes,
) -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)

        before_handshake = await trio.open_tcp_stream("127.0.0.1", port)
        await before_handshake.send_all(garbage)
        frames = await read_until_eof(before_handshake)
        assert frames[0][0] == "hello"  # type: ignore[index]
        assert frames[-1][0] == "denied"  # type: ignore[index]
        await before_handshake.aclose()

        after_handshake = await raw_authenticated_stream(port)
        await after_handshake.send_all(garbage)
        frames = await read_until_eof(after_handshake)
        reply = from_wire(frames[-1])
        assert isinstance(reply, Reply) and reply.request_id == 0 and not reply.ok
        assert isinstance(reply.error(), FrameError)
        await after_handshake.aclose()

        async with await open_client(port) as conn:
            assert await conn.request("echo", "after garbage") == "after garbage"
        nursery.cancel_scope.cancel()
    assert handler.requests == [("echo", "after garbage")]


async def test_losing_the_connection_fails_waiting_requests() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as server_nursery:
            port = await start_server(server_nursery, handler)
            conn = await open_client(port)
            await nursery.start(conn.run)

            async def stop_the_server() -> None:
                await handler.enough_running.wait()
                server_nursery.cancel_scope.cancel()

            server_nursery.start_soon(stop_the_server)
            with pytest.raises(Unavailable, match=r"connection to 127\.0\.0\.1:\d+ lost"):
                await conn.request("wait", None)
        assert conn.closed
        with pytest.raises(Unavailable):
            await conn.request("echo", 1)
        conn.send_oneway("gossip", 1)
        assert conn.stats.oneway_dropped == 1


async def test_aclose_fails_waiting_requests() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        conn = await open_client(port)
        await nursery.start(conn.run)

        async def close_soon() -> None:
            await handler.enough_running.wait()
            await conn.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(Unavailable, match="closed by its owner"):
            await conn.request("wait", None)
        assert conn.closed
        nursery.cancel_scope.cancel()


async def test_queued_messages_are_coalesced_into_few_sends() -> None:
    handler = RecordingHandler()
    handler.oneways_expected = 300
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            for i in range(300):
                conn.send_oneway("gossip", i)
            with trio.fail_after(5):
                await handler.all_oneways_arrived.wait()
            assert conn.stats.frames_sent == 300
            assert conn.stats.send_calls < 10

            sends_before = conn.stats.send_calls
            async with trio.open_nursery() as requests:
                for i in range(100):
                    requests.start_soon(conn.request, "echo", i)
            assert conn.stats.send_calls - sends_before < 100
        nursery.cancel_scope.cancel()
    assert handler.oneways == [("gossip", i) for i in range(300)]


@pure_python_only
async def test_oneway_is_dropped_when_the_queue_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "OUTGOING_FRAMES_MAX", 4)
    handler = RecordingHandler()
    handler.oneways_expected = 4
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            for i in range(10):
                conn.send_oneway("gossip", i)
            assert conn.stats.oneway_dropped == 6
            with trio.fail_after(5):
                await handler.all_oneways_arrived.wait()
        nursery.cancel_scope.cancel()
    assert handler.oneways == [("gossip", i) for i in range(4)]


@pure_python_only
async def test_server_bounds_requests_in_flight_per_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving, "SERVER_REQUESTS_IN_FLIGHT_MAX", 3)
    handler = RecordingHandler()
    handler.running_wanted = 3
    results: list[object] = []
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:

            async def one() -> None:
                results.append(await conn.request("wait", None))

            async with trio.open_nursery() as requests:
                for _ in range(10):
                    requests.start_soon(one)
                with trio.fail_after(5):
                    await handler.enough_running.wait()
                await trio.sleep(0.05)  # time for a fourth to start, were it allowed
                assert handler.running == 3
                handler.release.set()
        nursery.cancel_scope.cancel()
    assert results == ["released"] * 10
    assert handler.running_max == 3


async def test_body_errors_leave_async_with_unwrapped() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        conn = await open_client(port)
        with pytest.raises(LookupError, match="mine"):
            async with conn:
                assert await conn.request("echo", 1) == 1
                raise LookupError("mine")
        assert conn.closed
        nursery.cancel_scope.cancel()


async def test_request_before_the_connection_runs_is_a_caller_bug() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        conn = await open_client(port)
        with pytest.raises(RuntimeError, match="not running"):
            await conn.request("echo", 1)
        await conn.aclose()
        assert conn.closed
        nursery.cancel_scope.cancel()


async def test_oversized_request_raises_frame_error_and_keeps_the_connection() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            with pytest.raises(FrameError, match="exceeds the maximum"):
                await conn.request("echo", b"x" * MAX_FRAME_BYTES)
            assert await conn.request("echo", "fine") == "fine"
        nursery.cancel_scope.cancel()


async def test_the_largest_frame_crosses_the_wire() -> None:
    handler = RecordingHandler()
    blob = b"x" * (MAX_FRAME_BYTES - 64)
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            assert await conn.request("echo", blob) == blob
        nursery.cancel_scope.cancel()


async def test_a_cancelled_request_leaves_the_connection_usable() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            with trio.move_on_after(0.05) as scope:
                await conn.request("wait", None)
            assert scope.cancelled_caught
            handler.release.set()  # its late reply must be dropped, not misdelivered
            assert await conn.request("echo", "next") == "next"
        nursery.cancel_scope.cancel()


@pure_python_only
async def test_a_request_past_its_deadline_raises_too_slow_and_frees_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "REQUESTS_IN_FLIGHT_MAX", 2)
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            started = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await conn.request("wait", None, deadline=started + 0.1)
            assert 0.1 <= trio.current_time() - started < 1.0
            # A deadline already past fails too, without waiting for the reply.
            with pytest.raises(trio.TooSlowError):
                await conn.request("wait", None, deadline=trio.current_time() - 1)
            # Both slots are free again; the late replies are dropped.
            handler.release.set()
            deadline = trio.current_time() + 5
            async with trio.open_nursery() as requests:
                for i in range(5):
                    requests.start_soon(partial(conn.request, "echo", i, deadline=deadline))
            assert await conn.request("echo", "next", deadline=deadline) == "next"
            assert conn._in_flight == 0
            assert not conn._pending
        nursery.cancel_scope.cancel()


@pure_python_only
async def test_requests_past_the_in_flight_limit_wait_for_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "REQUESTS_IN_FLIGHT_MAX", 2)
    handler = RecordingHandler()
    handler.running_wanted = 2
    results: list[object] = []
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:

            async def wait_request() -> None:
                results.append(await conn.request("wait", None))

            async with trio.open_nursery() as requests:
                for _ in range(4):
                    requests.start_soon(wait_request)
                with trio.fail_after(5):
                    await handler.enough_running.wait()
                await trio.sleep(0.05)
                assert len(handler.requests) == 2, "two slots: two requests sent"
                assert conn.request_nowait("echo", 1, lambda body, error: None) is None
                # Waiting for a slot counts against the deadline.
                with pytest.raises(trio.TooSlowError):
                    await conn.request("echo", 2, deadline=trio.current_time() + 0.05)
                handler.release.set()
            assert results == ["released"] * 4
            assert conn._in_flight == 0
        nursery.cancel_scope.cancel()


@pure_python_only
async def test_closing_fails_requests_waiting_for_a_slot_and_for_a_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "REQUESTS_IN_FLIGHT_MAX", 1)
    handler = RecordingHandler()
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        conn = await open_client(port)
        await nursery.start(conn.run)

        async def wait_request() -> None:
            try:
                await conn.request("wait", None)
            except Unavailable:
                outcomes.append("unavailable")

        async with trio.open_nursery() as requests:
            for _ in range(3):  # one holds the slot, two wait for it
                requests.start_soon(wait_request)
            with trio.fail_after(5):
                await handler.enough_running.wait()
            # A request cancelled while it waits for a slot gives up its place.
            with trio.move_on_after(0.05) as scope:
                await conn.request("echo", 1)
            assert scope.cancelled_caught
            await conn.aclose()
        assert outcomes == ["unavailable"] * 3
        assert conn._in_flight == 0
        nursery.cancel_scope.cancel()


async def test_a_request_from_a_cancelled_caller_is_not_sent() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as conn:
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.request("echo", "never")
            assert await conn.request("echo", "next") == "next"
        nursery.cancel_scope.cancel()
    assert handler.requests == [("echo", "next")]


async def test_cancelling_the_owner_closes_the_connection() -> None:
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        conn = await open_client(port)
        with trio.move_on_after(0.05) as scope:
            async with conn:
                await conn.request("wait", None)
        assert scope.cancelled_caught
        assert conn.closed
        nursery.cancel_scope.cancel()


@pure_python_only
async def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving, "HANDSHAKE_TIMEOUT_S", 0.1)
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        frames = await read_until_eof(silent)
        assert [frame[0] for frame in frames] == ["hello"]  # type: ignore[index]
        await silent.aclose()
        nursery.cancel_scope.cancel()


@pure_python_only
async def test_connections_past_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "SERVER_CONNECTIONS_MAX", 1)
    handler = RecordingHandler()
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler)
        async with await open_client(port) as first:
            with pytest.raises(Unavailable, match="cannot connect"):
                await open_client(port)
            assert await first.request("echo", 1) == 1
        nursery.cancel_scope.cancel()


class _Echo:
    async def handle_request(self, peer: str, method: str, body: object) -> object:
        await trio.lowlevel.checkpoint()
        return body

    def handle_oneway(self, peer: str, method: str, body: object) -> None:
        pass


async def test_aclose_returns_after_run_was_cancelled_from_outside() -> None:
    """Regression (found by the fault harness): cancelling the nursery that hosts
    `run` made the close in its `finally` raise Cancelled before `_finished` was
    set, so a later `aclose()` waited forever."""
    async with trio.open_nursery() as server:
        port = await server.start(partial(serve, "127.0.0.1", 0, _Echo(), secret=None))
        connection = await connect("127.0.0.1", port, secret=None, connect_timeout_s=5)
        with trio.CancelScope() as outer:
            async with trio.open_nursery() as owner:
                await owner.start(connection.run)
                assert await connection.request("x", 1) == 1
                outer.cancel()
                await trio.sleep_forever()
        with trio.fail_after(5):
            await connection.aclose()
        assert connection.closed
        server.cancel_scope.cancel()


class _NowaitHandler(RecordingHandler):
    """Answers "later" without a task: keeps the responder until released;
    everything else goes the usual way."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[object, ReplyCallback]] = []
        self.two_held = trio.Event()

    def handle_request_nowait(
        self, peer: str, method: str, body: object, respond: ReplyCallback
    ) -> bool:
        if method == "now":
            respond(["now", body], None)
            return True
        if method == "later":
            self.held.append((body, respond))
            if len(self.held) == 2:
                self.two_held.set()
            return True
        if method == "refuse":
            respond(None, Conflict(f"refused {body}"))
            return True
        return False


async def test_request_nowait_callbacks_and_nowait_handlers() -> None:
    """request_nowait: the callback gets the body or the error, never from
    inside the call; a forgotten request's callback never runs, even when its
    reply comes; the server answers nowait-handled requests in any order, and
    a lost connection fails what is still out."""
    handler = _NowaitHandler()
    got: dict[str, tuple[object, object]] = {}
    three_arrived, four_arrived = trio.Event(), trio.Event()

    def recorder(name: str) -> ReplyCallback:
        def callback(body: object, error: KvsvrError | None) -> None:
            got[name] = (body, error)
            if len(got) >= 3:
                three_arrived.set()
            if len(got) >= 4:
                four_arrived.set()

        return callback

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as server_nursery:
            port = await start_server(server_nursery, handler)
            conn = await open_client(port)
            await nursery.start(conn.run)
            assert conn.request_nowait("now", 1, recorder("now")) is not None
            assert conn.request_nowait("refuse", 2, recorder("refuse")) is not None
            assert conn.request_nowait("echo", 3, recorder("echo")) is not None
            forgotten = conn.request_nowait("later", 4, recorder("forgotten"))
            assert forgotten is not None
            assert conn.request_nowait("later", 5, recorder("lost")) is not None
            assert got == {}, "callbacks never run inside request_nowait"
            with trio.fail_after(10):
                await handler.two_held.wait()
            conn.forget(forgotten)
            handler.held[0][1](["late", 4], None)  # its reply arrives, nobody hears it
            with trio.fail_after(10):
                await three_arrived.wait()
            assert await conn.request("echo", "flush") == "flush"
            assert got["now"] == (["now", 1], None)
            body, error = got["refuse"]
            assert body is None and isinstance(error, Conflict)
            assert got["echo"] == (3, None)
            assert "forgotten" not in got
            server_nursery.cancel_scope.cancel()  # "lost" is still out
        with trio.fail_after(10):
            await four_arrived.wait()
        body, error = got["lost"]
        assert body is None and isinstance(error, Unavailable)
        assert conn.request_nowait("now", 6, recorder("closed")) is None
        nursery.cancel_scope.cancel()
