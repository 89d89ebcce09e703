"""Turn logits into the next token, with run.c's RNG and arithmetic so that the same seed,
temperature and top-p choose the same tokens as run.c.

run.c, per token: argmax at temperature 0; otherwise logits /= temperature, softmax, one coin
from xorshift64*, then multinomial sampling (top-p <= 0 or >= 1) or top-p sampling, whose
candidates are the probabilities >= (1 - topp) / (n - 1), sorted descending by qsort. All of it
is float32 with sequential sums; NumPy reproduces that with float32 buffers and `cumsum`
(which, unlike `sum`, adds in order). Tie order: glibc's qsort is a merge sort, so equal
probabilities keep ascending token order; a stable argsort does the same. (Other C libraries'
quicksorts may order ties differently, and NumPy's float32 `exp` can differ from glibc's `expf`
in the last bit; either changes a choice only when a coin lands on such a boundary.)

Extras, all off by default so that run.c's choices are unchanged: repetition penalty (CTRL's:
a seen token's logit is divided by the penalty when positive, multiplied when negative), top-k
and min-p (drop tokens below min_p times the top probability; the survivors are renormalised).
"""

from __future__ import annotations

import math
import time

import numpy as np

_MASK64 = (1 << 64) - 1
_XORSHIFT_MULT = 0x2545F4914F6CDD1D


class XorShift64Star:
    """run.c's RNG: 64-bit xorshift state, 32-bit output from the multiplied state's top half."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64  # a negative C int seed sign-extends into the 64-bit state

    def random_u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s = (s ^ (s << 25)) & _MASK64
        s ^= s >> 27
        self.state = s
        return ((s * _XORSHIFT_MULT) & _MASK64) >> 32

    def random_f32(self) -> np.float32:
        """A float32 in [0, 1) from the top 24 bits, exactly as run.c computes it."""
        return np.float32((self.random_u32() >> 8) / 16777216.0)


def time_seed() -> int:
    """run.c's default seed: the Unix time in seconds, as an unsigned 32-bit value."""
    return int(time.time()) & 0xFFFFFFFF


class Sampler:
    def __init__(self, vocab_size: int, temperature: float = 1.0, topp: float = 0.9, seed: int | None = None,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size: expected >= 1, found {vocab_size}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0, found {temperature}")
        if not (math.isfinite(topp) and 0 <= topp <= 1):
            raise ValueError(f"topp: expected a number in [0, 1], found {topp}")
        if top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), found {top_k}")
        if not (math.isfinite(min_p) and 0 <= min_p <= 1):
            raise ValueError(f"min_p: expected a number in [0, 1] (0 = off), found {min_p}")
        if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty: expected a finite number > 0 (1 = off), found {repetition_penalty}")
        self.vocab_size = vocab_size
        self.temperature = np.float32(temperature)
        self.topp = np.float32(topp)
        self.top_k = int(top_k)
        self.min_p = np.float32(min_p)
        self.repetition_penalty = np.float32(repetition_penalty)
        # run.c treats seed 0 as "use the time" (xorshift's state 0 would only ever give 0)
        self.seed = time_seed() if not seed else int(seed) & _MASK64
        self.rng = XorShift64Star(self.seed)
        # preallocated buffers: sample() allocates only the top-p candidate list
        self._probs = np.empty(vocab_size, np.float32)
        self._cdf = np.empty(vocab_size, np.float32)
        self._seen = np.zeros(vocab_size, np.bool_)
        self._cutoff = ((np.float32(1) - self.topp) / np.float32(vocab_size - 1)
                        if vocab_size > 1 else np.float32(0))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def observe(self, token: int) -> None:
        """Record a token of the sequence (prompt or sampled) for the repetition penalty."""
        self._seen[token] = True

    def reset(self) -> None:
        self._seen[:] = False

    def sample(self, logits: np.ndarray) -> int:
        """The next token. `logits` is read, never modified (it is the model's own buffer)."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits: expected shape ({self.vocab_size},), found {logits.shape}")
        x = self._probs
        x[:] = logits
        if self.repetition_penalty != 1:
            self._penalise(x)
        if self.temperature == 0:
            return int(np.argmax(x))  # the first maximum, as run.c's argmax
        if self.temperature != 1:
            np.divide(x, self.temperature, out=x)
        if self.top_k and self.top_k < self.vocab_size:
            self._keep_top_k(x)
        self._softmax(x)
        if self.min_p > 0:
            self._apply_min_p(x)
        coin = self.rng.random_f32()
        if self.topp <= 0 or self.topp >= 1:
            return self._sample_mult(x, coin)
        return self._sample_topp(x, coin)

    # ------------------------------------------------------------------------------------------

    def _penalise(self, x: np.ndarray) -> None:
        seen = self._seen
        pen = self.repetition_penalty
        x[seen & (x > 0)] /= pen
        x[seen & (x <= 0)] *= pen

    def _keep_top_k(self, x: np.ndarray) -> None:
        """Keep the k largest logits (ties at the boundary: the lower ids) and drop the rest."""
        k = self.top_k
        order = np.argsort(-x, kind="stable")
        x[order[k:]] = -np.inf

    def _softmax(self, x: np.ndarray) -> None:
        """run.c's softmax in float32: subtract the max, exp, divide by the in-order sum."""
        np.subtract(x, x.max(), out=x)
        np.exp(x, out=x)
        np.cumsum(x, out=self._cdf)
        total = self._cdf[-1]
        if not (np.isfinite(total) and total > 0):
            raise ValueError(f"logits: expected finite values, found a softmax sum of {total}")
        np.divide(x, total, out=x)

    def _apply_min_p(self, x: np.ndarray) -> None:
        x[x < self.min_p * x.max()] = 0
        np.cumsum(x, out=self._cdf)
        np.divide(x, self._cdf[-1], out=x)

    def _sample_mult(self, probs: np.ndarray, coin: np.float32) -> int:
        """The first index whose float32 running sum exceeds the coin."""
        cdf = self._cdf
        np.cumsum(probs, out=cdf)
        i = int(np.searchsorted(cdf, coin, side="right"))  # first i with coin < cdf[i]
        if i < self.vocab_size:
            return i
        # rounding left the total below the coin: run.c returns n - 1; take the last token
        # that has any probability (the same one unless min-p/top-k zeroed the tail)
        nonzero = np.flatnonzero(probs)
        return int(nonzero[-1]) if len(nonzero) else self.vocab_size - 1

    def _sample_topp(self, probs: np.ndarray, coin: np.float32) -> int:
        """run.c's sample_topp: candidates >= (1 - topp) / (n - 1) (no token below it can be
        needed to pass topp), sorted descending, cut after the running sum passes topp, then
        a coin scaled by that sum picks within the cut."""
        idx = np.flatnonzero(probs >= self._cutoff)
        if self.min_p > 0 or self.top_k:
            idx = idx[probs[idx] > 0]  # zeroed tokens are out (the cutoff can be 0 at topp ~ 1)
        cand = probs[idx]
        order = np.argsort(-cand, kind="stable")  # descending; ties keep ascending ids
        idx, cand = idx[order], cand[order]
        cum = np.cumsum(cand, dtype=np.float32)
        past = np.flatnonzero(cum > self.topp)
        last = int(past[0]) if len(past) else len(cand) - 1  # rounding: consider all candidates
        r = np.float32(coin * cum[last])
        i = int(np.searchsorted(cum[: last + 1], r, side="right"))  # first i with r < cdf[i]
        return int(idx[min(i, last)])
