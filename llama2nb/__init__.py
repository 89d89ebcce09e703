"""llama2nb: llama2.c's idea in Python. Train a baby Llama 2 in PyTorch, sample with Numba."""

from .config import CheckpointError, ModelConfig
from .forward import Transformer

__all__ = ["CheckpointError", "ModelConfig", "Transformer"]
__version__ = "0.1.0"
