"""Export to llama2.c checkpoints (v0 fp32 legacy, v1 fp32, v2 Q8_0): from our ckpt.pt, and
from a Hugging Face Llama directory (config.json + safetensors or pytorch_model.bin weights).

The file format itself lives in llama2nb.files.llama2c.write_checkpoint; this module only gathers
float32 arrays in its naming and picks the header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..files.llama2c import write_checkpoint
from ..config import ModelConfig
from ..errors import CheckpointError
from .model import ModelArgs, Transformer



def pick_group_size(dim: int, hidden_dim: int, requested: int | None, source: str = "export") -> int:
    """Q8_0 group size: `requested` if it divides every row length (dim and hidden_dim), else an
    error; by default the shape's ModelConfig.q8_group_size (the one policy, shared with the bench)."""
    if requested:
        for name, n in (("dim", dim), ("hidden_dim", hidden_dim)):
            if requested <= 0 or n % requested:
                raise CheckpointError(f"{source}: --group-size: expected a divisor of {name}={n} "
                                      f"(every row length), found {requested}")
        return requested
    return ModelConfig(dim, hidden_dim, 1, 1, 1, 1, 1).q8_group_size


def _header(config: ModelConfig, version: int, group_size: int | None, source: str) -> ModelConfig:
    from dataclasses import replace

    if version not in (0, 1, 2):
        raise CheckpointError(f"{source}: --version: expected 0, 1 or 2, found {version}")
    gs = pick_group_size(config.dim, config.hidden_dim, group_size, source) if version == 2 else 0
    if version != 2 and group_size:
        raise CheckpointError(f"{source}: --group-size: expected only with --version 2, found {group_size}")
    return replace(config, version=version, group_size=gs)


# ----------------------------------------------------------------------------------------------
# Our ckpt.pt


