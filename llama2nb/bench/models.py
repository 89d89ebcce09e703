"""The shapes `llama2nb bench` measures, and the random-weight files it measures them on.

Timing does not depend on weight values, so each stories shape is measured on random weights
written once into a cache folder by the project's own writers: a v0 fp32 file, and a v2 Q8_0 file
with the shape's `q8_group_size`, the group size `export --version 2` picks, so the int8 rows
measure what users get. llama2.c's run.c and runq.c also want a tokenizer.bin as large as the
vocabulary (they only decode here), written by the one tokenizer.bin writer.

GGUF copies of the same weights: F32 written by llama2nb's converter, and the quantized types
written by llama.cpp's own quantizer where llama-cpp-python is installed (the files users have,
with llama.cpp's type mixes: a Q4_0 file's classifier is Q6_K or Q8_0, Q4_K_M mixes Q4_K and
Q6_K), else by llama2nb's (the types it writes: Q8_0, Q4_0).

The Llama 2 7B shape (`--models 7B`, never by default) is quantized only (QUANTIZED_ONLY): its
fp32 file (27 GB) would not fit in memory, nor would an F32 or F16 GGUF fit the bench's disk
budget beside its quantized copies. Its files are streamed from the same seeded random source,
tensor by tensor (testmodels.RandomSource): a v2 Q8_0 checkpoint and a Q8_0 GGUF by llama2nb's
writers, and a Q4_0 GGUF by llama.cpp's quantizer from that Q8_0 file (requantized: timing does
not depend on the values; the type mix is llama.cpp's), else by llama2nb's writer; when Q4_K_M is
among the GGUF types asked for, a Q4_K_M GGUF by llama.cpp's quantizer the same way (llama2nb
writes no K-quants: without llama.cpp it is left out, with a line saying so). Their rows' labels
name the writer (ModelFiles.written_by).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import ModelConfig
from ..files import bytes_per_token, read_config, read_model
from ..files.llama2c import write_checkpoint
from ..testmodels import RandomSource, byte_vocab, random_weights, write_random_model
from ..tokenizer import Tokenizer, write_bin

SHAPES = {  # llama2.c's published models (Llama 2 vocabulary)
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024),
    "7B": ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                      seq_len=2048),
}
QUANTIZED_ONLY = frozenset({"7B"})  # shapes written and measured as Q8_0, Q4_0 (and Q4_K_M) only (the docstring)
BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "model.bin"


def shape_label(name: str) -> str:
    """How the table names a shape: llama2.c's stories models, and Llama 2 7B."""
    return f"Llama 2 {name} shape" if name in QUANTIZED_ONLY else f"stories{name} shape"


@dataclass(frozen=True)
class ModelFiles:
    """Every file a run measures: per shape name its fp32 and Q8_0 checkpoints, the placeholder
    tokenizer for the llama2.c binaries, and the bundled model where the install has one."""

    fp32: dict[str, Path]
    q8: dict[str, Path]
    tokenizer: Path
    bundled: Path | None
    gguf: dict[str, dict[str, Path]] = field(default_factory=dict)  # shape -> GGUF type -> file
    written_by: dict[Path, str] = field(default_factory=dict)  # a file -> what wrote it, where its label says


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama2nb" / "bench"


def file_config(path: Path) -> ModelConfig:
    """A measured file's configuration (shape, context): what its roof is computed from."""
    return read_config(path)


def file_bytes_per_token(path: Path) -> int:
    """The bytes of weights one token reads from this file, each tensor in its own format."""
    return bytes_per_token(read_model(path))


