"""GGUF's K-quants: Q4_K, Q5_K and Q6_K (ggml types 12, 13, 14), super-blocks of 256 values.

    Q4_K 144 bytes: fp16 d, fp16 dmin, scales[12], nibbles[128]
    Q5_K 176 bytes: fp16 d, fp16 dmin, scales[12], qh[32], nibbles[128]
    Q6_K 210 bytes: ql[128], qh[64], int8 scales[16], fp16 d

Q4_K/Q5_K: 8 sub-blocks of 32 values with 6-bit scales sc_j and mins m_j packed in 12 bytes;
w = d * sc_j * q - dmin * m_j. Nibble byte l of the j-th 32 bytes holds value 64j + l (low) and
64j + 32 + l (high); bit 2j of qh[l] is the fifth bit of value 64j + l, bit 2j + 1 of value
64j + 32 + l. Q6_K: 16 sub-blocks of 16 with int8 scales; w = d * sc * (q - 32), q of 6 bits,
its low four in ql, its upper two in qh (llama.cpp's dequantize_row_q6_K gives the order).

The matmul follows llama.cpp: its input is quantized per 256 values to int8 (Q8_K: one float32
scale d_x = max|x| / 127 per super-block, q = round(x / d_x) half away from zero, llama.cpp's
sign quirk left out) with the sums of every 16 q, once per input for all three formats (one
scratch_key). A super-block's contribution is d_x * (d * sum_j sc_j * (q_j . x_j) - dmin *
sum_j m_j * sum(x_j)) (Q6_K: d * sum_j sc_j * ((q_j - 32) . x_j)), every sum exact in int32.
The portable loops compute them per super-block; on a CPU with AVX-512 VNNI, with fastmath,
kernels/vnni_gguf.py's intrinsics do, reading the blocks as they lie.

llama2nb reads these types; it does not write them (quantize raises NotImplementedError).
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
from .gguf_legacy import fp16_field

I32 = np.int32
QK_K = 256  # values per super-block
VNNI512 = False  # compile-time constant: the AVX-512 VNNI paths (blocks.QuantizedFormat.constants)


def scales_and_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 12) uint8 packed 6-bit values -> (N, 8) scales, (N, 8) mins, as int32."""
    s = scales.astype(np.int32)
    low, mid, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([low & 63, (top & 15) | ((low >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


class _KQuant(QuantizedFormat):
    block_size = QK_K
    activations = "int8 per 256 values with sums per 16 (llama.cpp's Q8_K activations)"
    unit = "super-blocks"

    def scratch(self, block, width):
        values = block * width
        return (np.zeros(values, np.int8), np.zeros(values // QK_K, np.float32), np.zeros(values // 16, np.int16),
                np.zeros(values, np.uint8), np.full(1, -1, np.int64))


class _Q45K(_KQuant):
    qs: int  # byte offset of the nibbles
    qh: int | None = None  # byte offset of the fifth bits

    def values(self, blocks: np.ndarray) -> np.ndarray:
        """(N, block_bytes) uint8 -> (N, 256) int32: the stored q."""
        nibbles = blocks[:, self.qs:self.qs + 128].reshape(-1, 4, 1, 32).astype(np.int32)
        q = (nibbles >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 15  # (N, 4 pieces, low/high, 32)
        if self.qh is not None:
            bits = blocks[:, self.qh:self.qh + 32].astype(np.int32).reshape(-1, 1, 1, 32)
            q |= ((bits >> np.arange(8).reshape(1, 4, 2, 1)) & 1) << 4
        return q.reshape(-1, QK_K)

    def _dequantize_blocks(self, blocks):
        sc, mn = scales_and_mins(blocks[:, 4:16])
        scale = (fp16_field(blocks, 0) * sc.astype(np.float32))[:, :, None]  # d * sc_j, as llama.cpp
        offset = (fp16_field(blocks, 2) * mn.astype(np.float32))[:, :, None]
        q = self.values(blocks).reshape(-1, 8, 32).astype(np.float32)
        return (scale * q - offset).reshape(-1, QK_K)


class KQuantOperand(NamedTuple):
    """What compiled code receives (one class per format, below, for dispatch): the matrix and
    the shared scratch: the quantized input and the stamp it belongs to."""

    w: np.ndarray  # (rows, cols / 256 * block_bytes) uint8
    xq: np.ndarray  # (block * width,) int8
    xd: np.ndarray  # (block * width / 256,) float32 scales
    xsum: np.ndarray  # (block * width / 16,) int16 sums of every 16 xq
    xu: np.ndarray  # (block * width,) uint8: xq + 128 (the VNNI Q6_K rows read it)
    stamp: np.ndarray  # (1,) int64


class Q4_KOperand(KQuantOperand):
    pass


class Q5_KOperand(KQuantOperand):
    pass


class Q6_KOperand(KQuantOperand):
    pass


@register
class Q4_K(_Q45K):
    name = "q4_k"
    ggml_type = 12
    block_bytes = 144
    qs = 16
    operand_class = Q4_KOperand
    linear_kernel = "linear_q4_k"
    embed_kernel = "embed_q4_k"


@register
class Q5_K(_Q45K):
    name = "q5_k"
    ggml_type = 13
    block_bytes = 176
    qs = 48
    qh = 16
    operand_class = Q5_KOperand
    linear_kernel = "linear_q5_k"
    embed_kernel = "embed_q5_k"


@register
class Q6_K(_KQuant):
    name = "q6_k"
    ggml_type = 14
    block_bytes = 210
    operand_class = Q6_KOperand
    linear_kernel = "linear_q6_k"
    embed_kernel = "embed_q6_k"

    def values(self, blocks: np.ndarray) -> np.ndarray:
        """(N, 210) uint8 -> (N, 256) int32: the stored q (0..63)."""
        ql = blocks[:, :128].reshape(-1, 2, 1, 64).astype(np.int32)
        low = ((ql >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(-1, 2, 4, 32)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32).astype(np.int32)
        high = (qh >> np.array([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3
        return (low | (high << 4)).reshape(-1, QK_K)

    def _dequantize_blocks(self, blocks):
        scale = fp16_field(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # d * sc, as llama.cpp
        q = (self.values(blocks) - 32).reshape(-1, 16, 16).astype(np.float32)
        return (scale[:, :, None] * q).reshape(-1, QK_K)


# ----------------------------------------------------------------------------------------------
# The input: int8 per 256 values with sums per 16, once per stamp


@kernel(inline=True)  # (see jit.kernel)
def q8_k_input(out, x, w, xq, xd, xsum, xu, last, stamp, size):
    """Check the shapes (blocks.check_linear), quantize x into the scratch unless it holds this
    stamp's input already (`last`: the stamp it holds), and return the views the row kernels
    read: (xq (B, n), xd (B, n/256), xsum (B, n/16), xu (B, n)).  out (B, d), x (B, n)
    float32, w (d, n / 256 * size) uint8, the scratch's arrays flat (KQuantOperand's fields:
    passing the operand would compile this once per format)"""
    check_linear(out, x, w, QK_K, size, xq.size)
    return q8_k_quantized(x, xq, xd, xsum, xu, last, stamp)


@kernel(inline=True)  # (see jit.kernel)
def q8_k_quantized(x, xq, xd, xsum, xu, last, stamp):
    """q8_k_input after its shape check (x's B * n values fit the scratch: the caller checked)."""
    B, n = x.shape
    views = (xq[:B * n].reshape((B, n)), xd[:B * (n // QK_K)].reshape((B, n // QK_K)),
             xsum[:B * (n // 16)].reshape((B, n // 16)), xu[:B * n].reshape((B, n)))
    if last[0] != stamp:
        quantize_q8_k(x, *views)
        last[0] = stamp
    return views


@kernel
def quantize_q8_k(x, xq, xd, xsum, xu):
    """Per 256 values: xd = max|x| / 127, xq = round(x * (1 / xd)) (C's roundf, half away from
    zero; an all-zero super-block gets 0s); xsum the sum of every 16 xq; with VNNI512 also
    xu = xq + 128.  x, xq, xu (B, n); xd (B, n / 256); xsum (B, n / 16)"""
    B, n = x.shape
    for b in range(B):
        for k in range(n // QK_K):
            group = x[b, k * QK_K:(k + 1) * QK_K]
            amax = ZERO
            for j in range(QK_K):
                amax = max(amax, abs(group[j]))
            d = amax / np.float32(127)
            inverse = ONE / d if d != ZERO else ZERO
            xd[b, k] = d
            for g in range(16):
                total = 0
                for j in range(16 * g, 16 * g + 16):
                    v = group[j] * inverse
                    r = min(math.floor(abs(v) + 0.5), 127.0)  # in float64: exact for a float32 v
                    q = r if v >= 0 else -r
                    xq[b, k * QK_K + j] = np.int8(q)
                    total += int(q)
                xsum[b, k * 16 + g] = total
        if VNNI512:
            for j in range(n):
                xu[b, j] = np.uint8(I32(xq[b, j]) + I32(128))


# ----------------------------------------------------------------------------------------------
# The matmuls: x quantized once per stamp, then the rows in ranges (blocks.chunk_rows), each by
# the format's VNNI intrinsic or the portable loops


@kernel
def linear_q4_k(out, x, w, stamp):
    """out = x @ W.T for Q4_K W.  out (B, d), x (B, n) float32, w: (d, n) Q4_K"""
    xq, xd, xsum, xu = q8_k_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.stamp, stamp, 144)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q4_k(out, w.w, xq, xd, xsum, k0, k1, pair)
        else:
            rows_kquant(out, w.w, xq, xd, xsum, k0, k1, pair, 144)


@kernel
def linear_q5_k(out, x, w, stamp):
    """out = x @ W.T for Q5_K W.  out (B, d), x (B, n) float32, w: (d, n) Q5_K"""
    xq, xd, xsum, xu = q8_k_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.stamp, stamp, 176)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q5_k(out, w.w, xq, xd, xsum, k0, k1, pair)
        else:
            rows_kquant(out, w.w, xq, xd, xsum, k0, k1, pair, 176)


@kernel
def linear_q6_k(out, x, w, stamp):
    """out = x @ W.T for Q6_K W.  out (B, d), x (B, n) float32, w: (d, n) Q6_K"""
    xq, xd, xsum, xu = q8_k_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.stamp, stamp, 210)
    B, d = out.shape
    for c in prange(row_chunks(B, d)):
        k0, k1, pair = chunk_rows(c, B, d)
        if VNNI512:
            vnni_gguf.q6_k(out, w.w, xu, xd, xsum, k0, k1, pair)
        else:
            rows_kquant(out, w.w, xq, xd, xsum, k0, k1, pair, 210)


@kernel
def rows_kquant(out, w, xq, xd, xsum, k0, k1, pair, size):
    """out[b, i] = row i of w . x_b for every input b, rows i = k0..k1-1 (and i + pair when
    pair > 0), in portable loops: per super-block the exact int32 sums (q_j . x_j scaled by sc_j,
    and the mins' m_j * sum(x_j)), then x's scale times d and dmin in float. `size` (bytes a
    super-block: 144, 176, 210) names the format.  out (B, d), w (d, n / 256 * size) uint8,
    xq (B, n) int8, xd (B, n / 256), xsum (B, n / 16) int16

    The loops over values have trip counts LLVM cannot see (computed from the shapes), so it
    vectorises them rather than unrolling them into scalar code."""
    supers = xd.shape[1]
    sixteen = xq.shape[1] // supers // 16
    for k in range(k0, k1):
        for r in range(1 + (pair > 0)):
            row = w[k + r * pair]
            for b in range(out.shape[0]):
                acc = ZERO
                for s in range(supers):
                    blk = row[s * size:(s + 1) * size]
                    x = xq[b, s * QK_K:(s + 1) * QK_K]
                    sums = xsum[b, s * 16:(s + 1) * 16]
                    main = I32(0)
                    mins = I32(0)
                    if size == 210:  # Q6_K: 16 sub-blocks of 16, int8 scales
                        for sub in range(16):
                            part = sub % 8 // 2  # which 32 of the 128: low/high nibbles, qh bit pair
                            ql = blk[64 * (sub // 8) + 32 * (part % 2) + 16 * (sub % 2):]
                            qh = blk[128 + 32 * (sub // 8) + 16 * (sub % 2):]
                            xs = x[16 * sub:16 * sub + 16]
                            dot = I32(0)
                            for j in range(sixteen):
                                q = ((I32(ql[j]) >> I32(4 * (part // 2))) & I32(15)
                                     | ((I32(qh[j]) >> I32(2 * part)) & I32(3)) << I32(4))
                                dot = I32(dot + (q - I32(32)) * I32(xs[j]))
                            sc = I32(blk[192 + sub])
                            main += (sc - ((sc & I32(128)) << I32(1))) * dot
                        d = half_float(blk[208], blk[209])
                        dmin = ZERO
                    else:  # Q4_K, Q5_K: 8 sub-blocks of 32, 6-bit scales and mins
                        at = size - 128  # the nibbles are the last 128 bytes
                        for c in range(4):  # sub-block 2c in the low nibbles, 2c + 1 in the high
                            q = blk[at + 32 * c:at + 32 * c + 32]
                            qh = blk[16:48]  # (Q5_K's fifth bits)
                            low = x[64 * c:64 * c + 32]
                            high = x[64 * c + 32:64 * c + 64]
                            dot_low = I32(0)
                            dot_high = I32(0)
                            for j in range(2 * sixteen):
                                byte = I32(q[j])
                                dot_low = I32(dot_low + (byte & I32(15)) * I32(low[j]))
                                dot_high = I32(dot_high + (byte >> I32(4)) * I32(high[j]))
                            if size == 176:
                                for j in range(2 * sixteen):
                                    bits = I32(qh[j]) >> I32(2 * c)
                                    dot_low = I32(dot_low + ((bits & I32(1)) << I32(4)) * I32(low[j]))
                                    dot_high = I32(dot_high + ((bits & I32(2)) << I32(3)) * I32(high[j]))
                            sc, m = scale_min(blk[4 + c % 2 * 2], blk[8 + c % 2 * 2], blk[12 + c % 2 * 2], c >= 2)
                            sc2, m2 = scale_min(blk[5 + c % 2 * 2], blk[9 + c % 2 * 2], blk[13 + c % 2 * 2], c >= 2)
                            main += sc * dot_low + sc2 * dot_high
                            mins += (m * (I32(sums[4 * c]) + I32(sums[4 * c + 1]))
                                     + m2 * (I32(sums[4 * c + 2]) + I32(sums[4 * c + 3])))
                        d = half_float(blk[0], blk[1])
                        dmin = half_float(blk[2], blk[3])
                    acc += xd[b, s] * (d * np.float32(main) - dmin * np.float32(mins))
                out[b, k + r * pair] = acc


@kernel
def scale_min(low, mid, top, upper):
    """(sc_j, m_j) of a Q4_K/Q5_K super-block (llama.cpp's get_scale_min_k4), from the bytes
    low = scales[j % 4], mid = scales[j % 4 + 4], top = scales[j % 4 + 8]; upper: j >= 4"""
    if not upper:
        return I32(low) & I32(63), I32(mid) & I32(63)
    return ((I32(top) & I32(15)) | ((I32(low) >> I32(6)) << I32(4)),
            (I32(top) >> I32(4)) | ((I32(mid) >> I32(6)) << I32(4)))


@kernel
def q6_k_value(blk, v):
    """q of value v (0..255) of a Q6_K super-block (0..63).  blk (210,) uint8"""
    h, part, lane = v // 128, (v % 128) // 32, v % 32
    low = I32(blk[64 * h + lane + 32 * (part % 2)]) >> I32(4 * (part // 2)) & I32(15)
    high = I32(blk[128 + 32 * h + lane]) >> I32(2 * part) & I32(3)
    return low | high << I32(4)


# ----------------------------------------------------------------------------------------------
# Embedding: rows of the table decoded to float32, as dequantize does


@kernel
def embed_q4_k(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_K table.  out (B, n), table: (rows, n) Q4_K"""
    embed_kquant(out, table.w, tokens, 144, 16, -1)


@kernel
def embed_q5_k(out, table, tokens):
    """out[b] = row tokens[b] of a Q5_K table.  out (B, n), table: (rows, n) Q5_K"""
    embed_kquant(out, table.w, tokens, 176, 48, 16)


@kernel
def embed_q6_k(out, table, tokens):
    """out[b] = row tokens[b] of a Q6_K table.  out (B, n), table: (rows, n) Q6_K"""
    embed_kquant(out, table.w, tokens, 210, -1, -1)


@kernel
def embed_kquant(out, w, tokens, size, qs, qh):
    """out[b] = the values of row tokens[b], super-block by super-block: Q6_K when qs < 0, else
    Q4_K/Q5_K with nibbles at byte qs and fifth bits at byte qh (-1: none), computed as
    llama.cpp's dequantize_row does.  out (B, n), w (rows, n / 256 * size) uint8"""
    check_embed(out, w.shape[0], w.shape[1] // size * QK_K, tokens)
    for b in range(tokens.shape[0]):
        row = w[tokens[b]]
        for s in range(row.shape[0] // size):
            blk = row[s * size:(s + 1) * size]
            y = out[b, s * QK_K:(s + 1) * QK_K]
            if qs < 0:
                d = half_float(blk[208], blk[209])
                for j in range(QK_K):
                    sc = I32(blk[192 + j // 16])
                    y[j] = d * np.float32(sc - ((sc & I32(128)) << I32(1))) * np.float32(q6_k_value(blk, j) - 32)
                continue
            d, dmin = half_float(blk[0], blk[1]), half_float(blk[2], blk[3])
            for j in range(QK_K):
                sub = j // 32
                sc, m = scale_min(blk[4 + sub % 4], blk[8 + sub % 4], blk[12 + sub % 4], sub >= 4)
                q = I32(blk[qs + 32 * (j // 64) + j % 32]) >> I32(4 * (sub % 2)) & I32(15)
                if qh >= 0:
                    q |= (I32(blk[qh + j % 32]) >> I32(sub) & I32(1)) << I32(4)
                y[j] = d * np.float32(sc) * np.float32(q) - dmin * np.float32(m)
