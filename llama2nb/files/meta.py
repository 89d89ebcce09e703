"""Meta's original Llama checkpoints as a tensor source: params.json + consolidated.NN.pth.

Contract: `open_meta(folder)` checks params.json and every shard's tensor names and shapes, maps
the shards (torch.load(mmap=True, weights_only=True): torch is needed for .pth files only) and
returns a TensorSource (files.source) whose tensors are read on demand, a block of rows at a
time, converted from bfloat16/float16/float32 to float32.

The format, as Meta's llama repository writes it: model-parallel shard k holds a slice of every
matrix. tok_embeddings, attention.wo and feed_forward.w2 are split along dim 1 (their input
side), every other matrix along dim 0; 1-D tensors (the norms) are replicated; rope.freqs is
RoPE's table, recomputed by the engine and ignored. q and k are in the interleaved RoPE layout
the engine uses (no permutation). params.json gives dim, n_layers, n_heads, n_kv_heads (grouped
query; default n_heads), norm_eps, rope_theta (default 10000), and multiple_of with
ffn_dim_multiplier (the SwiGLU width's rule), but not the vocabulary (vocab_size -1) nor the
context length: the vocabulary and hidden_dim come from the tensor shapes (hidden_dim checked
against the rule), the context from the caller (Llama 2's is 4096).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import CheckpointError
from .source import PER_LAYER, WHOLE, Joined, Stored, TensorSource, TorchStored, load_torch_mapped, \
    read_json_object, read_rows, tensor_shape

LLAMA2_SEQ_LEN = 4096  # Llama 2's context; Meta's files do not record one
NAMES = {  # engine name -> Meta's ({} is the layer)
    "token_embedding_table": "tok_embeddings.weight", "rms_final_weight": "norm.weight", "wcls": "output.weight",
    "rms_att_weight": "layers.{}.attention_norm.weight", "rms_ffn_weight": "layers.{}.ffn_norm.weight",
    "wq": "layers.{}.attention.wq.weight", "wk": "layers.{}.attention.wk.weight",
    "wv": "layers.{}.attention.wv.weight", "wo": "layers.{}.attention.wo.weight",
    "w1": "layers.{}.feed_forward.w1.weight", "w2": "layers.{}.feed_forward.w2.weight",
    "w3": "layers.{}.feed_forward.w3.weight",
}
SPLIT_ON_INPUT = ("token_embedding_table", "wo", "w2")  # joined along dim 1; other matrices along dim 0
IGNORED = ("rope.freqs",)


def is_meta_dir(folder: Path) -> bool:
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def hidden_dim_rule(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_params(folder: Path) -> dict[str, Any]:
    path = folder / "params.json"
    params = read_json_object(path, "Meta's params.json")
    for key in ("use_scaled_rope", "rope_scaling", "moe"):
        if params.get(key):
            raise CheckpointError(f"{path}: field {key}: expected none (the engine has plain RoPE and dense layers), "
                                  f"found {params[key]}")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int):
            raise CheckpointError(f"{path}: field {key}: expected an integer, found {params.get(key)!r}")
    return params


class MetaSource(TensorSource):
    """A Meta checkpoint folder, its shards mapped (see the module docstring)."""

    def __init__(self, folder: Path, seq_len: int = LLAMA2_SEQ_LEN) -> None:
        params = read_params(folder)
        shards = sorted(folder.glob("consolidated.*.pth"))
        if not shards:
            raise CheckpointError(f"{folder}: expected consolidated.NN.pth shards beside params.json, found none")
        states = [load_torch_mapped(s) for s in shards]
        tensors = _join(folder, states, params["n_layers"])
        config = _config(folder, params, tensors, seq_len)
        tokenizer = folder / "tokenizer.model"
        if not tokenizer.is_file() and (folder.parent / "tokenizer.model").is_file():
            tokenizer = folder.parent / "tokenizer.model"  # Meta's download puts it beside the model folders
        super().__init__(config, folder, tokenizer if tokenizer.is_file() else None)
        self.tensors = tensors
        _check_shapes(folder, config, tensors)

    def read(self, name, layer, start, stop):
        return read_rows(self.tensors[NAMES[name].format(layer)], start, stop)


def _join(folder: Path, states: list[dict[str, Any]], n_layers: int) -> dict[str, Stored]:
    """Every tensor the engine needs, joined across the shards (checked: each shard holds the
    same names; nothing unknown is dropped silently)."""
    names = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != names:
            odd = sorted(names ^ set(state))[0]
            raise CheckpointError(f"{folder}: shard {i}: expected the tensors of shard 0, found a difference at {odd!r}")
    wanted = {NAMES[n] for n in WHOLE} | {NAMES[n].format(l) for n in PER_LAYER for l in range(n_layers)}
    unknown = sorted(names - wanted - set(IGNORED))
    if unknown:
        raise CheckpointError(f"{folder}: tensor {unknown[0]!r}: expected only Llama's tensors for "
                              f"n_layers={n_layers} (biases, other layers, adapters are not supported)")
    joined: dict[str, Stored] = {}
    for engine_name, meta_name in NAMES.items():
        for layer in (range(n_layers) if engine_name in PER_LAYER else [None]):
            key = meta_name.format(layer)
            if key not in names:
                continue
            pieces = [TorchStored(state[key]) for state in states]
            if len(pieces[0].shape) == 1:
                joined[key] = pieces[0]  # replicated
            else:
                joined[key] = Joined(pieces, 1 if engine_name in SPLIT_ON_INPUT else 0)
    return joined


def _config(folder: Path, params: dict[str, Any], tensors: dict[str, Stored], seq_len: int) -> ModelConfig:
    path = folder / "params.json"
    for key in ("tok_embeddings.weight", "norm.weight", "layers.0.feed_forward.w1.weight"):
        if key not in tensors:
            raise CheckpointError(f"{folder}: tensor {key!r}: expected it in the shards, found none")
    vocab, dim = tensors["tok_embeddings.weight"].shape
    hidden = tensors["layers.0.feed_forward.w1.weight"].shape[0]
    if params.get("vocab_size", -1) not in (-1, vocab):
        raise CheckpointError(f"{path}: field vocab_size: expected -1 or the embedding's {vocab} rows, found "
                              f"{params['vocab_size']}")
    if "multiple_of" in params:
        rule = hidden_dim_rule(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
        if rule != hidden:
            raise CheckpointError(f"{path}: fields multiple_of/ffn_dim_multiplier: expected them to give the shards' "
                                  f"hidden_dim {hidden}, found {rule}")
    config = ModelConfig(params["dim"], hidden, params["n_layers"], params["n_heads"],
                         int(params.get("n_kv_heads") or params["n_heads"]), vocab, seq_len,
                         shared_classifier="output.weight" not in tensors,
                         norm_eps=float(params.get("norm_eps", 1e-5)),
                         rope_theta=float(params.get("rope_theta", 10000.0)))
    config.validate(str(path))
    if dim != config.dim:
        raise CheckpointError(f"{folder}: tok_embeddings.weight: expected {config.dim} columns (dim), found {dim}")
    return config


def _check_shapes(folder: Path, config: ModelConfig, tensors: dict[str, Stored]) -> None:
    """Every tensor's joined shape against the config, before anything is read."""
    for name, meta_name in NAMES.items():
        if name == "wcls" and config.shared_classifier:
            continue
        for layer in (range(config.n_layers) if name in PER_LAYER else [None]):
            key = meta_name.format(layer)
            expected = tensor_shape(config, name)
            if key not in tensors:
                raise CheckpointError(f"{folder}: tensor {key!r}: expected it in the shards, found none")
            if tensors[key].shape != expected:
                raise CheckpointError(f"{folder}: tensor {key!r}: expected shape {expected} joined over the shards, "
                                      f"found {tensors[key].shape}")


def open_meta(folder: str | os.PathLike, seq_len: int | None = None) -> MetaSource:
    return MetaSource(Path(folder), seq_len or LLAMA2_SEQ_LEN)
