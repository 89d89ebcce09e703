"""The matmuls, kernel by kernel, against exact NumPy arithmetic: fp32 for every tail of its
blocking, Q8_0 in the portable loops and in the AVX-512 VNNI intrinsic (simd.py) for every loop
shape the group size selects; and the exp polynomial."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numba
import numpy as np
import pytest

from llama2nb import simd
from llama2nb.forward import compiled

GROUP_SIZES = [8, 16, 32, 48, 64, 96, 128]
VARIANTS = [("off", False), ("full", False), ("reassoc", True), ("full", True)]  # (fastmath, vnni)


def exact_matmul_q8(xq, xs, wq, ws, gs):
    """float64 of the int32 group dot products times both scales, summed."""
    B, n = xq.shape
    d = wq.shape[0]
    dots = np.einsum("bgk,dgk->bdg", xq.reshape(B, n // gs, gs).astype(np.int64),
                     wq.reshape(d, n // gs, gs).astype(np.int64))
    return (dots * ws.reshape(d, n // gs)[None].astype(np.float64) * xs[:, None, :].astype(np.float64)).sum(-1)


def random_q8(rng, rows, n, gs, extreme=False):
    if extreme:  # every product at its largest: the int32 lanes must not overflow
        q = rng.choice(np.array([-127, 127], np.int8), (rows, n))
    else:
        q = rng.integers(-127, 128, (rows, n)).astype(np.int8)
    return q, rng.random(rows * n // gs).astype(np.float32) + np.float32(0.01)


@pytest.mark.parametrize("fastmath,vnni", VARIANTS)
@pytest.mark.parametrize("gs", GROUP_SIZES)
def test_matmul_q8_matches_exact_arithmetic(gs, fastmath, vnni):
    if vnni and not simd.VNNI:
        pytest.skip("the CPU has no AVX-512 VNNI")
    kernels = compiled(fastmath, gs, vnni=vnni)
    rng = np.random.default_rng(gs)
    for groups, rows, B, extreme in [(1, 3, 1, False), (3, 37, 1, False), (9, 64, 5, False), (12, 17, 4, True)]:
        n = gs * groups
        wq, ws = random_q8(rng, rows, n, gs, extreme)
        xq, xs = random_q8(rng, B, n, gs, extreme)
        xs = xs.reshape(B, groups)
        out = np.full((B, rows), np.nan, np.float32)
        kernels.matmul_q8(out, xq, xs, wq, ws)
        expected = exact_matmul_q8(xq, xs, wq, ws, gs)
        scale = np.abs(expected).max()
        assert np.abs(out - expected).max() <= 1e-5 * scale, (groups, rows, B, extreme)


@pytest.mark.parametrize("fastmath", ["off", "full"])
@pytest.mark.parametrize("d", [1, 2, 7, 64])
@pytest.mark.parametrize("B", [1, 3, 4, 9])
def test_matmul_matches_numpy(fastmath, d, B):
    # B = 1 takes rows from both halves of w in turn, B > 1 blocks 2 rows x 4 tokens: odd sizes
    # reach every tail
    rng = np.random.default_rng(10 * d + B)
    x = rng.standard_normal((B, 37), dtype=np.float32)
    w = rng.standard_normal((d, 37), dtype=np.float32)
    out = np.full((B, d), np.nan, np.float32)
    compiled(fastmath, 0).matmul(out, x, w)
    assert np.abs(out - x.astype(np.float64) @ w.T.astype(np.float64)).max() <= 1e-5


@pytest.mark.skipif(not simd.VNNI, reason="the CPU has no AVX-512 VNNI")
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
                                              ("full", 8, False), ("full", 0, False)])
def test_the_q8_matmul_uses_vnni_with_fastmath_where_the_cpu_has_it(fastmath, gs, used):
    name = compiled(fastmath, gs).matmul_q8.py_func.__qualname__
    assert f"VNNI{used and simd.VNNI}" in name


def test_vnni_needs_fastmath_and_a_group_size_it_can_split():
    assert simd.vnni_chunk(32) == 32 and simd.vnni_chunk(96) == 32 and simd.vnni_chunk(48) == 16
    assert simd.vnni_chunk(8) == 0 and simd.vnni_chunk(24) == 0 and simd.vnni_chunk(0) == 0


def test_exp_poly_is_within_a_few_ulp_of_exp():
    exp_poly = compiled("full", 0).exp_poly

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


@pytest.mark.parametrize("fastmath,polynomial", [("off", False), ("reassoc", False), ("full", True)])
def test_only_full_fastmath_trades_libm_exp_for_the_polynomial(fastmath, polynomial):
    assert f"FAST_EXP{polynomial}" in compiled(fastmath, 0).softmax.py_func.__qualname__


COMPILE_FOR = """
import numba
from llama2nb import simd
print(simd.VNNI)
if simd.VNNI:
    row_dot = numba.njit(lambda x, xs, w, ws: simd.row_dot_q8(x, xs, w, ws, 32))
    vector = (numba.types.int8[::1], numba.types.float32[::1], numba.types.int8[::1], numba.types.float32[::1])
    row_dot.compile(vector)
    print("{vex}" if "{vex}\\tvpdpbusd" in row_dot.inspect_asm(vector) else "evex")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("cpu,features,expected", [
    ("alderlake", "+avx2,+avxvnni,+fma,+avx,+ssse3", ["True", "{vex}"]),  # AVX-VNNI: VEX-encoded
    ("icelake-server", "+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2,+fma", ["True", "evex"]),
    ("haswell", "+avx2,+fma,+avx,+ssse3", ["False"]),  # no VNNI: the portable loops
])
def test_vnni_is_chosen_per_target_cpu(cpu, features, expected):
    # compiled only, never run: the target need not be this machine
    env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected
