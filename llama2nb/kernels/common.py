"""The arithmetic every layer shares, whatever its weights' format: rmsnorm, RoPE, softmax,
attention (one token, a block), SwiGLU and the residual add, as plain Python for Numba.

Each kernel writes into a caller-owned output buffer and allocates nothing; shapes are in the
docstrings. Activations carry a leading batch axis B: 1 when generating, a block of prompt
tokens when prefilling. They follow run.c step for step, so that llama2.c files give llama2.c's
logits. Every kernel registers itself (`@kernel`) and is compiled once per fastmath setting by
`jit.compile_family`; without Numba (NUMBA_DISABLE_JIT=1) they run as the plain Python they are.
FAST_EXP is a compile-time constant set per family (the module value is what a direct call
gets: IEEE libm exp).

Float32 throughout: every constant is an np.float32 so that no loop is silently promoted to
float64, which would halve the vector width. Loops index from 0 over slices (`row[start:end]`,
then `range(n)`): Numba's negative-index wraparound check on `range(start, end)` indices that
LLVM cannot prove non-negative is enough to stop vectorisation.
"""

import math

import numpy as np

from .jit import kernel
from .simd import float32_from_bits

ONE = np.float32(1.0)
ZERO = np.float32(0.0)
# Whether exp() is exp_poly (a polynomial LLVM vectorises) rather than libm's scalar expf: the
# full fastmath setting's choice, as gcc -Ofast vectorises expf through glibc's libmvec.
FAST_EXP = False


@kernel
def rmsnorm(out, x, weight, eps):
    """out = weight * x / sqrt(mean(x²) + eps), row by row.  out, x (B, n), weight (n,), eps float32"""
    n = x.shape[1]
    for b in range(x.shape[0]):
        row = x[b]
        ss = ZERO
        for i in range(n):
            ss += row[i] * row[i]
        inv = ONE / np.float32(math.sqrt(ss / np.float32(n) + eps))
        for i in range(n):
            out[b, i] = weight[i] * (inv * row[i])


@kernel
def dot(x, w):
    """x · w in float32.  x, w (n,)"""
    acc = ZERO
    for j in range(x.shape[0]):
        acc += x[j] * w[j]
    return acc


