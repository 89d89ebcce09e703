"""Q8_0 as llama2.c's v2 files (and runq.c) hold it: int8 values, one float32 scale per group.

A (rows, cols) matrix is rows * cols int8 values q followed by rows * cols / group_size float32
scales s, and w = s[group] * q. The group size is the file's (one per file, ModelConfig's
q8_group_size by default) and a compile-time constant of the kernels (GROUP_SIZE): each group's
dot product then has a constant trip count that LLVM unrolls completely. A kernel compiled for
one group size refuses data of another rather than computing wrong numbers, and the module's
own value (0) makes a direct, unspecialised call refuse too.

The matmul quantizes its input the same way per group (runq.c's activation quantizer: C's
round, half away from zero), multiplies int8 by int8 exactly in int32, and rescales each group's
sum in float32; with fastmath on a CPU with VNNI (VNNI, another compile-time constant) it does
the same sums in vpdpbusd instructions (kernels/simd.py). Weights are quantized with
round-half-to-even, as llama2.c's export.py (torch.round) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import prange

from ..kernels import simd
from ..kernels.common import ZERO
from ..kernels.jit import kernel
from ..kernels.simd import row_dot_q8
from .base import Format, register

Q_MAX = np.float32(127.0)
GROUP_SIZE = 0  # compile-time constant, set per family; 0: not specialised, every kernel refuses
VNNI = False  # compile-time constant: matmul_q8_0 uses simd.row_dot_q8


@dataclass(frozen=True)
class Q8_0Matrix:
    """A Q8_0 matrix's read-only views: q (rows, cols) int8, s (rows * cols // group_size,)."""

    format: "Q8_0"
    q: np.ndarray
    s: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        return self.format.dequantize(self)


class Q8_0Operand(NamedTuple):
    """What compiled code receives: the matrix and the format's scratch (shared by every Q8_0
    matrix of a model), one byte buffer holding the stamp of the input it quantized (int64),
    that input's scales (float32) and its int8 values: one array rather than three, because
    every array of every operand is unboxed again at each call from Python."""

    q: np.ndarray  # (rows, cols) int8
    s: np.ndarray  # (rows * cols // GROUP_SIZE,) float32
    scratch: np.ndarray  # (8 + 4 * G + G * GROUP_SIZE,) int8, G = block * width // GROUP_SIZE


