"""Conversions between model files without torch: llama2.c .bin <-> GGUF, and re-encodings
within one container (a .bin -> a Q4_0 GGUF; a Q8_0 GGUF -> llama2.c v2 for run.c users).

Contract: the source is read through files.read_model (validated, mapped, nothing copied); the
target container's writer then takes one tensor at a time as float32 (dequantized by its
source format when stored in another) and encodes it in the target's format, so memory holds
one tensor, not the model (a llama2.c v0/v1 file stacks each kind of matrix over the layers:
there, one stack). The target is picked by the output's suffix (.gguf) or named (`container`).

A llama2.c file cannot store norm_eps or rope_theta (run.c implies 1e-5 and 10000): a model
with other values is refused rather than silently changed. A GGUF file carries its
vocabulary: the source's own when it is a GGUF, else a tokenizer file the caller names.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError, UsageError
from . import gguf, read_model
from .llama2c import TransformerWeights, write_checkpoint

CONTAINERS = ("llama2c", "gguf")
LLAMA2C_TYPES = {"f32": (0, 1), "q8_0": (2,)}  # the versions that hold each type


@dataclass(frozen=True)
class Target:
    """What to write: a container and its tensor type (GGUF: a --type; llama2.c: f32 or q8_0,
    with the file version and Q8_0 group size)."""

    container: str
    type: str
    version: int | None = None
    group_size: int | None = None


def target_for(out: str | os.PathLike, container: str | None = None, type: str | None = None,
               version: int | None = None, group_size: int | None = None) -> Target:
    """The target the command-line options name; the container from OUT's suffix by default."""
    container = container or ("gguf" if Path(out).suffix.lower() == ".gguf" else "llama2c")
    if container == "gguf":
        if version is not None or group_size is not None:
            raise UsageError(f"{out}: --version/--group-size: expected only for llama2.c output, found them for "
                             "GGUF output (whose tensor types come from --type)")
        type = type or "f32"
        if type not in gguf.FILE_TYPES:
            raise UsageError(f"{out}: --type: expected one of {', '.join(gguf.FILE_TYPES)}, found {type}")
        return Target("gguf", type)
    if type is None:
        type = "q8_0" if version == 2 else "f32"
    if type not in LLAMA2C_TYPES:
        raise UsageError(f"{out}: --type: expected f32 or q8_0 for a llama2.c file (v0/v1 hold f32, v2 Q8_0), "
                         f"found {type}")
    version = LLAMA2C_TYPES[type][0] if version is None else version
    if version not in LLAMA2C_TYPES[type]:
        raise UsageError(f"{out}: --version: expected {' or '.join(map(str, LLAMA2C_TYPES[type]))} for --type {type}, "
                         f"found {version}")
    if group_size is not None and version != 2:
        raise UsageError(f"{out}: --group-size: expected only with --version 2 (Q8_0), found {group_size} for "
                         f"version {version}")
    return Target("llama2c", type, version, group_size)


class Float32Layers(Sequence):
    """Per-layer tensors in any format, read as float32 one layer at a time ([layer]) or
    stacked (np.asarray): what a llama2.c writer takes for one of TransformerWeights' lists."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> np.ndarray:
        return gguf.as_float32(self.layers[layer])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.stack([self[layer] for layer in range(len(self))]).astype(dtype or np.float32, copy=False)


def weights_of(weights: TransformerWeights) -> dict[str, Any]:
    """A checkpoint's weights as the writers take them: TransformerWeights' names, per-layer
    lists read as float32 layer by layer."""
    found = {}
    for f in fields(TransformerWeights):
        value = getattr(weights, f.name)
        found[f.name] = Float32Layers(value) if isinstance(value, list) else value
    return found


def llama2c_config(config: ModelConfig, target: Target, out: Path) -> ModelConfig:
    """The llama2.c header for `config` in the target version; Q8_0's group size by the one
    policy (ModelConfig.q8_group_size) unless one is given. (write_checkpoint refuses the norm
    eps and RoPE theta a llama2.c file cannot record.)"""
    group_size = (target.group_size or config.q8_group_size) if target.version == 2 else 0
    header = replace(config, version=target.version, group_size=group_size)
    header.validate(str(out))
    return header


def write_model(out: str | os.PathLike, config: ModelConfig, weights: Mapping[str, Any], tokenizer,
                target: Target, name: str | None = None) -> str:
    """Write weights (TransformerWeights' names) to `out` in the target container, one tensor
    at a time; return a one-line description of what was written."""
    out = Path(out)
    if target.container == "gguf":
        if tokenizer is None:
            raise CheckpointError(f"{out}: vocabulary: expected a tokenizer for the GGUF file's metadata, found "
                                  "none: pass the model's tokenizer with -z")
        gguf.write_gguf(out, config, weights, tokenizer, target.type, name)
        types = Counter(gguf.type_name(p.info.type) for p in gguf.plan(config, target.type, out))
        kinds = ", ".join(f"{n} {t}" for t, n in types.most_common())
        return f"wrote {out}: GGUF v{gguf.WRITE_VERSION}, --type {target.type} ({kinds} tensors), {_shape(config)}"
    header = llama2c_config(config, target, out)
    write_checkpoint(out, header, weights)
    extra = f", group size {header.group_size}" if header.version == 2 else ""
    return f"wrote {out}: llama2.c v{header.version}{extra}, {_shape(header)}"


def _shape(c: ModelConfig) -> str:
    return (f"{c.n_params:,} parameters, dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv), "
            f"vocab {c.vocab_size}, context {c.seq_len}")


def convert(source: str | os.PathLike, out: str | os.PathLike, target: Target,
            tokenizer: str | os.PathLike | None = None) -> str:
    """Convert a model file (llama2.c .bin or GGUF) to `target`; a GGUF output's vocabulary is
    found by vocabulary_for. Returns write_model's description."""
    source = Path(source)
    checkpoint = read_model(source)
    vocab = vocabulary_for(source, checkpoint.config.vocab_size, tokenizer) if target.container == "gguf" else None
    return write_model(out, checkpoint.config, weights_of(checkpoint.weights), vocab, target, source.stem)


TOKENIZER_NAMES = ("tokenizer.bin", "tokenizer.model")


def vocabulary_for(source: str | os.PathLike, vocab_size: int, tokenizer: str | os.PathLike | None = None):
    """The Tokenizer a GGUF output gets: `tokenizer` if given; else a GGUF source's own
    vocabulary; else tokenizer.bin, tokenizer.model or tok{vocab_size}.bin in the source's
    folder (a run directory, a Hugging Face directory, or the file's folder); else None."""
    from ..tokenizer import Tokenizer

    source = Path(source)
    if tokenizer is None and source.is_file() and gguf.is_gguf(source):
        tokenizer = source
    if tokenizer is None:
        folder = source if source.is_dir() else source.parent
        names = (*TOKENIZER_NAMES, f"tok{vocab_size}.bin")
        tokenizer = next((folder / n for n in names if (folder / n).is_file()), None)
    return None if tokenizer is None else Tokenizer.load(tokenizer, vocab_size=vocab_size)
