"""Matmuls over 16 rows at once, on weights interleaved for AVX-512 VNNI (or AVX2), in LLVM IR (a Numba intrinsic).

Why a second layout: kernels/vnni_gguf.py reads GGUF blocks as they lie, one row at a time, so
each vpdpbusd (64 byte products) is followed by float work per block and token (convert, scale,
add) that costs as much as the products: the int8 rows run at a small fraction of the VNNI
peak. Here 16 rows are interleaved (formats/interleaved.py repacks them at load, 4-bit weights
staying 4-bit): int32 lane r of a vector belongs to row r, so one 64-byte load of weights holds
4 consecutive values of each of the 16 rows, and the input's 4 matching bytes are one broadcast
(vpdpbusd's memory operand {1to16}). A block of 32 values is then 8 vpdpbusd per input for 16
rows, and its float work (one convert, one multiply by the 16 rows' scales times the input's,
one add) is shared by 16 rows: the products dominate.

The K-quants' tiles (Q4_K, Q6_K) are laid out and multiplied super-block by super-block: see
their intrinsics below. A tile of a 32-value format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) is 16 rows;
its blocks follow each other, each the 16 rows' source blocks rearranged (16 times the bytes):
the 16 rows' fp16 scales d (TILE_HEADER bytes), their fp16 mins m (Q4_1, Q5_1), the values,
then the fifth bits (Q5_0, Q5_1):

    nibbles:      4 x 64 bytes, byte 64 j + 4 r + i = row r's nibble byte 4 j + i
                  (low nibble: value 4 j + i, of quad j; high nibble: value 16 + 4 j + i, quad 4 + j)
    bytes (Q8_0): 8 x 64 bytes, byte 64 j + 4 r + i = row r's q[4 j + i] + 128 (unsigned)
    fifth bits:   64 bytes, bit g of byte 4 r + i = the fifth bit of row r's value 4 g + i

vpdpbusd multiplies unsigned by signed bytes: the weights are the unsigned side (q in 0..15 or
0..31, Q8_0's q + 128) and the input x (int8 per 32 values, formats/gguf_legacy.quantize_q8_32)
the signed, so each block's int32 lanes start at -zero * sum(x) (8 for Q4_0, 16 for Q5_0, 128
for Q8_0; 0 for the formats with a min) and end exact: sum over the block of (q - zero) * x. Per
input and block, in float: acc += float(lanes) * (d * d_x) (+ m * d_x * sum(x)). Inputs go
TOKENS at a time (their accumulators and the decoded weights fill the vector registers), the
rest one at a time. One input streams the tiles from DRAM, a tile and its pair in turn
(formats/blocks.chunk_rows): each block is read with a prefetch of the same block of the tile
the pass takes next, so both streams stay in flight (benchmarks/performance.md). Only kernels
compiled with fastmath use this: the float sums run in another order than the portable loops'.

Without AVX-512 VNNI, on AVX2 (simd.TILES_AVX2), the same IR builds with each vpdpbusd done by
vpmaddubsw and vpmaddwd on 256-bit halves (_IR.dpbusd): exact while the int16 sums of two
products stay below 32768, as for 4- and 6-bit weights; Q8_0's q + 128 would not, so there
q's magnitude multiplies x with q's sign (_IR.dpbssd_biased), and its lanes start from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .vnni_gguf import (_CONTRACT, _F16, _F32, _I8, _I16, _I32, _I64, _IR, Legacy, _arguments, _each_group, _each_pass,
                        _each_row, _signature, _vec)

TILE = 16  # rows a tile
TILE_HEADER = 2 * TILE  # bytes of the 16 fp16 scales that start each block of a tile
TOKENS = 8 if simd.VNNI512 else 4  # inputs a pass over a tile (AVX2 has 16 vector registers, not 32)


def tile_block_bytes(fmt: Legacy) -> int:
    """Bytes per 32-value block of a tile: the 16 rows' source blocks, rearranged."""
    return TILE * fmt.size


def tile_fields(fmt: Legacy) -> tuple[int, int | None]:
    """The byte offsets in a tile's block of the values (after the 16 rows' d, and m) and of the
    fifth bits (None: a format without)."""
    header = TILE_HEADER * (1 if fmt.m is None else 2)
    return header, None if fmt.qh is None else header + TILE * (32 if fmt.int8 else 16)


