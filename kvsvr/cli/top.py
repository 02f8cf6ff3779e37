"""`kvsvr top`: a terminal view of every node's metrics, refreshed.

It asks the cluster for every node's status (which names the node's
`metrics_address`), scrapes each node's `/metrics` twice, `--interval-s`
apart, and prints one line per node with the rates over that interval:
requests per second, get and put latency (p50/p99, from the histograms'
bucket counts as Prometheus' `histogram_quantile` reads them), the write
fast path's share, quorum rounds per second, commit (fsync) p99 and batch
size, hints pending, anti-entropy lag, rebuild progress, cache size and hit
ratio, read leases held and the strong reads answered locally under them
per second, RSS and CPU. These are the numbers the Grafana dashboard
(docs/grafana-dashboard.json) plots. `--once` prints one frame and exits;
without it the screen is redrawn every interval until Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import trio
from prometheus_client.parser import text_string_to_metric_families

from kvsvr.cli.common import EXIT_OK, EXIT_UNAVAILABLE, say
from kvsvr.client import Client

# `--interval-s` bounds: rates over less than this are mostly noise, and a
# view refreshed less often than this is no longer "top".
INTERVAL_S_MIN: Final = 0.2
INTERVAL_S_MAX: Final = 60.0
INTERVAL_S_DEFAULT: Final = 2.0
# One scrape's time limit; a node slower than this shows as unreachable.
SCRAPE_TIMEOUT_S: Final = 5.0
# A scrape larger than this is refused (a node's is ~20 KiB).
SCRAPE_BYTES_MAX: Final = 4 << 20

_CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
_MIB: Final = float(1 << 20)

# Sample name, sorted label pairs -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _sum(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and wanted <= set(pairs))


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def histogram_quantile(
    quantile: float, before: Samples, after: Samples, name: str, **labels: str
) -> float | None:
    """The `quantile` of a histogram's observations between two scrapes, by
    linear interpolation within the bucket (as PromQL's `histogram_quantile`);
    None when nothing was observed."""
    buckets: list[tuple[float, float]] = []
    for (sample, pairs), count in after.items():
        if sample != f"{name}_bucket":
            continue
        label_map = dict(pairs)
        if any(label_map.get(k) != v for k, v in labels.items()):
            continue
        bound = float(label_map["le"])
        buckets.append((bound, count - before.get((sample, pairs), 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # past the last finite bucket: its bound
            width = count - lower_count
            share = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


@dataclass(frozen=True, slots=True)
class NodeView:
    """What one line of the view shows (None: not known)."""

    node: str
    health: str
    requests_per_s: float | None = None
    get_ms: tuple[float | None, float | None] = (None, None)
    put_ms: tuple[float | None, float | None] = (None, None)
    fast_path_share: float | None = None
    rounds_per_s: float | None = None
    commit_p99_ms: float | None = None
    batch_ops: float | None = None
    hints_pending: float | None = None
    anti_entropy_lag_s: float | None = None
    rebuild_share: float | None = None
    cache_mib: float | None = None
    cache_hit_share: float | None = None
    leases_held: float | None = None
    leased_reads_per_s: float | None = None
    rss_mib: float | None = None
    cpu_share: float | None = None


def node_view(node: str, health: str, before: Samples, after: Samples, seconds: float) -> NodeView:
    """A node's line from two scrapes `seconds` apart."""

    def rate(name: str, **labels: str) -> float:
        return (_sum(after, name, **labels) - _sum(before, name, **labels)) / seconds

    def ms(quantile: float, operation: str) -> float | None:
        value = histogram_quantile(
            quantile, before, after, "kvsvr_request_duration_seconds", operation=operation
        )
        return None if value is None else value * 1000

    writes = rate("kvsvr_coordinator_writes_total")
    commits = rate("kvsvr_storage_commit_batch_ops_count")
    commit_p99 = histogram_quantile(0.99, before, after, "kvsvr_storage_commit_seconds")
    cache_bytes = _one(after, "kvsvr_cache_bytes")
    rss = _one(after, "process_resident_memory_bytes")
    leased = ("kvsvr_read_lease_local_reads_total", ()) in after
    return NodeView(
        node=node,
        health=health,
        requests_per_s=rate("kvsvr_requests_total"),
        get_ms=(ms(0.5, "get"), ms(0.99, "get")),
        put_ms=(ms(0.5, "put"), ms(0.99, "put")),
        fast_path_share=rate("kvsvr_coordinator_fast_path_writes_total") / writes
        if writes
        else None,
        rounds_per_s=rate("kvsvr_quorum_rounds_total"),
        commit_p99_ms=None if commit_p99 is None else commit_p99 * 1000,
        batch_ops=rate("kvsvr_storage_commit_batch_ops_sum") / commits if commits else None,
        hints_pending=_sum(after, "kvsvr_hints_pending"),
        anti_entropy_lag_s=_one(after, "kvsvr_anti_entropy_lag_seconds"),
        rebuild_share=_one(after, "kvsvr_rebuild_progress_ratio"),
        cache_mib=None if cache_bytes is None else cache_bytes / _MIB,
        cache_hit_share=_one(after, "kvsvr_cache_hit_ratio"),
        leases_held=_one(after, "kvsvr_read_leases_held"),
        leased_reads_per_s=rate("kvsvr_read_lease_local_reads_total") if leased else None,
        rss_mib=None if rss is None else rss / _MIB,
        cpu_share=rate("process_cpu_seconds_total"),
    )


_COLUMNS: Final = (
    ("node", 6),
    ("health", 10),
    ("req/s", 8),
    ("get ms p50/p99", 15),
    ("put ms p50/p99", 15),
    ("fast%", 6),
    ("rounds/s", 9),
    ("fsync p99 ms", 13),
    ("batch", 6),
    ("hints", 6),
    ("ae lag s", 9),
    ("rebuilt", 8),
    ("cache MiB", 10),
    ("hit%", 5),
    ("leases", 7),
    ("lease rd/s", 11),
    ("RSS MiB", 8),
    ("CPU%", 5),
)


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _pair(values: tuple[float | None, float | None]) -> str:
    return f"{_number(values[0], 2)}/{_number(values[1], 2)}"


def _cell(text: str, width: int, column: int) -> str:
    """Names (node, health) to the left, numbers to the right."""
    return f"{text:<{width}}" if column < 2 else f"{text:>{width}}"


def format_view(views: list[NodeView], seconds: float, now_s: float) -> list[str]:
    """The frame: a title line, the column heads, a line per node."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now_s))
    lines = [f"kvsvr top  {stamp} UTC  (rates over {seconds:.1f} s)"]
    lines.append(" ".join(_cell(title, width, i) for i, (title, width) in enumerate(_COLUMNS)))
    for view in views:
        cells = (
            view.node,
            view.health,
            _number(view.requests_per_s),
            _pair(view.get_ms),
            _pair(view.put_ms),
            _percent(view.fast_path_share),
            _number(view.rounds_per_s),
            _number(view.commit_p99_ms, 2),
            _number(view.batch_ops),
            _number(view.hints_pending, 0),
            _number(view.anti_entropy_lag_s),
            _percent(view.rebuild_share),
            _number(view.cache_mib),
            _percent(view.cache_hit_share),
            _number(view.leases_held, 0),
            _number(view.leased_reads_per_s),
            _number(view.rss_mib),
            _percent(view.cpu_share),
        )
        pairs = zip(cells, _COLUMNS, strict=True)
        lines.append(" ".join(_cell(cell, width, i) for i, (cell, (_, width)) in enumerate(pairs)))
    return lines


def _scrape_blocking(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
        body: bytes = answer.read(SCRAPE_BYTES_MAX + 1)
    if len(body) > SCRAPE_BYTES_MAX:
        raise ValueError(f"more than {SCRAPE_BYTES_MAX} bytes")
    return body.decode()


async def scrape(address: str) -> Samples | str:
    """A node's samples, or why they could not be had."""
    try:
        text = await trio.to_thread.run_sync(partial(_scrape_blocking, address))
        return parse_samples(text)
    except (OSError, ValueError, urllib.error.URLError) as error:
        return f"no metrics ({error})"


async def scrape_all(statuses: Sequence[Mapping[str, Any]]) -> dict[str, Samples | str]:
    results: dict[str, Samples | str] = {}

    async def one(status: Mapping[str, Any]) -> None:
        node = str(status.get("node"))
        address = status.get("metrics_address")
        if not isinstance(address, str):
            results[node] = "no metrics_address"
            return
        results[node] = await scrape(address)

    async with trio.open_nursery() as nursery:
        for status in statuses:
            nursery.start_soon(one, status)
    return results


async def frame(client: Client, interval_s: float) -> tuple[list[str], bool]:
    """One frame (scrapes `interval_s` apart), and whether every node is ready."""
    statuses = await client.cluster_status()
    started = time.monotonic()
    first = await scrape_all(statuses)
    await trio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    second = await scrape_all(statuses)
    seconds = max(time.monotonic() - started, 1e-3)
    views = []
    notes = []
    for status in statuses:
        node, health = str(status.get("node")), str(status.get("health"))
        before, after = first.get(node), second.get(node)
        if isinstance(before, dict) and isinstance(after, dict):
            views.append(node_view(node, health, before, after, seconds))
        else:
            views.append(NodeView(node, health))
            notes.append(f"{node}: {after if isinstance(after, str) else before}")
    lines = format_view(views, seconds, time.time()) + notes
    return lines, all(status.get("health") == "ready" for status in statuses)


async def show_top(client: Client, args: argparse.Namespace) -> int:
    if args.once:
        lines, ready = await frame(client, args.interval_s)
        for line in lines:
            say(line)
        return EXIT_OK if ready else EXIT_UNAVAILABLE
    try:
        while True:
            lines, _ = await frame(client, args.interval_s)
            say(_CLEAR_SCREEN + "\n".join(lines))
    except KeyboardInterrupt:  # Ctrl-C ends the view
        return EXIT_OK
