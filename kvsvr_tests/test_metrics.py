"""The node's Prometheus endpoint: `/metrics` scraped from real nodes and read
with prometheus_client's own parser, `/healthz`, `/readyz` while a node
rebuilds, the Grafana dashboard's queries, and the endpoint's answers to
bad requests."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import kvsvr
from kvsvr.config import ConfigError, load_config, parse_config, render_config
from kvsvr.errors import Conflict
from kvsvr.local import LocalCluster, free_ports, local_config
from kvsvr.node.http_endpoint import Answer, Endpoint, serve_http
from kvsvr.node.metrics import (
    READ_LEASE_FIGURES,
    Histogram,
    NodeMetrics,
    RequestMetrics,
)

SECRET = "metrics-test-secret"
DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
WAIT_S = 90.0  # generous: the machine may be loaded

# What the issue asks a node to expose (sample names as the parser reports them).
REQUIRED = {
    # requests by operation and outcome; latency per operation
    "kvsvr_requests",
    "kvsvr_request_duration_seconds",
    # quorum rounds and the fast path's share
    "kvsvr_quorum_rounds",
    "kvsvr_coordinator_writes",
    "kvsvr_coordinator_fast_path_writes",
    "kvsvr_write_fast_path_ratio",
    # commit batch size and fsync latency
    "kvsvr_storage_commit_batch_ops",
    "kvsvr_storage_commit_seconds",
    # hints pending per target, anti-entropy lag, rebuild progress
    "kvsvr_hints_pending",
    "kvsvr_anti_entropy_lag_seconds",
    "kvsvr_rebuild_progress_ratio",
    # cache bytes and hit ratio
    "kvsvr_cache_bytes",
    "kvsvr_cache_hit_ratio",
    # process RSS and CPU
    "process_resident_memory_bytes",
    "process_cpu_seconds",
    # lifecycle
    "kvsvr_node_state",
    "kvsvr_node_ready",
    # read leases
    "kvsvr_read_leases_enabled",
    "kvsvr_read_leases_held",
    "kvsvr_read_leases_granted",
    "kvsvr_read_leases_taken",
    "kvsvr_read_lease_local_reads",
    "kvsvr_read_lease_write_waits",
}


def metrics_cluster(directory: Path, nodes: int = 3) -> LocalCluster:
    config = local_config(nodes, secret=SECRET, partitions=16)
    ports = free_ports(nodes)
    with_metrics = tuple(
        dataclasses.replace(node, metrics_address=("127.0.0.1", port))
        for node, port in zip(config.nodes, ports, strict=True)
    )
    return LocalCluster.create(directory, dataclasses.replace(config, nodes=with_metrics))


def metrics_url(cluster: LocalCluster, node_id: str, path: str) -> str:
    address = cluster.config.node(node_id).metrics_address
    assert address is not None
    return f"http://{address[0]}:{address[1]}{path}"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(
    cluster: LocalCluster, node_id: str
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> labels -> value, as prometheus_client's parser reads them."""
    status, text = http_get(metrics_url(cluster, node_id, "/metrics"))
    assert status == 200, text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def families(cluster: LocalCluster, node_id: str) -> set[str]:
    _, text = http_get(metrics_url(cluster, node_id, "/metrics"))
    return {family.name for family in text_string_to_metric_families(text)}


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return float(samples[name][tuple(sorted(labels.items()))])


