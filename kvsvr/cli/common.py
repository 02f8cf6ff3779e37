"""What every `kvsvr` command shares: exit codes, argument types, and how
messages reach the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Final

from kvsvr.client import parse_address
from kvsvr.config import ClusterConfig
from kvsvr.errors import InvalidRequest
from kvsvr.net.tls import TLSOptions
from kvsvr.protocol.placement import PARTITIONS_MAX

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFLICT: Final = 3
EXIT_UNAVAILABLE: Final = 4
EXIT_ERROR: Final = 5

EXIT_CODES_HELP: Final = """\
exit codes:
  0  done
  1  not found (get)
  2  usage error
  3  conflict: a condition (--if-version, --if-absent) did not hold; nothing written
  4  unavailable or timed out: the outcome of a write is unknown
  5  any other error (authentication failed, invalid request, bad config, ...)
"""

DEFAULT_TIMEOUT_S: Final = 5.0


class UsageError(Exception):
    """A command line that parses but does not make sense; exit code 2."""


def complain(message: str) -> None:
    """One line on stderr."""
    print(f"kvsvr: {' '.join(message.split())}", file=sys.stderr, flush=True)


def say(message: str = "") -> None:
    print(message, flush=True)


def show(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


# --- argument types -----------------------------------------------------------------


def int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {text!r}"
            ) from None
        if not (0 <= value if allow_zero else 0 < value) or value == float("inf"):
            bound = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


def partition_count(text: str) -> int:
    value = int_in(1, PARTITIONS_MAX)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def addresses(text: str) -> list[str]:
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("expected HOST:PORT[,HOST:PORT...]")
    for address in addresses:
        try:
            parse_address(address)
        except InvalidRequest as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return addresses


# --- TLS ----------------------------------------------------------------------------


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cacert",
        metavar="FILE",
        dest="tls_cacert",
        help="connect with TLS, trusting this CA (default: --config's [tls])",
    )
    parser.add_argument(
        "--cert", metavar="FILE", dest="tls_cert", help="client certificate (with --cacert)"
    )
    parser.add_argument(
        "--key", metavar="FILE", dest="tls_key", help="the client certificate's key"
    )


def tls_options(args: argparse.Namespace, config: ClusterConfig | None) -> TLSOptions | None:
    """The client's TLS from --cacert/--cert/--key, else from the config's [tls]
    (its CA and client certificate); None: plain TCP."""
    if args.tls_cacert is None:
        if args.tls_cert is not None or args.tls_key is not None:
            raise UsageError("--cert and --key need --cacert (the CA that signed the nodes)")
        if config is None or config.tls is None:
            return None
        return TLSOptions(config.tls.ca, config.tls.client_cert, config.tls.client_key)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("give --cert and --key together")
    return TLSOptions(args.tls_cacert, args.tls_cert, args.tls_key)
