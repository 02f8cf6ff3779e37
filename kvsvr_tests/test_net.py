"""The wire layer: framing, envelope and handshake sans-IO, then RPC over real TCP."""

from __future__ import annotations

import itertools
import random
import struct
import tracemalloc
from collections.abc import Callable
from functools import partial

import crc32c
import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    FrameError,
    InvalidRequest,
    KvsvrError,
    Unavailable,
)
from kvsvr.net import auth, connection, framing, messages, serving
from kvsvr.net import stream as stream_module
from kvsvr.net.auth import ClientHandshake, HandshakeState, ServerHandshake
from kvsvr.net.connection import ReplyCallback, RpcConnection, connect, serve
from kvsvr.net.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    encode_frame,
    encode_frames,
)
from kvsvr.net.messages import OneWay, Reply, Request, from_wire, to_wire
from kvsvr_tests.build_mode import pure_python_only
from kvsvr_tests.parse_agreement import assert_parses_alike

SECRET = b"cluster secret for tests"

# --- helpers ------------------------------------------------------------------

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text() | st.binary(), children, max_size=5)
    ),
    max_leaves=20,
)


# Every frame of the protocol carries a list; a bare nil is refused because
# next_frame answers None for "need more bytes".
frame_values = msgpack_values.filter(lambda value: value is not None)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def decode_all(chunks: list[bytes]) -> list[object]:
    """Feed chunk by chunk, draining after each; the loop bound proves no hang
    (every frame consumes at least a header)."""
    decoder = FrameDecoder()
    frames: list[object] = []
    for chunk in chunks:
        decoder.feed(chunk)
        for _ in range(len(chunk) // FRAME_HEADER_BYTES + 2):
            frame = decoder.next_frame()
            if frame is None:
                break
            frames.append(frame)
        else:
            pytest.fail("next_frame kept returning frames past what the bytes can hold")
    return frames


def frame_with_body(body: bytes) -> bytes:
    """A frame with a correct header around any body bytes."""
    return struct.pack(">II", len(body), crc32c.crc32c(body)) + body


def seeded_random_bytes(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


# --- framing --------------------------------------------------------------------


@given(values=st.lists(frame_values, max_size=5), cuts=st.lists(st.integers(0, 4000)))
def test_frames_round_trip_in_any_chunking(values: list[object], cuts: list[int]) -> None:
    data = encode_frames(values)
    assert decode_all(split_at(data, cuts)) == values


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Bytes a peer might send: noise, valid frames, frames with a correct crc over
    noise, and valid streams with a byte flipped or cut short."""
    kind = draw(st.sampled_from(["noise", "crc-ok noise", "flipped", "truncated"]))
    if kind == "noise":
        return draw(st.binary(max_size=300))
    if kind == "crc-ok noise":
        return b"".join(frame_with_body(body) for body in draw(st.lists(st.binary(max_size=50))))
    data = encode_frames(draw(st.lists(frame_values, min_size=1, max_size=3)))
    position = draw(st.integers(0, len(data) - 1))
    if kind == "truncated":
        return data[:position]
    flipped = data[position] ^ draw(st.integers(1, 255))
    return data[:position] + bytes([flipped]) + data[position + 1 :]


@settings(max_examples=500)
@given(data=hostile_streams(), cuts=st.lists(st.integers(0, 400), max_size=20))
def test_decoder_yields_frames_or_frame_error_only(data: bytes, cuts: list[int]) -> None:
    try:
        decode_all(split_at(data, cuts))
    except FrameError:
        pass


def test_crc_corruption_is_detected() -> None:
    data = bytearray(encode_frame({"key": b"value"}))
    data[-1] ^= 0x01
    decoder = FrameDecoder()
    decoder.feed(bytes(data))
    with pytest.raises(FrameError, match="crc32c mismatch"):
        decoder.next_frame()


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    tracemalloc.start()
    try:
        decoder = FrameDecoder()
        with pytest.raises(FrameError, match="exceeds the maximum"):
            decoder.feed(struct.pack(">II", 0xFFFFFFFF, 0) + b"x" * 100)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 1024 * 1024
    assert decoder.buffered_bytes == 0


def test_length_one_past_the_maximum_is_rejected() -> None:
    header = struct.pack(">II", MAX_FRAME_BYTES + 1, 0)
    decoder = FrameDecoder()
    decoder.feed(header[:3])
    assert decoder.next_frame() is None
    with pytest.raises(FrameError, match="exceeds the maximum"):
        decoder.feed(header[3:])


def test_encode_refuses_an_oversized_body() -> None:
    with pytest.raises(FrameError, match="exceeds the maximum"):
        encode_frame(b"x" * MAX_FRAME_BYTES)


def test_encode_refuses_what_msgpack_cannot_carry() -> None:
    with pytest.raises(FrameError, match="cannot encode"):
        encode_frame({"when": object()})
    with pytest.raises(FrameError, match="bare nil"):
        encode_frame(None)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xc1", "reserved byte"),
        (msgpack.packb(1) + msgpack.packb(2), "trailing data"),
        (msgpack.packb({1: 2}), "int map key"),
        (msgpack.packb(msgpack.ExtType(5, b"x")), "extension type"),
        (msgpack.packb(msgpack.ExtType(5, b"")), "empty extension type"),
        # msgpack decodes type -1 itself, without the ext hook: refused too.
        (msgpack.packb(["put", msgpack.Timestamp(5, 0)]), "timestamp"),
        (b"\xc7\x00\xff", "empty timestamp"),
        (b"\xdd\xff\xff\xff\xff", "array longer than the body"),
        (b"\x91" * 5000, "nesting"),
        (b"\xa2\xff\xfe", "invalid utf-8"),
        (b"", "empty body"),
        (b"\xc0", "bare nil"),
    ],
)
def test_undecodable_bodies_raise_frame_error(body: bytes, why: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_with_body(body))
    with pytest.raises(FrameError, match=r"undecodable msgpack|bare nil"):
        decoder.next_frame()


def test_decoder_is_dead_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_with_body(b"\xc1"))
    with pytest.raises(FrameError):
        decoder.next_frame()
    assert decoder.failed
    with pytest.raises(FrameError, match="dead"):
        decoder.feed(encode_frame("fine"))
    with pytest.raises(FrameError, match="dead"):
        decoder.next_frame()


@pure_python_only
def test_decoder_refuses_to_buffer_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, "DECODER_BUFFER_BYTES_MAX", 100)
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"x" * 50))
    with pytest.raises(FrameError, match="drain frames"):
        decoder.feed(encode_frame(b"y" * 50))


# --- envelope -----------------------------------------------------------------------


@given(
    request_id=st.integers(1, 2**63 - 1),
    method=st.text(min_size=1, max_size=64),
    body=msgpack_values,
)
def test_envelopes_round_trip(request_id: int, method: str, body: object) -> None:
    for message in (
        Request(request_id, method, body),
        Reply(request_id, True, body),
        messages.error_reply(request_id, "conflict", method),
        OneWay(method, body),
    ):
        decoder = FrameDecoder()
        decoder.feed(messages.encode_message(message))
        assert from_wire(decoder.next_frame()) == message


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        ("hello", "list of 4"),
        ([0, 1, "get"], "list of 4"),
        ([True, 1, "get", None], "kind must be"),
        ([3, 1, "get", None], "kind must be"),
        ([0, "1", "get", None], "request id must be an int"),
        ([0, 1.0, "get", None], "request id must be an int"),
        ([0, True, "get", None], "request id must be an int"),
        ([0, 0, "get", None], "request id must be in"),
        ([0, -5, "get", None], "request id must be in"),
        ([0, 1, b"get", None], "method must be a str"),
        ([0, 1, "", None], "method name"),
        ([0, 1, "m" * 65, None], "method name"),
        ([2, 7, "gossip", None], "one-way message must carry request id 0"),
        ([1, 1, 1, None], "ok flag must be a bool"),
        ([1, 1, False, "boom"], "failed reply's body"),
        ([1, 1, False, ["conflict"]], "failed reply's body"),
        ([1, 1, False, ["conflict", 3]], "failed reply's body"),
        ([1, -1, True, None], "reply id must be in"),
    ],
)
def test_bad_envelopes_raise_frame_error(wire: object, complaint: str) -> None:
    with pytest.raises(FrameError, match=complaint):
        from_wire(wire)


_envelope_confusing = st.sampled_from(
    [0, 1, 2, 3, -1, 2**63 - 1, 2**63, True, False, 1.0, None, "", "m" * 64, "m" * 65, b"get"]
)


@settings(max_examples=1000)
@given(
    wire=st.sampled_from(
        [[0, 5, "put", None], [1, 5, True, None], [1, 0, True, 1], [2, 0, "g", 1]]
    ),
    index=st.integers(0, 3),
    replacement=_envelope_confusing | msgpack_values,
    length=st.sampled_from([4, 4, 4, 3, 5]),
    body=msgpack_values,
)
def test_fast_envelope_parse_agrees_with_the_checks(
    wire: list[object], index: int, replacement: object, length: int, body: object
) -> None:
    """from_wire's shortcut for requests and ok replies accepts exactly what
    the check-by-check path accepts, and builds the same message."""
    wire = [*wire[:3], body, None][:length]
    if index < len(wire):
        wire[index] = replacement
    assert_parses_alike(messages._checked_from_wire, from_wire, wire)


def test_fast_envelope_parse_agrees_with_the_checks_for_every_single_change() -> None:
    confusing: list[object] = [
        *(0, 1, 2, 3, -1, 2**63 - 1, 2**63, True, False, 1.0, None, "", "m" * 64),
        *("m" * 65, b"get", [], ["conflict", "x"]),
    ]
    goods: list[list[object]] = [
        [0, 5, "put", None],
        [1, 5, True, None],
        [1, 0, True, 1],
        [1, 5, False, ["conflict", "x"]],
        [2, 0, "g", 1],
    ]
    for good in goods:
        for index in range(4):
            for replacement in confusing:
                for wire in ([*good[:index], replacement, *good[index + 1 :]], good[:index]):
                    assert_parses_alike(messages._checked_from_wire, from_wire, wire)


def test_decoder_compacts_and_keeps_a_partial_frame() -> None:
    """Frames drained across the compaction threshold, then a frame split
    across feeds: every frame comes out whole and in order."""
    values = [[i, b"x" * 1000] for i in range(200)]  # about 200 KiB in all
    data = b"".join(encode_frame(value) for value in values)
    cut = len(data) - 500
    decoder = FrameDecoder()
    out: list[object] = []
    for start in range(0, cut, 48 * 1024):
        decoder.feed(data[start : min(start + 48 * 1024, cut)])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
        assert decoder.buffered_bytes < 8 + 1010
    assert out == values[:-1]
    decoder.feed(data[cut:])
    assert decoder.next_frame() == values[-1]
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 0


def test_failed_reply_raises_the_class_its_code_names() -> None:
    assert isinstance(messages.error_reply(3, "conflict", "v2 != v3").error(), Conflict)
    assert type(messages.error_reply(3, "no-such-code", "?").error()) is KvsvrError
    assert to_wire(OneWay("gossip", [1])) == [2, 0, "gossip", [1]]


def test_coalesced_messages_decode_in_order() -> None:
    batch = [Request(i, "get", {"key": i}) for i in range(1, 50)]
    data = messages.encode_messages(batch)
    assert [from_wire(frame) for frame in decode_all([data])] == batch


# --- handshake, sans-IO ------------------------------------------------------------


def over_the_wire(message: object) -> object:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(message))
    return decoder.next_frame()


def handshake(
    server_secret: bytes | None, client_secret: bytes | None, seed: int = 0
) -> tuple[ServerHandshake, ClientHandshake]:
    server = ServerHandshake(server_secret, seeded_random_bytes(seed))
    client = ClientHandshake(client_secret, seeded_random_bytes(seed + 1))
    auth_message = client.receive_hello(over_the_wire(server.hello()))
    verdict = server.receive_auth(over_the_wire(auth_message))
    client.receive_verdict(over_the_wire(verdict))
    return server, client


def test_handshake_with_the_right_secret() -> None:
    server, client = handshake(SECRET, SECRET)
    assert server.authenticated and client.authenticated
    assert server.auth_required


def test_handshake_with_the_wrong_secret_is_denied() -> None:
    with pytest.raises(AuthenticationFailed, match=r"denied.*wrong cluster secret"):
        handshake(SECRET, b"another secret")


def test_handshake_without_a_secret_against_a_secured_server() -> None:
    server = ServerHandshake(SECRET, seeded_random_bytes(0))
    client = ClientHandshake(None, seeded_random_bytes(1))
    with pytest.raises(AuthenticationFailed, match="requires a cluster secret"):
        client.receive_hello(over_the_wire(server.hello()))
    assert client.state is HandshakeState.DENIED


def test_open_server_welcomes_a_client_without_a_secret() -> None:
    server, client = handshake(None, None)
    assert not server.auth_required
    assert server.authenticated and client.authenticated


def test_client_with_a_secret_refuses_an_open_server() -> None:
    server = ServerHandshake(None, seeded_random_bytes(0))
    client = ClientHandshake(SECRET, seeded_random_bytes(1))
    with pytest.raises(AuthenticationFailed, match="open cluster"):
        client.receive_hello(server.hello())


def test_client_refuses_a_server_that_cannot_prove_the_secret() -> None:
    server = ServerHandshake(SECRET, seeded_random_bytes(0))
    client = ClientHandshake(SECRET, seeded_random_bytes(1))
    server.receive_auth(client.receive_hello(server.hello()))
    with pytest.raises(AuthenticationFailed, match="could not prove"):
        client.receive_verdict(["welcome", b"\x00" * auth.PROOF_BYTES])


def test_a_recorded_proof_does_not_replay_against_a_new_nonce() -> None:
    recorded = ClientHandshake(SECRET, seeded_random_bytes(1)).receive_hello(
        ServerHandshake(SECRET, seeded_random_bytes(0)).hello()
    )
    later = ServerHandshake(SECRET, seeded_random_bytes(2))
    later.hello()
    assert later.receive_auth(recorded)[0] == "denied"
    assert not later.authenticated


@pytest.mark.parametrize(
    "message",
    [None, "auth", ["auth", b"short", b""], ["auth", b"n" * 32, b"p" * 5], ["hello", 1, 2]],
)
def test_server_denies_malformed_auth_without_raising(message: object) -> None:
    server = ServerHandshake(SECRET, seeded_random_bytes(0))
    server.hello()
    verdict = server.receive_auth(message)
    assert verdict[0] == "denied"
    assert "malformed" in str(verdict[1])


def test_client_raises_frame_error_on_a_malformed_hello() -> None:
    client = ClientHandshake(SECRET, seeded_random_bytes(1))
    with pytest.raises(FrameError, match="server nonce must be 32 bytes"):
        client.receive_hello(["hello", b"short", True])
    with pytest.raises(RuntimeError, match="cannot"):
        client.receive_hello(["hello", b"n" * 32, True])


def test_handshake_steps_out_of_order_are_caller_bugs() -> None:
    server = ServerHandshake(SECRET, seeded_random_bytes(0))
    with pytest.raises(RuntimeError, match="cannot"):
        server.receive_auth(["auth", b"n" * 32, b""])


# --- RPC over real TCP ----------------------------------------------------------------


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
