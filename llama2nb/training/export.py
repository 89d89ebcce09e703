"""Our ckpt.pt (and llama2.c's) as an export source: the PyTorch model, loaded whole (a model
small enough to train here fits in memory), its weights handed to the writers as arrays.

Every other source, the writers and the command's work live in llama2nb.export (torch-free);
this module is the one that needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..export import ExportOptions, llama2c_header
from ..files.llama2c import write_checkpoint
from ..files.source import ArraySource
from .model import ModelArgs, Transformer


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
    """Write a PyTorch model as a llama2.c checkpoint."""
    config = llama2c_header(model.args.to_config(), ExportOptions(version, group_size), out_path)
    write_checkpoint(out_path, config, model.export_weights())
    return config


def ckpt_source(ckpt_path: str | os.PathLike) -> ArraySource:
    """A ckpt.pt as a TensorSource (llama2nb.export): its model's weights, in memory."""
    model = load_model(ckpt_path)
    return ArraySource(model.args.to_config(), model.export_weights(), ckpt_path)
