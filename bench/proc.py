"""CPU time and memory of processes and of the machine, read from /proc
(Linux only), and `RssSampler`, which keeps each process's peak RSS."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Final

# How often the RSS sampler reads /proc: often enough to see a short peak,
# rarely enough to cost nothing measurable.
RSS_SAMPLE_INTERVAL_S: Final = 0.05

_CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        text = file.read()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return utime / _CLOCK_TICKS_PER_S, stime / _CLOCK_TICKS_PER_S


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    return sum(cpu_times(pid))


def status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM...), in KiB; 0 if absent."""
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def machine_cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores."""
    with open("/proc/stat", encoding="ascii") as file:
        fields = [int(part) for part in file.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / _CLOCK_TICKS_PER_S, total / _CLOCK_TICKS_PER_S


class RssSampler:
    """Samples VmRSS of some processes in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = dict(pids)
        self.peak_kib: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pid in self._pids.items():
                with contextlib.suppress(OSError):
                    self.peak_kib[name] = max(self.peak_kib[name], status_kib(pid, "VmRSS"))
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)
