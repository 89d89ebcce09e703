"""`llama2nb export`: our ckpt.pt and Hugging Face Llama directories to llama2.c v0/v1/v2,
checked by running the Numba engine on the result against the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llama2nb import Transformer as Engine
from llama2nb.files.llama2c import read_checkpoint
from llama2nb.cli import main
from llama2nb.export import pick_group_size
from llama2nb.files.hf import hf_permute, hf_unpermute
from llama2nb.training.model import ModelArgs, Transformer
from tests.reference import Reference
from tests.test_training_helpers import scramble

N_POS = 72  # positions compared (>= 64)

SHAPES = {
    "gqa-shared": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16,
                            max_seq_len=N_POS),
    "mha-unshared": ModelArgs(dim=48, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=61, hidden_dim=80,
                              max_seq_len=N_POS + 8, shared_classifier=False),
}


def make_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    scramble(model, seed)
    return model.eval()


def save_ckpt(model: Transformer, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "model_args": model.args.to_dict()}, path)
    return path


def tokens(vocab: int, n: int = N_POS, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(0, vocab, n - 1).tolist()


def torch_logits(model: Transformer, toks: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([toks]))[0].numpy()


def engine_logits(path: Path, toks: list[int]) -> np.ndarray:
    engine = Engine.load(path)
    return np.stack([engine.forward(t, pos).copy() for pos, t in enumerate(toks)])


def reference_logits(path: Path, toks: list[int]) -> np.ndarray:
    ref = Reference(path)
    return np.stack([ref.forward(t, pos).copy() for pos, t in enumerate(toks)])


def export(args: list[str]) -> str:
    r = CliRunner().invoke(main, ["export", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_v0_v1_v2_match_pytorch(shape, tmp_path):
    model = make_model(SHAPES[shape])
    ckpt = save_ckpt(model, tmp_path / "ckpt.pt")
    toks = tokens(model.args.vocab_size)
    expected = torch_logits(model, toks)
    for version in (0, 1):
        out = tmp_path / f"v{version}.bin"
        export([str(ckpt), str(out), "--version", str(version)])
        assert read_checkpoint(out).config == model.args.to_config(version=version)
        diff = np.abs(engine_logits(out, toks) - expected).max()
        print(f"{shape} v{version}: Numba vs PyTorch max abs diff over {N_POS} positions: {diff:.2e}")
        assert diff <= 1e-4
    out = tmp_path / "v2.bin"
    export([str(ckpt), str(out), "--version", "2"])
    config = read_checkpoint(out).config
    assert config.version == 2 and config.dim % config.group_size == 0 and config.hidden_dim % config.group_size == 0
    got, ref = engine_logits(out, toks), reference_logits(out, toks)
    diff = np.abs(got - ref).max()
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"{shape} v2 (group {config.group_size}): Numba vs NumPy Q8_0 reference {diff:.2e}; "
          f"vs PyTorch fp32 relative {err:.3f}")
    assert diff <= 1e-4
    assert err < 0.1  # int8 weights: close to the fp32 model, not equal
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.8


def test_group_size_must_divide_every_row(tmp_path):
    model = make_model(SHAPES["mha-unshared"])  # dim 48, hidden_dim 80
    ckpt = save_ckpt(model, tmp_path / "ckpt.pt")
    r = CliRunner().invoke(main, ["export", str(ckpt), str(tmp_path / "x.bin"), "--version", "2", "--group-size", "48"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "--group-size: expected a divisor of hidden_dim=80 (every row length), found 48" in r.output
    assert not (tmp_path / "x.bin").exists()
    out = export([str(ckpt), str(tmp_path / "y.bin"), "--version", "2", "--group-size", "8"])
    assert "group size 8" in out
    assert pick_group_size(48, 80, None) == 16
    assert pick_group_size(288, 768, None) == 32  # the largest of 64, 32 dividing every row (GGUF block, VNNI)
    assert pick_group_size(64, 172, None) == 4  # stories260K: hidden_dim 172 = 4 * 43
    r = CliRunner().invoke(main, ["export", str(ckpt), str(tmp_path / "z.bin"), "--version", "1", "--group-size", "8"])
    assert r.exit_code == 1 and "only with --version 2" in r.output


def test_export_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(main, ["export", str(bad), str(tmp_path / "o.bin")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1
    hf = tmp_path / "hf"
    hf.mkdir()
    r = CliRunner().invoke(main, ["export", "--hf", str(hf), str(tmp_path / "o.bin")])
    assert r.exit_code == 1 and "config.json" in r.output


# ----------------------------------------------------------------------------------------------
# Hugging Face


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Hugging Face's names and layout, as transformers' convert_llama_weights_to_hf writes
    them: wq/wk rows permuted into the rotate-half layout (wk with the kv head count)."""
    a, w = model.args, model.export_weights()
    t = {"model.embed_tokens.weight": w["token_embedding_table"], "model.norm.weight": w["rms_final_weight"]}
    if not a.shared_classifier:
        t["lm_head.weight"] = w["wcls"]
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = hf_permute(w["wq"][i], a.n_heads)
        t[p + "self_attn.k_proj.weight"] = hf_permute(w["wk"][i], a.kv_heads)
        for hf_name, name in (("self_attn.v_proj", "wv"), ("self_attn.o_proj", "wo"), ("mlp.gate_proj", "w1"),
                              ("mlp.down_proj", "w2"), ("mlp.up_proj", "w3"), ("input_layernorm", "rms_att_weight"),
                              ("post_attention_layernorm", "rms_ffn_weight")):
            t[p + hf_name + ".weight"] = w[name][i]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}


