"""F32: a matrix as plain float32 values, row-major (every llama2.c v0/v1 tensor, GGUF's F32).

The view is the float32 array itself, and so is the operand compiled code receives: nothing to
quantize, no scratch. Its matmul reads the weights as they lie in the file.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..kernels import gemm, simd
from ..kernels.common import ZERO, block4x4, dot
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

    def constants(self, fastmath):
        return {"F32_GEMM": simd.F32_PANELS and fastmath != "off"}

    def kernel_description(self, fastmath="full"):
        if self.constants(fastmath)["F32_GEMM"]:
            return f"float32 multiply-adds, vectorised; prompts in {'AVX-512' if simd.AVX512 else 'AVX2'} panels (with fastmath)"
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


# Columns per pass of the block matmul: 4 weight rows and 4 tokens of this many floats (32 KB)
# stay in L1 while 16 accumulators sum over them.
N_CHUNK = 1024
F32_GEMM = False  # a compile-time constant (F32.constants): blocks of tokens by kernels/gemm.py
GEMM_TOKENS = 8  # the fewest tokens worth copying panels for


@kernel(inline=True)  # (see jit.kernel)
def matmul(out, x, w):
    """out = x @ w.T: every token's row times every weight row.  out (B, d), x (B, n), w (d, n)

    A single token (generation) is a matrix-vector product bound by memory bandwidth (matvec).
    A block of tokens (prefill) is a matrix product bound by arithmetic:
    4 weight rows x 4 tokens at a time, 16 accumulators sharing every load, over N_CHUNK columns
    at a time so that the 8 rows being read stay in L1 (figures in benchmarks/performance.md)."""
    B, n = x.shape
    d = w.shape[0]
    if B == 1:
        matvec(out[0], x[0], w)
        return
    if F32_GEMM and B >= GEMM_TOKENS and out.strides[1] == 4 and x.strides[1] == 4 and w.strides[1] == 4:
        for p in prange((d + gemm.PANEL_ROWS - 1) // gemm.PANEL_ROWS):
            gemm.f32_panels(out, x, w, p * gemm.PANEL_ROWS, min(d, (p + 1) * gemm.PANEL_ROWS))
        return
    full_b = B - B % 4
    for quad in prange(d // 4):
        i = 4 * quad
        for start in range(0, n, N_CHUNK):
            for b in range(0, full_b, 4):
                block4x4(out, x, w, i, b, start, min(start + N_CHUNK, n))
        for b in range(full_b, B):
            for r in range(4):
                out[b, i + r] = dot(x[b], w[i + r])
    for i in range(d - d % 4, d):
        for b in range(B):
            out[b, i] = dot(x[b], w[i])


@kernel
def matvec(o, x, w):
    """o = w @ x, one row from each quarter of w at a time: four sequential streams from DRAM,
    which one core's memory system serves faster than one or two, and four accumulators sharing
    each load of x (benchmarks/performance.md).  o (d,), x (n,), w (d, n)"""
    d, n = w.shape
    q = d // 4
    for k in prange(q):
        w0 = w[k]
        w1 = w[q + k]
        w2 = w[2 * q + k]
        w3 = w[3 * q + k]
        a0 = ZERO
        a1 = ZERO
        a2 = ZERO
        a3 = ZERO
        for j in range(n):
            v = x[j]
            a0 += v * w0[j]
            a1 += v * w1[j]
            a2 += v * w2[j]
            a3 += v * w3[j]
        o[k] = a0
        o[q + k] = a1
        o[2 * q + k] = a2
        o[3 * q + k] = a3
    for i in range(4 * q, d):
        o[i] = dot(x, w[i])
