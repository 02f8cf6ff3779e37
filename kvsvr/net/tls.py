"""TLS on kvsvr's links: stdlib `ssl` through `trio.SSLStream`.

A node with TLS serves only TLS, on clients and peers alike, and checks
certificates both ways: it presents its own and requires the other end's,
each signed by the cluster's CA (so a peer link is mutual TLS, and a client
needs a certificate from the same CA). The HMAC handshake of
`kvsvr.net.auth` then runs inside TLS as it runs on plain TCP, so a cluster
may keep its secret too.

On a new connection a TLS node first sends one plain frame, the notice
`auth.TLS_NOTICE`, then waits for the TLS handshake. A TLS client reads the
notice and starts TLS; a plain client gets the notice where it expects the
HMAC hello and fails at once with an error that says the node expects TLS
(rather than waiting out a timeout); a TLS client that gets a plain hello
says the node does not use TLS. The node logs why it refused each
connection that does not finish the handshake.

A client checks the node's certificate against the name it dialed (an IP
address or a DNS name; certificates carry both as subject alternative
names). A node dialing a peer checks the peer's advertised host instead, so
a link through a relay (`peer_addresses`) still checks whom it reaches.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from kvsvr.errors import AuthenticationFailed
from kvsvr.net.auth import TLS_NOTICE, is_tls_notice
from kvsvr.net.framing import FrameDecoder, encode_frame
from kvsvr.net.stream import receive_frame

# Both ends are kvsvr, built on one Python and OpenSSL: no older peer needs
# an older protocol, and TLS 1.3 takes one round trip less to set up.
TLS_VERSION_MIN: Final = ssl.TLSVersion.TLSv1_3

# A refusal's reason as the peer's TLS alert names it (OpenSSL's words) is for
# logs and error messages; a cap keeps a hostile peer's text short.
TLS_REASON_CHARS_MAX: Final = 200


class TLSSetupError(ValueError):
    """A CA, certificate or key file cannot be loaded; the message says which."""


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """A client's TLS: the cluster's CA (`cafile`), and the client's own
    certificate and key, which a TLS node requires (signed by that CA)."""

    cafile: str | Path
    certfile: str | Path | None = None
    keyfile: str | Path | None = None


def client_context(options: TLSOptions) -> ssl.SSLContext:
    """The context a client (or a node dialing a peer) connects with."""
    if not isinstance(options, TLSOptions):
        raise TLSSetupError(f"tls must be a kvsvr.TLSOptions, not {type(options).__name__}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks names and certificates
    context.minimum_version = TLS_VERSION_MIN
    _load(context.load_verify_locations, "CA", options.cafile)
    if (options.certfile is None) != (options.keyfile is None):
        raise TLSSetupError("give both a TLS certificate and its key, or neither")
    if options.certfile is not None:
        _load(context.load_cert_chain, "certificate and key", options.certfile, options.keyfile)
    return context


def server_context(cafile: str | Path, certfile: str | Path, keyfile: str | Path) -> ssl.SSLContext:
    """The context a node serves with: its certificate, and every client's
    required and checked against the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSION_MIN
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context.load_verify_locations, "CA", cafile)
    _load(context.load_cert_chain, "certificate and key", certfile, keyfile)
    return context


def _load(load: object, what: str, *paths: str | Path | None) -> None:
    assert callable(load)
    named = " and ".join(str(path) for path in paths)
    try:
        load(*(str(path) for path in paths))
    except FileNotFoundError as exc:
        raise TLSSetupError(f"TLS {what}: no such file {exc.filename or named}") from None
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"TLS {what} ({named}) cannot be loaded: {exc}") from None


async def start_client_tls(
    stream: trio.SocketStream, decoder: FrameDecoder, context: ssl.SSLContext, server_name: str
) -> trio.SSLStream[trio.SocketStream]:
    """Read the node's TLS notice and run the TLS handshake over `stream`."""
    notice = await receive_frame(stream, decoder)
    if not is_tls_notice(notice):
        raise AuthenticationFailed(
            "the node does not use TLS (it answered in plain TCP), and this client has TLS "
            "options: connect without them, or turn TLS on in the cluster's config"
        )
    # The node sends nothing past the notice until the client's TLS hello.
    assert decoder.buffered_bytes == 0, "bytes past the TLS notice"
    tls_stream = trio.SSLStream(stream, context, server_hostname=server_name)
    await tls_stream.do_handshake()
    return tls_stream


async def start_server_tls(
    stream: trio.SocketStream, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """Send the TLS notice and run the TLS handshake as the server. Raises
    `trio.BrokenResourceError` when it fails (`refusal_reason` says why)."""
    await stream.send_all(encode_frame(TLS_NOTICE))
    tls_stream = trio.SSLStream(stream, context, server_side=True)
    await tls_stream.do_handshake()
    return tls_stream


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a broken stream, if TLS broke it."""
    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    return cause if isinstance(cause, ssl.SSLError) else None


def refusal_reason(exc: BaseException) -> str:
    """Why a node refused a connection whose TLS handshake failed, for its log."""
    failure = tls_failure(exc)
    if failure is None or isinstance(failure, ssl.SSLEOFError):
        return (
            "it closed the connection before finishing the TLS handshake: a plain TCP "
            "client (this node expects TLS), or one that does not trust this node's certificate"
        )
    reason = str(failure.reason or failure)[:TLS_REASON_CHARS_MAX]
    if failure.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD"):
        return f"it does not speak TLS ({reason}); this node expects TLS"
    return f"the TLS handshake failed: {reason}"


def client_failure(exc: BaseException) -> tuple[str, bool] | None:
    """What a client says when TLS with a node failed, and whether that is
    certain (an authentication failure) rather than possibly the node going
    away; None if TLS is not why."""
    failure = tls_failure(exc)
    if failure is None:
        return None
    reason = str(failure.reason or failure)[:TLS_REASON_CHARS_MAX]
    if isinstance(failure, ssl.SSLCertVerificationError):
        return (
            f"the node's TLS certificate is not trusted: {failure.verify_message or reason} "
            "(is cafile the cluster's CA, and is the address one the certificate names?)",
            True,
        )
    if "ALERT" in reason.upper():
        return (
            f"the node refused this client's TLS certificate ({reason}): a TLS node "
            "requires a client certificate signed by the cluster's CA",
            True,
        )
    if isinstance(failure, ssl.SSLEOFError) or "EOF" in reason:
        # A node that refuses the client's certificate closes the connection
        # right after the client's side of the handshake (TLS 1.3), most often
        # without the alert that would say so; a node that stops does the same.
        return (
            f"the node closed the connection during TLS setup ({reason}): it refuses this "
            "client's certificate (a TLS node requires one signed by the cluster's CA), "
            "or it stopped",
            False,
        )
    return f"TLS with the node failed: {reason}", True
