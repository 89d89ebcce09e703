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
RSS). Elsewhere (no THP, macOS, Windows) this is a plain np.memmap.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

HUGE_PAGE = 2 << 20
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

# file systems (st_dev) whose files stayed in small pages even after a fresh read: not retried
_no_huge_pages: set[int] = set()


def map_read_only(path: str | os.PathLike) -> np.memmap:
    """np.memmap(path, uint8, "r"), in 2 MB pages when the platform can (see the module doc)."""
    stat = os.stat(path)
    eligible = stat.st_size >= 2 * HUGE_PAGE and stat.st_dev not in _no_huge_pages and _huge_pages_possible()
    if eligible and not _cache_in_huge_pages(path):
        try:
            _evict_from_page_cache(path)
        except OSError:  # a read-only file system, say: keep the small pages
            pass
        else:
            if not _cache_in_huge_pages(path):
                _no_huge_pages.add(stat.st_dev)  # this file system keeps files in small pages
    return _map_advised(path)


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


def _cache_in_huge_pages(path: str | os.PathLike) -> bool:
    """Fault a throwaway advised mapping of the file in file order, one byte every 2 MB, and
    say whether every whole 2 MB page of it came in as one 2 MB page (FilePmdMapped in
    /proc/self/smaps). True also where the mapping is not 2 MB-aligned (nothing to gain)."""
    mm = _map_advised(path)
    start = mm.ctypes.data
    if start % HUGE_PAGE:
        return True  # file offsets and addresses out of step: 2 MB pages cannot map it
    pages = mm.size // HUGE_PAGE
    int(mm[:pages * HUGE_PAGE:HUGE_PAGE].max())  # fault every whole 2 MB page, in order
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
