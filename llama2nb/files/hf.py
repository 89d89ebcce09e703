"""Hugging Face Llama directories as a tensor source: config.json + safetensors or .bin weights.

Contract: `open_hf(folder)` checks config.json and the weight files' tensor names and shapes and
returns a TensorSource (files.source) that reads each tensor on demand, a block of rows at a
time, as float32. Weights are model.safetensors, or shards named by
model.safetensors.index.json (or any *.safetensors), parsed by the reader below and mapped with
np.memmap: no torch needed; else pytorch_model*.bin (with or without its index), mapped by
torch.load(mmap=True). float32, float16 and bfloat16 are read.

What is checked, because the engine would otherwise compute another model silently:
model_type llama, hidden_act silu, no rope scaling (config.json's rope_scaling, or
transformers 5's rope_parameters with a rope_type other than default), no biases, head_dim =
hidden_size / num_attention_heads, every tensor's shape. rms_norm_eps and rope_theta go into
the config (a llama2.c file can only hold Llama 2's values; its writer refuses others).

Hugging Face's converter permutes q and k rows per head from Meta's interleaved RoPE pairs to
"rotate half" (convert_llama_weights_to_hf's permute): they are un-permuted here, q with
num_attention_heads and k with num_key_value_heads (llama2.c's export.py uses the query head
count for k too, which scrambles every grouped-query model).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError
from .source import PER_LAYER, NumpyStored, Stored, TensorSource, TorchStored, load_torch_mapped, \
    read_json_object, read_rows, tensor_shape

NAMES = {  # engine name -> Hugging Face's ({} is the layer)
    "token_embedding_table": "model.embed_tokens.weight", "rms_final_weight": "model.norm.weight",
    "wcls": "lm_head.weight", "rms_att_weight": "model.layers.{}.input_layernorm.weight",
    "rms_ffn_weight": "model.layers.{}.post_attention_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight", "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight", "wo": "model.layers.{}.self_attn.o_proj.weight",
    "w1": "model.layers.{}.mlp.gate_proj.weight", "w2": "model.layers.{}.mlp.down_proj.weight",
    "w3": "model.layers.{}.mlp.up_proj.weight",
}
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # RoPE's table, saved by old transformers versions
SAFETENSORS_DTYPES = {"F32": (np.float32, False), "F16": (np.float16, False), "BF16": (np.uint16, True)}
MAX_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta -> HF layout of wq/wk rows (HF's convert_llama_weights_to_hf permute): per head, the
    interleaved (2i, 2i+1) rotary pairs become the halves (i, i + head_size/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> Meta/llama2.c layout, the inverse of hf_permute, for `n_heads` whole heads of rows
    (wk: the key/value head count)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def is_hf_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file()


# ----------------------------------------------------------------------------------------------
# safetensors, without the safetensors package: u64 header length, JSON header, raw data


def read_safetensors(path: Path) -> dict[str, Stored | str]:
    """Every tensor of a safetensors file as a view into one np.memmap of it (dtype names that
    cannot be read map to that name, refused only if the tensor is needed). Offsets and sizes
    are checked against the file before any view is made."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: safetensors header length: expected 1..{min(MAX_HEADER, size - 8)} "
                                      f"bytes, found {n}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header: expected JSON, found unreadable data ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header: expected a JSON object, found {type(header).__name__}")
    data_start = 8 + n
    mm = np.memmap(path, np.uint8, "r")
    tensors: dict[str, Stored | str] = {}
    for name, info in header.items():
        if name != "__metadata__":
            tensors[name] = _safetensors_view(path, mm, data_start, name, info)
    return tensors


def _safetensors_view(path: Path, mm: np.ndarray, data_start: int, name: str, info: Any) -> Stored | str:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        assert all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
    except (TypeError, KeyError, ValueError, AssertionError):
        raise CheckpointError(f"{path}: tensor {name!r}: expected dtype, shape and data_offsets, found {info!r}") \
            from None
    if dtype not in SAFETENSORS_DTYPES:
        return dtype
    np_dtype, bfloat16 = SAFETENSORS_DTYPES[dtype]
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if not begin <= end <= mm.size - data_start or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r}: expected {nbytes:,} bytes of {dtype} {list(shape)} inside "
                              f"the file's {mm.size - data_start:,} data bytes, found offsets {begin}..{end}")
    view = np.ndarray(shape, np_dtype, buffer=mm, offset=data_start + begin)
    return NumpyStored(view, bfloat16)


# ----------------------------------------------------------------------------------------------
# The directory


