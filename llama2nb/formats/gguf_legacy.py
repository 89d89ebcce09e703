"""GGUF's 32-value block types: Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 (ggml types 8, 2, 3, 6, 7).

Every block holds 32 values and starts with an fp16 scale d; the values are stored as integers q:

    Q8_0  34 bytes: d, int8 q[32]                       w = d * q
    Q4_0  18 bytes: d, nibbles[16]                      w = d * (q - 8)
    Q4_1  20 bytes: d, m, nibbles[16]                   w = d * q + m
    Q5_0  22 bytes: d, qh (uint32), nibbles[16]         w = d * (q - 16)
    Q5_1  24 bytes: d, m, qh (uint32), nibbles[16]      w = d * q + m

Nibble byte j holds value j (low four bits) and value j + 16 (high four bits); bit j of qh is
the fifth bit of value j. GGUF's Q8_0 is not llama2.c's v2 Q8_0 (q8_0.py: int8 values and fp32
scales apart, any group size), hence its name here, `q8_0_block`.

The matmul follows llama.cpp: its input x is quantized per 32 values to int8 (d_x = max|x| /
127, q = round(x / d_x), half away from zero; d_x stays float32 where llama.cpp rounds it to
fp16), with each block's sum of q for the offset and min terms, once per input for every format
here (one scratch_key): a block's contribution is d_x * (d * sum(q * x_q) + m * sum(x_q)), m
being -8 d, -16 d, the block's min, or 0. Those sums are exact in int32. The portable loops
compute them per block; on a CPU with AVX-512 VNNI, with fastmath, vnni_gguf.py's intrinsics do
(vpdpbusd on the weights' nibbles as they lie, several tokens per decoded weight row), for which
the input quantizer also writes the layout they read (see quantize_q8_32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import prange

from ..kernels import vnni_gguf
from ..kernels.common import ONE, ZERO
from ..kernels.jit import kernel
from .base import register
from .blocks import QuantizedFormat, check_embed, check_linear, chunk_rows, half_float, row_chunks

I32 = np.int32
QK = 32  # values per block
VNNI512 = False  # compile-time constant: the AVX-512 VNNI paths (blocks.QuantizedFormat.constants)
TILES = False  # compile-time constant: the 16-row tiles' intrinsics run (interleaved._Tiles.constants)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf, elementwise in float32 (floor(|v| + 0.5) would round 0.49999997 up)."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + (a - whole >= 0.5))


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """(N,) float32 -> (N, 2) uint8: fp16, rounded to nearest even."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def fp16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(N, 1) float32 from the fp16 at byte `offset` of every block."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


