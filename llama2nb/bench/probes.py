"""What one core of this machine offers, measured in the same run as the rows it is compared with.

The bandwidth probe streams a large array from a fresh process pinned like the rows; it runs
right before each run of a row that gets a roof, because the bandwidth of a shared machine drifts
within minutes (see benchmarks/performance.md). It reads the array as 1, 2, 4 and 8 interleaved
sequential streams and keeps the best: one core's memory system serves several streams faster
than one, and the engine's matmuls read two, so a single-stream probe would understate the roof.
PROBE_GIB is a module setting, passed to the worker, so a test can make the probe quick.

The compute peaks are written in LLVM IR (Numba intrinsics, as kernels/simd.py): twelve
independent chains of the widest fp32 FMA (or VNNI vpdpbusd) the CPU has, so that no latency and
no load limits them; their rate is what a compute-bound row (prefill, generation from cache) is
measured against.
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


def probe_bandwidth() -> dict:
    """Single-core read bandwidth now, from a fresh process pinned like the rows: the best GB/s
    ("bandwidth_gbs") and each stream count's ("bandwidth_by_streams")."""
    return run_worker(["bandwidth", str(PROBE_GIB)])


STREAMS = (1, 2, 4, 8)
STREAM_CHUNK = 4096  # floats each stream reads in turn (16 KB): sequential within a stream


def bandwidth_worker(gib: float = PROBE_GIB, runs: int = 3) -> dict:
    """The `bandwidth` worker: a single-core read of a large array as 1, 2, 4 and 8 interleaved
    sequential streams, GB/s (best of `runs` each); the best of them is the roof's bandwidth."""
    import numba

    pin_to_one_core()

    @numba.njit(fastmath=True)
    def read_streams(a, k):
        """Sum a (n,) read as k streams over its k equal parts, STREAM_CHUNK floats in turn."""
        part = a.shape[0] // k
        total = np.float32(0.0)
        for start in range(0, part - STREAM_CHUNK + 1, STREAM_CHUNK):
            for s in range(k):
                chunk = a[s * part + start:s * part + start + STREAM_CHUNK]
                for i in range(STREAM_CHUNK):
                    total += chunk[i]
        return total

    a = np.ones(int(gib * 2**30) // 4, np.float32)  # NumPy asks for 2 MB pages for large arrays
    read_streams(a[:8 * STREAM_CHUNK], 1)
    by_streams = {}
    for k in STREAMS:
        read = (a.shape[0] // k // STREAM_CHUNK) * STREAM_CHUNK * k * 4
        best = 0.0
        for _ in range(runs):
            started = time.perf_counter()
            read_streams(a, k)
            best = max(best, read / (time.perf_counter() - started) / 1e9)
        by_streams[str(k)] = best
    return {"bandwidth_gbs": max(by_streams.values()), "bandwidth_by_streams": by_streams}


def compute_worker(seconds: float = 0.2) -> dict:
    """The `compute` worker: this core's fp32 FMA peak (GFLOP/s) and int8 VNNI peak (GOP/s,
    multiply and add counted apart, as FLOPs are); None where the CPU has no VNNI."""
    import numba

    from . import peaks

    pin_to_one_core()

    @numba.njit
    def fma(n):
        return peaks.fma_chains(n)

    result = {"fma_gflops": _rate(fma, seconds, peaks.fma_ops_per_iteration()), "vnni_gops": None}
    if peaks.vnni_width():
        @numba.njit
        def vnni(n):
            return peaks.vnni_chains(n)

        result["vnni_gops"] = _rate(vnni, seconds, peaks.vnni_ops_per_iteration())
    return result


def _rate(kernel, seconds: float, ops_per_iteration: int) -> float:
    """Operations per second (in G) of kernel(n), n grown until a run takes `seconds`; best of 3."""
    kernel(1)
    n = 1 << 16
    while True:
        started = time.perf_counter()
        kernel(n)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        n *= 2
    best = elapsed
    for _ in range(2):
        started = time.perf_counter()
        kernel(n)
        best = min(best, time.perf_counter() - started)
    return n * ops_per_iteration / best / 1e9


def probe_compute() -> dict:
    """The compute peaks, from a fresh process pinned like the rows."""
    return run_worker(["compute"])


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
