"""Every kernel against its naive reference (tests/naive.py), for every fastmath setting, and the
Q8_0 matmul in its portable loops and its VNNI intrinsic for every loop shape the group size
selects, against exact integer arithmetic.

Tolerances are about ten times the largest error observed (`python -m tests.test_kernels`
prints the observed table), so a kernel that gets worse fails."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numba
import numpy as np
import pytest

from llama2nb.forward import compiled, rope_tables
from llama2nb.formats import F32, Q8_0
from llama2nb.kernels import simd
from llama2nb.kernels.jit import FASTMATH

from . import naive

SETTINGS = list(FASTMATH)
GROUP_SIZES = [8, 16, 32, 48, 64, 96, 128]
Q8_VARIANTS = [(f, False) for f in SETTINGS] + [(f, True) for f in ("reassoc", "full")]  # (fastmath, vnni)
# (group size, fastmath, vnni): a group size with no VNNI split (vnni_chunk 0) compiles the portable
# loops for vnni=True too, so it is checked once, as portable
Q8_CASES = [(gs, f, v) for gs in GROUP_SIZES for f, v in Q8_VARIANTS if not (v and simd.vnni_chunk(gs) == 0)]

# max abs error allowed (relative to the largest |reference| value for the matmuls), per kernel
# and fastmath setting: about 10x the largest observed (see the module docstring).
TOLERANCE = {
    "rmsnorm": {"off": 8e-6, "reassoc": 6e-6, "full": 5e-6},
    "rope": {"off": 1.2e-5, "reassoc": 1.2e-5, "full": 1.2e-5},  # run.c's float32 angles
    "softmax": {"off": 4e-7, "reassoc": 8e-7, "full": 8e-7},
    "attention": {"off": 2e-6, "reassoc": 1.5e-6, "full": 1.5e-6},
    "attention_block": {"off": 2.5e-6, "reassoc": 3e-6, "full": 3e-6},
    "swiglu": {"off": 1.3e-5, "reassoc": 1.5e-5, "full": 1.5e-5},
    "matmul_f32": {"off": 4e-6, "reassoc": 2e-6, "full": 2e-6},
    "matmul_q8_0": {"off": 2e-6, "reassoc": 2e-6, "full": 2e-6},
}


def family(fastmath: str, group_size: int = 0, vnni: bool = True):
    return compiled(fastmath, frozenset({Q8_0(group_size)}) if group_size else frozenset(), vnni=vnni)


def err(ours, reference) -> float:
    """The largest absolute difference; inf where any is not finite (a NaN must not vanish in
    a max() over cases: max(0.0, nan) is 0.0)."""
    diff = np.abs(np.asarray(ours, np.float64) - reference)
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")


def rel_err(ours, reference) -> float:
    return err(ours, reference) / float(np.max(np.abs(reference)))


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The shared arithmetic (kernels/common.py); each returns the error it observed


def rmsnorm_error(fastmath):
    rng = np.random.default_rng(1)
    x, weight = rand(rng, 5, 96, scale=3.0), rand(rng, 96)
    out = np.empty_like(x)
    family(fastmath).rmsnorm(out, x, weight, np.float32(1e-5))
    return err(out, naive.rmsnorm(x, weight))


def rope_error(fastmath):
    rng = np.random.default_rng(2)
    head_size, positions = 16, np.array([0, 1, 7, 100])
    q, k = rand(rng, 4, 64), rand(rng, 4, 32)
    cos, sin = rope_tables(head_size, 101, 10000.0)
    expected_q, expected_k = naive.rope(q, k, positions, head_size)
    family(fastmath).rope(q, k, cos[positions], sin[positions])
    return max(err(q, expected_q), err(k, expected_k))


def softmax_error(fastmath):
    rng = np.random.default_rng(3)
    worst = 0.0
    for n in (1, 2, 17, 300):
        x = rand(rng, n + 5, scale=10.0)
        expected = naive.softmax(x[:n])
        family(fastmath).softmax(x, n)
        worst = max(worst, err(x[:n], expected))
    return worst


def attention_error(fastmath, n_heads=8, n_kv_heads=2, head_size=16, pos=37):
    rng = np.random.default_rng(4)
    dim, kv_dim = n_heads * head_size, n_kv_heads * head_size
    q = rand(rng, dim)
    keys, values = rand(rng, 64, kv_dim), rand(rng, 64, kv_dim)
    out, att = np.empty(dim, np.float32), np.empty((n_heads, 64), np.float32)
    family(fastmath).attention(out, q, keys, values, att, pos, n_kv_heads)
    return err(out, naive.attention(q[None], keys, values, [pos], n_heads, n_kv_heads)[0])


def attention_block_error(fastmath, n_heads=8, n_kv_heads=2, head_size=16, pos=5, B=11):
    rng = np.random.default_rng(5)
    dim, kv_dim = n_heads * head_size, n_kv_heads * head_size
    q = rand(rng, B, dim)
    keys, values = rand(rng, 64, kv_dim), rand(rng, 64, kv_dim)
    out, scores, keys_t = np.empty((B, dim), np.float32), np.empty((B, 64), np.float32), np.empty((2, head_size, 64), np.float32)
    family(fastmath).attention_block(out, q, keys, values, scores, keys_t, pos, n_kv_heads)
    return err(out, naive.attention(q, keys, values, range(pos, pos + B), n_heads, n_kv_heads))


def swiglu_error(fastmath):
    rng = np.random.default_rng(6)
    a, b = rand(rng, 3, 200, scale=4.0), rand(rng, 3, 200)
    expected = naive.swiglu(a, b)
    family(fastmath).swiglu(a, b)
    return err(a, expected)


COMMON = {"rmsnorm": rmsnorm_error, "rope": rope_error, "softmax": softmax_error, "attention": attention_error,
          "attention_block": attention_block_error, "swiglu": swiglu_error}


@pytest.mark.parametrize("fastmath", SETTINGS)
@pytest.mark.parametrize("kernel", list(COMMON))
def test_shared_kernel_matches_its_naive_reference(kernel, fastmath):
    assert COMMON[kernel](fastmath) <= TOLERANCE[kernel][fastmath]


@pytest.mark.parametrize("fastmath", SETTINGS)
def test_attention_block_over_odd_shapes(fastmath):
    """An odd head size (the score and output loops' tails) and a block starting at position 0."""
    assert attention_block_error(fastmath, head_size=15, B=13, pos=0) <= TOLERANCE["attention_block"][fastmath]


@pytest.mark.parametrize("fastmath", SETTINGS)
def test_add_is_exact(fastmath):
    rng = np.random.default_rng(7)
    x, y = rand(rng, 3, 50), rand(rng, 3, 50)
    expected = x + y
    family(fastmath).add(x, y)
    np.testing.assert_array_equal(x, expected)


# ----------------------------------------------------------------------------------------------
# F32 (formats/f32.py)


def matmul_f32_error(fastmath):
    """Every tail of the blocking: B = 1 takes rows from quarters of w; a few tokens go 4 rows x
    4 tokens at a time; with fastmath on AVX-512 or AVX2, 8 tokens or more go through
    kernels/gemm.py's panels (32 rows and 12 tokens a pass on AVX-512, 16 and 6 on AVX2, then 4,
    2 and 1 tokens; 256 columns a copy): odd sizes reach every remainder, a partial panel and a
    partial column chunk."""
    rng = np.random.default_rng(8)
    kernels = compiled(fastmath, frozenset({F32()}))
    worst = 0.0
    for B, n in ((1, 37), (3, 37), (4, 37), (9, 37), (14, 37), (29, 37), (17, 300), (12, 513)):
        for d in (1, 2, 7, 64, 71):
            x, w = rand(rng, B, n), rand(rng, d, n)
            w.flags.writeable = False  # as a mapped file's: the kernels the engine's fp32 models compile
            out = np.full((B, d), np.nan, np.float32)
            kernels.linear_f32(out, x, w, 0)
            worst = max(worst, rel_err(out, naive.matmul(x, w)))
    return worst


def test_prompts_use_the_panels_with_fastmath_where_the_cpu_has_avx512_or_avx2():
    def uses_panels(fastmath, **options):
        return compiled(fastmath, frozenset({F32()}), **options).matmul.py_func.__globals__["F32_GEMM"]

    assert simd.F32_PANELS == (simd.AVX512 or {"avx2", "fma"} <= simd.target_features())
    assert uses_panels("full") == uses_panels("reassoc") == simd.F32_PANELS
    assert not uses_panels("off") and not uses_panels("full", vnni=False)


@pytest.mark.parametrize("fastmath", SETTINGS)
def test_matmul_f32_matches_float64(fastmath):
    assert matmul_f32_error(fastmath) <= TOLERANCE["matmul_f32"][fastmath]


@pytest.mark.parametrize("fastmath", SETTINGS)
def test_embed_copies_rows(fastmath):
    rng = np.random.default_rng(9)
    table, tokens = rand(rng, 10, 24), np.array([3, 0, 9, 3])
    out = np.empty((4, 24), np.float32)
    family(fastmath).embed(out, table, tokens)  # the generic, dispatched on the table's type
    np.testing.assert_array_equal(out, table[tokens])
    q8 = Q8_0(8).quantize(table)
    family(fastmath, 8).embed(out, Q8_0(8).operand(q8, Q8_0(8).scratch(4, 24)), tokens)
    np.testing.assert_allclose(out, naive.dequantize_q8(q8.q, q8.s, 8)[tokens], rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# Q8_0 (formats/q8_0.py)


def random_q8(rng, rows, n, gs, extreme=False):
    if extreme:  # every product at its largest: the int32 lanes must not overflow
        q = rng.choice(np.array([-127, 127], np.int8), (rows, n))
    else:
        q = rng.integers(-127, 128, (rows, n)).astype(np.int8)
    return q, rng.random(rows * n // gs).astype(np.float32) + np.float32(0.01)


def matmul_q8_0_error(gs, fastmath, vnni):
    kernels = family(fastmath, gs, vnni=vnni)
    rng = np.random.default_rng(gs)
    worst = 0.0
    for groups, rows, B, extreme in [(1, 3, 1, False), (3, 37, 1, False), (9, 64, 5, False), (12, 17, 4, True)]:
        n = gs * groups
        wq, ws = random_q8(rng, rows, n, gs, extreme)
        xq, xs = random_q8(rng, B, n, gs, extreme)
        xs = xs.reshape(B, groups)
        out = np.full((B, rows), np.nan, np.float32)
        kernels.matmul_q8_0(out, xq, xs, wq, ws)
        worst = max(worst, rel_err(out, naive.matmul_q8(xq, xs, wq, ws, gs)))
    return worst


@pytest.mark.parametrize("gs,fastmath,vnni", Q8_CASES)
def test_matmul_q8_0_matches_exact_arithmetic(gs, fastmath, vnni):
    if vnni and not simd.VNNI:
        pytest.skip("the CPU has no VNNI")
    assert matmul_q8_0_error(gs, fastmath, vnni) <= TOLERANCE["matmul_q8_0"][fastmath]


@pytest.mark.parametrize("fastmath", SETTINGS)
@pytest.mark.parametrize("gs", [16, 32])
def test_quantize_q8_0_is_runq_c_rounding(gs, fastmath):
    """Exact with IEEE arithmetic; with full fastmath a division may become a multiplication by
    the reciprocal: the last bit of a scale, and a value on a rounding boundary moves one step."""
    rng = np.random.default_rng(10 + gs)
    x = rand(rng, 6, 4 * gs, scale=2.0)
    x[0, :gs] = 0.0  # an all-zero group
    x[1, :8] = [1.5, -2.5, 0.5, -0.5, 127.0, -127.0, 63.5, 3.0]  # halves: away from zero
    xq, xs = np.empty(x.shape, np.int8), np.empty((6, 4), np.float32)
    family(fastmath, gs).quantize_q8_0(xq, xs, x)
    expected_q, expected_s = naive.quantize_q8(x, gs)
    np.testing.assert_allclose(xs, expected_s, rtol=0 if fastmath != "full" else 1.2e-7)
    steps = np.abs(xq.astype(int) - expected_q)
    assert steps.max() <= (0 if fastmath == "off" else 1) and (steps > 0).mean() <= 0.01


@pytest.mark.parametrize("fastmath", SETTINGS)
def test_linear_q8_0_quantizes_its_input_once_per_stamp(fastmath):
    fmt = Q8_0(16)
    rng = np.random.default_rng(11)
    w = fmt.quantize(rand(rng, 5, 32))
    operand = fmt.operand(w, fmt.scratch(4, 32))
    x, out = rand(rng, 2, 32), np.empty((2, 5), np.float32)
    kernels = family(fastmath, 16)
    kernels.linear_q8_0(out, x, operand, 1)
    expected_q, expected_s = naive.quantize_q8(x, 16)
    np.testing.assert_allclose(out, naive.matmul_q8(expected_q, expected_s, w.q, w.s, 16), rtol=1e-5, atol=1e-5)
    first = out.copy()
    kernels.linear_q8_0(out, x * 2, operand, 1)  # same stamp: the quantized input is reused
    np.testing.assert_array_equal(out, first)
    kernels.linear_q8_0(out, x * 2, operand, 2)  # a new stamp: quantized anew
    np.testing.assert_allclose(out, 2 * first, rtol=1e-5, atol=1e-5)


def test_a_q8_0_kernel_refuses_data_of_another_group_size():
    fmt = Q8_0(16)
    w = fmt.quantize(np.ones((4, 32), np.float32))
    operand = fmt.operand(w, fmt.scratch(1, 32))
    x, out = np.ones((1, 32), np.float32), np.empty((1, 4), np.float32)
    with pytest.raises(ValueError, match="group size"):
        family("full", 32).linear_q8_0(out, x, operand, 1)  # compiled for 32, data in groups of 16
    from llama2nb.formats import q8_0

    with pytest.raises(ValueError, match="group size"):
        q8_0.linear_q8_0(out, x, operand, 1)  # the plain function: specialised for no group size


@pytest.mark.skipif(not simd.VNNI, reason="the CPU has no VNNI")
@pytest.mark.parametrize("gs,register", [(32, "ymm"), (48, "xmm"), (64, "ymm")])
def test_row_dot_q8_is_made_of_vpdpbusd(gs, register):
    @numba.njit  # not cached: Numba inspects only code it compiled in this process
    def row_dot(x, xs, w, ws):
        return simd.row_dot_q8(x, xs, w, ws, gs)

    x, w = np.ones(2 * gs, np.int8), np.full(2 * gs, -3, np.int8)
    scales = np.ones(2, np.float32)
    assert row_dot(x, scales, w, scales) == -6 * gs
    asm = row_dot.inspect_asm(row_dot.signatures[0])
    assert f"vpdpbusd\t%{register}" in asm


@pytest.mark.parametrize("fastmath,gs,used", [("full", 32, True), ("reassoc", 64, True), ("off", 32, False),
                                              ("full", 8, False)])
def test_the_q8_matmul_uses_vnni_with_fastmath_where_the_cpu_has_it(fastmath, gs, used):
    assert Q8_0(gs).constants(fastmath)["VNNI"] == (used and simd.VNNI)
    name = family(fastmath, gs).matmul_q8_0.py_func.__qualname__
    assert f"VNNI{int(used and simd.VNNI)}" in name


def test_vnni_needs_fastmath_and_a_group_size_it_can_split():
    assert simd.vnni_chunk(32) == 32 and simd.vnni_chunk(96) == 32 and simd.vnni_chunk(48) == 16
    assert simd.vnni_chunk(8) == 0 and simd.vnni_chunk(24) == 0 and simd.vnni_chunk(0) == 0


# ----------------------------------------------------------------------------------------------
# exp


def test_exp_poly_is_within_a_few_ulp_of_exp():
    exp_poly = family("full").exp_poly

    @numba.njit(fastmath=True)
    def apply(out, x):
        for i in range(x.shape[0]):
            out[i] = exp_poly(x[i])

    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001, dtype=np.float32),
                        np.float32([-1e-30, 0.0, 1e-30, -0.3466, 0.3466])])
    out = np.empty_like(x)
    apply(out, x)
    exact = np.exp(x.astype(np.float64))
    assert np.all(np.abs(out - exact) <= 4e-7 * exact)
    clamped = np.float32([-100.0, -1e4, 100.0])
    out = np.empty_like(clamped)
    apply(out, clamped)
    assert 0 < out[0] == out[1] < 1.2e-38 and out[2] == np.inf  # far below: tiny, never NaN


