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