def weight_files(folder: Path) -> list[Path]:
    """The weight files, as transformers would pick them: safetensors first, an index first."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
                return [folder / f for f in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{folder / index}: expected JSON with a weight_map, found unreadable data "
                                      f"({type(e).__name__})") from None
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{folder}: expected model.safetensors (or shards with an index) or pytorch_model*.bin, "
                          "found none")


def read_tensors(folder: Path) -> dict[str, Stored | str]:
    """Every tensor of every weight file, by Hugging Face name ("model." added where a bare
    LlamaModel left it out), mapped."""
    tensors: dict[str, Stored | str] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"{path}: expected the weight file the index names, found nothing")
        if path.suffix == ".safetensors":
            found = read_safetensors(path)
        else:
            found = {k: TorchStored(v) for k, v in load_torch_mapped(path).items()}
        for name, stored in found.items():
            key = name if name.startswith(("model.", "lm_head.")) else "model." + name
            if key in tensors:
                raise CheckpointError(f"{path}: tensor {name!r}: expected it once in the weight files, found it twice")
            tensors[key] = stored
    return tensors


def read_hf_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "config.json", "a Hugging Face config.json")


def _field(hf: dict[str, Any], path: Path, name: str, default: Any = None) -> Any:
    value = hf.get(name)
    if value is None:
        if default is None:
            raise CheckpointError(f"{path}: field {name}: expected a value, found none")
        return default
    return value


def _rope_theta(hf: dict[str, Any], path: Path) -> float:
    """RoPE's base, refusing any scaling: config.json's rope_theta and rope_scaling, or
    transformers 5's rope_parameters."""
    params = hf.get("rope_parameters") or {}
    for key, spec in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", params)):
        kind = (spec or {}).get("rope_type", (spec or {}).get("type", "default"))
        if spec and kind != "default":
            raise CheckpointError(f"{path}: field {key}: expected no scaling (the engine has plain RoPE), found {spec}")
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def hf_config(folder: Path, hf: dict[str, Any], tensors: dict[str, Any], seq_len: int | None) -> ModelConfig:
    path = folder / "config.json"
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: field model_type: expected llama, found {hf['model_type']}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: field hidden_act: expected silu (SwiGLU), found {hf['hidden_act']}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{path}: field {key}: expected false (the engine has no biases), found true")
    dim, n_heads = int(_field(hf, path, "hidden_size")), int(_field(hf, path, "num_attention_heads"))
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{path}: field head_dim: expected hidden_size / num_attention_heads = "
                              f"{dim // n_heads}, found {hf['head_dim']}")
    embedding = tensors.get(NAMES["token_embedding_table"])
    if not isinstance(embedding, Stored):
        raise CheckpointError(f"{folder}: tensor {NAMES['token_embedding_table']!r}: expected it in the weight files "
                              f"as F32, F16 or BF16, found {embedding or 'none'}")
    vocab = embedding.shape[0]
    if int(_field(hf, path, "vocab_size", vocab)) != vocab:
        raise CheckpointError(f"{path}: field vocab_size: expected the embedding's {vocab} rows, found {hf['vocab_size']}")
    shared = bool(hf.get("tie_word_embeddings", False)) or NAMES["wcls"] not in tensors
    config = ModelConfig(dim, int(_field(hf, path, "intermediate_size")), int(_field(hf, path, "num_hidden_layers")),
                         n_heads, int(_field(hf, path, "num_key_value_heads", n_heads)), vocab,
                         seq_len or int(_field(hf, path, "max_position_embeddings")), shared_classifier=shared,
                         norm_eps=float(_field(hf, path, "rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf, path))
    config.validate(str(path))
    return config


def _check_tensors(folder: Path, config: ModelConfig, tensors: dict[str, Stored | str]) -> None:
    """Every tensor the engine needs, of its shape and a readable dtype; nothing else but RoPE
    tables (and a tied lm_head): a bias or an unknown tensor means another architecture."""
    wanted = {}
    for name, hf_name in NAMES.items():
        for layer in (range(config.n_layers) if name in PER_LAYER else [None]):
            if name != "wcls" or not config.shared_classifier:
                wanted[hf_name.format(layer)] = tensor_shape(config, name)
    for key in sorted(tensors):
        if key not in wanted and not key.endswith(IGNORED_SUFFIX) and key != NAMES["wcls"]:
            raise CheckpointError(f"{folder}: tensor {key!r}: expected only Llama's tensors for "
                                  f"num_hidden_layers={config.n_layers} (biases, other architectures are not supported)")
    for key, shape in wanted.items():
        stored = tensors.get(key)
        if not isinstance(stored, Stored):
            raise CheckpointError(f"{folder}: tensor {key!r}: expected it in the weight files as F32, F16 or BF16, "
                                  f"found {stored or 'none'}")
        if tuple(stored.shape) != shape:
            raise CheckpointError(f"{folder}: tensor {key!r}: expected shape {shape}, found {tuple(stored.shape)}")


class HFSource(TensorSource):
    """A Hugging Face Llama directory, its weights mapped (see the module docstring)."""

    def __init__(self, folder: Path, seq_len: int | None = None) -> None:
        hf = read_hf_config(folder)
        tensors = read_tensors(folder)
        config = hf_config(folder, hf, tensors, seq_len)
        _check_tensors(folder, config, tensors)
        tokenizer = folder / "tokenizer.model"
        super().__init__(config, folder, tokenizer if tokenizer.is_file() else None)
        self.tensors = tensors
        self.heads = {"wq": config.n_heads, "wk": config.n_kv_heads}

    def row_multiple(self, name):
        return self.config.head_size if name in self.heads else 1

    def read(self, name, layer, start, stop):
        rows = read_rows(self.tensors[NAMES[name].format(layer)], start, stop)
        if name in self.heads:  # blocks of whole heads (row_multiple): un-permute each
            rows = hf_unpermute(rows, (stop - start) // self.config.head_size)
        return rows


def open_hf(folder: str | os.PathLike, seq_len: int | None = None) -> HFSource:
    return HFSource(Path(folder), seq_len)
