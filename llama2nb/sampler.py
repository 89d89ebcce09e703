"""Turn logits into the next token, with run.c's RNG and arithmetic so that the same seed,
temperature and top-p choose the same tokens as run.c.

run.c, per token: argmax at temperature 0; otherwise logits /= temperature, softmax, one coin
from xorshift64*, then multinomial sampling (top-p <= 0 or >= 1) or top-p sampling, whose
candidates are the probabilities >= (1 - topp) / (n - 1), sorted descending by qsort. All of it
is float32 with sequential sums and glibc's expf, reproduced here by small @njit loops (NumPy's
`sum` adds pairwise, its `cumsum` is slower than a compiled loop, and its SIMD `exp` is not
expf to the last bit). Tie order: glibc's qsort is a merge sort, so equal probabilities keep
ascending token order; the stable radix sort here does the same, in O(n) (a comparison sort of
a flat 32,000-token distribution costs about as much as a forward pass). (Other C libraries'
quicksorts may order ties differently, and another libm's expf may differ in the last bit;
either changes a choice only when a coin lands on such a boundary.)

Temperatures at float32's edges: a temperature must be a finite float32 (at most
3.4028235e38; beyond that float32 would make it infinite). A temperature (or a repetition penalty below 1) so
small that some logit divided by it overflows float32 (e.g. 1e-38 with any logit above 3.4) samples as greedy,
as temperature 0 does: that is softmax's limit as the temperature goes to 0, and no coin is
drawn for such a token. (A temperature that rounds to 0 in float32 is greedy from the start.)

Extras, all off by default so that run.c's choices are unchanged: repetition penalty (CTRL's:
a seen token's logit is divided by the penalty when positive, multiplied when negative), top-k
and min-p (drop tokens below min_p times the top probability; the survivors are renormalised).

Errors: settings out of range raise `errors.UsageError`; non-finite logits (a model with broken
weights) raise `LogitsError`; both are user errors (`Llama2nbError`, and ValueError). A logits
array of the wrong shape is a caller's bug: plain ValueError.
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np

from .errors import Llama2nbError, UsageError
from .numba_cache import cache_enabled, load_without_refresh

_MASK64 = (1 << 64) - 1
_XORSHIFT_MULT = 0x2545F4914F6CDD1D
FLOAT32_MAX = float(np.finfo(np.float32).max)
_CACHE = cache_enabled(__file__)


def _njit(fn):
    """@njit with the disk cache, loaded as the engine's kernels are (numba_cache.load_without_refresh)."""
    dispatcher = numba.njit(cache=_CACHE)(fn)
    load_without_refresh(dispatcher)
    return dispatcher


class LogitsError(Llama2nbError, ValueError):
    """Logits that cannot be sampled (nan or inf): the model's weights are broken."""


