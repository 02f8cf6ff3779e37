"""The envelope every frame after the handshake carries, sans-IO.

    request   [0, request_id, method, body]      a reply is expected
    reply     [1, request_id, ok, body]          body is [code, message] when not ok
    one-way   [2, 0, method, body]               no reply

Request ids are chosen by the side that sends the request and start at 1; a
reply with id 0 reports a problem with the connection itself (a bad frame)
rather than with one request. Bodies are any msgpack value; what they mean is
up to the method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from kvsvr.errors import FrameError, KvsvrError, error_from_code
from kvsvr.net.framing import encode_frame

REQUEST: Final = 0
REPLY: Final = 1
ONEWAY: Final = 2

# Request ids must survive msgpack as a plain signed 64-bit int on every client.
REQUEST_ID_MAX: Final = 2**63 - 1

# The id a reply carries when it is about the connection rather than a request.
CONNECTION_REQUEST_ID: Final = 0

# Method names are short identifiers ("get", "paxos.prepare"); a cap keeps a peer
# from making every log line and metric label arbitrarily long.
METHOD_NAME_CHARS_MAX: Final = 64

# Error messages are for humans and logs; a cap keeps a failing peer from filling
# them.
ERROR_MESSAGE_CHARS_MAX: Final = 4096


# Envelopes are values, never changed once built; not `frozen` only for the
# cost of a frozen __init__ (about 5x a plain one), paid per frame.
# `unsafe_hash` keeps them hashable.
@dataclass(slots=True, unsafe_hash=True)
class Request:
    request_id: int
    method: str
    body: Any


@dataclass(slots=True, unsafe_hash=True)
class Reply:
    request_id: int
    ok: bool
    body: Any  # [code, message] when not ok

    def error(self) -> KvsvrError:
        """The error a failed reply stands for, as the class its code names."""
        assert not self.ok, "only a failed reply carries an error"
        code, message = _error_body(self.body)
        return error_from_code(code, message)


@dataclass(slots=True, unsafe_hash=True)
class OneWay:
    method: str
    body: Any


Message = Request | Reply | OneWay


def ok_reply(request_id: int, body: object) -> Reply:
    return Reply(request_id, True, body)


def error_reply(request_id: int, code: str, message: str) -> Reply:
    return Reply(request_id, False, [code, message[:ERROR_MESSAGE_CHARS_MAX]])


def error_reply_for(request_id: int, error: KvsvrError) -> Reply:
    return error_reply(request_id, error.code, str(error))


def to_wire(message: Message) -> list[object]:
    """The msgpack list for `message`."""
    # Exact classes first: a `type() is` test costs a fraction of a class pattern.
    if type(message) is Reply:
        return [REPLY, message.request_id, message.ok, message.body]
    if type(message) is Request:
        return [REQUEST, message.request_id, message.method, message.body]
    if type(message) is OneWay:
        return [ONEWAY, CONNECTION_REQUEST_ID, message.method, message.body]
    match message:
        case Request(request_id, method, body):
            return [REQUEST, request_id, method, body]
        case Reply(request_id, ok, body):
            return [REPLY, request_id, ok, body]
        case OneWay(method, body):
            return [ONEWAY, CONNECTION_REQUEST_ID, method, body]


def encode_message(message: Message) -> bytes:
    """`message` as one frame; raises `FrameError` if it cannot be encoded."""
    return encode_frame(to_wire(message))


def encode_request(request_id: int, method: str, body: object) -> bytes:
    """`encode_message(Request(request_id, method, body))`, without building the
    Request: a client sends one per operation."""
    return encode_frame([REQUEST, request_id, method, body])


def encode_messages(messages: Iterable[Message]) -> bytes:
    """Several messages for one peer, coalesced into one buffer for one send."""
    return b"".join(encode_message(message) for message in messages)


def from_wire(obj: object) -> Message:
    """Validate a decoded frame and return the message it carries.

    Anything not shaped like an envelope raises `FrameError` saying what is wrong.
    """
    if type(obj) is list and len(obj) == 4:
        # The frames of every operation (a request, a successful reply, a
        # one-way message) with the exact types msgpack gives: the checks below,
        # each kind in one expression.
        # Anything else takes the field-by-field path and its error messages.
        kind, request_id, third, body = obj
        if type(kind) is int and type(request_id) is int:
            if kind == REQUEST:
                if (
                    type(third) is str
                    and 0 < len(third) <= METHOD_NAME_CHARS_MAX
                    and 1 <= request_id <= REQUEST_ID_MAX
                ):
                    return Request(request_id, third, body)
            elif kind == REPLY:
                if third is True and 0 <= request_id <= REQUEST_ID_MAX:
                    return Reply(request_id, True, body)
            elif (
                kind == ONEWAY
                and request_id == CONNECTION_REQUEST_ID
                and type(third) is str
                and 0 < len(third) <= METHOD_NAME_CHARS_MAX
            ):
                return OneWay(third, body)
    return _checked_from_wire(obj)


def _checked_from_wire(obj: object) -> Message:
    """`from_wire` check by check, with a message for whatever is wrong."""
    if not isinstance(obj, list) or len(obj) != 4:
        raise FrameError("message must be a list of 4 items: [kind, request id, ..., body]")
    kind, request_id, third, body = obj
    if type(kind) is not int or kind not in (REQUEST, REPLY, ONEWAY):
        raise FrameError(f"message kind must be 0, 1 or 2, got {_describe(kind)}")
    if type(request_id) is not int:
        raise FrameError(f"request id must be an int, got {_describe(request_id)}")
    if kind == REPLY:
        return _reply_from_wire(request_id, third, body)
    method = _check_method(third)
    if kind == ONEWAY:
        if request_id != CONNECTION_REQUEST_ID:
            raise FrameError(f"a one-way message must carry request id 0, got {request_id}")
        return OneWay(method, body)
    if not 1 <= request_id <= REQUEST_ID_MAX:
        raise FrameError(f"request id must be in [1, {REQUEST_ID_MAX}], got {request_id}")
    return Request(request_id, method, body)


def _reply_from_wire(request_id: int, ok: object, body: object) -> Reply:
    if not 0 <= request_id <= REQUEST_ID_MAX:
        raise FrameError(f"reply id must be in [0, {REQUEST_ID_MAX}], got {request_id}")
    if type(ok) is not bool:
        raise FrameError(f"reply ok flag must be a bool, got {_describe(ok)}")
    if not ok:
        _error_body(body)
    return Reply(request_id, ok, body)


def _error_body(body: object) -> tuple[str, str]:
    if (
        not isinstance(body, list)
        or len(body) != 2
        or not isinstance(body[0], str)
        or not isinstance(body[1], str)
    ):
        raise FrameError("a failed reply's body must be [error code: str, message: str]")
    return body[0], body[1]


def _check_method(method: object) -> str:
    if not isinstance(method, str):
        raise FrameError(f"method must be a str, got {_describe(method)}")
    if not 0 < len(method) <= METHOD_NAME_CHARS_MAX:
        raise FrameError(f"method name must have 1 to {METHOD_NAME_CHARS_MAX} characters")
    return method


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"
