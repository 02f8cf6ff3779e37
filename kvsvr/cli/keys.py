"""The key commands (get, put, cas, del, scan) and what status and recover
share with them: which cluster, a connected client, and errors as exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Final, cast

import trio

from kvsvr.cli.common import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    UsageError,
    addresses,
    complain,
    say,
    show,
    tls_options,
)
from kvsvr.client import Client, TLSOptions, connect
from kvsvr.config import ConfigError, load_config
from kvsvr.errors import (
    AuthenticationFailed,
    Conflict,
    CorruptRow,
    InvalidRequest,
    KvsvrError,
    Timeout,
    Unavailable,
)
from kvsvr.keys import UserKey

_ERROR_NAMES: Final[tuple[tuple[type[KvsvrError], str, int], ...]] = (
    (Conflict, "conflict", EXIT_CONFLICT),
    (Timeout, "timed out", EXIT_UNAVAILABLE),
    (Unavailable, "unavailable", EXIT_UNAVAILABLE),
    (AuthenticationFailed, "authentication failed", EXIT_ERROR),
    (InvalidRequest, "invalid request", EXIT_ERROR),
    (CorruptRow, "corrupt row", EXIT_ERROR),
    (KvsvrError, "error", EXIT_ERROR),
)


def exit_code_for(error: KvsvrError) -> int:
    return next(code for kind, _, code in _ERROR_NAMES if isinstance(error, kind))


def _error_name(error: KvsvrError) -> str:
    return next(name for kind, name, _ in _ERROR_NAMES if isinstance(error, kind))


Operation = Callable[[Client, argparse.Namespace], Awaitable[int]]


def run_client(args: argparse.Namespace) -> int:
    validate = getattr(args, "validate", None)
    if validate is not None:
        validate(args)  # a UsageError before anything is sent
    try:
        addresses, secret, tls = _cluster_target(args)
        value_from_stdin = getattr(args, "value", None) == "-"
        if value_from_stdin:
            args.value_bytes = sys.stdin.buffer.read()
        elif getattr(args, "value", None) is not None:
            args.value_bytes = os.fsencode(args.value)
        operation = cast(Operation, args.operation)
        return trio.run(_run_operation, operation, args, addresses, secret, tls)
    except KvsvrError as exc:
        complain(f"{_error_name(exc)}: {exc}")
        return exit_code_for(exc)
    except ConfigError as exc:
        complain(f"bad config: {exc}")
        return EXIT_ERROR


def _cluster_target(
    args: argparse.Namespace,
) -> tuple[list[str], str | bytes | None, TLSOptions | None]:
    """The addresses to try, the secret and the TLS options, from the options
    and environment."""
    secret: str | bytes | None = args.secret
    if secret is None:
        secret = os.environ.get("KVSVR_SECRET") or None
    if args.cluster:
        return cast(list[str], args.cluster), secret, tls_options(args, None)
    if args.config:
        config = load_config(args.config)
        addresses_of_config = [node.address for node in config.nodes]
        return addresses_of_config, secret or config.secret, tls_options(args, config)
    from_environment = os.environ.get("KVSVR_CLUSTER", "")
    if from_environment.strip():
        try:
            return addresses(from_environment), secret, tls_options(args, None)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"KVSVR_CLUSTER: {exc}") from None
    raise UsageError("say which cluster: --cluster HOST:PORT[,...] or --config FILE")


async def _run_operation(
    operation: Operation,
    args: argparse.Namespace,
    addresses: list[str],
    secret: str | bytes | None,
    tls: TLSOptions | None,
) -> int:
    async with connect(addresses, secret=secret, timeout_s=args.timeout_s, tls=tls) as client:
        return await operation(client, args)


def _user_key(args: argparse.Namespace) -> UserKey:
    key = os.fsencode(args.key)
    if args.sort_key is None:
        return key
    return key, os.fsencode(args.sort_key)


async def get(client: Client, args: argparse.Namespace) -> int:
    item = await client.get(
        _user_key(args),
        table=args.table,
        consistency=args.consistency,
        max_age_s=args.max_age_s,
    )
    if item is None:
        shown = args.key if args.sort_key is None else f"{args.key} / {args.sort_key}"
        complain(f"not found: {shown}")
        return EXIT_NOT_FOUND
    if args.raw:
        sys.stdout.buffer.write(item.value)
        sys.stdout.buffer.flush()
    else:
        say(f"{show(item.value)}  (version {item.version})")
    return EXIT_OK


async def put(client: Client, args: argparse.Namespace) -> int:
    version = await client.put(
        _user_key(args),
        args.value_bytes,
        table=args.table,
        if_version=args.if_version,
        if_absent=args.if_absent,
    )
    say(f"ok  (version {version})")
    return EXIT_OK


async def cas(client: Client, args: argparse.Namespace) -> int:
    version = await client.cas(
        _user_key(args), args.value_bytes, if_version=args.if_version, table=args.table
    )
    say(f"ok  (version {version})")
    return EXIT_OK


async def delete(client: Client, args: argparse.Namespace) -> int:
    version = await client.delete(_user_key(args), table=args.table, if_version=args.if_version)
    say(f"deleted  (version {version})")
    return EXIT_OK


async def scan(client: Client, args: argparse.Namespace) -> int:
    items = await client.scan(
        os.fsencode(args.partition_key),
        table=args.table,
        start=None if args.start is None else os.fsencode(args.start),
        end=None if args.end is None else os.fsencode(args.end),
        limit=args.limit,
    )
    for item in items:
        assert item.key is not None
        say(f"{show(item.key)}\t{show(item.value)}\t(version {item.version})")
    return EXIT_OK