def _float32_setting(name: str, value: float, rule: str, ok) -> np.float32:
    """`value` as the float32 the arithmetic uses, if it is finite there and `ok` holds."""
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX and ok(value)):
        raise UsageError(f"{name}: expected {rule}, found {value}")
    return np.float32(value)


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
            raise UsageError(f"vocab_size: expected >= 1, found {vocab_size}")
        if top_k < 0:
            raise UsageError(f"top_k: expected >= 0 (0 = off), found {top_k}")
        self.vocab_size = vocab_size
        self.temperature = _float32_setting("temperature", temperature, "a number from 0 to float32's largest "
                                            f"({FLOAT32_MAX:.8g})", lambda t: t >= 0)
        self.topp = _float32_setting("topp", topp, "a number in [0, 1]", lambda p: 0 <= p <= 1)
        self.top_k = int(top_k)
        self.min_p = _float32_setting("min_p", min_p, "a number in [0, 1] (0 = off)", lambda p: 0 <= p <= 1)
        self.repetition_penalty = _float32_setting(
            "repetition_penalty", repetition_penalty, f"a number > 0 and at most float32's largest ({FLOAT32_MAX:.8g}) "
            "(1 = off)", lambda r: np.float32(r) > 0)
        # run.c treats seed 0 as "use the time" (xorshift's state 0 would only ever give 0)
        self.seed = time_seed() if not seed else int(seed) & _MASK64
        self.rng = XorShift64Star(self.seed)
        # preallocated buffers: sample() allocates nothing per token on run.c's paths
        self._probs = np.empty(vocab_size, np.float32)
        self._idx = np.empty(vocab_size, np.int64)  # top-p candidates and the radix sort's buffers
        self._idx2 = np.empty(vocab_size, np.int64)
        self._keys = np.empty(vocab_size, np.int64)
        self._keys2 = np.empty(vocab_size, np.int64)
        self._counts = np.empty(256, np.int64)
        self._seen = np.zeros(vocab_size, np.bool_)
        self._cutoff = ((np.float32(1) - self.topp) / np.float32(vocab_size - 1)
                        if vocab_size > 1 else np.float32(0))

    @staticmethod
    def warm_up() -> float:
        """Compile (or load from Numba's cache) the sampling loops; returns the seconds spent.
        Called while a model loads so the first token does not pay for it."""
        started = time.perf_counter()
        probs = np.full(4, 0.25, np.float32)
        _softmax(probs.copy())
        _sequential_sum(probs)
        _divide(probs.copy(), np.float32(0.5))
        _first_past(probs, np.float32(0.5))
        buf = np.empty(4, np.int64)
        _sample_topp(probs, probs.view(np.uint32), np.float32(0), np.float32(0.9), np.float32(0.5), buf,
                     buf.copy(), buf.copy(), buf.copy(), np.empty(256, np.int64))
        return time.perf_counter() - started

    def skip(self, n: int) -> None:
        """Advance the RNG as `n` discarded samples would (each draws one coin, unless greedy)."""
        if self.temperature != 0:
            for _ in range(n):
                self.rng.random_u32()

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
            _divide(x, self.temperature)  # compiled: an overflow is handled below, not warned about
        if self.top_k and self.top_k < self.vocab_size:
            self._keep_top_k(x)
        total = _softmax(x)
        if not (math.isfinite(total) and total > 0):
            return self._overflowed(logits)
        if self.min_p > 0:
            self._apply_min_p(x)
        coin = self.rng.random_f32()
        if self.topp <= 0 or self.topp >= 1:
            return self._pick_multinomial(x, coin)
        return self._pick_topp(x, coin)

    # ------------------------------------------------------------------------------------------

    def _penalise(self, x: np.ndarray) -> None:
        seen = self._seen
        pen = self.repetition_penalty
        with np.errstate(over="ignore"):  # a penalty far below 1 can overflow: see _overflowed
            x[seen & (x > 0)] /= pen
            x[seen & (x <= 0)] *= pen

    def _keep_top_k(self, x: np.ndarray) -> None:
        """Keep the k largest logits (ties at the boundary: the lower ids) and drop the rest.
        A partition finds the k-th value in O(n), cheaper than a full sort."""
        k, n = self.top_k, self.vocab_size
        kth = np.partition(x, n - k)[n - k]
        keep = x > kth
        keep[np.flatnonzero(x == kth)[: k - int(np.count_nonzero(keep))]] = True
        x[~keep] = -np.inf

    def _overflowed(self, logits: np.ndarray) -> int:
        """The softmax's sum was not finite. With finite logits only the scaling can have done
        it (a logit divided by a tiny temperature or penalty passed float32's largest value):
        the greedy choice then, softmax's limit, with no coin drawn, as at temperature 0."""
        bad = np.count_nonzero(~np.isfinite(logits))
        if bad:
            raise LogitsError(f"logits: expected finite values, found {bad} nan or inf of {logits.size} (the "
                              "model's weights are broken)")
        x = self._probs
        x[:] = logits
        if self.repetition_penalty != 1:
            self._penalise(x)
        return int(np.argmax(x))

    def _apply_min_p(self, x: np.ndarray) -> None:
        x[x < self.min_p * x.max()] = 0
        np.divide(x, _sequential_sum(x), out=x)

    def _pick_multinomial(self, probs: np.ndarray, coin: np.float32) -> int:
        """The first index whose float32 running sum exceeds the coin."""
        i = _first_past(probs, coin)
        if i >= 0:
            return i
        # rounding left the total below the coin: run.c returns n - 1; take the last token
        # that has any probability (the same one unless min-p/top-k zeroed the tail)
        nonzero = np.flatnonzero(probs)
        return int(nonzero[-1]) if len(nonzero) else self.vocab_size - 1

    def _pick_topp(self, probs: np.ndarray, coin: np.float32) -> int:
        """run.c's sample_topp: candidates >= (1 - topp) / (n - 1) (no token below it can be
        needed to pass topp), sorted descending, cut after the running sum passes topp, then
        a coin scaled by that sum picks within the cut."""
        i = _sample_topp(probs, probs.view(np.uint32), self._cutoff, self.topp, coin, self._idx, self._keys,
                         self._idx2, self._keys2, self._counts)
        return i if i >= 0 else int(np.argmax(probs))  # no candidate at all (tiny vocab, tiny topp)