def test_metrics_are_present_and_move_with_operations(tmp_path: Path) -> None:
    with metrics_cluster(tmp_path) as cluster:
        cluster.start_all()
        before_all = {node_id: scrape(cluster, node_id) for node_id in cluster.ids}
        before = before_all["n1"]
        exposed = families(cluster, "n1")
        assert REQUIRED <= exposed, sorted(REQUIRED - exposed)
        with kvsvr.SyncClient([cluster.address("n1")], secret=SECRET) as client:
            for i in range(40):
                client.put(f"key-{i}", b"value")
                client.get(f"key-{i}")
            for _ in range(5):  # the first may take a read lease, the others read under it
                client.get("key-0")
            client.put("cas-key", b"v1")
            with pytest.raises(Conflict):
                client.cas("cas-key", b"v2", if_version=99)
        # The client sends each key to its preferred coordinator: count all nodes.
        after = {node_id: scrape(cluster, node_id) for node_id in cluster.ids}
        puts = sum(
            value(s, "kvsvr_requests_total", operation="put", outcome="ok") for s in after.values()
        )
        gets = sum(
            value(s, "kvsvr_requests_total", operation="get", outcome="ok") for s in after.values()
        )
        conflicts = sum(
            s["kvsvr_requests_total"].get((("operation", "put"), ("outcome", "conflict")), 0.0)
            for s in after.values()
        )
        assert puts >= 41 and gets >= 40 and conflicts == 1
        timed = sum(
            value(s, "kvsvr_request_duration_seconds_count", operation="put")
            for s in after.values()
        )
        assert timed == puts + conflicts
        n1 = after["n1"]
        for name in (
            "kvsvr_storage_commit_seconds_count",
            "kvsvr_storage_commit_batch_ops_count",
            "kvsvr_storage_batches_committed_total",
            "kvsvr_quorum_rounds_total",
            "process_cpu_seconds_total",
        ):
            assert value(n1, name) > value(before, name), name
        assert value(n1, "kvsvr_node_ready") == 1.0
        assert value(n1, "kvsvr_node_state", state="ready") == 1.0
        assert value(n1, "kvsvr_hints_pending", target="n2") == 0.0
        assert value(n1, "kvsvr_rebuild_progress_ratio") == 1.0
        assert value(n1, "process_resident_memory_bytes") > 10 << 20
        assert value(n1, "kvsvr_cache_bytes") > 0

        def cache_lookups(samples: dict[str, Any]) -> float:
            return value(samples, "kvsvr_cache_hits_total") + value(
                samples, "kvsvr_cache_misses_total"
            )

        lookups = sum(cache_lookups(after[n]) - cache_lookups(before_all[n]) for n in after)
        assert lookups >= 1, lookups
        assert 0.0 <= value(n1, "kvsvr_cache_hit_ratio") <= 1.0
        # Read leases: strong gets took some and read under them.
        assert value(n1, "kvsvr_read_leases_enabled") == 1.0
        taken = sum(value(s, "kvsvr_read_leases_taken_total") for s in after.values())
        local = sum(value(s, "kvsvr_read_lease_local_reads_total") for s in after.values())
        assert taken >= 1 and local >= 1, (taken, local)
        assert http_get(metrics_url(cluster, "n1", "/healthz")) == (200, "ok\n")
        assert http_get(metrics_url(cluster, "n1", "/readyz")) == (200, "ready\n")
        # The status reply names the endpoint (what `kvsvr top` finds it by).
        with kvsvr.SyncClient([cluster.address("n1")], secret=SECRET) as client:
            status = client.status("n1")
        address = status["metrics_address"]
        # Every read-lease figure the metrics map is one the status reports.
        assert set(READ_LEASE_FIGURES) <= set(status["read_leases"]), status["read_leases"]
        assert metrics_url(cluster, "n1", "/") == f"http://{address}/"
        check_dashboard_queries(exposed)
        # Hints: writes while n3 is down are kept for it, and replayed once it is back.
        cluster.stop("n3")
        with kvsvr.SyncClient(cluster.addresses[:2], secret=SECRET) as client:
            for i in range(20):
                client.put(f"hinted-{i}", b"value")
        hinted = sum(
            value(scrape(cluster, n), "kvsvr_hints_pending", target="n3") for n in ("n1", "n2")
        )
        assert hinted >= 20, hinted
        cluster.start("n3")
        wait_for(
            lambda: sum(
                value(scrape(cluster, n), "kvsvr_hints_pending", target="n3") for n in ("n1", "n2")
            ),
            lambda pending: pending == 0,
        )
        replayed = sum(
            value(scrape(cluster, n), "kvsvr_hints_replayed_total", target="n3")
            for n in ("n1", "n2")
        )
        assert replayed >= 20, replayed


