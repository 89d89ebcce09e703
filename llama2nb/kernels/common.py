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
def attention_block(out, q, key_cache, value_cache, scores, transposed, pos, n_kv_heads):
    """attention() for a block of B tokens at positions pos..pos+B-1, each seeing itself and
    every earlier position, head by head as two small matrix products over the head's keys and
    values copied transposed into `transposed` (the keys scaled by 1 / sqrt(head_size)), once
    per group of heads that share them. A query's scores are sums of rows of the keys
    (vectorised along positions, four rows a pass); the outputs of four queries are the f32
    block product (formats/f32.block4x4) of their scores, zero past each query's last
    position, and the values.
    out, q (B, dim), key/value_cache (seq_len, kv_dim), scores (B, seq_len) and transposed
    (2, head_size, seq_len) scratch"""
    B, dim = q.shape
    head_size = key_cache.shape[1] // n_kv_heads
    n_heads = dim // head_size
    kv_group = n_heads // n_kv_heads
    scale = ONE / np.float32(math.sqrt(head_size))
    T = pos + B
    keys_t, values_t = transposed[0], transposed[1]
    for h in range(n_heads):
        qo = h * head_size
        kv = (h // kv_group) * head_size
        if h % kv_group == 0:
            for i in range(head_size):
                for t in range(T):
                    keys_t[i, t] = key_cache[t, kv + i] * scale
                    values_t[i, t] = value_cache[t, kv + i]
        full_b = B - B % 4
        for b in range(0, full_b, 4):  # four queries share each load of keys_t
            attention_scores4(scores[b:b + 4], q[b:b + 4, qo:qo + head_size], keys_t, pos + b + 4)
        for b in range(full_b, B):
            attention_scores(scores[b], q[b, qo:qo + head_size], keys_t, pos + b + 1)
        for b in range(B):
            seen = pos + b + 1  # positions 0..pos+b
            softmax(scores[b], seen)
            for t in range(seen, min(T, seen + 3)):  # zero up to the last of its four
                scores[b, t] = ZERO
        head_out = out[:, qo:qo + head_size]
        full_i = head_size - head_size % 4
        for b in range(0, full_b, 4):
            for i in range(0, full_i, 4):
                block4x4(head_out, scores, values_t, i, b, 0, pos + b + 4)
        for b in range(B):
            for i in range(head_size):
                if b >= full_b or i >= full_i:
                    head_out[b, i] = dot(scores[b, :pos + b + 1], values_t[i, :pos + b + 1])


@kernel
def attention_scores4(srows, qh, keys_t, seen):
    """attention_scores for four queries over the same positions t < seen.
    srows (4, >= seen), qh (4, head_size), keys_t (head_size, >= seen)"""
    s0, s1, s2, s3 = srows[0], srows[1], srows[2], srows[3]
    for t in range(seen):
        s0[t] = ZERO
        s1[t] = ZERO
        s2[t] = ZERO
        s3[t] = ZERO
    for i in range(0, qh.shape[1] - 1, 2):
        k0, k1 = keys_t[i], keys_t[i + 1]
        a0, a1, a2, a3 = qh[0, i], qh[1, i], qh[2, i], qh[3, i]
        b0, b1, b2, b3 = qh[0, i + 1], qh[1, i + 1], qh[2, i + 1], qh[3, i + 1]
        for t in range(seen):
            u, v = k0[t], k1[t]
            s0[t] += a0 * u + b0 * v
            s1[t] += a1 * u + b1 * v
            s2[t] += a2 * u + b2 * v
            s3[t] += a3 * u + b3 * v
    if qh.shape[1] % 2:
        i = qh.shape[1] - 1
        k0 = keys_t[i]
        for t in range(seen):
            s0[t] += qh[0, i] * k0[t]
            s1[t] += qh[1, i] * k0[t]
            s2[t] += qh[2, i] * k0[t]
            s3[t] += qh[3, i] * k0[t]


@kernel
def attention_scores(srow, qh, keys_t, seen):
    """srow[t] = qh . keys_t[:, t] for t < seen, four rows of keys_t a pass.
    srow (>= seen,), qh (head_size,), keys_t (head_size, >= seen)"""
    head_size = qh.shape[0]
    full = head_size - head_size % 4
    for t in range(seen):
        srow[t] = ZERO
    for i in range(0, full, 4):
        q0, q1, q2, q3 = qh[i], qh[i + 1], qh[i + 2], qh[i + 3]
        k0, k1, k2, k3 = keys_t[i], keys_t[i + 1], keys_t[i + 2], keys_t[i + 3]
        for t in range(seen):
            srow[t] += q0 * k0[t] + q1 * k1[t] + q2 * k2[t] + q3 * k3[t]
    for i in range(full, head_size):
        qi, ki = qh[i], keys_t[i]
        for t in range(seen):
            srow[t] += qi * ki[t]


@kernel
def block4x4(out, x, w, i, b, start, stop):
    """out[b:b+4, i:i+4] (+)= x[b:b+4, start:stop] @ w[i:i+4, start:stop].T: set on the first
    chunk (start 0), added to after."""
    w0 = w[i, start:stop]
    w1 = w[i + 1, start:stop]
    w2 = w[i + 2, start:stop]
    w3 = w[i + 3, start:stop]
    x0 = x[b, start:stop]
    x1 = x[b + 1, start:stop]
    x2 = x[b + 2, start:stop]
    x3 = x[b + 3, start:stop]
    a00 = ZERO
    a01 = ZERO
    a02 = ZERO
    a03 = ZERO
    a10 = ZERO
    a11 = ZERO
    a12 = ZERO
    a13 = ZERO
    a20 = ZERO
    a21 = ZERO
    a22 = ZERO
    a23 = ZERO
    a30 = ZERO
    a31 = ZERO
    a32 = ZERO
    a33 = ZERO
    for j in range(stop - start):
        p = x0[j]
        q = x1[j]
        r = x2[j]
        s = x3[j]
        u = w0[j]
        a00 += u * p
        a01 += u * q
        a02 += u * r
        a03 += u * s
        u = w1[j]
        a10 += u * p
        a11 += u * q
        a12 += u * r
        a13 += u * s
        u = w2[j]
        a20 += u * p
        a21 += u * q
        a22 += u * r
        a23 += u * s
        u = w3[j]
        a30 += u * p
        a31 += u * q
        a32 += u * r
        a33 += u * s
    if start > 0:
        a00 += out[b, i]
        a01 += out[b + 1, i]
        a02 += out[b + 2, i]
        a03 += out[b + 3, i]
        a10 += out[b, i + 1]
        a11 += out[b + 1, i + 1]
        a12 += out[b + 2, i + 1]
        a13 += out[b + 3, i + 1]
        a20 += out[b, i + 2]
        a21 += out[b + 1, i + 2]
        a22 += out[b + 2, i + 2]
        a23 += out[b + 3, i + 2]
        a30 += out[b, i + 3]
        a31 += out[b + 1, i + 3]
        a32 += out[b + 2, i + 3]
        a33 += out[b + 3, i + 3]
    out[b, i] = a00
    out[b + 1, i] = a01
    out[b + 2, i] = a02
    out[b + 3, i] = a03
    out[b, i + 1] = a10
    out[b + 1, i + 1] = a11
    out[b + 2, i + 1] = a12
    out[b + 3, i + 1] = a13
    out[b, i + 2] = a20
    out[b + 1, i + 2] = a21
    out[b + 2, i + 2] = a22
    out[b + 3, i + 2] = a23
    out[b, i + 3] = a30
    out[b + 1, i + 3] = a31
    out[b + 2, i + 3] = a32
    out[b + 3, i + 3] = a33


@kernel
def swiglu(hb, hb2):
    """hb = silu(hb) * hb2, in place.  hb, hb2 (B, hidden_dim)"""
    for b in range(hb.shape[0]):
        for i in range(hb.shape[1]):
            v = hb[b, i]
            hb[b, i] = v * (ONE / (ONE + exp(-v))) * hb2[b, i]


@kernel
def split(whole, first, second, third):
    """first, second and third (unless None) = whole's columns in turn (a stacked matrix's
    product, forward.STACKS).  whole (B, n1 + n2 [+ n3]), the parts (B, n_i)"""
    n1, n2 = first.shape[1], second.shape[1]
    for b in range(whole.shape[0]):
        for i in range(n1):
            first[b, i] = whole[b, i]
        for i in range(n2):
            second[b, i] = whole[b, n1 + i]
        if third is not None:
            for i in range(third.shape[1]):
                third[b, i] = whole[b, n1 + n2 + i]


@kernel
def add(x, y):
    """x += y (the residual connection).  x, y (B, n)"""
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[b, i] += y[b, i]
