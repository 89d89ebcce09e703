"""RunState (preallocated buffers and the KV cache) and the forward pass: token, pos -> logits.

Orchestration only: the arithmetic is in kernels.py. The same code runs one token (generation)
or a block of prompt tokens (prefill): activations carry a leading batch axis. A layer is three
calls into compiled code:
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

import numba
import numpy as np

from . import kernels, simd
from .files.llama2c import Checkpoint, read_checkpoint, require_memory
from .config import ModelConfig
from .jit import fastmath_name, jit_family
from .kernels import add, matmul, matmul_q8, quantize, rmsnorm, rope, swiglu


def qkv_fp32(x, xb, q, k, v, cos, sin, rms_att, wq, wk, wv):
    """Attention's input: rmsnorm, the q k v projections, RoPE, for a block of B tokens. k and v
    are these positions' rows of the KV cache, written in place.
    x, xb, q (B, dim), k, v (B, kv_dim), cos, sin (B, head_size // 2)"""
    rmsnorm(xb, x, rms_att)  # xb (B, dim)
    matmul(q, xb, wq)  # q (B, dim)
    matmul(k, xb, wk)  # k (B, kv_dim)
    matmul(v, xb, wv)  # v (B, kv_dim)
    rope(q, k, cos, sin)


def ffn_fp32(x, xb, xb2, hb, hb2, wo, rms_ffn, w1, w2, w3):
    """Attention's output projection and residual, then the SwiGLU feed-forward and residual.
    x (B, dim) the residual stream, xb (B, dim) the attention output, hb, hb2 (B, hidden_dim)"""
    matmul(xb2, xb, wo)  # xb2 (B, dim)
    add(x, xb2)
    rmsnorm(xb, x, rms_ffn)  # xb (B, dim)
    matmul(hb, xb, w1)  # hb (B, hidden_dim)
    matmul(hb2, xb, w3)  # hb2 (B, hidden_dim)
    swiglu(hb, hb2)  # hb (B, hidden_dim)
    matmul(xb, hb, w2)  # xb (B, dim)
    add(x, xb)


def qkv_q8(x, xb, q, k, v, cos, sin, xq, xs, rms_att, wq, sq, wk, sk, wv, sv):
    """qkv_fp32 for Q8_0 weights (runq.c): the normalised input is quantized per group first.
    xq (B, dim) int8 and xs (B, dim // GS) its scales; w* int8 (rows, cols) with scales s*"""
    rmsnorm(xb, x, rms_att)  # xb (B, dim)
    quantize(xq, xs, xb)  # xq (B, dim) int8
    matmul_q8(q, xq, xs, wq, sq)  # q (B, dim)
    matmul_q8(k, xq, xs, wk, sk)  # k (B, kv_dim)
    matmul_q8(v, xq, xs, wv, sv)  # v (B, kv_dim)
    rope(q, k, cos, sin)


def ffn_q8(x, xb, xb2, hb, hb2, xq, xs, hq, hs, wo, so, rms_ffn, w1, s1, w2, s2, w3, s3):
    """ffn_fp32 for Q8_0 weights: every matmul's input is quantized first.
    hq (B, hidden_dim) int8 and hs (B, hidden_dim // GS) for w2's input"""
    quantize(xq, xs, xb)
    matmul_q8(xb2, xq, xs, wo, so)  # xb2 (B, dim)
    add(x, xb2)
    rmsnorm(xb, x, rms_ffn)  # xb (B, dim)
    quantize(xq, xs, xb)
    matmul_q8(hb, xq, xs, w1, s1)  # hb (B, hidden_dim)
    matmul_q8(hb2, xq, xs, w3, s3)  # hb2 (B, hidden_dim)
    swiglu(hb, hb2)  # hb (B, hidden_dim)
    quantize(hq, hs, hb)  # hq (B, hidden_dim) int8
    matmul_q8(xb, hq, hs, w2, s2)  # xb (B, dim)
    add(x, xb)


def classifier_fp32(logits, x, rms_final, wcls):
    """Final rmsnorm and the classifier, for one token.  logits (1, vocab), x (1, dim)"""
    rmsnorm(x, x, rms_final)
    matmul(logits, x, wcls)


def classifier_q8(logits, x, xq, xs, rms_final, wq, ws):
    """classifier_fp32 for Q8_0 weights.  xq (>= 1, dim), xs (>= 1, dim // GS): row 0 is used"""
    rmsnorm(x, x, rms_final)
    quantize(xq[:1], xs[:1], x)
    matmul_q8(logits, xq[:1], xs[:1], wq, ws)


# Tokens per prefill block. Each weight row is read once per block and each cached key/value
# row is shared by the block's queries, so bigger is faster while the block's activations
# (block x hidden_dim floats) stay in L2: 15M pp256 ran at 2,700 tok/s with 32, 3,800 with 128
# and 4,500 with 256.
PREFILL_BLOCK = 256

FAMILY = kernels.KERNELS + (qkv_fp32, ffn_fp32, qkv_q8, ffn_q8, classifier_fp32, classifier_q8)


@functools.cache
def compiled(fastmath: str = "off", group_size: int = 0, parallel: bool = False, vnni: bool = True) -> SimpleNamespace:
    """The kernels and layer functions compiled with one fastmath setting (see jit.FASTMATH) and,
    for Q8_0 files, one group size (0 for fp32 files, which never call the Q8_0 kernels). With
    fastmath, on a CPU with VNNI (simd.VNNI), the Q8_0 matmul uses it unless `vnni` is False."""
    fastmath = fastmath_name(fastmath)
    use_vnni = vnni and simd.VNNI and fastmath != "off" and simd.vnni_chunk(group_size) > 0
    constants = {"GROUP_SIZE": group_size, "VNNI": use_vnni,
                 "FAST_EXP": fastmath == "full" and not numba.config.DISABLE_JIT}
    return jit_family(FAMILY, fastmath, parallel=parallel, constants=constants, sources=[simd.__file__])


def rope_tables(seq_len: int, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * freq, computed in float32 exactly as run.c does per token
    (freq = 1 / powf(10000, 2j / head_size); val = pos * freq).  each (seq_len, head_size // 2)"""
    two_j = np.arange(0, head_size, 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(10000.0), two_j / np.float32(head_size))).astype(np.float32)
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
    att: np.ndarray  # (n_heads, seq_len) one token's attention scores
    att_block: np.ndarray  # (block, seq_len) a block's attention scores, one head at a time
    logits: np.ndarray  # (1, vocab_size)
    key_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    value_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    cos: np.ndarray  # (seq_len, head_size // 2) RoPE tables
    sin: np.ndarray  # (seq_len, head_size // 2)
    xq: np.ndarray  # (block, dim) int8 quantized activations (Q8_0 files only, else 0 columns)
    xs: np.ndarray  # (block, dim // group_size) their scales
    hq: np.ndarray  # (block, hidden_dim) int8
    hs: np.ndarray  # (block, hidden_dim // group_size)

    @classmethod
    def allocate(cls, c: ModelConfig, source: str = "model") -> "RunState":
        require_memory(source, "KV cache", c.kv_cache_bytes, detail=" (n_layers x seq_len x kv_dim x 2 x 4 bytes)")
        f32, block = np.float32, min(PREFILL_BLOCK, c.seq_len)
        gs = c.group_size or 1
        qdim, qhidden = (c.dim, c.hidden_dim) if c.quantized else (0, 0)
        cos, sin = rope_tables(c.seq_len, c.head_size)
        return cls(
            x=np.zeros((block, c.dim), f32), xb=np.zeros((block, c.dim), f32), xb2=np.zeros((block, c.dim), f32),
            q=np.zeros((block, c.dim), f32), hb=np.zeros((block, c.hidden_dim), f32),
            hb2=np.zeros((block, c.hidden_dim), f32), att=np.zeros((c.n_heads, c.seq_len), f32),
            att_block=np.zeros((block, c.seq_len), f32),
            logits=np.zeros((1, c.vocab_size), f32),
            key_cache=np.zeros((c.n_layers, c.seq_len, c.kv_dim), f32),
            value_cache=np.zeros((c.n_layers, c.seq_len, c.kv_dim), f32),
            cos=cos, sin=sin,
            xq=np.zeros((block, qdim), np.int8), xs=np.zeros((block, qdim // gs), f32),
            hq=np.zeros((block, qhidden), np.int8), hs=np.zeros((block, qhidden // gs), f32),
        )


class Transformer:
    """A llama2.c checkpoint, mapped, with its run state and compiled kernels.

    >>> model = Transformer.load("stories15M.bin")
    >>> logits = model.forward(token=1, pos=0)   # float32 (vocab_size,)
    >>> logits = model.prefill([1, 306, 4658])   # a prompt in blocks; the last token's logits

    Both return the run state's logits buffer: it is overwritten by the next call.
    `threads` > 1 splits each matmul's rows across that many threads (Numba's prange).
    """

    def __init__(self, checkpoint: Checkpoint, fastmath: bool | str = False, threads: int = 1,
                 warm_up: bool = True):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.weights = checkpoint.weights
        self.fastmath = fastmath_name(fastmath)
        if threads < 1:
            raise ValueError(f"threads: expected 1 or more, found {threads}")
        self.threads = threads
        self.state = RunState.allocate(self.config, str(checkpoint.path))
        if threads > 1:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.kernels = compiled(self.fastmath, self.config.group_size, parallel=threads > 1)
        self._bind_weights()
        self._one_token = np.zeros(1, np.int64)
        self.compile_seconds = self._warm_up() if warm_up else 0.0

    @classmethod
    def load(cls, path: str | os.PathLike, fastmath: bool | str = False, threads: int = 1,
             warm_up: bool = True, in_memory: bool = False) -> "Transformer":
        """Map a llama2.c checkpoint (v0, v1 or v2) and compile (or load cached) kernels. With
        warm_up, compiling happens here and is timed (compile_seconds); without, at first use.
        in_memory reads the weights into RAM instead of mapping them (faster when they stream
        from DRAM, see read_checkpoint)."""
        return cls(read_checkpoint(Path(path), in_memory), fastmath, threads, warm_up)

    def _bind_weights(self) -> None:
        """Gather each layer's weight arguments once, so the token loop only indexes lists."""
        c, w, k = self.config, self.weights, self.kernels
        layers = range(c.n_layers)
        if c.quantized:
            def qs(m):
                return (m.q, m.s)
            self._qkv, self._ffn, self._classifier = k.qkv_q8, k.ffn_q8, k.classifier_q8
            self._qkv_weights = [(w.rms_att_weight[l], *qs(w.wq[l]), *qs(w.wk[l]), *qs(w.wv[l])) for l in layers]
            self._ffn_weights = [(*qs(w.wo[l]), w.rms_ffn_weight[l], *qs(w.w1[l]), *qs(w.w2[l]), *qs(w.w3[l]))
                                 for l in layers]
            self._classifier_weights = (w.rms_final_weight, *qs(w.wcls))
        else:
            self._qkv, self._ffn, self._classifier = k.qkv_fp32, k.ffn_fp32, k.classifier_fp32
            self._qkv_weights = [(w.rms_att_weight[l], w.wq[l], w.wk[l], w.wv[l]) for l in layers]
            self._ffn_weights = [(w.wo[l], w.rms_ffn_weight[l], w.w1[l], w.w2[l], w.w3[l]) for l in layers]
            self._classifier_weights = (w.rms_final_weight, w.wcls)

    def _warm_up(self) -> float:
        """Run a 2-token prefill and a token twice: the first time compiles (or loads from Numba's
        cache), the second is pure run time, and the difference is what compiling cost."""
        times = []
        for _ in range(2):
            started = time.perf_counter()
            self.prefill([0, 0])
            self.forward(0, 0)
            times.append(time.perf_counter() - started)
        return max(times[0] - times[1], 0.0)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits for `token` at position `pos`, attending over positions 0..pos of the cache.
        Call with pos = 0, 1, 2, ... in order; pos = 0 starts a new sequence."""
        c = self.config
        if not 0 <= token < c.vocab_size:
            raise ValueError(f"token: expected an id in 0..{c.vocab_size - 1}, found {token}")
        if not 0 <= pos < c.seq_len:
            raise ValueError(f"pos: expected a position in 0..{c.seq_len - 1} (seq_len {c.seq_len}), found {pos}")
        self._one_token[0] = token
        self._run_block(self._one_token, pos)
        return self.state.logits[0]

    def prefill(self, tokens, pos: int = 0) -> np.ndarray:
        """Run a prompt's tokens at positions pos, pos+1, ... in blocks of PREFILL_BLOCK, each
        weight row read once per block; return the last token's logits (vocab_size,). The KV
        cache ends as if forward() had been called on each token in turn."""
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise ValueError("tokens: expected at least one token, found none")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            bad = int(tokens[(tokens < 0) | (tokens >= c.vocab_size)][0])
            raise ValueError(f"token: expected an id in 0..{c.vocab_size - 1}, found {bad}")
        if not 0 <= pos or pos + tokens.size > c.seq_len:
            raise ValueError(f"pos: expected positions within 0..{c.seq_len - 1} (seq_len {c.seq_len}), "
                             f"found {pos}..{pos + tokens.size - 1}")
        block = self.state.x.shape[0]  # PREFILL_BLOCK when the state was allocated
        for start in range(0, tokens.size, block):
            self._run_block(tokens[start:start + block], pos + start, logits=start + block >= tokens.size)
        return self.state.logits[0]

    def _run_block(self, tokens: np.ndarray, pos: int, logits: bool = True) -> None:
        """The forward pass for tokens (B,) at positions pos..pos+B-1; with `logits`, the last
        one's logits (a prompt's earlier blocks only need to fill the KV cache)."""
        c, w, s, k = self.config, self.weights, self.state, self.kernels
        B = tokens.shape[0]
        x, xb, xb2, q, hb, hb2 = s.x[:B], s.xb[:B], s.xb2[:B], s.q[:B], s.hb[:B], s.hb2[:B]  # (B, ...)
        cos, sin = s.cos[pos:pos + B], s.sin[pos:pos + B]  # (B, head_size // 2) these positions' angles
        quantized = (s.xq[:B], s.xs[:B], s.hq[:B], s.hs[:B]) if c.quantized else ()
        # the tokens' embeddings -> x (B, dim)
        if c.quantized:
            k.embed_q8(x, w.token_embedding_table.q, w.token_embedding_table.s, tokens)
        else:
            np.take(w.token_embedding_table, tokens, axis=0, out=x)
        for l in range(c.n_layers):
            key_cache, value_cache = s.key_cache[l], s.value_cache[l]  # (seq_len, kv_dim) each
            # rmsnorm, q k v (k and v straight into these positions' cache rows), RoPE
            self._qkv(x, xb, q, key_cache[pos:pos + B], value_cache[pos:pos + B], cos, sin, *quantized[:2],
                      *self._qkv_weights[l])
            # causal attention over positions 0..pos(+b) -> xb (B, dim)
            if B == 1:
                k.attention(xb[0], q[0], key_cache, value_cache, s.att, pos, c.n_kv_heads)
            else:
                k.attention_block(xb, q, key_cache, value_cache, s.att_block[:B], pos, c.n_kv_heads)
            # output projection, residual, SwiGLU feed-forward, residual -> x (B, dim)
            self._ffn(x, xb, xb2, hb, hb2, *quantized, *self._ffn_weights[l])
        # final rmsnorm and classifier, for the last token only -> logits (1, vocab_size)
        if logits:
            self._classifier(s.logits, x[B - 1:], *quantized[:2], *self._classifier_weights)
