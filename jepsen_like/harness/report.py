"""Outputs of a run: the timeline chart (PNG) and a plain-text summary.

The chart has throughput (completions per second by type) above latency (one
dot per operation, by invoke time, coloured by outcome), both over seconds
since the workload began, with every fault window shaded in its nemesis'
colour and the phase boundaries drawn as dashed lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from jepsen_like.harness.run import DriveOutcome

# Throughput is counted in buckets of this width.
BUCKET_S: Final = 1.0
# Dots drawn in the latency panel at most (evenly thinned past it): a chart of
# a long run stays a few hundred KiB and quick to render.
LATENCY_DOTS_MAX: Final = 20_000
CHART_DPI: Final = 110
TYPE_COLOURS: Final = {"ok": "tab:green", "fail": "tab:orange", "info": "tab:red"}
NEMESIS_COLOURS: Final = {
    "kill": "tab:red",
    "pause": "tab:purple",
    "partition": "tab:blue",
    "corrupt": "tab:brown",
    "delay": "tab:olive",
    "flaky": "tab:cyan",
    "reset": "tab:gray",
}


Latency = tuple[float, float, str]  # invoke time (s), latency (ms), completion type


def _timeline(outcome: DriveOutcome) -> tuple[dict[str, list[float]], list[Latency]]:
    from jepsen_like.harness.run import paired_ops

    origin = outcome.workload_start_s
    completions: dict[str, list[float]] = {kind: [] for kind in TYPE_COLOURS}
    latencies: list[Latency] = []
    for invoke, completion in paired_ops(outcome.history.events):
        if completion is None:
            continue
        start_s = invoke["time_ns"] / 1e9 - origin
        end_s = completion["time_ns"] / 1e9 - origin
        completions[completion["type"]].append(end_s)
        latencies.append((start_s, (end_s - start_s) * 1000.0, completion["type"]))
    return completions, latencies


def write_chart(outcome: DriveOutcome, path: Path, title: str) -> Path:
    """Throughput and latency over time, fault windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    origin = outcome.workload_start_s
    completions, latencies = _timeline(outcome)
    end_s = max(outcome.final_end_s - origin, BUCKET_S)
    buckets = max(1, math.ceil(end_s / BUCKET_S))
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 7))
    edges = [i * BUCKET_S for i in range(buckets + 1)]
    for kind, times in completions.items():
        counts = [0] * buckets
        for t in times:
            counts[min(buckets - 1, max(0, int(t / BUCKET_S)))] += 1
        top.step(
            edges[:-1],
            [c / BUCKET_S for c in counts],
            where="post",
            color=TYPE_COLOURS[kind],
            label=kind,
        )
    top.set_ylabel("completions / s")
    top.set_title(title)
    if len(latencies) > LATENCY_DOTS_MAX:
        step = len(latencies) / LATENCY_DOTS_MAX
        latencies = [latencies[int(i * step)] for i in range(LATENCY_DOTS_MAX)]
    for kind, colour in TYPE_COLOURS.items():
        xs = [x for x, _, k in latencies if k == kind]
        ys = [max(y, 0.01) for _, y, k in latencies if k == kind]
        bottom.scatter(xs, ys, s=4, color=colour, label=kind, alpha=0.6, linewidths=0)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since the workload began")
    seen: dict[str, str] = {}
    for window in outcome.windows:
        colour = NEMESIS_COLOURS.get(window.nemesis, "tab:pink")
        start = window.start_s - origin
        stop = (window.end_s if window.end_s is not None else outcome.healed_s) - origin
        for axis in (top, bottom):
            axis.axvspan(start, stop, color=colour, alpha=0.15, linewidth=0)
        seen[window.nemesis] = colour
    for boundary in (outcome.faults_start_s, outcome.healed_s, outcome.tail_end_s):
        for axis in (top, bottom):
            axis.axvline(boundary - origin, color="black", linestyle="--", linewidth=0.8)
    handles, labels = top.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.3) for c in seen.values()]
    labels += list(seen)
    top.legend(handles, labels, loc="upper right", fontsize="small", ncol=2)
    bottom.legend(loc="upper right", fontsize="small", markerscale=3)
    figure.tight_layout()
    figure.savefig(path, dpi=CHART_DPI)
    plt.close(figure)
    return path


