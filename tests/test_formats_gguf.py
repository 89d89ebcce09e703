"""GGUF's tensor types as weight formats (formats/gguf_*.py): their bytes against the gguf
package (llama.cpp's own Python, the independent oracle), their views against the file mapping,
their activation quantizers and matmuls against tests/naive.py (exact integer arithmetic on the
same quantized activations), portable loops and VNNI intrinsics, every fastmath setting.

Tolerances are about ten times the largest error observed (`python -m tests.test_formats_gguf`
prints the observed table), relative to the largest |reference| value."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numba
import numpy as np
import pytest

from llama2nb import formats
from llama2nb.formats import blocks as block_module
from llama2nb.formats.base import GGML_TYPES, REGISTRY, by_ggml_type
from llama2nb.kernels import simd
from llama2nb.kernels.jit import FASTMATH, compile_family

from . import naive
from .conftest import SHARED, requires

SETTINGS = list(FASTMATH)
GGUF_DIR = SHARED / "models" / "gguf"
LEGACY = ["q8_0_block", "q4_0", "q4_1", "q5_0", "q5_1"]
KQUANTS = ["q4_k", "q5_k", "q6_k"]
FLOATS = ["f16", "bf16"]
IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0_block": 8, "q4_k": 12, "q5_k": 13,
       "q6_k": 14, "bf16": 30}
# (fastmath, vnni): the portable loops under every setting, the VNNI intrinsics where they run
TOLERANCE = {"legacy": 1e-6, "kquant": 1e-6, "float": 2e-6}  # relative, see the module docstring


def family(fastmath: str, vnni: bool, f16c: bool = True):
    """Every kernel compiled for one fastmath setting, with (vnni) or without the VNNI paths
    (which, as in the engine, need fastmath and the CPU), with the CPU's half-to-float
    conversion (f16c, where it has one) or the integer one."""
    return _family(fastmath, vnni and simd.VNNI512 and fastmath != "off", f16c and simd.F16C,
                   vnni and simd.TILE_SIMD and fastmath != "off")


@functools.cache
def _family(fastmath: str, vnni: bool, f16c: bool, tiles: bool):
    return compile_family(fastmath, {"FAST_EXP": fastmath == "full", "VNNI512": vnni, "F16C": f16c, "TILES": tiles})


def rel_err(ours, reference) -> float:
    """The largest absolute difference relative to the reference's largest value; inf where any
    is not finite (a NaN must not vanish in a max() over cases: max(0.0, nan) is 0.0)."""
    diff = np.abs(np.asarray(ours, np.float64) - reference)
    return float(diff.max() / np.max(np.abs(reference))) if np.isfinite(diff).all() else float("inf")


def random_blocks(name, count, rng, extreme=False, size=1.0):
    """`count` random blocks with sane fp16 scales (random bytes elsewhere): K-quants' sub-block
    scales and mins take their whole range, so they differ widely within a super-block.
    extreme: every q at its largest magnitude (the int16 and int32 lanes' worst case); size
    scales the fp16 scales."""
    fmt = REGISTRY[name]()
    raw = rng.integers(0, 256, (count, fmt.block_bytes), dtype=np.uint8)
    if extreme:
        fill = {"q8_0_block": 0x81, "q6_k": 0x00}.get(name, 0xFF)  # -127 for Q8_0, q - 32 = -32 for Q6_K
        raw[:, :] = fill
        if name == "q6_k":
            raw[:, 192:208] = 0x80  # scales -128
        if name in ("q4_k", "q5_k"):
            raw[:, 4:16] = 0xFF  # scales and mins 63
    scales = lambda: (size * rng.uniform(0.5, 2.0, count) * 10.0 ** rng.integers(-4, -1, count)).astype(np.float16)
    fields = {"q6_k": [208]}.get(name, [0, 2] if name in ("q4_1", "q5_1", "q4_k", "q5_k") else [0])
    for at in fields:
        raw[:, at:at + 2] = scales().view(np.uint8).reshape(-1, 2)
    return raw


def random_matrix(name, rows, cols, rng, extreme=False, size=1.0):
    fmt = REGISTRY[name]()
    if name in FLOATS:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return fmt.quantize(values)
    return fmt.from_blocks(random_blocks(name, rows * cols // fmt.block_size, rng, extreme, size), (rows, cols))


def gguf_tensors(file_name):
    """(name, ggml type, numpy shape, raw bytes (rows, row bytes)) of a shared GGUF file."""
    reader = gguf.GGUFReader(GGUF_DIR / file_name)
    return [(t.name, int(t.tensor_type), tuple(int(s) for s in reversed(t.shape)), np.asarray(t.data))
            for t in reader.tensors if len(t.shape) == 2]


# ----------------------------------------------------------------------------------------------
# The registry and the views


def test_every_type_is_found_by_its_ggml_id():
    for name, type_id in IDS.items():
        fmt = by_ggml_type(type_id)
        assert fmt.name == name and fmt.ggml_type == type_id and REGISTRY[name] is type(fmt)
        assert fmt == by_ggml_type(type_id)  # values: equal, and hashable as one
    assert set(GGML_TYPES) == set(IDS.values())
    for type_id, name in ((10, "Q2_K"), (20, "IQ4_NL"), (999, None)):
        with pytest.raises(ValueError, match=f"ggml type {type_id} is not one llama2nb reads"):
            by_ggml_type(type_id)


def test_block_sizes_are_ggml_s():
    for name, type_id in IDS.items():
        fmt = REGISTRY[name]()
        assert (fmt.block_size, fmt.block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]


def test_registering_a_second_format_under_a_taken_name_or_id_is_refused():
    from llama2nb.formats.base import register

    class Impostor(formats.Format):
        name = "q4_0"

    with pytest.raises(ValueError, match="already"):
        register(Impostor)
    Impostor.name, Impostor.ggml_type = "impostor", 2
    with pytest.raises(ValueError, match="already"):
        register(Impostor)
    REGISTRY.pop("impostor", None)


@pytest.mark.parametrize("name", FLOATS + LEGACY + KQUANTS)
def test_a_view_is_the_buffer_itself_read_only(name):
    fmt = REGISTRY[name]()
    rows, cols = 3, 2 * 256
    size = fmt.nbytes((rows, cols))
    assert size == rows * cols // fmt.block_size * fmt.block_bytes
    buffer = np.zeros(64 + size + 7, np.uint8)
    buffer[64:64 + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    m = fmt.view(buffer, 64, (rows, cols))
    assert m.shape == (rows, cols) and m.format == fmt
    assert np.shares_memory(m.data, buffer) and not m.data.flags.writeable
    assert m.data.view(np.uint8).tobytes() == buffer[64:64 + size].tobytes()
    with pytest.raises(ValueError, match="do not fit"):
        fmt.view(buffer, len(buffer) - size + 1, (rows, cols))
    with pytest.raises(ValueError, match="multiple of"):
        fmt.nbytes((rows, cols + fmt.block_size // 2) if fmt.block_size > 1 else (rows, 0))
    with pytest.raises(ValueError, match="2-D"):
        fmt.operand(fmt.view(buffer, 64, (rows * cols,)), fmt.scratch(1, cols))


@requires(GGUF_DIR)
@pytest.mark.parametrize("file_name", ["bundled-Q4_0.gguf", "gqa256-Q4_K_M.gguf"])
def test_views_of_a_mapped_file_are_its_tensors(file_name):
    path = GGUF_DIR / file_name
    mapped = np.memmap(path, np.uint8, mode="r")
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        fmt = by_ggml_type(int(t.tensor_type))
        shape = tuple(int(s) for s in reversed(t.shape))
        m = fmt.view(mapped, int(t.data_offset), shape)
        data = m if fmt.name == "f32" else m.data
        assert np.shares_memory(data, mapped)
        np.testing.assert_array_equal(np.asarray(data).view(np.uint8).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


# ----------------------------------------------------------------------------------------------
# dequantize and quantize against the gguf package


@requires(GGUF_DIR)
@pytest.mark.parametrize("file_name", ["bundled-Q4_0.gguf", "bundled-Q8_0.gguf", "gqa256-Q4_K_M.gguf",
                                       "gqa256-Q6_K.gguf"])
def test_dequantize_is_bit_exact_on_real_tensors(file_name):
    seen = set()
    for name, type_id, shape, raw in gguf_tensors(file_name):
        if type_id == 0:
            continue
        fmt = by_ggml_type(type_id)
        seen.add(fmt.name)
        ours = fmt.dequantize(fmt.from_blocks(raw, shape))
        theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(type_id))
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=name)
    assert seen


@pytest.mark.parametrize("name", FLOATS + LEGACY + KQUANTS)
def test_dequantize_is_bit_exact_on_random_blocks(name):
    fmt = REGISTRY[name]()
    rng = np.random.default_rng(IDS[name])
    count = 64 * 256 // fmt.block_size
    raw = rng.integers(0, 256, (count, fmt.block_bytes), dtype=np.uint8) if name in FLOATS else random_blocks(name, count, rng)
    if name == "f16":  # every half, subnormals, infinities and NaNs included
        raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    m = fmt.from_blocks(raw, (raw.size // fmt.block_bytes * fmt.block_size // 256, 256))
    ours = fmt.dequantize(m)
    theirs = gguf.quants.dequantize(raw.reshape(m.shape[0], -1), gguf.GGMLQuantizationType(IDS[name]))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def awkward_values(rng, rows, cols):
    """Normal values, plus an all-zero block, a constant block, exact ties and huge/tiny ones."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0, :32] = 0.0
    x[0, 32:64] = 0.75
    x[1, :8] = [1.5, -2.5, 0.5, -0.5, 127.0, -127.0, 63.5, 3.0]
    x[2, :32] *= 1e4
    x[2, 32:64] *= 1e-6
    return x


@pytest.mark.parametrize("name", FLOATS + LEGACY)
def test_quantize_writes_the_gguf_package_s_bytes(name):
    fmt = REGISTRY[name]()
    x = awkward_values(np.random.default_rng(3), 6, 256)
    if name == "bf16":
        x[3, :4] = [np.nan, np.inf, -np.inf, 3.0e38]
    ours = b"".join(bytes(np.ascontiguousarray(part)) for part in fmt.encode(x))
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType(IDS[name]))
    assert ours == theirs.tobytes()
    assert ours == fmt.quantize(x).data.tobytes() and len(ours) == fmt.nbytes(x.shape)


