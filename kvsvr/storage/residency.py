"""Keep the node's resident pages of LMDB's memory-mapped data file bounded.

Why. py-lmdb maps `data.mdb` into the process (read-only, MAP_SHARED: LMDB is
opened with `writemap=False`, see `engine.open_environment`). Every page a
read or a commit touches through that map stays mapped into the process and
counts in its VmRSS (as RssFile), so reading 1 GiB of distinct values through
a node grows its VmRSS by 1 GiB although the node holds none of it: the pages
are the kernel's page cache. A node's memory bound is on VmRSS itself (cache
budget + 100 MiB), so a node task (`ResidencyGuard.run`) checks RssFile every
`RESIDENCY_CHECK_S`, and also after every `READ_CHECK_BYTES` of rows read
through the store (a hook in `Storage`, so a burst such as an anti-entropy
scan, which maps tens of MiB between two timer ticks, is trimmed as it
happens), and above `MAPPED_RSS_MAX_BYTES` drops the data file's page-table
entries with `madvise(MADV_DONTNEED)`.

Why this is safe (no data can be lost or corrupted):
- madvise(2) on Linux: after MADV_DONTNEED, "subsequent accesses of pages in
  the range will succeed, but will result in ... repopulating the memory
  contents from the up-to-date contents of the underlying mapped file (for
  shared file mappings ...)". For a file-backed MAP_SHARED mapping the call
  only unmaps this process's page-table entries; the pages stay in the page
  cache (and on disk), and the next access maps them back with a minor fault;
  the man page adds that RSS drops at once, and that locked (mlock), huge
  TLB and VM_PFNMAP pages are refused: nothing here locks the map.
  Only private (anonymous or copy-on-write) mappings lose contents, and we
  never touch one: `mapped_data_files` takes only mappings whose permissions
  are exactly `r--s` (read-only, shared) and whose path is the node's
  `data.mdb`. A writable map (`writemap=True`) would be skipped, not trimmed.
- The map is read-only, so it holds no dirty page of ours: LMDB (writemap
  off) builds a commit's pages in malloc'd memory and writes them with
  pwrite(2) into the same page cache the map shows (Linux has one unified
  page cache), so a re-fault after a trim sees the newest committed bytes.
- Concurrency: a read transaction (trio thread; the read hook even trims
  from inside a scan's transaction) or a commit (writer thread) may hold
  pointers into the map while a trim runs. That is still safe: the
  address range stays mapped (only PTEs go), so a pointer dereference after
  the trim simply faults the page back in from the page cache. There is no
  window where a pointer sees zeros or stale data, unlike DONTNEED on private
  anonymous memory.
- Values leave the map as copies: the engine's transactions use py-lmdb's
  default `buffers=False` (`txn.get`, `cursor.key`, `cursor.value` return
  `bytes`), so nothing outside a transaction points into the map.

Cost. A trim is one madvise over the mapping (walks only populated page
tables; well under a millisecond for tens of MiB). The guard finds the
mapping in /proc/self/maps once (the map never moves while the store is
open), not on every trim: reading that file costs ~0.6 ms of kernel time.
Afterwards the hot pages (b-tree branch pages, the meta pages) fault back in
as minor faults, a microsecond or so each, once per trim. Reading /proc/self/status a few times
a second is tens of microseconds each. Nothing is read from disk because of
a trim: disk reads happen only if the kernel evicted the page cache, which
it does under memory pressure whether or not we trim.

Non-Linux: there is no /proc/self/maps; every function here degrades to a
no-op (no mappings, zero figures) and the guard never trims.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from kvsvr.storage.engine import Storage

log = logging.getLogger(__name__)

# --- Limits --------------------------------------------------------------------

# How often the guard reads /proc/self/status. A node reads distinct values
# through its map at up to ~100 MB/s here, so RssFile grows by ~10 MiB at most
# between checks; one read of /proc/self/status costs tens of microseconds
# (10 a second: well under 0.1% of a core).
RESIDENCY_CHECK_S: Final = 0.1
# Above this RssFile the guard trims the data file's mapping. RssFile also
# counts the interpreter's and extensions' mapped code (~12 MiB in a node),
# which no trim lowers. A node may hold cache_bytes_max + 100 MiB of VmRSS,
# and a node's own memory (RssAnon) takes up to ~62 MiB above its cache
# budget (bench.cache_memory, 1 GiB through 64 MiB: 112-127 MiB, run to run).
# At 32 MiB plus one 8 MiB read check, RssFile peaked at ~40 MiB and VmRSS at
# 152-166 MiB against the 164 MiB bound; 24 MiB plus one 4 MiB check peaks
# at ~28 MiB (VmRSS 153-155 MiB), while each trim still leaves ~12 MiB of
# reads between trims (hot b-tree pages fault back once per trim).
#
# That budget assumes a full cache. A node's guard also lends the map the
# part of the cache budget the cache has never filled (`RowCache.
# budget_never_used`: bytes_max less its peak bytes_used): VmRSS is then at
# most base + cache memory + 24 MiB + (cache budget - cache peak), which is
# largest when the cache is full, i.e. the bound above still holds. Under
# strong writes of 100-byte values the cache never fills, the map holds the
# whole data file, and the guard stops trimming; before, with the map
# regrowing 64 KiB per fault (the kernel's fault-around), it trimmed on most
# checks and the trims and the re-faults took ~5% of the trio thread.
MAPPED_RSS_MAX_BYTES: Final = 24 << 20
# A burst of reads (an anti-entropy scan page, a range scan) maps pages far
# faster than one timer tick: the guard also checks after every this many
# bytes of rows read through the store (`Storage.set_read_hook`). One check
# is a read of /proc/self/status: tens of microseconds per 4 MiB read.
READ_CHECK_BYTES: Final = 4 << 20

# The LMDB file a node maps; `lock.mdb` is a few KiB and is never trimmed.
DATA_FILE_NAME: Final = "data.mdb"
# Only read-only shared mappings may be trimmed: their pages are never dirty
# in the process and re-fault from the page cache (see the module docstring).
TRIMMABLE_PERMISSIONS: Final = "r--s"

_IS_LINUX: Final = sys.platform.startswith("linux")
_PROC_STATUS: Final = "/proc/self/status"
_PROC_MAPS: Final = "/proc/self/maps"
_STATUS_FIELDS: Final = ("VmRSS", "RssAnon", "RssFile")


# --- /proc parsing (pure) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    """A process's resident memory from /proc/PID/status, in bytes."""

    vm_rss_bytes: int = 0
    rss_anon_bytes: int = 0
    rss_file_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    permissions: str
    path: str

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_status(text: str) -> MemoryFigures:
    """VmRSS, RssAnon and RssFile of a /proc/PID/status text (0 where absent)."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in _STATUS_FIELDS:
            amount, _, unit = rest.strip().partition(" ")
            assert unit.strip() == "kB", line
            kib[name] = int(amount)
    return MemoryFigures(
        vm_rss_bytes=kib.get("VmRSS", 0) << 10,
        rss_anon_bytes=kib.get("RssAnon", 0) << 10,
        rss_file_bytes=kib.get("RssFile", 0) << 10,
    )


def parse_maps(text: str, containing: str = "") -> list[Mapping]:
    """Every mapping of a /proc/PID/maps text (anonymous ones with path ""),
    or only those whose line contains `containing` (skipping the rest
    unparsed: a node's maps have ~250 lines and it wants one)."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        if containing not in line:
            continue
        # address perms offset dev inode [path]; the path may hold spaces.
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start, _, end = fields[0].partition("-")
        path = fields[5] if len(fields) == 6 else ""
        mappings.append(Mapping(int(start, 16), int(end, 16), fields[1], path))
    return mappings


def data_file_mappings(mappings: list[Mapping], data_file: str) -> list[Mapping]:
    """The read-only shared mappings of `data_file` (an absolute, resolved path)."""
    return [m for m in mappings if m.path == data_file and m.permissions == TRIMMABLE_PERMISSIONS]


# --- This process -------------------------------------------------------------------


def read_memory() -> MemoryFigures:
    """This process's VmRSS, RssAnon and RssFile (zeros off Linux)."""
    if not _IS_LINUX:
        return MemoryFigures()
    with open(_PROC_STATUS, encoding="ascii") as file:
        return parse_status(file.read())


def mapped_data_files(data_dir: str | Path) -> list[Mapping]:
    """This process's trimmable mappings of `data_dir`'s LMDB data file."""
    if not _IS_LINUX:
        return []
    data_file = os.path.realpath(Path(data_dir) / DATA_FILE_NAME)
    with open(_PROC_MAPS, encoding="utf-8", errors="surrogateescape") as file:
        return data_file_mappings(parse_maps(file.read(), data_file), data_file)


_libc: ctypes.CDLL | None = None


def _madvise_dontneed(start: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    assert start % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0
    if _libc.madvise(start, length, mmap.MADV_DONTNEED) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"madvise(MADV_DONTNEED): {os.strerror(errno)}")


def trim_data_file(data_dir: str | Path) -> int:
    """Drop this process's page-table entries of `data_dir`'s `data.mdb` map
    (the page cache keeps the pages). Returns the bytes of address space
    advised, 0 if the file is not mapped (or off Linux)."""
    return trim_mappings(mapped_data_files(data_dir))


def trim_mappings(mappings: list[Mapping]) -> int:
    """`trim_data_file` for mappings already looked up (see
    `ResidencyGuard._data_file_mappings` for when that is safe)."""
    advised = 0
    for mapping in mappings:
        assert mapping.permissions == TRIMMABLE_PERMISSIONS, mapping
        _madvise_dontneed(mapping.start, mapping.length)
        advised += mapping.length
    return advised


# --- The node task -------------------------------------------------------------------


class ResidencyGuard:
    """Trims the node's data-file map whenever RssFile passes the limit.
    Start with `nursery.start_soon(guard.run)`; `status()` for the node's status."""

    def __init__(
        self,
        data_dir: str | Path,
        storage: Storage | None = None,
        *,
        mapped_rss_max_bytes: int = MAPPED_RSS_MAX_BYTES,
        check_s: float = RESIDENCY_CHECK_S,
        read_check_bytes: int = READ_CHECK_BYTES,
        lent_bytes: Callable[[], int] | None = None,
    ) -> None:
        assert mapped_rss_max_bytes > 0 and check_s > 0 and read_check_bytes > 0
        self.data_dir = Path(data_dir)
        # Memory the node's bound allows some other part (the row cache) that
        # it has never taken: the map may hold that much more meanwhile.
        self.lent_bytes = lent_bytes
        # While `run` runs, this store's reads also trigger checks.
        self.storage = storage
        self.read_check_bytes = read_check_bytes
        self.mapped_rss_max_bytes = mapped_rss_max_bytes
        self.check_s = check_s
        self.checks = 0
        self.trims = 0
        # RssFile given back by trims (before minus after, summed): what the
        # node would have kept mapped otherwise.
        self.trimmed_bytes = 0
        self.enabled = _IS_LINUX
        # The data file's mappings, once found while `storage` is open.
        self._mappings: list[Mapping] = []

    def _data_file_mappings(self) -> list[Mapping]:
        """The data file's trimmable mappings. With a store, looked up once:
        LMDB maps the file when the environment opens and never moves the
        map while it stays open (only `mdb_env_set_mapsize` would, and kvsvr
        never calls it: a full map means a restart with a larger one, see
        `engine`), and this guard's store stays open for the guard's life.
        Without a store (tests trimming a map they may close and reopen) it
        is looked up every time."""
        storage = self.storage
        if storage is None:
            return mapped_data_files(self.data_dir)
        assert not storage.closed, "the residency guard outlived its store"
        if not self._mappings:
            self._mappings = mapped_data_files(self.data_dir)
        return self._mappings

    def check(self) -> bool:
        """Trim if RssFile is above the limit. Returns whether it trimmed."""
        if not self.enabled:
            return False
        self.checks += 1
        before = read_memory().rss_file_bytes
        if before <= self.limit_bytes():
            return False
        if trim_mappings(self._data_file_mappings()) == 0:
            return False
        after = read_memory().rss_file_bytes
        self.trims += 1
        self.trimmed_bytes += max(0, before - after)
        return True

    def limit_bytes(self) -> int:
        """The RssFile above which a check trims: `mapped_rss_max_bytes`, plus
        what `lent_bytes` lends now."""
        lent = 0 if self.lent_bytes is None else self.lent_bytes()
        assert lent >= 0
        return self.mapped_rss_max_bytes + lent

    def _check_or_disable(self) -> None:
        try:
            self.check()
        except OSError as error:
            # /proc or madvise refused (a sandbox without /proc): the node
            # serves on, its VmRSS just counts the mapped pages again.
            log.warning("residency guard stopped: %s", error)
            self.enabled = False
            if self.storage is not None:
                self.storage.set_read_hook(None, 0)

    async def run(self) -> None:
        """Check every `check_s`, and after every `read_check_bytes` read from
        the store, until cancelled."""
        if not self.enabled:
            return
        if self.storage is not None:
            self.storage.set_read_hook(self._check_or_disable, self.read_check_bytes)
        try:
            while self.enabled:
                self._check_or_disable()
                await trio.sleep(self.check_s)
        finally:
            if self.storage is not None:
                self.storage.set_read_hook(None, 0)

    def status(self) -> dict[str, Any]:
        figures = read_memory() if self.enabled else MemoryFigures()
        return {
            "vm_rss_bytes": figures.vm_rss_bytes,
            "rss_anon_bytes": figures.rss_anon_bytes,
            "rss_file_bytes": figures.rss_file_bytes,
            "mapped_rss_max_bytes": self.mapped_rss_max_bytes,
            "mapped_rss_limit_bytes": self.limit_bytes(),
            "checks": self.checks,
            "trims": self.trims,
            "trimmed_bytes": self.trimmed_bytes,
            "trimming": self.enabled,
        }
