"""`llama2nb eval`: the Numba engine's loss on a text agrees with the PyTorch model's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llama2nb import Transformer as Engine
from llama2nb.cli import main
from llama2nb.errors import Llama2nbError, TokenizerError
from llama2nb.tokenizer import BUNDLED_TOKENIZER, Tokenizer, find_tokenizer
from llama2nb.training.data import read_stories
from llama2nb.training.evaluate import encode_text, evaluate, windows
from llama2nb.training.export import export_model
from llama2nb.training.model import ModelArgs, Transformer
from tests.test_training_helpers import prepare_data, scramble


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = prepare_data(root, n_train=200, n_val=30)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=data["vocab"],
                                  multiple_of=16, max_seq_len=48)).eval()
    scramble(model, std=0.1)
    export_model(model, root / "model.bin", version=0)
    return data, model, root / "model.bin"


def torch_loss(model: Transformer, ids: list[int], seq_len: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, seq_len):
            x = torch.tensor(w[:-1])[None]
            y = torch.tensor(w[1:])[None]
            _, loss = model(x, y)
            total += loss.item() * len(w[1:])
            count += len(w[1:])
    return total / count


def test_eval_matches_pytorch(setup):
    data, model, path = setup
    tok = Tokenizer.load(data["bin"], vocab_size=data["vocab"])
    ids = encode_text(read_stories(data["val_txt"]), tok)[:400]
    assert ids[0] == 1
    result = evaluate(Engine.load(path), ids, 48)
    expected = torch_loss(model, ids, 48)
    print(f"eval: Numba {result.loss:.6f} vs PyTorch {expected:.6f} nats/token over {result.n_tokens} tokens "
          f"({result.n_windows} windows)")
    assert result.n_tokens == len(ids) - 1 and result.n_windows == 9
    assert abs(result.loss - expected) <= 1e-4
    assert result.perplexity == pytest.approx(np.exp(result.loss))


def test_eval_runs_windows_through_the_block_forward(setup):
    """One Transformer.logits call per window, never forward(): the prompt path, not token by token."""
    data, model, path = setup
    engine = Engine.load(path)
    calls = []

    class Counting:
        config = engine.config

        def logits(self, tokens, pos=0):
            calls.append(len(tokens))
            return engine.logits(tokens, pos)

    ids = list(range(1, 100))
    result = evaluate(Counting(), ids, 48)
    assert calls == [48, 48, 2] and result.n_windows == 3 and result.n_tokens == 98


@pytest.mark.parametrize("fastmath", [[], ["--no-fastmath"]])
def test_eval_cli(setup, fastmath):
    data, model, path = setup
    r = CliRunner().invoke(main, ["eval", str(path), "--text", str(data["val_txt"]), "-z", str(data["model"]),
                                  "--max-tokens", "200", *fastmath])
    assert r.exit_code == 0, r.output
    m = re.search(r"199 tokens in 5 windows of <= 48: loss ([\d.]+) nats/token, perplexity ([\d.]+)", r.output)
    assert m, r.output
    tok = Tokenizer.load(data["model"], vocab_size=data["vocab"])
    ids = encode_text(read_stories(data["val_txt"]), tok)[:200]
    assert abs(float(m.group(1)) - torch_loss(model, ids, 48)) <= 1e-4


def test_eval_errors(setup, tmp_path):
    data, model, path = setup
    r = CliRunner().invoke(main, ["eval", "no-such-model", "--text", str(data["val_txt"])])
    assert r.exit_code == 1 and "no-such-model" in r.output and "Traceback" not in r.output
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x05\x00\x00\x00" + b"\x00\x00\x00\x00\x01\x00\x00\x00a")
    r = CliRunner().invoke(main, ["eval", str(path), "--text", str(data["val_txt"]), "-z", str(other)])
    assert r.exit_code == 1 and "vocab" in r.output and "Traceback" not in r.output


def test_windows_cover_every_token_once():
    ws = windows(list(range(10)), 4)
    assert [w.tolist() for w in ws] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert sum(len(w) - 1 for w in ws) == 9


class Picked(Llama2nbError):
    """Raised by the patched Tokenizer.load: the command picked this tokenizer (and stops)."""


def picked(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    return r.output.strip().splitlines()[-1]


@pytest.mark.parametrize("present,expected", [
    ((), None),
    (("data/tok300.model",), "data/tok300.model"),
    (("data/tok300.model", "data/tok300.bin"), "data/tok300.bin"),
    (("data/tok300.bin", "models/tok300.model"), "models/tok300.model"),
    (("models/tok300.model", "models/tok300.bin"), "models/tok300.bin"),
    (("models/tok300.bin", "models/tokenizer.model"), "models/tokenizer.model"),
    (("models/tokenizer.model", "models/tokenizer.bin", "data/tok300.bin"), "models/tokenizer.bin"),
])
def test_sample_and_eval_find_the_same_tokenizer(setup, tmp_path, monkeypatch, present, expected):
    """One policy (tokenizer.find_tokenizer): beside the checkpoint, then data/tokN.* under the
    current directory; the bundled tokenizer only for its own vocabulary size (not 300 here)."""
    data, model, path = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    ckpt = tmp_path / "models" / "model.bin"
    ckpt.write_bytes(path.read_bytes())
    for name in present:
        (tmp_path / name).write_bytes(b"")
    real_load = Tokenizer.load

    def load(tokenizer_path, vocab_size=None):
        if Path(tokenizer_path) == BUNDLED_TOKENIZER:  # find_tokenizer counting the bundled one's tokens
            return real_load(tokenizer_path, vocab_size)
        raise Picked(f"picked {tokenizer_path}")

    monkeypatch.setattr(Tokenizer, "load", staticmethod(load))
    from_sample = picked(["sample", str(ckpt)])
    from_eval = picked(["eval", str(ckpt), "--text", str(data["val_txt"])])
    assert from_sample == from_eval
    if expected is None:
        assert "no tokenizer found" in from_eval and "-z" in from_eval
    else:
        assert Path(from_eval.removeprefix("Error: picked ")).resolve() == tmp_path / expected


def test_find_tokenizer_takes_the_bundled_one_for_its_vocabulary(tmp_path):
    bundled = Tokenizer.load(BUNDLED_TOKENIZER)
    assert find_tokenizer(tmp_path / "model.bin", bundled.vocab_size) == BUNDLED_TOKENIZER
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        find_tokenizer(tmp_path / "model.bin", bundled.vocab_size + 1)
