"""The public test-model API: random weights and toy vocabularies of any shape.

Tests, the benchmarks and users who want to try a shape without training it use these. Timing
does not depend on weight values, so a random model of a real model's shape benchmarks like it;
its logits mean nothing. `random_weights` holds a model in memory (small shapes);
`write_random_model` streams one of any shape (Llama 2 7B's 27 GB of fp32 does not fit in
memory) into a llama2.c file, block by block.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .config import ModelConfig
from .files.llama2c import WriteProgress, write_checkpoint
from .files.source import PER_LAYER, WHOLE, TensorSource, tensor_shape

RANDOM_ROWS = 64  # rows drawn from one seed: a tensor's values do not depend on how it is read


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random float32 weights of a config's shapes, for tests and benchmarks (timing does not
    depend on weight values). Norm weights sit near 1 so activations keep a sane scale."""
    rng = np.random.default_rng(seed)
    L, D, V = config.n_layers, config.dim, config.vocab_size

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    weights = {"token_embedding_table": normal(V, D)}
    weights["rms_att_weight"] = (1 + normal(L, D)).astype(np.float32)
    weights["rms_ffn_weight"] = (1 + normal(L, D)).astype(np.float32)
    weights["rms_final_weight"] = (1 + normal(D)).astype(np.float32)
    for name, (rows, cols) in config.matrix_shapes().items():
        weights[name] = normal(L, rows, cols)
    if not config.shared_classifier:
        weights["wcls"] = normal(V, D)
    return weights


class RandomSource(TensorSource):
    """Random weights as a TensorSource (files.source): drawn when read, RANDOM_ROWS rows per
    seed (seed, tensor, layer, row group), so any block of any tensor costs its own size only
    and the same seed gives the same model however it is read. Matrices N(0, scale^2); norm
    weights 1 + N(0, scale^2)."""

    def __init__(self, config: ModelConfig, seed: int = 0, scale: float = 0.05) -> None:
        super().__init__(config, f"random weights (seed {seed})")
        self.seed, self.scale = seed, np.float32(scale)
        self.ids = {name: i for i, name in enumerate(WHOLE + PER_LAYER)}

    def row_multiple(self, name: str) -> int:
        return RANDOM_ROWS

    def _normal(self, name: str, layer: int | None, group: int, shape: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.ids[name], 0 if layer is None else layer + 1, group])
        return rng.standard_normal(shape, dtype=np.float32) * self.scale

    def read(self, name, layer, start, stop):
        shape = tensor_shape(self.config, name)
        if len(shape) == 1:
            return (1 + self._normal(name, layer, 0, shape)).astype(np.float32)[start:stop]
        out = np.empty((stop - start, shape[1]), np.float32)
        for group in range(start // RANDOM_ROWS, -(-stop // RANDOM_ROWS)):
            lo, hi = group * RANDOM_ROWS, min((group + 1) * RANDOM_ROWS, shape[0])
            rows = self._normal(name, layer, group, (hi - lo, shape[1]))
            a, b = max(lo, start), min(hi, stop)
            out[a - start:b - start] = rows[a - lo:b - lo]
        return out


def write_random_model(path: str | os.PathLike, config: ModelConfig, seed: int = 0, scale: float = 0.05,
                       progress: WriteProgress | None = None) -> None:
    """A llama2.c file (config.version: v0, v1 or v2) of random weights of any shape, written
    block by block: memory holds about one block (files.source.CHUNK_BYTES), not the model."""
    write_checkpoint(path, config, RandomSource(config, seed, scale), progress)


def byte_vocab(words: Sequence[str] = ()) -> tuple[list[bytes], list[float]]:
    """A small llama2.c-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then `words`
    (scored so that earlier words merge first), plus every prefix a greedy merge needs to build
    them from single characters. For tests and toy models."""
    pieces: list[bytes] = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    scores: list[float] = [0.0] * len(pieces)
    seen = set(pieces)
    score = -1.0
    for word in words:
        data = word.encode("utf-8")
        chars = [c.encode("utf-8") for c in word]
        for c in chars:  # every character, so no part of a word needs byte fallback
            if c not in seen:
                seen.add(c)
                pieces.append(c)
                scores.append(0.0)
        # every prefix built one character at a time, so left-to-right merges reach the word
        for k in range(2, len(chars) + 1):
            piece = b"".join(chars[:k])
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
                scores.append(score)
                score -= 1.0
        assert data in seen
    return pieces, scores
