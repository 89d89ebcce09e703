"""Peak private memory of an export: a child process runs it while this process samples the
child's RssAnon from /proc/PID/status (an address-space limit would count the mapped shards,
the very mapping streaming relies on). Also a fake Meta checkpoint of any shape, written shard
by shard with random bf16 weights. For tests/test_big.py and scripts/export_memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import numpy as np
import torch  # imported first by every mode: the baseline holds the interpreter and torch

def anon_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

from llama2nb.config import ModelConfig
from llama2nb.export import ExportOptions, export, llama2c_header, open_source
from llama2nb.files.llama2c import write_checkpoint
from llama2nb.testmodels import write_random_model

mode, source, out, version = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
baseline = anon_kb()
started = time.perf_counter()
if mode == "stream":
    export(source, out, options=ExportOptions(version))
elif mode == "whole":  # the whole-model path: every tensor gathered as float32, then written
    src = open_source(source)
    weights = {name: np.asarray(src[name]) for name in src}
    write_checkpoint(out, llama2c_header(src.config, ExportOptions(version), out), weights)
elif mode == "random":
    write_random_model(out, ModelConfig(**json.loads(source)))
print(json.dumps({"baseline_kb": baseline, "seconds": time.perf_counter() - started}))
"""


@dataclass(frozen=True)
class Measured:
    peak_kb: int  # the child's peak RssAnon, sampled every millisecond
    baseline_kb: int  # its RssAnon once python, numpy, torch and llama2nb were imported
    seconds: float  # the export alone

    @property
    def grown_kb(self) -> int:
        return self.peak_kb - self.baseline_kb


def _anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def measure(mode: str, source: str | os.PathLike, out: str | os.PathLike, version: int = 2) -> Measured:
    """Run CHILD's `mode` (stream: llama2nb.export; whole: gather then write; random:
    write_random_model of the ModelConfig fields `source` holds as JSON) and sample its RssAnon."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(source), str(out), str(version)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _anon_kb(proc.pid) or 0)
        time.sleep(0.001)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{mode} export failed:\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return Measured(peak, result["baseline_kb"], result["seconds"])


def write_fake_meta(folder: Path, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int,
                    multiple_of: int = 256, shards: int = 2, seed: int = 0) -> int:
    """A Meta checkpoint of random bf16 weights (consolidated.NN.pth model-parallel shards and
    params.json), built one shard at a time; returns its parameter count."""
    import torch

    from llama2nb.files.meta import hidden_dim_rule

    folder.mkdir(parents=True, exist_ok=True)
    hidden, kv = hidden_dim_rule(dim, multiple_of, None), n_kv_heads * (dim // n_heads)
    shapes = {"tok_embeddings.weight": (vocab, dim // shards), "norm.weight": (dim,),
              "output.weight": (vocab // shards, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (dim // shards, dim), p + "attention.wk.weight": (kv // shards, dim),
                       p + "attention.wv.weight": (kv // shards, dim), p + "attention.wo.weight": (dim, dim // shards),
                       p + "feed_forward.w1.weight": (hidden // shards, dim),
                       p + "feed_forward.w2.weight": (dim, hidden // shards),
                       p + "feed_forward.w3.weight": (hidden // shards, dim),
                       p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)})
    generator = torch.Generator().manual_seed(seed)
    params = 0
    for k in range(shards):
        shard = {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
                params += shape[0] if k == 0 else 0
            else:
                shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                params += shape[0] * shape[1]
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
        del shard
    (folder / "params.json").write_text(json.dumps({"dim": dim, "n_layers": n_layers, "n_heads": n_heads,
                                                    "n_kv_heads": n_kv_heads, "multiple_of": multiple_of,
                                                    "norm_eps": 1e-5, "vocab_size": -1}))
    return params
