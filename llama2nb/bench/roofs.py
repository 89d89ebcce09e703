"""The fp32 roof: how close a generation row comes to streaming its bytes at the measured bandwidth.

Generating a token from an fp32 model that does not fit the last-level cache reads every weight
from DRAM once, plus the KV-cache rows attention reads, so bytes per token / bandwidth bounds its
speed; a row's roof is its tok/s over that bound. The roof is computed for every generation length
the row measures, from the length itself (attention reads positions 0..pos, more for longer
runs), each run paired with the bandwidth probed just before it. Q8_0 rows get none (the column
is the fp32 roof); weights that fit the cache get "in cache": there the bound is arithmetic.
"""

from __future__ import annotations

import statistics

from ..config import ModelConfig
from .worker import generation_key

IN_CACHE = "in cache"


def gets_dram_roof(weight_bytes: int, cache_bytes: int) -> bool:
    """Weights larger than the last-level cache: generation streams them from DRAM."""
    return weight_bytes > cache_bytes


def kv_positions_read(steps: int) -> float:
    """Positions of K and V rows attention reads per token, on average, generating `steps` tokens."""
    return (steps + 1) / 2


def bytes_read_per_token(config: ModelConfig, weight_bytes: int, steps: int) -> float:
    """The weights, and every layer's K and V rows attention reads on average over `steps` tokens."""
    kv_row_bytes = config.n_layers * 2 * config.kv_dim * 4
    return weight_bytes + kv_row_bytes * kv_positions_read(steps)


def roof_fraction(rates: list[float], bandwidths_gbs: list[float], bytes_per_token: float) -> float:
    """The median over runs of tok/s x bytes per token / the bandwidth probed before that run."""
    return statistics.median(tok_s * bytes_per_token / (gbs * 1e9) for tok_s, gbs in zip(rates, bandwidths_gbs))


def generation_roofs(config: ModelConfig, weight_bytes: int, lengths: tuple, result: dict) -> dict[str, float]:
    """Each measured generation length's roof: {"tg128": fraction, ...}; result holds the rates per
    generation key and "bandwidth_gbs", one probe per run."""
    return {generation_key(n): roof_fraction(result[generation_key(n)], result["bandwidth_gbs"],
                                             bytes_read_per_token(config, weight_bytes, n))
            for n in lengths if generation_key(n) in result}
