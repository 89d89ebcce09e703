"""Map a file read-only in 2 MB pages where Linux allows it, so that streaming the weights
runs at the speed of memory rather than of the TLB.

Generating a token reads every weight once. Mapped in 4 KB pages, that is a TLB miss every 4
KB, and the hardware prefetcher starts over at each page: a model mapped in small pages
generates measurably slower than the same bytes copied into (2 MB-page) anonymous memory
(benchmarks/performance.md). Linux (5.18+) reads a file into 2 MB page-cache pages when a
mapping advised MADV_HUGEPAGE faults on it, and any later mapping of those pages maps them
whole. But a fault reads ahead around itself, and the forward pass reads the file out of order
(wq of layer 0, then wk of layer 0, ...): the read-ahead windows then collide and leave gaps
filled in small pages. So before the real mapping, a throwaway one is faulted in file order,
once every 2 MB, which leaves the whole file cached in 2 MB pages (a no-op when it already is).
Pages the file was already cached in stay as they are, so when that pass finds small pages, the
file's cached pages are written back and evicted, and the pass runs again: a one-off re-read,
after which every load is fast. The real mapping starts untouched (loading adds nothing to
RSS). Elsewhere (no THP, macOS, Windows, a file system that keeps small pages) this is a plain
np.memmap, after a throwaway mapping has been faulted in file order once per 4 KB page: either
way the file is read here, where `progress(bytes, size)` can show it, and not by the first
forward pass (which would count a cold 7 GB read as the kernels' compile time).
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

import numpy as np

HUGE_PAGE = 2 << 20
READ_STEP = 64 << 20  # bytes faulted in between two progress reports
Progress = Callable[[int, int], None]  # (bytes of the file read so far, its size)
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

# file systems (st_dev) whose files stayed in small pages even after a fresh read: not retried
_no_huge_pages: set[int] = set()


def map_read_only(path: str | os.PathLike, progress: Progress | None = None) -> np.memmap:
    """np.memmap(path, uint8, "r"), in 2 MB pages when the platform can (see the module doc),
    the file read once in order first; `progress` is called as it is read."""
    stat = os.stat(path)
    eligible = stat.st_size >= 2 * HUGE_PAGE and stat.st_dev not in _no_huge_pages and _huge_pages_possible()
    if not (eligible and _cached_in_huge_pages_after_eviction(path, progress)):
        _fault_in_order(_map_advised(path), mmap.PAGESIZE, stat.st_size, progress)  # a no-op for a cached file
    return _map_advised(path)


def anonymous(nbytes: int) -> np.ndarray:
    """A zeroed (nbytes,) uint8 array in anonymous memory advised into 2 MB pages where the
    platform allows (for weights repacked at load, streamed like the mapped ones)."""
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None and nbytes >= HUGE_PAGE:
        try:
            memory.madvise(advise)
        except OSError:
            pass
    return np.frombuffer(memory, np.uint8, count=nbytes)


class Arena:
    """One anonymous() mapping handed out in pieces (64-byte aligned) by calling it with a size:
    the matrices a model repacks at load lie in one mapping, all of it eligible for 2 MB pages,
    where each in a mapping of its own (most under 2 MB) would stream from 4 KB pages."""

    def __init__(self, nbytes: int):
        self.memory = anonymous(nbytes)
        self.used = 0

    def __call__(self, nbytes: int) -> np.ndarray:
        start = -(-self.used // 64) * 64
        if start + nbytes > self.memory.size:
            raise MemoryError(f"arena: {nbytes} bytes asked for, {self.memory.size - start} left")
        self.used = start + nbytes
        return self.memory[start:start + nbytes]


def fault_in(mm: np.ndarray) -> None:
    """Fault every page of a mapping in, in order (a no-op for pages already mapped). The first
    pass over a mapping of a file just read from disk sets up its page tables, which takes
    seconds for a multi-GB file: whoever times loading apart from running calls this."""
    _fault_in_order(mm, mmap.PAGESIZE, mm.size, None)


def _cached_in_huge_pages_after_eviction(path: str | os.PathLike, progress: Progress | None) -> bool:
    """Whether the file now sits in the page cache in 2 MB pages: after one faulting pass, or
    after evicting its small pages and a second one."""
    if _cache_in_huge_pages(path, progress):
        return True
    try:
        _evict_from_page_cache(path)
    except OSError:  # a read-only file system, say: keep the small pages
        return False
    if _cache_in_huge_pages(path, progress):
        return True
    _no_huge_pages.add(os.stat(path).st_dev)  # this file system keeps files in small pages
    return False


def _fault_in_order(mm: np.ndarray, stride: int, end: int, progress: Progress | None) -> None:
    """Touch one byte every `stride` bytes of mm[:end], in file order, reporting progress (the
    whole file once the pass is through: what a 2 MB-page pass leaves, a part page, is small)."""
    for start in range(0, end, READ_STEP):
        stop = min(start + READ_STEP, end)
        int(mm[start:stop:stride].max())
        if progress is not None:
            progress(stop if stop < end else mm.size, mm.size)


def _evict_from_page_cache(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only written-back pages can be evicted (a file just written may not be)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _map_advised(path: str | os.PathLike) -> np.memmap:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    handle = getattr(mm, "_mmap", None)  # the mmap.mmap object np.memmap keeps
    if advise is not None and handle is not None:
        try:
            handle.madvise(advise)
        except OSError:
            pass
    return mm


def _huge_pages_possible() -> bool:
    """Transparent huge pages are on ("always" or "madvise") and the OS can say how a mapping is
    backed (/proc/self/smaps)."""
    try:
        with open(THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return False
    return "[never]" not in setting and hasattr(os, "posix_fadvise") and os.path.exists("/proc/self/smaps")


def _cache_in_huge_pages(path: str | os.PathLike, progress: Progress | None = None) -> bool:
    """Fault a throwaway advised mapping of the file in file order, one byte every 2 MB, and
    say whether every whole 2 MB page of it came in as one 2 MB page (FilePmdMapped in
    /proc/self/smaps). True also where the mapping is not 2 MB-aligned (nothing to gain)."""
    mm = _map_advised(path)
    start = mm.ctypes.data
    if start % HUGE_PAGE:  # file offsets and addresses out of step: 2 MB pages cannot map it
        _fault_in_order(mm, mmap.PAGESIZE, mm.size, progress)
        return True
    pages = mm.size // HUGE_PAGE
    _fault_in_order(mm, HUGE_PAGE, pages * HUGE_PAGE, progress)  # every whole 2 MB page, in order
    return mapped_in_huge_pages_kb(mm) >= pages * HUGE_PAGE // 1024


def mapped_in_huge_pages_kb(mm: np.ndarray) -> int:
    """FilePmdMapped of the mapping that starts at mm's first byte (/proc/self/smaps), in kB."""
    header = f"{mm.ctypes.data:x}-"
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                inside = line.startswith(header)
            elif inside and line.startswith("FilePmdMapped:"):
                return int(line.split()[1])
    return 0
