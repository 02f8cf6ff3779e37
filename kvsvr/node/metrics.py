"""The node's Prometheus metrics: what `/metrics` serves.

Almost every number is read at scrape time from what the node keeps anyway:
`NodeCollector` turns the node's status report (the one `kvsvr status`
prints: coordinator, storage, rounds, cache, memory, hints, anti-entropy,
rebuild) into metric families. Nothing on a request's path increments them.

Three things the node does not otherwise keep are counted as they happen:

- client requests by operation and outcome, and their latency, one
  histogram per operation: `RequestMetrics.timed` wraps a request's answer
  callback (two `perf_counter` calls, a bisect and two increments per
  request, ~1 µs; bench/RESULTS.md);
- the duration of each LMDB write transaction with its fsync, and the
  operations in it: `RequestMetrics.observe_commit`, called once per batch
  by the storage's commit hook.

Process RSS and CPU come from prometheus_client's `ProcessCollector`.
Everything lives in the node's own `CollectorRegistry`, never the library's
global one, so that several nodes in one process (the tests) do not mix.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from itertools import accumulate
from time import perf_counter
from typing import Any, Final

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvsvr.errors import KvsvrError
from kvsvr.protocol.lifecycle import LOST_DATA_STATES, READY, STATES

# Every metric's name starts with this.
PREFIX: Final = "kvsvr"

# Client operations timed per request (the node's client methods).
OPERATIONS: Final = ("get", "put", "scan")
# A request's outcome label: "ok", or the error's wire code (`kvsvr.errors`),
# so the label's values are a fixed, small set.
OUTCOME_OK: Final = "ok"

# Request latency buckets, seconds: a cached local read takes tens of
# microseconds, a durable quorum write a few milliseconds, a request that
# times out `OPERATION_TIMEOUT_S` (5 s). Fourteen buckets keep a histogram
# at sixteen series per operation.
LATENCY_BUCKETS_S: Final = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    5.0,
)
# Commit (write transaction + fsync) buckets, seconds: an fsync is 0.05-5 ms
# on a local SSD and can reach a second on a busy disk.
COMMIT_BUCKETS_S: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.5,
    1.0,
)
# Commit batch sizes (operations per transaction), up to the writer's
# BATCH_OPS_MAX (`kvsvr.storage.engine`).
BATCH_OPS_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# The read leases' figures (#26), from the "read_leases" section of the
# node's status: status key -> (metric name, help, kind). They appear on
# /metrics when the status carries that section; True/False become 1/0.
READ_LEASE_FIGURES: Final = {
    "enabled": ("read_leases_enabled", "1 when this node's strong reads may take leases", "gauge"),
    "held": ("read_leases_held", "read leases this node holds now (as a reader)", "gauge"),
    "granted": (
        "read_leases_granted",
        "read leases this node has granted that are still in force (as a replica)",
        "gauge",
    ),
    "accepts_open": (
        "read_leases_accepts_open",
        "0 while a restarted replica refuses accepts until leases it may have granted end",
        "gauge",
    ),
    "taken": ("read_leases_taken", "strong reads that took a read lease, since start", "counter"),
    "local_reads": (
        "read_lease_local_reads",
        "strong reads answered locally under a lease, with no message, since start",
        "counter",
    ),
    "write_waits": (
        "read_lease_write_waits",
        "accept rounds held back by another node's read lease, since start",
        "counter",
    ),
}


Respond = Callable[[object, KvsvrError | None], None]
ClientMethod = Callable[[object, Respond], None]


class Histogram:
    """Observations counted into fixed buckets, on the node's trio thread
    only (so without prometheus_client's lock: a third of the cost of its
    `Histogram.observe`, bench/RESULTS.md). Bounds are inclusive, as
    Prometheus' `le`."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        assert list(bounds) == sorted(set(bounds)), "bounds must increase"
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> Histogram:
        copied = Histogram(self.bounds)
        copied.counts, copied.total = list(self.counts), self.total
        return copied

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per `le`, `+Inf` last (what the exposition lists)."""
        cumulative = list(accumulate(self.counts))
        bounds = [repr(float(bound)) for bound in self.bounds] + ["+Inf"]
        return list(zip(bounds, map(float, cumulative), strict=True))


class RequestMetrics(Collector):
    """The counters and histograms updated as requests end and batches
    commit, and the metric families they make at scrape time."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], int] = {(op, OUTCOME_OK): 0 for op in OPERATIONS}
        self.latency = {op: Histogram(LATENCY_BUCKETS_S) for op in OPERATIONS}
        self.commit_seconds = Histogram(COMMIT_BUCKETS_S)
        self.commit_batch_ops = Histogram(BATCH_OPS_BUCKETS)

    def timed(self, operation: str, method: ClientMethod) -> ClientMethod:
        """`method`, counting each request's outcome and observing its latency."""
        assert operation in OPERATIONS, operation
        observe = self.latency[operation].observe
        outcomes = self.outcomes
        ok = (operation, OUTCOME_OK)

        def timed_method(body: object, respond: Respond) -> None:
            started = perf_counter()

            def answered(reply: object, error: KvsvrError | None) -> None:
                observe(perf_counter() - started)
                key = ok if error is None else (operation, error.code)
                outcomes[key] = outcomes.get(key, 0) + 1
                respond(reply, error)

            method(body, answered)

        return timed_method

    def observe_commit(self, seconds: float, ops: int) -> None:
        """One batch committed: its transaction's duration and size."""
        self.commit_seconds.observe(seconds)
        self.commit_batch_ops.observe(ops)

    def copy(self) -> RequestMetrics:
        """The figures as they are now, apart from the ones that go on changing."""
        copied = RequestMetrics()
        copied.outcomes = dict(self.outcomes)
        copied.latency = {op: histogram.copy() for op, histogram in self.latency.items()}
        copied.commit_seconds = self.commit_seconds.copy()
        copied.commit_batch_ops = self.commit_batch_ops.copy()
        return copied

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "client requests answered, by operation and outcome",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), count in sorted(self.outcomes.items()):
            requests.add_metric([operation, outcome], count)
        yield requests
        latency = HistogramMetricFamily(
            f"{PREFIX}_request_duration_seconds",
            "time from a client request's arrival at the node to its answer",
            labels=["operation"],
        )
        for operation, histogram in self.latency.items():
            latency.add_metric([operation], histogram.buckets(), histogram.total)
        yield latency
        yield _histogram(
            "storage_commit_seconds",
            "one LMDB write transaction of the group-commit writer, its fsync included",
            self.commit_seconds,
        )
        yield _histogram(
            "storage_commit_batch_ops",
            "row changes committed by one write transaction (one fsync)",
            self.commit_batch_ops,
        )


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(f"{PREFIX}_{name}", help_text)
    family.add_metric([], histogram.buckets(), histogram.total)
    return family


