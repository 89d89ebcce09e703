"""File containers: how weights and their configuration are laid out on disk.

A container (llama2.c's v0/v1/v2 `.bin`; GGUF) is not a weight format: a container says which
tensors a file holds, in what order, with what header; each tensor's bytes are encoded by a
weight format from `llama2nb.formats`. Each container module has one `layout()` that both its
reader and its writer walk.

Callers that accept "a checkpoint" use `read_model` / `read_config` here, which pick the
container by the file's magic (GGUF files start with b"GGUF"; llama2.c's v1/v2 with "ak42",
v0 with no magic at all), not by its suffix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from . import llama2c
from .llama2c import Checkpoint

GGUF_MAGIC = b"GGUF"  # (gguf.MAGIC: the GGUF module is imported only for GGUF files)


def container_of(path: str | os.PathLike) -> str:
    """"gguf" for a file with GGUF's magic, else "llama2c" (whose reader then checks it)."""
    try:
        with open(path, "rb") as f:
            return "gguf" if f.read(4) == GGUF_MAGIC else "llama2c"
    except OSError:  # a directory, a missing file: llama2c's reader names the problem
        return "llama2c"


@dataclass(frozen=True)
class ModelFile:
    """A model file whose header has been read and checked as read_model checks it, nothing
    mapped yet: its config, and the parsed header the container's reader maps it from (so the
    header is read once from open_model to the weights)."""

    path: Path
    container: str  # "llama2c" or "gguf"
    config: ModelConfig
    header: Any = None  # gguf.Header for GGUF files; None for llama2.c's (the config is all of it)


def open_model(path: str | os.PathLike) -> ModelFile:
    """Read and check a model file's header (llama2.c .bin or GGUF, by its magic) without
    mapping its weights."""
    path = Path(path)
    if container_of(path) == "gguf":
        from . import gguf

        header, config = gguf.read_checked_header(path)
        return ModelFile(path, "gguf", config, header)
    return ModelFile(path, "llama2c", llama2c.read_config(path))


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A model file's configuration, checked as read_model checks it, without mapping weights."""
    return open_model(path).config


def read_model(path: str | os.PathLike | ModelFile, in_memory: bool = False, progress=None) -> Checkpoint:
    """A model file (llama2.c .bin or GGUF, or one open_model has checked), validated, then mapped
    once (or read into memory with in_memory): a Checkpoint of read-only views, each matrix in its
    own format. `progress(bytes read, size)` as the file is read (mapping.Progress)."""
    opened = path if isinstance(path, ModelFile) else open_model(path)
    if opened.container == "gguf":
        from . import gguf

        return gguf.read_checkpoint(opened.path, in_memory, progress, header=opened.header)
    return llama2c.read_checkpoint(opened.path, in_memory, progress, config=opened.config)


def bytes_per_token(checkpoint: Checkpoint) -> int:
    """Bytes of weights one generated token reads, each matrix in its own format: every layer's
    matrices and norms, the final norm, the classifier and one row of the embedding table."""
    from ..formats import format_of

    w, c = checkpoint.weights, checkpoint.config
    layers = [m for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for m in getattr(w, name)]
    matrices = sum(format_of(m).nbytes(m.shape) for m in (w.wcls, *layers))
    norms = (2 * c.n_layers + 1) * c.dim * 4
    return matrices + norms + format_of(w.token_embedding_table).nbytes((1, c.dim))
