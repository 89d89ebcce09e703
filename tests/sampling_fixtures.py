"""Helpers for the tokenizer/sampler/generate/CLI tests: tiny vocabularies and models written
by the project's own writers (no ../shared needed), and straight ports of run.c's encode and
sampler to check the fast versions against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama2nb.files.llama2c import write_checkpoint
from llama2nb.testmodels import random_weights
from llama2nb.config import ModelConfig
from llama2nb.tokenizer import write_bin
from llama2nb.testmodels import byte_vocab

# words for a tiny vocabulary: merges build them from characters (byte_vocab adds the prefixes)
WORDS = [" Once", " upon", " a", " time", " there", " was", " little", " girl", " happy", " the", " cat",
         " dog", " sun", ".", ",", " café", " 日本"]


def tiny_vocab() -> tuple[list[bytes], list[float]]:
    return byte_vocab(WORDS)


def write_tiny_tokenizer(path: Path) -> int:
    """A llama2.c tokenizer.bin of the tiny vocabulary; returns its size."""
    pieces, scores = tiny_vocab()
    write_bin(path, pieces, scores)
    return len(pieces)


def tiny_config(vocab_size: int, seq_len: int = 32) -> ModelConfig:
    return ModelConfig(dim=16, hidden_dim=32, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=vocab_size,
                       seq_len=seq_len)


def write_tiny_model(folder: Path, seq_len: int = 32, seed: int = 0) -> Path:
    """model.bin with tokenizer.bin beside it (so the CLI finds it without -z)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(folder / "tokenizer.bin")
    config = tiny_config(vocab, seq_len)
    # large weights make the random model's distribution peaked, so sampling is not uniform
    write_checkpoint(folder / "model.bin", config, random_weights(config, seed=seed, scale=0.5))
    return folder / "model.bin"


# ----------------------------------------------------------------------------------------------
# run.c, line by line (quadratic; only for checking)


def runc_encode(pieces: list[bytes], scores, text: bytes, bos: bool = True, eos: bool = False) -> list[int]:
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    scores = [np.float32(s) for s in scores]
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[b" "])
    buf = b""
    for k, c in enumerate(text):
        if (c & 0xC0) != 0x80:
            buf = b""
        buf += bytes([c])
        if k + 1 < len(text) and (text[k + 1] & 0xC0) == 0x80 and len(buf) < 4:
            continue
        tid = lookup.get(buf, -1)
        if tid != -1:
            tokens.append(tid)
        else:
            tokens.extend(b + 3 for b in buf)
        buf = b""
    start = 0  # run.c's loop includes BOS (its piece never merges)
    while True:
        best_score, best_id, best_idx = np.float32(-1e10), -1, -1
        for i in range(start, len(tokens) - 1):
            tid = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if tid != -1 and scores[tid] > best_score:
                best_score, best_id, best_idx = scores[tid], tid, i
        if best_idx == -1:
            break
        tokens[best_idx:best_idx + 2] = [best_id]
    if eos:
        tokens.append(2)
    return tokens


