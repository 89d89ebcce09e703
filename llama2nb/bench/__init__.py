"""`llama2nb bench`: llama-bench-style speed measurements, side by side in one run.

Every measurement runs in a fresh worker process pinned to one core (N cores for a row of N
threads), with the environment that defines its row (NUMBA_OPT, NUMBA_DISABLE_JIT, the portable
path's target CPU, its own Numba cache folder), and reports JSON on stdout (worker.py, __main__.py). Timing does not depend on weight values, so the stories15M/42M/110M
shapes are random weights written once into a cache folder (models.py). rows.py says what is
measured, measure.py how, roofs.py against which bound, probes.py what the machine offers,
startup.py how long a first token takes, families.py how long each kernel family takes to compile
from nothing, report.py how it is shown. This module runs them in order.
"""

from __future__ import annotations

from pathlib import Path

from . import probes
from .llamacpp import available as available_llamacpp
from .families import measure_families
from .measure import measure_row
from .models import SHAPES, default_cache_dir, ensure_gguf, ensure_models
from .report import build_report, markdown_table, save_report
from .rows import PORTABLE_TYPES, build_rows, columns, portable_shape
from .startup import measure_startup, startup_models

__all__ = ["SHAPES", "run_benchmark"]


def run_benchmark(shapes: list[str], runs: int = 3, cache_dir: Path | None = None, runc: str | None = None,
                  runq: str | None = None, threads: int = 1, out_dir: Path = Path("benchmarks/results"),
                  log=print, gguf_types: list[str] = (), llamacpp: bool = False, portable: bool = False) -> dict:
    """Measure every row, start-up and each kernel family's cold compile for these shapes (and
    their GGUF copies in gguf_types, beside llama.cpp with `llamacpp`; the first stories shape's
    Q8_0 and Q4_0 on the portable path with `portable`), save the report into out_dir, return it."""
    cache_dir = cache_dir or default_cache_dir()
    files = ensure_models(cache_dir, shapes, log, gguf_types)
    if gguf_types:
        ensure_gguf(cache_dir, files, shapes, list(gguf_types), log)
    if portable and portable_shape(shapes):  # the files the portable rows run on
        ensure_gguf(cache_dir, files, [portable_shape(shapes)], [t for t in PORTABLE_TYPES if t not in gguf_types],
                    log)
    cache_bytes = probes.last_level_cache_bytes()
    rows = build_rows(files, shapes, runs, runc, runq, threads, llamacpp, portable)
    for row in rows:
        log(f"  {row.section}: {row.label}")
        measure_row(row, files, cache_dir, cache_bytes)
    bandwidths = [gbs for row in rows for gbs in row.result.get("bandwidth_gbs", [])]
    if not bandwidths:  # every model fits the cache: the header still reports the machine's bandwidth
        bandwidths.append(probes.probe_bandwidth()["bandwidth_gbs"])
    startup = measure_startup(startup_models(files, shapes), runs, log)
    families = measure_families(rows, log)
    peaks = probes.probe_compute()
    generation, prefill = columns(shapes)
    report = build_report(rows, startup, bandwidths, probes.machine_description(), generation, prefill, peaks,
                          families)
    if llamacpp:
        report["llamacpp"] = available_llamacpp()
        report["markdown"] = markdown_table(report)  # its ratio table names the version
    save_report(report, out_dir)
    return report