@pytest.mark.parametrize("name", KQUANTS)
def test_k_quants_are_read_not_written(name):
    with pytest.raises(NotImplementedError, match="does not write"):
        REGISTRY[name]().quantize(np.zeros((1, 256), np.float32))


# ----------------------------------------------------------------------------------------------
# The 16-bit conversions


@pytest.mark.parametrize("fastmath,f16c", [(f, False) for f in SETTINGS] + [("full", True)])
def test_f16_and_bf16_convert_every_finite_value_exactly(fastmath, f16c):
    if f16c and not simd.F16C:
        pytest.skip("the CPU has no F16C")
    kernels = family(fastmath, False, f16c)
    bits = np.arange(1 << 16, dtype=np.uint16)

    flags = FASTMATH[fastmath]

    @numba.njit(fastmath=set(flags) if isinstance(flags, frozenset) else flags)
    def convert(out_f16, out_bf16, bits, f16, bf16):
        for i in range(bits.shape[0]):
            out_f16[i] = f16(bits[i])
            out_bf16[i] = bf16(bits[i])

    out_f16, out_bf16 = np.empty(1 << 16, np.float32), np.empty(1 << 16, np.float32)
    convert(out_f16, out_bf16, bits, kernels.f16_to_f32, kernels.bf16_to_f32)
    expected_f16 = bits.view(np.float16).astype(np.float32)
    expected_bf16 = (bits.astype(np.uint32) << 16).view(np.float32)
    finite = np.isfinite(expected_f16)
    np.testing.assert_array_equal(out_f16[finite].view(np.uint32) & 0x7FFFFFFF, expected_f16[finite].view(np.uint32) & 0x7FFFFFFF)
    np.testing.assert_array_equal(out_f16[finite], expected_f16[finite])  # signs too (0 == -0 here)
    finite = np.isfinite(expected_bf16)
    np.testing.assert_array_equal(out_bf16[finite], expected_bf16[finite])
    if fastmath == "off" or f16c:  # IEEE: infinities and NaNs keep their class
        np.testing.assert_array_equal(np.isnan(out_f16), np.isnan(expected_f16))
        np.testing.assert_array_equal(out_f16[np.isinf(expected_f16)], expected_f16[np.isinf(expected_f16)])