def test_readyz_is_not_ready_while_a_node_rebuilds(tmp_path: Path) -> None:
    """A node whose data directory is lost rebuilds from both other replicas;
    with one of them down it stays "rebuilding", and /readyz says so."""
    with metrics_cluster(tmp_path) as cluster:
        cluster.start_all()
        with kvsvr.SyncClient(cluster.addresses, secret=SECRET) as client:
            for i in range(20):
                client.put(f"k{i}", b"v")
        cluster.stop("n2")
        cluster.stop("n3")
        shutil.rmtree(cluster.config.node_data_dir("n2"))
        cluster.start("n2", extra_args=("--initial-cluster-state", "existing"))
        readyz = metrics_url(cluster, "n2", "/readyz")
        answer = wait_for(lambda: http_get(readyz), lambda a: "rebuilding" in a[1])
        assert answer == (503, "not ready: rebuilding\n")
        assert http_get(metrics_url(cluster, "n2", "/healthz")) == (200, "ok\n")
        samples = scrape(cluster, "n2")
        assert value(samples, "kvsvr_node_ready") == 0.0
        assert value(samples, "kvsvr_node_state", state="rebuilding") == 1.0
        assert value(samples, "kvsvr_rebuild_progress_ratio") < 1.0
        cluster.start("n3")
        assert wait_for(lambda: http_get(readyz), lambda a: a[0] == 200) == (200, "ready\n")
        assert value(scrape(cluster, "n2"), "kvsvr_rebuild_progress_ratio") == 1.0


def wait_for(probe: Any, done: Any, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = probe()
        except OSError as error:  # not listening yet
            seen = error
        if not isinstance(seen, OSError) and done(seen):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"still {seen!r} after {timeout_s} s")


# --- the dashboard ---------------------------------------------------------------------

# Words in PromQL expressions that are not metric names.
_PROMQL_WORDS = {
    "sum",
    "rate",
    "irate",
    "increase",
    "by",
    "without",
    "histogram_quantile",
    "max",
    "min",
    "avg",
    "le",
    "instance",
    "operation",
    "outcome",
    "target",
    "state",
    "reason",
    "job",
    "clamp_min",
    "topk",
}


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", target["expr"])
            for word in re.findall(r"(?<![0-9.])[a-zA-Z_:][a-zA-Z0-9_:]*", expression):
                if word not in _PROMQL_WORDS:
                    names.add(word)
    return names


