"""The core's compute peaks as Numba intrinsics written in LLVM IR: CHAINS independent chains of
the widest fp32 FMA, or of VNNI's vpdpbusd, on registers only.

Numba has no vector types and LLVM finds no FMA chain in a scalar loop that it would keep in
registers, so the loops are written in IR, as kernels/simd.py writes the Q8_0 dot product. Twelve
chains hide the instructions' latency on every x86 core with two vector pipes; nothing is loaded
or stored in the loop. The accumulators are summed and returned so that the loop stays live.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..kernels.simd import target_features

CHAINS = 12


def fma_width() -> int:
    """fp32 lanes of the widest FMA: 16 with AVX-512, else 8 (AVX2's FMA3)."""
    return 16 if "avx512f" in target_features() else 8


def vnni_width() -> int:
    """int32 lanes of the widest vpdpbusd: 16 with AVX-512 VNNI, 8 with its VL form or
    AVX-VNNI, 0 without VNNI."""
    features = target_features()
    if {"avx512vnni", "avx512f"} <= features:
        return 16
    return 8 if {"avx512vnni", "avx512vl"} <= features or "avxvnni" in features else 0


def fma_ops_per_iteration() -> int:
    return CHAINS * fma_width() * 2  # a multiply and an add per lane


def vnni_ops_per_iteration() -> int:
    return CHAINS * vnni_width() * 4 * 2  # four byte products and their sums per lane


def _chains(builder, n, vector, start, step):
    """CHAINS accumulators of type `vector` from `start`, each replaced n times by step(acc);
    returns their sum's first lane."""
    accumulators = [cgutils.alloca_once_value(builder, start(k)) for k in range(CHAINS)]
    with cgutils.for_range(builder, n):
        for acc in accumulators:
            builder.store(step(builder.load(acc)), acc)
    total = builder.load(accumulators[0])
    for acc in accumulators[1:]:
        add = builder.fadd if isinstance(vector.element, ir.FloatType) else builder.add
        total = add(total, builder.load(acc))
    return builder.extract_element(total, ir.IntType(32)(0))


@intrinsic
def fma_chains(typingctx, n):
    """n iterations of CHAINS vector FMAs (acc = acc * m + c); returns a float32 of the result."""
    if not isinstance(n, types.Integer):
        return None
    width = fma_width()
    vector = ir.VectorType(ir.FloatType(), width)

    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                             f"llvm.fma.v{width}f32")
        m, c = ir.Constant(vector, [0.999] * width), ir.Constant(vector, [1e-3] * width)
        return _chains(builder, args[0], vector, lambda k: ir.Constant(vector, [1.0 + k / 64] * width),
                       lambda acc: builder.call(fma, [acc, m, c]))

    return types.float32(n), codegen


@intrinsic
def vnni_chains(typingctx, n):
    """n iterations of CHAINS vpdpbusd (acc += the four byte products of each lane); returns
    the result's first lane as an int32."""
    if not isinstance(n, types.Integer) or not vnni_width():
        return None
    width = vnni_width()
    vector = ir.VectorType(ir.IntType(32), width)

    def codegen(context, builder, signature, args):
        dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                                f"llvm.x86.avx512.vpdpbusd.{width * 32}")
        a, b = ir.Constant(vector, [0x01020304] * width), ir.Constant(vector, [0x01FF01FF] * width)
        return _chains(builder, args[0], vector, lambda k: ir.Constant(vector, [k] * width),
                       lambda acc: builder.call(dpbusd, [acc, a, b]))

    return types.int32(n), codegen
