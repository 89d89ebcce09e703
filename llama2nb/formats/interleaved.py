"""Q4_0 and GGUF Q8_0 matrices repacked at load into tiles of 16 interleaved rows (in memory only).

The GGUF formats' kernels read blocks as they lie in the file, one row at a time
(gguf_legacy.py); on a CPU with AVX-512 VNNI, with fastmath, a Q4_0 or Q8_0 matrix multiplies
faster with 16 rows interleaved (kernels/vnni_tiles.py says why and gives the layout), as
llama.cpp also repacks Q4_0. So `Transformer` asks `for_engine` (formats/base.py) for each
matrix it multiplies by, and these formats answer for Q4_0 and Q8_0 by repacking: the same bits
(4-bit values stay 4-bit, the fp16 scales stay fp16), in anonymous memory in 2 MB pages, the
rows padded to a multiple of 16. It costs a copy of those matrices in RAM and the time to make
it, both counted (`Transformer.repacked_bytes`, `repack_seconds`, shown by `info` and in the
bench's load time and peak RSS); `repack=False` keeps the mapped path (the file's pages, read
as they lie). Nothing here is a file format: these layouts are never written or read.

The input is quantized once per stamp exactly as for the GGUF block formats, into the same
scratch (gguf_legacy.q8_32_input), so a model mixing tiles and blocks quantizes x once.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numba import prange

from ..kernels import vnni_tiles
from ..kernels.common import ZERO
from ..kernels.jit import kernel
from ..kernels.vnni_tiles import TILE, TILE_HEADER, tile_block_bytes
from ..mapping import anonymous
from .base import register, repacks
from .blocks import BlockMatrix, QuantizedFormat, chunk_rows, half_float, row_chunks
from .gguf_legacy import QK, LegacyOperand, Q4_0, Q8_0Block, _Legacy, q8_32_quantized

I32 = np.int32
VNNI512 = False  # compile-time constant (blocks.QuantizedFormat.constants)


class _Tiles(QuantizedFormat):
    """A 32-value GGUF block format (`source`) as tiles of 16 interleaved rows: matrices are
    BlockMatrix objects whose data is (tiles, n / 32 * block bytes) uint8."""

    source: ClassVar[type[_Legacy]]
    nibbles: ClassVar[bool]
    block_size = QK
    activations = _Legacy.activations
    unit = "blocks"

    @property
    def tile_bytes(self) -> int:
        return tile_block_bytes(self.nibbles)

    def usable(self, fastmath: str) -> bool:
        """Whether this CPU and fastmath setting run the tiles' VNNI kernel (else repacking
        would not pay: the portable loops exist for tests)."""
        return self.constants(fastmath)["VNNI512"]

    def kernel_description(self, fastmath="full"):
        return (f"{self.source.name} blocks repacked at load into tiles of {TILE} interleaved rows, "
                "AVX-512 VNNI against int8 inputs (with fastmath)")

    def nbytes(self, shape):
        rows, cols = shape
        return -(-rows // TILE) * cols // QK * self.tile_bytes

    def view(self, buffer, offset, shape):
        raise ValueError(f"{self.name}: an in-memory layout of {self.source.name}, not found in files")

    def encode(self, array):
        raise ValueError(f"{self.name}: an in-memory layout of {self.source.name}, never written to files")

    def quantize(self, array):
        return self.pack(self.source().quantize(array))

    def dequantize(self, matrix):
        return self.unpack(matrix).dequantize()

    def scratch(self, block, width):
        return self.source().scratch(block, width)

    def pack(self, matrix: BlockMatrix) -> BlockMatrix:
        """The source matrix's blocks as tiles (the module docstring), in new memory."""
        source = self.source()
        rows, cols = matrix.shape
        size, blocks, tiles = source.block_bytes, cols // QK, -(-rows // TILE)
        packed = anonymous(self.nbytes(matrix.shape)).reshape(tiles, blocks, self.tile_bytes)
        pieces = (size - 2) // 4  # 4-byte groups of a block's values: 4 (nibbles) or 8
        for t in range(tiles):  # a tile at a time: no temporary the size of the matrix
            part = np.zeros((TILE, blocks, size), np.uint8)
            taken = matrix.data[t * TILE:(t + 1) * TILE].reshape(-1, blocks, size)
            part[:taken.shape[0]] = taken
            packed[t, :, :TILE_HEADER] = part[:, :, :2].transpose(1, 0, 2).reshape(blocks, TILE_HEADER)
            values = part[:, :, 2:].reshape(TILE, blocks, pieces, 4).transpose(1, 2, 0, 3).reshape(blocks, -1)
            packed[t, :, TILE_HEADER:] = values if self.nibbles else values ^ np.uint8(0x80)
        return BlockMatrix(self, packed.reshape(tiles, -1), matrix.shape)

    def unpack(self, matrix: BlockMatrix) -> BlockMatrix:
        """pack's inverse: the source format's matrix."""
        source = self.source()
        rows, cols = matrix.shape
        size, blocks, tiles = source.block_bytes, cols // QK, matrix.data.shape[0]
        tiled = matrix.data.reshape(tiles, blocks, self.tile_bytes)
        out = np.empty((tiles * TILE, blocks, size), np.uint8)
        out[:, :, :2] = tiled[:, :, :TILE_HEADER].reshape(tiles, blocks, TILE, 2).transpose(0, 2, 1, 3).reshape(-1, blocks, 2)
        values = tiled[:, :, TILE_HEADER:] if self.nibbles else tiled[:, :, TILE_HEADER:] ^ np.uint8(0x80)
        values = values.reshape(tiles, blocks, -1, TILE, 4).transpose(0, 3, 1, 2, 4)
        out[:, :, 2:] = values.reshape(tiles * TILE, blocks, size - 2)
        return source.from_blocks(out[:rows], (rows, cols))

    def operand(self, matrix, scratch):
        if not isinstance(matrix, BlockMatrix) or matrix.format != self or len(matrix.shape) != 2:
            raise ValueError(f"operand: expected a 2-D {self!r} matrix, found {matrix!r}")
        return self.operand_class(matrix.data, *scratch)


