"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K matrices repacked at load into tiles of 16 interleaved rows (in memory only).

The GGUF formats' kernels read blocks as they lie in the file, one row at a time
(gguf_legacy.py, gguf_kquants.py); on a CPU with AVX-512 VNNI or AVX2, with fastmath, these
matrices multiply faster with 16 rows interleaved (kernels/vnni_tiles.py says why and gives the
layouts), as llama.cpp also repacks Q4_0. So `Transformer` asks `for_engine` (formats/base.py)
for each matrix it multiplies by, and these formats answer by repacking: the same bits (4-bit
values stay 4-bit, fp16 scales stay fp16; Q4_K's 6-bit scales and mins become bytes, 3% more;
the other tiles are their source's bytes rearranged, a Q5_0 or Q5_1 block's fifth bits
regrouped by value quad), in anonymous memory in 2 MB pages, the rows
padded to a multiple of 16. It costs a copy of those matrices in RAM and the time to make it,
both counted (`Transformer.repacked_bytes`, `repack_seconds`, shown by `info`, `sample`'s note
and the bench's load time and peak RSS), and nothing is repacked when the copies would not fit
in the memory available; `repack=False` keeps the mapped path (the file's pages, read as they
lie). Nothing here is a file format: these layouts are never written or read.

One exception by measurement: on AVX-512, for one token (generation), a Q6_K tile's 6-bit
decode costs more than the tile saves, so a Q6_K tile keeps its mapped blocks beside it
(BlockMatrix.mapped) and generation multiplies by those (benchmarks/performance.md).

Which code a matmul compiles is chosen by its operand's type: each tile format's operand class
names its layout (`layout`), which kernels/vnni_tiles.py's intrinsics read while Numba types
the call, so a Q5_0 matmul compiles the Q5_0 code alone.

The input is quantized once per stamp exactly as for the GGUF block formats, into the same
scratch (gguf_legacy.q8_32_input, gguf_kquants.q8_k_input), so a model mixing tiles and blocks
quantizes x once.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, NamedTuple

import numba
import numpy as np
from numba import prange, types

from ..kernels import simd, vnni_gguf, vnni_tiles
from ..kernels.common import ZERO
from ..kernels.jit import kernel
from ..kernels.vnni_tiles import (Q4_K_M, Q4_K_QS, Q4_K_SC, Q4_K_TILE_BYTES, Q6_K_HIGH, Q6_K_LOW, Q6_K_SC,
                                  Q6_K_TILE_BYTES, TILE, TILE_HEADER, tile_block_bytes, tile_fields)
from ..mapping import anonymous
from ..numba_cache import cache_enabled, load_without_refresh
from .base import register, repacks
from .blocks import BlockMatrix, QuantizedFormat, chunk_rows, half_float, row_chunks
from .gguf_kquants import QK_K, KQuantOperand, Q4_K, Q6_K, Q6_KOperand, linear_q6_k, q8_k_quantized, scales_and_mins
from .gguf_legacy import QK, LegacyOperand, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0Block, q8_32_quantized

I32 = np.int32
VNNI512 = False  # compile-time constant (blocks.QuantizedFormat.constants)
TILES = False  # compile-time constant: the tiles' intrinsics build for this CPU, with fastmath (_Tiles.constants)


class _Tiles(QuantizedFormat):
    """A GGUF block format (`source`) as tiles of 16 interleaved rows: matrices are BlockMatrix
    objects whose data is (tiles, n / block_size * tile_bytes) uint8. Subclasses give the
    layout (pack, unpack); the input's encoding, scratch and block size are the source's."""

    source: ClassVar[type[QuantizedFormat]]
    tile_bytes: ClassVar[int]  # bytes of a tile's block (or super-block): 16 rows' worth
    unit = "blocks"

    def constants(self, fastmath: str) -> dict:
        return {**super().constants(fastmath), "TILES": simd.TILE_SIMD and fastmath != "off"}

    def usable(self, fastmath: str) -> bool:
        """Whether this CPU and fastmath setting run the tiles' intrinsic, in AVX-512 VNNI or
        AVX2 (else repacking would not pay: the portable loops exist for tests)."""
        return self.constants(fastmath)["TILES"]

    def kernel_description(self, fastmath="full"):
        return (f"{self.source.name} {self.source.unit} repacked at load into tiles of {TILE} interleaved rows, "
                f"{'AVX-512 VNNI' if simd.VNNI512 else 'AVX2'} against int8 inputs (with fastmath)")

    def nbytes(self, shape):
        rows, cols = shape
        return -(-rows // TILE) * (cols // self.block_size) * self.tile_bytes

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

    def scratch_key(self):
        return self.source().scratch_key()

    def operand(self, matrix, scratch):
        if not isinstance(matrix, BlockMatrix) or matrix.format != self or len(matrix.shape) != 2:
            raise ValueError(f"operand: expected a 2-D {self!r} matrix, found {matrix!r}")
        return self.operand_class(matrix.data, *scratch)

    def example(self, matrix: BlockMatrix) -> BlockMatrix:
        """A stand-in for pack(matrix) with the same Numba types, made without packing (to
        compile the matmuls while the packers compile: forward.engine_examples): one tile's
        block of zeros."""
        return BlockMatrix(self, anonymous(self.tile_bytes).reshape(1, -1), (TILE, self.block_size), _read_only(matrix.data))

    def packing_jobs(self) -> list[tuple[Any, tuple]]:
        """(function, argument types) of the compiled packers pack calls (jit.compile_ahead's jobs)."""
        return [(compiled_helper(gather_tiles), GATHER_TYPES)]

    def pack(self, matrix: BlockMatrix, allocate=anonymous) -> BlockMatrix:
        """The source matrix as tiles (the layout: kernels/vnni_tiles.py), in new memory (from
        `allocate(nbytes)`), by a compiled pass (_pack_into) that makes no temporary the size of
        the matrix (save _extend's few bytes a block)."""
        return self._pack_rows([matrix], allocate)[0][0]

    def stack(self, matrices: list[BlockMatrix], allocate=anonymous) -> tuple[list[BlockMatrix], BlockMatrix] | None:
        """Source matrices that multiply the same input (q, k and v), packed as one matrix of
        their rows stacked in order, and each as a view of its rows in it: one stream of
        weights for their products instead of one each (benchmarks/performance.md). None where
        the rows cannot stack (a matrix but the last short of whole tiles, or other columns)."""
        if any(m.shape[0] % TILE for m in matrices[:-1]) or len({m.shape[1] for m in matrices}) != 1:
            return None
        return self._pack_rows(matrices, allocate)

    def _pack_rows(self, matrices: list[BlockMatrix], allocate) -> tuple[list[BlockMatrix], BlockMatrix]:
        """The matrices (same columns) packed into one buffer of tiles, in order: each one's
        view, and the whole."""
        cols = matrices[0].shape[1]
        size, blocks = self.source.block_bytes, cols // self.block_size
        tiles = [-(-m.shape[0] // TILE) for m in matrices]
        packed = allocate(sum(tiles) * blocks * self.tile_bytes).reshape(sum(tiles), blocks, self.tile_bytes)
        parts, at = [], 0
        for matrix, count in zip(matrices, tiles):
            self._pack_into(matrix.data.reshape(matrix.shape[0], blocks, size), packed[at:at + count])
            parts.append(BlockMatrix(self, packed[at:at + count].reshape(count, -1), matrix.shape, _read_only(matrix.data)))
            at += count
        rows = sum(m.shape[0] for m in matrices)
        return parts, BlockMatrix(self, packed.reshape(at, -1), (rows, cols))

    def _pack_into(self, source: np.ndarray, packed: np.ndarray) -> None:
        """packed (tiles, blocks, tile_bytes) from source (rows, blocks, source block bytes): a
        layout that only moves bytes (_arrange of _extend, with _flip) in one gather pass."""
        rows_of, offsets, flip = self._gather_index(source.shape[2])
        source = _read_only(self._extend(source))
        blocks, size = source.shape[1:]
        at = (rows_of[0::2] * (blocks * size) + offsets[0::2]) // 2  # each unit's offset in a tile's rows, in units
        compiled_helper(gather_tiles)(source, packed, source.reshape(-1).view(np.uint16), packed.reshape(-1).view(np.uint16),
                                      rows_of, offsets, flip, at, flip.view(np.uint16))

    def _extend(self, source: np.ndarray) -> np.ndarray:
        """(rows, blocks, source block bytes) -> (rows, blocks, bytes): what _arrange reads."""
        return source

    def _arrange(self, part: np.ndarray) -> np.ndarray:
        """(16 rows, blocks, extended block bytes) -> (blocks, tile_bytes), any dtype: where
        each byte of a tile comes from."""
        raise NotImplementedError

    def _flip(self) -> np.ndarray:
        """(tile_bytes,) uint8: XORed into each byte of a tile's block."""
        return np.zeros(self.tile_bytes, np.uint8)

    def _gather_index(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each byte of a tile's block: the row in the tile, the byte of the extended block
        it comes from, and the XOR applied (what _arrange does to positions)."""
        extended = self._extend(np.zeros((1, 1, size), np.uint8)).shape[2]
        origin = self._arrange(np.arange(TILE * extended, dtype=np.int64).reshape(TILE, 1, extended)).reshape(-1)
        return origin // extended, origin % extended, self._flip()

    def unpack(self, matrix: BlockMatrix) -> BlockMatrix:
        """pack's inverse: the source format's matrix, bit for bit."""
        rows, cols = matrix.shape
        tiled = matrix.data.reshape(matrix.data.shape[0], cols // self.block_size, self.tile_bytes)
        blocks = np.concatenate([self._untile(tile) for tile in tiled])
        return self.source().from_blocks(blocks[:rows], (rows, cols))

    def _untile(self, tile: np.ndarray) -> np.ndarray:
        """(blocks, tile_bytes) -> (16 rows, blocks, source block bytes)"""
        raise NotImplementedError


class _LegacyTiles(_Tiles):
    """A 32-value format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): per block the 16 rows' fp16 d (and m),
    the values in 4-byte groups row by row, then the fifth bits in value quads
    (kernels/vnni_tiles.py)."""

    block_size = QK

    def __init_subclass__(cls, **kwargs):
        """A format's block bytes, tile bytes and kernels' names, from its source and name."""
        super().__init_subclass__(**kwargs)
        cls.block_bytes = cls.source.block_bytes
        cls.tile_bytes = tile_block_bytes(cls.operand_class.layout)
        cls.linear_kernel, cls.embed_kernel = f"linear_{cls.name}", f"embed_{cls.name}"

    @classmethod
    def _fields(cls):
        """(values' bytes in a source block, the tile's values offset, its fifth bits' offset)"""
        values_at, fifth_at = tile_fields(cls.operand_class.layout)
        return (32 if cls.source.levels == 256 else 16), values_at, fifth_at

    def _extend(self, source):
        """The fifth bits in value quads after the block (4 bytes: bit g of byte i = value
        4 g + i's), where the source has fifth bits."""
        if self.source.qh is None:
            return source
        bits = np.unpackbits(source[:, :, self.source.qh:self.source.qh + 4], axis=2, bitorder="little")
        quads = np.packbits(bits.reshape(*source.shape[:2], 8, 4).transpose(0, 1, 3, 2), axis=3, bitorder="little")
        return np.concatenate([source, quads.reshape(*source.shape[:2], 4)], axis=2)

    def _arrange(self, part):
        blocks = part.shape[1]
        count, _, fifth_at = self._fields()
        halves = [part[:, :, at:at + 2].transpose(1, 0, 2).reshape(blocks, TILE_HEADER)
                  for at in (0, self.source.m) if at is not None]
        qs = self.source.qs
        values = part[:, :, qs:qs + count].reshape(TILE, blocks, count // 4, 4).transpose(1, 2, 0, 3).reshape(blocks, -1)
        quads = [] if fifth_at is None else [part[:, :, -4:].transpose(1, 0, 2).reshape(blocks, 4 * TILE)]
        return np.concatenate([*halves, values, *quads], axis=1)

    def _flip(self):
        flip = np.zeros(self.tile_bytes, np.uint8)
        if self.source.levels == 256:  # Q8_0's q + 128: unsigned
            count, values_at, _ = self._fields()
            flip[values_at:values_at + TILE * count] = 0x80
        return flip

    def _untile(self, tile):
        blocks, size = tile.shape[0], self.source.block_bytes
        count, values_at, fifth_at = self._fields()
        part = np.empty((TILE, blocks, size), np.uint8)
        for at, start in ((0, 0), (self.source.m, TILE_HEADER)):
            if at is not None:
                part[:, :, at:at + 2] = tile[:, start:start + TILE_HEADER].reshape(blocks, TILE, 2).transpose(1, 0, 2)
        values = tile[:, values_at:values_at + TILE * count] ^ self._flip()[values_at:values_at + TILE * count]
        qs = self.source.qs
        part[:, :, qs:qs + count] = values.reshape(blocks, -1, TILE, 4).transpose(2, 0, 1, 3).reshape(TILE, blocks, count)
        if fifth_at is not None:
            quads = tile[:, fifth_at:fifth_at + 4 * TILE].reshape(blocks, TILE, 4, 1).transpose(1, 0, 2, 3)
            bits = np.unpackbits(quads, axis=3, bitorder="little").transpose(0, 1, 3, 2)  # (rows, blocks, g, i)
            part[:, :, self.source.qh:self.source.qh + 4] = np.packbits(
                bits.reshape(TILE, blocks, 32), axis=2, bitorder="little")
        return part


class _Q4_KLayout(_Tiles):
    """Q4_K: per super-block the 16 rows' d, dmin, scales and mins as bytes (unpacked from
    their 6 bits), sub-blocks in pairs, then the nibbles in 4-byte groups, row by row."""

    block_size = QK_K
    tile_bytes = Q4_K_TILE_BYTES

    def _extend(self, source):
        """The scales and mins unpacked from their 6 bits, 8 bytes each after the block."""
        rows, blocks = source.shape[:2]
        sc, mn = scales_and_mins(source[:, :, 4:16].reshape(-1, 12))
        unpacked = np.concatenate([sc, mn], axis=1).astype(np.uint8).reshape(rows, blocks, 16)
        return np.concatenate([source, unpacked], axis=2)

    def _arrange(self, part):
        blocks = part.shape[1]
        pairs = [part[:, :, at:at + 8].reshape(TILE, blocks, 4, 2).transpose(1, 2, 0, 3).reshape(blocks, -1)
                 for at in (144, 152)]
        halves = [part[:, :, at:at + 2].transpose(1, 0, 2).reshape(blocks, TILE_HEADER) for at in (0, 2)]
        nibbles = part[:, :, 16:144].reshape(TILE, blocks, 4, 8, 4).transpose(1, 2, 3, 0, 4).reshape(blocks, -1)
        return np.concatenate([*halves, *pairs, nibbles], axis=1)

    def _untile(self, tile):
        blocks = tile.shape[0]
        part = np.empty((TILE, blocks, 144), np.uint8)
        for at, start in ((0, 0), (2, TILE_HEADER)):
            part[:, :, at:at + 2] = tile[:, start:start + TILE_HEADER].reshape(blocks, TILE, 2).transpose(1, 0, 2)
        sc, mn = (tile[:, at:at + 128].reshape(blocks, 4, TILE, 2).transpose(2, 0, 1, 3).reshape(TILE, blocks, 8).astype(np.int32)
                  for at in (Q4_K_SC, Q4_K_M))
        low = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
        mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
        top = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
        part[:, :, 4:16] = np.concatenate([low, mid, top], axis=2).astype(np.uint8)
        part[:, :, 16:] = tile[:, Q4_K_QS:].reshape(blocks, 4, 8, TILE, 4).transpose(3, 0, 1, 2, 4).reshape(TILE, blocks, 128)
        return part


def _legacy_tile_format(label: str, source: type[QuantizedFormat], layout: vnni_gguf.Legacy) -> type[_LegacyTiles]:
    """The tiles of a 32-value format, registered, and the class of their operands (a module
    global, as Numba's cache finds classes by name), whose `layout` is what legacy_tiles
    compiles for that format."""
    stem = label.upper()
    operand = type(f"{stem}TilesOperand", (LegacyOperand,), {"layout": layout, "__module__": __name__})
    globals()[operand.__name__] = operand
    tiles = type(f"{stem}Tiles", (_LegacyTiles,), {"name": f"{label}_tiles", "source": source,
                                                   "operand_class": operand, "__module__": __name__})
    return repacks(source)(register(tiles))


Q4_0Tiles = _legacy_tile_format("q4_0", Q4_0, vnni_gguf.Q4_0)
Q4_1Tiles = _legacy_tile_format("q4_1", Q4_1, vnni_gguf.Q4_1)
Q5_0Tiles = _legacy_tile_format("q5_0", Q5_0, vnni_gguf.Q5_0)
Q5_1Tiles = _legacy_tile_format("q5_1", Q5_1, vnni_gguf.Q5_1)
Q8_0Tiles = _legacy_tile_format("q8_0", Q8_0Block, vnni_gguf.Q8_0)


class _Q6_KLayout(_Tiles):
    """Q6_K: per super-block the 16 rows' d, their int8 scales with sub-blocks in pairs, then
    each value's q in quads of values: low four bits two quads a byte, upper two bits four quads
    a byte (kernels/vnni_tiles.py)."""

    block_size = QK_K
    tile_bytes = Q6_K_TILE_BYTES

    def packing_jobs(self):
        return [(compiled_helper(pack_q6_k_tiles), PACKING_TYPES)]

    def _pack_into(self, source, packed):
        compiled_helper(pack_q6_k_tiles)(_read_only(source), packed)

    def _untile(self, tile):
        blocks = tile.shape[0]
        low = tile[:, Q6_K_LOW:Q6_K_HIGH].reshape(blocks, 32, TILE, 4).astype(np.int32)
        high = tile[:, Q6_K_HIGH:].reshape(blocks, 16, TILE, 4).astype(np.int32)
        nibbles = np.concatenate([low & 15, low >> 4], axis=1)  # (blocks, 64 quads, rows, 4)
        upper = np.concatenate([(high >> (2 * k)) & 3 for k in range(4)], axis=1)
        q = (nibbles | (upper << 4)).transpose(2, 0, 1, 3).reshape(TILE, blocks, 2, 4, 32)  # (rows, blocks, half, quarter, l)
        part = np.empty((TILE, blocks, 210), np.uint8)
        nib = q & 15
        ql = np.concatenate([nib[:, :, :, 0] | (nib[:, :, :, 2] << 4), nib[:, :, :, 1] | (nib[:, :, :, 3] << 4)], axis=3)
        part[:, :, :128] = ql.reshape(TILE, blocks, 128)
        part[:, :, 128:192] = sum((q[:, :, :, k] >> 4) << (2 * k) for k in range(4)).reshape(TILE, blocks, 64)
        part[:, :, 192:208] = tile[:, Q6_K_SC:Q6_K_LOW].reshape(blocks, 8, TILE, 2).transpose(2, 0, 1, 3).reshape(TILE, blocks, 16)
        part[:, :, 208:210] = tile[:, :TILE_HEADER].reshape(blocks, TILE, 2).transpose(1, 0, 2)
        return part


class Q6_KTilesOperand(NamedTuple):
    """KQuantOperand's fields and the source blocks as mapped: generation multiplies by those
    (the tiles' 6-bit decode costs more than one token's products save)."""

    w: np.ndarray  # (tiles, n / 256 * tile bytes) uint8
    mapped: np.ndarray  # (rows, n / 256 * 210) uint8: the file's blocks
    xq: np.ndarray
    xd: np.ndarray
    xsum: np.ndarray
    xu: np.ndarray
    stamp: np.ndarray
    layout = vnni_tiles.Q6_K_TILE  # what k_quant_tiles compiles for (a class attribute, not a field)


@repacks(Q6_K)
@register
class Q6_KTiles(_Q6_KLayout):
    name = "q6_k_tiles"
    source = Q6_K
    block_bytes = Q6_K.block_bytes
    unit = "super-blocks"
    operand_class = Q6_KTilesOperand
    linear_kernel = "linear_q6_k_tiles"
    embed_kernel = "embed_q6_k_tiles"

    def stack(self, matrices, allocate=anonymous):
        return None  # generation reads each matrix's mapped blocks, which a stack would not have

    def operand(self, matrix, scratch):
        if not isinstance(matrix, BlockMatrix) or matrix.format != self or matrix.mapped is None:
            raise ValueError(f"operand: expected a 2-D {self!r} matrix made by pack, found {matrix!r}")
        return self.operand_class(matrix.data, matrix.mapped, *scratch)


class Q4_KTilesOperand(KQuantOperand):
    layout = vnni_tiles.Q4_K_TILE  # what k_quant_tiles compiles for


@repacks(Q4_K)
@register
class Q4_KTiles(_Q4_KLayout):
    name = "q4_k_tiles"
    source = Q4_K
    block_bytes = Q4_K.block_bytes
    unit = "super-blocks"
    operand_class = Q4_KTilesOperand
    linear_kernel = "linear_q4_k_tiles"
    embed_kernel = "embed_q4_k_tiles"


# The packers' argument types: the source blocks always read-only (_read_only), so that one
# compiled code serves matrices as mapped and those _extend makes, and the tiles.
PACKING_TYPES = (types.Array(types.uint8, 3, "C", readonly=True), types.Array(types.uint8, 3, "C"))
GATHER_TYPES = PACKING_TYPES + (types.Array(types.uint16, 1, "C", readonly=True), types.uint16[::1], types.int64[::1],
                                types.int64[::1], types.uint8[::1], types.int64[::1], types.uint16[::1])


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


@functools.cache
def compiled_helper(function):
    """A packing function compiled (once a process, cached on disk where numba_cache allows)."""
    dispatcher = numba.njit(cache=cache_enabled(__file__))(function)
    load_without_refresh(dispatcher)  # (and saved under numba_cache.saving_lock)
    return dispatcher


def pack_q6_k_tiles(source, packed):
    """_Q6_KLayout's tiles from Q6_K blocks (kernels/vnni_tiles.py gives the layout; rows past
    the last: zeros).  source (rows, blocks, 210) uint8, packed (tiles, blocks, Q6_K_TILE_BYTES)"""
    rows, blocks = source.shape[0], source.shape[1]
    q = np.empty(QK_K, np.int32)
    for t in range(packed.shape[0]):
        for k in range(blocks):
            out = packed[t, k]
            out[:] = 0
            for r in range(min(TILE, rows - TILE * t)):
                src = source[TILE * t + r, k]
                for h in range(2):  # llama.cpp's order (gguf_kquants.Q6_K.values)
                    for l in range(32):
                        low, low2, high = np.int32(src[64 * h + l]), np.int32(src[64 * h + 32 + l]), np.int32(src[128 + 32 * h + l])
                        q[128 * h + l] = (low & 15) | (high & 3) << 4
                        q[128 * h + l + 32] = (low2 & 15) | (high >> 2 & 3) << 4
                        q[128 * h + l + 64] = (low >> 4) | (high >> 4 & 3) << 4
                        q[128 * h + l + 96] = (low2 >> 4) | (high >> 6 & 3) << 4
                out[2 * r], out[2 * r + 1] = src[208], src[209]
                for e in range(16):
                    out[Q6_K_SC + 32 * (e // 2) + 2 * r + e % 2] = src[192 + e]
                for i in range(4):
                    for g in range(32):
                        out[Q6_K_LOW + 64 * g + 4 * r + i] = (q[4 * g + i] & 15) | (q[4 * (g + 32) + i] & 15) << 4
                    for b in range(16):
                        out[Q6_K_HIGH + 64 * b + 4 * r + i] = ((q[4 * b + i] >> 4) | (q[4 * (b + 16) + i] >> 4) << 2
                                                               | (q[4 * (b + 32) + i] >> 4) << 4 | (q[4 * (b + 48) + i] >> 4) << 6)


def gather_tiles(source, packed, source_units, packed_units, rows_of, offsets, flip, at, masks):
    """packed[t, k, j] = source[16 t + rows_of[j], k, offsets[j]] ^ flip[j] (0 past the last row),
    in 2-byte units for whole tiles (every layout moves whole fp16 values and pairs or fours of
    bytes): unit u of a tile's block is source unit at[u] of its rows' block, XOR masks[u].
    source (rows, blocks, bytes) uint8 C-contiguous, packed (tiles, blocks, tile bytes) uint8,
    source_units and packed_units their uint16 views (1-D); the index arrays (tile bytes,) from
    _Tiles._gather_index, which keeps them within the rows' bytes of source, at and masks
    (tile bytes / 2,) from them (_Tiles._pack_into)"""
    rows, blocks, size = source.shape
    tiles, tile_bytes = packed.shape[0], packed.shape[2]
    units = tile_bytes // 2
    whole = rows // TILE
    for t in range(whole):
        for k in range(blocks):
            base, to = (t * TILE * blocks + k) * size // 2, (t * blocks + k) * units
            for u in range(units):
                packed_units[to + u] = source_units[base + at[u]] ^ masks[u]
    for t in range(whole, tiles):  # the last tile, short of rows
        for k in range(blocks):
            for j in range(tile_bytes):
                r = TILE * t + rows_of[j]
                packed[t, k, j] = source[r, k, offsets[j]] ^ flip[j] if r < rows else 0


# ----------------------------------------------------------------------------------------------
# The matmuls: x quantized once per stamp (gguf_legacy, gguf_kquants), then the tiles in ranges


@kernel(inline=True)  # (see jit.kernel)
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
    legacy_tiles(out, x, w, stamp, Q4_0_TILES)


@kernel
def linear_q4_1_tiles(out, x, w, stamp):
    """out = x @ W.T for Q4_1 W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q4_1 tiles"""
    legacy_tiles(out, x, w, stamp, Q4_1_TILES)


@kernel
def linear_q5_0_tiles(out, x, w, stamp):
    """out = x @ W.T for Q5_0 W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q5_0 tiles"""
    legacy_tiles(out, x, w, stamp, Q5_0_TILES)


@kernel
def linear_q5_1_tiles(out, x, w, stamp):
    """out = x @ W.T for Q5_1 W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q5_1 tiles"""
    legacy_tiles(out, x, w, stamp, Q5_1_TILES)


@kernel
def linear_q8_0_tiles(out, x, w, stamp):
    """out = x @ W.T for Q8_0 W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q8_0 tiles"""
    legacy_tiles(out, x, w, stamp, Q8_0_TILES)


@kernel(inline=True)  # (see jit.kernel)
def legacy_tiles(out, x, w, stamp, kind):
    """The matmul of tiles of a 32-value format (`kind`: its block bytes): x quantized per 32
    values once per stamp, then the tiles in ranges (blocks.chunk_rows over tiles), by the
    intrinsic (which w's type chooses) or the portable loops"""
    xq, xd, xsum, xu, xs, xds, x8 = tiles_input(out, x, w.w, w.xq, w.xd, w.xsum, w.xu, w.xs, w.xds, w.x8, w.stamp,
                                                stamp, TILE * kind)
    tiles = w.w.shape[0]
    for c in prange(row_chunks(x.shape[0], tiles)):
        t0, t1, pair = chunk_rows(c, x.shape[0], tiles)
        if TILES:
            vnni_tiles.legacy_tiles(w, out, w.w, xq, xd, x8, xds, t0, t1, pair)
        else:
            rows_tiles(out, w.w, xq, xd, t0, t1, pair, kind)


@kernel
def linear_q4_k_tiles(out, x, w, stamp):
    """out = x @ W.T for Q4_K W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q4_K tiles"""
    k_quant_tiles(out, x, w, stamp, False)


@kernel
def linear_q6_k_tiles(out, x, w, stamp):
    """out = x @ W.T for Q6_K W in tiles.  out (B, d), x (B, n) float32, w: (d, n) Q6_K tiles;
    one input (generation) by the mapped blocks' kernel: for one token, the tiles' 6-bit decode
    costs more than it saves (benchmarks/performance.md)"""
    if VNNI512 and x.shape[0] == 1:
        linear_q6_k(out, x, Q6_KOperand(w.mapped, w.xq, w.xd, w.xsum, w.xu, w.stamp), stamp)
    else:
        k_quant_tiles(out, x, w, stamp, True)


@kernel(inline=True)  # (see jit.kernel)
def k_quant_tiles(out, x, w, stamp, six):
    """The Q4_K or Q6_K (six) tiles' matmul: x quantized per 256 values once per stamp, then
    the tiles in ranges (blocks.chunk_rows over tiles), by the VNNI intrinsic or the portable loops"""
    B, n = x.shape
    tiles = w.w.shape[0]
    size = Q6_K_TILE_BYTES if six else Q4_K_TILE_BYTES
    if (B < 1 or out.shape[0] != B or n % QK_K or tiles != (out.shape[1] + TILE - 1) // TILE
            or w.w.shape[1] != n // QK_K * size or B * n > w.xq.size or out.strides[1] != 4):
        raise ValueError("linear: out (B, d), x (B, n), the (d, n) tiles and the scratch disagree")
    xq, xd, xsum, xu = q8_k_quantized(x, w.xq, w.xd, w.xsum, w.xu, w.stamp, stamp)
    for c in prange(row_chunks(B, tiles)):
        t0, t1, pair = chunk_rows(c, B, tiles)
        if TILES:
            vnni_tiles.k_quant_tiles(w, out, w.w, xq, xd, xsum, t0, t1, pair)
        else:
            rows_tiles(out, w.w, xq, xd, t0, t1, pair, Q6_K_TILES if six else Q4_K_TILES)


@kernel
def tile_half(tile, at, r):
    """Row r's fp16 in the 16 rows' halves that lie side by side from byte `at` of a tile (a
    block's scales d, Q4_K's dmin), as float32."""
    return half_float(tile[at + 2 * r], tile[at + 2 * r + 1])


@kernel
def q6_k_tile_value(tile, s, r, v):
    """Value v (0..255) of row r in super-block s of a Q6_K tile: (q - 32, d * sc, 0)."""
    at = s * Q6_K_TILE_BYTES
    g, i = v // 4, v % 4
    low = I32(tile[at + Q6_K_LOW + 64 * (g % 32) + 4 * r + i]) >> I32(4 * (g // 32)) & I32(15)
    high = I32(tile[at + Q6_K_HIGH + 64 * (g % 16) + 4 * r + i]) >> I32(2 * (g // 16)) & I32(3)
    return (low | high << I32(4)) - I32(32), tile_half(tile, at, r) * np.float32(q6_k_scale(tile, s, r, v // 16)), ZERO


@kernel
def q6_k_scale(tile, s, r, k):
    """Row r's int8 scale of sub-block k (16 values) in super-block s of a Q6_K tile."""
    sc = I32(tile[s * Q6_K_TILE_BYTES + Q6_K_SC + 32 * (k // 2) + 2 * r + k % 2])
    return sc - ((sc & I32(128)) << I32(1))


@kernel
def q4_k_tile_value(tile, s, r, v):
    """Value v (0..255) of row r in super-block s of a Q4_K tile: (q, d * sc, dmin * m)."""
    at = s * Q4_K_TILE_BYTES
    c, high, l = v // 64, v % 64 // 32, v % 32
    q = I32(tile[at + Q4_K_QS + 512 * c + 64 * (l // 4) + 4 * r + l % 4]) >> I32(4 * high) & I32(15)
    sc = np.float32(tile[at + Q4_K_SC + 32 * c + 2 * r + high])
    m = np.float32(tile[at + Q4_K_M + 32 * c + 2 * r + high])
    d = tile_half(tile, at, r)
    dmin = tile_half(tile, at + TILE_HEADER, r)
    return q, d * sc, dmin * m


@kernel
def q4_k_tile_dot(tile, s, r, x):
    """Row r of super-block s of a Q4_K tile . x (256,) int8, without x's scale: the exact
    int32 sums of sc_j * (q_j . x_j) and m_j * sum(x_j), then d and dmin in float."""
    at = s * Q4_K_TILE_BYTES
    main = I32(0)
    mins = I32(0)
    for j in range(8):
        dot = I32(0)
        total = I32(0)
        for v in range(32 * j, 32 * j + 32):
            q, _, _ = q4_k_tile_value(tile, s, r, v)
            dot += q * I32(x[v])
            total += I32(x[v])
        main += I32(tile[at + Q4_K_SC + 32 * (j // 2) + 2 * r + j % 2]) * dot
        mins += I32(tile[at + Q4_K_M + 32 * (j // 2) + 2 * r + j % 2]) * total
    scale = tile_half(tile, at, r)
    dmin = tile_half(tile, at + TILE_HEADER, r)
    return scale * np.float32(main) - dmin * np.float32(mins)


@kernel
def q6_k_tile_dot(tile, s, r, x):
    """Row r of super-block s of a Q6_K tile . x (256,) int8, without x's scale: the exact
    int32 sum of sc_k * ((q_k - 32) . x_k), then d in float."""
    at = s * Q6_K_TILE_BYTES
    main = I32(0)
    for k in range(16):
        dot = I32(0)
        for v in range(16 * k, 16 * k + 16):
            q, _, _ = q6_k_tile_value(tile, s, r, v)
            dot += q * I32(x[v])
        main += q6_k_scale(tile, s, r, k) * dot
    return tile_half(tile, at, r) * np.float32(main)


@kernel
def embed_q4_k_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_K tiled table.  out (B, n), table: (rows, n) Q4_K tiles"""
    embed_tiles(out, table.w, tokens, Q4_K_TILES)


@kernel
def embed_q6_k_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q6_K tiled table.  out (B, n), table: (rows, n) Q6_K tiles"""
    embed_tiles(out, table.w, tokens, Q6_K_TILES)


# The kinds of tiles, for the portable loops and the embeddings: their source's block bytes
Q4_0_TILES, Q4_1_TILES, Q5_0_TILES, Q5_1_TILES, Q8_0_TILES = 18, 20, 22, 24, 34
Q4_K_TILES, Q6_K_TILES = 144, 210


@kernel
def tile_block(kind):
    """(bytes, values) of a block of a tile of `kind`: 32 values of a 32-value format, a
    256-value super-block of Q4_K or Q6_K."""
    if kind == Q4_K_TILES:
        return Q4_K_TILE_BYTES, QK_K
    if kind == Q6_K_TILES:
        return Q6_K_TILE_BYTES, QK_K
    return TILE * kind, QK


@kernel
def legacy_tile_fields(kind):
    """(values offset, fifth bits' offset or -1, zero, has a min) in a block of a 32-value
    format's tile (kernels/vnni_tiles.tile_fields)."""
    mins = kind == Q4_1_TILES or kind == Q5_1_TILES
    at = TILE_HEADER * (2 if mins else 1)
    fifth = at + TILE * 16 if kind == Q5_0_TILES or kind == Q5_1_TILES else -1
    zero = 128 if kind == Q8_0_TILES else (8 if kind == Q4_0_TILES else (16 if kind == Q5_0_TILES else 0))
    return at, fifth, zero, mins


@kernel
def tile_row_value(tile, k, r, j, kind):
    """Value j of row r in block k of a tile of `kind`: (q, scale, offset), the value being
    scale * q - offset."""
    if kind == Q4_K_TILES:
        return q4_k_tile_value(tile, k, r, j)
    if kind == Q6_K_TILES:
        return q6_k_tile_value(tile, k, r, j)
    _, _, _, mins = legacy_tile_fields(kind)
    offset = -tile_half(tile, k * TILE * kind + TILE_HEADER, r) if mins else ZERO
    return tile_value(tile, k, r, j, kind), tile_half(tile, k * TILE * kind, r), offset


@kernel
def tile_value(tile, k, r, j, kind):
    """Value j (0..31) of row r in block k of a 32-value format's tile, as the signed integer
    q - zero."""
    at, fifth, zero, _ = legacy_tile_fields(kind)
    block = k * TILE * kind
    if kind == Q8_0_TILES:
        return I32(tile[block + at + 64 * (j // 4) + 4 * r + j % 4]) - I32(zero)
    q = I32(tile[block + at + 64 * (j % 16 // 4) + 4 * r + j % 4]) >> I32(4 * (j // 16)) & I32(15)
    if fifth >= 0:
        q |= (I32(tile[block + fifth + 4 * r + j % 4]) >> I32(j // 4) & I32(1)) << I32(4)
    return q - I32(zero)


@kernel
def tile_dot(tile, k, r, x, kind):
    """Row r of block k of a tile of `kind` . x (the block's int8 inputs), without x's scale:
    exact int32 sums, then the block's scales (and min) in float."""
    if kind == Q4_K_TILES:
        return q4_k_tile_dot(tile, k, r, x)
    if kind == Q6_K_TILES:
        return q6_k_tile_dot(tile, k, r, x)
    dot = I32(0)
    total = I32(0)
    for j in range(QK):
        dot += tile_value(tile, k, r, j, kind) * I32(x[j])
        total += I32(x[j])
    _, _, _, mins = legacy_tile_fields(kind)
    m = tile_half(tile, k * TILE * kind + TILE_HEADER, r) if mins else ZERO
    return tile_half(tile, k * TILE * kind, r) * np.float32(dot) + m * np.float32(total)


@kernel
def rows_tiles(out, w, xq, xd, t0, t1, pair, kind):
    """The tiles' rows in portable loops (tests; a CPU without the tiles' SIMD never repacks): block
    by block, tile_dot times x's scale.  out (B, d), w the tiles of `kind`, xq (B, n) int8, xd
    (B, n / values a block)"""
    B, d = out.shape
    size, values = tile_block(kind)
    blocks = w.shape[1] // size
    for i in range(t0, t1):
        for second in range(1 + (pair > 0)):
            t = i + second * pair
            tile = w[t]
            for r in range(min(TILE, d - t * TILE)):
                for b in range(B):
                    acc = ZERO
                    for k in range(blocks):
                        acc += xd[b, k] * tile_dot(tile, k, r, xq[b, k * values:(k + 1) * values], kind)
                    out[b, t * TILE + r] = acc


@kernel
def embed_q4_0_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_0 tiled table.  out (B, n), table: (rows, n) Q4_0 tiles"""
    embed_tiles(out, table.w, tokens, Q4_0_TILES)


@kernel
def embed_q4_1_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q4_1 tiled table.  out (B, n), table: (rows, n) Q4_1 tiles"""
    embed_tiles(out, table.w, tokens, Q4_1_TILES)


@kernel
def embed_q5_0_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q5_0 tiled table.  out (B, n), table: (rows, n) Q5_0 tiles"""
    embed_tiles(out, table.w, tokens, Q5_0_TILES)


@kernel
def embed_q5_1_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q5_1 tiled table.  out (B, n), table: (rows, n) Q5_1 tiles"""
    embed_tiles(out, table.w, tokens, Q5_1_TILES)


@kernel
def embed_q8_0_tiles(out, table, tokens):
    """out[b] = row tokens[b] of a Q8_0 tiled table.  out (B, n), table: (rows, n) Q8_0 tiles"""
    embed_tiles(out, table.w, tokens, Q8_0_TILES)


@kernel
def embed_tiles(out, w, tokens, kind):
    """out[b] = the values of row tokens[b] of tiles of `kind`, scale * q - offset (the table's
    rows padded to whole tiles: a token must name a real row, which the caller checks against
    the vocabulary)."""
    size, values = tile_block(kind)
    blocks = w.shape[1] // size
    if out.shape[0] != tokens.shape[0] or out.shape[1] != blocks * values:
        raise ValueError("embed: out (B, n) does not fit the tokens and the table")
    for b in range(tokens.shape[0]):
        if tokens[b] < 0 or tokens[b] >= w.shape[0] * TILE:
            raise ValueError("embed: a token is outside the table")
        tile, r = w[tokens[b] // TILE], tokens[b] % TILE
        for k in range(blocks):
            for j in range(values):
                q, scale, offset = tile_row_value(tile, k, r, j, kind)
                out[b, k * values + j] = scale * np.float32(q) - offset