def format_summary(summary: Mapping[str, Any]) -> str:
    """The lines the command line prints and `summary.txt` holds."""
    config = summary.get("config", {})
    verdict = f"verdict: {summary['verdict']}"
    if not summary["valid"]:
        verdict += "  (run INVALID: " + "; ".join(summary["invalid_reasons"]) + ")"
    lines = [
        verdict,
        f"workload {config.get('workload')}, {config.get('node_count')} nodes, "
        f"nemeses {','.join(config.get('nemeses', [])) or 'none'}, seed {config.get('seed')}, "
        f"{config.get('time_s')} s",
        "phase     ok    fail  info   ok/s",
    ]
    rates = summary.get("ops_per_s", {})
    for phase, counts in summary["counts"].items():
        rate = rates.get(phase)
        rate_text = f"{rate:7.1f}" if isinstance(rate, float) else "      -"
        lines.append(
            f"{phase:<8}{counts['ok']:>5}{counts['fail']:>8}{counts['info']:>6}{rate_text}"
        )
    lines.append(f"overall ok/s: {rates.get('overall', 0.0):.1f}")
    faults = summary.get("faults", [])
    kinds: dict[str, int] = {}
    for fault in faults:
        kinds[fault["nemesis"]] = kinds.get(fault["nemesis"], 0) + 1
    lines.append("faults: " + (", ".join(f"{k} x{n}" for k, n in kinds.items()) or "none"))
    if summary.get("bad_keys"):
        lines.append(f"not linearizable keys: {summary['bad_keys']}")
    if summary.get("unknown_keys"):
        lines.append(f"undecided keys: {summary['unknown_keys']}")
    probes = summary.get("corruption_probes", [])
    if probes:
        outcomes: dict[str, int] = {}
        for probe in probes:
            outcomes[probe["outcome"]] = outcomes.get(probe["outcome"], 0) + 1
        lines.append(
            "damaged rows read back locally: "
            + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        )
    for probe in summary.get("corrupt_data_served", []):
        lines.append(f"DAMAGED DATA SERVED: {probe}")
    if summary.get("unchanged_reads"):
        lines.append(
            f"strong reads answered 'unchanged' (near cache): {summary['unchanged_reads']}"
        )
    stale = summary.get("stale_reads", {})
    if any(stale.values()):
        lines.append(
            f"stale reads: {stale.get('ok', 0)} ok, {stale.get('fail', 0)} fail, "
            f"{stale.get('info', 0)} info (checked per process, not for linearizability); "
            f"{len(summary.get('stale_read_problems', []))} went back in time"
        )
        caches = [
            f"{node}: {status['cache'].get('stale_served', 0)} served, "
            f"{status['cache'].get('fallbacks', 0)} fell back to strong"
            for node, status in summary.get("node_status", {}).items()
            if isinstance(status.get("cache"), dict)
        ]
        if caches:
            lines.append("stale reads at the nodes: " + "; ".join(caches))
    for problem in summary.get("stale_read_problems", []):
        lines.append(f"STALE READ WENT BACK IN TIME: {problem}")
    watch = summary.get("watch")
    if watch:
        lines.append(
            f"watchers: {watch['events']} events, {watch['node_switches']} resumes on another "
            f"node, {watch['resets']} re-reads after WatchCompacted; "
            f"{len(watch['problems'])} problems"
        )
        lines.extend(f"WATCH STREAM PROBLEM: {problem}" for problem in watch["problems"][:20])
    for event in summary.get("unexpected_exits", []):
        lines.append(
            f"node {event['node']} exited unexpectedly at {event['at_s']:.1f} s: {event['detail']}"
        )
    findings = summary.get("log_findings", {})
    notes = [
        f"{node}: {entry.get('errors', 0)} errors, {entry.get('tracebacks', 0)} tracebacks, "
        f"{entry.get('corrupt_rows_refused', 0)} corrupt-row refusals"
        for node, entry in findings.items()
        if entry.get("errors") or entry.get("tracebacks")
    ]
    if notes:
        lines.append("node logs: " + "; ".join(notes))
    files = summary.get("files", {})
    for name, path in files.items():
        lines.append(f"{name}: {path}")
    return "\n".join(lines)


def write_outputs(out: Path, outcome: DriveOutcome, summary: Mapping[str, Any]) -> dict[str, str]:
    """The chart and `summary.txt`; returns their paths by name."""
    config = summary.get("config", {})
    title = (
        f"kvsvr {config.get('workload')} workload, {config.get('node_count')} nodes, "
        f"seed {config.get('seed')}: {summary['verdict']}"
    )
    files = {"chart": str(write_chart(outcome, out / "timeline.png", title))}
    summary_path = out / "summary.txt"
    files["summary"] = str(summary_path)
    full = {**summary, "files": {**summary.get("files", {}), **files}}
    summary_path.write_text(format_summary(full) + "\n")
    return files
