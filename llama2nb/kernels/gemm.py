"""The float32 matrix product of a block of tokens (prefill) in AVX-512 or AVX2, in LLVM IR (a Numba intrinsic).

Why: formats/f32.py's Numba loops multiply 4 tokens by 4 weight rows as 16 dot products, each
ending in a horizontal sum, and read 8 vectors per 16 multiply-adds; they reach about half the
core's FMA peak. This is the register-blocked form BLAS kernels use. A panel of 32 weight rows
is copied, PANEL_K columns at a time, into a buffer on the stack transposed (panel[k] = the 32
rows' column k, two vectors), and then every group of TOKENS tokens runs over it:

    acc[t] (2 vectors: out[b + t, i .. i + 31]) += x[b + t, k] (one broadcast) * panel[k]

24 accumulators, two loads and 12 broadcasts (memory operands of the FMAs) per 24 FMAs, no
horizontal sums, and the outputs are stored as they lie. The copy is one pass over the weights
per block of tokens, shared by every token of the block. Each output is one running sum over
k in order, with fused multiply-adds: only kernels compiled with fastmath use this (F32_GEMM).
On AVX2 (16 registers of 8 floats) a panel is 16 rows and a group 6 tokens: 12 accumulators,
two loads and 6 broadcasts per 12 FMAs (LLVM splits each 16-lane vector in two).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils

from . import simd
from .vnni_gguf import _F32, _I32, _I64, _IR, _Arrays, _each_group, _is_array, _named, _vec

# AVX-512: 32 weight rows a panel (two 16-lane vectors) and 12 tokens a pass over it, 24
# accumulators of the 32 vector registers. AVX2: 16 rows (one 16-lane vector, two registers) and
# 6 tokens, 12 accumulators of 16 registers (the shape of BLAS's 6 x 16 AVX2 kernels).
PANEL_ROWS = 32 if simd.AVX512 else 16
TOKENS = 12 if simd.AVX512 else 6
HALVES = PANEL_ROWS // 16  # 16-lane vectors a panel's column
PACK = 16 if simd.AVX512 else 8  # floats a vector register holds: the side of _pack's transposed blocks
PANEL_K = 256  # columns a panel holds: 32 KB (16 KB on AVX2), in L1 beside the tokens' 12 KB


def _gemm_intrinsic():
    """f32_panels(out, x, w, i0, i1): out[b, i] = x[b] . w[i] for every token b and the rows
    i0 <= i < i1, in panels of PANEL_ROWS rows.  out (B, d), x (B, n), w (d, n) float32, each
    with unit column stride (the caller checks it and the shapes)."""

    def typer(typingctx, out, x, w, i0, i1):
        if not all(_is_array(a, types.float32, 2, contiguous=False) for a in (out, x, w)):
            return None
        if not all(isinstance(t, types.Integer) for t in (i0, i1)):
            return None
        return types.void(out, x, w, i0, i1), codegen

    def codegen(context, builder, signature, args):
        v, b = _IR(builder), builder
        arrays = _Arrays(context, builder, signature.args[:3], args[:3])
        i0, i1 = (context.cast(builder, a, t, types.int64) for a, t in zip(args[3:], signature.args[3:]))
        tokens, n = arrays.shape(1, 0), arrays.shape(1, 1)
        # an array of 512 vectors, not of 8,192 floats: LLVM's passes over a stack array take
        # time by its element count (a fp32 family compiled 5 s longer; as bytes, 2 minutes)
        panel = cgutils.alloca_once(b, ir.ArrayType(_vec(_F32, 16), PANEL_K * PANEL_ROWS // 16))
        panel.align = 64
        panel = b.bitcast(panel, _F32.as_pointer())
        lanes = [v.const(_I32, range(16 * h, 16 * h + 16)) for h in range(HALVES)]

        def ceil_div(a, c):
            return b.sdiv(b.add(a, _I64(c - 1)), _I64(c))

        with cgutils.for_range(b, ceil_div(b.sub(i1, i0), PANEL_ROWS)) as blocks:
            i = b.add(i0, b.mul(blocks.index, _I64(PANEL_ROWS)))
            rows = b.sub(i1, i)
            rows = b.select(b.icmp_signed("<", rows, _I64(PANEL_ROWS)), rows, _I64(PANEL_ROWS))
            rows32 = v.splat(b.trunc(rows, _I32), 16)
            masks = [b.icmp_signed("<", lane, rows32) for lane in lanes]
            with cgutils.for_range(b, ceil_div(n, PANEL_K)) as chunks:
                k0 = b.mul(chunks.index, _I64(PANEL_K))
                width = b.sub(n, k0)
                width = b.select(b.icmp_signed("<", width, _I64(PANEL_K)), width, _I64(PANEL_K))
                _pack(b, v, arrays, panel, i, rows, k0, width)
                first = b.icmp_signed("==", chunks.index, _I64(0))

                def emit(T, start):
                    _pass(b, v, arrays, panel, masks, i, k0, width, first, T, start)

                _each_group(b, tokens, (TOKENS, 4, 2, 1), emit)
        return context.get_dummy_value()

    return typer


def _pack(b, v, arrays, panel, i, rows, k0, width):
    """panel[k * PANEL_ROWS + r] = w[i + r, k0 + k] for k < width, r < rows (rows past the
    matrix repeat row i: their lanes are never stored; the columns past width up to a multiple of
    S hold zeros, and no pass reads them): S x S blocks, S the floats of a vector register (16 on
    AVX-512, 8 on AVX2, so that a block's S vectors fit the registers), each S row loads (masked
    only in the last block of a partial chunk), a transpose in S log2(S) two-vector shuffles and S
    stores."""
    S = PACK
    vec = _vec(_F32, S)
    starts = []  # w[i + r, k0] (row i past the matrix), computed once a chunk
    for r in range(PANEL_ROWS):
        row = b.select(b.icmp_signed("<", _I64(r), rows), b.add(i, _I64(r)), i)
        starts.append(b.gep(b.bitcast(arrays.row_pointer(2, row), _F32.as_pointer()), [k0]))
    with cgutils.for_range(b, b.sdiv(b.add(width, _I64(S - 1)), _I64(S))) as blocks:
        kk = b.mul(blocks.index, _I64(S))
        partial = b.icmp_signed("<", b.sub(width, kk), _I64(S))
        columns = b.icmp_signed("<", v.const(_I32, range(S)), v.splat(b.trunc(b.sub(width, kk), _I32), S))
        for g in range(PANEL_ROWS // S):
            pointers = [b.bitcast(b.gep(starts[S * g + r], [kk]), vec.as_pointer()) for r in range(S)]
            with b.if_else(partial) as (masked, whole):
                with masked:
                    in_part = [_masked_load(v, pointer, columns) for pointer in pointers]
                    from_part = b.block
                with whole:
                    in_whole = [b.load(pointer, align=4) for pointer in pointers]
                    from_whole = b.block
            vectors = []
            for one, other in zip(in_part, in_whole):
                vectors.append(b.phi(vec))
                vectors[-1].add_incoming(one, from_part)
                vectors[-1].add_incoming(other, from_whole)
            h = S // 2
            while h:  # swap the off-diagonal h x h blocks of every 2h x 2h block
                for r in range(S):
                    if r & h:
                        continue
                    low, high = vectors[r], vectors[r + h]
                    vectors[r] = b.shuffle_vector(low, high, v.const(_I32, [c if not c & h else S + c - h for c in range(S)]))
                    vectors[r + h] = b.shuffle_vector(low, high, v.const(_I32, [c + h if not c & h else S + c for c in range(S)]))
                h //= 2
            for c in range(S):
                at = b.gep(panel, [b.add(b.mul(b.add(kk, _I64(c)), _I64(PANEL_ROWS)), _I64(S * g))])
                b.store(vectors[c], b.bitcast(at, vec.as_pointer()), align=4 * S)


def _pass(b, v, arrays, panel, masks, i, k0, width, first, T, start):
    """out[start + t, i .. i + 31] (+)= x[start + t, k0 .. k0 + width) . the panel, t < T."""
    f16 = _vec(_F32, 16)
    outs = [[b.bitcast(arrays.out_pointer(b.add(start, _I64(t)), b.add(i, _I64(16 * h))), f16.as_pointer())
             for h in range(HALVES)] for t in range(T)]
    xs = [b.bitcast(arrays.row_pointer(1, b.add(start, _I64(t))), _F32.as_pointer()) for t in range(T)]
    zero = ir.Constant(f16, None)
    accs = []
    for t in range(T):
        for h in range(HALVES):
            acc = cgutils.alloca_once_value(b, zero)
            with b.if_then(b.not_(first)):
                b.store(_masked_load(v, outs[t][h], masks[h]), acc)
            accs.append(acc)
    with cgutils.for_range(b, width) as k:
        at = b.gep(panel, [b.mul(k.index, _I64(PANEL_ROWS))])
        p = [b.load(b.bitcast(b.gep(at, [_I64(16 * h)]), f16.as_pointer()), align=64) for h in range(HALVES)]
        column = b.add(k0, k.index)
        for t in range(T):
            xv = v.splat(b.load(b.gep(xs[t], [column])), 16)
            for h in range(HALVES):
                acc = accs[HALVES * t + h]
                b.store(v.call("llvm.fma.v16f32", f16, xv, p[h], b.load(acc)), acc)
    for t in range(T):
        for h in range(HALVES):
            v.call("llvm.masked.store.v16f32.p0", ir.VoidType(), b.load(accs[HALVES * t + h]), outs[t][h], _I32(4), masks[h])


def _masked_load(v, pointer, mask):
    lanes = mask.type.count
    vec = _vec(_F32, lanes)
    return v.call(f"llvm.masked.load.v{lanes}f32.p0", vec, pointer, _I32(4), mask, ir.Constant(vec, None))


f32_panels = _named(_gemm_intrinsic(), "f32_panels")
