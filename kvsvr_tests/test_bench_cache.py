"""bench.cache's report: the figures and whether the issue's ratios were met
(the benchmark itself runs real clusters and is not part of the tests)."""

from __future__ import annotations

from typing import Any

from bench.cache import report


def phase(label: str, ops_per_s: float) -> dict[str, Any]:
    return {
        "label": label,
        "ops_per_s": ops_per_s,
        "latency_ms": {"p50_ms": 1.5, "p99_ms": 9.25},
        "servers_cpu_s_per_1000_ops": 1.2,
        "machine_busy_cores": 1.9,
        "cache": {"hits": 10, "misses": 2, "stale_served": 0, "fallbacks": 0},
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
            phase("strong, cache on", 140.0),
            phase("strong, cache off", 100.0),
            phase("stale, cache on", 250.0),
        ],
        "ratios": {"strong_cache_on_over_off": 1.4, "stale_over_strong_cache_off": 2.5},
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
    assert "2.50x (target >= 3.0x: MISSED)" in text
    assert "n1 1.0/64 MiB hit 50%" in text
    row = next(line for line in lines if line.startswith("strong, cache off"))
    assert row.split()[3:6] == ["100", "1.50", "9.25"]
