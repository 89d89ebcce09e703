"""GGUF's block formats' matmul rows in AVX-512 VNNI, written in LLVM IR (Numba intrinsics).

Why IR: a 4-bit weight must be multiplied as the 4 bits it is stored in (expanding a matrix to
int8 in memory would double the bytes every token streams), and the instructions that make that
cheap are vector ones LLVM does not find in scalar loops and Numba cannot name: a nibble split
(vpand, vpsrlw) of 32 bytes into 64 values, vpdpbusd (64 byte products summed in fours into 16
int32 lanes), vpdpwssd (the K-quants' sub-block scales applied to those lanes in int16 pairs),
and per-block float scales kept in vector lanes, so a row ends in one horizontal sum per token.

Each intrinsic computes out[b, i] = row i . x_b for a range of rows i (formats/blocks.chunk_rows)
and every input b of a block of quantized inputs (formats/gguf_legacy.py and gguf_kquants.py
quantize them), the loops over rows and inputs included: the Numba code around it calls it
once per range, because a call that passes arrays costs more than a row. Inputs outside, rows
inside: TOKENS inputs at a time (the last few one at a time) stay in L1 while the range's rows
pass over them, each decoded piece of a row serving all of them. All sums of products are exact
in int32; the float sums run lane-wise, in another order than the portable loops': only
kernels compiled with fastmath use these.

The 32-value formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) go two blocks a, b at a time, side by side
in 4-value lanes that alternate between a and b (see _ALTERNATE), the order in which the input
quantizer lays out its copies xu and xs, so a pair's scales are one broadcast pattern. For
several inputs the weights become signed bytes (q - 8, q - 16, q, or Q8_0's q) and the input
unsigned (xu = x + 128): vpdpbusd(init, xu, w) with init = -128 * sum(w) per lane, computed
once per decoded piece, leaves exactly sum(x * w) in each lane. For one input (generation) the
nibble formats' unsigned q meet the signed input xs, vpdpbusd started from -8 sum(x) (Q4_0),
-16 sum(x) (Q5_0) or 0. Per lane, in float: acc += float(lanes) * d * xd (+ m * xd * sum(x) on
each block's first lane for the formats with a min). The nibbles of a pair are one 64-byte load
and word permutes (vpermw) where 64 bytes remain in the row, else loads of their fields.

The K-quants (Q4_K, Q5_K, Q6_K) go 64 values at a time, 4 per 256-value super-block, in natural
order. Q4_K/Q5_K: vpdpbusd(0, q, x) (q 0..31 unsigned, x signed), then vpdpwssd adds each
lane times its sub-block's 6-bit scale into the super-block's int32 lanes, and the mins' term
is the input's per-16 sums times the mins in one vpmaddwd. Q6_K: q - 32 signed against xu with
the same -128 * sum(w) start, then its int8 scales by vpdpwssd. Every lane sum entering vpdpwssd
fits in int16 (at most 4 * 127 * 32), which vpdpwssd requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .simd import VNNI512

TOKENS = 8  # tokens per decoded piece of a row (formats/blocks.TOKENS)
KQ_AHEAD = 4096  # bytes ahead that one token's pass over K-quant rows prefetches (benchmarks/performance.md)

_I1, _I8, _I16, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _F16 = ir.FloatType(), ir.HalfType()
_CONTRACT = ("contract",)


def _vec(element: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(element, n)


class _IR:
    """Vector helpers around one IRBuilder."""

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder

    def call(self, name: str, result: ir.Type, *args):
        fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(result, [a.type for a in args]), name)
        return self.b.call(fn, args)

    def at(self, base, offset):
        """The byte pointer base + offset (an IR integer or a Python int)."""
        return self.b.gep(base, [offset if isinstance(offset, ir.Value) else _I64(offset)])

    def load(self, base, offset, ty: ir.Type):
        return self.b.load(self.b.bitcast(self.at(base, offset), ty.as_pointer()), align=1)

    def const(self, element: ir.Type, values) -> ir.Constant:
        return ir.Constant(_vec(element, len(values)), list(values))

    def splat_const(self, element: ir.Type, value, n: int) -> ir.Constant:
        return ir.Constant(_vec(element, n), [value] * n)

    def splat(self, value, n: int):
        undef = ir.Constant(_vec(value.type, 1), ir.Undefined)
        one = self.b.insert_element(undef, value, _I32(0))
        return self.b.shuffle_vector(one, one, ir.Constant(_vec(_I32, n), [0] * n))

    def pick(self, vector, lanes):
        """vector's lanes in the order `lanes` (a shuffle)."""
        return self.b.shuffle_vector(vector, vector, ir.Constant(_vec(_I32, len(lanes)), list(lanes)))

    def join(self, low, high):
        """The lanes of low, then those of high (same type)."""
        n = low.type.count
        return self.b.shuffle_vector(low, high, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))

    def widen(self, vector, n: int):
        """vector's lanes, then zeros, n lanes in all."""
        count = vector.type.count
        zero = ir.Constant(vector.type, None)
        return self.b.shuffle_vector(vector, zero, ir.Constant(_vec(_I32, n), [min(k, count) for k in range(n)]))

    def half(self, base, offset):
        """The fp16 at byte offset of base, as float."""
        return self.b.fpext(self.b.bitcast(self.load(base, offset, _I16), _F16), _F32)

    def prefetch(self, base, offset, nbytes):
        """Hints to bring the nbytes from byte base + offset into the cache, a line at a time
        (never faults)."""
        for line in range(0, nbytes, 64):
            self.call("llvm.prefetch.p0", ir.VoidType(), self.at(base, offset + line), _I32(0), _I32(3), _I32(1))

    def dpbusd(self, acc, unsigned, signed):
        """acc + the sums of 4 products unsigned byte x signed byte, per int32 lane. Without
        AVX-512 VNNI (the tiles on AVX2): vpmaddubsw, whose int16 sums of 2 products saturate,
        so the caller keeps 2 x unsigned x |signed| below 32768 (4-bit or 6-bit weights), then
        vpmaddwd, 8 lanes at a time."""
        lanes = acc.type
        if not simd.VNNI512:
            return self.b.add(acc, self._pairs_then_quads(unsigned, signed, lanes))
        name = f"llvm.x86.avx512.vpdpbusd.{lanes.count * 32}"
        return self.call(name, lanes, acc, self.b.bitcast(unsigned, lanes), self.b.bitcast(signed, lanes))

    def dpbssd_biased(self, acc, biased, signed):
        """acc + the sums of 4 products (biased - 128) x signed byte, per int32 lane, on AVX2
        (Q8_0 tiles: their bytes are q + 128, whose products with x would saturate vpmaddubsw):
        |q| times x with q's sign (vpsignb), exact for x > -128."""
        n = acc.type.count * 4
        q = self.b.xor(self.b.bitcast(biased, _vec(_I8, n)), self.splat_const(_I8, 128, n))
        x = self.b.bitcast(signed, _vec(_I8, n))
        magnitude = self.call(f"llvm.abs.v{n}i8", _vec(_I8, n), q, ir.Constant(ir.IntType(1), 0))
        signs = [self.call("llvm.x86.avx2.psign.b", _vec(_I8, 32), self.pick(x, range(h, h + 32)),
                           self.pick(q, range(h, h + 32))) for h in range(0, n, 32)]
        return self.b.add(acc, self._pairs_then_quads(magnitude, self._joined(signs), acc.type))

    def dot_sum(self, acc, pieces, top: int, scale=None):
        """acc + scale * (the sum over pieces (unsigned, signed) of dpbusd's products), per int32
        lane: the unsigned bytes at most `top`, the signed above -128; scale (None: 1) int32
        lanes within int16. On AVX2 each piece is one vpmaddubsw, whose int16 pair sums are then
        added in int16 as many at a time as cannot overflow (8 for 4-bit weights, 4 for 5-bit,
        2 for 6-bit), and each such group takes one vpmaddwd, by the scale's words where there
        is a scale: half the multiplies of a vpmaddwd a piece, and none to scale after."""
        b, lanes = self.b, acc.type
        if simd.VNNI512:
            total = acc if scale is None else ir.Constant(lanes, None)
            for unsigned, signed in pieces:
                total = self.dpbusd(total, unsigned, signed)
            return total if scale is None else b.add(acc, b.mul(total, scale))
        n = lanes.count * 4
        if scale is None:
            words = self.splat_const(_I16, 1, n // 2)
        else:  # each int32 lane as its value twice in int16 words
            words = b.or_(b.and_(scale, self.splat_const(_I32, 0xFFFF, lanes.count)),
                          b.shl(scale, self.splat_const(_I32, 16, lanes.count)))
        group = max(1, 32767 // (2 * top * 127))
        for first in range(0, len(pieces), group):
            sums = None
            for unsigned, signed in pieces[first:first + group]:
                pairs = self._byte_pairs(unsigned, signed, n)
                sums = pairs if sums is None else b.add(sums, pairs)
            acc = b.add(acc, self._madd_words(sums, words, lanes))
        return acc

    def dpwssd(self, acc, a, b):
        """acc + the sums of 2 products of int16 pairs, per int32 lane (AVX2: vpmaddwd)."""
        if not simd.VNNI512:
            return self.b.add(acc, self._madd_words(a, b, acc.type))
        return self.call(f"llvm.x86.avx512.vpdpwssd.{acc.type.count * 32}", acc.type, acc,
                         self.b.bitcast(a, acc.type), self.b.bitcast(b, acc.type))

    def _pairs_then_quads(self, unsigned, signed, lanes):
        """The sums of 4 products unsigned x signed byte per int32 lane, in AVX2's vpmaddubsw
        (int16 sums of pairs, saturating) and vpmaddwd (pairs of those)."""
        n = lanes.count * 4
        return self._madd_words(self._byte_pairs(unsigned, signed, n), self.splat_const(_I16, 1, n // 2), lanes)

    def _byte_pairs(self, unsigned, signed, n):
        """(n / 2,) int16: the sums of 2 products unsigned x signed byte (AVX2's vpmaddubsw,
        32 bytes at a time; saturating)."""
        unsigned, signed = self.b.bitcast(unsigned, _vec(_I8, n)), self.b.bitcast(signed, _vec(_I8, n))
        return self._joined([self.call("llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), self.pick(unsigned, range(h, h + 32)),
                                       self.pick(signed, range(h, h + 32))) for h in range(0, n, 32)])

    def _madd_words(self, a, b, lanes):
        """The sums of 2 products of int16 pairs of a and b per int32 lane (AVX2's vpmaddwd, 8
        lanes at a time)."""
        n = lanes.count * 2
        a, b = self.b.bitcast(a, _vec(_I16, n)), self.b.bitcast(b, _vec(_I16, n))
        return self._joined([self.call("llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), self.pick(a, range(h, h + 16)),
                                       self.pick(b, range(h, h + 16))) for h in range(0, n, 16)])

    def _joined(self, parts):
        """Equal vectors joined into one, in order (a count of parts that is a power of two)."""
        while len(parts) > 1:
            parts = [self.join(parts[k], parts[k + 1]) for k in range(0, len(parts), 2)]
        return parts[0]

    def minus_128_sums(self, w):
        """-128 * (the sum of each lane's 4 signed bytes of w): vpdpbusd's start value that
        turns its unsigned xu = x + 128 back into x."""
        lanes = _vec(_I32, w.type.count // 4)
        zero = ir.Constant(lanes, None)
        return self.b.sub(zero, self.dpbusd(zero, self.splat_const(_I8, 128, w.type.count), w))

    def scaled(self, acc, lanes, scale):
        """acc + float(lanes) * scale, lane-wise (scale a float vector)."""
        return self.b.fadd(acc, self.b.fmul(self.b.sitofp(lanes, scale.type), scale, flags=_CONTRACT), flags=_CONTRACT)

    def hsum(self, vector):
        """The sum of a float vector's lanes, as a tree."""
        width = vector.type.count
        while width > 1:
            width //= 2
            vector = self.b.fadd(self.pick(vector, range(width)), self.pick(vector, range(width, 2 * width)))
        return self.b.extract_element(vector, _I32(0))


@dataclass(frozen=True)
class Legacy:
    """A 32-value block type's layout (formats/gguf_legacy.py): block bytes, byte offsets of
    the values, fifth bits, min (None: absent) and the offset subtracted from q."""

    size: int
    qs: int
    qh: int | None = None
    m: int | None = None
    zero: int = 0
    int8: bool = False


Q8_0 = Legacy(34, 2, int8=True)
Q4_0 = Legacy(18, 2, zero=8)
Q4_1 = Legacy(20, 4, m=2)
Q5_0 = Legacy(22, 6, qh=2, zero=16)
Q5_1 = Legacy(24, 8, qh=4, m=2)


# A pair of blocks a, b side by side: 4-byte lanes alternate between the blocks, lane 2m
# holding a's values 4m..4m+3 (m < 4; a[16 + 4(m - 4)...] for m >= 4) and lane 2m + 1 b's.
# So a pair's scales are one broadcast [s_a, s_b] pattern, which a load of two adjacent floats
# (vbroadcastsd) or a word permute of two fp16 makes; quantize_q8_32 lays out the input alike.
_ALTERNATE = [k // 2 + 8 * (k % 2) for k in range(16)]  # the dwords of a's then b's 32 bytes, alternating


def _pair_words(v: _IR, row, a):
    """The 64 bytes from byte offset a, as (32,) int16: a pair of nibble blocks (36 to 48
    bytes) and what follows, so only where 64 bytes remain in the row (a masked load would not
    read past the pair, but costs several times as much on AMD's cores). Every field of these
    blocks is at an even offset: word permutes (vpermw) pick them out."""
    return v.b.bitcast(v.load(row, a, _vec(_I8, 64)), _vec(_I16, 32))


def _legacy_weights(v: _IR, fmt: Legacy, row, a, pair: bool, offset: bool = True, words=None):
    """The bytes of block a (at byte offset a), and of the next block when `pair`, in the xu
    order: 64 bytes for a pair (lanes alternating, above), 32 for one block (in order). Signed
    (q - zero, or Q8_0's q), or with offset=False the unsigned q of a nibble format. `words`:
    the pair's _pair_words (nibble formats)."""
    b = v.b
    n = 64 if pair else 32
    if words is not None:  # a's and b's nibble dwords alternating, twice: low nibbles, then high
        qa, qb = fmt.qs // 2, (fmt.size + fmt.qs) // 2
        order = [base + 2 * k + h for k in range(4) for base in (qa, qb) for h in (0, 1)]
        both = v.pick(words, order + order)
        shifted = b.lshr(both, v.const(_I16, [0] * 16 + [4] * 16))
        w = b.bitcast(b.and_(shifted, v.splat_const(_I16, 0x0F0F, 32)), _vec(_I8, 64))
        return _fifth_and_offset(v, fmt, row, a, pair, offset, w)
    if fmt.int8:
        qa = v.load(row, b.add(a, _I64(fmt.qs)), _vec(_I32, 8))
        if not pair:
            return b.bitcast(qa, _vec(_I8, 32))
        qb = v.load(row, b.add(a, _I64(fmt.size + fmt.qs)), _vec(_I32, 8))
        return b.bitcast(b.shuffle_vector(qa, qb, v.const(_I32, _ALTERNATE)), _vec(_I8, 64))
    q = v.load(row, b.add(a, _I64(fmt.qs)), _vec(_I8, 16))
    if pair:  # a's 16 nibble bytes and b's, their dwords alternating
        both = v.join(b.bitcast(q, _vec(_I32, 4)), v.load(row, b.add(a, _I64(fmt.size + fmt.qs)), _vec(_I32, 4)))
        q = b.bitcast(v.pick(both, [0, 4, 1, 5, 2, 6, 3, 7]), _vec(_I8, 32))
    half = n // 2
    w = v.join(b.and_(q, v.splat_const(_I8, 15, half)), b.lshr(q, v.splat_const(_I8, 4, half)))
    return _fifth_and_offset(v, fmt, row, a, pair, offset, w)


def _fifth_and_offset(v: _IR, fmt: Legacy, row, a, pair: bool, offset: bool, w):
    """The nibbles w with their fifth bits (Q5_0, Q5_1) and, if `offset`, minus zero."""
    b = v.b
    n = 64 if pair else 32
    if fmt.qh is not None:
        high = v.load(row, b.add(a, _I64(fmt.qh)), _I32)
        if pair:  # a's bits 4k..4k+3 to bits 8k..8k+3, b's to 8k+4..8k+7
            other = v.load(row, b.add(a, _I64(fmt.size + fmt.qh)), _I32)
            deposit = [v.call("llvm.x86.bmi.pdep.64", _I64, b.zext(bits, _I64), _I64(mask))
                       for bits, mask in ((high, 0x0F0F0F0F0F0F0F0F), (other, 0xF0F0F0F0F0F0F0F0))]
            high = b.or_(*deposit)
        mask = b.bitcast(high, _vec(_I1, n))
        w = b.or_(w, b.select(mask, v.splat_const(_I8, 16, n), ir.Constant(_vec(_I8, n), None)))
    if fmt.zero and offset:
        w = b.sub(w, v.splat_const(_I8, fmt.zero, n))
    return w


class _Arrays:
    """The data pointers and leading strides of an intrinsic's array arguments."""

    def __init__(self, context, builder, tys, values):
        self.arrays = [context.make_array(t)(context, builder, a) for t, a in zip(tys, values)]
        self.builder = builder

    def row_pointer(self, index, row):
        """A byte pointer to row `row` (an i64) of array argument `index`."""
        a = self.arrays[index]
        b = self.builder
        stride = cgutils.unpack_tuple(b, a.strides)[0]
        return b.gep(b.bitcast(a.data, _I8.as_pointer()), [b.mul(row, stride)])

    def data(self, index):
        return self.builder.bitcast(self.arrays[index].data, _I8.as_pointer())

    def shape(self, index, axis=0):
        return cgutils.unpack_tuple(self.builder, self.arrays[index].shape)[axis]

    def out_pointer(self, b_index, column):
        """A byte pointer to out[b_index, column] (argument 0, any strides)."""
        a = self.arrays[0]
        b = self.builder
        strides = cgutils.unpack_tuple(b, a.strides)
        offset = b.add(b.mul(b_index, strides[0]), b.mul(column, strides[1]))
        return b.gep(b.bitcast(a.data, _I8.as_pointer()), [offset])

    def store_out(self, value, b_index, column):
        """out[b_index, column] = value (argument 0, any strides)."""
        self.builder.store(value, self.builder.bitcast(self.out_pointer(b_index, column), _F32.as_pointer()))


def _each_pass(builder, arrays, k0, k1, pair, emit, tokens_at_once=TOKENS):
    """emit(row pointer, i, T, first, after) for every row i of the range (rows k0..k1-1, each
    followed by row i + pair when pair > 0: formats/blocks.chunk_rows) and every input: TOKENS
    inputs at a time, then one at a time; `after` points at the row the pass takes next (for a
    prefetch: it may lie past the last row). Inputs outside, rows inside: a group's inputs stay
    in L1 while the range's rows (a few KB) pass over them."""
    def rows(T, first):
        _each_row(builder, arrays, k0, k1, pair, lambda row, i, after: emit(row, i, T, first, after))

    _each_group(builder, arrays.shape(0), (tokens_at_once, 1), rows)


def _each_group(builder, count, sizes, emit):
    """emit(T, first) over inputs 0..count-1 in groups: as many of sizes[0] as fit, then of
    sizes[1], ... (the last size 1)."""
    done = _I64(0)
    for T in sizes:
        groups = builder.sdiv(builder.sub(count, done), _I64(T))
        start = done
        with cgutils.for_range(builder, groups) as g:
            emit(T, builder.add(start, builder.mul(g.index, _I64(T))))
        done = builder.add(done, builder.mul(groups, _I64(T)))


def _each_row(builder, arrays, k0, k1, pair, emit):
    """emit(row pointer, i, after) for every row i of the range (rows k0..k1-1, each followed by
    row i + pair when pair > 0: formats/blocks.chunk_rows), `after` pointing at the row taken
    next (for a prefetch: it may lie past the last row)."""
    per_k = builder.add(_I64(1), builder.zext(builder.icmp_signed(">", pair, _I64(0)), _I64))
    with cgutils.for_range(builder, builder.sub(k1, k0)) as loop:
        with cgutils.for_range(builder, per_k) as second:
            i = builder.add(builder.add(k0, loop.index), builder.mul(second.index, pair))
            paired = builder.and_(builder.icmp_signed("==", second.index, _I64(0)), builder.icmp_signed(">", pair, _I64(0)))
            after = builder.select(paired, builder.add(i, pair), builder.add(builder.add(k0, loop.index), _I64(1)))
            emit(arrays.row_pointer(1, i), i, arrays.row_pointer(1, after))


def _is_array(ty, dtype, ndim, contiguous=True) -> bool:
    return (isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim
            and (ty.layout == "C" or not contiguous))


def _signature(codegen, args, inputs, tiles=False):
    """The typing of rows(out, w, *inputs, k0, k1, pair): out (B, d) float32, w (d, row bytes)
    uint8, inputs 2-D C arrays of the dtypes `inputs`, k0, k1, pair integers; None (no match)
    for anything else. Only a target with AVX-512 VNNI compiles these (the tiles: or AVX2)."""
    if not (simd.TILE_SIMD if tiles else VNNI512):
        raise numba.core.errors.TypingError("the GGUF VNNI rows need a target CPU with AVX-512 VNNI"
                                            + (" or AVX2" if tiles else ""))
    out, w, *arrays, k0, k1, pair = args
    if not (_is_array(out, types.float32, 2, contiguous=False) and _is_array(w, types.uint8, 2)
            and len(arrays) == len(inputs) and all(_is_array(a, t, 2) for a, t in zip(arrays, inputs))
            and all(isinstance(t, types.Integer) for t in (k0, k1, pair))):
        return None
    return types.void(*args), codegen


def _arguments(context, builder, signature, args):
    """The array arguments (_Arrays: out, w, inputs...) and k0, k1, pair as int64."""
    arrays = _Arrays(context, builder, signature.args[:-3], args[:-3])
    return arrays, [context.cast(builder, a, t, types.int64) for a, t in zip(args[-3:], signature.args[-3:])]


def _named(typer, name: str):
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


def _legacy_intrinsic(fmt: Legacy):
    """rows(out, w, xu, xs, xd, x8, xds, k0, k1, pair): out[b, i] = row i of w . x_b for every
    input b and the rows i of a range (formats/blocks.chunk_rows).  out (B, d) float32, w (d, n /
    32 * size) uint8, xu (B, n) uint8 and xs (B, n) int8: x + 128 and x in formats/gguf_legacy.
    quantize_q8_32's layout, xd, xds (B, n / 32) float32: the scales and the scales times the
    sums of x, x8 (B, n / 32) int32 -8 times the sums; shapes checked by the caller

    A pass over a row for several inputs decodes each piece of it once into signed bytes and
    starts every input's vpdpbusd at -128 * sum(w) (against xu, above). A pass for one input
    (generation) spends less: the nibble formats' unsigned q against the signed input xs,
    started at -8 (or -16) * sum(x) for Q4_0 (Q5_0), at 0 for the formats with a min."""
    direct = not fmt.int8  # whether one input takes the unsigned q against xs

    def typer(typingctx, out, w, xu, xs, xd, x8, xds, k0, k1, pair):
        inputs = (types.uint8, types.int8, types.float32, types.int32, types.float32)
        return _signature(codegen, (out, w, xu, xs, xd, x8, xds, k0, k1, pair), inputs)

    def codegen(context, builder, signature, args):
        v = _IR(builder)
        arrays, (k0, k1, pair) = _arguments(context, builder, signature, args)
        blocks = builder.sdiv(arrays.shape(1, 1), _I64(fmt.size))
        pairs = builder.sdiv(blocks, _I64(2))
        f16 = _vec(_F32, 16)

        def scales(row, a, pair, field, words=None):
            """The fp16 field of block a (and of the next one, alternating) on each lane."""
            if words is not None:
                both = v.pick(words, [field // 2, (fmt.size + field) // 2] * 8)
                return builder.fpext(builder.bitcast(both, _vec(_F16, 16)), f16)
            if not pair:
                return v.splat(v.half(row, builder.add(a, _I64(field))), 8)
            first = builder.zext(v.load(row, builder.add(a, _I64(field)), _I16), _I32)
            second = builder.zext(v.load(row, builder.add(a, _I64(fmt.size + field)), _I16), _I32)
            both = v.splat(builder.or_(first, builder.shl(second, _I32(16))), 8)
            return builder.fpext(builder.bitcast(both, _vec(_F16, 16)), f16)

        def per_block(base, block, pair, spread):
            """The input floats of blocks `block` (and block + 1 when pair): spread over their
            lanes (alternating for a pair), or only on each block's first lane, 0 elsewhere."""
            count, n = (2, 16) if pair else (1, 8)
            values = v.load(base, builder.mul(block, _I64(4)), _vec(_F32, count))
            return v.pick(values, [k % count for k in range(n)]) if spread else v.widen(values, n)

        def emit(row, i, T, first, after):
            rows = [[arrays.row_pointer(k, builder.add(first, _I64(t))) for k in range(2, 7)] for t in range(T)]
            # accumulators per input: one pass over the row makes a chain of float adds, so one
            # input alone alternates between two (latency), several inputs have one each
            sets = 2 if T == 1 else 1
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(f16, None)) for _ in range(T)] for _ in range(sets)]
            signed = direct and T == 1

            def piece(index, pair, accs, wide=False):
                a = builder.mul(index, _I64(2 * fmt.size))
                words = _pair_words(v, row, a) if wide else None
                w = _legacy_weights(v, fmt, row, a, pair, offset=not signed, words=words)
                init = None if signed else v.minus_128_sums(w)
                d = scales(row, a, pair, 0, words)
                m = scales(row, a, pair, fmt.m, words) if fmt.m is not None else None
                block = builder.mul(index, _I64(2))
                width = 64 if pair else 32
                lanes_t = _vec(_I32, width // 4)
                for t, (xu, xs, xd, x8, xds) in enumerate(rows):
                    if signed:  # q . x - zero * sum(x): the offset starts the lanes
                        start = ir.Constant(lanes_t, None)
                        if fmt.zero:  # -8 * sum(x) on each block's first lane, twice for -16
                            start = v.widen(v.load(x8, builder.mul(block, _I64(4)), _vec(_I32, 2 if pair else 1)), width // 4)
                            for _ in range(fmt.zero // 8 - 1):
                                start = builder.add(start, start)
                        lanes = v.dpbusd(start, w, v.load(xs, builder.mul(index, _I64(64)), _vec(_I8, width)))
                    else:
                        lanes = v.dpbusd(init, v.load(xu, builder.mul(index, _I64(64)), _vec(_I8, width)), w)
                    scale = builder.fmul(d, per_block(xd, block, pair, True), flags=_CONTRACT)
                    acc = v.scaled(ir.Constant(d.type, None) if not pair else builder.load(accs[t]), lanes, scale)
                    if m is not None:
                        sums = per_block(xds, block, pair, False)
                        acc = builder.fadd(acc, builder.fmul(m, sums, flags=_CONTRACT), flags=_CONTRACT)
                    if not pair:
                        acc = builder.fadd(builder.load(accs[t]), v.widen(acc, 16), flags=_CONTRACT)
                    builder.store(acc, accs[t])

            # pairs that 64 bytes of the row cover take one load and word permutes (nibble
            # formats), the last one or two the loads of their fields
            wide = ir.Constant(_I64, 0)
            if not fmt.int8:
                row_bytes = arrays.shape(1, 1)
                fits = builder.add(builder.sdiv(builder.sub(row_bytes, _I64(64)), _I64(2 * fmt.size)), _I64(1))
                fits = builder.select(builder.icmp_signed("<", row_bytes, _I64(64)), _I64(0), fits)
                wide = builder.select(builder.icmp_signed("<", fits, pairs), fits, pairs)
            steps = builder.sdiv(wide, _I64(sets))
            with cgutils.for_range(builder, steps) as loop:
                for k, slot in enumerate(accs):
                    piece(builder.add(builder.mul(loop.index, _I64(sets)), _I64(k)), True, slot, wide=True)
            with cgutils.for_range(builder, builder.sub(pairs, builder.mul(steps, _I64(sets)))) as loop:
                piece(builder.add(builder.mul(steps, _I64(sets)), loop.index), True, accs[0])
            with builder.if_then(builder.icmp_signed("!=", builder.mul(pairs, _I64(2)), blocks)):
                piece(pairs, False, accs[0])
            for t in range(T):
                total = builder.load(accs[0][t])
                for slot in accs[1:]:
                    total = builder.fadd(total, builder.load(slot[t]))
                arrays.store_out(v.hsum(total), builder.add(first, _I64(t)), i)

        _each_pass(builder, arrays, k0, k1, pair, emit)
        return context.get_dummy_value()

    return typer


q8_0 = _named(_legacy_intrinsic(Q8_0), "q8_0")
q4_0 = _named(_legacy_intrinsic(Q4_0), "q4_0")
q4_1 = _named(_legacy_intrinsic(Q4_1), "q4_1")
q5_0 = _named(_legacy_intrinsic(Q5_0), "q5_0")
q5_1 = _named(_legacy_intrinsic(Q5_1), "q5_1")


@dataclass(frozen=True)
class KQuant:
    """A 256-value super-block type's layout (formats/gguf_kquants.py): bytes, and the byte
    offset of its fifth bits (Q5_K; None: none). Q6_K has its own decoder."""

    size: int
    qs: int = 0
    qh: int | None = None
    six: bool = False


Q4_K = KQuant(144, qs=16)
Q5_K = KQuant(176, qs=48, qh=16)
Q6_K = KQuant(210, six=True)


def _kquant_pieces(v: _IR, fmt: KQuant, sb):
    """The decoded super-block at byte pointer sb: (weights: 4 x 64 bytes in natural order,
    scales: 4 x (16,) int32 for vpdpwssd (each lane's sub-block scale in its low int16), starts:
    4 vpdpbusd start values or None, mins (16,) int16 (m_j twice each, against the per-16 sums)
    or None, d, dmin or None)."""
    b = v.b
    if fmt.six:
        weights, starts = [], []
        for h in range(2):  # 128 values: ql[64h:64h+64] (low nibbles, then high), qh[32h:32h+32]
            ql = v.load(sb, 64 * h, _vec(_I8, 64))
            qh = v.load(sb, 128 + 32 * h, _vec(_I8, 32))
            three = v.splat_const(_I8, 3, 64)
            for part, nibbles in ((0, b.and_(ql, v.splat_const(_I8, 15, 64))), (1, b.lshr(ql, v.splat_const(_I8, 4, 64)))):
                shifted = [b.lshr(qh, v.splat_const(_I8, s, 32)) if s else qh for s in (4 * part, 4 * part + 2)]
                high = b.shl(b.and_(v.join(*shifted), three), v.splat_const(_I8, 4, 64))
                w = b.sub(b.or_(nibbles, high), v.splat_const(_I8, 32, 64))
                weights.append(w)
                starts.append(v.minus_128_sums(w))
        sixteen = b.and_(b.sext(v.load(sb, 192, _vec(_I8, 16)), _vec(_I32, 16)), v.splat_const(_I32, 0xFFFF, 16))
        scales = [v.pick(sixteen, [4 * c + k // 4 for k in range(16)]) for c in range(4)]
        return weights, scales, starts, None, v.half(sb, 208), None
    # Q4_K / Q5_K: 6-bit scales and mins of 8 sub-blocks of 32, packed in 12 bytes
    four = _vec(_I8, 4)
    low, mid, top = (v.load(sb, 4 + 4 * k, four) for k in range(3))
    six_bits, fifteen = v.splat_const(_I8, 63, 4), v.splat_const(_I8, 15, 4)

    def upper_two(x):  # bits 6-7 of x, moved to bits 4-5
        return b.shl(b.lshr(x, v.splat_const(_I8, 6, 4)), v.splat_const(_I8, 4, 4))

    sc = v.join(b.and_(low, six_bits), b.or_(b.and_(top, fifteen), upper_two(low)))
    mn = v.join(b.and_(mid, six_bits), b.or_(b.lshr(top, v.splat_const(_I8, 4, 4)), upper_two(mid)))
    sc32 = b.zext(sc, _vec(_I32, 8))
    scales = [v.pick(sc32, [2 * c + k // 8 for k in range(16)]) for c in range(4)]
    mins = v.pick(b.zext(mn, _vec(_I16, 8)), [k // 2 for k in range(16)])
    qh = v.load(sb, fmt.qh, _vec(_I8, 32)) if fmt.qh is not None else None
    weights = []
    for c in range(4):
        q = v.load(sb, fmt.qs + 32 * c, _vec(_I8, 32))
        w = v.join(b.and_(q, v.splat_const(_I8, 15, 32)), b.lshr(q, v.splat_const(_I8, 4, 32)))
        if qh is not None:  # bit 2c of qh[l]: value l's fifth bit; bit 2c + 1: value 32 + l's
            zero = ir.Constant(_vec(_I8, 32), None)
            bits = [b.icmp_unsigned("!=", b.and_(qh, v.splat_const(_I8, 1 << k, 32)), zero) for k in (2 * c, 2 * c + 1)]
            w = b.or_(w, b.select(v.join(*bits), v.splat_const(_I8, 16, 64), ir.Constant(_vec(_I8, 64), None)))
        weights.append(w)
    return weights, scales, [None] * 4, mins, v.half(sb, 0), v.half(sb, 2)


def _kquant_intrinsic(fmt: KQuant):
    """rows(out, w, x, xd, sums, k0, k1, pair): out[b, i] = row i of w . x_b for every input b
    and the rows i of a range (formats/blocks.chunk_rows).  out (B, d) float32, w (d, n / 256 *
    size) uint8, x (B, n) int8 (Q6_K: uint8, xu = x + 128), xd (B, n / 256) float32, sums (B,
    n / 16) int16 (formats/gguf_kquants.py), shapes checked by the caller"""
    x_dtype = types.uint8 if fmt.six else types.int8

    def typer(typingctx, out, w, x, xd, sums, k0, k1, pair):
        return _signature(codegen, (out, w, x, xd, sums, k0, k1, pair), (x_dtype, types.float32, types.int16))

    def codegen(context, builder, signature, args):
        v = _IR(builder)
        arrays, (k0, k1, pair) = _arguments(context, builder, signature, args)
        supers = builder.sdiv(arrays.shape(1, 1), _I64(fmt.size))
        f16, f8, int_lanes = _vec(_F32, 16), _vec(_F32, 8), _vec(_I32, 16)

        def emit(row, i, T, first, after):
            tokens = [[arrays.row_pointer(k, builder.add(first, _I64(t))) for k in (2, 3, 4)] for t in range(T)]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f16, None)) for _ in range(T)]
            min_accs = [cgutils.alloca_once_value(builder, ir.Constant(f8, None)) for _ in range(T)]
            with cgutils.for_range(builder, supers) as loop:
                s = loop.index
                sb = v.at(row, builder.mul(s, _I64(fmt.size)))
                if T == 1:  # one token streams the rows from DRAM: ask for them ahead
                    v.prefetch(sb, KQ_AHEAD, fmt.size)
                weights, scales, starts, mins, d, dmin = _kquant_pieces(v, fmt, sb)
                for t, (x, xd, sums) in enumerate(tokens):
                    chains = [ir.Constant(int_lanes, None)] * 2  # two chains of vpdpwssd: latency
                    for c in range(4):
                        xv = v.load(x, builder.add(builder.mul(s, _I64(256)), _I64(64 * c)), _vec(_I8, 64))
                        if fmt.six:  # xu unsigned, w signed
                            part = v.dpbusd(starts[c], xv, weights[c])
                        else:  # w unsigned, x signed
                            part = v.dpbusd(ir.Constant(int_lanes, None), weights[c], xv)
                        chains[c % 2] = v.dpwssd(chains[c % 2], part, scales[c])
                    lanes = builder.add(*chains)
                    scale = v.load(xd, builder.mul(s, _I64(4)), _F32)
                    builder.store(v.scaled(builder.load(accs[t]), lanes, v.splat(builder.fmul(d, scale), 16)), accs[t])
                    if mins is not None:
                        sixteen = v.load(sums, builder.mul(s, _I64(32)), _vec(_I16, 16))
                        products = v.call("llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), sixteen, mins)
                        builder.store(v.scaled(builder.load(min_accs[t]), products, v.splat(builder.fmul(dmin, scale), 8)),
                                      min_accs[t])
            for t in range(T):
                total = v.hsum(builder.load(accs[t]))
                if not fmt.six:
                    total = builder.fsub(total, v.hsum(builder.load(min_accs[t])))
                arrays.store_out(total, builder.add(first, _I64(t)), i)

        _each_pass(builder, arrays, k0, k1, pair, emit)
        return context.get_dummy_value()

    return typer


q4_k = _named(_kquant_intrinsic(Q4_K), "q4_k")
q5_k = _named(_kquant_intrinsic(Q5_K), "q5_k")
q6_k = _named(_kquant_intrinsic(Q6_K), "q6_k")
