"""The Llama 2 architecture as llama2.c defines it, in PyTorch.

RMSNorm (eps 1e-5), rotary embeddings (theta 10000) on interleaved pairs, grouped-query
attention, a SwiGLU feed-forward whose hidden width is 2/3 * 4 * dim rounded up to
`multiple_of`, tied input/output embeddings by default, and dropout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    hidden_dim: int | None = None
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    shared_classifier: bool = True

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_config(self, version: int = 0, group_size: int = 0) -> ModelConfig:
        return ModelConfig(self.dim, self.ffn_dim, self.n_layers, self.n_heads, self.kv_heads,
                           self.vocab_size, self.max_seq_len, self.shared_classifier,
                           version=version, group_size=group_size, norm_eps=self.norm_eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_cos_sin(*, seq_len: int, head_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_size // 2): row p holds position p's
    angles p * theta^(-2i / head_size). Keyword-only: the engine's own table function takes the
    same two sizes positionally."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_size, 2)[: head_size // 2].float() / head_size))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_size); rotate each interleaved pair (x[2i], x[2i+1])."""
    xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(3)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.kv_heads
        assert self.n_heads % self.n_kv_heads == 0
        self.head_size = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_size, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_size, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_size, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_size, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_size)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # query head h reads kv head h // rep, as run.c does
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=True)
        out = out.transpose(1, 2).contiguous().view(b, t, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.shared_classifier:
            self.tok_embeddings.weight = self.output.weight
        cos, sin = rotary_cos_sin(seq_len=args.max_seq_len, head_size=args.dim // args.n_heads)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections, as llama2.c does
        for name, p in self.named_parameters():
            if name.endswith("w3.weight") or name.endswith("wo.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (batch, seq, vocab); with targets, (logits, mean cross-entropy loss)."""
        t = tokens.shape[1]
        h = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.freqs_cos[:t], self.freqs_sin[:t]
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        """AdamW with weight decay on the matrices/embeddings only, as llama2.c does."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------
    # llama2.c export

    def export_weights(self) -> dict[str, np.ndarray]:
        """The float32 arrays llama2nb.files.llama2c.write_checkpoint takes."""

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float32).numpy().copy()

        def stack(get) -> np.ndarray:
            return np.stack([arr(get(layer)) for layer in self.layers])

        w = {
            "token_embedding_table": arr(self.tok_embeddings.weight),
            "rms_att_weight": stack(lambda l: l.attention_norm.weight),
            "rms_ffn_weight": stack(lambda l: l.ffn_norm.weight),
            "rms_final_weight": arr(self.norm.weight),
        }
        for name in ("wq", "wk", "wv", "wo"):
            w[name] = stack(lambda l, n=name: getattr(l.attention, n).weight)
        for name in ("w1", "w2", "w3"):
            w[name] = stack(lambda l, n=name: getattr(l.feed_forward, n).weight)
        if not self.args.shared_classifier:
            w["wcls"] = arr(self.output.weight)
        return w
