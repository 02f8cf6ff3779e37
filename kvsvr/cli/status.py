"""`kvsvr status` and `kvsvr recover`, and the status tables they print."""

from __future__ import annotations

import argparse
import json
from typing import Any, Final

import trio

from kvsvr.cli.common import EXIT_OK, EXIT_UNAVAILABLE, UsageError, say, show
from kvsvr.client import Client

# `kvsvr recover` waits this long for the nodes to rebuild and the cluster to be ready.
RECOVER_WAIT_S: Final = 300.0


async def show_status(client: Client, args: argparse.Namespace) -> int:
    if args.node is not None:
        status = await client.status(args.node)
        if args.json:
            say(json.dumps(status, indent=2, sort_keys=True, default=_json_default))
        else:
            for line in format_status(status):
                say(line)
        return EXIT_OK
    statuses = await client.cluster_status()
    if args.json:
        say(json.dumps(statuses, indent=2, sort_keys=True, default=_json_default))
    else:
        for line in format_cluster_status(statuses):
            say(line)
        for line in format_operator_messages(statuses):
            say(line)
        say()
        for line in format_cache_status(statuses):
            say(line)
        say()
        for line in format_catch_up(statuses):
            say(line)
    return EXIT_OK if all(s.get("health") == "ready" for s in statuses) else EXIT_UNAVAILABLE


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return show(value)
    return str(value)


def check_recover(args: argparse.Namespace) -> None:
    if not args.accept_data_loss:
        raise UsageError(
            "recovery may lose acknowledged writes; say --accept-data-loss to go ahead"
        )


async def recover_cluster(client: Client, args: argparse.Namespace) -> int:
    statuses = await client.cluster_status()
    waiting = [s for s in statuses if s.get("health") == "needs_operator"]
    for line in format_operator_messages(statuses):
        say(line)
    if not waiting:
        say("no node needs an operator")
    answers: dict[str, Any] = {}

    async def recover_node(node: str) -> None:
        answers[node] = await client.recover(node, accept_data_loss=True, timeout_s=args.wait_s)

    async with trio.open_nursery() as nursery:
        for status in waiting:
            nursery.start_soon(recover_node, str(status.get("node")))
    for node, answer in sorted(answers.items()):
        loss = answer.get("loss") if isinstance(answer, dict) else None
        if isinstance(loss, dict):
            say(f"{node}: recovered; {loss.get('message')}")
        else:
            say(f"{node}: {answer.get('state') if isinstance(answer, dict) else answer}")
    await client.wait_ready(timeout_s=args.wait_s)
    say("cluster ready")
    return EXIT_OK


def format_operator_messages(statuses: list[dict[str, Any]]) -> list[str]:
    """The 'needs operator' lines of the nodes that wait for one."""
    lines: list[str] = []
    for status in statuses:
        replication = status.get("replication")
        message = replication.get("needs_operator") if isinstance(replication, dict) else None
        if message:
            lines.append(
                f"{status.get('node', '?')}: {message} "
                "(kvsvr recover --accept-data-loss brings it back from the rest)"
            )
    return lines


def describe_health(status: dict[str, Any]) -> str:
    """A node's state in words, with a rebuild's progress."""
    health = str(status.get("health"))
    if health == "rebuilding":
        replication = status.get("replication")
        rebuild = replication.get("rebuild") if isinstance(replication, dict) else None
        if isinstance(rebuild, dict):
            waiting = rebuild.get("waiting_for") or []
            if waiting:
                return f"rebuilding, waiting for {', '.join(map(str, waiting))}"
            return (
                f"rebuilding ({rebuild.get('tables_done', 0)}/{rebuild.get('tables_total', '?')} "
                f"tables, {rebuild.get('rows_rebuilt', 0)} rows)"
            )
    return health.replace("_", " ")


