"""Tables (terminal and Markdown), JSON and PNG charts of `bench compare` and
`bench scale` results. Pure formatting: everything comes from the results dict."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvsvr import _build

Row = Sequence[object]


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def render_table(header: Row, rows: Sequence[Row], *, markdown: bool = False) -> str:
    texts = [[cell(v) for v in header]] + [[cell(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(texts[0]) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in texts[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in texts) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                       enumerate(zip(row, widths, strict=True))) for row in texts]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- compare --------------------------------------------------------------------------------

LOWER_BOUND_MARK = " (lower bound)"


def target_label(run: dict[str, Any]) -> str:
    """A run's target as the tables name it: etcd driven by bench's Python HTTP
    driver is marked, since that driver, not etcd, sets its rate."""
    return run["target"] + (LOWER_BOUND_MARK if run.get("lower_bound") else "")


def closed_rows(results: dict[str, Any]) -> tuple[list[str], list[Row]]:
    header = [
        "workload", "keys", "value", "target", "driver", "ops/s", "p50 ms", "p90 ms",
        "p99 ms", "p99.9 ms", "max ms", "errors", "server cores", "driver cores",
        "other cores", "srv CPU-s/1k ops", "drv CPU-s/1k ops",
    ]  # fmt: skip
    rows: list[Row] = []
    for run in results["runs"]:
        latency = run["latency"].get("all", {})
        rows.append(
            [
                run["workload"], run["distribution"], f"{run['value_bytes']} B", target_label(run),
                run.get("driver"), run["ops_per_s"], latency.get("p50_ms"), latency.get("p90_ms"),
                latency.get("p99_ms"), latency.get("p999_ms"), latency.get("max_ms"),
                sum(run["errors"].values()), run.get("server_cores"), run.get("driver_cores"),
                run.get("other_cores"), run.get("server_cpu_s_per_1000_ops"),
                run.get("driver_cpu_s_per_1000_ops"),
            ]
        )  # fmt: skip
    if any(run["conflicts"] for run in results["runs"]):
        # cas workloads: operations that completed but lost their race.
        header.insert(11, "cas conflicts")
        for row, run in zip(rows, results["runs"], strict=True):
            assert isinstance(row, list)
            row.insert(11, run["conflicts"])
    return header, rows


def ratio_rows(results: dict[str, Any]) -> tuple[list[str], list[Row]]:
    header = ["workload", "keys", "value", "pair", "ops/s", "ops/s", "ratio", "p99 ms", "p99 ms"]
    rows: list[Row] = [
        [
            r["workload"], r["distribution"], f"{r['value_bytes']} B",
            f"{r['numerator']} / {r['denominator']}"
            + (" (etcd lower bound: not a fair ratio)" if r.get("lower_bound") else ""),
            r["numerator_ops_per_s"],
            r["denominator_ops_per_s"], f"{r['ratio']:.2f}x" if r["ratio"] else "-",
            r["numerator_p99_ms"], r["denominator_p99_ms"],
        ]
        for r in results["ratios"]
    ]  # fmt: skip
    return header, rows


def sweep_rows(results: dict[str, Any]) -> tuple[list[str], list[Row]]:
    header = [
        "load", "offered/s", "target", "driver", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms",
        "max ms", "service p99 ms", "unfinished", "errors",
    ]  # fmt: skip
    rows: list[Row] = []
    for run in results["sweep"]:
        latency = run["latency"].get("all", {})
        rows.append(
            [
                f"{run['fraction']:.0%}", run["rate_per_s"], target_label(run), run.get("driver"),
                run["ops_per_s"],
                latency.get("p50_ms"), latency.get("p99_ms"), latency.get("p999_ms"),
                latency.get("max_ms"), run.get("service_time", {}).get("p99_ms"),
                run["unfinished"], sum(run["errors"].values()),
            ]
        )  # fmt: skip
    return header, rows


def check_rows(results: dict[str, Any]) -> tuple[list[str], list[Row]]:
    header = ["target", "status", "value", "detail"]
    rows: list[Row] = [
        [
            c["target"],
            c["status"].upper() + (" (vs a lower bound)" if c.get("lower_bound") else ""),
            c.get("value"),
            c.get("detail", ""),
        ]
        for c in results["checks"]
    ]
    return header, rows


def load_rows(results: dict[str, Any]) -> tuple[list[str], list[Row]]:
    header = ["system", "nodes", "keys", "value", "seconds", "puts/s", "method"]
    rows: list[Row] = [
        [
            load["system"], load["nodes"], load["keys"], f"{load['value_bytes']} B",
            load.get("seconds"), load.get("puts_per_s"), load.get("method", ""),
        ]
        for load in results["loads"]
    ]  # fmt: skip
    return header, rows


def ceiling_rows(results: dict[str, Any]) -> tuple[list[str], list[Row]]:
    header = ["value", "put ops/s (1 fsync each)", "put p99 ms", "get ops/s", "get p99 ms"]
    rows: list[Row] = [
        [f"{c['value_bytes']} B", c["put_ops_per_s"], c["put_p99_ms"], c["get_ops_per_s"],
         c["get_p99_ms"]]
        for c in results["ceilings"]
    ]  # fmt: skip
    return header, rows


def notes(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    options = results["options"]
    every = results["runs"] + results["sweep"]
    driver = [r["driver_cores"] for r in every if r.get("driver_cores") is not None]
    other = [r["other_cores"] for r in every if r.get("other_cores") is not None]
    lines = [
        f"Machine: {env['cpu_count']} cores ({env['cpu_model']}), load average "
        f"{', '.join(f'{v:.1f}' for v in env['load_average_at_start'])} at start; "
        f"servers, load generator and anything else running share these cores.",
        f"kvsvr build: {_build.describe(env.get('kvsvr_compiled_modules') or [])}.",
        f"Drivers used {min(driver, default=0):.2f}-{max(driver, default=0):.2f} cores "
        "during measured windows (per run in the tables: driver cores, drv CPU-s/1k ops).",
        f"Other load (not servers, not driver) during windows: "
        f"{min(other, default=0):.2f}-{max(other, default=0):.2f} cores "
        "(other users of the machine; high values make absolute numbers noisy, "
        "targets run back to back so ratios are less affected).",
        f"Data on {env['data_filesystem']} ({env['data_dir']}); kvsvr fsyncs every commit, "
        f"etcd {env.get('etcd_version') or '?'} with default durability (WAL fsync).",
        *driver_notes(results),
        f"Closed loop: {options['clients']} clients, {options['warmup_s']} s warm-up excluded, "
        f"{options['time_s']} s measured per target per workload. Open loop: latency from "
        "the scheduled start (queueing included); unfinished = scheduled but not done 2 s "
        "after the window (counted at their wait so far).",
    ]
    lines += [f"Skipped {s['target']}: {s['reason']}." for s in results.get("skipped", [])]
    return lines


def driver_notes(results: dict[str, Any]) -> list[str]:
    """Which driver each target ran on (from the runs), and why a fallback happened."""
    every = results["runs"] + results["sweep"]
    seen: dict[str, str] = {}
    for run in every:
        if run.get("driver_detail"):
            seen.setdefault(target_label(run), run["driver_detail"])
    lines = [f"Driver of {name}: {detail}." for name, detail in seen.items()]
    if any(run.get("lower_bound") for run in every):
        lines.append(
            "Figures marked (lower bound) are etcd driven by bench's Python driver through "
            "its HTTP/JSON gateway: on this machine that driver, not etcd, sets etcd's rate, "
            "so ratios against them overstate kvsvr and are not fair ratios."
        )
    drivers = results.get("drivers") or {}
    if drivers.get("fallback"):
        lines.append(
            f"etcd's Go driver was not available for {', '.join(drivers['fallback'])}: "
            f"{drivers.get('fallback_reason', '')}".rstrip()
        )
    return lines


def profile_sections(results: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[Row]]]]:
    sections: list[tuple[str, tuple[list[str], list[Row]]]] = []
    for run in results.get("profiles", []):
        profile = run.get("profile", {})
        title = (
            f"Where kvsvr's CPU goes: {run['workload']} {run['distribution']}, "
            f"{run['ops_per_s']:.0f} ops/s while sampled, server "
            f"{run.get('server_cpu_s_per_1000_ops') or 0:.2f} CPU-s/1000 ops, "
            f"{100 * (run.get('server_system_fraction') or 0):.0f}% of it in the kernel; "
            f"py-spy --gil, {profile.get('samples', 0)} samples over all nodes"
        )
        if "error" in profile or not profile.get("samples"):
            sections.append((title, (["problem"], [[profile.get("error", "no samples")]])))
            continue
        rows: list[Row] = [["area", name, share] for name, share in profile["by_area_percent"]]
        rows += [["self", name, share] for name, share in profile["top_self_percent"][:10]]
        rows += [
            ["inclusive", name, share] for name, share in profile["top_kvsvr_inclusive_percent"]
        ]
        sections.append((title, (["kind", "frame", "% of samples"], rows)))
    return sections


def compare_text(results: dict[str, Any], *, markdown: bool = False) -> str:
    sections: list[tuple[str, tuple[list[str], list[Row]]]] = [
        ("Closed loop", closed_rows(results)),
        ("kvsvr / etcd", ratio_rows(results)),
    ]
    if results["sweep"]:
        reference = results.get("sweep_reference", {})
        sections.append(
            (
                f"Open loop, workload {reference.get('workload')}, load as a fraction of "
                f"{reference.get('target')}'s closed-loop rate "
                f"({reference.get('max_ops_per_s', 0):.0f} ops/s)",
                sweep_rows(results),
            )
        )
    sections.append(("Targets", check_rows(results)))
    if results["loads"]:
        sections.append(("Loading (not compared)", load_rows(results)))
    if results["ceilings"]:
        sections.append(("Raw LMDB ceiling (one process, no network)", ceiling_rows(results)))
    sections += profile_sections(results)
    parts = []
    if markdown:
        parts.append("# kvsvr vs etcd\n")
    for title, (header, rows) in sections:
        if not rows:
            continue
        parts.append(f"## {title}\n" if markdown else f"{title}")
        parts.append(render_table(header, rows, markdown=markdown))
        parts.append("")
    parts.append("## Notes\n" if markdown else "Notes")
    parts += [f"- {line}" for line in notes(results)]
    return "\n".join(parts) + "\n"


# --- scale ----------------------------------------------------------------------------------


def scale_text(results: dict[str, Any], *, markdown: bool = False) -> str:
    parts = ["# Scale figures\n" if markdown else "Scale figures"]
    cpu_header = [
        "system", "nodes", "replication", "workload", "ops/s", "server CPU-s / 1000 ops",
        "driver CPU-s / 1000 ops", "server cores", "other cores",
    ]  # fmt: skip
    cpu_rows = [
        [r["system"], r["nodes"], r["replication"], r["workload"], r["ops_per_s"],
         r.get("server_cpu_s_per_1000_ops"), r.get("driver_cpu_s_per_1000_ops"),
         r.get("server_cores"), r.get("other_cores")]
        for r in results["cpu"]
    ]  # fmt: skip
    latency_header = [
        "system",
        "keys",
        "get p50 ms",
        "get p99 ms",
        "put p50 ms",
        "put p99 ms",
        "gets",
        "puts",
    ]
    latency_rows = [
        [r["system"], r["keys"], r["get"]["p50_ms"], r["get"]["p99_ms"], r["put"]["p50_ms"],
         r["put"]["p99_ms"], r["get"]["count"], r["put"]["count"]]
        for r in results["latency"]
    ]  # fmt: skip
    for title, header, rows in (
        ("CPU per 1000 operations (closed loop)", cpu_header, cpu_rows),
        ("Latency vs key count (one client, no concurrency)", latency_header, latency_rows),
    ):
        if rows:
            parts.append(f"## {title}\n" if markdown else title)
            parts.append(render_table(header, rows, markdown=markdown))
            parts.append("")
    parts.append("## Notes\n" if markdown else "Notes")
    parts += [f"- {line}" for line in results.get("notes", [])]
    return "\n".join(parts) + "\n"


# --- files and charts -------------------------------------------------------------------------


def write_json(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(results: dict[str, Any], path: Path) -> Path | None:
    runs = results["runs"]
    if not runs:
        return None
    plt = _pyplot()
    groups = list(dict.fromkeys((r["workload"], r["distribution"], r["value_bytes"]) for r in runs))
    targets = list(dict.fromkeys(target_label(r) for r in runs))
    by_key = {
        (r["workload"], r["distribution"], r["value_bytes"], target_label(r)): r for r in runs
    }
    width = 0.8 / len(targets)
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4.5))
    for offset, target in enumerate(targets):
        present = [i for i, group in enumerate(groups) if (*group, target) in by_key]
        heights = [by_key[(*groups[i], target)]["ops_per_s"] for i in present]
        positions = [i + offset * width - 0.4 + width / 2 for i in present]
        bars = axes.bar(positions, heights, width, label=target)
        axes.bar_label(bars, fmt="%.0f", fontsize=7)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels([f"{w}\n{d}, {v} B" for w, d, v in groups], fontsize=8)
    axes.set_ylabel("operations / s")
    options = results["options"]
    axes.set_title(f"Closed-loop throughput, {options['clients']} clients, {options['keys']} keys")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def latency_vs_load_chart(results: dict[str, Any], path: Path) -> Path | None:
    sweep = results["sweep"]
    if not sweep:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for number, target in enumerate(dict.fromkeys(target_label(r) for r in sweep)):
        points = sorted(
            (r for r in sweep if target_label(r) == target), key=lambda r: r["rate_per_s"]
        )
        offered = [r["rate_per_s"] for r in points]
        for quantile, style in (("p50_ms", "--"), ("p99_ms", "-")):
            axes.plot(
                offered,
                [max(r["latency"]["all"][quantile], 1e-3) for r in points],
                style,
                color=f"C{number}",
                marker="o",
                label=f"{target} {quantile.removesuffix('_ms')}",
            )
    axes.set_yscale("log")
    axes.set_xlabel("offered load (operations / s)")
    axes.set_ylabel("latency from scheduled start (ms)")
    reference = results.get("sweep_reference", {})
    axes.set_title(f"Open loop, workload {reference.get('workload')}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def latency_vs_keys_chart(results: dict[str, Any], path: Path) -> Path | None:
    rows = results["latency"]
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for number, system in enumerate(dict.fromkeys(r["system"] for r in rows)):
        points = sorted((r for r in rows if r["system"] == system), key=lambda r: r["keys"])
        keys = [r["keys"] for r in points]
        for operation, style in (("get", "-"), ("put", "--")):
            axes.plot(
                keys,
                [r[operation]["p50_ms"] for r in points],
                style,
                color=f"C{number}",
                marker="o",
                label=f"{system} {operation} p50",
            )
    axes.set_xscale("log")
    axes.set_xlabel("keys loaded")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency vs key count (one client)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cpu_chart(results: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in results["cpu"] if r.get("server_cpu_s_per_1000_ops") is not None]
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    labels = [f"{r['system']} {r['nodes']}n r{r['replication']}\n{r['workload']}" for r in rows]
    bars = axes.bar(range(len(rows)), [r["server_cpu_s_per_1000_ops"] for r in rows])
    axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels(labels, fontsize=7)
    axes.set_ylabel("server CPU-seconds per 1000 operations")
    axes.set_title("CPU cost per operation (all server processes)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_compare(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(out_dir / "compare.json", results)]
    markdown = out_dir / "compare.md"
    markdown.write_text(compare_text(results, markdown=True))
    written.append(markdown)
    for chart in (
        throughput_chart(results, out_dir / "throughput.png"),
        latency_vs_load_chart(results, out_dir / "latency_vs_load.png"),
    ):
        if chart is not None:
            written.append(chart)
    return written


def write_scale(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(out_dir / "scale.json", results)]
    markdown = out_dir / "scale.md"
    markdown.write_text(scale_text(results, markdown=True))
    written.append(markdown)
    for chart in (
        cpu_chart(results, out_dir / "cpu_per_1000_ops.png"),
        latency_vs_keys_chart(results, out_dir / "latency_vs_keys.png"),
    ):
        if chart is not None:
            written.append(chart)
    return written