class Q4_0TilesOperand(LegacyOperand):
    pass


class Q8_0TilesOperand(LegacyOperand):
    pass


@repacks(Q4_0)
@register
class Q4_0Tiles(_Tiles):
    name = "q4_0_tiles"
    source = Q4_0
    nibbles = True
    block_bytes = Q4_0.block_bytes
    operand_class = Q4_0TilesOperand
    linear_kernel = "linear_q4_0_tiles"
    embed_kernel = "embed_q4_0_tiles"


@repacks(Q8_0Block)
@register
class Q8_0Tiles(_Tiles):
    name = "q8_0_tiles"
    source = Q8_0Block
    nibbles = False
    block_bytes = Q8_0Block.block_bytes
    operand_class = Q8_0TilesOperand
    linear_kernel = "linear_q8_0_tiles"
    embed_kernel = "embed_q8_0_tiles"


# ----------------------------------------------------------------------------------------------
# The matmuls: x quantized once per stamp (gguf_legacy), then the tiles in ranges


@kernel
def tiles_input(out, x, w, xq, xd, xsum, xu, xs, xds, x8, last, stamp, size):
    """ValueError unless out (B, d) (unit column stride), x (B, n) and the tiles w (ceil(d / 16),
    n / 32 * size) agree and the B inputs fit the scratch; then gguf_legacy.q8_32_quantized."""
    B, n = x.shape
    if (B < 1 or out.shape[0] != B or n % QK or w.shape[0] != (out.shape[1] + TILE - 1) // TILE
            or w.shape[1] != n // QK * size or B * n > xq.size or out.strides[1] != 4):
        raise ValueError("linear: out (B, d), x (B, n), the (d, n) tiles and the scratch disagree")
    return q8_32_quantized(x, xq, xd, xsum, xu, xs, xds, x8, last, stamp)


@kernel
def linear_q4_0_tiles(out, x, w, stamp):
    """out = x @ W.T for Q4_0 W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q4_0 tiles"""
    xq, xd, xsum, xu, xs, xds, x8 = tiles_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp,
                                                stamp, TILE_HEADER + 16 * TILE)
    tiles = w.w.shape[0]
    for c in prange(row_chunks(x.shape[0], tiles)):
        t0, t1, pair = chunk_rows(c, x.shape[0], tiles)
        if VNNI512:
            vnni_tiles.q4_0_tiles(out, w.w, xq, xd, x8, t0, t1, pair)
        else:
            rows_tiles(out, w.w, xq, xd, xsum, t0, t1, pair, True)


