"""Read and write GGUF files (llama.cpp's container), llama architecture, versions 2 and 3.

A GGUF file is self-describing: a header (magic, version, counts), typed key/value metadata,
a table of tensor infos (name, shape, ggml type, offset) and the aligned tensor data. The
contract, in the order the reader enforces it:

1. Structure (`read_header`): every count, string length, array count, value type, shape,
   ggml type, offset and size is checked against the file before anything is built from it
   (alignment a power of two, offsets aligned and in bounds, no wrap-around, no overlap, no
   duplicate key or tensor name). Little-endian only: a byte-swapped version is a big-endian
   file and is refused. Nothing here trusts a number it has not bounded.
2. Meaning (`model_config`, `check_tensors`): the metadata must describe a plain llama model
   (architecture llama, a SentencePiece tokenizer if any, no experts, no rope scaling, not a
   split file) and the tensor table must be exactly what `layout(config)` says such a model
   holds, with the right shapes: the one list the reader checks the file against and the
   writer walks. Norms must be F32; every matrix's ggml type must be a weight format this
   build has (`formats.by_ggml_type`), or the file is refused naming the type and the tensor.
3. Views (`read_checkpoint`): one mapping of the file (mapping.map_read_only, or one copy in
   memory on request), each tensor a read-only view through its own format, so one file may
   mix types per tensor. Only after 1 and 2 does any view exist: the Numba kernels do not
   bounds-check, so a bad file must never reach them.

Every refusal is a CheckpointError (TokenizerError for the vocabulary) of one line: the file,
what, what was expected, what was found.

Shapes: GGUF lists ne[0] (the contiguous axis) first; a matrix's NumPy shape is reversed(ne),
so `token_embd` with ne = [dim, vocab] is llama2.c's (vocab, dim). GGUF llama files keep the
interleaved RoPE layout of Meta's checkpoints and of llama2.c: no Q/K permutation is needed.

The vocabulary (`read_vocabulary`) is the tokenizer.ggml.* metadata turned into llama2.c's
pieces (U+2581 -> space, BOS/EOS wrapped in newlines as llama2.c's export writes them), so a
tokenizer built from it gives the same ids as tokenizer.bin for the same vocabulary.

The writer (`write_gguf`) streams: header, metadata and tensor infos first (every size is known
from the layout), then one tensor at a time, encoded by its format, into a temp file renamed
over the target. Peak memory is one tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..atomic import atomic_write
from ..config import MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_SEQ_LEN, MAX_VOCAB, ModelConfig
from ..errors import CheckpointError, TokenizerError
from .. import formats
from .llama2c import Checkpoint, TransformerWeights, file_buffer

MAGIC = b"GGUF"
VERSIONS = (2, 3)
WRITE_VERSION = 3
DEFAULT_ALIGNMENT = 32
FIXED_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1

# ----------------------------------------------------------------------------------------------
# Metadata value types

(UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64,
 FLOAT64) = range(13)
VALUE_TYPE_NAMES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string",
                    "array", "uint64", "int64", "float64")
NUMPY_TYPES = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
               FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
STRUCT_CODES = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
                BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
INTEGER_TYPES = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
FLOAT_TYPES = frozenset({FLOAT32, FLOAT64})
STRING_LENGTH_BYTES = 8


@dataclass(frozen=True)
class Value:
    """One metadata value: its GGUF type, the value (int, float, bool, str; for arrays a NumPy
    array of numbers or a list of bytes for strings) and, for arrays, the element type."""

    type: int
    value: Any
    element_type: int | None = None

    def describe(self) -> str:
        if self.type == ARRAY:
            return f"an array of {len(self.value)} {VALUE_TYPE_NAMES[self.element_type]}"
        return f"{VALUE_TYPE_NAMES[self.type]} {self.value!r}"


# ----------------------------------------------------------------------------------------------
# ggml tensor types: (name, values per block, bytes per block), as ggml.c's type traits


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int
    type_size: int


GGML_TYPES = {t.id: t for t in (
    GGMLType(0, "F32", 1, 4), GGMLType(1, "F16", 1, 2), GGMLType(2, "Q4_0", 32, 18),
    GGMLType(3, "Q4_1", 32, 20), GGMLType(6, "Q5_0", 32, 22), GGMLType(7, "Q5_1", 32, 24),
    GGMLType(8, "Q8_0", 32, 34), GGMLType(10, "Q2_K", 256, 84),
    GGMLType(11, "Q3_K", 256, 110), GGMLType(12, "Q4_K", 256, 144), GGMLType(13, "Q5_K", 256, 176),
    GGMLType(14, "Q6_K", 256, 210), GGMLType(15, "Q8_K", 256, 292), GGMLType(16, "IQ2_XXS", 256, 66),
    GGMLType(17, "IQ2_XS", 256, 74), GGMLType(18, "IQ3_XXS", 256, 98), GGMLType(19, "IQ1_S", 256, 50),
    GGMLType(20, "IQ4_NL", 32, 18), GGMLType(21, "IQ3_S", 256, 110), GGMLType(22, "IQ2_S", 256, 82),
    GGMLType(23, "IQ4_XS", 256, 136), GGMLType(24, "I8", 1, 1), GGMLType(25, "I16", 1, 2),
    GGMLType(26, "I32", 1, 4), GGMLType(27, "I64", 1, 8), GGMLType(28, "F64", 1, 8),
    GGMLType(29, "IQ1_M", 256, 56), GGMLType(30, "BF16", 1, 2), GGMLType(34, "TQ1_0", 256, 54),
    GGMLType(35, "TQ2_0", 256, 66), GGMLType(39, "MXFP4", 32, 17), GGMLType(40, "NVFP4", 64, 36),
    GGMLType(41, "Q1_0", 128, 18),
)}  # Q8_1 (9) is left out: an activation type ggml never stores in files
GGML = {t.name: t.id for t in GGML_TYPES.values()}


def type_name(type_id: int) -> str:
    t = GGML_TYPES.get(type_id)
    return t.name if t else f"unknown type {type_id}"


def format_for(type_id: int) -> formats.Format | None:
    """The weight format that reads ggml type `type_id`, or None when this build has none.
    The formats package maps ggml types to formats (`by_ggml_type`); where it does not offer
    that lookup, F32 is the one type read."""
    lookup = getattr(formats, "by_ggml_type", None)
    if lookup is None:
        return formats.F32() if type_id == GGML["F32"] else None
    try:
        fmt = lookup(type_id)
    except (KeyError, ValueError, LookupError):
        return None
    return fmt() if isinstance(fmt, type) else fmt


def supported_types() -> list[str]:
    return [t.name for t in GGML_TYPES.values() if format_for(t.id) is not None]


# ----------------------------------------------------------------------------------------------
# The header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-table entry: NumPy shape (reversed ne), ggml type, offset from the data start."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    nbytes: int

    @property
    def ne(self) -> list[int]:
        return list(reversed(self.shape))


@dataclass
class Header:
    """A GGUF file's header, structurally validated (see the module docstring, step 1)."""

    path: Path
    version: int
    metadata: dict[str, Value]
    tensors: dict[str, TensorInfo]  # in table order
    alignment: int
    data_offset: int  # where tensor data starts: the end of the tensor table, aligned
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        v = self.metadata.get(key)
        return default if v is None else v.value


