"""Which configurations `llama2nb bench` measures: the rows of its table, in order.

Two sections. "flags" retells llama2.c's gcc-flag story in Numba's terms on one model (pure
Python, NUMBA_OPT=0, no fastmath, reassociation, full fastmath, int8), beside the user's run.c and
runq.c if given. "models" measures every shape as fp32 (mapped and in memory) and Q8_0, with the
llama2.c binaries and a multi-threaded row where asked. GENERATION and PREFILL are the lengths
measured, and the table's columns; the flag rows measure only the first of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .models import ModelFiles

GENERATION = (128, 256)  # tokens generated from BOS: the tg columns
PREFILL = (128, 256)  # prompt lengths: the pp columns
# Interpreted, a token takes seconds (see benchmarks/performance.md): a short run, labelled with its length.
PURE_PYTHON_STEPS = 3


@dataclass
class Row:
    section: str
    label: str
    path: Path
    fastmath: str = "full"
    env: dict = field(default_factory=dict)
    tg: tuple = GENERATION
    pp: tuple = PREFILL
    runs: int = 3
    pure_python: bool = False
    threads: int = 1
    in_memory: bool = False
    c_binary: str | None = None
    engine: str = "llama2nb"  # or "llama.cpp" (bench/llamacpp.py), on a GGUF file
    result: dict = field(default_factory=dict)


def build_rows(files: ModelFiles, shapes: list[str], runs: int, runc: str | None, runq: str | None,
               threads: int, llamacpp: bool = False) -> list[Row]:
    return (flag_rows(files, shapes, runs, runc, runq) + model_rows(files, shapes, runs, runc, runq, threads)
            + gguf_rows(files, shapes, runs, llamacpp))


def gguf_rows(files: ModelFiles, shapes: list[str], runs: int, llamacpp: bool) -> list[Row]:
    """Each shape's GGUF files, each followed by llama.cpp on the same file when asked for."""
    rows = []
    for name in shapes:
        for type_, path in files.gguf.get(name, {}).items():
            label = f"stories{name} shape, {type_} GGUF"
            rows.append(Row("gguf", label, path, runs=runs))
            if llamacpp:
                rows.append(Row("gguf", f"{label}, llama.cpp", path, runs=runs, engine="llama.cpp"))
    return rows


def flag_rows(files: ModelFiles, shapes: list[str], runs: int, runc: str | None, runq: str | None) -> list[Row]:
    """The gcc-flag story, in Numba's terms, on the 15M shape (else the first one asked for)."""
    story = "15M" if "15M" in shapes else shapes[0]
    base, q8 = files.fp32[story], files.q8[story]
    first_lengths = {"tg": GENERATION[:1], "pp": PREFILL[:1], "runs": runs}
    rows = [
        Row("flags", "pure Python (NUMBA_DISABLE_JIT=1)", base, "off", {"NUMBA_DISABLE_JIT": "1"},
            tg=(PURE_PYTHON_STEPS,), pp=(), runs=1, pure_python=True),
        Row("flags", "NUMBA_OPT=0, no fastmath", base, "off", {"NUMBA_OPT": "0"}, **first_lengths),
        Row("flags", "opt 3, no fastmath (≈ -O3)", base, "off", **first_lengths),
        Row("flags", "reassoc + contract (≈ -funsafe-math)", base, "reassoc", **first_lengths),
        Row("flags", "full fastmath (≈ -Ofast)", base, "full", **first_lengths),
        Row("flags", "int8 Q8_0, full fastmath", q8, "full", **first_lengths),
    ]
    if runc:
        rows.append(Row("flags", f"run.c ({Path(runc).name})", base, tg=GENERATION[:1], pp=(), runs=runs,
                        c_binary=runc))
    if runq:
        rows.append(Row("flags", f"runq.c ({Path(runq).name})", q8, tg=GENERATION[:1], pp=(), runs=runs,
                        c_binary=runq))
    return rows


def model_rows(files: ModelFiles, shapes: list[str], runs: int, runc: str | None, runq: str | None,
               threads: int) -> list[Row]:
    """Every model: fp32 and int8, generation and prefill."""
    rows = [Row("models", "bundled model, fp32", files.bundled, runs=runs)] if files.bundled else []
    for name in shapes:
        fp32, q8, shape = files.fp32[name], files.q8[name], f"stories{name} shape"
        rows.append(Row("models", f"{shape}, fp32", fp32, runs=runs))
        rows.append(Row("models", f"{shape}, fp32, in memory", fp32, runs=runs, in_memory=True))
        rows.append(Row("models", f"{shape}, int8", q8, runs=runs))
        if runc:
            rows.append(Row("models", f"{shape}, run.c", fp32, pp=(), runs=runs, c_binary=runc))
        if runq:
            rows.append(Row("models", f"{shape}, runq.c", q8, pp=(), runs=runs, c_binary=runq))
        if threads > 1:
            rows.append(Row("models", f"{shape}, fp32, {threads} threads", fp32, runs=runs, threads=threads))
    return rows
