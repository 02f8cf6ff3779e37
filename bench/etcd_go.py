"""etcd driven by its own Go client: build `bench/etcdload` (clientv3 over
gRPC) from Debian's packages, run one phase with it, and read its JSON.

The Python driver reaches etcd only through the HTTP/JSON gateway (trio + h11),
and on a 2-core machine that driver, not etcd, sets etcd's rate; a peer must
be measured at its best, so `bench compare` drives etcd with this one.

Build: GOPATH mode (GO111MODULE=off), GOPATH = a build directory plus
Debian's Go tree (where `golang-etcd-server-dev` puts go.etcd.io/etcd and
everything clientv3 imports), no network. The binary is cached outside the
git tree, under `$KVSVR_BENCH_CACHE` or `~/.cache/kvsvr-bench/`, named by a
hash of the source, the Go version and the etcd source package's version.
Without Go or the sources, `go_driver()` says which packages to install, and
bench falls back to the Python driver, labelled as a lower bound.

Protocol with the driver (see main.go): it prints {"event":"ready"} when every
connection has answered; bench writes the run's start (Unix seconds) on its
stdin; it prints progress lines and then one result, whose layout is the one a
Python load process reports (`bench.driver._Recorder.as_dict` plus cpu_s and
elapsed_s), so `bench.driver` merges it the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue as queue_module
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from bench.driver import (
    DRAIN_S,
    ERROR_PAUSE_S,
    OPERATION_TIMEOUT_S,
    READY_TIMEOUT_S,
    START_DELAY_S,
    DriverError,
    PhaseResult,
    Probe,
    Progress,
    RunSpec,
    collect_phase,
)
from kvsvr.local import die_with_parent

SOURCE: Final = Path(__file__).with_name("etcdload") / "main.go"
# What the build needs, as Debian packages: Go 1.19 and etcd's Go sources with
# every package clientv3 imports (gRPC, protobuf, zap, ...).
PACKAGES: Final = ("golang-go", "golang-etcd-server-dev")
SOURCES_PACKAGE: Final = "golang-etcd-server-dev"
# Where Debian's Go tree is when dpkg cannot say (bookworm's layout).
DEBIAN_GOPATH: Final = Path("/usr/share/gocode")
CLIENT_SOURCE: Final = Path("src/go.etcd.io/etcd/clientv3/client.go")
BUILD_TIMEOUT_S: Final = 600.0
# gRPC connections the clients share (etcd's benchmark tool: --conns), capped
# by the client count; each pinned to one member, round-robin.
DEFAULT_CONNECTIONS: Final = 8
DRIVER_NAME: Final = "etcd-go"
INSTALL_HINT: Final = (
    "install them with:  sudo apt-get install " + " ".join(PACKAGES) + "\n"
    "  (Go 1.19 and etcd's Go sources; the driver builds offline from them)"
)


class GoDriverUnavailable(RuntimeError):
    """The Go driver cannot be built here; the message says what to install."""


@dataclass(frozen=True)
class GoToolchain:
    go: str
    gopath: Path  # Debian's tree: src/go.etcd.io/etcd/clientv3 is under it


# --- finding and building ----------------------------------------------------------------


def find_go() -> str | None:
    for candidate in (shutil.which("go"), "/usr/lib/go/bin/go"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def debian_gopath(listing: str | None = None) -> Path | None:
    """The Go tree holding etcd's sources: from `dpkg -L golang-etcd-server-dev`
    (or `listing`, its output), else bookworm's /usr/share/gocode if it has them."""
    if listing is None:
        try:
            listing = subprocess.run(
                ["dpkg", "-L", SOURCES_PACKAGE],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
    suffix = "/" + str(CLIENT_SOURCE)
    for line in listing.splitlines():
        line = line.strip()
        if line.endswith(suffix):
            return Path(line[: -len(suffix)])
    if (DEBIAN_GOPATH / CLIENT_SOURCE).is_file():
        return DEBIAN_GOPATH
    return None


def find_toolchain() -> GoToolchain:
    """Go and etcd's sources, or GoDriverUnavailable naming what is missing."""
    go = find_go()
    gopath = debian_gopath()
    missing = []
    if go is None:
        missing.append("Go (no `go` on PATH)")
    if gopath is None:
        missing.append(f"etcd's Go sources (no {CLIENT_SOURCE.parent} in a Debian Go tree)")
    if missing or go is None or gopath is None:
        raise GoDriverUnavailable(
            f"etcd's Go load generator needs {' and '.join(missing)}; {INSTALL_HINT}"
        )
    return GoToolchain(go, gopath)


def cache_dir() -> Path:
    configured = os.environ.get("KVSVR_BENCH_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvsvr-bench"


def _go_version(go: str) -> str:
    try:
        return subprocess.run(
            [go, "version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _package_version(package: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def build_key(source: bytes, go_version: str, gopath: Path, sources_version: str) -> str:
    digest = hashlib.sha256()
    for part in (source, go_version.encode(), str(gopath).encode(), sources_version.encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


def build_driver(toolchain: GoToolchain | None = None, cache: Path | None = None) -> Path:
    """The driver's binary, built on first use and cached; GoDriverUnavailable
    if Go or the sources are missing or the build fails."""
    toolchain = toolchain or find_toolchain()
    cache = cache or cache_dir()
    source = SOURCE.read_bytes()
    key = build_key(
        source, _go_version(toolchain.go), toolchain.gopath, _package_version(SOURCES_PACKAGE)
    )
    binary = cache / f"etcdload-{key}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="etcdload-build-", dir=cache) as build:
        package = Path(build) / "src" / "etcdload"
        package.mkdir(parents=True)
        (package / "main.go").write_bytes(source)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": f"{build}{os.pathsep}{toolchain.gopath}",
            "GOCACHE": str(cache / "go-build-cache"),
            "GOFLAGS": "",
            "GOPROXY": "off",
            "CGO_ENABLED": "0",
        }
        output = Path(build) / "etcdload"
        try:
            done = subprocess.run(
                [toolchain.go, "build", "-o", str(output), "."],
                cwd=package,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GoDriverUnavailable(f"building etcd's Go load generator: {exc}") from exc
        if done.returncode != 0:
            raise GoDriverUnavailable(
                "building etcd's Go load generator failed (GOPATH mode, "
                f"GOPATH={env['GOPATH']}):\n{done.stderr[-2000:]}\n{INSTALL_HINT}"
            )
        os.replace(output, binary)  # atomic: a concurrent build wins or loses whole
    return binary


def go_driver() -> tuple[Path | None, str]:
    """(binary, "") or (None, why not and what to install)."""
    try:
        return build_driver(), ""
    except GoDriverUnavailable as exc:
        return None, str(exc)


# --- one phase ----------------------------------------------------------------------------


def driver_command(binary: Path | str, spec: RunSpec) -> list[str]:
    """The driver's command line for `spec` (its target's members, workload, mode)."""
    target = spec.target
    connections = min(target.connections or DEFAULT_CONNECTIONS, spec.clients)
    command = [
        str(binary),
        "-endpoints", ",".join(target.addresses),
        "-mode", spec.mode,
        "-clients", str(spec.clients),
        "-conns", str(connections),
        "-distribution", spec.distribution,
        "-keys", str(spec.key_count),
        "-value-bytes", str(spec.value_bytes),
        "-warmup-s", repr(spec.warmup_s),
        "-duration-s", repr(spec.duration_s),
        "-op-timeout-s", repr(OPERATION_TIMEOUT_S),
        "-drain-s", repr(DRAIN_S),
        "-error-pause-s", repr(ERROR_PAUSE_S),
        "-seed", str(spec.seed),
        "-load-batch", str(spec.load_batch),
    ]  # fmt: skip
    if spec.workload is not None:
        workload = spec.workload
        command += ["-read", repr(workload.read), "-update", repr(workload.update)]
        command += ["-cas", repr(workload.cas)]
    if target.read_consistency == "stale":
        command.append("-serializable")
    if spec.mode == "open":
        command += ["-rate", repr(spec.rate_per_s)]
    return command


RESULT_KEYS: Final = (
    "latency",
    "service",
    "ok",
    "conflicts",
    "unfinished",
    "errors",
    "error_samples",
    "cpu_s",
    "elapsed_s",
)


def parse_event(line: str) -> tuple[str, int, Any]:
    """One line of the driver's stdout as a message of bench.driver's load
    processes: ("ready"|"progress"|"result"|"error", 0, payload)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DriverError(f"etcd's Go driver printed a non-JSON line: {line!r:.200}") from exc
    if not isinstance(event, dict) or "event" not in event:
        raise DriverError(f"etcd's Go driver printed an unknown line: {line!r:.200}")
    kind = event["event"]
    if kind == "ready":
        return "ready", 0, None
    if kind == "progress":
        return "progress", 0, int(event["completed"])
    if kind == "error":
        return "error", 0, str(event.get("message", ""))
    if kind == "result":
        return "result", 0, check_result(event.get("result"))
    raise DriverError(f"etcd's Go driver printed an unknown event {kind!r}")


def check_result(result: object) -> dict[str, Any]:
    """The driver's result, checked to hold what `bench.driver` merges."""
    if not isinstance(result, dict):
        raise DriverError(f"etcd's Go driver: the result is not an object: {result!r:.200}")
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise DriverError(f"etcd's Go driver: the result lacks {missing}")
    for name, histogram in [*result["latency"].items(), ("service", result["service"])]:
        if not isinstance(histogram, dict) or not {"counts", "total", "sum_us"} <= set(histogram):
            raise DriverError(f"etcd's Go driver: histogram {name!r} is malformed")
        if sum(int(count) for count in histogram["counts"].values()) != int(histogram["total"]):
            raise DriverError(f"etcd's Go driver: histogram {name!r} counts do not add up")
    result["error_samples"] = list(result["error_samples"] or [])
    result["errors"] = dict(result["errors"] or {})
    return result


def parse_output(lines: Iterable[str]) -> list[tuple[str, int, Any]]:
    """Every message in a driver's stdout (blank lines skipped)."""
    return [parse_event(line) for line in lines if line.strip()]


class _DriverProcess:
    """The running driver as bench.driver's collector sees a load process:
    an `exitcode` that stays None until its stdout has been read to the end
    (so a result still in the pipe is never taken for a silent exit)."""

    def __init__(self, process: subprocess.Popen[str], messages: queue_module.Queue[Any]) -> None:
        self.process = process
        self.messages = messages
        self.read_all = threading.Event()
        self._reader = threading.Thread(target=self._read, name="etcdload-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                if not line.strip():
                    continue
                try:
                    self.messages.put(parse_event(line))
                except DriverError as exc:
                    self.messages.put(("error", 0, str(exc)))
        finally:
            self.read_all.set()

    @property
    def exitcode(self) -> int | None:
        if not self.read_all.is_set():
            return None
        return self.process.poll()


def run_go_phase(
    spec: RunSpec,
    binary: Path | str,
    *,
    probe: Probe | None = None,
    on_progress: Progress | None = None,
) -> PhaseResult:
    """Run `spec` against etcd with the Go driver (one process, its own threads)."""
    messages: queue_module.Queue[Any] = queue_module.Queue()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            driver_command(binary, spec),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        driver = _DriverProcess(process, messages)
        try:
            _wait_ready(driver, stderr)
            run_start = time.time() + START_DELAY_S
            assert process.stdin is not None
            process.stdin.write(f"{run_start!r}\n")
            process.stdin.flush()
            try:
                return collect_phase(spec, [driver], messages, run_start, probe, on_progress)
            except DriverError as exc:
                raise DriverError(f"{exc}\n{_tail(stderr)}") from exc
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


def _wait_ready(driver: _DriverProcess, stderr: IO[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            kind, _, payload = driver.messages.get(timeout=0.2)
        except queue_module.Empty:
            if driver.exitcode is not None:
                raise DriverError(
                    f"etcd's Go driver exited with code {driver.exitcode} before it was ready\n"
                    f"{_tail(stderr)}"
                ) from None
            if time.monotonic() > deadline:
                raise DriverError(f"etcd's Go driver not ready after {READY_TIMEOUT_S} s") from None
            continue
        if kind == "ready":
            return
        if kind == "error":
            raise DriverError(f"etcd's Go driver failed while connecting: {payload}")


def _tail(stderr: IO[str], size: int = 2000) -> str:
    try:
        stderr.flush()
        stderr.seek(0)
        return stderr.read()[-size:]
    except (OSError, ValueError):
        return ""