@pytest.mark.parametrize("fastmath,polynomial", [("off", 0), ("reassoc", 0), ("full", 1)])
def test_only_full_fastmath_trades_libm_exp_for_the_polynomial(fastmath, polynomial):
    assert f"FAST_EXP{polynomial}" in family(fastmath).softmax.py_func.__qualname__


COMPILE_FOR = """
import numba
import numpy as np
from llama2nb.kernels import simd
print(simd.VNNI, simd.VNNI512)
if simd.VNNI:
    row_dot = numba.njit(lambda x, xs, w, ws: simd.row_dot_q8(x, xs, w, ws, 32))
    vector = (numba.types.int8[::1], numba.types.float32[::1], numba.types.int8[::1], numba.types.float32[::1])
    row_dot.compile(vector)
    print("{vex}" if "{vex}\\tvpdpbusd" in row_dot.inspect_asm(vector) else "evex")
if simd.VNNI512:  # the GGUF rows (kernels/vnni_gguf.py) build for this CPU too
    from llama2nb.kernels import vnni_gguf
    f32, u8, i8 = numba.types.float32[:, ::1], numba.types.uint8[:, ::1], numba.types.int8[:, ::1]
    i64 = numba.types.int64
    q4_0 = numba.njit(lambda o, w, u, s, d, t, m, a, b, c: vnni_gguf.q4_0(o, w, u, s, d, t, m, a, b, c))
    q4_0.compile((f32, u8, u8, i8, f32, numba.types.int32[:, ::1], f32, i64, i64, i64))
    q4_k = numba.njit(lambda o, w, x, d, s, a, b, c: vnni_gguf.q4_k(o, w, x, d, s, a, b, c))
    q4_k.compile((f32, u8, i8, f32, numba.types.int16[:, ::1], i64, i64, i64))
    print("gguf")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("cpu,features,expected", [
    ("alderlake", "+avx2,+avxvnni,+fma,+avx,+ssse3", ["True", "False", "{vex}"]),  # AVX-VNNI: VEX-encoded
    ("icelake-server", "+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2,+fma,+bmi2", ["True", "True", "evex", "gguf"]),
    ("cascadelake", "+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2,+fma,+bmi2", ["True", "True", "evex", "gguf"]),
    ("haswell", "+avx2,+fma,+avx,+ssse3", ["False", "False"]),  # no VNNI: the portable loops
])
def test_vnni_is_chosen_per_target_cpu(cpu, features, expected):
    # compiled only, never run: the target need not be this machine (Cascade Lake has AVX-512
    # VNNI but not the byte permutes LLVM picks on later CPUs)
    env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected


if __name__ == "__main__":  # the observed errors behind TOLERANCE: python -m tests.test_kernels
    print("| kernel | " + " | ".join(SETTINGS) + " |\n|---|" + "---|" * len(SETTINGS))
    for name, measure in {**COMMON, "matmul_f32": matmul_f32_error}.items():
        print(f"| {name} | " + " | ".join(f"{measure(f):.2g}" for f in SETTINGS) + " |")
    for vnni in (False, True) if simd.VNNI else (False,):
        worst = {f: max(matmul_q8_0_error(gs, f, vnni) for gs in GROUP_SIZES) for f in SETTINGS
                 if f != "off" or not vnni}
        print(f"| matmul_q8_0 ({'VNNI' if vnni else 'portable'}), relative | "
              + " | ".join(f"{worst[f]:.2g}" if f in worst else "–" for f in SETTINGS) + " |")
