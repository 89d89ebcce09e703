"""The oracle: a plain NumPy forward pass, written independently of llama2nb's kernels.

It parses the checkpoint bytes itself (struct + np.frombuffer, not llama2nb.files.llama2c), works
on whole matrices with NumPy's own matmul, and repeats the kv heads for grouped-query attention
instead of indexing into groups. Q8_0 files are computed as runq.c does: activations quantized
per group (C's round, half away from zero), int32 dot products, float rescale.
"""

from __future__ import annotations

import struct

import numpy as np

F32 = np.float32


def load(path) -> tuple[dict, dict]:
    """Return (header dict, weights dict) straight from the file's bytes."""
    data = open(path, "rb").read()
    magic, = struct.unpack_from("<I", data)
    if magic == 0x616B3432:
        version, = struct.unpack_from("<i", data, 4)
        dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", data, 8)
        shared = bool(data[36])
        gs = struct.unpack_from("<i", data, 37)[0] if version == 2 else 0
        offset = 256
    else:
        version, gs = 0, 0
        dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", data)
        shared, vocab = vocab > 0, abs(vocab)
        offset = 28
    h = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq=seq,
             shared=shared, version=version, gs=gs)
    hs = dim // heads
    kv = kv_heads * hs

    def floats(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        out = np.frombuffer(data, F32, n, offset).reshape(shape)
        offset += 4 * n
        return out

    def q8(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        q = np.frombuffer(data, np.int8, n, offset).reshape(shape)
        s = np.frombuffer(data, F32, n // gs, offset + n)
        offset += n + 4 * (n // gs)
        return (q, s)

    w = {}
    mats = [("wq", dim, dim), ("wk", kv, dim), ("wv", kv, dim), ("wo", dim, dim),
            ("w1", hidden, dim), ("w2", dim, hidden), ("w3", hidden, dim)]
    if version == 0:
        w["emb"] = floats(vocab, dim)
        w["rms_att"] = floats(layers, dim)
        for name, r, c in mats[:4]:
            w[name] = floats(layers, r, c)
        w["rms_ffn"] = floats(layers, dim)
        for name, r, c in mats[4:]:
            w[name] = floats(layers, r, c)
        w["rms_final"] = floats(dim)
        floats(seq, hs // 2), floats(seq, hs // 2)
        w["cls"] = w["emb"] if shared else floats(vocab, dim)
    elif version == 1:
        w["rms_att"], w["rms_ffn"], w["rms_final"] = floats(layers, dim), floats(layers, dim), floats(dim)
        w["emb"] = floats(vocab, dim)
        for name, r, c in mats:
            w[name] = floats(layers, r, c)
        w["cls"] = w["emb"] if shared else floats(vocab, dim)
    else:
        w["rms_att"], w["rms_ffn"], w["rms_final"] = floats(layers, dim), floats(layers, dim), floats(dim)
        w["emb"] = q8(vocab, dim)
        for name, r, c in mats:
            w[name] = [q8(r, c) for _ in range(layers)]
        w["cls"] = w["emb"] if shared else q8(vocab, dim)
    assert offset == len(data), (offset, len(data))
    return h, w


def rmsnorm(x, weight):
    return (weight * (x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5))).astype(F32)


def quantize(x, gs):
    groups = x.reshape(-1, gs)
    scale = (np.abs(groups).max(axis=1) / F32(127)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = groups / scale[:, None]
    q = np.where(scale[:, None] == 0, 0, np.trunc(v.astype(np.float64) + np.copysign(0.5, v)))
    return q.astype(np.int8).reshape(x.shape), scale


def q8_matmul(wqs, x, gs):
    wq, ws = wqs
    xq, xs = quantize(x, gs)
    rows, n = wq.shape
    dots = (wq.reshape(rows, n // gs, gs).astype(np.int32) * xq.reshape(n // gs, gs).astype(np.int32)).sum(-1)
    return (dots.astype(F32) * ws.reshape(rows, n // gs) * xs[None, :]).sum(-1, dtype=F32)


class Reference:
    """reference.forward(token, pos) over a file, with its own KV cache."""

    def __init__(self, path):
        self._start(*load(path))

    @classmethod
    def from_arrays(cls, header: dict, weights: dict) -> "Reference":
        """The oracle over weights from elsewhere (load()'s keys: e.g. a GGUF file's tensors as
        the gguf package dequantizes them), computed as version 1 (float) when header says so."""
        ref = cls.__new__(cls)
        ref._start(header, weights)
        return ref

    def _start(self, header: dict, weights: dict) -> None:
        self.h, self.w = header, weights
        h = self.h
        hs = h["dim"] // h["heads"]
        kv = h["kv_heads"] * hs
        self.k_cache = np.zeros((h["layers"], h["seq"], kv), F32)
        self.v_cache = np.zeros((h["layers"], h["seq"], kv), F32)

    def matmul(self, w, x):
        if isinstance(w, tuple):
            return q8_matmul(w, x, self.h["gs"])
        return (w @ x).astype(F32)

    def forward(self, token: int, pos: int) -> np.ndarray:
        h, w = self.h, self.w
        dim, heads, kvh = h["dim"], h["heads"], h["kv_heads"]
        hs = dim // heads
        if h["version"] == 2:
            q, s = w["emb"]
            x = (q[token].astype(F32) * np.repeat(s.reshape(h["vocab"], -1)[token], h["gs"])).astype(F32)
        else:
            x = w["emb"][token].copy()
        # RoPE angles in float32 as run.c computes them: powf, then pos * freq
        freq = (F32(1) / np.power(F32(10000), np.arange(0, hs, 2, dtype=F32) / F32(hs))).astype(F32)
        angle = (F32(pos) * freq).astype(F32).astype(np.float64)
        cos, sin = np.cos(angle), np.sin(angle)

        def rotate(v):  # v (n_heads_any, hs)
            even, odd = v[:, 0::2].astype(np.float64), v[:, 1::2].astype(np.float64)
            out = np.empty_like(v)
            out[:, 0::2] = even * cos - odd * sin
            out[:, 1::2] = even * sin + odd * cos
            return out

        for l in range(h["layers"]):
            mat = (lambda name: w[name][l])
            xb = rmsnorm(x, w["rms_att"][l])
            q = rotate(self.matmul(mat("wq"), xb).reshape(heads, hs))
            k = rotate(self.matmul(mat("wk"), xb).reshape(kvh, hs))
            v = self.matmul(mat("wv"), xb)
            self.k_cache[l, pos] = k.reshape(-1)
            self.v_cache[l, pos] = v
            keys = np.repeat(self.k_cache[l, : pos + 1].reshape(pos + 1, kvh, hs), heads // kvh, axis=1)
            values = np.repeat(self.v_cache[l, : pos + 1].reshape(pos + 1, kvh, hs), heads // kvh, axis=1)
            scores = np.einsum("hd,thd->ht", q.astype(np.float64), keys) / np.sqrt(hs)
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
            attended = np.einsum("ht,thd->hd", scores, values).reshape(dim).astype(F32)
            x = (x + self.matmul(mat("wo"), attended)).astype(F32)
            xb = rmsnorm(x, w["rms_ffn"][l])
            a, b = self.matmul(mat("w1"), xb), self.matmul(mat("w3"), xb)
            hidden = (a / (1 + np.exp(-a.astype(np.float64))) * b).astype(F32)
            x = (x + self.matmul(mat("w2"), hidden)).astype(F32)
        x = rmsnorm(x, w["rms_final"])
        return self.matmul(w["cls"], x)
