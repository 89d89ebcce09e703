"""Helpers shared by the training/export/eval/data tests (no tests here): a synthetic story text,
a small vocabulary trained on it, and pretokenized shards."""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia"]
THINGS = ["ball", "cat", "dog", "tree", "cake", "box", "kite", "boat"]
VERBS = ["saw", "liked", "found", "wanted", "lost", "had"]
MOODS = ["happy", "sad", "big", "red", "small", "funny"]


def synthetic_stories(n: int, seed: int = 0) -> list[str]:
    """Tiny, very regular stories: a small model learns them in a few dozen steps."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        who, what, mood = rng.choice(NAMES), rng.choice(THINGS), rng.choice(MOODS)
        lines = [f"Once upon a time, there was a {mood} {what}.",
                 f"{who} {rng.choice(VERBS)} the {what}. {who} was {rng.choice(MOODS)}.",
                 f"The {what} and {who} played all day. The end."]
        stories.append(" ".join(lines))
    return stories


def write_eot_text(path: Path, stories: list[str]) -> Path:
    """TinyStories-train.txt's layout: stories separated by <|endoftext|> lines."""
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path


def write_blank_line_text(path: Path, stories: list[str]) -> Path:
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    return path


def prepare_data(root: Path, vocab_size: int = 300, n_train: int = 400, n_val: int = 60) -> dict:
    """Text files, DATA/tokN.model + .bin and DATA/tokN/{train,val}-000.bin via the CLI."""
    from click.testing import CliRunner

    from llama2nb.cli import main

    root.mkdir(parents=True, exist_ok=True)
    train_txt = write_eot_text(root / "train.txt", synthetic_stories(n_train, seed=1))
    val_txt = write_blank_line_text(root / "val.txt", synthetic_stories(n_val, seed=2))
    data = root / "data"
    runner = CliRunner()
    r = runner.invoke(main, ["data", "train-vocab", "--vocab-size", str(vocab_size), "--text", str(train_txt),
                             "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["data", "pretokenize", "--vocab-size", str(vocab_size), "--text", str(train_txt),
                             "--val-text", str(val_txt), "--data-dir", str(data), "--workers", "1"])
    assert r.exit_code == 0, r.output
    return {"train_txt": train_txt, "val_txt": val_txt, "data": data, "shards": data / f"tok{vocab_size}",
            "model": data / f"tok{vocab_size}.model", "bin": data / f"tok{vocab_size}.bin", "vocab": vocab_size}


def scramble(model, seed: int = 0, std: float = 0.15) -> None:
    """Give a freshly initialized torch model larger random weights (norm weights near 1), so
    logits vary enough for a comparison to mean something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
