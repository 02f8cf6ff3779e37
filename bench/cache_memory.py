"""A node's memory while far more distinct data than its cache holds goes through it.

    .venv/bin/python -m bench.cache_memory                      # 1 GiB through a 64 MiB cache
    .venv/bin/python -m bench.cache_memory --total-mib 256 --cache-mib 16

One node (replication 1: the node is every key's coordinator and replica, so
every byte written and read passes through its process and its row cache).
Distinct values of 1 KiB..64 KiB (seeded sizes and contents) are written
once each, then each is read once with a strong read, while a thread samples
the node's /proc/PID/status every `SAMPLE_INTERVAL_S`. The bound is
RSS <= cache_bytes_max + 100 MiB, checked on the peak sampled VmRSS.

VmRSS is RssAnon (the process's own memory: Python objects, the row cache,
buffers) plus RssFile (mapped files: the interpreter's code and the pages of
LMDB's memory-mapped data file that the process touched). Reading 1 GiB
through LMDB's map would touch 1 GiB of file pages; the node's residency
guard (`kvsvr.storage.residency`) drops its page-table entries of the data
file whenever RssFile passes `MAPPED_RSS_MAX_BYTES` (the pages stay in the
kernel's page cache), so VmRSS stays bounded. The figures printed: peak
VmRSS, RssAnon and RssFile, and the guard's trim count from the node's status.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from bench.cache import CachedKvsvrCluster

# The memory a node may use above its cache budget.
HEADROOM_BYTES: Final = 100 << 20
VALUE_BYTES_MIN: Final = 1 << 10
VALUE_BYTES_MAX: Final = 64 << 10
# Requests in flight: enough to keep the node busy, few enough that the
# client's own buffers (up to this many values) stay small.
CONCURRENCY: Final = 16
SAMPLE_INTERVAL_S: Final = 0.05
# LMDB map of the node: address space, not disk; room for the data written
# with copy-on-write slack.
MAP_SLACK_FACTOR: Final = 3
OPERATION_TIMEOUT_S: Final = 30.0


@dataclass
class MemorySample:
    """Peaks over a phase, in KiB, from /proc/PID/status."""

    vm_rss_kib: int = 0
    rss_anon_kib: int = 0
    rss_file_kib: int = 0


@dataclass
class MemoryResult:
    total_bytes: int
    cache_bytes_max: int
    values: int
    write_s: float
    read_s: float
    baseline: MemorySample
    peak: MemorySample
    after: MemorySample
    cache: dict[str, Any] = field(default_factory=dict)
    # The node's status "memory" section after the reads: the residency
    # guard's trims and the bytes of RssFile they gave back.
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def bound_kib(self) -> int:
        return (self.cache_bytes_max + HEADROOM_BYTES) >> 10

    @property
    def within_bound(self) -> bool:
        """The bound, literally: the peak sampled VmRSS (LMDB's mapped
        file pages included) stayed within cache_bytes_max + 100 MiB."""
        return self.peak.vm_rss_kib <= self.bound_kib

    @property
    def anon_within_bound(self) -> bool:
        """The node's own memory (RssAnon) alone stayed within it."""
        return self.peak.rss_anon_kib <= self.bound_kib


def read_status(pid: int) -> MemorySample:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(rest.split()[0])
    return MemorySample(fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssFile", 0))


class PeakSampler:
    """Samples a process's memory in a thread, keeping each figure's peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = MemorySample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        try:
            sample = read_status(self.pid)
        except OSError:
            return
        self.peak.vm_rss_kib = max(self.peak.vm_rss_kib, sample.vm_rss_kib)
        self.peak.rss_anon_kib = max(self.peak.rss_anon_kib, sample.rss_anon_kib)
        self.peak.rss_file_kib = max(self.peak.rss_file_kib, sample.rss_file_kib)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(SAMPLE_INTERVAL_S)


def value_sizes(total_bytes: int, seed: int) -> list[int]:
    """Seeded sizes in [VALUE_BYTES_MIN, VALUE_BYTES_MAX] summing to >= total_bytes."""
    rng = random.Random(seed)
    sizes: list[int] = []
    remaining = total_bytes
    while remaining > 0:
        size = rng.randint(VALUE_BYTES_MIN, VALUE_BYTES_MAX)
        sizes.append(size)
        remaining -= size
    return sizes


def value_of(index: int, size: int, seed: int) -> bytes:
    """Distinct, incompressible contents for value `index` (made when needed)."""
    return random.Random(f"{seed}-{index}").randbytes(size)


async def _each(count: int, operation: Any) -> None:
    """`operation(i)` for i in range(count), CONCURRENCY at a time."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:
            with trio.fail_after(OPERATION_TIMEOUT_S):
                await operation(index)

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)


