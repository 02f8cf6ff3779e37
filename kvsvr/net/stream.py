"""What both ends of an RPC connection share on one TCP stream: the bounded
queue of outgoing frames and the send loop that writes each batch of them in
one `send_all`, frame reads during the handshake, socket options and peer
names. The client end is `kvsvr.net.connection`, the server end
`kvsvr.net.serving`."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from kvsvr.errors import KvsvrError
from kvsvr.net.framing import FEED_BYTES_MAX, FrameDecoder

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


@dataclass(slots=True)
class ConnectionStats:
    frames_sent: int = 0
    send_calls: int = 0  # one per coalesced batch: frames_sent / send_calls is the batching
    oneway_dropped: int = 0


class OutgoingQueue:
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


async def send_queued_frames(
    stream: trio.abc.SendStream, queue: OutgoingQueue, stats: ConnectionStats
) -> None:
    """Write batches until the queue is closed and drained."""
    while batch := await queue.take_batch():
        await stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
        stats.send_calls += 1
        stats.frames_sent += len(batch)


async def receive_frame(stream: trio.abc.ReceiveStream, decoder: FrameDecoder) -> object:
    """One frame, reading as needed (handshake only: later reads use the loops)."""
    await trio.lowlevel.checkpoint()
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(RECEIVE_BYTES_MAX)
        if not data:
            raise trio.BrokenResourceError("the peer closed the connection")
        decoder.feed(data)
    return frame


def set_nodelay(stream: trio.SocketStream) -> None:
    # Requests and replies are small and latency-bound; batching is done above, by
    # the send loop, so Nagle's delay would only add latency.
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)


def format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_of(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    return format_peer(str(address[0]), int(address[1]))


# What a request sent with `RpcConnection.request_nowait` ends with: the reply's
# body, or the error it failed with (an error reply, or the connection lost).
ReplyCallback = Callable[[object, KvsvrError | None], None]
