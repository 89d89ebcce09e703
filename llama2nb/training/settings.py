"""Training settings: `TrainConfig` (llama2.c's train.py globals as a dataclass; its defaults are
llama2.c's stories15M run), the presets, and how flags combine with them.

Torch-free, so `llama2nb train --help` shows these very values as its defaults (a preset's with
`--preset NAME --help`) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data: str = "data/tok512"  # a shard directory written by `llama2nb data pretokenize`
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 100
    eval_only: bool = False
    always_save_checkpoint: bool = False
    # model
    vocab_size: int = 0  # 0: from the shard directory's meta.json
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 6
    multiple_of: int = 32
    hidden_dim: int = 0  # 0: from dim and multiple_of
    max_seq_len: int = 256
    dropout: float = 0.0
    shared_classifier: bool = True
    # optimization
    batch_size: int = 128
    gradient_accumulation_steps: int = 4
    learning_rate: float = 5e-4
    max_iters: int = 100000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    decay_lr: bool = True
    warmup_iters: int = 1000
    lr_decay_iters: int = 0  # 0: max_iters
    min_lr: float = 0.0
    # system
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    seed: int = 1337


PRESETS: dict[str, dict] = {
    # for tests and quick checks: trains in seconds on one CPU core
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                 batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, max_iters=60,
                 warmup_iters=5, eval_interval=20, eval_iters=4, weight_decay=0.0, dropout=0.0),
    # llama2.c's stories260K run
    "260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4, max_seq_len=512,
                 batch_size=128, gradient_accumulation_steps=1, learning_rate=1e-3, dropout=0.05,
                 weight_decay=0.01, max_iters=100000, beta2=0.99, warmup_iters=1000,
                 eval_interval=2000, eval_iters=100),
    # llama2.c's train.py defaults (stories15M)
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=32, max_seq_len=256,
                batch_size=128, gradient_accumulation_steps=4),
    "42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, multiple_of=32, max_seq_len=1024,
                batch_size=32, gradient_accumulation_steps=16),
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=32, max_seq_len=1024,
                 batch_size=32, gradient_accumulation_steps=16),
}

MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "max_seq_len",
                "vocab_size", "shared_classifier")


def config_from(preset: str | None, overrides: dict) -> TrainConfig:
    """TrainConfig's defaults, then the preset's values, then `overrides` (None: not given)."""
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
    return TrainConfig(**values)
