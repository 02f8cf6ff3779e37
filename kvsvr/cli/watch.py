"""`kvsvr watch`: print a key's (or a partition key's rows') changes as they
are chosen, one line each, until interrupted or `--count` events."""

from __future__ import annotations

import argparse
import os

from kvsvr.cli.common import EXIT_OK, say, show
from kvsvr.client import Client
from kvsvr.keys import UserKey


def _watched(args: argparse.Namespace) -> UserKey:
    key = os.fsencode(args.key)
    if args.sort_key is None or args.partition:
        return key
    return key, os.fsencode(args.sort_key)


async def watch(client: Client, args: argparse.Namespace) -> int:
    """One line per event: [SORT_KEY <tab>] VALUE or (deleted) <tab> (version N)."""
    delivered = 0
    async with client.watch(
        _watched(args),
        table=args.table,
        start_version=args.start_version,
        partition=args.partition,
    ) as events:
        async for event in events:
            shown = "(deleted)" if event.value is None else show(event.value)
            prefix = f"{show(event.key)}\t" if args.partition else ""
            say(f"{prefix}{shown}\t(version {event.version})")
            delivered += 1
            if args.count is not None and delivered >= args.count:
                break
    return EXIT_OK