def format_cluster_status(statuses: list[dict[str, Any]]) -> list[str]:
    """One line per node: partitions held and preferred, uptime, and its state
    (ready, starting, waiting for peers, rebuilding, needs operator, or why it
    could not be asked)."""
    header = (
        f"{'node':<6} {'address':<21} {'zone':<8} {'held':>5} {'pref':>5} {'uptime':>8}  health"
    )
    lines = [header]
    for status in statuses:
        held = status.get("partitions_held", "-")
        preferred = status.get("partitions_preferred", "-")
        uptime = status.get("uptime_s")
        uptime_text = f"{uptime:.0f}s" if isinstance(uptime, int | float) else "-"
        lines.append(
            f"{status.get('node', '?')!s:<6} {status.get('address', '?')!s:<21} "
            f"{status.get('zone', '?')!s:<8} {held!s:>5} {preferred!s:>5} {uptime_text:>8}  "
            f"{describe_health(status)}"
            + (", UNSAFE: no fsync" if status.get("fsync") is False else "")
        )
    return lines


def format_catch_up(statuses: list[dict[str, Any]]) -> list[str]:
    """Per node: replica state, hints it holds for each peer, and the age of the
    oldest anti-entropy pass among the partitions it holds."""
    lines: list[str] = []
    for status in statuses:
        replication = status.get("replication")
        if not isinstance(replication, dict):
            continue
        hints = replication.get("hints", {})
        pending = " ".join(
            f"{peer}={info.get('pending', '?')}" for peer, info in sorted(hints.items())
        )
        ages = replication.get("anti_entropy", {}).get("last_pass_s_ago", {})
        known = [age for age in ages.values() if isinstance(age, int | float)]
        if not ages:
            oldest = "-"
        elif len(known) < len(ages):
            oldest = f"not yet for {len(ages) - len(known)} of {len(ages)} partitions"
        else:
            oldest = f"{max(known):.0f}s ago"
        lines.append(
            f"{status.get('node', '?')!s:<6} {replication.get('state', '?')!s:<10} "
            f"hints pending: {pending or '-'}  anti-entropy, oldest pass: {oldest}"
        )
    if lines:
        lines.insert(0, "catch-up (--node ID shows per-partition passes and hint counters):")
    return lines


def format_cache_status(statuses: list[dict[str, Any]]) -> list[str]:
    """One line per node about its row cache: hit ratio (strong reads whose
    value came from the cache), bytes used / limit, evictions, stale reads
    served without a quorum round and stale reads that fell back to strong."""
    header = (
        f"{'cache':<6} {'hit ratio':>9} {'used / limit':>21} {'evictions':>10} "
        f"{'stale served':>12} {'fallbacks':>10}"
    )
    lines = [header]
    for status in statuses:
        node = f"{status.get('node', '?')!s:<6}"
        cache = status.get("cache")
        if not isinstance(cache, dict):
            lines.append(f"{node} -")
            continue
        limit = cache.get("bytes_max", 0)
        ratio = cache.get("hit_ratio", 0.0)
        ratio_text = f"{100 * ratio:.1f}%" if isinstance(ratio, int | float) else "-"
        used = f"{_size(cache.get('bytes_used', 0))} / {_size(limit)}" if limit else "off"
        lines.append(
            f"{node} {ratio_text:>9} {used:>21} {cache.get('evictions', 0)!s:>10} "
            f"{cache.get('stale_served', 0)!s:>12} {cache.get('fallbacks', 0)!s:>10}"
        )
    return lines


def _size(size_bytes: object) -> str:
    if not isinstance(size_bytes, int | float):
        return "?"
    if size_bytes < 1 << 20:
        return f"{size_bytes / (1 << 10):.1f} KiB"
    return f"{size_bytes / (1 << 20):.1f} MiB"


def format_status(status: dict[str, Any], indent: int = 0) -> list[str]:
    """A status dict as indented `name: value` lines, names sorted."""
    lines: list[str] = []
    pad = "  " * indent
    for name in sorted(status, key=str):
        value = status[name]
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{name}:")
            lines.extend(format_status(value, indent + 1))
        else:
            lines.append(f"{pad}{name}: {_format_scalar(value)}")
    return lines


def _format_scalar(value: object) -> str:
    if isinstance(value, bytes):
        return show(value)
    if isinstance(value, list | tuple):
        return ", ".join(_format_scalar(item) for item in value) or "(none)"
    if isinstance(value, dict):
        return "(none)"
    return str(value)
