"""Fast unit tests of the kvsvr-vs-etcd benchmark (`python -m bench compare`):
workload mixes, key distributions, the open-loop schedule, the latency
histogram, and the result math and formatting. No cluster, no etcd."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.__main__ import build_parser
from bench.compare import (
    CompareOptions,
    applies,
    cpu_figures,
    planned_seconds,
    ratios,
    reference_target,
    run_order,
    target_checks,
)
from bench.driver import Histogram, PhaseResult, RunSpec, TargetSpec, schedule_preview
from bench.etcd import INSTALL_HINT, EtcdCluster, EtcdMissing, find_etcd
from bench.report import compare_text, render_table
from bench.targets import TARGETS, parse_targets
from bench.workloads import (
    WORKLOADS,
    UniformKeys,
    Workload,
    ZipfianKeys,
    fnv1a_64,
    intended_start_times,
    key_chooser,
    key_name,
    parse_workloads,
    split_evenly,
    value_pool,
    zeta,
)

# --- workloads ----------------------------------------------------------------------


def test_workload_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError):
        Workload("X", 0.5, 0.4, 0.0, "bad")
    with pytest.raises(ValueError):
        Workload("X", 1.5, -0.5, 0.0, "bad")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_mix_matches_its_fractions(name: str) -> None:
    workload = WORKLOADS[name]
    rng = random.Random(7)
    draws = 50_000
    counts = Counter(workload.choose(rng) for _ in range(draws))
    for operation, fraction in (
        ("read", workload.read),
        ("update", workload.update),
        ("cas", workload.cas),
    ):
        observed = counts[operation] / draws
        assert abs(observed - fraction) < 0.01, (operation, observed, fraction)


def test_issue_workloads_are_defined() -> None:
    assert (WORKLOADS["A"].read, WORKLOADS["A"].update) == (0.5, 0.5)
    assert (WORKLOADS["B"].read, WORKLOADS["B"].update) == (0.95, 0.05)
    assert WORKLOADS["C"].read == 1.0 and not WORKLOADS["C"].writes
    assert WORKLOADS["W"].update == 1.0 and not WORKLOADS["W"].reads
    assert WORKLOADS["CAS"].cas > 0


def test_parse_workloads() -> None:
    assert [w.name for w in parse_workloads("a, B,c,W,A")] == ["A", "B", "C", "W"]
    with pytest.raises(ValueError, match="Z"):
        parse_workloads("A,Z")
    with pytest.raises(ValueError):
        parse_workloads(" , ")


def test_keys_have_one_width() -> None:
    assert key_name(0) == b"user0000000000"
    assert len({len(key_name(i)) for i in (0, 9, 10_000, 999_999_999)}) == 1


def test_value_pool_is_seeded_and_distinct() -> None:
    pool = value_pool(100, seed=3)
    assert pool == value_pool(100, seed=3)
    assert all(len(value) == 100 for value in pool)
    assert len(set(pool)) == len(pool)


def test_split_evenly() -> None:
    assert split_evenly(64, 2) == [32, 32]
    assert split_evenly(7, 3) == [3, 2, 2]
    assert sum(split_evenly(1001, 7)) == 1001
    with pytest.raises(ValueError):
        split_evenly(5, 0)


# --- key distributions ------------------------------------------------------------------


def _reference_fnv1a_64(data: bytes) -> int:
    hashed = 0xCBF29CE484222325
    for byte in data:
        hashed ^= byte
        hashed = (hashed * 0x100000001B3) % (1 << 64)
    return hashed


def test_fnv1a_matches_the_published_algorithm() -> None:
    assert _reference_fnv1a_64(b"a") == 0xAF63DC4C8601EC8C  # the FNV test vector
    for number in (0, 1, 255, 256, 123_456_789, 2**63 - 1):
        assert fnv1a_64(number) == _reference_fnv1a_64(number.to_bytes(8, "little"))


def test_zeta() -> None:
    assert zeta(1, 0.99) == 1.0
    assert math.isclose(zeta(3, 0.5), 1 + 1 / math.sqrt(2) + 1 / math.sqrt(3))


def test_uniform_keys_cover_the_range_evenly() -> None:
    keys = UniformKeys(100, random.Random(1))
    counts = Counter(keys.next_index() for _ in range(100_000))
    assert set(counts) == set(range(100))
    assert max(counts.values()) < 1.2 * 1000 and min(counts.values()) > 0.8 * 1000


def test_zipfian_ranks_follow_the_law() -> None:
    count = 1000
    keys = ZipfianKeys(count, random.Random(2), scrambled=False)
    draws = 200_000
    counts = Counter(keys.next_rank() for _ in range(draws))
    assert all(0 <= rank < count for rank in counts)
    # Ranks 0 and 1 are drawn exactly; beyond, Gray et al.'s closed form (as
    # YCSB's) approximates the law: within 20% per rank, 5% over the head.
    for rank in range(2):
        expected = keys.probability(rank)
        assert abs(counts[rank] / draws - expected) < 0.05 * expected, rank
    for rank in (2, 3, 5, 10, 20):
        expected = keys.probability(rank)
        assert abs(counts[rank] / draws - expected) < 0.2 * expected, rank
    for head in (10, 100):
        observed = sum(counts[rank] for rank in range(head)) / draws
        expected = sum(keys.probability(rank) for rank in range(head))
        assert abs(observed - expected) < 0.05 * expected, head
    # ...popularity falls with rank, and a few keys take a large share.
    assert counts[0] > counts[1] > counts[2] > counts[10] > counts[100]
    top_one_percent = sum(counts[rank] for rank in range(count // 100)) / draws
    assert top_one_percent > 0.3


def test_zipfian_probabilities_sum_to_one() -> None:
    keys = ZipfianKeys(500, random.Random(0))
    assert math.isclose(sum(keys.probability(rank) for rank in range(500)), 1.0)


def test_scrambled_zipfian_scatters_hot_keys() -> None:
    count = 10_000
    keys = ZipfianKeys(count, random.Random(3))
    counts = Counter(keys.next_index() for _ in range(50_000))
    assert all(0 <= index < count for index in counts)
    hottest, _ = counts.most_common(1)[0]
    assert hottest == fnv1a_64(0) % count
    # Hot keys are not the first keys of the key space.
    top_ten = [index for index, _ in counts.most_common(10)]
    assert max(top_ten) > count // 10


def test_key_choosers_are_deterministic_per_seed() -> None:
    first = key_chooser("zipfian", 1000, random.Random(5))
    second = key_chooser("zipfian", 1000, random.Random(5))
    assert [first.next_index() for _ in range(100)] == [second.next_index() for _ in range(100)]
    with pytest.raises(ValueError):
        key_chooser("latest", 10, random.Random(0))


# --- the open-loop schedule ------------------------------------------------------------------


def test_schedule_offers_the_rate_evenly() -> None:
    times = list(intended_start_times(1000.0, 10.0, 12.0))
    assert len(times) == 2000
    assert times[0] == 10.0 and times[-1] < 12.0
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.001}


def test_processes_split_the_schedule_without_overlap() -> None:
    whole = list(intended_start_times(300.0, 0.0, 5.0))
    parts = [list(intended_start_times(300.0, 0.0, 5.0, index, 3)) for index in range(3)]
    assert sorted(t for part in parts for t in part) == whole
    assert [len(part) for part in parts] == [500, 500, 500]
    # Interleaved: process i's n-th start is the (3n + i)-th of the whole.
    assert parts[1][:3] == [whole[1], whole[4], whole[7]]


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        next(intended_start_times(0.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        next(intended_start_times(10.0, 0.0, 1.0, 2, 2))


def test_run_spec_schedule_covers_warmup_and_window() -> None:
    target = TargetSpec(kind="etcd", label="etcd", addresses=("127.0.0.1:1",))
    spec = RunSpec(
        target=target,
        mode="open",
        workload=WORKLOADS["A"],
        rate_per_s=100.0,
        warmup_s=1.0,
        duration_s=2.0,
        processes=2,
        clients=8,
    )
    total = sum(len(list(schedule_preview(spec, index))) for index in range(2))
    assert total == 300
    with pytest.raises(ValueError):
        RunSpec(target=target, mode="open", workload=WORKLOADS["A"], rate_per_s=0.0)


# --- the histogram ------------------------------------------------------------------------------


def test_histogram_is_exact_below_256_us() -> None:
    histogram = Histogram()
    for value in range(1, 256):
        histogram.record_us(value)
    assert histogram.percentile_us(0.5) == 128
    assert histogram.percentile_us(1.0) == 255
    assert histogram.min_us == 1


@given(st.integers(min_value=0, max_value=10**10))
def test_bucket_range_holds_its_values(value: int) -> None:
    bucket = Histogram.bucket_of(value)
    low, high = Histogram.bucket_range(bucket)
    assert low <= value <= high
    assert (high - low) <= max(0, low) / Histogram.SUB_COUNT
    assert Histogram.bucket_of(low) == bucket == Histogram.bucket_of(high)


def test_buckets_are_contiguous() -> None:
    for bucket in range(1, 3000):
        assert Histogram.bucket_range(bucket)[0] == Histogram.bucket_range(bucket - 1)[1] + 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=5_000_000), min_size=1, max_size=400),
    st.sampled_from([0.5, 0.9, 0.99, 0.999, 1.0]),
)
def test_percentiles_are_within_half_a_percent(values: list[int], fraction: float) -> None:
    histogram = Histogram()
    for value in values:
        histogram.record_us(value)
    ordered = sorted(values)
    exact = ordered[max(1, math.ceil(fraction * len(ordered))) - 1]
    assert abs(histogram.percentile_us(fraction) - exact) <= exact * 0.004 + 0.5
    assert histogram.percentile_us(1.0) == ordered[-1]


def test_histogram_merge_and_round_trip() -> None:
    rng = random.Random(9)
    values = [rng.randrange(1, 2_000_000) for _ in range(5000)]
    whole, first, second = Histogram(), Histogram(), Histogram()
    for number, value in enumerate(values):
        whole.record_us(value)
        (first if number % 2 else second).record_us(value)
    first.merge(second)
    assert first.counts == whole.counts
    assert (first.total, first.min_us, first.max_us, first.sum_us) == (
        whole.total,
        whole.min_us,
        whole.max_us,
        whole.sum_us,
    )
    copy = Histogram.from_dict(whole.to_dict())
    assert copy.summary_ms() == whole.summary_ms()


def test_empty_histogram() -> None:
    histogram = Histogram()
    assert histogram.percentile_us(0.99) == 0.0
    assert histogram.summary_ms()["count"] == 0
    histogram.merge(Histogram())
    assert histogram.total == 0
    with pytest.raises(ValueError):
        histogram.percentile_us(0.0)


def test_record_seconds_rounds_to_microseconds() -> None:
    histogram = Histogram()
    histogram.record_s(0.0012345)
    assert histogram.max_us == 1234 or histogram.max_us == 1235


# --- targets, planning and results --------------------------------------------------------------


def test_parse_targets() -> None:
    assert [t.name for t in parse_targets("kvsvr, etcd")] == ["kvsvr", "etcd"]
    with pytest.raises(ValueError, match="nope"):
        parse_targets("kvsvr,nope")
    assert not TARGETS["kvsvr-eventual"].skip_reason
    assert TARGETS["kvsvr-eventual"].table == "eventual"


def test_stale_targets_skip_write_only_workloads() -> None:
    assert not applies(TARGETS["kvsvr-stale"], WORKLOADS["W"])
    assert applies(TARGETS["kvsvr-stale"], WORKLOADS["B"])
    assert applies(TARGETS["kvsvr"], WORKLOADS["W"])
    # An eventual table has no compare-and-set.
    assert not applies(TARGETS["kvsvr-eventual"], WORKLOADS["CAS"])
    assert applies(TARGETS["kvsvr-eventual"], WORKLOADS["A"])


def test_etcd_runs_first_and_is_the_reference() -> None:
    targets = parse_targets("kvsvr,kvsvr-stale,etcd")
    assert run_order(targets)[0].name == "etcd"
    assert reference_target(targets).name == "etcd"
    assert reference_target(parse_targets("kvsvr,single")).name == "kvsvr"


def test_planned_seconds() -> None:
    options = CompareOptions(
        workloads=parse_workloads("A,W"),
        targets=parse_targets("kvsvr,kvsvr-stale,etcd"),
        time_s=10,
        warmup_s=2,
        sweep_workload=None,
    )
    # A: 3 targets, W: 2 (no stale), each 10 + 2 + overhead.
    assert planned_seconds(options, options.targets) == pytest.approx(5 * (12 + 1.5))


def _phase(ok: int, probe_start: dict[str, float], probe_end: dict[str, float]) -> PhaseResult:
    spec = RunSpec(
        target=TargetSpec(kind="kvsvr", label="kvsvr", addresses=("127.0.0.1:1",)),
        mode="closed",
        workload=WORKLOADS["W"],
        duration_s=10.0,
    )
    return PhaseResult(
        spec=spec,
        duration_s=10.0,
        ok=ok,
        driver_cpu_s=3.0,
        probe_start=probe_start,
        probe_end=probe_end,
    )


def test_cpu_figures() -> None:
    start = {
        "servers_cpu_s": 100.0,
        "servers_system_s": 10.0,
        "machine_busy_s": 1000.0,
        "machine_total_s": 2000.0,
        "wall_s": 50.0,
    }
    end = {
        "servers_cpu_s": 112.0,
        "servers_system_s": 13.0,
        "machine_busy_s": 1018.0,
        "machine_total_s": 2020.0,
        "wall_s": 60.0,
    }
    figures = cpu_figures(_phase(4000, start, end))
    assert figures["server_cores"] == pytest.approx(1.2)
    assert figures["driver_cores"] == pytest.approx(0.3)
    assert figures["other_cores"] == pytest.approx(0.3)  # 1.8 busy - 1.2 - 0.3
    assert figures["server_cpu_s_per_1000_ops"] == pytest.approx(3.0)
    assert figures["server_system_fraction"] == pytest.approx(0.25)
    assert cpu_figures(_phase(10, {}, {})) == {"driver_cores": pytest.approx(0.3)}


def _run(target: str, workload: str, ops_per_s: float, p99_ms: float, **extra: object) -> dict:
    run = {
        "target": target,
        "workload": workload,
        "distribution": "zipfian",
        "value_bytes": 100,
        "mode": "closed",
        "ops_per_s": ops_per_s,
        "latency": {"all": {"p50_ms": p99_ms / 4, "p99_ms": p99_ms}},
        "errors": {},
        "conflicts": 0,
        "unfinished": 0,
        "rate_per_s": None,
    }
    run.update(extra)
    return run


def test_ratios_and_target_checks() -> None:
    runs = [
        _run("etcd", "W", 1000, 20),
        _run("kvsvr", "W", 1200, 30),  # 1.2x: met at a 1.0x target, missed at 1.5x
        _run("etcd", "A", 1000, 20),
        _run("kvsvr", "A", 990, 30),  # 0.99x: missed
        _run("etcd", "C", 2000, 10),
        _run("kvsvr", "C", 3000, 5),  # 1.5x: C's bound is 2.0x
        _run("kvsvr-stale", "C", 9000, 2),
    ]
    rows = ratios(runs)
    assert {(r["workload"], round(r["ratio"], 2)) for r in rows} == {
        ("W", 1.2),
        ("A", 0.99),
        ("C", 1.5),
    }
    sweep = [
        _run("etcd", "W", 500, 8.0, mode="open", fraction=0.5, rate_per_s=500.0),
        _run("kvsvr", "W", 500, 12.0, mode="open", fraction=0.5, rate_per_s=500.0),
    ]
    checks = {c["target"].split(":")[0]: c for c in target_checks(rows, sweep, 64)}
    assert checks["W"]["status"] == "met"
    assert checks["A"]["status"] == "missed"
    assert checks["B"]["status"] == "not measured"
    assert checks["C"]["status"] == "missed"
    latency = checks["p99 at 50% of etcd's max W rate"]
    assert latency["status"] == "missed" and latency["value"] == pytest.approx(1.5)
    sweep[1]["latency"]["all"]["p99_ms"] = 7.9
    checks = {c["target"].split(":")[0]: c for c in target_checks(rows, sweep, 64)}
    assert checks["p99 at 50% of etcd's max W rate"]["status"] == "met"
    # The latency target is on W: a sweep of another workload does not measure it.
    other = [dict(run, workload="A") for run in sweep]
    checks = {c["target"].split(":")[0]: c for c in target_checks(rows, other, 64)}
    assert checks["p99 at 50% of etcd's max W rate"]["status"] == "not measured"
    assert target_checks([], [], 64)[0]["status"] == "not measured"


def compare_results(
    runs: list[dict[str, Any]], sweep: list[dict[str, Any]] | None = None, **fields: Any
) -> dict[str, Any]:
    """What `bench compare` writes to compare.json, for these runs and sweep
    on a made-up 2-core machine; `fields` add or replace top-level entries."""
    results: dict[str, Any] = {
        "environment": {
            "cpu_count": 2,
            "cpu_model": "test cpu",
            "load_average_at_start": (0.1, 0.2, 0.3),
            "data_filesystem": "ext4",
            "data_dir": "/tmp/x",
            "etcd_version": "3.4.23",
        },
        "options": {"processes": 2, "clients": 64, "warmup_s": 3, "time_s": 20},
        "runs": runs,
        "sweep": sweep or [],
        "loads": [],
        "ceilings": [],
        "skipped": [],
        **fields,
    }
    results["ratios"] = ratios(runs)
    results["checks"] = target_checks(results["ratios"], results["sweep"], 64)
    return results


def test_compare_text_renders_every_section() -> None:
    runs = [_run("etcd", "W", 1000, 20), _run("kvsvr", "W", 800, 30)]
    results = compare_results(
        runs, skipped=[{"target": "kvsvr-eventual", "reason": "not implemented"}]
    )
    text = compare_text(results)
    assert "0.80x" in text and "MISSED" in text and "2 cores" in text
    assert "kvsvr-eventual" in text
    markdown = compare_text(results, markdown=True)
    assert "| W | zipfian | 100 B | kvsvr / etcd |" in markdown
    assert "cas conflicts" not in markdown
    runs[1]["conflicts"] = 7
    assert "cas conflicts" in compare_text(results)


def test_render_table() -> None:
    text = render_table(["name", "ops/s"], [["a", 1234.5], ["bb", 1.234]])
    lines = text.splitlines()
    assert lines[0].startswith("name") and "1234" in lines[2] and "1.23" in lines[3]
    markdown = render_table(["x", "y"], [[1, None]], markdown=True)
    assert markdown.splitlines() == ["| x | y |", "|---|---|", "| 1 | - |"]


# --- etcd and the command line ----------------------------------------------------------------


def test_etcd_runs_with_default_durability(tmp_path: Path) -> None:
    cluster = EtcdCluster(3, tmp_path, ports=[2001, 2002, 2003, 2004, 2005, 2006])
    command = cluster.command(cluster.members[1])
    assert command[command.index("--name") + 1] == "e2"
    assert command[command.index("--listen-client-urls") + 1] == "http://127.0.0.1:2003"
    initial = command[command.index("--initial-cluster") + 1]
    assert initial.count("=http://127.0.0.1:") == 3
    assert not any("unsafe" in part or "fsync" in part for part in command)
    with pytest.raises(ValueError):
        EtcdCluster(3, tmp_path, ports=[1, 2])


def test_missing_etcd_says_how_to_install_it() -> None:
    with pytest.raises(EtcdMissing) as caught:
        find_etcd("no-such-etcd-binary-here")
    assert "apt-get install etcd-server" in str(caught.value)
    assert "apt-get install etcd-server" in INSTALL_HINT


def test_the_issue_command_line_parses() -> None:
    args = build_parser().parse_args(
        "compare --workloads A,B,C,W --targets kvsvr,etcd --time-s 30".split()
    )
    assert (args.workloads, args.targets, args.time_s) == ("A,B,C,W", "kvsvr,etcd", 30.0)
    assert args.out == Path("bench-results") and args.keys == 100_000
    assert args.value_bytes == [100] and args.distribution == ["zipfian"]
    args = build_parser().parse_args(
        ["compare", "--value-bytes", "100,1024", "--distribution", "uniform,zipfian"]
    )
    assert args.value_bytes == [100, 1024] and args.distribution == ["uniform", "zipfian"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--time-s", "0"])
