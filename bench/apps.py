"""The example applications' two Moments figures: publishing to 200 friends,
and reading a 20-post timeline page.

    python -m bench.apps [--publishes 20] [--reads 100] [--friends 200] [--out bench-results]

Starts its own 3-node cluster (replication 3, the app tables declared, data
in a temporary directory) and stops it on the way out. One client, one
operation at a time, so each figure is the latency of the whole operation:

- publish: write the post and the album reference, read the author's friends
  and block list, and fan the reference out to `--friends` timelines,
  FANOUT_BATCH writes in flight at a time;
- timeline page: one reader's 20 newest posts from 10 authors, each with
  three comments and two likes from the reader's friends (the reader's
  friends, the timeline scan, then per post its row, the author's friend and
  block rows for this reader, and its comments, read concurrently).

Prints p50/p99/mean/max per operation and writes `--out/apps-<time>.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

import kvsvr
from bench.output import print_table, write_results
from bench.phases import percentile
from kvsvr.apps import app_tables
from kvsvr.apps.moments import FANOUT_BATCH, Moments
from kvsvr.config import TableConfig
from kvsvr.local import local_config, temporary_cluster

READ_AUTHORS = 10
POSTS_PER_AUTHOR = 3
PAGE_SIZE = 20
CLIENT_TIMEOUT_S = 30.0
APPS_SECRET = "bench-apps-secret"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.apps", description=__doc__)
    parser.add_argument("--publishes", type=int, default=20, help="measured publishes")
    parser.add_argument("--reads", type=int, default=100, help="measured timeline pages")
    parser.add_argument("--friends", type=int, default=200, help="the author's friends")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs of each")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    return parser


async def _befriend(moments: Moments, pairs: list[tuple[str, str]]) -> None:
    limiter = trio.CapacityLimiter(50)

    async def one(a: str, b: str) -> None:
        async with limiter:
            await moments.add_friends(a, b)

    async with trio.open_nursery() as nursery:
        for a, b in pairs:
            nursery.start_soon(one, a, b)


async def _setup_reader(moments: Moments) -> None:
    """A reader whose timeline has 30 posts from 10 authors, each post with
    comments and likes from the reader's friends."""
    authors = [f"author{i}" for i in range(READ_AUTHORS)]
    commenters = ["c0", "c1", "c2"]
    pairs = [("reader", author) for author in authors]
    pairs += [("reader", c) for c in commenters]
    pairs += [(author, c) for author in authors for c in commenters]
    await _befriend(moments, pairs)
    for round_number in range(POSTS_PER_AUTHOR):
        for author in authors:
            post = moments.draft(author, f"post {round_number} by {author}", ["https://i/1.jpg"])
            await moments.publish(post)
            for c in commenters:
                await moments.comment(c, post.post_id, f"nice one, {author}")
            for c in commenters[:2]:
                await moments.like(c, post.post_id)


async def _measure(
    label: str, runs: int, warmup: int, operation: Any
) -> dict[str, float | int | str]:
    for _ in range(warmup):
        await operation()
    latencies_ms: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await operation()
        latencies_ms.append((time.perf_counter() - started) * 1000)
    ordered = sorted(latencies_ms)
    return {
        "operation": label,
        "runs": runs,
        "p50_ms": percentile(ordered, 0.50),
        "p99_ms": percentile(ordered, 0.99),
        "mean_ms": statistics.fmean(ordered),
        "max_ms": ordered[-1],
    }


async def run(
    addresses: list[str], secret: str | None, args: argparse.Namespace
) -> list[dict[str, Any]]:
    async with kvsvr.connect(addresses, secret=secret, timeout_s=CLIENT_TIMEOUT_S) as client:
        moments = Moments(client)
        friends = [f"friend{i:04d}" for i in range(args.friends)]
        await _befriend(moments, [("star", friend) for friend in friends])
        await _setup_reader(moments)

        async def publish() -> None:
            report = await moments.publish(moments.draft("star", "a post for every friend"))
            assert report.audience == args.friends

        async def read_page() -> None:
            page = await moments.timeline("reader", page_size=PAGE_SIZE)
            assert len(page.posts) == PAGE_SIZE
            assert all(len(view.comments) == 3 and len(view.likes) == 2 for view in page.posts)

        return [
            await _measure(
                f"publish to {args.friends} friends", args.publishes, args.warmup, publish
            ),
            await _measure(
                f"read a {PAGE_SIZE}-post timeline page", args.reads, args.warmup, read_page
            ),
        ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(
        f"starting a 3-node cluster; {args.friends} friends, batches of {FANOUT_BATCH}", flush=True
    )
    tables = (TableConfig("default"), *app_tables())
    config = local_config(3, secret=APPS_SECRET, partitions=16, tables=tables)
    with temporary_cluster(config, prefix="kvsvr-bench-apps-") as cluster:
        results = trio.run(run, cluster.addresses, cluster.secret, args)
    print_table(
        "Moments on a 3-node cluster (one client, one operation at a time)",
        ["operation", "runs", "p50 ms", "p99 ms", "mean ms", "max ms"],
        [
            [r["operation"], r["runs"], r["p50_ms"], r["p99_ms"], r["mean_ms"], r["max_ms"]]
            for r in results
        ],
    )
    write_results(args, "apps", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
