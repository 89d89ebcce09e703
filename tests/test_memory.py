"""Loading maps the checkpoint instead of copying it: anonymous memory stays far below the weights."""

from __future__ import annotations

import subprocess
import sys

from llama2nb.bench import SHAPES
from llama2nb.files.llama2c import write_checkpoint
from llama2nb.testmodels import random_weights

PROBE = """
import sys
from llama2nb import Transformer

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

Transformer.load(sys.argv[2], fastmath=True).forward(1, 1)  # the JIT's own memory, on a tiny model
before = anon_kb()
model = Transformer.load(sys.argv[1], fastmath=True)  # maps, runs two warm-up passes
model.forward(1, 1)
print(anon_kb() - before)
"""


def test_loading_maps_rather_than_copies(tmp_path, tiny_models):
    config = SHAPES["15M"]  # 61 MB of fp32 weights
    path = tmp_path / "m.bin"
    write_checkpoint(path, config, random_weights(config))
    probe = [sys.executable, "-c", PROBE, str(path), str(tiny_models["v0-shared"])]
    grown_kb = int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-1])
    weights_kb = path.stat().st_size // 1024
    kv_and_buffers_kb = (config.kv_cache_bytes + 64 * (4 * config.dim + 2 * config.hidden_dim) * 4) // 1024
    # what grows is the KV cache, the buffers and the JIT's own memory, never a copy of the weights
    assert grown_kb < kv_and_buffers_kb + 0.1 * weights_kb, (grown_kb, weights_kb)
