"""Start-up: seconds from spawning a fresh process to its first logits, warm and cold.

What a user waits for before the first token: the interpreter, the imports, loading the model and
compiling (cold: an empty Numba cache folder) or loading the compiled kernels from Numba's usual
cache (warm, after a first run has filled it).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from .models import ModelFiles
from .worker import run_worker


def first_token_worker(path: str, fastmath: str) -> dict:
    """The `first-token` worker: load, one forward pass, and the wall-clock time it finished."""
    from llama2nb import Transformer

    model = Transformer.load(path, fastmath=fastmath, warm_up=False)
    model.forward(1, 0)
    return {"compiled_at": time.time()}


def time_to_first_token(path: Path, fastmath: str, cache_dir: Path | None) -> float:
    """Wall time of a fresh process from spawn to first logits; cache_dir=None: Numba's usual
    cache, else that folder."""
    env = {"NUMBA_CACHE_DIR": str(cache_dir)} if cache_dir else {}
    started = time.time()
    finished = run_worker(["first-token", str(path), fastmath], env)["compiled_at"]
    return finished - started


def startup_models(files: ModelFiles, shapes: list[str]) -> list[tuple[str, Path]]:
    """(name, fp32 file) of the bundled model, where installed, and of every shape measured that
    has an fp32 file."""
    bundled = [("bundled", files.bundled)] if files.bundled else []
    return bundled + [(name, files.fp32[name]) for name in shapes if name in files.fp32]


def measure_startup(models: list[tuple[str, Path]], runs: int, log=print) -> list[dict]:
    """Per model: the median warm start over `runs`, and one cold start."""
    startup = []
    for name, path in models:
        log(f"  start-up: {name}")
        with tempfile.TemporaryDirectory() as cold:
            cold_s = time_to_first_token(path, "full", Path(cold))
        time_to_first_token(path, "full", None)  # make sure the usual cache is warm
        warm_s = statistics.median(time_to_first_token(path, "full", None) for _ in range(runs))
        startup.append({"model": name, "ttft_warm_s": warm_s, "ttft_cold_s": cold_s})
    return startup