def ensure_models(cache_dir: Path, shapes: list[str], log=print, gguf_types=()) -> ModelFiles:
    """Random-weight v0 and v2 checkpoints of each shape (v2 and its GGUF copies only for a
    quantized-only shape, Q4_K_M too if in gguf_types), written once into cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp32, q8 = {}, {}
    vocab_size = max(SHAPES[name].vocab_size for name in shapes)
    tokenizer = cache_dir / f"tokenizer-{vocab_size}.bin"
    if not tokenizer.exists():
        write_bin(tokenizer, *placeholder_vocab(vocab_size))
    files = ModelFiles(fp32, q8, tokenizer, BUNDLED if BUNDLED.exists() else None)
    for name in shapes:
        if name in QUANTIZED_ONLY:
            ensure_quantized_only(cache_dir, files, name, log, k_quants="Q4_K_M" in gguf_types)
            continue
        fp32[name] = cache_dir / f"stories{name}-random.bin"
        q8[name] = cache_dir / f"stories{name}-random-q8.bin"
        if not (fp32[name].exists() and q8[name].exists()):
            log(f"writing random-weight stories{name} checkpoints into {cache_dir} (once)")
            write_random_checkpoints(SHAPES[name], fp32[name], q8[name])
    return files


def ensure_quantized_only(cache_dir: Path, files: ModelFiles, name: str, log=print, k_quants: bool = False) -> None:
    """A quantized-only shape's files (the module docstring), streamed once into cache_dir; with
    k_quants, its Q4_K_M file too where llama.cpp's quantizer is installed."""
    from . import llamacpp

    config, stem = SHAPES[name], cache_dir / f"llama2-{name}-random"
    source = RandomSource(config, seed=0)
    files.q8[name] = Path(f"{stem}-q8.bin")
    if not files.q8[name].exists():
        log(f"writing a random-weight Llama 2 {name}-shape Q8_0 checkpoint into {cache_dir} (once, minutes)")
        write_random_model(files.q8[name], replace(config, version=2, group_size=config.q8_group_size))
    q8_gguf = Path(f"{stem}-Q8_0-llama2nb.gguf")
    if not q8_gguf.exists():
        log(f"writing a random-weight Llama 2 {name}-shape Q8_0 GGUF into {cache_dir} (once, minutes)")
        write_gguf_from(source, q8_gguf, "q8_0", files.tokenizer)
    quantizer = "llama.cpp" if llamacpp.available() else "llama2nb"
    q4_gguf = Path(f"{stem}-Q4_0-{quantizer}.gguf")
    if not q4_gguf.exists():
        log(f"writing a Llama 2 {name}-shape Q4_0 GGUF with {quantizer}'s quantizer into {cache_dir} (once, minutes)")
        if quantizer == "llama.cpp":
            llamacpp.quantize(q8_gguf, q4_gguf, GGUF_TYPES["Q4_0"][0], requantize=True)
        else:
            write_gguf_from(source, q4_gguf, "q4_0", files.tokenizer)
    files.gguf[name] = {"Q8_0": q8_gguf, "Q4_0": q4_gguf}
    files.written_by[q8_gguf] = "llama2nb's writer"
    files.written_by[q4_gguf] = ("llama.cpp's quantizer, from the Q8_0 file" if quantizer == "llama.cpp"
                                 else "llama2nb's writer")
    if not k_quants:
        return
    if quantizer != "llama.cpp":
        log(f"Llama 2 {name} shape Q4_K_M: no quantizer for it here (pip install llama-cpp-python): left out")
        return
    k_gguf = Path(f"{stem}-Q4_K_M-llama.cpp.gguf")
    if not k_gguf.exists():
        log(f"writing a Llama 2 {name}-shape Q4_K_M GGUF with llama.cpp's quantizer into {cache_dir} (once, minutes)")
        llamacpp.quantize(q8_gguf, k_gguf, GGUF_TYPES["Q4_K_M"][0], requantize=True)
    files.gguf[name]["Q4_K_M"] = k_gguf
    files.written_by[k_gguf] = "llama.cpp's quantizer, from the Q8_0 file"


def write_gguf_from(source: RandomSource, out: Path, type_: str, tokenizer: Path) -> None:
    """A GGUF file of `type_` from a tensor source, streamed tensor by tensor."""
    from ..files.gguf import write_gguf

    vocabulary = Tokenizer.load(tokenizer, vocab_size=source.config.vocab_size)
    write_gguf(out, source.config, source, vocabulary, type_, out.stem)


def write_random_checkpoints(config: ModelConfig, fp32: Path, q8: Path) -> None:
    """One set of random weights, written as fp32 (v0) and as Q8_0 (v2) with the shape's group size."""
    weights = random_weights(config, seed=0)
    write_checkpoint(fp32, config, weights)
    write_checkpoint(q8, replace(config, version=2, group_size=config.q8_group_size), weights)


def placeholder_vocab(vocab_size: int) -> tuple[list[bytes], list[float]]:
    """<unk> <s> </s> and the 256 byte pieces, then filler pieces up to vocab_size: enough for
    run.c/runq.c to decode whatever a random-weight model generates."""
    pieces, scores = byte_vocab()
    fillers = range(vocab_size - len(pieces))
    return pieces + [f" t{i}".encode() for i in fillers], scores + [-float(i) for i in fillers]


# GGUF types the bench measures, llama.cpp's quantizer's file types for them, and llama2nb's --type
GGUF_TYPES = {"F32": (0, "f32"), "Q8_0": (7, "q8_0"), "Q4_0": (2, "q4_0"), "Q4_K_M": (15, None)}


def ensure_gguf(cache_dir: Path, files: ModelFiles, shapes: list[str], types: list[str], log=print) -> None:
    """GGUF copies of each shape's random weights in `types`, written once into cache_dir (into
    files.gguf); a type nothing here can write is left out, with a line saying so. A
    quantized-only shape has its own (ensure_quantized_only)."""
    from . import llamacpp

    quantizer = "llama.cpp" if llamacpp.available() else "llama2nb"
    for name in (n for n in shapes if n not in QUANTIZED_ONLY):
        f32 = cache_dir / f"stories{name}-random-F32.gguf"
        if not f32.exists():
            convert_to_gguf(files.fp32[name], f32, "f32", files.tokenizer)
        written = files.gguf.setdefault(name, {})
        for type_ in types:
            path = cache_dir / f"stories{name}-random-{type_}-{quantizer}.gguf" if type_ != "F32" else f32
            if not path.exists():
                ftype, ours = GGUF_TYPES[type_]
                if quantizer == "llama.cpp":
                    log(f"quantizing stories{name} to {type_} with llama.cpp's quantizer (once)")
                    llamacpp.quantize(f32, path, ftype)
                elif ours is not None:
                    log(f"writing stories{name} as {type_} GGUF (once)")
                    convert_to_gguf(files.fp32[name], path, ours, files.tokenizer)
                else:
                    log(f"stories{name} {type_}: no quantizer for it here (pip install llama-cpp-python): left out")
                    continue
            written[type_] = path


def convert_to_gguf(source: Path, out: Path, type_: str, tokenizer: Path) -> None:
    from ..files.convert import convert, target_for

    convert(source, out, target_for(out, type=type_), tokenizer)
