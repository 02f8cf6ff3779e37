"""`kvsvr top`: one frame (`--once`) from a real cluster's metrics under a
light load, and the arithmetic of its rates and quantiles on fixed scrapes."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

import kvsvr
from kvsvr import cli
from kvsvr.cli.top import format_view, histogram_quantile, node_view, parse_samples
from kvsvr.local import LocalCluster, free_ports, local_config

SECRET = "top-test-secret"


def test_top_once_shows_a_line_per_node_with_the_load_it_carries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = local_config(3, secret=SECRET, partitions=16)
    ports = free_ports(2)
    # n3 has no metrics endpoint: top says so and shows the others.
    nodes = (
        dataclasses.replace(config.nodes[0], metrics_address=("127.0.0.1", ports[0])),
        dataclasses.replace(config.nodes[1], metrics_address=("127.0.0.1", ports[1])),
        config.nodes[2],
    )
    with LocalCluster.create(tmp_path, dataclasses.replace(config, nodes=nodes)) as cluster:
        cluster.start_all()
        stop = threading.Event()

        def load() -> None:
            with kvsvr.SyncClient(cluster.addresses, secret=SECRET) as client:
                i = 0
                while not stop.is_set():
                    client.put(f"k{i % 50}", b"v")
                    client.get(f"k{i % 50}")
                    i += 1

        loader = threading.Thread(target=load)
        loader.start()
        try:
            argv = ["top", "--once", "--interval-s", "1.5", "--cluster", cluster.addresses[0]]
            code = cli.main([*argv, "--secret", SECRET])
        finally:
            stop.set()
            loader.join(timeout=60)
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("kvsvr top ") and "req/s" in lines[1], out
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert set(rows) == {"n1", "n2", "n3"}, out
    assert all(row[1] == "ready" for row in rows.values()), out
    # Every key's coordinator is one of the three: n1 and n2 together carry some.
    assert float(rows["n1"][2]) + float(rows["n2"][2]) > 0, out
    assert rows["n3"][2] == "-", out
    assert "n3: no metrics_address" in out, out


def test_a_bad_interval_is_a_usage_error() -> None:
    assert cli.main(["top", "--once", "--cluster", "127.0.0.1:1", "--interval-s", "0"]) == 2
    assert cli.main(["top", "--once", "--cluster", "127.0.0.1:1", "--interval-s", "99"]) == 2


def _scrape(puts: int, slow_puts: int, cpu_s: float) -> str:
    """An exposition with `puts` puts at 1-2 ms and `slow_puts` at 8-16 ms."""
    fast = puts - slow_puts
    buckets = {"0.001": 0, "0.002": fast, "0.008": fast, "0.016": puts, "+Inf": puts}
    lines = [
        "# TYPE kvsvr_request_duration_seconds histogram",
        *(
            f'kvsvr_request_duration_seconds_bucket{{le="{le}",operation="put"}} {count}'
            for le, count in buckets.items()
        ),
        f'kvsvr_request_duration_seconds_count{{operation="put"}} {puts}',
        f'kvsvr_request_duration_seconds_sum{{operation="put"}} {puts * 0.002}',
        "# TYPE kvsvr_requests counter",
        f'kvsvr_requests_total{{operation="put",outcome="ok"}} {puts}',
        "# TYPE kvsvr_coordinator_writes counter",
        f"kvsvr_coordinator_writes_total {puts}",
        "# TYPE kvsvr_coordinator_fast_path_writes counter",
        f"kvsvr_coordinator_fast_path_writes_total {puts // 2}",
        "# TYPE process_cpu_seconds counter",
        f"process_cpu_seconds_total {cpu_s}",
        "# TYPE kvsvr_hints_pending gauge",
        'kvsvr_hints_pending{target="n2"} 3',
        'kvsvr_hints_pending{target="n3"} 4',
        "# TYPE kvsvr_read_leases_held gauge",
        "kvsvr_read_leases_held 3",
        "# TYPE kvsvr_read_lease_local_reads counter",
        f"kvsvr_read_lease_local_reads_total {puts * 2}",
    ]
    return "\n".join(lines) + "\n"


def test_rates_and_quantiles_are_over_the_interval() -> None:
    before = parse_samples(_scrape(puts=1000, slow_puts=0, cpu_s=10.0))
    after = parse_samples(_scrape(puts=1100, slow_puts=50, cpu_s=10.5))
    # Between the scrapes: 50 puts at 1-2 ms, 50 at 8-16 ms.
    p50 = histogram_quantile(0.5, before, after, "kvsvr_request_duration_seconds")
    p99 = histogram_quantile(0.99, before, after, "kvsvr_request_duration_seconds")
    assert p50 == pytest.approx(0.002)
    assert p99 is not None and 0.008 < p99 <= 0.016
    assert histogram_quantile(0.5, after, after, "kvsvr_request_duration_seconds") is None
    view = node_view("n1", "ready", before, after, seconds=2.0)
    assert view.requests_per_s == pytest.approx(50.0)
    assert view.fast_path_share == pytest.approx(0.5)
    assert view.cpu_share == pytest.approx(0.25)
    assert view.hints_pending == 7
    assert view.leases_held == 3 and view.leased_reads_per_s == pytest.approx(100.0)
    line = format_view([view], 2.0, 0.0)[2]
    assert line.split()[:3] == ["n1", "ready", "50.0"] and "25%" in line
    assert line.split()[-4:-2] == ["3", "100.0"], line
    # A node without read leases (or before they are built) shows "-" there.
    bare = node_view("n1", "ready", {}, {}, seconds=2.0)
    assert format_view([bare], 2.0, 0.0)[2].split()[-4:-2] == ["-", "-"]
