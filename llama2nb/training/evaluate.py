"""Perplexity of a llama2.c checkpoint on a text, computed by the Numba engine (torch-free).

The text is split into stories (as `data pretokenize` does), each encoded with BOS in front,
and the token stream is cut into windows of seq_len + 1 tokens that overlap by one token, so
every token but the first is predicted exactly once. Each window starts a fresh sequence at
position 0 and runs through the engine's block forward (Transformer.logits: the logits of every
position, each weight row read once per block, as prompts are processed), not token by token:
the loss is the mean over predicted tokens of -log softmax(logits)[next token] (the exponentials
in float32, the sums and logarithms in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood per predicted token, in nats
    perplexity: float
    n_tokens: int  # tokens predicted
    n_windows: int


def windows(tokens: Sequence[int], seq_len: int) -> list[np.ndarray]:
    """Consecutive windows of at most seq_len + 1 tokens overlapping by one token."""
    tokens = np.asarray(tokens, dtype=np.int64)
    out = []
    for start in range(0, max(len(tokens) - 1, 0), seq_len):
        w = tokens[start:start + seq_len + 1]
        if len(w) >= 2:
            out.append(w)
    return out


def encode_text(stories: Sequence[str], tokenizer) -> list[int]:
    ids: list[int] = []
    for story in stories:
        ids.extend(tokenizer.encode(story, bos=True, eos=False))
    return ids


def evaluate(model, tokens: Sequence[int], seq_len: int | None = None,
             advance: Callable[[int], None] | None = None) -> EvalResult:
    """Mean loss of `model` (a llama2nb.Transformer: logits(tokens) -> (n, vocab)) on tokens."""
    seq_len = min(seq_len or model.config.seq_len, model.config.seq_len)
    total, count = 0.0, 0
    wins = windows(tokens, seq_len)
    for w in wins:
        logits = model.logits(w[:-1])  # (len(w) - 1, vocab) float32, a new array
        target = logits[np.arange(len(w) - 1), w[1:]].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        np.exp(np.subtract(logits, top, out=logits), out=logits)  # in place: no float64 copy
        log_sum = top[:, 0].astype(np.float64) + np.log(logits.sum(axis=1, dtype=np.float64))
        total += float((log_sum - target).sum())
        count += len(w) - 1
        if advance:
            advance(len(w) - 1)
    if count == 0:
        raise DataError("eval: expected at least 2 tokens of text, found fewer")
    loss = total / count
    return EvalResult(loss, math.exp(loss), count, len(wins))
