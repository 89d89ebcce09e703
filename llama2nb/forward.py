"""RunState (preallocated buffers and the KV cache) and the forward pass: token, pos -> logits.

The layer code is written once, for any mix of weight formats: every matmul is
`linear(out, x, w, stamp)` on a matrix that carries its own format (llama2nb.formats), bound
once to that format's matmul, which is compiled on its own (jit.Bound): the layer code is
compiled once for every mix of formats. The arithmetic is in kernels/ and the formats'
modules; this module only orchestrates. The same code runs one token (generation) or a
block of prompt tokens (prefill): activations carry a leading batch axis. A layer is three calls
into compiled code: attention's input (rmsnorm, q k v, RoPE), attention, and the output
projection with the feed-forward. Attention is called on its own because, compiled into a
larger function, LLVM inlines it and vectorises it far worse. A token allocates nothing.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
from numba.core.dispatcher import Dispatcher


from .config import ModelConfig
from .files import bytes_per_token, open_model, read_model
from .files.llama2c import Checkpoint, TransformerWeights, available_memory, require_memory
from .formats import Format, for_engine, format_of, linear, new_input, repacked_layout, stacked_for_engine
from .kernels.common import add, rmsnorm, rope, split, swiglu
from .kernels.jit import DEFAULT_FASTMATH, NOTHING, Binding, Bound, compile_ahead, compile_family, fastmath_name, kernel
from .mapping import Arena, Progress, fault_in


@kernel
def attention_input(x, xb, q, k, v, qkv, cos, sin, tick, eps, rms_att, wq, wk, wv):
    """Attention's input: rmsnorm, the q k v projections, RoPE, for a block of B tokens. k and v
    are these positions' rows of the KV cache, written in place. Each w is bound to its format's
    matmul (jit.Bound); wk NOTHING: wq is q, k and v's matrices stacked (STACKS), multiplied into
    qkv and split from there.
    x, xb, q (B, dim), k, v (B, kv_dim), qkv (B, dim + 2 kv_dim), cos, sin (B, head_size // 2),
    tick (1,) int64"""
    rmsnorm(xb, x, rms_att, eps)  # xb (B, dim)
    stamp = new_input(tick)  # q, k and v share their input (and its quantized copies)
    if wk.code == 0:  # (NOTHING)
        linear(qkv, xb, wq, stamp)  # qkv (B, dim + 2 kv_dim)
        split(qkv, q, k, v)
    else:
        linear(q, xb, wq, stamp)  # q (B, dim)
        linear(k, xb, wk, stamp)  # k (B, kv_dim)
        linear(v, xb, wv, stamp)  # v (B, kv_dim)
    rope(q, k, cos, sin)


@kernel
def attention_output_and_ffn(x, xb, xb2, hb, hb2, h13, tick, eps, wo, rms_ffn, w1, w2, w3):
    """Attention's output projection and residual, then the SwiGLU feed-forward and residual.
    w3 NOTHING: w1 is w1's and w3's matrices stacked (STACKS), multiplied into h13.
    x (B, dim) the residual stream, xb (B, dim) the attention output, hb, hb2 (B, hidden_dim),
    h13 (B, 2 hidden_dim)"""
    linear(xb2, xb, wo, new_input(tick))  # xb2 (B, dim)
    add(x, xb2)
    rmsnorm(xb, x, rms_ffn, eps)  # xb (B, dim)
    stamp = new_input(tick)
    if w3.code == 0:  # (NOTHING)
        linear(h13, xb, w1, stamp)  # h13 (B, 2 hidden_dim)
        split(h13, hb, hb2, None)
    else:
        linear(hb, xb, w1, stamp)  # hb (B, hidden_dim)
        linear(hb2, xb, w3, stamp)  # hb2 (B, hidden_dim)
    swiglu(hb, hb2)  # hb (B, hidden_dim)
    linear(xb, hb, w2, new_input(tick))  # xb (B, dim)
    add(x, xb)


@kernel
def classifier(logits, x, tick, eps, rms_final, wcls):
    """Final rmsnorm and the classifier.  logits (B, vocab), x (B, dim) (normalised in place)"""
    rmsnorm(x, x, rms_final, eps)
    linear(logits, x, wcls, new_input(tick))


# Splitting a matmul's rows across threads pays only where each matrix is big enough that
# starting and joining the threads (OpenMP's, which spin while they wait) costs little beside
# it, and a busy second core makes every join wait: small models run on one thread whatever is
# asked (benchmarks/performance.md). The bound is on the weights one token reads.
MIN_PARALLEL_BYTES = 32 << 20

# Tokens per prefill block. Each weight row is read once per block and each cached key/value
# row is shared by the block's queries, so bigger is faster while the block's activations
# (block x hidden_dim floats) stay in L2 (benchmarks/performance.md).
PREFILL_BLOCK = 256


@functools.cache
def compiled(fastmath: str = DEFAULT_FASTMATH, weight_formats: frozenset[Format] = frozenset(),
             parallel: bool = False, vnni: bool = True) -> SimpleNamespace:
    """Every kernel compiled with one fastmath setting (see jit.FASTMATH) and the compile-time
    constants of `weight_formats` (e.g. a Q8_0 group size). `vnni=False` keeps the portable
    integer loops (and F16's portable conversion) on a CPU with VNNI (for tests)."""
    fastmath = fastmath_name(fastmath)
    constants: dict[str, Any] = {"FAST_EXP": fastmath == "full" and not numba.config.DISABLE_JIT}
    for fmt in sorted(weight_formats, key=repr):
        for name, value in fmt.constants(fastmath).items():
            if constants.setdefault(name, value) != value:
                raise ValueError(f"weight formats: {sorted(map(repr, weight_formats))} need different {name}")
    if not vnni:  # every format's SIMD paths off
        constants.update(VNNI=False, VNNI512=False, F16C=False, F32_GEMM=False)
    return compile_family(fastmath, constants, parallel=parallel)


def family_name(fastmath: str, weight_formats: frozenset[Format], parallel: bool = False) -> str:
    """A readable name of the kernel family compiled(fastmath, weight_formats, parallel) builds:
    its fastmath setting, formats, threading, and the SIMD paths the target CPU turns on."""
    fastmath = fastmath_name(fastmath)
    constants: dict[str, Any] = {}
    for fmt in weight_formats:
        constants.update(fmt.constants(fastmath))
    simd_paths = [name for name in ("VNNI", "VNNI512", "F16C") if constants.get(name)]
    formats = " + ".join(sorted(map(repr, weight_formats)))
    return (f"{formats}, fastmath {fastmath}" + (", parallel" if parallel else "")
            + (f", {' + '.join(simd_paths)}" if simd_paths else ""))


def rope_tables(head_size: int, seq_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * freq, computed in float32 exactly as run.c does per token
    (freq = 1 / powf(theta, 2j / head_size); val = pos * freq).  each (seq_len, head_size // 2)"""
    two_j = np.arange(0, head_size, 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(theta), two_j / np.float32(head_size))).astype(np.float32)
    angle = (np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]).astype(np.float32)
    return np.cos(angle.astype(np.float64)).astype(np.float32), np.sin(angle.astype(np.float64)).astype(np.float32)


@dataclass
class RunState:
    """Every buffer a forward pass touches, allocated once (run.c's RunState). Activations have
    room for a block of PREFILL_BLOCK tokens; generating a token uses their first row."""

    x: np.ndarray  # (block, dim) the residual stream
    xb: np.ndarray  # (block, dim)
    xb2: np.ndarray  # (block, dim)
    q: np.ndarray  # (block, dim)
    hb: np.ndarray  # (block, hidden_dim)
    hb2: np.ndarray  # (block, hidden_dim)
    qkv: np.ndarray  # (block, dim + 2 kv_dim) q, k and v from their stacked matrix (STACKS)
    h13: np.ndarray  # (block, 2 hidden_dim) hb and hb2 from w1 and w3 stacked
    att: np.ndarray  # (n_heads, seq_len) one token's attention scores
    att_block: np.ndarray  # (block, seq_len) a block's attention scores, one head at a time
    transposed: np.ndarray  # (2, head_size, seq_len) a head's cached keys and values, transposed (attention_block)
    logits: np.ndarray  # (1, vocab_size)
    key_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    value_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    cos: np.ndarray  # (seq_len, head_size // 2) RoPE tables
    sin: np.ndarray  # (seq_len, head_size // 2)
    tick: np.ndarray  # (1,) int64: the last input stamp handed out (formats.new_input)
    scratch: dict[Any, Any]  # activation buffers by Format.scratch_key (Format.scratch)

    @staticmethod
    def shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every float32 buffer's shape (the formats' scratch apart: a few MB at most)."""
        block, half = min(PREFILL_BLOCK, c.seq_len), c.head_size // 2
        return {"x": (block, c.dim), "xb": (block, c.dim), "xb2": (block, c.dim), "q": (block, c.dim),
                "hb": (block, c.hidden_dim), "hb2": (block, c.hidden_dim), "qkv": (block, c.dim + 2 * c.kv_dim),
                "h13": (block, 2 * c.hidden_dim), "att": (c.n_heads, c.seq_len),
                "att_block": (block, c.seq_len), "transposed": (2, c.head_size, c.seq_len), "logits": (1, c.vocab_size),
                "key_cache": (c.n_layers, c.seq_len, c.kv_dim), "value_cache": (c.n_layers, c.seq_len, c.kv_dim),
                "cos": (c.seq_len, half), "sin": (c.seq_len, half)}

    @classmethod
    def nbytes(cls, c: ModelConfig) -> int:
        """The memory allocate() takes for `c` (its seq_len being the context), KV cache included."""
        return 4 * sum(int(np.prod(shape, dtype=np.int64)) for shape in cls.shapes(c).values())

    @classmethod
    def allocate(cls, c: ModelConfig, weight_formats: set[Format], source: str = "model") -> "RunState":
        require_memory(source, "KV cache", cls.nbytes(c), detail=f" ({kv_cache_detail(c)})")
        block, width = min(PREFILL_BLOCK, c.seq_len), max(c.dim, c.hidden_dim)  # width: a matmul's longest input
        buffers = {name: np.zeros(shape, np.float32) for name, shape in cls.shapes(c).items()}
        buffers["cos"], buffers["sin"] = rope_tables(c.head_size, c.seq_len, c.rope_theta)
        return cls(**buffers, tick=np.zeros(1, np.int64),
                   scratch={fmt.scratch_key(): fmt.scratch(block, width) for fmt in weight_formats})


LINEAR_FIELDS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

# Matrices that multiply the same input, packed at load as one where their repacked layout
# stacks them (formats.stacked_for_engine): one stream of weights instead of two or three, which
# DRAM serves faster (benchmarks/performance.md). By the name of the whole, its parts in order.
STACKS = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def repack_bytes(weights: TransformerWeights, fastmath: str) -> int:
    """The bytes engine_weights' repacked copies of these weights take (0: none to make)."""
    return sum(layout.nbytes(m.shape) for m in _multiplied(weights) if (layout := repacked_layout(m, fastmath)))


def _multiplied(weights: TransformerWeights) -> list:
    """Every matrix the layers and the classifier multiply by."""
    return [m for name in LINEAR_FIELDS for m in getattr(weights, name)] + [weights.wcls]


def engine_weights(weights: TransformerWeights, fastmath: str) -> tuple[TransformerWeights, dict[str, list]]:
    """The weights with every matrix the layers and the classifier multiply by in the form the
    engine multiplies by (formats.for_engine: as mapped, or repacked into new memory, one arena
    of repack_bytes), and each layer's STACKS (by name, a whole per layer, or None where its
    parts stay apart). The embedding table stays as it is: it is only read a row at a time."""
    stacks: dict[str, list] = {name: [None] * len(weights.wq) for name in STACKS}
    stacked = {part for parts in STACKS.values() for part in parts}
    fields: dict[str, list] = {name: [] for name in LINEAR_FIELDS}
    arena = Arena(repack_bytes(weights, fastmath) + 64 * (len(_multiplied(weights)) + 1))  # 2 MB pages throughout
    for layer in range(len(weights.wq)):
        for whole, parts in STACKS.items():
            views, stacks[whole][layer] = stacked_for_engine([getattr(weights, part)[layer] for part in parts],
                                                             fastmath, arena)
            for part, view in zip(parts, views):
                fields[part].append(view)
        for name in (name for name in LINEAR_FIELDS if name not in stacked):
            fields[name].append(for_engine(getattr(weights, name)[layer], fastmath, arena))
    return replace(weights, wcls=for_engine(weights.wcls, fastmath, arena), **fields), stacks


def engine_examples(weights: TransformerWeights, fastmath: str) -> tuple[TransformerWeights, list]:
    """What engine_weights would return, for its types only, made without packing: each matrix
    it would repack replaced by its layout's `example` (a stack's whole has its parts' types),
    so that everything can compile while, or before, the packers run; and the packers' jobs
    (compile_ahead's (function, argument types))."""
    layouts: set[Format] = set()

    def example(m):
        layout = repacked_layout(m, fastmath)
        if layout is None:
            return m
        layouts.add(layout)
        return layout.example(m)

    examples = replace(weights, wcls=example(weights.wcls),
                       **{name: [example(m) for m in getattr(weights, name)] for name in LINEAR_FIELDS})
    return examples, [job for layout in layouts for job in layout.packing_jobs()]


def kv_cache_detail(c: ModelConfig) -> str:
    return (f"the KV cache's {c.kv_cache_bytes / 2**30:.2f} GiB for {c.seq_len} positions and the buffers: "
            "--ctx N caps the positions")


def capped(config: ModelConfig, ctx: int | None) -> ModelConfig:
    """The config with its context capped at ctx positions (None: the file's seq_len)."""
    if ctx is not None and ctx < 1:
        raise ValueError(f"ctx: expected 1 or more positions, found {ctx}")
    return replace(config, seq_len=min(ctx or config.seq_len, config.seq_len))


class Transformer:
    """A model's weights (a llama2.c checkpoint or a llama GGUF file, mapped), its run state and compiled kernels.

    >>> model = Transformer.load("stories15M.bin")
    >>> logits = model.forward(token=1, pos=0)   # float32 (vocab_size,)
    >>> logits = model.prefill([1, 306, 4658])   # a prompt in blocks; the last token's logits

    Both return the run state's logits buffer: it is overwritten by the next call. fastmath is
    full by default, as the command line's (jit.DEFAULT_FASTMATH); "off" is IEEE arithmetic.
    `threads` > 1 splits each matmul's rows across that many threads (Numba's prange), set
    around each call: nothing process-wide changes. `ctx` caps the context (the file's seq_len
    by default): the KV cache is allocated for that many positions, and `config.seq_len` is it.
    """

    def __init__(self, checkpoint: Checkpoint, fastmath: bool | str = DEFAULT_FASTMATH, threads: int = 1,
                 warm_up: bool = True, ctx: int | None = None, repack: bool = True):
        self.checkpoint = checkpoint
        self.config = capped(checkpoint.config, ctx)
        self.load_seconds = 0.0  # reading the file (load() sets it)
        self.fastmath = fastmath_name(fastmath)
        if threads < 1:
            raise ValueError(f"threads: expected 1 or more, found {threads}")
        self.notes: list[str] = []  # what a user should know about how the model runs
        self.weights, self.repacked_bytes, self.repack_seconds = checkpoint.weights, 0, 0.0
        self.stacks: dict[str, list] = {name: [None] * checkpoint.config.n_layers for name in STACKS}
        to_repack = self._bytes_to_repack() if repack else 0  # (bytes)
        engine, packing_jobs = engine_examples(checkpoint.weights, self.fastmath) if to_repack else (self.weights, [])
        self.weight_formats = {format_of(m) for m in (engine.token_embedding_table, *_multiplied(engine))}
        self.bytes_per_token = bytes_per_token(checkpoint)
        self.threads = min(threads, numba.config.NUMBA_NUM_THREADS)
        if self.threads > 1 and self.bytes_per_token < MIN_PARALLEL_BYTES:
            self.notes.append(f"threads: this model reads {self.bytes_per_token / 2**20:.1f} MiB a token, too little "
                              f"to split across threads (under {MIN_PARALLEL_BYTES >> 20} MiB): running on one")
            self.threads = 1
        self.state = RunState.allocate(self.config, self.weight_formats, str(checkpoint.path))
        self.kernels = compiled(self.fastmath, frozenset(self.weight_formats), parallel=self.threads > 1)
        self.family = family_name(self.fastmath, frozenset(self.weight_formats), parallel=self.threads > 1)
        self.eps = np.float32(self.config.norm_eps)
        self._one_token = np.zeros(1, np.int64)
        self._entries: dict[tuple, Any] = {}  # call site -> compiled code (_call)
        self._bindings: list[Binding] = []  # what the bound matrices point into, kept alive
        self.compile_seconds = self._compile_ahead(engine, packing_jobs) if warm_up else 0.0
        if to_repack:
            self._repack(to_repack)
        if warm_up:
            self.compile_seconds += self._warm_up()
        else:
            self._args = self._arguments(self._bind)

    def _compile_ahead(self, engine: TransformerWeights, packing_jobs: list) -> float:
        """Compile everything, the packers included, in parallel processes before packing
        (jit.compile_ahead; engine: engine_examples' weights); the seconds it took."""
        started = time.perf_counter()
        compile_ahead(self._compile_jobs(engine, packing_jobs))
        for packer, argument_types in packing_jobs:  # (loaded, or compiled here with one process)
            packer.compile(argument_types)
        return time.perf_counter() - started

    def _bytes_to_repack(self) -> int:
        """The bytes the weights' repacked copies take (formats.for_engine), or 0 where there
        are none, or they do not fit in the memory available beside the run state (then a note
        says the weights are read as mapped)."""
        needed = repack_bytes(self.checkpoint.weights, self.fastmath)
        available = available_memory()
        if needed and available is not None and needed > available - RunState.nbytes(self.config):
            self.notes.append("not repacked into 16-row tiles: the copies would not fit in the memory available "
                              "(reading the weights as mapped, slower)")
            return 0
        return needed

    def _repack(self, nbytes: int) -> None:
        """Repack the weights (engine_weights, nbytes of copies), timed and counted."""
        started = time.perf_counter()
        self.weights, self.stacks = engine_weights(self.checkpoint.weights, self.fastmath)
        self.repack_seconds = time.perf_counter() - started
        self.repacked_bytes = nbytes
        self.notes.append(f"repacked {self.repacked_bytes / 2**20:.0f} MiB of weights into 16-row tiles in "
                          f"{self.repack_seconds:.2f} s (in RAM; --no-repack reads them as mapped)")

    @classmethod
    def load(cls, path: str | os.PathLike, fastmath: bool | str = DEFAULT_FASTMATH, threads: int = 1,
             warm_up: bool = True, in_memory: bool = False, ctx: int | None = None,
             progress: Progress | None = None, repack: bool = True) -> "Transformer":
        """Map a llama2.c checkpoint (v0, v1 or v2) or a llama GGUF file, reading it into the page cache (timed:
        load_seconds; `progress(bytes, size)` as it goes), and compile (or load cached)
        kernels. With warm_up, compiling happens here and is timed apart (compile_seconds);
        without, at first use. in_memory reads the weights into RAM instead of mapping them
        (see files.read_model). repack=False multiplies by every matrix as the file holds it,
        never by a faster in-memory layout of it (formats.for_engine). Refused before anything is read or allocated when the KV cache
        (and with in_memory the weights) would not fit in the memory available."""
        started = time.perf_counter()
        path = Path(path)
        opened = open_model(path)  # the header, read once: read_model maps the file from it
        size, run_state = path.stat().st_size, capped(opened.config, ctx)  # (open_model checked the size)
        if in_memory:
            require_memory(path, "in-memory load", size + RunState.nbytes(run_state), hint=" (map it instead)",
                           detail=f" ({size / 2**30:.2f} GiB of weights, then {kv_cache_detail(run_state)})")
        else:  # (allocate checks again, for models built from a Checkpoint)
            require_memory(path, "KV cache", RunState.nbytes(run_state), detail=f" ({kv_cache_detail(run_state)})")
        available = available_memory()  # the file's cached pages count: they are reclaimable
        checkpoint = read_model(opened, in_memory, progress)
        if warm_up and not in_memory:  # warming up touches every page anyway: time it as loading
            fault_in(checkpoint.buffer)
        load_seconds = time.perf_counter() - started
        model = cls(checkpoint, fastmath, threads, warm_up, ctx, repack)
        model.load_seconds = load_seconds
        if not in_memory and available is not None and size + RunState.nbytes(run_state) > available:
            model.notes.append(f"the weights ({size / 2**30:.1f} GiB) and the KV cache do not fit in the "
                               f"{available / 2**30:.1f} GiB of memory available: tokens will wait for the disk")
        return model

    def _operand(self, matrix: Any) -> Any:
        fmt = format_of(matrix)
        return fmt.operand(matrix, self.state.scratch[fmt.scratch_key()])

    def _matrices(self, weights: TransformerWeights) -> tuple[list[dict[str, Any]], Any]:
        """Each layer's matrices by name (a stack in its first part's place and None in the
        others'), and the classifier."""
        matrices = [{name: getattr(weights, name)[l] for name in LINEAR_FIELDS} for l in range(self.config.n_layers)]
        for l, named in enumerate(matrices):
            for whole, parts in STACKS.items():
                if self.stacks[whole][l] is not None:
                    named.update({parts[0]: self.stacks[whole][l]}, **{part: None for part in parts[1:]})
        return matrices, weights.wcls

    def _bind(self, matrix: Any) -> Bound:
        """The matrix's operand bound to its format's matmul, compiled (or loaded) now if need be."""
        binding = self.kernels.bind("linear", self._operand(matrix))
        self._bindings.append(binding)
        return binding.bound

    def _arguments(self, bind) -> SimpleNamespace:
        """The weights' arguments of each call, gathered once, every matrix as bind(matrix) (a
        Bound; NOTHING in place of a stack's later parts), so the token loop only indexes lists."""
        w, (matrices, wcls) = self.weights, self._matrices(self.weights)
        b = [{name: NOTHING if m is None else bind(m) for name, m in named.items()} for named in matrices]
        layers = range(self.config.n_layers)
        return SimpleNamespace(
            attention_input=[(w.rms_att_weight[l], b[l]["wq"], b[l]["wk"], b[l]["wv"]) for l in layers],
            ffn=[(b[l]["wo"], w.rms_ffn_weight[l], b[l]["w1"], b[l]["w2"], b[l]["w3"]) for l in layers],
            classifier=(w.rms_final_weight, bind(wcls)),
            embed=getattr(self.kernels, format_of(w.token_embedding_table).embed_kernel),  # its format's embed
            embedding=self._operand(w.token_embedding_table))

    def _warm_up(self) -> float:
        """Bind the matrices to their matmuls (compiled ahead, or loaded from Numba's cache),
        then run a 2-token prefill and a token twice: the first time compiles the rest (or loads
        it), the second is pure run time, and the difference is what compiling cost."""
        started = time.perf_counter()
        self._args = self._arguments(self._bind)
        bound = time.perf_counter() - started
        times = []
        for _ in range(2):
            started = time.perf_counter()
            self.prefill([0, 0])
            self.forward(0, 0)
            times.append(time.perf_counter() - started)
        return bound + max(times[0] - times[1], 0.0)

    def _compile_jobs(self, weights: TransformerWeights, packing_jobs: list = ()) -> list[tuple[Any, tuple]]:
        """(function, argument types) of each format's matmul that weights' matrices are bound
        to (engine_examples' stand-ins have the types of what they stand in for), then
        packing_jobs, then every call a prompt block and a token make (the layer code typed with
        placeholders): the longest to compile first, where compile_ahead's processes take them."""
        matrices, wcls = self._matrices(weights)
        operands = [self._operand(m) for named in matrices for m in named.values() if m is not None]
        jobs = [job for operand in [*operands, self._operand(wcls)] for job in self.kernels.binding_jobs("linear", operand)]
        return jobs + list(packing_jobs) + self._entry_points(self._arguments(lambda matrix: NOTHING))  # (a Bound's type)

    def _entry_points(self, args: SimpleNamespace) -> list[tuple[Any, tuple]]:
        """(kernel, argument types) of every call a prompt block and a token make with args."""
        found = []

        def record(site: tuple, kernel: Any, *args: Any) -> None:
            if isinstance(kernel, Dispatcher):
                found.append((kernel, argument_types(kernel, args)))

        for tokens in (np.zeros(2, np.int64), self._one_token):
            self._layers(tokens, 0, self.state.logits, record, args)
        return found

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits for `token` at position `pos`, attending over positions 0..pos of the cache.
        Call with pos = 0, 1, 2, ... in order; pos = 0 starts a new sequence."""
        c = self.config
        if not 0 <= token < c.vocab_size:
            raise ValueError(f"token: expected an id in 0..{c.vocab_size - 1}, found {token}")
        if not 0 <= pos < c.seq_len:
            raise ValueError(f"pos: expected a position in 0..{c.seq_len - 1} (seq_len {c.seq_len}), found {pos}")
        self._one_token[0] = token
        self._run_block(self._one_token, pos, self.state.logits)
        return self.state.logits[0]

    def prefill(self, tokens, pos: int = 0) -> np.ndarray:
        """Run a prompt's tokens at positions pos, pos+1, ... in blocks of PREFILL_BLOCK, each
        weight row read once per block; return the last token's logits (vocab_size,). The KV
        cache ends as if forward() had been called on each token in turn."""
        tokens = self._checked(tokens, pos)
        block = self.state.x.shape[0]  # PREFILL_BLOCK when the state was allocated
        for start in range(0, tokens.size, block):
            last = start + block >= tokens.size
            self._run_block(tokens[start:start + block], pos + start, self.state.logits if last else None)
        return self.state.logits[0]

    def logits(self, tokens, pos: int = 0) -> np.ndarray:
        """prefill(), returning the logits of every position: a new (len(tokens), vocab_size)
        float32 array (row i predicts the token after tokens[i]). For scoring text (eval)."""
        tokens = self._checked(tokens, pos)
        out = np.empty((tokens.size, self.config.vocab_size), np.float32)
        block = self.state.x.shape[0]
        for start in range(0, tokens.size, block):
            chunk = tokens[start:start + block]
            self._run_block(chunk, pos + start, out[start:start + chunk.size])
        return out

    def _checked(self, tokens, pos: int) -> np.ndarray:
        """tokens as int64 (n,), checked against the vocabulary and the context."""
        c = self.config
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)  # (as entry() expects)
        if tokens.size == 0:
            raise ValueError("tokens: expected at least one token, found none")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            bad = int(tokens[(tokens < 0) | (tokens >= c.vocab_size)][0])
            raise ValueError(f"token: expected an id in 0..{c.vocab_size - 1}, found {bad}")
        if not 0 <= pos or pos + tokens.size > c.seq_len:
            raise ValueError(f"pos: expected positions within 0..{c.seq_len - 1} (seq_len {c.seq_len}), "
                             f"found {pos}..{pos + tokens.size - 1}")
        return tokens

    def _run_block(self, tokens: np.ndarray, pos: int, logits: np.ndarray | None) -> None:
        """The forward pass for tokens (B,) at positions pos..pos+B-1, on self.threads threads,
        into `logits`: (1, vocab) for the last token's, (B, vocab) for every one's, None for
        none (a prompt's earlier blocks only fill the KV cache)."""
        if self.threads == 1:
            return self._layers(tokens, pos, logits)
        caller_threads = numba.get_num_threads()
        numba.set_num_threads(self.threads)
        try:
            self._layers(tokens, pos, logits)
        finally:
            numba.set_num_threads(caller_threads)

    def _call(self, site: tuple, kernel: Any, *args: Any) -> None:
        """kernel(*args) through the compiled code found for this call site at its first call
        (entry): every call at a site passes arguments of the same types."""
        code = self._entries.get(site)
        if code is None:
            code = self._entries[site] = entry(kernel, args)
        code(*args)

    def _layers(self, tokens: np.ndarray, pos: int, logits: np.ndarray | None, call=None, args=None) -> None:
        c, s, k, eps, call, a = self.config, self.state, self.kernels, self.eps, call or self._call, args or self._args
        B = tokens.shape[0]
        x, xb, xb2, q, hb, hb2 = s.x[:B], s.xb[:B], s.xb2[:B], s.q[:B], s.hb[:B], s.hb2[:B]  # (B, ...)
        cos, sin = s.cos[pos:pos + B], s.sin[pos:pos + B]  # (B, head_size // 2) these positions' angles
        call(("embed",), a.embed, x, a.embedding, tokens)  # the tokens' embeddings -> x (B, dim)
        for l in range(c.n_layers):
            key_cache, value_cache = s.key_cache[l], s.value_cache[l]  # (seq_len, kv_dim) each
            # rmsnorm, q k v (k and v straight into these positions' cache rows), RoPE
            call(("input", l), k.attention_input, x, xb, q, key_cache[pos:pos + B], value_cache[pos:pos + B], s.qkv[:B],
                 cos, sin, s.tick, eps, *a.attention_input[l])
            # causal attention over positions 0..pos(+b) -> xb (B, dim)
            if B == 1:
                call(("attention",), k.attention, xb[0], q[0], key_cache, value_cache, s.att, pos, c.n_kv_heads)
            else:
                call(("attention_block",), k.attention_block, xb, q, key_cache, value_cache, s.att_block[:B],
                     s.transposed, pos, c.n_kv_heads)
            # output projection, residual, SwiGLU feed-forward, residual -> x (B, dim)
            call(("ffn", l), k.attention_output_and_ffn, x, xb, xb2, hb, hb2, s.h13[:B], s.tick, eps, *a.ffn[l])
        # final rmsnorm and classifier, for the last token or all -> logits (1 or B, vocab_size)
        if logits is not None:
            call(("classifier",), k.classifier, logits, x[B - logits.shape[0]:], s.tick, eps, *a.classifier)


def entry(kernel: Any, args: tuple) -> Any:
    """The compiled code behind a kernel's dispatcher for these arguments' types (compiled or
    loaded from the cache now if need be), to call directly with any arguments of the same
    types. A dispatcher call first works out every argument's type, which for the layers'
    weights (named tuples of arrays) takes several times as long as the unboxing itself
    (benchmarks/performance.md). Without Numba (NUMBA_DISABLE_JIT): the kernel itself."""
    if not isinstance(kernel, Dispatcher):
        return kernel
    return kernel.compile(argument_types(kernel, args))


def argument_types(kernel: Dispatcher, args: tuple) -> tuple:
    """The Numba types of a call's arguments: the signature a dispatcher compiles for them."""
    return tuple(kernel.typeof_pyval(arg) for arg in args)
