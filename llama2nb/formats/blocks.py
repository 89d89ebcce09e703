"""What GGUF's tensor types share as weight formats: blocks, views, operands, checked inputs.

A GGUF tensor of a block type is a run of blocks, each `block_size` values in `block_bytes`
bytes (F16 and BF16: blocks of one value in two bytes), row after row, exactly as llama.cpp
writes it; a (rows, cols) matrix needs cols to be a multiple of block_size. The view of a matrix
is a read-only numpy view of the file's bytes: (rows, cols / block_size * block_bytes) uint8,
or (rows, cols) uint16 for F16 and BF16. Nothing is copied and nothing is expanded: a 4-bit
matrix stays 4 bits a value in memory and the kernels read its blocks as they lie (the
project's rule: one mapping, no copy).

The formats themselves: gguf_float.py (F16, BF16), gguf_legacy.py (the 32-value blocks: Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1), gguf_kquants.py (the 256-value super-blocks: Q4_K, Q5_K, Q6_K). Each
has its NumPy dequantize (bit-exact with llama.cpp's), a quantize where llama2nb writes the type,
and its matmul and embedding kernels; every matmul kernel checks the shapes it is given, so no
call can read or write outside its arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numba
import numpy as np

from ..kernels import simd
from ..kernels.jit import kernel
from .base import Format

if numba.config.DISABLE_JIT:  # the intrinsics exist only compiled: the same bitcast in NumPy

    def float32_from_bits(bits):
        return np.uint32(np.int64(bits) & 0xFFFFFFFF).view(np.float32)
else:
    from ..kernels.simd import float32_from_bits
from ..kernels.simd import float32_from_half_bits

I32 = np.int32
TWO_M24 = np.float32(2.0 ** -24)  # the value of float16's smallest subnormal
F16C = False  # compile-time constant: f16_to_f32 by the CPU's instruction (F16.constants)


@dataclass(frozen=True, eq=False)
class BlockMatrix:
    """A GGUF tensor's read-only view: `data` holds its blocks ((rows, row bytes) uint8, or
    (rows, cols) uint16 for F16/BF16); `shape` is the tensor's, in values."""

    format: "BlockFormat"
    data: np.ndarray
    shape: tuple[int, ...]
    mapped: np.ndarray | None = None  # a repacked matrix's source blocks, as mapped (interleaved.py)

    def dequantize(self) -> np.ndarray:
        return self.format.dequantize(self)


