"""llama2nb: llama2.c's idea in Python. Train a baby Llama 2 in PyTorch, sample with Numba.

The public names are imported on first use (PEP 562), so `from llama2nb import Transformer`
loads the engine alone, not the tokenizer, the sampler and generation: every module a process
does not need is start-up time saved.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .config import ModelConfig
from .errors import CheckpointError

if TYPE_CHECKING:
    from .forward import Transformer
    from .generate import generate
    from .sampler import Sampler
    from .tokenizer import Tokenizer

_LAZY = {"Transformer": ".forward", "generate": ".generate", "Sampler": ".sampler", "Tokenizer": ".tokenizer"}

__all__ = ["CheckpointError", "ModelConfig", "Sampler", "Tokenizer", "Transformer", "generate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule llama2nb.generate binds the package's `generate` to the module;
    the name is the function's (as when it was imported eagerly): that binding is skipped."""

    def __setattr__(self, name: str, value) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
