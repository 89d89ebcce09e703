"""Weight formats, one module each; importing this package registers them all (see base.py).

Adding a format is one module here (its Format subclass, matrix view, operand and kernels),
its tests, and one line below.
"""

from .base import GGML_TYPES, REGISTRY, Format, by_ggml_type, embed, for_engine, format_of, linear, new_input, register, repacked_layout, stacked_for_engine
from .f32 import F32
from .q8_0 import Q8_0
from .gguf_float import BF16, F16
from .gguf_legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0Block
from .gguf_kquants import Q4_K, Q5_K, Q6_K
from .interleaved import Q4_0Tiles, Q4_1Tiles, Q4_KTiles, Q5_0Tiles, Q5_1Tiles, Q6_KTiles, Q8_0Tiles

__all__ = ["BF16", "F16", "F32", "Format", "GGML_TYPES", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
           "Q8_0", "Q8_0Block", "Q4_0Tiles", "Q4_1Tiles", "Q4_KTiles", "Q5_0Tiles", "Q5_1Tiles", "Q6_KTiles", "Q8_0Tiles", "REGISTRY", "by_ggml_type", "embed", "for_engine", "format_of", "repacked_layout", "stacked_for_engine", "linear", "new_input", "register"]
