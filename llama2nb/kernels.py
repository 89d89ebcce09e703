"""The numerical kernels of the forward pass, as plain Python for Numba to compile.

Each kernel writes into a caller-owned output buffer and allocates nothing; shapes are in the
comments. They follow run.c (fp32) and runq.c (Q8_0) step for step, so that llama2.c files give
llama2.c's logits. `llama2nb.jit.jit_family` compiles them once per fastmath setting; without
Numba (NUMBA_DISABLE_JIT=1) they run as the plain Python they are.

Float32 throughout: every constant is an np.float32 so that no loop is silently promoted to
float64, which would halve the vector width.
"""

import math

import numpy as np
from numba import prange

EPS = np.float32(1e-5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
Q_MAX = np.float32(127.0)


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


def quantize(xq, xs, x, group_size):
    """runq.c's activation quantizer: per group, scale = max|x| / 127, q = round(x / scale) with
    C's round (half away from zero). An all-zero group gets scale 0 and q 0 (runq.c: NaN).
    xq (n,) int8, xs (n // group_size,) float32, x (n,) float32"""
    for g in range(x.shape[0] // group_size):
        start = g * group_size
        wmax = ZERO
        for i in range(start, start + group_size):
            wmax = max(wmax, abs(x[i]))
        scale = wmax / Q_MAX
        xs[g] = scale
        for i in range(start, start + group_size):
            if scale == ZERO:
                xq[i] = 0
            else:
                v = x[i] / scale
                r = math.floor(abs(v) + 0.5)
                xq[i] = np.int8(r if v >= 0 else -r)


def matmul_q8(out, xq, xs, wq, ws, group_size):
    """out = W @ x for Q8_0 W and x: int32 dot products per group, rescaled in float.
    out (d,), xq (n,) int8, xs (n // gs,), wq (d, n) int8, ws (d * n // gs,)"""
    d, n = wq.shape
    groups = n // group_size
    for i in range(d):
        acc = ZERO
        for g in range(groups):
            start = g * group_size
            dot = np.int32(0)
            for j in range(start, start + group_size):
                dot += np.int32(xq[j]) * np.int32(wq[i, j])
            acc += np.float32(dot) * ws[i * groups + g] * xs[g]
        out[i] = acc


def dequantize_row(out, q, s, row, group_size):
    """out = row `row` of a Q8_0 matrix, in float.  out (n,), q (rows, n) int8, s (rows * n // gs,)"""
    n = q.shape[1]
    for j in range(n):
        out[j] = np.float32(q[row, j]) * s[(row * n + j) // group_size]


def rope(q, k, cos, sin, pos, head_size):
    """Rotate each (even, odd) pair of every head of q and k by pos * freq (run.c's RoPE).
    q (dim,), k (kv_dim,), cos/sin (seq_len, head_size // 2)"""
    for i in range(0, q.shape[0], 2):
        j = (i % head_size) // 2
        c = cos[pos, j]
        s = sin[pos, j]
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
    in groups (grouped-query attention).
    out (dim,), q (dim,), key/value_cache (seq_len, kv_dim), att (n_heads, seq_len)"""
    n_heads = att.shape[0]
    head_size = q.shape[0] // n_heads
    kv_group = n_heads // n_kv_heads
    root = np.float32(math.sqrt(head_size))
    for h in range(n_heads):
        qo = h * head_size
        ko = (h // kv_group) * head_size
        for t in range(pos + 1):
            score = ZERO
            for i in range(head_size):
                score += q[qo + i] * key_cache[t, ko + i]
            att[h, t] = score / root
        softmax(att[h], pos + 1)
        for i in range(head_size):
            out[qo + i] = ZERO
        for t in range(pos + 1):
            a = att[h, t]
            for i in range(head_size):
                out[qo + i] += a * value_cache[t, ko + i]


def swiglu(hb, hb2):
    """hb = silu(hb) * hb2, in place.  hb, hb2 (hidden_dim,)"""
    for i in range(hb.shape[0]):
        v = hb[i]
        hb[i] = v * (ONE / (ONE + np.float32(math.exp(-v)))) * hb2[i]


def add(x, y):
    """x += y (the residual connection).  x, y (n,)"""
    for i in range(x.shape[0]):
        x[i] += y[i]


KERNELS = (rmsnorm, matmul, quantize, matmul_q8, dequantize_row, rope, softmax, attention, swiglu, add)