def _chosen_by_operand(operand, args, inputs, kind, make_codegen):
    """The typing of an intrinsic f(operand, out, w, *inputs, t0, t1, pair) whose code is
    make_codegen(layout) for the `layout` (an instance of `kind`) of the operand's class: only
    the operand's type is read, so each format's callers compile its code alone. None (no
    match) for anything else (_signature)."""
    layout = getattr(getattr(operand, "instance_class", None), "layout", None)
    typed = _signature(None, args, inputs, tiles=True) if isinstance(layout, kind) else None
    if typed is None:
        return None
    codegen = make_codegen(layout)
    return types.void(operand, *typed[0].args), lambda context, builder, signature, values: codegen(
        context, builder, types.void(*signature.args[1:]), values[1:])


@intrinsic
def legacy_tiles(typingctx, operand, out, w, xq, xd, x8, xds, t0, t1, pair):
    """legacy_tiles(operand, out, w, xq, xd, x8, xds, t0, t1, pair): out[b, 16 i + r] = row
    16 i + r . x_b for every input b, the tiles i of a range (formats/blocks.chunk_rows over
    tiles) and r < 16 while 16 i + r < d, for the tiles of the format that is the `layout` (a
    Legacy) of the operand's class.  out (B, d) float32 with unit column stride, w (tiles, n /
    32 * 16 * block bytes) uint8 (the layout above), xq (B, n) int8, xd (B, n / 32) float32,
    x8 (B, n / 32) int32 (-8 times the sums of xq), xds (B, n / 32) float32 (xd times those
    sums); shapes checked by the caller"""
    return _chosen_by_operand(operand, (out, w, xq, xd, x8, xds, t0, t1, pair),
                              (types.int8, types.float32, types.int32, types.float32), Legacy, _legacy_tiles_codegen)