# ----------------------------------------------------------------------------------------------
# Compiled loops (IEEE float32, no fastmath: the order of additions is part of the result)


@_njit
def _softmax(x):
    """run.c's softmax, in place: max, expf(x - max), in-order float32 sum, divide. math.exp
    on a float32 is glibc's expf here, as in run.c; NumPy's vectorised float32 exp differs from
    it in the last bit for many inputs, which flipped choices against run.c."""
    n = x.shape[0]
    m = x[0]
    for i in range(1, n):
        if x[i] > m:
            m = x[i]
    total = np.float32(0)
    for i in range(n):
        x[i] = math.exp(x[i] - m)
        total += x[i]
    if total > 0 and total < np.inf:
        for i in range(n):
            x[i] /= total
    return total


@_njit
def _divide(x, t):
    """x /= t in place, as run.c's loop (IEEE float32 division; overflow gives inf, silently)."""
    for i in range(x.shape[0]):
        x[i] /= t


@_njit
def _sequential_sum(x):
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += x[i]
    return total


@_njit
def _first_past(probs, coin):
    """run.c's sample_mult: the first i with coin < probs[0] + ... + probs[i], or -1."""
    cdf = np.float32(0)
    for i in range(probs.shape[0]):
        cdf += probs[i]
        if coin < cdf:
            return i
    return -1


@_njit
def _sample_topp(probs, bits, cutoff, topp, coin, idx, keys, idx2, keys2, counts):
    n0 = 0
    for i in range(probs.shape[0]):
        if probs[i] >= cutoff and probs[i] > 0:
            idx[n0] = i
            # positive float32s order like their bit patterns; invert for descending order
            keys[n0] = 0xFFFFFFFF - np.int64(bits[i])
            n0 += 1
    if n0 == 0:
        return -1
    # LSD radix sort, 8 bits a pass: stable, so equal probabilities keep ascending ids
    src_k, src_i, dst_k, dst_i = keys, idx, keys2, idx2
    for shift in range(0, 32, 8):
        counts[:] = 0
        for j in range(n0):
            counts[(src_k[j] >> shift) & 0xFF] += 1
        if counts[(src_k[0] >> shift) & 0xFF] == n0:
            continue  # every key shares this byte: the pass would not move anything
        total = 0
        for b in range(256):
            c = counts[b]
            counts[b] = total
            total += c
        for j in range(n0):
            b = (src_k[j] >> shift) & 0xFF
            dst_k[counts[b]] = src_k[j]
            dst_i[counts[b]] = src_i[j]
            counts[b] += 1
        src_k, src_i, dst_k, dst_i = dst_k, dst_i, src_k, src_i
    # truncate where the running sum passes topp (all candidates if rounding never gets there)
    cumulative = np.float32(0)
    last = n0 - 1
    for j in range(n0):
        cumulative += probs[src_i[j]]
        if cumulative > topp:
            last = j
            break
    r = coin * cumulative
    cdf = np.float32(0)
    for j in range(last + 1):
        cdf += probs[src_i[j]]
        if r < cdf:
            return src_i[j]
    return src_i[last]
