"""ModelConfig: a model's hyperparameters (llama2.c's checkpoint header and the constants it
leaves implicit), with the sizes derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import CheckpointError

# Upper limits that no real Llama-2-shaped model reaches but that keep a garbage header from
# asking for terabytes: a header is validated against them before any size is computed from it.
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_VOCAB = 1 << 22
MAX_SEQ_LEN = 1 << 20


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # transformer width
    hidden_dim: int  # SwiGLU inner width
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (< n_heads: grouped-query attention)
    vocab_size: int
    seq_len: int  # maximum context, the KV cache's length
    shared_classifier: bool = True  # the classifier is the token embedding table
    version: int = 0  # llama2.c layout: 0 legacy fp32, 1 fp32, 2 Q8_0
    group_size: int = 0  # Q8_0 group size (version 2 only; 0 otherwise)
    norm_eps: float = 1e-5  # RMSNorm's epsilon (llama2.c's files imply 1e-5)
    rope_theta: float = 10000.0  # RoPE's base (llama2.c's files imply 10000)

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def weight_format(self):
        """The format of a llama2.c file's matrices: Q8_0 for version 2, else F32."""
        from .formats import F32, Q8_0

        return Q8_0(self.group_size) if self.version == 2 else F32()

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """Shape (rows, cols) of every per-layer weight matrix, torch.nn.Linear style (out, in)."""
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        return {"wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d),
                "w1": (h, d), "w2": (d, h), "w3": (h, d)}

    @property
    def q8_group_size(self) -> int:
        """The Q8_0 group size this shape gets unless the user picks one: the largest of 64 and
        32 that divides every row length (32 is GGUF's Q8_0 block and the VNNI kernel's width),
        else 16, else the largest divisor of every row length up to 64."""
        rows = math.gcd(self.dim, self.hidden_dim)
        for size in (64, 32, 16):
            if rows % size == 0:
                return size
        return max(d for d in range(1, min(rows, 64) + 1) if rows % d == 0)

    @property
    def n_params(self) -> int:
        per_layer = sum(r * c for r, c in self.matrix_shapes().values()) + 2 * self.dim
        classifier = 0 if self.shared_classifier else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + classifier

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.n_layers * self.seq_len * self.kv_dim * 4

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a single-token forward pass reads (one embedding row, not the table)."""
        fmt = self.weight_format
        matrices = [shape for shape in self.matrix_shapes().values() for _ in range(self.n_layers)]
        matrices.append((self.vocab_size, self.dim))  # the classifier
        norms = (2 * self.n_layers + 1) * self.dim * 4
        return sum(fmt.nbytes(shape) for shape in matrices) + norms + fmt.nbytes((1, self.dim))

    def validate(self, source: str = "config") -> None:
        """Raise CheckpointError naming the first field that is out of range or inconsistent."""

        def bad(field: str, expected: str, found) -> CheckpointError:
            return CheckpointError(f"{source}: header field {field}: expected {expected}, found {found}")

        for field, limit in (("dim", MAX_DIM), ("hidden_dim", 4 * MAX_DIM), ("n_layers", MAX_LAYERS),
                             ("n_heads", MAX_HEADS), ("n_kv_heads", MAX_HEADS),
                             ("vocab_size", MAX_VOCAB), ("seq_len", MAX_SEQ_LEN)):
            value = getattr(self, field)
            if not 0 < value <= limit:
                raise bad(field, f"an integer in 1..{limit}", value)
        if self.dim % self.n_heads:
            raise bad("n_heads", f"a divisor of dim={self.dim}", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"a divisor of n_heads={self.n_heads}", self.n_kv_heads)
        if self.head_size % 2:
            raise bad("n_heads", "an even head size (dim / n_heads) for RoPE's pairs", f"head size {self.head_size}")
        if self.version not in (0, 1, 2):
            raise bad("version", "0, 1 or 2", self.version)
        if self.version == 2:
            gs = self.group_size
            if gs <= 0:
                raise bad("group_size", "a positive integer", gs)
            for field in ("dim", "hidden_dim"):
                if getattr(self, field) % gs:
                    raise bad("group_size", f"a divisor of {field}={getattr(self, field)} (every row length)", gs)
        elif self.group_size:
            raise bad("group_size", f"0 for version {self.version}", self.group_size)
