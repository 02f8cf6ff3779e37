"""Frames on the wire, sans-IO: bytes in, Python objects out, and back.

A frame is

    body length   4 bytes, big-endian, at most `MAX_FRAME_BYTES`
    body crc32c   4 bytes, big-endian, crc32c of the body
    body          msgpack (str and bin kept apart; map keys are str or bytes)

Nothing here touches a socket: `encode_frame` turns an object into bytes and
`FrameDecoder` turns received bytes, in whatever chunks they arrive, back into
objects. Every way a peer can get a frame wrong surfaces as `FrameError`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from typing import Final, NoReturn

import crc32c
import msgpack

from kvsvr.errors import FrameError

# A frame body is held whole in memory on both sides, so its size is capped: 16 MiB
# fits the largest value a table accepts plus its envelope, and bounds what one
# misbehaving peer can make a node allocate.
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024

_HEADER: Final = struct.Struct(">II")
FRAME_HEADER_BYTES: Final = _HEADER.size

# The most bytes a caller should feed at once (the connections read this much per
# receive): many small frames per wakeup, and a small overshoot of the buffer bound.
FEED_BYTES_MAX: Final = 64 * 1024

# Received bytes the decoder holds at once: one largest frame still being
# assembled plus one read. A caller that alternates `feed` with draining
# `next_frame` never exceeds it; a caller that feeds without draining gets a
# FrameError instead of an unbounded buffer.
DECODER_BUFFER_BYTES_MAX: Final = FRAME_HEADER_BYTES + MAX_FRAME_BYTES + FEED_BYTES_MAX

# Compact the buffer once this many consumed bytes sit at its front: often enough
# to keep memory near the unread bytes, rarely enough that small frames do not
# pay a copy each.
_COMPACT_AFTER_BYTES: Final = 64 * 1024


def encode_frame(obj: object) -> bytes:
    """One frame carrying `obj`. Raises `FrameError` if `obj` is None, if msgpack
    cannot encode it, or if its body would exceed `MAX_FRAME_BYTES`."""
    if obj is None:
        raise FrameError(_NIL_FRAME_MESSAGE)
    try:
        pack = _thread_state.pack
    except AttributeError:
        pack = _thread_state.pack = _packer().pack
    try:
        body: bytes = pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot encode frame body: {exc}") from exc
    size = len(body)
    if size > MAX_FRAME_BYTES:
        raise FrameError(
            f"frame body of {size} bytes exceeds the maximum of {MAX_FRAME_BYTES} bytes"
        )
    return _pack_header(size, _crc32c_raw(body)) + body


def _packer() -> msgpack.Packer:
    """This thread's msgpack packer. `msgpack.packb` builds a Packer per call,
    which costs as much as packing a small message; a Packer must not be shared
    between threads (clients run trio in threads of their own)."""
    packer: msgpack.Packer | None = getattr(_thread_state, "packer", None)
    if packer is None:
        # autoreset (the default): each pack() returns its bytes and starts afresh.
        packer = _thread_state.packer = msgpack.Packer(use_bin_type=True)
    return packer


_thread_state = threading.local()


def encode_frames(objects: Iterable[object]) -> bytes:
    """Several frames back to back, ready for one send."""
    return b"".join(encode_frame(obj) for obj in objects)


class FrameDecoder:
    """Reassembles frames from received bytes.

    `feed` the bytes as they arrive, then call `next_frame` until it returns
    None (meaning: feed more). A frame whose header announces more than
    `MAX_FRAME_BYTES` is rejected as soon as its header is seen, before its body
    is buffered. After the first `FrameError` the decoder is dead: the stream
    has lost its framing and every later call raises `FrameError` again.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # bytes before this offset are consumed
        self._failure: str | None = None

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet returned as frames."""
        return len(self._buffer) - self._start

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def feed(self, data: bytes | bytearray) -> None:
        if self._failure is not None:
            self._check_alive()
        buffer = self._buffer
        if len(buffer) - self._start + len(data) > DECODER_BUFFER_BYTES_MAX:
            self._fail(
                f"decoder would hold more than {DECODER_BUFFER_BYTES_MAX} bytes; "
                "drain frames with next_frame before feeding more"
            )
        buffer += data
        # Check the pending header now, so an oversized length is refused before
        # any of its body is accumulated.
        if len(buffer) - self._start >= FRAME_HEADER_BYTES:
            self._pending_body_length()

    def next_frame(self) -> object | None:
        """The next whole frame's object, or None if more bytes are needed.
        (So a frame never carries a bare nil: both sides refuse one.)"""
        # One method, locals only: it runs once per frame received, and every
        # helper call cost about as much as decoding a small body.
        if self._failure is not None:
            self._check_alive()
        buffer = self._buffer
        start = self._start
        if len(buffer) - start < FRAME_HEADER_BYTES:
            return None
        body_length, expected_crc = _unpack_header(buffer, start)
        if body_length > MAX_FRAME_BYTES:
            self._fail(f"frame length {body_length} exceeds the maximum of {MAX_FRAME_BYTES} bytes")
        body_start = start + FRAME_HEADER_BYTES
        body_end = body_start + body_length
        if len(buffer) < body_end:
            return None
        # One copy of the body (a bytearray slice: cheaper than memoryviews,
        # which need releasing before the buffer may be resized).
        body = buffer[body_start:body_end]
        actual_crc = _crc32c_raw(body)
        if actual_crc != expected_crc:
            self._fail(
                f"frame crc32c mismatch: header says {expected_crc:#010x}, "
                f"body has {actual_crc:#010x}"
            )
        try:
            obj: object = _unpackb(
                body,
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=_refuse_ext_type,
                max_str_len=body_length,
                max_bin_len=body_length,
                max_array_len=body_length,
                max_map_len=body_length // 2,
                # No extension types at all: `ext_hook` refuses the others, but
                # msgpack decodes type -1 (Timestamp) without calling it.
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack reports bad input with many exception types
            if "max_ext_len" in str(exc):
                self._fail(_EXT_TYPE_MESSAGE)
            self._fail(f"undecodable msgpack frame body: {type(exc).__name__}: {exc}")
        if obj is None:
            self._fail(_NIL_FRAME_MESSAGE)
        if body_end == len(buffer):
            buffer.clear()
            self._start = 0
        elif body_end >= _COMPACT_AFTER_BYTES:
            del buffer[:body_end]
            self._start = 0
        else:
            self._start = body_end
        return obj

    def _pending_body_length(self) -> int | None:
        if self.buffered_bytes < FRAME_HEADER_BYTES:
            return None
        body_length: int
        body_length, _ = _HEADER.unpack_from(self._buffer, self._start)
        if body_length > MAX_FRAME_BYTES:
            self._fail(f"frame length {body_length} exceeds the maximum of {MAX_FRAME_BYTES} bytes")
        return body_length

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise FrameError(f"frame decoder is dead after an earlier error: {self._failure}")

    def _fail(self, message: str) -> NoReturn:
        self._failure = message
        self._buffer = bytearray()
        self._start = 0
        raise FrameError(message)


# `next_frame` answers None for "feed me more", so None cannot also be a frame.
# Every message of the protocol is a list; nothing is lost.
_NIL_FRAME_MESSAGE: Final = "a frame cannot carry a bare nil (None)"


_EXT_TYPE_MESSAGE = "undecodable msgpack frame body: extension types are not part of the protocol"


def _refuse_ext_type(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def _crc32c(data: bytes) -> int:
    return int(crc32c.crc32c(data))


_crc32c_raw = crc32c.crc32c
_unpackb = msgpack.unpackb
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack
