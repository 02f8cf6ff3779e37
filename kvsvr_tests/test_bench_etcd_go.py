"""etcd's Go driver in `bench compare` (bench/etcdload, bench.etcd_go): its
command line, the parsing of its JSON output (a fixture taken from a real
run), the protocol with a stand-in driver, the fallback to the Python driver
when Go or etcd's sources are missing and how every table labels it, and, where
Go, etcd's sources and etcd are installed, a real build and a short real run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import bench.etcd_go as etcd_go
from bench.compare import (
    CompareOptions,
    driver_record,
    processes_for,
    resolve_drivers,
    summarize,
)
from bench.driver import DriverError, Histogram, RunSpec, TargetSpec, _merge, run_phase
from bench.report import check_rows, closed_rows, compare_text, ratio_rows, sweep_rows
from bench.targets import TARGETS, TargetInfo, parse_targets
from bench.workloads import WORKLOADS, parse_workloads
from kvsvr.local import free_ports
from kvsvr_tests.test_bench_compare import compare_results

# A real run's stdout: etcdload -mode open -rate 40 -read 0.5 -cas 0.5 -keys 10
# -clients 4 -conns 2 -warmup-s 0.1 -duration-s 0.2, against one etcd 3.4.23.
FIXTURE = textwrap.dedent("""\
    {"event":"ready"}
    {"completed":10,"event":"progress"}
    {"event":"result","result":{"completed":12,"conflicts":0,"cpu_s":0.005032999999999999,"driver":{"client":"clientv3 (gRPC)","clients":4,"conns":2,"go":"go1.19.8","gomaxprocs":2,"name":"etcdload"},"elapsed_s":0.303975968,"error_samples":[],"errors":{},"latency":{"cas":{"counts":{"1040":1,"1127":1,"605":1,"748":1},"max_us":29624,"min_us":1775,"sum_us":53725,"total":4},"read":{"counts":{"470":1,"759":1,"887":1,"939":1},"max_us":10976,"min_us":856,"sum_us":23709,"total":4}},"ok":8,"service":{"counts":{"1121":1,"399":1,"435":1,"441":1,"448":1,"602":1,"733":1,"959":1},"max_us":28806,"min_us":574,"sum_us":49161,"total":8},"unfinished":0}}
""")  # noqa: E501


def _etcd_spec(mode: str = "closed", **changes: Any) -> RunSpec:
    target = TargetSpec(
        kind="etcd",
        label="etcd",
        addresses=("127.0.0.1:2379", "127.0.0.1:2381", "127.0.0.1:2383"),
        driver="go",
        driver_binary="/cache/etcdload-x",
        connections=8,
    )
    fields: dict[str, Any] = {
        "target": target,
        "mode": mode,
        "workload": WORKLOADS["CAS"] if mode != "load" else None,
        "clients": 64,
        "processes": 1,
        "duration_s": 30.0,
        "warmup_s": 3.0,
    }
    fields.update(changes)
    return RunSpec(**fields)


# --- the command line ---------------------------------------------------------------------


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_command_carries_the_run() -> None:
    spec = _etcd_spec("open", rate_per_s=1234.5, distribution="uniform", value_bytes=1024)
    command = etcd_go.driver_command("/bin/etcdload", spec)
    assert command[0] == "/bin/etcdload"
    assert _flag(command, "-endpoints") == "127.0.0.1:2379,127.0.0.1:2381,127.0.0.1:2383"
    assert _flag(command, "-mode") == "open" and float(_flag(command, "-rate")) == 1234.5
    assert (_flag(command, "-read"), _flag(command, "-update"), _flag(command, "-cas")) == (
        "0.5",
        "0.0",
        "0.5",
    )
    assert _flag(command, "-distribution") == "uniform"
    assert _flag(command, "-value-bytes") == "1024" and _flag(command, "-clients") == "64"
    assert _flag(command, "-conns") == "8"
    assert "-serializable" not in command  # linearizable unless the target is stale


def test_command_for_serializable_reads_load_and_few_clients() -> None:
    spec = _etcd_spec()
    stale = replace(spec, target=replace(spec.target, read_consistency="stale"), clients=4)
    command = etcd_go.driver_command("x", stale)
    assert "-serializable" in command
    assert _flag(command, "-conns") == "4"  # never more connections than clients
    load = etcd_go.driver_command("x", _etcd_spec("load", load_batch=128, key_count=500))
    assert _flag(load, "-mode") == "load" and _flag(load, "-load-batch") == "128"
    assert "-read" not in load and "-rate" not in load


def test_target_spec_refuses_a_go_driver_without_binary_or_for_kvsvr() -> None:
    with pytest.raises(ValueError):
        TargetSpec(kind="etcd", label="e", addresses=("a:1",), driver="go")
    with pytest.raises(ValueError):
        TargetSpec(kind="kvsvr", label="k", addresses=("a:1",), driver="go", driver_binary="x")
    with pytest.raises(ValueError):
        TargetSpec(kind="etcd", label="e", addresses=("a:1",), driver="rust")


# --- parsing the output ---------------------------------------------------------------------


def test_fixture_parses_into_messages() -> None:
    messages = etcd_go.parse_output(FIXTURE.splitlines())
    assert [kind for kind, _, _ in messages] == ["ready", "progress", "result"]
    assert messages[1][2] == 10
    result = messages[2][2]
    assert (result["ok"], result["conflicts"], result["unfinished"]) == (8, 0, 0)
    assert set(result["latency"]) == {"read", "cas"}


def test_fixture_merges_like_a_python_load_process() -> None:
    result = etcd_go.parse_output(FIXTURE.splitlines())[-1][2]
    spec = _etcd_spec("open", rate_per_s=40.0, duration_s=0.2)
    merged = _merge(spec, [result], {})
    assert merged.ok == 8 and merged.latency["all"].total == 8
    assert merged.latency["cas"].total == merged.latency["read"].total == 4
    assert merged.driver_cpu_s == pytest.approx(0.005033)
    assert merged.service.total == 8
    # The Go histogram's buckets are bench's: min and max fall in the buckets
    # Python's layout gives them, and the percentiles come out of them.
    cas = merged.latency["cas"]
    assert (cas.min_us, cas.max_us) == (1775, 29624)
    assert {Histogram.bucket_of(1775), Histogram.bucket_of(29624)} <= set(cas.counts)
    assert cas.percentile_us(1.0) == 29624
    low, high = Histogram.bucket_range(748)  # the second of the four cas buckets
    assert cas.percentile_us(0.5) == pytest.approx((low + high) / 2)
    assert merged.latency["all"].max_us == 29624 and merged.latency["all"].min_us == 856


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("not json", "non-JSON"),
        ('{"no": "event"}', "unknown line"),
        ('{"event": "surprise"}', "unknown event"),
        ('{"event": "result", "result": {"ok": 1}}', "lacks"),
    ],
)
def test_malformed_output_is_refused(line: str, match: str) -> None:
    with pytest.raises(DriverError, match=match):
        etcd_go.parse_event(line)


def test_histogram_whose_counts_do_not_add_up_is_refused() -> None:
    result = json.loads(FIXTURE.splitlines()[-1])["result"]
    result["latency"]["read"]["total"] = 5
    with pytest.raises(DriverError, match="do not add up"):
        etcd_go.check_result(result)


def test_driver_error_event_is_passed_on() -> None:
    assert etcd_go.parse_event('{"event":"error","message":"boom"}') == ("error", 0, "boom")


# --- the protocol, with a stand-in driver ------------------------------------------------------

STAND_IN = """\
import sys, time
flag = lambda name: float(sys.argv[sys.argv.index(name) + 1])
print('{"event":"ready"}', flush=True)
start = float(sys.stdin.readline())
time.sleep(max(0.0, start - time.time()))
print('{"event":"progress","completed":3}', flush=True)
time.sleep(max(0.0, start + flag("-warmup-s") + flag("-duration-s") - time.time()))
MODE
"""


def _stand_in(tmp_path: Path, body: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "etcdload"
    script.write_text(f"#!{sys.executable}\n" + STAND_IN.replace("MODE", body))
    script.chmod(0o755)
    return script


def test_run_phase_drives_a_go_target_through_its_binary(tmp_path: Path) -> None:
    result_line = FIXTURE.splitlines()[-1]
    script = _stand_in(tmp_path, f"print({result_line!r}, flush=True)")
    spec = _etcd_spec("closed", warmup_s=0.1, duration_s=0.2)
    spec = replace(spec, target=replace(spec.target, driver_binary=str(script)))
    progress: list[int] = []
    probes: list[float] = []

    def probe() -> dict[str, float]:
        probes.append(time.time())
        return {
            "servers_cpu_s": len(probes),
            "servers_system_s": 0.0,
            "machine_busy_s": 2.0 * len(probes),
            "machine_total_s": 4.0 * len(probes),
            "wall_s": 0.2 * len(probes),
        }

    result = run_phase(spec, probe=probe, on_progress=progress.append)
    assert result.ok == 8 and result.latency["all"].total == 8
    assert progress == [3]
    assert len(probes) == 2  # at the window's start and end, as for Python drivers
    summary = summarize(result, TARGETS["etcd"])
    assert summary["driver"] == "etcd-go" and summary["lower_bound"] is False
    assert summary["processes"] == 1


def test_a_failing_driver_fails_the_phase_with_its_message(tmp_path: Path) -> None:
    script = _stand_in(
        tmp_path,
        'print(\'{"event":"error","message":"first read on x: refused"}\', flush=True)\n'
        "sys.exit(1)",
    )
    spec = _etcd_spec("closed", warmup_s=0.1, duration_s=0.2)
    failing = replace(spec, target=replace(spec.target, driver_binary=str(script)))
    with pytest.raises(DriverError, match="refused"):
        run_phase(failing)
    silent = _stand_in(tmp_path / "silent", "sys.exit(3)")
    quiet = replace(spec, target=replace(spec.target, driver_binary=str(silent)))
    with pytest.raises(DriverError, match="exited with code 3"):
        run_phase(quiet)


# --- finding Go and the sources; the fallback ----------------------------------------------------


def test_debian_gopath_comes_from_the_package_listing() -> None:
    listing = "/.\n/usr/share/gocode\n/usr/share/gocode/src/go.etcd.io/etcd/clientv3/client.go\n"
    assert etcd_go.debian_gopath(listing) == Path("/usr/share/gocode")
    listing = "/opt/tree/src/go.etcd.io/etcd/clientv3/client.go\n"
    assert etcd_go.debian_gopath(listing) == Path("/opt/tree")


def test_missing_go_and_sources_name_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_go, "find_go", lambda: None)
    monkeypatch.setattr(etcd_go, "debian_gopath", lambda listing=None: None)
    with pytest.raises(etcd_go.GoDriverUnavailable) as caught:
        etcd_go.find_toolchain()
    message = str(caught.value)
    assert "Go (no `go` on PATH)" in message and "etcd's Go sources" in message
    assert "apt-get install golang-go golang-etcd-server-dev" in message
    binary, reason = etcd_go.go_driver()
    assert binary is None and "golang-etcd-server-dev" in reason


def test_a_failed_build_is_unavailable_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_go = tmp_path / "go"
    fake_go.write_text(
        "#!/bin/sh\necho 'cannot find package go.etcd.io/etcd/clientv3' >&2\nexit 1\n"
    )
    fake_go.chmod(0o755)
    toolchain = etcd_go.GoToolchain(str(fake_go), tmp_path)
    with pytest.raises(etcd_go.GoDriverUnavailable, match="cannot find package"):
        etcd_go.build_driver(toolchain, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("etcdload-*"))


def _options(targets: str, **changes: Any) -> CompareOptions:
    return CompareOptions(
        workloads=parse_workloads("W,C"), targets=parse_targets(targets), **changes
    )


def test_without_go_etcd_falls_back_to_the_python_driver_as_a_lower_bound() -> None:
    options = _options("kvsvr,etcd,etcd-serializable,etcd-http")
    assert [t.lower_bound for t in options.targets] == [False, False, False, True]
    record = resolve_drivers(options, build=lambda: (None, "install golang-go"))
    assert record["fallback"] == ["etcd", "etcd-serializable"]
    assert record["fallback_reason"] == "install golang-go"
    by_name = {t.name: t for t in options.targets}
    assert by_name["etcd"].driver == "python" and by_name["etcd"].lower_bound
    assert "lower bound" in by_name["etcd"].description
    assert by_name["etcd-serializable"].lower_bound and not by_name["kvsvr"].lower_bound
    assert options.go_driver_binary == ""


def test_with_go_etcd_targets_keep_it(tmp_path: Path) -> None:
    options = _options("kvsvr,etcd,etcd-http")
    record = resolve_drivers(options, build=lambda: (tmp_path / "etcdload-1", ""))
    assert record["go"] == {"binary": str(tmp_path / "etcdload-1")} and not record["fallback"]
    assert [t.driver for t in options.targets] == ["python", "go", "python"]
    assert options.go_driver_binary == str(tmp_path / "etcdload-1")
    etcd = options.targets[1]
    assert processes_for(etcd, options) == 1  # one Go process, its own threads


def test_python_driver_asked_for_is_a_fallback_too() -> None:
    options = _options("kvsvr,etcd", etcd_driver="python")
    record = resolve_drivers(options, build=lambda: pytest.fail("must not build"))
    assert record["fallback"] == ["etcd"] and "--etcd-driver python" in record["fallback_reason"]


def test_kvsvr_processes_are_its_own() -> None:
    options = _options("kvsvr,etcd-http", processes=2, kvsvr_processes=3)
    kvsvr, etcd_http = options.targets
    assert processes_for(kvsvr, options) == 3 and processes_for(etcd_http, options) == 2


def test_driver_record_per_driver() -> None:
    go = driver_record(_etcd_spec())
    assert (
        go["driver"] == "etcd-go"
        and not go["lower_bound"]
        and "8 connections" in (go["driver_detail"])
    )
    python = RunSpec(
        target=TargetSpec(kind="etcd", label="etcd-http", addresses=("a:1",)),
        mode="closed",
        workload=WORKLOADS["W"],
        processes=2,
    )
    assert (
        driver_record(python)["lower_bound"]
        and "lower bound" in (driver_record(python)["driver_detail"])
    )
    kvsvr = RunSpec(
        target=TargetSpec(kind="kvsvr", label="kvsvr", addresses=("a:1",)),
        mode="closed",
        workload=WORKLOADS["W"],
        processes=3,
    )
    assert driver_record(kvsvr)["driver"] == "kvsvr-client"
    assert "3 processes" in driver_record(kvsvr)["driver_detail"]


# --- the report's labels -------------------------------------------------------------------------


def _run(target: TargetInfo, workload: str, ops: float, p99: float, **extra: Any) -> dict:
    if target.system == "kvsvr":
        name = "kvsvr-client"
    else:
        name = "etcd-python-http" if target.lower_bound else "etcd-go"
    run = {
        "target": target.name,
        "workload": workload,
        "distribution": "zipfian",
        "value_bytes": 100,
        "mode": "closed",
        "ops_per_s": ops,
        "latency": {"all": {"p50_ms": p99 / 4, "p99_ms": p99}},
        "errors": {},
        "conflicts": 0,
        "unfinished": 0,
        "rate_per_s": None,
        "driver": name,
        "driver_detail": f"{name} detail",
        "lower_bound": target.lower_bound,
    }
    run.update(extra)
    return run


def _results(runs: list[dict], sweep: list[dict], drivers: dict | None = None) -> dict:
    return compare_results(
        runs,
        sweep,
        sweep_reference={"target": "etcd", "workload": "W", "max_ops_per_s": 1000},
        drivers=drivers or {},
    )


def test_report_labels_the_python_driver_as_a_lower_bound_everywhere() -> None:
    fallback = TargetInfo("etcd", "etcd", 3, "strong", "etcd", driver="python")
    runs = [_run(fallback, "W", 1000, 20), _run(TARGETS["kvsvr"], "W", 1600, 30)]
    sweep = [
        _run(fallback, "W", 500, 8.0, mode="open", fraction=0.5, rate_per_s=500.0),
        _run(TARGETS["kvsvr"], "W", 500, 6.0, mode="open", fraction=0.5, rate_per_s=500.0),
    ]
    results = _results(runs, sweep, {"fallback": ["etcd"], "fallback_reason": "no go"})
    _, closed = closed_rows(results)
    assert [row[3] for row in closed] == ["etcd (lower bound)", "kvsvr"]
    assert [row[4] for row in closed] == ["etcd-python-http", "kvsvr-client"]
    _, ratio = ratio_rows(results)
    assert "lower bound" in str(ratio[0][3]) and "not a fair ratio" in str(ratio[0][3])
    _, swept = sweep_rows(results)
    assert swept[0][2] == "etcd (lower bound)"
    assert all(c["lower_bound"] for c in results["checks"] if c["status"] != "not measured")
    _, checks = check_rows(results)
    assert checks[0][1] == "MET (vs a lower bound)"  # W: 1.6x against a lower bound
    text = compare_text(results, markdown=True)
    assert "not a fair ratio" in text
    assert "etcd's Go driver was not available for etcd: no go" in text
    assert "etcd (lower bound)" in text


def test_report_with_the_go_driver_has_no_lower_bound_marks() -> None:
    runs = [
        _run(TARGETS["etcd"], "W", 5000, 20),
        _run(TARGETS["etcd-http"], "W", 2000, 40),
        _run(TARGETS["kvsvr"], "W", 3500, 30),
    ]
    results = _results(runs, [])
    _, closed = closed_rows(results)
    assert [row[3] for row in closed] == ["etcd", "etcd-http (lower bound)", "kvsvr"]
    _, ratio = ratio_rows(results)
    fair = [row for row in ratio if row[3] == "kvsvr / etcd"]
    assert len(fair) == 1 and fair[0][6] == "0.70x"
    unfair = [row for row in ratio if "etcd-http" in str(row[3])]
    assert len(unfair) == 1 and "not a fair ratio" in str(unfair[0][3])
    # The targets compare against etcd on the Go driver only.
    w_check = next(c for c in results["checks"] if c["target"].startswith("W:"))
    assert w_check["status"] == "missed" and not w_check["lower_bound"]
    _, checks = check_rows(results)
    assert checks[0][1] == "MISSED"
    text = compare_text(results)
    assert "Driver of etcd: etcd-go detail." in text
    assert "Driver of kvsvr: kvsvr-client detail." in text


# --- the real thing, where Go, etcd's sources and etcd are installed --------------------------


def _go_ready() -> str:
    """Why the real-driver test cannot run here ("" if it can)."""
    try:
        etcd_go.find_toolchain()
    except etcd_go.GoDriverUnavailable as exc:
        return str(exc).splitlines()[0]
    if shutil.which("etcd") is None:
        return "etcd is not installed (apt-get install etcd-server)"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_go_ready()), reason=_go_ready() or "ready")
def test_real_go_driver_against_real_etcd(tmp_path: Path) -> None:
    from bench.etcd import EtcdCluster

    binary = etcd_go.build_driver()  # cached after the first build
    cluster = EtcdCluster(1, tmp_path / "etcd", ports=free_ports(2))
    cluster.start()
    try:
        base = TargetSpec(
            kind="etcd",
            label="etcd",
            addresses=tuple(cluster.addresses),
            driver="go",
            driver_binary=str(binary),
            connections=2,
        )
        load = run_phase(RunSpec(target=base, mode="load", key_count=200, clients=16, processes=1))
        assert load.ok == 200 and not load.errors
        spec = RunSpec(
            target=base,
            mode="closed",
            workload=WORKLOADS["CAS"],
            key_count=200,
            clients=8,
            processes=1,
            warmup_s=0.3,
            duration_s=1.5,
        )
        result = run_phase(spec)
        assert result.ok > 50 and not result.errors, result.error_samples
        assert {"read", "cas"} <= set(result.latency)
        assert 0 < result.latency["all"].percentile_us(0.5) < 1_000_000
        assert result.driver_cpu_s > 0
        opened = run_phase(
            RunSpec(
                target=base,
                mode="open",
                workload=WORKLOADS["W"],
                key_count=200,
                clients=16,
                processes=1,
                rate_per_s=200.0,
                warmup_s=0.3,
                duration_s=1.0,
            )
        )
        # 200/s for 1 s: the schedule is exact, so 200 were measured (done or unfinished).
        assert opened.ok + opened.unfinished + opened.error_count == 200
        assert opened.service.total == opened.ok
    finally:
        cluster.stop()
    out = subprocess.run(
        [str(binary), "-endpoints", "127.0.0.1:1", "-mode", "bogus"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1 and "bogus" in json.loads(out.stdout)["message"]


def test_command_line_defaults_measure_each_side_at_its_best() -> None:
    from bench.__main__ import build_parser

    args = build_parser().parse_args(
        "compare --workloads A,B,C,W --targets kvsvr,etcd --time-s 30".split()
    )
    assert args.etcd_driver == "go" and args.etcd_conns == 8
    assert args.kvsvr_processes == 1
    assert args.sweep == "W"  # the latency target is on W
    args = build_parser().parse_args(["compare", "--etcd-driver", "python"])
    assert args.etcd_driver == "python"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--etcd-driver", "rust"])