class NodeCollector(Collector):
    """Metric families read from the node's status report at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        yield from _node_families(status)
        yield from _coordinator_families(status)
        yield from _storage_families(status["storage"])
        yield from _cache_families(status["cache"])
        yield from _memory_families(status["memory"])
        replication = status["replication"]
        yield from _hint_families(replication["hints"])
        yield from _anti_entropy_families(replication["anti_entropy"])
        yield from _rebuild_families(replication)
        yield from _read_lease_families(status.get("read_leases"))


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def _node_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    state = str(status["replication"]["state"])
    states = GaugeMetricFamily(
        f"{PREFIX}_node_state",
        "the node's lifecycle state: 1 for the state it is in, 0 for the others",
        labels=["state"],
    )
    for each in STATES:
        states.add_metric([str(each)], 1.0 if str(each) == state else 0.0)
    yield states
    yield _gauge("node_ready", "1 when the node's replica votes and serves", state == READY)
    yield _gauge("uptime_seconds", "seconds since the node started", status["uptime_s"])
    yield _counter(
        "messages_served", "requests of every kind the node answered", status["requests_served"]
    )
    peers = GaugeMetricFamily(
        f"{PREFIX}_peer_connected", "1 while the link to the peer is connected", labels=["peer"]
    )
    for peer, link in sorted(status["peers"].items()):
        peers.add_metric([peer], 1.0 if link == "connected" else 0.0)
    yield peers
    yield _gauge(
        "partitions_held", "partitions this node is a replica of", status["partitions_held"]
    )


def _coordinator_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    coordinator = status["coordinator"]
    for name, value in sorted(coordinator.items()):
        yield _counter(f"coordinator_{name}", f"coordinator operations: {name}", value)
    writes = coordinator["writes"]
    yield _gauge(
        "write_fast_path_ratio",
        "share of this node's writes chosen in one round trip (fast path), since start",
        coordinator["fast_path_writes"] / writes if writes else 0.0,
    )
    rounds = status["rounds"]
    yield _counter("quorum_rounds", "quorum rounds this node started", rounds["started"])
    yield _counter(
        "quorum_rounds_thrifty", "rounds that asked only a majority first", rounds["thrifty"]
    )
    yield _counter(
        "quorum_rounds_hedged", "thrifty rounds that then asked the others too", rounds["hedged"]
    )
    shared = status["read_sharing"]
    yield _counter(
        "reads_shared", "strong reads answered by another's round", shared["reads_shared"]
    )
    folded = status["write_batching"]
    yield _counter(
        "writes_folded", "blind writes folded into one proposal", folded["writes_folded"]
    )
    yield _counter(
        "corrupt_rows_seen", "rows that failed their checksum", status["corrupt_rows_seen"]
    )
    yield _counter("rows_repaired", "corrupt rows rebuilt from peers", status["rows_repaired"])


def _storage_families(storage: Mapping[str, Any]) -> Iterator[Metric]:
    yield _counter(
        "storage_batches_committed", "write transactions committed", storage["batches_committed"]
    )
    yield _counter("storage_ops_committed", "row changes committed", storage["ops_committed"])
    yield _counter("storage_bytes_committed", "bytes committed", storage["bytes_committed"])
    yield _gauge("storage_batch_ops_max", "largest batch committed", storage["max_batch_ops"])


def _cache_families(cache: Mapping[str, Any]) -> Iterator[Metric]:
    yield _gauge("cache_bytes", "bytes the row cache holds", cache["bytes_used"])
    yield _gauge("cache_bytes_max", "the row cache's budget (cache_bytes_max)", cache["bytes_max"])
    yield _gauge("cache_entries", "rows in the row cache", cache["entries"])
    yield _gauge(
        "cache_hit_ratio", "share of cache lookups that hit, since start", cache["hit_ratio"]
    )
    for name in ("hits", "misses", "evictions"):
        if name in cache:
            yield _counter(f"cache_{name}", f"row cache {name}", cache[name])


def _memory_families(memory: Mapping[str, Any]) -> Iterator[Metric]:
    yield _gauge(
        "memory_rss_anon_bytes", "the node's own memory (RssAnon)", memory["rss_anon_bytes"]
    )
    yield _gauge(
        "memory_rss_file_bytes", "mapped file pages resident (RssFile)", memory["rss_file_bytes"]
    )
    yield _counter("memory_trims", "times the LMDB mapping was trimmed", memory["trims"])


def _hint_families(hints: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    pending = GaugeMetricFamily(
        f"{PREFIX}_hints_pending", "hints kept for a replica that is down", labels=["target"]
    )
    pending_bytes = GaugeMetricFamily(
        f"{PREFIX}_hints_pending_bytes", "bytes of the hints kept", labels=["target"]
    )
    replayed = CounterMetricFamily(
        f"{PREFIX}_hints_replayed", "hints delivered to their replica", labels=["target"]
    )
    dropped = CounterMetricFamily(
        f"{PREFIX}_hints_dropped",
        "hints dropped (queue full or expired): anti-entropy repairs those rows",
        labels=["target", "reason"],
    )
    for target, figures in sorted(hints.items()):
        pending.add_metric([target], figures["pending"])
        pending_bytes.add_metric([target], figures["bytes"])
        replayed.add_metric([target], figures["replayed"])
        dropped.add_metric([target, "full"], figures["dropped_full"])
        dropped.add_metric([target, "expired"], figures["dropped_expired"])
    yield from (pending, pending_bytes, replayed, dropped)


def _anti_entropy_families(anti_entropy: Mapping[str, Any]) -> Iterator[Metric]:
    ages = anti_entropy["last_pass_s_ago"]
    known = [age for age in ages.values() if age is not None]
    yield _gauge(
        "anti_entropy_lag_seconds",
        "the oldest last completed anti-entropy pass among the partitions this node holds",
        max(known) if known else 0.0,
    )
    yield _gauge(
        "anti_entropy_partitions_unsynced",
        "held partitions not yet compared with every peer since the node started",
        sum(1 for age in ages.values() if age is None),
    )
    yield _counter("anti_entropy_passes", "anti-entropy passes", anti_entropy["passes"])
    yield _counter(
        "anti_entropy_rows_pulled", "rows pulled by anti-entropy", anti_entropy["rows_pulled"]
    )
    yield _counter(
        "anti_entropy_failures", "anti-entropy passes that failed", anti_entropy["failures"]
    )


def _rebuild_families(replication: Mapping[str, Any]) -> Iterator[Metric]:
    rebuild = replication["rebuild"]
    done, total = rebuild["tables_done"], rebuild["tables_total"]
    if replication["state"] in LOST_DATA_STATES:
        # Rebuilding, perhaps still waiting for peers before the first table.
        progress = done / total if total else 0.0
    else:
        progress = 1.0
    yield _gauge("rebuild_tables_done", "tables rebuilt from peers so far", done)
    yield _gauge("rebuild_tables_total", "tables to rebuild from peers", total)
    yield _gauge(
        "rebuild_progress_ratio",
        "share of its tables a node that lost its data has rebuilt (1: nothing to rebuild)",
        progress,
    )
    yield _counter(
        "rebuild_rows", "rows copied from peers by rebuilds", replication["rows_rebuilt"]
    )


def _read_lease_families(leases: Mapping[str, Any] | None) -> Iterator[Metric]:
    if leases is None:
        return
    for key, (name, help_text, kind) in READ_LEASE_FIGURES.items():
        if key in leases:
            make = _gauge if kind == "gauge" else _counter
            yield make(name, help_text, float(leases[key]))


class NodeMetrics:
    """The node's metrics: the request metrics, its status, the process.

    `snapshot()` takes the figures on the node's loop (a fresh status report
    and copies of the request counters: cheap), and returns a registry that
    makes the metric families from those copies only, so it can be rendered
    on another thread while the loop changes the originals. `registry` is
    the same metrics read live, for callers on the loop."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status
        self.requests = RequestMetrics()
        self.process = ProcessCollector(registry=None)
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (self.requests, NodeCollector(status), self.process):
            self.registry.register(collector)

    def snapshot(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        status = self.status()
        for collector in (self.requests.copy(), NodeCollector(lambda: status), self.process):
            registry.register(collector)
        return registry
