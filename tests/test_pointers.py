"""Calls through pointers (kernels/pointers.py, jit.Bound): a value stored as compiled code holds
it and read back, exceptions passed through, callers that pass other types refused, and the
layer code compiled once for models of different formats."""

from __future__ import annotations

import sys
from dataclasses import replace

import numba
import numpy as np
import pytest
from numba.core import types
from numba.core.errors import TypingError

from llama2nb.config import ModelConfig
from llama2nb.forward import Transformer, compiled
from llama2nb.kernels import jit
from llama2nb.kernels.pointers import call_address, loaded, native_size, store_native
from llama2nb.testmodels import write_random_model

PAIR = types.UniTuple(types.int64, 2)


@numba.njit
def _store(buffer, record):
    store_native(buffer, record)


@numba.njit
def _scaled_sum(out, values, factor):
    """out[0] = sum(values.a) * factor + values.b[1]; ValueError for factor < 0."""
    if factor < 0:
        raise ValueError("factor: expected >= 0")
    out[0] = values[0].sum() * factor + values[1][1]


def _caller(ty):
    load = loaded(1, ty)

    @numba.njit
    def call(out, pair, factor):
        code, args = load((out, pair, factor))
        call_address(code, args)

    return call


def test_a_stored_value_is_read_back_and_its_function_called_through_its_address():
    values = (np.arange(5, dtype=np.float32), np.array([7, 9], np.int64))
    ty = numba.typeof(values)
    argtypes = (types.float32[::1], ty, types.float64)
    _scaled_sum.compile(argtypes)
    result = _scaled_sum.overloads[argtypes]
    code = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
    record = (code, values)
    buffer = np.zeros(native_size(numba.typeof(record)), np.uint8)
    _store(buffer, record)
    assert buffer.view(np.int64)[0] == code  # the record's first field
    out = np.zeros(1, np.float32)
    call = _caller(ty)
    references = sys.getrefcount(out), sys.getrefcount(values[0])
    for _ in range(3):
        call(out, (0, buffer.ctypes.data), 2.0)
    assert out[0] == 10 * 2 + 9
    # the stored copy owns no reference, and each call releases what it took (neither more nor less)
    assert (sys.getrefcount(out), sys.getrefcount(values[0])) == references
    with pytest.raises(ValueError, match="factor: expected >= 0"):  # the callee's exception, passed on
        call(out, (0, buffer.ctypes.data), -1.0)  # (leaking a reference to out, as Numba's raises do)


def test_compiled_callers_must_pass_the_bound_signature():
    family = compiled("off", frozenset())
    w = np.ones((4, 8), np.float32)
    binding = family.bind("linear", w)  # kept while its Bound is used: it owns the record Bound.operand points to
    bound = binding.bound

    @numba.njit
    def caller(out, x, w, stamp):
        family_linear(out, x, w, stamp)

    family_linear = family.linear
    out, x = np.zeros((1, 4), np.float32), np.ones((1, 8), np.float32)
    caller(out, x, bound, np.int64(1))
    assert np.array_equal(out, x @ w.T)
    with pytest.raises(TypingError, match="compiled callers pass"):  # a float64 input, not the bound types
        caller(out, np.ones((1, 8)), bound, np.int64(1))
    del binding  # (only now)


def test_the_layer_code_is_compiled_once_for_models_of_other_formats(tmp_path):
    """An fp32 model and a Q8_0 model of one family call the same compiled layer functions, each
    matrix bound to its own format's matmul."""
    config = ModelConfig(64, 96, 2, 4, 2, 96, 32)
    fp32, int8 = tmp_path / "fp32.bin", tmp_path / "q8.bin"
    write_random_model(fp32, config, seed=3)
    write_random_model(int8, replace(config, version=2, group_size=32), seed=3)
    a, b = Transformer.load(fp32, fastmath="off"), Transformer.load(int8, fastmath="off")
    assert a.kernels is not b.kernels  # two families: other formats, other constants
    for name in ("attention_input", "attention_output_and_ffn", "classifier"):
        ours, theirs = getattr(a.kernels, name), getattr(b.kernels, name)
        assert ours.py_func.__qualname__ == theirs.py_func.__qualname__  # one name: one cached code
        assert list(ours.overloads) == list(theirs.overloads) and len(ours.overloads) == 1
    assert {type(bound) for args in b._args.ffn for bound in args if isinstance(bound, tuple)} == {jit.Bound}
