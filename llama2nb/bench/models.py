"""The shapes `llama2nb bench` measures, and the random-weight files it measures them on.

Timing does not depend on weight values, so each stories shape is measured on random weights
written once into a cache folder by the project's own writers: a v0 fp32 file, and a v2 Q8_0 file
with the shape's `q8_group_size`, the group size `export --version 2` picks, so the int8 rows
measure what users get. llama2.c's run.c and runq.c also want a tokenizer.bin as large as the
vocabulary (they only decode here), written by the one tokenizer.bin writer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ModelConfig
from ..files import bytes_per_token, read_config, read_model
from ..files.llama2c import write_checkpoint
from ..testmodels import byte_vocab, random_weights
from ..tokenizer import write_bin

SHAPES = {  # llama2.c's published models (Llama 2 vocabulary)
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024),
}
BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "model.bin"


@dataclass(frozen=True)
class ModelFiles:
    """Every file a run measures: per shape name its fp32 and Q8_0 checkpoints, the placeholder
    tokenizer for the llama2.c binaries, and the bundled model where the install has one."""

    fp32: dict[str, Path]
    q8: dict[str, Path]
    tokenizer: Path
    bundled: Path | None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama2nb" / "bench"


def file_config(path: Path) -> ModelConfig:
    """A measured file's configuration (shape, context): what its roof is computed from."""
    return read_config(path)


def file_bytes_per_token(path: Path) -> int:
    """The bytes of weights one token reads from this file, each tensor in its own format."""
    return bytes_per_token(read_model(path))


def ensure_models(cache_dir: Path, shapes: list[str], log=print) -> ModelFiles:
    """Random-weight v0 and v2 checkpoints of each shape, written once into cache_dir."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp32, q8 = {}, {}
    for name in shapes:
        fp32[name] = cache_dir / f"stories{name}-random.bin"
        q8[name] = cache_dir / f"stories{name}-random-q8.bin"
        if not (fp32[name].exists() and q8[name].exists()):
            log(f"writing random-weight stories{name} checkpoints into {cache_dir} (once)")
            write_random_checkpoints(SHAPES[name], fp32[name], q8[name])
    vocab_size = max(SHAPES[name].vocab_size for name in shapes)
    tokenizer = cache_dir / f"tokenizer-{vocab_size}.bin"
    if not tokenizer.exists():
        write_bin(tokenizer, *placeholder_vocab(vocab_size))
    return ModelFiles(fp32, q8, tokenizer, BUNDLED if BUNDLED.exists() else None)


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
