"""llama2.c's own binaries (run.c, runq.c) as rows: the user's builds, on the bench's files.

This project neither ships nor builds llama2.c. A binary runs pinned to the core our workers use,
greedy (-t 0), and its own closing 'achieved tok/s' line is the measurement: run.c times from the
second token, as our generation rows do.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .worker import generation_key, pinned_core

ACHIEVED = re.compile(r"achieved tok/s:\s*([0-9.]+)")


def run_c(binary: str, path: Path, tokenizer: Path, steps: int, runs: int) -> list[float]:
    """run.c / runq.c's 'achieved tok/s' over `steps` positions, once per run."""
    return [run_c_once(binary, path, tokenizer, steps) for _ in range(runs)]


def run_c_once(binary: str, path: Path, tokenizer: Path, steps: int) -> float:
    command = ["taskset", "-c", str(pinned_core()), binary, str(path), "-z", str(tokenizer), "-t", "0",
               "-n", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = ACHIEVED.search(done.stderr + done.stdout)
    if not found:
        raise RuntimeError(f"{binary}: no 'achieved tok/s' in its output (exit {done.returncode})")
    return float(found.group(1))


def measure_c_row(binary: str, path: Path, tokenizer: Path, lengths: tuple, runs: int) -> dict:
    """A C row's result, keyed like a worker's: generation only (llama2.c has no batched prefill)."""
    return {generation_key(n): run_c(binary, path, tokenizer, n, runs) for n in lengths}
