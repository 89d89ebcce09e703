"""Tensor sources: a model's configuration and its tensors, read one at a time, as float32.

Contract. A `TensorSource` has a `config` (ModelConfig), an `origin` (what it reads, for
messages), the `tokenizer` file found beside it (or None), and gives every tensor a writer needs
by TransformerWeights' name and layer: `tensor(name, layer)` whole, `chunks(name, layer)` as
float32 row blocks of about `chunk_bytes` each (a vector is one block). Names are the engine's:
token_embedding_table, rms_final_weight, wcls (unshared classifiers only) and, per layer,
rms_att_weight, rms_ffn_weight, wq, wk, wv, wo, w1, w2, w3; matrices are (out, in), q and k rows
in the interleaved RoPE layout of Meta's checkpoints and llama2.c.

A source is also a read-only Mapping of those names, the shape writers that take "the weights"
accept: per-layer names give a sequence whose `[layer]` is that layer's float32 tensor (and
`np.asarray` of it the stack), other names the whole tensor. Nothing is read before it is asked
for.

Why: Meta's and Hugging Face's checkpoints of real models do not fit in memory as float32 (a 7B
model is 27 GB). Their files are mapped (torch's mmap for .pth/.bin, np.memmap for
safetensors), so the stored bytes stay in the page cache, shared and evictable; only the block
being converted lives in private memory, and a writer that walks its output tensor by tensor and
block by block holds about one block, not the model.

Subclasses implement `read(name, layer, start, stop)` (rows start..stop-1 as float32) and may
set `row_multiple(name)` when a block must hold whole groups of rows (Hugging Face's q and k are
permuted within each head).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError

CHUNK_BYTES = 8 << 20  # float32 bytes per block: small beside any model worth streaming
PER_LAYER = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")
WHOLE = ("token_embedding_table", "rms_final_weight", "wcls")


def tensor_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape of one tensor (one layer's, for per-layer names) in the engine's layout."""
    if name in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight"):
        return (config.dim,)
    if name in ("token_embedding_table", "wcls"):
        return (config.vocab_size, config.dim)
    return config.matrix_shapes()[name]


def row_blocks(rows: int, cols: int, chunk_bytes: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive row blocks of about chunk_bytes float32 bytes, each a
    multiple of `multiple` rows (the last one too, when rows is)."""
    step = max(multiple, chunk_bytes // (4 * cols) // multiple * multiple)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


class TensorSource(Mapping):
    """A model read tensor by tensor (see the module docstring)."""

    def __init__(self, config: ModelConfig, origin: str | os.PathLike, tokenizer: Path | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.config = config
        self.origin = str(origin)
        self.tokenizer = tokenizer
        self.chunk_bytes = chunk_bytes

    # what a subclass gives -------------------------------------------------------------------

    def read(self, name: str, layer: int | None, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor (name, layer) as float32 (elements, for a vector)."""
        raise NotImplementedError

    def row_multiple(self, name: str) -> int:
        return 1

    # what every source gives -----------------------------------------------------------------

    def with_seq_len(self, seq_len: int | None) -> "TensorSource":
        """This source with another context length in its config (the tensors do not depend on it)."""
        if seq_len is not None:
            self.config = replace(self.config, seq_len=seq_len)
        return self

    def chunks(self, name: str, layer: int | None = None) -> Iterator[np.ndarray]:
        """The tensor as float32 row blocks of about chunk_bytes each (a vector: one block)."""
        shape = tensor_shape(self.config, name)
        if len(shape) == 1:
            yield self.read(name, layer, 0, shape[0])
            return
        for start, stop in row_blocks(shape[0], shape[1], self.chunk_bytes, self.row_multiple(name)):
            yield self.read(name, layer, start, stop)

    def tensor(self, name: str, layer: int | None = None) -> np.ndarray:
        shape = tensor_shape(self.config, name)
        return self.read(name, layer, 0, shape[0])

    def names(self) -> list[str]:
        whole = [n for n in WHOLE if n != "wcls" or not self.config.shared_classifier]
        return whole + list(PER_LAYER)

    def __getitem__(self, name: str) -> Any:
        if name not in self.names():
            raise KeyError(name)
        return Layers(self, name) if name in PER_LAYER else self.tensor(name)

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the tensor)
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


class Layers(Sequence):
    """One per-layer name of a source: [layer] reads that layer's tensor; np.asarray stacks them."""

    def __init__(self, source: TensorSource, name: str) -> None:
        self.source, self.name = source, name

    def __len__(self) -> int:
        return self.source.config.n_layers

    def __getitem__(self, layer: int) -> np.ndarray:
        if not -len(self) <= layer < len(self):
            raise IndexError(layer)
        return self.source.tensor(self.name, layer % len(self))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.stack([self[layer] for layer in range(len(self))]).astype(dtype or np.float32, copy=False)


def block_source(weights: Any, name: str, layer: int | None) -> Iterator[np.ndarray]:
    """A tensor of `weights` as float32 blocks: a TensorSource's chunks, or from a plain mapping
    of arrays (stacked, or sequences indexed by layer) the whole tensor as one block."""
    if isinstance(weights, TensorSource):
        return weights.chunks(name, layer)
    value = weights[name]
    return iter([np.asarray(value if layer is None else value[layer], np.float32)])


