"""F16 and BF16: GGUF's 16-bit float tensors (ggml types 1 and 30), read as they lie.

A (rows, cols) matrix is rows * cols uint16 values; the view is that (rows, cols) uint16 array.
Numba has no 16-bit float arithmetic, so the kernels convert each weight to float32 as they read
it, exactly: BF16 is the upper half of a float32 (`bits << 16`, bitcast); F16 moves its
exponent and mantissa into float32's fields and multiplies by 2^112, which rebiases the exponent
and turns F16's subnormals into float32 normals exactly; infinities and NaNs keep their class.
Both bitcasts vectorise, so the conversion costs a few vector instructions per 16 weights and
the matmul stays bound by memory for one token. Activations stay float32: nothing is quantized,
no scratch, and with fastmath off the results equal a float32 matmul on the dequantized weights.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from ..kernels import simd
from ..kernels.common import ZERO
from ..kernels.jit import kernel
from .base import register
from .blocks import BlockFormat, check_embed, check_linear, chunk_rows, f16_to_f32, float32_from_bits, row_chunks

I32 = np.int32
ALL = np.iinfo(np.int64).max  # no scratch to fit


class F16Operand(NamedTuple):
    w: np.ndarray  # (rows, cols) uint16


class BF16Operand(NamedTuple):
    w: np.ndarray  # (rows, cols) uint16


class _Float16Bits(BlockFormat):
    block_size = 1
    block_bytes = 2
    storage = np.dtype(np.uint16)

    def kernel_description(self, fastmath="full"):
        return f"{self.name} weights converted to float32 as they are read, float32 multiply-adds"


@register
class F16(_Float16Bits):
    name = "f16"
    ggml_type = 1
    operand_class = F16Operand
    linear_kernel = "linear_f16"
    embed_kernel = "embed_f16"

    def constants(self, fastmath):
        """F16C: the half-to-float conversion in the CPU's instruction, where it has one."""
        return {"F16C": simd.F16C}

    def _quantize_blocks(self, blocks):
        """IEEE round to nearest even, as llama.cpp's conversion (NumPy's astype)."""
        return blocks.astype(np.float16).view(np.uint8)

    def _dequantize_blocks(self, blocks):
        return blocks.view(np.float16).astype(np.float32)


@register
class BF16(_Float16Bits):
    name = "bf16"
    ggml_type = 30
    operand_class = BF16Operand
    linear_kernel = "linear_bf16"
    embed_kernel = "embed_bf16"

    def _quantize_blocks(self, blocks):
        """llama.cpp's ggml_compute_fp32_to_bf16: the upper 16 bits rounded to nearest even;
        NaNs stay NaNs (made quiet) instead of rounding into infinities."""
        n = blocks.view(np.uint32).astype(np.uint64)
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        rounded = (n + 0x7FFF + ((n >> 16) & 1)) >> 16
        quiet = (n >> 16) | 0x40
        return np.where(nan, quiet, rounded).astype(np.uint16).view(np.uint8)

    def _dequantize_blocks(self, blocks):
        return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


@kernel
def bf16_to_f32(h):
    """The float32 whose upper half is the bfloat16 with bits h (an integer below 2^16)."""
    return float32_from_bits(I32(h) << I32(16))


@kernel
def to_f32(h, bf16):
    """bf16_to_f32(h) if bf16 else f16_to_f32(h). The kernels below take `bf16` as an argument
    (a function could not be: a compiled kernel that receives one cannot be cached); it is
    constant in every loop, which LLVM takes out of the loop (two loops, each vectorised)."""
    return bf16_to_f32(h) if bf16 else f16_to_f32(h)


@kernel
def linear_f16(out, x, w, stamp):
    """out = x @ W.T for F16 W.  out (B, d), x (B, n) float32, w: (d, n) F16; stamp unused"""
    check_linear(out, x, w.w, 1, 1, ALL)
    matmul_16bit(out, x, w.w, False)


@kernel
def linear_bf16(out, x, w, stamp):
    """out = x @ W.T for BF16 W.  out (B, d), x (B, n) float32, w: (d, n) BF16; stamp unused"""
    check_linear(out, x, w.w, 1, 1, ALL)
    matmul_16bit(out, x, w.w, True)


@kernel
def embed_f16(out, table, tokens):
    """out[b] = row tokens[b] of an F16 table, in float32.  out (B, n), table: (rows, n) F16"""
    embed_16bit(out, table.w, tokens, False)


@kernel
def embed_bf16(out, table, tokens):
    """out[b] = row tokens[b] of a BF16 table, in float32.  out (B, n), table: (rows, n) BF16"""
    embed_16bit(out, table.w, tokens, True)


@kernel
def embed_16bit(out, w, tokens, bf16):
    """out[b] = row tokens[b] of w as float32.  out (B, n), w (rows, n) uint16 (BF16 if bf16,
    else F16), tokens (B,)"""
    check_embed(out, w.shape[0], w.shape[1], tokens)
    for b in range(tokens.shape[0]):
        row = w[tokens[b]]
        for j in range(out.shape[1]):
            out[b, j] = to_f32(row[j], bf16)


@kernel
def matmul_16bit(out, x, w, bf16):
    """out = x @ w.T, each weight converted to float32 as it is read.  out (B, d), x (B, n),
    w (d, n) uint16 (BF16 if bf16, else F16)

    Rows in the block formats' ranges (blocks.chunk_rows: one input takes rows from both
    halves of w in turn, two streams from DRAM); each converted weight serves up to four
    inputs."""
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        for k in range(k0, k1):
            for r in range(1 + (pair > 0)):
                i = k + r * pair
                row = w[i]
                for b in range(0, B - B % 4, 4):
                    rows_16bit(out, x, row, i, b, bf16)
                for b in range(B - B % 4, B):
                    out[b, i] = dot_16bit(x[b], row, bf16)


@kernel
def rows_16bit(out, x, row, i, b, bf16):
    """out[b:b + 4, i] = x[b:b + 4] @ row, each weight converted once for the four.
    out (B, d), x (B, n), row (n,) uint16"""
    x0 = x[b]
    x1 = x[b + 1]
    x2 = x[b + 2]
    x3 = x[b + 3]
    a0 = ZERO
    a1 = ZERO
    a2 = ZERO
    a3 = ZERO
    for j in range(row.shape[0]):
        u = to_f32(row[j], bf16)
        a0 += u * x0[j]
        a1 += u * x1[j]
        a2 += u * x2[j]
        a3 += u * x3[j]
    out[b, i] = a0
    out[b + 1, i] = a1
    out[b + 2, i] = a2
    out[b + 3, i] = a3


@kernel
def dot_16bit(x, w, bf16):
    """x · w in float32.  x (n,) float32, w (n,) uint16 (BF16 if bf16, else F16)"""
    acc = ZERO
    for j in range(x.shape[0]):
        acc += x[j] * to_f32(w[j], bf16)
    return acc
