"""llama.cpp on the same cores and the same GGUF files, timed exactly as llama2nb's rows are.

The yardstick is the newest llama.cpp, through llama-cpp-python's low-level API (llama_decode
on a batch, then the logits), wrapped so that worker.time_generation and worker.time_prefill
time it with the same loop and the same statistic as the engine: greedy tokens from BOS, one
prompt of random tokens, on the row's threads pinned to as many cores as llama2nb's rows of that
thread count. It is an extra a user asks for (`pip install llama-cpp-python` compiles
llama.cpp from source for minutes: CMAKE_ARGS in benchmarks/performance.md), never part of
`make install`; without it the bench reports the engine against the roofs alone.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .worker import generation_key, pin_to_cores, prefill_key, time_generation, time_prefill


def available() -> str | None:
    """llama-cpp-python's version, or None where it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


@dataclass
class _Config:
    vocab_size: int
    seq_len: int


class LlamaCppModel:
    """forward(token, pos) and prefill(tokens) over a llama.cpp context on `threads` threads."""

    def __init__(self, path: str, n_ctx: int, n_batch: int, threads: int = 1):
        import llama_cpp as l

        self._l = l
        self._quiet = l.llama_log_callback(lambda level, text, user_data: None)  # kept alive with self
        l.llama_log_set(self._quiet, ctypes.c_void_p())
        l.llama_backend_init()
        self._model = l.llama_model_load_from_file(str(path).encode(), l.llama_model_default_params())
        if not self._model:
            raise RuntimeError(f"{path}: llama.cpp could not load it")
        params = l.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_threads = params.n_threads_batch = threads
        self._ctx = l.llama_init_from_model(self._model, params)
        vocab = l.llama_model_get_vocab(self._model)
        self.config = _Config(l.llama_vocab_n_tokens(vocab), n_ctx)

    def _decode(self, tokens) -> np.ndarray:
        l = self._l
        ids = (l.llama_token * len(tokens))(*(int(t) for t in tokens))
        if l.llama_decode(self._ctx, l.llama_batch_get_one(ids, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = l.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), (self.config.vocab_size,))

    def forward(self, token: int, pos: int) -> np.ndarray:
        if pos == 0:
            self._l.llama_memory_clear(self._l.llama_get_memory(self._ctx), True)
        return self._decode([token])

    def prefill(self, tokens) -> np.ndarray:
        self._l.llama_memory_clear(self._l.llama_get_memory(self._ctx), True)
        return self._decode(tokens)

    def close(self) -> None:
        self._l.llama_free(self._ctx)
        self._l.llama_model_free(self._model)


def quantize(source, out, ftype: int, requantize: bool = False) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from an F32 GGUF (with `requantize`, a
    quantized one) to file type `ftype` (its LLAMA_FTYPE_MOSTLY_* value), into a temp name
    renamed on success."""
    import llama_cpp as l

    from ..atomic import atomic_path

    params = l.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = ftype, 2, requantize
    quiet = l.llama_log_callback(lambda level, text, user_data: None)
    l.llama_log_set(quiet, ctypes.c_void_p())
    with atomic_path(out) as tmp:
        if l.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"{source}: llama.cpp's quantizer failed (file type {ftype})")


def llamacpp_worker(spec: dict) -> dict:
    """The `llamacpp` worker: spec has path, runs, threads, tg and pp (lists of lengths), like a row's."""
    threads = spec.get("threads", 1)
    pin_to_cores(threads)
    tg, pp = spec.get("tg", []), spec.get("pp", [])
    model = LlamaCppModel(spec["path"], n_ctx=max([*tg, *pp, 8]), n_batch=max([*pp, 8]), threads=threads)
    result: dict = {"engine_version": f"llama-cpp-python {available()}"}
    for steps in tg:
        result[generation_key(steps)] = [time_generation(model, steps) for _ in range(spec["runs"])]
    for n in pp:
        result[prefill_key(n)] = [time_prefill(model, n) for _ in range(spec["runs"])]
    model.close()
    return result