class BlockFormat(Format):
    """A GGUF tensor type: a parameterless Format whose matrices are BlockMatrix views.
    Subclasses set the class attributes and define _dequantize_blocks (and _quantize_blocks
    where llama2nb writes the type)."""

    block_size: ClassVar[int]  # values per block
    block_bytes: ClassVar[int]  # bytes per block
    storage: ClassVar[np.dtype] = np.dtype(np.uint8)  # the dtype of a view's data

    def data_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the view's data for a tensor of `shape` values (ValueError if the
        last axis is not a whole number of blocks)."""
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape) or shape[-1] % self.block_size:
            raise ValueError(f"{self.name}: shape {shape}: expected positive sizes and rows of a multiple "
                             f"of {self.block_size} values")
        return (*shape[:-1], shape[-1] // self.block_size * self.block_bytes // self.storage.itemsize)

    def nbytes(self, shape):
        return int(np.prod(self.data_shape(shape), dtype=np.int64)) * self.storage.itemsize

    def view(self, buffer, offset, shape):
        """The tensor of `shape` values whose blocks start at byte `offset` of `buffer` (a
        mapping, bytes, any buffer): a read-only view, nothing copied."""
        data_shape = self.data_shape(shape)
        size, available = self.nbytes(shape), memoryview(buffer).nbytes
        if offset < 0 or offset + size > available:
            raise ValueError(f"{self.name}: {size} bytes at offset {offset} do not fit in a buffer of {available}")
        data = np.ndarray(data_shape, self.storage, buffer=buffer, offset=offset)
        data.flags.writeable = False
        return BlockMatrix(self, data, tuple(int(s) for s in shape))

    def from_blocks(self, blocks: np.ndarray, shape: tuple[int, ...]) -> BlockMatrix:
        """A matrix over blocks already in memory (quantize's result, a test's bytes)."""
        return self.view(np.ascontiguousarray(blocks).view(np.uint8).reshape(-1), 0, shape)

    def quantize(self, array):
        array = np.asarray(array, np.float32)
        self.data_shape(array.shape)
        blocks = self._quantize_blocks(np.ascontiguousarray(array).reshape(-1, self.block_size))
        return self.from_blocks(blocks, array.shape)

    def encode(self, array):
        yield self.quantize(array).data

    def dequantize(self, matrix):
        blocks = matrix.data.view(np.uint8).reshape(-1, self.block_bytes)
        return self._dequantize_blocks(blocks).reshape(matrix.shape)

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """(N, block_size) float32 -> (N, block_bytes) uint8"""
        raise NotImplementedError(f"{self.name}: llama2nb reads this type but does not write it")

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """(N, block_bytes) uint8 -> (N, block_size) float32"""
        raise NotImplementedError

    def operand(self, matrix, scratch):
        if not isinstance(matrix, BlockMatrix) or matrix.format != self or len(matrix.shape) != 2:
            raise ValueError(f"operand: expected a 2-D {self!r} matrix, found {matrix!r}")
        return self.operand_class(matrix.data, *(scratch or ()))


class QuantizedFormat(BlockFormat):
    """A block type whose matmul quantizes its input: the formats that encode the input alike
    share one scratch (`activations` names the encoding), and the kernels take their AVX-512
    VNNI paths (kernels/vnni_gguf.py) on such a CPU, with fastmath: the compile-time constant
    VNNI512."""

    activations: ClassVar[str]  # the input's encoding: the scratch_key
    unit: ClassVar[str]  # what a block is called, for kernel_description

    def constants(self, fastmath: str) -> dict[str, Any]:
        return {"VNNI512": simd.VNNI512 and fastmath != "off"}

    def kernel_description(self, fastmath="full"):
        if self.constants(fastmath)["VNNI512"]:
            return f"{self.name} {self.unit} read as they lie, AVX-512 VNNI against int8 inputs (with fastmath)"
        return f"{self.name} {self.unit} read as they lie, portable integer loops against int8 inputs"

    def scratch_key(self):
        return self.activations


@kernel
def check_linear(out, x, w, block_values, block_units, scratch_values):
    """ValueError unless out (B, d), x (B, n) and the matrix's data w (d, n / block_values *
    block_units) agree, n is a whole number of blocks and the B inputs fit a scratch of
    `scratch_values` values."""
    B, n = x.shape
    if (B < 1 or out.shape[0] != B or out.shape[1] != w.shape[0] or n % block_values
            or w.shape[1] != n // block_values * block_units or B * n > scratch_values):
        raise ValueError("linear: out (B, d), x (B, n), the (d, n) matrix and the scratch disagree")


@kernel
def check_embed(out, table_rows, table_cols, tokens):
    """ValueError unless out is (B, table_cols) and every token is a row of the table."""
    if out.shape[0] != tokens.shape[0] or out.shape[1] != table_cols:
        raise ValueError("embed: out (B, n) does not fit the tokens and the table")
    for b in range(tokens.shape[0]):
        if tokens[b] < 0 or tokens[b] >= table_rows:
            raise ValueError("embed: a token is outside the table")


ROWS = 16  # rows (or pairs of rows) per call of a row kernel: one task of a parallel matmul


@kernel
def row_chunks(B, d):
    """How many row ranges (chunk_rows) a matmul of B inputs by d rows splits into."""
    if B == 1:
        return (d // 2 + ROWS - 1) // ROWS + d % 2
    return (d + ROWS - 1) // ROWS


@kernel
def chunk_rows(c, B, d):
    """Range number c of a matmul of B inputs by d rows: (k0, k1, pair), the rows k0..k1-1 and,
    when pair > 0, each row k + pair after row k. One input (generation) takes its rows from
    the two halves of the matrix in turn: two streams from DRAM keep more reads in flight than
    one; the odd last row is a range of its own. A block of inputs takes ROWS rows at a time."""
    if B == 1:
        half = d // 2
        if c * ROWS < half:
            return c * ROWS, min(half, (c + 1) * ROWS), half
        return d - 1, d, 0
    return c * ROWS, min(d, (c + 1) * ROWS), 0


@kernel
def half_float(low, high):
    """The fp16 of bytes low, high (little-endian), as float32."""
    return f16_to_f32(I32(low) | I32(high) << I32(8))


@kernel
def f16_to_f32(h):
    """The float32 equal to the IEEE half with bits h (an integer below 2^16), exactly: with
    F16C (a compile-time constant) in the CPU's instruction, else in integer arithmetic.
    Normals move their exponent and mantissa into float32's fields, the exponent rebiased in
    the integer bits: a scale factor (2^112) would be a float product that fastmath's
    reassociation may merge with the caller's, and overflow there. Subnormals are their signed
    mantissa times 2^-24 (exact; -0 becomes +0); infinities and NaNs keep their class. One
    path of selects on int32 values (Numba widens integer arithmetic to int64 unless told),
    which LLVM vectorises."""
    if F16C:
        return float32_from_half_bits(h)
    bits = I32(h)
    negative = I32(bits >> I32(15))
    sign = I32(negative << I32(31))
    magnitude = I32(bits & I32(0x7FFF))
    normal = I32(I32(magnitude << I32(13)) + I32(112 << 23))
    special = I32(I32(0x7F800000) | I32(I32(magnitude & I32(0x3FF)) << I32(13)))  # infinity, NaN
    value = float32_from_bits(I32(sign | (special if magnitude >= I32(0x7C00) else normal)))
    if magnitude < I32(0x400):  # zero or subnormal
        value = np.float32(I32(I32(magnitude ^ -negative) + negative)) * TWO_M24
    return value