class _Legacy(QuantizedFormat):
    block_size = QK
    activations = "int8 per 32 values (llama.cpp's Q8_0 activations)"
    unit = "blocks"
    qs: int  # byte offset of the values (nibbles, or int8 for Q8_0)
    qh: int | None = None  # byte offset of the fifth bits
    m: int | None = None  # byte offset of the min
    zero: int = 0  # the offset subtracted from q (formats without a min)
    levels: int = 16  # distinct q

    def scratch(self, block, width):
        values, blocks = block * width, block * width // QK
        return (np.zeros(values, np.int8), np.zeros(blocks, np.float32), np.zeros(blocks, np.int32),
                np.zeros(values, np.uint8), np.zeros(values, np.int8), np.zeros(blocks, np.float32),
                np.zeros(blocks, np.int32), np.full(1, -1, np.int64))

    def values(self, blocks: np.ndarray) -> np.ndarray:
        """(N, block_bytes) uint8 -> (N, 32) int32: the stored q of every value."""
        if self.levels == 256:
            return blocks[:, self.qs:].view(np.int8).astype(np.int32)
        nibbles = blocks[:, self.qs:self.qs + 16].astype(np.int32)
        q = np.concatenate([nibbles & 15, nibbles >> 4], axis=1)
        if self.qh is not None:
            high = np.ascontiguousarray(blocks[:, self.qh:self.qh + 4]).view(np.uint32).astype(np.int64)
            q |= (((high >> np.arange(32)) & 1) << 4).astype(np.int32)
        return q

    def _dequantize_blocks(self, blocks):
        d, q = fp16_field(blocks, 0), self.values(blocks)
        if self.m is not None:
            return d * q.astype(np.float32) + fp16_field(blocks, self.m)
        return d * (q - self.zero).astype(np.float32)

    def _quantize_blocks(self, blocks):
        """llama.cpp's reference quantizers (quantize_row_*_ref), operation for operation."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.levels == 256:  # Q8_0: d = max|x| / 127, q = roundf(x / d)
                d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
                inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
                q = round_half_away(blocks * inverse).astype(np.int8).view(np.uint8)
                return np.concatenate([fp16_bytes(d), q], axis=1)
            top = self.levels - 1
            if self.m is not None:  # d = (max - min) / top, q = (x - min) / d
                low = blocks.min(axis=1, keepdims=True)
                d = (blocks.max(axis=1, keepdims=True) - low) / np.float32(top)
                inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
                q = np.trunc((blocks - low) * inverse + np.float32(0.5))
            else:  # d = -(the value of largest magnitude) / zero, q = x / d + zero
                peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
                d = peak / np.float32(-self.zero)
                inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
                q = np.trunc(blocks * inverse + np.float32(self.zero + 0.5))
        q = np.clip(q, 0, top).astype(np.uint8)
        fields = [fp16_bytes(d)]
        if self.m is not None:
            fields.append(fp16_bytes(low))
        if self.qh is not None:
            fields.append(np.packbits(q >> 4, axis=1, bitorder="little"))
        fields.append((q[:, :16] & 15) | (q[:, 16:] << 4))
        return np.concatenate(fields, axis=1)


class LegacyOperand(NamedTuple):
    """What compiled code receives (one class per format, below, for dispatch): the matrix and
    the shared scratch: the quantized input and the stamp it belongs to."""

    w: np.ndarray  # (rows, cols / 32 * block_bytes) uint8
    xq: np.ndarray  # (block * width,) int8
    xd: np.ndarray  # (block * width / 32,) float32 scales
    xsum: np.ndarray  # (block * width / 32,) int32 sums of xq
    xu: np.ndarray  # (block * width,) uint8: xq + 128 in the VNNI order (quantize_q8_32)
    xs: np.ndarray  # (block * width,) int8: xq in the VNNI order
    xds: np.ndarray  # (block * width / 32,) float32: xd * xsum
    x8: np.ndarray  # (block * width / 32,) int32: -8 * xsum
    stamp: np.ndarray  # (1,) int64


class Q8_0BlockOperand(LegacyOperand):
    pass


class Q4_0Operand(LegacyOperand):
    pass


class Q4_1Operand(LegacyOperand):
    pass


class Q5_0Operand(LegacyOperand):
    pass


class Q5_1Operand(LegacyOperand):
    pass


@register
class Q8_0Block(_Legacy):
    name = "q8_0_block"
    ggml_type = 8
    block_bytes = 34
    qs = 2
    levels = 256
    operand_class = Q8_0BlockOperand
    linear_kernel = "linear_q8_0_block"
    embed_kernel = "embed_q8_0_block"


@register
class Q4_0(_Legacy):
    name = "q4_0"
    ggml_type = 2
    block_bytes = 18
    qs = 2
    zero = 8
    operand_class = Q4_0Operand
    linear_kernel = "linear_q4_0"
    embed_kernel = "embed_q4_0"


@register
class Q4_1(_Legacy):
    name = "q4_1"
    ggml_type = 3
    block_bytes = 20
    m = 2
    qs = 4
    operand_class = Q4_1Operand
    linear_kernel = "linear_q4_1"
    embed_kernel = "embed_q4_1"


@register
class Q5_0(_Legacy):
    name = "q5_0"
    ggml_type = 6
    block_bytes = 22
    qh = 2
    qs = 6
    zero = 16
    levels = 32
    operand_class = Q5_0Operand
    linear_kernel = "linear_q5_0"
    embed_kernel = "embed_q5_0"


@register
class Q5_1(_Legacy):
    name = "q5_1"
    ggml_type = 7
    block_bytes = 24
    m = 2
    qh = 4
    qs = 8
    levels = 32
    operand_class = Q5_1Operand
    linear_kernel = "linear_q5_1"
    embed_kernel = "embed_q5_1"


# ----------------------------------------------------------------------------------------------
# The input: int8 per 32 values, once per stamp


@kernel(inline=True)  # (see jit.kernel)
def q8_32_input(out, x, w, xq, xd, xsum, xu, xs, xds, x8, last, stamp, size):
    """Check the shapes (blocks.check_linear), quantize x into the scratch unless it holds this
    stamp's input already (`last`: the stamp it holds), and return the views the row kernels
    read: (xq (B, n), xd (B, n/32), xsum (B, n/32), xu (B, n), xs (B, n), xds (B, n/32),
    x8 (B, n/32)).
    out (B, d), x (B, n) float32, w (d, n / 32 * size) uint8, the scratch's arrays flat
    (LegacyOperand's fields: passing the operand would compile this once per format)"""
    check_linear(out, x, w, QK, size, xq.size)
    return q8_32_quantized(x, xq, xd, xsum, xu, xs, xds, x8, last, stamp)


@kernel(inline=True)  # (see jit.kernel)
def q8_32_quantized(x, xq, xd, xsum, xu, xs, xds, x8, last, stamp):
    """q8_32_input after its shape check (x's B * n values fit the scratch: the caller checked)."""
    B, n = x.shape
    blocks = n // QK
    views = (xq[:B * n].reshape((B, n)), xd[:B * blocks].reshape((B, blocks)),
             xsum[:B * blocks].reshape((B, blocks)), xu[:B * n].reshape((B, n)), xs[:B * n].reshape((B, n)),
             xds[:B * blocks].reshape((B, blocks)), x8[:B * blocks].reshape((B, blocks)))
    if last[0] != stamp:
        quantize_q8_32(x, *views)
        last[0] = stamp
    return views


@kernel
def quantize_q8_32(x, xq, xd, xsum, xu, xs, xds, x8):
    """Per block of 32: xd = max|x| / 127, xq = round(x * (1 / xd)) (llama.cpp's
    quantize_row_q8_0: C's roundf, half away from zero; an all-zero block gets 0s), xsum = the
    sum of xq. With VNNI512 (or TILES), also what the intrinsics read: xds = xd * xsum, x8 = -8 * xsum
    (Q4_0's offset term, which one input's pass starts from), and xs = xq and
    xu = xq + 128 with each pair of blocks a, b (64 values) in their order (kernels/vnni_gguf.py):
    4-byte lanes alternating a, b, lane 2m holding a's values 4m..4m+3 for m < 4 and
    16 + 4(m - 4).. for m >= 4; an odd last block keeps its own order.
    x, xq, xu, xs (B, n); xd, xsum, xds, x8 (B, n / 32)"""
    B, n = x.shape
    blocks = n // QK
    for b in range(B):
        for k in range(blocks):
            group = x[b, k * QK:(k + 1) * QK]
            amax = ZERO
            for j in range(QK):
                amax = max(amax, abs(group[j]))
            d = amax / np.float32(127)
            inverse = ONE / d if d != ZERO else ZERO
            total = 0
            for j in range(QK):
                v = group[j] * inverse
                r = math.floor(abs(v) + 0.5)  # in float64: exact for a float32 v
                q = r if v >= 0 else -r
                xq[b, k * QK + j] = np.int8(q)
                total += int(q)
            xd[b, k] = d
            xsum[b, k] = total
        if VNNI512 or TILES:
            for k in range(blocks):
                xds[b, k] = xd[b, k] * np.float32(xsum[b, k])
                x8[b, k] = -8 * xsum[b, k]
                alone = k + 1 == blocks and k % 2 == 0  # an odd last block: its own order
                for j in range(QK):
                    at = j if alone else 4 * (8 * (j // 16) + 2 * (j % 16 // 4) + k % 2) + j % 4
                    xs[b, k // 2 * 64 + at] = xq[b, k * QK + j]
                    xu[b, k // 2 * 64 + at] = np.uint8(I32(xq[b, k * QK + j]) + I32(128))


# ----------------------------------------------------------------------------------------------
# The matmuls: x quantized once per stamp, then the rows in ranges (blocks.chunk_rows), each by
# the format's VNNI intrinsic or the portable loops


@kernel
def linear_q8_0_block(out, x, w, stamp):
    """out = x @ W.T for GGUF Q8_0 W.  out (B, d), x (B, n) float32, w: (d, n) Q8_0 blocks"""
    xq, xd, xsum, xu, xs, xds, x8 = q8_32_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp, stamp,
                                                34)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q8_0(out, w.w, xu, xs, xd, x8, xds, k0, k1, pair)
        else:
            rows_legacy(out, w.w, xq, xd, xsum, k0, k1, pair, 34)


@kernel
def linear_q4_0(out, x, w, stamp):
    """out = x @ W.T for Q4_0 W.  out (B, d), x (B, n) float32, w: (d, n) Q4_0"""
    xq, xd, xsum, xu, xs, xds, x8 = q8_32_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp, stamp,
                                                18)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q4_0(out, w.w, xu, xs, xd, x8, xds, k0, k1, pair)
        else:
            rows_legacy(out, w.w, xq, xd, xsum, k0, k1, pair, 18)


@kernel
def linear_q4_1(out, x, w, stamp):
    """out = x @ W.T for Q4_1 W.  out (B, d), x (B, n) float32, w: (d, n) Q4_1"""
    xq, xd, xsum, xu, xs, xds, x8 = q8_32_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp, stamp,
                                                20)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q4_1(out, w.w, xu, xs, xd, x8, xds, k0, k1, pair)
        else:
            rows_legacy(out, w.w, xq, xd, xsum, k0, k1, pair, 20)


@kernel
def linear_q5_0(out, x, w, stamp):
    """out = x @ W.T for Q5_0 W.  out (B, d), x (B, n) float32, w: (d, n) Q5_0"""
    xq, xd, xsum, xu, xs, xds, x8 = q8_32_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp, stamp,
                                                22)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q5_0(out, w.w, xu, xs, xd, x8, xds, k0, k1, pair)
        else:
            rows_legacy(out, w.w, xq, xd, xsum, k0, k1, pair, 22)


@kernel
def linear_q5_1(out, x, w, stamp):
    """out = x @ W.T for Q5_1 W.  out (B, d), x (B, n) float32, w: (d, n) Q5_1"""
    xq, xd, xsum, xu, xs, xds, x8 = q8_32_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp, stamp,
                                                24)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q5_1(out, w.w, xu, xs, xd, x8, xds, k0, k1, pair)
        else:
            rows_legacy(out, w.w, xq, xd, xsum, k0, k1, pair, 24)


