"""Which configurations `llama2nb bench` measures: the rows of its table, in order.

Three sections. "flags" retells llama2.c's gcc-flag story in Numba's terms on one model (pure
Python, NUMBA_OPT=0, no fastmath, reassociation, full fastmath, int8), beside the user's run.c and
runq.c if given. "models" measures every shape as fp32 (mapped and in memory) and Q8_0, with the
llama2.c binaries and a multi-threaded row where asked. "gguf" measures the GGUF files, each
beside llama.cpp on the same file and the same thread count where asked, and the first stories
shape's Q8_0 and Q4_0 files again on the portable path (PORTABLE_ENV: AVX2, no AVX-512, no VNNI, which
many users' CPUs are).

GENERATION and PREFILL are the lengths measured, and the table's columns; the flag rows measure
only the first of each. A shape whose tokens take long (Llama 2 7B's) has its own shorter
lengths (LENGTHS, benchmarks/performance.md's 7B lengths), which become columns of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .models import QUANTIZED_ONLY, ModelFiles, shape_label

GENERATION = (128, 256)  # tokens generated from BOS: the tg columns
PREFILL = (128, 256)  # prompt lengths: the pp columns
LENGTHS = {"7B": ((31,), (64,))}  # a shape's own (tg, pp) lengths, where not GENERATION and PREFILL
# The portable path: Numba compiling for Haswell (AVX2, FMA, F16C; no AVX-512, no VNNI). The features
# are spelled out: with NUMBA_CPU_NAME alone, Numba keeps the host's features (AVX-512 included).
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,"
                    "+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
PORTABLE_ENV = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL_FEATURES}
PORTABLE_LABEL = "portable (AVX2, no VNNI)"
PORTABLE_TYPES = ("Q8_0", "Q4_0")  # the GGUF types measured on the portable path
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


def shape_lengths(name: str) -> tuple[tuple, tuple]:
    """The (tg, pp) lengths a shape's rows measure."""
    return LENGTHS.get(name, (GENERATION, PREFILL))


def columns(shapes: list[str]) -> tuple[tuple, tuple]:
    """The table's (tg, pp) columns: GENERATION and PREFILL when a shape uses them, then every
    other length the shapes measure, in order."""
    tg, pp = [], []
    uses_default = any(name not in LENGTHS for name in shapes)
    for lengths in ([(GENERATION, PREFILL)] if uses_default else []) + [LENGTHS[n] for n in shapes if n in LENGTHS]:
        tg += [n for n in lengths[0] if n not in tg]
        pp += [n for n in lengths[1] if n not in pp]
    return tuple(tg), tuple(pp)


def build_rows(files: ModelFiles, shapes: list[str], runs: int, runc: str | None, runq: str | None,
               threads: int, llamacpp: bool = False, portable: bool = False) -> list[Row]:
    return (flag_rows(files, shapes, runs, runc, runq) + model_rows(files, shapes, runs, runc, runq, threads)
            + gguf_rows(files, shapes, runs, llamacpp, threads, portable))


def portable_shape(shapes: list[str]) -> str | None:
    """The shape the portable rows run: the first one asked for that is not quantized only (a 7B
    token on the portable path would take seconds)."""
    return next((name for name in shapes if name not in QUANTIZED_ONLY), None)


def gguf_rows(files: ModelFiles, shapes: list[str], runs: int, llamacpp: bool, threads: int = 1,
              portable: bool = False) -> list[Row]:
    """Each shape's GGUF files, each followed by llama.cpp on the same file when asked for, then
    both again on `threads` threads when more than one, and for the first stories shape's Q8_0
    and Q4_0 files the portable path when asked for."""
    rows, first = [], portable_shape(shapes)
    for name in shapes:
        tg, pp = shape_lengths(name)
        for type_, path in files.gguf.get(name, {}).items():
            label = f"{shape_label(name)}, {type_} GGUF" + (f" ({files.written_by[path]})"
                                                            if path in files.written_by else "")
            lengths = {"tg": tg, "pp": pp, "runs": runs}
            for n in (1, threads) if threads > 1 else (1,):
                suffix = f", {n} threads" if n > 1 else ""
                rows.append(Row("gguf", label + suffix, path, threads=n, **lengths))
                if llamacpp:
                    rows.append(Row("gguf", f"{label}, llama.cpp{suffix}", path, threads=n, engine="llama.cpp",
                                    **lengths))
            if portable and name == first and type_ in PORTABLE_TYPES:
                rows.append(Row("gguf", f"{label}, {PORTABLE_LABEL}", path, env=dict(PORTABLE_ENV), **lengths))
    return rows


def flag_rows(files: ModelFiles, shapes: list[str], runs: int, runc: str | None, runq: str | None) -> list[Row]:
    """The gcc-flag story, in Numba's terms, on the 15M shape (else the first one asked for that
    has an fp32 file; none when every shape is quantized only)."""
    stories = [name for name in shapes if name not in QUANTIZED_ONLY]
    if not stories:
        return []
    story = "15M" if "15M" in stories else stories[0]
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
    """Every model: fp32 and int8, generation and prefill (a quantized-only shape: int8 alone)."""
    rows = [Row("models", "bundled model, fp32", files.bundled, runs=runs)] if files.bundled else []
    for name in shapes:
        q8, shape = files.q8[name], shape_label(name)
        tg, pp = shape_lengths(name)
        lengths = {"tg": tg, "pp": pp, "runs": runs}
        fp32 = files.fp32.get(name)
        if fp32 is not None:
            rows.append(Row("models", f"{shape}, fp32", fp32, **lengths))
            rows.append(Row("models", f"{shape}, fp32, in memory", fp32, in_memory=True, **lengths))
        rows.append(Row("models", f"{shape}, int8", q8, **lengths))
        if runc and fp32 is not None:
            rows.append(Row("models", f"{shape}, run.c", fp32, tg=tg, pp=(), runs=runs, c_binary=runc))
        if runq:
            rows.append(Row("models", f"{shape}, runq.c", q8, tg=tg, pp=(), runs=runs, c_binary=runq))
        if threads > 1:
            path, kind = (fp32, "fp32") if fp32 is not None else (q8, "int8")
            rows.append(Row("models", f"{shape}, {kind}, {threads} threads", path, threads=threads, **lengths))
    return rows
