"""The Q8_0 row dot product in VNNI instructions (AVX-512 VNNI or AVX-VNNI), where the CPU has them.

From matmul_q8's portable loops LLVM makes vpmovsxbw + vpdpwssd: bytes widened to 16 bits,
16 multiply-adds per instruction, and a horizontal sum for every group.
VNNI's vpdpbusd multiplies 32 pairs of bytes and adds them in fours into 8 int32 lanes in one
instruction, but LLVM does not find it in scalar code and Numba has no vector types, so
`row_dot_q8` writes the loop in LLVM IR itself, as a Numba intrinsic (1.5-1.6x the portable
loops' speed; figures in benchmarks/performance.md):

    for each group g:                              # group_size bytes, 16 or 32 at a time
        lanes = vpdpbusd(0, |x|, w * sign(x))      # vpdpbusd wants unsigned x signed bytes
        acc  += float(lanes) * (xs[g] * ws[g])     # no horizontal sum per group...
    return sum(acc lanes)                          # ...only one per row

|x| and w * sign(x) come from vpsignb. Q8_0 values lie in -127..127, as export and quantize()
write them; a -128 (which neither writes) would make w * sign(x) wrap.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def target_features() -> set[str]:
    """The features of the CPU Numba compiles for (LLVM's names: avx512f, avx512vnni, ...).
    Honours NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, which make Numba compile for another CPU than
    this one (a portable cache, say); empty under NUMBA_DISABLE_JIT (nothing is compiled)."""
    if numba.config.DISABLE_JIT:
        return set()
    if numba.config.CPU_NAME not in (None, "host"):
        return {f[1:] for f in (numba.config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    import llvmlite.binding as llvm

    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def target_has_vnni() -> bool:
    """Whether the target has vpdpbusd on 128/256-bit registers: AVX-512 VNNI (Intel since Ice
    Lake, AMD since Zen 4) or AVX-VNNI (Intel since Alder Lake), which LLVM selects from the
    same intrinsic."""
    listed = target_features()
    return {"avx512vnni", "avx512vl"} <= listed or "avxvnni" in listed


VNNI = target_has_vnni()
# AVX-512 with VNNI on 512-bit registers, and BMI2's pdep (the GGUF block kernels' fast paths,
# kernels/vnni_gguf.py)
VNNI512 = {"avx512f", "avx512bw", "avx512vl", "avx512vnni", "bmi2"} <= target_features()
AVX512 = "avx512f" in target_features()  # 16 float lanes, masked loads and stores (kernels/gemm.py)
# kernels/gemm.py's panels: in AVX-512, or in AVX2 with FMA (16 lanes as two 8-lane registers)
F32_PANELS = AVX512 or {"avx2", "fma"} <= target_features()


def vnni_chunk(group_size: int) -> int:
    """Bytes per vpdpbusd for this group size: 32 (ymm) or 16 (xmm); 0 when it fits neither."""
    if group_size <= 0:
        return 0
    return 32 if group_size % 32 == 0 else 16 if group_size % 16 == 0 else 0


_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_CONTRACT = ("contract",)  # fuse multiply and add; the order of the sums is the one written here
_ACCUMULATORS = 2  # groups in flight: alternating accumulators hide the float adds' latency


def _is_vector(ty: types.Type, dtype: types.Type) -> bool:
    return isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C" and ty.dtype == dtype


@intrinsic
def row_dot_q8(typingctx, x, xs, w, ws, group_size):
    """sum over groups g of xs[g] * ws[g] * (x_g . w_g), the int8 dot products exact in int32.
    x, w (n,) int8; xs, ws (n // group_size,) float32; group_size a compile-time constant that
    vnni_chunk() accepts. Only for a target with VNNI (see VNNI); the sum runs in another order
    than runq.c's, so only kernels compiled with fastmath use it."""
    if not VNNI:
        raise numba.core.errors.TypingError("row_dot_q8: the target CPU has no VNNI")
    if not isinstance(group_size, types.IntegerLiteral):
        return None  # Numba retries with the constant's value
    gs = group_size.literal_value
    if not (vnni_chunk(gs) and _is_vector(x, types.int8) and _is_vector(w, types.int8)
            and _is_vector(xs, types.float32) and _is_vector(ws, types.float32)):
        return None
    chunk = vnni_chunk(gs)
    lanes = chunk // 4
    bytes_t, lanes_t, floats_t = ir.VectorType(_I8, chunk), ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)
    psign_name = "llvm.x86.avx2.psign.b" if chunk == 32 else "llvm.x86.ssse3.psign.b.128"
    dpbusd_name = f"llvm.x86.avx512.vpdpbusd.{chunk * 8}"

    def codegen(context, builder, signature, args):
        xa, xsa, wa, wsa = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:4], args[:4]))
        module = builder.module
        psign = cgutils.get_or_insert_function(module, ir.FunctionType(bytes_t, [bytes_t, bytes_t]), psign_name)
        dpbusd = cgutils.get_or_insert_function(module, ir.FunctionType(lanes_t, [lanes_t] * 3), dpbusd_name)
        n = cgutils.unpack_tuple(builder, xa.shape)[0]
        groups = builder.sdiv(n, n.type(gs))
        x_bytes = builder.bitcast(xa.data, _I8.as_pointer())
        w_bytes = builder.bitcast(wa.data, _I8.as_pointer())
        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(floats_t, None)) for _ in range(_ACCUMULATORS)]
        undef = ir.Constant(floats_t, ir.Undefined)

        def load(base, offset):
            return builder.load(builder.bitcast(builder.gep(base, [offset]), bytes_t.as_pointer()), align=1)

        def accumulate_group(g, accumulator):
            lanes_sum = ir.Constant(lanes_t, None)  # (lanes,) int32
            start = builder.mul(g, g.type(gs))
            for c in range(0, gs, chunk):
                offset = builder.add(start, g.type(c))
                xv, wv = load(x_bytes, offset), load(w_bytes, offset)
                magnitude = builder.call(psign, [xv, xv])  # |x| (unsigned)
                signed_w = builder.call(psign, [wv, xv])  # w * sign(x)
                lanes_sum = builder.call(dpbusd, [lanes_sum, builder.bitcast(magnitude, lanes_t),
                                                  builder.bitcast(signed_w, lanes_t)])
            scale = builder.fmul(builder.load(builder.gep(xsa.data, [g])), builder.load(builder.gep(wsa.data, [g])))
            splat = builder.shuffle_vector(builder.insert_element(undef, scale, _I32(0)), undef,
                                           ir.Constant(lanes_t, [0] * lanes))
            scaled = builder.fmul(builder.sitofp(lanes_sum, floats_t), splat, flags=_CONTRACT)
            builder.store(builder.fadd(builder.load(accumulator), scaled, flags=_CONTRACT), accumulator)

        steps = builder.sdiv(groups, groups.type(_ACCUMULATORS))
        with cgutils.for_range(builder, steps) as loop:
            first = builder.mul(loop.index, groups.type(_ACCUMULATORS))
            for k, accumulator in enumerate(accumulators):
                accumulate_group(builder.add(first, groups.type(k)), accumulator)
        done = builder.mul(steps, groups.type(_ACCUMULATORS))
        with cgutils.for_range(builder, builder.sub(groups, done)) as loop:
            accumulate_group(builder.add(done, loop.index), accumulators[0])
        total = builder.load(accumulators[0])
        for accumulator in accumulators[1:]:
            total = builder.fadd(total, builder.load(accumulator))
        width = lanes
        while width > 1:  # add the upper half of the lanes to the lower half: a tree, not a chain
            width //= 2
            halves = [ir.Constant(ir.VectorType(_I32, width), list(range(start, start + width)))
                      for start in (0, width)]
            total = builder.fadd(builder.shuffle_vector(total, total, halves[0]),
                                 builder.shuffle_vector(total, total, halves[1]))
        return builder.extract_element(total, _I32(0))

    return types.float32(x, xs, w, ws, group_size), codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer `bits` (a bitcast, which
    LLVM vectorises like any arithmetic: it builds 2^k in kernels.exp_poly)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], _I32) if bits.bitwidth > 32 else args[0], _F32)

    return types.float32(bits), codegen


# F16C (vcvtph2ps: 8 or 16 halves to floats in one instruction): Intel since Ivy Bridge, AMD
# since Piledriver; elsewhere LLVM would call a runtime function for the same conversion
F16C = "f16c" in target_features()
# The 16-row tiles' intrinsics (kernels/vnni_tiles.py) build for AVX-512 VNNI, or for AVX2 (with
# FMA and F16C: Intel since Haswell, AMD since Excavator) in vpmaddubsw and vpmaddwd
TILES_AVX2 = {"avx2", "fma", "f16c"} <= target_features() and not VNNI512
TILE_SIMD = VNNI512 or TILES_AVX2


@intrinsic
def float32_from_half_bits(typingctx, bits):
    """The float32 equal to the IEEE half whose bits are the low 16 bits of the integer `bits`
    (fpext, which LLVM vectorises into vcvtph2ps). Only for a target with F16C (see F16C)."""
    if not F16C:
        raise numba.core.errors.TypingError("float32_from_half_bits: the target CPU has no F16C")
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0], ir.HalfType())
        return builder.fpext(half, _F32)

    return types.float32(bits), codegen
