"""The wire: frames, the message envelope, authentication and RPC connections."""

from kvsvr.net.auth import ClientHandshake, ServerHandshake
from kvsvr.net.connection import (
    ConnectionStats,
    Handler,
    RpcConnection,
    connect,
    serve,
)
from kvsvr.net.framing import MAX_FRAME_BYTES, FrameDecoder, encode_frame, encode_frames
from kvsvr.net.messages import (
    Message,
    OneWay,
    Reply,
    Request,
    encode_message,
    encode_messages,
    error_reply,
    from_wire,
    ok_reply,
    to_wire,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "ClientHandshake",
    "ConnectionStats",
    "FrameDecoder",
    "Handler",
    "Message",
    "OneWay",
    "Reply",
    "Request",
    "RpcConnection",
    "ServerHandshake",
    "connect",
    "encode_frame",
    "encode_frames",
    "encode_message",
    "encode_messages",
    "error_reply",
    "from_wire",
    "ok_reply",
    "serve",
    "to_wire",
]