def write_hf_dir(model: Transformer, folder: Path, fmt: str = "safetensors") -> Path:
    """A LlamaForCausalLM directory as transformers' convert_llama_weights_to_hf writes it."""
    a = model.args
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(folder / "model.safetensors"))
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": a.ffn_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
              "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab_size, "max_position_embeddings": a.max_seq_len,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": a.shared_classifier,
              "hidden_act": "silu", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_style_logits(folder: Path, toks: list[int]) -> np.ndarray:
    """An independent forward in Hugging Face's own convention (rotate_half RoPE on the permuted
    weights, repeat_kv), to check that hf_permute really is HF's layout."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    t = load_file(str(folder / "model.safetensors"))
    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hs, n = d // nh, len(toks)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2).float() / hs))
    freqs = torch.outer(torch.arange(n).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rotate_half(x):
        return torch.cat([-x[..., hs // 2:], x[..., : hs // 2]], dim=-1)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = t["model.embed_tokens.weight"][torch.tensor(toks)]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T).view(n, nh, hs).transpose(0, 1)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).view(n, nkv, hs).transpose(0, 1)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(n, nkv, hs).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / hs ** 0.5 + mask, dim=-1)
        x = x + (att @ v).transpose(0, 1).reshape(n, d) @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)
        x = x + g @ t[p + "mlp.down_proj.weight"].T
    x = norm(x, t["model.norm.weight"])
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return (x @ head.T).numpy()


def test_hf_permute_inverts():
    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    assert np.array_equal(hf_unpermute(hf_permute(w, 2), 2), w)
    assert not np.array_equal(hf_permute(w, 2), w)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_hf_matches(shape, tmp_path):
    model = make_model(SHAPES[shape], seed=3)
    toks = tokens(model.args.vocab_size, seed=1)
    expected = torch_logits(model, toks)
    folder = write_hf_dir(model, tmp_path / "hf")
    # the HF-convention forward on the HF-layout weights equals our model: the layout is HF's
    assert np.abs(hf_style_logits(folder, toks) - expected).max() <= 1e-4
    export(["--hf", str(folder), str(tmp_path / "hf.bin")])
    diff = np.abs(engine_logits(tmp_path / "hf.bin", toks) - expected).max()
    print(f"{shape} --hf safetensors v0: Numba vs PyTorch {diff:.2e}")
    assert diff <= 1e-4
    assert read_checkpoint(tmp_path / "hf.bin").config.shared_classifier == model.args.shared_classifier
    folder_bin = write_hf_dir(model, tmp_path / "hf-bin", fmt="bin")
    export([str(folder_bin), str(tmp_path / "hf1.bin"), "--version", "1"])
    assert np.abs(engine_logits(tmp_path / "hf1.bin", toks) - expected).max() <= 1e-4


def test_hf_refuses_other_rope(tmp_path):
    folder = write_hf_dir(make_model(SHAPES["gqa-shared"]), tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_theta": 500000.0}))
    r = CliRunner().invoke(main, ["export", "--hf", str(folder), str(tmp_path / "o.bin")])
    assert r.exit_code == 1 and "rope_theta: expected 10000" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("tie", [False, True])
def test_export_real_transformers_llama(tie, tmp_path):
    """Against transformers' own LlamaForCausalLM (GQA 8 heads / 2 kv heads; the dev extra
    installs transformers)."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=N_POS,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1 if "norm" in name else 0))
    hf.save_pretrained(tmp_path / "hf")
    export(["--hf", str(tmp_path / "hf"), str(tmp_path / "hf.bin")])
    toks = tokens(97)
    with torch.no_grad():
        expected = hf(torch.tensor([toks])).logits[0].numpy()
    diff = np.abs(engine_logits(tmp_path / "hf.bin", toks) - expected).max()
    print(f"transformers LlamaForCausalLM (tied={tie}) vs Numba on the --hf export: {diff:.2e}")
    assert diff <= 1e-4


def test_export_llama2c_ckpt_and_mismatched_weights(tmp_path):
    """llama2.c's own ckpt.pt (model_args without hidden_dim/shared_classifier, extra keys,
    torch.compile's _orig_mod. prefix) exports; weights that do not fit model_args are refused."""
    model = make_model(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=97, multiple_of=32,
                                 max_seq_len=N_POS))
    margs = {k: v for k, v in model.args.to_dict().items() if k not in ("hidden_dim", "shared_classifier", "norm_eps")}
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "model_args": margs, "iter_num": 5, "config": {}}, tmp_path / "l2c.pt")
    export([str(tmp_path / "l2c.pt"), str(tmp_path / "l2c.bin")])
    toks = tokens(97)
    assert np.abs(engine_logits(tmp_path / "l2c.bin", toks) - torch_logits(model, toks)).max() <= 1e-4
    torch.save({"model": sd, "model_args": {**margs, "dim": 128}}, tmp_path / "bad.pt")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "bad.pt"), str(tmp_path / "bad.bin")])
    assert r.exit_code == 1 and "size mismatch for tok_embeddings.weight" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "bad.bin").exists()
