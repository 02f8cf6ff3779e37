"""The wire layer sans-IO: framing, the message envelope and the handshake.
RPC over real TCP is test_rpc.py."""

from __future__ import annotations

import itertools
import random
import struct
import tracemalloc
from collections.abc import Callable

import crc32c
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    FrameError,
    KvsvrError,
)
from kvsvr.net import auth, framing, messages
from kvsvr.net.auth import ClientHandshake, HandshakeState, ServerHandshake
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
