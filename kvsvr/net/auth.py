"""Mutual HMAC-SHA256 challenge-response on a new connection, sans-IO.

Both sides prove they know the cluster secret without sending it, each over a
nonce the other side chose, so neither a recorded exchange nor a reflected
proof can be replayed:

    server -> client   ["hello", server_nonce, auth_required]
    client -> server   ["auth", client_nonce, hmac(secret, b"client" + server_nonce + client_nonce)]
    server -> client   ["welcome", hmac(secret, b"server" + client_nonce + server_nonce)]
                   or  ["denied", reason]

A server without a secret runs an open cluster: its hello says
auth_required=False, it welcomes anyone, and it proves nothing (its welcome
carries an empty proof). A client that holds a secret refuses such a server,
since it cannot tell it from an impostor; a client without one refuses a server
that requires one.

A node that serves TLS sends `TLS_NOTICE` in plain TCP before anything else
and runs this exchange inside TLS (`kvsvr.net.tls`); a client without TLS
that gets the notice instead of a hello refuses at once, saying why.

The two classes below only turn messages into messages; the caller moves them
over the wire as frames. Every state and transition of both sides is in
`_TRANSITIONS`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from typing import Final, NoReturn

from kvsvr.errors import AuthenticationFailed, FrameError

# 32 random bytes make a nonce that never repeats across the lifetime of a cluster.
NONCE_BYTES: Final = 32
PROOF_BYTES: Final = hashlib.sha256().digest_size

# Reasons in a denial are for logs; a cap keeps a hostile server from filling them.
DENIAL_REASON_CHARS_MAX: Final = 256

RandomBytes = Callable[[int], bytes]

# What a TLS node sends, in plain TCP, before the TLS handshake.
TLS_NOTICE: Final = ["tls", 1]


def is_tls_notice(message: object) -> bool:
    return message == TLS_NOTICE


class HandshakeState(enum.Enum):
    # server
    SERVER_START = "server start"
    AWAIT_AUTH = "awaiting the client's auth"
    # client
    AWAIT_HELLO = "awaiting the server's hello"
    AWAIT_VERDICT = "awaiting the server's verdict"
    # both
    AUTHENTICATED = "authenticated"
    DENIED = "denied"


# (state, event) -> next state. Anything not listed is a caller bug.
_TRANSITIONS: Final[dict[tuple[HandshakeState, str], HandshakeState]] = {
    (HandshakeState.SERVER_START, "send hello"): HandshakeState.AWAIT_AUTH,
    (HandshakeState.AWAIT_AUTH, "accept auth"): HandshakeState.AUTHENTICATED,
    (HandshakeState.AWAIT_AUTH, "deny auth"): HandshakeState.DENIED,
    (HandshakeState.AWAIT_HELLO, "answer hello"): HandshakeState.AWAIT_VERDICT,
    (HandshakeState.AWAIT_HELLO, "refuse hello"): HandshakeState.DENIED,
    (HandshakeState.AWAIT_VERDICT, "welcomed"): HandshakeState.AUTHENTICATED,
    (HandshakeState.AWAIT_VERDICT, "refuse verdict"): HandshakeState.DENIED,
}


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.digest(secret, b"client" + server_nonce + client_nonce, "sha256")


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.digest(secret, b"server" + client_nonce + server_nonce, "sha256")


class _Handshake:
    def __init__(self, state: HandshakeState, random_bytes: RandomBytes) -> None:
        self._state = state
        self._random_bytes = random_bytes

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def authenticated(self) -> bool:
        return self._state is HandshakeState.AUTHENTICATED

    def _advance(self, event: str) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise RuntimeError(f"handshake cannot {event!r} in state {self._state.value!r}")
        self._state = next_state

    def _nonce(self) -> bytes:
        nonce = self._random_bytes(NONCE_BYTES)
        assert isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES, "bad random source"
        return nonce


class ServerHandshake(_Handshake):
    """The accepting side. `hello()` first; then `receive_auth(message)` returns
    the verdict to send. It never raises on what the client sends: anything
    wrong becomes a denial."""

    def __init__(self, secret: bytes | None, random_bytes: RandomBytes) -> None:
        super().__init__(HandshakeState.SERVER_START, random_bytes)
        self._secret = secret
        self._server_nonce = self._nonce()
        self.denial_reason: str | None = None

    @property
    def auth_required(self) -> bool:
        """False for an open cluster (no secret): anyone may connect. The node
        should log a warning when it serves one."""
        return self._secret is not None

    def hello(self) -> list[object]:
        self._advance("send hello")
        return ["hello", self._server_nonce, self.auth_required]

    def receive_auth(self, message: object) -> list[object]:
        try:
            client_nonce, proof = _parse_auth(message)
        except FrameError as exc:
            return self._deny(f"malformed auth message: {exc}")
        if self._secret is None:
            self._advance("accept auth")
            return ["welcome", b""]
        expected = client_proof(self._secret, self._server_nonce, client_nonce)
        if not hmac.compare_digest(expected, proof):
            return self._deny("wrong cluster secret")
        self._advance("accept auth")
        return ["welcome", server_proof(self._secret, self._server_nonce, client_nonce)]

    def _deny(self, reason: str) -> list[object]:
        self._advance("deny auth")
        self.denial_reason = reason
        return ["denied", reason]


class ClientHandshake(_Handshake):
    """The connecting side. `receive_hello(message)` returns the auth message to
    send; `receive_verdict(message)` checks the server's answer. Both raise
    `AuthenticationFailed` when the two sides do not share the secret and
    `FrameError` when the server does not speak this protocol."""

    def __init__(self, secret: bytes | None, random_bytes: RandomBytes) -> None:
        super().__init__(HandshakeState.AWAIT_HELLO, random_bytes)
        self._secret = secret
        self._client_nonce = self._nonce()
        self._server_nonce = b""

    def receive_hello(self, message: object) -> list[object]:
        if is_tls_notice(message):
            self._refuse(
                "refuse hello",
                "the node expects TLS and this client connects in plain TCP: "
                "connect with TLS options (the CLI's --cacert, --cert and --key)",
            )
        try:
            server_nonce, auth_required = _parse_hello(message)
        except FrameError:
            self._advance("refuse hello")
            raise
        if auth_required and self._secret is None:
            self._refuse("refuse hello", "the server requires a cluster secret and none is set")
        if not auth_required and self._secret is not None:
            self._refuse(
                "refuse hello",
                "the server runs an open cluster (no secret), so it cannot prove it "
                "belongs to this cluster; refusing it because a secret is set",
            )
        self._advance("answer hello")
        self._server_nonce = server_nonce
        proof = b""
        if self._secret is not None:
            proof = client_proof(self._secret, server_nonce, self._client_nonce)
        return ["auth", self._client_nonce, proof]

    def receive_verdict(self, message: object) -> None:
        try:
            proof = _parse_verdict(message)
        except (FrameError, AuthenticationFailed):
            self._advance("refuse verdict")
            raise
        if self._secret is not None:
            expected = server_proof(self._secret, self._server_nonce, self._client_nonce)
            if not hmac.compare_digest(expected, proof):
                self._refuse("refuse verdict", "the server could not prove it knows the secret")
        self._advance("welcomed")

    def _refuse(self, event: str, reason: str) -> NoReturn:
        self._advance(event)
        raise AuthenticationFailed(reason)


def _parse_hello(message: object) -> tuple[bytes, bool]:
    if not (isinstance(message, list) and len(message) == 3 and message[0] == "hello"):
        raise FrameError("expected the server's hello: ['hello', nonce, auth_required]")
    _, nonce, auth_required = message
    if type(auth_required) is not bool:
        raise FrameError("auth_required in the server's hello must be a bool")
    return _checked_bytes(nonce, "server nonce", NONCE_BYTES), auth_required


def _parse_auth(message: object) -> tuple[bytes, bytes]:
    if not (isinstance(message, list) and len(message) == 3 and message[0] == "auth"):
        raise FrameError("expected ['auth', nonce, proof]")
    _, nonce, proof = message
    if not isinstance(proof, bytes) or len(proof) not in (0, PROOF_BYTES):
        raise FrameError(f"proof must be empty or {PROOF_BYTES} bytes")
    return _checked_bytes(nonce, "client nonce", NONCE_BYTES), proof


def _parse_verdict(message: object) -> bytes:
    if isinstance(message, list) and len(message) == 2 and message[0] == "denied":
        reason = message[1] if isinstance(message[1], str) else repr(message[1])
        raise AuthenticationFailed(
            f"the server denied authentication: {reason[:DENIAL_REASON_CHARS_MAX]}"
        )
    if not (isinstance(message, list) and len(message) == 2 and message[0] == "welcome"):
        raise FrameError("expected the server's verdict: ['welcome', proof] or ['denied', reason]")
    proof = message[1]
    if not isinstance(proof, bytes) or len(proof) not in (0, PROOF_BYTES):
        raise FrameError(f"server proof must be empty or {PROOF_BYTES} bytes")
    return proof


def _checked_bytes(value: object, name: str, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise FrameError(f"{name} must be {length} bytes")
    return value
