"""llama2nb: llama2.c's idea in Python. Train a baby Llama 2 in PyTorch, sample with Numba."""

from .config import ModelConfig
from .errors import CheckpointError
from .forward import Transformer
from .generate import generate
from .sampler import Sampler
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "ModelConfig", "Sampler", "Tokenizer", "Transformer", "generate"]
__version__ = "0.1.0"
