"""The public test-model API: random weights and toy vocabularies of any shape.

Tests, the benchmarks and users who want to try a shape without training it use these. Timing
does not depend on weight values, so a random model of a real model's shape benchmarks like it;
its logits mean nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import ModelConfig


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
