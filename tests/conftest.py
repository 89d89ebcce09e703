"""Shared fixtures: tiny random checkpoints written by the project's own writer, and ../shared."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from llama2nb.files.llama2c import write_checkpoint
from llama2nb.testmodels import random_weights
from llama2nb.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K.bin"
LLAMA2_BIN = SHARED / "tokenizers" / "llama2.bin"
LLAMA2_MODEL = SHARED / "tokenizers" / "llama2.model"

TINY = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=67, seq_len=80)

# name -> config: every layout and the attention variants the kernels must handle. The Q8_0
# models share group size 32 (llama2.c's export picks 32 or 64; the VNNI kernel's width): a group
# size is a compile-time constant, so each one is a kernel family of its own to compile per
# fastmath setting. Other group sizes: kernel by kernel (test_kernels.py), and in the forward
# passes of the exports of test_export.py and test_big.py (16), stories260K in Q8_0 (4) and
# test_forward.py's two-family process (16).
TINY_MODELS = {
    "v0-shared": TINY,
    "v0-unshared": replace(TINY, shared_classifier=False),
    "v0-gqa": replace(TINY, n_kv_heads=2),
    "v1-shared": replace(TINY, version=1),
    "v1-unshared-gqa": replace(TINY, version=1, shared_classifier=False, n_kv_heads=1),
    "v2-shared": replace(TINY, version=2, group_size=32),
    "v2-unshared-gqa": replace(TINY, version=2, group_size=32, shared_classifier=False, n_kv_heads=2),
}


def default_ctrl_c() -> None:
    """preexec_fn for a child the test sends SIGINT: a runner started in the background by a
    script (`make test &`) ignores SIGINT, children inherit that, and Python then installs no
    KeyboardInterrupt handler; restore the default first."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def requires(path: Path):
    """Skip cleanly where ../shared is absent (a user's fresh clone has none)."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (../shared is the developers' folder)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for i, (name, config) in enumerate(TINY_MODELS.items()):
        paths[name] = folder / f"{name}.bin"
        write_checkpoint(paths[name], config, random_weights(config, seed=i, scale=0.1))
    return paths