@kernel
def rope(q, k, cos, sin):
    """Rotate each (even, odd) pair of every head of q and k by its position's angles (run.c's
    RoPE).  q (B, dim), k (B, kv_dim), cos/sin (B, head_size // 2): the rows of these positions"""
    half = cos.shape[1]
    for b in range(q.shape[0]):
        for i in range(0, q.shape[1], 2):
            j = (i // 2) % half
            c = cos[b, j]
            s = sin[b, j]
            q0 = q[b, i]
            q1 = q[b, i + 1]
            q[b, i] = q0 * c - q1 * s
            q[b, i + 1] = q0 * s + q1 * c
            if i < k.shape[1]:
                k0 = k[b, i]
                k1 = k[b, i + 1]
                k[b, i] = k0 * c - k1 * s
                k[b, i + 1] = k0 * s + k1 * c


LOG2E = np.float32(1.44269504088896341)
LN2_HIGH = np.float32(0.693359375)  # ln 2 in two parts (Cody and Waite), so that k * LN2_HIGH is exact
LN2_LOW = np.float32(-2.12194440e-4)
EXP_MIN = np.float32(-87.33)  # e^x for x below is under float32's smallest normal number
EXP_MAX = np.float32(88.72)  # and above, over its largest
HALF = np.float32(0.5)


@kernel
def exp_poly(x):
    """e^x in float32 (relative error < 4e-7) for x in [EXP_MIN, EXP_MAX], clamped outside.
    Only arithmetic, a floor and a bitcast, so that LLVM vectorises a loop of them:
    e^x = 2^k e^r with k = round(x / ln 2) and |r| <= ln(2) / 2; e^r by its minimax polynomial
    (Cephes' expf), 2^k from its IEEE bits."""
    x = min(max(x, EXP_MIN), EXP_MAX)
    k = np.floor(x * LOG2E + HALF)
    r = x - k * LN2_HIGH - k * LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e_r = p * (r * r) + r + ONE
    return e_r * float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@kernel
def exp(x):
    """e^x in float32: libm's expf, or exp_poly under full fastmath (FAST_EXP)."""
    if FAST_EXP:
        return exp_poly(x)
    return np.float32(math.exp(x))


@kernel
def softmax(x, n):
    """In place over x[:n], subtracting the max for stability.  x (>= n,)"""
    top = x[0]
    for i in range(1, n):
        top = max(top, x[i])
    total = ZERO
    for i in range(n):
        x[i] = exp(x[i] - top)
        total += x[i]
    for i in range(n):
        x[i] = x[i] / total


@kernel
def attention(out, q, key_cache, value_cache, att, pos, n_kv_heads):
    """Causal multi-head attention of one query over cache rows 0..pos, heads sharing kv heads
    in groups (grouped-query attention). The cache is read row by row, every head at once, as
    one sequential stream (head by head it would be n_heads strided streams, twice as slow:
    benchmarks/performance.md). Its own function over 1-D row slices: inlined into the layer
    with 2-D indexing, LLVM vectorised none of it.
    out (dim,), q (dim,), key/value_cache (seq_len, kv_dim), att (n_heads, seq_len)"""
    n_heads = att.shape[0]
    head_size = q.shape[0] // n_heads
    kv_group = n_heads // n_kv_heads
    root = np.float32(math.sqrt(head_size))
    # att[h, t] = q_h . k_t / sqrt(head_size)
    for t in range(pos + 1):
        key_row = key_cache[t]  # (kv_dim,)
        for h in range(n_heads):
            kv = (h // kv_group) * head_size  # this head's kv head's offset in a cache row
            qh = q[h * head_size:(h + 1) * head_size]  # (head_size,)
            k = key_row[kv:kv + head_size]
            score = ZERO
            for i in range(head_size):
                score += qh[i] * k[i]
            att[h, t] = score / root
    for h in range(n_heads):
        softmax(att[h], pos + 1)
    # out_h = sum over t of att[h, t] * v_t
    for i in range(out.shape[0]):
        out[i] = ZERO
    for t in range(pos + 1):
        value_row = value_cache[t]  # (kv_dim,)
        for h in range(n_heads):
            kv = (h // kv_group) * head_size
            oh = out[h * head_size:(h + 1) * head_size]  # (head_size,)
            v = value_row[kv:kv + head_size]
            a = att[h, t]
            for i in range(head_size):
                oh[i] += a * v[i]


@kernel
def attention_block(out, q, key_cache, value_cache, scores, pos, n_kv_heads):
    """attention() for a block of B tokens at positions pos..pos+B-1, each seeing itself and
    every earlier position. Each cached key and value row is loaded once for the whole block and
    shared by four queries at a time, as matmul shares weight rows.
    out, q (B, dim), key/value_cache (seq_len, kv_dim), scores (B, seq_len) scratch"""
    B, dim = q.shape
    head_size = key_cache.shape[1] // n_kv_heads
    n_heads = dim // head_size
    kv_group = n_heads // n_kv_heads
    root = np.float32(math.sqrt(head_size))
    for h in range(n_heads):
        qo = h * head_size
        kv = (h // kv_group) * head_size
        # scores[b, t] = q_b · k_t / sqrt(head_size) for t <= pos + b
        for t in range(pos + B):
            k = key_cache[t, kv:kv + head_size]
            b = max(0, t - pos)  # the first query that may see position t
            while b + 4 <= B:
                q0 = q[b, qo:qo + head_size]
                q1 = q[b + 1, qo:qo + head_size]
                q2 = q[b + 2, qo:qo + head_size]
                q3 = q[b + 3, qo:qo + head_size]
                s0 = ZERO
                s1 = ZERO
                s2 = ZERO
                s3 = ZERO
                for i in range(head_size):
                    s0 += q0[i] * k[i]
                    s1 += q1[i] * k[i]
                    s2 += q2[i] * k[i]
                    s3 += q3[i] * k[i]
                scores[b, t] = s0 / root
                scores[b + 1, t] = s1 / root
                scores[b + 2, t] = s2 / root
                scores[b + 3, t] = s3 / root
                b += 4
            while b < B:
                scores[b, t] = dot(q[b, qo:qo + head_size], k) / root
                b += 1
        for b in range(B):
            softmax(scores[b], pos + b + 1)
            head_out = out[b, qo:qo + head_size]
            for i in range(head_size):
                head_out[i] = ZERO
        # out_b = sum over t <= pos + b of scores[b, t] * v_t
        for t in range(pos + B):
            v = value_cache[t, kv:kv + head_size]
            for b in range(max(0, t - pos), B):
                weight = scores[b, t]
                head_out = out[b, qo:qo + head_size]
                for i in range(head_size):
                    head_out[i] += weight * v[i]


@kernel
def swiglu(hb, hb2):
    """hb = silu(hb) * hb2, in place.  hb, hb2 (B, hidden_dim)"""
    for b in range(hb.shape[0]):
        for i in range(hb.shape[1]):
            v = hb[b, i]
            hb[b, i] = v * (ONE / (ONE + exp(-v))) * hb2[b, i]


@kernel
def add(x, y):
    """x += y (the residual connection).  x, y (B, n)"""
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[b, i] += y[b, i]
