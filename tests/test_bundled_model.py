"""The bundled default model (llama2nb/checkpoints/): it loads, its tokenizer matches it, greedy
generation reads as English, and `llama2nb sample` with no checkpoint runs it."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from llama2nb import Sampler, Tokenizer, Transformer, cli, generate
from llama2nb.generate import TokenEvent

BUNDLED = cli.BUNDLED_DIR
MODEL, TOKENIZER_BIN, TOKENIZER_MODEL = (BUNDLED / n for n in ("model.bin", "tokenizer.bin", "tokenizer.model"))

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not present")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.load(MODEL)


def test_files_present_and_small():
    files = [MODEL, TOKENIZER_BIN, TOKENIZER_MODEL, BUNDLED / "README.md"]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in BUNDLED.iterdir() if f.is_file()) < 10_000_000


def test_model_is_v0(model):
    assert model.config.version == 0
    assert model.config.vocab_size > 256


@pytest.mark.parametrize("path", [TOKENIZER_BIN, TOKENIZER_MODEL], ids=["bin", "model"])
def test_tokenizer_matches(model, path):
    tokenizer = Tokenizer.load(path, vocab_size=model.config.vocab_size)
    text = "Once upon a time, there was a little girl named Lily."
    assert tokenizer.decode(tokenizer.encode(text, bos=True)).strip() == text


def greedy(model, tokenizer, prompt: str, steps: int) -> str:
    sampler = Sampler(model.config.vocab_size, temperature=0.0, topp=0.9, seed=1)
    run = generate(model, tokenizer, sampler, prompt=prompt, steps=steps)
    return "".join(e.text for e in run if isinstance(e, TokenEvent))


def test_greedy_story_is_english(model):
    tokenizer = Tokenizer.load(TOKENIZER_BIN, vocab_size=model.config.vocab_size)
    text = greedy(model, tokenizer, "Once upon a time", 64)
    words = re.findall(r"[a-z]+", text.lower())
    assert text.count(" ") >= 10, text
    assert len(words) >= 10, text
    assert {"the", "a", "and", "was", "she", "he"} & set(words), text


def test_sample_without_checkpoint():
    result = CliRunner().invoke(cli.main, ["sample", "-n", "32", "-t", "0"])
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"[A-Za-z]+", result.output)) >= 5, result.output