async def _drive(cluster: CachedKvsvrCluster, sizes: list[int], seed: int) -> dict[str, Any]:
    import kvsvr

    async with kvsvr.connect(cluster.addresses, secret=cluster.secret, timeout_s=20) as client:

        async def write(index: int) -> None:
            await client.put(f"mem-{index}", value_of(index, sizes[index], seed))

        async def read(index: int) -> None:
            item = await client.get(f"mem-{index}")
            assert item is not None and len(item.value) == sizes[index], index

        started = time.monotonic()
        await _each(len(sizes), write)
        write_s = time.monotonic() - started
        started = time.monotonic()
        await _each(len(sizes), read)
        read_s = time.monotonic() - started
        status = await client.status()
        return {
            "write_s": write_s,
            "read_s": read_s,
            "cache": status["cache"],
            "memory": status.get("memory", {}),
        }


def measure(
    total_bytes: int, cache_bytes_max: int, *, seed: int = 1, scratch: Path | None = None
) -> MemoryResult:
    """Start a one-node cluster, push `total_bytes` of distinct values through
    it (written, then read), and report the node's memory."""
    sizes = value_sizes(total_bytes, seed)
    with tempfile.TemporaryDirectory(prefix="kvsvr-cache-memory-", dir=scratch) as directory:
        cluster = CachedKvsvrCluster(
            1,
            Path(directory),
            replication=1,
            cache_bytes_max=cache_bytes_max,
            map_size_bytes=max(1 << 30, MAP_SLACK_FACTOR * total_bytes),
        )
        try:
            cluster.start()
            pid = cluster.pids[0]
            baseline = read_status(pid)
            with PeakSampler(pid) as sampler:
                outcome = trio.run(_drive, cluster, sizes, seed)
            after = read_status(pid)
        finally:
            cluster.stop()
    return MemoryResult(
        total_bytes=sum(sizes),
        cache_bytes_max=cache_bytes_max,
        values=len(sizes),
        write_s=outcome["write_s"],
        read_s=outcome["read_s"],
        baseline=baseline,
        peak=sampler.peak,
        after=after,
        cache=outcome["cache"],
        memory=outcome["memory"],
    )


def report(result: MemoryResult) -> list[str]:
    mib = 1 << 10  # KiB per MiB

    def line(name: str, sample: MemorySample) -> str:
        return (
            f"{name:<9} VmRSS {sample.vm_rss_kib / mib:7.1f} MiB   "
            f"RssAnon {sample.rss_anon_kib / mib:7.1f} MiB   "
            f"RssFile {sample.rss_file_kib / mib:7.1f} MiB"
        )

    cache = result.cache
    memory = result.memory
    verdict = "within" if result.within_bound else "ABOVE"
    anon_verdict = "within" if result.anon_within_bound else "above"
    return [
        f"{result.values} distinct values, {result.total_bytes / (1 << 20):.0f} MiB "
        f"written then read through one node; cache_bytes_max "
        f"{result.cache_bytes_max / (1 << 20):.0f} MiB",
        f"write {result.write_s:.1f} s, read {result.read_s:.1f} s",
        line("baseline", result.baseline),
        line("peak", result.peak),
        line("after", result.after),
        f"cache: {cache.get('bytes_used', 0) / (1 << 20):.1f} MiB used, "
        f"{cache.get('evictions', 0)} evictions, {cache.get('entries', 0)} entries",
        f"residency guard: {memory.get('trims', 0)} trims above RssFile "
        f"{memory.get('mapped_rss_max_bytes', 0) / (1 << 20):.0f} MiB plus the cache "
        "budget not yet used, "
        f"{memory.get('trimmed_bytes', 0) / (1 << 20):.1f} MiB of mapped pages given back",
        f"peak VmRSS {verdict} the bound cache_bytes_max + 100 MiB = "
        f"{result.bound_kib / mib:.0f} MiB (peak RssAnon {anon_verdict} it)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_memory", description=__doc__)
    parser.add_argument("--total-mib", type=int, default=1024, help="data pushed (default 1024)")
    parser.add_argument("--cache-mib", type=int, default=64, help="cache_bytes_max (default 64)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scratch", type=Path, help="where the node's data goes (a real disk)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = measure(
        args.total_mib << 20, args.cache_mib << 20, seed=args.seed, scratch=args.scratch
    )
    for text in report(result):
        print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0 if result.within_bound else 1


if __name__ == "__main__":
    sys.exit(main())
