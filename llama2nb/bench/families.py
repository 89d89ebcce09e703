"""Compile seconds per kernel family, cold cache: what a first run waits for, per family.

A kernel family is what forward.compiled builds for one model: one fastmath setting, the model's
weight formats (a mixed-type GGUF's all together), threading, and the SIMD paths of the target
CPU; forward.family_name names it and the row worker reports its row's. The rows' own "compile s"
column is mostly loading kernels from the Numba cache the earlier runs filled, so each family the
rows used is compiled once more here, from nothing: a fresh process with an empty Numba cache
folder, the environment of a row that used it (a portable row's target CPU, NUMBA_OPT), on the
smallest file among those rows, and Transformer.compile_seconds is the measurement: once on one
core, and once on every core the bench may use (a first run compiles its kernels in parallel
processes, jit.compile_ahead).
"""

from __future__ import annotations

import json
import tempfile

from ..kernels.jit import usable_cores
from .measure import row_spec
from .rows import Row
from .worker import run_worker


def family_key(row: Row) -> tuple[str, str] | None:
    """(family, environment) of a llama2nb row that compiled kernels; None for any other row."""
    if row.engine != "llama2nb" or row.c_binary or row.pure_python or "family" not in row.result:
        return None
    return row.result["family"], environment_name(row.env)


def environment_name(env: dict) -> str:
    """A row environment as the family table shows it (the portable path's feature list apart)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items()) if k != "NUMBA_CPU_FEATURES" and v is not None)


def family_rows(rows: list[Row]) -> dict[tuple[str, str], Row]:
    """Per family used, in the order first used: the row with the smallest file to compile it on."""
    chosen: dict[tuple[str, str], Row] = {}
    for row in rows:
        key = family_key(row)
        if key is None:
            continue
        if key not in chosen or row.result.get("bytes_per_token", 0) < chosen[key].result.get("bytes_per_token", 0):
            chosen[key] = row
    return chosen


def cold_compile_spec(row: Row) -> dict:
    """A row worker's spec that loads and compiles the row's model and measures nothing else."""
    return {**row_spec(row, 0), "tg": [], "pp": [], "pure_python": False, "in_memory": False}


def measure_families(rows: list[Row], log=print, cores: int | None = None) -> list[dict]:
    """Each family's compile seconds from an empty Numba cache, on one core and on `cores` (every
    core the bench may use: jit.compile_ahead compiles a model's kernels in that many processes):
    [{family, env, file, compile_s, cores, compile_s_cores}], the last two where cores > 1."""
    cores = usable_cores() if cores is None else cores
    measured = []
    for (family, env), row in family_rows(rows).items():
        log(f"  compiling from a cold cache: {family}" + (f" ({env})" if env else ""))
        found = {"family": family, "env": env, "file": row.path.name}
        for n, key in ((1, "compile_s"), (cores, "compile_s_cores"))[:2 if cores > 1 else 1]:
            with tempfile.TemporaryDirectory() as cold:
                spec = {**cold_compile_spec(row), "compile_cores": n}
                found[key] = run_worker(["row", json.dumps(spec)], {**row.env, "NUMBA_CACHE_DIR": cold})["compile_s"]
        measured.append({**found, "cores": cores} if cores > 1 else found)
    return measured