@kernel
def rows_legacy(out, w, xq, xd, xsum, k0, k1, pair, size):
    """out[b, i] = row i of w . x_b for every input b, rows i = k0..k1-1 (and i + pair when
    pair > 0), in portable loops: each block's exact int32 sum(q * x), then x's scale times d
    (and m times the sum of x) in float. `size` (bytes a block) names the format.
    out (B, d), w (d, n / 32 * size) uint8, xq (B, n) int8, xd, xsum (B, n / 32)

    The loops over a block's values have a trip count LLVM cannot see (16 or 32 computed from
    the shapes): it vectorises them then, where it unrolls a constant 16 into scalar code."""
    blocks = xd.shape[1]
    sixteen = xq.shape[1] // blocks // 2
    for k in range(k0, k1):
        for r in range(1 + (pair > 0)):
            row = w[k + r * pair]
            for b in range(out.shape[0]):
                acc = ZERO
                for g in range(blocks):
                    blk = row[g * size:(g + 1) * size]
                    x = xq[b, g * QK:(g + 1) * QK]
                    d = half_float(blk[0], blk[1])
                    dot = I32(0)
                    if size == 34:  # Q8_0: int8 values
                        q = blk[2:34]
                        for j in range(2 * sixteen):
                            v = I32(q[j])
                            dot = I32(dot + (v - ((v & I32(128)) << I32(1))) * I32(x[j]))
                        m = ZERO
                    else:
                        at = size - 16  # the nibbles are the last 16 bytes
                        q = blk[at:size]
                        low = x[0:16]
                        high = x[16:32]
                        for j in range(sixteen):
                            byte = I32(q[j])
                            dot = I32(dot + (byte & I32(15)) * I32(low[j]) + (byte >> I32(4)) * I32(high[j]))
                        if size == 22 or size == 24:  # Q5_0, Q5_1: fifth bits before the nibbles
                            bits = (I32(blk[at - 4]) | I32(blk[at - 3]) << I32(8)
                                    | I32(blk[at - 2]) << I32(16) | I32(blk[at - 1]) << I32(24))
                            fifth = I32(0)
                            for j in range(2 * sixteen):
                                fifth = I32(fifth + ((bits >> I32(j)) & I32(1)) * I32(x[j]))
                            dot = I32(dot + (fifth << I32(4)))
                        if size == 20 or size == 24:  # Q4_1, Q5_1: a min
                            m = half_float(blk[2], blk[3])
                        else:  # Q4_0, Q5_0: q - 8, q - 16
                            m = np.float32(-8 if size == 18 else -16) * d
                    acc += xd[b, g] * (d * np.float32(dot) + m * np.float32(xsum[b, g]))
                out[b, k + r * pair] = acc


