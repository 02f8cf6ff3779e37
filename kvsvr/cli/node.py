"""`kvsvr node`: run one node in the foreground."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import cast

from kvsvr.cli.common import EXIT_ERROR, complain
from kvsvr.config import ConfigError


def run_node_command(args: argparse.Namespace) -> int:
    # Imported here so every other command works without (or before) the node code.
    try:
        server = importlib.import_module("kvsvr.node.server")
    except ModuleNotFoundError as exc:
        if exc.name not in ("kvsvr.node", "kvsvr.node.server"):
            raise
        complain(f"this kvsvr has no node implementation ({exc})")
        return EXIT_ERROR
    run_node = cast(Callable[..., int], server.run_node)
    try:
        return run_node(
            args.config,
            args.id,
            args.initial_cluster_state,
            test_clock_control=args.test_clock_control,
        )
    except ConfigError as exc:
        complain(f"bad config: {exc}")
        return EXIT_ERROR