def load_model(ckpt_path: str | os.PathLike) -> Transformer:
    """The PyTorch model of a llama2nb ckpt.pt (eval mode, float32, CPU)."""
    path = Path(ckpt_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: cannot read: no such file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: expected a llama2nb ckpt.pt, found unreadable data ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model_args" not in state or "model" not in state:
        raise CheckpointError(f"{path}: expected a llama2nb ckpt.pt with model_args and model, found other data")
    known = set(ModelArgs.__dataclass_fields__)
    margs = {k: v for k, v in dict(state["model_args"]).items() if k in known}  # llama2.c's ckpt.pt too
    try:
        args = ModelArgs(**margs)
        args.to_config().validate(f"{path}: model_args")
        model = Transformer(args)
        sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
        model.load_state_dict(sd)
    except (TypeError, RuntimeError, AssertionError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise CheckpointError(f"{path}: model weights: expected tensors of the shapes model_args give, found "
                              f"{detail.rstrip('.')}") from None
    return model.eval()


def export_model(model: Transformer, out_path: str | os.PathLike, version: int = 0,
                 group_size: int | None = None) -> ModelConfig:
    config = _header(model.args.to_config(), version, group_size, str(out_path))
    write_checkpoint(out_path, config, model.export_weights())
    return config


def export_ckpt(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, version: int = 0,
                group_size: int | None = None) -> ModelConfig:
    return export_model(load_model(ckpt_path), out_path, version, group_size)


# ----------------------------------------------------------------------------------------------
# Hugging Face Llama


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta → HF layout of wq/wk rows (HF's convert_llama_weights_to_hf permute): per head, the
    interleaved (2i, 2i+1) rotary pairs become the halves (i, i + head_size/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF → Meta/llama2.c layout, the inverse of hf_permute. For wk, n_heads is the number of
    key/value heads (wk has n_kv_heads * head_size rows): llama2.c's export uses n_heads there,
    which scrambles grouped-query models."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    st = sorted(hf_dir.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if st:
        from safetensors.torch import load_file

        for f in st:
            try:
                tensors.update(load_file(str(f)))
            except Exception as e:
                raise CheckpointError(f"{f}: expected safetensors weights, found unreadable data ({e})") from None
        return tensors
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{hf_dir}: expected *.safetensors or pytorch_model*.bin weights, found neither")
    for f in bins:
        try:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"{f}: expected PyTorch weights, found unreadable data ({type(e).__name__})") from None
    return tensors


def load_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """ModelConfig and write_checkpoint weights of a Hugging Face LlamaForCausalLM directory."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: expected a Hugging Face config.json, found nothing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: expected JSON, found unreadable data ({e})") from None

    def field(name: str, default=None):
        if name in hf and hf[name] is not None:
            return hf[name]
        if default is None:
            raise CheckpointError(f"{cfg_path}: field {name}: expected a value, found none")
        return default

    theta = field("rope_theta", 10000.0)
    if float(theta) != 10000.0:
        raise CheckpointError(f"{cfg_path}: field rope_theta: expected 10000 (the engine's RoPE), found {theta}")
    if hf.get("rope_scaling"):
        raise CheckpointError(f"{cfg_path}: field rope_scaling: expected none (the engine has plain RoPE), "
                              f"found {hf['rope_scaling']}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{cfg_path}: field attention_bias/mlp_bias: expected false, found true")
    dim, n_heads = int(field("hidden_size")), int(field("num_attention_heads"))
    n_kv = int(field("num_key_value_heads", n_heads))
    n_layers = int(field("num_hidden_layers"))
    if "head_dim" in hf and hf["head_dim"] not in (None, dim // n_heads):
        raise CheckpointError(f"{cfg_path}: field head_dim: expected hidden_size / num_attention_heads = "
                              f"{dim // n_heads}, found {hf['head_dim']}")
    t = _hf_tensors(hf_dir)

    def get(name: str) -> np.ndarray:
        for key in (name, name.removeprefix("model.")):
            if key in t:
                return t[key].to(torch.float32).numpy()
        raise CheckpointError(f"{hf_dir}: weight {name}: expected it in the weight files, found none")

    shared = bool(hf.get("tie_word_embeddings", False)) or ("lm_head.weight" not in t)
    emb = get("model.embed_tokens.weight")
    if not shared and np.array_equal(get("lm_head.weight"), emb):
        shared = True
    vocab = int(field("vocab_size", emb.shape[0]))
    if emb.shape[0] != vocab:
        raise CheckpointError(f"{hf_dir}: model.embed_tokens.weight: expected {vocab} rows (vocab_size), found {emb.shape[0]}")
    hidden = int(field("intermediate_size"))
    seq_len = int(field("max_position_embeddings"))
    config = ModelConfig(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared_classifier=shared)
    config.validate(str(cfg_path))

    def layers(fmt: str, fix=None) -> np.ndarray:
        arrays = []
        for i in range(n_layers):
            a = get(fmt.format(i))
            arrays.append(fix(a) if fix else a)
        return np.stack(arrays)

    p = "model.layers.{}."
    w = {
        "token_embedding_table": emb,
        "rms_att_weight": layers(p + "input_layernorm.weight"),
        "rms_ffn_weight": layers(p + "post_attention_layernorm.weight"),
        "rms_final_weight": get("model.norm.weight"),
        "wq": layers(p + "self_attn.q_proj.weight", lambda a: hf_unpermute(a, n_heads)),
        "wk": layers(p + "self_attn.k_proj.weight", lambda a: hf_unpermute(a, n_kv)),
        "wv": layers(p + "self_attn.v_proj.weight"),
        "wo": layers(p + "self_attn.o_proj.weight"),
        "w1": layers(p + "mlp.gate_proj.weight"),
        "w2": layers(p + "mlp.down_proj.weight"),
        "w3": layers(p + "mlp.up_proj.weight"),
    }
    if not shared:
        w["wcls"] = get("lm_head.weight")
    for name, (rows, cols) in config.matrix_shapes().items():
        if w[name].shape != (n_layers, rows, cols):
            raise CheckpointError(f"{hf_dir}: weight {name}: expected shape {(n_layers, rows, cols)}, "
                                  f"found {w[name].shape}")
    return config, w


def export_hf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, version: int = 0,
              group_size: int | None = None) -> ModelConfig:
    config, weights = load_hf(hf_dir)
    config = _header(config, version, group_size, str(out_path))
    write_checkpoint(out_path, config, weights)
    return config


def eps_warning(hf_dir: str | os.PathLike) -> str | None:
    try:
        eps = json.loads((Path(hf_dir) / "config.json").read_text()).get("rms_norm_eps", 1e-5)
    except Exception:
        return None
    if eps is not None and abs(float(eps) - 1e-5) > 1e-12:
        return f"warning: rms_norm_eps is {eps}; the engine uses 1e-5 (logits will differ slightly)"
    return None
