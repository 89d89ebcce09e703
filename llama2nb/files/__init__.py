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

from ..config import ModelConfig
from . import gguf, llama2c
from .llama2c import Checkpoint


def container_of(path: str | os.PathLike) -> str:
    """"gguf" for a file with GGUF's magic, else "llama2c" (whose reader then checks it)."""
    return "gguf" if gguf.is_gguf(path) else "llama2c"


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A model file's configuration, checked as read_model checks it, without mapping weights."""
    return (gguf if container_of(path) == "gguf" else llama2c).read_config(path)


def read_model(path: str | os.PathLike, in_memory: bool = False, progress=None) -> Checkpoint:
    """A model file (llama2.c .bin or GGUF), validated, then mapped once (or read into memory
    with in_memory): a Checkpoint of read-only views, each matrix in its own format.
    `progress(bytes read, size)` as the file is read (mapping.Progress)."""
    return (gguf if container_of(path) == "gguf" else llama2c).read_checkpoint(path, in_memory, progress)


def bytes_per_token(checkpoint: Checkpoint) -> int:
    """Bytes of weights one generated token reads, each matrix in its own format: every layer's
    matrices and norms, the final norm, the classifier and one row of the embedding table."""
    from ..formats import format_of

    w, c = checkpoint.weights, checkpoint.config
    layers = [m for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for m in getattr(w, name)]
    matrices = sum(format_of(m).nbytes(m.shape) for m in (w.wcls, *layers))
    norms = (2 * c.n_layers + 1) * c.dim * 4
    return matrices + norms + format_of(w.token_embedding_table).nbytes((1, c.dim))