def _legacy_tiles_codegen(fmt: Legacy):
    size = tile_block_bytes(fmt)
    values_at, fifth_at = tile_fields(fmt)
    pieces = 8 if fmt.int8 else 4  # 64-byte loads of values a block
    biased = fmt.int8 and not simd.VNNI512  # AVX2 multiplies Q8_0's q itself (dpbssd_biased), from 0
    # the lanes start at -zero * sum(x), x8 shifted (Q8_0's tiles hold q + 128), or at 0 (a min)
    start_shift = {8: 0, 16: 1, 128: 4}.get(128 if fmt.int8 else fmt.zero)

    def codegen(context, builder, signature, args):
        v = _IR(builder)
        b = builder
        arrays, (t0, t1, pair) = _arguments(context, builder, signature, args)
        blocks = b.sdiv(arrays.shape(1, 1), _I64(size))
        rows = arrays.shape(0, 1)
        f16 = _vec(_F32, TILE)

        def fifth(high, g):
            """Bit g of each byte of the fifth bits (value quad g's) at bit 4."""
            moved = b.shl(high, v.splat_const(_I8, 4 - g, 64)) if g < 4 else b.lshr(high, v.splat_const(_I8, g - 4, 64))
            return b.and_(moved, v.splat_const(_I8, 16, 64))

        def emit(tile, i, T, first, after):
            inputs = [[arrays.row_pointer(k, b.add(first, _I64(t))) for k in (2, 3, 4, 5)] for t in range(T)]
            accs = [cgutils.alloca_once_value(b, ir.Constant(f16, None)) for _ in range(T)]
            with cgutils.for_range(b, blocks) as loop:
                k = loop.index
                base = v.at(tile, b.mul(k, _I64(size)))
                if T == 1:  # one token streams the tiles: the next one's block meanwhile
                    v.prefetch(v.at(after, b.mul(k, _I64(size))), 0, size)
                d = b.fpext(v.load(base, 0, _vec(_F16, TILE)), f16)
                high = None if fifth_at is None else v.load(base, fifth_at, _vec(_I8, 64))
                lanes = []
                for xq, xd, x8, xds in inputs:
                    start = _I32(0) if start_shift is None or biased else v.load(x8, b.mul(k, _I64(4)), _I32)
                    lanes.append(v.splat(start if not start_shift else b.shl(start, _I32(start_shift)), TILE))
                x_at = b.mul(k, _I64(32))
                products = [[] for _ in inputs]  # (weights, input bytes) per input
                for j in range(pieces):
                    w = v.load(base, values_at + 64 * j, _vec(_I8, 64))
                    if fmt.int8:
                        parts = ((w, 4 * j),)
                    else:  # low nibbles: value quad j; high: quad 4 + j
                        parts = ((b.and_(w, v.splat_const(_I8, 15, 64)), 4 * j),
                                 (b.lshr(w, v.splat_const(_I8, 4, 64)), 16 + 4 * j))
                    for values, offset in parts:
                        if high is not None:
                            values = b.or_(values, fifth(high, offset // 4))
                        for t, (xq, _, _, _) in enumerate(inputs):
                            products[t].append((values, v.splat(v.load(xq, b.add(x_at, _I64(offset)), _I32), TILE)))
                for t in range(len(inputs)):
                    if biased:
                        for values, x4 in products[t]:
                            lanes[t] = v.dpbssd_biased(lanes[t], values, x4)
                    else:
                        lanes[t] = v.dot_sum(lanes[t], products[t], 255 if fmt.int8 else 15 if fifth_at is None else 31)
                m = None if fmt.m is None else b.fpext(v.load(base, TILE_HEADER, _vec(_F16, TILE)), f16)
                for t, (_, xd, _, xds) in enumerate(inputs):
                    scale = b.fmul(d, v.splat(v.load(xd, b.mul(k, _I64(4)), _F32), TILE), flags=_CONTRACT)
                    acc = v.scaled(b.load(accs[t]), lanes[t], scale)
                    if m is not None:  # + m * xd * sum(x)
                        acc = b.fadd(acc, b.fmul(m, v.splat(v.load(xds, b.mul(k, _I64(4)), _F32), TILE),
                                                 flags=_CONTRACT), flags=_CONTRACT)
                    b.store(acc, accs[t])
            _store_tile(b, arrays, accs, i, T, first, rows)

        _each_pass(builder, arrays, t0, t1, pair, emit, tokens_at_once=TOKENS)
        return context.get_dummy_value()

    return codegen


# ----------------------------------------------------------------------------------------------
# The K-quants in tiles: super-blocks of 256 values

K_TOKENS = 4 if simd.VNNI512 else 2  # inputs a pass: each holds a few int32 accumulators besides its float one

# Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins

Q4_K_SC, Q4_K_M, Q4_K_QS = 64, 192, 320  # byte offsets in a tile's super-block
Q4_K_TILE_BYTES = 320 + 16 * 128
Q4_K_AHEAD = 2  # super-blocks ahead that one token's pass prefetches (benchmarks/performance.md)
# Whether one token's pass over Q4_K tiles prefetches at all. With AVX-512 VNNI (measured on a
# Zen 5) the prefetches make it stream faster; on AVX2 (a Zen 3) the hardware prefetcher alone
# streams it faster than with them (benchmarks/performance.md).
Q4_K_PREFETCH = simd.VNNI512


@dataclass(frozen=True)
class KTile:
    """A K-quant tile's layout: bytes a super-block of 16 rows, the code that multiplies one
    (super_block(v, base, s, inputs, accs) adds super-block s at byte pointer base times every
    input into its accumulator), whether one input's pass prefetches (`prefetch`: the same
    super-block of the tile it takes next) and how many super-blocks ahead (`ahead`). A
    layout with `quad(v, base, g)`, the 64 bytes of its value quad g (16 rows x 4 values,
    unsigned), and `quads`, how many a super-block has, is decoded once a super-block for many
    inputs on AVX2 (_decoded_passes; super_block(..., quad) reads the decoded quads): with 16
    vector registers a pass takes only K_TOKENS inputs, and each would decode, and read from
    L2, the tiles again (benchmarks/performance.md)."""

    tile_bytes: int
    super_block: Callable
    prefetch: bool = True
    ahead: int = 0
    quad: Callable | None = None
    quads: int = 0


@intrinsic
def k_quant_tiles(typingctx, operand, out, w, xq, xd, xsum, t0, t1, pair):
    """k_quant_tiles(operand, out, w, xq, xd, xsum, t0, t1, pair), as legacy_tiles for the
    K-quant tiles whose KTile is the `layout` of the operand's class, with the K-quants' input
    (gguf_kquants: xq (B, n) int8, xd (B, n / 256) float32, xsum (B, n / 16) int16)"""
    return _chosen_by_operand(operand, (out, w, xq, xd, xsum, t0, t1, pair),
                              (types.int8, types.float32, types.int16), KTile, _k_tiles_codegen)


def _k_tiles_codegen(layout: KTile):
    """The passes over tiles and inputs (K_TOKENS inputs a pass), the loop over super-blocks,
    for one input (it streams the tiles from DRAM: benchmarks/performance.md) prefetching, if
    the layout does, `ahead` of them and the same super-block of the tile the pass takes next,
    and the stores. On
    AVX2 a layout with `quad` takes several inputs by _decoded_passes instead."""
    tile_bytes, ahead, prefetch = layout.tile_bytes, layout.ahead, layout.prefetch
    decoded = layout.quad is not None and not simd.VNNI512

    def codegen(context, builder, signature, args):
        v, b = _IR(builder), builder
        arrays, (t0, t1, pair) = _arguments(context, builder, signature, args)
        supers = b.sdiv(arrays.shape(1, 1), _I64(tile_bytes))
        rows = arrays.shape(0, 1)

        def emit(tile, i, T, first, after):
            inputs = [[arrays.row_pointer(k, b.add(first, _I64(t))) for k in (2, 3, 4)] for t in range(T)]
            accs = [cgutils.alloca_once_value(b, ir.Constant(_vec(_F32, TILE), None)) for _ in range(T)]
            with cgutils.for_range(b, supers) as loop:
                base = v.at(tile, b.mul(loop.index, _I64(tile_bytes)))
                if T == 1 and prefetch:  # one token streams the tiles: this one's ahead, and the next one's
                    if ahead:
                        v.prefetch(base, ahead * tile_bytes, tile_bytes)
                    v.prefetch(v.at(after, b.mul(loop.index, _I64(tile_bytes))), 0, tile_bytes)
                layout.super_block(v, base, loop.index, inputs, accs)
            _store_tile(b, arrays, accs, i, T, first, rows)

        if not decoded:
            _each_pass(builder, arrays, t0, t1, pair, emit, tokens_at_once=K_TOKENS)
            return context.get_dummy_value()
        with b.if_else(b.icmp_signed("==", arrays.shape(0, 0), _I64(1))) as (one, several):
            with one:
                _each_row(builder, arrays, t0, t1, pair, lambda row, i, after: emit(row, i, 1, _I64(0), after))
            with several:
                _decoded_passes(v, arrays, t0, t1, pair, layout)
        return context.get_dummy_value()

    return codegen


DECODED_INPUTS = 64  # inputs whose float sums a pass over decoded super-blocks keeps on the stack (4 KB)


def _decoded_passes(v, arrays, t0, t1, pair, layout: KTile):
    """Tiles outer: each super-block of a tile decoded once (layout.quad, into 4 KB on the
    stack) for up to DECODED_INPUTS inputs, then multiplied by them K_TOKENS at a time (the
    rest one at a time), their float sums on the stack until the tile's last super-block."""
    tile_bytes, b = layout.tile_bytes, v.b
    supers = b.sdiv(arrays.shape(1, 1), _I64(tile_bytes))
    rows, tokens = arrays.shape(0, 1), arrays.shape(0, 0)
    f16 = _vec(_F32, TILE)
    decoded = cgutils.alloca_once(b, ir.ArrayType(_vec(_I8, 64), layout.quads))
    sums = cgutils.alloca_once(b, ir.ArrayType(f16, DECODED_INPUTS))
    decoded.align = sums.align = 64

    def quad(g):
        return b.load(b.gep(decoded, [_I64(0), _I64(g)]), align=64)

    def sum_at(t):
        return b.gep(sums, [_I64(0), t])

    def tile(row, i, after):
        chunks = b.sdiv(b.add(tokens, _I64(DECODED_INPUTS - 1)), _I64(DECODED_INPUTS))
        with cgutils.for_range(b, chunks) as chunk:
            first = b.mul(chunk.index, _I64(DECODED_INPUTS))
            count = b.sub(tokens, first)
            count = b.select(b.icmp_signed("<", count, _I64(DECODED_INPUTS)), count, _I64(DECODED_INPUTS))
            with cgutils.for_range(b, count) as t:
                b.store(ir.Constant(f16, None), sum_at(t.index), align=64)
            with cgutils.for_range(b, supers) as loop:
                base = v.at(row, b.mul(loop.index, _I64(tile_bytes)))
                for g in range(layout.quads):
                    b.store(layout.quad(v, base, g), b.gep(decoded, [_I64(0), _I64(g)]), align=64)

                def group(T, start):
                    inputs = [[arrays.row_pointer(k, b.add(first, b.add(start, _I64(t)))) for k in (2, 3, 4)]
                              for t in range(T)]
                    layout.super_block(v, base, loop.index, inputs, [sum_at(b.add(start, _I64(t))) for t in range(T)],
                                       quad)

                _each_group(b, count, (K_TOKENS, 1), group)
            with cgutils.for_range(b, count) as t:
                _store_tile(b, arrays, [sum_at(t.index)], i, 1, b.add(first, t.index), rows)

    _each_row(b, arrays, t0, t1, pair, tile)


def _store_tile(b, arrays, accs, i, T, first, rows):
    """out[first + t, 16 i ...] = accs[t]: a whole tile's 16 values, or the rows below d."""
    f16 = _vec(_F32, TILE)
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


def _q4_k_quad(v, base, g):
    """The 64 bytes of a Q4_K tile super-block's value quad g: 16 rows x 4 values, q in 0..15
    (quads 16 c + p and 16 c + 8 + p: the low and high nibbles of the nibble bytes 512 c + 64 p)."""
    b = v.b
    w = v.load(base, Q4_K_QS + 512 * (g // 16) + 64 * (g % 8), _vec(_I8, 64))
    return b.lshr(w, v.splat_const(_I8, 4, 64)) if g % 16 >= 8 else b.and_(w, v.splat_const(_I8, 15, 64))


def _q4_k_super_block(v, base, s, inputs, accs, quad=None):
    """One super-block of Q4_K tiles (Q4_K_TILE below) times each input, into accs. Its
    super-blocks (Q4_K_TILE_BYTES each) hold the 16 rows' fp16 d (bytes 0..31) and dmin
    (32..63), their scales and mins as bytes, sub-blocks in pairs (byte 64 + 32 c + 2 r + e:
    row r's scale of sub-block 2 c + e; the mins alike from 192), then the nibbles: byte
    320 + 512 c + 64 p + 4 r + i = row r's nibble byte 32 c + 4 p + i (low nibble: value
    64 c + 4 p + i, of sub-block 2 c; high: 32 more, of sub-block 2 c + 1).

    Per super-block and input, exact in int32: main = sum_j sc_j * (q_j . x_j) (8 vpdpbusd a
    sub-block, then one multiply by the 16 rows' scales), mins = sum_j m_j * sum(x_j) (4
    vpdpwssd on pairs of sub-blocks); then acc += xd * (d * main - dmin * mins) in float."""
    b, T = v.b, len(inputs)
    f16, i16 = _vec(_F32, TILE), _vec(_I32, TILE)
    zero = ir.Constant(i16, None)
    d = b.fpext(v.load(base, 0, _vec(_F16, TILE)), f16)
    dmin = b.fpext(v.load(base, 32, _vec(_F16, TILE)), f16)
    x_at = b.mul(s, _I64(256))
    scales = [v.load(xd, b.mul(s, _I64(4)), _F32) for _, xd, _ in inputs]
    # the mins: sum_j m_j * sum(x_j), pairs of sub-blocks per vpdpwssd
    for t, (xq, xd, xsum) in enumerate(inputs):
        sixteen = v.load(xsum, b.mul(s, _I64(32)), _vec(_I16, 16))
        sums = v.call("llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), sixteen, v.splat_const(_I16, 1, 16))
        pairs = b.bitcast(b.trunc(sums, _vec(_I16, 8)), _vec(_I32, 4))
        mins = zero
        for c in range(4):
            m = b.zext(v.load(base, Q4_K_M + 32 * c, _vec(_I8, 32)), _vec(_I16, 32))
            mins = v.dpwssd(mins, m, v.splat(b.extract_element(pairs, _I32(c)), TILE))
        scale = b.fmul(dmin, v.splat(scales[t], TILE), flags=_CONTRACT)
        acc = b.load(accs[t])
        b.store(b.fsub(acc, b.fmul(b.sitofp(mins, f16), scale, flags=_CONTRACT), flags=_CONTRACT), accs[t])
    main = [zero] * T
    for c in range(4):
        pair_sc = b.bitcast(b.zext(v.load(base, Q4_K_SC + 32 * c, _vec(_I8, 32)), _vec(_I16, 32)), i16)
        sc = (b.and_(pair_sc, v.splat_const(_I32, 0xFFFF, TILE)), b.lshr(pair_sc, v.splat_const(_I32, 16, TILE)))
        low, high = [[] for _ in range(T)], [[] for _ in range(T)]  # (weights, input bytes) per input
        for p in range(8):
            if quad is None:
                w = v.load(base, Q4_K_QS + 512 * c + 64 * p, _vec(_I8, 64))
                wl, wh = b.and_(w, v.splat_const(_I8, 15, 64)), b.lshr(w, v.splat_const(_I8, 4, 64))
            else:  # read where decoded before
                wl, wh = quad(16 * c + p), quad(16 * c + 8 + p)
            for t, (xq, _, _) in enumerate(inputs):
                at = b.add(x_at, _I64(64 * c + 4 * p))
                low[t].append((wl, v.splat(v.load(xq, at, _I32), TILE)))
                high[t].append((wh, v.splat(v.load(xq, b.add(at, _I64(32)), _I32), TILE)))
        for t in range(T):
            main[t] = v.dot_sum(v.dot_sum(main[t], low[t], 15, sc[0]), high[t], 15, sc[1])
    for t in range(T):
        scale = b.fmul(d, v.splat(scales[t], TILE), flags=_CONTRACT)
        b.store(v.scaled(b.load(accs[t]), main[t], scale), accs[t])


Q4_K_TILE = KTile(Q4_K_TILE_BYTES, _q4_k_super_block, Q4_K_PREFETCH, Q4_K_AHEAD, quad=_q4_k_quad, quads=64)


# ----------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16 with int8 scales, q of 6 bits

Q6_K_SC, Q6_K_LOW, Q6_K_HIGH = 32, 288, 2336  # byte offsets in a tile's super-block
Q6_K_TILE_BYTES = 2336 + 16 * 64


def _q6_k_quad(v, base, g):
    """The 64 bytes of a Q6_K tile super-block's value quad g: 16 rows x 4 values, q in 0..63."""
    b = v.b
    low = v.load(base, Q6_K_LOW + 64 * (g % 32), _vec(_I8, 64))
    nibble = b.and_(low, v.splat_const(_I8, 15, 64)) if g < 32 else b.lshr(low, v.splat_const(_I8, 4, 64))
    high = v.load(base, Q6_K_HIGH + 64 * (g % 16), _vec(_I8, 64))
    shift = 2 * (g // 16)  # the pair's bits to bits 4..5
    high = b.shl(high, v.splat_const(_I8, 4 - shift, 64)) if shift < 4 else b.lshr(high, v.splat_const(_I8, shift - 4, 64))
    return b.or_(nibble, b.and_(high, v.splat_const(_I8, 0x30, 64)))


# The order in which a Q6_K tile's super-block takes its value quads: (sub-block, its quads),
# each group's products summed in int16 before one scaling by the sub-block's scale (_IR.dot_sum;
# the int32 sums are exact in any order). With AVX-512's 32 registers, sub-block by sub-block.
# AVX2 has 16, and each 16-row vector takes two: quads q, q + 16, q + 32, q + 48 share a byte of
# upper bits and q, q + 32 a byte of nibbles, so taking those together (two q at a time, the two
# quads of a sub-block) lets each loaded byte go after a few products; in sub-block order LLVM
# kept them for later and spilled them (benchmarks/performance.md).
Q6_K_ORDER = ([(k, range(4 * k, 4 * k + 4)) for k in range(16)] if simd.VNNI512 else
              [((q + 16 * j) // 4, (q + 16 * j, q + 16 * j + 1)) for q in range(0, 16, 2) for j in (0, 2, 1, 3)])


def _q6_k_super_block(v, base, s, inputs, accs, quad=None):
    """One super-block of Q6_K tiles (Q6_K_TILE below) times each input, into accs. Its
    super-blocks (Q6_K_TILE_BYTES each, the bytes of 16 source super-blocks) hold the 16 rows'
    fp16 d (bytes 0..31), their int8 scales with sub-blocks in pairs (byte 32 + 32 k + 2 r + e:
    row r's scale of sub-block 2 k + e), then each value's q (0..63) in value quads (4 g ..
    4 g + 3): the low four bits of quads g and g + 32 in a byte's two nibbles (byte 288 + 64 g
    + 4 r + i, g < 32), the upper two bits of quads b, b + 16, b + 32, b + 48 in a byte's bit
    pairs (byte 2336 + 64 b + 4 r + i, b < 16).

    Per super-block and input, exact in int32: sum_k sc_k * (q_k . x_k) (4 vpdpbusd on the
    unsigned q a sub-block, then one multiply by the 16 rows' scales) - 32 sum_k sc_k * sum(x_k)
    (8 vpdpwssd on pairs of sub-blocks); then acc += xd * d * that, in float."""
    b, T = v.b, len(inputs)
    f16, i16 = _vec(_F32, TILE), _vec(_I32, TILE)
    zero = ir.Constant(i16, None)
    quad = quad or (lambda g: _q6_k_quad(v, base, g))  # (decoded here, or read where decoded before)
    d = b.fpext(v.load(base, 0, _vec(_F16, TILE)), f16)
    x_at = b.mul(s, _I64(256))
    pairs = [b.bitcast(b.sext(v.load(base, Q6_K_SC + 32 * k, _vec(_I8, 32)), _vec(_I16, 32)), i16) for k in range(8)]
    offsets = []  # sum_k sc_k * sum(x_k), per input
    for xq, xd, xsum in inputs:
        total = zero
        for k in range(8):
            sums = v.splat(v.load(xsum, b.add(b.mul(s, _I64(32)), _I64(4 * k)), _I32), TILE)
            total = v.dpwssd(total, pairs[k], sums)
        offsets.append(total)
    main = [zero] * T
    for k, quads in Q6_K_ORDER:
        pair_k = pairs[k // 2]
        sc = b.ashr(pair_k if k % 2 else b.shl(pair_k, v.splat_const(_I32, 16, TILE)), v.splat_const(_I32, 16, TILE))
        part = [[] for _ in range(T)]  # (weights, input bytes) per input
        for g in quads:
            w = quad(g)
            for t, (xq, _, _) in enumerate(inputs):
                part[t].append((w, v.splat(v.load(xq, b.add(x_at, _I64(4 * g)), _I32), TILE)))
        for t in range(T):
            main[t] = v.dot_sum(main[t], part[t], 63, sc)
    for t, (xq, xd, xsum) in enumerate(inputs):
        exact = b.sub(main[t], b.shl(offsets[t], v.splat_const(_I32, 5, TILE)))
        scale = b.fmul(d, v.splat(v.load(xd, b.mul(s, _I64(4)), _F32), TILE), flags=_CONTRACT)
        b.store(v.scaled(b.load(accs[t]), exact, scale), accs[t])


# Super-blocks ahead that one token's pass over Q6_K tiles prefetches, as Q4_K's: on AVX2, where
# one token reads the tiles (benchmarks/performance.md); with AVX-512 VNNI one token reads the
# mapped rows instead (linear_q6_k_tiles), which prefetch their own.
Q6_K_AHEAD = 0 if simd.VNNI512 else 2
Q6_K_TILE = KTile(Q6_K_TILE_BYTES, _q6_k_super_block, True, Q6_K_AHEAD, quad=_q6_k_quad, quads=64)