@register
class Q8_0(Format):
    name = "q8_0"
    operand_class = Q8_0Operand
    linear_kernel = "linear_q8_0"
    embed_kernel = "embed_q8_0"

    def __init__(self, group_size: int):
        if group_size <= 0:
            raise ValueError(f"group_size: expected a positive integer, found {group_size}")
        self.group_size = group_size

    def _values(self, shape) -> int:
        n = int(np.prod(shape, dtype=np.int64))
        if shape[-1] % self.group_size:
            raise ValueError(f"shape {shape}: expected rows of a multiple of group_size {self.group_size}")
        return n

    def nbytes(self, shape):
        n = self._values(shape)
        return n + 4 * (n // self.group_size)

    def view(self, buffer, offset, shape):
        n = self._values(shape)
        q = np.ndarray(shape, np.int8, buffer=buffer, offset=offset)
        s = np.ndarray((n // self.group_size,), np.float32, buffer=buffer, offset=offset + n)
        return Q8_0Matrix(self, q, s)

    def quantize(self, array):
        """Per group, scale = max|w| / 127 and q = round(w / scale) (half to even, as
        torch.round); an all-zero group gets scale 0 and q 0 rather than NaNs."""
        array = np.asarray(array, np.float32)
        self._values(array.shape)
        groups = array.reshape(-1, self.group_size)
        scale = (np.abs(groups).max(axis=1) / Q_MAX).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.round(groups / safe[:, None]).astype(np.int8)
        return Q8_0Matrix(self, q.reshape(array.shape), scale)

    def encode(self, array):
        m = self.quantize(array)
        yield m.q
        yield m.s

    def dequantize(self, matrix):
        return (matrix.q.reshape(-1, self.group_size) * matrix.s[:, None]).reshape(matrix.q.shape)

    def constants(self, fastmath):
        return {"GROUP_SIZE": self.group_size,
                "VNNI": simd.VNNI and fastmath != "off" and simd.vnni_chunk(self.group_size) > 0}

    def kernel_description(self, fastmath="full"):
        if self.constants(fastmath)["VNNI"]:
            return "int8 x int8 in VNNI vpdpbusd on this CPU (with fastmath)"
        return "portable int8 loops (this CPU or this group size has no VNNI path)"

    def scratch(self, block, width):
        groups = block * width // self.group_size
        buffer = np.zeros(8 + 4 * groups + groups * self.group_size, np.int8)
        buffer[:8].view(np.int64)[0] = -1  # no input quantized yet
        return buffer

    def operand(self, matrix, scratch):
        if matrix.format != self:
            raise ValueError(f"operand: expected a {self!r} matrix, found {matrix.format!r}")
        return Q8_0Operand(matrix.q, matrix.s, scratch)


@kernel
def linear_q8_0(out, x, w, stamp):
    """out = x @ W.T for a Q8_0 operand w, x quantized into w's scratch unless it already holds
    this stamp's input.  out (B, d), x (B, n) float32, w: (d, n) Q8_0"""
    B, n = x.shape
    if GROUP_SIZE <= 0 or w.s.shape[0] * GROUP_SIZE != w.q.size or n % GROUP_SIZE:
        raise ValueError("linear_q8_0: the data's group size is not the one these kernels were compiled for")
    groups = n // GROUP_SIZE
    capacity = (w.scratch.shape[0] - 8) // (4 + GROUP_SIZE)  # groups the scratch holds
    if B * groups > capacity:
        raise ValueError("linear_q8_0: the input is larger than the scratch")
    held = w.scratch[:8].view(np.int64)  # (1,) the stamp of the input quantized in it
    xs = w.scratch[8:8 + 4 * B * groups].view(np.float32).reshape((B, groups))
    start = 8 + 4 * capacity
    xq = w.scratch[start:start + B * n].reshape((B, n))
    if held[0] != stamp:
        quantize_q8_0(xq, xs, x)
        held[0] = stamp
    matmul_q8_0(out, xq, xs, w.q, w.s)


@kernel
def embed_q8_0(out, table, tokens):
    """out[b] = row tokens[b] of a Q8_0 matrix, in float.  out (B, n), table: (rows, n) Q8_0"""
    q, s = table.q, table.s
    n = q.shape[1]
    if GROUP_SIZE <= 0 or s.shape[0] * GROUP_SIZE != q.size:
        raise ValueError("embed_q8_0: the data's group size is not the one these kernels were compiled for")
    for b in range(tokens.shape[0]):
        row = tokens[b]
        for j in range(n):
            out[b, j] = np.float32(q[row, j]) * s[(row * n + j) // GROUP_SIZE]


@kernel
def quantize_q8_0(xq, xs, x):
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


@kernel
def group_dot(x, w):
    """Exact int32 dot product of two int8 vectors. The int32 arithmetic is spelled out because
    Numba widens integer products to int64, which LLVM cannot turn into pmaddwd instructions."""
    acc = np.int32(0)
    for j in range(x.shape[0]):
        acc = np.int32(acc + np.int32(x[j]) * np.int32(w[j]))
    return acc


@kernel
def matmul_q8_0(out, xq, xs, wq, ws):
    """out = x @ W.T for Q8_0 W and quantized x: exact int32 dot products per group, rescaled in
    float; each weight row is read once for the whole block of tokens.
    out (B, d), xq (B, n) int8, xs (B, n // GS), wq (d, n) int8, ws (d * n // GS,)

    How fast LLVM makes a group's dot product depends on its trip count, so the loop is shaped
    by the (compile-time) group size: 64 and up, one group at a time, fully unrolled; 32 to 63,
    two groups per step with two accumulators (one at a time is several times slower, so an odd
    last group takes the next path); below 32, a loop whose trip count LLVM does not know (the
    slowest). The loops stay inline: moved into a helper function they lose half their speed.
    Figures: benchmarks/performance.md."""
    d, n = wq.shape
    groups = n // GROUP_SIZE
    if VNNI:  # the same sums in VNNI instructions, faster (see simd.py)
        # rows from the two halves of wq in turn: two streams from DRAM keep more reads in
        # flight than one
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
    for k in prange(half + d % 2):  # rows k and half + k: two streams, as above
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