@pytest.mark.parametrize("fastmath", SETTINGS)
@pytest.mark.parametrize("name", FLOATS)
def test_16bit_matmul_matches_float64_on_the_converted_weights(name, fastmath):
    """Every tail of the blocking: one input takes rows from both halves, a block 2 rows x 4
    inputs, so odd sizes reach every remainder loop."""
    fmt = REGISTRY[name]()
    rng = np.random.default_rng(5)
    for B, d in ((1, 7), (1, 64), (3, 5), (9, 2), (4, 1)):
        m = random_matrix(name, d, 37, rng)
        x = rng.standard_normal((B, 37)).astype(np.float32)
        out = np.full((B, d), np.nan, np.float32)
        family(fastmath, False).linear(out, x, fmt.operand(m, fmt.scratch(B, 37)), 0)
        assert rel_err(out, naive.matmul(x, fmt.dequantize(m))) <= TOLERANCE["float"]


# ----------------------------------------------------------------------------------------------
# The activation quantizers


@pytest.mark.parametrize("fastmath", SETTINGS)
def test_the_inputs_are_quantized_as_llama_cpp_does(fastmath):
    """Per 32 (Q8_0) and per 256 (Q8_K, with sums per 16): exact with IEEE arithmetic; with
    fastmath, a value on a rounding boundary may move one step."""
    rng = np.random.default_rng(7)
    x = awkward_values(rng, 3, 512) * np.float32(3.0)
    x[2, 256:512] = 0.0  # an all-zero super-block
    kernels = family(fastmath, True)
    scratch = formats.Q4_0().scratch(3, 512)
    xq, xd, xsum, xu, xs, xds, x8 = (a[:3 * 512 // k].reshape(3, -1) for a, k in zip(scratch[:7], (1, 32, 32, 1, 1, 32, 32)))
    kernels.quantize_q8_32(x, xq, xd, xsum, xu, xs, xds, x8)
    k = formats.Q4_K().scratch(3, 512)
    kq, kd, ksum, ku = (a[:3 * 512 // s].reshape(3, -1) for a, s in zip(k[:4], (1, 256, 16, 1)))
    kernels.quantize_q8_k(x, kq, kd, ksum, ku)
    for q, d, group in ((xq, xd, 32), (kq, kd, 256)):
        expected_q, expected_d = naive.quantize_q8_per(x, group)
        np.testing.assert_allclose(d, expected_d, rtol=0 if fastmath != "full" else 1.2e-7)
        steps = np.abs(q.astype(int) - expected_q)
        assert steps.max() <= (0 if fastmath == "off" else 1) and (steps > 0).mean() <= 0.01
        assert np.abs(q.astype(int)).max() <= 127
    np.testing.assert_array_equal(xsum, xq.reshape(3, -1, 32).astype(int).sum(-1))
    np.testing.assert_array_equal(ksum, kq.reshape(3, -1, 16).astype(int).sum(-1))
    if simd.VNNI512 and fastmath != "off":  # what the intrinsics read
        np.testing.assert_array_equal(xs, vnni_order(xq))
        np.testing.assert_array_equal(xu, (vnni_order(xq).astype(int) + 128).astype(np.uint8))
        np.testing.assert_allclose(xds, xd * xsum, rtol=1e-7)
        np.testing.assert_array_equal(x8, -8 * xsum)
        np.testing.assert_array_equal(ku, (kq.astype(int) + 128).astype(np.uint8))


def vnni_order(xq):
    """Each pair of 32-value blocks a, b: 4-value lanes alternating a, b, lane 2m holding a's
    values 4m.. (m < 4) or 16 + 4(m - 4).. (m >= 4); an odd last block as it is."""
    B, n = xq.shape
    out = xq.copy()
    for start in range(0, n - 63, 64):
        a, b = xq[:, start:start + 32], xq[:, start + 32:start + 64]
        lanes = [blk[:, 4 * m:4 * m + 4] if m < 4 else blk[:, 16 + 4 * (m - 4):20 + 4 * (m - 4)]
                 for m in range(8) for blk in (a, b)]
        out[:, start:start + 64] = np.concatenate(lanes, axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# The block matmuls against exact integer arithmetic on the same quantized inputs

# A kernel's compile re-optimizes everything it calls (Numba links its callees in), so the
# formats' matmuls (linear_*, one per format) are tested whole in the engine's two families,
# fastmath off (portable loops) and full (VNNI where the CPU has it); the portable row loops
# they share are tested directly under every fastmath setting, and the VNNI rows under reassoc.
LINEAR_VARIANTS = [("off", False), ("full", True)]
SHAPES = [(1, 37, 5), (11, 37, 4), (3, 1, 9), (8, 70, 2)]  # (B, rows, blocks a row): 8 inputs a pass
# and the rest; odd rows (one input: pairs of rows and a last one); odd and even blocks a row


def exact(name, xq, xd, m):
    """The exact product of the quantized input (xq, xd) and the matrix m (naive.py)."""
    raw = m.data.reshape(-1, REGISTRY[name].block_bytes)
    return (naive.matmul_legacy if name in LEGACY else naive.matmul_kquant)(xq, xd, raw, name)


def inputs(name, B, cols, rng, extreme=False):
    x = rng.standard_normal((B, cols)).astype(np.float32) * np.float32(2.0)
    if extreme:  # every quantized input +-127
        x = np.where(rng.random((B, cols)) < 0.5, np.float32(-1), np.float32(1))
    return x


def matmul_error(name, fastmath, vnni, extreme=False, seed=0, shapes=SHAPES):
    """The format's whole matmul (linear_*), its input quantized in its scratch."""
    fmt = REGISTRY[name]()
    kernels = family(fastmath, vnni)
    rng = np.random.default_rng(seed + IDS[name])
    worst = 0.0
    for B, rows, blocks in shapes:
        cols = blocks * (32 if name in LEGACY else 256)
        m = random_matrix(name, rows, cols, rng, extreme)
        scratch = fmt.scratch(11, cols)
        out = np.full((B, rows), np.nan, np.float32)
        kernels.linear(out, inputs(name, B, cols, rng, extreme), fmt.operand(m, scratch), 1)
        xq = scratch[0][:B * cols].reshape(B, cols)
        xd = scratch[1][:B * cols // fmt.block_size].reshape(B, -1)
        worst = max(worst, rel_err(out, exact(name, xq, xd, m)))
    return worst


def rows_error(kind, fastmath, seed=0):
    """The portable row loops (rows_legacy, rows_kquant) of every format of a kind, over the
    row ranges a matmul splits into (blocks.chunk_rows)."""
    kernels = family(fastmath, False)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for name in LEGACY if kind == "legacy" else KQUANTS:
        fmt = REGISTRY[name]()
        for B, rows, blocks in SHAPES:
            cols = blocks * fmt.block_size if kind == "kquant" else blocks * 32
            m = random_matrix(name, rows, cols, rng)
            x = inputs(name, B, cols, rng)
            out = np.full((B, rows), np.nan, np.float32)
            if kind == "legacy":
                xq, xd, xsum = np.empty((B, cols), np.int8), np.empty((B, blocks), np.float32), np.empty((B, blocks), np.int32)
                kernels.quantize_q8_32(x, xq, xd, xsum, np.empty((B, cols), np.uint8), xq.copy(), xd.copy(), xsum.copy())
                rows_kernel = kernels.rows_legacy
            else:
                xq, xd, xsum = np.empty((B, cols), np.int8), np.empty((B, blocks), np.float32), np.empty((B, cols // 16), np.int16)
                kernels.quantize_q8_k(x, xq, xd, xsum, np.empty((B, cols), np.uint8))
                rows_kernel = kernels.rows_kquant
            for c in range(kernels.row_chunks(B, rows)):
                k0, k1, pair = kernels.chunk_rows(c, B, rows)
                rows_kernel(out, m.data, xq, xd, xsum, k0, k1, pair, fmt.block_bytes)
            worst = max(worst, rel_err(out, exact(name, xq, xd, m)))
    return worst


@pytest.mark.parametrize("fastmath", SETTINGS)
@pytest.mark.parametrize("kind", ["legacy", "kquant"])
def test_portable_rows_match_exact_integer_arithmetic(kind, fastmath):
    assert rows_error(kind, fastmath) <= TOLERANCE[kind]


@pytest.mark.parametrize("fastmath,vnni", LINEAR_VARIANTS)
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_block_matmul_matches_exact_integer_arithmetic(name, fastmath, vnni):
    assert matmul_error(name, fastmath, vnni) <= TOLERANCE["legacy" if name in LEGACY else "kquant"]


@pytest.mark.skipif(not simd.VNNI512, reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k", "q6_k"])
def test_vnni_rows_under_reassoc_match_exact_integer_arithmetic(name):
    assert matmul_error(name, "reassoc", True) <= TOLERANCE["legacy" if name in LEGACY else "kquant"]


@pytest.mark.parametrize("fastmath,vnni", LINEAR_VARIANTS)
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_block_matmul_is_exact_at_the_largest_products(name, fastmath, vnni):
    """Every q and every input at its largest magnitude: the vpdpbusd lanes that enter
    vpdpwssd must fit int16, the sums int32."""
    assert matmul_error(name, fastmath, vnni, extreme=True) <= TOLERANCE["legacy" if name in LEGACY else "kquant"]


@requires(GGUF_DIR)
@pytest.mark.parametrize("fastmath,vnni", LINEAR_VARIANTS)
@pytest.mark.parametrize("file_name", ["bundled-Q4_0.gguf", "gqa256-Q4_K_M.gguf"])
def test_block_matmul_on_real_tensors(file_name, fastmath, vnni):
    rng = np.random.default_rng(11)
    kernels = family(fastmath, vnni)
    for name, type_id, (rows, cols), raw in gguf_tensors(file_name)[:6]:
        if type_id == 0:
            continue
        fmt = by_ggml_type(type_id)
        m = fmt.from_blocks(raw, (rows, cols))
        x = rng.standard_normal((9, cols)).astype(np.float32)
        scratch = fmt.scratch(9, cols)
        out = np.empty((9, rows), np.float32)
        kernels.linear(out, x, fmt.operand(m, scratch), 1)
        group = 32 if fmt.name in LEGACY else 256
        xq, xd = scratch[0][:9 * cols].reshape(9, cols), scratch[1][:9 * cols // group].reshape(9, -1)
        reference = naive.matmul_legacy if fmt.name in LEGACY else naive.matmul_kquant
        assert rel_err(out, reference(xq, xd, raw.reshape(-1, fmt.block_bytes), fmt.name)) <= 1e-6, name
        # and close to the float matmul on the dequantized weights (what quantizing x costs)
        assert rel_err(out, naive.matmul(x, fmt.dequantize(m))) <= 0.05, name


# ----------------------------------------------------------------------------------------------
# Q4_0 and Q8_0 repacked into tiles of 16 interleaved rows (formats/interleaved.py)

TILES = ["q4_0_tiles", "q4_1_tiles", "q5_0_tiles", "q5_1_tiles", "q8_0_tiles", "q4_k_tiles", "q6_k_tiles"]
# 8 inputs a pass twice and 3 more; whole tiles; more inputs than a pass over decoded
# super-blocks keeps (vnni_tiles.DECODED_INPUTS: 64 and 3, on AVX2)
TILE_SHAPES = SHAPES + [(19, 40, 3), (1, 64, 3), (67, 21, 2)]


def tiles_error(name, fastmath, vnni, extreme=False):
    """A tiled matrix's matmul against exact integer arithmetic on its source blocks."""
    fmt = REGISTRY[name]()
    source = fmt.source.name
    kernels = family(fastmath, vnni)
    rng = np.random.default_rng(IDS[source] + 100)
    worst = 0.0
    for B, rows, blocks in TILE_SHAPES:
        cols = blocks * fmt.block_size
        m = random_matrix(source, rows, cols, rng, extreme)
        scratch = fmt.scratch(max(shape[0] for shape in TILE_SHAPES), cols)
        out = np.full((B, rows), np.nan, np.float32)
        kernels.linear(out, inputs(source, B, cols, rng, extreme), fmt.operand(fmt.pack(m), scratch), 1)
        xq, xd = scratch[0][:B * cols].reshape(B, cols), scratch[1][:B * blocks].reshape(B, blocks)
        worst = max(worst, rel_err(out, exact(source, xq, xd, m)))
    return worst


@pytest.mark.parametrize("name", TILES)
def test_tiles_hold_the_source_blocks_bit_for_bit(name):
    fmt = REGISTRY[name]()
    rng = np.random.default_rng(3)
    for rows in (1, 15, 16, 37):
        m = random_matrix(fmt.source.name, rows, 3 * fmt.block_size, rng)
        tiles = fmt.pack(m)
        assert tiles.data.shape == (-(-rows // 16), 3 * fmt.tile_bytes) and tiles.data.nbytes == fmt.nbytes(m.shape)
        np.testing.assert_array_equal(fmt.unpack(tiles).data, m.data)
        np.testing.assert_array_equal(fmt.dequantize(tiles).view(np.uint32), m.dequantize().view(np.uint32))
    with pytest.raises(ValueError, match="not found in files"):
        fmt.view(np.zeros(64, np.uint8), 0, (1, 32))


@pytest.mark.parametrize("name", TILES)
def test_a_tiles_example_has_the_types_of_what_pack_makes(name):
    """example, the stand-in the matmuls are compiled for before the packers run
    (forward.engine_examples), gives an operand of the Numba type of pack's and stack's, and
    each packer of packing_jobs runs with its job's one signature, whether the source blocks
    are mapped (read-only) or in memory."""
    from dataclasses import replace

    fmt = REGISTRY[name]()
    rng = np.random.default_rng(5)
    cols = 2 * fmt.block_size
    m = random_matrix(fmt.source.name, 37, cols, rng)
    assert not m.data.flags.writeable  # (as mapped)
    scratch = fmt.scratch(2, cols)
    expected = numba.typeof(fmt.operand(fmt.example(m), scratch))
    made = [fmt.pack(m), fmt.pack(replace(m, data=m.data.copy()))]  # (as read into memory)
    stacked = fmt.stack([random_matrix(fmt.source.name, 32, cols, rng), m])
    if stacked is not None:
        made += [*stacked[0], stacked[1]]
    assert [numba.typeof(fmt.operand(x, scratch)) for x in made] == [expected] * len(made)
    for packer, types in fmt.packing_jobs():
        assert packer.signatures == [types], packer


@pytest.mark.parametrize("name", TILES)
def test_tiles_stack_matrices_that_share_an_input(name):
    """stack: the matrices' tiles in order in one buffer, each a view of its rows there, bit
    for bit its own pack; the whole's product is the parts' side by side, bit for bit. Not
    Q6_K (generation reads each matrix's mapped blocks), nor rows short of whole tiles before
    the last matrix, nor matrices of other widths."""
    fmt = REGISTRY[name]()
    rng = np.random.default_rng(4)
    cols = 2 * fmt.block_size
    matrices = [random_matrix(fmt.source.name, rows, cols, rng) for rows in (32, 16, 37)]
    stacked = fmt.stack(matrices)
    if name == "q6_k_tiles":
        assert stacked is None
        return
    parts, whole = stacked
    assert whole.shape == (85, cols) and whole.data.shape[0] == 2 + 1 + 3
    kernels, scratch = family("full", True), fmt.scratch(3, cols)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    products = np.empty((3, 85), np.float32)
    kernels.linear(products, x, fmt.operand(whole, scratch), 1)
    at = 0
    for matrix, part in zip(matrices, parts):
        assert np.shares_memory(part.data, whole.data) and part.shape == matrix.shape
        np.testing.assert_array_equal(part.data, fmt.pack(matrix).data)
        out = np.empty((3, matrix.shape[0]), np.float32)
        kernels.linear(out, x, fmt.operand(part, scratch), 2)
        np.testing.assert_array_equal(out, products[:, at:at + matrix.shape[0]])
        at += matrix.shape[0]
    assert fmt.stack([matrices[2], matrices[0]]) is None
    assert fmt.stack([matrices[0], random_matrix(fmt.source.name, 16, 2 * cols, rng)]) is None


# Tiles are made only where their VNNI kernel runs (_Tiles.usable: fastmath reassoc or full), so
# that kernel is checked under both; their portable loops serve tests alone (and CPUs without
# AVX-512 VNNI, where the VNNI variants below run them too), checked beside it with IEEE arithmetic.
TILE_VARIANTS = [("off", False)] + [(f, True) for f in SETTINGS if f != "off"]


@pytest.mark.parametrize("fastmath,vnni", TILE_VARIANTS)
@pytest.mark.parametrize("name", TILES)
def test_tiles_matmul_matches_exact_integer_arithmetic(name, fastmath, vnni):
    """The VNNI intrinsic under every fastmath setting that runs it, the portable loops beside
    it; partial last tiles, one input (pairs of tiles), 8 inputs a pass and the rest."""
    assert tiles_error(name, fastmath, vnni) <= TOLERANCE["legacy"]


@pytest.mark.parametrize("fastmath,vnni", LINEAR_VARIANTS)
@pytest.mark.parametrize("name", TILES)
def test_tiles_matmul_is_exact_at_the_largest_products(name, fastmath, vnni):
    assert tiles_error(name, fastmath, vnni, extreme=True) <= TOLERANCE["legacy"]


@pytest.mark.parametrize("name", TILES)
def test_tiles_embed_rows_as_the_source_does(name):
    fmt = REGISTRY[name]()
    cols = 2 * fmt.block_size
    m = random_matrix(fmt.source.name, 37, cols, np.random.default_rng(5))
    tokens = np.array([0, 36, 17, 16], np.int64)
    out = np.empty((4, cols), np.float32)
    family("full", True).embed(out, fmt.operand(fmt.pack(m), fmt.scratch(4, cols)), tokens)
    np.testing.assert_array_equal(out, m.dequantize()[tokens])


@requires(GGUF_DIR)
@pytest.mark.parametrize("file_name", ["bundled-Q4_0.gguf", "bundled-Q8_0.gguf"])
def test_a_model_repacked_at_load_runs_as_mapped(file_name):
    """repack (the default) against repack=False, token by token and in a block: the same
    integer sums, the float sums in another order; the mapped path keeps the file's formats.
    A last-bit difference in an activation can flip its int8 rounding in the next matmul's
    input, and the logits then move by a fraction of a percent: on an AVX2 Zen 3, bundled-Q8_0
    agreed to 3e-7 for four tokens, then to 3.7e-3 (on AVX-512, 3e-7 throughout). The tiles are
    checked exactly, matrix by matrix, in the tests above; this checks the model's wiring.
    (Not on gqa256's random weights, where a flip moves the logits by a percent.)"""
    from llama2nb import Transformer

    path = GGUF_DIR / file_name
    packed, mapped = Transformer.load(path, ctx=32), Transformer.load(path, ctx=32, repack=False)
    assert not {f.name for f in mapped.weight_formats} & set(TILES) and mapped.repacked_bytes == 0
    if simd.TILE_SIMD:
        assert {f.name for f in packed.weight_formats} & set(TILES) and packed.repacked_bytes > 0
    tokens = [1, 403, 2501, 3989, 727, 471, 263, 2217]
    for pos, token in enumerate(tokens):
        ours, theirs = packed.forward(token, pos).copy(), mapped.forward(token, pos)
        assert rel_err(ours, theirs.astype(np.float64)) <= 3e-2
    assert rel_err(packed.prefill(tokens), mapped.prefill(tokens).astype(np.float64)) <= 3e-2


def _mapping_of(array: np.ndarray):
    """The buffer an array's data lies in, past every view."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base


def test_an_arena_hands_out_aligned_pieces_until_full():
    from llama2nb.mapping import Arena

    arena = Arena(200)
    first, second = arena(10), arena(64)
    assert first.size == 10 and second.size == 64 and second.ctypes.data - first.ctypes.data == 64
    assert not np.shares_memory(first, second) and _mapping_of(first) is _mapping_of(second)
    with pytest.raises(MemoryError, match="arena: 100 bytes asked for, 72 left"):
        arena(100)


@requires(GGUF_DIR)
def test_stacked_matrices_give_the_logits_of_separate_ones(monkeypatch):
    """q, k and v (and w1 and w3) stacked at load (forward.STACKS) run as one matmul each: the
    same rows, the same sums, so the logits are bit for bit those of the matrices apart."""
    from llama2nb import Transformer, forward

    path = GGUF_DIR / "bundled-Q4_0.gguf"
    stacked = Transformer.load(path, ctx=32)
    made = [whole is not None for wholes in stacked.stacks.values() for whole in wholes]
    assert made == [simd.TILE_SIMD] * 2 * stacked.config.n_layers
    mappings = {id(_mapping_of(m.data)) for name in forward.LINEAR_FIELDS for m in getattr(stacked.weights, name)}
    assert len(mappings) == 1  # one arena (mapping.Arena): 2 MB pages throughout
    monkeypatch.setattr(forward, "STACKS", {})
    apart = Transformer.load(path, ctx=32)
    assert apart.repacked_bytes == stacked.repacked_bytes
    tokens = [1, 403, 2501, 3989, 727, 471, 263, 2217]
    for pos, token in enumerate(tokens):
        np.testing.assert_array_equal(stacked.forward(token, pos), apart.forward(token, pos))
    np.testing.assert_array_equal(stacked.prefill(tokens), apart.prefill(tokens))


@pytest.mark.parametrize("fastmath", ["off", "full"])
def test_formats_with_one_input_encoding_quantize_it_once_per_stamp(fastmath):
    """Q4_0 and Q5_0 share one scratch (scratch_key): the second sees the first's input while
    the stamp is unchanged; the K-quants share another."""
    rng = np.random.default_rng(13)
    kernels = family(fastmath, True)
    assert formats.Q4_0().scratch_key() == formats.Q5_0().scratch_key() == formats.Q8_0Block().scratch_key()
    assert formats.Q4_K().scratch_key() == formats.Q6_K().scratch_key() != formats.Q4_0().scratch_key()
    scratch = formats.Q4_0().scratch(2, 64)
    a = formats.Q4_0().operand(random_matrix("q4_0", 3, 64, rng), scratch)
    b = formats.Q5_0().operand(random_matrix("q5_0", 3, 64, rng), scratch)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out, first = np.empty((2, 3), np.float32), np.empty((2, 3), np.float32)
    kernels.linear(out, x, a, 1)
    kernels.linear(first, x, b, 1)
    kernels.linear(out, x * 2, b, 1)  # same stamp: x * 2 is not looked at
    np.testing.assert_array_equal(out, first)
    kernels.linear(out, x * 2, b, 2)
    np.testing.assert_allclose(out, 2 * first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "f16"])
def test_a_matmul_refuses_shapes_that_disagree(name):
    fmt = REGISTRY[name]()
    rng = np.random.default_rng(17)
    cols = 256
    operand = fmt.operand(random_matrix(name, 4, cols, rng), fmt.scratch(2, cols))
    kernels = family("full", True)
    x = np.ones((2, cols), np.float32)
    for out, xx in ((np.empty((2, 5), np.float32), x), (np.empty((3, 4), np.float32), x),
                    (np.empty((2, 4), np.float32), np.ones((2, cols + 32), np.float32))):
        with pytest.raises(ValueError, match="disagree"):
            kernels.linear(out, xx, operand, 1)
    if name != "f16":  # more inputs than the scratch holds
        with pytest.raises(ValueError, match="disagree"):
            kernels.linear(np.empty((3, 4), np.float32), np.ones((3, cols), np.float32), operand, 1)


@pytest.mark.parametrize("fastmath", ["off", "full"])
@pytest.mark.parametrize("name", FLOATS + LEGACY + KQUANTS)
def test_embed_gives_the_dequantized_rows(name, fastmath):
    """Bit-exact with IEEE arithmetic; fastmath may fuse d * q + m into one rounding."""
    fmt = REGISTRY[name]()
    rng = np.random.default_rng(19)
    m = random_matrix(name, 6, 512, rng)
    tokens = np.array([5, 0, 3, 5])
    out = np.full((4, 512), np.nan, np.float32)
    family(fastmath, False).embed(out, fmt.operand(m, fmt.scratch(4, 512)), tokens)
    expected = fmt.dequantize(m)[tokens]
    if fastmath == "off":
        np.testing.assert_array_equal(out, expected)
    else:
        np.testing.assert_allclose(out, expected, rtol=2e-7, atol=1e-7 * np.abs(expected).max())
    with pytest.raises(ValueError, match="outside the table"):
        family(fastmath, False).embed(out, fmt.operand(m, fmt.scratch(4, 512)), np.array([0, 6, 1, 2]))


# ----------------------------------------------------------------------------------------------
# Which path runs


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_the_vnni_paths_need_fastmath_and_the_cpu(name):
    fmt = REGISTRY[name]()
    assert fmt.constants("off") == {"VNNI512": False}
    assert fmt.constants("full") == fmt.constants("reassoc") == {"VNNI512": simd.VNNI512}
    assert ("VNNI" in fmt.kernel_description("full")) == simd.VNNI512
    assert "portable" in fmt.kernel_description("off")


@pytest.mark.skipif(not simd.VNNI512, reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("name,instructions", [("q4_0", ["vpdpbusd", "vpermw"]), ("q8_0", ["vpdpbusd"]),
                                               ("q4_k", ["vpdpbusd", "vpdpwssd"]), ("q6_k", ["vpdpbusd", "vpdpwssd"])])
def test_the_vnni_rows_are_made_of_vnni_instructions(name, instructions):
    from llama2nb.kernels import vnni_gguf

    rows = getattr(vnni_gguf, name)
    if name in ("q4_0", "q8_0"):
        run = numba.njit(lambda out, w, xu, xs, xd, x8, xds: rows(out, w, xu, xs, xd, x8, xds, 0, 1, 0))
        args = (np.zeros((1, 1), np.float32), np.zeros((1, 72 if name == "q4_0" else 136), np.uint8),
                np.zeros((1, 128), np.uint8), np.zeros((1, 128), np.int8), np.zeros((1, 4), np.float32),
                np.zeros((1, 4), np.int32), np.zeros((1, 4), np.float32))
    else:  # not cached: Numba inspects only code it compiled in this process
        run = numba.njit(lambda out, w, x, xd, sums: rows(out, w, x, xd, sums, 0, 1, 0))
        args = (np.zeros((1, 1), np.float32), np.zeros((1, 144 if name == "q4_k" else 210), np.uint8),
                np.zeros((1, 256), np.uint8 if name == "q6_k" else np.int8), np.zeros((1, 1), np.float32),
                np.zeros((1, 16), np.int16))
    run(*args)
    asm = run.inspect_asm(run.signatures[0])
    for instruction in instructions:  # on 512-bit registers
        assert re.search(rf"\t{instruction}\t[^\n]*%zmm", asm), instruction


def test_the_portable_loops_run_as_plain_python():
    """NUMBA_DISABLE_JIT=1: the kernels are Python, the intrinsics (which exist only compiled)
    out of the way; a matmul of every format still matches exact arithmetic."""
    script = """
import numpy as np
from tests.test_formats_gguf import LEGACY, KQUANTS, FLOATS, matmul_error, family, random_matrix, REGISTRY
from tests import naive
import numba
assert numba.config.DISABLE_JIT
for name in LEGACY + KQUANTS:
    print(name, matmul_error(name, "full", True, seed=1, shapes=[(2, 3, 2), (1, 3, 1)]))
for name in FLOATS:
    fmt = REGISTRY[name]()
    m = random_matrix(name, 3, 40, np.random.default_rng(0))
    x, out = np.ones((2, 40), np.float32), np.empty((2, 3), np.float32)
    family("full", True).linear(out, x, fmt.operand(m, None), 0)
    print(name, float(np.abs(out - naive.matmul(x, fmt.dequantize(m))).max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "NUMBA_DISABLE_JIT": "1"}, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    errors = {line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines()}
    assert set(errors) == set(LEGACY + KQUANTS + FLOATS)
    assert all(e <= 1e-5 for e in errors.values()), errors


# ----------------------------------------------------------------------------------------------
# A model whose matrices mix the formats, as GGUF files do


def mixed_checkpoints():
    """A small model (rows of 256 and 512) whose matrices are every GGUF type, mixed per layer
    and per tensor, and its twin with those matrices dequantized to float32."""
    from llama2nb.config import ModelConfig
    from llama2nb.files.llama2c import Checkpoint, TransformerWeights
    from llama2nb.testmodels import random_weights

    config = ModelConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=67, seq_len=24,
                         shared_classifier=False)
    weights = random_weights(config, seed=3, scale=0.05)
    rng = np.random.default_rng(23)
    plan = {"wq": ["q4_0", "q5_1"], "wk": ["q5_0", "q8_0_block"], "wv": ["q8_0_block", "q4_1"], "wo": ["q4_1", "f16"],
            "w1": ["q4_k", "q5_k"], "w2": ["q6_k", "q4_k"], "w3": ["q5_k", "q6_k"]}

    def encode(name, values):
        if name in KQUANTS:  # no quantizer: random super-blocks, weights of the others' size
            return random_matrix(name, *values.shape, rng, size=0.01)
        return REGISTRY[name]().quantize(values)

    quantized = {k: [encode(plan[k][l], weights[k][l]) for l in range(2)] for k in plan}
    quantized["token_embedding_table"] = encode("bf16", weights["token_embedding_table"])
    quantized["wcls"] = encode("q6_k", weights["wcls"])
    norms = {k: weights[k] for k in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")}
    dequantized = {k: [m.dequantize() for m in v] if isinstance(v, list) else v.dequantize() for k, v in quantized.items()}
    # the twin read-only, as a mapped fp32 file is: the fp32 kernels the other tests compile (same types)
    twin = {k: [read_only(m) for m in v] if isinstance(v, list) else read_only(v)
            for k, v in {**norms, **dequantized}.items()}
    return [Checkpoint(Path("mixed-gguf"), config, TransformerWeights(**norms, **quantized), np.zeros(1, np.uint8)),
            Checkpoint(Path("mixed-f32"), config, TransformerWeights(**twin), np.zeros(1, np.uint8))]


def read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("fastmath", ["off", "full"])
def test_a_model_of_mixed_formats_runs_as_its_float32_twin(fastmath):
    """Token by token and in a prompt block: the matmuls quantize their inputs (an error of a
    few percent of the largest logit on these random weights), nothing else differs; prefill
    (8 inputs per pass over a row) equals forward."""
    from llama2nb import Transformer

    mixed, twin = mixed_checkpoints()
    model, reference = Transformer(mixed, fastmath=fastmath), Transformer(twin, fastmath=fastmath)
    expected = set(FLOATS + LEGACY + KQUANTS)
    if formats.Q4_0Tiles().usable(fastmath):  # repacked at load (the embedding is BF16)
        expected = expected - {REGISTRY[name].source.name for name in TILES} | set(TILES)
    assert {f.name for f in model.weight_formats} == expected
    tokens = [1, 7, 30, 30, 66, 2, 11, 40, 9, 12]
    steps = []
    for pos, token in enumerate(tokens):
        ours, theirs = model.forward(token, pos).copy(), reference.forward(token, pos)
        assert rel_err(ours, theirs.astype(np.float64)) <= 0.1
        steps.append(ours)
    block = Transformer(mixed, fastmath=fastmath)
    np.testing.assert_allclose(block.prefill(tokens), steps[-1], rtol=0, atol=2e-4 * np.abs(steps[-1]).max())


if __name__ == "__main__":  # the observed errors behind TOLERANCE: python -m tests.test_formats_gguf
    print("| portable rows | " + " | ".join(SETTINGS) + " |")
    for kind in ("legacy", "kquant"):
        print(f"| {kind} | " + " | ".join(f"{rows_error(kind, f):.2g}" for f in SETTINGS) + " |")
    print("| matmul | off | full" + (" VNNI | reassoc VNNI" if simd.VNNI512 else "") + " |")
    for name in LEGACY + KQUANTS:
        cells = [matmul_error(name, "off", False), matmul_error(name, "full", True)]
        if simd.VNNI512:
            cells.append(matmul_error(name, "reassoc", True))
        print(f"| {name} | " + " | ".join(f"{c:.2g}" for c in cells) + " |")


@requires(GGUF_DIR)
def test_no_repack_when_the_copies_would_not_fit(monkeypatch):
    """The copies are refused before any is made when memory is short: the mapped path, a note."""
    from llama2nb import forward

    from llama2nb.files import read_config

    state = forward.RunState.nbytes(read_config(GGUF_DIR / "bundled-Q4_0.gguf"))
    monkeypatch.setattr(forward, "available_memory", lambda: state + 1000)
    model = forward.Transformer.load(GGUF_DIR / "bundled-Q4_0.gguf")
    assert model.repacked_bytes == 0 and not {f.name for f in model.weight_formats} & set(TILES)
    assert any(note.startswith("not repacked") for note in model.notes) or not simd.TILE_SIMD
