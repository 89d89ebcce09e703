"""The numerical kernels of the forward pass, as plain Python for Numba to compile.

Each kernel writes into a caller-owned output buffer and allocates nothing; shapes are in the
comments. They follow run.c (fp32) and runq.c (Q8_0) step for step, so that llama2.c files give
llama2.c's logits. `llama2nb.jit.jit_family` compiles them once per fastmath setting; without
Numba (NUMBA_DISABLE_JIT=1) they run as the plain Python they are.

Float32 throughout: every constant is an np.float32 so that no loop is silently promoted to
float64, which would halve the vector width. Loops index from 0 over slices (`row[start:end]`,
then `range(n)`): Numba's negative-index wraparound check on `range(start, end)` indices that
LLVM cannot prove non-negative is enough to stop vectorisation.
"""

import math

import numpy as np
from numba import prange

EPS = np.float32(1e-5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
Q_MAX = np.float32(127.0)
# The Q8_0 group size. jit_family compiles the Q8_0 kernels once per group size with this global
# replaced, so each group's dot product has a constant trip count that LLVM unrolls completely
# (2x the speed of a runtime group size). The value here is only the default for direct calls.
GROUP_SIZE = 64


def rmsnorm(out, x, weight):
    """out = weight * x / sqrt(mean(x²) + eps).  out, x, weight: (n,)"""
    n = x.shape[0]
    ss = ZERO
    for i in range(n):
        ss += x[i] * x[i]
    inv = ONE / np.float32(math.sqrt(ss / np.float32(n) + EPS))
    for i in range(n):
        out[i] = weight[i] * (inv * x[i])


def matmul(out, x, w):
    """out = w @ x, one output row at a time (a matrix-vector product).  out (d,), x (n,), w (d, n)"""
    d, n = w.shape
    for i in range(d):
        acc = ZERO
        for j in range(n):
            acc += w[i, j] * x[j]
        out[i] = acc


def matmul_threaded(out, x, w):
    """matmul with its rows split across threads (compiled with parallel=True)."""
    d, n = w.shape
    for i in prange(d):
        acc = ZERO
        for j in range(n):
            acc += w[i, j] * x[j]
        out[i] = acc


def quantize(xq, xs, x):
    """runq.c's activation quantizer: per group, scale = max|x| / 127, q = round(x / scale) with
    C's round (half away from zero). An all-zero group gets scale 0 and q 0 (runq.c: NaN).
    xq (n,) int8, xs (n // GROUP_SIZE,) float32, x (n,) float32"""
    for g in range(x.shape[0] // GROUP_SIZE):
        start = g * GROUP_SIZE
        group = x[start:start + GROUP_SIZE]
        wmax = ZERO
        for i in range(GROUP_SIZE):
            wmax = max(wmax, abs(group[i]))
        scale = wmax / Q_MAX
        xs[g] = scale
        for i in range(GROUP_SIZE):
            if scale == ZERO:
                xq[start + i] = 0
            else:
                v = group[i] / scale
                r = math.floor(abs(v) + 0.5)
                xq[start + i] = np.int8(r if v >= 0 else -r)


def group_dot(x, w):
    """Exact int32 dot product of two int8 vectors. The int32 arithmetic is spelled out because
    Numba widens integer products to int64, which LLVM cannot turn into pmaddwd instructions."""
    dot = np.int32(0)
    for j in range(x.shape[0]):
        dot = np.int32(dot + np.int32(x[j]) * np.int32(w[j]))
    return dot


def matmul_q8(out, xq, xs, wq, ws):
    """out = W @ x for Q8_0 W and x: exact int32 dot products per group, rescaled in float.
    out (d,), xq (n,) int8, xs (n // GS,), wq (d, n) int8, ws (d * n // GS,)

    How fast LLVM makes a group's dot product depends on its trip count, so the loop is shaped
    by the (compile-time) group size: 64 and up, one group at a time, fully unrolled (~27 GMAC/s
    here); 32, two groups per step with two accumulators (~18; one at a time: ~3); any other
    size, a loop whose trip count LLVM does not know (~11)."""
    d, n = wq.shape
    groups = n // GROUP_SIZE
    unknown_size = n // xs.shape[0]  # = GROUP_SIZE, but opaque to LLVM
    for i in range(d):
        row = wq[i]
        scales = ws[i * groups:(i + 1) * groups]
        acc = ZERO
        g = 0
        if GROUP_SIZE == 32:
            while g + 1 < groups:
                start = g * 32
                w = row[start:start + 64]
                x = xq[start:start + 64]
                dot0 = np.int32(0)
                dot1 = np.int32(0)
                for j in range(32):
                    dot0 = np.int32(dot0 + np.int32(x[j]) * np.int32(w[j]))
                    dot1 = np.int32(dot1 + np.int32(x[j + 32]) * np.int32(w[j + 32]))
                acc += np.float32(dot0) * scales[g] * xs[g] + np.float32(dot1) * scales[g + 1] * xs[g + 1]
                g += 2
        while g < groups:
            start = g * GROUP_SIZE
            if GROUP_SIZE >= 64:
                w = row[start:start + GROUP_SIZE]
                x = xq[start:start + GROUP_SIZE]
                dot = np.int32(0)
                for j in range(GROUP_SIZE):
                    dot = np.int32(dot + np.int32(x[j]) * np.int32(w[j]))
            else:
                dot = group_dot(xq[start:start + unknown_size], row[start:start + unknown_size])
            acc += np.float32(dot) * scales[g] * xs[g]
            g += 1
        out[i] = acc


def dequantize_row(out, q, s, row):
    """out = row `row` of a Q8_0 matrix, in float.  out (n,), q (rows, n) int8, s (rows * n // GS,)"""
    n = q.shape[1]
    for j in range(n):
        out[j] = np.float32(q[row, j]) * s[(row * n + j) // GROUP_SIZE]


def rope(q, k, cos, sin):
    """Rotate each (even, odd) pair of every head of q and k by this position's angles
    (run.c's RoPE).  q (dim,), k (kv_dim,), cos/sin (head_size // 2,) for this position"""
    half = cos.shape[0]
    for i in range(0, q.shape[0], 2):
        j = (i // 2) % half
        c = cos[j]
        s = sin[j]
        q0 = q[i]
        q1 = q[i + 1]
        q[i] = q0 * c - q1 * s
        q[i + 1] = q0 * s + q1 * c
        if i < k.shape[0]:
            k0 = k[i]
            k1 = k[i + 1]
            k[i] = k0 * c - k1 * s
            k[i + 1] = k0 * s + k1 * c


def softmax(x, n):
    """In place over x[:n], subtracting the max for stability.  x (>= n,)"""
    top = x[0]
    for i in range(1, n):
        top = max(top, x[i])
    total = ZERO
    for i in range(n):
        x[i] = np.float32(math.exp(x[i] - top))
        total += x[i]
    for i in range(n):
        x[i] = x[i] / total


def attention(out, q, key_cache, value_cache, att, pos, n_kv_heads):
    """Causal multi-head attention of one query over cache rows 0..pos, heads sharing kv heads
    in groups (grouped-query attention). Its own function over 1-D row slices: inlined into the
    layer with 2-D indexing, LLVM vectorised none of it.
    out (dim,), q (dim,), key/value_cache (seq_len, kv_dim), att (n_heads, seq_len)"""
    n_heads = att.shape[0]
    head_size = q.shape[0] // n_heads
    kv_group = n_heads // n_kv_heads
    root = np.float32(math.sqrt(head_size))
    for h in range(n_heads):
        qh = q[h * head_size:(h + 1) * head_size]  # (head_size,)
        kv = (h // kv_group) * head_size  # this head's kv head's offset in a cache row
        scores = att[h]  # (seq_len,)
        for t in range(pos + 1):
            k = key_cache[t, kv:kv + head_size]
            score = ZERO
            for i in range(head_size):
                score += qh[i] * k[i]
            scores[t] = score / root
        softmax(scores, pos + 1)
        oh = out[h * head_size:(h + 1) * head_size]  # (head_size,) weighted sum of values
        for i in range(head_size):
            oh[i] = ZERO
        for t in range(pos + 1):
            v = value_cache[t, kv:kv + head_size]
            a = scores[t]
            for i in range(head_size):
                oh[i] += a * v[i]


def swiglu(hb, hb2):
    """hb = silu(hb) * hb2, in place.  hb, hb2 (hidden_dim,)"""
    for i in range(hb.shape[0]):
        v = hb[i]
        hb[i] = v * (ONE / (ONE + np.float32(math.exp(-v)))) * hb2[i]


def add(x, y):
    """x += y (the residual connection).  x, y (n,)"""
    for i in range(x.shape[0]):
        x[i] += y[i]


KERNELS = (rmsnorm, matmul, quantize, group_dot, matmul_q8, dequantize_row, rope, softmax, attention, swiglu, add)
