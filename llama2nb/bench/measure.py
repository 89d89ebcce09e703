"""Measuring one row: its runs, in worker processes or the user's llama2.c binary, and its roof.

A row that gets a roof runs each time in a process of its own right after a bandwidth probe: the
bandwidth of a shared machine drifts within minutes (see benchmarks/performance.md), and a ratio
means something only when both of its sides are measured together. Other rows make all their
runs in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import probes, roofs
from .models import ModelFiles, file_bytes_per_token, file_config
from .rows import Row
from .runc import measure_c_row
from .worker import generation_key, run_worker


def measure_row(row: Row, files: ModelFiles, cache_dir: Path, cache_bytes: int) -> None:
    """Fill row.result: the rates of every run, costs, and the roof where the row has one."""
    config, weight_bytes = file_config(row.path), file_bytes_per_token(row.path)
    row.result["bytes_per_token"] = weight_bytes
    if not roofs.gets_dram_roof(weight_bytes, cache_bytes):
        merge_runs(row.result, measure_runs(row, row.runs, files, cache_dir))
        if measures_generation(row):
            row.result["roof"] = roofs.IN_CACHE
        return
    for _ in range(row.runs):
        probe = probes.probe_bandwidth()
        row.result.setdefault("bandwidth_gbs", []).append(probe["bandwidth_gbs"])
        row.result.setdefault("bandwidth_by_streams", []).append(probe["bandwidth_by_streams"])
        merge_runs(row.result, measure_runs(row, 1, files, cache_dir))
    if measures_generation(row):
        row.result["roof"] = roofs.generation_roofs(config, weight_bytes, row.tg, row.result)


def measures_generation(row: Row) -> bool:
    return any(generation_key(n) in row.result for n in row.tg)


def measure_runs(row: Row, runs: int, files: ModelFiles, cache_dir: Path) -> dict:
    """`runs` runs of one row: a worker process, or the user's llama2.c binary."""
    if row.c_binary:
        return measure_c_row(row.c_binary, row.path, files.tokenizer, row.tg, runs)
    spec = row_spec(row, runs)
    if row.engine == "llama.cpp":
        return run_worker(["llamacpp", json.dumps(spec)])
    env = dict(row.env)
    if "NUMBA_OPT" in env:  # its own cache folder: Numba's cache key does not include the opt level
        env["NUMBA_CACHE_DIR"] = str(cache_dir / "numba-opt0")
    return run_worker(["row", json.dumps(spec)], env)


def row_spec(row: Row, runs: int) -> dict:
    """What a worker (ours or llama.cpp's) is told to measure for `runs` runs of the row."""
    return {"path": str(row.path), "fastmath": row.fastmath, "runs": runs, "tg": list(row.tg),
            "pp": list(row.pp), "threads": row.threads, "pure_python": row.pure_python,
            "in_memory": row.in_memory}


def merge_runs(into: dict, new: dict) -> None:
    """Add one process's measurements to a row's: lists of rates grow, costs keep their worst."""
    for key, value in new.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into[key] = max(into.get(key, value), value)
