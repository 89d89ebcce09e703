"""Conversions between model files without torch: the output options checked (`target_for`),
and `convert`, the Python entry point of `llama2nb quantize`.

There is one route into the writers: `export.write(out, source, options)`, which hands a
TensorSource to the writer of OUT's container (export.WRITERS). `llama2nb export` opens any
source; `quantize` and `convert` open a llama2.c .bin or a GGUF file as a CheckpointSource
(export.checkpoint_source: validated and mapped by files.read_model, nothing copied, no torch)
and take that same route, so a file quantized and the same file exported with the same type are
the same bytes. The writers take one tensor at a time as float32 (dequantized by its source
format when stored in another), so memory holds one tensor, not the model.

A llama2.c file cannot store norm_eps or rope_theta (run.c implies 1e-5 and 10000): a model
with other values is refused rather than silently changed. A GGUF file carries its
vocabulary: the source's own when it is a GGUF, else a tokenizer file the caller names or one
found beside the source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .gguf import FILE_TYPES

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
        if type not in FILE_TYPES:
            raise UsageError(f"{out}: --type: expected one of {', '.join(FILE_TYPES)}, found {type}")
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


def convert(source: str | os.PathLike, out: str | os.PathLike, target: Target,
            tokenizer: str | os.PathLike | None = None) -> str:
    """Convert a model file (llama2.c .bin or GGUF) to `target`: export.write over its
    CheckpointSource (what `llama2nb quantize` runs). A GGUF output's vocabulary is `tokenizer`,
    else the source's own (a GGUF's, or the tokenizer beside it). Returns the writer's description."""
    from ..export import ExportOptions, checkpoint_source, write

    options = ExportOptions(target.version, target.group_size, target.type, target.container,
                            Path(tokenizer) if tokenizer is not None else None)
    return write(out, checkpoint_source(source), options)