def fail(path: Path | str, what: str, expected: str, found: Any) -> CheckpointError:
    return CheckpointError(f"{path}: {what}: expected {expected}, found {found}")


class _Cursor:
    """Reads little-endian values from the file's bytes, refusing any read past the end."""

    def __init__(self, path: Path, data, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def take(self, n: int, what: str) -> int:
        """Claim n bytes at the cursor; return their offset."""
        left = self.size - self.pos
        if n > left:
            raise fail(self.path, f"{what} at offset {self.pos:,}", f"{n:,} bytes",
                       f"{left:,} left in the {self.size:,}-byte file (truncated?)")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, vtype: int, what: str) -> Any:
        code = STRUCT_CODES[vtype]
        (value,) = struct.unpack_from(code, self.data, self.take(struct.calcsize(code), what))
        if vtype == BOOL:
            if value not in (0, 1):
                raise fail(self.path, what, "a bool (0 or 1)", value)
            return bool(value)
        return value

    def u32(self, what: str) -> int:
        return self.scalar(UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(UINT64, what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        left = self.size - self.pos
        if n > left:
            raise fail(self.path, f"{what} length", f"at most the {left:,} bytes left in the file",
                       f"{n:,} (a string longer than the file)")
        start = self.take(n, what)
        return bytes(self.data[start:start + n])

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(self.path, what, "UTF-8 text", repr(raw[:40])) from None

    def value(self, vtype: int, what: str) -> Value:
        if vtype == STRING:
            return Value(STRING, self.string(what).decode("utf-8", "surrogateescape"))
        if vtype == ARRAY:
            return self.array(what)
        if vtype not in NUMPY_TYPES:
            raise fail(self.path, f"{what} type", "a GGUF value type 0..12", vtype)
        return Value(vtype, self.scalar(vtype, what))

    def array(self, what: str) -> Value:
        element = self.u32(f"{what} element type")
        count = self.u64(f"{what} count")
        if element == ARRAY:
            raise fail(self.path, f"{what} element type", "a scalar or string type (nested arrays are "
                       "not part of llama GGUF files)", "array")
        if element != STRING and element not in NUMPY_TYPES:
            raise fail(self.path, f"{what} element type", "a GGUF value type 0..12", element)
        least = STRING_LENGTH_BYTES if element == STRING else np.dtype(NUMPY_TYPES[element]).itemsize
        left = self.size - self.pos
        if count > left // least:
            raise fail(self.path, f"{what} count", f"at most {left // least:,} {VALUE_TYPE_NAMES[element]} "
                       f"elements (the {left:,} bytes left in the file)", f"{count:,}")
        if element == STRING:
            return Value(ARRAY, [self.string(f"{what}[{i}]") for i in range(count)], STRING)
        dtype = np.dtype(NUMPY_TYPES[element])
        start = self.take(count * dtype.itemsize, what)
        values = np.frombuffer(self.data, dtype, count, start).copy()
        if element == BOOL and values.size and values.max() > 1:
            raise fail(self.path, what, "bools (0 or 1)", f"a byte of {int(values.max())}")
        return Value(ARRAY, values.astype(dtype.newbyteorder("=")), element)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_header(path: Path, data, size: int) -> Header:
    """Parse and structurally validate the header held in `data` (size bytes of the file)."""
    cur = _Cursor(path, data, size)
    if size < FIXED_HEADER.size:
        raise fail(path, "GGUF header", f"at least {FIXED_HEADER.size} bytes", f"a {size}-byte file")
    magic, version, n_tensors, n_kv = FIXED_HEADER.unpack_from(data, cur.take(FIXED_HEADER.size, "header"))
    if magic != MAGIC:
        raise fail(path, "magic", "GGUF", repr(bytes(magic)))
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (1, 2, 3):
            raise fail(path, "byte order", "a little-endian file", f"a big-endian one (version {swapped} "
                       "byte-swapped); convert it with gguf's tools")
        raise fail(path, "version", "2 or 3", version)
    left = size - cur.pos
    if n_kv > left // 13:  # key length 8, type 4, value at least 1
        raise fail(path, "metadata count", f"at most {left // 13:,} (for the {left:,} bytes left)", f"{n_kv:,}")
    metadata = _parse_metadata(cur, n_kv)
    alignment = _alignment(path, metadata)
    left = size - cur.pos
    if n_tensors > left // 24:  # name length 8, n_dims 4, type 4, offset 8
        raise fail(path, "tensor count", f"at most {left // 24:,} (for the {left:,} bytes left)", f"{n_tensors:,}")
    infos = [_parse_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _check_tensor_table(path, infos, alignment, data_offset, size)
    return Header(path, version, metadata, tensors, alignment, data_offset, size)


def _parse_metadata(cur: _Cursor, n_kv: int) -> dict[str, Value]:
    metadata: dict[str, Value] = {}
    for i in range(n_kv):
        key = cur.text(f"metadata key {i}")
        vtype = cur.u32(f"metadata {key!r} type")
        if key in metadata:
            raise fail(cur.path, f"metadata key {key!r}", "each key once", "it twice (a duplicate key)")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    return metadata


def _alignment(path: Path, metadata: dict[str, Value]) -> int:
    v = metadata.get("general.alignment")
    if v is None:
        return DEFAULT_ALIGNMENT
    if v.type != UINT32 or not _is_power_of_two(v.value):
        raise fail(path, "general.alignment", "a uint32 power of two", v.describe())
    return v.value


def _parse_tensor_info(cur: _Cursor, i: int) -> TensorInfo:
    name = cur.text(f"tensor {i} name")
    what = f"tensor {name!r}"
    n_dims = cur.u32(f"{what} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise fail(cur.path, f"{what} dimension count", f"1..{MAX_DIMS}", n_dims)
    ne = [cur.u64(f"{what} ne[{d}]") for d in range(n_dims)]
    type_id = cur.u32(f"{what} type")
    offset = cur.u64(f"{what} offset")
    if min(ne) < 1:
        raise fail(cur.path, f"{what} shape", "every ne at least 1", ne)
    if math.prod(ne) > INT64_MAX:
        raise fail(cur.path, f"{what} shape {ne}", "an element count within int64",
                   f"{math.prod(ne):,} (the product overflows)")
    t = GGML_TYPES.get(type_id)
    if t is None:
        raise fail(cur.path, f"{what} type", "a ggml type id", f"{type_id} (unknown)")
    if ne[0] % t.block_size:
        raise fail(cur.path, f"{what} ne[0]", f"a multiple of {t.name}'s block of {t.block_size}", ne[0])
    nbytes = math.prod(ne) // t.block_size * t.type_size
    return TensorInfo(name, tuple(reversed(ne)), type_id, offset, nbytes)


def _check_tensor_table(path: Path, infos: list[TensorInfo], alignment: int, data_offset: int,
                        size: int) -> dict[str, TensorInfo]:
    """Offsets aligned, sizes in bounds without wrap-around, names unique, no two tensors
    sharing a byte."""
    if infos and data_offset > size:
        raise fail(path, "tensor data", f"to start within the {size:,}-byte file", f"offset {data_offset:,} "
                   "(truncated?)")
    tensors: dict[str, TensorInfo] = {}
    for t in infos:
        what = f"tensor {t.name!r}"
        if t.name in tensors:
            raise fail(path, what, "each tensor name once", "it twice (a duplicate name)")
        if t.offset % alignment:
            raise fail(path, f"{what} offset", f"a multiple of the alignment {alignment}", f"{t.offset:,}")
        if t.offset + t.nbytes >= 1 << 64:
            raise fail(path, f"{what} offset + size", "below 2**64",
                       f"{t.offset:,} + {t.nbytes:,} (it wraps around)")
        start = data_offset + t.offset
        if start + t.nbytes > size:
            raise fail(path, f"{what} data", f"bytes {start:,}..{start + t.nbytes:,} within the {size:,}-byte file",
                       "them past its end (truncated?)")
        if start % 4:
            raise fail(path, f"{what} offset", "a file offset that is a multiple of 4", f"{start:,}")
        tensors[t.name] = t
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise fail(path, f"tensor {b.name!r} offset", f"at least {a.offset + a.nbytes:,} (the end of "
                       f"{a.name!r})", f"{b.offset:,}: the two overlap")
    return tensors


def _file_size(path: Path) -> int:
    try:
        if path.is_dir():
            raise fail(path, "model file", "a file", "a directory")
        return path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read model file: {e.strerror or e}") from None


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a GGUF file's header through a throwaway mapping (no weights read)."""
    path = Path(path)
    size = _file_size(path)
    if size < FIXED_HEADER.size:
        raise fail(path, "GGUF header", f"at least {FIXED_HEADER.size} bytes", f"a {size}-byte file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return parse_header(path, mm, min(size, len(mm)))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read model file: {e.strerror or e}") from None


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file starts with GGUF's magic (a directory or unreadable file is not)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# The llama model: metadata -> ModelConfig, and the one layout of its tensors

LLAMA = "llama"
# (GGUF name within a block, TransformerWeights field)
BLOCK_TENSORS = (("attn_q", "wq"), ("attn_k", "wk"), ("attn_v", "wv"), ("attn_output", "wo"),
                 ("attn_norm", "rms_att_weight"), ("ffn_gate", "w1"), ("ffn_down", "w2"), ("ffn_up", "w3"),
                 ("ffn_norm", "rms_ffn_weight"))


@dataclass(frozen=True)
class Slot:
    """One tensor a llama GGUF file holds: its GGUF name, TransformerWeights field (and layer
    for per-layer fields), NumPy shape."""

    name: str
    field: str
    layer: int | None
    shape: tuple[int, ...]

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1


def layout(config: ModelConfig) -> list[Slot]:
    """Every tensor of a llama GGUF file of this shape, in the order llama.cpp's converters
    write them; `output.weight` only for an unshared classifier."""
    c = config
    shapes = c.matrix_shapes()
    slots = [Slot("token_embd.weight", "token_embedding_table", None, (c.vocab_size, c.dim)),
             Slot("output_norm.weight", "rms_final_weight", None, (c.dim,))]
    if not c.shared_classifier:
        slots.append(Slot("output.weight", "wcls", None, (c.vocab_size, c.dim)))
    for layer in range(c.n_layers):
        for name, fld in BLOCK_TENSORS:
            shape = (c.dim,) if fld.startswith("rms_") else shapes[fld]
            slots.append(Slot(f"blk.{layer}.{name}.weight", fld, layer, shape))
    return slots


def _integer(header: Header, key: str, low: int, high: int, default: int | None = None, why: str = "") -> int:
    v = header.metadata.get(key)
    expected = (f"{low}" if low == high else f"an integer in {low}..{high:,}") + why
    if v is None:
        if default is None:
            raise fail(header.path, key, expected, "no such key")
        return default
    if v.type not in INTEGER_TYPES or not low <= v.value <= high:
        raise fail(header.path, key, expected, v.describe())
    return v.value


def _float(header: Header, key: str, low: float, high: float, default: float | None = None) -> float:
    v = header.metadata.get(key)
    if v is None:
        if default is None:
            raise fail(header.path, key, f"a number in ({low}, {high})", "no such key")
        return default
    if v.type not in FLOAT_TYPES or not low < v.value < high:
        raise fail(header.path, key, f"a number in ({low}, {high})", v.describe())
    return float(v.value)


def _string(header: Header, key: str) -> str | None:
    v = header.metadata.get(key)
    if v is not None and v.type != STRING:
        raise fail(header.path, key, "a string", v.describe())
    return None if v is None else v.value


def _refuse_what_llama_is_not(header: Header) -> None:
    """The metadata of models this engine would run wrongly: another architecture, another
    tokenizer, experts, scaled RoPE, one part of a split file."""
    path = header.path
    arch = _string(header, "general.architecture")
    if arch != LLAMA:
        raise fail(path, "general.architecture", "llama", arch if arch is not None else "no such key")
    model = _string(header, "tokenizer.ggml.model")
    if model not in (None, LLAMA):
        raise fail(path, "tokenizer.ggml.model", "llama (a SentencePiece vocabulary)",
                   f"{model} (" + ("a BPE vocabulary such as Llama 3's)" if model == "gpt2" else "another tokenizer)"))
    for key, plain, expected in (
            ("split.count", (0, 1), "one file (merge the parts with llama-gguf-split --merge)"),
            ("llama.expert_count", (0,), "0 (a dense model; mixtures of experts are not supported)"),
            ("llama.rope.scaling.factor", (0, 1), "none or 1 (plain RoPE)"),
            ("llama.rope.scale_linear", (0, 1), "none or 1 (plain RoPE)")):
        v = header.metadata.get(key)
        if v is not None and (v.type not in INTEGER_TYPES | FLOAT_TYPES or v.value not in plain):
            raise fail(path, key, expected, v.describe())
    scaling = _string(header, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise fail(path, "llama.rope.scaling.type", "none (plain RoPE)", scaling)


def model_config(header: Header) -> ModelConfig:
    """The hyperparameters of a llama GGUF file, every key checked, and its tensor table
    checked against them (check_tensors): a config this returns describes the file exactly."""
    _refuse_what_llama_is_not(header)
    key = "llama."
    dim = _integer(header, key + "embedding_length", 1, MAX_DIM)
    n_heads = _integer(header, key + "attention.head_count", 1, MAX_HEADS)
    n_kv = _integer(header, key + "attention.head_count_kv", 1, MAX_HEADS, default=n_heads)
    path = header.path
    if dim % n_heads or (dim // n_heads) % 2:
        raise fail(path, key + "attention.head_count", f"a divisor of embedding_length {dim} leaving an even "
                   "head size", n_heads)
    if n_heads % n_kv:
        raise fail(path, key + "attention.head_count_kv", f"a divisor of head_count {n_heads}", n_kv)
    head_size = dim // n_heads
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        _integer(header, key + name, head_size, head_size, default=head_size,
                 why=" (the head size: embedding_length / head_count)")
    embd = header.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise fail(path, "tensor 'token_embd.weight'", "a matrix (vocab, embedding_length)",
                   "none" if embd is None else f"shape {embd.ne}")
    vocab = _integer(header, key + "vocab_size", 1, MAX_VOCAB, default=embd.shape[0])
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and (tokens.type != ARRAY or len(tokens.value) != vocab):
        raise fail(path, "tokenizer.ggml.tokens", f"{vocab:,} tokens (the model's vocabulary)", tokens.describe())
    config = ModelConfig(
        dim=dim, hidden_dim=_integer(header, key + "feed_forward_length", 1, 4 * MAX_DIM),
        n_layers=_integer(header, key + "block_count", 1, MAX_LAYERS), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=vocab, seq_len=_integer(header, key + "context_length", 1, MAX_SEQ_LEN),
        shared_classifier="output.weight" not in header.tensors, version=1,
        norm_eps=_float(header, key + "attention.layer_norm_rms_epsilon", 0.0, 1.0),
        rope_theta=_float(header, key + "rope.freq_base", 0.0, math.inf, default=10000.0))
    config.validate(f"{path}: metadata")
    check_tensors(header, config)
    return config


def _stray_tensor_hint(name: str) -> str:
    if name.endswith(".bias"):
        return "a bias (llama has none)"
    if "rope_freqs" in name:
        return "RoPE frequency factors (scaled RoPE is not supported)"
    if "_exps" in name or "ffn_gate_inp" in name:
        return "an expert tensor (mixtures of experts are not supported)"
    return "a tensor outside the llama map"


def check_tensors(header: Header, config: ModelConfig) -> None:
    """The file's tensor table is exactly layout(config): nothing missing, nothing extra, every
    shape right, norms in F32."""
    path = header.path
    expected = {s.name: s for s in layout(config)}
    for t in header.tensors.values():
        slot = expected.get(t.name)
        if slot is None:
            raise fail(path, f"tensor {t.name!r}", "only llama's tensors (token_embd, output_norm, output, "
                       "blk.N.attn_*/ffn_*)", _stray_tensor_hint(t.name))
        if t.shape != slot.shape:
            raise fail(path, f"tensor {t.name!r} shape", f"ne {list(reversed(slot.shape))}", f"ne {t.ne}")
        if slot.is_norm and t.type != GGML["F32"]:
            raise fail(path, f"tensor {t.name!r} type", "F32 for a norm vector", type_name(t.type))
    for name in expected:
        if name not in header.tensors:
            raise fail(path, f"tensor {name!r}", f"in the file (block_count {config.n_layers})", "none")


def tensor_formats(header: Header) -> dict[str, formats.Format]:
    """Each tensor's weight format; refuse the first tensor whose type this build cannot read."""
    found = {}
    for t in header.tensors.values():
        fmt = format_for(t.type)
        if fmt is None:
            raise fail(header.path, f"tensor {t.name!r} type", f"one of {', '.join(supported_types())}",
                       f"{type_name(t.type)} (not supported)")
        if fmt.nbytes(t.shape) != t.nbytes:
            raise RuntimeError(f"format {fmt!r} sizes {t.shape} at {fmt.nbytes(t.shape)} bytes, GGUF's "
                               f"{type_name(t.type)} at {t.nbytes}")
        found[t.name] = fmt
    return found


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model's configuration, with every check read_checkpoint makes before mapping: fails
    fast (before compiling) on any file read_checkpoint would refuse."""
    return read_checked_header(path)[1]


def read_checked_header(path: str | os.PathLike) -> tuple[Header, ModelConfig]:
    """The header and the model's configuration, with every check read_checkpoint makes before
    mapping; read_checkpoint(header=) maps the file from it without reading the header again."""
    header = read_header(path)
    config = model_config(header)
    tensor_formats(header)
    return header, config


# ----------------------------------------------------------------------------------------------
# Reading the weights


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A Checkpoint read from a GGUF file, with its header (metadata and tensor table)."""

    header: Header | None = field(default=None, repr=False)


def read_checkpoint(path: str | os.PathLike, in_memory: bool = False, progress=None,
                    header: Header | None = None) -> GGUFCheckpoint:
    """Validate a GGUF file, then map it once (or read it into memory with in_memory) and return
    each tensor as a read-only view in its own format (nothing is copied). `header`: the file's,
    when the caller has read it already (read_checked_header)."""
    path = Path(path)
    header = header if header is not None else read_header(path)
    config = model_config(header)
    fmts = tensor_formats(header)
    mm, buf = file_buffer(path, header.file_size, in_memory, progress)
    if len(buf) != header.file_size:
        raise fail(path, "file size", f"{header.file_size:,} bytes", f"{len(buf):,}: it changed while being read")
    found: dict[str, Any] = {}
    for slot in layout(config):
        t = header.tensors[slot.name]
        view = fmts[slot.name].view(buf, header.data_offset + t.offset, slot.shape)
        if slot.layer is None:
            found[slot.field] = view
        else:
            found.setdefault(slot.field, []).append(view)
    if config.shared_classifier:
        found["wcls"] = found["token_embedding_table"]
    return GGUFCheckpoint(path, config, TransformerWeights(**found), mm, header)


# ----------------------------------------------------------------------------------------------
# The vocabulary

SPACE = "\u2581".encode()  # SentencePiece's visible space
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # run.c's ids, which the engine's generation assumes
BYTE_OFFSET = 3
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
NOT_FROM_TEXT = (UNKNOWN, CONTROL, UNUSED)  # token types encoding never produces


@dataclass
class Vocabulary:
    """tokenizer.ggml.* as llama2.c's tokenizer.bin holds it: pieces with spaces (not U+2581),
    BOS and EOS as "\\n<s>\\n" and "\\n</s>\\n"; plus what the engine needs of the rest."""

    pieces: list[bytes]
    scores: np.ndarray  # float32
    token_types: np.ndarray  # int32, GGUF's token types (1 normal ... 6 byte)
    add_space_prefix: bool = True
    chat_template: str | None = None

    @property
    def special_ids(self) -> list[int]:
        """Ids text must never be encoded into (control, unknown and unused tokens)."""
        return [int(i) for i in np.flatnonzero(np.isin(self.token_types, NOT_FROM_TEXT))]


def byte_piece(b: int) -> bytes:
    return b"<0x%02X>" % b


def _token_array(header: Header, key: str, element: int, n: int) -> np.ndarray | None:
    v = header.metadata.get(key)
    if v is None:
        return None
    if v.type != ARRAY or v.element_type != element or len(v.value) != n:
        raise TokenizerError(f"{header.path}: {key}: expected an array of {n:,} {VALUE_TYPE_NAMES[element]}, "
                             f"found {v.describe()}")
    return v.value


def _check_special_ids(header: Header) -> None:
    for key, expected in (("unknown_token_id", UNK_ID), ("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID)):
        v = header.metadata.get(f"tokenizer.ggml.{key}")
        if v is not None and (v.type not in INTEGER_TYPES or v.value != expected):
            raise TokenizerError(f"{header.path}: tokenizer.ggml.{key}: expected {expected} (the id run.c and "
                                 f"this engine use), found {v.describe()}")
    v = header.metadata.get("tokenizer.ggml.add_bos_token")
    if v is not None and (v.type != BOOL or not v.value):
        raise TokenizerError(f"{header.path}: tokenizer.ggml.add_bos_token: expected true (generation starts "
                             f"every sequence with BOS, as run.c does), found {v.describe()}")


def _check_token_types(path: Path, tokens: list[bytes], types: np.ndarray) -> None:
    bad = np.flatnonzero((types < NORMAL) | (types > BYTE))
    if bad.size:
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type of token {bad[0]}: expected 1..6, "
                             f"found {types[bad[0]]}")
    user = np.flatnonzero(types == USER_DEFINED)
    if user.size:
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type: expected no user-defined tokens (type 4: "
                             f"run.c's encoder cannot match them in text), found {user.size:,}, e.g. id "
                             f"{user[0]} {tokens[user[0]]!r}")


def read_vocabulary(path: str | os.PathLike) -> Vocabulary:
    """The SentencePiece vocabulary in a GGUF file's metadata, checked for what run.c's
    tokenizer needs: ids 0/1/2 for unknown/BOS/EOS, byte pieces <0x00>..<0xFF> at ids 3..258."""
    header = read_header(path)
    path = header.path
    model = _string(header, "tokenizer.ggml.model")
    if model != LLAMA:
        raise TokenizerError(f"{path}: tokenizer.ggml.model: expected llama (a SentencePiece vocabulary), found "
                             + (model or "none (this file carries no vocabulary: pass a tokenizer with -z)"))
    v = header.metadata.get("tokenizer.ggml.tokens")
    if v is None or v.type != ARRAY or v.element_type != STRING:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens: expected an array of strings, found "
                             + (v.describe() if v else "none"))
    tokens: list[bytes] = v.value
    n = len(tokens)
    if not BYTE_OFFSET + 256 <= n <= MAX_VOCAB:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens: expected {BYTE_OFFSET + 256}..{MAX_VOCAB:,} tokens "
                             f"(specials and 256 byte pieces at least), found {n:,}")
    scores = _token_array(header, "tokenizer.ggml.scores", FLOAT32, n)
    scores = np.zeros(n, np.float32) if scores is None else scores.astype(np.float32)
    if not np.isfinite(scores).all():
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise TokenizerError(f"{path}: tokenizer.ggml.scores of token {i}: expected a finite float, found {scores[i]}")
    types = _token_array(header, "tokenizer.ggml.token_type", INT32, n)
    types = infer_token_types(tokens) if types is None else types.astype(np.int32)
    _check_token_types(path, tokens, types)
    _check_special_ids(header)
    for b in range(256):
        if tokens[BYTE_OFFSET + b] != byte_piece(b):
            raise TokenizerError(f"{path}: tokenizer.ggml.tokens[{BYTE_OFFSET + b}]: expected the byte piece "
                                 f"{byte_piece(b).decode()} (run.c's byte fallback), found {tokens[BYTE_OFFSET + b]!r}")
    space_prefix = header.metadata.get("tokenizer.ggml.add_space_prefix")
    if space_prefix is not None and space_prefix.type != BOOL:
        raise TokenizerError(f"{path}: tokenizer.ggml.add_space_prefix: expected a bool, found "
                             f"{space_prefix.describe()}")
    template = header.metadata.get("tokenizer.chat_template")
    if template is not None and template.type != STRING:
        raise TokenizerError(f"{path}: tokenizer.chat_template: expected a string, found {template.describe()}")
    return Vocabulary(pieces_from_tokens(tokens), scores, types, space_prefix is None or space_prefix.value,
                      None if template is None else template.value)


def pieces_from_tokens(tokens: Sequence[bytes]) -> list[bytes]:
    """GGUF tokens -> llama2.c pieces (llama2.c's tokenizer.py export: U+2581 -> space, BOS
    and EOS between newlines)."""
    pieces = [t.replace(SPACE, b" ") for t in tokens]
    for i in (BOS_ID, EOS_ID):
        pieces[i] = b"\n" + tokens[i] + b"\n"
    return pieces


def tokens_from_pieces(pieces: Sequence[bytes]) -> list[bytes]:
    """llama2.c pieces -> GGUF tokens, the inverse of pieces_from_tokens."""
    tokens = [p.replace(b" ", SPACE) for p in pieces]
    for i in (BOS_ID, EOS_ID):
        tokens[i] = pieces[i].strip(b"\n")
    return tokens


def infer_token_types(tokens: Sequence[bytes]) -> np.ndarray:
    """Token types for a vocabulary that does not store them (tokenizer.bin): <unk>, then the
    control tokens BOS and EOS, the byte pieces, everything else normal."""
    types = np.full(len(tokens), NORMAL, np.int32)
    types[UNK_ID], types[BOS_ID], types[EOS_ID] = UNKNOWN, CONTROL, CONTROL
    for b in range(min(256, len(tokens) - BYTE_OFFSET)):
        if tokens[BYTE_OFFSET + b] in (byte_piece(b), bytes([b])):
            types[BYTE_OFFSET + b] = BYTE
    return types


# ----------------------------------------------------------------------------------------------
# Writing

# --type -> (general.file_type, the ggml type of the matrices)
FILE_TYPES = {"f32": (0, GGML["F32"]), "f16": (1, GGML["F16"]), "q8_0": (7, GGML["Q8_0"]),
              "q4_0": (2, GGML["Q4_0"])}
QUANTIZATION_VERSION = 2
# general.file_type values (llama.cpp's llama_ftype), for display
FILE_TYPE_NAMES = {0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0",
                   8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M",
                   13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S",
                   17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K", 32: "MOSTLY_BF16"}


def tensor_type(slot: Slot, file_type: str, shared_classifier: bool) -> int:
    """The ggml type a tensor gets in a file of `file_type`, as llama.cpp's tools choose: norms
    F32; in a Q4_0 file the classifier (output, or token_embd when it is shared) Q8_0, as
    llama-quantize does where Q6_K does not fit; a row that is not a whole number of blocks F16."""
    if slot.is_norm:
        return GGML["F32"]
    wanted = FILE_TYPES[file_type][1]
    classifier = slot.name == "output.weight" or (shared_classifier and slot.name == "token_embd.weight")
    if wanted == GGML["Q4_0"] and classifier:
        wanted = GGML["Q8_0"]
    if slot.shape[-1] % GGML_TYPES[wanted].block_size:
        wanted = GGML["F16"]
    return wanted


def _pack_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(raw)) + raw


def pack_value(v: Value) -> bytes:
    """A metadata value's bytes (type excluded)."""
    if v.type == STRING:
        return _pack_string(v.value)
    if v.type == ARRAY:
        head = struct.pack("<IQ", v.element_type, len(v.value))
        if v.element_type == STRING:
            return head + b"".join(_pack_string(s) for s in v.value)
        return head + np.asarray(v.value).astype(NUMPY_TYPES[v.element_type]).tobytes()
    return np.asarray(v.value).astype(NUMPY_TYPES[v.type]).tobytes()


def pack_metadata(key: str, v: Value) -> bytes:
    return _pack_string(key) + struct.pack("<I", v.type) + pack_value(v)


def pack_tensor_info(t: TensorInfo) -> bytes:
    return (_pack_string(t.name) + struct.pack(f"<I{len(t.shape)}Q", len(t.shape), *t.ne)
            + struct.pack("<IQ", t.type, t.offset))


def pack_header(version: int, metadata: Mapping[str, Value], tensors: Iterable[TensorInfo]) -> bytes:
    """Header, metadata and tensor table, unpadded (the data starts at the next alignment)."""
    tensors = list(tensors)
    return (FIXED_HEADER.pack(MAGIC, version, len(tensors), len(metadata))
            + b"".join(pack_metadata(k, v) for k, v in metadata.items())
            + b"".join(pack_tensor_info(t) for t in tensors))


def model_metadata(config: ModelConfig, file_type: str, name: str) -> dict[str, Value]:
    """general.* and llama.* keys as llama.cpp's converters write them."""
    c = config
    u32 = lambda n: Value(UINT32, int(n))  # noqa: E731
    return {
        "general.architecture": Value(STRING, LLAMA), "general.name": Value(STRING, name),
        "general.file_type": u32(FILE_TYPES[file_type][0]),
        "general.quantization_version": u32(QUANTIZATION_VERSION),
        "llama.vocab_size": u32(c.vocab_size), "llama.context_length": u32(c.seq_len),
        "llama.embedding_length": u32(c.dim), "llama.block_count": u32(c.n_layers),
        "llama.feed_forward_length": u32(c.hidden_dim), "llama.rope.dimension_count": u32(c.head_size),
        "llama.attention.head_count": u32(c.n_heads), "llama.attention.head_count_kv": u32(c.n_kv_heads),
        "llama.attention.layer_norm_rms_epsilon": Value(FLOAT32, float(np.float32(c.norm_eps))),
        "llama.rope.freq_base": Value(FLOAT32, float(np.float32(c.rope_theta))),
    }


def vocabulary_metadata(tokenizer) -> dict[str, Value]:
    """tokenizer.ggml.* keys for a Tokenizer (llama2nb.tokenizer): its pieces as SentencePiece
    tokens, scores, token types (its own, or inferred for a tokenizer.bin), the special ids,
    add_bos_token true and add_eos_token false; the chat template when it has one."""
    tokens = tokens_from_pieces(tokenizer.pieces)
    types = getattr(tokenizer, "token_types", None)
    if types is None:
        types = infer_token_types(tokens)
    keys = {
        "tokenizer.ggml.model": Value(STRING, LLAMA),
        "tokenizer.ggml.tokens": Value(ARRAY, tokens, STRING),
        "tokenizer.ggml.scores": Value(ARRAY, np.asarray(tokenizer.scores, np.float32), FLOAT32),
        "tokenizer.ggml.token_type": Value(ARRAY, np.asarray(types, np.int32), INT32),
        "tokenizer.ggml.unknown_token_id": Value(UINT32, UNK_ID),
        "tokenizer.ggml.bos_token_id": Value(UINT32, BOS_ID),
        "tokenizer.ggml.eos_token_id": Value(UINT32, EOS_ID),
        "tokenizer.ggml.add_bos_token": Value(BOOL, True),
        "tokenizer.ggml.add_eos_token": Value(BOOL, False),
        "tokenizer.ggml.add_space_prefix": Value(BOOL, bool(getattr(tokenizer, "add_space_prefix", True))),
    }
    template = getattr(tokenizer, "chat_template", None)
    if template:
        keys["tokenizer.chat_template"] = Value(STRING, template)
    return keys


def as_float32(value: Any) -> np.ndarray:
    """A tensor as float32: arrays as they are, other formats' matrices dequantized."""
    if isinstance(value, np.ndarray):
        return np.asarray(value, np.float32)
    return np.asarray(formats.format_of(value).dequantize(value), np.float32)


@dataclass(frozen=True)
class Planned:
    slot: Slot
    info: TensorInfo
    format: formats.Format


def plan(config: ModelConfig, file_type: str, path: Path | str = "gguf") -> list[Planned]:
    """Every tensor of the file to write with its type, format and aligned offset."""
    if file_type not in FILE_TYPES:
        raise fail(path, "--type", " or ".join(FILE_TYPES), file_type)
    planned, offset = [], 0
    for slot in layout(config):
        type_id = tensor_type(slot, file_type, config.shared_classifier)
        fmt = format_for(type_id)
        if fmt is None:
            raise fail(path, f"tensor {slot.name!r} type", f"one of {', '.join(supported_types())} (the "
                       "types this build writes)", f"{type_name(type_id)} (not supported yet)")
        nbytes = fmt.nbytes(slot.shape)
        planned.append(Planned(slot, TensorInfo(slot.name, slot.shape, type_id, offset, nbytes), fmt))
        offset = -(-(offset + nbytes) // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    return planned


def _padding(n: int) -> bytes:
    return b"\0" * (-n % DEFAULT_ALIGNMENT)


def write_gguf(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, Any], tokenizer,
               file_type: str = "f32", name: str | None = None) -> None:
    """Write a llama GGUF file, streaming tensor by tensor, atomically (temp file + rename).

    `tensors` maps TransformerWeights' names to stacked arrays or per-layer sequences, in any
    format (F32 arrays, or matrices a format can dequantize): each tensor is taken one at a
    time, as float32, and encoded in the type `file_type` gives it (tensor_type). "wcls" is
    read only for an unshared classifier. `tokenizer` (a llama2nb Tokenizer) fills the
    tokenizer.ggml.* keys."""
    path = Path(path)
    config.validate(str(path))
    if tokenizer.vocab_size != config.vocab_size:
        raise fail(path, "tokenizer", f"{config.vocab_size:,} tokens (the model's vocab_size)",
                   f"{tokenizer.vocab_size:,}")
    planned = plan(config, file_type, path)
    metadata = {**model_metadata(config, file_type, name or path.stem), **vocabulary_metadata(tokenizer)}
    header = pack_header(WRITE_VERSION, metadata, (p.info for p in planned))
    with atomic_write(path) as f:
        f.write(header + _padding(len(header)))
        for p in planned:
            _write_tensor(f, path, p, tensors)


def _write_tensor(f, path: Path, p: Planned, tensors: Mapping[str, Any]) -> None:
    slot = p.slot
    if slot.field not in tensors:
        raise CheckpointError(f"{path}: cannot write {slot.name}: weight {slot.field!r} missing")
    value = tensors[slot.field]
    array = as_float32(value if slot.layer is None else value[slot.layer])
    if array.shape != slot.shape:
        raise fail(path, f"cannot write {slot.name}", f"shape {slot.shape}", array.shape)
    written = 0
    for part in p.format.encode(array):
        raw = memoryview(np.ascontiguousarray(part)).cast("B")
        f.write(raw)
        written += raw.nbytes
    if written != p.info.nbytes:
        raise RuntimeError(f"format {p.format!r} encoded {slot.name} in {written} bytes, expected {p.info.nbytes}")
    f.write(_padding(written))
