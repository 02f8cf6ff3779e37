"""bench.cache's report: the figures and whether the target ratios were met
(the benchmark itself runs real clusters and is not part of the tests)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cache import ratios, report


def phase(label: str, ops_per_s: float, cpu_s_per_1000: float = 1.2) -> dict[str, Any]:
    return {
        "label": label,
        "ops_per_s": ops_per_s,
        "latency_ms": {"p50_ms": 1.5, "p99_ms": 9.25},
        "servers_cpu_s_per_1000_ops": cpu_s_per_1000,
        "machine_busy_cores": 1.9,
        "cache": {
            "hits": 10,
            "misses": 2,
            "stale_served": 0,
            "fallbacks": 0,
            "leases_local_reads": 7,
        },
    }


def test_report_names_each_phase_and_judges_the_ratios() -> None:
    results = {
        "options": {
            "distribution": "zipfian",
            "keys": 100,
            "value_bytes": 1024,
            "clients": 8,
            "processes": 2,
            "time_s": 1.0,
        },
        "phases": [
            phase("strong, leases", 300.0, 0.3),
            phase("strong, cache on", 140.0),
            phase("strong, cache off", 100.0),
            phase("stale, cache on", 250.0),
        ],
        "ratios": {
            "strong_leases_on_over_off": 300.0 / 140.0,
            "cpu_leased_over_stale": 1.5,
            "strong_cache_on_over_off": 1.4,
            "stale_over_strong_cache_off": 2.5,
            "cpu_strong_cache_on_over_off": 1.1,
            "cpu_stale_over_strong_cache_off": 3.25,
        },
        "node_cache": {
            "cache on": [
                {"node": "n1", "bytes_used": 1 << 20, "bytes_max": 64 << 20, "hit_ratio": 0.5}
            ]
        },
    }
    lines = report(results)
    text = "\n".join(lines)
    assert "strong, cache on" in text and "stale, cache on" in text
    assert "cache on / off: 1.40x (target >= 1.3x: met)" in text
    assert "leases on / off (cache on): 2.14x (target >= 2.0x: met)" in text
    assert "per stale read: 1.50x (target <= 1.3x: MISSED)" in text
    assert next(line for line in lines if line.startswith("strong, leases")).split()[-2] == "7"
    assert "2.50x (target >= 3.0x: MISSED)" in text
    assert "n1 1.0/64 MiB hit 50%" in text
    assert "YCSB B (95% read, 5% update)" in text
    assert "strong cache on 1.10x, stale 3.25x" in text
    row = next(line for line in lines if line.startswith("strong, cache off"))
    assert row.split()[3:6] == ["100", "1.50", "9.25"]


def test_ratios_come_from_the_medians_of_the_rounds() -> None:
    phases = [
        {**phase("strong, cache on", on), "round": r} for r, on in enumerate((100.0, 130.0, 400.0))
    ]
    phases += [{**phase("strong, cache off", 100.0, 1.0), "round": r} for r in range(3)]
    phases += [
        {**phase("strong, leases", leased, cpu), "round": r}
        for r, (leased, cpu) in enumerate(((260.0, 0.5), (100.0, 0.6), (300.0, 0.4)))
    ]
    phases += [
        {**phase("stale, cache on", stale, cpu), "round": r}
        for r, (stale, cpu) in enumerate(((300.0, 0.25), (10.0, 9.0), (310.0, 0.5)))
    ]
    assert ratios(phases) == pytest.approx(
        {
            "strong_leases_on_over_off": 2.0,  # the median, 260, over the median, 130
            "cpu_leased_over_stale": 1.0,  # 0.5 over 0.5
            "strong_cache_on_over_off": 1.3,
            "stale_over_strong_cache_off": 3.0,
            "cpu_strong_cache_on_over_off": 1.0 / 1.2,
            "cpu_stale_over_strong_cache_off": 2.0,  # 1.0 over the median, 0.5
        }
    )
    results = {
        "options": {
            "distribution": "uniform", "keys": 1, "value_bytes": 1, "clients": 2,
            "processes": 1, "time_s": 1.0, "rounds": 3, "workload": "C",
        },
        "phases": phases,
        "ratios": ratios(phases),
        "ratios_per_round": [ratios([p for p in phases if p["round"] == r]) for r in range(3)],
        "node_cache": {},
    }  # fmt: skip
    text = "\n".join(report(results))
    assert "stale, cache on #2" in text
    assert text.startswith("YCSB C (read only), uniform")
    assert "per round, on / off and stale / off: 1.00x 3.00x, 1.30x 0.10x, 4.00x 3.10x" in text
    assert "1.30x (target >= 1.3x: met)" in text and "3.00x (target >= 3.0x: met)" in text
