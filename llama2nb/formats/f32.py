"""F32: a matrix as plain float32 values, row-major (every llama2.c v0/v1 tensor, GGUF's F32).

The view is the float32 array itself, and so is the operand compiled code receives: nothing to
quantize, no scratch. Its matmul reads the weights as they lie in the file.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..kernels.common import ZERO, dot
from ..kernels.jit import kernel
from .base import Format, register


@register
class F32(Format):
    name = "f32"
    ggml_type = 0
    block_size = 1  # values per block
    block_bytes = 4  # bytes per block
    operand_class = None
    linear_kernel = "linear_f32"
    embed_kernel = "embed_f32"

    def nbytes(self, shape):
        return 4 * int(np.prod(shape, dtype=np.int64))

    def view(self, buffer, offset, shape):
        return np.ndarray(shape, np.float32, buffer=buffer, offset=offset)

    def encode(self, array):
        yield np.ascontiguousarray(array, np.float32)

    def quantize(self, array):
        return np.ascontiguousarray(array, np.float32)

    def dequantize(self, matrix):
        return np.asarray(matrix, np.float32)

    def operand(self, matrix, scratch):
        return matrix

    def kernel_description(self, fastmath="full"):
        return "float32 multiply-adds, vectorised with fastmath"


@kernel
def linear_f32(out, x, w, stamp):
    """out = x @ w.T.  out (B, d), x (B, n), w (d, n) float32; stamp unused"""
    matmul(out, x, w)


@kernel
def embed_f32(out, table, tokens):
    """out[b] = table[tokens[b]].  out (B, n), table (rows, n), tokens (B,)"""
    for b in range(tokens.shape[0]):
        row = table[tokens[b]]
        for j in range(out.shape[1]):
            out[b, j] = row[j]


@kernel
def matmul(out, x, w):
    """out = x @ w.T: every token's row times every weight row.  out (B, d), x (B, n), w (d, n)

    For a block of tokens, 2 weight rows x 4 tokens at a time: 8 accumulators share each load,
    so the block runs compute-bound instead of load-bound. A single token (generation) is a
    matrix-vector product bound by memory bandwidth; it takes its rows from the two halves of w
    in turn, two streams from DRAM, which the memory system serves faster than one (figures in
    benchmarks/performance.md)."""
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