@kernel
def linear_q8_0_tiles(out, x, w, stamp):
    """out = x @ W.T for Q8_0 W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q8_0 tiles"""
    xq, xd, xsum, xu, xs, xds, x8 = tiles_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp,
                                                stamp, TILE_HEADER + 32 * TILE)
    tiles = w.w.shape[0]
    for c in prange(row_chunks(x.shape[0], tiles)):
        t0, t1, pair = chunk_rows(c, x.shape[0], tiles)
        if VNNI512:
            vnni_tiles.q8_0_tiles(out, w.w, xq, xd, x8, t0, t1, pair)
        else:
            rows_tiles(out, w.w, xq, xd, xsum, t0, t1, pair, False)


@kernel
def tile_value(tile, k, r, j, nibbles):
    """Value j (0..31) of row r in block k of a tile, as the signed integer q - zero."""
    size = TILE_HEADER + TILE * (16 if nibbles else 32)
    if nibbles:
        byte = I32(tile[k * size + TILE_HEADER + 64 * (j % 16 // 4) + 4 * r + j % 4])
        return (byte >> I32(4 * (j // 16)) & I32(15)) - I32(8)
    return I32(tile[k * size + TILE_HEADER + 64 * (j // 4) + 4 * r + j % 4]) - I32(128)


@kernel
def rows_tiles(out, w, xq, xd, xsum, t0, t1, pair, nibbles):
    """The tiles' rows in portable loops (tests; a CPU without AVX-512 VNNI never repacks):
    each block's exact int32 sum((q - zero) * x), then scales in float.  out (B, d), w the
    tiles, xq (B, n) int8, xd, xsum (B, n / 32)"""
    B, d = out.shape
    size = TILE_HEADER + TILE * (16 if nibbles else 32)
    blocks = w.shape[1] // size
    for i in range(t0, t1):
        for second in range(1 + (pair > 0)):
            t = i + second * pair
            tile = w[t]
            for r in range(min(TILE, d - t * TILE)):
                for b in range(B):
                    acc = ZERO
                    for k in range(blocks):
                        dot = I32(0)
                        for j in range(QK):
                            dot += tile_value(tile, k, r, j, nibbles) * I32(xq[b, k * QK + j])
                        scale = half_float(tile[k * size + 2 * r], tile[k * size + 2 * r + 1])
                        acc += xd[b, k] * (scale * np.float32(dot))
                    out[b, t * TILE + r] = acc


@kernel
def embed_q4_0_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_0 tiled table.  out (B, n), table: (rows, n) Q4_0 tiles"""
    embed_tiles(out, table.w, tokens, True)


@kernel
def embed_q8_0_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q8_0 tiled table.  out (B, n), table: (rows, n) Q8_0 tiles"""
    embed_tiles(out, table.w, tokens, False)


@kernel
def embed_tiles(out, w, tokens, nibbles):
    """out[b] = the values of row tokens[b] (the table's rows padded to whole tiles: a token
    must name a real row, which the caller checks against the vocabulary)."""
    size = TILE_HEADER + TILE * (16 if nibbles else 32)
    blocks = w.shape[1] // size
    if out.shape[0] != tokens.shape[0] or out.shape[1] != blocks * QK:
        raise ValueError("embed: out (B, n) does not fit the tokens and the table")
    for b in range(tokens.shape[0]):
        if tokens[b] < 0 or tokens[b] >= w.shape[0] * TILE:
            raise ValueError("embed: a token is outside the table")
        tile, r = w[tokens[b] // TILE], tokens[b] % TILE
        for k in range(blocks):
            scale = half_float(tile[k * size + 2 * r], tile[k * size + 2 * r + 1])
            for j in range(QK):
                out[b, k * QK + j] = scale * np.float32(tile_value(tile, k, r, j, nibbles))