# ----------------------------------------------------------------------------------------------
# Embedding: rows of the table decoded to float32, as dequantize does


@kernel
def embed_q8_0_block(out, table, tokens):
    """out[b] = row tokens[b] of a Q8_0 table.  out (B, n), table: (rows, n) Q8_0 blocks"""
    embed_legacy(out, table.w, tokens, 34, 2, -1, -1, 0, 256)


@kernel
def embed_q4_0(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_0 table.  out (B, n), table: (rows, n) Q4_0"""
    embed_legacy(out, table.w, tokens, 18, 2, -1, -1, 8, 16)


@kernel
def embed_q4_1(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_1 table.  out (B, n), table: (rows, n) Q4_1"""
    embed_legacy(out, table.w, tokens, 20, 4, -1, 2, 0, 16)


@kernel
def embed_q5_0(out, table, tokens):
    """out[b] = row tokens[b] of a Q5_0 table.  out (B, n), table: (rows, n) Q5_0"""
    embed_legacy(out, table.w, tokens, 22, 6, 2, -1, 16, 32)


@kernel
def embed_q5_1(out, table, tokens):
    """out[b] = row tokens[b] of a Q5_1 table.  out (B, n), table: (rows, n) Q5_1"""
    embed_legacy(out, table.w, tokens, 24, 8, 4, 2, 0, 32)


@kernel
def embed_legacy(out, w, tokens, size, qs, qh, m, zero, levels):
    """out[b] = the values of row tokens[b], block by block: d * (q - zero), or d * q + m where
    the block has a min (at byte m; -1: none). q: int8 at byte qs (levels 256), or nibbles at qs
    with fifth bits at byte qh (-1: none).  out (B, n), w (rows, n / 32 * size) uint8"""
    check_embed(out, w.shape[0], w.shape[1] // size * QK, tokens)
    for b in range(tokens.shape[0]):
        row = w[tokens[b]]
        for k in range(row.shape[0] // size):
            blk = row[k * size:(k + 1) * size]
            y = out[b, k * QK:(k + 1) * QK]
            d = half_float(blk[0], blk[1])
            high = 0
            if qh >= 0:
                for at in range(4):
                    high |= int(blk[qh + at]) << (8 * at)
            for j in range(QK):
                if levels == 256:
                    v = I32(blk[qs + j])
                    q = v - ((v & I32(128)) << I32(1))
                else:
                    q = I32(blk[qs + j % 16]) >> I32(4 * (j // 16)) & I32(15) | I32((high >> j) & 1) << I32(4)
                if m >= 0:
                    y[j] = d * np.float32(q) + half_float(blk[m], blk[m + 1])
                else:
                    y[j] = d * np.float32(q - zero)