# ----------------------------------------------------------------------------------------------
# Sources of arrays already in memory, or of a checkpoint already mapped


class ArraySource(TensorSource):
    """Weights held as arrays (a trained PyTorch model's export_weights(), say): stacked arrays
    or per-layer sequences keyed by TransformerWeights' names."""

    def __init__(self, config: ModelConfig, arrays: Mapping[str, Any], origin: str | os.PathLike,
                 tokenizer: Path | None = None) -> None:
        super().__init__(config, origin, tokenizer)
        self.arrays = arrays

    def read(self, name, layer, start, stop):
        if name not in self.arrays:
            raise CheckpointError(f"{self.origin}: weight {name!r}: expected it, found none")
        value = self.arrays[name]
        return np.asarray((value if layer is None else value[layer])[start:stop], np.float32)


class CheckpointSource(TensorSource):
    """A mapped Checkpoint (files.llama2c.read_checkpoint): float32 views are read in blocks
    straight from the mapping; other formats' matrices are dequantized whole, one at a time."""

    def __init__(self, checkpoint, tokenizer: Path | None = None) -> None:
        super().__init__(checkpoint.config, checkpoint.path, tokenizer)
        self.weights = checkpoint.weights

    def _view(self, name: str, layer: int | None):
        value = getattr(self.weights, name)
        return value if layer is None else value[layer]

    def chunks(self, name, layer=None):
        view = self._view(name, layer)
        if isinstance(view, np.ndarray) and view.dtype == np.float32:
            return super().chunks(name, layer)
        return iter([self.tensor(name, layer)])

    def read(self, name, layer, start, stop):
        from ..formats import format_of

        view = self._view(name, layer)
        if isinstance(view, np.ndarray) and view.dtype == np.float32:
            return np.asarray(view[start:stop], np.float32)
        return np.asarray(format_of(view).dequantize(view), np.float32)[start:stop]


# ----------------------------------------------------------------------------------------------
# Stored tensors: the pieces of a checkpoint file, mapped, converted to float32 block by block


class Stored:
    """One tensor as a file stores it, mapped: `shape`, and `read_into(out, start, stop)`, which
    converts rows start..stop-1 to float32 into `out` (a view of that many rows)."""

    shape: tuple[int, ...]

    def read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        raise NotImplementedError


class NumpyStored(Stored):
    """A tensor in an np.memmap: float32, float16, or bfloat16 held as uint16 (NumPy has no
    bfloat16: its bits are float32's top half, so a 16-bit shift converts it exactly)."""

    def __init__(self, array: np.ndarray, bfloat16: bool = False) -> None:
        self.array, self.bfloat16, self.shape = array, bfloat16, array.shape

    def read_into(self, out, start, stop):
        rows = self.array[start:stop]
        if self.bfloat16:
            bits = out.view(np.uint32)
            bits[...] = rows
            np.left_shift(bits, 16, out=bits)
        else:
            out[...] = rows


class TorchStored(Stored):
    """A tensor of a file torch.load mapped (mmap=True): rows converted by torch into `out`."""

    def __init__(self, tensor) -> None:
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def read_into(self, out, start, stop):
        import torch

        torch.from_numpy(out).copy_(self.tensor[start:stop])


class Joined(Stored):
    """A tensor split across files (Meta's model-parallel shards) along `axis`: pieces in shard
    order, joined on the fly, one block at a time."""

    def __init__(self, pieces: Sequence[Stored], axis: int) -> None:
        self.pieces, self.axis = list(pieces), axis
        shape = list(self.pieces[0].shape)
        shape[axis] = sum(p.shape[axis] for p in self.pieces)
        self.shape = tuple(shape)

    def read_into(self, out, start, stop):
        offset = 0
        for piece in self.pieces:
            size = piece.shape[self.axis]
            if self.axis == 1:
                piece.read_into(out[:, offset:offset + size], start, stop)
            elif start < offset + size and stop > offset:
                lo, hi = max(start, offset), min(stop, offset + size)
                piece.read_into(out[lo - start:hi - start], lo - offset, hi - offset)
            offset += size


def read_rows(stored: Stored, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of a stored tensor as a new float32 array."""
    out = np.empty((stop - start, *stored.shape[1:]), np.float32)
    stored.read_into(out, start, stop)
    return out


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A checkpoint's JSON settings (`what` names the file for the user: "Meta's params.json")."""
    import json

    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: expected {what}, found nothing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: expected JSON, found unreadable data ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def load_torch_mapped(path: Path) -> dict[str, Any]:
    """A PyTorch weights file (Meta's consolidated.NN.pth, Hugging Face's pytorch_model*.bin)
    mapped, not read: torch.load(mmap=True, weights_only=True) of its zip format."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch weight files needs torch: pip install 'llama2nb[train]'") \
            from None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, ValueError ... on bad files
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: expected PyTorch weights in zip format (torch.save), found unreadable data "
                              f"({detail})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state