def check_dashboard_queries(exposed: set[str]) -> None:
    """Every series a panel queries is one the node exposes (a histogram's
    `_bucket`/`_count`/`_sum`, a counter's `_total`, of its family)."""
    samples = set(exposed)
    for name in exposed:
        samples |= {f"{name}_total", f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    queried = dashboard_metric_names()
    assert queried, "the dashboard queries nothing"
    assert queried <= samples, sorted(queried - samples)


def test_the_dashboard_is_grafana_json_with_a_query_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert dashboard["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_the_dashboard_check_catches_an_unknown_metric() -> None:
    exposed = {"kvsvr_requests"}
    with pytest.raises(AssertionError):
        check_dashboard_queries(exposed)


# --- units: the endpoint's answers, the request metrics, the config ------------------------


def fake_status(state: str = "ready", **extra: Any) -> dict[str, Any]:
    return {
        "uptime_s": 3.0,
        "requests_served": 7,
        "peers": {"n2": "connected"},
        "partitions_held": 4,
        "coordinator": {"writes": 4, "fast_path_writes": 3},
        "rounds": {"started": 9, "thrifty": 8, "hedged": 1},
        "read_sharing": {"reads_shared": 0},
        "write_batching": {"writes_folded": 0},
        "corrupt_rows_seen": 0,
        "rows_repaired": 0,
        "storage": {
            "batches_committed": 1,
            "ops_committed": 2,
            "bytes_committed": 3,
            "max_batch_ops": 2,
        },
        "cache": {"bytes_used": 10, "bytes_max": 100, "entries": 1, "hit_ratio": 0.5},
        "memory": {"rss_anon_bytes": 1, "rss_file_bytes": 2, "trims": 0},
        "replication": {
            "state": state,
            "rows_rebuilt": 0,
            "rebuild": {"tables_done": 1, "tables_total": 2},
            "hints": {
                "n2": {
                    "pending": 5,
                    "bytes": 50,
                    "replayed": 0,
                    "dropped_full": 0,
                    "dropped_expired": 0,
                }
            },
            "anti_entropy": {
                "passes": 0,
                "rows_pulled": 0,
                "failures": 0,
                "last_pass_s_ago": {"0": 4.0, "1": None},
            },
        },
        **extra,
    }


async def exposition(status: dict[str, Any]) -> dict[str, float]:
    endpoint = Endpoint(NodeMetrics(lambda: status), lambda: status["replication"]["state"])
    answer = await endpoint.answer(b"GET", b"/metrics")
    assert answer.status == 200
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


async def test_the_status_figures_become_metrics() -> None:
    samples = await exposition(fake_status())
    assert samples["kvsvr_write_fast_path_ratio[]"] == 0.75
    assert samples["kvsvr_hints_pending[('target', 'n2')]"] == 5
    assert samples["kvsvr_anti_entropy_lag_seconds[]"] == 4.0
    assert samples["kvsvr_anti_entropy_partitions_unsynced[]"] == 1
    assert samples["kvsvr_rebuild_progress_ratio[]"] == 1.0  # ready: nothing to rebuild
    rebuilding = await exposition(fake_status("rebuilding"))
    assert rebuilding["kvsvr_rebuild_progress_ratio[]"] == 0.5
    assert samples["kvsvr_quorum_rounds_total[]"] == 9
    assert not any(name.startswith("kvsvr_read_lease") for name in samples)


async def test_read_leases_appear_once_the_status_reports_them() -> None:
    leases = {
        "enabled": True,
        "lease_s": 2.0,
        "clock_drift_max": 0.01,
        "held": 3,
        "granted": 4,
        "accepts_open": False,
        "taken": 10,
        "local_reads": 25,
        "write_waits": 2,
    }
    samples = await exposition(fake_status(read_leases=leases))
    assert samples["kvsvr_read_leases_enabled[]"] == 1
    assert samples["kvsvr_read_leases_held[]"] == 3
    assert samples["kvsvr_read_leases_granted[]"] == 4
    assert samples["kvsvr_read_leases_accepts_open[]"] == 0
    assert samples["kvsvr_read_leases_taken_total[]"] == 10
    assert samples["kvsvr_read_lease_local_reads_total[]"] == 25
    assert samples["kvsvr_read_lease_write_waits_total[]"] == 2


async def test_the_endpoint_answers_each_path() -> None:
    state = ["rebuilding"]
    endpoint = Endpoint(NodeMetrics(fake_status), lambda: state[0])
    assert (await endpoint.answer(b"GET", b"/healthz")).status == 200
    assert await endpoint.answer(b"GET", b"/readyz") == Answer(
        503, "text/plain; charset=utf-8", b"not ready: rebuilding\n"
    )
    state[0] = "ready"
    assert (await endpoint.answer(b"GET", b"/readyz?verbose=1")).status == 200
    assert (await endpoint.answer(b"GET", b"/nothing")).status == 404
    assert (await endpoint.answer(b"POST", b"/metrics")).status == 405


def test_requests_are_counted_by_outcome_and_timed() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics = RequestMetrics()
    registry.register(metrics)
    answers: list[object] = []

    def ok(body: object, respond: Any) -> None:
        respond({"version": 1}, None)

    def refused(body: object, respond: Any) -> None:
        respond(None, Conflict.of_version(3))

    metrics.timed("put", ok)({}, lambda reply, error: answers.append(reply))
    metrics.timed("put", refused)({}, lambda reply, error: answers.append(error))
    assert answers[0] == {"version": 1} and isinstance(answers[1], Conflict)
    assert (
        registry.get_sample_value("kvsvr_requests_total", {"operation": "put", "outcome": "ok"})
        == 1
    )
    assert (
        registry.get_sample_value(
            "kvsvr_requests_total", {"operation": "put", "outcome": "conflict"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("kvsvr_request_duration_seconds_count", {"operation": "put"}) == 2
    )


def test_metrics_address_is_read_checked_and_written_back(tmp_path: Path) -> None:
    config = local_config(2)
    text = render_config(config).replace(
        'zone = "z1"', 'zone = "z1"\nmetrics_address = "127.0.0.1:9101"'
    )
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    loaded = load_config(path)
    assert loaded.node("n1").metrics_address == ("127.0.0.1", 9101)
    assert loaded.node("n2").metrics_address is None
    assert 'metrics_address = "127.0.0.1:9101"' in render_config(loaded)
    for bad in ('"9101"', '"127.0.0.1:99999"', "9101"):
        data = {"nodes": [{"id": "n1", "port": 7101, "metrics_address": None}]}
        data["nodes"][0]["metrics_address"] = json.loads(bad) if bad != "9101" else 9101
        with pytest.raises(ConfigError, match="metrics_address"):
            parse_config(data)
    clash = {"nodes": [{"id": "n1", "port": 7101, "metrics_address": "127.0.0.1:7101"}]}
    with pytest.raises(ConfigError, match="metrics_address"):
        parse_config(clash)


# --- the HTTP server ---------------------------------------------------------------------


async def _serving(nursery: trio.Nursery) -> int:
    endpoint = Endpoint(NodeMetrics(fake_status), lambda: "ready")
    listeners = await nursery.start(serve_http, "127.0.0.1", 0, endpoint)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
                if b"\r\n\r\n" in received and request.count(b"GET") == received.count(b"HTTP/1.1"):
                    break
        return received


async def test_the_server_keeps_connections_alive_and_refuses_bad_requests() -> None:
    async with trio.open_nursery() as nursery:
        port = await _serving(nursery)
        two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await _exchange(port, two)
        assert answer.count(b"HTTP/1.1 200") == 2, answer
        bad = await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400"), bad
        head = await _exchange(
            port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head
        nursery.cancel_scope.cancel()


def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    histogram = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 3.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.001", 2.0), ("0.01", 3.0), ("0.1", 4.0), ("+Inf", 5.0)]
    assert histogram.total == pytest.approx(3.0535)


async def test_a_metrics_port_in_use_is_named_in_the_error() -> None:
    endpoint = Endpoint(NodeMetrics(fake_status), lambda: "ready")
    taken = trio.socket.socket()
    async with trio.open_nursery() as nursery:
        with taken:
            await taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError, match=f"metrics_address 127.0.0.1:{port}: cannot listen"):
                await nursery.start(serve_http, "127.0.0.1", port, endpoint)


async def test_a_snapshot_keeps_the_figures_of_its_moment() -> None:
    """What a scrape renders on its worker thread: copies, not the live counters."""
    metrics = NodeMetrics(fake_status)
    metrics.requests.observe_commit(0.001, 3)
    snapshot = metrics.snapshot()
    metrics.requests.observe_commit(0.002, 5)
    metrics.requests.outcomes["put", "ok"] += 7
    assert snapshot.get_sample_value("kvsvr_storage_commit_batch_ops_count") == 1
    assert (
        snapshot.get_sample_value("kvsvr_requests_total", {"operation": "put", "outcome": "ok"})
        == 0
    )
    assert metrics.registry.get_sample_value("kvsvr_storage_commit_batch_ops_count") == 2