class RunCRng:
    """xorshift64* written independently of llama2nb.sampler (NumPy uint64 wraparound)."""

    def __init__(self, seed: int) -> None:
        self.state = np.uint64(seed)

    def u32(self) -> int:
        with np.errstate(over="ignore"):
            s = self.state
            s ^= s >> np.uint64(12)
            s ^= s << np.uint64(25)
            s ^= s >> np.uint64(27)
            self.state = s
            return int((s * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(32))

    def f32(self) -> np.float32:
        return np.float32(self.u32() >> 8) / np.float32(16777216.0)


def _libm_expf():
    """The C library's expf, which run.c calls (NumPy's float32 exp differs in the last bit)."""
    import ctypes
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return lambda v: np.float32(libm.expf(float(v)))


expf = _libm_expf()


def runc_sample(logits: np.ndarray, temperature: float, topp: float, rng: RunCRng) -> int:
    """run.c's sample(), scalar float32 loops; qsort ties resolved as glibc's merge sort (stable)."""
    n = len(logits)
    if temperature == 0:
        return int(np.argmax(logits))
    x = [np.float32(v) / np.float32(temperature) for v in logits]
    m = max(x)
    total = np.float32(0)
    for i in range(n):
        x[i] = expf(np.float32(x[i] - m))
        total = np.float32(total + x[i])
    x = [np.float32(v / total) for v in x]
    coin = rng.f32()
    topp = np.float32(topp)
    if topp <= 0 or topp >= 1:
        cdf = np.float32(0)
        for i in range(n):
            cdf = np.float32(cdf + x[i])
            if coin < cdf:
                return i
        return n - 1
    cutoff = (np.float32(1) - topp) / np.float32(n - 1)
    cand = sorted(((x[i], i) for i in range(n) if x[i] >= cutoff), key=lambda pi: -pi[0])  # stable
    cumulative = np.float32(0)
    last = len(cand) - 1
    for j, (p, _) in enumerate(cand):
        cumulative = np.float32(cumulative + p)
        if cumulative > topp:
            last = j
            break
    r = np.float32(coin * cumulative)
    cdf = np.float32(0)
    for j in range(last + 1):
        cdf = np.float32(cdf + cand[j][0])
        if r < cdf:
            return cand[j][1]
    return cand[last][1]


# run.c's sampler in C (xorshift64*, softmax with expf, sample_mult, sample_topp with qsort),
# written from run.c's algorithm; fed recorded logits, it prints the token it picks per row.
RUNC_SAMPLER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
typedef struct { float prob; int index; } ProbIndex;
static unsigned long long state;
static unsigned int random_u32(void) { state ^= state >> 12; state ^= state << 25; state ^= state >> 27;
    return (state * 0x2545F4914F6CDD1Dull) >> 32; }
static float random_f32(void) { return (random_u32() >> 8) / 16777216.0f; }
static void softmax(float* x, int n) { float m = x[0]; for (int i = 1; i < n; i++) if (x[i] > m) m = x[i];
    float s = 0.0f; for (int i = 0; i < n; i++) { x[i] = expf(x[i] - m); s += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= s; }
static int argmax(float* p, int n) { int mi = 0; float mp = p[0];
    for (int i = 1; i < n; i++) if (p[i] > mp) { mi = i; mp = p[i]; } return mi; }
static int sample_mult(float* p, int n, float coin) { float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += p[i]; if (coin < cdf) return i; } return n - 1; }
static int cmp(const void* a, const void* b) { const ProbIndex *x = a, *y = b;
    if (x->prob > y->prob) return -1; if (x->prob < y->prob) return 1; return 0; }
static int sample_topp(float* p, int n, float topp, ProbIndex* pi, float coin) {
    int n0 = 0; const float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) if (p[i] >= cutoff) { pi[n0].index = i; pi[n0].prob = p[i]; n0++; }
    qsort(pi, n0, sizeof(ProbIndex), cmp);
    float cum = 0.0f; int last = n0 - 1;
    for (int i = 0; i < n0; i++) { cum += pi[i].prob; if (cum > topp) { last = i; break; } }
    float r = coin * cum; float cdf = 0.0f;
    for (int i = 0; i <= last; i++) { cdf += pi[i].prob; if (r < cdf) return pi[i].index; }
    return pi[last].index; }
int main(int argc, char** argv) {
    FILE* f = fopen(argv[1], "rb"); int rows = atoi(argv[2]), n = atoi(argv[3]);
    float t = atof(argv[4]), topp = atof(argv[5]); state = strtoull(argv[6], 0, 10);
    float* x = malloc(n * sizeof(float)); ProbIndex* pi = malloc(n * sizeof(ProbIndex));
    for (int r = 0; r < rows; r++) {
        if (fread(x, sizeof(float), n, f) != (size_t)n) return 1;
        int next;
        if (t == 0.0f) next = argmax(x, n);
        else { for (int q = 0; q < n; q++) x[q] /= t; softmax(x, n); float coin = random_f32();
            if (topp <= 0 || topp >= 1) next = sample_mult(x, n, coin);
            else next = sample_topp(x, n, topp, pi, coin); }
        printf("%d\n", next);
    }
    return 0; }
"""
