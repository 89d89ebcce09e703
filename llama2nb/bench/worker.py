"""The bench's worker protocol: every measurement in a fresh process, pinned to one core.

The parent runs `python -m llama2nb.bench KIND ARGS...` (llama2nb/bench/__main__.py) with the
environment that defines the measurement (a variable given as None is removed from it) and reads
one JSON object from the last line of the child's stdout. A row of N threads runs on N cores. A process of its own per measurement, because Numba reads NUMBA_OPT and
NUMBA_DISABLE_JIT once at import, and because peak memory and compile time are per process.
This module holds the parent's side (`run_worker`) and the timing the `row` worker does.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def generation_key(steps: int) -> str:
    """A result's key for generation over `steps` positions, llama-bench style: tg128."""
    return f"tg{steps}"


def prefill_key(n: int) -> str:
    """A result's key for prompt processing of n tokens: pp128."""
    return f"pp{n}"


def run_worker(args: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    """Run one worker process and return the JSON object it printed last."""
    command = [sys.executable, "-m", "llama2nb.bench", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {name: value for name, value in full_env.items() if value is not None}
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmark worker {' '.join(args[:3])} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pinned_core() -> int:
    """The core every single-threaded measurement runs on (ours and llama2.c's alike)."""
    return max(os.sched_getaffinity(0))


def pinned_cores(n: int) -> set[int]:
    """The n cores a measurement of n threads runs on: the pinned core and those below it."""
    return set(sorted(os.sched_getaffinity(0))[-n:])


def pin_to_one_core() -> None:
    pin_to_cores(1)


def pin_to_cores(n: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, pinned_cores(n))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: a child keeps
    the high-water mark of the parent it was forked from across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_generation(model, steps: int) -> float:
    """Greedy generation from BOS over `steps` positions; tok/s timed from the second token."""
    token, started = 1, 0.0
    for pos in range(steps):
        if pos == 1:
            started = time.perf_counter()
        token = int(np.argmax(model.forward(token, pos)))
    return (steps - 1) / (time.perf_counter() - started)


def time_prefill(model, n: int) -> float:
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, n)
    started = time.perf_counter()
    model.prefill(tokens)
    return n / (time.perf_counter() - started)


FLOAT_FORMATS = ("f32", "f16", "bf16")  # matmuls in float; every other format's are integer dot products


def prefill_flops_per_token(config) -> int:
    """Multiply-adds x 2 of one token's layer matmuls: a prompt's work per token (its classifier
    runs for the last token only)."""
    return 2 * config.n_layers * sum(rows * cols for rows, cols in config.matrix_shapes().values())


def measure_in_process(spec: dict) -> dict:
    """The `row` worker: spec has path, fastmath, threads, runs, tg and pp (lists of lengths),
    pure_python, in_memory and compile_cores (the cores loading may compile on; 1 by default). Lengths beyond the model's context are skipped."""
    from llama2nb import Transformer

    threads = spec.get("threads", 1)
    pin_to_cores(max(threads, spec.get("compile_cores", 1)))  # the cores compiling may use (jit.compile_ahead)
    started = time.perf_counter()
    model = Transformer.load(spec["path"], fastmath=spec["fastmath"], threads=threads,
                             warm_up=not spec.get("pure_python"), in_memory=spec.get("in_memory", False))
    pin_to_cores(threads)
    result: dict = {"load_s": time.perf_counter() - started, "compile_s": model.compile_seconds,
                    "family": model.family, "threads_used": model.threads,  # fewer than asked for a small model
                    "flops_per_token": prefill_flops_per_token(model.config),
                    "int8": any(f.name not in FLOAT_FORMATS for f in model.weight_formats)}
    seq_len = model.config.seq_len
    for steps in (s for s in spec.get("tg", []) if s <= seq_len):
        result[generation_key(steps)] = [time_generation(model, steps) for _ in range(spec["runs"])]
    for n in (n for n in spec.get("pp", []) if n <= seq_len):
        result[prefill_key(n)] = [time_prefill(model, n) for _ in range(spec["runs"])]
    result["peak_rss_mb"] = peak_rss_mb()
    return result
