"""RunState (preallocated buffers and the KV cache) and the forward pass: token, pos -> logits.

Orchestration only: the arithmetic is in kernels.py. A layer is three calls into compiled code:
the q k v projections, attention, and the output projection with the feed-forward. Attention is
called on its own because, compiled into a larger function, LLVM inlines it and vectorises it
far worse (2-4x slower at 256 positions). A token allocates nothing.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import kernels
from .checkpoint import Checkpoint, read_checkpoint
from .config import CheckpointError, ModelConfig
from .jit import fastmath_name, jit_family
from .kernels import add, attention, matmul, matmul_q8, quantize, rmsnorm, rope, swiglu


def qkv_fp32(x, xb, q, k, v, cos, sin, rms_att, wq, wk, wv):
    """Attention's input: rmsnorm, the q k v projections, RoPE. k and v are this position's rows
    of the KV cache, written in place.  x, xb, q (dim,), k, v (kv_dim,), cos, sin (head_size // 2,)"""
    rmsnorm(xb, x, rms_att)  # xb (dim,)
    matmul(q, xb, wq)  # q (dim,)
    matmul(k, xb, wk)  # k (kv_dim,)
    matmul(v, xb, wv)  # v (kv_dim,)
    rope(q, k, cos, sin)


def ffn_fp32(x, xb, xb2, hb, hb2, wo, rms_ffn, w1, w2, w3):
    """Attention's output projection and residual, then the SwiGLU feed-forward and residual.
    x (dim,) the residual stream, xb (dim,) the attention output, hb, hb2 (hidden_dim,)"""
    matmul(xb2, xb, wo)  # xb2 (dim,)
    add(x, xb2)
    rmsnorm(xb, x, rms_ffn)  # xb (dim,)
    matmul(hb, xb, w1)  # hb (hidden_dim,)
    matmul(hb2, xb, w3)  # hb2 (hidden_dim,)
    swiglu(hb, hb2)  # hb (hidden_dim,)
    matmul(xb, hb, w2)  # xb (dim,)
    add(x, xb)


def qkv_q8(x, xb, q, k, v, cos, sin, xq, xs, rms_att, wq, sq, wk, sk, wv, sv):
    """qkv_fp32 for Q8_0 weights (runq.c): the normalised input is quantized per group first.
    xq (dim,) int8 and xs (dim // GS,) its scales; w* int8 (rows, cols) with scales s*"""
    rmsnorm(xb, x, rms_att)  # xb (dim,)
    quantize(xq, xs, xb)  # xq (dim,) int8
    matmul_q8(q, xq, xs, wq, sq)  # q (dim,)
    matmul_q8(k, xq, xs, wk, sk)  # k (kv_dim,)
    matmul_q8(v, xq, xs, wv, sv)  # v (kv_dim,)
    rope(q, k, cos, sin)


def ffn_q8(x, xb, xb2, hb, hb2, xq, xs, hq, hs, wo, so, rms_ffn, w1, s1, w2, s2, w3, s3):
    """ffn_fp32 for Q8_0 weights: every matmul's input is quantized first.
    hq (hidden_dim,) int8 and hs (hidden_dim // GS,) for w2's input"""
    quantize(xq, xs, xb)
    matmul_q8(xb2, xq, xs, wo, so)  # xb2 (dim,)
    add(x, xb2)
    rmsnorm(xb, x, rms_ffn)  # xb (dim,)
    quantize(xq, xs, xb)
    matmul_q8(hb, xq, xs, w1, s1)  # hb (hidden_dim,)
    matmul_q8(hb2, xq, xs, w3, s3)  # hb2 (hidden_dim,)
    swiglu(hb, hb2)  # hb (hidden_dim,)
    quantize(hq, hs, hb)  # hq (hidden_dim,) int8
    matmul_q8(xb, hq, hs, w2, s2)  # xb (dim,)
    add(x, xb)


def classifier_q8(logits, x, xq, xs, rms_final, wq, ws):
    """Final rmsnorm and the Q8_0 classifier.  logits (vocab,), x (dim,)"""
    rmsnorm(x, x, rms_final)
    quantize(xq, xs, x)
    matmul_q8(logits, xq, xs, wq, ws)


def classifier_fp32(logits, x, rms_final, wcls):
    """Final rmsnorm and the classifier.  logits (vocab,), x (dim,)"""
    rmsnorm(x, x, rms_final)
    matmul(logits, x, wcls)


FAMILY = kernels.KERNELS + (qkv_fp32, ffn_fp32, qkv_q8, ffn_q8, classifier_fp32, classifier_q8)


@functools.cache
def compiled(fastmath: str = "off", group_size: int = 0) -> SimpleNamespace:
    """The kernels and layer functions compiled with one fastmath setting (see jit.FASTMATH) and,
    for Q8_0 files, one group size (0 for fp32 files, which never call the Q8_0 kernels)."""
    return jit_family(FAMILY, fastmath, constants={"GROUP_SIZE": group_size})


def rope_tables(seq_len: int, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * freq, computed in float32 exactly as run.c does per token
    (freq = 1 / powf(10000, 2j / head_size); val = pos * freq).  each (seq_len, head_size // 2)"""
    two_j = np.arange(0, head_size, 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(10000.0), two_j / np.float32(head_size))).astype(np.float32)
    angle = (np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]).astype(np.float32)
    return np.cos(angle.astype(np.float64)).astype(np.float32), np.sin(angle.astype(np.float64)).astype(np.float32)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class RunState:
    """Every buffer a forward pass touches, allocated once (run.c's RunState)."""

    x: np.ndarray  # (dim,) the residual stream
    xb: np.ndarray  # (dim,)
    xb2: np.ndarray  # (dim,)
    q: np.ndarray  # (dim,)
    hb: np.ndarray  # (hidden_dim,)
    hb2: np.ndarray  # (hidden_dim,)
    att: np.ndarray  # (n_heads, seq_len) attention scores
    logits: np.ndarray  # (vocab_size,)
    key_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    value_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    cos: np.ndarray  # (seq_len, head_size // 2)
    sin: np.ndarray  # (seq_len, head_size // 2)
    xq: np.ndarray  # (dim,) int8 quantized activations (Q8_0 files only, else empty)
    xs: np.ndarray  # (dim // group_size,)
    hq: np.ndarray  # (hidden_dim,) int8
    hs: np.ndarray  # (hidden_dim // group_size,)

    @classmethod
    def allocate(cls, c: ModelConfig, source: str = "model") -> "RunState":
        available = available_memory()
        if available is not None and c.kv_cache_bytes > 0.9 * available:
            raise CheckpointError(f"{source}: KV cache: needs {c.kv_cache_bytes / 2**30:.1f} GiB "
                                  f"(n_layers x seq_len x kv_dim x 2 x 4 bytes), only "
                                  f"{available / 2**30:.1f} GiB of memory is available")
        f32 = np.float32
        gs = c.group_size or 1
        qdim, qhidden = (c.dim, c.hidden_dim) if c.quantized else (0, 0)
        cos, sin = rope_tables(c.seq_len, c.head_size)
        return cls(
            x=np.zeros(c.dim, f32), xb=np.zeros(c.dim, f32), xb2=np.zeros(c.dim, f32), q=np.zeros(c.dim, f32),
            hb=np.zeros(c.hidden_dim, f32), hb2=np.zeros(c.hidden_dim, f32),
            att=np.zeros((c.n_heads, c.seq_len), f32), logits=np.zeros(c.vocab_size, f32),
            key_cache=np.zeros((c.n_layers, c.seq_len, c.kv_dim), f32),
            value_cache=np.zeros((c.n_layers, c.seq_len, c.kv_dim), f32),
            cos=cos, sin=sin,
            xq=np.zeros(qdim, np.int8), xs=np.zeros(qdim // gs, f32),
            hq=np.zeros(qhidden, np.int8), hs=np.zeros(qhidden // gs, f32),
        )


class Transformer:
    """A llama2.c checkpoint, mapped, with its run state and compiled kernels.

    >>> model = Transformer.load("stories15M.bin")
    >>> logits = model.forward(token=1, pos=0)   # float32 (vocab_size,)

    forward() returns the run state's logits buffer: it is overwritten by the next call.
    """

    def __init__(self, checkpoint: Checkpoint, fastmath: bool | str = False):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.weights = checkpoint.weights
        self.fastmath = fastmath_name(fastmath)
        self.state = RunState.allocate(self.config, str(checkpoint.path))
        self.kernels = compiled(self.fastmath, self.config.group_size)
        self._bind_layers()
        self.compile_seconds = self._warm_up()

    @classmethod
    def load(cls, path: str | os.PathLike, fastmath: bool | str = False) -> "Transformer":
        """Map a llama2.c checkpoint (v0, v1 or v2) and compile (or load cached) kernels."""
        return cls(read_checkpoint(Path(path)), fastmath)

    def _bind_layers(self) -> None:
        """Gather each layer's arguments once, so the token loop only indexes lists."""
        c, w, s, k = self.config, self.weights, self.state, self.kernels
        layers = range(c.n_layers)
        if c.quantized:
            def qs(m):
                return (m.q, m.s)
            self._qkv, self._ffn, self._classifier = k.qkv_q8, k.ffn_q8, k.classifier_q8
            self._qkv_args = [(s.xq, s.xs, w.rms_att_weight[l], *qs(w.wq[l]), *qs(w.wk[l]), *qs(w.wv[l]))
                              for l in layers]
            self._ffn_args = [(s.xq, s.xs, s.hq, s.hs, *qs(w.wo[l]), w.rms_ffn_weight[l], *qs(w.w1[l]),
                               *qs(w.w2[l]), *qs(w.w3[l])) for l in layers]
            self._classifier_args = (s.logits, s.x, s.xq, s.xs, w.rms_final_weight, *qs(w.wcls))
        else:
            self._qkv, self._ffn, self._classifier = k.qkv_fp32, k.ffn_fp32, k.classifier_fp32
            self._qkv_args = [(w.rms_att_weight[l], w.wq[l], w.wk[l], w.wv[l]) for l in layers]
            self._ffn_args = [(w.wo[l], w.rms_ffn_weight[l], w.w1[l], w.w2[l], w.w3[l]) for l in layers]
            self._classifier_args = (s.logits, s.x, w.rms_final_weight, w.wcls)

    def _warm_up(self) -> float:
        """Run position 0 twice: the first call compiles (or loads from Numba's cache), the
        second is pure run time, and the difference is what compiling cost."""
        started = time.perf_counter()
        self.forward(0, 0)
        first = time.perf_counter() - started
        started = time.perf_counter()
        self.forward(0, 0)
        return max(first - (time.perf_counter() - started), 0.0)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits for `token` at position `pos`, attending over positions 0..pos of the cache.
        Call with pos = 0, 1, 2, ... in order; pos = 0 starts a new sequence."""
        c, w, s, k = self.config, self.weights, self.state, self.kernels
        if not 0 <= token < c.vocab_size:
            raise ValueError(f"token: expected an id in 0..{c.vocab_size - 1}, found {token}")
        if not 0 <= pos < c.seq_len:
            raise ValueError(f"pos: expected a position in 0..{c.seq_len - 1} (seq_len {c.seq_len}), found {pos}")
        if c.quantized:
            emb = w.token_embedding_table
            k.dequantize_row(s.x, emb.q, emb.s, token)  # x (dim,) the token's embedding
        else:
            s.x[:] = w.token_embedding_table[token]  # x (dim,) the token's embedding
        for l in range(c.n_layers):
            key_cache, value_cache = s.key_cache[l], s.value_cache[l]  # (seq_len, kv_dim) each
            # rmsnorm, q k v (k and v straight into this position's cache rows), RoPE
            self._qkv(s.x, s.xb, s.q, key_cache[pos], value_cache[pos], s.cos[pos], s.sin[pos], *self._qkv_args[l])
            # attention over positions 0..pos -> xb (dim,)
            k.attention(s.xb, s.q, key_cache, value_cache, s.att, pos, c.n_kv_heads)
            # output projection, residual, SwiGLU feed-forward, residual -> x (dim,)
            self._ffn(s.x, s.xb, s.xb2, s.hb, s.hb2, *self._ffn_args[l])
        self._classifier(*self._classifier_args)  # final rmsnorm, logits (vocab_size,)
        return s.logits
