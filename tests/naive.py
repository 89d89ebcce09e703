"""Naive references, one beside every compiled kernel (stumpy's tests/naive.py): NumPy, whole
arrays, float64 wherever the kernel's answer is a float, written from the definitions and not
from llama2nb's code. tests/test_kernels.py compares each kernel with its reference for every
fastmath setting."""

from __future__ import annotations

import numpy as np

F32 = np.float32


def rmsnorm(x, weight, eps=1e-5):
    x = x.astype(np.float64)
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(q, k, positions, head_size, theta=10000.0):
    """Rotate each (even, odd) pair of every head by pos * theta^(-2j / head_size)."""
    freq = theta ** (-np.arange(0, head_size, 2) / head_size)
    angle = np.asarray(positions, np.float64)[:, None] * freq[None, :]  # (B, head_size // 2)

    def rotate(v):
        B, n = v.shape
        pairs = v.astype(np.float64).reshape(B, n // head_size, head_size // 2, 2)
        c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        even, odd = pairs[..., 0], pairs[..., 1]
        return np.stack([even * c - odd * s, even * s + odd * c], axis=-1).reshape(B, n)

    return rotate(q), rotate(k)


def softmax(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def attention(q, key_cache, value_cache, positions, n_heads, n_kv_heads):
    """Causal attention of queries q (B, dim) at `positions` over the cache rows 0..position,
    kv heads repeated for grouped-query attention."""
    B, dim = q.shape
    hs = dim // n_heads
    out = np.zeros((B, dim))
    for b, pos in enumerate(positions):
        keys = np.repeat(key_cache[:pos + 1].reshape(pos + 1, n_kv_heads, hs), n_heads // n_kv_heads, axis=1)
        values = np.repeat(value_cache[:pos + 1].reshape(pos + 1, n_kv_heads, hs), n_heads // n_kv_heads, axis=1)
        scores = np.einsum("hd,thd->ht", q[b].reshape(n_heads, hs).astype(np.float64), keys) / np.sqrt(hs)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[b] = np.einsum("ht,thd->hd", weights, values).reshape(dim)
    return out


def swiglu(a, b):
    a = a.astype(np.float64)
    return a / (1 + np.exp(-a)) * b


def matmul(x, w):
    return x.astype(np.float64) @ w.T.astype(np.float64)


def quantize_q8(x, group_size):
    """Per group: scale = max|x| / 127 (float32), q = x / scale rounded half away from zero (C's
    round); an all-zero group gives scale 0 and q 0."""
    groups = x.reshape(x.shape[0], -1, group_size)
    scale = (np.abs(groups).max(axis=-1) / F32(127)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (groups / scale[..., None]).astype(F32).astype(np.float64)
    q = np.where(scale[..., None] == 0, 0, np.sign(v) * np.floor(np.abs(v) + 0.5))
    return q.astype(np.int8).reshape(x.shape), scale


def matmul_q8(xq, xs, wq, ws, group_size):
    """Exact: the int64 dot product of every group times both scales, summed in float64."""
    B, n = xq.shape
    d = wq.shape[0]
    g = n // group_size
    dots = np.einsum("bgk,dgk->bdg", xq.reshape(B, g, group_size).astype(np.int64),
                     wq.reshape(d, g, group_size).astype(np.int64))
    return (dots * ws.reshape(d, g)[None].astype(np.float64) * xs.reshape(B, 1, g).astype(np.float64)).sum(-1)


def dequantize_q8(q, s, group_size):
    return (q.reshape(-1, group_size).astype(np.float64) * s[:, None]).reshape(q.shape)


# ----------------------------------------------------------------------------------------------
# GGUF block types, decoded from their layouts as llama.cpp's dequantize_row_* functions read
# them (ggml-quants.c), one value at a time; every weight is w = d * q + m with integer q.


def fp16(raw):
    """(N, 2) uint8 little-endian halves -> (N,) float64"""
    return np.ascontiguousarray(raw).view(np.float16).reshape(-1).astype(np.float64)


LEGACY = {  # name: (block bytes, offset of q, of qh (5th bits) or None, of m or None, zero)
    "q8_0_block": (34, 2, None, None, 0), "q4_0": (18, 2, None, None, 8), "q4_1": (20, 4, None, 2, 0),
    "q5_0": (22, 6, 2, None, 16), "q5_1": (24, 8, 4, 2, 0),
}


def decode_legacy(blocks, name):
    """(N, bytes) uint8 -> q (N, 32) int64, d (N,), m (N,) float64 with w = d * q + m."""
    size, qs, qh, m_at, zero = LEGACY[name]
    n = blocks.shape[0]
    d = fp16(blocks[:, 0:2])
    m = fp16(blocks[:, m_at:m_at + 2]) if m_at is not None else np.zeros(n)
    q = np.zeros((n, 32), np.int64)
    for j in range(32):
        if name == "q8_0_block":
            q[:, j] = blocks[:, qs + j].astype(np.int8)
            continue
        byte = blocks[:, qs + j % 16].astype(np.int64)
        q[:, j] = (byte & 15) if j < 16 else (byte >> 4)
        if qh is not None:
            high = sum(blocks[:, qh + k].astype(np.int64) << (8 * k) for k in range(4))
            q[:, j] |= ((high >> j) & 1) << 4
    return q - zero, d, m


def decode_q45_k(blocks, five):
    """Q4_K (five=False) or Q5_K super-blocks (N, 144 or 176) -> q (N, 8, 32), sc, mn (N, 8)
    int64, d, dmin (N,) with w = d * sc_j * q - dmin * mn_j on sub-block j."""
    n = blocks.shape[0]
    d, dmin = fp16(blocks[:, 0:2]), fp16(blocks[:, 2:4])
    s = blocks[:, 4:16].astype(np.int64)
    sc, mn = np.zeros((n, 8), np.int64), np.zeros((n, 8), np.int64)
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    ql = blocks[:, 48:176] if five else blocks[:, 16:144]
    q = np.zeros((n, 8, 32), np.int64)
    for j in range(8):
        for lane in range(32):
            byte = ql[:, 32 * (j // 2) + lane].astype(np.int64)
            q[:, j, lane] = (byte & 15) if j % 2 == 0 else (byte >> 4)
            if five:
                q[:, j, lane] |= ((blocks[:, 16 + lane].astype(np.int64) >> j) & 1) << 4
    return q, sc, mn, d, dmin


def decode_q6_k(blocks):
    """Q6_K super-blocks (N, 210) -> q - 32 (N, 16, 16), sc (N, 16) int64, d (N,): w = d * sc * (q - 32)."""
    n = blocks.shape[0]
    q = np.zeros((n, 256), np.int64)
    for half in range(2):
        ql, qh = blocks[:, 64 * half:64 * half + 64].astype(np.int64), blocks[:, 128 + 32 * half:160 + 32 * half].astype(np.int64)
        for lane in range(32):
            base = 128 * half + lane
            q[:, base] = (ql[:, lane] & 0xF) | (((qh[:, lane] >> 0) & 3) << 4)
            q[:, base + 32] = (ql[:, lane + 32] & 0xF) | (((qh[:, lane] >> 2) & 3) << 4)
            q[:, base + 64] = (ql[:, lane] >> 4) | (((qh[:, lane] >> 4) & 3) << 4)
            q[:, base + 96] = (ql[:, lane + 32] >> 4) | (((qh[:, lane] >> 6) & 3) << 4)
    return (q - 32).reshape(n, 16, 16), blocks[:, 192:208].view(np.int8).astype(np.int64), fp16(blocks[:, 208:210])


def quantize_q8_per(x, group):
    """llama.cpp's quantize_row_q8_0 per `group` values: d = max|x| / 127 (float32), q =
    roundf(x * (1 / d)) (half away from zero), 0 where d is 0."""
    g = x.reshape(x.shape[0], -1, group).astype(F32)
    d = (np.abs(g).max(axis=-1) / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    v = (g * inverse[..., None]).astype(F32).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return q.astype(np.int8).reshape(x.shape), d


def matmul_legacy(xq, xd, blocks, name):
    """Exact: per block, int64 sums of q * x and of x, times the float64 scales; x quantized
    per 32 (xq (B, n) int8, xd (B, n / 32)), the matrix's blocks (rows * n / 32, bytes)."""
    B, n = xq.shape
    q, d, m = decode_legacy(blocks, name)
    rows = q.shape[0] // (n // 32)
    xb = xq.reshape(B, -1, 32).astype(np.int64)
    dots = np.einsum("bkj,rkj->brk", xb, q.reshape(rows, -1, 32))
    return (xd[:, None, :].astype(np.float64) * (d.reshape(rows, -1) * dots + m.reshape(rows, -1) * xb.sum(-1)[:, None, :])).sum(-1)


def matmul_kquant(xq, xd, blocks, name):
    """Exact: per super-block the int64 sums (sc_j * q_j . x_j, and mn_j * sum(x_j)), times the
    float64 scales; x quantized per 256 (xq (B, n) int8, xd (B, n / 256))."""
    B, n = xq.shape
    supers = n // 256
    if name == "q6_k":
        q, sc, d = decode_q6_k(blocks)
        rows = q.shape[0] // supers
        dots = np.einsum("bsgj,rsgj->brsg", xq.reshape(B, supers, 16, 16).astype(np.int64), q.reshape(rows, supers, 16, 16))
        main, mins = (dots * sc.reshape(1, rows, supers, 16)).sum(-1), 0
        dmin = np.zeros_like(d)
    else:
        q, sc, mn, d, dmin = decode_q45_k(blocks, name == "q5_k")
        rows = q.shape[0] // supers
        xb = xq.reshape(B, supers, 8, 32).astype(np.int64)
        dots = np.einsum("bsgj,rsgj->brsg", xb, q.reshape(rows, supers, 8, 32))
        main = (dots * sc.reshape(1, rows, supers, 8)).sum(-1)
        mins = (mn.reshape(1, rows, supers, 8) * xb.sum(-1)[:, None]).sum(-1)
    scale = xd[:, None, :].astype(np.float64)
    return (scale * (d.reshape(1, rows, supers) * main - dmin.reshape(1, rows, supers) * mins)).sum(-1)
