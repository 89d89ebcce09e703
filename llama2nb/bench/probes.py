"""What one core of this machine offers, measured in the same run as the rows it is compared with.

The bandwidth probe streams a large array from a fresh process pinned like the rows; it runs
right before each run of a row that gets a roof, because the bandwidth of a shared machine drifts
within minutes (see benchmarks/performance.md). PROBE_GIB is a module setting, passed to the
worker, so a test can make the probe quick. Later probes (more streams, 2 MB pages, FMA and VNNI
peaks) belong here, each a worker kind in __main__.py.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from .worker import pin_to_one_core, run_worker

# The probe's array: far larger than any last-level cache, so it streams from DRAM (the sizes
# it was chosen against are in benchmarks/performance.md).
PROBE_GIB = 1.0


def probe_bandwidth() -> float:
    """Single-core read bandwidth now, GB/s, from a fresh process pinned like the rows."""
    return run_worker(["bandwidth", str(PROBE_GIB)])["bandwidth_gbs"]


def bandwidth_worker(gib: float = PROBE_GIB, runs: int = 5) -> dict:
    """The `bandwidth` worker: a single-core streaming read of a large array, GB/s (best of `runs`)."""
    import numba

    pin_to_one_core()

    @numba.njit(fastmath=True)
    def stream(a):
        total = np.float32(0.0)
        for i in range(a.shape[0]):
            total += a[i]
        return total

    a = np.ones(int(gib * 2**30) // 4, np.float32)
    stream(a[:1024])
    best = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        stream(a)
        best = max(best, a.nbytes / (time.perf_counter() - started) / 1e9)
    return {"bandwidth_gbs": best}


def last_level_cache_bytes() -> int:
    """The L3 (or largest) cache's size from sysfs; 0 where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            sizes.append(parse_cache_size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=0)


def parse_cache_size(text: str) -> int:
    """sysfs's cache size notation in bytes: '32768K', '32M' or a plain byte count."""
    text = text.strip()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def machine_description() -> str:
    """CPU model, core count and the versions that decide the generated code."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}, "
            f"Numba {numba.__version__}, one core pinned")
