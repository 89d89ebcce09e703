"""The numerical kernels of the forward pass, as plain Python for Numba to compile.

Each kernel writes into a caller-owned output buffer and allocates nothing; shapes are in the
comments. Activations carry a leading batch axis B: 1 when generating, a block of prompt
tokens when prefilling, so that each weight row is read once per block rather than per token.
They follow run.c (fp32) and runq.c (Q8_0) step for step, so that llama2.c files give
llama2.c's logits. `llama2nb.jit.jit_family` compiles them once per fastmath setting; without
Numba (NUMBA_DISABLE_JIT=1) they run as the plain Python they are. Three choices are compile-
time constants set per compiled family: GROUP_SIZE, VNNI and FAST_EXP.

Float32 throughout: every constant is an np.float32 so that no loop is silently promoted to
float64, which would halve the vector width. Loops index from 0 over slices (`row[start:end]`,
then `range(n)`): Numba's negative-index wraparound check on `range(start, end)` indices that
LLVM cannot prove non-negative is enough to stop vectorisation.
"""

import math

import numpy as np
from numba import prange

from .simd import float32_from_bits, row_dot_q8

EPS = np.float32(1e-5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
Q_MAX = np.float32(127.0)
# The Q8_0 group size. jit_family compiles the Q8_0 kernels once per group size with this global
# replaced, so each group's dot product has a constant trip count that LLVM unrolls completely
# (2x the speed of a runtime group size). The value here is only the default for direct calls.
GROUP_SIZE = 64
# Whether matmul_q8 uses simd.row_dot_q8 (VNNI): set per compiled family, like GROUP_SIZE.
VNNI = False
# Whether exp() is exp_poly (a polynomial LLVM vectorises) rather than libm's scalar expf: the
# full fastmath setting's choice, as gcc -Ofast vectorises expf through glibc's libmvec.
FAST_EXP = False


def rmsnorm(out, x, weight):
    """out = weight * x / sqrt(mean(x²) + eps), row by row.  out, x (B, n), weight (n,)"""
    n = x.shape[1]
    for b in range(x.shape[0]):
        row = x[b]
        ss = ZERO
        for i in range(n):
            ss += row[i] * row[i]
        inv = ONE / np.float32(math.sqrt(ss / np.float32(n) + EPS))
        for i in range(n):
            out[b, i] = weight[i] * (inv * row[i])


def dot(x, w):
    """x · w in float32.  x, w (n,)"""
    acc = ZERO
    for j in range(x.shape[0]):
        acc += x[j] * w[j]
    return acc


def matmul(out, x, w):
    """out = x @ w.T: every token's row times every weight row.  out (B, d), x (B, n), w (d, n)

    For a block of tokens, 2 weight rows x 4 tokens at a time: 8 accumulators share each load,
    so the block runs compute-bound (~30 GMAC/s here) instead of load-bound (~12). A single
    token (generation) is a matrix-vector product bound by memory bandwidth; it takes its rows
    from the two halves of w in turn, two streams from DRAM, which the memory system serves
    faster than one (15M: 1.9-2.1 ms of matmuls a token -> 1.7-1.8)."""
    B, n = x.shape
    d = w.shape[0]
    if B == 1:
        x0 = x[0]
        o = out[0]
        half = d // 2
        for i in prange(half):
            o[i] = dot(x0, w[i])
            o[half + i] = dot(x0, w[half + i])
        if d % 2:
            o[d - 1] = dot(x0, w[d - 1])
        return
    full_b = B - B % 4
    for pair in prange(d // 2):
        i = 2 * pair
        w0 = w[i]
        w1 = w[i + 1]
        for b in range(0, full_b, 4):
            x0 = x[b]
            x1 = x[b + 1]
            x2 = x[b + 2]
            x3 = x[b + 3]
            a0 = ZERO
            a1 = ZERO
            a2 = ZERO
            a3 = ZERO
            c0 = ZERO
            c1 = ZERO
            c2 = ZERO
            c3 = ZERO
            for j in range(n):
                u = w0[j]
                v = w1[j]
                a0 += u * x0[j]
                a1 += u * x1[j]
                a2 += u * x2[j]
                a3 += u * x3[j]
                c0 += v * x0[j]
                c1 += v * x1[j]
                c2 += v * x2[j]
                c3 += v * x3[j]
            out[b, i] = a0
            out[b + 1, i] = a1
            out[b + 2, i] = a2
            out[b + 3, i] = a3
            out[b, i + 1] = c0
            out[b + 1, i + 1] = c1
            out[b + 2, i + 1] = c2
            out[b + 3, i + 1] = c3
        for b in range(full_b, B):
            out[b, i] = dot(x[b], w0)
            out[b, i + 1] = dot(x[b], w1)
    if d % 2:
        for b in range(B):
            out[b, d - 1] = dot(x[b], w[d - 1])


def quantize(xq, xs, x):
    """runq.c's activation quantizer: per group, scale = max|x| / 127, q = round(x / scale) with
    C's round (half away from zero). An all-zero group gets scale 0 and q 0 (runq.c: NaN).
    xq (B, n) int8, xs (B, n // GROUP_SIZE) float32, x (B, n) float32"""
    for b in range(x.shape[0]):
        for g in range(x.shape[1] // GROUP_SIZE):
            start = g * GROUP_SIZE
            group = x[b, start:start + GROUP_SIZE]
            wmax = ZERO
            for i in range(GROUP_SIZE):
                wmax = max(wmax, abs(group[i]))
            scale = wmax / Q_MAX
            xs[b, g] = scale
            for i in range(GROUP_SIZE):
                if scale == ZERO:
                    xq[b, start + i] = 0
                else:
                    v = group[i] / scale
                    r = math.floor(abs(v) + 0.5)
                    xq[b, start + i] = np.int8(r if v >= 0 else -r)


def group_dot(x, w):
    """Exact int32 dot product of two int8 vectors. The int32 arithmetic is spelled out because
    Numba widens integer products to int64, which LLVM cannot turn into pmaddwd instructions."""
    acc = np.int32(0)
    for j in range(x.shape[0]):
        acc = np.int32(acc + np.int32(x[j]) * np.int32(w[j]))
    return acc


def matmul_q8(out, xq, xs, wq, ws):
    """out = x @ W.T for Q8_0 W and quantized x: exact int32 dot products per group, rescaled in
    float; each weight row is read once for the whole block of tokens.
    out (B, d), xq (B, n) int8, xs (B, n // GS), wq (d, n) int8, ws (d * n // GS,)

    How fast LLVM makes a group's dot product depends on its trip count, so the loop is shaped
    by the (compile-time) group size. Measured here (GMAC/s, in cache): 64 and up, one group at
    a time, fully unrolled (26-31); 32 to 63, two groups per step with two accumulators (20-24;
    one at a time: 3-8, so an odd last group takes the next path); below 32, a loop whose trip
    count LLVM does not know (~4-11). The loops stay inline: moved into a helper function they
    lose half their speed."""
    d, n = wq.shape
    groups = n // GROUP_SIZE
    if VNNI:  # the same sums in VNNI instructions, 1.5-1.6x faster (see simd.py)
        # rows from the two halves of wq in turn: two streams from DRAM keep more reads in
        # flight than one (110M: 4.0-4.4 ms a token of matmuls against 5.0-5.3)
        half = d // 2
        for k in prange(half):
            i = half + k
            for b in range(xq.shape[0]):
                out[b, k] = row_dot_q8(xq[b], xs[b], wq[k], ws[k * groups:(k + 1) * groups], GROUP_SIZE)
                out[b, i] = row_dot_q8(xq[b], xs[b], wq[i], ws[i * groups:(i + 1) * groups], GROUP_SIZE)
        if d % 2:
            for b in range(xq.shape[0]):
                out[b, d - 1] = row_dot_q8(xq[b], xs[b], wq[d - 1], ws[(d - 1) * groups:], GROUP_SIZE)
        return
    unknown_size = n // xs.shape[1]  # = GROUP_SIZE, but opaque to LLVM
    half = d // 2
    for k in prange(half + d % 2):  # rows k and half + k: two streams (110M: 6.0 -> 4.9 ms)
        for r in range(1 + (k < half)):  # (one loop body, not two copies of this long one)
            i = d - 1 if k == half else k + r * half
            row = wq[i]
            scales = ws[i * groups:(i + 1) * groups]
            for b in range(xq.shape[0]):
                xrow = xq[b]
                xscales = xs[b]
                acc = ZERO
                g = 0
                if 32 <= GROUP_SIZE < 64:
                    while g + 1 < groups:
                        start = g * GROUP_SIZE
                        w = row[start:start + 2 * GROUP_SIZE]
                        x = xrow[start:start + 2 * GROUP_SIZE]
                        dot0 = np.int32(0)
                        dot1 = np.int32(0)
                        for j in range(GROUP_SIZE):
                            dot0 = np.int32(dot0 + np.int32(x[j]) * np.int32(w[j]))
                            dot1 = np.int32(dot1 + np.int32(x[j + GROUP_SIZE]) * np.int32(w[j + GROUP_SIZE]))
                        acc += (np.float32(dot0) * scales[g] * xscales[g]
                                + np.float32(dot1) * scales[g + 1] * xscales[g + 1])
                        g += 2
                while g < groups:
                    start = g * GROUP_SIZE
                    if GROUP_SIZE >= 64:
                        w = row[start:start + GROUP_SIZE]
                        x = xrow[start:start + GROUP_SIZE]
                        total = np.int32(0)
                        for j in range(GROUP_SIZE):
                            total = np.int32(total + np.int32(x[j]) * np.int32(w[j]))
                    else:
                        total = group_dot(xrow[start:start + unknown_size], row[start:start + unknown_size])
                    acc += np.float32(total) * scales[g] * xscales[g]
                    g += 1
                out[b, i] = acc


def embed_q8(out, q, s, tokens):
    """out[b] = row tokens[b] of a Q8_0 matrix, in float.  out (B, n), q (rows, n) int8,
    s (rows * n // GS,), tokens (B,)"""
    n = q.shape[1]
    for b in range(tokens.shape[0]):
        row = tokens[b]
        for j in range(n):
            out[b, j] = np.float32(q[row, j]) * s[(row * n + j) // GROUP_SIZE]


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


def exp(x):
    """e^x in float32: libm's expf, or exp_poly under full fastmath (FAST_EXP)."""
    if FAST_EXP:
        return exp_poly(x)
    return np.float32(math.exp(x))


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


def attention(out, q, key_cache, value_cache, att, pos, n_kv_heads):
    """Causal multi-head attention of one query over cache rows 0..pos, heads sharing kv heads
    in groups (grouped-query attention). The cache is read row by row, every head at once, as
    one sequential stream (head by head, it was n_heads strided ones: 110M spent 0.56 ms a token
    here, 9% of int8 generation). Its own function over 1-D row slices: inlined into the layer
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


def swiglu(hb, hb2):
    """hb = silu(hb) * hb2, in place.  hb, hb2 (B, hidden_dim)"""
    for b in range(hb.shape[0]):
        for i in range(hb.shape[1]):
            v = hb[b, i]
            hb[b, i] = v * (ONE / (ONE + exp(-v))) * hb2[b, i]


def add(x, y):
    """x += y (the residual connection).  x, y (B, n)"""
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[b, i] += y[b, i]


KERNELS = (rmsnorm, dot, matmul, quantize, group_dot, matmul_q8, embed_q8, rope, exp_poly, exp, softmax, attention,
           attention_block, swiglu, add)
