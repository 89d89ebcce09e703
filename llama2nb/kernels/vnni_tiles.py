"""Matmuls over 16 rows at once, on weights interleaved for AVX-512 VNNI, in LLVM IR (a Numba intrinsic).

Why a second layout: kernels/vnni_gguf.py reads GGUF blocks as they lie, one row at a time, so
each vpdpbusd (64 byte products) is followed by float work per block and token (convert, scale,
add) that costs as much as the products: the int8 rows run at a small fraction of the VNNI
peak. Here 16 rows are interleaved (formats/interleaved.py repacks them at load, 4-bit weights
staying 4-bit): int32 lane r of a vector belongs to row r, so one 64-byte load of weights holds
4 consecutive values of each of the 16 rows, and the input's 4 matching bytes are one broadcast
(vpdpbusd's memory operand {1to16}). A block of 32 values is then 8 vpdpbusd per input for 16
rows, and its float work (one convert, one multiply by the 16 rows' scales times the input's,
one add) is shared by 16 rows: the products dominate.

A tile is 16 rows; its blocks follow each other, each TILE_HEADER bytes of the 16 rows' fp16
scales d and then the values:

    nibbles (Q4_0):  4 x 64 bytes, byte 64 j + 4 r + i = row r's nibble byte 4 j + i
                     (low nibble: value 4 j + i; high nibble: value 16 + 4 j + i)
    bytes (Q8_0):    8 x 64 bytes, byte 64 j + 4 r + i = row r's q[4 j + i] + 128 (unsigned)

vpdpbusd multiplies unsigned by signed bytes: the weights are the unsigned side (Q4_0's q in
0..15, Q8_0's q + 128) and the input x (int8 per 32 values, formats/gguf_legacy.quantize_q8_32)
the signed, so each block's int32 lanes start at -8 * sum(x) (Q4_0's q - 8) or -128 * sum(x)
and end exact: sum over the block of (q - zero) * x. Per input and block, in float:
acc += float(lanes) * (d * d_x). Inputs go TOKENS at a time (their accumulators and the decoded
weights fill the 32 vector registers), the rest one at a time. Only kernels compiled with
fastmath use this: the float sums run in another order than the portable loops'.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils

from .vnni_gguf import _CONTRACT, _F16, _F32, _I8, _I32, _I64, _IR, _arguments, _each_pass, _named, _signature, _vec

TILE = 16  # rows a tile
TILE_HEADER = 2 * TILE  # bytes of the 16 fp16 scales that start each block of a tile
TOKENS = 8  # inputs a pass over a tile


def tile_block_bytes(nibbles: bool) -> int:
    """Bytes per 32-value block of a tile: scales, then 16 rows' values."""
    return TILE_HEADER + TILE * (16 if nibbles else 32)


def _tiles_intrinsic(nibbles: bool):
    """tiles(out, w, xq, xd, x8, t0, t1, pair): out[b, 16 i + r] = row 16 i + r . x_b for every
    input b, the tiles i of a range (formats/blocks.chunk_rows over tiles) and r < 16 while
    16 i + r < d.  out (B, d) float32 with unit column stride, w (tiles, n / 32 * block bytes)
    uint8 (the layout above), xq (B, n) int8, xd (B, n / 32) float32, x8 (B, n / 32) int32
    (-8 times the sums of xq); shapes checked by the caller"""
    size = tile_block_bytes(nibbles)
    pieces = 4 if nibbles else 8  # 64-byte loads a block

    def typer(typingctx, out, w, xq, xd, x8, t0, t1, pair):
        return _signature(codegen, (out, w, xq, xd, x8, t0, t1, pair), (types.int8, types.float32, types.int32))

    def codegen(context, builder, signature, args):
        v = _IR(builder)
        b = builder
        arrays, (t0, t1, pair) = _arguments(context, builder, signature, args)
        blocks = b.sdiv(arrays.shape(1, 1), _I64(size))
        rows = arrays.shape(0, 1)
        f16 = _vec(_F32, TILE)

        def emit(tile, i, T, first):
            inputs = [[arrays.row_pointer(k, b.add(first, _I64(t))) for k in (2, 3, 4)] for t in range(T)]
            accs = [cgutils.alloca_once_value(b, ir.Constant(f16, None)) for _ in range(T)]
            with cgutils.for_range(b, blocks) as loop:
                k = loop.index
                base = v.at(tile, b.mul(k, _I64(size)))
                d = b.fpext(v.load(base, 0, _vec(_F16, TILE)), f16)
                starts = []
                for xq, xd, x8 in inputs:
                    start = v.load(x8, b.mul(k, _I64(4)), _I32)
                    starts.append(v.splat(start if nibbles else b.shl(start, _I32(4)), TILE))
                lanes = starts
                x_at = b.mul(k, _I64(32))
                for j in range(pieces):
                    w = v.load(base, TILE_HEADER + 64 * j, _vec(_I8, 64))
                    if nibbles:
                        parts = ((b.and_(w, v.splat_const(_I8, 15, 64)), 4 * j),
                                 (b.lshr(w, v.splat_const(_I8, 4, 64)), 16 + 4 * j))
                    else:
                        parts = ((w, 4 * j),)
                    for values, offset in parts:
                        for t, (xq, _, _) in enumerate(inputs):
                            x4 = v.splat(v.load(xq, b.add(x_at, _I64(offset)), _I32), TILE)
                            lanes[t] = v.dpbusd(lanes[t], values, x4)
                for t, (_, xd, _) in enumerate(inputs):
                    scale = b.fmul(d, v.splat(v.load(xd, b.mul(k, _I64(4)), _F32), TILE), flags=_CONTRACT)
                    b.store(v.scaled(b.load(accs[t]), lanes[t], scale), accs[t])
            column = b.mul(i, _I64(TILE))
            whole = b.icmp_signed("<=", b.add(column, _I64(TILE)), rows)
            for t in range(T):
                acc = b.load(accs[t])
                at = arrays.out_pointer(b.add(first, _I64(t)), column)
                with b.if_else(whole) as (full, partial):
                    with full:
                        b.store(acc, b.bitcast(at, f16.as_pointer()), align=4)
                    with partial:
                        with cgutils.for_range(b, b.sub(rows, column)) as lane:
                            value = b.extract_element(acc, b.trunc(lane.index, _I32))
                            b.store(value, b.gep(b.bitcast(at, _F32.as_pointer()), [lane.index]))

        _each_pass(builder, arrays, t0, t1, pair, emit, tokens_at_once=TOKENS)
        return context.get_dummy_value()

    return typer


q4_0_tiles = _named(_tiles_intrinsic(True), "q4_0_tiles")
q8_0_tiles = _named(_tiles_intrinsic(False), "q8_0_tiles")
