"""What a weight format is, the registry of them, and the two calls the layer code makes.

A weight format is how one matrix is encoded (fp32; Q8_0 with fp32 scales apart, as in
llama2.c's v2 files; ...). It is not a file container: llama2.c's v0/v1/v2 files and GGUF say
which tensors a file holds and where; a format says what one tensor's bytes mean. Everything
that depends on the encoding lives in the format's own module, behind the `Format` interface:

- in files: `nbytes(shape)`, `view(buffer, offset, shape)` (read-only, nothing copied) and
  `encode(array)` (the bytes a writer writes), so a container's reader and writer never branch
  on formats;
- in NumPy: `quantize(array)` and `dequantize(matrix)`, for tests and exports;
- in the engine: `constants(fastmath)` (compile-time constants of its kernels), `scratch(block,
  width)` (the run-state buffers its activations need, allocated once per model) and
  `operand(matrix, scratch)` (what compiled code receives), and two registered kernels, its
  `linear` (a matmul for one token or a block) and its `embed` (rows of the matrix as float32).

The layer code calls `linear(out, x, w, stamp)`, and the model `embed(out, table, tokens)`
(jit.generic): each call runs the kernel of the operand's format. Compiled layer code receives
each matrix bound to its format's matmul (jit.Bound: a pointer to the matmul compiled for that
operand, and one to the operand), so the layer code is written and compiled once, every matrix
carries its own format, and one model may mix formats per tensor. A float32 array is an F32
matrix; every other format's matrices are objects with a `format` attribute.

`stamp` names the input x: formats that quantize activations (Q8_0) quantize x once, keep it in
their scratch with its stamp, and reuse it while the stamp is unchanged (the q, k and v
projections share one input). `new_input(tick)` hands out a fresh stamp whenever x changes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import numpy as np
from numba.core import types

from ..kernels.jit import generic, kernel
from ..mapping import anonymous


class Format:
    """The interface every weight format implements (see the module docstring). Instances are
    values: two formats with equal parameters compare equal."""

    name: ClassVar[str]  # the registry's key, as users and file headers name it
    ggml_type: ClassVar[int | None] = None  # GGUF's id of this encoding (ggml_type), where it has one
    operand_class: ClassVar[type | None]  # the NamedTuple compiled code receives (None: a float32 array)
    linear_kernel: ClassVar[str]  # registered kernel: (out (B, d), x (B, n), w operand, stamp)
    embed_kernel: ClassVar[str]  # registered kernel: (out (B, n), table operand, tokens (B,))

    def nbytes(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def view(self, buffer: np.ndarray, offset: int, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def encode(self, array: np.ndarray) -> Iterable[bytes | np.ndarray]:
        raise NotImplementedError

    def quantize(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def dequantize(self, matrix: Any) -> np.ndarray:
        raise NotImplementedError

    def constants(self, fastmath: str) -> dict[str, Any]:
        return {}

    def kernel_description(self, fastmath: str = "full") -> str:
        """Which matmul this CPU runs for this format (for `llama2nb info`)."""
        raise NotImplementedError

    def scratch(self, block: int, width: int) -> Any:
        return None

    def scratch_key(self) -> Any:
        """Formats whose activations are encoded alike (say, every format that quantizes x to
        int8 per 32 values) return the same key and share one scratch: x is then quantized once
        for all of them. The default: a scratch of its own."""
        return self

    def operand(self, matrix: Any, scratch: Any) -> Any:
        raise NotImplementedError

    def stack(self, matrices: list[Any], allocate: Any = None) -> tuple[list[Any], Any] | None:
        """A layout for_engine repacks into may pack matrices that share an input as one
        (stacked_for_engine), in memory from allocate(nbytes): (each one's view, the whole), or
        None where it does not."""
        return None

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({params})" if params else self.name


REGISTRY: dict[str, type[Format]] = {}
GGML_TYPES: dict[int, type[Format]] = {}  # GGUF's tensor type id -> the format that reads it


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: make a format known to files, the engine and the command line (and to
    GGUF files by its ggml_type, if it has one)."""
    for registry, key in ((REGISTRY, cls.name), (GGML_TYPES, cls.ggml_type)):
        if key is None:
            continue
        other = registry.setdefault(key, cls)
        if (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"format {cls.__qualname__}: {key!r} is already {other.__qualname__}'s")
        registry[key] = cls  # (a module imported anew replaces its own class)
    return cls


REPACKED: dict[type[Format], type[Format]] = {}  # a format -> the in-memory layout it is repacked into at load


def repacks(source: type[Format]):
    """Class decorator: the decorated format is an in-memory layout that `source`'s matrices are
    repacked into at load (for_engine), where the target CPU and fastmath setting use it."""

    def register_layout(cls: type[Format]) -> type[Format]:
        REPACKED[source] = cls
        return cls

    return register_layout


def repacked_layout(matrix: Any, fastmath: str) -> Format | None:
    """The layout for_engine repacks this matrix into (None: it stays as mapped)."""
    layout = REPACKED.get(type(format_of(matrix)))
    return layout() if layout is not None and layout().usable(fastmath) else None


def for_engine(matrix: Any, fastmath: str, allocate: Any = anonymous) -> Any:
    """The matrix in the form the engine multiplies by: as mapped, or repacked into a faster
    layout of the same bits where its format has one this CPU and fastmath setting use (see
    formats/interleaved.py). A repacked matrix is new memory, from allocate(nbytes) (a
    mapping.Arena, say): the caller counts it."""
    layout = repacked_layout(matrix, fastmath)
    return matrix if layout is None else layout.pack(matrix, allocate)


def stacked_for_engine(matrices: list[Any], fastmath: str, allocate: Any = anonymous) -> tuple[list[Any], Any | None]:
    """for_engine of matrices that multiply the same input (q, k and v; w1 and w3), and the
    whole they form where all are repacked into one layout that stacks them (a layout's
    `stack`): then each is a view of its rows in the whole, which the engine multiplies by
    instead, one stream of weights for all (None: no whole, multiply by each)."""
    layouts = {repacked_layout(m, fastmath) for m in matrices}
    layout = layouts.pop() if len(layouts) == 1 else None
    stacked = None if layout is None or len(matrices) < 2 else layout.stack(matrices, allocate)
    return stacked if stacked is not None else ([for_engine(m, fastmath, allocate) for m in matrices], None)


def by_ggml_type(type_id: int) -> Format:
    """The format of a GGUF tensor of ggml type `type_id` (0 F32, 1 F16, 2 Q4_0, ...). Every one
    registered here takes no parameters. ValueError names the id when llama2nb cannot read it."""
    cls = GGML_TYPES.get(type_id)
    if cls is None:
        known = ", ".join(f"{t} ({c.name})" for t, c in sorted(GGML_TYPES.items()))
        raise ValueError(f"ggml type {type_id} is not one llama2nb reads (it reads {known})")
    return cls()


def format_of(matrix: Any) -> Format:
    """The format of a matrix view (a float32 array is F32)."""
    if isinstance(matrix, np.ndarray) and matrix.dtype == np.float32:
        return REGISTRY["f32"]()
    return matrix.format


def _format_class_of_operand(operand: Any) -> type[Format]:
    for cls in REGISTRY.values():
        if cls.operand_class is None and isinstance(operand, np.ndarray):
            return cls
        if cls.operand_class is not None and isinstance(operand, cls.operand_class):
            return cls
    raise TypeError(f"operand: expected a float32 array or a registered format's operand, found {type(operand).__name__}")


def _format_class_of_type(ty: types.Type) -> type[Format] | None:
    for cls in REGISTRY.values():
        if cls.operand_class is None:
            if isinstance(ty, types.Array) and ty.dtype == types.float32 and ty.ndim == 2:
                return cls
        elif isinstance(ty, types.BaseNamedTuple) and ty.instance_class is cls.operand_class:
            return cls
    return None


def _kernel_of_type(attribute: str):
    def choose_type(ty: types.Type) -> str | None:
        cls = _format_class_of_type(ty)
        return None if cls is None else getattr(cls, attribute)

    return choose_type


_ROWS = types.float32[:, ::1]  # out and x, as compiled callers pass them


@generic(2, choose=lambda w: _format_class_of_operand(w).linear_kernel, choose_type=_kernel_of_type("linear_kernel"),
         bound=(_ROWS, _ROWS, None, types.int64))
def linear(out, x, w, stamp):
    """out = x @ w.T in w's format.  out (B, d), x (B, n), w an operand of a (d, n) matrix (in
    compiled code, a jit.Bound of one), stamp the input's stamp (new_input)"""


@generic(1, choose=lambda w: _format_class_of_operand(w).embed_kernel, choose_type=_kernel_of_type("embed_kernel"))
def embed(out, table, tokens):
    """out[b] = row tokens[b] of `table`, as float32.  out (B, n), table an operand of a (rows, n)
    matrix, tokens (B,) int64 (checked by the caller)"""


@kernel
def new_input(tick):
    """A fresh stamp for a new input x (see the module docstring).  tick (1,) int64"""
    tick[0] += 1
    return tick[0]
